//! `GET /api/v1/usage`: the ledger by day, customer and model, as JSON or CSV
//! (`?format=csv` or `Accept: text/csv`), for a window of at most 366 days.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tollgate_core::money::Nanos;
use tollgate_core::projects::validate_external_id;
use tollgate_core::time::UnixMillis;
use tollgate_core::usage::{self, DAY_MS, UsageRow};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem, RateLimited, Unauthorized, query_params};
use crate::state::AppState;

#[derive(Debug, Deserialize, Default, IntoParams)]
#[serde(default)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Only this customer (your id for it).
    customer: Option<String>,
    /// The start of the window (Unix milliseconds, inclusive); 30 days before `to` unless given.
    #[param(value_type = Option<i64>, minimum = 0)]
    from: Option<String>,
    /// The end of the window (Unix milliseconds, exclusive); now unless given. At most 366 days
    /// after `from`.
    #[param(value_type = Option<i64>, minimum = 0)]
    to: Option<String>,
    /// `csv` for CSV; unless given, CSV when the request accepts `text/csv`, else JSON.
    #[param(value_type = Option<UsageFormat>, inline)]
    format: Option<String>,
}

/// The form of a usage export.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code, reason = "describes the `format` strings; never built")]
pub enum UsageFormat {
    Json,
    Csv,
}

/// Usage of one customer and model on one UTC day.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageDay {
    /// The day's start (Unix milliseconds, UTC midnight).
    day: i64,
    /// The day, ISO 8601 (UTC).
    #[schema(example = "2026-01-01")]
    date: String,
    /// Your id for the customer; null for calls of a deleted customer or that named none.
    #[schema(required = true)]
    customer: Option<String>,
    #[schema(example = "gpt-4o-mini")]
    model: String,
    /// Calls settled.
    calls: i64,
    /// Calls refused (budget, block, or no price).
    refused: i64,
    /// Input tokens, cached and cache writes included.
    input_tokens: i64,
    output_tokens: i64,
    /// What the calls cost the customer, markup included, in the project's currency.
    #[schema(example = "0.0125")]
    billed: String,
    billed_nanos: i64,
}

impl From<&UsageRow> for UsageDay {
    fn from(r: &UsageRow) -> Self {
        UsageDay {
            day: r.day,
            date: iso_date(r.day),
            customer: r.customer.clone(),
            model: r.model.clone(),
            calls: r.calls,
            refused: r.refused,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            billed: Nanos(r.billed_nanos).to_string(),
            billed_nanos: r.billed_nanos,
        }
    }
}

/// The ledger of a window by day, customer and model.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    /// Unix milliseconds, inclusive.
    from: i64,
    /// Unix milliseconds, exclusive.
    to: i64,
    /// The project's currency (ISO 4217, lowercase).
    #[schema(example = "usd")]
    currency: String,
    /// In order of day, customer and model.
    data: Vec<UsageDay>,
}

fn millis(field: &str, text: Option<&str>, default: i64) -> Result<i64, ApiError> {
    match text {
        None => Ok(default),
        Some(t) => t
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|v| *v >= 0)
            .ok_or_else(|| ApiError::field(field, "must be Unix milliseconds")),
    }
}

/// `2026-01-01` for a day's start in Unix milliseconds (UTC).
fn iso_date(ms: i64) -> String {
    crate::routes::dashboard::format::date(ms)
}

/// A CSV field, quoted when it needs to be (and never starting a formula in a spreadsheet).
pub(crate) fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@']) { format!("'{text}") } else { text.to_owned() };
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text }
}

/// Export usage
///
/// The ledger by UTC day, customer and model for a window of at most 366 days, refused calls
/// included: JSON, or CSV with `format=csv` or `Accept: text/csv` (the fields of `UsageDay`,
/// without the nano-units, then `currency`; `day` as an ISO 8601 date, and its Unix
/// milliseconds last as `day_ms`).
#[utoipa::path(
    get,
    path = "/api/v1/usage",
    operation_id = "export_usage",
    tag = "Usage",
    params(UsageQuery),
    responses(
        (status = 200, description = "The usage", content(
            (UsageReport = "application/json"),
            (String = "text/csv", example = "day,customer,model,calls,refused,input_tokens,output_tokens,billed,currency,day_ms\n2026-01-01,customer-42,gpt-4o-mini,3,0,1200,300,0.0125,usd,1767225600000\n"),
        )),
        (status = 401, response = Unauthorized),
        (status = 422, description = "`customer`, `from`, `to` or `format` is not valid", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, response = RateLimited),
    )
)]
pub async fn export(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let project = super::project(&state, &headers).await?;
    let query = query_params(query)?;
    let to = millis("to", query.to.as_deref(), UnixMillis::now().0)?;
    let from = millis("from", query.from.as_deref(), to - 30 * DAY_MS)?;
    if from >= to || to - from > 366 * DAY_MS {
        return Err(ApiError::field("from", "must be before `to`, at most 366 days apart"));
    }
    if let Some(customer) = &query.customer
        && validate_external_id(customer).is_err()
    {
        return Err(ApiError::field("customer", "must be 1 to 200 printable characters"));
    }
    let csv = match query.format.as_deref() {
        Some("csv") => true,
        Some("json") => false,
        Some(_) => return Err(ApiError::field("format", "must be json or csv")),
        None => headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/csv")),
    };
    let rows = usage::by_day_customer_model(
        &state.db,
        &project.id,
        query.customer.as_deref(),
        UnixMillis(from),
        UnixMillis(to),
    )
    .await?;
    if csv {
        let mut out =
            String::from("day,customer,model,calls,refused,input_tokens,output_tokens,billed,currency,day_ms\n");
        for r in &rows {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{}\n",
                iso_date(r.day),
                csv_field(r.customer.as_deref().unwrap_or("")),
                csv_field(&r.model),
                r.calls,
                r.refused,
                r.input_tokens,
                r.output_tokens,
                Nanos(r.billed_nanos),
                project.currency,
                r.day
            ));
        }
        let mut response = out.into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
        return Ok(response);
    }
    let data = rows.iter().map(UsageDay::from).collect();
    Ok(Json(UsageReport { from, to, currency: project.currency, data }).into_response())
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn csv_fields_are_quoted_and_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=SUM(A1)"), "'=SUM(A1)");
    }
}

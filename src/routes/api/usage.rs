//! `GET /api/v1/usage`: the ledger by day, customer and model, as JSON or CSV
//! (`?format=csv` or `Accept: text/csv`), for a window of at most 366 days.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tollgate_core::money::Nanos;
use tollgate_core::time::UnixMillis;
use tollgate_core::usage::{self, DAY_MS};

use super::error::ApiError;
use crate::state::AppState;

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub struct UsageQuery {
    customer: Option<String>,
    /// Unix milliseconds; default 30 days before `to`.
    from: Option<String>,
    /// Unix milliseconds; default now.
    to: Option<String>,
    format: Option<String>,
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

/// A CSV field, quoted when it needs to be (and never starting a formula in a spreadsheet).
fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@']) { format!("'{text}") } else { text.to_owned() };
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text }
}

pub async fn export(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<UsageQuery>,
) -> Result<Response, ApiError> {
    let project = super::project(&state, &headers).await?;
    let to = millis("to", query.to.as_deref(), UnixMillis::now().0)?;
    let from = millis("from", query.from.as_deref(), to - 30 * DAY_MS)?;
    if from >= to || to - from > 366 * DAY_MS {
        return Err(ApiError::field("from", "must be before `to`, at most 366 days apart"));
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
        let mut out = String::from("day,customer,model,calls,refused,input_tokens,output_tokens,billed,currency\n");
        for r in &rows {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{}\n",
                r.day,
                csv_field(r.customer.as_deref().unwrap_or("")),
                csv_field(&r.model),
                r.calls,
                r.refused,
                r.input_tokens,
                r.output_tokens,
                Nanos(r.billed_nanos),
                project.currency
            ));
        }
        let mut response = out.into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
        return Ok(response);
    }
    let data: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "day": r.day, "customer": r.customer, "model": r.model, "calls": r.calls, "refused": r.refused,
                "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
                "billed": Nanos(r.billed_nanos).to_string(), "billed_nanos": r.billed_nanos,
            })
        })
        .collect();
    Ok(Json(json!({ "from": from, "to": to, "currency": project.currency, "data": data })).into_response())
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

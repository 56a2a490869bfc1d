//! `/api/v1/customers`: a tenant's backend sets its customers' budgets.
//!
//! A customer is addressed by the tenant's own id (`id` in bodies, the path segment in URLs).
//! Amounts are decimal strings in the project's currency (`"10.00"`), also given in nano-units
//! (`budget_nanos`) on the way out.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_core::customers::{self, CustomerInput, CustomerRow, DeleteError};
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::projects::Project;

use super::error::{ApiError, FieldError, json_body};
use crate::state::AppState;

fn budget_detail(c: &CustomerRow, project: &Project) -> String {
    format!("budget {} {} per {} (API)", Nanos(c.budget_nanos), project.currency, c.budget_period)
}

/// A customer as the API shows it.
fn view(c: &CustomerRow, project: &Project) -> Value {
    json!({
        "id": c.external_id,
        "name": c.name,
        "email": c.email,
        "budget": Nanos(c.budget_nanos).to_string(),
        "budget_nanos": c.budget_nanos,
        "period": c.budget_period,
        "period_start": c.period_start,
        "period_end": c.period_end,
        "spent": Nanos(c.spent_nanos).to_string(),
        "spent_nanos": c.spent_nanos,
        "reserved_nanos": c.reserved_nanos,
        "remaining": c.remaining().to_string(),
        "remaining_nanos": c.remaining().0,
        "currency": project.currency,
        "blocked": c.blocked,
        "created_at": c.created_at,
    })
}

/// The body of a create-or-update; every field but `id` optional on update.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CustomerBody {
    id: Option<String>,
    name: Option<String>,
    email: Option<String>,
    budget: Option<Value>,
    period: Option<String>,
}

fn parse_budget(value: &Value) -> Result<Nanos, FieldError> {
    let bad = || FieldError {
        field: "budget".into(),
        message: "must be a decimal amount as a string, such as \"10.00\"".into(),
    };
    match value {
        Value::String(text) => text.trim().parse::<Nanos>().map_err(|_| bad()),
        Value::Number(n) if n.is_i64() => n.to_string().parse::<Nanos>().map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// The input this body asks for, over `current` when updating.
fn input(body: CustomerBody, external_id: String, current: Option<&CustomerRow>) -> Result<CustomerInput, ApiError> {
    let mut errors = Vec::new();
    let budget = match (&body.budget, current) {
        (Some(value), _) => parse_budget(value).map_err(|e| errors.push(e)).ok(),
        (None, Some(c)) => Some(Nanos(c.budget_nanos)),
        (None, None) => {
            errors.push(FieldError { field: "budget".into(), message: "is required".into() });
            None
        }
    };
    let period = match (&body.period, current) {
        (Some(text), _) => BudgetPeriod::parse(text).or_else(|| {
            errors
                .push(FieldError { field: "period".into(), message: "must be month, day, rolling or lifetime".into() });
            None
        }),
        (None, Some(c)) => BudgetPeriod::parse(&c.budget_period),
        (None, None) => Some(BudgetPeriod::Month),
    };
    let keep = |new: Option<String>, old: Option<&Option<String>>| new.or_else(|| old.cloned().flatten());
    let input = CustomerInput {
        external_id,
        name: keep(body.name, current.map(|c| &c.name)),
        email: keep(body.email, current.map(|c| &c.email)),
        budget: budget.unwrap_or(Nanos::ZERO),
        period: period.unwrap_or(BudgetPeriod::Month),
    };
    for problem in input.problems() {
        if let tollgate_core::projects::ProjectError::Invalid { field, reason } = problem {
            let field = if field == "customer" { "id" } else { field };
            errors.push(FieldError { field: field.into(), message: reason });
        }
    }
    if errors.is_empty() {
        Ok(input)
    } else {
        let detail = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ");
        Err(ApiError::Invalid { detail, errors })
    }
}

/// `POST /api/v1/customers`: creates the customer `id`, or updates it if it exists (201 or 200).
pub async fn upsert(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<CustomerBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    let mut body = json_body(body)?;
    let external_id = body.id.take().ok_or_else(|| ApiError::field("id", "is required"))?;
    let existing = customers::find(&state.db, &project.id, external_id.trim()).await?;
    let input = input(body, external_id, existing.as_ref())?;
    let saved = customers::save(&state.db, &project.id, &input).await?;
    super::audit(&state, &project, &actor, "customer.saved", &saved.external_id, &budget_detail(&saved, &project))
        .await?;
    let status = if existing.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(view(&saved, &project))).into_response())
}

async fn found(state: &AppState, project: &Project, external_id: &str) -> Result<CustomerRow, ApiError> {
    customers::find(&state.db, &project.id, external_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("No customer `{external_id}` in this project.")))
}

pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(external_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let project = super::project(&state, &headers).await?;
    let customer = found(&state, &project, &external_id).await?;
    Ok(Json(view(&customer, &project)))
}

/// `PATCH /api/v1/customers/{id}`: changes the fields given.
pub async fn update(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(external_id): Path<String>,
    body: Result<Json<CustomerBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    let body = json_body(body)?;
    if body.id.as_deref().is_some_and(|id| id != external_id) {
        return Err(ApiError::field("id", "cannot be changed"));
    }
    let current = found(&state, &project, &external_id).await?;
    let input = input(body, external_id, Some(&current))?;
    let saved = customers::save(&state.db, &project.id, &input).await?;
    super::audit(&state, &project, &actor, "customer.saved", &saved.external_id, &budget_detail(&saved, &project))
        .await?;
    Ok(Json(view(&saved, &project)))
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /api/v1/customers?limit=&cursor=`: a page in the tenant's id order, and the cursor of
/// the next page (null on the last).
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let project = super::project(&state, &headers).await?;
    let limit = match query.limit.as_deref() {
        None => 50,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=500).contains(l))
            .ok_or_else(|| ApiError::field("limit", "must be a whole number from 1 to 500"))?,
    };
    let after = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(cursor) => Some(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(cursor)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| ApiError::field("cursor", "is not a cursor this API gave out"))?,
        ),
    };
    let mut rows = customers::list_after(&state.db, &project.id, after.as_deref(), limit + 1).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = more
        .then(|| rows.last().map(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c.external_id.as_bytes())))
        .flatten();
    let data: Vec<Value> = rows.iter().map(|c| view(c, &project)).collect();
    Ok(Json(json!({ "data": data, "next_cursor": next })))
}

async fn set_blocked(
    state: AppState,
    headers: HeaderMap,
    external_id: String,
    blocked: bool,
) -> Result<Json<Value>, ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    let customer = found(&state, &project, &external_id).await?;
    customers::set_blocked(&state.db, &project.id, &customer.id, blocked).await?;
    let action = if blocked { "customer.blocked" } else { "customer.unblocked" };
    super::audit(&state, &project, &actor, action, &external_id, &project.name).await?;
    let customer = found(&state, &project, &external_id).await?;
    Ok(Json(view(&customer, &project)))
}

pub async fn block(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(external_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_blocked(state, headers, external_id, true).await
}

pub async fn unblock(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(external_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_blocked(state, headers, external_id, false).await
}

/// `DELETE /api/v1/customers/{id}`: 204; 409 while calls of the customer are in flight.
pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(external_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    match customers::delete(&state.db, &project.id, &external_id).await {
        Ok(()) => {
            super::audit(&state, &project, &actor, "customer.deleted", &external_id, &project.name).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        Err(DeleteError::NotFound) => Err(ApiError::NotFound(format!("No customer `{external_id}` in this project."))),
        Err(DeleteError::CallsInFlight) => {
            Err(ApiError::Conflict("The customer has calls in flight; delete it once they have settled.".into()))
        }
        Err(DeleteError::Db(e)) => Err(e.into()),
    }
}

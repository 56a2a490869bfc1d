//! `POST /api/v1/customer-tokens`: the tenant's backend mints a short-lived token for one of
//! its customers, to hand to that customer's browser or app along with a publishable key.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_core::projects::validate_external_id;
use tollgate_core::time::UnixMillis;
use tollgate_core::tokens::{self, DEFAULT_TTL_SECS, MAX_TTL_SECS};

use super::error::{ApiError, json_body};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    customer: Option<String>,
    ttl_seconds: Option<i64>,
}

pub async fn mint(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<TokenBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let project = super::project(&state, &headers).await?;
    let body = json_body(body)?;
    let customer = body.customer.ok_or_else(|| ApiError::field("customer", "is required"))?;
    let customer = validate_external_id(&customer)
        .map_err(|_| ApiError::field("customer", "must be 1 to 200 printable characters"))?;
    let ttl = body.ttl_seconds.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::field("ttl_seconds", format!("must be between 1 and {MAX_TTL_SECS}")));
    }
    let expires_at = UnixMillis::now().0 / 1000 + ttl;
    let token = tokens::mint(&state.master_key, &project.id, customer, expires_at);
    Ok((StatusCode::CREATED, Json(json!({ "token": token, "customer": customer, "expires_at": expires_at }))))
}

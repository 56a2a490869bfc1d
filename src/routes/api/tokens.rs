//! `POST /api/v1/customer-tokens`: the tenant's backend mints a short-lived token for one of
//! its customers, to hand to that customer's browser or app along with a publishable key.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tollgate_core::projects::validate_external_id;
use tollgate_core::time::UnixMillis;
use tollgate_core::tokens::{self, DEFAULT_TTL_SECS, MAX_TTL_SECS};
use utoipa::ToSchema;

use super::error::{
    ApiError, IdempotencyInProgress, Problem, RateLimited, Unauthorized, UnsupportedMediaType, json_body,
};
use super::idempotency::IdempotencyKey;
use crate::state::AppState;

/// The customer to mint a token for, and for how long.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Your id for the customer (it need not exist yet): 1 to 200 printable characters.
    #[schema(value_type = String, required = true, min_length = 1, max_length = 200, example = "customer-42")]
    customer: Option<String>,
    /// How long the token is valid, in seconds: 1 to 86400 (900 unless given).
    #[schema(minimum = 1, maximum = 86400, example = 900)]
    ttl_seconds: Option<i64>,
}

/// A customer token: send it as `X-Tollgate-Customer-Token` with a publishable key.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerToken {
    /// The token (`tgct_…`).
    #[schema(example = "tgct_eyJwIjoi….3q2-7w")]
    token: String,
    /// The customer it names.
    #[schema(example = "customer-42")]
    customer: String,
    /// When it expires (Unix seconds).
    expires_at: i64,
}

/// Mint a customer token
///
/// A short-lived token naming one customer, for calls made with a publishable key from that
/// customer's browser or app: such a call can spend only this customer's budget, and only until
/// the token expires. Nothing is stored.
#[utoipa::path(
    post,
    path = "/api/v1/customer-tokens",
    operation_id = "mint_customer_token",
    tag = "Customer tokens",
    params(IdempotencyKey),
    request_body = TokenRequest,
    responses(
        (status = 201, description = "The token", body = CustomerToken,
            headers(("Idempotent-Replayed" = String, description = "`true` on the stored answer to a retry"))),
        (status = 401, response = Unauthorized),
        (status = 409, response = IdempotencyInProgress),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, description = "The body is not valid (`errors` names the fields), or the \
            Idempotency-Key is malformed or was used for another request", body = Problem,
            content_type = "application/problem+json"),
        (status = 429, response = RateLimited),
    )
)]
pub async fn mint(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<CustomerToken>), ApiError> {
    let project = super::project(&state, &headers).await?;
    let body: TokenRequest = json_body(body)?;
    let customer = body.customer.ok_or_else(|| ApiError::field("customer", "is required"))?;
    let customer = validate_external_id(&customer)
        .map_err(|_| ApiError::field("customer", "must be 1 to 200 printable characters"))?;
    let ttl = body.ttl_seconds.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::field("ttl_seconds", format!("must be between 1 and {MAX_TTL_SECS}")));
    }
    let issued_at = UnixMillis::now();
    let expires_at = issued_at.0 / 1000 + ttl;
    let token = tokens::mint(&state.master_key, &project.id, customer, issued_at, expires_at);
    Ok((StatusCode::CREATED, Json(CustomerToken { token, customer: customer.to_owned(), expires_at })))
}

//! The management API under `/api/v1`: what a tenant's backend does about its customers and
//! budgets without the dashboard. Authenticated with the project's secret key
//! (`Authorization: Bearer tg_sk_…`); answers JSON, and errors as `application/problem+json`.
//! It calls the same domain functions as the dashboard (`tollgate_core::customers`).
//!
//! - [`customers`]: create or update by the tenant's id, get, list (cursor pages), block,
//!   unblock, delete.
//! - [`keys`]: the project's keys (create, list, revoke) and its settings (read).
//! - [`usage`]: the ledger by day, customer and model, JSON or CSV.
//! - [`tokens`]: customer tokens for calls made with a publishable key.
//! - [`payment_links`]: a customer's payment-method setup and customer portal links (Stripe).
//! - [`limits`]: requests per second per key; [`idempotency`]: `Idempotency-Key` on POSTs.
//! - [`error`]: the one error type of this face.
//! - [`openapi`]: the OpenAPI document, generated from the handlers' annotations and types and
//!   served at `/api/v1/openapi.json`.

pub mod customers;
pub mod error;
pub mod idempotency;
pub mod keys;
pub mod limits;
pub mod openapi;
pub mod payment_links;
pub mod tokens;
pub mod usage;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::{any, get};
use tollgate_core::audit::Actor;
use tollgate_core::projects::Project;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::error::ApiError;
use crate::routes::proxy::auth;
use crate::state::AppState;

/// Every endpoint with its OpenAPI operation: `routes!` takes each handler's method and path
/// from its `#[utoipa::path]`, so the router and the document cannot disagree.
fn endpoints() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(customers::upsert, customers::list))
        .routes(routes!(customers::get, customers::update, customers::delete))
        .routes(routes!(customers::block))
        .routes(routes!(customers::unblock))
        .routes(routes!(payment_links::payment_setup))
        .routes(routes!(payment_links::billing_portal))
        .routes(routes!(tokens::mint))
        .routes(routes!(usage::export))
        .routes(routes!(keys::create, keys::list))
        .routes(routes!(keys::revoke))
        .routes(routes!(keys::project))
}

pub fn router(state: &AppState) -> Router<AppState> {
    let (endpoints, _) = endpoints().split_for_parts();
    endpoints
        .layer(axum::middleware::from_fn_with_state(state.clone(), idempotency::layer))
        .route("/api/v1/openapi.json", get(openapi::serve))
        .route("/api/v1/{*rest}", any(no_such_endpoint))
}

/// A path under `/api/v1` that is no endpoint: a problem too, like every other API error.
async fn no_such_endpoint() -> ApiError {
    ApiError::NotFound("No such endpoint; see /api/v1/openapi.json.".into())
}

/// The project whose live secret key the request carries.
pub async fn project(state: &AppState, headers: &HeaderMap) -> Result<Project, ApiError> {
    Ok(caller(state, headers).await?.0)
}

/// The project, and the key as the audit log names it.
pub async fn caller(state: &AppState, headers: &HeaderMap) -> Result<(Project, Actor), ApiError> {
    let grant = auth::grant(state, headers).await.map_err(|e| match e {
        crate::routes::proxy::error::ProxyError::Internal => ApiError::Internal,
        other => ApiError::Unauthorized(other.to_string()),
    })?;
    if grant.kind != "secret" {
        return Err(ApiError::Unauthorized("The management API needs a secret key, not a publishable one.".into()));
    }
    state.api_limits.check(&grant.key_id).map_err(ApiError::RateLimited)?;
    let actor = Actor { user_id: None, label: format!("API key {}", grant.key_id) };
    Ok((grant.project, actor))
}

/// Records a change made through the API in the organization's audit log.
pub async fn audit(
    state: &AppState,
    project: &Project,
    actor: &Actor,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<(), ApiError> {
    tollgate_core::audit::record(&state.db, &project.org_id, actor, action, target, detail).await?;
    Ok(())
}

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
//! - [`limits`]: requests per second per key; [`idempotency`]: `Idempotency-Key` on POSTs.
//! - [`error`]: the one error type of this face.

pub mod customers;
pub mod error;
pub mod idempotency;
pub mod keys;
pub mod limits;
pub mod tokens;
pub mod usage;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use tollgate_core::audit::Actor;
use tollgate_core::projects::Project;

use self::error::ApiError;
use crate::routes::proxy::auth;
use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/api/v1/customers", post(customers::upsert).get(customers::list))
        .route(
            "/api/v1/customers/{external_id}",
            get(customers::get).patch(customers::update).delete(customers::delete),
        )
        .route("/api/v1/customers/{external_id}/block", post(customers::block))
        .route("/api/v1/customers/{external_id}/unblock", post(customers::unblock))
        .route("/api/v1/customer-tokens", post(tokens::mint))
        .route("/api/v1/usage", get(usage::export))
        .route("/api/v1/keys", post(keys::create).get(keys::list))
        .route("/api/v1/keys/{id}/revoke", post(keys::revoke))
        .route("/api/v1/project", get(keys::project))
        .layer(axum::middleware::from_fn_with_state(state.clone(), idempotency::layer))
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

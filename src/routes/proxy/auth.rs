//! Project keys on the proxy: `Authorization: Bearer <key>` (OpenAI SDKs) or
//! `x-api-key: <key>` (Anthropic SDKs). Keys are looked up by their SHA-256.

use axum::http::HeaderMap;
use tollgate_core::projects::{self, Project};

use super::error::ProxyError;
use crate::state::AppState;

/// The key presented with a request, if any.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let value = value.trim();
        if let Some(key) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")) {
            return Some(key.trim());
        }
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

/// The project whose live secret key the request carries.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Project, ProxyError> {
    let key = presented_key(headers).filter(|k| !k.is_empty()).ok_or_else(|| {
        ProxyError::Unauthorized(
            "You didn't provide an API key. Pass a Tollgate project key as `Authorization: Bearer <key>` or `x-api-key`."
                .to_owned(),
        )
    })?;
    let owner = projects::find_key(&state.db, key)
        .await?
        .ok_or_else(|| ProxyError::Unauthorized("Incorrect API key provided, or the key was revoked.".to_owned()))?;
    if owner.kind != "secret" {
        return Err(ProxyError::Unauthorized(
            "A publishable key needs a customer token; customer tokens are not available yet, so use a secret key from your backend."
                .to_owned(),
        ));
    }
    let project = projects::get_project(&state.db, &owner.project_id).await?.ok_or(ProxyError::Internal)?;
    Ok(project)
}

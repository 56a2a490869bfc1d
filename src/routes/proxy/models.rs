//! `GET /v1/models` and `GET /v1/models/{id}`: the models this project may call, meaning a
//! connection routes them *and* they have a price (shipped or overridden). Answered in
//! Anthropic's list shape when the client sends `anthropic-version` (the Anthropic SDKs do),
//! else in OpenAI's.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tollgate_core::pricing;
use tollgate_core::projects::{self, ProviderKind};

use super::auth;
use super::error::{ErrorShape, ProxyError};
use crate::state::AppState;

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let shape = shape_of(&headers);
    match callable_models(&state, &headers).await {
        Ok(models) => {
            let data: Vec<Value> = models.iter().map(|(id, kind)| model_object(shape, id, *kind)).collect();
            match shape {
                ErrorShape::OpenAi => Json(json!({ "object": "list", "data": data })).into_response(),
                ErrorShape::Anthropic => Json(json!({
                    "data": data,
                    "has_more": false,
                    "first_id": models.keys().next(),
                    "last_id": models.keys().next_back(),
                }))
                .into_response(),
            }
        }
        Err(e) => e.into_response_shaped(shape),
    }
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let shape = shape_of(&headers);
    match callable_models(&state, &headers).await {
        Ok(models) => match models.get(&id) {
            Some(kind) => Json(model_object(shape, &id, *kind)).into_response(),
            None => ProxyError::NotFound(format!("The model `{id}` does not exist or this project cannot call it."))
                .into_response_shaped(shape),
        },
        Err(e) => e.into_response_shaped(shape),
    }
}

fn shape_of(headers: &HeaderMap) -> ErrorShape {
    if headers.contains_key("anthropic-version") { ErrorShape::Anthropic } else { ErrorShape::OpenAi }
}

fn model_object(shape: ErrorShape, id: &str, kind: ProviderKind) -> Value {
    match shape {
        ErrorShape::OpenAi => json!({ "id": id, "object": "model", "created": 0, "owned_by": kind.as_str() }),
        ErrorShape::Anthropic => {
            json!({ "type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z" })
        }
    }
}

/// Each callable model with the kind of connection that serves it (the first that does).
async fn callable_models(state: &AppState, headers: &HeaderMap) -> Result<BTreeMap<String, ProviderKind>, ProxyError> {
    let project = auth::authenticate(state, headers).await?.project;
    let providers = projects::list_providers(&state.db, &state.master_key, &project.id).await?;
    let overridden = projects::overridden_models(&state.db, &project.id).await?;
    // Shipped prices are in USD: they apply in another currency only at the project's rate.
    let shipped_apply = project.shipped_price_rate().is_some();
    let mut candidates: Vec<String> = pricing::shipped_models().into_iter().map(str::to_owned).collect();
    candidates.extend(overridden.iter().cloned());
    for provider in &providers {
        // Exact names a connection lists are candidates too (a dated snapshot of a priced model).
        candidates.extend(provider.models.iter().filter(|m| !m.ends_with('*')).cloned());
    }
    let mut models = BTreeMap::new();
    for model in candidates {
        let priced = overridden.contains(&model) || (shipped_apply && pricing::shipped_price(&model).is_some());
        if !priced || models.contains_key(&model) {
            continue;
        }
        if let Some(provider) = providers.iter().find(|p| p.serves(&model)) {
            models.insert(model, provider.kind);
        }
    }
    Ok(models)
}

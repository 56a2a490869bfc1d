//! `/api/v1/keys` and `/api/v1/project`: a tenant's backend creates, lists and revokes the
//! project's keys (a new key is shown once), and reads the project's settings.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_core::ids::KeyId;
use tollgate_core::money::Nanos;
use tollgate_core::projects::{self, KeyKind, KeySummary};

use super::error::{ApiError, json_body};
use crate::state::AppState;

fn view(k: &KeySummary) -> Value {
    json!({
        "id": k.id, "name": k.name, "kind": k.kind, "prefix": k.prefix,
        "created_at": k.created_at, "last_used_at": k.last_used_at, "revoked_at": k.revoked_at,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKeyBody {
    name: Option<String>,
    kind: Option<String>,
}

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<NewKeyBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    let body = json_body(body)?;
    let kind = match body.kind.as_deref() {
        None | Some("secret") => KeyKind::Secret,
        Some("publishable") => KeyKind::Publishable,
        Some(_) => return Err(ApiError::field("kind", "must be secret or publishable")),
    };
    let created = projects::create_key(&state.db, &project.id, kind, body.name.as_deref().unwrap_or("")).await?;
    super::audit(&state, &project, &actor, "key.created", &project.name, &format!("key {}… (API)", created.prefix))
        .await?;
    let summary = projects::list_keys(&state.db, &project.id).await?.into_iter().find(|k| k.id == created.id);
    let mut answer = summary.as_ref().map(view).unwrap_or_else(|| json!({ "id": created.id }));
    // The key itself, this once: only its hash is stored.
    answer["key"] = json!(created.plaintext);
    Ok((StatusCode::CREATED, Json(answer)))
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let project = super::project(&state, &headers).await?;
    let keys = projects::list_keys(&state.db, &project.id).await?;
    Ok(Json(json!({ "data": keys.iter().map(view).collect::<Vec<_>>() })))
}

pub async fn revoke(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (project, actor) = super::caller(&state, &headers).await?;
    let missing = || ApiError::NotFound(format!("No live key `{id}` in this project."));
    let key = KeyId::parse(&id).ok_or_else(missing)?;
    if !projects::revoke_key(&state.db, &project.id, &key).await? {
        return Err(missing());
    }
    state.keys.forget_project(&project.id);
    super::audit(&state, &project, &actor, "key.revoked", &project.name, &format!("{key} (API)")).await?;
    let keys = projects::list_keys(&state.db, &project.id).await?;
    let revoked = keys.iter().find(|k| k.id == key).map(view).unwrap_or_else(|| json!({ "id": key }));
    Ok(Json(revoked))
}

/// `GET /api/v1/project`: the project's settings.
pub async fn project(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let p = super::project(&state, &headers).await?;
    Ok(Json(json!({
        "id": p.id, "name": p.name, "currency": p.currency, "budget_policy": p.budget_policy,
        "min_output_tokens": p.min_output_tokens, "markup_bps": p.markup_bps,
        "default_budget": Nanos(p.default_budget_nanos).to_string(), "default_budget_nanos": p.default_budget_nanos,
        "default_budget_period": p.default_budget_period, "customer_from_user": p.customer_from_user,
        "default_customer": p.default_customer, "estimate_margin_bps": p.estimate_margin_bps,
    })))
}

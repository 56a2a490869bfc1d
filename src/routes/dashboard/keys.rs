//! A project's keys: created (shown once, stored hashed, with a first call's snippets that
//! carry it), listed with prefix and last use,
//! revoked in one click with immediate effect on this process's proxy (and within the key
//! cache's TTL on other replicas).

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::Role;
use tollgate_core::audit;
use tollgate_core::ids::KeyId;
use tollgate_core::projects::{self, KeyKind, Project, ProjectError};

use super::error::WebError;
use super::format;
use super::projects::{capitalized, load_project, project_error};
use super::session::{CsrfForm, Member};
use crate::state::AppState;

pub struct KeyRow {
    id: KeyId,
    name: String,
    kind: String,
    prefix: String,
    created: String,
    last_used: String,
    revoked: bool,
}

#[derive(Template, WebTemplate)]
#[template(path = "keys.html")]
pub struct KeysPage {
    me: Member,
    project: Project,
    keys: Vec<KeyRow>,
    created: Option<String>,
    errors: Vec<String>,
    /// A first call with the secret key just created, ready to paste.
    snippets: Option<super::first_run::Snippets>,
}

async fn page(
    state: &AppState,
    me: Member,
    project: Project,
    created: Option<String>,
    errors: Vec<String>,
) -> Result<KeysPage, WebError> {
    let keys = projects::list_keys(&state.db, &project.id)
        .await?
        .into_iter()
        .map(|k| KeyRow {
            id: k.id,
            name: k.name,
            kind: k.kind,
            prefix: k.prefix,
            created: format::datetime(k.created_at),
            last_used: k.last_used_at.map(format::datetime).unwrap_or_else(|| "never".to_owned()),
            revoked: k.revoked_at.is_some(),
        })
        .collect();
    Ok(KeysPage { me, project, keys, created, errors, snippets: None })
}

pub async fn list(State(state): State<AppState>, me: Member, Path(id): Path<String>) -> Result<KeysPage, WebError> {
    let project = load_project(&state, &me, &id).await?;
    page(&state, me, project, None, vec![]).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct NewKeyForm {
    csrf: String,
    name: String,
    kind: String,
}

pub async fn create(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<NewKeyForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let kind = match form.kind.as_str() {
        "" | "secret" => KeyKind::Secret,
        "publishable" => KeyKind::Publishable,
        _ => {
            let errors = vec!["Kind: choose secret or publishable".to_owned()];
            return Ok((StatusCode::BAD_REQUEST, page(&state, me, project, None, errors).await?).into_response());
        }
    };
    match projects::create_key(&state.db, &project.id, kind, &form.name).await {
        Ok(created) => {
            let detail = format!("{} key {}…", form.kind_label(), created.prefix);
            audit::record(&state.db, me.org_id(), &me.actor(), "key.created", &project.name, &detail).await?;
            // A publishable key needs a customer token beside it, so only a secret key gets snippets.
            let snippets = match kind {
                KeyKind::Secret => Some(super::first_run::snippets(&state, &project, Some(&created.plaintext)).await?),
                KeyKind::Publishable => None,
            };
            let page = page(&state, me, project, Some(created.plaintext), vec![]).await?;
            Ok(KeysPage { snippets, ..page }.into_response())
        }
        Err(ProjectError::Invalid { field, reason }) => {
            let errors = vec![format!("{}: {reason}", capitalized(field))];
            Ok((StatusCode::BAD_REQUEST, page(&state, me, project, None, errors).await?).into_response())
        }
        Err(e) => Err(project_error(e)),
    }
}

impl NewKeyForm {
    fn kind_label(&self) -> &'static str {
        if self.kind == "publishable" { "publishable" } else { "secret" }
    }
}

pub async fn revoke(
    State(state): State<AppState>,
    me: Member,
    Path((id, key_id)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let key_id = KeyId::parse(&key_id).ok_or(WebError::NotFound)?;
    if !projects::revoke_key(&state.db, &project.id, &key_id).await? {
        return Err(WebError::NotFound);
    }
    // Immediate effect on this process's proxy; other replicas within the key cache's TTL.
    state.forget_project(&project.id);
    audit::record(&state.db, me.org_id(), &me.actor(), "key.revoked", &project.name, key_id.as_str()).await?;
    Ok(Redirect::to(&format!("/projects/{}/keys", project.id)))
}

//! A project's provider connections: added with a credential that is encrypted at rest and
//! never shown again, listed without it, removed. A base URL the egress policy refuses is
//! refused when saved (and every call checks it again).

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::Role;
use tollgate_core::audit;
use tollgate_core::egress;
use tollgate_core::ids::ProviderId;
use tollgate_core::projects::{self, NewProvider, Project, ProjectError, ProviderKind, ProviderSummary};

use super::error::WebError;
use super::projects::{capitalized, load_project, project_error};
use super::session::{CsrfForm, Member};
use crate::state::AppState;

#[derive(Template, WebTemplate)]
#[template(path = "providers.html")]
pub struct ProvidersPage {
    me: Member,
    project: Project,
    providers: Vec<ProviderSummary>,
    form: ProviderForm,
    errors: Vec<String>,
}

/// The add form; on an error it comes back filled in, except for the API key.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ProviderForm {
    csrf: String,
    kind: String,
    name: String,
    base_url: String,
    api_key: String,
    models: String,
}

async fn page(
    state: &AppState,
    me: Member,
    project: Project,
    form: ProviderForm,
    errors: Vec<String>,
) -> Result<ProvidersPage, WebError> {
    let providers = projects::list_provider_summaries(&state.db, &project.id).await?;
    let form = ProviderForm { api_key: String::new(), csrf: String::new(), ..form };
    Ok(ProvidersPage { me, project, providers, form, errors })
}

pub async fn list(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
) -> Result<ProvidersPage, WebError> {
    let project = load_project(&state, &me, &id).await?;
    page(&state, me, project, ProviderForm { kind: "openai".to_owned(), ..ProviderForm::default() }, vec![]).await
}

pub async fn add(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<ProviderForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let mut errors = Vec::new();
    let kind = ProviderKind::parse(&form.kind);
    if kind.is_none() {
        errors.push("Provider: choose OpenAI, Anthropic or OpenAI-compatible".to_owned());
    }
    if form.api_key.trim().is_empty() {
        errors.push("API key: must not be empty".to_owned());
    }
    if form.name.chars().count() > 100 {
        errors.push("Name: must be at most 100 characters".to_owned());
    }
    if let (Some(kind), true) = (kind, errors.is_empty()) {
        match vet(&state, &form.base_url).await {
            Err(refused) => errors.push(format!("Base URL: {refused}")),
            Ok(()) => {
                let new = NewProvider {
                    kind,
                    name: form.name.clone(),
                    base_url: Some(form.base_url.clone()),
                    api_key: form.api_key.trim().to_owned(),
                    models: form.models.split(',').map(str::to_owned).collect(),
                };
                match projects::add_provider(&state.db, &state.master_key, &project.id, &new).await {
                    Ok(_) => {
                        let detail = format!("{} connection for {}", kind.as_str(), form.models.trim());
                        audit::record(&state.db, me.org_id(), &me.actor(), "provider.added", &project.name, &detail)
                            .await?;
                        state.forget_project(&project.id);
                        return Ok(Redirect::to(&format!("/projects/{}/providers", project.id)).into_response());
                    }
                    Err(ProjectError::Invalid { field, reason }) => {
                        errors.push(format!("{}: {reason}", capitalized(field)))
                    }
                    Err(e) => return Err(project_error(e)),
                }
            }
        }
    }
    Ok((StatusCode::BAD_REQUEST, page(&state, me, project, form, errors).await?).into_response())
}

/// Whether the egress policy refuses a base URL (resolving its host now); a URL that breaks
/// the other rules is left to [`projects::add_provider`] to explain.
async fn vet(state: &AppState, base_url: &str) -> Result<(), egress::Refused> {
    match egress::check_base_url(base_url.trim()) {
        Ok(url) => state.egress.vet(&url).await,
        Err(_) => Ok(()),
    }
}

pub async fn delete(
    State(state): State<AppState>,
    me: Member,
    Path((id, provider_id)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let provider_id = ProviderId::parse(&provider_id).ok_or(WebError::NotFound)?;
    if !projects::delete_provider(&state.db, &project.id, &provider_id).await? {
        return Err(WebError::NotFound);
    }
    state.forget_project(&project.id);
    audit::record(&state.db, me.org_id(), &me.actor(), "provider.removed", &project.name, provider_id.as_str()).await?;
    Ok(Redirect::to(&format!("/projects/{}/providers", project.id)))
}

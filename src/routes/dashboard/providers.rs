//! A project's provider connections: added with a credential that is encrypted at rest and
//! never shown again, listed without it, removed. A base URL the egress policy refuses is
//! refused when saved (and every call checks it again). A connection is tested with a models
//! call through the same egress-guarded client the proxy uses; the last test is recorded.

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
use tollgate_core::first_run::{self, ProviderTest};
use tollgate_core::ids::ProviderId;
use tollgate_core::projects::{self, NewProvider, Project, ProjectError, Provider, ProviderKind, ProviderSummary};
use tollgate_core::time::UnixMillis;

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
    /// The last test of each connection that was tested.
    tests: Vec<TestView>,
}

/// The last test of a connection, as shown.
pub struct TestView {
    provider_id: ProviderId,
    ok: bool,
    detail: String,
    /// When (UTC).
    at: String,
}

impl From<ProviderTest> for TestView {
    fn from(t: ProviderTest) -> Self {
        Self { provider_id: t.provider_id, ok: t.ok, detail: t.detail, at: super::format::datetime(t.at) }
    }
}

impl ProvidersPage {
    /// The last test of connection `id`, if it was tested.
    fn last_test(&self, id: &str) -> Option<&TestView> {
        self.tests.iter().find(|t| t.provider_id.as_str() == id)
    }
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
    let tests = first_run::provider_tests(&state.db, &project.id).await?.into_iter().map(TestView::from).collect();
    Ok(ProvidersPage { me, project, providers, form, errors, tests })
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

/// How long a test's models call may take.
const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// The largest models list read (OpenAI's is some 20 kB).
const MAX_MODELS_BYTES: usize = 4 * 1024 * 1024;

/// Tests a connection with a real models call (`GET {base}/models`, with its credential) and
/// records the outcome on the connection, which the page then shows.
pub async fn test(
    State(state): State<AppState>,
    me: Member,
    Path((id, provider_id)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let provider_id = ProviderId::parse(&provider_id).ok_or(WebError::NotFound)?;
    let listed = projects::list_provider_summaries(&state.db, &project.id).await?;
    if !listed.iter().any(|p| p.id == provider_id) {
        return Err(WebError::NotFound);
    }
    let provider = projects::list_providers(&state.db, &state.master_key, &project.id)
        .await?
        .into_iter()
        .find(|p| p.id == provider_id);
    let outcome = match &provider {
        Some(provider) => models_call(&state, provider).await.map_err(|e| redacted(&e, provider)),
        None => {
            Err("Tollgate cannot decrypt this connection's API key: remove the connection and add it again.".to_owned())
        }
    };
    let (ok, detail) = match outcome {
        Ok(1) => (true, "1 model".to_owned()),
        Ok(n) => (true, format!("{n} models")),
        Err(e) => (false, e),
    };
    first_run::record_provider_test(&state.db, &project.id, &provider_id, UnixMillis::now(), ok, &detail).await?;
    Ok(Redirect::to(&format!("/projects/{}/providers#provider-{provider_id}", project.id)))
}

/// The number of models `provider` lists, or why it could not be listed (the status and
/// message of the provider's answer).
async fn models_call(state: &AppState, provider: &Provider) -> Result<usize, String> {
    use crate::routes::proxy::pipeline::{ANTHROPIC_VERSION, UpstreamBody, read_capped};
    use secrecy::ExposeSecret;
    let anthropic = provider.kind == ProviderKind::Anthropic;
    let path = if anthropic { "v1/models" } else { "models" };
    let mut url = egress::provider_endpoint(&provider.base_url, path).map_err(|e| format!("Base URL: {e}"))?;
    if anthropic {
        // Anthropic lists 20 models a page unless asked for more.
        url.set_query(Some("limit=1000"));
    }
    let request = state.egress.get(url).map_err(|refused| refused.to_string())?.timeout(TEST_TIMEOUT);
    let request = if anthropic {
        request.header("x-api-key", provider.api_key.expose_secret()).header("anthropic-version", ANTHROPIC_VERSION)
    } else {
        request.bearer_auth(provider.api_key.expose_secret())
    };
    let response = request.send().await.map_err(|e| match egress::Refused::find(&e) {
        Some(refused) => refused.to_string(),
        None => format!("The provider could not be reached: {}", error_chain(&e)),
    })?;
    let status = response.status();
    if status.is_redirection() {
        return Err(format!(
            "HTTP {}: the provider answered with a redirect, which Tollgate does not follow (check the base URL)",
            status.as_u16()
        ));
    }
    let body = match read_capped(response, MAX_MODELS_BYTES).await {
        Ok(body) => body,
        Err(UpstreamBody::TooLarge) => return Err(format!("HTTP {}: the answer is too large", status.as_u16())),
        Err(UpstreamBody::Broken(e)) => {
            return Err(format!("HTTP {}: the answer broke off: {}", status.as_u16(), error_chain(&e)));
        }
    };
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    if !status.is_success() {
        let message = json
            .as_ref()
            .and_then(|j| {
                j["error"]["message"].as_str().or_else(|| j["error"].as_str()).or_else(|| j["message"].as_str())
            })
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        let reason = status.canonical_reason().map(|r| format!(" {r}")).unwrap_or_default();
        return Err(format!("HTTP {}{reason}: {}", status.as_u16(), printable(&redacted(&message, provider))));
    }
    match json.as_ref().and_then(|j| j["data"].as_array()) {
        Some(models) => Ok(models.len()),
        None => Err(format!(
            "HTTP {}, but the answer is not a list of models (no \"data\" array): check the base URL",
            status.as_u16()
        )),
    }
}

/// An error and its sources, as one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = source.and_then(std::error::Error::source);
    }
    text
}

/// `text` without control characters, cut to 200 characters.
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).take(200).collect::<String>().trim().to_owned()
}

/// `text` without the connection's credential, should a provider echo it.
fn redacted(text: &str, provider: &Provider) -> String {
    use secrecy::ExposeSecret;
    let key = provider.api_key.expose_secret();
    if key.is_empty() { text.to_owned() } else { text.replace(key, "[the API key]") }
}

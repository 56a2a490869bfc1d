//! Projects: the list and creation (settings, keys and customers have pages of their own).

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::Role;
use tollgate_core::audit;
use tollgate_core::projects::{self, NewProject, Project, ProjectError};

use super::error::WebError;
use super::session::Member;
use crate::state::AppState;

#[derive(Template, WebTemplate)]
#[template(path = "projects.html")]
pub struct ProjectsPage {
    me: Member,
    projects: Vec<Project>,
    name: String,
    errors: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct NewProjectForm {
    csrf: String,
    name: String,
}

pub async fn list(State(state): State<AppState>, me: Member) -> Result<ProjectsPage, WebError> {
    let projects = projects::list_projects(&state.db, me.org_id()).await.map_err(project_error)?;
    Ok(ProjectsPage { me, projects, name: String::new(), errors: vec![] })
}

pub async fn create(
    State(state): State<AppState>,
    me: Member,
    Form(form): Form<NewProjectForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let new = NewProject { name: form.name.clone(), ..NewProject::default() };
    match projects::create_project(&state.db, me.org_id(), &new).await {
        Ok(project) => {
            audit::record(&state.db, me.org_id(), &me.actor(), "project.created", &project.name, "project created")
                .await?;
            Ok(Redirect::to(&format!("/projects/{}", project.id)).into_response())
        }
        Err(ProjectError::Invalid { field, reason }) => {
            let projects = projects::list_projects(&state.db, me.org_id()).await.map_err(project_error)?;
            let errors = vec![format!("{}: {reason}", capitalized(field))];
            Ok((StatusCode::BAD_REQUEST, ProjectsPage { me, projects, name: form.name, errors }).into_response())
        }
        Err(e) => Err(project_error(e)),
    }
}

pub fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// A form message for a domain error: "Field: what is wrong".
pub fn problem_message(e: &ProjectError) -> String {
    match e {
        ProjectError::Invalid { field, reason } => format!("{}: {reason}", capitalized(field)),
        other => other.to_string(),
    }
}

pub fn project_error(e: ProjectError) -> WebError {
    match e {
        ProjectError::NotFound(_) => WebError::NotFound,
        ProjectError::Invalid { field, reason } => WebError::BadRequest(format!("{field}: {reason}")),
        ProjectError::Db(e) => e.into(),
    }
}

pub struct TopView {
    id: tollgate_core::ids::CustomerId,
    external_id: String,
    calls: i64,
    billed: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "project.html")]
pub struct ProjectPage {
    me: Member,
    project: Project,
    markup: String,
    default_budget: String,
    base_url: String,
    billed: String,
    totals: tollgate_core::usage::Totals,
    chart: String,
    top: Vec<TopView>,
    calls: Vec<super::customers::CallView>,
}

/// The project `id` of the member's organization; 404 for anything else (another
/// organization's project looks exactly like one that does not exist).
pub async fn load_project(state: &AppState, me: &Member, id: &str) -> Result<Project, WebError> {
    let id = tollgate_core::ids::ProjectId::parse(id).ok_or(WebError::NotFound)?;
    projects::get_project_in_org(&state.db, me.org_id(), &id).await.map_err(project_error)?.ok_or(WebError::NotFound)
}

/// The overview: spend, calls and refusals of the last 30 days, top customers, recent calls,
/// and how to make a first call.
pub async fn show(
    State(state): State<AppState>,
    me: Member,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<ProjectPage, WebError> {
    use tollgate_core::time::UnixMillis;
    use tollgate_core::usage;
    let project = load_project(&state, &me, &id).await?;
    let now = UnixMillis::now();
    let since = now.plus_secs(-30 * 86_400);
    let currency = project.currency.clone();
    let days = usage::daily_spend(&state.db, &project.id, None, 30, now).await?;
    let totals = usage::totals(&state.db, &project.id, since).await?;
    let top = usage::top_customers(&state.db, &project.id, since, 10)
        .await?
        .into_iter()
        .map(|t| TopView {
            id: t.id,
            external_id: t.external_id,
            calls: t.calls,
            billed: super::format::money(t.billed_nanos, &currency),
        })
        .collect();
    let calls = super::customers::call_views(usage::recent_calls(&state.db, &project.id, None, 20).await?, &currency);
    Ok(ProjectPage {
        markup: format!("{} %", tollgate_core::money::Nanos(project.markup_bps * 10_000_000)),
        default_budget: super::format::money(project.default_budget_nanos, &currency),
        base_url: state.config.public_url.trim_end_matches('/').to_owned(),
        billed: super::format::money(totals.billed_nanos, &currency),
        chart: super::format::spend_chart(&days, &currency),
        totals,
        top,
        calls,
        project,
        me,
    })
}

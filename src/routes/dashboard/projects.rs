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

pub fn project_error(e: ProjectError) -> WebError {
    match e {
        ProjectError::NotFound(_) => WebError::NotFound,
        ProjectError::Invalid { field, reason } => WebError::BadRequest(format!("{field}: {reason}")),
        ProjectError::Db(e) => e.into(),
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "project.html")]
pub struct ProjectPage {
    me: Member,
    project: Project,
    markup: String,
    default_budget: String,
    base_url: String,
}

/// The project `id` of the member's organization; 404 for anything else (another
/// organization's project looks exactly like one that does not exist).
pub async fn load_project(state: &AppState, me: &Member, id: &str) -> Result<Project, WebError> {
    let id = tollgate_core::ids::ProjectId::parse(id).ok_or(WebError::NotFound)?;
    projects::get_project_in_org(&state.db, me.org_id(), &id).await.map_err(project_error)?.ok_or(WebError::NotFound)
}

pub async fn show(
    State(state): State<AppState>,
    me: Member,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<ProjectPage, WebError> {
    let project = load_project(&state, &me, &id).await?;
    Ok(ProjectPage {
        markup: format!("{} %", tollgate_core::money::Nanos(project.markup_bps * 10_000_000)),
        default_budget: tollgate_core::money::Nanos(project.default_budget_nanos).to_string(),
        base_url: state.config.public_url.trim_end_matches('/').to_owned(),
        project,
        me,
    })
}

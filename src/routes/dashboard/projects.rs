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
use tollgate_core::currency::{Currency, SUPPORTED};
use tollgate_core::money::Nanos;
use tollgate_core::projects::{self, NewProject, Project, ProjectError};

use super::error::WebError;
use super::session::Member;
use crate::state::AppState;

#[derive(Template, WebTemplate)]
#[template(path = "projects.html")]
pub struct ProjectsPage {
    me: Member,
    projects: Vec<Project>,
    form: NewProjectForm,
    currencies: &'static [&'static str],
    errors: Vec<String>,
}

/// The new-project form, as typed (re-shown as typed when something is wrong).
#[derive(Deserialize, Clone)]
#[serde(default)]
pub struct NewProjectForm {
    csrf: String,
    name: String,
    currency: String,
    default_budget: String,
    usd_rate: String,
}

impl Default for NewProjectForm {
    fn default() -> Self {
        Self {
            csrf: String::new(),
            name: String::new(),
            currency: "usd".to_owned(),
            default_budget: String::new(),
            usd_rate: String::new(),
        }
    }
}

impl NewProjectForm {
    /// The project this form asks for, or every problem with it.
    fn project(&self) -> Result<NewProject, Vec<String>> {
        let mut errors = Vec::new();
        let currency = Currency::parse(&self.currency).map_err(|e| errors.push(format!("Currency: {e}"))).ok();
        let default_budget = match self.default_budget.trim().parse::<Nanos>() {
            Ok(budget) if !budget.is_negative() => Some(budget),
            _ => {
                errors.push(
                    "Default budget: must be an amount such as 10 or 2.50 (what a customer seen for the first \
                     time may spend each month)"
                        .to_owned(),
                );
                None
            }
        };
        let usd_rate = match self.usd_rate.trim() {
            "" => Some(None),
            text => text.parse::<Nanos>().ok().map(Some),
        };
        if usd_rate.is_none() {
            errors.push("USD exchange rate: must be a number such as 151.20, or empty".to_owned());
        }
        match (currency, default_budget, usd_rate) {
            (Some(currency), Some(default_budget), Some(usd_rate)) if errors.is_empty() => {
                Ok(NewProject { name: self.name.clone(), currency, usd_rate, default_budget, ..NewProject::default() })
            }
            _ => Err(errors),
        }
    }
}

pub async fn list(State(state): State<AppState>, me: Member) -> Result<ProjectsPage, WebError> {
    let projects = projects::list_projects(&state.db, me.org_id()).await.map_err(project_error)?;
    Ok(ProjectsPage { me, projects, form: NewProjectForm::default(), currencies: SUPPORTED, errors: vec![] })
}

pub async fn create(
    State(state): State<AppState>,
    me: Member,
    Form(form): Form<NewProjectForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let new = match form.project() {
        Ok(new) => new,
        Err(errors) => return refused(&state, me, form, errors).await,
    };
    match projects::create_project(&state.db, me.org_id(), &new).await {
        Ok(project) => {
            audit::record(&state.db, me.org_id(), &me.actor(), "project.created", &project.name, "project created")
                .await?;
            Ok(Redirect::to(&format!("/projects/{}", project.id)).into_response())
        }
        Err(ProjectError::Invalid { field, reason }) => {
            refused(&state, me, form, vec![format!("{}: {reason}", capitalized(field))]).await
        }
        Err(e) => Err(project_error(e)),
    }
}

/// The projects page again, with what was typed and what is wrong with it.
async fn refused(
    state: &AppState,
    me: Member,
    form: NewProjectForm,
    errors: Vec<String>,
) -> Result<Response, WebError> {
    let projects = projects::list_projects(&state.db, me.org_id()).await.map_err(project_error)?;
    let page = ProjectsPage { me, projects, form, currencies: SUPPORTED, errors };
    Ok((StatusCode::BAD_REQUEST, page).into_response())
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
    checklist: super::first_run::Checklist,
    snippets: super::first_run::Snippets,
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
    let checklist = super::first_run::checklist(&state, &project).await?;
    let snippets = super::first_run::snippets(&state, &project, None).await?;
    Ok(ProjectPage {
        markup: format!("{} %", tollgate_core::money::Nanos(project.markup_bps * 10_000_000)),
        default_budget: super::format::money(project.default_budget_nanos, &currency),
        base_url: state.config.public_url.trim_end_matches('/').to_owned(),
        billed: super::format::money(totals.billed_nanos, &currency),
        chart: super::format::spend_chart(&days, &currency),
        totals,
        top,
        calls,
        checklist,
        snippets,
        project,
        me,
    })
}

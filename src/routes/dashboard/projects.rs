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
    billed: super::format::Money,
    margin: super::format::Money,
}

#[derive(Template, WebTemplate)]
#[template(path = "project.html")]
pub struct ProjectPage {
    me: Member,
    project: Project,
    markup: String,
    default_budget: super::format::Money,
    base_url: String,
    /// The range the figures, the chart and the top customers are of.
    range: super::analytics::RangeView,
    errors: Vec<String>,
    totals: super::analytics::FiguresView,
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

/// The overview of a date range (`?from&to`, the last 30 days unless given): billed, provider
/// cost, margin and calls (counted as the analytics count them), billed per day, top customers;
/// then recent calls, and how to make a first call.
pub async fn show(
    State(state): State<AppState>,
    me: Member,
    axum::extract::Path(id): axum::extract::Path<String>,
    query: Result<axum::extract::Query<super::analytics::RangeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, WebError> {
    use super::analytics::{FiguresView, RangeView, day_chart, page_range, today};
    use tollgate_core::{analytics, usage};
    let project = load_project(&state, &me, &id).await?;
    let today = today();
    let (range, errors) = page_range(query, today);
    let (from, to) = (range.start(), range.end());
    let currency = project.currency.clone();
    let days = analytics::by_day(&state.db, &project.id, from, to).await?;
    let totals = analytics::totals(&state.db, &project.id, from, to).await?;
    let top = analytics::by_customer(&state.db, &project.id, from, to, Some(11))
        .await?
        .into_iter()
        .filter_map(|c| {
            Some(TopView {
                id: c.customer_id?,
                external_id: c.external_id?,
                calls: c.figures.calls,
                billed: super::format::amount(c.figures.billed_nanos, &currency),
                margin: super::format::amount(c.figures.margin_nanos(), &currency),
            })
        })
        .take(10)
        .collect();
    let calls = super::customers::call_views(usage::recent_calls(&state.db, &project.id, None, 20).await?, &currency);
    let checklist = super::first_run::checklist(&state, &project).await?;
    let snippets = super::first_run::snippets(&state, &project, None).await?;
    let page = ProjectPage {
        markup: format!("{} %", tollgate_core::money::Nanos(project.markup_bps * 10_000_000)),
        default_budget: super::format::amount(project.default_budget_nanos, &currency),
        base_url: state.config.public_url.trim_end_matches('/').to_owned(),
        range: RangeView::new(format!("/projects/{}", project.id), range, today),
        errors,
        totals: FiguresView::of(&totals, &currency),
        chart: day_chart(&days, &currency),
        top,
        calls,
        checklist,
        snippets,
        project,
        me,
    };
    let status = if page.errors.is_empty() { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    Ok((status, page).into_response())
}

//! A project's calls: the newest of a date range (`?from&to`, the last 30 days unless given), or
//! those of one request id (`?request_id=…`, the `x-request-id` a client got, whenever it was
//! made), so support can find the call a customer asks about. Each shows its outcome (refused
//! and clamped ones marked), tokens, cost, billed amount and latency.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tollgate_core::projects::Project;

use super::analytics::{RangeQuery, RangeView, page_range, today};
use super::customers::{CallView, CallsQuery, searched_calls};
use super::error::WebError;
use super::projects::load_project;
use super::session::Member;
use crate::state::AppState;

/// How many calls the page lists.
const LIMIT: i64 = 200;

#[derive(Template, WebTemplate)]
#[template(path = "calls.html")]
pub struct CallsPage {
    me: Member,
    project: Project,
    calls: Vec<CallView>,
    request_id: String,
    request_id_error: Option<String>,
    calls_action: String,
    range: RangeView,
    /// Why the date range could not be read (the default range is shown instead).
    errors: Vec<String>,
}

pub async fn list(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Query(query): Query<CallsQuery>,
    range: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let project = load_project(&state, &me, &id).await?;
    let today = today();
    let (range, errors) = page_range(range, today);
    let within = Some((range.start(), range.end()));
    let (calls, request_id_error) = searched_calls(&state, &project, None, &query, within, LIMIT).await?;
    let action = format!("/projects/{}/calls", project.id);
    let page = CallsPage {
        range: RangeView::new(action.clone(), range, today),
        errors,
        calls_action: action,
        calls,
        request_id: query.request_id,
        request_id_error,
        project,
        me,
    };
    let status = if page.errors.is_empty() { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    Ok((status, page).into_response())
}

//! A project's calls: the newest, or those of one request id (`?request_id=…`, the
//! `x-request-id` a client got), so support can find the call a customer asks about. Each
//! shows its outcome (refused and clamped ones marked), tokens, cost, billed amount and latency.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, Query, State};
use tollgate_core::projects::Project;

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
}

pub async fn list(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Query(query): Query<CallsQuery>,
) -> Result<CallsPage, WebError> {
    let project = load_project(&state, &me, &id).await?;
    let (calls, request_id_error) = searched_calls(&state, &project, None, &query, LIMIT).await?;
    Ok(CallsPage {
        calls_action: format!("/projects/{}/calls", project.id),
        calls,
        request_id: query.request_id,
        request_id_error,
        project,
        me,
    })
}

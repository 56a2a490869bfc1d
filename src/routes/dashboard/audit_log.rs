//! The organization's audit log.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::State;
use tollgate_core::audit;

use super::error::WebError;
use super::session::Member;
use crate::state::AppState;

pub struct Row {
    when: String,
    who: String,
    action: String,
    target: String,
    detail: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "audit.html")]
pub struct AuditPage {
    me: Member,
    entries: Vec<Row>,
}

pub async fn page(State(state): State<AppState>, me: Member) -> Result<AuditPage, WebError> {
    let entries = audit::list(&state.db, me.org_id(), 500)
        .await?
        .into_iter()
        .map(|e| Row {
            when: super::format::datetime(e.created_at),
            who: e.actor_email,
            action: e.action,
            target: e.target,
            detail: e.detail,
        })
        .collect();
    Ok(AuditPage { me, entries })
}

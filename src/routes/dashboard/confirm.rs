//! Confirmation pages for what cannot be undone in one click: a page's danger button is a link
//! here (a GET, no JavaScript), and this page says what happens and holds the real form (a POST
//! to the same path, with the session's CSRF token) with a danger button and a way back. The
//! POST endpoints are the ones the pages always had.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, State};
use tollgate_core::accounts::Role;
use tollgate_core::ids::{CustomerId, KeyId, ProviderId};
use tollgate_core::projects::{self, Project};
use tollgate_core::stripe;

use super::billing::stripe_error;
use super::error::WebError;
use super::projects::load_project;
use super::session::Member;
use crate::state::AppState;

/// What the member is asked to confirm.
pub struct Confirm {
    pub title: String,
    /// What happens, one paragraph each.
    pub explanation: Vec<String>,
    /// Whether it can be undone afterwards (blocking a customer can).
    pub undoable: bool,
    /// Where the form posts (the action's endpoint).
    pub action: String,
    pub button: &'static str,
    /// Back to the page the member came from.
    pub cancel: String,
    /// A field to type to confirm (its label and name), for the gravest actions.
    pub typed: Option<(&'static str, &'static str)>,
}

#[derive(Template, WebTemplate)]
#[template(path = "confirm.html")]
pub struct ConfirmPage {
    me: Member,
    project: Project,
    confirm: Confirm,
    errors: Vec<String>,
}

/// Loads the member's project, if they may act on it.
async fn admin_project(state: &AppState, me: &Member, id: &str) -> Result<Project, WebError> {
    let project = load_project(state, me, id).await?;
    me.require(Role::Admin)?;
    Ok(project)
}

pub async fn revoke_key(
    State(state): State<AppState>,
    me: Member,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<ConfirmPage, WebError> {
    let project = admin_project(&state, &me, &id).await?;
    let key_id = KeyId::parse(&key_id).ok_or(WebError::NotFound)?;
    let key = projects::list_keys(&state.db, &project.id)
        .await?
        .into_iter()
        .find(|k| k.id == key_id && k.revoked_at.is_none())
        .ok_or(WebError::NotFound)?;
    let confirm = Confirm {
        title: format!("Revoke the key “{}”?", key.name),
        explanation: vec![
            format!(
                "Calls presenting the {} key {}… are refused from now on: at once on this server, within \
                 seconds on the others.",
                key.kind, key.prefix
            ),
            "A revoked key cannot be used again: the apps using it need a new key.".to_owned(),
        ],
        undoable: false,
        action: format!("/projects/{}/keys/{}/revoke", project.id, key_id),
        button: "Revoke key",
        cancel: format!("/projects/{}/keys", project.id),
        typed: None,
    };
    Ok(ConfirmPage { me, project, confirm, errors: vec![] })
}

pub async fn remove_provider(
    State(state): State<AppState>,
    me: Member,
    Path((id, provider_id)): Path<(String, String)>,
) -> Result<ConfirmPage, WebError> {
    let project = admin_project(&state, &me, &id).await?;
    let provider_id = ProviderId::parse(&provider_id).ok_or(WebError::NotFound)?;
    let provider = projects::list_provider_summaries(&state.db, &project.id)
        .await?
        .into_iter()
        .find(|p| p.id == provider_id)
        .ok_or(WebError::NotFound)?;
    let confirm = Confirm {
        title: format!("Remove the provider connection “{}”?", provider.name),
        explanation: vec![
            format!(
                "Calls for the models it serves ({}) go to the next connection that serves them, or are \
                 refused if none does.",
                provider.models
            ),
            "Its credential is deleted: adding the connection again means pasting it again.".to_owned(),
        ],
        undoable: false,
        action: format!("/projects/{}/providers/{}/delete", project.id, provider_id),
        button: "Remove connection",
        cancel: format!("/projects/{}/providers", project.id),
        typed: None,
    };
    Ok(ConfirmPage { me, project, confirm, errors: vec![] })
}

pub async fn block_customer(
    State(state): State<AppState>,
    me: Member,
    Path((id, customer_id)): Path<(String, String)>,
) -> Result<ConfirmPage, WebError> {
    let project = admin_project(&state, &me, &id).await?;
    let customer_id = CustomerId::parse(&customer_id).ok_or(WebError::NotFound)?;
    let customer =
        tollgate_core::customers::get(&state.db, &project.id, &customer_id).await?.ok_or(WebError::NotFound)?;
    let page = format!("/projects/{}/customers/{}", project.id, customer_id);
    let confirm = Confirm {
        title: format!("Block the customer “{}”?", customer.external_id),
        explanation: vec![
            "Every call for this customer is refused from now on, whatever their budget, until you \
             unblock them. Calls already running finish."
                .to_owned(),
        ],
        undoable: true,
        action: format!("{page}/block"),
        button: "Block customer",
        cancel: page,
        typed: None,
    };
    Ok(ConfirmPage { me, project, confirm, errors: vec![] })
}

pub async fn roll_alert_secret(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
) -> Result<ConfirmPage, WebError> {
    let project = admin_project(&state, &me, &id).await?;
    let confirm = Confirm {
        title: "Roll the alerts' signing secret?".to_owned(),
        explanation: vec![
            "A new signing secret replaces the current one at once: every webhook from now on is signed \
             with the new one, and the old one no longer verifies."
                .to_owned(),
            "Your receiver refuses alerts until it has the new secret.".to_owned(),
        ],
        undoable: false,
        action: format!("/projects/{}/alerts/secret", project.id),
        button: "Roll secret",
        cancel: format!("/projects/{}/alerts", project.id),
        typed: None,
    };
    Ok(ConfirmPage { me, project, confirm, errors: vec![] })
}

pub async fn disconnect_stripe(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
) -> Result<ConfirmPage, WebError> {
    let project = admin_project(&state, &me, &id).await?;
    if stripe::connection(&state.db, &project.id).await.map_err(stripe_error)?.is_none() {
        return Err(WebError::NotFound);
    }
    let confirm = Confirm {
        title: "Disconnect Stripe?".to_owned(),
        explanation: vec![
            "Tollgate forgets this project's Stripe connection and what it made on the account: the meter, \
             the price, each customer's Stripe customer and subscription, and the invoices mirrored here."
                .to_owned(),
            "Usage not yet delivered to Stripe is not sent, to this account or to the next one you connect. \
             The webhook events received stay, for the record. Nothing is deleted in Stripe."
                .to_owned(),
        ],
        undoable: false,
        action: format!("/projects/{}/billing/disconnect", project.id),
        button: "Disconnect Stripe",
        cancel: format!("/projects/{}/billing", project.id),
        typed: None,
    };
    Ok(ConfirmPage { me, project, confirm, errors: vec![] })
}

pub async fn delete_project(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
) -> Result<ConfirmPage, WebError> {
    let project = admin_project(&state, &me, &id).await?;
    Ok(delete_project_page(me, project, vec![]))
}

/// The project's deletion, with `errors` (a name that does not match).
pub(super) fn delete_project_page(me: Member, project: Project, errors: Vec<String>) -> ConfirmPage {
    let confirm = Confirm {
        title: format!("Delete the project “{}”?", project.name),
        explanation: vec![
            "Deletes its keys (calls presenting them are refused), provider connections, customers, usage \
             and settings, and its Stripe connection."
                .to_owned(),
            "Type the project's name to confirm.".to_owned(),
        ],
        undoable: false,
        action: format!("/projects/{}/delete", project.id),
        button: "Delete project",
        cancel: format!("/projects/{}/settings", project.id),
        typed: Some(("Project name", "confirm")),
    };
    ConfirmPage { me, project, confirm, errors }
}

//! Usage Stripe would invoice nowhere (the customer's subscription ended, or the customer was
//! deleted in Stripe), billed at the tenant's request: a one-off invoice of its amount, or —
//! for a customer deleted in Stripe — a new Stripe customer and subscription whose first
//! invoice carries it. See [`tollgate_core::one_off`].

use axum::Form;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::Role;
use tollgate_core::audit;
use tollgate_core::billing;
use tollgate_core::ids::{CustomerId, OneOffInvoiceId};
use tollgate_core::one_off::{self, OneOff};
use tollgate_core::projects::Project;

use super::error::WebError;
use super::format;
use super::projects::load_project;
use super::session::{CsrfForm, Member};
use crate::state::AppState;

/// A one-off invoice as the billing and customer pages list it.
pub struct OneOffView {
    pub id: String,
    pub customer_id: String,
    pub customer: String,
    pub amount: String,
    /// The usage behind it, to the nano.
    pub usage: String,
    pub calls: i64,
    pub status: String,
    pub failed: bool,
    pub stripe_invoice: String,
    pub error: String,
    pub requested: String,
}

impl OneOffView {
    fn of(one: OneOff) -> Self {
        Self {
            amount: one_off::amount(&one),
            usage: format::exact_money(one.nanos, &one.currency),
            id: one.id.to_string(),
            customer_id: one.customer_id.map(|c| c.to_string()).unwrap_or_default(),
            customer: one.customer_external_id.unwrap_or_else(|| "(deleted customer)".to_owned()),
            calls: one.events,
            failed: one.status == "failed",
            status: match one.status.as_str() {
                "pending" if one.attempts > 0 => "retrying".to_owned(),
                "pending" => "being sent".to_owned(),
                "sent" => "invoiced".to_owned(),
                other => other.to_owned(),
            },
            stripe_invoice: one.stripe_invoice_id.unwrap_or_default(),
            error: one.last_error.unwrap_or_default(),
            requested: format!("{} by {}", format::datetime(one.created_at), one.requested_by),
        }
    }
}

/// The project's one-offs (one customer's, when given), newest first.
pub async fn views(
    state: &AppState,
    project: &Project,
    customer: Option<&CustomerId>,
) -> Result<Vec<OneOffView>, WebError> {
    Ok(one_off::list(&state.db, &project.id, customer).await?.into_iter().map(OneOffView::of).collect())
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CustomerForm {
    csrf: String,
    customer: String,
}

/// "Invoice it now": the customer's waiting usage goes on a one-off invoice.
pub async fn request(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<CustomerForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let customer = CustomerId::parse(form.customer.trim()).ok_or(WebError::NotFound)?;
    let Some(billing) = billing::project_billing(&state.db, &project.id).await? else {
        return refused(&state, me, project, "Stripe is not connected".to_owned()).await;
    };
    let actor = me.actor();
    match one_off::request(&state.db, &project.id, &customer, &project.currency, billing.billing_from, &actor.label)
        .await?
    {
        Ok(one) => {
            let detail = format!("{} ({} calls) for {}", one_off::amount(&one), one.events, customer);
            audit::record(&state.db, me.org_id(), &actor, "stripe.one_off_invoice", &project.name, &detail).await?;
            Ok(Redirect::to(&format!("/projects/{}/billing#one-offs", project.id)).into_response())
        }
        Err(refusal) => refused(&state, me, project, format!("One-off invoice: {refusal}")).await,
    }
}

/// "Try again" on a failed one-off.
pub async fn retry(
    State(state): State<AppState>,
    me: Member,
    Path((id, one)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let one = OneOffInvoiceId::parse(&one).ok_or(WebError::NotFound)?;
    if !one_off::retry(&state.db, &project.id, &one).await? {
        return refused(&state, me, project, "One-off invoice: only a failed one can be tried again".to_owned()).await;
    }
    audit::record(&state.db, me.org_id(), &me.actor(), "stripe.one_off_retried", &project.name, one.as_str()).await?;
    Ok(Redirect::to(&format!("/projects/{}/billing#one-offs", project.id)).into_response())
}

/// "Give back": a failed one-off that never reached Stripe returns its usage to the outbox.
pub async fn give_back(
    State(state): State<AppState>,
    me: Member,
    Path((id, one)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let one = OneOffInvoiceId::parse(&one).ok_or(WebError::NotFound)?;
    if !one_off::give_back(&state.db, &project.id, &one).await? {
        let message = "One-off invoice: only a failed one whose invoice item Stripe never made can be given back";
        return refused(&state, me, project, message.to_owned()).await;
    }
    audit::record(&state.db, me.org_id(), &me.actor(), "stripe.one_off_given_back", &project.name, one.as_str())
        .await?;
    Ok(Redirect::to(&format!("/projects/{}/billing", project.id)).into_response())
}

/// "Make a new Stripe customer" for a customer deleted in Stripe: provisioning makes a new
/// one and a subscription, whose first invoice carries the waiting usage.
pub async fn new_stripe_customer(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<CustomerForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let customer = CustomerId::parse(form.customer.trim()).ok_or(WebError::NotFound)?;
    if !one_off::replace_deleted_customer(&state.db, &project.id, &customer).await? {
        let message = "New Stripe customer: only a customer deleted in Stripe gets a new one".to_owned();
        return refused(&state, me, project, message).await;
    }
    audit::record(&state.db, me.org_id(), &me.actor(), "stripe.customer_replaced", &project.name, customer.as_str())
        .await?;
    Ok(Redirect::to(&format!("/projects/{}/billing", project.id)).into_response())
}

async fn refused(state: &AppState, me: Member, project: Project, message: String) -> Result<Response, WebError> {
    let page = super::billing::page(state, me, project, vec![message], false).await?;
    Ok((axum::http::StatusCode::BAD_REQUEST, page).into_response())
}

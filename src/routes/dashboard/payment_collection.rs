//! Payment collection in the dashboard: the project's setting on the billing page (send
//! invoices or charge automatically), and the payment links made from a customer's page (a
//! payment-method setup link, a customer portal link), shown there for the tenant to send on.

use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::Role;
use tollgate_core::audit;
use tollgate_core::customers;
use tollgate_core::ids::CustomerId;
use tollgate_core::payment_collection::{self, Collection, CollectionError};
use tollgate_jobs::payment_links::{self, LinkError, LinkKind, ReturnUrls};

use super::error::WebError;
use super::projects::load_project;
use super::session::{CsrfForm, Member};
use crate::state::AppState;

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CollectionForm {
    csrf: String,
    collection_method: String,
    days_until_due: String,
    automatic_tax: Option<String>,
}

/// Saves the project's payment collection; subscriptions made from now on get it.
pub async fn set_collection(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<CollectionForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let days = match form.days_until_due.trim() {
        "" => None,
        text => match text.parse::<i64>() {
            Ok(days) => Some(days),
            Err(_) => Some(-1),
        },
    };
    match Collection::parse(&form.collection_method, days) {
        Ok(collection) => {
            payment_collection::set_collection(&state.db, &project.id, collection).await?;
            let tax = form.automatic_tax.is_some();
            payment_collection::set_automatic_tax(&state.db, &project.id, tax).await?;
            let method = match collection.days_until_due() {
                Some(days) => format!("send invoices due in {days} days"),
                None => "charge automatically".to_owned(),
            };
            let detail = format!("payment collection: {method}; Stripe Tax {}", if tax { "on" } else { "off" });
            audit::record(&state.db, me.org_id(), &me.actor(), "billing.collection_changed", &project.name, &detail)
                .await?;
            Ok(Redirect::to(&format!("/projects/{}/billing#payment-collection", project.id)).into_response())
        }
        Err(CollectionError::Invalid { field, reason }) => {
            let label = if field == "days_until_due" { "Days until due" } else { "Payment collection" };
            let page = super::billing::page(&state, me, project, vec![format!("{label}: {reason}")], false).await?;
            Ok((StatusCode::BAD_REQUEST, page).into_response())
        }
        Err(CollectionError::Db(e)) => Err(e.into()),
    }
}

async fn link(
    state: AppState,
    me: Member,
    id: String,
    customer_id: String,
    csrf: String,
    kind: LinkKind,
) -> Result<Response, WebError> {
    me.verify_csrf(&csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let customer_key = CustomerId::parse(&customer_id).ok_or(WebError::NotFound)?;
    let customer = customers::get(&state.db, &project.id, &customer_key).await?.ok_or(WebError::NotFound)?;
    let back = payment_links::customer_page_url(&state.config.public_url, &project.id, &customer.id);
    let urls = ReturnUrls { success_url: back.clone(), cancel_url: back };
    let made = payment_links::create(
        &state.db,
        &state.stripe,
        &state.master_key,
        state.config.stripe_platform_key.as_ref(),
        &project.id,
        &project.currency,
        &customer.id,
        kind,
        &urls,
    )
    .await;
    let (status, link, error) = match made {
        Ok(url) => {
            let (action, what) = match kind {
                LinkKind::PaymentSetup => ("customer.payment_setup_link", "Payment-method setup link"),
                LinkKind::BillingPortal => ("customer.billing_portal_link", "Customer portal link"),
            };
            audit::record(&state.db, me.org_id(), &me.actor(), action, &customer.external_id, &project.name).await?;
            (StatusCode::OK, Some((what, url)), None)
        }
        Err(e @ (LinkError::NotConnected(_) | LinkError::NoStripeCustomer)) => {
            (StatusCode::CONFLICT, None, Some(format!("No link made: {e}.")))
        }
        Err(LinkError::Stripe(e)) => {
            tracing::warn!(error = %e, "a payment link could not be made");
            (StatusCode::BAD_GATEWAY, None, Some(format!("No link made: {e}")))
        }
        Err(LinkError::Connection(e)) => return Err(super::billing::stripe_error(e)),
        Err(LinkError::Db(e)) => return Err(e.into()),
    };
    let calls = axum::extract::Query(super::customers::CallsQuery::default());
    let mut page = super::customers::show(State(state), me, Path((id, customer_id)), calls).await?;
    page.payment_link = link;
    page.errors = error.into_iter().collect();
    Ok((status, page).into_response())
}

/// Makes a payment-method setup link (Stripe Checkout in setup mode) and shows it.
pub async fn payment_setup(
    State(state): State<AppState>,
    me: Member,
    Path((id, customer_id)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    link(state, me, id, customer_id, form.csrf, LinkKind::PaymentSetup).await
}

/// Makes a customer portal link and shows it.
pub async fn billing_portal(
    State(state): State<AppState>,
    me: Member,
    Path((id, customer_id)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    link(state, me, id, customer_id, form.csrf, LinkKind::BillingPortal).await
}

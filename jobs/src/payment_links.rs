//! Links that let an end-customer pay: a Stripe Checkout session in setup mode (the customer
//! saves a payment method, which charging automatically needs) and a customer portal session
//! (the customer sees its invoices, pays them, and manages its payment methods). Each link is
//! a session made on the project's Stripe account for the customer's Stripe customer; the
//! dashboard and the management API both call [`create`].

use std::collections::HashMap;

use secrecy::SecretString;
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionCustomerUpdate, CreateCheckoutSessionCustomerUpdateAddress,
};
use stripe_shared::{CheckoutSessionBillingAddressCollection, CheckoutSessionMode};
use tollgate_core::billing;
use tollgate_core::crypto::MasterKey;
use tollgate_core::db::DbError;
use tollgate_core::ids::{CustomerId, ProjectId};
use tollgate_core::payment_collection;
use tollgate_core::stripe;

use crate::stripe_api::{Credentials, StripeApi, StripeApiError};

/// Which link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// Checkout in `mode=setup`: `POST /v1/checkout/sessions`.
    PaymentSetup,
    /// The customer portal: `POST /v1/billing_portal/sessions`.
    BillingPortal,
}

impl LinkKind {
    pub fn name(&self) -> &'static str {
        match self {
            LinkKind::PaymentSetup => "payment-setup",
            LinkKind::BillingPortal => "billing-portal",
        }
    }
}

/// Why no link was made; the first two are the tenant's to fix.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    NotConnected(String),
    #[error("the customer has no Stripe customer yet (one is made with its first billable call, or link one)")]
    NoStripeCustomer,
    #[error("Stripe refused the session: {0}")]
    Stripe(#[from] StripeApiError),
    #[error(transparent)]
    Connection(#[from] stripe::StripeError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Where Stripe sends the customer: after saving a payment method (or cancelling), or from the
/// portal's "return" link. Each is an https URL the caller checked.
#[derive(Debug, Clone)]
pub struct ReturnUrls {
    pub success_url: String,
    pub cancel_url: String,
}

/// How Tollgate acts on the project's Stripe account, or why it cannot.
pub async fn credentials(
    db: &tollgate_core::Db,
    master: &MasterKey,
    platform_key: Option<&SecretString>,
    project: &ProjectId,
) -> Result<Credentials, LinkError> {
    crate::stripe_api::credentials(db, master, platform_key, project)
        .await?
        .map_err(|e| LinkError::NotConnected(e.to_string()))
}

/// Makes a session of `kind` for `customer` and returns its URL (single use; Checkout's
/// expires after 24 hours, the portal's after a short while, so make one when the customer
/// is about to go there).
#[allow(clippy::too_many_arguments, reason = "the project's Stripe access, the customer and the URLs")]
pub async fn create(
    db: &tollgate_core::Db,
    api: &StripeApi,
    master: &MasterKey,
    platform_key: Option<&SecretString>,
    project: &ProjectId,
    currency: &str,
    customer: &CustomerId,
    kind: LinkKind,
    urls: &ReturnUrls,
) -> Result<String, LinkError> {
    let credentials = credentials(db, master, platform_key, project).await?;
    let stripe_customer =
        billing::customer_stripe(db, project, customer).await?.stripe_customer_id.ok_or(LinkError::NoStripeCustomer)?;
    // Each session is a new one: the key only guards this request against being sent twice.
    let key = format!("tollgate-{}-{customer}-{}", kind.name(), uuid::Uuid::now_v7().simple());
    let stripe = api.on(&credentials);
    let url = match kind {
        LinkKind::PaymentSetup => {
            let Ok(currency) = currency.to_ascii_lowercase().parse::<stripe_types::Currency>();
            let mut create = CreateCheckoutSession::new()
                .customer(stripe_customer)
                .mode(CheckoutSessionMode::Setup)
                .currency(currency)
                .success_url(urls.success_url.clone())
                .cancel_url(urls.cancel_url.clone())
                .metadata(HashMap::from([
                    ("tollgate_customer".to_owned(), customer.to_string()),
                    ("tollgate_project".to_owned(), project.to_string()),
                ]));
            if payment_collection::automatic_tax(db, project).await? {
                // Stripe Tax needs the customer's location: Checkout asks for the billing address
                // and saves it on the customer ("Checkout handles the collection of customer
                // addresses for you", https://docs.stripe.com/tax/customer-locations).
                let update = CreateCheckoutSessionCustomerUpdate {
                    address: Some(CreateCheckoutSessionCustomerUpdateAddress::Auto),
                    ..CreateCheckoutSessionCustomerUpdate::new()
                };
                create = create
                    .billing_address_collection(CheckoutSessionBillingAddressCollection::Required)
                    .customer_update(update);
            }
            stripe.send_idempotent(&create, &key).await?.url
        }
        LinkKind::BillingPortal => {
            let create =
                CreateBillingPortalSession::new().customer(stripe_customer).return_url(urls.success_url.clone());
            Some(stripe.send_idempotent(&create, &key).await?.url)
        }
    };
    url.ok_or_else(|| LinkError::Stripe(StripeApiError::Decode("the session has no url".to_owned())))
}

/// The customer's page in the dashboard: where Stripe sends the customer back unless the
/// tenant gives another URL.
pub fn customer_page_url(public_url: &str, project: &ProjectId, customer: &CustomerId) -> String {
    format!("{}/projects/{project}/customers/{customer}", public_url.trim_end_matches('/'))
}

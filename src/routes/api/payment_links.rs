//! `/api/v1/customers/{id}/payment-setup` and `/api/v1/customers/{id}/billing-portal`: links a
//! tenant's app sends its customer to, to save a payment method (Stripe Checkout in setup
//! mode) or to see and pay its invoices and manage its payment methods (Stripe's customer
//! portal). Each call makes a new session on the project's Stripe account.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tollgate_core::audit::Actor;
use tollgate_core::payment_collection::{CollectionError, check_return_url};
use tollgate_core::projects::Project;
use tollgate_jobs::payment_links::{self, LinkError, LinkKind, ReturnUrls};
use tollgate_jobs::stripe_api::StripeApiError;
use utoipa::ToSchema;

use super::error::{
    ApiError, CustomerNotFound, Problem, RateLimited, Unauthorized, UnsupportedMediaType, json_body, path_param,
};
use super::idempotency::IdempotencyKey;
use crate::state::AppState;

const TAG: &str = "Customers";

/// Where Stripe sends the customer once a payment method is saved, or if they cancel.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentSetupRequest {
    /// An `https` URL; the customer's page in the dashboard unless given.
    #[schema(example = "https://app.example.com/billing?saved=1", max_length = 2000)]
    success_url: Option<String>,
    /// An `https` URL; `success_url` unless given.
    #[schema(example = "https://app.example.com/billing", max_length = 2000)]
    cancel_url: Option<String>,
}

/// Where the portal's "return" link takes the customer.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BillingPortalRequest {
    /// An `https` URL; the customer's page in the dashboard unless given.
    #[schema(example = "https://app.example.com/billing", max_length = 2000)]
    return_url: Option<String>,
}

/// A link to send the customer to.
#[derive(Debug, Serialize, ToSchema)]
pub struct Link {
    /// Stripe's page for the customer. Single use and short-lived: make one when the customer
    /// is about to go there.
    #[schema(example = "https://checkout.stripe.com/c/pay/cs_test_a1b2c3")]
    url: String,
}

fn url_field(field: &'static str, url: Option<String>) -> Result<Option<String>, ApiError> {
    url.map(|u| {
        check_return_url(field, &u).map_err(|e| match e {
            CollectionError::Invalid { field, reason } => ApiError::field(field, reason),
            CollectionError::Db(e) => e.into(),
        })
    })
    .transpose()
}

async fn link(
    state: AppState,
    (project, actor): (Project, Actor),
    external_id: String,
    kind: LinkKind,
    success_url: Option<String>,
    cancel_url: Option<String>,
) -> Result<(StatusCode, Json<Link>), ApiError> {
    let customer = super::customers::found(&state, &project, &external_id).await?;
    let default = payment_links::customer_page_url(&state.config.public_url, &project.id, &customer.id);
    let success_url = success_url.unwrap_or(default);
    let urls = ReturnUrls { cancel_url: cancel_url.unwrap_or_else(|| success_url.clone()), success_url };
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
    match made {
        Ok(url) => {
            let action = match kind {
                LinkKind::PaymentSetup => "customer.payment_setup_link",
                LinkKind::BillingPortal => "customer.billing_portal_link",
            };
            super::audit(&state, &project, &actor, action, &external_id, &project.name).await?;
            Ok((StatusCode::CREATED, Json(Link { url })))
        }
        Err(e) => Err(link_error(e)),
    }
}

/// The refusal a tenant can act on, or an internal error (logged here).
fn link_error(e: LinkError) -> ApiError {
    match e {
        LinkError::NotConnected(reason) => ApiError::Conflict(format!("No link can be made: {reason}.")),
        e @ LinkError::NoStripeCustomer => ApiError::Conflict(format!("No link can be made: {e}.")),
        LinkError::Stripe(StripeApiError::Api { status, message, .. }) if (400..500).contains(&status) => {
            ApiError::Conflict(format!("Stripe refused the session: {message}"))
        }
        LinkError::Stripe(e) => {
            tracing::warn!(error = %e, "a payment link could not be made");
            ApiError::Upstream(format!("Stripe could not make the session ({e}); try again."))
        }
        LinkError::Connection(e) => {
            tracing::error!(error = %e, "stripe connection unreadable");
            ApiError::Internal
        }
        LinkError::Db(e) => e.into(),
    }
}

/// Make a payment-method setup link
///
/// A Stripe Checkout session in setup mode for the customer's Stripe customer: the customer
/// saves a payment method there, for projects that charge automatically. Refused (409) while
/// the project's Stripe account is not connected or the customer has no Stripe customer yet
/// (one is made after its first billable call).
#[utoipa::path(
    post,
    path = "/api/v1/customers/{id}/payment-setup",
    operation_id = "create_payment_setup_link",
    tag = TAG,
    params(("id" = String, Path, description = "Your id for the customer", example = "customer-42"), IdempotencyKey),
    request_body = PaymentSetupRequest,
    responses(
        (status = 201, description = "The link", body = Link,
            headers(("Idempotent-Replayed" = String, description = "`true` on the stored answer to a retry"))),
        (status = 401, response = Unauthorized),
        (status = 404, response = CustomerNotFound),
        (status = 409, description = "Stripe is not connected, the customer has no Stripe customer yet, Stripe \
            refused the session, or a request with this Idempotency-Key is in progress", body = Problem,
            content_type = "application/problem+json"),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, description = "A URL is not an https URL, or the Idempotency-Key is malformed or was used \
            for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = RateLimited),
        (status = 502, description = "Stripe could not be reached", body = Problem,
            content_type = "application/problem+json"),
    )
)]
pub async fn payment_setup(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<Link>), ApiError> {
    let caller = super::caller(&state, &headers).await?;
    let external_id = path_param(path)?;
    let body: PaymentSetupRequest = json_body(body)?;
    let success_url = url_field("success_url", body.success_url)?;
    let cancel_url = url_field("cancel_url", body.cancel_url)?;
    link(state, caller, external_id, LinkKind::PaymentSetup, success_url, cancel_url).await
}

/// Make a customer portal link
///
/// A Stripe customer portal session for the customer's Stripe customer: the customer sees its
/// invoices, pays open ones and manages its payment methods. The portal must be activated in
/// the Stripe account's settings (Settings → Billing → Customer portal); Stripe's refusal is
/// answered 409. Refused (409) too while the project's Stripe account is not connected or the
/// customer has no Stripe customer yet.
#[utoipa::path(
    post,
    path = "/api/v1/customers/{id}/billing-portal",
    operation_id = "create_billing_portal_link",
    tag = TAG,
    params(("id" = String, Path, description = "Your id for the customer", example = "customer-42"), IdempotencyKey),
    request_body = BillingPortalRequest,
    responses(
        (status = 201, description = "The link", body = Link,
            headers(("Idempotent-Replayed" = String, description = "`true` on the stored answer to a retry"))),
        (status = 401, response = Unauthorized),
        (status = 404, response = CustomerNotFound),
        (status = 409, description = "Stripe is not connected, the customer has no Stripe customer yet, Stripe \
            refused the session (the portal is not activated), or a request with this Idempotency-Key is in \
            progress", body = Problem, content_type = "application/problem+json"),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, description = "`return_url` is not an https URL, or the Idempotency-Key is malformed or \
            was used for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, response = RateLimited),
        (status = 502, description = "Stripe could not be reached", body = Problem,
            content_type = "application/problem+json"),
    )
)]
pub async fn billing_portal(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<Link>), ApiError> {
    let caller = super::caller(&state, &headers).await?;
    let external_id = path_param(path)?;
    let body: BillingPortalRequest = json_body(body)?;
    let return_url = url_field("return_url", body.return_url)?;
    link(state, caller, external_id, LinkKind::BillingPortal, return_url, None).await
}

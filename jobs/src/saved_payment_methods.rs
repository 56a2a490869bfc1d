//! A card saved through a payment-method setup link becomes the customer's default for
//! invoices. A SetupIntent "automatically attaches the resulting payment method to that
//! Customer" (Stripe's API reference, the SetupIntent object), but does not make it the one
//! invoices are charged to: Stripe's guide to updating payment details with Checkout
//! (<https://docs.stripe.com/payments/checkout/subscriptions/updating>) collects it in setup
//! mode, then retrieves the SetupIntent and sets the payment method through the API. Without
//! that, an invoice charged automatically would still fail. For each completed setup session Stripe reported
//! (`tollgate_core::payment_collection::record_setup_completed`), this reads the session's
//! SetupIntent (`GET /v1/setup_intents/{id}`: its `payment_method`, once `succeeded`) and sets
//! it as the customer's `invoice_settings[default_payment_method]`.

use stripe_core::customer::{UpdateCustomer, UpdateCustomerInvoiceSettings};
use stripe_core::setup_intent::RetrieveSetupIntent;
use stripe_shared::SetupIntentStatus;
use tollgate_core::Db;
use tollgate_core::billing;
use tollgate_core::payment_collection::{self, SavedPaymentMethod};

use crate::billing::{BillingError, BillingServices};

/// What one run did: payment methods made defaults, and attempts that failed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SavedReport {
    pub made_default: usize,
    pub failed: usize,
}

pub async fn make_defaults(db: &Db, services: &BillingServices) -> Result<SavedReport, BillingError> {
    let mut report = SavedReport::default();
    for saved in payment_collection::claim_saved_payment_methods(db, 50).await? {
        let outcome = make_default(db, services, &saved).await?;
        match &outcome {
            Ok(_) => report.made_default += 1,
            Err((error, _)) => {
                report.failed += 1;
                tracing::warn!(session = %saved.checkout_session, %error, "saved payment method not made default");
            }
        }
        let outcome = outcome.as_ref().map(String::as_str).map_err(|(e, retry)| (e.as_str(), *retry));
        payment_collection::record_saved_payment_method(db, &saved, outcome).await?;
    }
    Ok(report)
}

type Outcome = Result<String, (String, Option<i64>)>;

async fn make_default(
    db: &Db,
    services: &BillingServices,
    saved: &SavedPaymentMethod,
) -> Result<Outcome, BillingError> {
    let credentials = match crate::stripe_api::credentials(
        db,
        &services.master_key,
        services.platform_key.as_ref(),
        &saved.project_id,
    )
    .await?
    {
        Ok(credentials) => credentials,
        Err(e) => return Ok(Err((e.to_string(), None))),
    };
    let retry =
        |e: &crate::stripe_api::StripeApiError| e.is_retryable().then(|| billing::provision_backoff_ms(saved.attempts));
    let stripe = services.api.on(&credentials);
    let intent = match RetrieveSetupIntent::new(saved.setup_intent.as_str()).send(&stripe).await {
        Ok(intent) => intent,
        Err(e) => return Ok(Err((format!("reading the SetupIntent: {e}"), retry(&e)))),
    };
    let method = intent.payment_method.as_ref().map(|m| m.id().to_string());
    let Some(method) = method.filter(|_| intent.status == SetupIntentStatus::Succeeded) else {
        return Ok(Err((format!("the SetupIntent is {}, with no payment method saved", intent.status), None)));
    };
    let settings = UpdateCustomerInvoiceSettings { default_payment_method: Some(method.clone()), ..Default::default() };
    let update = UpdateCustomer::new(saved.stripe_customer_id.as_str()).invoice_settings(settings);
    let key = format!("tollgate-default-payment-method-{}", saved.checkout_session);
    match stripe.send_idempotent(&update, &key).await {
        Ok(_) => {
            // The session may have saved the billing address Stripe Tax was waiting for.
            billing::provision_again(db, &saved.project_id, &saved.stripe_customer_id).await?;
            Ok(Ok(method))
        }
        Err(e) => Ok(Err((format!("making it the default: {e}"), retry(&e)))),
    }
}

//! "Test connection": checks what a project's Stripe credentials reach through calls their
//! permissions allow. A restricted key cannot read `GET /v1/account` (Stripe answers 403 naming
//! `rak_accounts_kyc_id_numbers_read`), so a restricted key is checked by listing one object of
//! each kind billing reads or writes (a write permission includes the read one); a secret key
//! and a Connect account are checked with `GET /v1/account`, which names the account (its id,
//! display name and email).

use stripe_billing::billing_meter::ListBillingMeter;
use stripe_billing::invoice::ListInvoice;
use stripe_billing::invoice_item::ListInvoiceItem;
use stripe_billing::subscription::ListSubscription;
use stripe_core::customer::ListCustomer;
use stripe_core::setup_intent::ListSetupIntent;
use stripe_product::price::ListPrice;
use stripe_product::product::ListProduct;

use crate::stripe_api::{Credentials, OnAccount, StripeApi, StripeApiError};

/// A list call that checks one permission (`GET /v1/{path}?limit=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Meters,
    Customers,
    Products,
    Prices,
    Subscriptions,
    Invoices,
    InvoiceItems,
    SetupIntents,
}

impl Probe {
    pub fn path(&self) -> &'static str {
        match self {
            Probe::Meters => "/billing/meters",
            Probe::Customers => "/customers",
            Probe::Products => "/products",
            Probe::Prices => "/prices",
            Probe::Subscriptions => "/subscriptions",
            Probe::Invoices => "/invoices",
            Probe::InvoiceItems => "/invoiceitems",
            Probe::SetupIntents => "/setup_intents",
        }
    }

    /// Lists one object of the kind (what it is does not matter, only that Stripe lets the key see it).
    async fn run(&self, stripe: &OnAccount<'_>) -> Result<(), StripeApiError> {
        match self {
            Probe::Meters => ListBillingMeter::new().limit(1).send(stripe).await.map(drop),
            Probe::Customers => ListCustomer::new().limit(1).send(stripe).await.map(drop),
            Probe::Products => ListProduct::new().limit(1).send(stripe).await.map(drop),
            Probe::Prices => ListPrice::new().limit(1).send(stripe).await.map(drop),
            Probe::Subscriptions => ListSubscription::new().limit(1).send(stripe).await.map(drop),
            Probe::Invoices => ListInvoice::new().limit(1).send(stripe).await.map(drop),
            Probe::InvoiceItems => ListInvoiceItem::new().limit(1).send(stripe).await.map(drop),
            Probe::SetupIntents => ListSetupIntent::new().limit(1).send(stripe).await.map(drop),
        }
    }
}

/// The restricted key's permissions billing needs, as the README lists them: (the Dashboard's
/// resource, Stripe's permission name, the list call checking it; meter events cannot be listed).
pub const RESTRICTED_KEY_PERMISSIONS: &[(&str, &str, Option<Probe>)] = &[
    ("Billing meters: Write", "rak_billing_meter_write", Some(Probe::Meters)),
    ("Billing meter events: Write", "rak_billing_meter_event_write", None),
    ("Customers: Write", "rak_customer_write", Some(Probe::Customers)),
    ("Products: Write", "rak_product_write", Some(Probe::Products)),
    ("Prices: Write", "rak_plan_write", Some(Probe::Prices)),
    ("Subscriptions: Write", "rak_subscription_write", Some(Probe::Subscriptions)),
    ("Invoices: Write", "rak_invoice_write", Some(Probe::Invoices)),
    ("Invoice items: Write", "rak_invoiceitem_write", Some(Probe::InvoiceItems)),
    ("SetupIntents: Read", "rak_setup_intent_read", Some(Probe::SetupIntents)),
];

/// What names the account to people, as its Dashboard shows it: its display name (or its
/// business's name) and its email, when Stripe gives them (` "Acme" <billing@acme.example>`).
fn account_names(account: &stripe_shared::Account) -> String {
    let name = account
        .settings
        .as_ref()
        .and_then(|s| s.dashboard.display_name.clone())
        .or_else(|| account.business_profile.as_ref().and_then(|b| b.name.clone()))
        .filter(|n| !n.trim().is_empty());
    let email = account.email.as_ref().filter(|e| !e.trim().is_empty());
    let mut names = String::new();
    if let Some(name) = name {
        names.push_str(&format!(" “{}”", name.trim()));
    }
    if let Some(email) = email {
        names.push_str(&format!(" <{}>", email.trim()));
    }
    names
}

/// What a passing check found, or why it failed (Stripe's message names a missing permission:
/// "Having the 'rak_…' permission would allow this request to continue").
pub async fn check(api: &StripeApi, credentials: &Credentials, livemode: bool) -> Result<String, String> {
    use secrecy::ExposeSecret;
    let mode = if livemode { "live" } else { "test" };
    let restricted = credentials.account.is_none() && credentials.key.expose_secret().starts_with("rk_");
    if !restricted {
        let account = api.account(credentials).await.map_err(|e| e.to_string())?;
        return Ok(format!("account {}{} ({mode} mode)", account.id, account_names(&account)));
    }
    let stripe = api.on(credentials);
    let mut reached = Vec::new();
    for (resource, _, probe) in RESTRICTED_KEY_PERMISSIONS {
        let Some(probe) = probe else { continue };
        let path = probe.path();
        match probe.run(&stripe).await {
            Ok(()) => reached.push(path.trim_start_matches('/')),
            Err(StripeApiError::Api { status: 403, message, .. }) => {
                return Err(format!("the key lacks {resource} (GET /v1{path}): {message}"));
            }
            Err(e) => return Err(format!("GET /v1{path}: {e}")),
        }
    }
    Ok(format!(
        "restricted key, {mode} mode (the account itself is not readable with a restricted key); reads {}",
        reached.join(", ")
    ))
}

//! "Test connection": checks what a project's Stripe credentials reach through calls their
//! permissions allow. A restricted key cannot read `GET /v1/account` (Stripe answers 403 naming
//! `rak_accounts_kyc_id_numbers_read`), so a restricted key is checked by listing one object of
//! each kind billing reads or writes (a write permission includes the read one); a secret key
//! and a Connect account are checked with `GET /v1/account`, which names the account.

use serde_json::Value;

use crate::stripe_api::{Credentials, List, StripeApi, StripeApiError};

/// The restricted key's permissions billing needs, as the README lists them: (the Dashboard's
/// resource, Stripe's permission name, the list call checking it).
pub const RESTRICTED_KEY_PERMISSIONS: &[(&str, &str, &str)] = &[
    ("Billing meters: Write", "rak_billing_meter_write", "/billing/meters"),
    ("Billing meter events: Write", "rak_billing_meter_event_write", ""),
    ("Customers: Write", "rak_customer_write", "/customers"),
    ("Products: Write", "rak_product_write", "/products"),
    ("Prices: Write", "rak_plan_write", "/prices"),
    ("Subscriptions: Write", "rak_subscription_write", "/subscriptions"),
    ("Invoices: Write", "rak_invoice_write", "/invoices"),
    ("Invoice items: Write", "rak_invoiceitem_write", "/invoiceitems"),
    ("SetupIntents: Read", "rak_setup_intent_read", "/setup_intents"),
];

/// What a passing check found, or why it failed (Stripe's message names a missing permission:
/// "Having the 'rak_…' permission would allow this request to continue").
pub async fn check(api: &StripeApi, credentials: &Credentials, livemode: bool) -> Result<String, String> {
    use secrecy::ExposeSecret;
    let mode = if livemode { "live" } else { "test" };
    let restricted = credentials.account.is_none() && credentials.key.expose_secret().starts_with("rk_");
    if !restricted {
        let account = api.account(credentials).await.map_err(|e| e.to_string())?;
        return Ok(format!("account {} ({mode} mode)", account.id));
    }
    let mut reached = Vec::new();
    for (resource, _, path) in RESTRICTED_KEY_PERMISSIONS.iter().filter(|(_, _, path)| !path.is_empty()) {
        match api.get::<List<Value>>(credentials, path, &[("limit", "1".to_owned())]).await {
            Ok(_) => reached.push(path.trim_start_matches('/')),
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

//! How the fake's customers pay: a subscription's collection method, Checkout sessions in
//! setup mode, customer portal sessions, and paying an invoice.
//!
//! Rules, from Stripe's API reference and stripe-node's generated types (stripe@20,
//! `types/SubscriptionsResource.d.ts`, `types/Checkout/SessionsResource.d.ts`,
//! `types/BillingPortal/SessionsResource.d.ts`, `types/Checkout/Sessions.d.ts`,
//! `types/BillingPortal/Sessions.d.ts`):
//!
//! - `collection_method` is `charge_automatically` (the default) or `send_invoice`;
//!   `days_until_due` is "Valid only for subscriptions where `collection_method` is set to
//!   `send_invoice`" (refused with `charge_automatically`), and Stripe needs it to send one
//!   (https://docs.stripe.com/api/subscriptions/create#create_subscription-days_until_due,
//!   https://docs.stripe.com/invoicing/integration#accept-invoice-payment: a sent invoice needs
//!   a due date): refused as missing with `send_invoice`;
//! - a Checkout session: `mode` is "Required when using prices or `setup` mode"; `currency` is
//!   "Required in `setup` mode when `payment_method_types` is not set"; `success_url` is needed
//!   for a hosted session ("not allowed if ui_mode is `embedded` or `custom`", so required for
//!   the default `hosted`); `cancel_url` is optional; `customer` must exist. The answer is a
//!   `Checkout.Session` (`cs_test_…`, `object: "checkout.session"`, `status: "open"`, `url`,
//!   `setup_intent`, `expires_at` 24 hours on), with the fields that are not nullable in
//!   stripe-node's `Checkout.Session` (https://docs.stripe.com/api/checkout/sessions/object), which
//!   async-stripe 1.0.0-rc.10's `stripe_shared::CheckoutSession` needs: `automatic_tax.enabled`,
//!   `custom_fields`, `custom_text`, `shipping_options`;
//! - a portal session: `customer` must exist; `return_url` is optional; without a
//!   `configuration` the account's default one is used, which exists only once the portal
//!   settings were saved in the Dashboard — otherwise Stripe answers 400 "No configuration
//!   provided and your test mode default configuration has not been created"
//!   (https://docs.stripe.com/customer-management/activate-no-code-customer-portal). The answer
//!   is a `BillingPortal.Session` (`bps_…`, `url`, `return_url`, `configuration`);
//! - an invoice is paid on its hosted page (`send_invoice`), or charged at finalization when
//!   the customer has a default payment method for invoices (`charge_automatically`,
//!   `invoice_settings.default_payment_method`, which the portal sets when the customer adds a
//!   card there);
//! - completing a setup session makes a SetupIntent (`seti_…`, `status: "succeeded"`, its
//!   `payment_method`) and attaches the payment method to the session's customer, without
//!   making it the default: "If present, the SetupIntent's payment method will be attached to
//!   the Customer on successful setup" (the SetupIntent object, `customer`);
//! - Stripe Tax (`automatic_tax[enabled]=true` on a subscription or invoice) needs the
//!   customer's location: "Stripe Tax requires your customer's location to automatically
//!   calculate tax … set tax[validate_location]=“immediately” to prevent
//!   customer_tax_location_invalid errors later" (https://docs.stripe.com/tax/customer-locations);
//!   the fake refuses such a subscription (and finalizing such an invoice) with that code while
//!   the customer has no address with a country. A setup session with
//!   `billing_address_collection=required` and `customer_update[address]=auto` saves the address
//!   the customer types to the customer ("Checkout handles the collection of customer
//!   addresses for you");
//! - `POST /v1/customers/{id}` updates a customer; `invoice_settings[default_payment_method]`
//!   must name a payment method attached to that customer, else Stripe answers 400 "No such
//!   PaymentMethod" (`resource_missing`, param `invoice_settings[default_payment_method]`).

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

use super::{FakeStripe, Form, Shared, find, invalid, missing, no_such, now, request, text, with_param};

/// A subscription's `collection_method` and `days_until_due` from its parameters, or Stripe's
/// refusal.
pub(super) fn collection(params: &Value) -> Result<(&'static str, Option<i64>), (StatusCode, Value)> {
    let method = match text(params, "collection_method") {
        None | Some("charge_automatically") => "charge_automatically",
        Some("send_invoice") => "send_invoice",
        Some(other) => {
            return Err(invalid(
                "collection_method",
                None,
                &format!(
                    "Invalid collection_method: must be one of charge_automatically or send_invoice (got {other})"
                ),
            ));
        }
    };
    let days = match text(params, "days_until_due") {
        None => None,
        Some(days) => match days.parse::<i64>() {
            Ok(days) if days >= 0 => Some(days),
            _ => {
                return Err(invalid(
                    "days_until_due",
                    Some("parameter_invalid_integer"),
                    "Invalid integer: days_until_due",
                ));
            }
        },
    };
    match (method, days) {
        ("charge_automatically", Some(_)) => Err(invalid(
            "days_until_due",
            None,
            "days_until_due can only be set when collection_method is send_invoice.",
        )),
        ("send_invoice", None) => Err(missing("days_until_due")),
        (method, days) => Ok((method, days)),
    }
}

pub(super) async fn create_checkout_session(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    form: Form,
) -> Response {
    request(&inner, method, &uri, &headers, form.0, |inner, account, params| {
        let Some(mode) = text(params, "mode") else { return missing("mode") };
        if !matches!(mode, "payment" | "setup" | "subscription") {
            return invalid("mode", None, "Invalid mode: must be one of payment, setup or subscription");
        }
        if mode != "setup" {
            return invalid("mode", None, "The fake makes Checkout sessions in setup mode only.");
        }
        let types_given = params.get("payment_method_types").is_some();
        let currency = text(params, "currency");
        if currency.is_none() && !types_given {
            return invalid(
                "currency",
                Some("parameter_missing"),
                "Missing required param: currency. It is required in setup mode when payment_method_types is not set.",
            );
        }
        let Some(success_url) = text(params, "success_url") else { return missing("success_url") };
        for (name, url) in [("success_url", Some(success_url)), ("cancel_url", text(params, "cancel_url"))] {
            if let Some(url) = url
                && reqwest::Url::parse(url).is_err()
            {
                return invalid(name, Some("url_invalid"), &format!("Not a valid URL: {name}"));
            }
        }
        let Some(customer) = text(params, "customer") else { return missing("customer") };
        let data = inner.accounts.entry(account.to_owned()).or_default();
        if find(&data.customers, customer).is_none() {
            return with_param(no_such("customer", customer), "customer");
        }
        let address_collection = text(params, "billing_address_collection").unwrap_or("auto");
        if !matches!(address_collection, "auto" | "required") {
            return invalid(
                "billing_address_collection",
                None,
                "Invalid billing_address_collection: must be one of auto or required",
            );
        }
        let update_address = params["customer_update"]["address"].as_str().unwrap_or("never");
        if !matches!(update_address, "auto" | "never") {
            return invalid(
                "customer_update[address]",
                None,
                "Invalid customer_update[address]: must be auto or never",
            );
        }
        let (id, setup_intent) = (format!("cs_test_{}", inner.id("a1")), inner.id("seti"));
        let created = now();
        let session = json!({
            "id": id, "object": "checkout.session", "mode": "setup", "status": "open", "ui_mode": "hosted",
            "url": format!("https://checkout.stripe.com/c/pay/{id}"), "customer": customer,
            "currency": currency.map(str::to_ascii_lowercase), "success_url": success_url,
            "cancel_url": text(params, "cancel_url"), "setup_intent": setup_intent,
            "payment_status": "no_payment_required", "payment_intent": null, "subscription": null,
            "payment_method_types": params.get("payment_method_types").cloned().unwrap_or_else(|| json!(["card"])),
            "created": created, "expires_at": created + 24 * 3_600, "livemode": false,
            "metadata": super::metadata(params), "client_reference_id": null, "customer_email": null,
            "amount_total": null, "amount_subtotal": null, "locale": null,
            "billing_address_collection": address_collection,
            "customer_update": {"address": update_address},
            "automatic_tax": {"enabled": false, "liability": null, "provider": null, "status": null},
            "custom_fields": [], "shipping_options": [],
            "custom_text": {"after_submit": null, "shipping_address": null, "submit": null,
                            "terms_of_service_acceptance": null},
        });
        inner.accounts.entry(account.to_owned()).or_default().checkout_sessions.push(session.clone());
        (StatusCode::OK, session)
    })
}

pub(super) async fn create_portal_session(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    form: Form,
) -> Response {
    request(&inner, method, &uri, &headers, form.0, |inner, account, params| {
        let Some(customer) = text(params, "customer") else { return missing("customer") };
        let return_url = text(params, "return_url");
        if let Some(url) = return_url
            && reqwest::Url::parse(url).is_err()
        {
            return invalid("return_url", Some("url_invalid"), "Not a valid URL: return_url");
        }
        let data = inner.accounts.entry(account.to_owned()).or_default();
        if find(&data.customers, customer).is_none() {
            return with_param(no_such("customer", customer), "customer");
        }
        if text(params, "configuration").is_none() && !data.portal_configured {
            return invalid(
                "configuration",
                None,
                "No configuration provided and your test mode default configuration has not been created. Provide a \
                 configuration or create your default by saving your customer portal settings in test mode at \
                 https://dashboard.stripe.com/test/settings/billing/portal.",
            );
        }
        let id = inner.id("bps");
        let session = json!({
            "id": id, "object": "billing_portal.session", "created": now(), "customer": customer,
            "configuration": text(params, "configuration").unwrap_or("bpc_fakedefault"), "flow": null,
            "livemode": false, "locale": null, "on_behalf_of": null, "return_url": return_url,
            "url": format!("https://billing.stripe.com/p/session/test_{id}"),
        });
        inner.accounts.entry(account.to_owned()).or_default().portal_sessions.push(session.clone());
        (StatusCode::OK, session)
    })
}

impl FakeStripe {
    /// Saves the account's customer portal settings (its default configuration), as a tenant
    /// does once in Stripe's Dashboard before portal sessions can be made.
    pub fn save_portal_settings(&self, account: &str) {
        self.inner.lock().unwrap().accounts.entry(account.to_owned()).or_default().portal_configured = true;
    }

    /// The Checkout sessions made on `account`.
    pub fn checkout_sessions(&self, account: &str) -> Vec<Value> {
        self.objects(account, |a| &a.checkout_sessions)
    }

    /// The customer portal sessions made on `account`.
    pub fn portal_sessions(&self, account: &str) -> Vec<Value> {
        self.objects(account, |a| &a.portal_sessions)
    }

    /// The customer saves a card as its default payment method for invoices (as the portal
    /// does when a card is added there); returns the payment method's id.
    pub fn save_default_payment_method(&self, account: &str, customer: &str) -> String {
        let mut inner = self.inner.lock().unwrap();
        let pm = inner.id("pm");
        let data = inner.accounts.entry(account.to_owned()).or_default();
        if let Some(c) = data.customers.iter_mut().find(|c| c["id"] == customer) {
            c["invoice_settings"] = json!({"default_payment_method": pm, "custom_fields": null, "footer": null});
        }
        pm
    }

    /// Whether `customer` has a default payment method for invoices.
    pub(super) fn can_be_charged(data_customers: &[Value], customer: &str) -> bool {
        data_customers
            .iter()
            .any(|c| c["id"] == customer && c["invoice_settings"]["default_payment_method"].is_string())
    }

    /// The customer pays open invoice `id` (on its hosted page); returns the paid invoice, or
    /// `None` if there is no open invoice with that id.
    pub fn pay_invoice(&self, account: &str, id: &str) -> Option<Value> {
        let mut inner = self.inner.lock().unwrap();
        let invoice = inner.accounts.get_mut(account)?.invoices.iter_mut().find(|i| i["id"] == id)?;
        if invoice["status"] != "open" {
            return None;
        }
        mark_paid(invoice);
        Some(invoice.clone())
    }
}

/// An invoice paid in full now.
pub(super) fn mark_paid(invoice: &mut Value) {
    invoice["status"] = json!("paid");
    invoice["amount_paid"] = invoice["amount_due"].clone();
    invoice["amount_remaining"] = json!(0);
    invoice["attempted"] = json!(true);
    invoice["attempt_count"] = json!(invoice["attempt_count"].as_i64().unwrap_or(0).max(1));
    invoice["next_payment_attempt"] = Value::Null;
    invoice["status_transitions"]["paid_at"] = json!(now());
}

pub(super) async fn get_setup_intent(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    super::get_object(&inner, method, &uri, &headers, &id, "setup_intent", |a| &a.setup_intents)
}

pub(super) async fn update_customer(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
    form: Form,
) -> Response {
    request(&inner, method, &uri, &headers, form.0, |inner, account, params| {
        let data = inner.accounts.entry(account.to_owned()).or_default();
        let default = params["invoice_settings"]["default_payment_method"].as_str().map(str::to_owned);
        if let Some(pm) = &default
            && !data.payment_methods.iter().any(|m| m["id"] == pm.as_str() && m["customer"] == id.as_str())
        {
            return with_param(no_such("PaymentMethod", pm), "invoice_settings[default_payment_method]");
        }
        let Some(customer) = data.customers.iter_mut().find(|c| c["id"] == id.as_str()) else {
            return no_such("customer", &id);
        };
        if let Some(pm) = default {
            customer["invoice_settings"] = json!({"default_payment_method": pm, "custom_fields": null, "footer": null});
        }
        if let Some(email) = text(params, "email") {
            customer["email"] = json!(email);
        }
        (StatusCode::OK, customer.clone())
    })
}

impl FakeStripe {
    /// The customer completes setup session `id` (saves a card on Checkout's page); returns the
    /// completed session, as `checkout.session.completed` carries it.
    pub fn complete_checkout_session(&self, account: &str, id: &str) -> Option<Value> {
        let mut inner = self.inner.lock().unwrap();
        let pm = inner.id("pm");
        let data = inner.accounts.get_mut(account)?;
        let session = data.checkout_sessions.iter_mut().find(|s| s["id"] == id && s["status"] == "open")?;
        session["status"] = json!("complete");
        session["url"] = Value::Null;
        let session = session.clone();
        let customer = session["customer"].clone();
        // The customer typed a billing address on Checkout's page; saved to it when asked.
        if session["billing_address_collection"] == "required" && session["customer_update"]["address"] == "auto" {
            let address = json!({"country": "DE", "postal_code": "10115", "city": "Berlin", "line1": "Invalidenstraße 1",
                                 "line2": null, "state": null});
            if let Some(c) = data.customers.iter_mut().find(|c| c["id"] == customer) {
                c["address"] = address;
            }
        }
        data.payment_methods.push(json!({
            "id": pm, "object": "payment_method", "type": "card", "customer": customer, "created": now(),
            "livemode": false, "card": {"brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2030},
        }));
        data.setup_intents.push(json!({
            "id": session["setup_intent"], "object": "setup_intent", "status": "succeeded", "customer": customer,
            "payment_method": pm, "usage": "off_session", "created": now(), "livemode": false,
            "payment_method_types": ["card"], "metadata": {}, "last_setup_error": null, "next_action": null,
            "client_secret": null, "description": null, "cancellation_reason": null, "application": null,
            "attach_to_self": null, "automatic_payment_methods": null, "flow_directions": null,
            "latest_attempt": null, "mandate": null, "on_behalf_of": null, "payment_method_configuration_details": null,
            "payment_method_options": null, "single_use_mandate": null, "allowed_payment_method_types": null,
            "customer_account": null, "excluded_payment_method_types": null, "managed_payments": null,
        }));
        Some(session)
    }

    /// `customer`'s default payment method for invoices, if it has one.
    pub fn default_payment_method(&self, account: &str, customer: &str) -> Option<String> {
        let inner = self.inner.lock().unwrap();
        let found = inner.accounts.get(account)?.customers.iter().find(|c| c["id"] == customer)?;
        found["invoice_settings"]["default_payment_method"].as_str().map(str::to_owned)
    }
}

/// Stripe's refusal of automatic tax for `customer` while its location is unknown (no address
/// with a country), or `None`.
pub(super) fn tax_location_refusal(data: &super::Account, customer: &str) -> Option<(StatusCode, Value)> {
    let known = data.customers.iter().any(|c| c["id"] == customer && c["address"]["country"].is_string());
    (!known).then(|| {
        invalid(
            "automatic_tax[enabled]",
            Some("customer_tax_location_invalid"),
            "The customer's location isn't recognized. Set a valid customer address in order to automatically \
             calculate tax.",
        )
    })
}

//! The fake's invoices: what a customer is actually charged. Stripe bills a metered price in
//! arrears: when a subscription's period ends it makes a draft invoice for that period, keeps
//! it a draft for the finalization grace period (an hour by default, up to 72 hours) while
//! late usage for the period may still arrive, then finalizes it with the meter's usage whose
//! timestamp falls inside the period — usage that arrives later, or that falls outside every
//! period of a subscription (before it started, after it was canceled), is on no invoice.
//! (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage,
//! https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period,
//! https://docs.stripe.com/billing/invoices/subscription#subscription-renewal.)
//!
//! Each metered line is `quantity × unit_amount_decimal`, rounded half up to the currency's
//! minor unit once per line (https://docs.stripe.com/products-prices/pricing-models#usage-based-pricing
//! and stripe-node's `InvoiceLineItem.amount`: "The amount, in cents").
//!
//! Tests end periods and finalize invoices themselves (`end_periods`, `finalize_invoices`), so
//! a month and its grace period take as long as the test wants; the invoices' shape follows
//! stripe-node's `Invoice` type (API 2025-03-31.basil and later: the subscription is under
//! `parent.subscription_details`, a line's price under `pricing.price_details`), with every
//! field that is not nullable there present (https://docs.stripe.com/api/invoices/object;
//! async-stripe 1.0.0-rc.10 `stripe_shared::Invoice` and `InvoiceLineItem`, generated from
//! Stripe's OpenAPI spec, refuse an invoice without them: `amount_overpaid`, `amount_shipping`,
//! `automatic_tax.enabled`, `default_tax_rates`, `discounts`, `issuer.type`,
//! `payment_settings`, `post_payment_credit_notes_amount`, `pre_payment_credit_notes_amount`,
//! `starting_balance`; a line's `discountable`, `discounts`, `metadata`, `subtotal`).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use serde_json::{Value, json};

use super::{FakeStripe, MeterEvent, Shared, get_object, now};

/// `GET /v1/invoices/{id}` (https://docs.stripe.com/api/invoices/retrieve).
pub(super) async fn get_invoice(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    get_object(&inner, method, &uri, &headers, &id, "invoice", |a| &a.invoices)
}

/// `quantity × unit_amount_decimal`, rounded half up to a whole minor unit.
pub fn line_amount(quantity: i64, unit_amount_decimal: &str) -> i64 {
    let (whole, fraction) = unit_amount_decimal.split_once('.').unwrap_or((unit_amount_decimal, ""));
    let scale = 10_i128.pow(u32::try_from(fraction.len()).unwrap_or(0));
    let numerator: i128 = format!("{whole}{fraction}").parse().unwrap_or(0);
    let exact = i128::from(quantity) * numerator;
    i64::try_from((2 * exact + scale) / (2 * scale)).unwrap_or(i64::MAX)
}

impl FakeStripe {
    /// Ends the current period of every active subscription on `account` now: a draft invoice
    /// per subscription for `[current_period_start, now)`, and the next period begins.
    /// Returns the drafts' ids.
    pub fn end_periods(&self, account: &str) -> Vec<String> {
        let mut inner = self.inner.lock().unwrap();
        let end = now();
        let active: Vec<Value> = inner
            .accounts
            .get(account)
            .map(|a| a.subscriptions.iter().filter(|s| s["status"] == "active").cloned().collect())
            .unwrap_or_default();
        let mut drafts = Vec::new();
        for subscription in active {
            let id = inner.id("in");
            let item = &subscription["items"]["data"][0];
            let start = item["current_period_start"].as_i64().unwrap_or(end);
            let invoice = json!({
                "id": id, "object": "invoice", "customer": subscription["customer"], "status": "draft",
                "currency": subscription["currency"], "collection_method": subscription["collection_method"],
                "period_start": start, "period_end": end, "created": end, "livemode": false,
                "billing_reason": "subscription_cycle", "auto_advance": true,
                "parent": {"type": "subscription_details", "quote_details": null,
                           "subscription_details": {"subscription": subscription["id"], "metadata": subscription["metadata"]}},
                "amount_due": 0, "amount_paid": 0, "amount_remaining": 0, "subtotal": 0, "total": 0,
                "attempted": false, "attempt_count": 0, "next_payment_attempt": null,
                "hosted_invoice_url": null, "number": null, "due_date": null,
                "status_transitions": {"finalized_at": null, "paid_at": null, "voided_at": null,
                                       "marked_uncollectible_at": null},
                "lines": {"object": "list", "has_more": false, "data": [],
                          "url": format!("/v1/invoices/{id}/lines")},
                "metadata": {},
                "amount_overpaid": 0, "amount_shipping": 0, "starting_balance": 0, "ending_balance": null,
                "post_payment_credit_notes_amount": 0, "pre_payment_credit_notes_amount": 0,
                "automatic_tax": {"enabled": false, "disabled_reason": null, "liability": null,
                                  "provider": null, "status": null},
                "default_tax_rates": [], "discounts": [], "issuer": {"type": "self"},
                "payment_settings": {"default_mandate": null, "payment_method_options": null,
                                     "payment_method_types": null},
            });
            let data = inner.accounts.entry(account.to_owned()).or_default();
            data.invoices.push(invoice);
            if let Some(s) = data.subscriptions.iter_mut().find(|s| s["id"] == subscription["id"]) {
                s["items"]["data"][0]["current_period_start"] = json!(end);
                s["items"]["data"][0]["current_period_end"] = json!(end + 30 * 86_400);
                s["latest_invoice"] = json!(id);
            }
            drafts.push(id);
        }
        drafts
    }

    /// Finalizes every draft invoice on `account` (its grace period is over): its metered line
    /// counts the meter events received until now whose timestamp is inside the invoice's
    /// period. Returns the finalized invoices.
    pub fn finalize_invoices(&self, account: &str) -> Vec<Value> {
        let mut inner = self.inner.lock().unwrap();
        let Some(data) = inner.accounts.get_mut(account) else { return Vec::new() };
        let finalized_at = now();
        let mut finalized = Vec::new();
        for index in 0..data.invoices.len() {
            if data.invoices[index]["status"] != "draft" {
                continue;
            }
            let invoice = &data.invoices[index];
            let subscription_id = invoice["parent"]["subscription_details"]["subscription"].clone();
            let Some(subscription) = data.subscriptions.iter().find(|s| s["id"] == subscription_id) else { continue };
            let price = subscription["items"]["data"][0]["price"].clone();
            // A sent invoice is due `days_until_due` days after it is finalized.
            let due_date = subscription["days_until_due"].as_i64().map(|days| finalized_at + days * 86_400);
            let meter = price["recurring"]["meter"].as_str().unwrap_or_default();
            let event_name = data.meters.iter().find(|m| m["id"] == meter).map(|m| m["event_name"].clone());
            let customer = invoice["customer"].as_str().unwrap_or_default();
            let (start, end) =
                (invoice["period_start"].as_i64().unwrap_or(0), invoice["period_end"].as_i64().unwrap_or(0));
            let in_period = |e: &&MeterEvent| {
                Some(json!(e.event_name)) == event_name
                    && e.stripe_customer_id == customer
                    && e.timestamp >= start
                    && e.timestamp < end
            };
            let quantity: i64 = data.meter_events.iter().filter(in_period).map(|e| e.value).sum();
            let unit = price["unit_amount_decimal"].as_str().unwrap_or("0").to_owned();
            let amount = line_amount(quantity, &unit);
            let id = invoice["id"].as_str().unwrap_or_default().to_owned();
            let line = json!({
                "id": format!("il_{id}"), "object": "line_item", "amount": amount, "currency": price["currency"],
                "quantity": quantity, "period": {"start": start, "end": end}, "invoice": id,
                "pricing": {"type": "price_details", "unit_amount_decimal": unit,
                            "price_details": {"price": price["id"], "product": price["product"]}},
                "description": "Metered usage", "livemode": false, "subtotal": amount,
                "discountable": true, "discounts": [], "metadata": {},
            });
            // Charging automatically: Stripe attempts payment with the customer's default
            // payment method when the invoice is finalized (see `payments`).
            let charge = invoice["collection_method"] == "charge_automatically"
                && FakeStripe::can_be_charged(&data.customers, customer);
            let invoice = &mut data.invoices[index];
            invoice["lines"]["data"] = json!([line]);
            for field in ["amount_due", "amount_remaining", "subtotal", "total"] {
                invoice[field] = json!(amount);
            }
            invoice["status"] = json!(if amount == 0 { "paid" } else { "open" });
            if charge && amount > 0 {
                super::payments::mark_paid(invoice);
            }
            invoice["number"] = json!(format!("FAKE-{}", &id[id.len() - 4..]));
            invoice["hosted_invoice_url"] = json!(format!("https://invoice.stripe.com/i/{id}"));
            invoice["status_transitions"]["finalized_at"] = json!(finalized_at);
            invoice["due_date"] = json!(due_date);
            finalized.push(invoice.clone());
        }
        finalized
    }

    /// Every invoice on `account`, oldest first.
    pub fn invoices(&self, account: &str) -> Vec<Value> {
        self.inner.lock().unwrap().accounts.get(account).map(|a| a.invoices.clone()).unwrap_or_default()
    }

    /// What `customer` was charged on finalized invoices: the sum of their metered lines.
    pub fn invoiced(&self, account: &str, customer: &str) -> i64 {
        self.invoices(account)
            .iter()
            .filter(|i| i["customer"] == customer && i["status"] != "draft")
            .map(|i| i["total"].as_i64().unwrap_or(0))
            .sum()
    }

    /// The usage inside finalized invoices' periods for `customer`, in meter units.
    pub fn invoiced_quantity(&self, account: &str, customer: &str) -> i64 {
        self.invoices(account)
            .iter()
            .filter(|i| i["customer"] == customer && i["status"] != "draft")
            .flat_map(|i| i["lines"]["data"].as_array().cloned().unwrap_or_default())
            .map(|l| l["quantity"].as_i64().unwrap_or(0))
            .sum()
    }
}

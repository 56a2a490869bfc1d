//! Invoicing by hand: invoice items, invoices made through the API, finalizing them, and
//! deleting a customer.
//!
//! Rules, from Stripe's API reference and stripe-node's generated types (stripe@20,
//! `types/InvoiceItemsResource.d.ts`, `types/InvoicesResource.d.ts`,
//! `types/CustomersResource.d.ts`):
//!
//! - an invoice item needs a `customer` that exists (a deleted one is "No such customer") and
//!   an amount: `amount` (an integer in the currency's smallest unit), or `pricing`/`price_data`
//!   — the fake takes `amount` only and refuses an item with none. It waits, pending
//!   (`invoice: null`), for an invoice to take it;
//! - an invoice made with `POST /v1/invoices` takes the customer's pending items only with
//!   `pending_invoice_items_behavior=include`: "Defaults to `exclude` if the parameter is
//!   omitted" (`InvoiceCreateParams.pending_invoice_items_behavior`); only items in the
//!   invoice's currency are taken; `collection_method` and `days_until_due` follow the
//!   subscription's rules (`payments::collection`: `send_invoice` needs `days_until_due`);
//! - `POST /v1/invoices/{id}/finalize` turns a draft into an open invoice (paid at once when
//!   it is for nothing, or charged when collected automatically from a customer with a default
//!   payment method); finalizing one that is not a draft is refused (400);
//! - `DELETE /v1/customers/{id}` deletes the customer and cancels its subscriptions; the
//!   answer is `{id, object: "customer", deleted: true}` and the customer is gone from every
//!   other call.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

use super::{FakeStripe, Form, Shared, find, invalid, metadata, missing, no_such, now, request, text, with_param};

pub(super) async fn create_invoice_item(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    form: Form,
) -> Response {
    request(&inner, method, &uri, &headers, form.0, |inner, account, params| {
        let Some(customer) = text(params, "customer") else { return missing("customer") };
        let Some(amount) = text(params, "amount") else {
            return invalid(
                "amount",
                Some("parameter_missing"),
                "You must specify either amount, pricing, or price_data.",
            );
        };
        let Ok(amount) = amount.parse::<i64>() else {
            return invalid("amount", Some("parameter_invalid_integer"), "Invalid integer: amount");
        };
        let data = inner.accounts.entry(account.to_owned()).or_default();
        let Some(customer_object) = find(&data.customers, customer) else {
            return with_param(no_such("customer", customer), "customer");
        };
        let currency = text(params, "currency")
            .map(str::to_owned)
            .or_else(|| customer_object["currency"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "usd".to_owned());
        let id = inner.id("ii");
        let created = now();
        let item = json!({
            "id": id, "object": "invoiceitem", "customer": customer, "amount": amount, "currency": currency,
            "description": text(params, "description"), "invoice": null, "date": created, "livemode": false,
            "metadata": metadata(params), "period": {"start": created, "end": created}, "quantity": 1,
            "proration": false, "discountable": true, "pricing": null, "parent": null, "discounts": [],
            "tax_rates": [], "test_clock": null, "customer_account": null, "frozen_fields": null,
            "invoicing_rules": null, "net_amount": amount, "proration_details": null, "quantity_decimal": "1",
        });
        inner.accounts.entry(account.to_owned()).or_default().invoice_items.push(item.clone());
        (StatusCode::OK, item)
    })
}

pub(super) async fn create_invoice(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    form: Form,
) -> Response {
    request(&inner, method, &uri, &headers, form.0, |inner, account, params| {
        let Some(customer) = text(params, "customer") else { return missing("customer") };
        let (collection_method, days_until_due) = match super::payments::collection(params) {
            Ok(collection) => collection,
            Err(refusal) => return refusal,
        };
        let include = match text(params, "pending_invoice_items_behavior") {
            None | Some("exclude") => false,
            Some("include") => true,
            Some(other) => {
                return invalid(
                    "pending_invoice_items_behavior",
                    None,
                    &format!("Invalid pending_invoice_items_behavior: must be one of exclude or include (got {other})"),
                );
            }
        };
        let data = inner.accounts.entry(account.to_owned()).or_default();
        if find(&data.customers, customer).is_none() {
            return with_param(no_such("customer", customer), "customer");
        }
        let currency = text(params, "currency").unwrap_or("usd").to_owned();
        let automatic_tax = params["automatic_tax"]["enabled"] == "true";
        let id = inner.id("in");
        let data = inner.accounts.entry(account.to_owned()).or_default();
        let mut lines = Vec::new();
        if include {
            for item in data
                .invoice_items
                .iter_mut()
                .filter(|i| i["customer"] == customer && i["invoice"].is_null() && i["currency"] == currency.as_str())
            {
                item["invoice"] = json!(id);
                lines.push(json!({
                    "id": format!("il_{}", item["id"].as_str().unwrap_or_default()), "object": "line_item",
                    "amount": item["amount"], "currency": item["currency"], "description": item["description"],
                    "quantity": 1, "invoice": id, "livemode": false, "metadata": item["metadata"],
                    "period": item["period"], "pricing": null, "subtotal": item["amount"], "discountable": true,
                    "discounts": [],
                    "parent": {"type": "invoice_item_details",
                               "invoice_item_details": {"invoice_item": item["id"], "proration": false}},
                }));
            }
        }
        let total: i64 = lines.iter().filter_map(|l| l["amount"].as_i64()).sum();
        let created = now();
        let invoice = json!({
            "id": id, "object": "invoice", "customer": customer, "status": "draft", "currency": currency,
            "collection_method": collection_method, "days_until_due": days_until_due,
            "period_start": created, "period_end": created, "created": created, "livemode": false,
            "billing_reason": "manual", "auto_advance": text(params, "auto_advance") == Some("true"), "parent": null,
            "automatic_tax": {"enabled": automatic_tax, "status": null, "liability": null, "disabled_reason": null,
                              "provider": null},
            "amount_due": total, "amount_paid": 0, "amount_remaining": total, "subtotal": total, "total": total,
            "attempted": false, "attempt_count": 0, "next_payment_attempt": null,
            "hosted_invoice_url": null, "number": null, "due_date": null,
            "status_transitions": {"finalized_at": null, "paid_at": null, "voided_at": null,
                                   "marked_uncollectible_at": null},
            "lines": {"object": "list", "has_more": false, "data": lines, "url": format!("/v1/invoices/{id}/lines")},
            "metadata": metadata(params),
        });
        // The fields `stripe_shared::Invoice` needs (see `invoices`), apart: one `json!` of all
        // of them is past the macro's recursion limit.
        let more = json!({
            "amount_overpaid": 0, "amount_shipping": 0, "starting_balance": 0, "ending_balance": null,
            "post_payment_credit_notes_amount": 0, "pre_payment_credit_notes_amount": 0,
            "default_tax_rates": [], "discounts": [], "issuer": {"type": "self"},
            "payment_settings": {"default_mandate": null, "payment_method_options": null,
                                 "payment_method_types": null},
        });
        let mut invoice = invoice;
        if let (Some(fields), Some(extra)) = (invoice.as_object_mut(), more.as_object()) {
            fields.extend(extra.clone());
        }
        data.invoices.push(invoice.clone());
        (StatusCode::OK, invoice)
    })
}

pub(super) async fn finalize_invoice(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Form,
) -> Response {
    request(&inner, method, &uri, &headers, form.0, |inner, account, _| {
        let data = inner.accounts.entry(account.to_owned()).or_default();
        let charge = data.invoices.iter().find(|i| i["id"] == id.as_str()).is_some_and(|i| {
            i["collection_method"] == "charge_automatically"
                && FakeStripe::can_be_charged(&data.customers, i["customer"].as_str().unwrap_or_default())
        });
        let taxed =
            data.invoices.iter().find(|i| i["id"] == id.as_str()).map(|i| {
                (i["automatic_tax"]["enabled"] == true, i["customer"].as_str().unwrap_or_default().to_owned())
            });
        if let Some((true, customer)) = &taxed
            && let Some(refusal) = super::payments::tax_location_refusal(data, customer)
        {
            return refusal;
        }
        let Some(invoice) = data.invoices.iter_mut().find(|i| i["id"] == id.as_str()) else {
            return no_such("invoice", &id);
        };
        if invoice["status"] != "draft" {
            let status = invoice["status"].as_str().unwrap_or_default().to_owned();
            return invalid(
                "invoice",
                Some("invoice_not_editable"),
                &format!("This invoice is already finalized (its status is {status})."),
            );
        }
        finalize(invoice, charge);
        (StatusCode::OK, invoice.clone())
    })
}

/// A draft made final now: open (or paid, when it is for nothing or charged at once).
pub(super) fn finalize(invoice: &mut Value, charge: bool) {
    let finalized_at = now();
    let id = invoice["id"].as_str().unwrap_or_default().to_owned();
    let amount = invoice["amount_due"].as_i64().unwrap_or(0);
    invoice["status"] = json!(if amount == 0 { "paid" } else { "open" });
    invoice["number"] = json!(format!("FAKE-{}", &id[id.len().saturating_sub(4)..]));
    invoice["hosted_invoice_url"] = json!(format!("https://invoice.stripe.com/i/acct_fake/test_{id}"));
    invoice["status_transitions"]["finalized_at"] = json!(finalized_at);
    if let Some(days) = invoice["days_until_due"].as_i64() {
        invoice["due_date"] = json!(finalized_at + days * 86_400);
    }
    if charge && amount > 0 {
        super::payments::mark_paid(invoice);
    }
}

pub(super) async fn delete_customer(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    request(&inner, method, &uri, &headers, vec![], |inner, account, _| {
        let data = inner.accounts.entry(account.to_owned()).or_default();
        if !delete(data, &id) {
            return no_such("customer", &id);
        }
        (StatusCode::OK, json!({"id": id, "object": "customer", "deleted": true}))
    })
}

/// Deletes the customer and cancels its subscriptions; false if there is no such customer.
fn delete(data: &mut super::Account, id: &str) -> bool {
    let before = data.customers.len();
    data.customers.retain(|c| c["id"] != id);
    if data.customers.len() == before {
        return false;
    }
    for subscription in data.subscriptions.iter_mut().filter(|s| s["customer"] == id) {
        subscription["status"] = json!("canceled");
        subscription["canceled_at"] = json!(now());
    }
    true
}

impl FakeStripe {
    /// The tenant deletes `customer` in Stripe's Dashboard; returns the deleted customer as
    /// the `customer.deleted` event carries it, or `None` if there is no such customer.
    pub fn delete_customer(&self, account: &str, customer: &str) -> Option<Value> {
        let mut inner = self.inner.lock().unwrap();
        let data = inner.accounts.entry(account.to_owned()).or_default();
        let object = find(&data.customers, customer)?;
        delete(data, customer).then_some(object)
    }

    /// The invoice items made on `account`.
    pub fn invoice_items(&self, account: &str) -> Vec<Value> {
        self.objects(account, |a| &a.invoice_items)
    }
}

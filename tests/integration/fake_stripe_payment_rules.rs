//! The fake Stripe's payment rules (`fake_stripe::payments`), checked over plain HTTP: a
//! subscription's collection method, Checkout sessions in setup mode, customer portal
//! sessions, and invoices reaching `paid` by either collection method.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::fake_stripe::FakeStripe;
use crate::helpers::PlainCase;
use crate::plain_cases;

pub fn cases() -> Vec<PlainCase> {
    plain_cases![
        fake_stripe_subscriptions_take_a_collection_method_with_days_until_due_only_for_sent_invoices,
        fake_stripe_checkout_setup_sessions_need_a_currency_urls_and_an_existing_customer,
        fake_stripe_portal_sessions_need_the_portal_settings_saved_and_an_existing_customer,
        fake_stripe_invoices_are_paid_on_their_page_or_charged_to_a_saved_payment_method,
    ]
}

const KEY: &str = "sk_test_tenant_pay";
const ACCOUNT: &str = "acct_tenant_pay";

struct Stripe<'a> {
    fake: &'a FakeStripe,
    http: reqwest::Client,
}

impl<'a> Stripe<'a> {
    fn new(fake: &'a FakeStripe) -> Self {
        Self { fake, http: reqwest::Client::new() }
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<(StatusCode, Value)> {
        let response =
            self.http.post(format!("{}/v1{path}", self.fake.base_url())).bearer_auth(KEY).form(form).send().await?;
        Ok((response.status(), response.json().await?))
    }

    async fn id(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<String> {
        let (status, body) = self.post(path, form).await?;
        anyhow::ensure!(status == StatusCode::OK, "{path}: {body}");
        Ok(body["id"].as_str().unwrap_or_default().to_owned())
    }

    /// A metered price and a customer; returns (price, customer).
    async fn price_and_customer(&self) -> anyhow::Result<(String, String)> {
        let meter = self
            .id(
                "/billing/meters",
                &[
                    ("display_name", "LLM usage"),
                    ("event_name", "tollgate_usage"),
                    ("default_aggregation[formula]", "sum"),
                    ("customer_mapping[event_payload_key]", "stripe_customer_id"),
                    ("customer_mapping[type]", "by_id"),
                    ("value_settings[event_payload_key]", "value"),
                ],
            )
            .await?;
        let product = self.id("/products", &[("name", "LLM usage")]).await?;
        let price = self
            .id(
                "/prices",
                &[
                    ("currency", "usd"),
                    ("product", &product),
                    ("unit_amount_decimal", "0.0000001"),
                    ("recurring[interval]", "month"),
                    ("recurring[usage_type]", "metered"),
                    ("recurring[meter]", &meter),
                ],
            )
            .await?;
        let customer = self.id("/customers", &[("name", "customer-1")]).await?;
        Ok((price, customer))
    }

    async fn usage(&self, customer: &str, identifier: &str, value: &str) -> anyhow::Result<()> {
        let now = (tollgate_core::time::UnixMillis::now().0 / 1000).to_string();
        let (status, body) = self
            .post(
                "/billing/meter_events",
                &[
                    ("event_name", "tollgate_usage"),
                    ("payload[stripe_customer_id]", customer),
                    ("payload[value]", value),
                    ("identifier", identifier),
                    ("timestamp", &now),
                ],
            )
            .await?;
        anyhow::ensure!(status == StatusCode::OK, "{body}");
        Ok(())
    }
}

fn param(body: &Value) -> &str {
    body["error"]["param"].as_str().unwrap_or_default()
}

async fn fake_stripe_subscriptions_take_a_collection_method_with_days_until_due_only_for_sent_invoices()
-> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Stripe::new(&fake);
    let (price, customer) = stripe.price_and_customer().await?;
    let base = [("customer", customer.as_str()), ("items[0][price]", price.as_str())];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    // The default: charge automatically, without days until due.
    let (status, default) = stripe.post("/subscriptions", &with(&[])).await?;
    assert_eq!(status, StatusCode::OK, "{default}");
    assert_eq!(
        (default["collection_method"].as_str(), &default["days_until_due"]),
        (Some("charge_automatically"), &Value::Null)
    );
    // Sent invoices carry their days until due.
    let (status, sent) = stripe
        .post("/subscriptions", &with(&[("collection_method", "send_invoice"), ("days_until_due", "14")]))
        .await?;
    assert_eq!(status, StatusCode::OK, "{sent}");
    assert_eq!((sent["collection_method"].as_str(), sent["days_until_due"].as_i64()), (Some("send_invoice"), Some(14)));
    // Refused: sent invoices without days until due, days until due when charging
    // automatically, an unknown method.
    let (status, body) = stripe.post("/subscriptions", &with(&[("collection_method", "send_invoice")])).await?;
    assert_eq!((status, param(&body)), (StatusCode::BAD_REQUEST, "days_until_due"), "{body}");
    let (status, body) = stripe
        .post("/subscriptions", &with(&[("collection_method", "charge_automatically"), ("days_until_due", "30")]))
        .await?;
    assert_eq!((status, param(&body)), (StatusCode::BAD_REQUEST, "days_until_due"), "{body}");
    let (status, body) = stripe.post("/subscriptions", &with(&[("days_until_due", "30")])).await?;
    assert_eq!((status, param(&body)), (StatusCode::BAD_REQUEST, "days_until_due"), "the default charges: {body}");
    let (status, body) = stripe.post("/subscriptions", &with(&[("collection_method", "paypal")])).await?;
    assert_eq!((status, param(&body)), (StatusCode::BAD_REQUEST, "collection_method"), "{body}");
    assert_eq!(fake.subscriptions(ACCOUNT).len(), 2, "refusals make nothing");
    Ok(())
}

async fn fake_stripe_checkout_setup_sessions_need_a_currency_urls_and_an_existing_customer() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Stripe::new(&fake);
    let (_, customer) = stripe.price_and_customer().await?;
    let full = [
        ("customer", customer.as_str()),
        ("mode", "setup"),
        ("currency", "usd"),
        ("success_url", "https://app.example.com/saved"),
        ("cancel_url", "https://app.example.com/billing"),
    ];
    let (status, session) = stripe.post("/checkout/sessions", &full).await?;
    assert_eq!(status, StatusCode::OK, "{session}");
    assert_eq!(session["object"], "checkout.session");
    assert_eq!((session["mode"].as_str(), session["status"].as_str()), (Some("setup"), Some("open")));
    assert_eq!(session["customer"], customer.as_str());
    assert!(session["url"].as_str().is_some_and(|u| u.starts_with("https://checkout.stripe.com/")), "{session}");
    assert!(session["setup_intent"].as_str().is_some_and(|s| s.starts_with("seti_")), "{session}");
    assert_eq!(session["expires_at"].as_i64(), session["created"].as_i64().map(|c| c + 86_400));
    let without = |name: &str| -> Vec<(&str, &str)> { full.iter().copied().filter(|(n, _)| *n != name).collect() };
    for missing in ["mode", "currency", "success_url", "customer"] {
        let (status, body) = stripe.post("/checkout/sessions", &without(missing)).await?;
        assert_eq!((status, param(&body)), (StatusCode::BAD_REQUEST, missing), "{body}");
    }
    // `currency` is needed only when no payment method types are given.
    let mut with_types = without("currency");
    with_types.push(("payment_method_types[0]", "card"));
    assert_eq!(stripe.post("/checkout/sessions", &with_types).await?.0, StatusCode::OK);
    // `cancel_url` is optional.
    assert_eq!(stripe.post("/checkout/sessions", &without("cancel_url")).await?.0, StatusCode::OK);
    let mut unknown = without("customer");
    unknown.push(("customer", "cus_nobody"));
    let (status, body) = stripe.post("/checkout/sessions", &unknown).await?;
    assert_eq!(
        (status, param(&body), body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, "customer", Some("resource_missing"))
    );
    let mut bad_url = without("success_url");
    bad_url.push(("success_url", "not a url"));
    assert_eq!(param(&stripe.post("/checkout/sessions", &bad_url).await?.1), "success_url");
    assert_eq!(fake.checkout_sessions(ACCOUNT).len(), 3);
    Ok(())
}

async fn fake_stripe_portal_sessions_need_the_portal_settings_saved_and_an_existing_customer() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Stripe::new(&fake);
    let (_, customer) = stripe.price_and_customer().await?;
    let form = [("customer", customer.as_str()), ("return_url", "https://app.example.com/billing")];
    // Until the portal's settings are saved in Stripe's Dashboard there is no default configuration.
    let (status, body) = stripe.post("/billing_portal/sessions", &form).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("default configuration")), "{body}");
    fake.save_portal_settings(ACCOUNT);
    let (status, session) = stripe.post("/billing_portal/sessions", &form).await?;
    assert_eq!(status, StatusCode::OK, "{session}");
    assert_eq!(session["object"], "billing_portal.session");
    assert_eq!(session["return_url"], "https://app.example.com/billing");
    assert!(session["url"].as_str().is_some_and(|u| u.starts_with("https://billing.stripe.com/")), "{session}");
    // `return_url` is optional; `customer` is needed and must exist.
    assert_eq!(stripe.post("/billing_portal/sessions", &form[..1]).await?.0, StatusCode::OK);
    let (status, body) = stripe.post("/billing_portal/sessions", &form[1..]).await?;
    assert_eq!((status, param(&body)), (StatusCode::BAD_REQUEST, "customer"));
    let (status, body) = stripe.post("/billing_portal/sessions", &[("customer", "cus_nobody")]).await?;
    assert_eq!((status, param(&body)), (StatusCode::BAD_REQUEST, "customer"));
    assert_eq!(fake.portal_sessions(ACCOUNT).len(), 2);
    Ok(())
}

async fn fake_stripe_invoices_are_paid_on_their_page_or_charged_to_a_saved_payment_method() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Stripe::new(&fake);
    let (price, sent_to) = stripe.price_and_customer().await?;
    let charged = stripe.id("/customers", &[("name", "customer-2")]).await?;
    let sent = [
        ("customer", sent_to.as_str()),
        ("items[0][price]", price.as_str()),
        ("collection_method", "send_invoice"),
        ("days_until_due", "7"),
    ];
    stripe.id("/subscriptions", &sent).await?;
    stripe.id("/subscriptions", &[("customer", charged.as_str()), ("items[0][price]", price.as_str())]).await?;
    stripe.usage(&sent_to, "a", "100000000").await?;
    stripe.usage(&charged, "b", "200000000").await?;
    // Without a saved payment method, charging automatically leaves the invoice open.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    fake.end_periods(ACCOUNT);
    let finalized = fake.finalize_invoices(ACCOUNT);
    assert_eq!(finalized.len(), 2);
    let of = |customer: &str| finalized.iter().find(|i| i["customer"] == customer).cloned().unwrap_or_default();
    let (invoice, unpaid) = (of(&sent_to), of(&charged));
    assert_eq!(
        (invoice["status"].as_str(), invoice["collection_method"].as_str()),
        (Some("open"), Some("send_invoice"))
    );
    let finalized_at = invoice["status_transitions"]["finalized_at"].as_i64().unwrap_or_default();
    assert_eq!(invoice["due_date"].as_i64(), Some(finalized_at + 7 * 86_400), "{invoice}");
    assert_eq!((unpaid["status"].as_str(), &unpaid["due_date"]), (Some("open"), &Value::Null));
    // The customer pays the sent invoice on its hosted page.
    let paid = fake.pay_invoice(ACCOUNT, invoice["id"].as_str().unwrap_or_default()).unwrap_or_default();
    assert_eq!(
        (paid["status"].as_str(), paid["amount_paid"].as_i64(), paid["amount_remaining"].as_i64()),
        (Some("paid"), Some(10), Some(0))
    );
    assert!(fake.pay_invoice(ACCOUNT, invoice["id"].as_str().unwrap_or_default()).is_none(), "paid once");
    // With a saved default payment method, the next invoice is charged when finalized.
    fake.save_default_payment_method(ACCOUNT, &charged);
    stripe.usage(&charged, "c", "300000000").await?;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    fake.end_periods(ACCOUNT);
    let next = fake.finalize_invoices(ACCOUNT);
    let charged_invoice = next.iter().find(|i| i["customer"] == charged.as_str()).cloned().unwrap_or_default();
    assert_eq!(
        (charged_invoice["status"].as_str(), charged_invoice["amount_paid"].as_i64()),
        (Some("paid"), Some(30)),
        "{charged_invoice}"
    );
    assert_eq!(charged_invoice["attempted"], true);
    Ok(())
}

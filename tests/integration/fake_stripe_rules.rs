//! The fake Stripe's rules, checked over plain HTTP: what Tollgate's own client meets.

use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

use crate::fake_stripe::FakeStripe;
use crate::helpers::PlainCase;
use crate::plain_cases;

pub fn cases() -> Vec<PlainCase> {
    plain_cases![
        fake_stripe_dedupes_identifiers_and_keeps_the_timestamp_window,
        fake_stripe_scopes_objects_by_key_and_stripe_account,
        fake_stripe_replays_idempotency_keys_as_stripe_does,
        fake_stripe_rate_limits_and_fails_on_demand,
        fake_stripe_goes_down_and_comes_back_with_its_state,
        fake_stripe_sends_signed_events,
        fake_stripe_invoices_only_usage_inside_a_subscription_period_before_finalizing,
        fake_stripe_refuses_values_over_15_significant_digits,
        fake_stripe_allows_one_meter_event_at_a_time_per_customer_and_meter,
        fake_stripe_rate_limits_test_mode_keys_lower_than_live_ones,
        fake_stripe_forgets_identifiers_after_its_window,
        fake_stripe_summaries_lag_and_sum_in_floating_point,
        fake_stripe_prices_need_a_lowercase_currency_and_at_most_12_decimals,
        fake_stripe_invoices_by_hand_and_deleted_customers_follow_stripes_rules,
        fake_stripe_reports_an_unknown_customer_later,
        fake_stripe_sends_thin_events_signed_with_the_destinations_secret,
        fake_stripe_serves_a_v2_event_on_its_account_only,
    ]
}

const KEY: &str = "sk_test_tenant_a";
const ACCOUNT: &str = "acct_tenant_a";
const OTHER_KEY: &str = "sk_test_tenant_b";
const OTHER_ACCOUNT: &str = "acct_tenant_b";
const PLATFORM_KEY: &str = "sk_test_platform";
const CONNECTED: &str = "acct_connected";
const EVENT: &str = "tollgate_usage";

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }

    fn id(&self) -> String {
        self.body["id"].as_str().unwrap_or_default().to_owned()
    }

    fn replayed(&self) -> bool {
        self.headers.get("idempotent-replayed").is_some_and(|v| v == "true")
    }
}

/// A caller: a key, perhaps a `Stripe-Account`, perhaps an `Idempotency-Key`.
struct Caller<'a> {
    fake: &'a FakeStripe,
    http: reqwest::Client,
    key: &'a str,
    account: Option<&'a str>,
}

impl<'a> Caller<'a> {
    fn new(fake: &'a FakeStripe, key: &'a str, account: Option<&'a str>) -> Self {
        Self { fake, http: reqwest::Client::new(), key, account }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        let mut request = request.bearer_auth(self.key);
        if let Some(account) = self.account {
            request = request.header("stripe-account", account);
        }
        let response = request.send().await?;
        let (status, headers) = (response.status(), response.headers().clone());
        Ok(Answer { status, headers, body: response.json().await? })
    }

    async fn post(&self, path: &str, idempotency_key: Option<&str>, form: &[(&str, String)]) -> anyhow::Result<Answer> {
        let mut request = self.http.post(format!("{}/v1{path}", self.fake.base_url())).form(form);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        self.send(request).await
    }

    async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.send(self.http.get(format!("{}/v1{path}", self.fake.base_url()))).await
    }

    /// A meter for [`EVENT`] and one customer; returns (meter id, customer id).
    async fn provision(&self) -> anyhow::Result<(String, String)> {
        let meter = self
            .post(
                "/billing/meters",
                None,
                &[
                    ("display_name", "LLM usage".to_owned()),
                    ("event_name", EVENT.to_owned()),
                    ("default_aggregation[formula]", "sum".to_owned()),
                    ("customer_mapping[event_payload_key]", "stripe_customer_id".to_owned()),
                    ("customer_mapping[type]", "by_id".to_owned()),
                    ("value_settings[event_payload_key]", "value".to_owned()),
                ],
            )
            .await?;
        assert_eq!(meter.status, StatusCode::OK, "{}", meter.body);
        let customer = self.customer("customer-1").await?;
        assert_eq!(customer.status, StatusCode::OK, "{}", customer.body);
        Ok((meter.id(), customer.id()))
    }

    async fn customer(&self, name: &str) -> anyhow::Result<Answer> {
        self.post("/customers", None, &[("name", name.to_owned()), ("metadata[tollgate_customer]", name.to_owned())])
            .await
    }

    async fn meter_event(
        &self,
        idempotency_key: Option<&str>,
        customer: &str,
        identifier: &str,
        value: i64,
        timestamp: i64,
    ) -> anyhow::Result<Answer> {
        self.post(
            "/billing/meter_events",
            idempotency_key,
            &[
                ("event_name", EVENT.to_owned()),
                ("payload[stripe_customer_id]", customer.to_owned()),
                ("payload[value]", value.to_string()),
                ("identifier", identifier.to_owned()),
                ("timestamp", timestamp.to_string()),
            ],
        )
        .await
    }
}

fn now() -> i64 {
    tollgate_core::time::UnixMillis::now().0 / 1000
}

async fn fake_stripe_dedupes_identifiers_and_keeps_the_timestamp_window() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Caller::new(&fake, KEY, None);
    let (meter, customer) = stripe.provision().await?;
    let now = now();

    let first = stripe.meter_event(None, &customer, "mtb_1", 7, now).await?;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body["object"], "billing.meter_event");
    assert_eq!(first.body["payload"]["value"], "7");
    assert_eq!((first.body["identifier"].as_str(), first.body["timestamp"].as_i64()), (Some("mtb_1"), Some(now)));
    // The same identifier again, even with another value: refused, not counted.
    let again = stripe.meter_event(None, &customer, "mtb_1", 9, now).await?;
    assert_eq!((again.status, again.code()), (StatusCode::BAD_REQUEST, "resource_already_exists"));
    assert!(again.body["error"]["message"].as_str().unwrap_or_default().contains("mtb_1"), "{}", again.body);

    // The window: 35 days back, 5 minutes ahead.
    let too_old = stripe.meter_event(None, &customer, "mtb_old", 1, now - 35 * 86_400 - 60).await?;
    let oldest = stripe.meter_event(None, &customer, "mtb_oldest", 1, now - 35 * 86_400 + 60).await?;
    let too_new = stripe.meter_event(None, &customer, "mtb_new", 1, now + 360).await?;
    let newest = stripe.meter_event(None, &customer, "mtb_newest", 1, now + 240).await?;
    for refused in [&too_old, &too_new] {
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
        assert_eq!(refused.body["error"]["param"], "timestamp");
        assert!(refused.body["error"]["message"].as_str().unwrap_or_default().contains("35 days"));
    }
    assert_eq!((oldest.status, newest.status), (StatusCode::OK, StatusCode::OK));

    // An event for a customer of no one is accepted, as Stripe accepts it, and not counted: it
    // waits for the next error report (see `fake_stripe_reports_an_unknown_customer_later`).
    let nobody = stripe.meter_event(None, "cus_nobody", "mtb_nobody", 1, now).await?;
    assert_eq!(nobody.status, StatusCode::OK, "{}", nobody.body);
    assert_eq!(fake.pending_meter_errors(ACCOUNT).len(), 1);
    // An event for no meter of the account, a value that is no whole number.
    let wrong = [
        stripe
            .post(
                "/billing/meter_events",
                None,
                &[
                    ("event_name", "no_such_meter".to_owned()),
                    ("payload[stripe_customer_id]", customer.clone()),
                    ("payload[value]", "1".to_owned()),
                ],
            )
            .await?,
        stripe
            .post(
                "/billing/meter_events",
                None,
                &[
                    ("event_name", EVENT.to_owned()),
                    ("payload[stripe_customer_id]", customer.clone()),
                    ("payload[value]", "1.5".to_owned()),
                ],
            )
            .await?,
    ];
    for refused in &wrong {
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
        assert_eq!(refused.body["error"]["type"], "invalid_request_error");
    }

    let accepted: Vec<_> = fake.meter_events(ACCOUNT).into_iter().map(|e| (e.identifier, e.value)).collect();
    assert_eq!(accepted, [("mtb_1".to_owned(), 7), ("mtb_oldest".to_owned(), 1), ("mtb_newest".to_owned(), 1)]);
    assert_eq!(fake.meter_event_attempts(ACCOUNT).len(), 9);

    // Summaries count what was accepted, within [start, end).
    let start = now - now.rem_euclid(60);
    let summary = stripe
        .get(&format!(
            "/billing/meters/{meter}/event_summaries?customer={customer}&start_time={start}&end_time={}",
            start + 60
        ))
        .await?;
    assert_eq!(summary.status, StatusCode::OK, "{}", summary.body);
    assert_eq!(summary.body["object"], "list");
    assert_eq!(summary.body["data"][0]["object"], "billing.meter_event_summary");
    assert_eq!(summary.body["data"][0]["aggregated_value"].as_f64(), Some(7.0));
    assert!(summary.body["data"][0]["aggregated_value"].is_f64(), "a float, as Stripe's");
    let unaligned = stripe
        .get(&format!(
            "/billing/meters/{meter}/event_summaries?customer={customer}&start_time={}&end_time={}",
            now - 1,
            now
        ))
        .await?;
    assert_eq!(unaligned.status, StatusCode::BAD_REQUEST, "{}", unaligned.body);
    // Grouped by hour: one summary per hour of the range, each with its own events.
    let hour = now - now.rem_euclid(3_600);
    let grouped = stripe
        .get(&format!(
            "/billing/meters/{meter}/event_summaries?customer={customer}&start_time={}&end_time={}\
             &value_grouping_window=hour",
            hour - 3_600,
            hour + 3_600
        ))
        .await?;
    let values: Vec<_> = grouped.body["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| (s["start_time"].as_i64().unwrap_or_default(), s["aggregated_value"].as_f64().unwrap_or(-1.0)))
        .collect();
    // mtb_1 (7) is in this hour; mtb_newest (1, four minutes ahead) may be in the next.
    let this_hour = 7.0 + f64::from(u8::from(now + 240 < hour + 3_600));
    assert_eq!(values, [(hour - 3_600, 0.0), (hour, this_hour)], "{}", grouped.body);
    Ok(())
}

async fn fake_stripe_scopes_objects_by_key_and_stripe_account() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT), (OTHER_KEY, OTHER_ACCOUNT)]).await?;
    fake.add_platform_key(PLATFORM_KEY, "acct_platform");
    fake.add_connected_account(PLATFORM_KEY, CONNECTED);

    let tenant = Caller::new(&fake, KEY, None);
    let (_, customer) = tenant.provision().await?;
    // The key's own account named in Stripe-Account is the same account.
    assert_eq!(
        Caller::new(&fake, KEY, Some(ACCOUNT)).get(&format!("/customers/{customer}")).await?.status,
        StatusCode::OK
    );
    // Another tenant's key cannot see it, nor act on the tenant's account.
    let other = Caller::new(&fake, OTHER_KEY, None).get(&format!("/customers/{customer}")).await?;
    assert_eq!((other.status, other.code()), (StatusCode::NOT_FOUND, "resource_missing"));
    let other = Caller::new(&fake, OTHER_KEY, Some(ACCOUNT)).customer("mallory").await?;
    assert_eq!(other.status, StatusCode::FORBIDDEN, "{}", other.body);

    // The platform acts on its connected account, and only there.
    let connected = Caller::new(&fake, PLATFORM_KEY, Some(CONNECTED));
    let (meter, connected_customer) = connected.provision().await?;
    assert_eq!(fake.customers(CONNECTED).len(), 1);
    assert_eq!(fake.meters(CONNECTED)[0]["id"].as_str(), Some(meter.as_str()));
    let platform = Caller::new(&fake, PLATFORM_KEY, None);
    let missing = platform.get(&format!("/customers/{connected_customer}")).await?;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let missing = platform.get(&format!("/billing/meters/{meter}")).await?;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    for account in [ACCOUNT, "acct_unknown"] {
        let refused = Caller::new(&fake, PLATFORM_KEY, Some(account)).get("/account").await?;
        assert_eq!((refused.status, refused.code()), (StatusCode::FORBIDDEN, "account_invalid"), "{}", refused.body);
        let message = refused.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("does not have access to account") && message.contains(account), "{message}");
    }
    let account = connected.get("/account").await?;
    assert_eq!(account.body["id"], CONNECTED);
    // An event for the connected account's customer, sent to the tenant's account: no customer
    // there, found later (accepted, counted nowhere, reported).
    let elsewhere = tenant.meter_event(None, &connected_customer, "mtb_x", 1, now()).await?;
    assert_eq!(elsewhere.status, StatusCode::OK, "{}", elsewhere.body);
    assert!(fake.meter_events(ACCOUNT).iter().all(|e| e.identifier != "mtb_x"));
    assert_eq!(fake.pending_meter_errors(ACCOUNT)[0].code, "meter_event_customer_not_found");

    let unknown = Caller::new(&fake, "sk_test_unknown", None).get("/account").await?;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    let seen = fake.seen();
    assert!(seen.iter().any(|r| r.key.as_deref() == Some(PLATFORM_KEY) && r.account.as_deref() == Some(CONNECTED)));
    Ok(())
}

async fn fake_stripe_replays_idempotency_keys_as_stripe_does() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT), (OTHER_KEY, OTHER_ACCOUNT)]).await?;
    let stripe = Caller::new(&fake, KEY, None);
    let (_, customer) = stripe.provision().await?;
    let form = [("name", "grace".to_owned()), ("email", "grace@example.com".to_owned())];

    let first = stripe.post("/customers", Some("cust-grace"), &form).await?;
    let replay = stripe.post("/customers", Some("cust-grace"), &form).await?;
    assert_eq!((first.status, first.replayed()), (StatusCode::OK, false));
    assert_eq!((replay.status, replay.replayed()), (StatusCode::OK, true));
    assert_eq!(replay.body, first.body);
    assert_eq!(fake.customers(ACCOUNT).len(), 2, "one customer made with the key");
    let mismatch = stripe.post("/customers", Some("cust-grace"), &[("name", "hopper".to_owned())]).await?;
    assert_eq!(mismatch.status, StatusCode::BAD_REQUEST);
    assert_eq!(mismatch.body["error"]["type"], "idempotency_error");
    let other_path = stripe.post("/products", Some("cust-grace"), &[("name", "grace".to_owned())]).await?;
    assert_eq!(other_path.body["error"]["type"], "idempotency_error");
    // Keys belong to an account: the same key elsewhere is a new request.
    let elsewhere = Caller::new(&fake, OTHER_KEY, None).post("/customers", Some("cust-grace"), &form).await?;
    assert_eq!((elsewhere.status, elsewhere.replayed()), (StatusCode::OK, false));

    // A request refused before it ran (a parameter) leaves the key free.
    let invalid = stripe.post("/products", Some("product-1"), &[("description", "LLM usage".to_owned())]).await?;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST, "{}", invalid.body);
    assert_eq!((invalid.code(), invalid.body["error"]["param"].as_str()), ("parameter_missing", Some("name")));
    let fixed = stripe.post("/products", Some("product-1"), &[("name", "LLM usage".to_owned())]).await?;
    assert_eq!((fixed.status, fixed.replayed()), (StatusCode::OK, false), "{}", fixed.body);
    assert_eq!(fake.products(ACCOUNT).len(), 1);

    // A 500 from a running endpoint is kept and replayed, as Stripe documents.
    fake.fail_next(1, 500);
    let now = now();
    let failed = stripe.meter_event(Some("mtb-1"), &customer, "mtb_1", 5, now).await?;
    let replayed = stripe.meter_event(Some("mtb-1"), &customer, "mtb_1", 5, now).await?;
    assert_eq!(
        (failed.status, failed.body["error"]["type"].as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, Some("api_error"))
    );
    assert_eq!((replayed.status, replayed.replayed()), (StatusCode::INTERNAL_SERVER_ERROR, true));
    // A fresh key runs it; the identifier keeps a later resend from counting twice.
    let fresh = stripe.meter_event(Some("mtb-1-retry"), &customer, "mtb_1", 5, now).await?;
    assert_eq!(fresh.status, StatusCode::OK, "{}", fresh.body);
    let resent = stripe.meter_event(Some("mtb-1-retry-2"), &customer, "mtb_1", 5, now).await?;
    assert_eq!(resent.code(), "resource_already_exists");
    // A refusal while running (the duplicate) is kept too.
    let resent_again = stripe.meter_event(Some("mtb-1-retry-2"), &customer, "mtb_1", 5, now).await?;
    assert_eq!((resent_again.code(), resent_again.replayed()), ("resource_already_exists", true));

    // While the first request with a key is still being answered, the key is in use (409).
    fake.set_meter_event_latency(Duration::from_millis(1500));
    let slow = stripe.meter_event(Some("mtb-2"), &customer, "mtb_2", 5, now);
    let (slow, concurrent) = tokio::join!(slow, async {
        // Once the first has reached the fake.
        while !fake.seen().iter().any(|r| r.idempotency_key.as_deref() == Some("mtb-2")) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stripe.meter_event(Some("mtb-2"), &customer, "mtb_2", 5, now).await
    });
    fake.set_meter_event_latency(Duration::ZERO);
    let concurrent = concurrent?;
    assert_eq!(slow?.status, StatusCode::OK);
    assert_eq!((concurrent.status, concurrent.code()), (StatusCode::CONFLICT, "idempotency_key_in_use"));
    let after = stripe.meter_event(Some("mtb-2"), &customer, "mtb_2", 5, now).await?;
    assert_eq!((after.status, after.replayed()), (StatusCode::OK, true));
    assert_eq!(fake.meter_events(ACCOUNT).len(), 2);
    Ok(())
}

async fn fake_stripe_rate_limits_and_fails_on_demand() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Caller::new(&fake, KEY, None);
    let (_, customer) = stripe.provision().await?;
    let now = now();

    fake.set_rate_limit(2);
    for _ in 0..2 {
        let limited = stripe.meter_event(Some("mtb-1"), &customer, "mtb_1", 3, now).await?;
        assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.body["error"]["type"], "invalid_request_error");
        assert_eq!(limited.code(), "rate_limit");
        assert!(limited.headers.get("request-id").is_some());
    }
    // A rate-limited request did not run: its key is still free.
    let through = stripe.meter_event(Some("mtb-1"), &customer, "mtb_1", 3, now).await?;
    assert_eq!((through.status, through.replayed()), (StatusCode::OK, false), "{}", through.body);

    fake.fail_next(2, 503);
    for identifier in ["mtb_2", "mtb_3"] {
        let failed = stripe.meter_event(None, &customer, identifier, 3, now).await?;
        assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(failed.body["error"]["type"], "api_error");
    }
    fake.fail_next(1, 400);
    let refused = stripe.meter_event(None, &customer, "mtb_2", 3, now).await?;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(stripe.meter_event(None, &customer, "mtb_2", 3, now).await?.status, StatusCode::OK);
    assert_eq!(fake.meter_events(ACCOUNT).len(), 2);
    assert_eq!(fake.meter_event_attempts(ACCOUNT).len(), 7);
    Ok(())
}

async fn fake_stripe_goes_down_and_comes_back_with_its_state() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Caller::new(&fake, KEY, None);
    let (_, customer) = stripe.provision().await?;
    let addr = fake.addr;

    fake.go_down().await?;
    let error = Caller::new(&fake, KEY, None)
        .get(&format!("/customers/{customer}"))
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("answered"))?;
    let error = error.downcast::<reqwest::Error>()?;
    assert!(error.is_connect(), "{error:?}");
    fake.come_back().await?;
    assert_eq!(fake.addr, addr);
    let found = stripe.get(&format!("/customers/{customer}")).await?;
    assert_eq!((found.status, found.id()), (StatusCode::OK, customer.clone()));
    let accepted = stripe.meter_event(None, &customer, "mtb_1", 1, now()).await?;
    assert_eq!(accepted.status, StatusCode::OK, "{}", accepted.body);
    // Down and back twice: the state stays.
    fake.go_down().await?;
    fake.come_back().await?;
    assert_eq!(stripe.meter_event(None, &customer, "mtb_1", 1, now()).await?.code(), "resource_already_exists");
    Ok(())
}

async fn fake_stripe_sends_signed_events() -> anyhow::Result<()> {
    use std::sync::{Arc, Mutex};
    let received: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/stripe",
        axum::routing::post(move |headers: HeaderMap, body: String| async move {
            let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
            sink.lock().unwrap().push((signature.to_owned(), body));
            "ok"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/stripe", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let invoice = fake.make_invoice(ACCOUNT, "cus_1", "paid", 1234);
    for (field, value) in [("object", "invoice"), ("customer", "cus_1"), ("status", "paid"), ("currency", "usd")] {
        assert_eq!(invoice[field], value, "{invoice}");
    }
    assert_eq!((invoice["amount_due"].as_i64(), invoice["amount_paid"].as_i64()), (Some(1234), Some(1234)));
    assert!(invoice["id"].as_str().unwrap_or_default().starts_with("in_"));
    assert!(invoice["hosted_invoice_url"].as_str().unwrap_or_default().starts_with("https://invoice.stripe.com/i/"));
    let (status, body) = fake.send_event(&url, "whsec_test", "invoice.paid", invoice.clone(), Some(CONNECTED)).await?;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));

    let (signature, body) = received.lock().unwrap()[0].clone();
    tollgate_core::signature::verify("whsec_test", &signature, body.as_bytes(), now(), 300)?;
    assert!(tollgate_core::signature::verify("whsec_other", &signature, body.as_bytes(), now(), 300).is_err());
    let event: Value = serde_json::from_str(&body)?;
    assert!(event["id"].as_str().unwrap_or_default().starts_with("evt_"));
    assert_eq!((event["object"].as_str(), event["type"].as_str()), (Some("event"), Some("invoice.paid")));
    assert_eq!((event["account"].as_str(), event["livemode"].as_bool()), (Some(CONNECTED), Some(false)));
    assert_eq!(event["api_version"], "2026-09-30.endive");
    assert_eq!(event["data"]["object"], invoice, "a paid invoice is sent as it is");
    // A failed payment is sent as Stripe has the invoice after it: one more attempt made.
    let open = fake.make_invoice(ACCOUNT, "cus_1", "open", 1234);
    assert_eq!((open["attempted"].as_bool(), open["attempt_count"].as_i64()), (Some(false), Some(0)));
    fake.send_event(&url, "whsec_test", "invoice.payment_failed", open, None).await?;
    let (_, body) = received.lock().unwrap()[1].clone();
    let failed: Value = serde_json::from_str(&body)?;
    let object = &failed["data"]["object"];
    assert_eq!((object["attempted"].as_bool(), object["attempt_count"].as_i64()), (Some(true), Some(1)), "{object}");
    assert!(object["next_payment_attempt"].as_i64().is_some());
    server.abort();
    Ok(())
}

/// The fake's invoices (see `fake_stripe::invoices`): a period's invoice counts the meter
/// events whose timestamp is inside the subscription's period and that arrived before the
/// invoice was finalized; its line is rounded half up once.
async fn fake_stripe_invoices_only_usage_inside_a_subscription_period_before_finalizing() -> anyhow::Result<()> {
    use crate::fake_stripe::invoices::line_amount;
    assert_eq!(line_amount(94_999_999, "0.0000001"), 9, "9.4999999 cents");
    assert_eq!(line_amount(95_000_000, "0.0000001"), 10, "9.5 cents, half up");
    assert_eq!(line_amount(1_500_000_000, "0.000000001"), 2, "a zero-decimal currency: 1.5 yen");
    assert_eq!(line_amount(0, "0.0000001"), 0);

    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Caller::new(&fake, KEY, None);
    let (meter, customer) = stripe.provision().await?;
    let product = stripe.post("/products", None, &[("name", "LLM usage".to_owned())]).await?;
    let price = stripe
        .post(
            "/prices",
            None,
            &[
                ("currency", "usd".to_owned()),
                ("product", product.id()),
                ("unit_amount_decimal", "0.0000001".to_owned()),
                ("recurring[interval]", "month".to_owned()),
                ("recurring[usage_type]", "metered".to_owned()),
                ("recurring[meter]", meter),
            ],
        )
        .await?;
    assert_eq!(price.status, StatusCode::OK, "{}", price.body);
    let t = now();
    // Usage before the subscription exists is on no invoice.
    assert_eq!(stripe.meter_event(None, &customer, "before", 40_000_000, t - 60).await?.status, StatusCode::OK);
    let subscription =
        stripe.post("/subscriptions", None, &[("customer", customer.clone()), ("items[0][price]", price.id())]).await?;
    assert_eq!(subscription.status, StatusCode::OK, "{}", subscription.body);
    let started = subscription.body["start_date"].as_i64().unwrap_or_default();
    assert!(started >= t, "the subscription starts when it is made");
    assert_eq!(stripe.meter_event(None, &customer, "inside", 95_000_000, started).await?.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let drafts = fake.end_periods(ACCOUNT);
    assert_eq!(drafts.len(), 1);
    // Late usage for the ended period, during the grace period: counted.
    assert_eq!(stripe.meter_event(None, &customer, "late", 5_000_000, started).await?.status, StatusCode::OK);
    let finalized = fake.finalize_invoices(ACCOUNT);
    assert_eq!(finalized.len(), 1);
    let invoice = &finalized[0];
    assert_eq!((invoice["status"].as_str(), invoice["total"].as_i64()), (Some("open"), Some(10)), "{invoice}");
    assert_eq!(invoice["lines"]["data"][0]["quantity"], 100_000_000);
    assert_eq!(invoice["parent"]["subscription_details"]["subscription"], subscription.body["id"]);
    // Usage for the finalized period arriving now is accepted, and on no invoice.
    assert_eq!(stripe.meter_event(None, &customer, "too-late", 7_000_000, started).await?.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    fake.end_periods(ACCOUNT);
    let second = fake.finalize_invoices(ACCOUNT);
    assert_eq!(second.len(), 1);
    assert_eq!((second[0]["total"].as_i64(), second[0]["status"].as_str()), (Some(0), Some("paid")));
    assert_eq!(fake.invoiced(ACCOUNT, &customer), 10);
    assert_eq!(fake.invoiced_quantity(ACCOUNT, &customer), 100_000_000);
    Ok(())
}

/// A meter event with its value as written (not necessarily a number that fits an `i64`).
async fn meter_event_raw(stripe: &Caller<'_>, customer: &str, identifier: &str, value: &str) -> anyhow::Result<Answer> {
    stripe
        .post(
            "/billing/meter_events",
            None,
            &[
                ("event_name", EVENT.to_owned()),
                ("payload[stripe_customer_id]", customer.to_owned()),
                ("payload[value]", value.to_owned()),
                ("identifier", identifier.to_owned()),
                ("timestamp", now().to_string()),
            ],
        )
        .await
}

async fn fake_stripe_refuses_values_over_15_significant_digits() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Caller::new(&fake, KEY, None);
    let (_, customer) = stripe.provision().await?;
    let largest = meter_event_raw(&stripe, &customer, "mtb_15", "999999999999999").await?;
    assert_eq!(largest.status, StatusCode::OK, "{}", largest.body);
    // Leading zeros are not significant.
    let padded = meter_event_raw(&stripe, &customer, "mtb_padded", "000123456789012345").await?;
    assert_eq!(padded.status, StatusCode::OK, "{}", padded.body);
    for (identifier, value) in
        [("mtb_16", "1000000000000000"), ("mtb_19", "9223372036854775807"), ("mtb_25", "1234567890123456789012345")]
    {
        let refused = meter_event_raw(&stripe, &customer, identifier, value).await?;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
        assert_eq!(refused.body["error"]["type"], "invalid_request_error");
        assert_eq!(refused.body["error"]["param"], "payload[value]");
        let message = refused.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("at most 15 digits") && message.contains(value), "{message}");
    }
    let accepted: Vec<_> = fake.meter_events(ACCOUNT).into_iter().map(|e| e.value).collect();
    assert_eq!(accepted, [999_999_999_999_999, 123_456_789_012_345]);
    Ok(())
}

async fn fake_stripe_allows_one_meter_event_at_a_time_per_customer_and_meter() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Caller::new(&fake, KEY, None);
    let (_, first) = stripe.provision().await?;
    let second = stripe.customer("customer-2").await?.id();
    let now = now();
    fake.set_meter_event_latency(Duration::from_millis(1_500));
    let started = |n: usize| {
        let fake = &fake;
        async move {
            while fake.meter_event_attempts(ACCOUNT).len() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // The first customer's event is being answered; a second one for it is refused, while one
    // for another customer goes through at the same time.
    let (slow, same, other) = tokio::join!(
        stripe.meter_event(Some("k-1"), &first, "mtb_1", 1, now),
        async {
            started(1).await;
            stripe.meter_event(Some("k-2"), &first, "mtb_2", 2, now).await
        },
        async {
            started(1).await;
            stripe.meter_event(Some("k-3"), &second, "mtb_3", 3, now).await
        },
    );
    fake.set_meter_event_latency(Duration::ZERO);
    let (same, other) = (same?, other?);
    assert_eq!(slow?.status, StatusCode::OK);
    assert_eq!((same.status, same.code()), (StatusCode::TOO_MANY_REQUESTS, "lock_timeout"), "{}", same.body);
    assert_eq!(same.body["error"]["type"], "invalid_request_error");
    assert!(same.headers.get("stripe-should-retry").is_some_and(|v| v == "true"));
    assert_eq!(other.status, StatusCode::OK, "{}", other.body);
    assert_eq!((fake.lock_timeouts(), fake.meter_events_in_flight_max()), (1, 2));
    // Refused before it ran: once the first is answered, the same key goes through.
    let again = stripe.meter_event(Some("k-2"), &first, "mtb_2", 2, now).await?;
    assert_eq!((again.status, again.replayed()), (StatusCode::OK, false), "{}", again.body);
    assert_eq!(fake.meter_events(ACCOUNT).len(), 3);
    Ok(())
}

async fn fake_stripe_rate_limits_test_mode_keys_lower_than_live_ones() -> anyhow::Result<()> {
    const LIVE_KEY: &str = "sk_live_tenant_c";
    const LIVE_ACCOUNT: &str = "acct_tenant_c";
    let fake = FakeStripe::start(&[(KEY, ACCOUNT), (LIVE_KEY, LIVE_ACCOUNT)]).await?;
    let test = Caller::new(&fake, KEY, None);
    let live = Caller::new(&fake, LIVE_KEY, None);
    let (_, test_customer) = test.provision().await?;
    let (_, live_customer) = live.provision().await?;
    // Let the provisioning calls leave the second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let now = now();
    let mut statuses = Vec::new();
    for n in 0..30 {
        statuses.push(test.meter_event(None, &test_customer, &format!("mtb_t{n}"), 1, now).await?);
    }
    // (Sent one at a time: concurrent ones for one customer would be locked out instead.)
    let limited: Vec<_> = statuses.iter().filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert!(limited.len() >= 5, "test mode allows 25 a second, {} refused", limited.len());
    assert!(
        limited.iter().all(|a| a.code() == "rate_limit"),
        "{:?}",
        limited.iter().map(|a| &a.body).collect::<Vec<_>>()
    );
    assert_eq!(fake.rate_limit_refusals(), limited.len());
    let mut live_ok = 0;
    for n in 0..60 {
        let answer = live.meter_event(None, &live_customer, &format!("mtb_m{n}"), 1, now).await?;
        live_ok += usize::from(answer.status == StatusCode::OK);
    }
    assert_eq!(live_ok, 60, "live meter events have their own limit of 1,000 a second");
    // A second later the test-mode limit has room again; every request counts toward it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    fake.set_test_mode_limit(2);
    let later = test.meter_event(None, &test_customer, "mtb_later", 1, now).await?;
    assert_eq!(later.status, StatusCode::OK, "{}", later.body);
    assert_eq!(test.get(&format!("/customers/{test_customer}")).await?.status, StatusCode::OK);
    let over = test.get(&format!("/customers/{test_customer}")).await?;
    assert_eq!((over.status, over.code()), (StatusCode::TOO_MANY_REQUESTS, "rate_limit"));
    Ok(())
}

async fn fake_stripe_forgets_identifiers_after_its_window() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Caller::new(&fake, KEY, None);
    let (_, customer) = stripe.provision().await?;
    let now = now();
    fake.set_identifier_window(Duration::from_millis(500));
    assert_eq!(stripe.meter_event(None, &customer, "mtb_1", 5, now).await?.status, StatusCode::OK);
    let again = stripe.meter_event(None, &customer, "mtb_1", 5, now).await?;
    assert_eq!(again.code(), "resource_already_exists");
    // Past the window the identifier is new again: the same event counts twice.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let late = stripe.meter_event(None, &customer, "mtb_1", 5, now).await?;
    assert_eq!(late.status, StatusCode::OK, "{}", late.body);
    let values: Vec<_> = fake.meter_events(ACCOUNT).into_iter().map(|e| (e.identifier, e.value)).collect();
    assert_eq!(values, [("mtb_1".to_owned(), 5), ("mtb_1".to_owned(), 5)]);
    Ok(())
}

async fn fake_stripe_summaries_lag_and_sum_in_floating_point() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Caller::new(&fake, KEY, None);
    let (meter, customer) = stripe.provision().await?;
    let now = now();
    let start = now - now.rem_euclid(60);
    let summary = || async {
        let answer = stripe
            .get(&format!(
                "/billing/meters/{meter}/event_summaries?customer={customer}&start_time={start}&end_time={}",
                start + 60
            ))
            .await?;
        anyhow::ensure!(answer.status == StatusCode::OK, "{}", answer.body);
        let value = &answer.body["data"][0]["aggregated_value"];
        anyhow::ensure!(value.is_f64(), "a float: {value}");
        Ok(value.as_f64().unwrap_or(-1.0))
    };
    fake.set_summary_lag(Duration::from_millis(700));
    assert_eq!(stripe.meter_event(None, &customer, "mtb_1", 7, now).await?.status, StatusCode::OK);
    assert_eq!(summary().await?, 0.0, "accepted, not counted yet");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(summary().await?, 7.0);

    // Past 2^53 the double sum rounds at each step: with the 7 above, ten values of 15 nines and
    // one of 1 sum to 10^16 - 2; in doubles, to 10^16 - 4.
    fake.set_summary_lag(Duration::ZERO);
    let mut exact: i64 = 7;
    let mut double: f64 = 7.0;
    for n in 0..10 {
        let answer = stripe.meter_event(None, &customer, &format!("mtb_big{n}"), 999_999_999_999_999, now).await?;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        exact += 999_999_999_999_999;
        double += 999_999_999_999_999.0;
    }
    assert_eq!(stripe.meter_event(None, &customer, "mtb_one", 1, now).await?.status, StatusCode::OK);
    exact += 1;
    double += 1.0;
    let summed = summary().await?;
    assert_eq!(summed, double);
    assert_ne!(summed as i64, exact, "{summed} is a rounded {exact}");
    assert!((summed as i64 - exact).abs() <= 2);
    Ok(())
}

/// A price's `currency` is a lowercase ISO code and its `unit_amount_decimal` has at most 12
/// decimals (stripe-node `PriceCreateParams`): JPY's one-nano-yen unit (9 decimals) is
/// accepted, a 13-decimal unit and an upper-case code are refused.
async fn fake_stripe_prices_need_a_lowercase_currency_and_at_most_12_decimals() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Caller::new(&fake, KEY, None);
    let (meter, _) = stripe.provision().await?;
    let product = stripe.post("/products", None, &[("name", "LLM usage".to_owned())]).await?;
    assert_eq!(product.status, StatusCode::OK, "{}", product.body);
    let (stripe, product, meter) = (&stripe, &product, &meter);
    let price = move |currency: &'static str, unit: &'static str| {
        let form = vec![
            ("currency", currency.to_owned()),
            ("product", product.id()),
            ("unit_amount_decimal", unit.to_owned()),
            ("recurring[interval]", "month".to_owned()),
            ("recurring[usage_type]", "metered".to_owned()),
            ("recurring[meter]", meter.clone()),
        ];
        async move { stripe.post("/prices", None, &form).await }
    };
    let yen = price("jpy", "0.000000001").await?;
    assert_eq!(yen.status, StatusCode::OK, "{}", yen.body);
    assert_eq!(yen.body["currency"], "jpy");
    for (currency, unit, param) in [
        ("jpy", "0.0000000000001", "unit_amount_decimal"),
        ("usd", "1e-7", "unit_amount_decimal"),
        ("USD", "0.0000001", "currency"),
    ] {
        let refused = price(currency, unit).await?;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{currency} {unit}: {}", refused.body);
        assert_eq!(refused.body["error"]["param"], param, "{}", refused.body);
    }
    assert_eq!(fake.prices(ACCOUNT).len(), 1);
    Ok(())
}

/// A receiver of Stripe's deliveries: each one's `Stripe-Signature` and body.
struct Receiver {
    url: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Receiver {
    async fn start() -> anyhow::Result<Self> {
        let received: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
        let sink = received.clone();
        let app = axum::Router::new().route(
            "/events",
            axum::routing::post(move |headers: HeaderMap, body: String| async move {
                let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
                sink.lock().unwrap().push((signature.to_owned(), body));
                "ok"
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/events", listener.local_addr()?);
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { url, received, server })
    }

    fn deliveries(&self) -> Vec<(String, String)> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// `GET /v2/core/events/{id}` with `key`, on `context` if given.
async fn v2_event(fake: &FakeStripe, key: &str, context: Option<&str>, id: &str) -> anyhow::Result<Answer> {
    let mut request = reqwest::Client::new().get(format!("{}/v2/core/events/{id}", fake.base_url())).bearer_auth(key);
    if let Some(context) = context {
        request = request.header("stripe-context", context);
    }
    let response = request.send().await?;
    let (status, headers) = (response.status(), response.headers().clone());
    Ok(Answer { status, headers, body: response.json().await? })
}

async fn fake_stripe_reports_an_unknown_customer_later() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let receiver = Receiver::start().await?;
    fake.add_event_destination(ACCOUNT, &receiver.url, "whsec_destination_0123456789");
    let stripe = Caller::new(&fake, KEY, None);
    let (meter, customer) = stripe.provision().await?;
    let now = now();
    // Accepted with 200 (Stripe validates the customer asynchronously), counted nowhere.
    let counted = stripe.meter_event(Some("mtb_ok-1"), &customer, "mtb_ok", 5, now).await?;
    let unknown = stripe.meter_event(Some("mtb_lost-1"), "cus_deleted1", "mtb_lost", 7, now).await?;
    assert_eq!((counted.status, unknown.status), (StatusCode::OK, StatusCode::OK), "{}", unknown.body);
    assert_eq!(unknown.body["object"], "billing.meter_event");
    assert_eq!(fake.meter_events(ACCOUNT).len(), 1, "only the known customer's event counts");
    // Its identifier is taken all the same: sent again, it is a duplicate.
    let again = stripe.meter_event(Some("mtb_lost-2"), "cus_deleted1", "mtb_lost", 7, now).await?;
    assert_eq!((again.status, again.code()), (StatusCode::BAD_REQUEST, "resource_already_exists"));
    // A deleted customer is unknown too; two more errors, of which one sample is kept.
    fake.delete_customer(ACCOUNT, &customer);
    stripe.meter_event(Some("mtb_gone-1"), &customer, "mtb_gone", 1, now).await?;
    stripe.meter_event(None, &customer, "mtb_gone2", 1, now).await?;
    fake.set_error_samples(2);

    let answers = fake.report_meter_errors().await?;
    assert_eq!(answers.len(), 1, "one report per account and meter");
    assert!(fake.pending_meter_errors(ACCOUNT).is_empty(), "reported once");
    let (_, body) = receiver.deliveries()[0].clone();
    let thin: Value = serde_json::from_str(&body)?;
    let id = thin["id"].as_str().unwrap_or_default().to_owned();
    let full = v2_event(&fake, KEY, None, &id).await?;
    assert_eq!(full.status, StatusCode::OK, "{}", full.body);
    let data = &full.body["data"];
    assert_eq!(data["reason"]["error_count"], 3);
    let types = data["reason"]["error_types"].as_array().cloned().unwrap_or_default();
    assert_eq!(types.len(), 1, "{data}");
    assert_eq!(
        (types[0]["code"].as_str(), types[0]["error_count"].as_i64()),
        (Some("meter_event_customer_not_found"), Some(3))
    );
    // Stripe samples: two of the three, each naming the request's idempotency key (the
    // identifier when the request had none).
    let samples: Vec<&str> = types[0]["sample_errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["request"]["identifier"].as_str())
        .collect();
    assert_eq!(samples, ["mtb_lost-1", "mtb_gone-1"]);
    assert!(types[0]["sample_errors"][0]["error_message"].as_str().unwrap_or_default().contains("cus_deleted1"));
    assert_eq!(data["developer_message_summary"], "There are 3 invalid events");
    for field in ["validation_start", "validation_end"] {
        let text = data[field].as_str().unwrap_or_default();
        assert!(tollgate_core::period::rfc3339_utc_seconds(text).is_some(), "{field}: {text}");
    }
    assert_eq!(full.body["related_object"]["id"].as_str(), Some(meter.as_str()));
    // Nothing new, nothing sent.
    assert!(fake.report_meter_errors().await?.is_empty());
    Ok(())
}

async fn fake_stripe_sends_thin_events_signed_with_the_destinations_secret() -> anyhow::Result<()> {
    const SECRET: &str = "whsec_destination_0123456789";
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let receiver = Receiver::start().await?;
    fake.add_event_destination(ACCOUNT, &receiver.url, SECRET);
    let stripe = Caller::new(&fake, KEY, None);
    let (meter, _) = stripe.provision().await?;
    stripe.meter_event(Some("mtb_1-1"), "cus_nobody", "mtb_1", 1, now()).await?;
    let answers = fake.report_meter_errors().await?;
    assert_eq!(answers, [(StatusCode::OK, "ok".to_owned())]);

    let (signature, body) = receiver.deliveries()[0].clone();
    tollgate_core::signature::verify(SECRET, &signature, body.as_bytes(), now(), 300)?;
    assert!(
        tollgate_core::signature::verify("whsec_test_0123456789abcdef0123", &signature, body.as_bytes(), now(), 300)
            .is_err()
    );
    let thin: Value = serde_json::from_str(&body)?;
    // A thin event: the envelope and a reference, no data.
    assert_eq!(thin["object"], "v2.core.event");
    assert_eq!(thin["type"], "v1.billing.meter.error_report_triggered");
    assert!(thin["id"].as_str().unwrap_or_default().starts_with("evt_"));
    assert!(thin["context"].is_null(), "the account's own destination: no context");
    assert_eq!(thin["livemode"], false);
    let created = thin["created"].as_str().unwrap_or_default();
    assert!(tollgate_core::period::rfc3339_utc_seconds(created).is_some_and(|t| (t - now()).abs() < 60), "{created}");
    assert_eq!(thin["related_object"]["id"].as_str(), Some(meter.as_str()));
    assert_eq!(thin["related_object"]["type"], "billing.meter");
    assert_eq!(thin["related_object"]["url"].as_str(), Some(format!("/v1/billing/meters/{meter}").as_str()));
    assert!(thin.get("data").is_none() && thin.get("account").is_none(), "{thin}");
    // What core reads of it.
    let parsed: tollgate_core::stripe::ThinEvent = serde_json::from_str(&body)?;
    assert_eq!((parsed.object.as_str(), parsed.context), (tollgate_core::stripe::THIN_EVENT_OBJECT, None));
    Ok(())
}

async fn fake_stripe_serves_a_v2_event_on_its_account_only() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT), (OTHER_KEY, OTHER_ACCOUNT)]).await?;
    fake.add_platform_key(PLATFORM_KEY, "acct_platform");
    fake.add_connected_account(PLATFORM_KEY, CONNECTED);
    fake.add_connected_account(PLATFORM_KEY, "acct_connected_other");
    let receiver = Receiver::start().await?;
    // The platform's destination gets its connected accounts' events, each naming its account.
    fake.add_event_destination("acct_platform", &receiver.url, "whsec_platform_destination01");
    let connected = Caller::new(&fake, PLATFORM_KEY, Some(CONNECTED));
    connected.provision().await?;
    connected.meter_event(Some("mtb_c-1"), "cus_nobody", "mtb_c", 1, now()).await?;
    fake.report_meter_errors().await?;
    let (signature, body) = receiver.deliveries()[0].clone();
    tollgate_core::signature::verify("whsec_platform_destination01", &signature, body.as_bytes(), now(), 300)?;
    let thin: Value = serde_json::from_str(&body)?;
    assert_eq!(thin["context"].as_str(), Some(CONNECTED), "{thin}");
    let id = thin["id"].as_str().unwrap_or_default().to_owned();

    // On the connected account (Stripe-Context): the full event.
    let full = v2_event(&fake, PLATFORM_KEY, Some(CONNECTED), &id).await?;
    assert_eq!(full.status, StatusCode::OK, "{}", full.body);
    assert_eq!(full.body["context"].as_str(), Some(CONNECTED));
    assert_eq!(full.body["data"]["reason"]["error_types"][0]["sample_errors"][0]["request"]["identifier"], "mtb_c-1");
    // Anywhere else: 404 (the platform's own account, another connected account, another key's
    // account), or 403 for an account the key cannot act on.
    for (key, context) in
        [(PLATFORM_KEY, None), (PLATFORM_KEY, Some("acct_connected_other")), (OTHER_KEY, None), (KEY, None)]
    {
        let elsewhere = v2_event(&fake, key, context, &id).await?;
        assert_eq!(
            (elsewhere.status, elsewhere.code()),
            (StatusCode::NOT_FOUND, "resource_missing"),
            "{key} {context:?}"
        );
    }
    let forbidden = v2_event(&fake, OTHER_KEY, Some(CONNECTED), &id).await?;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    Ok(())
}

/// Invoicing by hand (`fake_stripe::invoice_items`) and customers (`payments`): an invoice
/// takes pending items only with `pending_invoice_items_behavior=include`; a sent invoice needs
/// `days_until_due`; a finalized invoice cannot be finalized again; automatic tax is refused
/// until the customer has an address; a default payment method must be the customer's own;
/// a deleted customer is "No such customer" everywhere.
async fn fake_stripe_invoices_by_hand_and_deleted_customers_follow_stripes_rules() -> anyhow::Result<()> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    let stripe = Caller::new(&fake, KEY, None);
    let customer = stripe.customer("customer-1").await?.id();
    let item = |amount: &'static str| {
        let form = vec![("customer", customer.clone()), ("currency", "usd".to_owned()), ("amount", amount.to_owned())];
        let stripe = &stripe;
        async move { stripe.post("/invoiceitems", None, &form).await }
    };
    let made = item("250").await?;
    assert_eq!((made.status, made.body["invoice"].clone()), (StatusCode::OK, Value::Null), "{}", made.body);
    let invoice = |extra: Vec<(&'static str, String)>| {
        let mut form = vec![("customer", customer.clone()), ("currency", "usd".to_owned())];
        form.extend(extra);
        let stripe = &stripe;
        async move { stripe.post("/invoices", None, &form).await }
    };
    // Excluded by default: the item stays pending.
    let empty =
        invoice(vec![("collection_method", "send_invoice".to_owned()), ("days_until_due", "30".to_owned())]).await?;
    assert_eq!((empty.status, empty.body["total"].as_i64()), (StatusCode::OK, Some(0)), "{}", empty.body);
    let no_due = invoice(vec![("collection_method", "send_invoice".to_owned())]).await?;
    assert_eq!(no_due.status, StatusCode::BAD_REQUEST, "{}", no_due.body);
    let taken = invoice(vec![
        ("collection_method", "send_invoice".to_owned()),
        ("days_until_due", "30".to_owned()),
        ("pending_invoice_items_behavior", "include".to_owned()),
    ])
    .await?;
    assert_eq!((taken.status, taken.body["total"].as_i64()), (StatusCode::OK, Some(250)), "{}", taken.body);
    let finalize = |id: String| {
        let stripe = &stripe;
        async move { stripe.post(&format!("/invoices/{id}/finalize"), None, &[]).await }
    };
    let open = finalize(taken.id()).await?;
    assert_eq!((open.status, open.body["status"].as_str()), (StatusCode::OK, Some("open")), "{}", open.body);
    assert!(open.body["due_date"].as_i64().is_some());
    assert_eq!(finalize(taken.id()).await?.status, StatusCode::BAD_REQUEST, "finalized twice");

    // Automatic tax needs the customer's location.
    let taxed = invoice(vec![
        ("pending_invoice_items_behavior", "include".to_owned()),
        ("automatic_tax[enabled]", "true".to_owned()),
    ])
    .await?;
    let refused = finalize(taxed.id()).await?;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "customer_tax_location_invalid");

    // A default payment method must be attached to the customer.
    let foreign = stripe
        .post(
            &format!("/customers/{customer}"),
            None,
            &[("invoice_settings[default_payment_method]", "pm_other".to_owned())],
        )
        .await?;
    assert_eq!(foreign.status, StatusCode::BAD_REQUEST, "{}", foreign.body);
    assert_eq!(foreign.body["error"]["code"], "resource_missing");
    assert_eq!(foreign.body["error"]["param"], "invoice_settings[default_payment_method]");

    // Deleted: gone from every call.
    let deleted = stripe.send(stripe.http.delete(format!("{}/v1/customers/{customer}", fake.base_url()))).await?;
    assert_eq!(
        (deleted.status, deleted.body["deleted"].clone()),
        (StatusCode::OK, Value::Bool(true)),
        "{}",
        deleted.body
    );
    let gone = item("100").await?;
    assert_eq!((gone.status, gone.body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("resource_missing")));
    assert_eq!(stripe.get(&format!("/customers/{customer}")).await?.status, StatusCode::NOT_FOUND);
    Ok(())
}

//! Billing through Stripe, against the fake Stripe over real HTTP: provisioning makes each object
//! once, usage reaches Stripe exactly once (Stripe down for a while, rate limits, a worker killed
//! mid-batch), meter events equal the ledger per customer, invoices and subscription events apply
//! the blocking policy, reconciliation finds no drift, and Stripe Connect acts on the connected
//! account.

use std::collections::HashMap;

use reqwest::StatusCode;
use serde_json::json;
use tollgate_core::billing;
use tollgate_core::projects::{BudgetPolicy, NewProject};
use tollgate_core::stripe;
use tollgate_core::with_db;
use tollgate_jobs::billing::{self as jobs, BillingServices};

use crate::dashboard::Browser;
use crate::db_cases;
use crate::fake_stripe::FakeStripe;
use crate::helpers::{DbCase, TestDatabase, TestResult};
use crate::proxy::{Setup, setup_project};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        provisioning_makes_each_stripe_object_once,
        usage_reaches_stripe_once_and_invoices_apply_the_policy,
        stripe_down_then_back_and_rate_limits_deliver_everything_once,
        a_worker_killed_mid_batch_sends_no_duplicate_and_loses_nothing,
        refused_meter_events_are_shown_and_retried_on_request,
        subscription_events_are_mirrored_and_thin_events_refused_at_the_webhook_endpoint,
        connect_mode_acts_on_the_connected_account,
        the_workers_provision_deliver_and_reconcile_on_their_own,
        a_worker_process_killed_mid_batch_and_restarted_delivers_once,
        a_value_over_15_digits_goes_as_meter_events_that_sum_to_it,
        meter_events_go_one_at_a_time_per_customer_and_side_by_side_across_customers,
        delivery_keeps_to_the_test_mode_rate_limit_and_waits_out_429s,
        delivered_batches_are_never_sent_again_after_the_dedup_window,
        reconciliation_does_not_count_stripes_lag_as_drift,
        a_customer_with_a_batch_in_flight_is_left_to_its_worker,
    ]
}

pub(crate) const KEY: &str = "rk_test_51Htenantkey0001";
pub(crate) const ACCOUNT: &str = "acct_tenant1";
pub(crate) const WHSEC: &str = "whsec_test_0123456789abcdef0123";
pub(crate) const PLATFORM_KEY: &str = "sk_test_51Hplatformkey001";
pub(crate) const PLATFORM: &str = "acct_platform";
pub(crate) const CONNECT_CLIENT_ID: &str = "ca_fakeplatform0001";
const CONNECT_WHSEC: &str = "whsec_test_connect0123456789abcd";

pub(crate) struct Billing {
    pub(crate) s: Setup,
    pub(crate) fake: FakeStripe,
    pub(crate) services: BillingServices,
}

async fn billing_setup(db: &TestDatabase) -> anyhow::Result<Billing> {
    billing_setup_with(db, |_| {}).await
}

pub(crate) async fn billing_setup_with(
    db: &TestDatabase,
    customize: impl FnOnce(&mut HashMap<String, String>),
) -> anyhow::Result<Billing> {
    let new =
        NewProject { name: "Chat".into(), policy: BudgetPolicy::Reject, min_output_tokens: 1, ..NewProject::default() };
    billing_setup_for(db, new, customize).await
}

/// [`billing_setup_with`] for a project made as `new` says (its currency, say).
pub(crate) async fn billing_setup_for(
    db: &TestDatabase,
    new: NewProject,
    customize: impl FnOnce(&mut HashMap<String, String>),
) -> anyhow::Result<Billing> {
    let fake = FakeStripe::start(&[(KEY, ACCOUNT)]).await?;
    fake.add_platform_key(PLATFORM_KEY, PLATFORM);
    fake.add_connect_client(CONNECT_CLIENT_ID, PLATFORM_KEY);
    let base = fake.base_url();
    let s = setup_project(db, new, |env| {
        env.insert("TOLLGATE_STRIPE_API_BASE".into(), base.clone());
        env.insert("TOLLGATE_STRIPE_OAUTH_BASE".into(), base);
        env.insert("TOLLGATE_STRIPE_CONNECT_CLIENT_ID".into(), CONNECT_CLIENT_ID.into());
        env.insert("TOLLGATE_STRIPE_PLATFORM_KEY".into(), PLATFORM_KEY.into());
        env.insert("TOLLGATE_STRIPE_CONNECT_WEBHOOK_SECRET".into(), CONNECT_WHSEC.into());
        customize(env);
    })
    .await?;
    let state = &s.app.state;
    let services = BillingServices::new(&state.config, state.master_key.clone(), state.http.clone());
    Ok(Billing { s, fake, services })
}

impl Billing {
    pub(crate) async fn connect_with_key(&self) -> anyhow::Result<()> {
        let state = &self.s.app.state;
        stripe::connect_with_key(&state.db, &state.master_key, &self.s.project.id, KEY, WHSEC).await?;
        Ok(())
    }

    /// Calls for `customer`, each of `tokens` output tokens; returns their billed total.
    pub(crate) async fn calls(&self, customer: &str, count: usize, tokens: i64) -> anyhow::Result<()> {
        self.s.budget(customer, 1_000_000).await?;
        for _ in 0..count {
            let body = json!({"model": "mock-model", "max_tokens": tokens,
                "messages": [{"role": "user", "content": "Hello!"}]});
            let response = self.s.chat(customer, body).await?;
            anyhow::ensure!(response.status() == StatusCode::OK, "{}", response.text().await?);
        }
        Ok(())
    }

    pub(crate) async fn provision(&self) -> anyhow::Result<jobs::ProvisionReport> {
        Ok(jobs::provision(&self.s.app.state.db, &self.services).await?)
    }

    pub(crate) async fn deliver(&self) -> anyhow::Result<jobs::DeliveryReport> {
        Ok(jobs::deliver(&self.s.app.state.db, &self.services).await?)
    }

    /// The ledger's billed total per customer (external id).
    pub(crate) async fn ledger(&self) -> anyhow::Result<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = with_db!(&self.s.app.state.db, pool => sqlx::query_as::<_, (String, i64)>(
            "SELECT c.external_id, CAST(SUM(u.billed_nanos) AS BIGINT) FROM usage_events u \
             JOIN customers c ON c.id = u.customer_id WHERE u.status = 'settled' GROUP BY c.external_id")
            .fetch_all(pool).await)?;
        Ok(rows.into_iter().collect())
    }

    /// What the fake counted per customer (external id), from accepted meter events.
    async fn metered(&self, account: &str) -> anyhow::Result<HashMap<String, i64>> {
        let links: Vec<(String, String)> = with_db!(&self.s.app.state.db, pool => sqlx::query_as::<_, (String, String)>(
            "SELECT stripe_customer_id, external_id FROM customers WHERE stripe_customer_id IS NOT NULL")
            .fetch_all(pool).await)?;
        let links: HashMap<String, String> = links.into_iter().collect();
        let mut totals = HashMap::new();
        for event in self.fake.meter_events(account) {
            let customer = links.get(&event.stripe_customer_id).cloned().unwrap_or(event.stripe_customer_id.clone());
            *totals.entry(customer).or_insert(0) += event.value;
        }
        Ok(totals)
    }

    /// Identifiers the fake accepted more than once (must be none) and how many it accepted.
    fn accepted_identifiers(&self, account: &str) -> (usize, Vec<String>) {
        let mut seen = HashMap::new();
        for event in self.fake.meter_events(account) {
            *seen.entry(event.identifier).or_insert(0) += 1;
        }
        let twice = seen.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id.clone()).collect();
        (seen.len(), twice)
    }

    /// Batches the unbatched settled usage now (as a delivery run would first).
    async fn form_batches(&self) -> anyhow::Result<usize> {
        let state = &self.s.app.state;
        let project = billing::project_billing(&state.db, &self.s.project.id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no billing"))?;
        Ok(billing::form_batches(&state.db, &project, 100).await?)
    }

    /// Sets the billed amount of one settled call of `customer` (as a call in a weak currency).
    async fn bill_one_call(&self, customer: &str, nanos: i64) -> anyhow::Result<()> {
        let n = with_db!(&self.s.app.state.db, pool => sqlx::query(
            "UPDATE usage_events SET billed_nanos = $1 WHERE id = (SELECT MIN(u.id) FROM usage_events u \
             JOIN customers c ON c.id = u.customer_id WHERE c.external_id = $2 AND u.status = 'settled' \
             AND u.meter_batch_id IS NULL)")
            .bind(nanos).bind(customer).execute(pool).await.map(|r| r.rows_affected()))?;
        anyhow::ensure!(n == 1, "no unbatched call of {customer}");
        Ok(())
    }

    pub(crate) async fn stripe_customer(&self, customer: &str) -> anyhow::Result<String> {
        Ok(with_db!(&self.s.app.state.db, pool => sqlx::query_scalar::<_, String>(
            "SELECT stripe_customer_id FROM customers WHERE external_id = $1").bind(customer).fetch_one(pool).await)?)
    }

    /// Delivers until nothing is pending (retries wait out their backoff), within `limit`.
    async fn deliver_all(&self, limit: std::time::Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + limit;
        while self.batches("pending").await? > 0 {
            anyhow::ensure!(std::time::Instant::now() < deadline, "not delivered in time");
            self.deliver().await?;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Ok(())
    }

    async fn batches(&self, status: &str) -> anyhow::Result<i64> {
        Ok(with_db!(&self.s.app.state.db, pool => sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM meter_batches WHERE status = $1").bind(status).fetch_one(pool).await)?)
    }

    pub(crate) async fn billing_page(&self) -> anyhow::Result<String> {
        let browser = Browser::new(&self.s.app)?;
        browser.log_in("ada@example.com", crate::dashboard::PASSWORD).await?;
        let page = browser.get(&format!("/projects/{}/billing", self.s.project.id)).await?;
        anyhow::ensure!(page.status == StatusCode::OK, "{}", page.body);
        Ok(page.body)
    }

    pub(crate) async fn process_events(&self) -> anyhow::Result<Vec<(String, stripe::Processed)>> {
        Ok(stripe::process_pending(&self.s.app.state.db, 100).await?)
    }
}

fn section<'a>(body: &'a str, id: &str) -> &'a str {
    let marker = format!("id=\"{id}\"");
    body.split(&marker).nth(1).and_then(|r| r.split("</dd>").next()).unwrap_or_default()
}

async fn provisioning_makes_each_stripe_object_once(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    b.calls("cust-a", 2, 10).await?;
    b.calls("cust-b", 1, 10).await?;
    b.provision().await?;
    b.provision().await?;

    let meters = b.fake.meters(ACCOUNT);
    assert_eq!(meters.len(), 1, "{meters:?}");
    let meter = &meters[0];
    assert_eq!(meter["event_name"], format!("tollgate_usage_{}", b.s.project.id));
    assert_eq!(meter["default_aggregation"]["formula"], "sum");
    assert_eq!(meter["customer_mapping"]["event_payload_key"], "stripe_customer_id");
    let prices = b.fake.prices(ACCOUNT);
    assert_eq!(prices.len(), 1, "{prices:?}");
    assert_eq!(prices[0]["currency"], "usd");
    assert_eq!(prices[0]["unit_amount_decimal"], "0.0000001");
    assert_eq!(prices[0]["recurring"]["usage_type"], "metered");
    assert_eq!(prices[0]["recurring"]["meter"], meter["id"]);
    let customers = b.fake.customers(ACCOUNT);
    assert_eq!(customers.len(), 2, "{customers:?}");
    let subscriptions = b.fake.subscriptions(ACCOUNT);
    assert_eq!(subscriptions.len(), 2, "{subscriptions:?}");

    // A crash between Stripe making the customer and Tollgate recording it: the same
    // Idempotency-Key gets the same customer back, and nothing is made twice.
    with_db!(&b.s.app.state.db, pool => sqlx::query(
        "UPDATE customers SET stripe_customer_id = NULL, stripe_subscription_id = NULL, stripe_subscription_status = NULL \
         WHERE external_id = 'cust-a'").execute(pool).await.map(|_| ()))?;
    b.provision().await?;
    assert_eq!(b.fake.customers(ACCOUNT).len(), 2);
    assert_eq!(b.fake.subscriptions(ACCOUNT).len(), 2);
    let linked: Vec<Option<String>> = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar::<_, Option<String>>(
        "SELECT stripe_subscription_status FROM customers ORDER BY external_id").fetch_all(pool).await)?;
    assert_eq!(linked, vec![Some("active".to_owned()), Some("active".to_owned())]);
    let seen = b.fake.seen();
    let replayed = seen.iter().filter(|r| r.path == "/v1/customers").count();
    assert_eq!(replayed, 3, "two customers, one replayed");
    let posts: Vec<_> = seen.iter().filter(|r| r.method == "POST").collect();
    assert!(posts.iter().all(|r| r.idempotency_key.is_some()), "every POST carries an Idempotency-Key");
    // Every call names the API version the SDK's types were generated for (checked against
    // the SDK in `stripe_sdk`), so no tenant account's default version changes the shapes
    // Tollgate reads.
    assert!(seen.iter().all(|r| r.version.as_deref() == Some(tollgate_jobs::stripe_api::STRIPE_VERSION)), "{seen:?}");
    let meter_form =
        &posts.iter().find(|r| r.path == "/v1/billing/meters").ok_or_else(|| anyhow::anyhow!("no meter"))?.form;
    assert!(
        meter_form.contains(&("value_settings[event_payload_key]".to_owned(), "value".to_owned())),
        "{meter_form:?}"
    );

    let page = b.billing_page().await?;
    assert!(page.contains(meter["id"].as_str().unwrap_or("?")), "{page}");
    assert!(page.contains("cust-a") && page.contains("active"), "{page}");
    Ok(())
}

async fn usage_reaches_stripe_once_and_invoices_apply_the_policy(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    b.calls("cust-a", 3, 20).await?;
    b.calls("cust-b", 2, 7).await?;
    b.provision().await?;
    let report = b.deliver().await?;
    assert_eq!(report.delivered, 2, "{report:?}");
    b.calls("cust-a", 1, 5).await?;
    b.deliver().await?;
    b.deliver().await?;

    let ledger = b.ledger().await?;
    assert_eq!(ledger.len(), 2);
    assert_eq!(b.metered(ACCOUNT).await?, ledger, "meter events equal the ledger per customer");
    let (accepted, twice) = b.accepted_identifiers(ACCOUNT);
    assert_eq!((accepted, twice), (3, vec![]));
    assert_eq!(b.batches("delivered").await?, 3);
    // Every meter event carries the meter's event name and a timestamp Stripe accepts.
    let event_name = format!("tollgate_usage_{}", b.s.project.id);
    assert!(b.fake.meter_events(ACCOUNT).iter().all(|e| e.event_name == event_name));

    // Reconciliation: Stripe's summaries agree with what was delivered.
    assert_eq!(jobs::reconcile(&b.s.app.state.db, &b.services).await?, 2);
    let drift: Vec<(Option<i64>, Option<i64>)> = with_db!(&b.s.app.state.db, pool => sqlx::query_as::<_, (Option<i64>, Option<i64>)>(
        "SELECT drift_nanos, stripe_nanos FROM billing_reconciliations ORDER BY customer_id").fetch_all(pool).await)?;
    assert_eq!(drift.len(), 2);
    assert!(drift.iter().all(|(d, s)| *d == Some(0) && s.unwrap_or(0) > 0), "{drift:?}");
    let page = b.billing_page().await?;
    assert!(section(&page, "delivery-lag").contains("none"), "{page}");

    // Stripe invoices cust-a; the payment fails: blocked. It is paid: unblocked.
    let cus_a: String = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar::<_, String>(
        "SELECT stripe_customer_id FROM customers WHERE external_id = 'cust-a'").fetch_one(pool).await)?;
    let webhook = b.s.app.url(&format!("/stripe/webhooks/{}", b.s.project.id));
    let invoice = b.fake.make_invoice(ACCOUNT, &cus_a, "open", 1234);
    let (status, _) = b.fake.send_event(&webhook, WHSEC, "invoice.payment_failed", invoice.clone(), None).await?;
    assert_eq!(status, StatusCode::OK);
    b.process_events().await?;
    let refused =
        b.s.chat(
            "cust-a",
            json!({"model": "mock-model", "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await?;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let page = b.billing_page().await?;
    assert!(page.contains("payment failed") && page.contains("12.34 USD"), "{page}");

    let mut paid = invoice;
    paid["status"] = json!("paid");
    paid["amount_paid"] = json!(1234);
    let (status, _) = b.fake.send_event(&webhook, WHSEC, "invoice.paid", paid, None).await?;
    assert_eq!(status, StatusCode::OK);
    b.process_events().await?;
    b.calls("cust-a", 1, 5).await?;
    let page = b.billing_page().await?;
    assert!(page.contains(">paid<"), "{page}");
    Ok(())
}

async fn stripe_down_then_back_and_rate_limits_deliver_everything_once(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    b.calls("cust-a", 2, 10).await?;
    b.provision().await?;
    b.fake.go_down().await?;
    b.calls("cust-b", 2, 10).await?;
    b.calls("cust-a", 1, 10).await?;
    let report = b.deliver().await?;
    assert_eq!((report.delivered, report.failed), (0, 0), "{report:?}");
    assert!(report.retrying >= 1, "{report:?}");
    let page = b.billing_page().await?;
    assert!(page.contains("Stripe could not be reached") && page.contains("retrying"), "{page}");

    b.fake.come_back().await?;
    // cust-b has no Stripe customer yet: provisioning was down too.
    b.provision().await?;
    b.fake.set_rate_limit(2);
    // And a 500, which Stripe saves for the attempt's Idempotency-Key: the retry must use a key
    // of its own, or it would get the same 500 back for a day.
    b.fake.fail_next(1, 500);
    // Retries wait out their backoff (2 s, then 4 s); keep delivering until all is in.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while b.batches("pending").await? > 0 || b.ledger().await? != b.metered(ACCOUNT).await? {
        anyhow::ensure!(std::time::Instant::now() < deadline, "not delivered in time");
        b.provision().await?;
        b.deliver().await?;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(b.fake.meter_event_attempts(ACCOUNT).len() > b.fake.meter_events(ACCOUNT).len(), "429s were retried");
    let keys: Vec<_> = b
        .fake
        .seen()
        .into_iter()
        .filter(|r| r.path == "/v1/billing/meter_events")
        .filter_map(|r| r.idempotency_key)
        .collect();
    let distinct: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "a key per attempt: {keys:?}");
    let (_, twice) = b.accepted_identifiers(ACCOUNT);
    assert!(twice.is_empty(), "{twice:?}");
    assert_eq!(b.metered(ACCOUNT).await?, b.ledger().await?);
    assert_eq!(b.batches("failed").await?, 0);
    Ok(())
}

async fn a_worker_killed_mid_batch_sends_no_duplicate_and_loses_nothing(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    b.calls("cust-a", 2, 10).await?;
    b.calls("cust-b", 2, 10).await?;
    b.calls("cust-c", 1, 10).await?;
    b.provision().await?;
    let state = &b.s.app.state;
    let project =
        billing::project_billing(&state.db, &b.s.project.id).await?.ok_or_else(|| anyhow::anyhow!("no billing"))?;
    assert_eq!(billing::form_batches(&state.db, &project, 100).await?, 3);

    // A worker claims the three batches, Stripe accepts the first, and the worker dies before
    // recording it (and before sending the others).
    let now = tollgate_core::time::UnixMillis::now();
    let claimed = billing::claim_due_batches(&state.db, &b.s.project.id, now, 100, 3_000).await?;
    assert_eq!(claimed.len(), 3);
    let credentials = tollgate_jobs::stripe_api::Credentials { key: KEY.to_owned().into(), account: None };
    assert_eq!(jobs::send(&b.services.api, &credentials, &claimed[0]).await, billing::Attempt::Delivered);
    // Another worker runs meanwhile: the claims hold, nothing is sent twice.
    assert_eq!(b.deliver().await?.delivered, 0);
    assert_eq!(b.fake.meter_events(ACCOUNT).len(), 1);

    // The dead worker's claims expire (a minute, here set back by hand); a restarted worker
    // sends all three, each attempt with an Idempotency-Key of its own: Stripe refuses the
    // first by its identifier, and that counts as delivered.
    b.fake.forget_idempotency_keys();
    with_db!(&state.db, pool => sqlx::query("UPDATE meter_batches SET claimed_until = 0").execute(pool).await.map(|_| ()))?;
    let report = b.deliver().await?;
    assert_eq!(report.delivered, 3, "{report:?}");
    assert_eq!(b.fake.meter_event_attempts(ACCOUNT).len(), 4, "one resend");
    let (accepted, twice) = b.accepted_identifiers(ACCOUNT);
    assert_eq!((accepted, twice), (3, vec![]));
    assert_eq!(b.metered(ACCOUNT).await?, b.ledger().await?);
    Ok(())
}

async fn refused_meter_events_are_shown_and_retried_on_request(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    b.calls("cust-a", 1, 10).await?;
    b.provision().await?;
    b.fake.fail_next(1, 400);
    let report = b.deliver().await?;
    assert_eq!(report.failed, 1, "{report:?}");
    assert_eq!(b.batches("failed").await?, 1);
    b.deliver().await?;
    assert_eq!(b.fake.meter_events(ACCOUNT).len(), 0, "a refused event is not retried by itself");
    let page = b.billing_page().await?;
    assert!(section(&page, "delivery-failed").contains('1'), "{page}");
    assert!(page.contains("refused"), "{page}");

    // The tenant fixes it and asks for a retry.
    let browser = Browser::new(&b.s.app)?;
    browser.log_in("ada@example.com", crate::dashboard::PASSWORD).await?;
    let billing = format!("/projects/{}/billing", b.s.project.id);
    let retried = browser.submit(&billing, &format!("{billing}/retry"), &[]).await?;
    assert_eq!(retried.status, StatusCode::SEE_OTHER, "{}", retried.body);
    assert_eq!(b.deliver().await?.delivered, 1);
    assert_eq!(b.metered(ACCOUNT).await?, b.ledger().await?);
    Ok(())
}

async fn subscription_events_are_mirrored_and_thin_events_refused_at_the_webhook_endpoint(
    db: TestDatabase,
) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    b.calls("cust-a", 1, 10).await?;
    b.provision().await?;
    let (cus, sub): (String, String) = with_db!(&b.s.app.state.db, pool => sqlx::query_as::<_, (String, String)>(
        "SELECT stripe_customer_id, stripe_subscription_id FROM customers WHERE external_id = 'cust-a'")
        .fetch_one(pool).await)?;
    let webhook = b.s.app.url(&format!("/stripe/webhooks/{}", b.s.project.id));
    let subscription = |status: &str| json!({"id": sub, "object": "subscription", "customer": cus, "status": status});
    // Deleted, then an older "past_due" arrives late: it stays canceled.
    b.fake.send_event(&webhook, WHSEC, "customer.subscription.deleted", subscription("canceled"), None).await?;
    b.process_events().await?;
    let stale = json!({"id": "evt_stale_1", "object": "event", "type": "customer.subscription.updated",
        "created": 1_700_000_000, "livemode": false, "data": {"object": subscription("past_due")}});
    let (status, _) = b.fake.send_raw(&webhook, WHSEC, &stale).await?;
    assert_eq!(status, StatusCode::OK);
    b.process_events().await?;
    let shown: Option<String> = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar::<_, Option<String>>(
        "SELECT stripe_subscription_status FROM customers WHERE external_id = 'cust-a'").fetch_one(pool).await)?;
    assert_eq!(shown.as_deref(), Some("canceled"));

    // A v2 thin event is not a webhook-endpoint event: refused there (it goes to the event
    // destination, see `meter_errors`), and nothing is stored.
    let meter: String = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar::<_, String>(
        "SELECT meter_id FROM stripe_connections").fetch_one(pool).await)?;
    let thin = json!({"id": "evt_thin_1", "object": "v2.core.event", "type": "v1.billing.meter.error_report_triggered",
        "created": "2026-11-22T10:15:30.123Z", "livemode": false,
        "related_object": {"id": meter, "type": "billing.meter", "url": format!("/v1/billing/meters/{meter}")}});
    let (status, body) = b.fake.send_raw(&webhook, WHSEC, &thin).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let stored: i64 = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM stripe_events WHERE id = 'evt_thin_1'").fetch_one(pool).await)?;
    assert_eq!(stored, 0);
    let page = b.billing_page().await?;
    assert!(page.contains("canceled"), "{page}");
    Ok(())
}

async fn connect_mode_acts_on_the_connected_account(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    // Through the dashboard and Stripe's OAuth (the fake's), as the account's owner approves.
    let browser = Browser::new(&b.s.app)?;
    browser.log_in("ada@example.com", crate::dashboard::PASSWORD).await?;
    let billing = format!("/projects/{}/billing", b.s.project.id);
    let connected =
        crate::connect_onboarding::connect_through_oauth(&b, &browser, &billing, Some("acct_connected1")).await?;
    assert_eq!(connected.status, StatusCode::SEE_OTHER, "{}", connected.body);

    b.calls("cust-a", 2, 10).await?;
    b.provision().await?;
    b.deliver().await?;
    assert_eq!(b.metered("acct_connected1").await?, b.ledger().await?);
    assert!(b.fake.meter_events(PLATFORM).is_empty(), "nothing on the platform's own account");
    let calls: Vec<_> = b.fake.seen().into_iter().filter(|r| r.path != "/v1/account").collect();
    assert!(!calls.is_empty());
    assert!(
        calls.iter().all(|r| r.key.as_deref() == Some(PLATFORM_KEY) && r.account.as_deref() == Some("acct_connected1")),
        "{calls:?}"
    );

    // The platform's Connect endpoint files the account's events under the project.
    let connect = b.s.app.url("/stripe/webhooks/connect");
    let cus: String = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar::<_, String>(
        "SELECT stripe_customer_id FROM customers WHERE external_id = 'cust-a'").fetch_one(pool).await)?;
    let invoice = b.fake.make_invoice("acct_connected1", &cus, "open", 500);
    let (status, _) =
        b.fake.send_event(&connect, CONNECT_WHSEC, "invoice.payment_failed", invoice, Some("acct_connected1")).await?;
    assert_eq!(status, StatusCode::OK);
    // Another account's event is acknowledged and ignored; a forged one is refused.
    let other = b.fake.make_invoice("acct_other", "cus_x", "open", 1);
    let (status, answer) =
        b.fake.send_event(&connect, CONNECT_WHSEC, "invoice.paid", other.clone(), Some("acct_other")).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(answer.contains("ignored"), "{answer}");
    let (status, _) = b.fake.send_event(&connect, WHSEC, "invoice.paid", other, Some("acct_connected1")).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    b.process_events().await?;
    let page = b.billing_page().await?;
    assert!(page.contains("acct_connected1") && page.contains("payment failed"), "{page}");
    let blocked: bool = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar::<_, bool>(
        "SELECT blocked FROM customers WHERE external_id = 'cust-a'").fetch_one(pool).await)?;
    assert!(blocked);
    Ok(())
}

async fn the_workers_provision_deliver_and_reconcile_on_their_own(db: TestDatabase) -> TestResult {
    let b = billing_setup_with(&db, |env| {
        env.insert("TOLLGATE_WORKERS".into(), "true".into());
        env.insert("TOLLGATE_STRIPE_RECONCILE_SECONDS".into(), "2".into());
    })
    .await?;
    b.connect_with_key().await?;
    b.calls("cust-a", 3, 10).await?;
    b.calls("cust-b", 1, 10).await?;
    let ledger = b.ledger().await?;
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        Ok(b.metered(ACCOUNT).await? == ledger)
    })
    .await?;
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        let checked: Vec<Option<i64>> = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar::<_, Option<i64>>(
            "SELECT drift_nanos FROM billing_reconciliations").fetch_all(pool).await)?;
        Ok(checked.len() == 2 && checked.iter().all(|d| *d == Some(0)))
    })
    .await?;
    let (_, twice) = b.accepted_identifiers(ACCOUNT);
    assert!(twice.is_empty(), "{twice:?}");
    Ok(())
}

/// A `tollgate worker` child process on the test's database, calling the fake Stripe.
fn worker_process(db: &TestDatabase, fake: &FakeStripe) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.arg("worker").kill_on_drop(true);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("TOLLGATE_")) {
        cmd.env_remove(key);
    }
    let mut env = db.env();
    env.insert("TOLLGATE_STRIPE_API_BASE".into(), fake.base_url());
    env.insert("TOLLGATE_LOG".into(), "warn".into());
    Ok(cmd.envs(env).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).spawn()?)
}

async fn a_worker_process_killed_mid_batch_and_restarted_delivers_once(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    for customer in ["cust-a", "cust-b", "cust-c", "cust-d"] {
        b.calls(customer, 2, 10).await?;
    }
    b.provision().await?;
    // Stripe accepts each meter event at once but answers only 5 s later: the worker is killed
    // (SIGKILL) while it waits, with events accepted and not recorded as delivered.
    b.fake.set_meter_event_latency(std::time::Duration::from_secs(5));
    let mut worker = worker_process(&db, &b.fake)?;
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        Ok(!b.fake.meter_events(ACCOUNT).is_empty())
    })
    .await?;
    worker.start_kill()?;
    worker.wait().await?;
    assert!(b.batches("pending").await? > 0, "the killed worker recorded nothing");
    assert!(!b.fake.meter_events(ACCOUNT).is_empty());

    // Restarted once its claims have expired (a minute; set back by hand here).
    b.fake.set_meter_event_latency(std::time::Duration::ZERO);
    with_db!(&b.s.app.state.db, pool => sqlx::query("UPDATE meter_batches SET claimed_until = 0")
        .execute(pool).await.map(|_| ()))?;
    let mut worker = worker_process(&db, &b.fake)?;
    let ledger = b.ledger().await?;
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        Ok(b.batches("pending").await? == 0 && b.metered(ACCOUNT).await? == ledger)
    })
    .await?;
    worker.start_kill()?;
    let (accepted, twice) = b.accepted_identifiers(ACCOUNT);
    assert_eq!((accepted as i64, twice), (b.batches("delivered").await?, vec![]));
    // The killed worker's events were sent again and refused as duplicates of what Stripe has.
    let sent = b.fake.seen().iter().filter(|r| r.path == "/v1/billing/meter_events").count();
    assert!(sent > accepted, "{sent} sent for {accepted} accepted");
    // And on the invoices (issue 21): each customer is charged exactly its billed total, and
    // Tollgate's invoice reconciliation finds no drift.
    b.close_periods().await;
    for customer in ["cust-a", "cust-b", "cust-c", "cust-d"] {
        b.invoiced_as_billed(customer).await?;
    }
    let checks = b.invoices_reported().await?;
    assert_eq!(checks.iter().filter(|c| **c == tollgate_core::stripe::InvoiceCheck::Matches).count(), 4, "{checks:?}");
    Ok(())
}

/// What the outbox holds for a customer: (id, value, status), by id.
async fn batch_rows(b: &Billing, customer: &str) -> anyhow::Result<Vec<(String, i64, String)>> {
    Ok(with_db!(&b.s.app.state.db, pool => sqlx::query_as::<_, (String, i64, String)>(
        "SELECT b.id, b.value_nanos, b.status FROM meter_batches b JOIN customers c ON c.id = b.customer_id \
         WHERE c.external_id = $1 ORDER BY b.id").bind(customer).fetch_all(pool).await)?)
}

async fn a_value_over_15_digits_goes_as_meter_events_that_sum_to_it(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    b.calls("cust-a", 2, 10).await?;
    b.calls("cust-b", 1, 10).await?;
    // 2.5 million units of a weak currency (and a little), in nano-units: 16 digits, more than the
    // 15 Stripe takes in one meter event.
    const HUGE: i64 = 2_500_000_000_000_123;
    b.bill_one_call("cust-a", HUGE).await?;
    b.provision().await?;
    let report = b.deliver().await?;
    assert_eq!((report.delivered, report.failed, report.retrying), (4, 0, 0), "{report:?}");

    // cust-a's batch went as three meter events of at most 15 digits, summing to it exactly,
    // with identifiers fixed by the batch: its id, then the id with the part's number.
    let rows = batch_rows(&b, "cust-a").await?;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let base = rows[0].0.clone();
    assert_eq!(
        rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        [base.clone(), format!("{base}-1"), format!("{base}-2")]
    );
    assert!(rows.iter().all(|r| r.2 == "delivered"), "{rows:?}");
    let cus_a = b.stripe_customer("cust-a").await?;
    let events: Vec<_> = b.fake.meter_events(ACCOUNT).into_iter().filter(|e| e.stripe_customer_id == cus_a).collect();
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e.value.to_string().len() <= 15 && e.value > 0), "{events:?}");
    let mut identifiers: Vec<_> = events.iter().map(|e| e.identifier.clone()).collect();
    identifiers.sort();
    assert_eq!(identifiers, rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>());
    let ledger = b.ledger().await?;
    assert!(ledger["cust-a"] > HUGE);
    assert_eq!(b.metered(ACCOUNT).await?, ledger, "the parts sum to the ledger exactly");
    assert_eq!(b.fake.meter_event_attempts(ACCOUNT).len(), 4, "nothing refused");

    // Every answer lost and every part sent again: Stripe knows each part by its identifier.
    b.fake.forget_idempotency_keys();
    with_db!(&b.s.app.state.db, pool => sqlx::query("UPDATE meter_batches SET status = 'pending', \
        delivered_at = NULL, claimed_until = 0, next_attempt_at = 0").execute(pool).await.map(|_| ()))?;
    let report = b.deliver().await?;
    assert_eq!((report.delivered, report.failed), (4, 0), "{report:?}");
    assert_eq!(b.fake.meter_event_attempts(ACCOUNT).len(), 8);
    assert_eq!(b.fake.meter_events(ACCOUNT).len(), 4, "no part counted twice");
    assert_eq!(b.metered(ACCOUNT).await?, ledger);
    Ok(())
}

async fn meter_events_go_one_at_a_time_per_customer_and_side_by_side_across_customers(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    let customers = ["cust-a", "cust-b", "cust-c"];
    for customer in customers {
        b.calls(customer, 1, 10).await?;
    }
    b.provision().await?;
    // Three batches per customer, each round of calls batched on its own.
    for _ in 0..3 {
        for customer in customers {
            b.calls(customer, 1, 10).await?;
        }
        assert_eq!(b.form_batches().await?, 3);
    }
    // Stripe takes 300 ms to answer each: a second request for a customer while one is being
    // answered would be refused with 429 lock_timeout.
    b.fake.set_meter_event_latency(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    let report = b.deliver().await?;
    let elapsed = started.elapsed();
    b.fake.set_meter_event_latency(std::time::Duration::ZERO);
    assert_eq!((report.delivered, report.retrying, report.failed), (9, 0, 0), "{report:?}");
    assert_eq!(b.fake.lock_timeouts(), 0, "one request at a time per customer and meter");
    assert!(b.fake.meter_events_in_flight_max() >= 2, "customers go side by side");
    assert!(b.fake.meter_events_in_flight_max() <= 3);
    // Each customer's three one after the other.
    assert!(elapsed >= std::time::Duration::from_millis(900), "{elapsed:?}");
    assert_eq!(b.metered(ACCOUNT).await?, b.ledger().await?);
    Ok(())
}

async fn delivery_keeps_to_the_test_mode_rate_limit_and_waits_out_429s(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    let customers = ["cust-a", "cust-b", "cust-c"];
    for customer in customers {
        b.calls(customer, 1, 10).await?;
        // Twelve meter events' worth each: 36 in all, more than test mode's 25 a second.
        b.bill_one_call(customer, 12 * billing::MAX_METER_EVENT_VALUE).await?;
    }
    b.provision().await?;
    // Provisioning's own calls leave the limiter's second.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let started = std::time::Instant::now();
    let report = b.deliver().await?;
    let elapsed = started.elapsed();
    assert_eq!((report.delivered, report.retrying, report.failed), (36, 0, 0), "{report:?}");
    assert_eq!(b.fake.rate_limit_refusals(), 0, "paced under the test-mode limit");
    // 20 a second by default in test mode: the 36th about 1.75 s after the first.
    assert!(elapsed >= std::time::Duration::from_millis(1_700), "{elapsed:?}");
    assert_eq!(b.metered(ACCOUNT).await?, b.ledger().await?);

    // A 429 anyway (the tenant's own calls took the account's limit): the batch waits, it does
    // not fail, and the project holds its meter events back until the wait is over.
    b.calls("cust-a", 1, 10).await?;
    b.calls("cust-b", 1, 10).await?;
    b.fake.set_rate_limit(1);
    let report = b.deliver().await?;
    assert_eq!((report.retrying, report.failed), (1, 0), "{report:?}");
    let sent = b.fake.meter_event_attempts(ACCOUNT).len();
    let report = b.deliver().await?;
    assert_eq!(report.delivered + report.retrying + report.failed, 0, "paused: {report:?}");
    assert_eq!(b.fake.meter_event_attempts(ACCOUNT).len(), sent);
    let page = b.billing_page().await?;
    assert!(page.contains("rate limit"), "{page}");
    b.deliver_all(std::time::Duration::from_secs(20)).await?;
    assert_eq!(b.batches("failed").await?, 0);

    // Another request for cust-a is being answered when Tollgate sends one: Stripe's 429
    // lock_timeout (Stripe-Should-Retry: true) is waited out the same way.
    b.calls("cust-a", 1, 10).await?;
    b.fake.set_meter_event_latency(std::time::Duration::from_secs(3));
    let cus_a = b.stripe_customer("cust-a").await?;
    let event_name = format!("tollgate_usage_{}", b.s.project.id);
    let url = format!("{}/v1/billing/meter_events", b.fake.base_url());
    let other = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .bearer_auth(KEY)
            .form(&[
                ("event_name", event_name),
                ("payload[stripe_customer_id]", cus_a),
                ("payload[value]", "1".to_owned()),
                ("identifier", "elsewhere-1".to_owned()),
            ])
            .send()
            .await
            .map(|r| r.status())
    });
    crate::helpers::eventually(std::time::Duration::from_secs(10), || async {
        Ok(b.fake.meter_events(ACCOUNT).iter().any(|e| e.identifier == "elsewhere-1"))
    })
    .await?;
    let report = b.deliver().await?;
    assert_eq!((report.retrying, report.failed), (1, 0), "{report:?}");
    assert_eq!(b.fake.lock_timeouts(), 1);
    assert_eq!(other.await??, StatusCode::OK);
    b.fake.set_meter_event_latency(std::time::Duration::ZERO);
    b.deliver_all(std::time::Duration::from_secs(20)).await?;
    assert_eq!(b.batches("failed").await?, 0);
    let (_, twice) = b.accepted_identifiers(ACCOUNT);
    assert!(twice.is_empty(), "{twice:?}");
    let mut ledger = b.ledger().await?;
    *ledger.entry("cust-a".to_owned()).or_default() += 1;
    assert_eq!(b.metered(ACCOUNT).await?, ledger);
    Ok(())
}

async fn delivered_batches_are_never_sent_again_after_the_dedup_window(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    b.calls("cust-a", 2, 10).await?;
    b.calls("cust-b", 1, 10).await?;
    b.provision().await?;
    assert_eq!(b.deliver().await?.delivered, 2);
    let sent = b.fake.meter_event_attempts(ACCOUNT).len();

    // A day later Stripe has forgotten the identifiers and the idempotency keys: a batch sent
    // again would be counted again.
    b.fake.set_identifier_window(std::time::Duration::ZERO);
    b.fake.forget_idempotency_keys();
    // Every way a batch could come back: claims expired, "retry what failed", more runs.
    with_db!(&b.s.app.state.db, pool => sqlx::query("UPDATE meter_batches SET claimed_until = 0, next_attempt_at = 0")
        .execute(pool).await.map(|_| ()))?;
    billing::retry_now(&b.s.app.state.db, &b.s.project.id).await?;
    for _ in 0..3 {
        let report = b.deliver().await?;
        assert_eq!(report.delivered + report.retrying + report.failed, 0, "{report:?}");
    }
    assert_eq!(b.fake.meter_event_attempts(ACCOUNT).len(), sent, "nothing delivered is sent again");
    assert_eq!(b.batches("delivered").await?, 2);
    assert_eq!(b.metered(ACCOUNT).await?, b.ledger().await?);

    // New usage still goes, and only it. While it waits more than half of Stripe's default
    // invoice grace period (an hour), the page warns that it may miss its invoice.
    b.calls("cust-a", 1, 5).await?;
    assert_eq!(b.form_batches().await?, 1);
    assert!(!section(&b.billing_page().await?, "delivery-lag").contains("may miss its invoice"));
    with_db!(&b.s.app.state.db, pool => sqlx::query(
        "UPDATE meter_batches SET first_at = first_at - 2400000 WHERE status = 'pending'")
        .execute(pool).await.map(|_| ()))?;
    let page = b.billing_page().await?;
    assert!(section(&page, "delivery-lag").contains("may miss its invoice"), "{page}");
    assert_eq!(b.deliver().await?.delivered, 1);
    assert!(!section(&b.billing_page().await?, "delivery-lag").contains("may miss its invoice"));
    assert_eq!(b.fake.meter_event_attempts(ACCOUNT).len(), sent + 1);
    assert_eq!(b.metered(ACCOUNT).await?, b.ledger().await?);
    Ok(())
}

/// Reconciliation rows: external id → (delivered, Stripe's count, drift).
async fn reconciliations(b: &Billing) -> anyhow::Result<HashMap<String, (i64, Option<i64>, Option<i64>)>> {
    let rows: Vec<(String, i64, Option<i64>, Option<i64>)> = with_db!(&b.s.app.state.db, pool =>
        sqlx::query_as::<_, (String, i64, Option<i64>, Option<i64>)>(
            "SELECT c.external_id, r.delivered_nanos, r.stripe_nanos, r.drift_nanos FROM billing_reconciliations r \
             JOIN customers c ON c.id = r.customer_id").fetch_all(pool).await)?;
    Ok(rows.into_iter().map(|(c, d, s, drift)| (c, (d, s, drift))).collect())
}

async fn reconciliation_does_not_count_stripes_lag_as_drift(db: TestDatabase) -> TestResult {
    let mut b = billing_setup(&db).await?;
    b.services.summary_settle = std::time::Duration::from_secs(6);
    b.fake.set_summary_lag(std::time::Duration::from_secs(3));
    b.connect_with_key().await?;
    b.calls("cust-a", 2, 10).await?;
    b.calls("cust-b", 1, 10).await?;
    b.provision().await?;
    assert_eq!(b.deliver().await?.delivered, 2);
    let ledger = b.ledger().await?;

    // Stripe has not counted them yet: no drift.
    assert_eq!(jobs::reconcile(&b.s.app.state.db, &b.services).await?, 2);
    for (customer, (delivered, stripe, drift)) in reconciliations(&b).await? {
        assert_eq!((delivered, stripe, drift), (ledger[&customer], Some(0), Some(0)), "{customer}");
    }
    // Counted: the same, with Stripe's count.
    tokio::time::sleep(std::time::Duration::from_millis(3_100)).await;
    jobs::reconcile(&b.s.app.state.db, &b.services).await?;
    for (customer, (delivered, stripe, drift)) in reconciliations(&b).await? {
        assert_eq!((delivered, stripe, drift), (ledger[&customer], Some(ledger[&customer]), Some(0)), "{customer}");
    }

    // A meter event Stripe never counted, delivered long enough ago to be in its summary: drift,
    // once what was just delivered has settled too (6 s here).
    tokio::time::sleep(std::time::Duration::from_millis(3_100)).await;
    with_db!(&b.s.app.state.db, pool => sqlx::query(
        "INSERT INTO meter_batches (id, project_id, customer_id, stripe_customer_id, event_name, value_nanos, events, \
            first_at, last_at, status, attempts, next_attempt_at, created_at, delivered_at) \
         SELECT 'mtb_lost', project_id, id, stripe_customer_id, $1, 1234, 1, $2, $2, 'delivered', 1, 0, $3, $3 \
         FROM customers WHERE external_id = 'cust-a'")
        .bind(format!("tollgate_usage_{}", b.s.project.id))
        .bind(tollgate_core::time::UnixMillis::now().0)
        .bind(tollgate_core::time::UnixMillis::now().0 - 60_000)
        .execute(pool).await.map(|_| ()))?;
    jobs::reconcile(&b.s.app.state.db, &b.services).await?;
    let rows = reconciliations(&b).await?;
    assert_eq!(rows["cust-a"], (ledger["cust-a"] + 1234, Some(ledger["cust-a"]), Some(-1234)));
    assert_eq!(rows["cust-b"].2, Some(0));
    Ok(())
}

async fn a_customer_with_a_batch_in_flight_is_left_to_its_worker(db: TestDatabase) -> TestResult {
    let b = billing_setup(&db).await?;
    b.connect_with_key().await?;
    b.calls("cust-a", 1, 10).await?;
    b.calls("cust-b", 1, 10).await?;
    b.provision().await?;
    assert_eq!(b.form_batches().await?, 2);
    b.calls("cust-a", 1, 10).await?;
    b.calls("cust-b", 1, 10).await?;
    assert_eq!(b.form_batches().await?, 2);
    let (db, project) = (&b.s.app.state.db, &b.s.project.id);
    let now = tollgate_core::time::UnixMillis::now();

    // One worker claims one batch; another, a moment later, takes only the other customer's.
    let first = billing::claim_due_batches(db, project, now, 1, 3_000).await?;
    assert_eq!(first.len(), 1);
    let busy = first[0].stripe_customer_id.clone();
    let later = tollgate_core::time::UnixMillis(now.0 + 1);
    let second = billing::claim_due_batches(db, project, later, 100, 3_000).await?;
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(second.iter().all(|batch| batch.stripe_customer_id != busy), "{second:?}");
    // Once the first worker is done with its batch, the customer's next one can be claimed.
    billing::record_attempt(db, &first[0].id, &billing::Attempt::Delivered).await?;
    let third = billing::claim_due_batches(db, project, tollgate_core::time::UnixMillis(now.0 + 2), 100, 3_000).await?;
    assert_eq!(third.iter().map(|batch| batch.stripe_customer_id.clone()).collect::<Vec<_>>(), [busy]);
    Ok(())
}

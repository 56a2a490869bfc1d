//! Meter errors Stripe finds after accepting a meter event (issue 21), end to end against the
//! fake Stripe: Stripe answers 200 to a meter event for a customer it no longer has, then sends
//! the v2 thin event `v1.billing.meter.error_report_triggered` to the event destination; Tollgate
//! checks it with the destination's own secret, fetches the full event and sends the batch back
//! to *failed* with Stripe's reason, shown on the billing page. Connect projects' reports come
//! through the platform's destination and are routed by `context`.

use reqwest::StatusCode;
use serde_json::json;
use tollgate_core::billing;
use tollgate_core::stripe;
use tollgate_core::with_db;

use crate::billing::{ACCOUNT, Billing, PLATFORM, PLATFORM_KEY, WHSEC, billing_setup_with};
use crate::dashboard::Browser;
use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        a_meter_event_stripe_reports_later_goes_back_to_failed_with_stripes_reason,
        a_thin_event_with_the_wrong_secret_or_at_the_wrong_endpoint_is_refused_and_changes_nothing,
        a_connect_projects_report_is_routed_by_context,
    ]
}

const EVENT_SECRET: &str = "whsec_test_destination0123456789";
const CONNECT_EVENT_SECRET: &str = "whsec_test_connectdestination0123";
const CONNECTED: &str = "acct_connected1";

async fn setup(db: &TestDatabase, workers: bool) -> anyhow::Result<Billing> {
    billing_setup_with(db, |env| {
        env.insert("TOLLGATE_STRIPE_CONNECT_EVENT_SECRET".into(), CONNECT_EVENT_SECRET.into());
        if workers {
            env.insert("TOLLGATE_WORKERS".into(), "true".into());
        }
    })
    .await
}

/// The project's batches: (customer external id, status, last error, Stripe's code, identifier).
type BatchRow = (String, String, Option<String>, Option<String>, Option<String>);

async fn batches(b: &Billing) -> anyhow::Result<Vec<BatchRow>> {
    Ok(with_db!(&b.s.app.state.db, pool => sqlx::query_as::<_, BatchRow>(
        "SELECT c.external_id, m.status, m.last_error, m.stripe_error_code, m.meter_identifier FROM meter_batches m \
         JOIN customers c ON c.id = m.customer_id WHERE m.project_id = $1 ORDER BY c.external_id")
        .bind(&b.s.project.id).fetch_all(pool).await)?)
}

async fn stored_events(b: &Billing) -> anyhow::Result<i64> {
    Ok(with_db!(&b.s.app.state.db, pool => sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM stripe_events").fetch_one(pool).await)?)
}

async fn process_thin_events(b: &Billing) -> anyhow::Result<tollgate_jobs::meter_errors::ThinReport> {
    Ok(tollgate_jobs::meter_errors::process_thin_events(&b.s.app.state.db, &b.services, 50).await?)
}

async fn a_meter_event_stripe_reports_later_goes_back_to_failed_with_stripes_reason(db: TestDatabase) -> TestResult {
    let b = setup(&db, false).await?;
    b.connect_with_key().await?;
    // The destination's secret, set on the billing page (the webhook secret is refused there).
    let browser = Browser::new(&b.s.app)?;
    browser.log_in("ada@example.com", crate::dashboard::PASSWORD).await?;
    let billing_path = format!("/projects/{}/billing", b.s.project.id);
    let action = format!("{billing_path}/event-secret");
    let refused = browser.submit(&billing_path, &action, &[("event_secret", WHSEC)]).await?;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert!(refused.body.contains("webhook endpoint"), "{}", refused.body);
    let saved = browser.submit(&billing_path, &action, &[("event_secret", EVENT_SECRET)]).await?;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    let destination = b.s.app.url(&format!("/stripe/events/{}", b.s.project.id));
    b.fake.add_event_destination(ACCOUNT, &destination, EVENT_SECRET);

    b.calls("cust-a", 2, 10).await?;
    b.calls("cust-b", 1, 10).await?;
    b.provision().await?;
    // cust-a's Stripe customer is deleted in Stripe's dashboard; Tollgate does not know.
    let cus_a = b.stripe_customer("cust-a").await?;
    b.fake.delete_customer(ACCOUNT, &cus_a);
    let report = b.deliver().await?;
    assert_eq!((report.delivered, report.failed), (2, 0), "Stripe accepts both: {report:?}");
    assert!(batches(&b).await?.iter().all(|(_, status, ..)| status == "delivered"));

    // Stripe's validation finds the unknown customer and reports it through the destination.
    let answers = b.fake.report_meter_errors().await?;
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].0, StatusCode::OK, "{}", answers[0].1);
    // Stored, not processed yet; sent again (Stripe retries), stored once.
    let thin = b.fake.v2_events(ACCOUNT);
    assert_eq!(thin.len(), 1);
    let done = process_thin_events(&b).await?;
    assert_eq!((done.processed, done.reports, done.batches_failed), (1, 1, 1), "{done:?}");
    let fetched: Vec<_> = b.fake.seen().into_iter().filter(|r| r.path.starts_with("/v2/core/events/")).collect();
    assert_eq!(fetched.len(), 1);
    assert_eq!((fetched[0].key.as_deref(), fetched[0].account.as_deref()), (Some(crate::billing::KEY), None));

    let rows = batches(&b).await?;
    let (_, status, error, code, identifier) = &rows[0];
    assert_eq!((rows[0].0.as_str(), status.as_str()), ("cust-a", "failed"), "{rows:?}");
    assert_eq!(code.as_deref(), Some("meter_event_customer_not_found"));
    let error = error.clone().unwrap_or_default();
    assert!(error.contains("meter_event_customer_not_found") && error.contains(&cus_a), "{error}");
    assert!(identifier.is_some(), "sent again, the batch needs another identifier");
    assert_eq!(rows[1].1, "delivered", "cust-b's usage was counted: {rows:?}");

    // The billing page: the batch with Stripe's reason, and the report itself.
    let page = b.billing_page().await?;
    let problems = page.split("id=\"delivery-problems\"").nth(1).unwrap_or_default();
    assert!(problems.contains("cust-a") && problems.contains("meter_event_customer_not_found"), "{page}");
    let reports = page.split("id=\"meter-error-reports\"").nth(1).unwrap_or_default();
    assert!(
        reports.contains("There is 1 invalid event") && reports.contains(thin[0]["id"].as_str().unwrap_or("?")),
        "{page}"
    );
    assert!(page.contains(&format!("/stripe/events/{}", b.s.project.id)), "the destination URL: {page}");
    assert!(page.contains("v1.billing.meter.error_report_triggered"));

    // The same report again changes nothing.
    let thin_again = json!({"id": thin[0]["id"], "object": "v2.core.event", "type": thin[0]["type"],
        "created": thin[0]["created"], "livemode": false, "context": null, "related_object": thin[0]["related_object"]});
    let (status, body) = b.fake.send_raw(&destination, EVENT_SECRET, &thin_again).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"duplicate\":true"), "{body}");
    assert_eq!(process_thin_events(&b).await?.processed, 0);

    // Retried, it goes under its new identifier (Stripe keeps the failed one's): accepted, not a
    // duplicate, and reported again while the customer is still missing.
    assert_eq!(billing::retry_now(&b.s.app.state.db, &b.s.project.id).await?, 1);
    b.deliver().await?;
    let last = b.fake.meter_event_attempts(ACCOUNT).last().cloned().ok_or_else(|| anyhow::anyhow!("no attempt"))?;
    assert_eq!(Some(last.identifier.clone()), identifier.clone());
    assert_eq!(b.fake.pending_meter_errors(ACCOUNT).len(), 1);
    Ok(())
}

async fn a_thin_event_with_the_wrong_secret_or_at_the_wrong_endpoint_is_refused_and_changes_nothing(
    db: TestDatabase,
) -> TestResult {
    let b = setup(&db, false).await?;
    b.connect_with_key().await?;
    let state = &b.s.app.state;
    // The webhook endpoint's secret cannot be the destination's too.
    let same = stripe::set_event_secret(&state.db, &state.master_key, &b.s.project.id, Some(WHSEC)).await;
    assert!(matches!(same, Err(stripe::StripeError::Invalid { field: "event_secret", .. })), "{same:?}");
    stripe::set_event_secret(&state.db, &state.master_key, &b.s.project.id, Some(EVENT_SECRET)).await?;
    let destination = b.s.app.url(&format!("/stripe/events/{}", b.s.project.id));
    let webhook = b.s.app.url(&format!("/stripe/webhooks/{}", b.s.project.id));
    let thin = json!({"id": "evt_test_forged1", "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered", "created": "2026-11-22T10:15:30.123Z", "livemode": false,
        "context": null, "related_object": {"id": "mtr_x", "type": "billing.meter", "url": "/v1/billing/meters/mtr_x"}});

    // Signed with the webhook endpoint's secret, or another: refused at the destination.
    for secret in [WHSEC, "whsec_test_someoneelse0123456789"] {
        let (status, body) = b.fake.send_raw(&destination, secret, &thin).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("signature"), "{body}");
    }
    // A thin event at the webhook endpoint (even with its secret), a snapshot event at the
    // destination (even with its secret): refused.
    let (status, body) = b.fake.send_raw(&webhook, WHSEC, &thin).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("event destination"), "{body}");
    let snapshot = json!({"id": "evt_snap1", "object": "event", "type": "invoice.paid", "created": 1_700_000_000,
        "livemode": false, "data": {"object": {}}});
    let (status, body) = b.fake.send_raw(&destination, EVENT_SECRET, &snapshot).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // Not JSON, no signature: 400 in the caller's shape.
    let unsigned = reqwest::Client::new().post(&destination).body("{}").send().await?;
    assert_eq!(unsigned.status(), StatusCode::BAD_REQUEST);
    let answer: serde_json::Value = unsigned.json().await?;
    assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains("Stripe-Signature")), "{answer}");
    // A project without a destination secret, or no project: 404.
    let (status, _) = b.fake.send_raw(&b.s.app.url("/stripe/events/prj_nonexistent"), EVENT_SECRET, &thin).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(stored_events(&b).await?, 0, "nothing stored");
    assert_eq!(process_thin_events(&b).await?.processed, 0);

    // Signed with the destination's own secret: taken.
    let (status, body) = b.fake.send_raw(&destination, EVENT_SECRET, &thin).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(stored_events(&b).await?, 1);
    // The fake has no such event on the account: Stripe's 404 sets it aside, with the answer.
    let done = process_thin_events(&b).await?;
    assert_eq!((done.processed, done.reports), (1, 0), "{done:?}");
    let error: Option<String> = with_db!(&state.db, pool => sqlx::query_scalar::<_, Option<String>>(
        "SELECT last_error FROM stripe_events WHERE id = 'evt_test_forged1'").fetch_one(pool).await)?;
    assert!(error.unwrap_or_default().contains("404"));
    Ok(())
}

async fn a_connect_projects_report_is_routed_by_context(db: TestDatabase) -> TestResult {
    let b = setup(&db, true).await?;
    let browser = Browser::new(&b.s.app)?;
    browser.log_in("ada@example.com", crate::dashboard::PASSWORD).await?;
    let billing_path = format!("/projects/{}/billing", b.s.project.id);
    let connected =
        crate::connect_onboarding::connect_through_oauth(&b, &browser, &billing_path, Some(CONNECTED)).await?;
    assert_eq!(connected.status, StatusCode::SEE_OTHER, "{}", connected.body);
    // The platform's destination receives its connected accounts' thin events.
    let platform_destination = b.s.app.url("/stripe/events/connect");
    b.fake.add_event_destination(PLATFORM, &platform_destination, CONNECT_EVENT_SECRET);

    b.calls("cust-a", 1, 10).await?;
    // The workers provision and deliver on their own.
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        Ok(b.fake.subscriptions(CONNECTED).len() == 1)
    })
    .await?;
    let cus_a = b.stripe_customer("cust-a").await?;
    b.fake.delete_customer(CONNECTED, &cus_a);
    b.calls("cust-a", 1, 10).await?;
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        Ok(!b.fake.pending_meter_errors(CONNECTED).is_empty())
    })
    .await?;
    let answers = b.fake.report_meter_errors().await?;
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].0, StatusCode::OK, "{}", answers[0].1);
    let thin = b.fake.v2_events(CONNECTED);
    assert_eq!(thin[0]["context"].as_str(), Some(CONNECTED));
    // The workers fetch the event on the connected account and fail the batch.
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        Ok(batches(&b).await?.iter().any(|(_, status, _, code, _)| {
            status == "failed" && code.as_deref() == Some("meter_event_customer_not_found")
        }))
    })
    .await?;
    let fetched: Vec<_> = b.fake.seen().into_iter().filter(|r| r.path.starts_with("/v2/core/events/")).collect();
    assert!(!fetched.is_empty());
    assert!(fetched.iter().all(|r| r.key.as_deref() == Some(PLATFORM_KEY)), "{fetched:?}");
    // Counted in /metrics.
    let metrics = b.s.app.get("/metrics").await?.text().await?;
    assert!(metrics.contains("tollgate_meter_events_total{outcome=\"reported_failed\"}"), "{metrics}");
    assert!(metrics.contains("tollgate_stripe_meter_error_reports_total"), "{metrics}");

    // Another account's thin event: acknowledged, ignored; one signed with the project's webhook
    // secret, or the Connect webhook endpoint's: refused.
    let other = json!({"id": "evt_test_other1", "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered", "created": "2026-11-22T10:15:30.123Z", "livemode": false,
        "context": "acct_someone_else", "related_object": {"id": "mtr_x", "type": "billing.meter", "url": "/v1/billing/meters/mtr_x"}});
    let (status, body) = b.fake.send_raw(&platform_destination, CONNECT_EVENT_SECRET, &other).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("ignored"), "{body}");
    let mut forged = other.clone();
    forged["context"] = json!(CONNECTED);
    for secret in [WHSEC, "whsec_test_connect0123456789abcd"] {
        let (status, _) = b.fake.send_raw(&platform_destination, secret, &forged).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    let stored: i64 = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM stripe_events WHERE id IN ('evt_test_other1')").fetch_one(pool).await)?;
    assert_eq!(stored, 0);
    let page = b.billing_page().await?;
    assert!(page.contains("meter_event_customer_not_found"), "{page}");
    Ok(())
}

//! Stripe's webhooks arriving: a signed event is stored once by id and acknowledged; forged,
//! replayed, tampered and wrong-mode deliveries are refused and store nothing.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::projects::BudgetPolicy;
use tollgate_core::signature;
use tollgate_core::stripe;
use tollgate_core::time::UnixMillis;
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::eventually;
use crate::helpers::{DbCase, TestDatabase, TestResult};
use crate::proxy::{Setup, setup, setup_with};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        a_signed_event_is_stored_once_and_acknowledged,
        forged_replayed_and_malformed_deliveries_are_refused,
        secrets_are_checked_and_stored_encrypted,
        invoices_take_the_furthest_state_whatever_the_order_of_events,
        a_failed_payment_blocks_the_customer_until_paid,
        only_a_payment_lifts_a_block_whatever_events_follow,
    ]
}

const WEBHOOK_SECRET: &str = "whsec_test_0123456789abcdef0123";

async fn connected(db: &TestDatabase) -> anyhow::Result<Setup> {
    let s = setup(db, BudgetPolicy::Reject).await?;
    let state = &s.app.state;
    stripe::connect_with_key(&state.db, &state.master_key, &s.project.id, "rk_test_51Habcdefgh1234", WEBHOOK_SECRET)
        .await?;
    Ok(s)
}

fn event(id: &str, kind: &str) -> String {
    json!({
        "id": id, "object": "event", "type": kind, "livemode": false, "created": 1_795_000_000,
        "api_version": "2026-09-30.endive",
        "data": {"object": {"id": "in_1", "object": "invoice", "status": "paid"}}
    })
    .to_string()
}

pub(crate) async fn deliver(
    s: &Setup,
    path_project: &str,
    body: &str,
    signature: Option<String>,
) -> anyhow::Result<(StatusCode, Value)> {
    let mut request = s.app.client.post(s.app.url(&format!("/stripe/webhooks/{path_project}"))).body(body.to_owned());
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    let response = request.header("content-type", "application/json").send().await?;
    Ok((response.status(), response.json().await.unwrap_or(Value::Null)))
}

pub(crate) fn now() -> i64 {
    UnixMillis::now().0 / 1000
}

async fn stored(s: &Setup) -> anyhow::Result<Vec<(String, String)>> {
    Ok(with_db!(&s.app.state.db, pool => sqlx::query_as::<_, (String, String)>(
        "SELECT id, type FROM stripe_events ORDER BY id").fetch_all(pool).await)?)
}

async fn a_signed_event_is_stored_once_and_acknowledged(db: TestDatabase) -> TestResult {
    let s = connected(&db).await?;
    let project = s.project.id.to_string();
    let body = event("evt_1", "invoice.paid");
    let (status, answer) =
        deliver(&s, &project, &body, Some(signature::header(WEBHOOK_SECRET, now(), body.as_bytes()))).await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["duplicate"], false);
    // Stripe delivers again (a retry, or a second signature a minute later): stored once.
    let (status, answer) =
        deliver(&s, &project, &body, Some(signature::header(WEBHOOK_SECRET, now() - 60, body.as_bytes()))).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["duplicate"], true);
    let other = event("evt_2", "invoice.payment_failed");
    let (status, _) =
        deliver(&s, &project, &other, Some(signature::header(WEBHOOK_SECRET, now(), other.as_bytes()))).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        stored(&s).await?,
        [("evt_1".to_owned(), "invoice.paid".to_owned()), ("evt_2".to_owned(), "invoice.payment_failed".to_owned())]
    );
    let payload: String = with_db!(&s.app.state.db, pool => sqlx::query_scalar(
        "SELECT payload FROM stripe_events WHERE id = 'evt_1'").fetch_one(pool).await)?;
    assert_eq!(payload, body, "the raw body is kept as received");
    s.app.stop().await
}

async fn forged_replayed_and_malformed_deliveries_are_refused(db: TestDatabase) -> TestResult {
    let s = connected(&db).await?;
    let project = s.project.id.to_string();
    let body = event("evt_9", "invoice.paid");
    let live = event("evt_8", "invoice.paid").replace("\"livemode\":false", "\"livemode\":true");
    let cases: Vec<(&str, String, String, Option<String>, StatusCode)> = vec![
        ("no signature", project.clone(), body.clone(), None, StatusCode::BAD_REQUEST),
        (
            "forged: another secret",
            project.clone(),
            body.clone(),
            Some(signature::header("whsec_attacker_0000000000000", now(), body.as_bytes())),
            StatusCode::BAD_REQUEST,
        ),
        (
            "replayed: 10 minutes old",
            project.clone(),
            body.clone(),
            Some(signature::header(WEBHOOK_SECRET, now() - 600, body.as_bytes())),
            StatusCode::BAD_REQUEST,
        ),
        (
            "tampered body",
            project.clone(),
            body.replace("paid", "void"),
            Some(signature::header(WEBHOOK_SECRET, now(), body.as_bytes())),
            StatusCode::BAD_REQUEST,
        ),
        ("garbage header", project.clone(), body.clone(), Some("nonsense".to_owned()), StatusCode::BAD_REQUEST),
        (
            "signed, not an event",
            project.clone(),
            "[1,2]".to_owned(),
            Some(signature::header(WEBHOOK_SECRET, now(), b"[1,2]")),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a live event to a test connection",
            project.clone(),
            live.clone(),
            Some(signature::header(WEBHOOK_SECRET, now(), live.as_bytes())),
            StatusCode::BAD_REQUEST,
        ),
        (
            "no such project",
            "prj_0190aaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_owned(),
            body.clone(),
            Some(signature::header(WEBHOOK_SECRET, now(), body.as_bytes())),
            StatusCode::NOT_FOUND,
        ),
        (
            "not a project id",
            "../admin".to_owned(),
            body.clone(),
            Some(signature::header(WEBHOOK_SECRET, now(), body.as_bytes())),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (name, path_project, payload, sig, expected) in cases {
        let (status, answer) = deliver(&s, &path_project, &payload, sig).await?;
        assert_eq!(status, expected, "{name}: {answer}");
        if status == StatusCode::BAD_REQUEST {
            assert!(answer["error"]["message"].is_string(), "{name}: {answer}");
        }
    }
    assert!(stored(&s).await?.is_empty(), "a refused delivery was stored");
    s.app.stop().await
}

async fn secrets_are_checked_and_stored_encrypted(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    let state = &s.app.state;
    for (key, secret) in [
        ("pk_test_51Habcdefgh1234", WEBHOOK_SECRET),
        ("not a key", WEBHOOK_SECRET),
        ("rk_test_51Habcdefgh1234", "secret"),
    ] {
        let refused = stripe::connect_with_key(&state.db, &state.master_key, &s.project.id, key, secret).await;
        assert!(matches!(refused, Err(stripe::StripeError::Invalid { .. })), "{key} / {secret}: {refused:?}");
    }
    assert!(stripe::connection(&state.db, &s.project.id).await?.is_none(), "a refused connection was saved");
    let connection = stripe::connect_with_key(
        &state.db,
        &state.master_key,
        &s.project.id,
        "rk_live_51Habcdefgh1234",
        WEBHOOK_SECRET,
    )
    .await?;
    assert!(connection.livemode);
    assert_eq!(connection.key_hint.as_deref(), Some("rk_live_…1234"));
    let raw: (String, String) = with_db!(&state.db, pool => sqlx::query_as(
        "SELECT secret_key_sealed, webhook_secret_sealed FROM stripe_connections").fetch_one(pool).await)?;
    assert!(!raw.0.contains("rk_live") && !raw.1.contains("whsec_"), "secrets stored in the clear: {raw:?}");
    s.app.stop().await
}

/// A `kind` event of `invoice`, as Stripe has the invoice then: attempted once by a failed
/// payment or a payment, not yet before.
pub(crate) fn invoice_event(id: &str, kind: &str, created: i64, invoice: &str, customer: &str, status: &str) -> String {
    let attempts = i64::from(kind == "invoice.payment_failed" || status == "paid");
    invoice_event_after(id, kind, created, invoice, customer, status, attempts)
}

/// [`invoice_event`] after `attempts` payment attempts.
fn invoice_event_after(
    id: &str,
    kind: &str,
    created: i64,
    invoice: &str,
    customer: &str,
    status: &str,
    attempts: i64,
) -> String {
    let paid = if status == "paid" { 1234 } else { 0 };
    json!({
        "id": id, "object": "event", "type": kind, "livemode": false, "created": created,
        "data": {"object": {
            "id": invoice, "object": "invoice", "customer": customer, "number": format!("INV-{invoice}"),
            "status": status, "currency": "usd", "amount_due": 1234, "amount_paid": paid,
            "amount_remaining": 1234 - paid, "attempted": attempts > 0, "attempt_count": attempts,
            "next_payment_attempt": if status == "open" && attempts > 0 { json!(created + 3 * 86_400) } else { json!(null) },
            "hosted_invoice_url": format!("https://invoice.stripe.com/i/{invoice}"), "livemode": false
        }}
    })
    .to_string()
}

/// Waits until the workers have processed every stored event.
async fn every_event_processed(s: &Setup) -> anyhow::Result<()> {
    let db = s.app.state.db.clone();
    eventually(std::time::Duration::from_secs(20), || async {
        let waiting: i64 = with_db!(&db, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM stripe_events WHERE processed_at IS NULL").fetch_one(pool).await)?;
        Ok(waiting == 0)
    })
    .await
}

async fn invoices_take_the_furthest_state_whatever_the_order_of_events(db: TestDatabase) -> TestResult {
    let s = setup_with(&db, BudgetPolicy::Reject, |env| {
        env.insert("TOLLGATE_WORKERS".into(), "true".into());
    })
    .await?;
    let state = s.app.state.clone();
    stripe::connect_with_key(&state.db, &state.master_key, &s.project.id, "rk_test_51Habcdefgh1234", WEBHOOK_SECRET)
        .await?;
    s.budget("acme-1", 100).await?;
    let customer = tollgate_core::projects::find_customer(&state.db, &s.project.id, "acme-1").await?.unwrap();
    assert!(stripe::link_customer(&state.db, &s.project.id, &customer.id, "cus_A1").await?);
    let project = s.project.id.to_string();
    let t = 1_795_000_000;
    let finalized = invoice_event("evt_a", "invoice.finalized", t, "in_1", "cus_A1", "open");
    let failed = invoice_event("evt_b", "invoice.payment_failed", t + 10, "in_1", "cus_A1", "open");
    let paid = invoice_event("evt_c", "invoice.paid", t + 20, "in_1", "cus_A1", "paid");
    let other_finalized = invoice_event("evt_d", "invoice.finalized", t, "in_2", "cus_A1", "open");
    let other_failed = invoice_event("evt_e", "invoice.payment_failed", t + 10, "in_2", "cus_A1", "open");
    let unreadable = json!({"id": "evt_f", "object": "event", "type": "invoice.paid", "livemode": false,
        "created": t, "data": {"object": {"id": "in_3"}}})
    .to_string();
    // Paid arrives first, then the older failure and finalization, then paid again.
    for body in [&paid, &failed, &other_failed, &finalized, &unreadable, &paid, &other_finalized] {
        let (status, answer) =
            deliver(&s, &project, body, Some(signature::header(WEBHOOK_SECRET, now(), body.as_bytes()))).await?;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    every_event_processed(&s).await?;
    let invoices = stripe::invoices(&state.db, &s.project.id, None, 10).await?;
    let summary: Vec<(String, String, bool, Option<String>)> = invoices
        .iter()
        .map(|i| (i.id.clone(), i.status.clone(), i.payment_failed, i.customer_external_id.clone()))
        .collect();
    assert!(summary.contains(&("in_1".into(), "paid".into(), false, Some("acme-1".into()))), "{summary:?}");
    assert!(summary.contains(&("in_2".into(), "open".into(), true, Some("acme-1".into()))), "{summary:?}");
    assert_eq!(invoices.len(), 2, "the unreadable event made no invoice: {summary:?}");
    let error: Option<String> = with_db!(&state.db, pool => sqlx::query_scalar(
        "SELECT last_error FROM stripe_events WHERE id = 'evt_f'").fetch_one(pool).await)?;
    assert!(error.unwrap_or_default().contains("not an invoice event"));
    let mine = stripe::invoices(&state.db, &s.project.id, Some(&customer.id), 10).await?;
    assert_eq!(mine.len(), 2);
    s.app.stop().await
}

async fn a_failed_payment_blocks_the_customer_until_paid(db: TestDatabase) -> TestResult {
    let s = setup_with(&db, BudgetPolicy::Reject, |env| {
        env.insert("TOLLGATE_WORKERS".into(), "true".into());
    })
    .await?;
    let state = s.app.state.clone();
    stripe::connect_with_key(&state.db, &state.master_key, &s.project.id, "rk_test_51Habcdefgh1234", WEBHOOK_SECRET)
        .await?;
    s.budget("payer", 1_000).await?;
    s.budget("manual", 1_000).await?;
    for (external, stripe_id) in [("payer", "cus_P1"), ("manual", "cus_M1")] {
        let c = tollgate_core::projects::find_customer(&state.db, &s.project.id, external).await?.unwrap();
        stripe::link_customer(&state.db, &s.project.id, &c.id, stripe_id).await?;
    }
    let hello = json!({"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]});
    let project = s.project.id.to_string();
    let send = |body: String| {
        let s = &s;
        let project = project.clone();
        async move {
            let signed = signature::header(WEBHOOK_SECRET, now(), body.as_bytes());
            let (status, answer) = deliver(s, &project, &body, Some(signed)).await?;
            anyhow::ensure!(status == StatusCode::OK, "{answer}");
            anyhow::Ok(())
        }
    };
    let blocked = |external: &'static str| {
        let state = state.clone();
        let project = s.project.id.clone();
        async move {
            let c = tollgate_core::projects::find_customer(&state.db, &project, external).await?.unwrap();
            anyhow::Ok(c.blocked)
        }
    };
    assert_eq!(s.chat("payer", hello.clone()).await?.status(), StatusCode::OK);

    let t = now();
    send(invoice_event("evt_1", "invoice.payment_failed", t, "in_9", "cus_P1", "open")).await?;
    eventually(std::time::Duration::from_secs(15), || async { blocked("payer").await }).await?;
    let refused = s.chat("payer", hello.clone()).await?;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{}", refused.text().await?);

    // A person blocks "manual" by hand; its invoice is then paid: the person's block stays.
    let manual = tollgate_core::projects::find_customer(&state.db, &s.project.id, "manual").await?.unwrap();
    tollgate_core::customers::set_blocked(&state.db, &s.project.id, &manual.id, true).await?;
    send(invoice_event("evt_2", "invoice.paid", t, "in_8", "cus_M1", "paid")).await?;

    // The failed invoice is paid (and the failure delivered again, late): unblocked.
    send(invoice_event("evt_3", "invoice.paid", t + 5, "in_9", "cus_P1", "paid")).await?;
    send(invoice_event("evt_1", "invoice.payment_failed", t, "in_9", "cus_P1", "open")).await?;
    eventually(std::time::Duration::from_secs(15), || async { Ok(!blocked("payer").await?) }).await?;
    assert_eq!(s.chat("payer", hello.clone()).await?.status(), StatusCode::OK);
    assert!(blocked("manual").await?, "paying lifted a block a person set");

    // With the policy off, a failure blocks nobody.
    stripe::set_block_on_payment_failure(&state.db, &s.project.id, false).await?;
    send(invoice_event("evt_4", "invoice.payment_failed", t + 10, "in_7", "cus_P1", "open")).await?;
    every_event_processed(&s).await?;
    assert!(!blocked("payer").await?);
    // Turned back on, the open failed invoice blocks at once.
    stripe::set_block_on_payment_failure(&state.db, &s.project.id, true).await?;
    assert!(blocked("payer").await?);
    s.app.stop().await
}

/// Issue 21: the failed flag came from the event type, so an `invoice.updated` sent after
/// `invoice.payment_failed` (Stripe sends one for any change to the open invoice: a memo,
/// the next retry date) cleared it and unblocked a customer who had not paid. The payment
/// state is read from the invoice itself.
async fn only_a_payment_lifts_a_block_whatever_events_follow(db: TestDatabase) -> TestResult {
    let s = connected(&db).await?;
    let state = s.app.state.clone();
    s.budget("payer", 1_000).await?;
    let payer = tollgate_core::projects::find_customer(&state.db, &s.project.id, "payer").await?.unwrap();
    stripe::link_customer(&state.db, &s.project.id, &payer.id, "cus_P1").await?;
    let project = s.project.id.to_string();
    let t = now();
    let blocked_after = |body: String| {
        let s = &s;
        let project = project.clone();
        let state = state.clone();
        async move {
            let signed = signature::header(WEBHOOK_SECRET, now(), body.as_bytes());
            let (status, answer) = deliver(s, &project, &body, Some(signed)).await?;
            anyhow::ensure!(status == StatusCode::OK, "{answer}");
            stripe::process_pending(&state.db, 100).await?;
            let c = tollgate_core::projects::find_customer(&state.db, &s.project.id, "payer").await?.unwrap();
            anyhow::Ok(c.blocked)
        }
    };
    let event = |id: &str, kind: &str, at: i64, status: &str, attempts: i64| {
        invoice_event_after(id, kind, at, "in_9", "cus_P1", status, attempts)
    };
    assert!(!blocked_after(event("evt_0", "invoice.finalized", t, "open", 0)).await?);
    assert!(blocked_after(event("evt_1", "invoice.payment_failed", t + 1, "open", 1)).await?);
    // Stripe updates the open invoice (still unpaid, still one attempt): the block holds.
    assert!(blocked_after(event("evt_2", "invoice.updated", t + 2, "open", 1)).await?, "an update lifted the block");
    // A late copy of the invoice from before the attempt, sent later: it cannot undo it.
    assert!(blocked_after(event("evt_3", "invoice.updated", t + 3, "open", 0)).await?, "a stale snapshot lifted it");
    // The retry fails too; then the customer pays.
    assert!(blocked_after(event("evt_4", "invoice.payment_failed", t + 4, "open", 2)).await?);
    assert!(!blocked_after(event("evt_5", "invoice.paid", t + 5, "paid", 2)).await?, "paying did not lift the block");
    // A failure delivered late, after the payment, does not block again.
    assert!(!blocked_after(event("evt_6", "invoice.payment_failed", t + 1, "open", 1)).await?);
    let invoice = &stripe::invoices(&state.db, &s.project.id, None, 10).await?[0];
    assert_eq!((invoice.status.as_str(), invoice.payment_failed), ("paid", false));
    s.app.stop().await
}

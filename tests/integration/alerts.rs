//! Budget alerts end to end: proxy calls move a customer's spend across thresholds, the
//! workers' scan fires each alert once, a real HTTP receiver gets it signed, a fake SMTP
//! server gets the mail, and a receiver that fails first is retried until it succeeds.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use tollgate_core::alerts::{self, AlertSettingsInput};
use tollgate_core::projects::BudgetPolicy;
use tollgate_core::with_db;

use crate::db_cases;
use crate::fake_smtp::FakeSmtp;
use crate::helpers::{DbCase, TestDatabase, TestResult, eventually};
use crate::proxy::{OUTPUT_NANOS_PER_TOKEN, Setup, setup_with};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        each_threshold_reaches_the_webhook_and_the_mailbox_once_signed,
        a_failing_receiver_is_retried_until_it_succeeds,
        webhooks_to_private_addresses_are_refused_by_default,
    ]
}

/// One webhook request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    signature: String,
    event_id: String,
    body: String,
}

/// A webhook receiver over real HTTP that answers 503 to its first `fail_first` requests.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(fail_first: usize) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0", fail_first).await
    }

    async fn start_on(bind: &str, fail_first: usize) -> anyhow::Result<Self> {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let log = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let log = log.clone();
                async move {
                    let header =
                        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                    let mut log = log.lock().unwrap();
                    log.push(Received {
                        signature: header("tollgate-signature"),
                        event_id: header("tollgate-event-id"),
                        body,
                    });
                    if log.len() <= fail_first { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::NO_CONTENT }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { addr, received })
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// Checks a signature the way a tenant's receiver would, from the documented scheme alone:
/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, at most 5 minutes old.
fn signature_is_valid(secret: &str, header: &str, body: &str) -> bool {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1.push(value.to_owned()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    if (now - t).abs() > 300 {
        return false;
    }
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let expected = hex::encode(mac.finalize().into_bytes());
    v1.contains(&expected)
}

async fn with_alerts(db: &TestDatabase, smtp: Option<&FakeSmtp>) -> anyhow::Result<Setup> {
    let smtp_url = smtp.map(FakeSmtp::url);
    setup_with(db, BudgetPolicy::Reject, |env| {
        env.insert("TOLLGATE_WORKERS".into(), "true".into());
        env.insert("TOLLGATE_WEBHOOKS_ALLOW_PRIVATE".into(), "true".into());
        env.insert("TOLLGATE_ALERT_RETRY_BASE_SECONDS".into(), "1".into());
        if let Some(url) = smtp_url {
            env.insert("TOLLGATE_SMTP_URL".into(), url);
        }
    })
    .await
}

async fn configure(s: &Setup, thresholds: &str, webhook: &str, email: &str) -> anyhow::Result<String> {
    let state = &s.app.state;
    let input = AlertSettingsInput {
        thresholds: thresholds.into(),
        on_refused: true,
        webhook_url: webhook.into(),
        email_to: email.into(),
    };
    let saved = alerts::save_settings(&state.db, &state.master_key, &s.project.id, &input).await?;
    Ok(saved.webhook_secret.unwrap_or_default())
}

async fn call(s: &Setup, customer: &str, max_tokens: i64) -> anyhow::Result<StatusCode> {
    let body =
        json!({"model": "mock-model", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hi"}]});
    Ok(s.chat(customer, body).await?.status())
}

async fn deliveries(s: &Setup, status: &str) -> anyhow::Result<i64> {
    Ok(with_db!(&s.app.state.db, pool => sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM alert_deliveries WHERE status = $1").bind(status).fetch_one(pool).await)?)
}

async fn each_threshold_reaches_the_webhook_and_the_mailbox_once_signed(db: TestDatabase) -> TestResult {
    let smtp = FakeSmtp::start().await?;
    let receiver = Receiver::start(0).await?;
    let s = with_alerts(&db, Some(&smtp)).await?;
    let secret = configure(&s, "50, 80, 100", &receiver.url(), "ops@example.com").await?;
    assert!(secret.starts_with("tgwhsec_"), "{secret}");
    // A budget of 100 output tokens; every call below costs exactly its max_tokens.
    s.budget("ann", 100).await?;
    s.budget("bob", 100).await?;

    assert_eq!(call(&s, "ann", 30).await?, StatusCode::OK); // 30 %: nothing
    assert_eq!(call(&s, "ann", 30).await?, StatusCode::OK); // 60 %: 50 %
    assert_eq!(call(&s, "bob", 10).await?, StatusCode::OK); // bob: 10 %, nothing
    assert_eq!(call(&s, "ann", 30).await?, StatusCode::OK); // 90 %: 80 %
    assert_eq!(call(&s, "ann", 20).await?, StatusCode::PAYMENT_REQUIRED); // refused
    assert_eq!(call(&s, "ann", 10).await?, StatusCode::OK); // 100 %
    assert_eq!(call(&s, "ann", 10).await?, StatusCode::PAYMENT_REQUIRED); // refused again: no new alert

    // Within a minute: a delivery whose queued job is slow to be taken is queued again by the
    // scan after 30 s.
    eventually(Duration::from_secs(60), || async { Ok(receiver.received().len() >= 4) }).await?;
    // Two more scans: nothing fires twice.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let received = receiver.received();
    assert_eq!(received.len(), 4, "{received:#?}");
    let mut seen = Vec::new();
    for r in &received {
        assert!(signature_is_valid(&secret, &r.signature, &r.body), "bad signature on {r:?}");
        assert!(!signature_is_valid("tgwhsec_wrong", &r.signature, &r.body));
        let event: Value = serde_json::from_str(&r.body)?;
        assert_eq!(event["id"], r.event_id.as_str());
        assert_eq!(event["data"]["customer"]["id"], "ann", "{event}");
        assert_eq!(event["data"]["budget_nanos"], 100 * OUTPUT_NANOS_PER_TOKEN);
        assert_eq!(event["data"]["currency"], "usd");
        seen.push((event["type"].as_str().unwrap_or_default().to_owned(), event["data"]["threshold_percent"].clone()));
    }
    seen.sort_by_key(|(kind, pct)| (kind.clone(), pct.as_i64()));
    assert_eq!(
        seen,
        vec![
            ("budget.call_refused".to_owned(), Value::Null),
            ("budget.threshold_reached".to_owned(), json!(50)),
            ("budget.threshold_reached".to_owned(), json!(80)),
            ("budget.threshold_reached".to_owned(), json!(100)),
        ]
    );
    // The 80 % alert carries the spend when it fired.
    let eighty = received
        .iter()
        .map(|r| serde_json::from_str::<Value>(&r.body).unwrap())
        .find(|e| e["data"]["threshold_percent"] == 80)
        .unwrap();
    assert!(eighty["data"]["spent_nanos"].as_i64().unwrap() >= 80 * OUTPUT_NANOS_PER_TOKEN, "{eighty}");

    eventually(Duration::from_secs(10), || async {
        Ok(smtp.mails().iter().filter(|m| m.recipients.iter().any(|r| r.contains("ops@example.com"))).count() >= 4)
    })
    .await?;
    let mails = smtp.mails();
    assert_eq!(mails.len(), 4);
    assert!(mails.iter().any(|m| m.text().contains("has used 80% of their budget")), "{mails:#?}");
    assert_eq!(deliveries(&s, "delivered").await?, 8);
    assert_eq!(deliveries(&s, "pending").await? + deliveries(&s, "failed").await?, 0);
    s.app.stop().await
}

async fn a_failing_receiver_is_retried_until_it_succeeds(db: TestDatabase) -> TestResult {
    let receiver = Receiver::start(2).await?;
    let s = with_alerts(&db, None).await?;
    let secret = configure(&s, "50", &receiver.url(), "").await?;
    s.budget("cat", 100).await?;
    assert_eq!(call(&s, "cat", 60).await?, StatusCode::OK);

    // Fails, then after 1 s fails again, then after 4 s succeeds.
    eventually(Duration::from_secs(40), || async { Ok(deliveries(&s, "delivered").await? == 1) }).await?;
    let received = receiver.received();
    assert_eq!(received.len(), 3, "{received:#?}");
    assert!(received.iter().all(|r| signature_is_valid(&secret, &r.signature, &r.body)));
    assert!(received.iter().all(|r| r.body == received[0].body), "every attempt sends the same event");
    let log = alerts::delivery_log(&s.app.state.db, &s.project.id, 10).await?;
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].status.as_str(), log[0].attempts, log[0].last_status), ("delivered", 3, Some(204)));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(receiver.received().len(), 3, "nothing is sent after success");
    s.app.stop().await
}

async fn webhooks_to_private_addresses_are_refused_by_default(db: TestDatabase) -> TestResult {
    // The mock provider on 127.0.0.1 is allowed; the receiver, on [::1], is not.
    let receiver = Receiver::start_on("[::1]:0", 0).await?;
    let s = setup_with(&db, BudgetPolicy::Reject, |env| {
        env.insert("TOLLGATE_WORKERS".into(), "true".into());
        env.insert("TOLLGATE_EGRESS_ALLOW".into(), "127.0.0.0/8".into());
    })
    .await?;
    configure(&s, "50", &receiver.url(), "").await?;
    s.budget("dan", 100).await?;
    assert_eq!(call(&s, "dan", 60).await?, StatusCode::OK);
    let state = s.app.state.clone();
    let project = s.project.id.clone();
    eventually(Duration::from_secs(30), || async {
        let log = alerts::delivery_log(&state.db, &project, 10).await?;
        Ok(log.first().is_some_and(|d| d.attempts >= 1 && d.last_error.is_some()))
    })
    .await?;
    let log = alerts::delivery_log(&state.db, &project, 10).await?;
    let error = log[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("is on a private network") && error.contains("TOLLGATE_EGRESS_ALLOW"), "{error}");
    assert_eq!(log[0].status, "pending", "retried later, in case DNS changes");
    assert!(receiver.received().is_empty(), "the receiver on [::1] was called");
    s.app.stop().await
}

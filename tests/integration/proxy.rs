//! The proxy against a mock provider: the budget holds under concurrency, clamp and reject
//! behave, streams settle, failures release, bad input gets clear errors.

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate::routes::proxy::MAX_BODY_BYTES;
use tollgate_core::accounts::{self, NewOrganization};
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::pricing::{Price, Tokenizer};
use tollgate_core::projects::{self, BudgetPolicy, KeyKind, NewProject, NewProvider, Project, ProviderKind};
use tollgate_core::time::UnixMillis;
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{DbCase, TestApp, TestDatabase, TestResult, eventually, spawn_app_with};
use crate::mock_provider::MockProvider;

pub fn cases() -> Vec<DbCase> {
    db_cases![
        a_call_is_reserved_forwarded_and_settled,
        concurrent_calls_never_spend_past_the_budget,
        a_failing_ledger_operation_does_not_fail_its_batch,
        clamp_lowers_max_output_to_what_the_budget_pays_for,
        reject_refuses_with_402_and_the_provider_sees_nothing,
        streamed_calls_settle_and_hide_the_usage_chunk,
        a_client_that_disconnects_mid_stream_is_settled_for_what_was_generated,
        a_client_that_gives_up_on_a_json_call_leaves_no_reservation_behind,
        an_upstream_error_releases_the_reservation,
        expired_reservations_are_released,
        bad_requests_get_clear_errors_and_spend_nothing,
    ]
}

/// One output token costs 1e6 nanos (0.001 of a unit); input is free, so a call's cost is
/// exactly its output tokens and a budget can be made to fit exactly N calls.
pub const OUTPUT_NANOS_PER_TOKEN: i64 = 1_000_000;

/// A project whose OpenAI-compatible connection serves `mock-*`, `slow-*` and `error-500`,
/// and whose Anthropic connection serves `claude-mock*` — all on one mock provider — with
/// [`OUTPUT_NANOS_PER_TOKEN`] prices, and a secret key.
pub struct Setup {
    pub app: TestApp,
    pub mock: MockProvider,
    pub project: Project,
    pub key: String,
}

pub async fn setup(db: &TestDatabase, policy: BudgetPolicy) -> anyhow::Result<Setup> {
    setup_with(db, policy, |_| {}).await
}

/// [`setup`] on a server whose environment `customize` adjusted first.
pub async fn setup_with(
    db: &TestDatabase,
    policy: BudgetPolicy,
    customize: impl FnOnce(&mut std::collections::HashMap<String, String>),
) -> anyhow::Result<Setup> {
    let new = NewProject { name: "Chat".into(), policy, min_output_tokens: 1, ..NewProject::default() };
    setup_project(db, new, customize).await
}

/// [`setup_with`] for a project made as `new` says (its currency, say).
pub async fn setup_project(
    db: &TestDatabase,
    new: NewProject,
    customize: impl FnOnce(&mut std::collections::HashMap<String, String>),
) -> anyhow::Result<Setup> {
    let app = spawn_app_with(db, customize).await?;
    let mock = MockProvider::start().await?;
    let state = &app.state;
    let org = accounts::create_organization_with_owner(
        &state.db,
        NewOrganization { name: "Acme", owner_email: "ada@example.com", owner_password: "correct horse battery" },
    )
    .await?;
    let project = projects::create_project(&state.db, &org.org_id, &new).await?;
    projects::add_provider(
        &state.db,
        &state.master_key,
        &project.id,
        &NewProvider {
            kind: ProviderKind::OpenAiCompatible,
            name: "mock".into(),
            base_url: Some(mock.base_url()),
            api_key: "sk-mock-upstream".into(),
            models: vec!["mock-*".into(), "slow-*".into(), "error-500".into()],
        },
    )
    .await?;
    projects::add_provider(
        &state.db,
        &state.master_key,
        &project.id,
        &NewProvider {
            kind: ProviderKind::Anthropic,
            name: "mock anthropic".into(),
            base_url: Some(mock.anthropic_base_url()),
            api_key: "sk-ant-mock-upstream".into(),
            models: vec!["claude-mock*".into(), "error-500".into()],
        },
    )
    .await?;
    let price = Price {
        input: 0,
        cached_input: 0,
        output: OUTPUT_NANOS_PER_TOKEN * 1_000_000,
        cache_write: 0,
        max_output_tokens: 100,
        tokenizer: Tokenizer::O200kBase,
    };
    for model in ["mock-model", "slow-model", "slow-json", "error-500", "claude-mock", "claude-mock-slow"] {
        projects::set_price(&state.db, &project.id, model, &price).await?;
    }
    // Embeddings: input only, 1e6 nanos a token.
    let embedding = Price { input: OUTPUT_NANOS_PER_TOKEN * 1_000_000, output: 0, ..price };
    projects::set_price(&state.db, &project.id, "mock-embedding", &embedding).await?;
    let key = projects::create_key(&state.db, &project.id, KeyKind::Secret, "test").await?.plaintext;
    Ok(Setup { app, mock, project, key })
}

impl Setup {
    pub async fn budget(&self, customer: &str, output_tokens: i64) -> anyhow::Result<()> {
        let amount = Nanos(output_tokens * OUTPUT_NANOS_PER_TOKEN);
        projects::upsert_customer_budget(&self.app.state.db, &self.project.id, customer, amount, BudgetPeriod::Month)
            .await?;
        Ok(())
    }

    pub async fn chat(&self, customer: &str, body: Value) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .app
            .client
            .post(self.app.url("/v1/chat/completions"))
            .bearer_auth(&self.key)
            .header("x-tollgate-customer", customer)
            .json(&body)
            .send()
            .await?)
    }

    /// POSTs `body` to `path` with the key and `customer`.
    pub async fn post(&self, path: &str, customer: &str, body: Value) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .app
            .client
            .post(self.app.url(path))
            .bearer_auth(&self.key)
            .header("x-tollgate-customer", customer)
            .json(&body)
            .send()
            .await?)
    }

    /// (spent, reserved) of a customer.
    pub async fn ledger(&self, customer: &str) -> anyhow::Result<(i64, i64)> {
        let c = projects::find_customer(&self.app.state.db, &self.project.id, customer)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no customer {customer}"))?;
        Ok((c.spent_nanos, c.reserved_nanos))
    }

    pub async fn events(&self, status: &str) -> anyhow::Result<i64> {
        Ok(with_db!(&self.app.state.db, pool => sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM usage_events WHERE status = $1").bind(status).fetch_one(pool).await)?)
    }
}

fn hello(max_tokens: i64) -> Value {
    json!({"model": "mock-model", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hello!"}]})
}

async fn a_call_is_reserved_forwarded_and_settled(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("cust-1", 1_000).await?;
    let response = s.chat("cust-1", hello(20)).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-tollgate-cost"], "0.02");
    assert_eq!(response.headers()["x-tollgate-remaining"], "0.98");
    let body: Value = response.json().await?;
    assert_eq!(body["usage"]["completion_tokens"], 20);
    let sent = &s.mock.requests()[0];
    assert_eq!(sent["max_tokens"], 20);
    assert_eq!(sent["messages"][0]["content"], "Hello!");
    assert_eq!(s.ledger("cust-1").await?, (20 * OUTPUT_NANOS_PER_TOKEN, 0));
    let (tokens, billed, source): (i64, i64, String) = with_db!(&s.app.state.db, pool => sqlx::query_as(
        "SELECT output_tokens, billed_nanos, usage_source FROM usage_events WHERE status = 'settled'").fetch_one(pool).await)?;
    assert_eq!((tokens, billed, source.as_str()), (20, 20 * OUTPUT_NANOS_PER_TOKEN, "provider"));
    s.app.stop().await
}

async fn concurrent_calls_never_spend_past_the_budget(db: TestDatabase) -> TestResult {
    const N: i64 = 5;
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("hot", N * 20).await?;
    let calls = (0..20 * N).map(|_| s.chat("hot", hello(20)));
    let results = futures::future::join_all(calls).await;
    let mut ok = 0;
    for r in results {
        let r = r?;
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::PAYMENT_REQUIRED => {}
            other => anyhow::bail!("unexpected {other}: {}", r.text().await?),
        }
    }
    let (spent, reserved) = s.ledger("hot").await?;
    assert_eq!(reserved, 0, "a reservation leaked");
    assert!(spent <= N * 20 * OUTPUT_NANOS_PER_TOKEN, "overspent: {spent}");
    assert_eq!(ok, N, "every call that fitted must have run");
    assert_eq!(spent, N * 20 * OUTPUT_NANOS_PER_TOKEN);
    assert_eq!(s.events("settled").await?, N);
    assert_eq!(s.events("refused").await?, 19 * N);
    s.app.stop().await
}

/// Reservations and settlements are applied in batches (one transaction each): one that
/// fails (here, a usage event naming a customer that does not exist) fails alone, and the
/// others of its batch still hold exactly what fits.
async fn a_failing_ledger_operation_does_not_fail_its_batch(db: TestDatabase) -> TestResult {
    use tollgate_core::ids::CustomerId;
    use tollgate_core::ledger::{CallStatus, Hold, ReserveOutcome, Settlement, UsageRecord, UsageSource};
    const FITS: i64 = 10;
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("batched", FITS * 20).await?;
    let customer = projects::find_customer(&s.app.state.db, &s.project.id, "batched").await?.unwrap();
    let ledger = &s.app.state.ledger;
    let expires = UnixMillis::now().plus_secs(60);
    let holds = (0..4 * FITS).map(|i| {
        let hold = Hold::new(
            customer.id.clone(),
            customer.period(),
            Nanos(20 * OUTPUT_NANOS_PER_TOKEN),
            format!("req-{i}"),
            expires,
        );
        ledger.reserve(hold)
    });
    let orphan = UsageRecord {
        project_id: s.project.id.clone(),
        customer_id: Some(CustomerId::generate()),
        request_id: "orphan".into(),
        endpoint: "chat".into(),
        model: "mock-model".into(),
        status: CallStatus::Refused,
        reason: None,
        tokens: Default::default(),
        reserved: Nanos::ZERO,
        cost: Nanos::ZERO,
        billed: Nanos::ZERO,
        source: UsageSource::None,
        latency_ms: 0,
        clamped: false,
    };
    let (held, orphan) = tokio::join!(futures::future::join_all(holds), ledger.settle(Settlement::new(None, orphan)));
    assert!(orphan.is_err(), "an event for no customer must fail: {orphan:?}");
    let mut reserved = 0;
    for outcome in held {
        match outcome? {
            ReserveOutcome::Reserved { .. } => reserved += 1,
            ReserveOutcome::Insufficient { .. } => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    assert_eq!(reserved, FITS, "exactly what fits is held");
    assert_eq!(s.ledger("batched").await?, (0, FITS * 20 * OUTPUT_NANOS_PER_TOKEN));
    s.app.stop().await
}

async fn clamp_lowers_max_output_to_what_the_budget_pays_for(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    s.budget("small", 7).await?;
    let response = s.chat("small", hello(20)).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-tollgate-max-output-clamped"], "7");
    assert_eq!(s.mock.requests()[0]["max_tokens"], 7, "the provider must receive the clamped limit");
    assert_eq!(s.ledger("small").await?, (7 * OUTPUT_NANOS_PER_TOKEN, 0));
    // Nothing left: the next call is refused even under clamp.
    let refused = s.chat("small", hello(20)).await?;
    assert_eq!(refused.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(s.mock.requests().len(), 1);
    s.app.stop().await
}

async fn reject_refuses_with_402_and_the_provider_sees_nothing(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("poor", 7).await?;
    let response = s.chat("poor", hello(20)).await?;
    assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["type"], "insufficient_budget");
    assert_eq!(body["error"]["code"], "customer_budget_exceeded");
    assert_eq!(body["error"]["remaining"], "0.007");
    assert_eq!(body["error"]["needed"], "0.02");
    assert!(s.mock.requests().is_empty(), "a refused call reached the provider");
    assert_eq!(s.ledger("poor").await?, (0, 0));
    assert_eq!(s.events("refused").await?, 1);
    s.app.stop().await
}

async fn streamed_calls_settle_and_hide_the_usage_chunk(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("streamer", 1_000).await?;
    let mut body = hello(12);
    body["stream"] = json!(true);
    let response = s.chat("streamer", body.clone()).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await?;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(text.matches("\"content\":\"tok \"").count(), 12);
    assert!(!text.contains("\"usage\""), "the client did not ask for usage: {text}");
    assert_eq!(s.mock.requests()[0]["stream_options"]["include_usage"], true);
    eventually(Duration::from_secs(5), || async {
        Ok(s.ledger("streamer").await? == (12 * OUTPUT_NANOS_PER_TOKEN, 0))
    })
    .await?;

    // A client that asks for usage gets the chunk.
    body["stream_options"] = json!({"include_usage": true});
    let text = s.chat("streamer", body).await?.text().await?;
    assert!(text.contains("\"completion_tokens\":12"), "{text}");
    eventually(Duration::from_secs(5), || async {
        Ok(s.ledger("streamer").await? == (24 * OUTPUT_NANOS_PER_TOKEN, 0))
    })
    .await?;
    s.app.stop().await
}

async fn a_client_that_disconnects_mid_stream_is_settled_for_what_was_generated(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("leaver", 1_000).await?;
    let body = json!({"model": "slow-model", "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "Tell me a long story"}]});
    let response = s.chat("leaver", body).await?;
    let mut stream = response.bytes_stream();
    let mut seen = 0;
    while seen < 5 {
        let chunk = stream.next().await.ok_or_else(|| anyhow::anyhow!("stream ended early"))??;
        seen += String::from_utf8_lossy(&chunk).matches("tok ").count();
    }
    drop(stream);
    eventually(Duration::from_secs(10), || async { Ok(s.ledger("leaver").await?.1 == 0) }).await?;
    let (spent, _) = s.ledger("leaver").await?;
    assert!(spent >= 5 * OUTPUT_NANOS_PER_TOKEN, "charged less than was delivered: {spent}");
    assert!(spent < 100 * OUTPUT_NANOS_PER_TOKEN, "charged the whole reservation: {spent}");
    let reason: Option<String> = with_db!(&s.app.state.db, pool => sqlx::query_scalar(
        "SELECT reason FROM usage_events WHERE status = 'settled'").fetch_one(pool).await)?;
    assert_eq!(reason.as_deref(), Some("client disconnected"));
    s.app.stop().await
}

async fn a_client_that_gives_up_on_a_json_call_leaves_no_reservation_behind(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("impatient", 1_000).await?;
    let body = json!({"model": "slow-json", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    // The provider takes half a second; the client hangs up long before.
    let gave_up = tokio::time::timeout(Duration::from_millis(150), s.chat("impatient", body)).await;
    assert!(gave_up.is_err(), "the mock answered sooner than it should");
    // The call finishes with the provider and is settled for what it generated.
    eventually(Duration::from_secs(10), || async {
        Ok(s.ledger("impatient").await? == (100 * OUTPUT_NANOS_PER_TOKEN, 0))
    })
    .await?;
    assert_eq!(s.events("settled").await?, 1);
    s.app.stop().await
}

async fn an_upstream_error_releases_the_reservation(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("unlucky", 1_000).await?;
    let body = json!({"model": "error-500", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    let response = s.chat("unlucky", body).await?;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let err: Value = response.json().await?;
    assert_eq!(err["error"]["message"], "the mock provider failed");
    assert_eq!(s.ledger("unlucky").await?, (0, 0));
    assert_eq!(s.events("failed").await?, 1);
    assert_eq!(s.mock.requests().len(), 1, "an upstream failure must not be retried");
    s.app.stop().await
}

async fn expired_reservations_are_released(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("crashed", 100).await?;
    let customer = projects::find_customer(&s.app.state.db, &s.project.id, "crashed").await?.unwrap();
    let past = UnixMillis(UnixMillis::now().0 - 1);
    let held =
        tollgate_core::ledger::reserve(&s.app.state.db, &customer, Nanos(60 * OUTPUT_NANOS_PER_TOKEN), "r1", past)
            .await?;
    assert!(matches!(held, tollgate_core::ledger::ReserveOutcome::Reserved { .. }));
    // While held, a call that needs more than what is left is refused…
    assert_eq!(s.chat("crashed", hello(50)).await?.status(), StatusCode::PAYMENT_REQUIRED);
    // …until housekeeping releases the expired hold.
    assert_eq!(tollgate_core::ledger::release_expired(&s.app.state.db, UnixMillis::now()).await?, 1);
    assert_eq!(tollgate_core::ledger::release_expired(&s.app.state.db, UnixMillis::now()).await?, 0);
    assert_eq!(s.ledger("crashed").await?, (0, 0));
    assert_eq!(s.chat("crashed", hello(50)).await?.status(), StatusCode::OK);
    s.app.stop().await
}

async fn bad_requests_get_clear_errors_and_spend_nothing(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("c", 1_000).await?;
    let url = s.app.url("/v1/chat/completions");
    let client = &s.app.client;
    let expect = |r: reqwest::Response, status: StatusCode, code: &'static str| async move {
        assert_eq!(r.status(), status);
        let body: Value = r.json().await?;
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        anyhow::Ok(())
    };
    let r = client.post(&url).header("x-tollgate-customer", "c").json(&hello(5)).send().await?;
    expect(r, StatusCode::UNAUTHORIZED, "invalid_api_key").await?;
    let r =
        client.post(&url).bearer_auth("tg_sk_nope").header("x-tollgate-customer", "c").json(&hello(5)).send().await?;
    expect(r, StatusCode::UNAUTHORIZED, "invalid_api_key").await?;
    let r = client
        .post(&url)
        .bearer_auth(&s.key)
        .header("x-tollgate-customer", "c")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    expect(r, StatusCode::BAD_REQUEST, "invalid_json").await?;
    let r = s.chat("c", json!({"model": "gpt-unknown-9", "messages": []})).await?;
    expect(r, StatusCode::BAD_REQUEST, "model_not_priced").await?;
    let r = s.chat("c", json!({"messages": []})).await?;
    expect(r, StatusCode::BAD_REQUEST, "missing_model").await?;
    let r = s.chat("c", json!({"model": "mock-model", "max_tokens": -3, "messages": []})).await?;
    expect(r, StatusCode::BAD_REQUEST, "invalid_value").await?;
    let r = client.post(&url).bearer_auth(&s.key).json(&hello(5)).send().await?;
    expect(r, StatusCode::BAD_REQUEST, "missing_customer").await?;
    // Too large, declared: answered from the headers, before any of the body is sent (a client
    // still writing 17 MB would race the answer, so this one sends none and reads).
    let (status, body) = raw_post(s.app.addr, &s.key, Some(17 * 1024 * 1024), b"").await?;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("request_too_large")), "{body}");
    // Too large, chunked (no length to judge by): refused once the limit is crossed. The client
    // sends the limit and one byte more and stops there, so the server has read all it was sent
    // when it answers (unread bytes would make its close a reset that can eat the answer).
    let chunk = vec![b'x'; 1024 * 1024];
    let mut chunked = Vec::new();
    for _ in 0..MAX_BODY_BYTES / chunk.len() {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"1\r\nx");
    let (status, body) = raw_post(s.app.addr, &s.key, None, &chunked).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("request_too_large")), "{body}");
    projects::set_customer_blocked(&s.app.state.db, &s.project.id, "c", true).await?;
    let r = s.chat("c", hello(5)).await?;
    expect(r, StatusCode::FORBIDDEN, "customer_blocked").await?;
    projects::set_customer_blocked(&s.app.state.db, &s.project.id, "c", false).await?;
    // A revoked key stops working at once.
    let created = projects::create_key(&s.app.state.db, &s.project.id, KeyKind::Secret, "temp").await?;
    assert!(projects::revoke_key(&s.app.state.db, &s.project.id, &created.id).await?);
    let r = client
        .post(&url)
        .bearer_auth(&created.plaintext)
        .header("x-tollgate-customer", "c")
        .json(&hello(5))
        .send()
        .await?;
    expect(r, StatusCode::UNAUTHORIZED, "invalid_api_key").await?;

    assert!(s.mock.requests().is_empty());
    assert_eq!(s.ledger("c").await?, (0, 0));
    assert_eq!(s.events("settled").await?, 0);
    s.app.stop().await
}

/// A chat request over a bare HTTP/1.1 connection: the headers (with `Content-Length:
/// declared`, else chunked), then `body` as it is, then the answer read whole. Returns its
/// status and JSON body.
async fn raw_post(
    addr: std::net::SocketAddr,
    key: &str,
    declared: Option<usize>,
    body: &[u8],
) -> anyhow::Result<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let length = match declared {
        Some(n) => format!("content-length: {n}"),
        None => "transfer-encoding: chunked".to_owned(),
    };
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\n\
         x-tollgate-customer: c\r\ncontent-type: application/json\r\n{length}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(30), stream.read_to_end(&mut answer)).await??;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // A chunked answer: the JSON is its first chunk.
    let payload = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        payload.split_once("\r\n").map_or("", |(_, rest)| rest).rsplit_once("\r\n0\r\n").map_or("", |(json, _)| json)
    } else {
        payload
    };
    Ok((status, serde_json::from_str(payload.trim()).unwrap_or(Value::Null)))
}

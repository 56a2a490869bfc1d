//! Every API of the proxy besides chat completions, against the mock provider: Anthropic
//! Messages (JSON, SSE, count_tokens, its error shape), the Responses API, embeddings, the
//! model list; and the key cache (revocation reaches the proxy promptly).

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::ledger::{self, ReserveOutcome};
use tollgate_core::money::Nanos;
use tollgate_core::projects::{self, BudgetPolicy, KeyKind};
use tollgate_core::time::UnixMillis;
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{TestDatabase, TestResult, eventually};
use crate::proxy::{OUTPUT_NANOS_PER_TOKEN, Setup, setup};

pub fn cases() -> Vec<crate::helpers::DbCase> {
    db_cases![
        messages_are_metered_with_the_anthropic_credential,
        streamed_messages_settle_from_message_delta,
        messages_refusals_and_errors_come_in_anthropic_shape,
        messages_clamp_rewrites_max_tokens,
        count_tokens_is_forwarded_and_costs_nothing,
        responses_are_metered_json_and_streamed,
        responses_that_cannot_be_bounded_are_refused,
        embeddings_reserve_their_input_and_never_clamp,
        models_lists_what_the_project_may_call,
        a_revoked_key_stops_working_promptly,
        a_long_stream_renews_its_reservation,
    ]
}

fn message(max_tokens: i64) -> Value {
    json!({"model": "claude-mock", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hello!"}]})
}

impl Setup {
    /// POSTs an Anthropic request the way the Anthropic SDK does (`x-api-key`, `anthropic-version`).
    async fn anthropic(&self, path: &str, customer: &str, body: Value) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .app
            .client
            .post(self.app.url(path))
            .header("x-api-key", &self.key)
            .header("anthropic-version", "2023-06-01")
            .header("x-tollgate-customer", customer)
            .json(&body)
            .send()
            .await?)
    }

    async fn last_event(&self) -> anyhow::Result<(String, String, i64, i64, i64, String)> {
        Ok(with_db!(&self.app.state.db, pool => sqlx::query_as(
            "SELECT endpoint, status, input_tokens, output_tokens, billed_nanos, usage_source FROM usage_events \
             ORDER BY created_at DESC, id DESC LIMIT 1").fetch_one(pool).await)?)
    }
}

/// The SSE events of a streamed answer, as (event name, data).
async fn read_events(response: reqwest::Response) -> anyhow::Result<Vec<(Option<String>, Value)>> {
    let text = response.text().await?;
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut name = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_owned());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push_str(d);
            }
        }
        events.push((name, serde_json::from_str(&data).unwrap_or(Value::String(data))));
    }
    Ok(events)
}

async fn messages_are_metered_with_the_anthropic_credential(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("ant", 1_000).await?;
    let response = s.anthropic("/v1/messages", "ant", message(20)).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-tollgate-cost"], "0.02");
    assert_eq!(response.headers()["x-tollgate-remaining"], "0.98");
    let body: Value = response.json().await?;
    assert_eq!(body["type"], "message");
    assert_eq!(body["usage"]["output_tokens"], 20);
    // The provider's own credential went upstream, never the Tollgate key.
    assert_eq!(s.mock.credentials(), vec![("sk-ant-mock-upstream".to_owned(), Some("2023-06-01".to_owned()))]);
    assert_eq!(s.mock.requests()[0]["messages"][0]["content"], "Hello!");
    assert_eq!(s.ledger("ant").await?, (20 * OUTPUT_NANOS_PER_TOKEN, 0));
    let event = s.last_event().await?;
    assert_eq!(event, ("messages".into(), "settled".into(), 10, 20, 20 * OUTPUT_NANOS_PER_TOKEN, "provider".into()));
    s.app.stop().await
}

async fn streamed_messages_settle_from_message_delta(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("ant", 1_000).await?;
    let mut body = message(12);
    body["stream"] = json!(true);
    let response = s.anthropic("/v1/messages", "ant", body).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-tollgate-reserved"], "0.012");
    let events = read_events(response).await?;
    let names: Vec<&str> = events.iter().filter_map(|(n, _)| n.as_deref()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    assert_eq!(names.iter().filter(|n| **n == "content_block_delta").count(), 12);
    eventually(Duration::from_secs(5), || async { Ok(s.ledger("ant").await? == (12 * OUTPUT_NANOS_PER_TOKEN, 0)) })
        .await?;
    let event = s.last_event().await?;
    assert_eq!(event, ("messages".into(), "settled".into(), 10, 12, 12 * OUTPUT_NANOS_PER_TOKEN, "provider".into()));

    // A client that leaves mid-stream is settled for what was generated, no more than reserved.
    let mut slow = message(150);
    slow["model"] = json!("claude-mock-slow");
    slow["stream"] = json!(true);
    let response = s.anthropic("/v1/messages", "ant", slow).await?;
    let mut stream = response.bytes_stream();
    for _ in 0..5 {
        stream.next().await;
    }
    drop(stream);
    eventually(Duration::from_secs(10), || async { Ok(s.ledger("ant").await?.1 == 0) }).await?;
    let (spent, _) = s.ledger("ant").await?;
    let second = spent - 12 * OUTPUT_NANOS_PER_TOKEN;
    assert!(second > 0 && second < 150 * OUTPUT_NANOS_PER_TOKEN, "settled {second} for a call cut short");
    s.app.stop().await
}

async fn messages_refusals_and_errors_come_in_anthropic_shape(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("poor", 7).await?;
    let r = s.anthropic("/v1/messages", "poor", message(20)).await?;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let body: Value = r.json().await?;
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "insufficient_budget");
    assert_eq!(body["error"]["code"], "customer_budget_exceeded");
    assert_eq!(body["error"]["remaining"], "0.007");
    assert_eq!(body["error"]["needed"], "0.02");

    let expect = |r: reqwest::Response, status: StatusCode, kind: &'static str| async move {
        assert_eq!(r.status(), status);
        let body: Value = r.json().await?;
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        anyhow::Ok(())
    };
    let mut no_max = message(20);
    no_max.as_object_mut().map(|o| o.remove("max_tokens"));
    expect(s.anthropic("/v1/messages", "poor", no_max).await?, StatusCode::BAD_REQUEST, "invalid_request_error")
        .await?;
    let mut openai_model = message(20);
    openai_model["model"] = json!("mock-model");
    expect(s.anthropic("/v1/messages", "poor", openai_model).await?, StatusCode::BAD_REQUEST, "invalid_request_error")
        .await?;
    let r = s
        .app
        .client
        .post(s.app.url("/v1/messages"))
        .header("x-api-key", "tg_sk_wrong")
        .header("x-tollgate-customer", "poor")
        .json(&message(1))
        .send()
        .await?;
    expect(r, StatusCode::UNAUTHORIZED, "authentication_error").await?;
    let r = s
        .app
        .client
        .post(s.app.url("/v1/messages"))
        .header("x-api-key", &s.key)
        .header("x-tollgate-customer", "poor")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    expect(r, StatusCode::BAD_REQUEST, "invalid_request_error").await?;
    assert!(s.mock.requests().is_empty(), "nothing may reach the provider");

    // An upstream failure comes back as the provider sent it, and releases the reservation.
    s.budget("rich", 1_000).await?;
    let mut failing = message(20);
    failing["model"] = json!("error-500");
    let r = s.anthropic("/v1/messages", "rich", failing).await?;
    expect(r, StatusCode::INTERNAL_SERVER_ERROR, "api_error").await?;
    assert_eq!(s.ledger("rich").await?, (0, 0));
    assert_eq!(s.events("failed").await?, 1);
    s.app.stop().await
}

async fn messages_clamp_rewrites_max_tokens(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    s.budget("small", 9).await?;
    let r = s.anthropic("/v1/messages", "small", message(50)).await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-tollgate-max-output-clamped"], "9");
    assert_eq!(s.mock.requests()[0]["max_tokens"], 9);
    assert_eq!(s.ledger("small").await?, (9 * OUTPUT_NANOS_PER_TOKEN, 0));
    s.app.stop().await
}

async fn count_tokens_is_forwarded_and_costs_nothing(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    let body = json!({"model": "claude-mock", "messages": [{"role": "user", "content": "Hello!"}]});
    let r = s.anthropic("/v1/messages/count_tokens", "anyone", body).await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await?, json!({"input_tokens": 42}));
    assert_eq!(s.mock.credentials()[0].0, "sk-ant-mock-upstream");
    assert_eq!(s.events("settled").await? + s.events("refused").await?, 0);
    let unrouted = json!({"model": "claude-unknown", "messages": []});
    let r = s.anthropic("/v1/messages/count_tokens", "anyone", unrouted).await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await?["type"], "error");
    s.app.stop().await
}

async fn responses_are_metered_json_and_streamed(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    s.budget("r", 100).await?;
    let body = json!({"model": "mock-model", "input": "Hello!", "max_output_tokens": 30, "temperature": 0.2});
    let r = s.post("/v1/responses", "r", body).await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-tollgate-cost"], "0.03");
    let answer: Value = r.json().await?;
    assert_eq!(answer["object"], "response");
    let sent = &s.mock.requests()[0];
    assert_eq!(sent["temperature"], 0.2, "fields Tollgate does not interpret pass through");
    assert_eq!(sent["max_output_tokens"], 30);
    let event = s.last_event().await?;
    assert_eq!(event, ("responses".into(), "settled".into(), 10, 30, 30 * OUTPUT_NANOS_PER_TOKEN, "provider".into()));

    // Streamed, without a limit of its own: the model's limit (100) is clamped to the 70 left.
    let body = json!({"model": "mock-model", "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        "stream": true});
    let r = s.post("/v1/responses", "r", body).await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-tollgate-max-output-clamped"], "70");
    let events = read_events(r).await?;
    assert_eq!(events.last().and_then(|(n, _)| n.as_deref()), Some("response.completed"));
    assert_eq!(s.mock.requests()[1]["max_output_tokens"], 70);
    eventually(Duration::from_secs(5), || async { Ok(s.ledger("r").await? == (100 * OUTPUT_NANOS_PER_TOKEN, 0)) })
        .await?;
    let r = s.post("/v1/responses", "r", json!({"model": "mock-model", "input": "more"})).await?;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.json::<Value>().await?["error"]["code"], "customer_budget_exceeded");
    s.app.stop().await
}

async fn responses_that_cannot_be_bounded_are_refused(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    s.budget("r", 100).await?;
    let body = json!({"model": "mock-model", "input": "and then?", "previous_response_id": "resp_123"});
    let r = s.post("/v1/responses", "r", body).await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let error: Value = r.json().await?;
    assert_eq!(error["error"]["code"], "unbounded_input");
    assert_eq!(error["error"]["param"], "previous_response_id");
    let r = s.post("/v1/responses", "r", json!({"model": "mock-model"})).await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(s.mock.requests().is_empty());
    s.app.stop().await
}

async fn embeddings_reserve_their_input_and_never_clamp(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    s.budget("e", 12).await?;
    let body = json!({"model": "mock-embedding", "input": ["one", "two"]});
    let r = s.post("/v1/embeddings", "e", body.clone()).await?;
    assert_eq!(r.status(), StatusCode::OK);
    // The mock reports 5 tokens an input: 10 tokens at 1e6 nanos.
    assert_eq!(r.headers()["x-tollgate-cost"], "0.01");
    assert_eq!(r.json::<Value>().await?["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(s.ledger("e").await?, (10 * OUTPUT_NANOS_PER_TOKEN, 0));
    // 0.002 left (2 tokens' worth): a longer input does not fit, and nothing can be clamped.
    let r =
        s.post("/v1/embeddings", "e", json!({"model": "mock-embedding", "input": "a much longer input text"})).await?;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED, "embeddings cannot be clamped: refused");
    let r = s.post("/v1/embeddings", "e", json!({"model": "mock-embedding", "input": [[]]})).await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(s.mock.requests().len(), 1);
    s.app.stop().await
}

async fn models_lists_what_the_project_may_call(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    let r = s.app.client.get(s.app.url("/v1/models")).bearer_auth(&s.key).send().await?;
    assert_eq!(r.status(), StatusCode::OK);
    let list: Value = r.json().await?;
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"].as_array().into_iter().flatten().filter_map(|m| m["id"].as_str()).collect();
    for expected in ["mock-model", "slow-model", "claude-mock", "mock-embedding"] {
        assert!(ids.contains(&expected), "{expected} missing from {ids:?}");
    }
    assert!(!ids.contains(&"gpt-4o"), "a model no connection routes is not callable: {ids:?}");
    let claude = list["data"].as_array().into_iter().flatten().find(|m| m["id"] == "claude-mock").cloned();
    assert_eq!(claude.map(|m| m["owned_by"].clone()), Some(json!("anthropic")));

    let r = s
        .app
        .client
        .get(s.app.url("/v1/models"))
        .header("x-api-key", &s.key)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await?;
    let list: Value = r.json().await?;
    assert_eq!(list["has_more"], false);
    assert!(list["data"].as_array().is_some_and(|d| d.iter().all(|m| m["type"] == "model")));

    let r = s.app.client.get(s.app.url("/v1/models/mock-model")).bearer_auth(&s.key).send().await?;
    assert_eq!(r.json::<Value>().await?["id"], "mock-model");
    let r = s.app.client.get(s.app.url("/v1/models/gpt-4o")).bearer_auth(&s.key).send().await?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s.app.client.get(s.app.url("/v1/models")).send().await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    s.app.stop().await
}

async fn a_revoked_key_stops_working_promptly(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    s.budget("k", 1_000).await?;
    let state = &s.app.state;
    let created = projects::create_key(&state.db, &s.project.id, KeyKind::Secret, "app").await?;
    let call = || {
        s.app
            .client
            .post(s.app.url("/v1/chat/completions"))
            .bearer_auth(&created.plaintext)
            .header("x-tollgate-customer", "k")
            .json(&json!({"model": "mock-model", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}))
            .send()
    };
    assert_eq!(call().await?.status(), StatusCode::OK);
    // The key's last use is recorded (off the request's path).
    eventually(Duration::from_secs(5), || async {
        let used: Option<i64> = with_db!(&state.db, pool => sqlx::query_scalar(
            "SELECT last_used_at FROM api_keys WHERE id = $1").bind(&created.id).fetch_one(pool).await)?;
        Ok(used.is_some())
    })
    .await?;
    // Revoked by another process (no cache invalidation here): refused within the cache's TTL.
    let revoked_at = std::time::Instant::now();
    assert!(projects::revoke_key(&state.db, &s.project.id, &created.id).await?);
    eventually(Duration::from_secs(10), || async { Ok(call().await?.status() == StatusCode::UNAUTHORIZED) }).await?;
    assert!(revoked_at.elapsed() <= tollgate::routes::proxy::cache::CACHE_TTL + Duration::from_secs(1));

    // Revoked by this process: refused at once.
    let other = projects::create_key(&state.db, &s.project.id, KeyKind::Secret, "app2").await?;
    let r = s.app.client.get(s.app.url("/v1/models")).bearer_auth(&other.plaintext).send().await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(projects::revoke_key(&state.db, &s.project.id, &other.id).await?);
    state.keys.forget_project(&s.project.id);
    let r = s.app.client.get(s.app.url("/v1/models")).bearer_auth(&other.plaintext).send().await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    s.app.stop().await
}

async fn a_long_stream_renews_its_reservation(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    s.budget("long", 1_000).await?;
    let db = &s.app.state.db;
    let customer =
        projects::find_customer(db, &s.project.id, "long").await?.ok_or_else(|| anyhow::anyhow!("customer"))?;
    let soon = UnixMillis::now().plus_secs(60);
    let ReserveOutcome::Reserved { reservation, .. } =
        ledger::reserve(db, &customer, Nanos(500), "req-long", soon).await?
    else {
        anyhow::bail!("not reserved");
    };
    assert!(ledger::renew(db, &reservation, UnixMillis::now().plus_secs(3_600)).await?);
    // Housekeeping two minutes from now frees nothing: the reservation was renewed.
    assert_eq!(ledger::release_expired(db, UnixMillis::now().plus_secs(120)).await?, 0);
    assert_eq!(s.ledger("long").await?, (0, 500));
    assert_eq!(ledger::release_expired(db, UnixMillis::now().plus_secs(7_200)).await?, 1);
    assert!(
        !ledger::renew(db, &reservation, UnixMillis::now().plus_secs(3_600)).await?,
        "a released reservation is gone"
    );
    assert_eq!(s.ledger("long").await?, (0, 0));
    s.app.stop().await
}

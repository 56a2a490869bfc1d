//! The output limit a call is reserved for is the one the provider receives: one field, never
//! above the model's limit, whatever limit fields the client sent (and a valid extended-thinking
//! budget for Anthropic).

use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::money::Nanos;
use tollgate_core::pricing::{Price, Tokenizer};
use tollgate_core::projects::{self, BudgetPolicy, NewProvider, ProviderKind};
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{TestDatabase, TestResult};
use crate::proxy::{OUTPUT_NANOS_PER_TOKEN, Setup, setup};

pub fn cases() -> Vec<crate::helpers::DbCase> {
    db_cases![
        chat_forwards_exactly_the_limit_it_reserved_for,
        responses_forward_exactly_the_limit_they_reserved_for,
        messages_forward_exactly_the_limit_they_reserved_for,
        a_thinking_budget_stays_valid_or_the_call_is_refused,
    ]
}

/// The mock models' own limit (see [`crate::proxy::setup`]).
const MODEL_LIMIT: i64 = 100;
/// Far above any model's limit.
const HUGE: i64 = 1_000_000_000_000_000;
const LIMIT_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// The output-limit fields a forwarded request carried, with their values.
fn limits_sent(sent: &Value) -> Vec<(&'static str, i64)> {
    LIMIT_FIELDS
        .into_iter()
        .filter_map(|field| sent.get(field).filter(|v| !v.is_null()).map(|v| (field, v.as_i64().unwrap_or(-1))))
        .collect()
}

/// What the newest call reserved, in output tokens (input is free in the test prices).
async fn reserved_tokens(s: &Setup) -> anyhow::Result<i64> {
    let reserved: i64 = with_db!(&s.app.state.db, pool => sqlx::query_scalar(
        "SELECT reserved_nanos FROM usage_events ORDER BY created_at DESC, id DESC LIMIT 1").fetch_one(pool).await)?;
    Ok(reserved / OUTPUT_NANOS_PER_TOKEN)
}

/// Sends `body` to `path`, expects it admitted, and checks that the provider received exactly
/// `expected` as the one output limit, which is also what was reserved.
async fn assert_forwarded(
    s: &Setup,
    path: &str,
    body: Value,
    expected: (&'static str, i64),
    case: &str,
) -> anyhow::Result<()> {
    let seen = s.mock.requests().len();
    let r = s.post(path, "c", body).await?;
    assert_eq!(r.status(), StatusCode::OK, "{case}: {}", r.text().await?);
    let requests = s.mock.requests();
    assert_eq!(requests.len(), seen + 1, "{case}: the provider saw the call once");
    assert_eq!(limits_sent(&requests[seen]), vec![expected], "{case}: the forwarded limit");
    assert_eq!(reserved_tokens(s).await?, expected.1, "{case}: what was reserved");
    Ok(())
}

/// Adds an OpenAI connection (on the mock) serving `openai-mock`, priced like the mock models.
async fn add_openai_connection(s: &Setup) -> anyhow::Result<()> {
    let state = &s.app.state;
    let new = NewProvider {
        kind: ProviderKind::OpenAi,
        name: "mock openai".into(),
        base_url: Some(s.mock.base_url()),
        api_key: "sk-openai-mock".into(),
        models: vec!["openai-mock".into()],
    };
    projects::add_provider(&state.db, &state.master_key, &s.project.id, &new).await?;
    projects::set_price(&state.db, &s.project.id, "openai-mock", &mock_price(MODEL_LIMIT)).await?;
    Ok(())
}

fn mock_price(max_output_tokens: i64) -> Price {
    Price {
        input: 0,
        cached_input: 0,
        output: OUTPUT_NANOS_PER_TOKEN * 1_000_000,
        cache_write: 0,
        max_output_tokens,
        tokenizer: Tokenizer::O200kBase,
    }
}

async fn chat_forwards_exactly_the_limit_it_reserved_for(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("c", 1_000_000).await?;
    add_openai_connection(&s).await?;
    let chat = |model: &str, limits: Value| {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "Hello!"}]});
        for (k, v) in limits.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        body
    };
    let cases: Vec<(&str, &str, Value, (&str, i64))> = vec![
        // An OpenAI-compatible connection: `max_tokens` unless the client used only the other.
        ("none", "mock-model", json!({}), ("max_tokens", MODEL_LIMIT)),
        ("max_tokens", "mock-model", json!({"max_tokens": 30}), ("max_tokens", 30)),
        ("max_completion_tokens", "mock-model", json!({"max_completion_tokens": 30}), ("max_completion_tokens", 30)),
        (
            "both, max_tokens smaller",
            "mock-model",
            json!({"max_tokens": 5, "max_completion_tokens": 100_000}),
            ("max_tokens", 5),
        ),
        (
            "both, max_completion_tokens smaller",
            "mock-model",
            json!({"max_tokens": 100_000, "max_completion_tokens": 5}),
            ("max_tokens", 5),
        ),
        (
            "both, both above the model",
            "mock-model",
            json!({"max_tokens": HUGE, "max_completion_tokens": 200}),
            ("max_tokens", MODEL_LIMIT),
        ),
        ("max_tokens above the model", "mock-model", json!({"max_tokens": HUGE}), ("max_tokens", MODEL_LIMIT)),
        (
            "max_completion_tokens above the model",
            "mock-model",
            json!({"max_completion_tokens": MODEL_LIMIT + 1}),
            ("max_completion_tokens", MODEL_LIMIT),
        ),
        (
            "null max_tokens",
            "mock-model",
            json!({"max_tokens": null, "max_completion_tokens": 7}),
            ("max_completion_tokens", 7),
        ),
        // An OpenAI connection: `max_completion_tokens`, which every OpenAI model reads.
        ("openai: none", "openai-mock", json!({}), ("max_completion_tokens", MODEL_LIMIT)),
        ("openai: max_tokens", "openai-mock", json!({"max_tokens": 30}), ("max_tokens", 30)),
        (
            "openai: both",
            "openai-mock",
            json!({"max_tokens": 100_000, "max_completion_tokens": 5}),
            ("max_completion_tokens", 5),
        ),
        (
            "openai: both, other order",
            "openai-mock",
            json!({"max_tokens": 5, "max_completion_tokens": 100_000}),
            ("max_completion_tokens", 5),
        ),
    ];
    for (case, model, limits, expected) in cases {
        assert_forwarded(&s, "/v1/chat/completions", chat(model, limits), expected, case).await?;
    }
    // Streamed calls too.
    let body = json!({"model": "mock-model", "stream": true, "max_tokens": 3, "max_completion_tokens": 50,
        "messages": [{"role": "user", "content": "Hello!"}]});
    let r = s.post("/v1/chat/completions", "c", body).await?;
    assert_eq!(r.status(), StatusCode::OK);
    let _ = r.text().await?;
    let sent = s.mock.requests().last().cloned().unwrap_or_default();
    assert_eq!(limits_sent(&sent), vec![("max_tokens", 3)]);
    s.app.stop().await
}

async fn responses_forward_exactly_the_limit_they_reserved_for(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("c", 1_000_000).await?;
    let cases: Vec<(&str, Value, i64)> = vec![
        ("none", json!({}), MODEL_LIMIT),
        ("set", json!({"max_output_tokens": 30}), 30),
        ("above the model", json!({"max_output_tokens": HUGE}), MODEL_LIMIT),
        // Chat's fields are not Responses fields, but a compatible server may read them.
        ("stray chat fields", json!({"max_output_tokens": 30, "max_tokens": HUGE, "max_completion_tokens": 5}), 30),
    ];
    for (case, limits, expected) in cases {
        let mut body = json!({"model": "mock-model", "input": "Hello!"});
        for (k, v) in limits.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        assert_forwarded(&s, "/v1/responses", body, ("max_output_tokens", expected), case).await?;
    }
    s.app.stop().await
}

fn message(model: &str, max_tokens: i64, thinking: Option<i64>) -> Value {
    let mut body =
        json!({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hello!"}]});
    if let Some(budget) = thinking {
        body["thinking"] = json!({"type": "enabled", "budget_tokens": budget});
    }
    body
}

async fn messages_forward_exactly_the_limit_they_reserved_for(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("c", 1_000_000).await?;
    for (case, max_tokens, expected) in [("set", 30, 30), ("above the model", HUGE, MODEL_LIMIT)] {
        assert_forwarded(&s, "/v1/messages", message("claude-mock", max_tokens, None), ("max_tokens", expected), case)
            .await?;
    }
    s.app.stop().await
}

async fn a_thinking_budget_stays_valid_or_the_call_is_refused(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    projects::set_price(&s.app.state.db, &s.project.id, "claude-mock-think", &mock_price(64_000)).await?;
    let think = |max_tokens: i64, budget: i64| message("claude-mock-think", max_tokens, Some(budget));

    // Fits: forwarded as sent.
    s.budget("c", 1_000_000).await?;
    assert_forwarded(&s, "/v1/messages", think(8_000, 4_000), ("max_tokens", 8_000), "thinking that fits").await?;
    assert_eq!(s.mock.requests().last().map(|r| r["thinking"]["budget_tokens"].clone()), Some(json!(4_000)));

    // Clamped to 3,000: the budget follows below it, and stays at least 1,024.
    let state = &s.app.state;
    projects::upsert_customer_budget(
        &state.db,
        &s.project.id,
        "clamped",
        Nanos(3_000 * OUTPUT_NANOS_PER_TOKEN),
        tollgate_core::period::BudgetPeriod::Month,
    )
    .await?;
    let r = s.post("/v1/messages", "clamped", think(8_000, 4_000)).await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-tollgate-max-output-clamped"], "3000");
    let sent = s.mock.requests().last().cloned().unwrap_or_default();
    assert_eq!(limits_sent(&sent), vec![("max_tokens", 3_000)]);
    assert_eq!(sent["thinking"]["budget_tokens"], 2_999);

    // Clamping to 1,000 would leave no valid thinking budget: our 402, not the provider's 400.
    let seen = s.mock.requests().len();
    projects::upsert_customer_budget(
        &state.db,
        &s.project.id,
        "poor",
        Nanos(1_000 * OUTPUT_NANOS_PER_TOKEN),
        tollgate_core::period::BudgetPeriod::Month,
    )
    .await?;
    let r = s.post("/v1/messages", "poor", think(8_000, 4_000)).await?;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let body: Value = r.json().await?;
    assert_eq!(body["type"], "error", "Anthropic's error shape: {body}");
    assert_eq!(s.mock.requests().len(), seen, "a refused call reached the provider");
    assert_eq!(s.ledger("poor").await?, (0, 0));
    // Without thinking, the same customer is clamped to what it can pay for.
    let r = s.post("/v1/messages", "poor", message("claude-mock-think", 8_000, None)).await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-tollgate-max-output-clamped"], "1000");

    // A client's own invalid budget (below 1,024) is forwarded as sent: the provider judges it.
    let r = s.post("/v1/messages", "c", think(2_000, 500)).await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(s.mock.requests().last().map(|r| r["thinking"]["budget_tokens"].clone()), Some(json!(500)));
    s.app.stop().await
}

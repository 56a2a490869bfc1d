//! The output limit a call is reserved for is the one the provider receives: one field, never
//! above the model's limit, whatever limit fields the client sent (and a valid extended-thinking
//! budget for Anthropic); calls that name no limit take the project's default max output.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::money::Nanos;
use tollgate_core::pricing::{Price, Tokenizer};
use tollgate_core::projects::{self, BudgetPolicy, NewProvider, ProjectSettings, ProviderKind};
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
        calls_without_a_limit_reserve_the_project_default,
        the_default_max_output_is_shown_by_the_api,
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
    ];
    for (case, limits, expected) in cases {
        let mut body = json!({"model": "mock-model", "input": "Hello!"});
        for (k, v) in limits.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        assert_forwarded(&s, "/v1/responses", body, ("max_output_tokens", expected), case).await?;
    }
    // Chat's fields are not Responses fields, but a compatible server may read them: refused
    // as fields Tollgate does not know (the admission rule) ...
    let stray = json!({"model": "mock-model", "input": "Hello!", "max_output_tokens": 30, "max_tokens": HUGE,
        "max_completion_tokens": 5});
    let seen = s.mock.requests().len();
    let r = s.post("/v1/responses", "c", stray.clone()).await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let error: Value = r.json().await?;
    assert_eq!(error["error"]["code"], "unknown_field", "{error}");
    assert_eq!(s.mock.requests().len(), seen, "nothing forwarded");
    // ... and under a project's per-call ceiling, admitted with them removed.
    let project = projects::get_project(&s.app.state.db, &s.project.id).await?.unwrap();
    let settings = ProjectSettings { unbounded_call_ceiling: Some(Nanos(1_000_000)), ..ProjectSettings::of(&project) };
    projects::update_project(&s.app.state.db, &project.org_id, &project.id, &settings).await?;
    s.app.state.forget_project(&s.project.id);
    let r = s.post("/v1/responses", "c", stray).await?;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await?);
    let requests = s.mock.requests();
    assert_eq!(limits_sent(&requests[seen]), vec![("max_output_tokens", 30)], "stray chat fields removed");
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

/// Sets the project's default max output (None: the model's limit).
async fn set_default_max_output(s: &Setup, default: Option<i64>) -> anyhow::Result<()> {
    let state = &s.app.state;
    let project =
        projects::get_project(&state.db, &s.project.id).await?.ok_or_else(|| anyhow::anyhow!("no project"))?;
    let settings = ProjectSettings { default_max_output_tokens: default, ..ProjectSettings::of(&project) };
    projects::update_project(&state.db, &project.org_id, &project.id, &settings).await?;
    state.forget_project(&project.id);
    Ok(())
}

/// Sends `calls` chat calls at once without a limit; returns how many were admitted.
async fn burst(s: &Setup, customer: &str, calls: usize) -> anyhow::Result<usize> {
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "Hello!"}]});
    let results = futures::future::join_all((0..calls).map(|_| s.chat(customer, body.clone()))).await;
    let mut admitted = 0;
    for r in results {
        match r?.status() {
            StatusCode::OK => admitted += 1,
            StatusCode::PAYMENT_REQUIRED => {}
            other => anyhow::bail!("unexpected {other}"),
        }
    }
    Ok(admitted)
}

async fn calls_without_a_limit_reserve_the_project_default(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    // A budget for 10 calls of the default's 10 tokens (the model's limit is 100).
    set_default_max_output(&s, Some(10)).await?;
    s.budget("burst", 100).await?;
    assert_eq!(burst(&s, "burst", 100).await?, 10, "the budget pays for 10 default-sized calls");
    let requests = s.mock.requests();
    assert_eq!(requests.len(), 10);
    assert!(requests.iter().all(|r| limits_sent(r) == vec![("max_tokens", 10)]), "{requests:?}");
    assert_eq!(s.ledger("burst").await?, (100 * OUTPUT_NANOS_PER_TOKEN, 0));

    // A default above the model's limit is capped at it, like a call's own limit.
    set_default_max_output(&s, Some(1_000)).await?;
    s.budget("c", 1_000_000).await?;
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "Hello!"}]});
    assert_forwarded(&s, "/v1/chat/completions", body, ("max_tokens", MODEL_LIMIT), "default above the model").await?;

    // Without a default, the model's whole limit is the worst case: the first call of the
    // burst takes the whole budget.
    set_default_max_output(&s, None).await?;
    s.budget("whole", 100).await?;
    assert_eq!(burst(&s, "whole", 20).await?, 1);
    s.app.stop().await
}

async fn the_default_max_output_is_shown_by_the_api(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    let (status, shown) = s.api(reqwest::Method::GET, "/api/v1/project", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["default_max_output_tokens"], projects::DEFAULT_MAX_OUTPUT_TOKENS, "a new project's default");
    set_default_max_output(&s, None).await?;
    let (_, shown) = s.api(reqwest::Method::GET, "/api/v1/project", None).await?;
    assert_eq!(shown["default_max_output_tokens"], Value::Null);
    // Out of range, or below the minimum clamped output: refused, nothing saved.
    for bad in [0, 2_000_000] {
        let project = projects::get_project(&s.app.state.db, &s.project.id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no project"))?;
        let settings = ProjectSettings { default_max_output_tokens: Some(bad), ..ProjectSettings::of(&project) };
        assert!(projects::update_project(&s.app.state.db, &project.org_id, &project.id, &settings).await.is_err());
    }
    s.app.stop().await
}

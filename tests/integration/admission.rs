//! The admission rule: a call is admitted only when its worst case is bounded by what
//! Tollgate sees in the request. What it cannot see (a document by URL, a file by id, a
//! hosted tool, an unknown content type or field) is refused before the provider hears of it
//! — unless the project set a per-call ceiling, which is then reserved in full. What it can
//! bound (images by the model's own formula, text documents) is reserved so that it covers
//! what the provider bills.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::pricing::{Price, Tokenizer};
use tollgate_core::projects::{self, BudgetPolicy, NewProvider, ProjectSettings, ProviderKind};
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult};
use crate::mock_provider::{HOSTED_TOOL_TOKENS, anthropic_image_tokens, openai_image_tokens};
use crate::proxy::{Setup, setup};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        an_anthropic_document_by_url_is_refused,
        an_anthropic_document_by_file_id_is_refused,
        an_anthropic_pdf_document_is_refused,
        anthropic_web_search_is_refused,
        anthropic_defined_client_tools_are_refused,
        an_unknown_anthropic_block_is_refused,
        an_unknown_anthropic_field_is_refused,
        a_responses_input_file_by_id_is_refused,
        responses_hosted_web_search_is_refused,
        a_stored_prompt_or_item_reference_is_refused,
        background_responses_are_refused_even_under_a_ceiling,
        a_chat_file_part_is_refused,
        chat_hosted_search_and_audio_output_are_refused,
        an_unknown_chat_part_or_field_is_refused,
        a_gpt_4o_mini_image_is_reserved_by_its_own_figures,
        an_anthropic_image_is_reserved_by_the_model_ceiling,
        a_responses_image_is_reserved_by_its_own_figures,
        a_text_document_is_counted_and_admitted,
        known_harmless_fields_pass,
        under_a_ceiling_a_hosted_tool_is_admitted_and_charged_what_it_cost,
        under_a_ceiling_the_ceiling_must_fit_the_budget,
    ]
}

/// Input and output both 1,000 nanos a token (0.000001 of a unit), so an image's tokens show
/// in what is reserved and charged.
const NANOS_PER_TOKEN: i64 = 1_000;

/// [`setup`] plus an OpenAI-compatible connection that serves the real model names, priced at
/// [`NANOS_PER_TOKEN`], and the Anthropic mock models priced the same.
async fn admission_setup(db: &TestDatabase, policy: BudgetPolicy) -> anyhow::Result<Setup> {
    let s = setup(db, policy).await?;
    let state = &s.app.state;
    projects::add_provider(
        &state.db,
        &state.master_key,
        &s.project.id,
        &NewProvider {
            kind: ProviderKind::OpenAiCompatible,
            name: "mock real names".into(),
            base_url: Some(s.mock.base_url()),
            api_key: "sk-mock-upstream".into(),
            models: vec!["gpt-4o-mini".into(), "gpt-4o".into()],
        },
    )
    .await?;
    let price = Price {
        input: NANOS_PER_TOKEN * 1_000_000,
        cached_input: NANOS_PER_TOKEN * 1_000_000,
        output: NANOS_PER_TOKEN * 1_000_000,
        cache_write: NANOS_PER_TOKEN * 1_000_000,
        max_output_tokens: 100,
        tokenizer: Tokenizer::O200kBase,
    };
    for model in ["gpt-4o-mini", "gpt-4o"] {
        projects::set_price(&state.db, &s.project.id, model, &price).await?;
    }
    for model in ["claude-mock", "claude-sonnet-4-mock"] {
        projects::set_price(&state.db, &s.project.id, model, &Price { tokenizer: Tokenizer::Approximate, ..price })
            .await?;
    }
    projects::add_provider(
        &state.db,
        &state.master_key,
        &s.project.id,
        &NewProvider {
            kind: ProviderKind::Anthropic,
            name: "mock anthropic real names".into(),
            base_url: Some(s.mock.anthropic_base_url()),
            api_key: "sk-ant-mock-upstream".into(),
            models: vec!["claude-sonnet-4-mock".into()],
        },
    )
    .await?;
    Ok(s)
}

impl Setup {
    /// Sets `customer`'s budget in nanos.
    async fn budget_nanos(&self, customer: &str, nanos: i64) -> anyhow::Result<()> {
        projects::upsert_customer_budget(
            &self.app.state.db,
            &self.project.id,
            customer,
            Nanos(nanos),
            BudgetPeriod::Month,
        )
        .await?;
        Ok(())
    }

    /// Allows calls Tollgate cannot bound, under `ceiling` per call (None: refuses them).
    async fn set_ceiling(&self, ceiling: Option<Nanos>) -> anyhow::Result<()> {
        let project = projects::get_project(&self.app.state.db, &self.project.id).await?.unwrap();
        let settings = ProjectSettings { unbounded_call_ceiling: ceiling, ..ProjectSettings::of(&project) };
        projects::update_project(&self.app.state.db, &project.org_id, &project.id, &settings).await?;
        self.app.state.forget_project(&project.id);
        Ok(())
    }

    /// (input tokens, reserved, billed) of the only settled usage event.
    async fn settled(&self) -> anyhow::Result<(i64, i64, i64)> {
        Ok(with_db!(&self.app.state.db, pool => sqlx::query_as(
            "SELECT input_tokens, reserved_nanos, billed_nanos FROM usage_events WHERE status = 'settled'")
            .fetch_one(pool).await)?)
    }
}

/// Posts `body` to `path` and checks it was refused before the provider heard of it: 400 in
/// the endpoint's error shape with `code` naming `param`, nothing spent or held, and one
/// `refused` usage event saying why.
async fn assert_refused(s: &Setup, path: &str, body: Value, code: &str, param: &str) -> TestResult {
    s.budget_nanos("c", 1_000_000_000).await?;
    let response = s.post(path, "c", body).await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await?;
    let message = if path == "/v1/messages" {
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        body["error"]["message"].as_str().unwrap_or_default().to_owned()
    } else {
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
        body["error"]["message"].as_str().unwrap_or_default().to_owned()
    };
    assert!(message.contains(&format!("`{param}`")), "the message must name the field: {message}");
    assert!(s.mock.requests().is_empty(), "a refused call reached the provider");
    assert_eq!(s.ledger("c").await?, (0, 0));
    let reason = format!("{code}: {param}");
    let (events, reserved, billed): (i64, i64, i64) = with_db!(&s.app.state.db, pool => sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(reserved_nanos), 0) AS BIGINT), CAST(COALESCE(SUM(billed_nanos), 0) AS BIGINT) \
         FROM usage_events WHERE status = 'refused' AND reason = $1").bind(&reason).fetch_one(pool).await)?;
    assert_eq!((events, reserved, billed), (1, 0, 0), "one refused usage event saying `{reason}`");
    assert_eq!(s.events("settled").await?, 0);
    Ok(())
}

fn claude(content: Value) -> Value {
    json!({"model": "claude-mock", "max_tokens": 10, "messages": [{"role": "user", "content": content}]})
}

fn chat(model: &str, content: Value) -> Value {
    json!({"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": content}]})
}

fn responses(model: &str, content: Value) -> Value {
    json!({"model": model, "max_output_tokens": 10, "input": [{"role": "user", "content": content}]})
}

async fn an_anthropic_document_by_url_is_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let body = claude(json!([
        {"type": "document", "source": {"type": "url", "url": "https://example.com/report.pdf"}},
        {"type": "text", "text": "Summarise this."}
    ]));
    assert_refused(&s, "/v1/messages", body, "unbounded_input", "messages[0].content[0]").await?;
    s.app.stop().await
}

async fn an_anthropic_document_by_file_id_is_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let body = claude(json!([{"type": "text", "text": "Read:"},
        {"type": "document", "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}}]));
    assert_refused(&s, "/v1/messages", body, "unbounded_input", "messages[0].content[1]").await?;
    s.app.stop().await
}

async fn an_anthropic_pdf_document_is_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let body = claude(json!([{"type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}}]));
    assert_refused(&s, "/v1/messages", body, "unbounded_input", "messages[0].content[0]").await?;
    s.app.stop().await
}

async fn anthropic_web_search_is_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let mut body = claude(json!("What happened in the news today?"));
    body["tools"] = json!([{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]);
    assert_refused(&s, "/v1/messages", body, "unbounded_tool", "tools[0]").await?;
    s.app.stop().await
}

async fn anthropic_defined_client_tools_are_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let mut body = claude(json!("List the files."));
    body["tools"] = json!([
        {"name": "lookup", "description": "Look a word up", "input_schema": {"type": "object", "properties": {}}},
        {"type": "bash_20250124", "name": "bash"}
    ]);
    assert_refused(&s, "/v1/messages", body, "unbounded_tool", "tools[1]").await?;
    s.app.stop().await
}

async fn an_unknown_anthropic_block_is_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let body = claude(json!([{"type": "video", "source": {"type": "url", "url": "https://example.com/a.mp4"}}]));
    assert_refused(&s, "/v1/messages", body, "unbounded_input", "messages[0].content[0]").await?;
    s.app.stop().await
}

async fn an_unknown_anthropic_field_is_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let mut body = claude(json!("Hi"));
    body["mcp_servers"] = json!([{"type": "url", "url": "https://mcp.example.com/sse", "name": "example"}]);
    assert_refused(&s, "/v1/messages", body, "unbounded_tool", "mcp_servers").await?;
    let mut body = claude(json!("Hi"));
    body["speed"] = json!("fast");
    assert_refused(&s, "/v1/messages", body, "unknown_field", "speed").await?;
    s.app.stop().await
}

async fn a_responses_input_file_by_id_is_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let body = responses(
        "mock-model",
        json!([{"type": "input_file", "file_id": "file-6F2ksmvXxt4VdoqmHRw6kL"},
            {"type": "input_text", "text": "Summarise the file."}]),
    );
    assert_refused(&s, "/v1/responses", body, "unbounded_input", "input[0].content[0]").await?;
    s.app.stop().await
}

async fn responses_hosted_web_search_is_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let body = json!({"model": "mock-model", "max_output_tokens": 10, "input": "What is new today?",
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}},
            {"type": "web_search"}]});
    assert_refused(&s, "/v1/responses", body, "unbounded_tool", "tools[1]").await?;
    s.app.stop().await
}

async fn a_stored_prompt_or_item_reference_is_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let body = json!({"model": "mock-model", "max_output_tokens": 10,
        "input": [{"type": "item_reference", "id": "msg_123"}]});
    assert_refused(&s, "/v1/responses", body, "unbounded_input", "input[0]").await?;
    let body = json!({"model": "mock-model", "max_output_tokens": 10, "input": "Hi",
        "prompt": {"id": "pmpt_abc123", "version": "2"}});
    assert_refused(&s, "/v1/responses", body, "unbounded_input", "prompt").await?;
    s.app.stop().await
}

async fn background_responses_are_refused_even_under_a_ceiling(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    s.set_ceiling(Some(Nanos(1_000_000))).await?;
    s.budget_nanos("c", 1_000_000_000).await?;
    let body = json!({"model": "mock-model", "max_output_tokens": 10, "input": "Hi", "background": true});
    let response = s.post("/v1/responses", "c", body).await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["code"], "unsupported_field", "{body}");
    assert_eq!(body["error"]["param"], "background", "{body}");
    assert!(s.mock.requests().is_empty());
    s.app.stop().await
}

async fn a_chat_file_part_is_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let body = chat(
        "mock-model",
        json!([{"type": "text", "text": "Summarise"},
        {"type": "file", "file": {"file_id": "file-abc"}}]),
    );
    assert_refused(&s, "/v1/chat/completions", body, "unbounded_input", "messages[0].content[1]").await?;
    s.app.stop().await
}

async fn chat_hosted_search_and_audio_output_are_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let mut body = chat("mock-model", json!("What is new?"));
    body["web_search_options"] = json!({});
    assert_refused(&s, "/v1/chat/completions", body, "unbounded_tool", "web_search_options").await?;
    let mut body = chat("mock-model", json!("Say it aloud"));
    body["modalities"] = json!(["text", "audio"]);
    assert_refused(&s, "/v1/chat/completions", body, "unbounded_output", "modalities").await?;
    s.app.stop().await
}

async fn an_unknown_chat_part_or_field_is_refused(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let body = chat("mock-model", json!([{"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}]));
    assert_refused(&s, "/v1/chat/completions", body, "unbounded_input", "messages[0].content[0]").await?;
    let mut body = chat("mock-model", json!("Hi"));
    body["best_of"] = json!(20);
    assert_refused(&s, "/v1/chat/completions", body, "unknown_field", "best_of").await?;
    s.app.stop().await
}

/// The reported bug: gpt-4o-mini was reserved with gpt-4o's image figures (85 + 170 per
/// tile) and billed at its own (2833 + 5667 per tile), 33 times more. A budget that covers
/// gpt-4o's figures but not gpt-4o-mini's now refuses the call; one that covers them admits
/// it, and the reservation covers what the provider billed.
async fn a_gpt_4o_mini_image_is_reserved_by_its_own_figures(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let image = json!([{"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/photo.jpg", "detail": "high"}}]);
    let billed_tokens = 10 + openai_image_tokens("gpt-4o-mini", Some("high"));
    // Enough for gpt-4o's figures (1445 tokens) many times over, not for gpt-4o-mini's.
    s.budget_nanos("poor", 10 * 1_445 * NANOS_PER_TOKEN).await?;
    let refused = s.post("/v1/chat/completions", "poor", chat("gpt-4o-mini", image.clone())).await?;
    assert_eq!(refused.status(), StatusCode::PAYMENT_REQUIRED);
    assert!(s.mock.requests().is_empty());
    assert_eq!(s.ledger("poor").await?, (0, 0));

    s.budget_nanos("rich", 100_000 * NANOS_PER_TOKEN).await?;
    let response = s.post("/v1/chat/completions", "rich", chat("gpt-4o-mini", image)).await?;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await?);
    let (input, reserved, billed) = s.settled().await?;
    assert_eq!(input, billed_tokens, "the mock bills the image by gpt-4o-mini's figures");
    assert_eq!(billed, (billed_tokens + 10) * NANOS_PER_TOKEN);
    assert!(reserved >= billed, "reserved {reserved} < billed {billed}");
    assert_eq!(s.ledger("rich").await?, (billed, 0));
    s.app.stop().await
}

async fn a_responses_image_is_reserved_by_its_own_figures(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    s.budget_nanos("c", 100_000 * NANOS_PER_TOKEN).await?;
    let body = responses(
        "gpt-4o-mini",
        json!([{"type": "input_text", "text": "Describe it."},
            {"type": "input_image", "image_url": "https://example.com/photo.jpg", "detail": "auto"}]),
    );
    let response = s.post("/v1/responses", "c", body).await?;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await?);
    let (input, reserved, billed) = s.settled().await?;
    assert_eq!(input, 10 + openai_image_tokens("gpt-4o-mini", Some("auto")));
    assert!(reserved >= billed, "reserved {reserved} < billed {billed}");
    s.app.stop().await
}

async fn an_anthropic_image_is_reserved_by_the_model_ceiling(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    s.budget_nanos("c", 100_000 * NANOS_PER_TOKEN).await?;
    // A model Tollgate does not know: the high-resolution ceiling, as the mock bills it.
    let image = json!([{"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
        {"type": "text", "text": "What is this?"}]);
    let response = s.post("/v1/messages", "c", claude(image)).await?;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await?);
    let (input, reserved, billed) = s.settled().await?;
    assert_eq!(input, 10 + anthropic_image_tokens("claude-mock"));
    assert!(reserved >= billed, "reserved {reserved} < billed {billed}");
    s.app.stop().await
}

async fn a_text_document_is_counted_and_admitted(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let text = "The quarterly report. ".repeat(200);
    s.budget_nanos("c", 100_000 * NANOS_PER_TOKEN).await?;
    let body = claude(json!([
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": text}, "title": "Q3"},
        {"type": "text", "text": "Summarise it."}
    ]));
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let response = s.post("/v1/messages", "c", streamed).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let reserved: i64 = response.headers()["x-tollgate-reserved"].to_str()?.parse::<Nanos>()?.0;
    // The text's bytes (Claude has no public tokenizer) and the output.
    assert!(reserved >= (text.len() as i64 + 10) * NANOS_PER_TOKEN, "the document was not counted: {reserved}");
    assert_eq!(s.mock.requests().len(), 1);
    s.app.stop().await
}

/// Fields that cannot add to the bill pass untouched.
async fn known_harmless_fields_pass(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    s.budget_nanos("c", 1_000_000 * NANOS_PER_TOKEN).await?;
    let mut body = chat("mock-model", json!("Hi"));
    for (field, value) in [
        ("temperature", json!(0.2)),
        ("top_p", json!(0.9)),
        ("metadata", json!({"k": "v"})),
        ("stop", json!(["\n"])),
        ("seed", json!(7)),
        ("response_format", json!({"type": "json_object"})),
        ("tool_choice", json!("auto")),
        ("parallel_tool_calls", json!(true)),
        ("logprobs", json!(true)),
        ("top_logprobs", json!(2)),
        ("reasoning_effort", json!("low")),
        ("service_tier", json!("flex")),
        ("store", json!(false)),
        ("user", json!("u-1")),
    ] {
        body[field] = value;
    }
    body["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    // An SDK's earlier answer sent back as it came: its nulls and empty citations are harmless.
    body["messages"] = json!([{"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "refusal": null, "audio": null, "annotations": [], "tool_calls": null},
        {"role": "user", "content": "Again"}]);
    body["prediction"] = Value::Null;
    let response = s.post("/v1/chat/completions", "c", body).await?;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await?);
    let body = json!({"model": "mock-model", "max_output_tokens": 10, "input": "Hi", "instructions": "Be brief.",
        "reasoning": {"effort": "low"}, "text": {"format": {"type": "text"}}, "truncation": "auto",
        "include": ["message.output_text.logprobs"], "store": false, "temperature": 0.5});
    let response = s.post("/v1/responses", "c", body).await?;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await?);
    let mut body = claude(json!([{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]));
    body["system"] = json!("Be brief.");
    body["temperature"] = json!(0.3);
    body["top_k"] = json!(5);
    body["stop_sequences"] = json!(["END"]);
    body["metadata"] = json!({"user_id": "u-1"});
    body["tools"] = json!([{"name": "f", "input_schema": {"type": "object"}}, {"type": "custom", "name": "g", "input_schema": {"type": "object"}}]);
    let response = s.post("/v1/messages", "c", body).await?;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await?);
    assert_eq!(s.mock.requests().len(), 3);
    s.app.stop().await
}

/// With a ceiling, a hosted tool is admitted: the ceiling is reserved in full (it is above
/// the call's own worst case), and what the provider billed is charged, even past it.
async fn under_a_ceiling_a_hosted_tool_is_admitted_and_charged_what_it_cost(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Reject).await?;
    let ceiling = Nanos(20_000 * NANOS_PER_TOKEN);
    s.set_ceiling(Some(ceiling)).await?;
    let api: Value = s.app.client.get(s.app.url("/api/v1/project")).bearer_auth(&s.key).send().await?.json().await?;
    assert_eq!(api["unbounded_call_ceiling"], "0.02", "{api}");
    assert_eq!(api["unbounded_call_ceiling_nanos"], ceiling.0, "{api}");

    s.budget_nanos("c", 1_000_000 * NANOS_PER_TOKEN).await?;
    let mut body = claude(json!("What happened today?"));
    body["tools"] = json!([{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]);
    body["stream"] = json!(true);
    let response = s.post("/v1/messages", "c", body).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-tollgate-reserved"], "0.02", "the ceiling is reserved in full");
    let _ = response.text().await?;
    crate::helpers::eventually(std::time::Duration::from_secs(5), || async { Ok(s.ledger("c").await?.1 == 0) }).await?;
    let (input, reserved, billed) = s.settled().await?;
    assert_eq!(input, 10 + HOSTED_TOOL_TOKENS);
    assert_eq!(reserved, ceiling.0);
    assert_eq!(billed, (10 + HOSTED_TOOL_TOKENS + 10) * NANOS_PER_TOKEN);
    assert!(billed > reserved, "the mock bills past the ceiling");
    assert_eq!(s.ledger("c").await?, (billed, 0), "what the provider billed is charged, past the ceiling");

    // A file by id, through the Responses API: held at the ceiling too.
    let body = responses("mock-model", json!([{"type": "input_file", "file_id": "file-abc"}]));
    let response = s.post("/v1/responses", "c", body).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let reserved: Vec<i64> = with_db!(&s.app.state.db, pool => sqlx::query_scalar(
        "SELECT reserved_nanos FROM usage_events WHERE endpoint = 'responses'").fetch_all(pool).await)?;
    assert_eq!(reserved, vec![ceiling.0]);

    // Taking the ceiling away refuses such calls again.
    s.set_ceiling(None).await?;
    let body = responses("mock-model", json!([{"type": "input_file", "file_id": "file-abc"}]));
    let response = s.post("/v1/responses", "c", body).await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    s.app.stop().await
}

async fn under_a_ceiling_the_ceiling_must_fit_the_budget(db: TestDatabase) -> TestResult {
    let s = admission_setup(&db, BudgetPolicy::Clamp).await?;
    s.set_ceiling(Some(Nanos(20_000 * NANOS_PER_TOKEN))).await?;
    s.budget_nanos("c", 19_000 * NANOS_PER_TOKEN).await?;
    let body =
        json!({"model": "mock-model", "max_output_tokens": 10, "input": "News?", "tools": [{"type": "web_search"}]});
    let response = s.post("/v1/responses", "c", body).await?;
    assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED, "even clamp cannot lower a ceiling");
    assert!(s.mock.requests().is_empty());
    assert_eq!(s.ledger("c").await?, (0, 0));
    s.app.stop().await
}

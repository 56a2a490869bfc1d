//! A stand-in provider over real HTTP, speaking OpenAI (chat completions, responses,
//! embeddings under `/v1`) and Anthropic (messages, count_tokens). Behaviour follows the
//! model name: `error-500` fails; `slow-*` and `*-slow` stream up to 200 chunks 20 ms apart;
//! `mock-wait-<ms>` answers JSON after that many milliseconds; anything
//! else answers with exactly the requested max output tokens (default 20), one per chunk when
//! streaming, and reports usage (10 input tokens; embeddings 5 per input) — plus what the real
//! provider bills for what Tollgate cannot count itself: images (the provider's figures for the
//! model, at the largest size, as for an image by URL) and hosted tools ([`HOSTED_TOOL_TOKENS`]).
//! `GET /v1/models` lists [`MODELS`] in OpenAI's shape (Bearer) or Anthropic's (`x-api-key`),
//! and refuses a credential containing `invalid` with 401, echoing it as a careless provider might.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::{Value, json};

/// The credential a request carried (`Authorization` or `x-api-key`) and its `anthropic-version`.
pub type Credential = (String, Option<String>);

#[derive(Clone, Default)]
pub struct MockProvider {
    pub received: Arc<Mutex<Vec<Value>>>,
    /// The credential each request carried (`Authorization` or `x-api-key`) and its
    /// `anthropic-version`, in order.
    pub credentials: Arc<Mutex<Vec<Credential>>>,
    pub addr: Option<SocketAddr>,
}

impl MockProvider {
    pub async fn start() -> anyhow::Result<Self> {
        let mut mock = MockProvider::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        mock.addr = Some(listener.local_addr()?);
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/responses", post(responses))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .route("/v1/models", get(models))
            .layer(axum::middleware::from_fn_with_state(mock.clone(), record_credentials))
            .with_state(mock.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(mock)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr.map(|a| a.to_string()).unwrap_or_default())
    }

    /// The base URL of an Anthropic connection (Anthropic's URLs carry `/v1` themselves).
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr.map(|a| a.to_string()).unwrap_or_default())
    }

    pub fn credentials(&self) -> Vec<Credential> {
        self.credentials.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<Value> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

const PROMPT_TOKENS: i64 = 10;
/// Input tokens a hosted tool (web search, …) adds: its results, read by the model.
pub const HOSTED_TOOL_TOKENS: i64 = 50_000;

/// Input tokens OpenAI bills for one image of the largest size at `detail`, for `model`
/// (gpt-4o-mini: 2833 + 5667 per tile; gpt-4o and the rest: 85 + 170 per tile; 8 tiles).
pub fn openai_image_tokens(model: &str, detail: Option<&str>) -> i64 {
    let (base, tile) = if model.starts_with("gpt-4o-mini") { (2833, 5667) } else { (85, 170) };
    if detail == Some("low") { base } else { base + 8 * tile }
}

/// Input tokens Anthropic bills for one large image: 1,600 for the older models, 4,784 for
/// the high-resolution ones (any other name here).
pub fn anthropic_image_tokens(model: &str) -> i64 {
    if model.starts_with("claude-sonnet-4") { 1_600 } else { 4_784 }
}

/// Every object in `value` (depth first).
fn objects(value: &Value) -> Vec<&serde_json::Map<String, Value>> {
    let mut found = Vec::new();
    match value {
        Value::Object(fields) => {
            found.push(fields);
            fields.values().for_each(|v| found.extend(objects(v)));
        }
        Value::Array(items) => items.iter().for_each(|v| found.extend(objects(v))),
        _ => {}
    }
    found
}

/// What the request's images and hosted tools add to its input, as the provider bills them.
fn unseen_input_tokens(body: &Value) -> i64 {
    let model = body["model"].as_str().unwrap_or("");
    let mut tokens = 0;
    for part in objects(&body["messages"]).into_iter().chain(objects(&body["input"])) {
        match part.get("type").and_then(Value::as_str) {
            Some("image_url") => {
                tokens += openai_image_tokens(model, part.get("image_url").and_then(|i| i["detail"].as_str()))
            }
            Some("input_image") => tokens += openai_image_tokens(model, part.get("detail").and_then(Value::as_str)),
            Some("image") => tokens += anthropic_image_tokens(model),
            _ => {}
        }
    }
    for tool in body["tools"].as_array().into_iter().flatten() {
        let kind = tool["type"].as_str().unwrap_or("custom");
        if !matches!(kind, "function" | "custom") {
            tokens += HOSTED_TOOL_TOKENS;
        }
    }
    tokens
}

async fn record_credentials(
    State(mock): State<MockProvider>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let seen = {
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        (header("authorization").or_else(|| header("x-api-key")).unwrap_or_default(), header("anthropic-version"))
    };
    if let Ok(mut c) = mock.credentials.lock() {
        c.push(seen);
    }
    next.run(request).await
}

fn record(mock: &MockProvider, body: &Value) {
    if let Ok(mut r) = mock.received.lock() {
        r.push(body.clone());
    }
}

fn sse_response(stream: impl futures::Stream<Item = Result<String, std::io::Error>> + Send + 'static) -> Response {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `n` events produced by `event(i)`, 20 ms apart when `slow`.
fn paced(
    n: usize,
    slow: bool,
    event: impl Fn(usize) -> String + Send + Sync + 'static,
) -> impl futures::Stream<Item = Result<String, std::io::Error>> {
    let event = Arc::new(event);
    futures::stream::iter(0..n).then(move |i| {
        let event = event.clone();
        async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(event(i))
        }
    })
}

/// Slow models (`slow-*`, `*-slow`) stream 20 ms apart.
fn is_slow(model: &str) -> bool {
    model.starts_with("slow-") || model.ends_with("-slow")
}

/// The output tokens the mock generates for a requested maximum.
fn output_tokens(model: &str, max: i64) -> i64 {
    if is_slow(model) { max.min(200) } else { max }
}

async fn responses(State(mock): State<MockProvider>, Json(body): Json<Value>) -> Response {
    record(&mock, &body);
    let model = body["model"].as_str().unwrap_or("").to_owned();
    if model == "error-500" {
        let err = json!({"error": {"message": "the mock provider failed", "type": "server_error", "code": null}});
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(err)).into_response();
    }
    let tokens = output_tokens(&model, body["max_output_tokens"].as_i64().unwrap_or(20));
    let prompt = PROMPT_TOKENS + unseen_input_tokens(&body);
    let usage = json!({"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": tokens, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + tokens});
    let response = |status: &str, text: String, usage: Value| {
        json!({"id": "resp_mock", "object": "response", "created_at": 1, "status": status, "model": model,
            "output": [{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": usage})
    };
    if !body["stream"].as_bool().unwrap_or(false) {
        return Json(response("completed", "tok ".repeat(tokens as usize), usage)).into_response();
    }
    let created = response("in_progress", String::new(), Value::Null);
    let completed = response("completed", "tok ".repeat(tokens as usize), usage);
    let n = tokens as usize;
    let frame = |kind: &str, data: Value| format!("event: {kind}\ndata: {data}\n\n");
    sse_response(paced(n + 2, is_slow(&model), move |i| {
        if i == 0 {
            frame("response.created", json!({"type": "response.created", "sequence_number": 0, "response": created}))
        } else if i <= n {
            frame(
                "response.output_text.delta",
                json!({"type": "response.output_text.delta", "sequence_number": i,
                "item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": "tok "}),
            )
        } else {
            frame(
                "response.completed",
                json!({"type": "response.completed", "sequence_number": i, "response": completed}),
            )
        }
    }))
}

async fn embeddings(State(mock): State<MockProvider>, Json(body): Json<Value>) -> Response {
    record(&mock, &body);
    let inputs = body["input"].as_array().map_or(1, Vec::len);
    let data: Vec<Value> =
        (0..inputs).map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]})).collect();
    let prompt = 5 * inputs as i64;
    Json(json!({"object": "list", "data": data, "model": body["model"],
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}))
    .into_response()
}

/// The models `GET /v1/models` lists.
pub const MODELS: [&str; 3] = ["mock-model", "mock-large", "mock-embed"];

async fn models(headers: axum::http::HeaderMap) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match (header("authorization"), header("x-api-key")) {
        (_, Some(key)) if key.contains("invalid") => {
            anthropic_error(StatusCode::UNAUTHORIZED, "authentication_error", &format!("invalid x-api-key {key}"))
        }
        (_, Some(_)) => {
            let data: Vec<Value> = MODELS
                .iter()
                .map(|m| json!({"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}))
                .collect();
            Json(json!({"data": data, "has_more": false, "first_id": MODELS[0], "last_id": MODELS[2]})).into_response()
        }
        (Some(bearer), _) if !bearer.contains("invalid") => {
            let data: Vec<Value> =
                MODELS.iter().map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "mock"})).collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
        (bearer, _) => {
            let key = bearer.unwrap_or_default();
            let message = format!("Incorrect API key provided: {}", key.trim_start_matches("Bearer "));
            let error =
                json!({"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}});
            (StatusCode::UNAUTHORIZED, Json(error)).into_response()
        }
    }
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(json!({"type": "error", "error": {"type": kind, "message": message}}))).into_response()
}

async fn messages(State(mock): State<MockProvider>, Json(body): Json<Value>) -> Response {
    record(&mock, &body);
    let model = body["model"].as_str().unwrap_or("").to_owned();
    if model == "error-500" {
        return anthropic_error(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "the mock provider failed");
    }
    let Some(max) = body["max_tokens"].as_i64() else {
        return anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", "max_tokens: Field required");
    };
    let tokens = output_tokens(&model, max);
    let prompt = PROMPT_TOKENS + unseen_input_tokens(&body);
    let usage = move |output: i64| {
        json!({"input_tokens": prompt, "output_tokens": output,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
    };
    let message = |text: String, output: i64, stop: Value| {
        json!({"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": if text.is_empty() { json!([]) } else { json!([{"type": "text", "text": text}]) },
            "stop_reason": stop, "stop_sequence": null, "usage": usage(output)})
    };
    if !body["stream"].as_bool().unwrap_or(false) {
        return Json(message("tok ".repeat(tokens as usize), tokens, json!("max_tokens"))).into_response();
    }
    let start = message(String::new(), 1, Value::Null);
    let n = tokens as usize;
    let frame = |kind: &str, data: Value| format!("event: {kind}\ndata: {data}\n\n");
    sse_response(paced(n + 5, is_slow(&model), move |i| match i {
        0 => frame("message_start", json!({"type": "message_start", "message": start})),
        1 => frame(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        i if i < n + 2 => frame(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "tok "}}),
        ),
        i if i == n + 2 => frame("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        i if i == n + 3 => frame(
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": null}, "usage": {"output_tokens": tokens}}),
        ),
        _ => frame("message_stop", json!({"type": "message_stop"})),
    }))
}

async fn count_tokens(State(mock): State<MockProvider>, Json(body): Json<Value>) -> Response {
    record(&mock, &body);
    Json(json!({"input_tokens": 42})).into_response()
}

async fn chat(State(mock): State<MockProvider>, Json(body): Json<Value>) -> Response {
    if let Ok(mut r) = mock.received.lock() {
        r.push(body.clone());
    }
    let model = body["model"].as_str().unwrap_or("").to_owned();
    if model == "error-500" {
        let err = json!({"error": {"message": "the mock provider failed", "type": "server_error", "code": null}});
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(err)).into_response();
    }
    let max = body["max_completion_tokens"].as_i64().or(body["max_tokens"].as_i64()).unwrap_or(20);
    let slow = model.starts_with("slow-");
    let tokens = if slow { max.min(200) } else { max };
    let prompt = PROMPT_TOKENS + unseen_input_tokens(&body);
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens});
    if model == "slow-json" {
        // A JSON answer that takes its time (a client may give up on it meanwhile).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(ms) = model.strip_prefix("mock-wait-").and_then(|ms| ms.parse::<u64>().ok()) {
        // `mock-wait-<ms>`: a JSON answer after that many milliseconds (slow, overlapping calls).
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if !body["stream"].as_bool().unwrap_or(false) {
        return Json(json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok ".repeat(tokens as usize)}, "finish_reason": "length"}],
            "usage": usage,
        }))
        .into_response();
    }
    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let stream = async_stream(model, tokens, include_usage, usage, slow);
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn async_stream(
    model: String,
    tokens: i64,
    include_usage: bool,
    usage: Value,
    slow: bool,
) -> impl futures::Stream<Item = Result<String, std::io::Error>> {
    futures::stream::unfold(0i64, move |i| {
        let model = model.clone();
        let usage = usage.clone();
        async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let chunk = |v: Value| format!("data: {v}\n\n");
            let event = if i < tokens {
                chunk(json!({"id": "c", "object": "chat.completion.chunk", "model": model,
                    "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": null}]}))
            } else if i == tokens && include_usage {
                chunk(
                    json!({"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}),
                )
            } else if i <= tokens + 1 {
                if i == tokens && !include_usage || i == tokens + 1 {
                    "data: [DONE]\n\n".to_owned()
                } else {
                    return None;
                }
            } else {
                return None;
            };
            Some((Ok(event), i + if i == tokens && !include_usage { 2 } else { 1 }))
        }
    })
}

//! `POST /v1/messages` (Anthropic Messages, JSON or SSE) and `POST /v1/messages/count_tokens`,
//! answered in Anthropic's error shape.
//!
//! Claude has no public tokenizer, so input is bounded from above: every text counts its
//! UTF-8 bytes (a byte-pair token covers at least one byte), images the model's documented
//! ceiling ([`tollgate_core::vision`]), text documents their text, tool definitions and
//! tool calls their JSON text; the project's `estimate_margin_bps` goes on top. A prompt-cache
//! write with a one-hour TTL bills twice the input rate, so a request that asks for one
//! counts its input twice. `max_tokens` is required, as Anthropic requires it.
//!
//! ## Admission: the fields that pass, and why none can add to the cost reserved
//!
//! | field | why it is bounded |
//! | --- | --- |
//! | `model`, `messages`, `system` | counted (above) |
//! | `tools` without a `type` or `type: "custom"` | counted: their JSON text |
//! | `tool_choice` | counted: its JSON text |
//! | `max_tokens` | the output reserved |
//! | `thinking` | thinking is output, within `max_tokens` |
//! | `temperature`, `top_k`, `top_p`, `stop_sequences` | choose among tokens, never more of them |
//! | `stream` | delivery only |
//! | `metadata` | bookkeeping, not billed |
//! | `service_tier` `auto`/`standard_only` | the standard rates (priority capacity is the tenant's own commitment) |
//!
//! Unbounded (refused, or admitted under the project's per-call ceiling): server and
//! Anthropic-defined tools (`web_search_*`, `web_fetch_*`, `code_execution_*`, `computer_*`,
//! `bash_*`, `text_editor_*`, `memory_*`, MCP toolsets… any `type` but `custom`: the server
//! tools bill their own use and results, the client-run ones add a system prompt Tollgate
//! does not track), `mcp_servers`, `container`, documents by URL or file id and PDF documents
//! (no documented per-page ceiling bounds a PDF's text), `redacted_thinking` (encrypted),
//! server-tool results sent back, and any field or block type not named here.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};
use tollgate_core::estimate::Counter;
use tollgate_core::pricing::TokenUsage;
use tollgate_core::projects::ProviderKind;
use tollgate_core::vision;

use super::admission::{Unbounded, present, type_of, unknown_field};
use super::chat::{model, object, positive_int, stream_flag};
use super::error::{ErrorShape, ProxyError};
use super::pipeline::{self, CallShape, Dialect, StreamWatch};
use super::{auth, sse};
use crate::middleware::request_id::RequestId;
use crate::state::AppState;

/// Framing tokens per message (role markers), bounded generously.
const TOKENS_PER_MESSAGE: i64 = 5;
/// Anthropic's least extended-thinking budget: `thinking.budget_tokens` "must be ≥1024 and
/// less than `max_tokens`" (Messages API reference, <https://docs.anthropic.com/en/api/messages>;
/// <https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking>). A call whose
/// clamped max output could not keep a valid budget is refused with 402 instead of being
/// forwarded to a certain 400. A client's own invalid budget is forwarded as it is (the
/// provider refuses it, and nothing is charged): Tollgate does not restate the provider's
/// validation, whose rules differ by feature (interleaved thinking lets the budget exceed
/// `max_tokens`).
pub const THINKING_MIN_BUDGET: i64 = 1_024;

pub struct Messages;

impl Dialect for Messages {
    const ENDPOINT: &'static str = "messages";
    const ERRORS: ErrorShape = ErrorShape::Anthropic;
    const OTHER_ENDPOINT: &'static str = "/v1/chat/completions";

    fn speaks(kind: ProviderKind) -> bool {
        kind == ProviderKind::Anthropic
    }

    const UPSTREAM_PATH: &'static str = "v1/messages";

    fn parse(request: &Value) -> Result<CallShape, ProxyError> {
        let obj = object(request)?;
        let model = model(obj)?;
        if !obj.get("messages").is_some_and(Value::is_array) {
            return Err(ProxyError::invalid("messages: Field required", "invalid_messages", Some("messages")));
        }
        let max_output = positive_int(obj, "max_tokens")?.ok_or_else(|| {
            ProxyError::invalid("max_tokens: Field required", "missing_max_tokens", Some("max_tokens"))
        })?;
        Ok(CallShape { model, stream: stream_flag(obj)?, n: 1, max_output: Some(max_output), produces_output: true })
    }

    fn user(request: &Value) -> Option<&str> {
        request.pointer("/metadata/user_id").and_then(Value::as_str)
    }

    fn unbounded(request: &Value) -> Option<Unbounded> {
        unbounded(request)
    }

    fn input_tokens(counter: Counter, model: &str, request: &Value) -> i64 {
        input_tokens(counter, model, request)
    }

    /// Extended thinking needs a max output above the least thinking budget.
    fn least_output(request: &Value) -> i64 {
        if thinking_budget(request).is_some() { THINKING_MIN_BUDGET + 1 } else { 1 }
    }

    /// Sets `max_tokens`. A thinking budget the client kept below its `max_tokens` (the
    /// documented rule) is kept below the new one; the pipeline never clamps below
    /// [`Dialect::least_output`], so it stays at least [`THINKING_MIN_BUDGET`]. A budget the
    /// client sent at or above its own `max_tokens` is left alone: that is either allowed
    /// (interleaved thinking, where the budget spans the whole turn) or the provider's to refuse.
    fn limit_output(request: &mut Value, max_output: i64, _kind: ProviderKind) {
        let asked = request.get("max_tokens").and_then(Value::as_i64);
        let budget = thinking_budget(request);
        request["max_tokens"] = json!(max_output);
        if let (Some(asked), Some(budget)) = (asked, budget)
            && budget < asked
            && budget >= max_output
            && max_output > THINKING_MIN_BUDGET
        {
            request["thinking"]["budget_tokens"] = json!(max_output - 1);
        }
    }

    fn usage(body: &Value) -> Option<TokenUsage> {
        let usage = body.get("usage")?;
        Some(TokenUsage { output: usage.get("output_tokens")?.as_i64()?.max(0), ..input_usage(usage)? })
    }

    fn delivered(body: &Value) -> String {
        body.get("content")
            .and_then(Value::as_array)
            .map(|blocks| blocks.iter().map(block_text).collect())
            .unwrap_or_default()
    }

    fn watch(event: &sse::Event, data: Option<&Value>, watch: &mut StreamWatch, _client_wants_usage: bool) -> bool {
        let Some(data) = data else { return true };
        let kind = data.get("type").and_then(Value::as_str).or(event.name.as_deref());
        match kind {
            Some("message_start") => {
                if let Some(usage) = data.pointer("/message/usage") {
                    watch.input = input_usage(usage).map(|input| TokenUsage {
                        output: usage.get("output_tokens").and_then(Value::as_i64).unwrap_or(0).max(0),
                        ..input
                    });
                }
            }
            Some("content_block_start") => {
                if let Some(block) = data.get("content_block") {
                    watch.delivered.push_str(&block_text(block));
                }
            }
            Some("content_block_delta") => {
                if let Some(delta) = data.get("delta") {
                    for field in ["text", "partial_json", "thinking"] {
                        if let Some(text) = delta.get(field).and_then(Value::as_str) {
                            watch.delivered.push_str(text);
                        }
                    }
                }
            }
            Some("message_delta") => {
                if let Some(usage) = data.get("usage")
                    && let Some(output) = usage.get("output_tokens").and_then(Value::as_i64)
                {
                    // Newer API versions repeat the input counts here; else message_start's stand.
                    let input = input_usage(usage).filter(|_| usage.get("input_tokens").is_some()).or(watch.input);
                    watch.usage = input.map(|input| TokenUsage { output: output.max(0), ..input });
                }
            }
            _ => {}
        }
        true
    }
}

/// The extended-thinking budget of a request that enables it (`thinking.type: "enabled"`).
fn thinking_budget(request: &Value) -> Option<i64> {
    let thinking = request.get("thinking")?;
    (thinking.get("type").and_then(Value::as_str) == Some("enabled"))
        .then(|| thinking.get("budget_tokens").and_then(Value::as_i64))
        .flatten()
}

/// The input side of an Anthropic `usage` (output left at 0). `input_tokens` excludes cache
/// reads and cache writes, which are reported (and priced) apart.
fn input_usage(usage: &Value) -> Option<TokenUsage> {
    let count = |field: &str| usage.get(field).and_then(Value::as_i64).unwrap_or(0).max(0);
    Some(TokenUsage {
        input: usage.get("input_tokens")?.as_i64()?.max(0),
        cached_input: count("cache_read_input_tokens"),
        cache_write: count("cache_creation_input_tokens"),
        output: 0,
        reasoning: 0,
    })
}

/// The generated text of a content block (text, tool input, thinking).
fn block_text(block: &Value) -> String {
    match block.get("type").and_then(Value::as_str) {
        Some("text") => block.get("text").and_then(Value::as_str).unwrap_or("").to_owned(),
        Some("thinking") => block.get("thinking").and_then(Value::as_str).unwrap_or("").to_owned(),
        Some("tool_use") | Some("server_tool_use") => block
            .get("input")
            .filter(|i| !i.as_object().is_some_and(|o| o.is_empty()))
            .map(Value::to_string)
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// The top-level fields of a Messages request Tollgate knows (see the module documentation).
const MESSAGES_FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "max_tokens",
    "thinking",
    "temperature",
    "top_k",
    "top_p",
    "stop_sequences",
    "stream",
    "metadata",
    "service_tier",
    "mcp_servers",
    "container",
];

/// The first part of a Messages request whose cost Tollgate cannot bound.
fn unbounded(request: &Value) -> Option<Unbounded> {
    let obj = request.as_object()?;
    if let Some(u) = unknown_field(obj, MESSAGES_FIELDS) {
        return Some(u);
    }
    if let Some(tier) = present(obj, "service_tier")
        && !matches!(tier.as_str(), Some("auto" | "standard_only"))
    {
        return Some(Unbounded::output("service_tier", format!("the service tier {tier}")));
    }
    if present(obj, "mcp_servers").is_some() {
        return Some(Unbounded::tool("mcp_servers", "an MCP server the provider calls"));
    }
    if present(obj, "container").is_some() {
        return Some(Unbounded::tool("container", "a code-execution container"));
    }
    for (i, tool) in obj.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        match type_of(tool) {
            None | Some("custom") => {}
            Some(kind) => {
                return Some(Unbounded::tool(format!("tools[{i}]"), format!("the Anthropic-defined tool `{kind}`")));
            }
        }
    }
    if let Some(u) = obj.get("system").and_then(|c| content_unbounded("system", c)) {
        return Some(u);
    }
    for (i, message) in obj.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
        if let Some(u) = message.get("content").and_then(|c| content_unbounded(&format!("messages[{i}].content"), c)) {
            return Some(u);
        }
    }
    None
}

/// The first block of `content` (at `path`) whose cost Tollgate cannot bound.
fn content_unbounded(path: &str, content: &Value) -> Option<Unbounded> {
    let blocks = content.as_array()?;
    for (i, block) in blocks.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let what = match type_of(block) {
            Some("text" | "image" | "search_result" | "thinking" | "tool_use") => continue,
            Some("tool_result") => {
                match block.get("content").and_then(|c| content_unbounded(&format!("{at}.content"), c)) {
                    Some(u) => return Some(u),
                    None => continue,
                }
            }
            Some("document") => match block.pointer("/source/type").and_then(Value::as_str) {
                Some("text") => continue,
                Some("content") => {
                    match block
                        .pointer("/source/content")
                        .and_then(|c| content_unbounded(&format!("{at}.source.content"), c))
                    {
                        Some(u) => return Some(u),
                        None => continue,
                    }
                }
                Some("url") => "a document by URL".to_owned(),
                Some("file") => "a document by file id".to_owned(),
                Some("base64") => "a PDF document (no documented per-page ceiling bounds its text)".to_owned(),
                _ => "a document of a source type Tollgate does not know".to_owned(),
            },
            Some("redacted_thinking") => "encrypted thinking".to_owned(),
            Some(kind) if kind == "server_tool_use" || kind.ends_with("_tool_result") || kind.starts_with("mcp_") => {
                format!("a server tool's block `{kind}`")
            }
            Some(kind) => format!("a content block of type `{kind}`"),
            None => "a content block without a type".to_owned(),
        };
        return Some(Unbounded::input(at, what));
    }
    None
}

/// Input tokens of a Messages request to `model`, bounded from above (see the module
/// documentation).
pub fn input_tokens(counter: Counter, model: &str, request: &Value) -> i64 {
    let mut total = 0;
    if let Some(system) = request.get("system") {
        total += content_tokens(counter, model, system);
    }
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        for message in messages {
            total += TOKENS_PER_MESSAGE;
            total += message.get("content").map_or(0, |c| content_tokens(counter, model, c));
        }
    }
    for field in ["tools", "tool_choice"] {
        if let Some(value) = request.get(field).filter(|v| !v.is_null()) {
            total += counter.text(&value.to_string());
        }
    }
    total += TOKENS_PER_MESSAGE;
    if writes_one_hour_cache(request) { total.saturating_mul(2) } else { total }
}

/// Whether any `cache_control` of the request asks for a one-hour TTL (its writes bill at
/// twice the input rate, more than the five-minute writes the price table names).
fn writes_one_hour_cache(value: &Value) -> bool {
    match value {
        Value::Object(fields) => fields.iter().any(|(k, v)| {
            (k == "cache_control" && v.get("ttl").and_then(Value::as_str) == Some("1h")) || writes_one_hour_cache(v)
        }),
        Value::Array(items) => items.iter().any(writes_one_hour_cache),
        _ => false,
    }
}

fn content_tokens(counter: Counter, model: &str, content: &Value) -> i64 {
    match content {
        Value::String(s) => counter.text(s),
        Value::Array(blocks) => blocks.iter().map(|b| block_tokens(counter, model, b)).sum(),
        Value::Null => 0,
        other => counter.text(&other.to_string()),
    }
}

fn text_of<'v>(block: &'v Value, field: &str) -> &'v str {
    block.get(field).and_then(Value::as_str).unwrap_or("")
}

fn block_tokens(counter: Counter, model: &str, block: &Value) -> i64 {
    let count = |text: &str| counter.text(text);
    match type_of(block) {
        Some("text") => count(text_of(block, "text")),
        Some("image") => {
            let data = block.pointer("/source/data").and_then(Value::as_str);
            let size = data.and_then(vision::base64_prefix).as_deref().and_then(vision::image_size);
            vision::anthropic_image_tokens(model, size)
        }
        Some("tool_result") => block.get("content").map_or(0, |c| content_tokens(counter, model, c)),
        Some("tool_use") => count(&block.get("input").map(Value::to_string).unwrap_or_default()),
        Some("thinking") => count(text_of(block, "thinking")),
        Some("document") => {
            let framing = count(text_of(block, "title")) + count(text_of(block, "context"));
            framing
                + match block.pointer("/source/type").and_then(Value::as_str) {
                    Some("text") => block.pointer("/source/data").and_then(Value::as_str).map_or(0, count),
                    Some("content") => {
                        block.pointer("/source/content").map_or(0, |c| content_tokens(counter, model, c))
                    }
                    // Admitted only under the project's ceiling, which is reserved in full.
                    _ => 0,
                }
        }
        _ => count(&block.to_string()),
    }
}

/// `POST /v1/messages/count_tokens`: forwarded to the Anthropic connection serving the model
/// (counting is free, so nothing is reserved or recorded), unless the customer is blocked.
pub async fn count_tokens(
    State(state): State<AppState>,
    Extension(_request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = async {
        let body = pipeline::body_bytes(body)?;
        let caller = auth::authenticate(&state, &headers).await?;
        let request = pipeline::json_body(&body)?;
        pipeline::refuse_blocked_customer(&state, &caller, &headers, Messages::user(&request)).await?;
        let project = caller.project;
        let model = model(object(&request)?)?;
        let provider = pipeline::route::<Messages>(&state, &project, &model).await?;
        let upstream = pipeline::upstream_request(&state, &provider, "v1/messages/count_tokens", &headers)?
            .json(&request)
            .send()
            .await
            .map_err(|e| pipeline::upstream_failed(&e))?;
        pipeline::passthrough(upstream).await
    };
    let max = state.config.limits.upstream_max_duration;
    let answer = async {
        tokio::time::timeout(max, answer).await.unwrap_or_else(|_| {
            Err(ProxyError::UpstreamTimeout(format!("The provider did not answer within {} seconds.", max.as_secs())))
        })
    };
    answer.await.unwrap_or_else(|e| e.into_response_shaped(ErrorShape::Anthropic))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::pricing::Tokenizer;

    #[test]
    fn usage_separates_cache_reads_and_writes() {
        let body = json!({"usage": {"input_tokens": 10, "output_tokens": 7,
            "cache_creation_input_tokens": 100, "cache_read_input_tokens": 50}});
        let usage = Messages::usage(&body).unwrap();
        assert_eq!((usage.input, usage.cache_write, usage.cached_input, usage.output), (10, 100, 50, 7));
    }

    #[test]
    fn input_is_bounded_by_bytes_and_image_ceilings() {
        let request = json!({
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "héllo"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A".repeat(100_000)}}
            ]}]
        });
        let tokens = input_tokens(Tokenizer::Approximate.into(), "claude-sonnet-4", &request);
        assert_eq!(tokens, 9 + TOKENS_PER_MESSAGE + 6 + vision::ANTHROPIC_IMAGE_CEILING + TOKENS_PER_MESSAGE);
        let unknown = input_tokens(Tokenizer::Approximate.into(), "claude-next", &request);
        assert_eq!(unknown - tokens, vision::ANTHROPIC_HIGH_RES_IMAGE_CEILING - vision::ANTHROPIC_IMAGE_CEILING);
    }

    #[test]
    fn clamping_keeps_the_thinking_budget_below_max_tokens() {
        let thinking = |max: i64, budget: i64| json!({"max_tokens": max, "thinking": {"type": "enabled", "budget_tokens": budget}});
        let mut request = thinking(8000, 4000);
        assert_eq!(Messages::least_output(&request), THINKING_MIN_BUDGET + 1);
        Messages::limit_output(&mut request, 3000, ProviderKind::Anthropic);
        assert_eq!(
            (request["max_tokens"].as_i64(), request["thinking"]["budget_tokens"].as_i64()),
            (Some(3000), Some(2999))
        );
        // A budget already below the new limit is the client's.
        let mut request = thinking(8000, 2000);
        Messages::limit_output(&mut request, 3000, ProviderKind::Anthropic);
        assert_eq!(request["thinking"]["budget_tokens"], 2000);
        // Interleaved thinking lets the budget exceed max_tokens: left as sent.
        let mut request = thinking(4000, 10_000);
        Messages::limit_output(&mut request, 3000, ProviderKind::Anthropic);
        assert_eq!(request["thinking"]["budget_tokens"], 10_000);
        assert_eq!(Messages::least_output(&json!({"max_tokens": 10})), 1);
    }
}

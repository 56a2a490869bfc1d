//! `POST /v1/messages` (Anthropic Messages, JSON or SSE) and `POST /v1/messages/count_tokens`,
//! answered in Anthropic's error shape.
//!
//! Claude has no public tokenizer, so input is bounded from above: every text counts its
//! UTF-8 bytes (a byte-pair token covers at least one byte), images their documented
//! ceiling, other blocks their JSON text; the project's `estimate_margin_bps` goes on top.
//! `max_tokens` is required, as Anthropic requires it.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};
use tollgate_core::estimate;
use tollgate_core::pricing::{TokenUsage, Tokenizer};
use tollgate_core::projects::{Provider, ProviderKind};

use super::chat::{model, object, positive_int, stream_flag};
use super::error::{ErrorShape, ProxyError};
use super::pipeline::{self, CallShape, Dialect, StreamWatch};
use super::{auth, sse};
use crate::middleware::request_id::RequestId;
use crate::state::AppState;

/// Anthropic resizes images beyond ~1.15 megapixels, so one image costs at most ~1,600
/// input tokens (width × height / 750).
pub const IMAGE_MAX_TOKENS: i64 = 1_600;
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

    fn upstream_url(provider: &Provider) -> String {
        format!("{}/v1/messages", provider.base_url)
    }

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

    fn input_tokens(tokenizer: Tokenizer, request: &Value) -> i64 {
        input_tokens(tokenizer, request)
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

/// Input tokens of a Messages request, bounded from above (see the module documentation).
pub fn input_tokens(tokenizer: Tokenizer, request: &Value) -> i64 {
    let mut total = 0;
    if let Some(system) = request.get("system") {
        total += content_tokens(tokenizer, system);
    }
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        for message in messages {
            total += TOKENS_PER_MESSAGE;
            total += message.get("content").map_or(0, |c| content_tokens(tokenizer, c));
        }
    }
    if let Some(tools) = request.get("tools").and_then(Value::as_array) {
        total += tools.iter().map(|t| estimate::count_text(tokenizer, &t.to_string())).sum::<i64>();
    }
    total + TOKENS_PER_MESSAGE
}

fn content_tokens(tokenizer: Tokenizer, content: &Value) -> i64 {
    match content {
        Value::String(s) => estimate::count_text(tokenizer, s),
        Value::Array(blocks) => blocks.iter().map(|b| block_tokens(tokenizer, b)).sum(),
        Value::Null => 0,
        other => estimate::count_text(tokenizer, &other.to_string()),
    }
}

fn block_tokens(tokenizer: Tokenizer, block: &Value) -> i64 {
    match block.get("type").and_then(Value::as_str) {
        Some("text") => estimate::count_text(tokenizer, block.get("text").and_then(Value::as_str).unwrap_or("")),
        Some("image") => IMAGE_MAX_TOKENS,
        Some("tool_result") => block.get("content").map_or(0, |c| content_tokens(tokenizer, c)),
        Some("tool_use") => {
            estimate::count_text(tokenizer, &block.get("input").map(Value::to_string).unwrap_or_default())
        }
        Some("thinking") => {
            estimate::count_text(tokenizer, block.get("thinking").and_then(Value::as_str).unwrap_or(""))
        }
        _ => estimate::count_text(tokenizer, &block.to_string()),
    }
}

/// `POST /v1/messages/count_tokens`: forwarded to the Anthropic connection serving the model
/// (counting is free, so nothing is reserved or recorded).
pub async fn count_tokens(
    State(state): State<AppState>,
    Extension(_request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = async {
        let body = pipeline::body_bytes(body)?;
        let project = auth::authenticate(&state, &headers).await?.project;
        let request = pipeline::json_body(&body)?;
        let model = model(object(&request)?)?;
        let provider = pipeline::route::<Messages>(&state, &project, &model).await?;
        let url = format!("{}/v1/messages/count_tokens", provider.base_url);
        let upstream = pipeline::upstream_request(&state, &provider, url, &headers)
            .json(&request)
            .send()
            .await
            .map_err(|e| ProxyError::UpstreamUnreachable(format!("The provider could not be reached: {e}")))?;
        Ok::<_, ProxyError>(pipeline::passthrough(upstream).await)
    };
    answer.await.unwrap_or_else(|e| e.into_response_shaped(ErrorShape::Anthropic))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let tokens = input_tokens(Tokenizer::Approximate, &request);
        assert_eq!(tokens, 9 + TOKENS_PER_MESSAGE + 6 + IMAGE_MAX_TOKENS + TOKENS_PER_MESSAGE);
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

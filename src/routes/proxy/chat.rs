//! `POST /v1/chat/completions`: OpenAI chat, JSON or SSE.
//!
//! Streams are asked for usage (`stream_options.include_usage`); the usage-only chunk that
//! adds is hidden from clients that did not ask for it themselves.
//!
//! ## Admission: the fields that pass, and why none can add to the cost reserved
//!
//! | field | why it is bounded |
//! | --- | --- |
//! | `model`, `messages` | counted: text by tiktoken, images by the model's formula ([`tollgate_core::vision`]) |
//! | `tools` (`function`, `custom`), `functions` | counted: their whole JSON text at least |
//! | `response_format`, `tool_choice`, `function_call` | counted: their JSON text (a schema is input) |
//! | `max_tokens`, `max_completion_tokens`, `n` | the output reserved: max × `n` |
//! | `reasoning_effort`, `verbosity` | reasoning is output, within `max_completion_tokens` |
//! | `temperature`, `top_p`, `frequency_penalty`, `presence_penalty`, `logit_bias`, `seed`, `stop` | choose among tokens, never more of them |
//! | `logprobs`, `top_logprobs` | detail on the generated tokens, not billed |
//! | `parallel_tool_calls` | the calls are output, within the max |
//! | `stream`, `stream_options` | delivery only |
//! | `metadata`, `store`, `user`, `safety_identifier`, `prompt_cache_key` | bookkeeping, not billed (a cache hit costs less) |
//! | `service_tier` `auto`/`default`/`flex` | the price table's rates or less (`priority` bills more: refused) |
//! | `modalities: ["text"]` | text only |
//!
//! Unbounded (refused, or admitted under the project's per-call ceiling): `audio` and
//! `modalities` with audio (audio tokens bill at audio rates), `prediction` (rejected
//! prediction tokens bill as output beyond the max), `web_search_options` (a hosted search),
//! any other tool type (hosted), `file` parts (a file by id, or a PDF whose pages Tollgate
//! cannot bound) and `input_audio` parts, a message's `audio` (an earlier answer by id), and
//! any field, message field or part type not named here.

use serde_json::{Value, json};
use tollgate_core::estimate::{self, Counter};
use tollgate_core::pricing::TokenUsage;
use tollgate_core::projects::ProviderKind;

use super::admission::{Unbounded, openai_hosted_tool, present, type_of, unknown_field};
use super::error::{ErrorShape, ProxyError};
use super::pipeline::{CallShape, Dialect, StreamWatch};
use super::sse;

pub struct ChatCompletions;

impl Dialect for ChatCompletions {
    const ENDPOINT: &'static str = "chat.completions";
    const ERRORS: ErrorShape = ErrorShape::OpenAi;
    const OTHER_ENDPOINT: &'static str = "/v1/messages";

    fn speaks(kind: ProviderKind) -> bool {
        matches!(kind, ProviderKind::OpenAi | ProviderKind::OpenAiCompatible)
    }

    const UPSTREAM_PATH: &'static str = "chat/completions";

    fn parse(request: &Value) -> Result<CallShape, ProxyError> {
        let obj = object(request)?;
        let model = model(obj)?;
        if !obj.get("messages").is_some_and(Value::is_array) {
            return Err(ProxyError::invalid(
                "`messages` must be an array of messages.",
                "invalid_messages",
                Some("messages"),
            ));
        }
        let n = match obj.get("n") {
            None | Some(Value::Null) => 1,
            Some(v) => v.as_i64().filter(|n| (1..=128).contains(n)).ok_or_else(|| {
                ProxyError::invalid("`n` must be an integer from 1 to 128.", "invalid_value", Some("n"))
            })?,
        };
        let mut max_output = None;
        for field in ["max_completion_tokens", "max_tokens"] {
            if let Some(limit) = positive_int(obj, field)? {
                max_output = Some(max_output.map_or(limit, |m: i64| m.min(limit)));
            }
        }
        Ok(CallShape { model, stream: stream_flag(obj)?, n, max_output, produces_output: true })
    }

    fn user(request: &Value) -> Option<&str> {
        request.get("user").and_then(Value::as_str)
    }

    fn unbounded(request: &Value) -> Option<Unbounded> {
        unbounded(request)
    }

    fn input_tokens(counter: Counter, model: &str, request: &Value) -> i64 {
        estimate::chat_input_bound(counter, model, request) + json_fields_tokens(counter, request, CHAT_JSON_FIELDS)
    }

    /// Chat has two limit fields, and servers differ in which one they honour when both are
    /// sent (some compatible servers take the larger), so exactly one is forwarded: the one
    /// the client used; when it used both or neither, the one the upstream surely reads.
    /// OpenAI reads `max_completion_tokens` on every model (its reasoning models refuse
    /// `max_tokens`). An OpenAI-compatible server may predate `max_completion_tokens` and
    /// would ignore it silently, generating past the reservation; every one of them reads
    /// `max_tokens`, so that is what such a connection gets.
    fn limit_output(request: &mut Value, max_output: i64, kind: ProviderKind) {
        let Some(obj) = request.as_object_mut() else { return };
        let used = |field: &str| obj.get(field).is_some_and(|v| !v.is_null());
        let field = match (used("max_tokens"), used("max_completion_tokens")) {
            (true, false) => "max_tokens",
            (false, true) => "max_completion_tokens",
            _ if kind == ProviderKind::OpenAi => "max_completion_tokens",
            _ => "max_tokens",
        };
        obj.remove("max_tokens");
        obj.remove("max_completion_tokens");
        obj.insert(field.to_owned(), json!(max_output));
    }

    fn prepare_stream(request: &mut Value) -> bool {
        let wanted = request.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
        match request.get_mut("stream_options").and_then(Value::as_object_mut) {
            Some(options) => {
                options.insert("include_usage".to_owned(), json!(true));
            }
            None => request["stream_options"] = json!({ "include_usage": true }),
        }
        wanted
    }

    fn usage(body: &Value) -> Option<TokenUsage> {
        body.get("usage").and_then(usage_from_openai)
    }

    fn delivered(body: &Value) -> String {
        body.get("choices")
            .and_then(Value::as_array)
            .map(|choices| {
                choices
                    .iter()
                    .flat_map(|c| {
                        let message = c.get("message");
                        let content = message.and_then(|m| m.get("content")).and_then(Value::as_str);
                        let calls = message.and_then(|m| m.get("tool_calls")).filter(|t| !t.is_null());
                        content.map(str::to_owned).into_iter().chain(calls.map(Value::to_string))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn watch(_event: &sse::Event, data: Option<&Value>, watch: &mut StreamWatch, client_wants_usage: bool) -> bool {
        let Some(chunk) = data else { return true };
        if let Some(choices) = chunk.get("choices").and_then(Value::as_array) {
            for choice in choices {
                let delta = choice.get("delta");
                if let Some(content) = delta.and_then(|d| d.get("content")).and_then(Value::as_str) {
                    watch.delivered.push_str(content);
                }
                if let Some(calls) = delta.and_then(|d| d.get("tool_calls")).and_then(Value::as_array) {
                    for call in calls {
                        if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str) {
                            watch.delivered.push_str(args);
                        }
                    }
                }
            }
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()).and_then(usage_from_openai) {
            watch.usage = Some(u);
            let usage_only = chunk.get("choices").and_then(Value::as_array).is_none_or(Vec::is_empty);
            if usage_only && !client_wants_usage {
                return false;
            }
        }
        true
    }
}

/// The top-level fields of a chat request Tollgate knows (see the module documentation).
const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "tools",
    "functions",
    "response_format",
    "tool_choice",
    "function_call",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "reasoning_effort",
    "verbosity",
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "seed",
    "stop",
    "logprobs",
    "top_logprobs",
    "parallel_tool_calls",
    "stream",
    "stream_options",
    "metadata",
    "store",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
];

/// Fields counted as their JSON text on top of the cookbook's recipe.
const CHAT_JSON_FIELDS: &[&str] = &["response_format", "tool_choice", "function_call"];

/// The fields of a message Tollgate counts.
/// (`annotations` are an answer's citations, sent back with it: text, counted.)
const MESSAGE_FIELDS: &[&str] =
    &["role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal", "annotations"];

/// Tokens of `fields` of `request` counted as their JSON text (a string counts its text).
pub fn json_fields_tokens(counter: Counter, request: &Value, fields: &[&str]) -> i64 {
    fields
        .iter()
        .filter_map(|f| request.get(*f).filter(|v| !v.is_null()))
        .map(|v| match v {
            Value::String(s) => counter.text(s),
            other => counter.text(&other.to_string()),
        })
        .sum()
}

/// The service tiers billed at the price table's rates or less.
pub fn service_tier_unbounded(request: &serde_json::Map<String, Value>) -> Option<Unbounded> {
    let tier = present(request, "service_tier")?;
    match tier.as_str() {
        Some("auto" | "default" | "flex") => None,
        _ => Some(Unbounded::output("service_tier", format!("the service tier {tier}, billed above the price table"))),
    }
}

/// The first part of a chat request whose cost Tollgate cannot bound.
fn unbounded(request: &Value) -> Option<Unbounded> {
    let obj = request.as_object()?;
    if let Some(u) = unknown_field(obj, CHAT_FIELDS) {
        return Some(u);
    }
    if let Some(u) = service_tier_unbounded(obj) {
        return Some(u);
    }
    if present(obj, "audio").is_some() {
        return Some(Unbounded::output("audio", "audio output"));
    }
    if let Some(modalities) = present(obj, "modalities")
        && modalities.as_array().is_none_or(|m| m.iter().any(|x| x != "text"))
    {
        return Some(Unbounded::output("modalities", "an output modality other than text"));
    }
    if present(obj, "prediction").is_some() {
        return Some(Unbounded::output("prediction", "a predicted output (its rejected tokens bill as output)"));
    }
    if present(obj, "web_search_options").is_some() {
        return Some(Unbounded::tool("web_search_options", "a hosted web search"));
    }
    if let Some(u) = openai_hosted_tool(obj) {
        return Some(u);
    }
    for (i, message) in obj.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let Some(fields) = message.as_object() else { continue };
        let unknown = fields.iter().find(|(k, v)| !v.is_null() && !MESSAGE_FIELDS.contains(&k.as_str()));
        if let Some((field, _)) = unknown {
            let what = if field == "audio" {
                "an earlier audio answer by id".to_owned()
            } else {
                "a message field Tollgate does not know".to_owned()
            };
            return Some(Unbounded::input(format!("messages[{i}].{field}"), what));
        }
        for (j, part) in fields.get("content").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let what = match type_of(part) {
                Some("text") | Some("image_url") | Some("refusal") => continue,
                Some("file") => "a file (by id, or a PDF whose pages Tollgate cannot bound)".to_owned(),
                Some("input_audio") => "audio input (billed at audio rates)".to_owned(),
                Some(other) => format!("a content part of type `{other}`"),
                None => "a content part without a type".to_owned(),
            };
            return Some(Unbounded::input(format!("messages[{i}].content[{j}]"), what));
        }
    }
    None
}

/// OpenAI `usage` (chat and embeddings) → tokens by kind (`input` excludes cached reads).
pub fn usage_from_openai(usage: &Value) -> Option<TokenUsage> {
    let prompt = usage.get("prompt_tokens")?.as_i64()?;
    let completion = usage.get("completion_tokens").and_then(Value::as_i64).unwrap_or(0);
    let cached = usage.pointer("/prompt_tokens_details/cached_tokens").and_then(Value::as_i64).unwrap_or(0);
    let reasoning = usage.pointer("/completion_tokens_details/reasoning_tokens").and_then(Value::as_i64).unwrap_or(0);
    Some(TokenUsage {
        input: (prompt - cached).max(0),
        cached_input: cached.clamp(0, prompt.max(0)),
        cache_write: 0,
        output: completion.max(0),
        reasoning: reasoning.max(0),
    })
}

/// The request as an object.
pub fn object(request: &Value) -> Result<&serde_json::Map<String, Value>, ProxyError> {
    request
        .as_object()
        .ok_or_else(|| ProxyError::invalid("The request body must be a JSON object.", "invalid_json", None))
}

/// The `model` field, required and non-empty.
pub fn model(obj: &serde_json::Map<String, Value>) -> Result<String, ProxyError> {
    match obj.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => Ok(m.trim().to_owned()),
        _ => Err(ProxyError::invalid("You must provide a model parameter.", "missing_model", Some("model"))),
    }
}

/// The `stream` flag (absent or null: false).
pub fn stream_flag(obj: &serde_json::Map<String, Value>) -> Result<bool, ProxyError> {
    match obj.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ProxyError::invalid("`stream` must be a boolean.", "invalid_type", Some("stream"))),
    }
}

/// An optional positive integer field.
pub fn positive_int(obj: &serde_json::Map<String, Value>, field: &'static str) -> Result<Option<i64>, ProxyError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().filter(|m| *m >= 1).map(Some).ok_or_else(|| {
            ProxyError::invalid(format!("`{field}` must be a positive integer."), "invalid_value", Some(field))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(request: Value, kind: ProviderKind) -> Value {
        let mut request = request;
        ChatCompletions::limit_output(&mut request, 5, kind);
        request
    }

    #[test]
    fn exactly_one_limit_field_is_forwarded() {
        let compatible = ProviderKind::OpenAiCompatible;
        let sent = limited(json!({"max_tokens": 9}), compatible);
        assert_eq!(sent, json!({"max_tokens": 5}));
        let sent = limited(json!({"max_completion_tokens": 9}), compatible);
        assert_eq!(sent, json!({"max_completion_tokens": 5}));
        let sent = limited(json!({"max_tokens": 5, "max_completion_tokens": 100_000}), compatible);
        assert_eq!(sent, json!({"max_tokens": 5}));
        let sent = limited(json!({"max_tokens": 5, "max_completion_tokens": 100_000}), ProviderKind::OpenAi);
        assert_eq!(sent, json!({"max_completion_tokens": 5}));
        assert_eq!(limited(json!({}), compatible), json!({"max_tokens": 5}));
        assert_eq!(limited(json!({"max_tokens": null}), ProviderKind::OpenAi), json!({"max_completion_tokens": 5}));
    }
}

//! `POST /v1/responses`: OpenAI's Responses API, JSON or SSE.
//!
//! Input is counted with the chat recipe over `instructions` and the `input` items (each
//! item framed like a message). A call that continues a conversation stored at the provider
//! (`previous_response_id`, `conversation`) is refused: its input is not in the request, so
//! its cost cannot be bounded before the call, and Tollgate does not admit what it cannot
//! bound. Send the conversation as `input` items instead.

use serde_json::{Value, json};
use tollgate_core::estimate;
use tollgate_core::pricing::{TokenUsage, Tokenizer};
use tollgate_core::projects::{Provider, ProviderKind};

use super::chat::{model, object, positive_int, stream_flag};
use super::error::{ErrorShape, ProxyError};
use super::pipeline::{CallShape, Dialect, StreamWatch};
use super::sse;

pub struct Responses;

impl Dialect for Responses {
    const ENDPOINT: &'static str = "responses";
    const ERRORS: ErrorShape = ErrorShape::OpenAi;
    const OTHER_ENDPOINT: &'static str = "/v1/messages";

    fn speaks(kind: ProviderKind) -> bool {
        matches!(kind, ProviderKind::OpenAi | ProviderKind::OpenAiCompatible)
    }

    fn upstream_url(provider: &Provider) -> String {
        format!("{}/responses", provider.base_url)
    }

    fn parse(request: &Value) -> Result<CallShape, ProxyError> {
        let obj = object(request)?;
        let model = model(obj)?;
        match obj.get("input") {
            Some(Value::String(_)) | Some(Value::Array(_)) => {}
            _ => {
                return Err(ProxyError::invalid(
                    "`input` must be a string or an array of input items.",
                    "invalid_input",
                    Some("input"),
                ));
            }
        }
        for field in ["previous_response_id", "conversation"] {
            if obj.get(field).is_some_and(|v| !v.is_null()) {
                return Err(ProxyError::invalid(
                    format!(
                        "`{field}` continues a conversation stored at the provider, whose length Tollgate cannot see, \
                         so it cannot bound the call's cost. Send the conversation as `input` items instead."
                    ),
                    "unbounded_input",
                    Some(field),
                ));
            }
        }
        let max_output = positive_int(obj, "max_output_tokens")?;
        Ok(CallShape { model, stream: stream_flag(obj)?, n: 1, max_output, produces_output: true })
    }

    fn user(request: &Value) -> Option<&str> {
        request.get("user").or_else(|| request.get("safety_identifier")).and_then(Value::as_str)
    }

    fn input_tokens(tokenizer: Tokenizer, request: &Value) -> i64 {
        estimate::chat_input_bound(tokenizer, &as_chat(request))
    }

    /// Sets `max_output_tokens`, and drops chat's limit fields, which are not Responses fields
    /// but which a compatible server built on its chat code may still read.
    fn limit_output(request: &mut Value, max_output: i64, _kind: ProviderKind) {
        let Some(obj) = request.as_object_mut() else { return };
        obj.remove("max_tokens");
        obj.remove("max_completion_tokens");
        obj.insert("max_output_tokens".to_owned(), json!(max_output));
    }

    fn usage(body: &Value) -> Option<TokenUsage> {
        body.get("usage").and_then(usage_from_responses)
    }

    fn delivered(body: &Value) -> String {
        let Some(items) = body.get("output").and_then(Value::as_array) else { return String::new() };
        let mut text = String::new();
        for item in items {
            if let Some(parts) = item.get("content").and_then(Value::as_array) {
                for part in parts {
                    text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""));
                }
            }
            if let Some(summary) = item.get("summary").and_then(Value::as_array) {
                for part in summary {
                    text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""));
                }
            }
            text.push_str(item.get("arguments").and_then(Value::as_str).unwrap_or(""));
        }
        text
    }

    fn watch(event: &sse::Event, data: Option<&Value>, watch: &mut StreamWatch, _client_wants_usage: bool) -> bool {
        let Some(data) = data else { return true };
        let kind = data.get("type").and_then(Value::as_str).or(event.name.as_deref()).unwrap_or("");
        if kind.ends_with(".delta")
            && let Some(delta) = data.get("delta").and_then(Value::as_str)
        {
            watch.delivered.push_str(delta);
        }
        if matches!(kind, "response.completed" | "response.incomplete" | "response.failed")
            && let Some(usage) = data.pointer("/response/usage").and_then(usage_from_responses)
        {
            watch.usage = Some(usage);
        }
        true
    }
}

/// Responses `usage` → tokens by kind (`input` excludes cached reads).
fn usage_from_responses(usage: &Value) -> Option<TokenUsage> {
    let input = usage.get("input_tokens")?.as_i64()?;
    let output = usage.get("output_tokens").and_then(Value::as_i64).unwrap_or(0);
    let cached = usage.pointer("/input_tokens_details/cached_tokens").and_then(Value::as_i64).unwrap_or(0);
    let reasoning = usage.pointer("/output_tokens_details/reasoning_tokens").and_then(Value::as_i64).unwrap_or(0);
    Some(TokenUsage {
        input: (input - cached).max(0),
        cached_input: cached.clamp(0, input.max(0)),
        cache_write: 0,
        output: output.max(0),
        reasoning: reasoning.max(0),
    })
}

/// The request seen as a chat request: `instructions` as a system message, each input item
/// as a message, function tools in chat's nesting.
fn as_chat(request: &Value) -> Value {
    let mut messages = Vec::new();
    if let Some(instructions) = request.get("instructions").and_then(Value::as_str) {
        messages.push(json!({ "role": "system", "content": instructions }));
    }
    match request.get("input") {
        Some(Value::String(text)) => messages.push(json!({ "role": "user", "content": text })),
        Some(Value::Array(items)) => messages.extend(items.iter().map(|item| {
            match item.as_object() {
                Some(fields) => Value::Object(
                    fields
                        .iter()
                        .filter(|(k, _)| *k != "type" && *k != "id")
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ),
                None => item.clone(),
            }
        })),
        _ => {}
    }
    let tools: Vec<Value> = request
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .map(|tool| match (tool.get("type").and_then(Value::as_str), tool.get("name")) {
                    (Some("function"), Some(_)) => {
                        let mut function = tool.clone();
                        if let Some(f) = function.as_object_mut() {
                            f.remove("type");
                            f.remove("strict");
                        }
                        json!({ "type": "function", "function": function })
                    }
                    _ => tool.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    let mut chat = json!({ "messages": messages });
    if !tools.is_empty() {
        chat["tools"] = Value::Array(tools);
    }
    chat
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_input_counts_like_one_user_message() {
        let t = Tokenizer::O200kBase;
        let responses = json!({"model": "gpt-4o", "instructions": "Be brief.", "input": "Hello there"});
        let chat = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]});
        assert_eq!(Responses::input_tokens(t, &responses), estimate::chat_input_tokens(t, &chat));
    }

    #[test]
    fn stored_conversations_are_refused() {
        let request = json!({"model": "gpt-4o", "input": "more", "previous_response_id": "resp_1"});
        assert!(matches!(Responses::parse(&request), Err(ProxyError::InvalidRequest { code: "unbounded_input", .. })));
    }

    #[test]
    fn usage_counts_cached_and_reasoning() {
        let body = json!({"usage": {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 40},
            "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 12}}});
        let usage = Responses::usage(&body).unwrap();
        assert_eq!((usage.input, usage.cached_input, usage.output, usage.reasoning), (60, 40, 30, 12));
    }
}

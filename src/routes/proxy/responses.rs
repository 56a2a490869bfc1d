//! `POST /v1/responses`: OpenAI's Responses API, JSON or SSE.
//!
//! Input is counted with the chat recipe over `instructions` and the `input` items (each
//! item framed like a message). A call that continues a conversation stored at the provider
//! (`previous_response_id`, `conversation`) is refused: its input is not in the request, so
//! its cost cannot be bounded before the call, and Tollgate does not admit what it cannot
//! bound. Send the conversation as `input` items instead. So is `background` (its usage
//! arrives after the call has been settled, so it could not be metered).
//!
//! ## Admission: the fields that pass, and why none can add to the cost reserved
//!
//! | field | why it is bounded |
//! | --- | --- |
//! | `model`, `input`, `instructions` | counted like chat messages; images by the model's formula |
//! | `tools` (`function`, `custom`) | counted: their whole JSON text at least |
//! | `text` (format, verbosity), `tool_choice` | counted: their JSON text (a schema is input) |
//! | `max_output_tokens` | the output reserved |
//! | `reasoning` | reasoning is output, within `max_output_tokens` |
//! | `max_tool_calls`, `parallel_tool_calls` | the calls are output, within the max |
//! | `temperature`, `top_p`, `top_logprobs` | choose among tokens, never more of them |
//! | `truncation` | can only drop input |
//! | `include` | more detail in the answer, not billed |
//! | `stream`, `stream_options` | delivery only |
//! | `metadata`, `store`, `user`, `safety_identifier`, `prompt_cache_key`, `prompt_cache_retention` | bookkeeping, not billed (a cache hit costs less) |
//! | `service_tier` `auto`/`default`/`flex` | the price table's rates or less (`priority` bills more: refused) |
//!
//! Unbounded (refused, or admitted under the project's per-call ceiling): `prompt` (a prompt
//! stored at the provider), hosted tools (`web_search`, `file_search`, `code_interpreter`,
//! `computer_use_preview`, `mcp`, `image_generation`, … any type but `function`/`custom`),
//! `input_file` parts (by id, by URL, or a PDF whose pages Tollgate cannot bound), items that
//! refer to what the provider stored (`item_reference`) or that Tollgate does not know
//! (hosted tool calls), `reasoning` items with `encrypted_content` (whose tokens Tollgate
//! cannot read), and any field or part type not named here.

use serde_json::{Value, json};
use tollgate_core::estimate::{self, Counter};
use tollgate_core::pricing::TokenUsage;
use tollgate_core::projects::ProviderKind;

use super::admission::{Unbounded, openai_hosted_tool, present, type_of, unknown_field};
use super::chat::{json_fields_tokens, model, object, positive_int, service_tier_unbounded, stream_flag};
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

    const UPSTREAM_PATH: &'static str = "responses";

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
        if obj.get("background").is_some_and(|b| b != &Value::Bool(false) && !b.is_null()) {
            return Err(ProxyError::invalid(
                "`background` responses report their usage after the call has been answered, so Tollgate could not \
                 meter them. Run the call in the foreground (stream it, if it is long).",
                "unsupported_field",
                Some("background"),
            ));
        }
        let max_output = positive_int(obj, "max_output_tokens")?;
        Ok(CallShape { model, stream: stream_flag(obj)?, n: 1, max_output, produces_output: true })
    }

    fn user(request: &Value) -> Option<&str> {
        request.get("user").or_else(|| request.get("safety_identifier")).and_then(Value::as_str)
    }

    fn unbounded(request: &Value) -> Option<Unbounded> {
        unbounded(request)
    }

    fn input_tokens(counter: Counter, model: &str, request: &Value) -> i64 {
        estimate::chat_input_bound(counter, model, &as_chat(request))
            + json_fields_tokens(counter, request, &["text", "tool_choice"])
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

/// The top-level fields of a Responses request Tollgate knows (see the module documentation).
const RESPONSES_FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "tools",
    "text",
    "tool_choice",
    "max_output_tokens",
    "reasoning",
    "max_tool_calls",
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "top_logprobs",
    "truncation",
    "include",
    "stream",
    "stream_options",
    "metadata",
    "store",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "service_tier",
    "background",
    "prompt",
];

/// The input items Tollgate counts (a message may also come without a `type`).
const KNOWN_ITEMS: &[&str] =
    &["message", "function_call", "function_call_output", "custom_tool_call", "custom_tool_call_output", "reasoning"];

/// The first part of a Responses request whose cost Tollgate cannot bound.
fn unbounded(request: &Value) -> Option<Unbounded> {
    let obj = request.as_object()?;
    if let Some(u) = unknown_field(obj, RESPONSES_FIELDS) {
        return Some(u);
    }
    if let Some(u) = service_tier_unbounded(obj) {
        return Some(u);
    }
    if present(obj, "prompt").is_some() {
        return Some(Unbounded::input("prompt", "a prompt stored at the provider"));
    }
    if let Some(u) = openai_hosted_tool(obj) {
        return Some(u);
    }
    for (i, item) in obj.get("input").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let kind = type_of(item).or_else(|| item.get("role").map(|_| "message"));
        match kind {
            Some(kind) if KNOWN_ITEMS.contains(&kind) => {}
            Some("item_reference") => {
                return Some(Unbounded::input(format!("input[{i}]"), "an item stored at the provider, by id"));
            }
            other => {
                let what = format!("an input item of type `{}`", other.unwrap_or("(none)"));
                return Some(Unbounded::input(format!("input[{i}]"), what));
            }
        }
        if kind == Some("reasoning") && present(item.as_object()?, "encrypted_content").is_some() {
            return Some(Unbounded::input(format!("input[{i}].encrypted_content"), "encrypted reasoning"));
        }
        for field in ["content", "output"] {
            for (j, part) in item.get(field).and_then(Value::as_array).into_iter().flatten().enumerate() {
                let what = match type_of(part) {
                    Some("input_text") | Some("output_text") | Some("refusal") | Some("input_image") => continue,
                    Some("input_file") => {
                        "a file (by id, by URL, or a PDF whose pages Tollgate cannot bound)".to_owned()
                    }
                    Some(other) => format!("a content part of type `{other}`"),
                    None => "a content part without a type".to_owned(),
                };
                return Some(Unbounded::input(format!("input[{i}].{field}[{j}]"), what));
            }
        }
    }
    None
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
    use tollgate_core::pricing::Tokenizer;

    #[test]
    fn a_string_input_counts_like_one_user_message() {
        let t = Tokenizer::O200kBase;
        let responses = json!({"model": "gpt-4o", "instructions": "Be brief.", "input": "Hello there"});
        let chat = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]});
        assert_eq!(Responses::input_tokens(t.into(), "gpt-4o", &responses), estimate::chat_input_tokens(t, &chat));
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

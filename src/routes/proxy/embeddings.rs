//! `POST /v1/embeddings`: OpenAI embeddings. No output tokens, so the worst case is the
//! input alone (counted exactly for strings, by length for token arrays) and there is
//! nothing to clamp: a call the budget cannot pay for is refused.
//!
//! Admission: `model` and `input` are counted; `encoding_format` and `dimensions` shape the
//! answer, not what is billed; `user` is bookkeeping. Any other field is refused (or held at
//! the project's per-call ceiling), as Tollgate cannot tell what it costs.

use serde_json::Value;
use tollgate_core::estimate::Counter;
use tollgate_core::pricing::TokenUsage;
use tollgate_core::projects::ProviderKind;

use super::admission::{Unbounded, unknown_field};
use super::chat::{model, object, usage_from_openai};
use super::error::{ErrorShape, ProxyError};
use super::pipeline::{CallShape, Dialect, StreamWatch};
use super::sse;

pub struct Embeddings;

impl Dialect for Embeddings {
    const ENDPOINT: &'static str = "embeddings";
    const ERRORS: ErrorShape = ErrorShape::OpenAi;
    const OTHER_ENDPOINT: &'static str = "an OpenAI or OpenAI-compatible connection";

    fn speaks(kind: ProviderKind) -> bool {
        matches!(kind, ProviderKind::OpenAi | ProviderKind::OpenAiCompatible)
    }

    const UPSTREAM_PATH: &'static str = "embeddings";

    fn parse(request: &Value) -> Result<CallShape, ProxyError> {
        let obj = object(request)?;
        let model = model(obj)?;
        let valid = match obj.get("input") {
            Some(Value::String(_)) => true,
            Some(Value::Array(items)) => {
                !items.is_empty()
                    && (items.iter().all(Value::is_string)
                        || items.iter().all(Value::is_i64)
                        || items
                            .iter()
                            .all(|i| i.as_array().is_some_and(|t| !t.is_empty() && t.iter().all(Value::is_i64))))
            }
            _ => false,
        };
        if !valid {
            return Err(ProxyError::invalid(
                "`input` must be a string, an array of strings, an array of tokens, or an array of token arrays.",
                "invalid_input",
                Some("input"),
            ));
        }
        Ok(CallShape { model, stream: false, n: 1, max_output: None, produces_output: false })
    }

    fn user(request: &Value) -> Option<&str> {
        request.get("user").and_then(Value::as_str)
    }

    fn unbounded(request: &Value) -> Option<Unbounded> {
        unknown_field(request.as_object()?, &["model", "input", "encoding_format", "dimensions", "user"])
    }

    fn input_tokens(counter: Counter, _model: &str, request: &Value) -> i64 {
        match request.get("input") {
            Some(Value::String(text)) => counter.text(text),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => counter.text(text),
                    Value::Array(tokens) => tokens.len() as i64,
                    _ => 1,
                })
                .sum(),
            _ => 0,
        }
    }

    fn limit_output(_request: &mut Value, _max_output: i64, _kind: ProviderKind) {}

    fn usage(body: &Value) -> Option<TokenUsage> {
        body.get("usage").and_then(usage_from_openai)
    }

    fn delivered(_body: &Value) -> String {
        String::new()
    }

    fn watch(_event: &sse::Event, _data: Option<&Value>, _watch: &mut StreamWatch, _client_wants_usage: bool) -> bool {
        true
    }
}

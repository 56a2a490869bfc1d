//! A stand-in OpenAI provider over real HTTP. Behaviour follows the model name:
//! `error-500` fails; `slow-*` streams 200 chunks 20 ms apart; anything else answers with
//! exactly `max_tokens`/`max_completion_tokens` output tokens (default 20), one per chunk
//! when streaming, and reports usage (prompt_tokens = 10).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

#[derive(Clone, Default)]
pub struct MockProvider {
    pub received: Arc<Mutex<Vec<Value>>>,
    pub addr: Option<SocketAddr>,
}

impl MockProvider {
    pub async fn start() -> anyhow::Result<Self> {
        let mut mock = MockProvider::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        mock.addr = Some(listener.local_addr()?);
        let app = Router::new().route("/v1/chat/completions", post(chat)).with_state(mock.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(mock)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr.map(|a| a.to_string()).unwrap_or_default())
    }

    pub fn requests(&self) -> Vec<Value> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

const PROMPT_TOKENS: i64 = 10;

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
    let usage =
        json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": tokens, "total_tokens": PROMPT_TOKENS + tokens});
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

//! A fast, deterministic stand-in for OpenAI's `POST /v1/chat/completions`.
//!
//! Every answer waits `latency` before its first byte of content, then (when streaming) sends
//! one single-token chunk every `chunk_interval`. The number of output tokens is the request's
//! `max_completion_tokens` or `max_tokens` when given, else `chunks`; the prompt always counts
//! [`PROMPT_TOKENS`]. Streams end with a usage-only chunk when `stream_options.include_usage`
//! is set, then `data: [DONE]`. Connections are HTTP/1.1 with keep-alive (axum's default).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use serde_json::{Value, json};

/// The prompt tokens every answer reports.
pub const PROMPT_TOKENS: i64 = 10;

/// How the mock paces its answers.
#[derive(Debug, Clone, Copy)]
pub struct MockConfig {
    /// Before the first content (the whole answer when not streaming).
    pub latency: Duration,
    /// Output tokens (one per chunk) when the request names no maximum.
    pub chunks: u32,
    /// Between two chunks of a stream.
    pub chunk_interval: Duration,
}

/// Serves the mock on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, config: MockConfig) -> anyhow::Result<()> {
    let app = Router::new().route("/v1/chat/completions", post(chat)).with_state(Arc::new(config));
    // Without TCP_NODELAY, Nagle's algorithm holds each small SSE write until the client's
    // delayed ACK (~40 ms on Linux).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

/// Binds `addr`, prints `listening on ADDR` (the line the matrix waits for) and serves.
pub async fn run(addr: SocketAddr, config: MockConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    serve(listener, config).await
}

async fn chat(State(config): State<Arc<MockConfig>>, Json(body): Json<Value>) -> Response {
    let model = body["model"].as_str().unwrap_or("mock-model").to_owned();
    let requested = body["max_completion_tokens"].as_i64().or_else(|| body["max_tokens"].as_i64());
    let tokens = requested.unwrap_or(i64::from(config.chunks)).max(0);
    let usage = json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": tokens,
        "total_tokens": PROMPT_TOKENS + tokens});
    if !body["stream"].as_bool().unwrap_or(false) {
        tokio::time::sleep(config.latency).await;
        let text = "tok ".repeat(usize::try_from(tokens).unwrap_or(0));
        return Json(json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage}))
        .into_response();
    }
    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let chunk = move |delta: Value, finish: Value| {
        let event = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {event}\n\n")
    };
    // Events in order: the content chunks (the last one with finish_reason), usage, [DONE].
    let mut events: Vec<String> = (0..tokens)
        .map(|i| {
            let delta =
                if i == 0 { json!({"role": "assistant", "content": "tok "}) } else { json!({"content": "tok "}) };
            let finish = if i + 1 == tokens { json!("stop") } else { Value::Null };
            chunk(delta, finish)
        })
        .collect();
    if include_usage {
        let event = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1,
            "model": body["model"], "choices": [], "usage": usage});
        events.push(format!("data: {event}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_owned());
    let latency = config.latency;
    let interval = config.chunk_interval;
    // Content chunks after the first are paced; usage and [DONE] follow the last one at once.
    let paced = usize::try_from(tokens).unwrap_or(0);
    let stream =
        futures::stream::unfold((events.into_iter().enumerate(), latency), move |(mut it, first)| async move {
            let (i, event) = it.next()?;
            if i == 0 {
                tokio::time::sleep(first).await;
            } else if i < paced && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Some((Ok::<_, std::io::Error>(event), (it, first)))
        });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

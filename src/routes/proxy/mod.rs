//! The LLM proxy: OpenAI- and Anthropic-compatible endpoints that authenticate a project key,
//! name the end-customer, reserve the call's worst case, forward it, and settle what it cost.
//!
//! - [`pipeline`]: the path every metered call takes; a [`pipeline::Dialect`] per API says
//!   how its requests, answers and streams look.
//! - [`chat`]: `POST /v1/chat/completions`, JSON and SSE streaming.
//! - [`responses`]: `POST /v1/responses`, JSON and SSE streaming.
//! - [`messages`]: `POST /v1/messages` (Anthropic, JSON and SSE) and `/v1/messages/count_tokens`.
//! - [`embeddings`]: `POST /v1/embeddings`.
//! - [`models`]: `GET /v1/models`, what the project may call.
//! - [`auth`]: project keys (`Authorization: Bearer` or `x-api-key`).
//! - [`cache`]: providers and prices kept for two seconds.
//! - [`error`]: the one error type of this face, written in the caller's error shape.
//! - [`sse`]: server-sent event framing.
//! - [`offload`]: CPU work on large inputs, off the async threads.

pub mod admission;
pub mod auth;
pub mod cache;
pub mod chat;
pub mod embeddings;
pub mod error;
pub mod messages;
pub mod models;
pub mod offload;
pub mod pipeline;
pub mod responses;
pub mod sse;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::state::AppState;

/// Largest request body the proxy accepts (long contexts with images fit well within).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The header that names the end-customer of a call.
pub const CUSTOMER_HEADER: &str = "x-tollgate-customer";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(pipeline::handle::<chat::ChatCompletions>))
        .route("/v1/responses", post(pipeline::handle::<responses::Responses>))
        .route("/v1/embeddings", post(pipeline::handle::<embeddings::Embeddings>))
        .route("/v1/messages", post(pipeline::handle::<messages::Messages>))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::get))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(pipeline::refuse_declared_too_large))
}

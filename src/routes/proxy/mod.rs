//! The LLM proxy: OpenAI-compatible endpoints that authenticate a project key, name the
//! end-customer, reserve the call's worst case, forward it, and settle what it cost.
//!
//! - [`auth`]: project keys (`Authorization: Bearer` or `x-api-key`).
//! - [`error`]: the one error type of this face, written in OpenAI's error shape.
//! - [`chat`]: `POST /v1/chat/completions`, JSON and SSE streaming.

pub mod auth;
pub mod chat;
pub mod error;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::post;

use crate::state::AppState;

/// Largest request body the proxy accepts (long contexts with images fit well within).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The header that names the end-customer of a call.
pub const CUSTOMER_HEADER: &str = "x-tollgate-customer";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

//! `Idempotency-Key` on the management API's POSTs (middleware). The first request with a key
//! runs and its answer is stored; a retry of the same request (same method, path and body)
//! gets the stored answer with `Idempotent-Replayed: true`; the same key on a different
//! request is refused (422), and so is a retry while the first request runs (409). A server
//! error frees the key, so the retry can do the work.

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tollgate_core::idempotency::{self, Claim};
use utoipa::IntoParams;

use super::error::ApiError;
use crate::state::AppState;

const HEADER: &str = "idempotency-key";

/// The `Idempotency-Key` header as the OpenAPI document describes it (the middleware reads
/// the header itself).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code, reason = "describes a header; never built")]
pub struct IdempotencyKey {
    /// Makes a retry safe: the first request with a key is done once and its answer stored for
    /// a day; a retry of the same request (method, path and body) gets that answer again with
    /// `Idempotent-Replayed: true`. The same key on another request is refused (422), and so is
    /// a retry while the first request still runs (409). 1 to 255 printable characters.
    #[param(rename = "Idempotency-Key", value_type = String, required = false, min_length = 1, max_length = 255)]
    key: Option<String>,
}
/// Bodies of the management API are small; a bigger one is refused.
const MAX_BODY: usize = 1024 * 1024;

pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match run(state, request, next).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn run(state: AppState, request: Request, next: Next) -> Result<Response, ApiError> {
    if request.method() != Method::POST {
        return Ok(next.run(request).await);
    }
    let Some(key) = request.headers().get(HEADER) else {
        return Ok(next.run(request).await);
    };
    let key = key
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| ApiError::field("Idempotency-Key", "must be 1 to 255 printable characters"))?
        .to_owned();
    let project = super::project(&state, request.headers()).await?;
    let (parts, body) = request.into_parts();
    let bytes = to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::Invalid { detail: "The body is larger than 1 MB.".into(), errors: vec![] })?;
    let mut fingerprint = format!("{} {}\n", parts.method, parts.uri.path()).into_bytes();
    fingerprint.extend_from_slice(&bytes);
    let hash = tollgate_core::crypto::sha256_hex(&fingerprint);

    match idempotency::claim(&state.db, &state.master_key, &project.id, &key, &hash).await? {
        Claim::Replay { status, content_type, body } => {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
                response.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(response)
        }
        Claim::InProgress => Err(ApiError::Conflict(
            "A request with this Idempotency-Key is still in progress; retry in a moment.".into(),
        )),
        Claim::Mismatch => Err(ApiError::field(
            "Idempotency-Key",
            "was already used for a different request; use a new key for a new request",
        )),
        Claim::Claimed => {
            let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
            let (parts, body) = response.into_parts();
            let body = to_bytes(body, usize::MAX).await.unwrap_or_default();
            if parts.status.is_server_error() {
                idempotency::abandon(&state.db, &project.id, &key).await?;
            } else {
                let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
                let text = String::from_utf8_lossy(&body);
                idempotency::complete(
                    &state.db,
                    &state.master_key,
                    &project.id,
                    &key,
                    parts.status.as_u16(),
                    content_type,
                    &text,
                )
                .await?;
            }
            Ok(Response::from_parts(parts, Body::from(body)))
        }
    }
}

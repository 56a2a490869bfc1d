//! Every request gets an id: the caller's `x-request-id` when it is short and printable,
//! else a new `req_<uuidv7>`. It is in the request's log span, in the request extensions
//! for handlers (usage records carry it), and echoed on the response.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The id of the current request, available to handlers as an extension.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_acceptable(v))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", uuid::Uuid::now_v7().simple()));
    let header = HeaderValue::from_str(&id).ok();
    if let Some(value) = &header {
        request.headers_mut().insert(REQUEST_ID_HEADER, value.clone());
    }
    request.extensions_mut().insert(RequestId(id));
    let mut response = next.run(request).await;
    if let Some(value) = header {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Whether a caller-supplied request id is acceptable to keep (and to log).
fn is_acceptable(value: &str) -> bool {
    !value.is_empty() && value.len() <= 128 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

//! `Strict-Transport-Security` on every response when Tollgate is served over HTTPS (its public
//! URL, `TOLLGATE_PUBLIC_URL`, is `https://…`), so a browser that has been there once never
//! reaches it over plain HTTP again. A plain-HTTP local run gets no such header.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

/// A year; subdomains are left to the operator (they may serve other things).
pub const VALUE: &str = "max-age=31536000";

/// Whether Tollgate is served over HTTPS, by its public URL.
pub fn served_over_https(public_url: &str) -> bool {
    public_url.get(..8).is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

pub async fn add(State(https): State<bool>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if https {
        response.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static(VALUE));
    }
    response
}

//! Counts requests and times them by route template (never the raw path, which would
//! explode label cardinality and could carry ids). A method is a label only when it is a
//! standard one: a client may send any token as its method.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

pub async fn record(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = standard_method(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("tollgate_http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("tollgate_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The method's name when it is one of HTTP's own (a fixed set of label values), else `OTHER`.
fn standard_method(method: &Method) -> &'static str {
    const STANDARD: [&str; 9] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE"];
    STANDARD.into_iter().find(|name| *name == method.as_str()).unwrap_or("OTHER")
}

//! Errors of the management API, answered as RFC 9457 problem details
//! (`application/problem+json`): `type`, `title`, `status`, `detail`, and for bad input the
//! fields at fault in `errors`. [`Problem`] is both what is written and what the OpenAPI
//! document describes; the reusable responses ([`Unauthorized`], [`RateLimited`],
//! [`UnsupportedMediaType`]) are the ones every operation of their kind shares.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::{ToResponse, ToSchema};

/// The media type of every error answer.
pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    Invalid { detail: String, errors: Vec<FieldError> },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A service Tollgate called for the request (Stripe) failed or could not be reached.
    #[error("{0}")]
    Upstream(String),
    /// Over the key's rate limit; retry after this many seconds.
    #[error("This key is over its rate limit; retry in {0} s.")]
    RateLimited(u64),
    /// Logged where it happened; the caller sees no internals.
    #[error("internal error")]
    Internal,
}

/// One field at fault in a request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldError {
    /// The body field, query parameter or header at fault.
    #[schema(example = "budget")]
    pub field: String,
    #[schema(example = "must not be negative")]
    pub message: String,
}

/// A problem (RFC 9457): every error answer of the API, as `application/problem+json`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "type": "urn:tollgate:problem:invalid-request",
    "title": "The request is not valid",
    "status": 422,
    "detail": "budget: must not be negative",
    "errors": [{"field": "budget", "message": "must not be negative"}]
}))]
pub struct Problem {
    /// `urn:tollgate:problem:` and the kind: `invalid-request`, `unauthorized`, `not-found`,
    /// `conflict`, `unsupported-media-type`, `rate-limited`, `upstream` or `internal`.
    #[serde(rename = "type")]
    #[schema(example = "urn:tollgate:problem:not-found")]
    pub kind: String,
    /// The same for every problem of a kind.
    pub title: String,
    /// The HTTP status code.
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// The fields at fault (`invalid-request` only; empty when the body is not JSON at all).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub errors: Option<Vec<FieldError>>,
}

/// The key is missing, unknown or revoked, or is a publishable key (the management API needs
/// a secret one).
#[derive(ToResponse)]
#[response(content_type = "application/problem+json")]
#[allow(dead_code, reason = "describes a response; never built")]
pub struct Unauthorized(Problem);

/// A request with this Idempotency-Key is still in progress; retry when it has finished.
#[derive(ToResponse)]
#[response(content_type = "application/problem+json")]
#[allow(dead_code, reason = "describes a response; never built")]
pub struct IdempotencyInProgress(Problem);

/// No customer with this id in the key's project.
#[derive(ToResponse)]
#[response(content_type = "application/problem+json")]
#[allow(dead_code, reason = "describes a response; never built")]
pub struct CustomerNotFound(Problem);

/// The key is over its rate limit (`TOLLGATE_API_RATE_PER_SECOND` requests a second, in
/// bursts of up to twice that); retry after `Retry-After` seconds.
#[derive(ToResponse)]
#[response(
    content_type = "application/problem+json",
    headers(("Retry-After" = u64, description = "Whole seconds to wait before the next request"))
)]
#[allow(dead_code, reason = "describes a response; never built")]
pub struct RateLimited(Problem);

/// The body is not sent as JSON (`Content-Type: application/json`).
#[derive(ToResponse)]
#[response(content_type = "application/problem+json")]
#[allow(dead_code, reason = "describes a response; never built")]
pub struct UnsupportedMediaType(Problem);

impl ApiError {
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError::Invalid {
            detail: format!("{field}: {message}"),
            errors: vec![FieldError { field: field.to_owned(), message }],
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::Invalid { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", "The request is not valid")
            }
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "A secret project key is needed"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "The request conflicts with the current state"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "The body must be JSON")
            }
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate-limited", "Too many requests"),
            ApiError::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream", "A service Tollgate called failed"),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, title) = self.parts();
        let problem = Problem {
            kind: format!("urn:tollgate:problem:{kind}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            errors: match &self {
                ApiError::Invalid { errors, .. } => Some(errors.clone()),
                _ => None,
            },
        };
        let body = serde_json::to_string(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let ApiError::RateLimited(seconds) = self
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<tollgate_core::db::DbError> for ApiError {
    fn from(e: tollgate_core::db::DbError) -> Self {
        tracing::error!(error = %e, "database error in the management API");
        ApiError::Internal
    }
}

impl From<tollgate_core::idempotency::IdempotencyError> for ApiError {
    fn from(e: tollgate_core::idempotency::IdempotencyError) -> Self {
        use tollgate_core::idempotency::IdempotencyError;
        match e {
            IdempotencyError::Db(e) => e.into(),
            IdempotencyError::Query(e) => tollgate_core::db::DbError::from(e).into(),
            IdempotencyError::Sealed => {
                tracing::error!("a stored idempotent answer does not open with this master key");
                ApiError::Conflict("The stored answer of this Idempotency-Key cannot be read; use a new key.".into())
            }
        }
    }
}

impl From<tollgate_core::projects::ProjectError> for ApiError {
    fn from(e: tollgate_core::projects::ProjectError) -> Self {
        use tollgate_core::projects::ProjectError;
        match e {
            ProjectError::Invalid { field, reason } => ApiError::field(field, reason),
            ProjectError::NotFound(what) => ApiError::NotFound(format!("no such {what}")),
            ProjectError::Db(e) => e.into(),
        }
    }
}

/// The JSON body as `T`, or a problem that says what is wrong with it. Handlers extract the
/// body as a [`serde_json::Value`] first, so that only a JSON object is accepted (serde would
/// also read a struct from an array of its fields in order).
pub fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<axum::Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    use axum::extract::rejection::JsonRejection;
    match body {
        Ok(axum::Json(value)) if value.is_object() => serde_json::from_value(value).map_err(|e| ApiError::Invalid {
            detail: format!("Failed to deserialize the JSON body: {e}"),
            errors: vec![],
        }),
        Ok(_) => Err(ApiError::Invalid { detail: "The body must be a JSON object.".into(), errors: vec![] }),
        Err(JsonRejection::MissingJsonContentType(_)) => {
            Err(ApiError::UnsupportedMediaType("Send the body as JSON with `Content-Type: application/json`.".into()))
        }
        Err(e) => Err(ApiError::Invalid { detail: e.body_text(), errors: vec![] }),
    }
}

/// The query parameters, or a problem that says what is wrong with them (a parameter given
/// twice, say).
pub fn query_params<T>(
    query: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    query.map(|axum::extract::Query(q)| q).map_err(|e| ApiError::Invalid { detail: e.body_text(), errors: vec![] })
}

/// The path's one parameter. A segment that is not UTF-8 once decoded names nothing here (404).
pub fn path_param(
    path: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<String, ApiError> {
    path.map(|axum::extract::Path(p)| p).map_err(|e| ApiError::NotFound(e.body_text()))
}

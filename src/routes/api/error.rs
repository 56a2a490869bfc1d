//! Errors of the management API, answered as RFC 9457 problem details
//! (`application/problem+json`): `type`, `title`, `status`, `detail`, and for bad input the
//! fields at fault in `errors`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

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
    /// Over the key's rate limit; retry after this many seconds.
    #[error("This key is over its rate limit; retry in {0} s.")]
    RateLimited(u64),
    /// Logged where it happened; the caller sees no internals.
    #[error("internal error")]
    Internal,
}

/// One field at fault in a request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

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
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, title) = self.parts();
        let mut body = json!({
            "type": format!("urn:tollgate:problem:{kind}"),
            "title": title,
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        if let ApiError::Invalid { errors, .. } = &self {
            body["errors"] = json!(errors);
        }
        let mut response = (status, body.to_string()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
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

/// The JSON body, or a problem that says what is wrong with it.
pub fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<axum::Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    use axum::extract::rejection::JsonRejection;
    match body {
        Ok(axum::Json(value)) => Ok(value),
        Err(JsonRejection::MissingJsonContentType(_)) => {
            Err(ApiError::UnsupportedMediaType("Send the body as JSON with `Content-Type: application/json`.".into()))
        }
        Err(JsonRejection::JsonDataError(e)) => Err(ApiError::Invalid { detail: e.body_text(), errors: vec![] }),
        Err(e) => Err(ApiError::Invalid { detail: e.body_text(), errors: vec![] }),
    }
}

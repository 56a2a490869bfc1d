//! Errors of the proxy face, answered in OpenAI's shape
//! (`{"error":{"message","type","param","code"}}`) so SDKs surface them as their own.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tollgate_core::money::Nanos;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{message}")]
    InvalidRequest { message: String, code: &'static str, param: Option<&'static str> },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{message}")]
    Forbidden { message: String, code: &'static str },
    #[error("the customer's remaining budget ({remaining}) cannot pay for this call ({needed})")]
    InsufficientBudget { remaining: Nanos, needed: Nanos, currency: String },
    #[error("{0}")]
    UpstreamUnreachable(String),
    /// Logged where it happened; the caller sees no internals.
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    pub fn invalid(message: impl Into<String>, code: &'static str, param: Option<&'static str>) -> Self {
        ProxyError::InvalidRequest { message: message.into(), code, param }
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            ProxyError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::InsufficientBudget { .. } => StatusCode::PAYMENT_REQUIRED,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error `type` and `code`.
    fn kind(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ProxyError::InvalidRequest { code, .. } => ("invalid_request_error", Some(code)),
            ProxyError::PayloadTooLarge(_) => ("invalid_request_error", Some("request_too_large")),
            ProxyError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            ProxyError::Forbidden { code, .. } => ("permission_error", Some(code)),
            ProxyError::InsufficientBudget { .. } => ("insufficient_budget", Some("customer_budget_exceeded")),
            ProxyError::UpstreamUnreachable(_) => ("upstream_error", Some("upstream_unreachable")),
            ProxyError::Internal => ("server_error", None),
        }
    }
}

impl From<tollgate_core::db::DbError> for ProxyError {
    fn from(e: tollgate_core::db::DbError) -> Self {
        tracing::error!(error = %e, "ledger unavailable: refusing the call");
        ProxyError::Internal
    }
}

impl From<tollgate_core::projects::ProjectError> for ProxyError {
    fn from(e: tollgate_core::projects::ProjectError) -> Self {
        use tollgate_core::projects::ProjectError;
        match e {
            ProjectError::Invalid { field, reason } => {
                ProxyError::invalid(format!("{field} {reason}"), "invalid_customer", Some("customer"))
            }
            ProjectError::NotFound(what) => ProxyError::invalid(format!("no such {what}"), "not_found", None),
            ProjectError::Db(db) => db.into(),
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let (kind, code) = self.kind();
        let mut error = json!({ "message": self.to_string(), "type": kind, "param": null, "code": code });
        if let ProxyError::InvalidRequest { param: Some(p), .. } = &self {
            error["param"] = json!(p);
        }
        if let ProxyError::InsufficientBudget { remaining, needed, currency } = &self {
            error["remaining"] = json!(remaining.to_string());
            error["needed"] = json!(needed.to_string());
            error["currency"] = json!(currency);
        }
        (self.status_code(), Json(json!({ "error": error }))).into_response()
    }
}

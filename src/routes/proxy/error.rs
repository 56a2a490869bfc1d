//! Errors of the proxy face, answered in the caller's shape so its SDK surfaces them as its
//! own: OpenAI's (`{"error":{"message","type","param","code"}}`) on the OpenAI endpoints,
//! Anthropic's (`{"type":"error","error":{"type","message"}}`) on `/v1/messages`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tollgate_core::money::Nanos;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{message}")]
    InvalidRequest { message: String, code: &'static str, param: Option<String> },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{message}")]
    Forbidden { message: String, code: &'static str },
    #[error("the customer's remaining budget ({remaining}) cannot pay for this call ({needed})")]
    InsufficientBudget { remaining: Nanos, needed: Nanos, currency: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    UpstreamUnreachable(String),
    /// The egress policy refused the provider's address, or its stored base URL breaks the
    /// rules (see `tollgate_core::egress`).
    #[error("{message}")]
    DestinationRefused { message: String, code: &'static str },
    #[error(
        "The provider answered with a redirect ({0}), which Tollgate does not follow: check the base URL of the provider connection."
    )]
    UpstreamRedirect(u16),
    /// The upstream's answer is over the size Tollgate reads.
    #[error("{0}")]
    UpstreamTooLarge(String),
    /// The call reached the operator's maximum duration.
    #[error("{0}")]
    UpstreamTimeout(String),
    /// The server is shutting down and the call's grace period is over.
    #[error("The server is restarting: the call was cut off. Try it again.")]
    ShuttingDown,
    /// Logged where it happened; the caller sees no internals.
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    pub fn invalid(message: impl Into<String>, code: &'static str, param: Option<&'static str>) -> Self {
        ProxyError::InvalidRequest { message: message.into(), code, param: param.map(str::to_owned) }
    }

    /// A request refused at a field named by its path (`messages[0].content[1]`).
    pub fn invalid_at(message: impl Into<String>, code: &'static str, param: String) -> Self {
        ProxyError::InvalidRequest { message: message.into(), code, param: Some(param) }
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            ProxyError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::InsufficientBudget { .. } => StatusCode::PAYMENT_REQUIRED,
            ProxyError::NotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamRedirect(_) | ProxyError::UpstreamTooLarge(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::DestinationRefused { .. } => StatusCode::FORBIDDEN,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
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
            ProxyError::NotFound(_) => ("invalid_request_error", Some("not_found")),
            ProxyError::UpstreamUnreachable(_) => ("upstream_error", Some("upstream_unreachable")),
            ProxyError::UpstreamRedirect(_) => ("upstream_error", Some("upstream_redirect")),
            ProxyError::DestinationRefused { code, .. } => ("permission_error", Some(code)),
            ProxyError::UpstreamTooLarge(_) => ("upstream_error", Some("upstream_too_large")),
            ProxyError::UpstreamTimeout(_) => ("upstream_error", Some("upstream_timeout")),
            ProxyError::ShuttingDown => ("server_error", Some("shutting_down")),
            ProxyError::Internal => ("server_error", None),
        }
    }

    /// Anthropic's error `type` for this error.
    fn anthropic_type(&self) -> &'static str {
        match self {
            ProxyError::InvalidRequest { .. } => "invalid_request_error",
            ProxyError::PayloadTooLarge(_) => "request_too_large",
            ProxyError::Unauthorized(_) => "authentication_error",
            ProxyError::Forbidden { .. } | ProxyError::DestinationRefused { .. } => "permission_error",
            ProxyError::InsufficientBudget { .. } => "insufficient_budget",
            ProxyError::NotFound(_) => "not_found_error",
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamRedirect(_)
            | ProxyError::UpstreamTooLarge(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::Internal => "api_error",
            ProxyError::ShuttingDown => "overloaded_error",
        }
    }

    /// The answer in `shape`.
    pub fn into_response_shaped(self, shape: ErrorShape) -> Response {
        match shape {
            ErrorShape::OpenAi => self.into_response(),
            ErrorShape::Anthropic => {
                let (_, code) = self.kind();
                let mut error = json!({ "type": self.anthropic_type(), "message": self.to_string() });
                if let Some(code) = code {
                    error["code"] = json!(code);
                }
                self.add_budget_fields(&mut error);
                (self.status_code(), Json(json!({ "type": "error", "error": error }))).into_response()
            }
        }
    }

    fn add_budget_fields(&self, error: &mut serde_json::Value) {
        if let ProxyError::InsufficientBudget { remaining, needed, currency } = self {
            error["remaining"] = json!(remaining.to_string());
            error["needed"] = json!(needed.to_string());
            error["currency"] = json!(currency);
        }
    }
}

/// Which API's error shape an endpoint answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    OpenAi,
    Anthropic,
}

impl From<&tollgate_core::egress::Refused> for ProxyError {
    fn from(refused: &tollgate_core::egress::Refused) -> Self {
        ProxyError::DestinationRefused { message: refused.to_string(), code: "destination_refused" }
    }
}

impl From<tollgate_core::egress::BaseUrlError> for ProxyError {
    fn from(e: tollgate_core::egress::BaseUrlError) -> Self {
        ProxyError::DestinationRefused {
            message: format!(
                "The base URL of the provider connection serving this model {e}; the project's admin must replace the connection."
            ),
            code: "invalid_base_url",
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
            ProjectError::NotFound(what) => ProxyError::NotFound(format!("no such {what}")),
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
        self.add_budget_fields(&mut error);
        (self.status_code(), Json(json!({ "error": error }))).into_response()
    }
}

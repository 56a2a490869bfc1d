//! Errors of the dashboard face, answered as HTML pages (or a redirect to the login page).

use askama::Template;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    BadRequest(String),
    /// Not logged in: the login page, then back to `next`.
    #[error("login required")]
    LoginRequired { next: String },
    /// Logged and hidden from the visitor.
    #[error("internal error")]
    Internal,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    message: &'a str,
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let (status, title, message) = match &self {
            WebError::NotFound => {
                (StatusCode::NOT_FOUND, "Not found", "There is nothing here, or it is not yours to see.".to_owned())
            }
            WebError::Forbidden(why) => (StatusCode::FORBIDDEN, "Not allowed", (*why).to_owned()),
            WebError::BadRequest(why) => (StatusCode::BAD_REQUEST, "Bad request", why.clone()),
            WebError::LoginRequired { next } => {
                let target = super::accounts::safe_next(next).unwrap_or("/");
                return Redirect::to(&format!("/login?next={}", urlencode(target))).into_response();
            }
            WebError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "We could not complete this request. Please try again.".to_owned(),
            ),
        };
        let page = ErrorPage { title, message: &message };
        match page.render() {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (status, message).into_response(),
        }
    }
}

impl From<tollgate_core::db::DbError> for WebError {
    fn from(e: tollgate_core::db::DbError) -> Self {
        tracing::error!(error = %e, "database error in the dashboard");
        WebError::Internal
    }
}

impl From<askama::Error> for WebError {
    fn from(e: askama::Error) -> Self {
        tracing::error!(error = %e, "template rendering failed");
        WebError::Internal
    }
}

impl From<tower_sessions::session::Error> for WebError {
    fn from(e: tower_sessions::session::Error) -> Self {
        tracing::error!(error = %e, "session store error");
        WebError::Internal
    }
}

/// Percent-encodes a query parameter value.
pub fn urlencode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

//! The tenant dashboard: server-rendered pages (askama) over the same domain functions the
//! proxy and the management API use. Works without JavaScript; everything it serves comes
//! from this binary (no CDN).
//!
//! - [`session`]: who is looking (the `Member` extractor), CSRF tokens (the session's, or a
//!   form cookie before login), logging in and out.
//! - [`session_store`]: tower-sessions on our own database, ids stored hashed.
//! - [`accounts`]: sign-up, email confirmation, login, logout, password change and reset.
//! - [`projects`], [`customers`], [`keys`], [`providers`], [`settings`], [`members`], [`audit_log`]:
//!   the pages of an organization; [`api_reference`]: the management API's reference;
//!   [`analytics`]: provider cost, billed and margin over a date range, and its CSV.
//! - [`error`]: the one error type of this face, answered as an HTML page.
//! - [`first_run`]: the overview's first-run checklist and the first call's snippets.
//! - [`confirm`]: the confirmation pages of irreversible actions (a GET on the action's path).

pub mod accounts;
pub mod alerts;
pub mod analytics;
pub mod api_reference;
pub mod audit_log;
pub mod billing;
pub mod calls;
pub mod confirm;
pub mod customers;
pub mod error;
pub mod first_run;
pub mod format;
pub mod keys;
pub mod members;
pub mod one_off;
pub mod payment_collection;
pub mod projects;
pub mod providers;
pub mod session;
pub mod session_store;
pub mod settings;

use axum::Router;
use axum::extract::{Path, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use tower_sessions::cookie::SameSite;
use tower_sessions::{Expiry, Session, SessionManagerLayer};

use crate::state::AppState;

/// A session ends after this long without a change (and at the latest after the operator's
/// session lifetime, see `session_store`).
const SESSION_IDLE: time::Duration = time::Duration::hours(12);

pub fn router(state: &AppState) -> Router<AppState> {
    // Secure cookies whenever browsers reach Tollgate over HTTPS (production); plain HTTP
    // in development, where a Secure cookie would never come back.
    let secure = state.config.public_url.starts_with("https://");
    let sessions = SessionManagerLayer::new(session_store::DbSessionStore::new(state.db.clone()))
        .with_name("tollgate_session")
        .with_secure(secure)
        .with_http_only(true)
        .with_same_site(SameSite::Lax)
        .with_expiry(Expiry::OnInactivity(SESSION_IDLE));
    let pages = Router::new()
        .route("/", get(home))
        .route("/signup", get(accounts::signup_page).post(accounts::signup))
        .route("/login", get(accounts::login_page).post(accounts::login))
        .route("/logout", post(accounts::logout))
        .route("/password/forgot", get(accounts::forgot_page).post(accounts::forgot))
        .route("/password/reset", get(accounts::reset_page).post(accounts::reset))
        .route("/account", get(accounts::account_page))
        .route("/account/password", post(accounts::change_password))
        .route("/account/verify", post(accounts::resend_verification))
        .route("/verify", get(accounts::verify_email))
        .route("/org/switch", post(accounts::switch_org))
        .route("/projects", get(projects::list).post(projects::create))
        .route("/projects/{id}", get(projects::show))
        .route("/projects/{id}/keys", get(keys::list).post(keys::create))
        .route("/projects/{id}/keys/{key_id}/revoke", post(keys::revoke))
        .route("/projects/{id}/providers", get(providers::list).post(providers::add))
        .route("/projects/{id}/providers/{provider_id}/delete", post(providers::delete))
        .route("/projects/{id}/customers", get(customers::list).post(customers::save))
        .route("/projects/{id}/customers/{customer_id}", get(customers::show))
        .route("/projects/{id}/customers/{customer_id}/block", post(customers::block))
        .route("/projects/{id}/customers/{customer_id}/unblock", post(customers::unblock))
        .route("/projects/{id}/customers/{customer_id}/stripe", post(customers::link_stripe))
        .route("/projects/{id}/customers/{customer_id}/payment-setup", post(payment_collection::payment_setup))
        .route("/projects/{id}/customers/{customer_id}/billing-portal", post(payment_collection::billing_portal))
        .route("/projects/{id}/settings", get(settings::show).post(settings::save))
        .route("/projects/{id}/delete", post(settings::delete))
        .route("/projects/{id}/alerts", get(alerts::show).post(alerts::save))
        .route("/projects/{id}/alerts/secret", post(alerts::roll_secret))
        .route("/projects/{id}/calls", get(calls::list))
        .route("/projects/{id}/billing", get(billing::show).post(billing::connect))
        .route("/projects/{id}/billing/disconnect", post(billing::disconnect))
        .route("/projects/{id}/billing/policy", post(billing::set_policy))
        .route("/projects/{id}/billing/event-secret", post(billing::set_event_secret))
        .route("/projects/{id}/billing/check", post(billing::check))
        .route("/projects/{id}/billing/connect-stripe", post(billing::connect_stripe))
        .route("/stripe/connect/callback", get(billing::connect_callback))
        .route("/projects/{id}/billing/retry", post(billing::retry))
        .route("/projects/{id}/billing/one-off", post(one_off::request))
        .route("/projects/{id}/billing/one-off/{one}/retry", post(one_off::retry))
        .route("/projects/{id}/billing/one-off/{one}/give-back", post(one_off::give_back))
        .route("/projects/{id}/billing/new-stripe-customer", post(one_off::new_stripe_customer))
        .route("/projects/{id}/billing/collection", post(payment_collection::set_collection))
        .route("/projects/{id}/prices", get(settings::prices).post(settings::set_price))
        .route("/projects/{id}/prices/delete", post(settings::delete_price))
        .route("/projects/{id}/api", get(api_reference::page))
        .route("/projects/{id}/analytics", get(analytics::page))
        .route("/projects/{id}/analytics.csv", get(analytics::csv))
        .route("/audit", get(audit_log::page))
        .route("/members", get(members::list))
        .route("/members/invite", post(members::invite))
        .route("/members/{user_id}/role", post(members::set_role))
        .route("/members/{user_id}/remove", post(members::remove))
        .route("/invitations/{id}/revoke", post(members::revoke_invitation))
        .route("/invite", get(members::show_invitation))
        .route("/invite/accept", post(members::accept))
        .route("/invite/signup", post(members::sign_up))
        .route("/projects/{id}/providers/{provider_id}/test", post(providers::test))
        // What cannot be undone is confirmed first: a GET on the action's own path.
        .route("/projects/{id}/keys/{key_id}/revoke", get(confirm::revoke_key))
        .route("/projects/{id}/providers/{provider_id}/delete", get(confirm::remove_provider))
        .route("/projects/{id}/customers/{customer_id}/block", get(confirm::block_customer))
        .route("/projects/{id}/alerts/secret", get(confirm::roll_alert_secret))
        .route("/projects/{id}/billing/disconnect", get(confirm::disconnect_stripe))
        .route("/projects/{id}/delete", get(confirm::delete_project))
        .layer(axum::middleware::from_fn(refuse_nul_in_forms))
        .layer(sessions)
        .layer(axum::middleware::from_fn_with_state(state.clone(), session::form_cookie))
        .layer(axum::middleware::from_fn(security_headers));
    pages.route("/static/{file}", get(static_file))
}

async fn home(session: Session) -> Redirect {
    match session.get::<serde_json::Value>("user_id").await {
        Ok(Some(_)) => Redirect::to("/projects"),
        _ => Redirect::to("/login"),
    }
}

/// Headers every page carries: no framing, no sniffing, scripts and styles from here only.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    add_security_headers(response.headers_mut());
    response
}

/// The page a browser gets for a URL nothing serves (see `app::router`'s fallback), with the
/// headers every page carries.
pub fn not_found_page() -> Response {
    let mut response = error::WebError::NotFound.into_response();
    add_security_headers(response.headers_mut());
    response
}

fn add_security_headers(headers: &mut axum::http::HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

/// The largest form body the dashboard reads.
const MAX_FORM_BYTES: usize = 256 * 1024;

/// No field of any form may hold a NUL character (PostgreSQL cannot store one in text, and no
/// person types one): such a form is answered with a message before any handler sees it.
async fn refuse_nul_in_forms(request: Request, next: Next) -> Response {
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
        return error::WebError::BadRequest("The form is too large.".to_owned()).into_response();
    };
    if bytes.contains(&0) || bytes.windows(3).any(|w| w == b"%00") {
        return error::WebError::BadRequest("A field holds a NUL character, which text may not contain.".to_owned())
            .into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// The files of `static/`, compiled into the binary.
async fn static_file(Path(file): Path<String>) -> Response {
    let (body, content_type): (&'static str, &'static str) = match file.as_str() {
        "app.css" => (include_str!("../../../static/app.css"), "text/css; charset=utf-8"),
        "copy.js" => (include_str!("../../../static/copy.js"), "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=3600")], body).into_response()
}

//! Who is looking at the dashboard: the session's user, their current organization and role,
//! and the CSRF token every form of theirs carries.
//!
//! A session row exists only once someone logs in. The forms shown before that (log in, sign
//! up, reset, accept an invitation) carry the token of a cookie of their own instead
//! ([`FormCookie`]: a double-submit cookie), so an anonymous visit writes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use tollgate_core::accounts::{self, Membership, Role, User};
use tollgate_core::audit::Actor;
use tollgate_core::crypto;
use tollgate_core::ids::{OrgId, UserId};
use tollgate_core::time::UnixMillis;
use tower_sessions::Session;

use super::error::WebError;
use crate::state::AppState;

/// Session keys. The session store also reads the first two (see `session_store`).
pub(super) const USER: &str = "user_id";
pub(super) const ENDS_AT: &str = "ends_at";
const ORG: &str = "org_id";
const CSRF: &str = "csrf";

/// A form that carries nothing but its CSRF token (a button: log out, revoke, block, …).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub struct CsrfForm {
    pub csrf: String,
}

/// The session's CSRF token, created on first use (only logged-in sessions have one: it is
/// set at login).
pub async fn csrf_token(session: &Session) -> Result<String, WebError> {
    if let Some(token) = session.get::<String>(CSRF).await? {
        return Ok(token);
    }
    let token = crypto::random_token();
    session.insert(CSRF, &token).await?;
    Ok(token)
}

/// Refuses a form whose CSRF token is not the session's.
pub async fn verify_csrf(session: &Session, presented: &str) -> Result<(), WebError> {
    let expected = session.get::<String>(CSRF).await?.unwrap_or_default();
    check_token(&expected, presented)
}

const FORM_EXPIRED: WebError = WebError::Forbidden("This form has expired. Go back, reload the page and try again.");

/// Compares a presented token with the expected one in constant time; an empty one never matches.
fn check_token(expected: &str, presented: &str) -> Result<(), WebError> {
    let same = !expected.is_empty()
        && expected.len() == presented.len()
        && expected.bytes().zip(presented.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same { Ok(()) } else { Err(FORM_EXPIRED) }
}

/// The CSRF token of the forms shown to people not logged in: a random value kept in its own
/// cookie (HttpOnly, SameSite=Strict, `__Host-` and Secure over HTTPS) and repeated in the form.
/// Another site can neither read the cookie nor set it, so it cannot post a matching pair.
/// [`form_cookie`] reads it on the way in and sets it on the way out when a page used a new one.
#[derive(Clone)]
pub struct FormCookie {
    token: String,
    /// Whether the request came without (a valid) one, so `token` is new.
    fresh: bool,
    /// Whether a page put `token` in a form, so the response must set the cookie.
    used: Arc<AtomicBool>,
}

impl FormCookie {
    /// The token for a form on this page.
    pub fn token(&self) -> String {
        self.used.store(true, Ordering::Relaxed);
        self.token.clone()
    }

    /// Refuses a form whose token is not the one of the cookie that came with it.
    pub fn verify(&self, presented: &str) -> Result<(), WebError> {
        if self.fresh {
            return Err(FORM_EXPIRED);
        }
        check_token(&self.token, presented)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for FormCookie {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<FormCookie>().cloned().ok_or_else(|| {
            tracing::error!("the form cookie layer is missing");
            WebError::Internal
        })
    }
}

fn form_cookie_name(secure: bool) -> &'static str {
    if secure { "__Host-tollgate_form" } else { "tollgate_form" }
}

/// The layer behind [`FormCookie`].
pub async fn form_cookie(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let secure = state.config.public_url.starts_with("https://");
    let name = form_cookie_name(secure);
    let presented = request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
        .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    let cookie = FormCookie {
        fresh: presented.is_none(),
        token: presented.unwrap_or_else(crypto::random_token),
        used: Arc::default(),
    };
    request.extensions_mut().insert(cookie.clone());
    let mut response = next.run(request).await;
    if cookie.fresh && cookie.used.load(Ordering::Relaxed) {
        let secure_attribute = if secure { "; Secure" } else { "" };
        let value = format!("{name}={}; Path=/; HttpOnly; SameSite=Strict{secure_attribute}", cookie.token);
        if let Ok(value) = HeaderValue::try_from(value) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

/// Starts a logged-in session for `user` (a fresh session id, so a planted one is useless),
/// which ends after `lifetime` however active it is.
pub async fn log_in(session: &Session, user: &UserId, org: Option<&OrgId>, lifetime: Duration) -> Result<(), WebError> {
    session.cycle_id().await?;
    session.insert(USER, user).await?;
    let lifetime_ms = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX);
    session.insert(ENDS_AT, UnixMillis::now().0.saturating_add(lifetime_ms)).await?;
    if let Some(org) = org {
        session.insert(ORG, org).await?;
    }
    session.insert(CSRF, crypto::random_token()).await?;
    Ok(())
}

pub async fn log_out(session: &Session) -> Result<(), WebError> {
    session.flush().await?;
    Ok(())
}

pub async fn switch_org(session: &Session, org: &OrgId) -> Result<(), WebError> {
    session.insert(ORG, org).await?;
    Ok(())
}

/// A logged-in member of an organization: the extractor every dashboard page starts from.
/// Not logged in: the login page, then back.
#[derive(Clone)]
pub struct Member {
    pub user: User,
    pub org: Membership,
    pub orgs: Vec<Membership>,
    pub csrf: String,
    pub session: Session,
    /// The path of the page asked for (no query): the navigation marks where the member is.
    pub path: String,
}

impl Member {
    pub fn role(&self) -> Role {
        self.org.role()
    }

    pub fn org_id(&self) -> &OrgId {
        &self.org.org_id
    }

    /// Refuses unless this member's role allows what `needed` may do.
    pub fn require(&self, needed: Role) -> Result<(), WebError> {
        if self.role().allows(needed) {
            Ok(())
        } else {
            Err(WebError::Forbidden(match needed {
                Role::Owner => "Only an owner of this organization can do this.",
                _ => "Your role in this organization (viewer) cannot change anything.",
            }))
        }
    }

    pub async fn verify_csrf(&self, presented: &str) -> Result<(), WebError> {
        verify_csrf(&self.session, presented).await
    }

    pub fn actor(&self) -> Actor {
        Actor { user_id: Some(self.user.id.clone()), label: self.user.email.clone() }
    }

    pub fn can_edit(&self) -> bool {
        self.role().allows(Role::Admin)
    }

    /// The top navigation's section of this page: the path's first segment (`projects`).
    pub fn section(&self) -> &str {
        self.path.trim_start_matches('/').split('/').next().unwrap_or_default()
    }

    /// The project tab of this page: the segment after `/projects/{id}/` (`keys`, `billing`),
    /// empty for the overview; a project's deletion is on its settings tab.
    pub fn tab(&self) -> &str {
        match self.path.trim_start_matches('/').split('/').nth(2).unwrap_or_default() {
            "delete" => "settings",
            tab => tab,
        }
    }

    /// `aria-current` of the top navigation's link to `section`: `page` on the section's own
    /// page, `true` on a page within it, none elsewhere.
    pub fn current_section(&self, section: &str) -> Option<&'static str> {
        current(self.section() == section, self.path.trim_start_matches('/') == section)
    }

    /// `aria-current` of the project navigation's link to `tab` (empty: the overview).
    pub fn current_tab(&self, tab: &str) -> Option<&'static str> {
        let deeper = self.path.trim_start_matches('/').split('/').filter(|s| !s.is_empty()).count() > 3;
        current(self.tab() == tab, !deeper && self.tab() == tab && !self.path.ends_with("/delete"))
    }
}

fn current(within: bool, on_it: bool) -> Option<&'static str> {
    match (within, on_it) {
        (_, true) => Some("page"),
        (true, false) => Some("true"),
        (false, false) => None,
    }
}

impl FromRequestParts<AppState> for Member {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let next = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".to_owned());
        let session = Session::from_request_parts(parts, state).await.map_err(|_| WebError::Internal)?;
        let Some(user_id) = session.get::<UserId>(USER).await? else {
            return Err(WebError::LoginRequired { next });
        };
        let Some(user) = accounts::get_user(&state.db, &user_id).await? else {
            session.flush().await?;
            return Err(WebError::LoginRequired { next });
        };
        let mut orgs = accounts::memberships(&state.db, &user.id).await?;
        // An unverified account acts only in the organizations it owns (the ones it created):
        // it cannot join another, and should it have a membership anyway, it is not usable.
        if !user.is_verified() {
            orgs.retain(|m| m.role() == Role::Owner);
        }
        let current = session.get::<OrgId>(ORG).await?;
        let org = current
            .and_then(|id| orgs.iter().find(|m| m.org_id == id).cloned())
            .or_else(|| orgs.first().cloned())
            .ok_or(WebError::Forbidden("You are not a member of any organization any more."))?;
        let csrf = csrf_token(&session).await?;
        let path = parts.uri.path().to_owned();
        Ok(Member { user, org, orgs, csrf, session, path })
    }
}

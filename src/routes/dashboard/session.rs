//! Who is looking at the dashboard: the session's user, their current organization and role,
//! and the CSRF token every form of theirs carries.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use tollgate_core::accounts::{self, Membership, Role, User};
use tollgate_core::audit::Actor;
use tollgate_core::crypto;
use tollgate_core::ids::{OrgId, UserId};
use tower_sessions::Session;

use super::error::WebError;
use crate::state::AppState;

const USER: &str = "user_id";
const ORG: &str = "org_id";
const CSRF: &str = "csrf";

/// A form that carries nothing but its CSRF token (a button: log out, revoke, block, …).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub struct CsrfForm {
    pub csrf: String,
}

/// The session's CSRF token, created on first use.
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
    let same = !expected.is_empty()
        && expected.len() == presented.len()
        && expected.bytes().zip(presented.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same {
        Ok(())
    } else {
        Err(WebError::Forbidden("This form has expired. Go back, reload the page and try again."))
    }
}

/// Starts a logged-in session for `user` (a fresh session id, so a planted one is useless).
pub async fn log_in(session: &Session, user: &UserId, org: Option<&OrgId>) -> Result<(), WebError> {
    session.cycle_id().await?;
    session.insert(USER, user).await?;
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
        let orgs = accounts::memberships(&state.db, &user.id).await?;
        let current = session.get::<OrgId>(ORG).await?;
        let org = current
            .and_then(|id| orgs.iter().find(|m| m.org_id == id).cloned())
            .or_else(|| orgs.first().cloned())
            .ok_or(WebError::Forbidden("You are not a member of any organization any more."))?;
        let csrf = csrf_token(&session).await?;
        Ok(Member { user, org, orgs, csrf, session })
    }
}

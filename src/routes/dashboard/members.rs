//! Members and invitations. Owners invite by link (mailed; without SMTP written to the server
//! log and shown once to the owner, who relays it), change roles and remove members; the last
//! owner stays. An invitation is accepted by an existing, verified account with the invited
//! email, or by creating that account (verified: the link came to its mailbox).

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::{self, AccountError, Invitation, MemberError, Role};
use tollgate_core::audit;
use tollgate_core::ids::{InvitationId, UserId};
use tollgate_core::throttle;
use tollgate_core::time::UnixMillis;
use tower_sessions::Session;

use super::error::{WebError, urlencode};
use super::format;
use super::session::{self, CsrfForm, FormCookie, Member, csrf_token};
use crate::state::AppState;

pub struct MemberView {
    user_id: UserId,
    email: String,
    role: String,
    since: String,
}

pub struct InvitationView {
    id: InvitationId,
    email: String,
    role: String,
    expires: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "members.html")]
pub struct MembersPage {
    me: Member,
    is_owner: bool,
    members: Vec<MemberView>,
    invitations: Vec<InvitationView>,
    invite_link: Option<String>,
    errors: Vec<String>,
}

async fn page(
    state: &AppState,
    me: Member,
    invite_link: Option<String>,
    errors: Vec<String>,
) -> Result<MembersPage, WebError> {
    let members = accounts::list_members(&state.db, me.org_id())
        .await?
        .into_iter()
        .map(|m| MemberView { user_id: m.user_id, email: m.email, role: m.role, since: format::datetime(m.created_at) })
        .collect();
    let invitations = accounts::list_invitations(&state.db, me.org_id())
        .await?
        .into_iter()
        .map(|i| InvitationView { id: i.id, email: i.email, role: i.role, expires: format::datetime(i.expires_at) })
        .collect();
    Ok(MembersPage { is_owner: me.role() == Role::Owner, me, members, invitations, invite_link, errors })
}

fn member_error(e: MemberError) -> Result<String, WebError> {
    match e {
        MemberError::Db(e) | MemberError::Account(AccountError::Db(e)) => Err(e.into()),
        MemberError::Account(AccountError::Hash(_)) => Err(WebError::Internal),
        MemberError::NotFound => Err(WebError::NotFound),
        other => Ok(other.to_string()),
    }
}

pub async fn list(State(state): State<AppState>, me: Member) -> Result<MembersPage, WebError> {
    page(&state, me, None, vec![]).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct InviteForm {
    csrf: String,
    email: String,
    role: String,
}

/// How many invitations an organization may send per throttle window.
pub const MAX_INVITATIONS_PER_WINDOW: i64 = 20;

pub async fn invite(
    State(state): State<AppState>,
    me: Member,
    Form(form): Form<InviteForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Owner)?;
    let role = match form.role.as_str() {
        "admin" => Role::Admin,
        "viewer" => Role::Viewer,
        _ => {
            let errors = vec!["Role: choose admin or viewer".to_owned()];
            return Ok((StatusCode::BAD_REQUEST, page(&state, me, None, errors).await?).into_response());
        }
    };
    // Each invitation mails a link from this server to an address the tenant chose, under a
    // name the tenant chose: an organization may send a handful per window, not a mailing.
    let key = format!("invite:org:{}", me.org_id());
    if !throttle::take(&state.db, &key, MAX_INVITATIONS_PER_WINDOW, UnixMillis::now()).await? {
        let errors = vec![format!(
            "Too many invitations sent: at most {MAX_INVITATIONS_PER_WINDOW} every {} minutes. Try again later.",
            throttle::WINDOW_SECS / 60
        )];
        return Ok((StatusCode::TOO_MANY_REQUESTS, page(&state, me, None, errors).await?).into_response());
    }
    match accounts::invite(&state.db, me.org_id(), &form.email, role, &me.user).await {
        Ok((invitation, token)) => {
            let link = format!("{}/invite?token={}", state.config.public_url.trim_end_matches('/'), urlencode(&token));
            let body = format!(
                "{} invites you to join {} on Tollgate as {}.\n\nAccept here (the link works once, for 7 days):\n{link}\n",
                me.user.email, invitation.org_name, invitation.role
            );
            let subject = format!("Join {} on Tollgate", invitation.org_name);
            state.mailer.send(&invitation.email, &subject, body, &link);
            let detail = format!("invited as {}", invitation.role);
            audit::record(&state.db, me.org_id(), &me.actor(), "member.invited", &invitation.email, &detail).await?;
            // With mail, only the invited mailbox gets the link, so following it proves the
            // address; without, the owner relays it.
            let shown = (!state.mailer.is_configured()).then_some(link);
            Ok(page(&state, me, shown, vec![]).await?.into_response())
        }
        Err(e) => {
            let errors = vec![member_error(e)?];
            Ok((StatusCode::BAD_REQUEST, page(&state, me, None, errors).await?).into_response())
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct RoleForm {
    csrf: String,
    role: String,
}

pub async fn set_role(
    State(state): State<AppState>,
    me: Member,
    Path(user_id): Path<String>,
    Form(form): Form<RoleForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Owner)?;
    let user_id = UserId::parse(&user_id).ok_or(WebError::NotFound)?;
    let role =
        Role::parse(&form.role).ok_or_else(|| WebError::BadRequest("Role: choose owner, admin or viewer".into()))?;
    match accounts::set_role(&state.db, me.org_id(), &user_id, role).await {
        Ok(()) => {
            let who = accounts::get_user(&state.db, &user_id).await?.map(|u| u.email).unwrap_or_default();
            audit::record(
                &state.db,
                me.org_id(),
                &me.actor(),
                "member.role_changed",
                &who,
                &format!("now {}", role.as_str()),
            )
            .await?;
            Ok(Redirect::to("/members").into_response())
        }
        Err(e) => {
            let errors = vec![member_error(e)?];
            Ok((StatusCode::BAD_REQUEST, page(&state, me, None, errors).await?).into_response())
        }
    }
}

pub async fn remove(
    State(state): State<AppState>,
    me: Member,
    Path(user_id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Owner)?;
    let user_id = UserId::parse(&user_id).ok_or(WebError::NotFound)?;
    let who = accounts::get_user(&state.db, &user_id).await?.map(|u| u.email).unwrap_or_default();
    match accounts::remove_member(&state.db, me.org_id(), &user_id).await {
        Ok(()) => {
            audit::record(&state.db, me.org_id(), &me.actor(), "member.removed", &who, "removed").await?;
            Ok(Redirect::to("/members").into_response())
        }
        Err(e) => {
            let errors = vec![member_error(e)?];
            Ok((StatusCode::BAD_REQUEST, page(&state, me, None, errors).await?).into_response())
        }
    }
}

pub async fn revoke_invitation(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Owner)?;
    let id = InvitationId::parse(&id).ok_or(WebError::NotFound)?;
    if !accounts::revoke_invitation(&state.db, me.org_id(), &id).await? {
        return Err(WebError::NotFound);
    }
    audit::record(&state.db, me.org_id(), &me.actor(), "member.invitation_revoked", id.as_str(), "revoked").await?;
    Ok(Redirect::to("/members"))
}

// ---------------------------------------------------------------------------------------
// Accepting

#[derive(Template, WebTemplate)]
#[template(path = "invite.html")]
pub struct InvitePage {
    csrf: String,
    token: String,
    next_encoded: String,
    invitation: Invitation,
    logged_in: bool,
    errors: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct InviteQuery {
    token: String,
}

/// The invitation's page: a logged-in visitor's form carries the session's token, anyone
/// else's the form cookie's.
async fn invite_page(
    state: &AppState,
    session: &Session,
    form_cookie: &FormCookie,
    token: String,
    errors: Vec<String>,
) -> Result<Response, WebError> {
    let Some(invitation) = accounts::invitation(&state.db, &token).await? else {
        return Err(WebError::BadRequest(MemberError::InvitationGone.to_string()));
    };
    let logged_in = session.get::<UserId>("user_id").await?.is_some();
    let status = if errors.is_empty() { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    let csrf = if logged_in { csrf_token(session).await? } else { form_cookie.token() };
    let page = InvitePage {
        csrf,
        next_encoded: urlencode(&format!("/invite?token={token}")),
        token,
        invitation,
        logged_in,
        errors,
    };
    Ok((status, page).into_response())
}

pub async fn show_invitation(
    State(state): State<AppState>,
    session: Session,
    form_cookie: FormCookie,
    Query(query): Query<InviteQuery>,
) -> Result<Response, WebError> {
    invite_page(&state, &session, &form_cookie, query.token, vec![]).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct AcceptForm {
    csrf: String,
    token: String,
    password: String,
}

pub async fn accept(
    State(state): State<AppState>,
    me: Member,
    form_cookie: FormCookie,
    Form(form): Form<AcceptForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    match accounts::accept_invitation(&state.db, &form.token, &me.user).await {
        Ok(invitation) => {
            session::switch_org(&me.session, &invitation.org_id).await?;
            let actor = me.actor();
            audit::record(&state.db, &invitation.org_id, &actor, "member.joined", &me.user.email, &invitation.role)
                .await?;
            Ok(Redirect::to("/projects").into_response())
        }
        Err(e) => {
            let message = member_error(e)?;
            invite_page(&state, &me.session, &form_cookie, form.token, vec![message]).await
        }
    }
}

pub async fn sign_up(
    State(state): State<AppState>,
    session: Session,
    form_cookie: FormCookie,
    Form(form): Form<AcceptForm>,
) -> Result<Response, WebError> {
    form_cookie.verify(&form.csrf)?;
    match accounts::sign_up_with_invitation(&state.db, &form.token, &form.password).await {
        Ok((user, invitation)) => {
            let lifetime = state.config.accounts.session_lifetime;
            session::log_in(&session, &user.id, Some(&invitation.org_id), lifetime).await?;
            let actor = audit::Actor { user_id: Some(user.id.clone()), label: user.email.clone() };
            audit::record(&state.db, &invitation.org_id, &actor, "member.joined", &user.email, &invitation.role)
                .await?;
            Ok(Redirect::to("/projects").into_response())
        }
        Err(e) => {
            let message = match e {
                MemberError::Account(AccountError::EmailTaken) => "An account with this email exists already: log in \
                     (or choose a new password with \"Forgot your password?\"), then open the invitation link again."
                    .to_owned(),
                MemberError::Account(AccountError::Password(why)) => format!("Password: {why}"),
                other => member_error(other)?,
            };
            invite_page(&state, &session, &form_cookie, form.token, vec![message]).await
        }
    }
}

//! Sign-up, login, logout, password change and reset.
//!
//! Reset links go out by SMTP when it is configured; otherwise they are written to the server
//! log (at `warn`, so they show with the default filter), which the README says.

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{ConnectInfo, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use std::net::SocketAddr;
use tollgate_core::accounts::{self, AccountError, LoginError, NewOrganization};
use tollgate_core::audit;
use tower_sessions::Session;

use super::error::{WebError, urlencode};
use super::session::{self, CsrfForm, Member, csrf_token, verify_csrf};
use crate::state::AppState;

#[derive(Template, WebTemplate)]
#[template(path = "signup.html")]
pub struct SignupPage {
    csrf: String,
    org_name: String,
    email: String,
    errors: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SignupForm {
    csrf: String,
    org_name: String,
    email: String,
    password: String,
}

pub async fn signup_page(session: Session) -> Result<SignupPage, WebError> {
    Ok(SignupPage { csrf: csrf_token(&session).await?, org_name: String::new(), email: String::new(), errors: vec![] })
}

pub async fn signup(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<SignupForm>,
) -> Result<Response, WebError> {
    verify_csrf(&session, &form.csrf).await?;
    let new = NewOrganization { name: &form.org_name, owner_email: &form.email, owner_password: &form.password };
    match accounts::create_organization_with_owner(&state.db, new).await {
        Ok(created) => {
            session::log_in(&session, &created.owner_id, Some(&created.org_id)).await?;
            let actor = audit::Actor { user_id: Some(created.owner_id), label: form.email.trim().to_lowercase() };
            audit::record(
                &state.db,
                &created.org_id,
                &actor,
                "organization.created",
                form.org_name.trim(),
                "signed up",
            )
            .await?;
            Ok(Redirect::to("/projects").into_response())
        }
        Err(AccountError::Db(e)) => Err(e.into()),
        Err(AccountError::Hash(_)) => Err(WebError::Internal),
        Err(e) => {
            let page = SignupPage {
                csrf: csrf_token(&session).await?,
                org_name: form.org_name,
                email: form.email,
                errors: vec![account_error_message(&e)],
            };
            Ok((axum::http::StatusCode::BAD_REQUEST, page).into_response())
        }
    }
}

fn account_error_message(e: &AccountError) -> String {
    let text = e.to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => text,
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "login.html")]
pub struct LoginPage {
    csrf: String,
    next: String,
    email: String,
    notice: Option<String>,
    errors: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct LoginQuery {
    next: String,
    reset: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct LoginForm {
    csrf: String,
    next: String,
    email: String,
    password: String,
}

pub async fn login_page(session: Session, Query(query): Query<LoginQuery>) -> Result<LoginPage, WebError> {
    Ok(LoginPage {
        csrf: csrf_token(&session).await?,
        next: query.next,
        email: String::new(),
        notice: query.reset.map(|_| "Your password was changed. Log in with the new one.".to_owned()),
        errors: vec![],
    })
}

/// Only paths of this site are followed after login (no open redirect).
fn safe_next(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') { next } else { "/projects" }
}

pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    session: Session,
    Form(form): Form<LoginForm>,
) -> Result<Response, WebError> {
    verify_csrf(&session, &form.csrf).await?;
    match accounts::login(&state.db, &form.email, &form.password, &client.ip().to_string()).await {
        Ok(user) => {
            session::log_in(&session, &user.id, None).await?;
            Ok(Redirect::to(safe_next(&form.next)).into_response())
        }
        Err(LoginError::Db(e)) => Err(e.into()),
        Err(e) => {
            let page = LoginPage {
                csrf: csrf_token(&session).await?,
                next: form.next,
                email: form.email,
                notice: None,
                errors: vec![e.to_string()],
            };
            let status = match e {
                LoginError::Throttled => axum::http::StatusCode::TOO_MANY_REQUESTS,
                _ => axum::http::StatusCode::UNAUTHORIZED,
            };
            Ok((status, page).into_response())
        }
    }
}

pub async fn logout(session: Session, Form(form): Form<CsrfForm>) -> Result<Redirect, WebError> {
    verify_csrf(&session, &form.csrf).await?;
    session::log_out(&session).await?;
    Ok(Redirect::to("/login"))
}

#[derive(Template, WebTemplate)]
#[template(path = "forgot.html")]
pub struct ForgotPage {
    csrf: String,
    sent: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ForgotForm {
    csrf: String,
    email: String,
}

pub async fn forgot_page(session: Session) -> Result<ForgotPage, WebError> {
    Ok(ForgotPage { csrf: csrf_token(&session).await?, sent: false })
}

/// Answers the same whether or not the email has an account (no account discovery).
pub async fn forgot(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<ForgotForm>,
) -> Result<ForgotPage, WebError> {
    verify_csrf(&session, &form.csrf).await?;
    if let Some(token) = accounts::start_password_reset(&state.db, &form.email).await? {
        let link =
            format!("{}/password/reset?token={}", state.config.public_url.trim_end_matches('/'), urlencode(&token));
        let body = format!(
            "Someone (hopefully you) asked to reset the password of your Tollgate account.\n\n\
             Choose a new password here (the link works once, for one hour):\n{link}\n\n\
             If you did not ask, ignore this mail: your password stays as it is.\n"
        );
        state.mailer.send(&form.email.trim().to_lowercase(), "Reset your Tollgate password", body, &link);
    }
    Ok(ForgotPage { csrf: csrf_token(&session).await?, sent: true })
}

#[derive(Template, WebTemplate)]
#[template(path = "reset.html")]
pub struct ResetPage {
    csrf: String,
    token: String,
    errors: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ResetQuery {
    token: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ResetForm {
    csrf: String,
    token: String,
    password: String,
}

pub async fn reset_page(
    State(state): State<AppState>,
    session: Session,
    Query(query): Query<ResetQuery>,
) -> Result<ResetPage, WebError> {
    let errors = if accounts::reset_token_is_live(&state.db, &query.token).await? {
        vec![]
    } else {
        vec![AccountError::ResetLink.to_string()]
    };
    Ok(ResetPage { csrf: csrf_token(&session).await?, token: query.token, errors })
}

pub async fn reset(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<ResetForm>,
) -> Result<Response, WebError> {
    verify_csrf(&session, &form.csrf).await?;
    match accounts::finish_password_reset(&state.db, &form.token, &form.password).await {
        Ok(_) => Ok(Redirect::to("/login?reset=1").into_response()),
        Err(AccountError::Db(e)) => Err(e.into()),
        Err(AccountError::Hash(_)) => Err(WebError::Internal),
        Err(e) => {
            let page = ResetPage {
                csrf: csrf_token(&session).await?,
                token: form.token,
                errors: vec![account_error_message(&e)],
            };
            Ok((axum::http::StatusCode::BAD_REQUEST, page).into_response())
        }
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "account.html")]
pub struct AccountPage {
    me: Member,
    notice: Option<String>,
    errors: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct PasswordForm {
    csrf: String,
    current: String,
    new: String,
}

pub async fn account_page(me: Member) -> AccountPage {
    AccountPage { me, notice: None, errors: vec![] }
}

pub async fn change_password(
    State(state): State<AppState>,
    me: Member,
    Form(form): Form<PasswordForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    match accounts::change_password(&state.db, &me.user.id, &form.current, &form.new).await {
        Ok(()) => {
            audit::record(
                &state.db,
                me.org_id(),
                &me.actor(),
                "user.password_changed",
                &me.user.email,
                "password changed",
            )
            .await?;
            Ok(AccountPage { me, notice: Some("Your password was changed.".to_owned()), errors: vec![] }
                .into_response())
        }
        Err(AccountError::Db(e)) => Err(e.into()),
        Err(AccountError::Hash(_)) => Err(WebError::Internal),
        Err(e) => {
            let status = axum::http::StatusCode::BAD_REQUEST;
            Ok((status, AccountPage { me, notice: None, errors: vec![account_error_message(&e)] }).into_response())
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SwitchForm {
    csrf: String,
    org_id: String,
}

pub async fn switch_org(me: Member, Form(form): Form<SwitchForm>) -> Result<Redirect, WebError> {
    me.verify_csrf(&form.csrf).await?;
    let org = me.orgs.iter().find(|m| m.org_id.as_str() == form.org_id).ok_or(WebError::NotFound)?;
    session::switch_org(&me.session, &org.org_id).await?;
    Ok(Redirect::to("/projects"))
}

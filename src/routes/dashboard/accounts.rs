//! Sign-up, email confirmation, login, logout, password change and reset.
//!
//! Links (confirmation, reset) go out by SMTP when it is configured; otherwise they are written
//! to the server log (at `warn`, so they show with the default filter), which the README says.
//! Sign-up answers "check your mail" whether or not the address has an account (the existing
//! owner is mailed instead), after the same work either way; the one exception is the first
//! account of an install without SMTP, which is verified and logged in at once, so that a
//! self-hoster without mail is never stuck.

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::{self, AccountError, LoginError, NewOrganization, SignUp};
use tollgate_core::audit;
use tower_sessions::Session;

use super::error::{WebError, urlencode};
use super::session::{self, CsrfForm, FormCookie, Member};
use crate::middleware::client_addr::ClientAddr;
use crate::state::AppState;

#[derive(Template, WebTemplate)]
#[template(path = "signup.html")]
pub struct SignupPage {
    csrf: String,
    org_name: String,
    email: String,
    errors: Vec<String>,
    /// Where the "check your mail" message went (shown instead of the form).
    sent_to: Option<String>,
    /// False: sign-up is closed on this server (invitations only).
    open: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SignupForm {
    csrf: String,
    org_name: String,
    email: String,
    password: String,
}

const SIGNUP_CLOSED: &str = "Sign-up is closed on this server: ask an owner of your organization for an invitation.";

pub async fn signup_page(State(state): State<AppState>, csrf: FormCookie) -> Response {
    let open = state.config.accounts.signup_open;
    let page = SignupPage {
        csrf: csrf.token(),
        org_name: String::new(),
        email: String::new(),
        errors: vec![],
        sent_to: None,
        open,
    };
    if open { page.into_response() } else { (StatusCode::FORBIDDEN, page).into_response() }
}

pub async fn signup(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    csrf: FormCookie,
    session: Session,
    Form(form): Form<SignupForm>,
) -> Result<Response, WebError> {
    csrf.verify(&form.csrf)?;
    let page = |errors: Vec<String>, sent_to: Option<String>| SignupPage {
        csrf: csrf.token(),
        org_name: form.org_name.clone(),
        email: form.email.clone(),
        errors,
        sent_to,
        open: state.config.accounts.signup_open,
    };
    if !state.config.accounts.signup_open {
        return Ok((StatusCode::FORBIDDEN, page(vec![SIGNUP_CLOSED.to_owned()], None)).into_response());
    }
    let new = NewOrganization { name: &form.org_name, owner_email: &form.email, owner_password: &form.password };
    // Without mail, the first account of an install is its operator's: verified at once.
    let first_account_verified = !state.mailer.is_configured();
    let public_url = state.config.public_url.trim_end_matches('/');
    match accounts::sign_up(&state.db, new, &client.to_string(), first_account_verified).await {
        Ok(SignUp::Created { organization, verification }) => {
            let email = form.email.trim().to_lowercase();
            let actor = audit::Actor { user_id: Some(organization.owner_id.clone()), label: email.clone() };
            audit::record(
                &state.db,
                &organization.org_id,
                &actor,
                "organization.created",
                form.org_name.trim(),
                "signed up",
            )
            .await?;
            let Some(token) = verification else {
                let lifetime = state.config.accounts.session_lifetime;
                session::log_in(&session, &organization.owner_id, Some(&organization.org_id), lifetime).await?;
                return Ok(Redirect::to("/projects").into_response());
            };
            mail_verification(&state, &email, &token);
            Ok(page(vec![], Some(email)).into_response())
        }
        Ok(SignUp::EmailTaken { email }) => {
            let login = format!("{public_url}/login");
            let body = format!(
                "Someone (hopefully you) tried to sign up to Tollgate with this address, which has an account \
                 already. Log in here:\n{login}\n\nForgot your password? Choose a new one here:\n\
                 {public_url}/password/forgot\n\nIf it was not you, ignore this mail: nothing changed.\n"
            );
            state.mailer.send(&email, "Your Tollgate account", body, &login);
            Ok(page(vec![], Some(email)).into_response())
        }
        Err(AccountError::Db(e)) => Err(e.into()),
        Err(AccountError::Hash(_)) => Err(WebError::Internal),
        Err(e @ AccountError::TooManySignUps) => {
            Ok((StatusCode::TOO_MANY_REQUESTS, page(vec![e.to_string()], None)).into_response())
        }
        Err(e) => Ok((StatusCode::BAD_REQUEST, page(vec![account_error_message(&e)], None)).into_response()),
    }
}

/// Mails a confirmation link (or, without SMTP, writes it to the log for the operator).
fn mail_verification(state: &AppState, email: &str, token: &str) {
    let link = format!("{}/verify?token={}", state.config.public_url.trim_end_matches('/'), urlencode(token));
    let body = format!(
        "Someone (hopefully you) signed up to Tollgate with this address. Confirm it here (the link works \
         for 7 days; you will log in with the password you chose):\n{link}\n\n\
         If it was not you, ignore this mail: an account that is not confirmed is deleted after 7 days.\n"
    );
    state.mailer.send(email, "Confirm your Tollgate account", body, &link);
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
    signup_open: bool,
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

pub async fn login_page(State(state): State<AppState>, csrf: FormCookie, Query(query): Query<LoginQuery>) -> LoginPage {
    LoginPage {
        csrf: csrf.token(),
        next: query.next,
        email: String::new(),
        notice: query.reset.map(|_| "Your password was changed. Log in with the new one.".to_owned()),
        errors: vec![],
        signup_open: state.config.accounts.signup_open,
    }
}

/// Where to go after logging in: `next` if it is a path of this site, else the projects.
/// A path is `/` followed by anything but `/` or `\` (which browsers read as another host),
/// in visible ASCII only (no whitespace or control characters, which browsers drop, and
/// nothing a header cannot carry).
pub(super) fn safe_next(next: &str) -> Option<&str> {
    let bytes = next.as_bytes();
    let same_site = bytes.first() == Some(&b'/')
        && !matches!(bytes.get(1), Some(b'/' | b'\\'))
        && bytes.iter().all(|b| b.is_ascii_graphic() && *b != b'\\');
    same_site.then_some(next)
}

pub async fn login(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    csrf: FormCookie,
    session: Session,
    Form(form): Form<LoginForm>,
) -> Result<Response, WebError> {
    csrf.verify(&form.csrf)?;
    let backoff_max = state.config.accounts.login_backoff_max;
    match accounts::login(&state.db, &form.email, &form.password, &client.to_string(), backoff_max).await {
        Ok(user) => {
            session::log_in(&session, &user.id, None, state.config.accounts.session_lifetime).await?;
            Ok(Redirect::to(safe_next(&form.next).unwrap_or("/projects")).into_response())
        }
        Err(LoginError::Db(e)) => Err(e.into()),
        Err(e) => {
            let status = match e {
                LoginError::Throttled | LoginError::Backoff { .. } => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::UNAUTHORIZED,
            };
            let page = LoginPage {
                csrf: csrf.token(),
                next: form.next,
                email: form.email,
                notice: None,
                errors: vec![e.to_string()],
                signup_open: state.config.accounts.signup_open,
            };
            Ok((status, page).into_response())
        }
    }
}

pub async fn logout(session: Session, Form(form): Form<CsrfForm>) -> Result<Redirect, WebError> {
    session::verify_csrf(&session, &form.csrf).await?;
    session::log_out(&session).await?;
    Ok(Redirect::to("/login"))
}

#[derive(Template, WebTemplate)]
#[template(path = "forgot.html")]
pub struct ForgotPage {
    csrf: String,
    sent: bool,
    errors: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ForgotForm {
    csrf: String,
    email: String,
}

pub async fn forgot_page(csrf: FormCookie) -> ForgotPage {
    ForgotPage { csrf: csrf.token(), sent: false, errors: vec![] }
}

/// Answers the same whether or not the email has an account (no account discovery); counted
/// per client address and per email first.
pub async fn forgot(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    csrf: FormCookie,
    Form(form): Form<ForgotForm>,
) -> Result<Response, WebError> {
    csrf.verify(&form.csrf)?;
    if !accounts::allow_reset_request(&state.db, &client.to_string(), &form.email).await? {
        let errors = vec!["Too many reset requests. Try again in a few minutes.".to_owned()];
        return Ok(
            (StatusCode::TOO_MANY_REQUESTS, ForgotPage { csrf: csrf.token(), sent: false, errors }).into_response()
        );
    }
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
    Ok(ForgotPage { csrf: csrf.token(), sent: true, errors: vec![] }.into_response())
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
    csrf: FormCookie,
    Query(query): Query<ResetQuery>,
) -> Result<ResetPage, WebError> {
    let errors = if accounts::reset_token_is_live(&state.db, &query.token).await? {
        vec![]
    } else {
        vec![AccountError::ResetLink.to_string()]
    };
    Ok(ResetPage { csrf: csrf.token(), token: query.token, errors })
}

/// Sets the new password; every session of the account ends (see `accounts::finish_password_reset`).
pub async fn reset(
    State(state): State<AppState>,
    csrf: FormCookie,
    Form(form): Form<ResetForm>,
) -> Result<Response, WebError> {
    csrf.verify(&form.csrf)?;
    match accounts::finish_password_reset(&state.db, &form.token, &form.password).await {
        Ok(_) => Ok(Redirect::to("/login?reset=1").into_response()),
        Err(AccountError::Db(e)) => Err(e.into()),
        Err(AccountError::Hash(_)) => Err(WebError::Internal),
        Err(e) => {
            let page = ResetPage { csrf: csrf.token(), token: form.token, errors: vec![account_error_message(&e)] };
            Ok((StatusCode::BAD_REQUEST, page).into_response())
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
    // Every other session of the account ends; this one stays.
    let this_session = me.session.id().map(|id| id.to_string());
    match accounts::change_password(&state.db, &me.user.id, &form.current, &form.new, this_session.as_deref()).await {
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
            let status = StatusCode::BAD_REQUEST;
            Ok((status, AccountPage { me, notice: None, errors: vec![account_error_message(&e)] }).into_response())
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct VerifyQuery {
    token: String,
}

/// A confirmation link, opened logged in as its account (the `Member` extractor sends anyone
/// else to the login page first, then back here): the link proves the mailbox, the login the
/// password.
pub async fn verify_email(
    State(state): State<AppState>,
    mut me: Member,
    Query(query): Query<VerifyQuery>,
) -> Result<Response, WebError> {
    if me.user.is_verified() {
        let notice = Some("Your email address is confirmed already.".to_owned());
        return Ok(AccountPage { me, notice, errors: vec![] }.into_response());
    }
    match accounts::verify_email(&state.db, &query.token, &me.user.id).await {
        Ok(()) => {
            audit::record(&state.db, me.org_id(), &me.actor(), "user.email_verified", &me.user.email, "confirmed")
                .await?;
            me.user.verified_at = Some(tollgate_core::time::UnixMillis::now().0);
            let notice = Some("Your email address is confirmed.".to_owned());
            Ok(AccountPage { me, notice, errors: vec![] }.into_response())
        }
        Err(AccountError::Db(e)) => Err(e.into()),
        Err(e) => {
            let errors = vec![account_error_message(&e)];
            Ok((StatusCode::BAD_REQUEST, AccountPage { me, notice: None, errors }).into_response())
        }
    }
}

/// Mails the confirmation link again (throttled per account).
pub async fn resend_verification(
    State(state): State<AppState>,
    me: Member,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    if me.user.is_verified() {
        let notice = Some("Your email address is confirmed already.".to_owned());
        return Ok(AccountPage { me, notice, errors: vec![] }.into_response());
    }
    if !accounts::allow_verification_mail(&state.db, &me.user.id).await? {
        let errors = vec!["We sent several links already. Try again in a few minutes.".to_owned()];
        return Ok((StatusCode::TOO_MANY_REQUESTS, AccountPage { me, notice: None, errors }).into_response());
    }
    if let Some(token) = accounts::start_email_verification(&state.db, &me.user.id).await? {
        mail_verification(&state, &me.user.email, &token);
    }
    let notice = Some(format!("We sent a new confirmation link to {}.", me.user.email));
    Ok(AccountPage { me, notice, errors: vec![] }.into_response())
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

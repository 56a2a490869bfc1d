//! A project's budget alerts: which thresholds fire, where they go (a signed webhook, mail),
//! the webhook's signing secret (shown to admins, rolled on demand), and the delivery log.

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::Role;
use tollgate_core::alerts::{self, AlertError, AlertKind, AlertSettings, AlertSettingsInput};
use tollgate_core::audit;
use tollgate_core::projects::Project;

use super::error::WebError;
use super::format;
use super::projects::{capitalized, load_project};
use super::session::{CsrfForm, Member};
use crate::state::AppState;

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub struct AlertsForm {
    csrf: String,
    thresholds: String,
    on_refused: Option<String>,
    webhook_url: String,
    email_to: String,
}

/// The form's fields as shown.
pub struct AlertsView {
    thresholds: String,
    on_refused: bool,
    webhook_url: String,
    email_to: String,
}

impl AlertsView {
    /// The saved settings; nothing for a project that saved none (its alerts are off, and the
    /// form must not look as if they were on).
    fn of(settings: &AlertSettings) -> Self {
        if !settings.saved() {
            return Self {
                thresholds: String::new(),
                on_refused: false,
                webhook_url: String::new(),
                email_to: String::new(),
            };
        }
        Self {
            thresholds: settings.thresholds.iter().map(i64::to_string).collect::<Vec<_>>().join(", "),
            on_refused: settings.on_refused,
            webhook_url: settings.webhook_url.clone().unwrap_or_default(),
            email_to: settings.email_to.join(", "),
        }
    }
}

pub struct DeliveryView {
    when: String,
    alert: String,
    customer_id: String,
    customer: String,
    channel: String,
    target: String,
    status: String,
    attempts: i64,
    detail: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "alerts.html")]
pub struct AlertsPage {
    me: Member,
    project: Project,
    form: AlertsView,
    /// Whether the saved settings can fire an alert, and what they do, in a sentence.
    on: bool,
    state: String,
    /// Suggested thresholds, shown as the empty field's placeholder.
    suggested: String,
    /// Shown to admins only.
    secret: Option<String>,
    saved: bool,
    rolled: bool,
    smtp_configured: bool,
    alerts_fired: i64,
    deliveries: Vec<DeliveryView>,
    errors: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ShowQuery {
    saved: Option<String>,
    rolled: Option<String>,
}

fn alert_error(e: AlertError) -> WebError {
    match e {
        AlertError::Invalid { field, reason } => WebError::BadRequest(format!("{field}: {reason}")),
        AlertError::Secret => {
            tracing::error!(error = %e, "alert settings unreadable");
            WebError::Internal
        }
        AlertError::Db(e) => e.into(),
    }
}

fn field_label(field: &str) -> String {
    match field {
        "thresholds" => "Thresholds".to_owned(),
        "webhook_url" => "Webhook URL".to_owned(),
        "email_to" => "Email recipients".to_owned(),
        other => capitalized(other),
    }
}

fn describe(kind: AlertKind) -> String {
    match kind {
        AlertKind::Threshold(pct) => format!("{pct}% of budget"),
        AlertKind::Refused => "call refused".to_owned(),
    }
}

/// What the saved settings do, as the top of the page says it.
fn state_sentence(settings: &AlertSettings) -> String {
    if !settings.saved() {
        return "Alerts are off: none has been set for this project. Choose thresholds and where alerts go, \
            then save."
            .to_owned();
    }
    if !settings.on() {
        return "Alerts are off: no threshold is set and refused calls are not alerted.".to_owned();
    }
    let mut what: Vec<String> = Vec::new();
    if !settings.thresholds.is_empty() {
        let pcts: Vec<String> = settings.thresholds.iter().map(|p| format!("{p}%")).collect();
        what.push(format!("when a customer's spend reaches {} of its budget", pcts.join(", ")));
    }
    if settings.on_refused {
        what.push("when a call is refused for want of budget".to_owned());
    }
    let mut channels: Vec<String> = Vec::new();
    if let Some(url) = &settings.webhook_url {
        channels.push(format!("the webhook {url}"));
    }
    if !settings.email_to.is_empty() {
        channels.push(settings.email_to.join(", "));
    }
    let to = if channels.is_empty() {
        "recorded in the log below, but sent nowhere: add a webhook URL or an address".to_owned()
    } else {
        format!("sent to {}", channels.join(" and "))
    };
    format!("Alerts are on: {}; {to}.", what.join(", and "))
}

async fn page(
    state: &AppState,
    me: Member,
    project: Project,
    form: Option<AlertsView>,
    errors: Vec<String>,
    query: &ShowQuery,
) -> Result<AlertsPage, WebError> {
    let settings = alerts::settings(&state.db, &state.master_key, &project.id).await.map_err(alert_error)?;
    let log = alerts::delivery_log(&state.db, &project.id, 100).await?;
    let alerts_fired = alerts::alert_count(&state.db, &project.id).await?;
    let deliveries = log
        .into_iter()
        .map(|d| {
            let detail = match (d.status.as_str(), d.last_status, &d.last_error) {
                ("delivered", Some(code), _) => format!("HTTP {code}"),
                ("delivered", None, _) => "accepted by the mail server".to_owned(),
                (_, _, Some(error)) => match (d.status.as_str(), d.next_attempt_at) {
                    ("pending", Some(at)) => format!("{error}; next attempt {}", format::datetime(at)),
                    _ => error.clone(),
                },
                _ => String::new(),
            };
            DeliveryView {
                when: format::datetime(d.created_at),
                alert: describe(d.alert_kind()),
                customer_id: d.customer_id.to_string(),
                customer: d.customer_external_id,
                channel: d.channel,
                target: d.target,
                status: d.status,
                attempts: d.attempts,
                detail,
            }
        })
        .collect();
    let secret = if me.role().allows(Role::Admin) { settings.webhook_secret.clone() } else { None };
    let suggested = AlertSettings::default().thresholds.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
    Ok(AlertsPage {
        on: settings.on(),
        state: state_sentence(&settings),
        suggested,
        form: form.unwrap_or_else(|| AlertsView::of(&settings)),
        secret,
        saved: query.saved.is_some(),
        rolled: query.rolled.is_some(),
        smtp_configured: state.mailer.is_configured(),
        alerts_fired,
        deliveries,
        errors,
        me,
        project,
    })
}

pub async fn show(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Query(query): Query<ShowQuery>,
) -> Result<AlertsPage, WebError> {
    let project = load_project(&state, &me, &id).await?;
    page(&state, me, project, None, vec![], &query).await
}

pub async fn save(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<AlertsForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let input = AlertSettingsInput {
        thresholds: form.thresholds.clone(),
        on_refused: form.on_refused.is_some(),
        webhook_url: form.webhook_url.clone(),
        email_to: form.email_to.clone(),
    };
    match alerts::save_settings(&state.db, &state.master_key, &project.id, &input).await {
        Ok(saved) => {
            let detail = format!(
                "thresholds {:?}, on refused {}, webhook {}, {} email recipients",
                saved.thresholds,
                saved.on_refused,
                saved.webhook_url.as_deref().unwrap_or("none"),
                saved.email_to.len()
            );
            audit::record(&state.db, me.org_id(), &me.actor(), "alerts.settings_changed", &project.name, &detail)
                .await?;
            Ok(Redirect::to(&format!("/projects/{}/alerts?saved=1", project.id)).into_response())
        }
        Err(AlertError::Invalid { field, reason }) => {
            let view = AlertsView {
                thresholds: form.thresholds,
                on_refused: form.on_refused.is_some(),
                webhook_url: form.webhook_url,
                email_to: form.email_to,
            };
            let errors = vec![format!("{}: {reason}", field_label(field))];
            let page = page(&state, me, project, Some(view), errors, &ShowQuery::default()).await?;
            Ok((StatusCode::BAD_REQUEST, page).into_response())
        }
        Err(e) => Err(alert_error(e)),
    }
}

pub async fn roll_secret(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    alerts::roll_secret(&state.db, &state.master_key, &project.id).await.map_err(alert_error)?;
    audit::record(&state.db, me.org_id(), &me.actor(), "alerts.secret_rolled", &project.name, "").await?;
    Ok(Redirect::to(&format!("/projects/{}/alerts?rolled=1", project.id)).into_response())
}

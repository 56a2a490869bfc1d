//! A project's billing through Stripe: how it is connected (a pasted secret or restricted key,
//! test or live), the webhook endpoint to register in Stripe, and the webhook events received.

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::Role;
use tollgate_core::audit;
use tollgate_core::projects::Project;
use tollgate_core::stripe::{self, Connection, StripeError};
use tollgate_core::with_db;

use super::error::WebError;
use super::format;
use super::projects::load_project;
use super::session::{CsrfForm, Member};
use crate::state::AppState;

/// The webhook events Tollgate acts on; the tenant subscribes its endpoint to these.
pub const WEBHOOK_EVENTS: &[&str] = &[
    "invoice.created",
    "invoice.finalized",
    "invoice.paid",
    "invoice.payment_failed",
    "invoice.voided",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "billing.meter.error_report_triggered",
];

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ConnectForm {
    csrf: String,
    secret_key: String,
    webhook_secret: String,
}

pub struct InvoiceView {
    number: String,
    customer_id: Option<String>,
    customer: String,
    amount: String,
    status: String,
    url: Option<String>,
    updated: String,
}

pub struct EventView {
    id: String,
    kind: String,
    received: String,
    processed: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "billing.html")]
pub struct BillingPage {
    me: Member,
    project: Project,
    connection: Option<Connection>,
    connected_at: String,
    checked_at: String,
    webhook_url: String,
    webhook_events: &'static [&'static str],
    events: Vec<EventView>,
    invoices: Vec<InvoiceView>,
    saved: bool,
    errors: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ShowQuery {
    saved: Option<String>,
}

fn stripe_error(e: StripeError) -> WebError {
    match e {
        StripeError::Invalid { field, reason } => WebError::BadRequest(format!("{field}: {reason}")),
        StripeError::Secret => {
            tracing::error!(error = %e, "stripe connection unreadable");
            WebError::Internal
        }
        StripeError::Db(e) => e.into(),
    }
}

async fn page(
    state: &AppState,
    me: Member,
    project: Project,
    errors: Vec<String>,
    saved: bool,
) -> Result<BillingPage, WebError> {
    let connection = stripe::connection(&state.db, &project.id).await.map_err(stripe_error)?;
    const EVENTS: &str = "SELECT id, type, received_at, processed_at FROM stripe_events \
        WHERE project_id = $1 ORDER BY received_at DESC, id DESC LIMIT 50";
    let rows: Vec<(String, String, i64, Option<i64>)> = with_db!(&state.db, pool =>
        sqlx::query_as::<_, (String, String, i64, Option<i64>)>(EVENTS).bind(&project.id).fetch_all(pool).await)
    .map_err(tollgate_core::db::DbError::from)?;
    let events = rows
        .into_iter()
        .map(|(id, kind, received, processed)| EventView {
            id,
            kind,
            received: format::datetime(received),
            processed: processed.map(format::datetime).unwrap_or_else(|| "waiting".to_owned()),
        })
        .collect();
    let invoices = stripe::invoices(&state.db, &project.id, None, 100)
        .await
        .map_err(stripe_error)?
        .into_iter()
        .map(|i| InvoiceView {
            number: i.number.unwrap_or_else(|| "(draft)".to_owned()),
            customer_id: i.customer_id.map(|c| c.to_string()),
            customer: i.customer_external_id.unwrap_or(i.stripe_customer_id),
            amount: minor_units(i.amount_due, &i.currency),
            status: if i.payment_failed { "payment failed".to_owned() } else { i.status },
            // Only Stripe's own https links become links.
            url: i.hosted_invoice_url.filter(|u| u.starts_with("https://")),
            updated: format::datetime(i.state_at.saturating_mul(1000)),
        })
        .collect();
    let base = state.config.public_url.trim_end_matches('/');
    Ok(BillingPage {
        connected_at: connection.as_ref().map(|c| format::datetime(c.updated_at)).unwrap_or_default(),
        checked_at: connection.as_ref().and_then(|c| c.last_check_at).map(format::datetime).unwrap_or_default(),
        connection,
        webhook_url: format!("{base}/stripe/webhooks/{}", project.id),
        webhook_events: WEBHOOK_EVENTS,
        events,
        invoices,
        saved,
        errors,
        me,
        project,
    })
}

/// An amount in a currency's smallest unit (Stripe's way) as text: `1234` usd → `12.34 USD`.
/// Zero-decimal currencies (JPY, KRW, …) have no cents.
fn minor_units(amount: i64, currency: &str) -> String {
    const ZERO_DECIMAL: &[&str] = &[
        "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf",
    ];
    let code = currency.to_uppercase();
    if ZERO_DECIMAL.contains(&currency.to_lowercase().as_str()) {
        return format!("{amount} {code}");
    }
    let sign = if amount < 0 { "-" } else { "" };
    let abs = amount.unsigned_abs();
    format!("{sign}{}.{:02} {code}", abs / 100, abs % 100)
}

pub async fn show(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Query(query): Query<ShowQuery>,
) -> Result<BillingPage, WebError> {
    let project = load_project(&state, &me, &id).await?;
    page(&state, me, project, vec![], query.saved.is_some()).await
}

pub async fn connect(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<ConnectForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    match stripe::connect_with_key(&state.db, &state.master_key, &project.id, &form.secret_key, &form.webhook_secret)
        .await
    {
        Ok(connection) => {
            let detail = format!(
                "{} key {}",
                if connection.livemode { "live" } else { "test" },
                connection.key_hint.unwrap_or_default()
            );
            audit::record(&state.db, me.org_id(), &me.actor(), "stripe.connected", &project.name, &detail).await?;
            Ok(Redirect::to(&format!("/projects/{}/billing?saved=1", project.id)).into_response())
        }
        Err(StripeError::Invalid { field, reason }) => {
            let label = match field {
                "secret_key" => "Secret key",
                "webhook_secret" => "Webhook signing secret",
                other => other,
            };
            let page = page(&state, me, project, vec![format!("{label}: {reason}")], false).await?;
            Ok((StatusCode::BAD_REQUEST, page).into_response())
        }
        Err(e) => Err(stripe_error(e)),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct PolicyForm {
    csrf: String,
    block_on_payment_failure: Option<String>,
}

pub async fn set_policy(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<PolicyForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let block = form.block_on_payment_failure.is_some();
    if !stripe::set_block_on_payment_failure(&state.db, &project.id, block).await.map_err(stripe_error)? {
        return Err(WebError::BadRequest("Connect Stripe first".to_owned()));
    }
    let detail = format!("block on payment failure: {block}");
    audit::record(&state.db, me.org_id(), &me.actor(), "stripe.policy_changed", &project.name, &detail).await?;
    Ok(Redirect::to(&format!("/projects/{}/billing?saved=1", project.id)).into_response())
}

/// "Test connection": asks Stripe which account the key reaches, and records the answer.
pub async fn check(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let Some(key) = stripe::secret_key(&state.db, &state.master_key, &project.id).await.map_err(stripe_error)? else {
        return Err(WebError::BadRequest("Connect Stripe first".to_owned()));
    };
    let outcome = state.stripe.account(&key, None).await;
    let error = match &outcome {
        Ok(account) => {
            tracing::info!(project = %project.id, account = %account.id, "stripe connection checked");
            None
        }
        Err(e) => Some(e.to_string()),
    };
    stripe::record_check(&state.db, &project.id, error.as_deref()).await.map_err(stripe_error)?;
    Ok(Redirect::to(&format!("/projects/{}/billing", project.id)).into_response())
}

pub async fn disconnect(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    if stripe::disconnect(&state.db, &project.id).await.map_err(stripe_error)? {
        audit::record(&state.db, me.org_id(), &me.actor(), "stripe.disconnected", &project.name, "").await?;
    }
    Ok(Redirect::to(&format!("/projects/{}/billing", project.id)).into_response())
}

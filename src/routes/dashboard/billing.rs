//! A project's billing through Stripe: how it is connected (a pasted secret or restricted key,
//! or a Stripe Connect account; test or live), what provisioning made, the meter delivery's lag
//! and errors, each customer's subscription and drift against Stripe's meter summaries, the
//! invoices, the webhook endpoint and the event destination to register in Stripe (with the
//! meter error reports received there), and the events received.

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use tollgate_core::accounts::Role;
use tollgate_core::audit;
use tollgate_core::billing;
use tollgate_core::projects::Project;
use tollgate_core::stripe::{self, Connection, StripeError};
use tollgate_core::stripe_connect;
use tollgate_core::time::UnixMillis;
use tollgate_core::with_db;

use super::error::WebError;
use super::format;
use super::projects::load_project;
use super::session::{CsrfForm, Member};
use crate::state::AppState;
use tollgate_jobs::stripe_api::{self, NoCredentials};

/// The webhook events Tollgate acts on; the tenant subscribes its endpoint to these.
pub const WEBHOOK_EVENTS: &[&str] = &[
    "invoice.created",
    "invoice.finalized",
    "invoice.paid",
    "invoice.payment_failed",
    "invoice.voided",
    "invoice.marked_uncollectible",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.deleted",
    "checkout.session.completed",
];

/// The thin event Tollgate acts on, sent to an event destination: Stripe reports meter errors it
/// finds after accepting a meter event only this way ("Occurs when a Meter has invalid async
/// usage events", https://docs.stripe.com/api/v2/core/events/event-types).
pub const DESTINATION_EVENTS: &[&str] = &[tollgate_core::meter_errors::ERROR_REPORT_TRIGGERED];

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ConnectForm {
    csrf: String,
    secret_key: String,
    webhook_secret: String,
}

pub struct InvoiceView {
    pub number: String,
    pub customer_id: Option<String>,
    pub customer: String,
    pub amount: String,
    pub status: String,
    pub url: Option<String>,
    pub updated: String,
    /// How the finalized invoice compares with the ledger: empty until it is finalized.
    pub ledger: String,
    pub drift: bool,
}

/// A customer whose usage Stripe would invoice nowhere.
pub struct UninvoiceableView {
    customer_id: String,
    customer: String,
    reason: String,
    /// Deleted in Stripe: a new Stripe customer is offered instead of a one-off invoice.
    customer_deleted: bool,
    calls: i64,
    amount: format::Money,
    since: String,
}

pub struct DeliveryView {
    waiting_events: i64,
    waiting: format::Money,
    lag: String,
    /// The lag is past [`billing::LAG_WARNING_MS`].
    lag_warning: bool,
    delivered_batches: i64,
    delivered: format::Money,
    last_delivered: String,
    failed_batches: i64,
    problems: Vec<ProblemView>,
    uninvoiceable: Vec<UninvoiceableView>,
    /// Usage settled before Stripe was connected: never sent, shown apart.
    before_calls: i64,
    before: String,
    billing_from: String,
}

pub struct ProblemView {
    customer: String,
    status: String,
    amount: format::Money,
    attempts: i64,
    error: String,
    next_attempt: String,
}

pub struct CustomerBillingView {
    id: String,
    external_id: String,
    stripe_customer_id: String,
    subscription: String,
    error: Option<String>,
    delivered: String,
    stripe: String,
    pending: String,
    drift: String,
    drift_nonzero: bool,
    checked: String,
}

pub struct ProvisionView {
    meter_id: String,
    price_id: String,
    error: Option<String>,
    next_attempt: String,
    billing_from: String,
}

/// A meter error report Stripe sent, as received.
pub struct ErrorReportView {
    event_id: String,
    meter_id: String,
    summary: String,
    errors: i64,
    codes: String,
    window: String,
    batches_failed: i64,
    /// Errors no sampled request ties to a batch: usage Stripe did not count, not shown above.
    unidentified: i64,
    received: String,
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
    destination_url: String,
    destination_events: &'static [&'static str],
    event_secret_set: bool,
    error_reports: Vec<ErrorReportView>,
    events: Vec<EventView>,
    invoices: Vec<InvoiceView>,
    provision: Option<ProvisionView>,
    delivery: Option<DeliveryView>,
    customers: Vec<CustomerBillingView>,
    period: String,
    connect_available: bool,
    connect_mode: bool,
    /// `live` or `test`, once connected.
    mode: Option<&'static str>,
    /// This server's public URL, when Stripe cannot reach it (not HTTPS, or loopback).
    unreachable_public_url: Option<String>,
    saved: bool,
    errors: Vec<String>,
    collection: tollgate_core::payment_collection::Collection,
    automatic_tax: bool,
    one_offs: Vec<super::one_off::OneOffView>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ShowQuery {
    saved: Option<String>,
}

pub(super) fn stripe_error(e: StripeError) -> WebError {
    match e {
        StripeError::Invalid { field, reason } => WebError::BadRequest(format!("{field}: {reason}")),
        StripeError::Secret => {
            tracing::error!(error = %e, "stripe connection unreadable");
            WebError::Internal
        }
        StripeError::Db(e) => e.into(),
    }
}

pub(super) async fn page(
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
    let invoices = invoice_views(state, &project, None).await?;
    let currency = project.currency.clone();
    let money = |nanos: i64| format::money(nanos, &currency);
    let amount = |nanos: i64| format::amount(nanos, &currency);
    let now = UnixMillis::now();
    let provision_status = billing::provision_status(&state.db, &project.id).await?;
    let delivery = match &provision_status {
        Some(p) => {
            let d = billing::delivery_status(&state.db, &project.id, p.created_at).await?;
            let before = billing::before_connection(&state.db, &project.id, p.created_at).await?;
            Some(DeliveryView {
                before_calls: before.events,
                before: money(before.nanos),
                billing_from: format::datetime(p.created_at),
                waiting_events: d.waiting_events,
                waiting: amount(d.waiting_nanos),
                lag: d.oldest_waiting_at.map(|t| duration((now.0 - t).max(0))).unwrap_or_else(|| "none".to_owned()),
                lag_warning: d.oldest_waiting_at.is_some_and(|t| now.0 - t > billing::LAG_WARNING_MS),
                delivered_batches: d.delivered_batches,
                delivered: amount(d.delivered_nanos),
                last_delivered: d.last_delivered_at.map(format::datetime).unwrap_or_else(|| "never".to_owned()),
                failed_batches: d.failed_batches,
                problems: d
                    .problems
                    .into_iter()
                    .map(|b| ProblemView {
                        customer: b.customer_external_id.unwrap_or_else(|| "(deleted customer)".to_owned()),
                        status: if b.status == "failed" { "refused".to_owned() } else { "retrying".to_owned() },
                        amount: amount(b.value_nanos),
                        attempts: b.attempts,
                        error: b.last_error.unwrap_or_default(),
                        next_attempt: if b.status == "failed" {
                            String::new()
                        } else {
                            format::datetime(b.next_attempt_at)
                        },
                    })
                    .collect(),
                uninvoiceable: d
                    .uninvoiceable
                    .into_iter()
                    .map(|u| UninvoiceableView {
                        customer_id: u.customer_id.to_string(),
                        customer: u.external_id,
                        reason: tollgate_core::one_off::reason(u.customer_deleted, u.subscription_status.as_deref()),
                        customer_deleted: u.customer_deleted,
                        calls: u.events,
                        amount: amount(u.nanos),
                        since: format::datetime(u.since),
                    })
                    .collect(),
            })
        }
        None => None,
    };
    let provision = provision_status.map(|p| ProvisionView {
        meter_id: p.meter_id.unwrap_or_else(|| "not yet".to_owned()),
        price_id: p.price_id.unwrap_or_else(|| "not yet".to_owned()),
        next_attempt: if p.provision_error.is_some() && p.provision_next_at < i64::MAX / 4 {
            format::datetime(p.provision_next_at)
        } else {
            String::new()
        },
        error: p.provision_error,
        billing_from: format::datetime(p.created_at),
    });
    let (period_start, _) = billing::reconcile_window(now);
    let customers = billing::customer_billing(&state.db, &project.id, period_start, 500)
        .await?
        .into_iter()
        .map(|c| {
            let drift = c.drift_nanos.unwrap_or(0);
            CustomerBillingView {
                id: c.id.to_string(),
                external_id: c.external_id,
                stripe_customer_id: c.stripe_customer_id.unwrap_or_default(),
                subscription: match (c.stripe_subscription_id, c.stripe_subscription_status) {
                    (Some(id), Some(status)) => format!("{status} ({id})"),
                    (Some(id), None) => id,
                    _ => "none yet".to_owned(),
                },
                error: c.stripe_provision_error,
                delivered: c.delivered_nanos.map(money).unwrap_or_else(|| "–".to_owned()),
                stripe: match (c.stripe_nanos, &c.reconcile_error) {
                    (_, Some(e)) => format!("could not be read: {e}"),
                    (Some(v), None) => money(v),
                    (None, None) => "not checked yet".to_owned(),
                },
                pending: c.pending_nanos.map(money).unwrap_or_else(|| "–".to_owned()),
                drift: c.drift_nanos.map(money).unwrap_or_else(|| "–".to_owned()),
                drift_nonzero: drift != 0,
                checked: c.checked_at.map(format::datetime).unwrap_or_else(|| "never".to_owned()),
            }
        })
        .collect();
    let error_reports = tollgate_core::meter_errors::reports(&state.db, &project.id, 20)
        .await?
        .into_iter()
        .map(|r| ErrorReportView {
            event_id: r.event_id,
            meter_id: r.meter_id.unwrap_or_default(),
            summary: r.summary,
            errors: r.error_count,
            codes: r.codes,
            window: match (r.validation_start, r.validation_end) {
                (Some(start), Some(end)) => {
                    format!("{} – {}", format::datetime(start * 1000), format::datetime(end * 1000))
                }
                _ => String::new(),
            },
            batches_failed: r.batches_failed,
            unidentified: (r.error_count - r.batches_failed).max(0),
            received: format::datetime(r.created_at),
        })
        .collect();
    let event_secret_set = stripe::has_event_secret(&state.db, &project.id).await.map_err(stripe_error)?;
    let base = state.config.public_url.trim_end_matches('/');
    let collection = tollgate_core::payment_collection::collection(&state.db, &project.id).await?;
    let one_offs = super::one_off::views(state, &project, None).await?;
    let automatic_tax = tollgate_core::payment_collection::automatic_tax(&state.db, &project.id).await?;
    Ok(BillingPage {
        automatic_tax,
        one_offs,
        collection,
        provision,
        delivery,
        customers,
        period: format::date(period_start),
        connect_available: state.config.stripe_platform_key.is_some()
            && state.config.stripe_connect_client_id.is_some(),
        connect_mode: connection.as_ref().is_some_and(|c| c.mode == "connect"),
        mode: connection.as_ref().map(|c| if c.livemode { "live" } else { "test" }),
        unreachable_public_url: (!reachable_by_stripe(&state.config.public_url))
            .then(|| state.config.public_url.clone()),
        connected_at: connection.as_ref().map(|c| format::datetime(c.updated_at)).unwrap_or_default(),
        checked_at: connection.as_ref().and_then(|c| c.last_check_at).map(format::datetime).unwrap_or_default(),
        connection,
        webhook_url: format!("{base}/stripe/webhooks/{}", project.id),
        webhook_events: WEBHOOK_EVENTS,
        destination_url: format!("{base}/stripe/events/{}", project.id),
        destination_events: DESTINATION_EVENTS,
        event_secret_set,
        error_reports,
        events,
        invoices,
        saved,
        errors,
        me,
        project,
    })
}

/// The project's invoices (one customer's if given), newest first, for pages.
pub(super) async fn invoice_views(
    state: &AppState,
    project: &Project,
    customer: Option<&tollgate_core::ids::CustomerId>,
) -> Result<Vec<InvoiceView>, WebError> {
    Ok(stripe::invoices(&state.db, &project.id, customer, 100)
        .await
        .map_err(stripe_error)?
        .into_iter()
        .map(|i| {
            let (ledger, drift) = match i.check() {
                stripe::InvoiceCheck::Unchecked => (String::new(), false),
                stripe::InvoiceCheck::Matches => ("matches the ledger".to_owned(), false),
                stripe::InvoiceCheck::Drift { missing } if missing > 0 => (
                    format!(
                        "{} delivered for this period is not on it (delivered after it was finalized?)",
                        format::money(missing, &i.currency)
                    ),
                    true,
                ),
                stripe::InvoiceCheck::Drift { missing } => (
                    format!(
                        "it counts {} more than Tollgate delivered (another sender on the meter?)",
                        format::money(-missing, &i.currency)
                    ),
                    true,
                ),
            };
            InvoiceView {
                ledger,
                drift,
                number: i.number.unwrap_or_else(|| "(draft)".to_owned()),
                customer_id: i.customer_id.map(|c| c.to_string()),
                customer: i.customer_external_id.unwrap_or(i.stripe_customer_id),
                amount: tollgate_core::currency::display_minor(i.amount_due, &i.currency),
                status: if i.payment_failed { "payment failed".to_owned() } else { i.status },
                // Only Stripe's own https links become links.
                url: i.hosted_invoice_url.filter(|u| u.starts_with("https://")),
                updated: format::datetime(i.state_at.saturating_mul(1000)),
            }
        })
        .collect())
}

/// Whether Stripe can send webhooks to (and Connect send members back to) `public_url`: it
/// must be HTTPS ("Webhook endpoints must use HTTPS", and Connect's redirect URIs too) on a host
/// that is not this machine's loopback.
fn reachable_by_stripe(public_url: &str) -> bool {
    let Some(rest) = public_url.trim().strip_prefix("https://") else { return false };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    }
    .to_ascii_lowercase();
    !(host.is_empty()
        || host == "localhost"
        || host.ends_with(".localhost")
        || host.starts_with("127.")
        || host == "::1")
}

/// A lag as people read it: `42 s`, `3 min`, `2 h 5 min`.
fn duration(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
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
    // From a Connect account to a valid key: what the Connect account held goes first. (A
    // project already on a key keeps its objects: the new key's account is not known here.)
    let current = stripe::connection(&state.db, &project.id).await.map_err(stripe_error)?;
    if current.is_some_and(|c| c.mode == "connect")
        && stripe::key_livemode(form.secret_key.trim()).is_some()
        && stripe::check_webhook_secret(form.webhook_secret.trim()).is_ok()
    {
        stripe::disconnect(&state.db, &project.id).await.map_err(stripe_error)?;
    }
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
pub struct EventSecretForm {
    csrf: String,
    event_secret: String,
}

/// Sets the event destination's signing secret (an empty one removes it).
pub async fn set_event_secret(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<EventSecretForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let secret = Some(form.event_secret.as_str()).filter(|s| !s.trim().is_empty());
    match stripe::set_event_secret(&state.db, &state.master_key, &project.id, secret).await {
        Ok(true) => {
            let detail = if secret.is_some() { "set" } else { "removed" };
            audit::record(&state.db, me.org_id(), &me.actor(), "stripe.event_secret", &project.name, detail).await?;
            Ok(Redirect::to(&format!("/projects/{}/billing?saved=1", project.id)).into_response())
        }
        Ok(false) => Err(WebError::BadRequest("Connect Stripe first".to_owned())),
        Err(StripeError::Invalid { reason, .. }) => {
            let page =
                page(&state, me, project, vec![format!("Event destination signing secret: {reason}")], false).await?;
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

/// "Test connection": checks through calls the credentials' permissions allow what they reach
/// (see [`tollgate_jobs::stripe_check`]), and records the answer.
pub async fn check(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let livemode = stripe::connection(&state.db, &project.id).await.map_err(stripe_error)?.is_some_and(|c| c.livemode);
    let credentials = match stripe_api::credentials(
        &state.db,
        &state.master_key,
        state.config.stripe_platform_key.as_ref(),
        &project.id,
    )
    .await
    .map_err(stripe_error)?
    {
        Err(NoCredentials::NotConnected) => return Err(WebError::BadRequest("Connect Stripe first".to_owned())),
        found => found.map_err(|e| e.to_string()),
    };
    let outcome = match &credentials {
        Ok(credentials) => tollgate_jobs::stripe_check::check(&state.stripe, credentials, livemode).await,
        Err(e) => Err(e.clone()),
    };
    if let Ok(found) = &outcome {
        tracing::info!(project = %project.id, found = %found, "stripe connection checked");
    }
    stripe::record_check(&state.db, &project.id, outcome.as_deref().map_err(String::as_str))
        .await
        .map_err(stripe_error)?;
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

/// "Connect with Stripe": sends the member to Stripe's OAuth page for Standard accounts with a
/// signed, single-use state naming the project and the member (see
/// [`tollgate_core::stripe_connect`]). Typing an account id is not offered: it proves nothing.
pub async fn connect_stripe(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let (Some(_), Some(client_id)) = (&state.config.stripe_platform_key, &state.config.stripe_connect_client_id) else {
        return Err(WebError::BadRequest("Stripe Connect is not set up on this server".to_owned()));
    };
    let oauth_state =
        stripe_connect::issue_state(&state.db, &state.master_key, &project.id, &me.user.id, UnixMillis::now()).await?;
    let url =
        stripe_connect::authorize_url(&state.config.stripe_oauth_base, client_id, &oauth_state, &redirect_uri(&state));
    Ok(Redirect::to(&url).into_response())
}

/// The redirect URI registered in the platform's Connect settings.
pub fn redirect_uri(state: &AppState) -> String {
    format!("{}{}", state.config.public_url.trim_end_matches('/'), stripe_connect::CALLBACK_PATH)
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CallbackQuery {
    code: Option<String>,
    state: String,
    error: Option<String>,
    error_description: Option<String>,
}

/// Where Stripe sends the member back: the state must be this server's, unexpired, unused, and
/// the logged-in member's own for a project they administer; then the code is exchanged for the
/// account id, which is attached unless another project already bills it.
pub async fn connect_callback(
    State(state): State<AppState>,
    me: Member,
    Query(query): Query<CallbackQuery>,
) -> Result<Response, WebError> {
    let now = UnixMillis::now();
    let claims = stripe_connect::read_state(&state.master_key, &query.state, now)
        .map_err(|e| WebError::BadRequest(format!("Stripe Connect: {e}")))?;
    if claims.user != me.user.id {
        return Err(WebError::BadRequest(format!("Stripe Connect: {}", stripe_connect::StateError::Elsewhere)));
    }
    let project = load_project(&state, &me, claims.project.as_str()).await?;
    me.require(Role::Admin)?;
    if !stripe_connect::consume_state(&state.db, &claims, now).await? {
        return Err(WebError::BadRequest(format!("Stripe Connect: {}", stripe_connect::StateError::Used)));
    }
    let refuse = async |message: String| -> Result<Response, WebError> {
        let page = page(&state, me.clone(), project.clone(), vec![message], false).await?;
        Ok((StatusCode::BAD_REQUEST, page).into_response())
    };
    if let Some(error) = &query.error {
        // Stripe: "error=access_denied … The user denied your request" (Connect OAuth reference).
        let message = if error == "access_denied" {
            "Stripe Connect: the connection was declined on Stripe; nothing was connected".to_owned()
        } else {
            format!("Stripe Connect: Stripe answered {error}: {}", query.error_description.as_deref().unwrap_or(""))
        };
        return refuse(message).await;
    }
    let Some(code) = query.code.filter(|c| !c.is_empty()) else {
        return refuse("Stripe Connect: Stripe sent no authorization code".to_owned()).await;
    };
    let Some(platform_key) = state.config.stripe_platform_key.clone() else {
        return Err(WebError::BadRequest("Stripe Connect is not set up on this server".to_owned()));
    };
    let grant = match tollgate_jobs::stripe_oauth::exchange_code(
        &state.http,
        &state.config.stripe_oauth_base,
        &platform_key,
        &code,
    )
    .await
    {
        Ok(grant) => grant,
        Err(e) => return refuse(format!("Stripe Connect: {e}")).await,
    };
    let account = grant.stripe_user_id;
    if let Some((other, _)) = stripe::project_for_account(&state.db, &account).await.map_err(stripe_error)?
        && other != project.id
    {
        return refuse(format!("Stripe Connect: the Stripe account {account} already bills another project")).await;
    }
    // Another account than the one attached: what the old one held goes first.
    let current = stripe::connection(&state.db, &project.id).await.map_err(stripe_error)?;
    if current.is_some_and(|c| c.account_id.as_deref() != Some(account.as_str())) {
        stripe::disconnect(&state.db, &project.id).await.map_err(stripe_error)?;
    }
    match stripe::connect_with_account(&state.db, &state.master_key, &project.id, &account, grant.livemode).await {
        Ok(_) => {
            let detail = format!("Connect account {account} (OAuth)");
            audit::record(&state.db, me.org_id(), &me.actor(), "stripe.connected", &project.name, &detail).await?;
            Ok(Redirect::to(&format!("/projects/{}/billing?saved=1", project.id)).into_response())
        }
        Err(StripeError::Invalid { reason, .. }) => refuse(format!("Stripe Connect: {account}: {reason}")).await,
        Err(e) => Err(stripe_error(e)),
    }
}

/// "Retry now": provisioning that failed, and meter events Stripe refused, are tried again.
pub async fn retry(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    me.verify_csrf(&form.csrf).await?;
    me.require(Role::Admin)?;
    let project = load_project(&state, &me, &id).await?;
    let batches = billing::retry_now(&state.db, &project.id).await?;
    let detail = format!("{batches} refused meter events queued again");
    audit::record(&state.db, me.org_id(), &me.actor(), "stripe.retried", &project.name, &detail).await?;
    Ok(Redirect::to(&format!("/projects/{}/billing", project.id)).into_response())
}

#[cfg(test)]
mod tests {
    use super::reachable_by_stripe;

    #[test]
    fn stripe_reaches_only_a_public_https_url() {
        assert!(reachable_by_stripe("https://gateway.example.com"));
        assert!(reachable_by_stripe("https://gateway.example.com:8443/base/"));
        for url in [
            "http://gateway.example.com",
            "http://127.0.0.1:8080",
            "https://127.0.0.1:8443",
            "https://localhost",
            "https://app.localhost:3000",
            "https://[::1]:8443",
            "https://",
        ] {
            assert!(!reachable_by_stripe(url), "{url}");
        }
    }
}

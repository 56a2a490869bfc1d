//! Stripe's webhooks: `POST /stripe/webhooks/{project id}`, the endpoint a tenant registers in
//! its Stripe dashboard. A delivery is checked against the project's signing secret (Stripe's
//! scheme, 5 minutes of tolerance, so forged and replayed deliveries are refused with 400),
//! stored once by event id, and only then acknowledged with 200. Processing is a job's work.
//!
//! Projects billed through Stripe Connect have no endpoint of their own: the operator registers
//! `POST /stripe/webhooks/connect` as the platform's Connect endpoint, whose events name the
//! connected account they happened on, and each is filed under the project that bills it.
//!
//! Meter errors Stripe finds after accepting a meter event are no webhook-endpoint event: Stripe
//! sends them only as the v2 thin event `v1.billing.meter.error_report_triggered` to an *event
//! destination* (https://docs.stripe.com/event-destinations), signed in the same scheme with the
//! destination's own secret. `POST /stripe/events/{project id}` is a project's destination and
//! `POST /stripe/events/connect` the platform's, whose thin events name the connected account in
//! `context` (not `account`). A thin event is checked, stored once by id and acknowledged; a job
//! fetches the full event from Stripe. Each endpoint takes only its own kind of event, checked
//! with its own secret: a thin event at a webhook endpoint, or a snapshot event at a
//! destination, is refused.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;
use tollgate_core::ids::ProjectId;
use tollgate_core::signature::{self, DEFAULT_TOLERANCE_SECS};
use tollgate_core::stripe::{self, EventEnvelope, Intake, ThinEvent};
use tollgate_core::time::UnixMillis;

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/stripe/webhooks/connect", post(receive_connect))
        .route("/stripe/webhooks/{project}", post(receive))
        .route("/stripe/events/connect", post(receive_thin_connect))
        .route("/stripe/events/{project}", post(receive_thin))
}

/// What Stripe's webhook log shows for a refused delivery.
#[derive(Debug, thiserror::Error)]
enum WebhookError {
    #[error("no Stripe connection for this endpoint")]
    UnknownEndpoint,
    #[error("missing Stripe-Signature header")]
    NoSignature,
    #[error("signature check failed: {0}")]
    Signature(signature::SignatureError),
    #[error("the body is not a Stripe event: {0}")]
    NotAnEvent(String),
    #[error("a {0} event sent to a {1} connection")]
    WrongMode(&'static str, &'static str),
    #[error("a v2 thin event sent to a webhook endpoint: thin events go to the event destination (/stripe/events/…)")]
    ThinAtWebhookEndpoint,
    #[error("a snapshot event sent to an event destination: it takes thin events (payload style \"thin\") only")]
    SnapshotAtEventDestination,
    #[error("internal error")]
    Internal,
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        let status = match self {
            WebhookError::UnknownEndpoint => StatusCode::NOT_FOUND,
            WebhookError::Internal => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, axum::Json(json!({ "error": { "message": self.to_string() } }))).into_response()
    }
}

fn mode(live: bool) -> &'static str {
    if live { "live" } else { "test" }
}

async fn receive(
    State(state): State<AppState>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, WebhookError> {
    let project = ProjectId::parse(&project).ok_or(WebhookError::UnknownEndpoint)?;
    let internal = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, %project, "stripe webhook intake failed");
        WebhookError::Internal
    };
    let (secret, livemode) = stripe::webhook_secret(&state.db, &state.master_key, &project)
        .await
        .map_err(|e| internal(&e))?
        .ok_or(WebhookError::UnknownEndpoint)?;
    let header = headers.get("stripe-signature").and_then(|v| v.to_str().ok()).ok_or(WebhookError::NoSignature)?;
    let now = UnixMillis::now().0 / 1000;
    signature::verify(&secret, header, &body, now, DEFAULT_TOLERANCE_SECS).map_err(WebhookError::Signature)?;
    let payload = std::str::from_utf8(&body).map_err(|_| WebhookError::NotAnEvent("not UTF-8".into()))?;
    let event: EventEnvelope = serde_json::from_str(payload).map_err(|e| WebhookError::NotAnEvent(e.to_string()))?;
    if event.is_thin() {
        return Err(WebhookError::ThinAtWebhookEndpoint);
    }
    if event.livemode != livemode {
        return Err(WebhookError::WrongMode(mode(event.livemode), mode(livemode)));
    }
    let intake = stripe::store_event(&state.db, &project, &event, payload).await.map_err(|e| internal(&e))?;
    tracing::info!(%project, event = %event.id, kind = %event.kind, ?intake, "stripe webhook received");
    Ok(acknowledged(intake))
}

async fn receive_connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, WebhookError> {
    use secrecy::ExposeSecret;
    let secret = state.config.stripe_connect_webhook_secret.as_ref().ok_or(WebhookError::UnknownEndpoint)?;
    let header = headers.get("stripe-signature").and_then(|v| v.to_str().ok()).ok_or(WebhookError::NoSignature)?;
    let now = UnixMillis::now().0 / 1000;
    signature::verify(secret.expose_secret(), header, &body, now, DEFAULT_TOLERANCE_SECS)
        .map_err(WebhookError::Signature)?;
    let payload = std::str::from_utf8(&body).map_err(|_| WebhookError::NotAnEvent("not UTF-8".into()))?;
    let event: EventEnvelope = serde_json::from_str(payload).map_err(|e| WebhookError::NotAnEvent(e.to_string()))?;
    if event.is_thin() {
        return Err(WebhookError::ThinAtWebhookEndpoint);
    }
    // The platform's other accounts (and the platform's own events) are none of Tollgate's
    // business: acknowledged, so Stripe does not retry them for days, and not stored.
    let Some(account) = event.account.as_deref() else { return Ok(ignored()) };
    let Some((project, livemode)) = stripe::project_for_account(&state.db, account).await.map_err(|e| {
        tracing::error!(error = %e, "stripe connect webhook intake failed");
        WebhookError::Internal
    })?
    else {
        return Ok(ignored());
    };
    if event.livemode != livemode {
        return Err(WebhookError::WrongMode(mode(event.livemode), mode(livemode)));
    }
    let intake = stripe::store_event(&state.db, &project, &event, payload).await.map_err(|e| {
        tracing::error!(error = %e, %project, "stripe connect webhook intake failed");
        WebhookError::Internal
    })?;
    tracing::info!(%project, account, event = %event.id, kind = %event.kind, ?intake, "stripe connect webhook received");
    Ok(acknowledged(intake))
}

/// The signed body of a thin event: checked with `secret`, then parsed.
fn verified_thin_event<'a>(
    secret: &str,
    headers: &HeaderMap,
    body: &'a Bytes,
) -> Result<(ThinEvent, &'a str), WebhookError> {
    let header = headers.get("stripe-signature").and_then(|v| v.to_str().ok()).ok_or(WebhookError::NoSignature)?;
    let now = UnixMillis::now().0 / 1000;
    signature::verify(secret, header, body, now, DEFAULT_TOLERANCE_SECS).map_err(WebhookError::Signature)?;
    let payload = std::str::from_utf8(body).map_err(|_| WebhookError::NotAnEvent("not UTF-8".into()))?;
    let event: ThinEvent = serde_json::from_str(payload).map_err(|e| WebhookError::NotAnEvent(e.to_string()))?;
    if event.object != stripe::THIN_EVENT_OBJECT {
        return Err(WebhookError::SnapshotAtEventDestination);
    }
    Ok((event, payload))
}

fn acknowledged(intake: Intake) -> Response {
    let duplicate = intake == Intake::AlreadyStored;
    (StatusCode::OK, axum::Json(json!({ "received": true, "duplicate": duplicate }))).into_response()
}

fn ignored() -> Response {
    (StatusCode::OK, axum::Json(json!({ "received": true, "ignored": true }))).into_response()
}

/// A project's event destination: thin events signed with the destination's secret.
async fn receive_thin(
    State(state): State<AppState>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, WebhookError> {
    let project = ProjectId::parse(&project).ok_or(WebhookError::UnknownEndpoint)?;
    let internal = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, %project, "stripe event destination intake failed");
        WebhookError::Internal
    };
    let (secret, livemode) = stripe::event_secret(&state.db, &state.master_key, &project)
        .await
        .map_err(|e| internal(&e))?
        .ok_or(WebhookError::UnknownEndpoint)?;
    let (event, payload) = verified_thin_event(&secret, &headers, &body)?;
    if event.livemode != livemode {
        return Err(WebhookError::WrongMode(mode(event.livemode), mode(livemode)));
    }
    // A destination that also listens to other accounts' events (`context` set): none of this
    // project's business, acknowledged so that Stripe does not retry it for days.
    if event.context.is_some() {
        return Ok(ignored());
    }
    let intake = stripe::store_thin_event(&state.db, &project, &event, payload).await.map_err(|e| internal(&e))?;
    tracing::info!(%project, event = %event.id, kind = %event.kind, ?intake, "stripe thin event received");
    Ok(acknowledged(intake))
}

/// The platform's event destination for connected accounts: each thin event names its account
/// in `context`, and is filed under the project billed through that account.
async fn receive_thin_connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, WebhookError> {
    use secrecy::ExposeSecret;
    let secret = state.config.stripe_connect_event_secret.as_ref().ok_or(WebhookError::UnknownEndpoint)?;
    let (event, payload) = verified_thin_event(secret.expose_secret(), &headers, &body)?;
    let internal = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "stripe connect event destination intake failed");
        WebhookError::Internal
    };
    let Some(account) = event.context.as_deref() else { return Ok(ignored()) };
    let Some((project, livemode)) = stripe::project_for_account(&state.db, account).await.map_err(|e| internal(&e))?
    else {
        return Ok(ignored());
    };
    if event.livemode != livemode {
        return Err(WebhookError::WrongMode(mode(event.livemode), mode(livemode)));
    }
    let intake = stripe::store_thin_event(&state.db, &project, &event, payload).await.map_err(|e| internal(&e))?;
    tracing::info!(%project, account, event = %event.id, kind = %event.kind, ?intake, "stripe connect thin event received");
    Ok(acknowledged(intake))
}

//! Thin events from the event destinations, processed: each stored thin event's full event is
//! fetched from Stripe (`GET /v2/core/events/{id}`, on the account in its `context` for Connect)
//! and applied. A meter error report sends the batches it names back to *failed* (see
//! [`tollgate_core::meter_errors`]). Stripe unreachable or busy: tried again with backoff;
//! refused for good (the event is not on this account): set aside with Stripe's answer.

use tollgate_core::Db;
use tollgate_core::meter_errors::{self, ERROR_REPORT_TRIGGERED, ErrorReportEvent};
use tollgate_core::stripe::{self, PendingThinEvent, ThinOutcome};
use tollgate_core::time::UnixMillis;

use crate::billing::{BillingError, BillingServices};
use crate::stripe_api::StripeApiError;

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ThinReport {
    pub processed: usize,
    pub retrying: usize,
    /// Meter error reports applied, and the batches they sent back to failed.
    pub reports: usize,
    pub batches_failed: u64,
}

/// Backoff for fetching a thin event: 5 s × 2ⁿ, capped at one hour (Stripe keeps events for 30
/// days: https://docs.stripe.com/api/v2/core/events).
fn backoff_ms(attempts: i64) -> i64 {
    (5_000_i64.saturating_mul(1_i64 << attempts.clamp(0, 20))).min(3_600_000)
}

/// Whether `id` can go in a URL path as it is (Stripe's ids are `evt_` and alphanumerics).
fn is_event_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 255 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Fetches and applies the thin events due, up to `limit`.
pub async fn process_thin_events(db: &Db, services: &BillingServices, limit: i64) -> Result<ThinReport, BillingError> {
    let mut report = ThinReport::default();
    for event in stripe::claim_thin_events(db, UnixMillis::now(), limit).await? {
        let outcome = process_one(db, services, &event, &mut report).await?;
        match &outcome {
            ThinOutcome::Done { error: Some(error) } => {
                tracing::warn!(event = %event.id, project = %event.project_id, %error, "stripe thin event set aside");
            }
            ThinOutcome::Retry { error, .. } => {
                report.retrying += 1;
                tracing::info!(event = %event.id, project = %event.project_id, %error, "stripe thin event will be fetched again");
            }
            ThinOutcome::Done { error: None } => {}
        }
        if matches!(outcome, ThinOutcome::Done { .. }) {
            report.processed += 1;
        }
        stripe::record_thin_event(db, &event.project_id, &event.id, &outcome).await?;
    }
    Ok(report)
}

async fn process_one(
    db: &Db,
    services: &BillingServices,
    event: &PendingThinEvent,
    report: &mut ThinReport,
) -> Result<ThinOutcome, BillingError> {
    let done = |error: Option<String>| Ok(ThinOutcome::Done { error });
    if event.kind != ERROR_REPORT_TRIGGERED {
        // Nothing else is acted on (a `v2.core.event_destination.ping`, say).
        return done(None);
    }
    if !is_event_id(&event.id) {
        return done(Some("not a Stripe event id".to_owned()));
    }
    let credentials = match crate::stripe_api::credentials(
        db,
        &services.master_key,
        services.platform_key.as_ref(),
        &event.project_id,
    )
    .await?
    {
        Ok(credentials) => credentials,
        Err(e) => {
            let next_at = UnixMillis::now().0 + backoff_ms(event.attempts);
            return Ok(ThinOutcome::Retry { error: e.to_string(), next_at });
        }
    };
    // The account the event happened on must be the one the project bills: a Connect project's
    // event names it in `context`; a project on its own key gets events without one.
    if credentials.account.as_deref() != event.context.as_deref() {
        return done(Some(format!(
            "the event is for {} but the project bills {}",
            event.context.as_deref().unwrap_or("the key's own account"),
            credentials.account.as_deref().unwrap_or("its key's own account")
        )));
    }
    let full = match services.api.v2_event(&credentials, &event.id).await {
        Ok(full) => full,
        // A key without the permission to read events (401/403) can be fixed by the tenant: the
        // report waits for it rather than being set aside.
        Err(e) if e.is_retryable() || matches!(e, StripeApiError::Api { status: 401 | 403, .. }) => {
            let wait = match &e {
                StripeApiError::Api { retry_after: Some(seconds), .. } => (*seconds as i64).saturating_mul(1000),
                _ => 0,
            };
            let next_at = UnixMillis::now().0 + backoff_ms(event.attempts).max(wait);
            return Ok(ThinOutcome::Retry { error: e.to_string(), next_at });
        }
        Err(e) => return done(Some(e.to_string())),
    };
    let parsed: ErrorReportEvent = match serde_json::from_value(full) {
        Ok(parsed) => parsed,
        Err(e) => return done(Some(format!("Stripe's event could not be read: {e}"))),
    };
    if parsed.id != event.id || parsed.kind != event.kind {
        return done(Some(format!("Stripe answered with another event ({} {})", parsed.id, parsed.kind)));
    }
    let applied = meter_errors::apply_report(db, &event.project_id, &parsed).await?;
    report.reports += 1;
    report.batches_failed += applied.batches_failed;
    if applied.batches_failed > 0 || applied.unidentified_errors > 0 {
        tracing::warn!(project = %event.project_id, event = %event.id, batches_failed = applied.batches_failed,
            unidentified = applied.unidentified_errors, "Stripe reported meter events it accepted and could not count");
    }
    done(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_checked_before_going_in_a_path() {
        assert!(is_event_id("evt_test_65RCjj4EqW1sabcjs2Z16RCMoNQdSQkOWvfL6L5uU2K40u"));
        assert!(!is_event_id("evt_1/../../v1/customers"));
        assert!(!is_event_id(""));
        assert_eq!(backoff_ms(0), 5_000);
        assert_eq!(backoff_ms(30), 3_600_000);
    }
}

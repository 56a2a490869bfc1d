//! Meter errors found after a meter event was accepted, as Stripe reports them: only as the v2
//! thin event `v1.billing.meter.error_report_triggered`, sent to an event destination.
//!
//! - A meter event for a customer the account does not have (never made, or deleted) is
//!   accepted with 200, as Stripe accepts it: "Stripe processes meter events asynchronously …
//!   Stripe creates a `v1.billing.meter.error_report_triggered` event" with the code
//!   `meter_event_customer_not_found`
//!   (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api#handle-meter-event-errors).
//!   It is not counted in the summaries.
//! - `report_meter_errors` (Stripe's validation window closing) makes one event per account and
//!   meter: its data as `GET /v2/core/events/{id}` returns it (stripe-python
//!   `V1BillingMeterErrorReportTriggeredEvent`: `developer_message_summary`, `reason.error_count`,
//!   `reason.error_types[].{code, error_count, sample_errors[].{error_message,
//!   request.identifier}}` — the request's idempotency key — and `validation_start`/`_end`),
//!   at most `set_error_samples` samples per code (Stripe samples; how many is not documented).
//! - The thin event (`object: "v2.core.event"`, `id`, `type`, `created` in RFC 3339, `livemode`,
//!   `context`, `related_object {id, type, url}`; no data:
//!   https://docs.stripe.com/api/v2/core/events/event-types) goes to the account's own
//!   destination with `context: null`, or, for a connected account, to its platform's
//!   destination with the account in `context`, signed in Stripe's `t=…,v1=…` scheme with the
//!   destination's own secret.
//! - `GET /v2/core/events/{id}` answers only on the event's account: the key's own, or the
//!   connected account named in `Stripe-Context` (API v2's header; `Stripe-Account` as in v1 is
//!   taken too). Anyone else gets 404.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

use super::{FakeStripe, Inner, Shared, no_such, now, request};

/// A meter event accepted and then found invalid, waiting for the next report.
#[derive(Debug, Clone)]
pub struct AsyncMeterError {
    pub meter: String,
    pub code: &'static str,
    pub message: String,
    /// The request's idempotency key (the meter event's identifier when it had none).
    pub request_identifier: String,
    pub at: i64,
}

/// How many sampled errors a report carries per code, by default.
pub const ERROR_SAMPLES: usize = 5;

/// The type of the reports.
pub const ERROR_REPORT_TRIGGERED: &str = "v1.billing.meter.error_report_triggered";

/// `2026-11-22T10:15:30.000Z` for a Unix time in seconds (API v2's timestamps).
pub fn rfc3339(seconds: i64) -> String {
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z", rest / 3_600, rest % 3_600 / 60, rest % 60)
}

impl Inner {
    /// The platform account `account` is connected to, if any.
    fn platform_of(&self, account: &str) -> Option<String> {
        self.connected
            .iter()
            .find(|(_, accounts)| accounts.contains(account))
            .and_then(|(key, _)| self.keys.get(key).cloned())
    }
}

impl FakeStripe {
    /// Registers an event destination of `account` (thin payloads): its own events go there, and,
    /// for a platform, its connected accounts' events (with `context`).
    pub fn add_event_destination(&self, account: &str, url: &str, secret: &str) {
        self.inner.lock().unwrap().destinations.insert(account.to_owned(), (url.to_owned(), secret.to_owned()));
    }

    /// How many sampled errors a report carries per code.
    pub fn set_error_samples(&self, n: usize) {
        self.inner.lock().unwrap().error_samples = n;
    }

    /// Meter errors waiting for the next report, on `account`.
    pub fn pending_meter_errors(&self, account: &str) -> Vec<AsyncMeterError> {
        self.inner.lock().unwrap().accounts.get(account).map(|a| a.async_errors.clone()).unwrap_or_default()
    }

    /// The full v2 events made on `account`.
    pub fn v2_events(&self, account: &str) -> Vec<Value> {
        self.inner.lock().unwrap().accounts.get(account).map(|a| a.v2_events.clone()).unwrap_or_default()
    }

    /// Closes the validation window: one report per account and meter with errors, kept for
    /// `GET /v2/core/events/{id}` and sent as a thin event to the account's destination (or its
    /// platform's). Returns each delivery's status and body; an account without a destination
    /// keeps its report unsent, as Stripe keeps events nobody listens to.
    pub async fn report_meter_errors(&self) -> anyhow::Result<Vec<(StatusCode, String)>> {
        let mut deliveries = Vec::new();
        {
            let mut inner = self.inner.lock().unwrap();
            let samples = inner.error_samples;
            let accounts: Vec<String> =
                inner.accounts.iter().filter(|(_, a)| !a.async_errors.is_empty()).map(|(id, _)| id.clone()).collect();
            for account in accounts {
                let (context, destination) = match inner.destinations.get(&account) {
                    Some(own) => (None, Some(own.clone())),
                    None => match inner.platform_of(&account) {
                        Some(platform) => (Some(account.clone()), inner.destinations.get(&platform).cloned()),
                        None => (None, None),
                    },
                };
                let errors = std::mem::take(&mut inner.accounts.entry(account.clone()).or_default().async_errors);
                let mut meters: Vec<String> = errors.iter().map(|e| e.meter.clone()).collect();
                meters.sort();
                meters.dedup();
                for meter in meters {
                    let of_meter: Vec<&AsyncMeterError> = errors.iter().filter(|e| e.meter == meter).collect();
                    let mut codes: Vec<&str> = of_meter.iter().map(|e| e.code).collect();
                    codes.sort_unstable();
                    codes.dedup();
                    let error_types: Vec<Value> = codes
                        .iter()
                        .map(|code| {
                            let of_code: Vec<&&AsyncMeterError> = of_meter.iter().filter(|e| e.code == *code).collect();
                            let sampled: Vec<Value> = of_code
                                .iter()
                                .take(samples)
                                .map(|e| {
                                    json!({"error_message": e.message, "request": {"identifier": e.request_identifier}})
                                })
                                .collect();
                            json!({"code": code, "error_count": of_code.len(), "sample_errors": sampled})
                        })
                        .collect();
                    let count = of_meter.len();
                    let start = of_meter.iter().map(|e| e.at).min().unwrap_or_else(now);
                    let end = of_meter.iter().map(|e| e.at).max().unwrap_or_else(now) + 1;
                    let id = inner.id("evt_test");
                    let created = rfc3339(now());
                    let related =
                        json!({"id": meter, "type": "billing.meter", "url": format!("/v1/billing/meters/{meter}")});
                    let summary = if count == 1 {
                        "There is 1 invalid event".to_owned()
                    } else {
                        format!("There are {count} invalid events")
                    };
                    let full = json!({
                        "id": id, "object": "v2.core.event", "type": ERROR_REPORT_TRIGGERED, "created": created,
                        "livemode": false, "context": context, "reason": null, "changes": null,
                        "related_object": related,
                        "data": {
                            "developer_message_summary": summary,
                            "reason": {"error_count": count, "error_types": error_types},
                            "validation_start": rfc3339(start), "validation_end": rfc3339(end),
                        },
                    });
                    inner.accounts.entry(account.clone()).or_default().v2_events.push(full);
                    let thin = json!({
                        "id": id, "object": "v2.core.event", "type": ERROR_REPORT_TRIGGERED, "created": created,
                        "livemode": false, "context": context, "related_object": related,
                    });
                    if let Some((url, secret)) = &destination {
                        deliveries.push((url.clone(), secret.clone(), thin));
                    }
                }
            }
        }
        let mut answers = Vec::new();
        for (url, secret, thin) in deliveries {
            answers.push(self.send_raw(&url, &secret, &thin).await?);
        }
        Ok(answers)
    }
}

/// `GET /v2/core/events/{id}` on the account acted on (`Stripe-Context`, or `Stripe-Account`).
pub(super) async fn get_v2_event(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    mut headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(context) = headers.get("stripe-context").cloned() {
        headers.insert("stripe-account", context);
    }
    request(&inner, method, &uri, &headers, vec![], |inner, account, _| {
        match inner.accounts.get(account).and_then(|a| a.v2_events.iter().find(|e| e["id"] == id.as_str()).cloned()) {
            Some(event) => (StatusCode::OK, event),
            None => no_such("event", &id),
        }
    })
}

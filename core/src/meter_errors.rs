//! Meter errors Stripe finds after it accepted a meter event: it reports them in the v2 event
//! `v1.billing.meter.error_report_triggered` ("Occurs when a Meter has invalid async usage
//! events", https://docs.stripe.com/api/v2/core/events/event-types), whose data, once fetched
//! from `GET /v2/core/events/{id}`, counts the errors of a validation window per code and
//! samples the failed requests. Each sampled request names Tollgate's `Idempotency-Key`, so the
//! batch it carried goes back to *failed* with Stripe's reason; the report itself is kept and
//! shown, since Stripe samples and some failed usage may be tied to no batch.

use serde::Deserialize;

use crate::db::{Db, DbError};
use crate::ids::ProjectId;
use crate::time::UnixMillis;
use crate::with_db;

/// The full event's fields Tollgate reads (stripe-python
/// `V1BillingMeterErrorReportTriggeredEvent`, stripe-node
/// `V1BillingMeterErrorReportTriggeredEvent.Data`: `developer_message_summary`,
/// `reason.error_count`, `reason.error_types[].{code, error_count, sample_errors[]}`, each
/// sample an `error_message` and the `request.identifier`, "The request idempotency key";
/// `validation_start`/`validation_end`, RFC 3339).
#[derive(Debug, Clone, Deserialize)]
pub struct ErrorReportEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub context: Option<String>,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub related_object: Option<crate::stripe::RelatedObject>,
    pub data: ErrorReportData,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ErrorReportData {
    #[serde(default)]
    pub developer_message_summary: Option<String>,
    pub reason: ErrorReason,
    #[serde(default)]
    pub validation_start: Option<String>,
    #[serde(default)]
    pub validation_end: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ErrorReason {
    #[serde(default)]
    pub error_count: i64,
    #[serde(default)]
    pub error_types: Vec<ErrorType>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ErrorType {
    pub code: String,
    #[serde(default)]
    pub error_count: i64,
    #[serde(default)]
    pub sample_errors: Vec<SampleError>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SampleError {
    #[serde(default)]
    pub error_message: String,
    #[serde(default)]
    pub request: Option<SampleRequest>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SampleRequest {
    #[serde(default)]
    pub identifier: Option<String>,
}

/// The type of the event this module processes.
pub const ERROR_REPORT_TRIGGERED: &str = "v1.billing.meter.error_report_triggered";

/// What applying one report did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportOutcome {
    /// Batches that went back to failed now (0 when the report was applied before).
    pub batches_failed: u64,
    /// Errors the report counts that no sample ties to a batch of the project.
    pub unidentified_errors: i64,
}

/// The batch a sampled request carried: the request's identifier is its `Idempotency-Key`,
/// `{batch id}-{attempt}` (see `tollgate_jobs::billing`); a bare batch id (should Stripe name
/// the meter event's own `identifier`) is taken as it is.
fn candidate_batches(identifier: &str) -> Vec<String> {
    let mut candidates = Vec::with_capacity(2);
    if let Some((batch, attempt)) = identifier.rsplit_once('-')
        && !attempt.is_empty()
        && attempt.bytes().all(|b| b.is_ascii_digit())
    {
        candidates.push(batch.to_owned());
    }
    candidates.push(identifier.to_owned());
    candidates
}

fn rfc3339_ms(text: Option<&str>) -> Option<i64> {
    text.and_then(crate::period::rfc3339_utc_seconds).map(|s| s * 1000)
}

/// "meter_event_customer_not_found ×3, timestamp_too_far_in_past ×1".
pub fn codes_text(types: &[ErrorType]) -> String {
    types.iter().map(|t| format!("{} ×{}", t.code, t.error_count.max(1))).collect::<Vec<_>>().join(", ")
}

/// Applies Stripe's report to `project`: every sampled request that names one of its batches
/// sends that batch back to failed (from delivered, or pending if its answer was lost) with
/// Stripe's code and message; the report is recorded once by event id.
pub async fn apply_report(db: &Db, project: &ProjectId, event: &ErrorReportEvent) -> Result<ReportOutcome, DbError> {
    // Stripe keeps the identifier of an event it accepted, valid or not: sent again, the batch
    // needs one of its own, or Stripe would take it for a duplicate of the failed one.
    const FAIL: &str = "UPDATE meter_batches SET status = 'failed', claimed_until = 0, last_error = $1, \
            stripe_error_code = $2, reported_failed_at = $3, reported_by_event = $4, \
            meter_identifier = id || '.r' || CAST(attempts AS TEXT) \
        WHERE project_id = $5 AND id = $6 AND status IN ('delivered', 'pending')";
    const EXISTS: &str = "SELECT CAST(COUNT(*) AS BIGINT) FROM meter_batches WHERE project_id = $1 AND id = $2";
    const NAMED: &str =
        "SELECT CAST(COUNT(*) AS BIGINT) FROM meter_batches WHERE project_id = $1 AND reported_by_event = $2";
    const REPORT: &str = "INSERT INTO meter_error_reports (project_id, event_id, meter_id, summary, error_count, \
            codes, validation_start, validation_end, batches_failed, created_at) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
        ON CONFLICT (project_id, event_id) DO UPDATE SET batches_failed = excluded.batches_failed";
    let now = UnixMillis::now().0;
    let data = &event.data;
    let mut outcome = ReportOutcome::default();
    let mut identified = 0_i64;
    for error_type in &data.reason.error_types {
        for sample in &error_type.sample_errors {
            let Some(identifier) = sample.request.as_ref().and_then(|r| r.identifier.as_deref()) else { continue };
            let mut found = None;
            for candidate in candidate_batches(identifier) {
                let n: i64 = with_db!(db, pool => sqlx::query_scalar::<_, i64>(EXISTS).bind(project).bind(&candidate)
                    .fetch_one(pool).await)?;
                if n > 0 {
                    found = Some(candidate);
                    break;
                }
            }
            let Some(batch) = found else { continue };
            identified += 1;
            let message: String =
                format!("Stripe reported it after accepting it: {}: {}", error_type.code, sample.error_message)
                    .chars()
                    .take(500)
                    .collect();
            outcome.batches_failed += with_db!(db, pool => sqlx::query(FAIL).bind(&message).bind(&error_type.code)
                .bind(now).bind(&event.id).bind(project).bind(&batch).execute(pool).await.map(|r| r.rows_affected()))?;
        }
    }
    let total = data.reason.error_count.max(data.reason.error_types.iter().map(|t| t.error_count).sum::<i64>());
    outcome.unidentified_errors = (total - identified).max(0);
    let named: i64 =
        with_db!(db, pool => sqlx::query_scalar::<_, i64>(NAMED).bind(project).bind(&event.id).fetch_one(pool).await)?;
    let summary: String = data
        .developer_message_summary
        .clone()
        .unwrap_or_else(|| format!("{total} invalid meter events"))
        .chars()
        .take(500)
        .collect();
    let created = rfc3339_ms(event.created.as_deref()).unwrap_or(now);
    with_db!(db, pool => sqlx::query(REPORT).bind(project).bind(&event.id)
        .bind(event.related_object.as_ref().map(|o| o.id.clone())).bind(&summary).bind(total)
        .bind(codes_text(&data.reason.error_types))
        .bind(rfc3339_ms(data.validation_start.as_deref()).map(|ms| ms / 1000))
        .bind(rfc3339_ms(data.validation_end.as_deref()).map(|ms| ms / 1000))
        .bind(named).bind(created).execute(pool).await.map(|_| ()))?;
    Ok(outcome)
}

/// One report, for the billing page.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReportRow {
    pub event_id: String,
    pub meter_id: Option<String>,
    pub summary: String,
    pub error_count: i64,
    pub codes: String,
    pub validation_start: Option<i64>,
    pub validation_end: Option<i64>,
    pub batches_failed: i64,
    pub created_at: i64,
}

/// The project's latest reports, newest first.
pub async fn reports(db: &Db, project: &ProjectId, limit: i64) -> Result<Vec<ReportRow>, DbError> {
    const SQL: &str = "SELECT event_id, meter_id, summary, error_count, codes, validation_start, validation_end, \
            batches_failed, created_at \
        FROM meter_error_reports WHERE project_id = $1 ORDER BY created_at DESC, event_id DESC LIMIT $2";
    Ok(with_db!(db, pool => sqlx::query_as::<_, ReportRow>(SQL).bind(project).bind(limit).fetch_all(pool).await)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sampled_idempotency_key_names_its_batch() {
        assert_eq!(candidate_batches("mtb_abc-3"), ["mtb_abc", "mtb_abc-3"]);
        // A part of a split batch (`{id}-1`) sent on its second attempt.
        assert_eq!(candidate_batches("mtb_abc-1-2"), ["mtb_abc-1", "mtb_abc-1-2"]);
        assert_eq!(candidate_batches("mtb_abc"), ["mtb_abc"]);
        assert_eq!(candidate_batches("cb447754-6880-45c2-8f2f-ef19b6ce81e9"), ["cb447754-6880-45c2-8f2f-ef19b6ce81e9"]);
    }

    #[test]
    fn stripes_documented_example_parses() {
        // The example of https://docs.stripe.com/api/v2/core/events/object.
        let event: ErrorReportEvent = serde_json::from_str(
            r#"{"id":"evt_test_65R","object":"v2.core.event","context":null,"created":"2024-09-26T17:46:22.134Z",
            "data":{"developer_message_summary":"There is 1 invalid event","reason":{"error_count":1,
            "error_types":[{"code":"meter_event_no_customer_defined","error_count":1,"sample_errors":[
            {"error_message":"Customer mapping key stripe_customer_id not found in payload.",
            "request":{"identifier":"cb447754-6880-45c2-8f2f-ef19b6ce81e9"}}]}]},
            "validation_end":"2024-09-26T17:46:20.000Z","validation_start":"2024-09-26T17:46:10.000Z"},
            "livemode":false,"reason":null,"related_object":{"id":"mtr_test_61R","type":"billing.meter",
            "url":"/v1/billing/meters/mtr_test_61R"},"type":"v1.billing.meter.error_report_triggered"}"#,
        )
        .unwrap();
        assert_eq!(event.data.reason.error_types[0].code, "meter_event_no_customer_defined");
        assert_eq!(codes_text(&event.data.reason.error_types), "meter_event_no_customer_defined ×1");
        assert_eq!(rfc3339_ms(event.data.validation_start.as_deref()), Some(1_727_372_770_000));
    }
}

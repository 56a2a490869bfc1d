//! Sends the one-off invoices tenants asked for (see [`tollgate_core::one_off`]): an invoice
//! item of the usage's amount, an invoice that takes it (`pending_invoice_items_behavior=include`:
//! Stripe's default is to leave pending items out), collected as the project collects its
//! invoices, then finalized so Stripe sends or charges it. Each step is recorded as it
//! succeeds and each has an `Idempotency-Key` derived from the one-off's id, so a retry after
//! a lost answer makes nothing twice.

use tollgate_core::Db;
use tollgate_core::billing::{self, StepFailure};
use tollgate_core::ids::ProjectId;
use tollgate_core::one_off::{self, DueOneOff};
use tollgate_core::payment_collection::{self, Collection};
use tollgate_core::time::UnixMillis;

use crate::billing::{BillingError, BillingServices};
use crate::stripe_api::{Created, Credentials, StripeApi, StripeApiError, form};

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OneOffReport {
    pub sent: usize,
    pub retrying: usize,
    pub failed: usize,
}

/// Sends the one-offs due now.
pub async fn send(db: &Db, services: &BillingServices) -> Result<OneOffReport, BillingError> {
    let mut report = OneOffReport::default();
    for one in one_off::claim_due(db, UnixMillis::now(), 20).await? {
        let outcome = match credentials(db, services, &one.project_id).await? {
            Ok(credentials) => send_one(db, &services.api, &credentials, &one).await?,
            Err(message) => Err(StepFailure { message, retry_in_ms: None }),
        };
        match outcome {
            Ok(()) => {
                one_off::record_sent(db, &one.id).await?;
                report.sent += 1;
            }
            Err(failure) => {
                if failure.retry_in_ms.is_some() {
                    report.retrying += 1;
                } else {
                    report.failed += 1;
                }
                tracing::warn!(one_off = %one.id, error = %failure.message, "one-off invoice not sent");
                one_off::record_failure(db, &one.id, &failure.message, failure.retry_in_ms).await?;
            }
        }
    }
    Ok(report)
}

async fn credentials(
    db: &Db,
    services: &BillingServices,
    project: &ProjectId,
) -> Result<Result<Credentials, String>, BillingError> {
    let found =
        crate::stripe_api::credentials(db, &services.master_key, services.platform_key.as_ref(), project).await?;
    Ok(found.map_err(|e| e.to_string()))
}

fn failure(what: &str, error: &StripeApiError, attempts: i64) -> StepFailure {
    StepFailure {
        message: format!("{what}: {error}"),
        retry_in_ms: error.is_retryable().then(|| billing::provision_backoff_ms(attempts)),
    }
}

async fn send_one(
    db: &Db,
    api: &StripeApi,
    credentials: &Credentials,
    one: &DueOneOff,
) -> Result<Result<(), StepFailure>, BillingError> {
    let key = |step: &str| format!("tollgate-{step}-{}", one.id);
    if one.stripe_invoice_item_id.is_none() {
        let description = format!(
            "LLM usage not on a subscription invoice: {} calls, {} to {} (UTC)",
            one.events,
            date(one.first_at),
            date(one.last_at)
        );
        let body = form([
            ("customer", one.stripe_customer_id.clone()),
            ("currency", one.currency.clone()),
            ("amount", one.amount_minor.to_string()),
            ("description", description),
            ("metadata[tollgate_one_off]", one.id.to_string()),
            ("metadata[tollgate_project]", one.project_id.to_string()),
        ]);
        match api.post::<Created>(credentials, "/invoiceitems", &body, &key("invoice-item")).await {
            Ok(item) => one_off::record_item(db, &one.id, &item.id).await?,
            Err(e) => return Ok(Err(failure("creating the invoice item", &e, one.attempts))),
        }
    }
    let invoice = match &one.stripe_invoice_id {
        Some(invoice) => invoice.clone(),
        None => {
            let mut body = form([
                ("customer", one.stripe_customer_id.clone()),
                ("currency", one.currency.clone()),
                ("pending_invoice_items_behavior", "include".to_owned()),
                ("auto_advance", "true".to_owned()),
                ("metadata[tollgate_one_off]", one.id.to_string()),
                ("metadata[tollgate_project]", one.project_id.to_string()),
            ]);
            let collection = payment_collection::collection(db, &one.project_id).await?;
            body.push(("collection_method".to_owned(), collection.method().to_owned()));
            if let Collection::SendInvoice { days_until_due } = collection {
                body.push(("days_until_due".to_owned(), days_until_due.to_string()));
            }
            match api.post::<Created>(credentials, "/invoices", &body, &key("invoice")).await {
                Ok(invoice) => {
                    one_off::record_invoice(db, &one.id, &invoice.id).await?;
                    invoice.id
                }
                Err(e) => return Ok(Err(failure("creating the invoice", &e, one.attempts))),
            }
        }
    };
    let path = format!("/invoices/{invoice}/finalize");
    match api.post::<Created>(credentials, &path, &[], &key("finalize")).await {
        Ok(_) => Ok(Ok(())),
        Err(e) => Ok(Err(failure("finalizing the invoice", &e, one.attempts))),
    }
}

fn date(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| t.format(&time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]")).ok())
        .unwrap_or_default()
}

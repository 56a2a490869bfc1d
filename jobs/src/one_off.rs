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

use std::collections::HashMap;

use stripe_billing::invoice::{
    CreateInvoice, CreateInvoiceAutomaticTax, CreateInvoicePendingInvoiceItemsBehavior, FinalizeInvoiceInvoice,
};
use stripe_billing::invoice_item::CreateInvoiceItem;
use stripe_shared::InvoiceCollectionMethod;

use crate::billing::{BillingError, BillingServices};
use crate::stripe_api::{Credentials, StripeApi, StripeApiError};

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
    let stripe = api.on(credentials);
    let key = |step: &str| format!("tollgate-{step}-{}", one.id);
    let metadata = || {
        HashMap::from([
            ("tollgate_one_off".to_owned(), one.id.to_string()),
            ("tollgate_project".to_owned(), one.project_id.to_string()),
        ])
    };
    let currency = match one.currency.parse::<stripe_types::Currency>() {
        Ok(currency) => currency,
        Err(_) => {
            return Ok(Err(StepFailure { message: format!("unknown currency {}", one.currency), retry_in_ms: None }));
        }
    };
    if one.stripe_invoice_item_id.is_none() {
        let description = format!(
            "LLM usage not on a subscription invoice: {} calls, {} to {} (UTC)",
            one.events,
            date(one.first_at),
            date(one.last_at)
        );
        let create = CreateInvoiceItem::new()
            .customer(one.stripe_customer_id.clone())
            .currency(currency.clone())
            .amount(one.amount_minor)
            .description(description)
            .metadata(metadata());
        match stripe.send_idempotent(&create, &key("invoice-item")).await {
            Ok(item) => one_off::record_item(db, &one.id, item.id.as_str()).await?,
            Err(e) => return Ok(Err(failure("creating the invoice item", &e, one.attempts))),
        }
    }
    let invoice = match &one.stripe_invoice_id {
        Some(invoice) => invoice.clone(),
        None => {
            let mut create = CreateInvoice::new()
                .customer(one.stripe_customer_id.clone())
                .currency(currency)
                .pending_invoice_items_behavior(CreateInvoicePendingInvoiceItemsBehavior::Include)
                .auto_advance(true)
                .metadata(metadata());
            create = match payment_collection::collection(db, &one.project_id).await? {
                Collection::SendInvoice { days_until_due } => {
                    let create = create.collection_method(InvoiceCollectionMethod::SendInvoice);
                    match u32::try_from(days_until_due) {
                        Ok(days) => create.days_until_due(days),
                        Err(_) => create,
                    }
                }
                Collection::ChargeAutomatically => {
                    create.collection_method(InvoiceCollectionMethod::ChargeAutomatically)
                }
            };
            if payment_collection::automatic_tax(db, &one.project_id).await? {
                create = create.automatic_tax(CreateInvoiceAutomaticTax::new(true));
            }
            match stripe.send_idempotent(&create, &key("invoice")).await {
                Ok(invoice) => {
                    let id = invoice.id.map(|id| id.to_string()).unwrap_or_default();
                    one_off::record_invoice(db, &one.id, &id).await?;
                    id
                }
                Err(e) => return Ok(Err(failure("creating the invoice", &e, one.attempts))),
            }
        }
    };
    match stripe.send_idempotent(&FinalizeInvoiceInvoice::new(invoice.as_str()), &key("finalize")).await {
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

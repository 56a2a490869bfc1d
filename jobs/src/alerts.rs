//! Budget alerts on the slow path. Every few seconds each worker process scans for alerts due
//! ([`tollgate_core::alerts::scan`]) and queues one [`AlertDelivery`] job per delivery it
//! made. The job claims its delivery for one attempt, sends it (a signed webhook, or mail),
//! records the outcome, and on failure queues the next attempt after a growing wait (10 s,
//! 40 s, 160 s, … capped at 6 h; ten attempts in all). The queue keeps those waits, so they
//! survive restarts. A delivery whose job was lost (a worker killed mid-attempt) is found
//! overdue by the scan and queued again; the claim makes sure only one copy sends.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tollgate_core::alerts::{self, AttemptOutcome, Delivery, NextStep};
use tollgate_core::crypto::{MasterKey, SealedFor};
use tollgate_core::egress::{Egress, EgressPolicy, Refused};
use tollgate_core::ids::DeliveryId;
use tollgate_core::time::UnixMillis;
use tollgate_core::{Config, Db};

use crate::mail::Mailer;
use crate::store::JobStore;

/// One attempt at one delivery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AlertDelivery {
    pub delivery: DeliveryId,
    /// Attempts made before this one (the claim checks it).
    pub attempts: i64,
}

/// What sending alerts needs besides the database.
#[derive(Clone)]
pub struct AlertServices {
    pub master_key: MasterKey,
    pub mailer: Arc<Mailer>,
    pub retry_base: Duration,
    /// Webhooks go only where the egress policy allows (see [`tollgate_core::egress`]).
    pub webhooks: Egress,
}

impl AlertServices {
    /// Needs a rustls crypto provider installed (for the webhooks' client).
    pub fn new(config: &Config, master_key: MasterKey, mailer: Arc<Mailer>) -> Result<Self, reqwest::Error> {
        let mut allow = config.egress_allow.clone();
        if config.webhooks_allow_private {
            tracing::warn!(
                "TOLLGATE_WEBHOOKS_ALLOW_PRIVATE is deprecated: alert webhooks may call any address; \
                 list the private destinations allowed in TOLLGATE_EGRESS_ALLOW instead"
            );
            allow = allow.with_every_address();
        }
        let webhooks = Egress::new(EgressPolicy::new(allow), |client| {
            client.timeout(WEBHOOK_TIMEOUT).connect_timeout(Duration::from_secs(5))
        })?;
        Ok(Self { master_key, mailer, retry_base: config.alert_retry_base, webhooks })
    }
}

/// A scheduled push older than this is taken as lost and queued again.
const OVERDUE_SLACK_SECS: i64 = 30;
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// One scan: records the alerts due and queues their deliveries, and queues again those
/// whose job was lost.
pub async fn scan_and_queue(db: &Db, store: &JobStore) -> Result<alerts::ScanReport, anyhow::Error> {
    let now = UnixMillis::now();
    let report = alerts::scan(db, now).await?;
    for delivery in &report.deliveries {
        store.push_alert_delivery(AlertDelivery { delivery: delivery.clone(), attempts: 0 }, None, None).await?;
    }
    let minute = now.0 / 60_000;
    for (delivery, attempts) in alerts::overdue(db, now, OVERDUE_SLACK_SECS).await? {
        tracing::info!(%delivery, attempts, "alert delivery overdue: queueing it again");
        let key = format!("alert-delivery:{delivery}:{attempts}:sweep:{minute}");
        store.push_alert_delivery(AlertDelivery { delivery, attempts }, None, Some(key)).await?;
    }
    Ok(report)
}

/// Runs one attempt of `job`; queues the next one if it failed and may be retried.
pub async fn deliver(db: &Db, store: &JobStore, services: &AlertServices, job: &AlertDelivery) -> anyhow::Result<()> {
    let Some(delivery) = alerts::claim(db, &job.delivery, job.attempts, UnixMillis::now()).await? else {
        // Delivered, given up, or another copy of this attempt got it first.
        return Ok(());
    };
    let outcome = match delivery.channel.as_str() {
        "webhook" => send_webhook(services, &delivery).await,
        _ => send_mail(services, &delivery).await,
    };
    match &outcome {
        AttemptOutcome::Delivered { status } => {
            tracing::info!(delivery = %delivery.id, channel = %delivery.channel, ?status, "alert delivered")
        }
        AttemptOutcome::Failed { status, error } => {
            tracing::warn!(delivery = %delivery.id, channel = %delivery.channel, ?status, %error, "alert delivery failed")
        }
    }
    let base = services.retry_base.as_secs().max(1);
    match alerts::record_attempt(db, &delivery, &outcome, base, UnixMillis::now()).await? {
        NextStep::RetryIn { secs, attempts } => {
            let next = AlertDelivery { delivery: delivery.id.clone(), attempts };
            store.push_alert_delivery(next, Some(Duration::from_secs(secs)), None).await?;
        }
        NextStep::GaveUp => {
            tracing::error!(delivery = %delivery.id, attempts = alerts::MAX_ATTEMPTS, "alert delivery given up")
        }
        NextStep::Done => {}
    }
    Ok(())
}

async fn send_mail(services: &AlertServices, delivery: &Delivery) -> AttemptOutcome {
    let subject = format!("Tollgate budget alert: {}", delivery.summary());
    let body = format!(
        "{}.\n\nCustomer: {}\nProject: {}\nSpent: {}\nBudget: {}\nAlert id: {}\n",
        delivery.summary(),
        delivery.customer_external_id,
        delivery.project_name,
        tollgate_core::currency::exact(delivery.spent, &delivery.currency),
        tollgate_core::currency::exact(delivery.budget, &delivery.currency),
        delivery.alert,
    );
    match services.mailer.deliver(&delivery.target, &subject, body).await {
        Ok(()) => AttemptOutcome::Delivered { status: None },
        Err(error) => AttemptOutcome::Failed { status: None, error },
    }
}

async fn send_webhook(services: &AlertServices, delivery: &Delivery) -> AttemptOutcome {
    let failed = |status: Option<u16>, error: String| AttemptOutcome::Failed { status, error };
    let Some(sealed) = &delivery.webhook_secret_sealed else {
        return failed(None, "the project has no alert settings any more".to_owned());
    };
    let Ok(secret) = services.master_key.open(sealed, &SealedFor::alert_webhook_secret(&delivery.project_id)) else {
        return failed(None, "the webhook secret cannot be decrypted with this master key".to_owned());
    };
    let url = match reqwest::Url::parse(&delivery.target) {
        Ok(url) => url,
        Err(e) => return failed(None, format!("invalid webhook URL: {e}")),
    };
    let request = match services.webhooks.post(url) {
        Ok(request) => request,
        Err(refused) => return failed(None, refused.to_string()),
    };
    let body = delivery.payload().to_string();
    let timestamp = UnixMillis::now().0 / 1000;
    let signature = alerts::sign(&secret, timestamp, body.as_bytes());
    let sent = request
        .header("content-type", "application/json")
        .header("user-agent", concat!("Tollgate-Webhooks/", env!("CARGO_PKG_VERSION")))
        .header(alerts::SIGNATURE_HEADER, signature)
        .header("Tollgate-Event-Id", delivery.alert.as_str())
        .header("Tollgate-Delivery-Attempt", (delivery.attempts + 1).to_string())
        .body(body)
        .send()
        .await;
    match sent {
        Ok(response) if response.status().is_success() => {
            AttemptOutcome::Delivered { status: Some(response.status().as_u16()) }
        }
        Ok(response) => {
            let status = response.status().as_u16();
            failed(Some(status), format!("the receiver answered {status}"))
        }
        Err(e) => match Refused::find(&e) {
            Some(refused) => failed(None, refused.to_string()),
            None if e.is_timeout() => failed(None, format!("no answer within {} s", WEBHOOK_TIMEOUT.as_secs())),
            None => failed(None, format!("could not reach the receiver: {}", error_chain(&e))),
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

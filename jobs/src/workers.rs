//! The workers of one process: a heartbeat every 15 seconds, a per-minute scheduler that
//! queues housekeeping, the housekeeping queue's consumer, the alert scan every 5 seconds,
//! the alert deliveries' consumer, and the processing of Stripe's webhook events every 2 seconds. They run until shutdown
//! is requested, then get `grace` to finish what they hold.

use std::str::FromStr;
use std::time::Duration;

use apalis::prelude::{BackendExt, BoxDynError, Data, Event, Monitor, WorkerBuilder, WorkerBuilderExt, WorkerContext};
use apalis_cron::{CronScheduler, Tick};
use tokio_util::sync::CancellationToken;
use tollgate_core::Db;
use tollgate_core::time::UnixMillis;

use crate::alerts::{self, AlertDelivery, AlertServices};
use crate::billing::{self, BillingServices};
use crate::housekeeping::{self, Housekeeping};
use crate::store::JobStore;

/// How this process runs its workers.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Unique per process (several replicas share one queue): appears in worker names.
    pub process_name: String,
    /// How often an idle queue consumer looks for new jobs.
    pub poll_interval: Duration,
    /// How long in-flight jobs may run on after shutdown is requested.
    pub grace: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            // pid alone repeats across restarts of containers; a random tail keeps names unique.
            process_name: format!("{}-{}-{:04x}", hostname(), std::process::id(), rand_tail()),
            poll_interval: Duration::from_millis(500),
            grace: Duration::from_secs(30),
        }
    }
}

fn rand_tail() -> u16 {
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    u16::from_be_bytes([bytes[0], bytes[1]])
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tollgate".to_owned())
}

#[derive(Clone)]
struct JobContext {
    db: Db,
    store: JobStore,
    process_name: String,
    alerts: AlertServices,
    billing: BillingServices,
}

/// Alert deliveries run side by side (each waits on a receiver up to 10 s).
const ALERT_CONCURRENCY: usize = 8;

/// Runs this process's workers until `shutdown` is cancelled.
pub async fn run_workers(
    db: Db,
    store: JobStore,
    alert_services: AlertServices,
    billing_services: BillingServices,
    options: WorkerOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let reconcile_every = reconcile_schedule(billing_services.reconcile_interval)?;
    let ctx = JobContext {
        db,
        store: store.clone(),
        process_name: options.process_name.clone(),
        alerts: alert_services,
        billing: billing_services,
    };
    // Beat once before the first tick so the process shows as alive immediately.
    if let Err(e) = housekeeping::beat(&ctx.db, &ctx.process_name).await {
        tracing::warn!(error = %e, "could not record worker heartbeat");
    }

    let every_15s = cron::Schedule::from_str("*/15 * * * * *")?;
    let every_minute = cron::Schedule::from_str("0 * * * * *")?;
    let every_5s = cron::Schedule::from_str("*/5 * * * * *")?;
    let process_name = options.process_name.clone();
    let name = move |base: &str, restarts: usize| format!("{base}@{process_name}#{restarts}");

    let monitor =
        Monitor::new().on_event(record_job_event).shutdown_timeout(options.grace).should_restart(|worker, error| {
            tracing::warn!(worker = %worker.name(), %error, "worker stopped; restarting it");
            true
        });

    let heartbeat_ctx = ctx.clone();
    let scheduler_ctx = ctx.clone();
    let scan_ctx = ctx.clone();
    let stripe_ctx = ctx.clone();
    let billing_ctx = ctx.clone();
    let reconcile_ctx = ctx.clone();
    let every_2s = cron::Schedule::from_str("*/2 * * * * *")?;
    let billing_every = every_2s.clone();
    let monitor = monitor
        .register({
            let name = name.clone();
            move |restarts| {
                WorkerBuilder::new(name("heartbeat", restarts))
                    .backend(CronScheduler::new(every_15s.clone()))
                    .data(heartbeat_ctx.clone())
                    .catch_panic()
                    .build(heartbeat_tick)
            }
        })
        .register({
            let name = name.clone();
            move |restarts| {
                WorkerBuilder::new(name("housekeeping-scheduler", restarts))
                    .backend(CronScheduler::new(every_minute.clone()))
                    .data(scheduler_ctx.clone())
                    .catch_panic()
                    .build(schedule_housekeeping)
            }
        })
        .register({
            let name = name.clone();
            move |restarts| {
                WorkerBuilder::new(name("alert-scan", restarts))
                    .backend(CronScheduler::new(every_5s.clone()))
                    .data(scan_ctx.clone())
                    .catch_panic()
                    .build(scan_alerts)
            }
        })
        .register({
            let name = name.clone();
            move |restarts| {
                WorkerBuilder::new(name("stripe-events", restarts))
                    .backend(CronScheduler::new(every_2s.clone()))
                    .data(stripe_ctx.clone())
                    .catch_panic()
                    .build(process_stripe_events)
            }
        })
        .register({
            let name = name.clone();
            move |restarts| {
                WorkerBuilder::new(name("stripe-billing", restarts))
                    .backend(CronScheduler::new(billing_every.clone()))
                    .data(billing_ctx.clone())
                    .catch_panic()
                    .build(run_billing)
            }
        })
        .register({
            let name = name.clone();
            move |restarts| {
                WorkerBuilder::new(name("stripe-reconcile", restarts))
                    .backend(CronScheduler::new(reconcile_every.clone()))
                    .data(reconcile_ctx.clone())
                    .catch_panic()
                    .build(run_reconcile)
            }
        });
    let poll = options.poll_interval;
    // The same consumers on either backend (their storage types differ).
    macro_rules! consumers {
        ($monitor:expr, $housekeeping:expr, $alerts:expr) => {{
            let (housekeeping, alerts) = ($housekeeping, $alerts);
            let (housekeeping_ctx, alerts_ctx) = (ctx.clone(), ctx.clone());
            let alerts_name = name.clone();
            $monitor
                .register(move |restarts| {
                    WorkerBuilder::new(name("housekeeping", restarts))
                        .backend(housekeeping.clone().poll_with_interval(poll))
                        .data(housekeeping_ctx.clone())
                        .catch_panic()
                        .concurrency(1)
                        .build(run_housekeeping)
                })
                .register(move |restarts| {
                    WorkerBuilder::new(alerts_name("alert-delivery", restarts))
                        .backend(alerts.clone().poll_with_interval(poll))
                        .data(alerts_ctx.clone())
                        .catch_panic()
                        .concurrency(ALERT_CONCURRENCY)
                        .build(deliver_alert)
                })
        }};
    }
    let monitor = match store {
        JobStore::Sqlite { housekeeping, alerts, .. } => consumers!(monitor, housekeeping, alerts),
        JobStore::Postgres { housekeeping, alerts, .. } => consumers!(monitor, housekeeping, alerts),
    };
    monitor
        .run_with_signal(async move {
            shutdown.cancelled().await;
            Ok(())
        })
        .await?;
    tracing::info!("job workers stopped");
    Ok(())
}

/// Counts finished jobs per worker kind for `/metrics` (`tollgate_jobs_total`).
fn record_job_event(worker: &WorkerContext, event: &Event) {
    let kind = worker.name().split('@').next().unwrap_or("unknown").to_owned();
    match event {
        Event::Success(_) => {
            metrics::counter!("tollgate_jobs_total", "job" => kind, "outcome" => "success").increment(1)
        }
        Event::Error(error) => {
            tracing::warn!(job = %kind, %error, "job failed");
            metrics::counter!("tollgate_jobs_total", "job" => kind, "outcome" => "failure").increment(1)
        }
        _ => {}
    }
}

async fn heartbeat_tick(_tick: Tick, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    housekeeping::beat(&ctx.db, &ctx.process_name).await?;
    Ok(())
}

async fn schedule_housekeeping(_tick: Tick, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    let now = UnixMillis::now().0;
    let minute = now - now.rem_euclid(60_000);
    ctx.store.push_housekeeping(Housekeeping { scheduled_for: minute }, Some(format!("housekeeping:{minute}"))).await?;
    Ok(())
}

async fn scan_alerts(_tick: Tick, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    let report = alerts::scan_and_queue(&ctx.db, &ctx.store).await.map_err(|e| e.to_string())?;
    if report.alerts_fired > 0 {
        metrics::counter!("tollgate_alerts_fired_total").increment(report.alerts_fired as u64);
    }
    Ok(())
}

/// Stripe's webhook events, stored on arrival, processed in the order they arrived (their
/// effect does not depend on it: see `tollgate_core::stripe`), then the thin events of the
/// event destinations (see [`crate::meter_errors`]).
async fn process_stripe_events(_tick: Tick, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    let processed = tollgate_core::stripe::process_pending(&ctx.db, 200).await.map_err(|e| e.to_string())?;
    if !processed.is_empty() {
        metrics::counter!("tollgate_stripe_events_processed_total").increment(processed.len() as u64);
    }
    // Thin events: the full event is fetched from Stripe first.
    let thin = crate::meter_errors::process_thin_events(&ctx.db, &ctx.billing, 50).await.map_err(|e| e.to_string())?;
    if thin.processed > 0 {
        metrics::counter!("tollgate_stripe_events_processed_total").increment(thin.processed as u64);
    }
    if thin.reports > 0 {
        metrics::counter!("tollgate_stripe_meter_error_reports_total").increment(thin.reports as u64);
    }
    if thin.batches_failed > 0 {
        metrics::counter!("tollgate_meter_events_total", "outcome" => "reported_failed").increment(thin.batches_failed);
    }
    Ok(())
}

/// Provisioning, then the meter event outbox (see [`crate::billing`]), then the one-off
/// invoices tenants asked for ([`crate::one_off`]).
async fn run_billing(_tick: Tick, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    let provisioned = billing::provision(&ctx.db, &ctx.billing).await.map_err(|e| e.to_string())?;
    let delivered = billing::deliver(&ctx.db, &ctx.billing).await.map_err(|e| e.to_string())?;
    let one_offs = crate::one_off::send(&ctx.db, &ctx.billing).await.map_err(|e| e.to_string())?;
    metrics::counter!("tollgate_one_off_invoices_total", "outcome" => "sent").increment(one_offs.sent as u64);
    metrics::counter!("tollgate_one_off_invoices_total", "outcome" => "failed").increment(one_offs.failed as u64);
    crate::saved_payment_methods::make_defaults(&ctx.db, &ctx.billing).await.map_err(|e| e.to_string())?;
    metrics::counter!("tollgate_meter_events_total", "outcome" => "delivered").increment(delivered.delivered as u64);
    metrics::counter!("tollgate_meter_events_total", "outcome" => "retrying").increment(delivered.retrying as u64);
    metrics::counter!("tollgate_meter_events_total", "outcome" => "failed").increment(delivered.failed as u64);
    if provisioned.failures > 0 {
        metrics::counter!("tollgate_stripe_provisioning_failures_total").increment(provisioned.failures as u64);
    }
    Ok(())
}

async fn run_reconcile(_tick: Tick, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    billing::reconcile(&ctx.db, &ctx.billing).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// A cron schedule for "every `interval`" (whole seconds under a minute, else whole minutes).
fn reconcile_schedule(interval: Duration) -> anyhow::Result<cron::Schedule> {
    let seconds = interval.as_secs().max(1);
    let expression =
        if seconds < 60 { format!("*/{seconds} * * * * *") } else { format!("0 */{} * * * *", (seconds / 60).min(59)) };
    Ok(cron::Schedule::from_str(&expression)?)
}

async fn deliver_alert(job: AlertDelivery, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    alerts::deliver(&ctx.db, &ctx.store, &ctx.alerts, &job).await.map_err(|e| e.to_string())?;
    Ok(())
}

async fn run_housekeeping(job: Housekeeping, ctx: Data<JobContext>) -> Result<(), BoxDynError> {
    let report = housekeeping::run(&ctx.db, UnixMillis::now()).await?;
    tracing::debug!(scheduled_for = job.scheduled_for, ?report, "housekeeping done");
    Ok(())
}

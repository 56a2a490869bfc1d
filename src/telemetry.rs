//! Logs (`tracing`, human or JSON, to stderr) and the process-wide metrics recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tollgate_core::config::LogFormat;
use tollgate_core::ledger;
use tracing_subscriber::EnvFilter;

/// Installs the log subscriber once for the process. Later calls are ignored, so tests
/// that start many apps in one process can call it freely.
pub fn init_logs(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}

/// Latency buckets (seconds) fine enough to see sub-millisecond overhead.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// How often the recorder folds the samples recorded since into its histograms. It keeps each
/// sample until then (there is no upkeep of its own with `build_recorder`), so without this a
/// process nobody scrapes would hold every timing it ever took.
pub const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The process-wide Prometheus recorder, installed on first use, with a thread that does its
/// upkeep every [`UPKEEP_EVERY`].
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = match builder.set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
            {
                Ok(b) => b,
                Err(_) => PrometheusBuilder::new(),
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new().name("metrics-upkeep".to_owned()).spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the metrics upkeep; samples are folded in at each scrape only");
            }
            metrics::describe_counter!(
                "tollgate_http_requests_total",
                "HTTP requests answered, by method, route and status"
            );
            metrics::describe_histogram!(
                "tollgate_http_request_duration_seconds",
                "Time to answer an HTTP request (headers), by route"
            );
            metrics::describe_counter!("tollgate_jobs_total", "Background jobs finished, by job and outcome");
            metrics::describe_counter!(
                "tollgate_stripe_meter_error_reports_total",
                "Meter error reports Stripe sent (v1.billing.meter.error_report_triggered), applied"
            );
            metrics::describe_histogram!(
                ledger::LEDGER_SECONDS,
                "A ledger operation's wait on the proxy's path (queue, batch, commit), by op: reserve, settle, customer"
            );
            metrics::describe_histogram!(
                ledger::COMMIT_SECONDS,
                "One ledger batch's transaction, first statement to commit"
            );
            metrics::describe_histogram!(ledger::BATCH_OPERATIONS, "Ledger operations per batch (one commit)");
            metrics::describe_counter!(
                ledger::HOLDS_TOTAL,
                "Proxied calls' holds, by how: carved from a lease, taking a lease, alone, or waited for a lease"
            );
            metrics::describe_gauge!(
                "tollgate_cache_entries",
                "Entries an in-memory cache holds now, by cache (see tollgate::memory)"
            );
            metrics::describe_gauge!("tollgate_cache_capacity", "The most entries an in-memory cache holds, by cache");
            metrics::describe_gauge!(
                "tollgate_lease_table_entries",
                "What the ledger keeps in memory about calls in flight: customers, leases, calls, ended calls"
            );
            metrics::describe_gauge!(
                "tollgate_worker_heartbeat_age_seconds",
                "Seconds since any job worker last reported alive"
            );
            handle
        })
        .clone()
}

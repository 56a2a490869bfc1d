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

/// The process-wide Prometheus recorder, installed on first use.
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
            metrics::describe_gauge!(
                "tollgate_worker_heartbeat_age_seconds",
                "Seconds since any job worker last reported alive"
            );
            handle
        })
        .clone()
}

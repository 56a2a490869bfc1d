//! What every request handler can reach.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tollgate_core::crypto::MasterKey;
use tollgate_core::ledger::Ledger;
use tollgate_core::{Config, Db};
use tollgate_jobs::JobStore;

use crate::routes::api::limits::RateLimiter;
use crate::routes::proxy::auth::KeyCache;
use crate::routes::proxy::cache::ProxyCache;
use crate::routes::proxy::offload::Offload;
use crate::shutdown::InFlight;
use tollgate_jobs::mail::Mailer;

/// Shared, cheaply cloned application state.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    pub jobs: JobStore,
    pub master_key: MasterKey,
    pub metrics: PrometheusHandle,
    /// Pooled connections to the operator's own destinations (Stripe).
    pub http: reqwest::Client,
    /// Pooled connections to the providers: tenant-chosen destinations, so only where the
    /// egress policy allows.
    pub egress: tollgate_core::egress::Egress,
    /// Project keys recently looked up by the proxy.
    pub keys: Arc<KeyCache>,
    /// Project configurations and customers recently read by the proxy.
    pub proxy_cache: Arc<ProxyCache>,
    /// Reservations and settlements, applied in batches (group commit).
    pub ledger: Ledger,
    /// Outgoing mail.
    pub mailer: Arc<Mailer>,
    /// Stripe's API.
    pub stripe: tollgate_jobs::stripe_api::StripeApi,
    /// Per-key rate limits of the management API.
    pub api_limits: Arc<RateLimiter>,
    /// The proxy's CPU work on large inputs, off the async threads and bounded.
    pub offload: Arc<Offload>,
    /// The proxied calls in flight, for shutdown to wait for and cut.
    pub in_flight: InFlight,
}

//! What this process keeps in memory that could grow with the traffic it serves, the bound of
//! each, and its size in `/metrics`. Memory must plateau: every structure below is bounded by
//! a setting, by the calls in flight, or by a fixed set.
//!
//! | structure | grows with | bound | gauge |
//! | --- | --- | --- | --- |
//! | key cache ([`KeyCache`]) | keys presented (live, revoked, unknown) | `cache_max_keys`, 2 s TTL | `tollgate_cache_entries{cache="keys"}` |
//! | keys' last use | keys used | `cache_max_keys`, 60 s TTL | `{cache="key_last_used"}` |
//! | project configurations ([`ProxyCache`]) | projects called | `cache_max_projects`, 2 s TTL | `{cache="project_configs"}` |
//! | customers ([`ProxyCache`]) | customers called, across projects | `cache_max_customers`, 2 s TTL | `{cache="customers"}` |
//! | management API buckets ([`RateLimiter`]) | API keys | `api_rate_max_keys`; full buckets dropped | `{cache="api_rate_buckets"}` |
//! | Stripe delivery pace (`tollgate_jobs::billing::Pacer`) | projects billed | only projects waiting for a turn or paused | `{cache="stripe_pacer"}` |
//! | lease table (`tollgate_core::ledger::lease`) | customers with calls in flight | the calls in flight: empty at rest | `tollgate_lease_table_entries{entries=…}` |
//! | histogram samples of the metrics recorder | every timed call | drained every [`UPKEEP_EVERY`](crate::telemetry::UPKEEP_EVERY) (5 s) | — |
//! | metric label sets | routes, statuses, methods, jobs | fixed sets: route templates, never paths; unknown methods as `OTHER`; no customer, key or model | — |
//!
//! Bounded elsewhere: the ledger's queues (`QUEUE` operations per writer, then callers wait),
//! the proxy's blocking jobs (one per core), the database pools and their statement caches
//! (fixed statements), provider connections (idle ones closed after 90 s). Idempotency keys,
//! attempt counters (throttles) and sessions live in the database, not in memory.
//!
//! A cache's capacity is reported as `tollgate_cache_capacity{cache=…}`. An evicted entry is
//! read again from the database when next needed, so eviction never changes an answer.
//!
//! [`KeyCache`]: crate::routes::proxy::auth::KeyCache
//! [`ProxyCache`]: crate::routes::proxy::cache::ProxyCache
//! [`RateLimiter`]: crate::routes::api::limits::RateLimiter

use std::sync::Mutex;

use crate::state::AppState;

/// The size of every in-memory map of `state`, as gauges, and `/metrics` rendered with them.
/// One scrape at a time: several servers in one process (tests) each show their own sizes.
pub fn render_metrics(state: &AppState) -> String {
    static SCRAPE: Mutex<()> = Mutex::new(());
    let _one_at_a_time = SCRAPE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    record_sizes(state);
    state.metrics.render()
}

fn record_sizes(state: &AppState) {
    let cache = |name: &'static str, entries: usize, capacity: usize| {
        metrics::gauge!("tollgate_cache_entries", "cache" => name).set(entries as f64);
        metrics::gauge!("tollgate_cache_capacity", "cache" => name).set(capacity as f64);
    };
    let (keys, last_used) = state.keys.sizes();
    let key_capacity = state.keys.capacity();
    cache("keys", keys, key_capacity);
    cache("key_last_used", last_used, key_capacity);
    let (configs, customers) = state.proxy_cache.sizes();
    let (config_capacity, customer_capacity) = state.proxy_cache.capacities();
    cache("project_configs", configs, config_capacity);
    cache("customers", customers, customer_capacity);
    let (buckets, bucket_capacity) = state.api_limits.size();
    cache("api_rate_buckets", buckets, bucket_capacity);
    let leases = state.ledger.lease_table();
    for (entries, count) in
        [("customers", leases.customers), ("leases", leases.leases), ("calls", leases.calls), ("ended", leases.ended)]
    {
        metrics::gauge!("tollgate_lease_table_entries", "entries" => entries).set(count as f64);
    }
}

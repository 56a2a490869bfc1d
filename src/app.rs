//! Building and running the server: one router with every face and the layers around it,
//! the job workers beside it (unless disabled), and a shutdown that stops accepting, lets
//! in-flight requests and streams finish, stops the workers and closes the database
//! (flushing pending writes) — all within the grace period: proxied calls still in flight
//! at four fifths of it are cut and settled for what they delivered (see [`Application::run`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_core::egress::{Egress, EgressPolicy};
use tollgate_core::instances;
use tollgate_core::ledger::Ledger;
use tollgate_core::{Config, Db};
use tollgate_jobs::{AlertServices, BillingServices, JobStore, WorkerOptions};
use tower::ServiceBuilder;
use tower_http::LatencyUnit;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::middleware::{hsts, http_metrics, request_id};
use crate::routes::api::limits::RateLimiter;
use crate::routes::proxy::auth::KeyCache;
use crate::routes::proxy::cache::ProxyCache;
use crate::routes::proxy::offload::Offload;
use crate::routes::{api, dashboard, ops, proxy, stripe};
use crate::serve::{self, Connections};
use crate::shutdown::InFlight;
use crate::state::AppState;
use crate::telemetry;

/// A server bound to its port and ready to run.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    local_addr: SocketAddr,
    /// What this process serves under across restarts (see [`instances`]).
    instance_name: String,
}

impl Application {
    /// Opens the database (applying migrations), the job queues and the listening socket.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let master_key = config.resolve_master_key()?;
        let mailer = tollgate_jobs::mail::Mailer::from_config(&config)?;
        let api_limits = RateLimiter::new(config.api_rate_per_second, config.memory.api_rate_keys);
        let db = Db::connect(&config).await?;
        db.migrate().await?;
        tollgate_core::reseal::reseal_unbound_secrets(&db, &master_key).await?;
        let jobs = JobStore::open(config.database_url.expose_secret(), config.sqlite_synchronous).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (TOLLGATE_LISTEN): {e}", config.listen))?;
        let local_addr = listener.local_addr()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(300))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        // Tenants' providers, only where the egress policy allows (Stripe, above, is the operator's).
        let egress = Egress::new(EgressPolicy::new(config.egress_allow.clone()), |client| {
            client
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(300))
                .pool_idle_timeout(Duration::from_secs(90))
                .tcp_nodelay(true)
        })?;
        let stripe = tollgate_jobs::stripe_api::StripeApi::new(http.clone(), &config.stripe_api_base);
        let ledger = Ledger::start(db.clone(), config.sqlite_synchronous);
        let instance_name = config.instance_name.clone().unwrap_or_else(|| default_instance_name(local_addr));
        let recovered = instances::register(&db, ledger.instance(), &instance_name).await?;
        if recovered.reservations > 0 {
            tracing::warn!(released = recovered.reservations, name = %instance_name,
                "released what an earlier life of this instance held (its calls are recorded as interrupted)");
        }
        // The tokenizers load on a blocking thread now, not on the first request's worker.
        tokio::task::spawn_blocking(tollgate_core::estimate::load_tokenizers);
        let memory = config.memory;
        let state = AppState {
            ledger,
            stripe,
            http,
            egress,
            config: Arc::new(config),
            db,
            jobs,
            master_key,
            metrics: telemetry::metrics_handle(),
            keys: Arc::new(KeyCache::new(memory.keys)),
            proxy_cache: Arc::new(ProxyCache::new(memory.projects, memory.customers)),
            mailer: Arc::new(mailer),
            api_limits: Arc::new(api_limits),
            offload: Arc::new(Offload::per_core()),
            in_flight: InFlight::default(),
        };
        Ok(Self { listener, state, local_addr, instance_name })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` is cancelled, then drains (see the module docs).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self { listener, state, instance_name, .. } = self;
        let alerts = if state.config.run_workers {
            Some(AlertServices::new(&state.config, state.master_key.clone(), state.mailer.clone())?)
        } else {
            None
        };
        let beating = tokio::spawn(beat(state.clone(), instance_name, shutdown.child_token()));
        let grace = state.config.shutdown_grace;
        let workers = alerts.map(|alerts| {
            let options = WorkerOptions { grace, ..WorkerOptions::default() };
            let billing = BillingServices::new(&state.config, state.master_key.clone(), state.http.clone());
            tokio::spawn(tollgate_jobs::run_workers(
                state.db.clone(),
                state.jobs.clone(),
                alerts,
                billing,
                options,
                shutdown.child_token(),
            ))
        });

        // Shutdown: stop accepting; let connections finish their requests and calls finish with
        // their upstreams; at four fifths of the grace period cut the calls still in flight
        // (each settles for what it delivered) and close the connections left; the last fifth
        // bounds those settlements and the database's close.
        let connections = Connections::default();
        let limits = state.config.limits;
        let accepting =
            tokio::spawn(serve::accept(listener, router(state.clone()), limits, shutdown.clone(), connections.clone()));
        shutdown.cancelled().await;
        let stopping = tokio::time::Instant::now();
        let (cut_at, deadline) = (stopping + grace * 4 / 5, stopping + grace);
        if let Err(e) = accepting.await {
            tracing::error!(error = %e, "the accept loop failed");
        }
        let finished = async {
            connections.closed().await;
            state.in_flight.finished().await;
        };
        if tokio::time::timeout_at(cut_at, finished).await.is_err() {
            tracing::warn!(
                grace_seconds = grace.as_secs(),
                "grace period nearly over: cutting the calls still in flight"
            );
            state.in_flight.cut();
            let settled = async {
                state.in_flight.finished().await;
                connections.closed().await;
            };
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                tracing::warn!("closing the connections still open");
            }
            connections.drop_all();
        }
        if let Some(workers) = workers {
            match tokio::time::timeout_at(deadline.max(tokio::time::Instant::now() + Duration::from_secs(1)), workers)
                .await
            {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "job workers ended with an error"),
                Ok(Err(e)) => tracing::error!(error = %e, "job workers panicked"),
                Err(_) => tracing::warn!("job workers did not stop within the grace period"),
            }
        }
        beating.abort();
        // Every call has settled (or was cut off with the connections): what this instance
        // still holds, it gives back and records as interrupted.
        let closing = async {
            if let Err(e) = instances::leave(&state.db, state.ledger.instance()).await {
                tracing::warn!(error = %e, "could not leave the instances table; another instance recovers this one");
            }
            state.jobs.close().await;
            state.db.close().await;
        };
        // The database's close waits for its connections; a stuck one does not hold the exit.
        let closed_by = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
        if tokio::time::timeout_at(closed_by, closing).await.is_err() {
            tracing::warn!("the database did not close within the grace period");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The host and listening address: what a restarted process serves under again.
fn default_instance_name(local_addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}/{local_addr}")
}

/// Beats this instance's heartbeat, and recovers dead instances, every [`instances::BEAT`]
/// (see [`instances`]) until shutdown.
async fn beat(state: AppState, name: String, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(instances::BEAT);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(e) = instances::beat(&state.db, state.ledger.instance(), &name).await {
            tracing::warn!(error = %e, "could not beat this instance's heartbeat");
        }
        match instances::recover_dead(&state.db, tollgate_core::time::UnixMillis::now()).await {
            Ok(recovered) if recovered.instances > 0 => {
                metrics::counter!("tollgate_interrupted_calls_total").increment(recovered.reservations);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not recover dead instances"),
        }
    }
}

/// Every route, and the layers around them, outermost first.
pub fn router(state: AppState) -> Router {
    let https = hsts::served_over_https(&state.config.public_url);
    let body_read_timeout = state.config.limits.body_read_timeout;
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .merge(proxy::router())
        .merge(stripe::router())
        .merge(api::router(&state))
        .merge(dashboard::router(&state))
        .fallback(not_found)
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(axum::middleware::from_fn(request_id::assign))
                .layer(axum::middleware::from_fn_with_state(https, hsts::add))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_span)
                        .on_response(DefaultOnResponse::new().level(Level::INFO).latency_unit(LatencyUnit::Micros)),
                )
                .layer(CatchPanicLayer::custom(internal_error_after_panic))
                .layer(axum::middleware::from_fn(http_metrics::record))
                .layer(axum::middleware::from_fn_with_state(body_read_timeout, serve::deadline_body)),
        )
}

fn request_span<B>(request: &Request<B>) -> tracing::Span {
    let id = request.extensions().get::<request_id::RequestId>().map(|r| r.0.as_str()).unwrap_or("-");
    // The path only: query strings may carry tokens.
    tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path())
}

fn internal_error_after_panic(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(serde_json::json!({ "error": { "message": "internal error", "type": "server_error" } })),
    )
        .into_response()
}

/// An unknown URL: a browser (its `Accept` names `text/html`) gets the dashboard's HTML page,
/// except under the proxy's `/v1`, the API's `/api` and Stripe's `/stripe`, whose clients
/// always get JSON.
async fn not_found(uri: axum::http::Uri, headers: axum::http::HeaderMap) -> Response {
    let machine_face = ["/v1", "/api", "/stripe"]
        .iter()
        .any(|prefix| uri.path() == *prefix || uri.path().starts_with(&format!("{prefix}/")));
    let browser = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/html"));
    if browser && !machine_face {
        return dashboard::not_found_page();
    }
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({ "error": { "message": "no such route", "type": "not_found" } })),
    )
        .into_response()
}

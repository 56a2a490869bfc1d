//! Operations endpoints: `/healthz` (the process answers), `/readyz` (the database answers
//! and its schema is current: safe to send traffic), `/metrics` (Prometheus text format).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use crate::state::AppState;

pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let database = match state.db.ping().await {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: database unreachable");
            Err("unreachable")
        }
    };
    let migrations = match &database {
        Ok(()) => match state.db.pending_migrations().await {
            Ok(pending) if pending.is_empty() => Ok(()),
            Ok(pending) => Err(format!("{} pending", pending.len())),
            Err(e) => {
                tracing::warn!(error = %e, "readiness: cannot read migration history");
                Err("unknown".to_owned())
            }
        },
        Err(_) => Err("unknown".to_owned()),
    };
    let ready = database.is_ok() && migrations.is_ok();
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "database": database.err().unwrap_or("ok"),
        "migrations": migrations.err().unwrap_or_else(|| "current".to_owned()),
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    match tollgate_jobs::housekeeping::newest_heartbeat_age_ms(&state.db).await {
        Ok(Some(age_ms)) => metrics::gauge!("tollgate_worker_heartbeat_age_seconds").set(age_ms as f64 / 1000.0),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "metrics: cannot read worker heartbeats"),
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::memory::render_metrics(&state))
}

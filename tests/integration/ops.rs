//! `/healthz`, `/readyz`, `/metrics`, request ids and the JSON 404.

use reqwest::StatusCode;
use serde_json::Value;
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult, spawn_app};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        healthz_answers_with_a_request_id,
        readyz_is_ready_on_a_migrated_database,
        readyz_is_not_ready_when_a_migration_is_missing,
        readyz_is_not_ready_when_the_database_is_gone,
        metrics_count_requests_by_route,
        request_ids_are_kept_when_sane_and_replaced_when_not,
        unknown_routes_answer_json_404,
    ]
}

async fn healthz_answers_with_a_request_id(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let response = app.get("/healthz").await?;
    assert_eq!(response.status(), StatusCode::OK);
    let id = response.headers()["x-request-id"].to_str()?.to_owned();
    assert!(id.starts_with("req_"), "{id}");
    let body: Value = response.json().await?;
    assert_eq!(body["status"], "ok");
    app.stop().await
}

async fn readyz_is_ready_on_a_migrated_database(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let response = app.get("/readyz").await?;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await?;
    assert_eq!(body, serde_json::json!({"status": "ready", "database": "ok", "migrations": "current"}));
    app.stop().await
}

async fn readyz_is_not_ready_when_a_migration_is_missing(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    // Forget the newest migration, as if this binary were newer than the database.
    let forget = "DELETE FROM tollgate_migrations WHERE version = (SELECT MAX(version) FROM tollgate_migrations)";
    with_db!(&app.state.db, pool => sqlx::query(forget).execute(pool).await.map(|_| ()))?;
    let response = app.get("/readyz").await?;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await?;
    assert_eq!(body["status"], "not ready");
    assert_eq!(body["migrations"], "1 pending");
    app.stop().await
}

async fn readyz_is_not_ready_when_the_database_is_gone(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    app.state.db.close().await;
    let response = app.get("/readyz").await?;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await?;
    assert_eq!(body["database"], "unreachable");
    Ok(())
}

async fn metrics_count_requests_by_route(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    for _ in 0..3 {
        app.get("/healthz").await?;
    }
    let response = app.get("/metrics").await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str()?.starts_with("text/plain"));
    let text = response.text().await?;
    // The recorder is process-wide (other tests count too), so look for the series, not a total.
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("tollgate_http_requests_total{")
                && l.contains("route=\"/healthz\"")
                && l.contains("status=\"200\"")
        })
        .ok_or_else(|| anyhow::anyhow!("no healthz counter in:\n{text}"))?;
    let count: f64 = line.rsplit(' ').next().unwrap_or("0").parse()?;
    assert!(count >= 3.0, "{line}");
    assert!(text.contains("# TYPE tollgate_http_request_duration_seconds histogram"), "{text}");
    assert!(text.contains("tollgate_http_request_duration_seconds_bucket{route=\"/healthz\",le=\"0.001\"}"), "{text}");
    app.stop().await
}

async fn request_ids_are_kept_when_sane_and_replaced_when_not(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let kept = app.client.get(app.url("/healthz")).header("x-request-id", "trace-42.a:b").send().await?;
    assert_eq!(kept.headers()["x-request-id"], "trace-42.a:b");
    let replaced =
        app.client.get(app.url("/healthz")).header("x-request-id", "has spaces and \"quotes\"").send().await?;
    assert!(replaced.headers()["x-request-id"].to_str()?.starts_with("req_"));
    let too_long = app.client.get(app.url("/healthz")).header("x-request-id", "x".repeat(500)).send().await?;
    assert!(too_long.headers()["x-request-id"].to_str()?.starts_with("req_"));
    app.stop().await
}

async fn unknown_routes_answer_json_404(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let response = app.get("/no/such/route").await?;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["type"], "not_found");
    app.stop().await
}

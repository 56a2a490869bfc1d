//! The background side: workers beat, housekeeping runs through the queue, and a
//! per-minute push from several replicas queues one job.

use std::time::Duration;

use tollgate_core::time::UnixMillis;
use tollgate_core::with_db;
use tollgate_jobs::housekeeping::{Housekeeping, STALE_HEARTBEAT_MS};

use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult, eventually, spawn_app, spawn_app_with};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        workers_report_a_heartbeat,
        housekeeping_runs_through_the_queue_and_is_counted,
        housekeeping_prunes_expired_dashboard_rows,
        the_same_minute_is_queued_once,
    ]
}

async fn with_workers(db: &TestDatabase) -> anyhow::Result<crate::helpers::TestApp> {
    spawn_app_with(db, |env| {
        env.insert("TOLLGATE_WORKERS".into(), "true".into());
    })
    .await
}

async fn workers_report_a_heartbeat(db: TestDatabase) -> TestResult {
    let app = with_workers(&db).await?;
    let state = app.state.clone();
    eventually(Duration::from_secs(10), || async {
        Ok(tollgate_jobs::housekeeping::newest_heartbeat_age_ms(&state.db).await?.is_some())
    })
    .await?;
    let metrics = app.get("/metrics").await?.text().await?;
    assert!(metrics.contains("tollgate_worker_heartbeat_age_seconds "), "{metrics}");
    app.stop().await
}

async fn housekeeping_runs_through_the_queue_and_is_counted(db: TestDatabase) -> TestResult {
    let app = with_workers(&db).await?;
    let state = app.state.clone();
    let long_ago = UnixMillis::now().0 - STALE_HEARTBEAT_MS - 60_000;
    with_db!(&state.db, pool => sqlx::query("INSERT INTO worker_heartbeats (worker, beat_at) VALUES ('gone', $1)")
        .bind(long_ago).execute(pool).await.map(|_| ()))?;
    state.jobs.push_housekeeping(Housekeeping { scheduled_for: UnixMillis::now().0 }, None).await?;
    eventually(Duration::from_secs(15), || async {
        let gone: i64 = with_db!(&state.db, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM worker_heartbeats WHERE worker = 'gone'").fetch_one(pool).await)?;
        Ok(gone == 0)
    })
    .await?;
    let metrics = app.get("/metrics").await?.text().await?;
    assert!(
        metrics.lines().any(|l| l.starts_with("tollgate_jobs_total{")
            && l.contains("job=\"housekeeping\"")
            && l.contains("outcome=\"success\"")),
        "{metrics}"
    );
    app.stop().await
}

async fn the_same_minute_is_queued_once(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let minute = 1_800_000_000_000;
    for _ in 0..3 {
        app.state
            .jobs
            .push_housekeeping(Housekeeping { scheduled_for: minute }, Some(format!("housekeeping:{minute}")))
            .await?;
    }
    assert_eq!(app.state.jobs.housekeeping_jobs_count().await?, 1);
    app.state
        .jobs
        .push_housekeeping(
            Housekeeping { scheduled_for: minute + 60_000 },
            Some(format!("housekeeping:{}", minute + 60_000)),
        )
        .await?;
    assert_eq!(app.state.jobs.housekeeping_jobs_count().await?, 2);
    app.stop().await
}

async fn housekeeping_prunes_expired_dashboard_rows(db: TestDatabase) -> TestResult {
    let pool = db.connect().await?;
    pool.migrate().await?;
    let now = UnixMillis::now();
    let stored = |expires_at| tollgate_core::sessions::Stored { data: "{}", expires_at, user_id: None };
    tollgate_core::sessions::create(&pool, "old-session", stored(now.plus_secs(-1))).await?;
    tollgate_core::sessions::create(&pool, "live-session", stored(now.plus_secs(3_600))).await?;
    with_db!(&pool, p => async {
        sqlx::query("INSERT INTO login_failures (throttle_key, failures, window_start) VALUES ('email:old', 3, $1), ('email:new', 1, $2)")
            .bind(now.plus_secs(-3_600).0).bind(now.0).execute(p).await?;
        Ok::<_, sqlx::Error>(())
    }.await)?;
    let report = tollgate_jobs::housekeeping::run(&pool, now).await?;
    assert_eq!(report.expired_dashboard_rows_removed, 2, "{report:?}");
    assert!(tollgate_core::sessions::load(&pool, "live-session", now).await?.is_some());
    let left: Vec<String> =
        with_db!(&pool, p => sqlx::query_scalar("SELECT throttle_key FROM login_failures").fetch_all(p).await)?;
    assert_eq!(left, ["email:new"]);
    pool.close().await;
    Ok(())
}

//! Periodic upkeep. Every worker process beats a heartbeat (so an operator can see that
//! workers run) and, once a minute, queues one [`Housekeeping`] job for the whole
//! deployment (deduplicated by minute across replicas), which releases expired reservations
//! (calls of a crashed process: no customer stays blocked by them) and prunes stale rows
//! (heartbeats, expired sessions, spent reset links and invitations, old login failures,
//! idempotency keys older than a day, accounts left unverified past their week, deletions of
//! customers older than any customer token).

use serde::{Deserialize, Serialize};
use tollgate_core::db::DbError;
use tollgate_core::time::UnixMillis;
use tollgate_core::{Db, with_db};

/// Heartbeats older than this belong to workers that are gone.
pub const STALE_HEARTBEAT_MS: i64 = 24 * 60 * 60 * 1000;

/// One housekeeping run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Housekeeping {
    /// The minute (Unix ms) this run was scheduled for.
    pub scheduled_for: i64,
}

/// Records that the worker process `worker` is alive now.
pub async fn beat(db: &Db, worker: &str) -> Result<(), sqlx::Error> {
    const SQL: &str = "INSERT INTO worker_heartbeats (worker, beat_at) VALUES ($1, $2) \
                       ON CONFLICT (worker) DO UPDATE SET beat_at = excluded.beat_at";
    let now = UnixMillis::now().0;
    with_db!(db, pool => sqlx::query(SQL).bind(worker).bind(now).execute(pool).await.map(|_| ()))
}

/// What one housekeeping run did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HousekeepingReport {
    pub stale_heartbeats_removed: u64,
    pub expired_reservations_released: u64,
    /// Expired dashboard sessions, used or expired reset links and invitations, login
    /// failure counters whose window has passed, and accounts left unverified (with their
    /// organizations and confirmation links).
    #[serde(default)]
    pub expired_dashboard_rows_removed: u64,
}

/// Removes what has gone stale.
pub async fn run(db: &Db, now: UnixMillis) -> Result<HousekeepingReport, DbError> {
    const SQL: &str = "DELETE FROM worker_heartbeats WHERE beat_at < $1";
    let cutoff = now.0 - STALE_HEARTBEAT_MS;
    let removed = with_db!(db, pool => sqlx::query(SQL).bind(cutoff).execute(pool).await.map(|r| r.rows_affected()))?;
    let released = tollgate_core::ledger::release_expired(db, now).await?;
    let mut dashboard = tollgate_core::sessions::delete_expired(db, now).await?;
    dashboard += tollgate_core::idempotency::prune(db, now).await?;
    dashboard += tollgate_core::accounts::delete_expired_unverified(db, now).await?;
    let window_start = now.plus_secs(-tollgate_core::throttle::WINDOW_SECS).0;
    for (sql, bound) in [
        ("DELETE FROM password_resets WHERE expires_at <= $1 OR used_at IS NOT NULL", now.0),
        ("DELETE FROM invitations WHERE expires_at <= $1 AND accepted_at IS NULL", now.0),
        ("DELETE FROM login_failures WHERE window_start <= $1", window_start),
        (
            "DELETE FROM deleted_customers WHERE deleted_at <= $1",
            now.0 - tollgate_core::customers::DELETION_REMEMBERED_MS,
        ),
    ] {
        dashboard += with_db!(db, pool => sqlx::query(sql).bind(bound).execute(pool).await.map(|r| r.rows_affected()))?;
    }
    Ok(HousekeepingReport {
        stale_heartbeats_removed: removed,
        expired_reservations_released: released,
        expired_dashboard_rows_removed: dashboard,
    })
}

/// Age in milliseconds of the newest heartbeat of any worker, or `None` if none ever beat.
pub async fn newest_heartbeat_age_ms(db: &Db) -> Result<Option<i64>, sqlx::Error> {
    const SQL: &str = "SELECT MAX(beat_at) FROM worker_heartbeats";
    let newest: Option<i64> = with_db!(db, pool => sqlx::query_scalar::<_, Option<i64>>(SQL).fetch_one(pool).await)?;
    Ok(newest.map(|t| (UnixMillis::now().0 - t).max(0)))
}

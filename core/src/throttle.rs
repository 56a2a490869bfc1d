//! Attempt counters that limit logins, reset requests and sign-ups. Each attempt is counted and
//! decided in one statement (an upsert that returns the new count, or a conditional one that
//! claims the next slot), so concurrent attempts can never all read the same count: 60 at once
//! count as 60. Counters live in `login_failures`, one row per key, in fixed windows of
//! [`WINDOW_SECS`]; housekeeping removes rows whose window has passed.

use std::time::Duration;

use crate::db::{Db, DbError};
use crate::time::UnixMillis;
use crate::with_db;

/// Every counter counts within a window of this length, starting at its first attempt.
pub const WINDOW_SECS: i64 = 15 * 60;

/// Counts one attempt against `key` and says whether it is within `limit` attempts of the
/// current window.
pub async fn take(db: &Db, key: &str, limit: i64, now: UnixMillis) -> Result<bool, DbError> {
    // A window that has passed starts over; otherwise the count goes up, in one statement
    // that also returns it.
    const SQL: &str = "INSERT INTO login_failures (throttle_key, failures, window_start) VALUES ($1, 1, $2) \
        ON CONFLICT (throttle_key) DO UPDATE SET \
          failures = CASE WHEN login_failures.window_start <= $3 THEN 1 ELSE login_failures.failures + 1 END, \
          window_start = CASE WHEN login_failures.window_start <= $3 THEN $2 ELSE login_failures.window_start END \
        RETURNING failures";
    let since = now.plus_secs(-WINDOW_SECS).0;
    let count: i64 =
        with_db!(db, pool => sqlx::query_scalar(SQL).bind(key).bind(now.0).bind(since).fetch_one(pool).await)?;
    Ok(count <= limit)
}

/// Uncounts one attempt of `key` (one that succeeded, or that another limit refused).
pub async fn give_back(db: &Db, key: &str) -> Result<(), DbError> {
    const SQL: &str = "UPDATE login_failures SET failures = failures - 1 WHERE throttle_key = $1 AND failures > 0";
    with_db!(db, pool => sqlx::query(SQL).bind(key).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// Forgets `key`'s attempts.
pub async fn clear(db: &Db, key: &str) -> Result<(), DbError> {
    with_db!(db, pool => sqlx::query("DELETE FROM login_failures WHERE throttle_key = $1").bind(key).execute(pool)
        .await.map(|_| ()))?;
    Ok(())
}

/// A backoff: the first `free` attempts of a window go at once; after that each attempt must
/// come a delay after the one before, the delay doubling from `first_delay` up to `max_delay`.
/// It slows guessing without ever locking anyone out for longer than `max_delay`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub free: i64,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

/// Claims the next attempt of `key` under `backoff`: Ok if it may go now (it is counted and the
/// next delay set, in one statement that only one of concurrent attempts can win), else how
/// long to wait.
pub async fn claim(db: &Db, key: &str, backoff: Backoff, now: UnixMillis) -> Result<Result<(), Duration>, DbError> {
    // The delay this attempt sets for the next one (old values on the right of SET, on both
    // databases): none within the free attempts or after the window has passed, then doubling.
    // Without a delay the next attempt may come at any time (next_at 0, not this attempt's
    // clock: concurrent attempts each read the clock a little apart).
    macro_rules! delay {
        () => {
            "CASE WHEN login_failures.window_start <= $3 OR login_failures.failures + 1 <= $4 THEN 0 \
             WHEN login_failures.delay_ms = 0 THEN $5 \
             WHEN login_failures.delay_ms * 2 >= $6 THEN $6 \
             ELSE login_failures.delay_ms * 2 END"
        };
    }
    const SQL: &str = concat!(
        "INSERT INTO login_failures (throttle_key, failures, window_start, next_at, delay_ms) \
         VALUES ($1, 1, $2, 0, 0) \
         ON CONFLICT (throttle_key) DO UPDATE SET \
           failures = CASE WHEN login_failures.window_start <= $3 THEN 1 ELSE login_failures.failures + 1 END, \
           window_start = CASE WHEN login_failures.window_start <= $3 THEN $2 ELSE login_failures.window_start END, \
           delay_ms = ",
        delay!(),
        ", next_at = CASE WHEN ",
        delay!(),
        " = 0 THEN 0 ELSE $2 + ",
        delay!(),
        " END WHERE login_failures.next_at <= $2 RETURNING failures"
    );
    let since = now.plus_secs(-WINDOW_SECS).0;
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let claimed: Option<i64> = with_db!(db, pool => sqlx::query_scalar(SQL)
        .bind(key).bind(now.0).bind(since).bind(backoff.free).bind(ms(backoff.first_delay))
        .bind(ms(backoff.max_delay)).fetch_optional(pool).await)?;
    if claimed.is_some() {
        return Ok(Ok(()));
    }
    const NEXT: &str = "SELECT next_at FROM login_failures WHERE throttle_key = $1";
    let next_at: Option<i64> = with_db!(db, pool => sqlx::query_scalar(NEXT).bind(key).fetch_optional(pool).await)?;
    let wait = next_at.map_or(0, |at| at - now.0).clamp(1, ms(backoff.max_delay));
    Ok(Err(Duration::from_millis(u64::try_from(wait).unwrap_or(1))))
}

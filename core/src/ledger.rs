//! The ledger: budget reserved before a call, settled (or released) after it, and the usage
//! event that records the outcome. This is where "no end-customer ever spends past their
//! budget" is kept.
//!
//! - [`reserve`] is one conditional `UPDATE` (on PostgreSQL one statement with the
//!   reservation's record, a single round trip): it adds to `reserved_nanos` only if
//!   `spent + reserved + amount <= budget` holds *on the row as it is when the update runs*
//!   (PostgreSQL re-checks the condition after taking the row lock; SQLite serialises
//!   writers). No read-compute-write, so concurrent calls, replicas and processes cannot
//!   oversubscribe a budget. A period that has ended is rolled over in the same statement.
//! - [`settle`] deletes the reservation (at most once: `DELETE … RETURNING`), moves the
//!   actual billed cost into `spent_nanos`, and writes the usage event, in one transaction
//!   (on PostgreSQL one statement of data-modifying CTEs, a single round trip).
//!   A reservation already released by expiry is not released twice.
//! - [`renew`] keeps a long call's reservation from expiring under it.
//! - [`release_expired`] frees reservations whose call never settled (a crashed process).

use crate::db::{Db, DbError};
use crate::ids::{CustomerId, ProjectId, ReservationId, UsageEventId};
use crate::money::Nanos;
use crate::pricing::TokenUsage;
use crate::projects::Customer;
use crate::time::UnixMillis;
use crate::with_db;

/// Budget held for one call in flight.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub id: ReservationId,
    pub customer_id: CustomerId,
    pub amount: Nanos,
}

#[derive(Debug, Clone)]
pub enum ReserveOutcome {
    /// Held; `remaining` is what the customer has left beside it.
    Reserved {
        reservation: Reservation,
        remaining: Nanos,
    },
    /// Does not fit; `remaining` is what the customer had when it was tried.
    Insufficient {
        remaining: Nanos,
    },
    Blocked,
}

/// Holds `amount` of `customer`'s budget until settled, released, or `expires_at`.
pub async fn reserve(
    db: &Db,
    customer: &Customer,
    amount: Nanos,
    request_id: &str,
    expires_at: UnixMillis,
) -> Result<ReserveOutcome, DbError> {
    if amount.is_negative() {
        return Ok(ReserveOutcome::Insufficient { remaining: Nanos::ZERO });
    }
    // The customer's period kind may change under us (a budget edit); try with the fresh one.
    let mut period = customer.period();
    for _ in 0..3 {
        let now = UnixMillis::now();
        let (start, end) = period.window_after(customer.period_start, now);
        let id = ReservationId::generate();
        /// The hold: a period that has ended is rolled over, and the amount added only if it fits.
        macro_rules! hold {
            () => {
                "UPDATE customers SET \
                  spent_nanos = CASE WHEN period_end <= $1 THEN 0 ELSE spent_nanos END, \
                  period_start = CASE WHEN period_end <= $1 THEN $2 ELSE period_start END, \
                  period_end = CASE WHEN period_end <= $1 THEN $3 ELSE period_end END, \
                  reserved_nanos = reserved_nanos + $4 \
                WHERE id = $5 AND budget_period = $6 AND NOT blocked \
                  AND (CASE WHEN period_end <= $1 THEN 0 ELSE spent_nanos END) + reserved_nanos + $4 <= budget_nanos \
                RETURNING budget_nanos - spent_nanos - reserved_nanos AS remaining"
            };
        }
        const HOLD: &str = hold!();
        const HOLD_AND_RECORD: &str = concat!(
            "WITH held AS (",
            hold!(),
            ") INSERT INTO reservations (id, customer_id, amount_nanos, request_id, created_at, expires_at) \
             SELECT $7, $5, $4, $8, $1, $9 FROM held RETURNING (SELECT remaining FROM held)"
        );
        const RECORD: &str = "INSERT INTO reservations (id, customer_id, amount_nanos, request_id, created_at, expires_at) \
                              VALUES ($1, $2, $3, $4, $5, $6)";
        let held: Option<i64> = match db {
            // One statement, one round trip: the hold and its record commit together or not at all.
            Db::Postgres(pool) => sqlx::query_scalar::<_, i64>(HOLD_AND_RECORD)
                .bind(now.0)
                .bind(start)
                .bind(end)
                .bind(amount.0)
                .bind(&customer.id)
                .bind(period.as_str())
                .bind(&id)
                .bind(request_id)
                .bind(expires_at.0)
                .fetch_optional(pool)
                .await
                .map_err(DbError::from)?,
            Db::Sqlite(pool) => async {
                let mut tx = pool.begin().await?;
                let remaining: Option<i64> = sqlx::query_scalar(HOLD)
                    .bind(now.0)
                    .bind(start)
                    .bind(end)
                    .bind(amount.0)
                    .bind(&customer.id)
                    .bind(period.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                if remaining.is_some() {
                    sqlx::query(RECORD)
                        .bind(&id)
                        .bind(&customer.id)
                        .bind(amount.0)
                        .bind(request_id)
                        .bind(now.0)
                        .bind(expires_at.0)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                } else {
                    tx.rollback().await?;
                }
                Ok::<_, sqlx::Error>(remaining)
            }
            .await
            .map_err(DbError::from)?,
        };
        if let Some(remaining) = held {
            let reservation = Reservation { id, customer_id: customer.id.clone(), amount };
            return Ok(ReserveOutcome::Reserved { reservation, remaining: Nanos(remaining) });
        }
        let Some(fresh) = crate::projects::get_customer(db, &customer.id).await? else {
            return Ok(ReserveOutcome::Blocked);
        };
        if fresh.blocked {
            return Ok(ReserveOutcome::Blocked);
        }
        if fresh.period() == period {
            return Ok(ReserveOutcome::Insufficient { remaining: fresh.remaining(now).max(Nanos::ZERO) });
        }
        period = fresh.period();
    }
    Ok(ReserveOutcome::Insufficient { remaining: Nanos::ZERO })
}

/// How a call ended, for the usage ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallStatus {
    Settled,
    Refused,
    Failed,
}

impl CallStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Settled => "settled",
            CallStatus::Refused => "refused",
            CallStatus::Failed => "failed",
        }
    }
}

/// Where a settled call's token counts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The provider's `usage`.
    Provider,
    /// Counted by Tollgate from what was delivered (no usage from the provider).
    Counted,
    /// Nothing to count (refused or failed calls).
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Provider => "provider",
            UsageSource::Counted => "counted",
            UsageSource::None => "none",
        }
    }
}

/// One call's outcome, as written to `usage_events`.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    pub project_id: ProjectId,
    pub customer_id: Option<CustomerId>,
    pub request_id: String,
    pub endpoint: String,
    pub model: String,
    pub status: CallStatus,
    pub reason: Option<String>,
    pub tokens: TokenUsage,
    pub reserved: Nanos,
    pub cost: Nanos,
    pub billed: Nanos,
    pub source: UsageSource,
    pub latency_ms: i64,
}

/// Binds a usage event's 19 columns, in `usage_events`' order, to `$1`…`$19` of `$query`.
macro_rules! bind_event {
    ($query:expr, $event_id:expr, $record:expr) => {{
        let (record, t) = (&$record, &$record.tokens);
        $query
            .bind(&$event_id)
            .bind(&record.project_id)
            .bind(&record.customer_id)
            .bind(&record.request_id)
            .bind(&record.endpoint)
            .bind(&record.model)
            .bind(record.status.as_str())
            .bind(&record.reason)
            .bind(t.input)
            .bind(t.cached_input)
            .bind(t.cache_write)
            .bind(t.output)
            .bind(t.reasoning)
            .bind(record.reserved.0)
            .bind(record.cost.0)
            .bind(record.billed.0)
            .bind(record.source.as_str())
            .bind(record.latency_ms)
            .bind(UnixMillis::now().0)
    }};
}

/// Ends a call: frees its reservation (if still held), charges `record.billed` to the
/// customer, and writes the usage event, atomically. Returns the customer's remaining
/// budget afterwards, when there is a customer.
pub async fn settle(
    db: &Db,
    reservation: Option<&Reservation>,
    record: &UsageRecord,
) -> Result<Option<Nanos>, DbError> {
    const FREE: &str = "DELETE FROM reservations WHERE id = $1 RETURNING amount_nanos";
    const CHARGE: &str = "UPDATE customers SET reserved_nanos = reserved_nanos - $1, spent_nanos = spent_nanos + $2 \
                          WHERE id = $3 RETURNING budget_nanos - spent_nanos - reserved_nanos";
    const EVENT: &str = "INSERT INTO usage_events (id, project_id, customer_id, request_id, endpoint, model, status, reason, \
        input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, reserved_nanos, cost_nanos, \
        billed_nanos, usage_source, latency_ms, created_at) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)";
    let event_id = UsageEventId::generate();
    let remaining: Option<i64> = match db {
        // One statement, one round trip, atomic: free the hold, charge, record the event.
        Db::Postgres(pool) => {
            const SETTLE: &str = "WITH freed AS (DELETE FROM reservations WHERE id = $20 RETURNING amount_nanos), \
                charged AS (UPDATE customers SET \
                    reserved_nanos = reserved_nanos - COALESCE((SELECT amount_nanos FROM freed), 0), \
                    spent_nanos = spent_nanos + $16 \
                  WHERE id = $3 AND (EXISTS (SELECT 1 FROM freed) OR $16 <> 0) \
                  RETURNING budget_nanos - spent_nanos - reserved_nanos AS remaining), \
                event AS (INSERT INTO usage_events (id, project_id, customer_id, request_id, endpoint, model, status, \
                    reason, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, \
                    reserved_nanos, cost_nanos, billed_nanos, usage_source, latency_ms, created_at) \
                  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)) \
                SELECT (SELECT remaining FROM charged)";
            let reservation_id = reservation.map(|r| r.id.as_str().to_owned());
            bind_event!(sqlx::query_scalar::<_, Option<i64>>(SETTLE), event_id, record)
                .bind(&reservation_id)
                .fetch_one(pool)
                .await
                .map_err(DbError::from)?
        }
        Db::Sqlite(pool) => async {
            let mut tx = pool.begin().await?;
            let held: i64 = match reservation {
                Some(r) => sqlx::query_scalar::<_, i64>(FREE).bind(&r.id).fetch_optional(&mut *tx).await?.unwrap_or(0),
                None => 0,
            };
            let remaining: Option<i64> = match &record.customer_id {
                Some(customer) if held != 0 || record.billed.0 != 0 => {
                    sqlx::query_scalar(CHARGE)
                        .bind(held)
                        .bind(record.billed.0)
                        .bind(customer)
                        .fetch_optional(&mut *tx)
                        .await?
                }
                _ => None,
            };
            bind_event!(sqlx::query(EVENT), event_id, record).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(remaining)
        }
        .await
        .map_err(DbError::from)?,
    };
    Ok(remaining.map(Nanos))
}

/// Pushes a held reservation's expiry to `expires_at` (a long stream keeps its budget held).
/// Returns false when the reservation is gone already (settled, or released by expiry).
pub async fn renew(db: &Db, reservation: &Reservation, expires_at: UnixMillis) -> Result<bool, DbError> {
    const RENEW: &str = "UPDATE reservations SET expires_at = $1 WHERE id = $2";
    let updated = with_db!(db, pool => sqlx::query(RENEW).bind(expires_at.0).bind(&reservation.id).execute(pool).await
        .map(|r| r.rows_affected()))?;
    Ok(updated == 1)
}

/// Releases every reservation past its expiry (their calls never settled: a crash, or a
/// process killed mid-call). Each is released exactly once even when several replicas run
/// this at the same time. Returns how many were released.
pub async fn release_expired(db: &Db, now: UnixMillis) -> Result<u64, DbError> {
    const EXPIRED: &str = "SELECT id FROM reservations WHERE expires_at <= $1 ORDER BY expires_at LIMIT 1000";
    const FREE: &str = "DELETE FROM reservations WHERE id = $1 RETURNING customer_id, amount_nanos";
    const UNHOLD: &str = "UPDATE customers SET reserved_nanos = reserved_nanos - $1 WHERE id = $2";
    let ids: Vec<ReservationId> =
        with_db!(db, pool => sqlx::query_scalar::<_, ReservationId>(EXPIRED).bind(now.0).fetch_all(pool).await)?;
    let mut released = 0;
    for id in ids {
        let freed = with_db!(db, pool => async {
            let mut tx = pool.begin().await?;
            let row: Option<(CustomerId, i64)> = sqlx::query_as(FREE).bind(&id).fetch_optional(&mut *tx).await?;
            if let Some((customer, amount)) = &row {
                sqlx::query(UNHOLD).bind(*amount).bind(customer).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(row.is_some())
        }
        .await)?;
        if freed {
            released += 1;
        }
    }
    if released > 0 {
        tracing::warn!(released, "released expired reservations (calls that never settled)");
    }
    Ok(released)
}

//! Process instances and crash recovery: a crashed process gives its customers' budget back
//! within a minute, and the calls it had in flight are recorded.
//!
//! Every serving process is an *instance* ([`InstanceId`], one per life of the process): it
//! registers at start, beats every [`BEAT`], and every reservation it makes names it (see
//! [`crate::ledger::Hold`]). Each instance also looks, every [`BEAT`], for instances whose
//! beat is older than [`DEAD_AFTER`] and *recovers* them: each of their reservations is
//! released and its call recorded as an `interrupted` usage event — with its request id,
//! endpoint, model and what it had reserved — billed at that reservation or not at all, as
//! its project says (`bill_interrupted`; by default not billed). An instance that starts
//! under the name of an earlier life (the same host and listening address, or the name
//! `TOLLGATE_INSTANCE_NAME` gives) recovers that life at once instead of waiting for it to be
//! seen dead. The reservations' own expiry stays as the last resort (holds made outside the
//! proxy name no instance).
//!
//! Each reservation is released once, and its event written once, however many instances
//! recover the same dead one at the same time: the row is deleted and the event written in
//! one transaction, only by whoever deleted it.
//!
//! A lease's row (see [`crate::ledger::lease`]) holds the budget of several calls of one
//! customer. Each of its calls still in flight a moment after it started is in the
//! `calls_in_flight` table ([`journal`]), and is recorded as an interrupted call of its own,
//! with its share of the lease; what the lease held beyond them is freed. A lease whose calls
//! had all started within that moment of the death is recorded as one call, under the request
//! id of the call that took it.

use crate::db::{Db, DbError};
use crate::ids::{InstanceId, UsageEventId};
use crate::ledger::lease::InFlight;
use crate::time::UnixMillis;
use crate::with_db;

/// How often an instance beats, and looks for dead ones.
pub const BEAT: std::time::Duration = std::time::Duration::from_secs(5);
/// An instance whose last beat is older than this is dead (four beats missed).
pub const DEAD_AFTER: std::time::Duration = std::time::Duration::from_secs(20);

/// What a recovery did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub instances: u64,
    pub reservations: u64,
}

/// Registers instance `id` under `name` (see the module docs), and recovers at once what
/// earlier lives under the same name left behind.
pub async fn register(db: &Db, id: &InstanceId, name: &str) -> Result<Recovered, DbError> {
    const INSERT: &str = "INSERT INTO instances (id, name, started_at, beat_at) VALUES ($1, $2, $3, $3)";
    const EARLIER: &str = "SELECT id FROM instances WHERE name = $1 AND id <> $2";
    let now = UnixMillis::now().0;
    with_db!(db, pool => sqlx::query(INSERT).bind(id).bind(name).bind(now).execute(pool).await.map(drop))?;
    let earlier: Vec<InstanceId> =
        with_db!(db, pool => sqlx::query_scalar(EARLIER).bind(name).bind(id).fetch_all(pool).await)?;
    let mut recovered = Recovered::default();
    for life in earlier {
        recovered.reservations += recover(db, &life).await?;
        recovered.instances += 1;
    }
    Ok(recovered)
}

/// Records that instance `id` is alive. An instance that was taken for dead (it could not
/// beat for [`DEAD_AFTER`]: its holds were released) registers again and carries on; its
/// calls in flight settle as calls whose reservation expired (charged, not unheld twice).
pub async fn beat(db: &Db, id: &InstanceId, name: &str) -> Result<(), DbError> {
    const BEAT_SQL: &str = "UPDATE instances SET beat_at = $1 WHERE id = $2";
    let now = UnixMillis::now().0;
    let updated = with_db!(db, pool => sqlx::query(BEAT_SQL).bind(now).bind(id).execute(pool).await
        .map(|r| r.rows_affected()))?;
    if updated == 0 {
        tracing::error!(instance = %id, "this instance was taken for dead (no beat for a while): registering again");
        const INSERT: &str = "INSERT INTO instances (id, name, started_at, beat_at) VALUES ($1, $2, $3, $3)";
        with_db!(db, pool => sqlx::query(INSERT).bind(id).bind(name).bind(now).execute(pool).await.map(drop))?;
    }
    Ok(())
}

/// An instance that stops cleanly (nothing in flight any more) leaves.
pub async fn leave(db: &Db, id: &InstanceId) -> Result<u64, DbError> {
    recover(db, id).await
}

/// Recovers every instance whose beat stopped more than [`DEAD_AFTER`] before `now`.
pub async fn recover_dead(db: &Db, now: UnixMillis) -> Result<Recovered, DbError> {
    const DEAD: &str = "SELECT id FROM instances WHERE beat_at < $1 ORDER BY beat_at LIMIT 100";
    let cutoff = now.0 - DEAD_AFTER.as_millis() as i64;
    let dead: Vec<InstanceId> = with_db!(db, pool => sqlx::query_scalar(DEAD).bind(cutoff).fetch_all(pool).await)?;
    let mut recovered = Recovered::default();
    for instance in dead {
        let released = recover(db, &instance).await?;
        tracing::warn!(%instance, released, "recovered a dead instance: its calls in flight are recorded as interrupted");
        recovered.reservations += released;
        recovered.instances += 1;
    }
    Ok(recovered)
}

/// A reservation of a dead instance, as its row has it.
#[derive(sqlx::FromRow)]
struct Orphan {
    id: String,
    request_id: String,
    endpoint: Option<String>,
    model: Option<String>,
    customer_id: String,
    project_id: String,
    bill_interrupted: bool,
    created_at: i64,
}

/// Releases every reservation of `instance` (recording its call as interrupted) and forgets
/// the instance. Returns how many reservations this call released.
async fn recover(db: &Db, instance: &InstanceId) -> Result<u64, DbError> {
    const ORPHANS: &str = "SELECT r.id, r.request_id, r.endpoint, r.model, r.customer_id, \
        c.project_id, p.bill_interrupted, r.created_at \
        FROM reservations r JOIN customers c ON c.id = r.customer_id JOIN projects p ON p.id = c.project_id \
        WHERE r.instance_id = $1 ORDER BY r.id LIMIT 500";
    const FORGET: &str = "DELETE FROM instances WHERE id = $1";
    const FORGET_CALLS: &str = "DELETE FROM calls_in_flight WHERE instance_id = $1";
    let mut released = 0;
    loop {
        let orphans: Vec<Orphan> = with_db!(db, pool => sqlx::query_as(ORPHANS).bind(instance).fetch_all(pool).await)?;
        if orphans.is_empty() {
            break;
        }
        for orphan in &orphans {
            if release_orphan(db, orphan).await? {
                released += 1;
            }
        }
    }
    with_db!(db, pool => sqlx::query(FORGET_CALLS).bind(instance).execute(pool).await.map(drop))?;
    with_db!(db, pool => sqlx::query(FORGET).bind(instance).execute(pool).await.map(drop))?;
    Ok(released)
}

/// A call a lease held, as `calls_in_flight` has it.
#[derive(sqlx::FromRow)]
struct LeasedCall {
    event_id: UsageEventId,
    request_id: String,
    endpoint: String,
    model: String,
    amount_nanos: i64,
}

/// In one transaction: the reservation deleted (by whoever gets there first), its customer
/// unheld (and charged, if the project bills interrupted calls), an interrupted event written
/// for each call it held (see the module docs).
async fn release_orphan(db: &Db, orphan: &Orphan) -> Result<bool, DbError> {
    const FREE: &str = "DELETE FROM reservations WHERE id = $1 RETURNING amount_nanos";
    // A call whose event exists settled (its row is removed a moment later, off the hot path).
    const CALLS: &str = "SELECT c.event_id, c.request_id, c.endpoint, c.model, c.amount_nanos FROM calls_in_flight c \
        WHERE c.reservation_id = $1 AND NOT EXISTS (SELECT 1 FROM usage_events e WHERE e.id = c.event_id) \
        ORDER BY c.started_at, c.event_id";
    const FORGET_CALLS: &str = "DELETE FROM calls_in_flight WHERE reservation_id = $1";
    const SETTLED: &str = "SELECT CAST(1 AS BIGINT) FROM usage_events WHERE customer_id = $1 AND created_at >= $2 AND request_id = $3 \
        AND status <> 'interrupted' LIMIT 1";
    const UNHOLD: &str =
        "UPDATE customers SET reserved_nanos = reserved_nanos - $1, spent_nanos = spent_nanos + $2 WHERE id = $3";
    const EVENT: &str = "INSERT INTO usage_events (id, project_id, customer_id, request_id, endpoint, model, status, \
        reason, reserved_nanos, cost_nanos, billed_nanos, usage_source, latency_ms, created_at) \
        VALUES ($1, $2, $3, $4, $5, $6, 'interrupted', $7, $8, 0, $9, 'none', 0, $10)";
    let reason = if orphan.bill_interrupted {
        "the process serving the call stopped mid-call; billed at what it had reserved"
    } else {
        "the process serving the call stopped mid-call; not billed"
    };
    let now = UnixMillis::now().0;
    Ok(with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        let freed: Option<i64> = sqlx::query_scalar(FREE).bind(&orphan.id).fetch_optional(&mut *tx).await?;
        let Some(amount) = freed else {
            // Settled, expired or recovered by someone else meanwhile.
            tx.rollback().await?;
            return Ok::<_, sqlx::Error>(false);
        };
        let mut calls: Vec<LeasedCall> = sqlx::query_as(CALLS).bind(&orphan.id).fetch_all(&mut *tx).await?;
        // A lease whose taking call has settled holds only spare (a busy customer's lease
        // lingers a moment after its last call): freed, with no event and no charge. (A call
        // carved from it in the last quarter second, not journaled yet, then goes unrecorded:
        // the customer is never charged for spare, at worst not charged for that call.)
        let spare_only = calls.is_empty()
            && sqlx::query_scalar::<_, i64>(SETTLED)
                .bind(&orphan.customer_id)
                .bind(orphan.created_at)
                .bind(&orphan.request_id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
        if calls.is_empty() && !spare_only {
            // A call's own row, or a lease none of whose calls was written yet.
            calls.push(LeasedCall {
                event_id: UsageEventId::generate(),
                request_id: orphan.request_id.clone(),
                endpoint: orphan.endpoint.clone().unwrap_or_else(|| "unknown".to_owned()),
                model: orphan.model.clone().unwrap_or_else(|| "unknown".to_owned()),
                amount_nanos: amount,
            });
        }
        // Each call's share, out of what the row held (never more, whatever the table says).
        let (mut left, mut billed_in_all) = (amount, 0);
        for call in &calls {
            let share = call.amount_nanos.clamp(0, left);
            left -= share;
            let billed = if orphan.bill_interrupted { share } else { 0 };
            billed_in_all += billed;
            sqlx::query(EVENT)
                .bind(&call.event_id)
                .bind(&orphan.project_id)
                .bind(&orphan.customer_id)
                .bind(&call.request_id)
                .bind(&call.endpoint)
                .bind(&call.model)
                .bind(reason)
                .bind(share)
                .bind(billed)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(UNHOLD).bind(amount).bind(billed_in_all).bind(&orphan.customer_id).execute(&mut *tx).await?;
        sqlx::query(FORGET_CALLS).bind(&orphan.id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }
    .await)?)
}

/// Writes what [`crate::ledger::lease::Leases::journal`] gave: calls of instance `instance`
/// held by leases and still in flight, added to `calls_in_flight`; those of them that ended
/// since, removed. One transaction.
pub async fn journal(db: &Db, instance: &InstanceId, due: &[InFlight], ended: &[UsageEventId]) -> Result<(), DbError> {
    // Rows per statement: 9 parameters each, well inside both databases' limits.
    const CHUNK: usize = 500;
    if due.is_empty() && ended.is_empty() {
        return Ok(());
    }
    Ok(with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        for chunk in ended.chunks(CHUNK) {
            let mut delete = sqlx::QueryBuilder::new("DELETE FROM calls_in_flight WHERE event_id IN (");
            let mut ids = delete.separated(", ");
            for id in chunk {
                ids.push_bind(id);
            }
            delete.push(")");
            delete.build().execute(&mut *tx).await?;
        }
        for chunk in due.chunks(CHUNK) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO calls_in_flight (event_id, instance_id, reservation_id, customer_id, request_id, \
                 endpoint, model, amount_nanos, started_at) ",
            );
            insert.push_values(chunk, |mut row, call| {
                row.push_bind(&call.call)
                    .push_bind(instance)
                    .push_bind(&call.lease)
                    .push_bind(&call.customer)
                    .push_bind(&call.request_id)
                    .push_bind(&call.endpoint)
                    .push_bind(&call.model)
                    .push_bind(call.amount.0)
                    .push_bind(call.started_at.0);
            });
            insert.push(" ON CONFLICT (event_id) DO NOTHING");
            insert.build().execute(&mut *tx).await?;
        }
        tx.commit().await
    }
    .await)?)
}

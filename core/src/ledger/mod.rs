//! The ledger: budget reserved before a call, settled (or released) after it, and the usage
//! event that records the outcome. This is where "no end-customer ever spends past their
//! budget" is kept.
//!
//! - A reservation ([`reserve`]) is one conditional `UPDATE`: it adds to `reserved_nanos` only
//!   if `spent + reserved + amount <= budget` holds *on the row as it is when the update runs*
//!   (PostgreSQL re-checks the condition after taking the row lock; SQLite serialises
//!   writers). No read-compute-write, so concurrent calls, replicas and processes cannot
//!   oversubscribe a budget. A period that has ended is rolled over in the same statement. On
//!   PostgreSQL the hold, its record and what a refusal needs to know are one statement (one
//!   round trip); on SQLite, statements in one transaction sent as one text (one call into the
//!   connection's thread, see [`Frame`]).
//! - A settlement ([`Ledger::settle`]) deletes the reservation (at most once: the row is
//!   gone after), unholds what it held, moves the actual billed cost into `spent_nanos`, and
//!   writes the usage event, atomically (on PostgreSQL one statement of data-modifying CTEs;
//!   on SQLite one text, under the write lock its transaction took first). A reservation
//!   already released by expiry is not released twice.
//! - [`Ledger`] is how the proxy does both: writer tasks take reservations and settlements
//!   from a channel and apply them in batches, one transaction (one commit, one fsync) per
//!   batch, answering each caller only once its batch has committed (group commit). A batch
//!   of several is one statement on PostgreSQL ([`batch_pg`]) and one text on SQLite
//!   ([`batch_sqlite`]) doing what its operations would do one after the other, under the
//!   same locks; a batch that fails is retried one operation at a time, each the statement
//!   above, so one bad operation cannot fail the others.
//! - A busy customer's calls share a *lease* ([`lease`], [`Ledger::reserve_leased`]): one
//!   reservation made as above, from which the calls that overlap in this process take their
//!   worst case in memory; each settlement shrinks it by what its call billed, and its last
//!   call's deletes it.
//! - [`renew`] keeps a long call's reservation from expiring under it.
//! - [`release_expired`] frees reservations whose call never settled (a crashed process).

use std::sync::{Arc, LazyLock};

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, Postgres, Row, Sqlite, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use crate::config::SqliteSync;
use crate::db::{Db, DbError};
use crate::ids::{CustomerId, InstanceId, ProjectId, ReservationId, UsageEventId};
use crate::money::Nanos;
use crate::period::{BudgetPeriod, ROLLING_DAYS};
use crate::pricing::TokenUsage;
use crate::projects::{Customer, NewCustomer, create_customer_pg, create_customer_sqlite};
use crate::time::UnixMillis;
use crate::with_db;

mod batch;
mod batch_pg;
mod batch_sqlite;
pub mod lease;

/// Budget held for one call in flight.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// The row that holds it: the call's own, or the lease it was carved from.
    pub id: ReservationId,
    pub customer_id: CustomerId,
    pub amount: Nanos,
    held: Held,
    /// For a call held by a lease: the id its usage event will have (see [`lease::InFlight`]).
    call: Option<UsageEventId>,
}

impl Reservation {
    /// Whether the call's share was carved from a lease (see [`lease`]) rather than held alone.
    pub fn is_leased(&self) -> bool {
        self.held == Held::Leased
    }
}

/// How a reservation holds its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// A row of its own ([`Ledger::reserve`], [`reserve`]).
    Alone,
    /// A row of its own, counted among its customer's calls in flight in this process
    /// ([`Ledger::reserve_leased`]: a customer with calls in flight may get a lease).
    Counted,
    /// A share of a lease's row ([`Ledger::reserve_leased`]).
    Leased,
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
    /// The customer is not as the caller described it: its row is gone (deleted) or its
    /// period changed. Nothing was held; look the customer up again and retry.
    Unknown,
}

/// A reservation to make: `amount` of the customer's budget, held until settled, released,
/// or `expires_at`. `period` is the customer's budget period as the caller knows it (a
/// reservation against a customer whose period changed since is [`ReserveOutcome::Unknown`]).
#[derive(Debug, Clone)]
pub struct Hold {
    pub customer_id: CustomerId,
    pub period: BudgetPeriod,
    pub amount: Nanos,
    pub request_id: String,
    pub expires_at: UnixMillis,
    /// Chosen before the first attempt, so a retry can never hold twice.
    id: ReservationId,
    /// For a lease: until when its row holds spare budget for calls not made yet (see [`lease`]).
    spare_until: Option<UnixMillis>,
    /// The process instance whose call this is (set by the [`Ledger`] that holds it).
    instance: Option<InstanceId>,
    /// The call's endpoint and model, recorded with its hold (see [`Hold::for_call`]).
    call: Option<(String, String)>,
}

impl Hold {
    pub fn new(
        customer_id: CustomerId,
        period: BudgetPeriod,
        amount: Nanos,
        request_id: String,
        expires_at: UnixMillis,
    ) -> Self {
        Self {
            customer_id,
            period,
            amount,
            request_id,
            expires_at,
            id: ReservationId::generate(),
            spare_until: None,
            instance: None,
            call: None,
        }
    }

    /// Names the call the hold is for, so that should its process die mid-call, the call is
    /// recorded as interrupted under its endpoint and model (see [`crate::instances`]).
    pub fn for_call(mut self, endpoint: &str, model: &str) -> Self {
        self.call = Some((endpoint.to_owned(), model.to_owned()));
        self
    }

    /// A negative amount would add budget: refused before any statement runs.
    fn refused_outright(&self) -> Option<ReserveOutcome> {
        self.amount.is_negative().then_some(ReserveOutcome::Insufficient { remaining: Nanos::ZERO })
    }
}

/// The length of a rolling window, in milliseconds (rolled over in SQL, from the row's own anchor).
const ROLLING_MS: i64 = ROLLING_DAYS * 86_400_000;

/// The hold: a period that has ended is rolled over (calendar periods to `$2..$3`, rolling ones
/// by whole windows from their anchor), and the amount added only if it fits.
macro_rules! hold_sql {
    () => {
        "UPDATE customers SET \
          spent_nanos = CASE WHEN period_end <= $1 THEN 0 ELSE spent_nanos END, \
          period_start = CASE WHEN period_end > $1 THEN period_start \
            WHEN budget_period = 'rolling' THEN period_start + (($1 - period_start) / $10) * $10 ELSE $2 END, \
          period_end = CASE WHEN period_end > $1 THEN period_end \
            WHEN budget_period = 'rolling' THEN period_start + (($1 - period_start) / $10 + 1) * $10 ELSE $3 END, \
          reserved_nanos = reserved_nanos + $4 \
        WHERE id = $5 AND budget_period = $6 AND NOT blocked \
          AND (CASE WHEN period_end <= $1 THEN 0 ELSE spent_nanos END) + reserved_nanos + $4 <= budget_nanos \
        RETURNING budget_nanos - spent_nanos - reserved_nanos AS remaining"
    };
}

/// What a refusal needs to know about the customer: blocked, its period, what it has left.
macro_rules! why_sql {
    () => {
        "c.blocked, c.budget_period, \
         c.budget_nanos - (CASE WHEN c.period_end <= $1 THEN 0 ELSE c.spent_nanos END) - c.reserved_nanos"
    };
}

/// One round trip on PostgreSQL: the hold, its record, and (when nothing was held) the row as
/// this statement's snapshot saw it, to say why.
const RESERVE_PG: &str = concat!(
    "WITH held AS (",
    hold_sql!(),
    "), recorded AS (INSERT INTO reservations (id, customer_id, amount_nanos, request_id, created_at, expires_at, \
     spare_until, instance_id, endpoint, model) SELECT $7, $5, $4, $8, $1, $9, $11, $12, $13, $14 FROM held) \
     SELECT held.remaining, ",
    why_sql!(),
    " FROM (SELECT 1) AS one LEFT JOIN held ON TRUE LEFT JOIN customers c ON c.id = $5"
);
/// On SQLite, the hold, its record only if the hold was made (`changes()` counts the
/// update's rows), and the customer as it is when nothing was held, to say why: one call into
/// the connection's thread.
const RESERVE_SQLITE: &str = concat!(
    hold_sql!(),
    "; INSERT INTO reservations (id, customer_id, amount_nanos, request_id, created_at, expires_at, spare_until, \
     instance_id, endpoint, model) SELECT $7, $5, $4, $8, $1, $9, $11, $12, $13, $14 WHERE changes() = 1; \
     SELECT ",
    why_sql!(),
    " FROM customers c WHERE c.id = $5 AND NOT EXISTS (SELECT 1 FROM reservations WHERE id = $7)"
);

/// The row a reservation attempt reports: what is left if held, else the customer as seen.
type ReserveRow = (Option<i64>, Option<bool>, Option<String>, Option<i64>);

fn reserve_outcome(hold: &Hold, row: ReserveRow) -> ReserveOutcome {
    match row {
        (Some(remaining), ..) => ReserveOutcome::Reserved {
            reservation: Reservation {
                id: hold.id.clone(),
                customer_id: hold.customer_id.clone(),
                amount: hold.amount,
                held: Held::Alone,
                call: None,
            },
            remaining: Nanos(remaining),
        },
        (None, Some(true), ..) => ReserveOutcome::Blocked,
        (None, Some(false), Some(period), Some(remaining))
            if period == hold.period.as_str() && remaining < hold.amount.0 =>
        {
            ReserveOutcome::Insufficient { remaining: Nanos(remaining.max(0)) }
        }
        // Gone, another period, or a snapshot older than the row the update saw: look again.
        _ => ReserveOutcome::Unknown,
    }
}

/// The parameters every reservation statement shares (`$1`–`$3`): now and the calendar window.
fn hold_window(hold: &Hold) -> (UnixMillis, i64, i64) {
    let now = UnixMillis::now();
    let (start, end) = hold.period.window(now);
    (now, start, end)
}

/// Binds a reservation's `$1`…`$14`: now, the calendar window, the hold, the rolling window,
/// and the hold's spare, instance and call.
macro_rules! bind_hold {
    ($query:expr, $hold:expr, $now:expr, $start:expr, $end:expr) => {
        $query
            .bind($now.0)
            .bind($start)
            .bind($end)
            .bind($hold.amount.0)
            .bind(&$hold.customer_id)
            .bind($hold.period.as_str())
            .bind(&$hold.id)
            .bind(&$hold.request_id)
            .bind($hold.expires_at.0)
            .bind(ROLLING_MS)
            .bind($hold.spare_until.map(|t| t.0))
            .bind(&$hold.instance)
            .bind($hold.call.as_ref().map(|c| c.0.as_str()))
            .bind($hold.call.as_ref().map(|c| c.1.as_str()))
    };
}

async fn reserve_pg(conn: &mut PgConnection, hold: &Hold) -> Result<ReserveOutcome, sqlx::Error> {
    let (now, start, end) = hold_window(hold);
    let row: ReserveRow = bind_hold!(sqlx::query_as(RESERVE_PG), hold, now, start, end).fetch_one(conn).await?;
    Ok(reserve_outcome(hold, row))
}

/// Within the batch's transaction, which `frame` opens and commits around it.
async fn reserve_sqlite(conn: &mut SqliteConnection, hold: &Hold, frame: Frame) -> Result<ReserveOutcome, sqlx::Error> {
    let (now, start, end) = hold_window(hold);
    let rows =
        bind_hold!(sqlx::query(RESERVE_SQLITE_FRAMED.get(frame)), hold, now, start, end).fetch_all(&mut *conn).await?;
    // One row: the hold's (one column) or the refusal's (three); none: the customer is gone.
    let row = match rows.first() {
        Some(held) if held.len() == 1 => (Some(held.try_get(0)?), None, None, None),
        Some(why) => (None, Some(why.try_get(0)?), Some(why.try_get(1)?), Some(why.try_get(2)?)),
        None => (None, None, None, None),
    };
    Ok(reserve_outcome(hold, row))
}

/// Holds `amount` of `customer`'s budget until settled, released, or `expires_at`, on its own
/// (the proxy goes through [`Ledger::reserve`], which batches).
pub async fn reserve(
    db: &Db,
    customer: &Customer,
    amount: Nanos,
    request_id: &str,
    expires_at: UnixMillis,
) -> Result<ReserveOutcome, DbError> {
    let hold = Hold::new(customer.id.clone(), customer.period(), amount, request_id.to_owned(), expires_at);
    if let Some(refused) = hold.refused_outright() {
        return Ok(refused);
    }
    apply_alone(db, &Op::Reserve(hold)).await.map(|done| match done {
        Done::Reserved(outcome) => outcome,
        _ => ReserveOutcome::Unknown,
    })
}

/// The most a reservation of a customer could get now, and whether it is blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Available {
    pub blocked: bool,
    pub amount: Nanos,
}

/// The most any reservation of `customer` could get now, read without holding anything:
/// what its row has left (a period that has ended counting as unspent, as a hold rolls it
/// over), plus all its leases hold, some of which they may give back (see [`lease`]). A
/// call whose worst case is above it is refused by any reservation; `None`: no such customer.
pub async fn most_available(db: &Db, customer: &CustomerId) -> Result<Option<Available>, DbError> {
    const MOST: &str = "SELECT c.blocked, c.budget_nanos - (CASE WHEN c.period_end <= $1 THEN 0 ELSE c.spent_nanos END)         - c.reserved_nanos + CAST(COALESCE((SELECT SUM(r.amount_nanos) FROM reservations r         WHERE r.customer_id = c.id AND r.spare_until IS NOT NULL), 0) AS BIGINT)         FROM customers c WHERE c.id = $2";
    let row: Option<(bool, i64)> = with_db!(db, pool => sqlx::query_as(MOST)
        .bind(UnixMillis::now().0).bind(customer).fetch_optional(pool).await)?;
    Ok(row.map(|(blocked, amount)| Available { blocked, amount: Nanos(amount) }))
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
    /// Whether the budget lowered the call's max output (the `clamp` policy).
    pub clamped: bool,
}

/// A settlement to make: the call's reservation (if any) freed, its record charged and written.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub reservation: Option<Reservation>,
    pub record: UsageRecord,
    /// Chosen before the first attempt, so a retry can never record (or charge) twice.
    event_id: UsageEventId,
    /// What to free of a lease's row, which stays; none: the reservation's row is deleted,
    /// freeing all it holds (a call's own, or a lease's last call).
    part: Option<Nanos>,
}

impl Settlement {
    pub fn new(reservation: Option<Reservation>, record: UsageRecord) -> Self {
        let event_id = reservation.as_ref().and_then(|r| r.call.clone()).unwrap_or_else(UsageEventId::generate);
        Self { reservation, record, event_id, part: None }
    }
}

/// The usage event's insert, its 19 columns bound as `$1`–`$19` (see [`bind_event!`]), and
/// `clamped` as `$22` (bound after the hold's `$20` and `$21`).
macro_rules! event_sql {
    () => {
        "INSERT INTO usage_events (id, project_id, customer_id, request_id, endpoint, model, status, \
            reason, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, \
            reserved_nanos, cost_nanos, billed_nanos, usage_source, latency_ms, created_at, clamped) \
          VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $22)"
    };
}

/// One round trip on PostgreSQL, atomic: free the hold (`$20`: its row, deleted; or, with
/// `$21`, that much of a lease's row), charge, record the event.
const SETTLE_PG: &str = concat!(
    "WITH freed AS (DELETE FROM reservations WHERE id = $20 AND $21::BIGINT IS NULL RETURNING amount_nanos), \
    shrunk AS (UPDATE reservations SET amount_nanos = amount_nanos - $21 \
      WHERE id = $20 AND $21::BIGINT IS NOT NULL RETURNING $21::BIGINT AS amount_nanos), \
    released AS (SELECT amount_nanos FROM freed UNION ALL SELECT amount_nanos FROM shrunk), \
    charged AS (UPDATE customers SET \
        reserved_nanos = reserved_nanos - COALESCE((SELECT amount_nanos FROM released), 0), \
        spent_nanos = spent_nanos + $16 \
      WHERE id = $3 AND (EXISTS (SELECT 1 FROM released) OR $16 <> 0) \
      RETURNING budget_nanos - spent_nanos - reserved_nanos AS remaining), \
    event AS (",
    event_sql!(),
    ") SELECT (SELECT remaining FROM charged)"
);
/// The same on SQLite, as statements run in order by one call into the connection's thread:
/// charge (and unhold what the reservation still holds, or `$21` of its lease), free the
/// hold, record the event.
const SETTLE_SQLITE: &str = concat!(
    "UPDATE customers SET \
        reserved_nanos = reserved_nanos - COALESCE((SELECT COALESCE($21, amount_nanos) FROM reservations WHERE id = $20), 0), \
        spent_nanos = spent_nanos + $16 \
      WHERE id = $3 AND (EXISTS (SELECT 1 FROM reservations WHERE id = $20) OR $16 <> 0) \
      RETURNING budget_nanos - spent_nanos - reserved_nanos; \
    DELETE FROM reservations WHERE id = $20 AND $21 IS NULL; \
    UPDATE reservations SET amount_nanos = amount_nanos - $21 WHERE id = $20 AND $21 IS NOT NULL; ",
    event_sql!()
);

/// Binds a usage event's 19 columns, in `usage_events`' order, to `$query`.
macro_rules! bind_event {
    ($query:expr, $s:expr) => {{
        let (r, t) = (&$s.record, &$s.record.tokens);
        $query
            .bind(&$s.event_id)
            .bind(&r.project_id)
            .bind(&r.customer_id)
            .bind(&r.request_id)
            .bind(&r.endpoint)
            .bind(&r.model)
            .bind(r.status.as_str())
            .bind(&r.reason)
            .bind(t.input)
            .bind(t.cached_input)
            .bind(t.cache_write)
            .bind(t.output)
            .bind(t.reasoning)
            .bind(r.reserved.0)
            .bind(r.cost.0)
            .bind(r.billed.0)
            .bind(r.source.as_str())
            .bind(r.latency_ms)
            .bind(UnixMillis::now().0)
    }};
}

async fn settle_pg(conn: &mut PgConnection, s: &Settlement) -> Result<Option<Nanos>, sqlx::Error> {
    let reservation_id = s.reservation.as_ref().map(|r| &r.id);
    let remaining: Option<i64> = bind_event!(sqlx::query_scalar::<_, Option<i64>>(SETTLE_PG), s)
        .bind(reservation_id)
        .bind(s.part.map(|p| p.0))
        .bind(s.record.clamped)
        .fetch_one(conn)
        .await?;
    Ok(remaining.map(Nanos))
}

/// Within the batch's transaction, which `frame` opens and commits around it.
async fn settle_sqlite(
    conn: &mut SqliteConnection,
    s: &Settlement,
    frame: Frame,
) -> Result<Option<Nanos>, sqlx::Error> {
    let reservation_id = s.reservation.as_ref().map(|r| &r.id);
    let rows = bind_event!(sqlx::query(SETTLE_SQLITE_FRAMED.get(frame)), s)
        .bind(reservation_id)
        .bind(s.part.map(|p| p.0))
        .bind(s.record.clamped)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.first().map(|charged| charged.try_get(0)).transpose()?.map(Nanos))
}

// ---------------------------------------------------------------------------------------
// SQLite: one call into the connection's thread per operation

/// What the statements of an operation open and close around it on SQLite. Every statement
/// sqlx runs is a message to the connection's own thread and an answer back; an operation's
/// statements, the batch's `BEGIN` and its `COMMIT` sent as one text make a batch of one
/// operation a single such exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    open: Open,
    commit: bool,
}

/// How the operation opens the batch's transaction, if it is the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// Within the transaction already.
    No,
    /// `BEGIN IMMEDIATE`: the write lock from the start, so a refusal's reads see what its
    /// writes saw.
    Begin,
    /// `synchronous` set to `NORMAL` first (see [`Commit::Relaxed`]).
    BeginRelaxed,
}

impl Open {
    /// In the order of their discriminants.
    const ALL: [Open; 3] = [Open::No, Open::Begin, Open::BeginRelaxed];

    fn sql(self) -> &'static str {
        match self {
            Open::No => "",
            Open::Begin => "BEGIN IMMEDIATE; ",
            Open::BeginRelaxed => "PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE; ",
        }
    }
}

/// An operation's statements in each frame (built once; prepared once per connection).
struct Framed(Vec<String>);

impl Framed {
    fn new(body: &str) -> Self {
        Self(
            Open::ALL
                .iter()
                .flat_map(|open| [format!("{}{body}", open.sql()), format!("{}{body}; COMMIT", open.sql())])
                .collect(),
        )
    }

    fn get(&'static self, frame: Frame) -> &'static str {
        // Built in `Open::ALL`'s order, each without and with the commit.
        &self.0[frame.open as usize * 2 + usize::from(frame.commit)]
    }
}

static RESERVE_SQLITE_FRAMED: LazyLock<Framed> = LazyLock::new(|| Framed::new(RESERVE_SQLITE));
static SETTLE_SQLITE_FRAMED: LazyLock<Framed> = LazyLock::new(|| Framed::new(SETTLE_SQLITE));

// ---------------------------------------------------------------------------------------
// Group commit

/// One ledger operation.
#[derive(Debug, Clone)]
enum Op {
    Reserve(Hold),
    Settle(Box<Settlement>),
    /// A customer's first call creates it (through the writer: on SQLite, a write beside the
    /// writer's would wait for its lock, sleeping).
    Customer(NewCustomer),
}

impl Op {
    /// The customer row it locks, if any: it picks the writer, and batches apply operations in
    /// this order (rows locked in one order by every batch cannot deadlock each other).
    fn customer(&self) -> Option<&CustomerId> {
        match self {
            Op::Reserve(hold) => Some(&hold.customer_id),
            Op::Settle(s) => s.record.customer_id.as_ref(),
            Op::Customer(_) => None,
        }
    }

    /// Its name on the ledger's metrics.
    fn kind(&self) -> &'static str {
        match self {
            Op::Reserve(_) => "reserve",
            Op::Settle(_) => "settle",
            Op::Customer(_) => "customer",
        }
    }
}

#[derive(Debug)]
enum Done {
    Reserved(ReserveOutcome),
    Settled(Option<Nanos>),
    Customer(Option<Customer>),
    /// A hold that did not fit behind its batch's earlier holds of its customer but may on its
    /// own (see [`batch_pg`]): the writer applies it in its next batch.
    Again,
}

async fn apply_pg(conn: &mut PgConnection, op: &Op) -> Result<Done, sqlx::Error> {
    Ok(match op {
        Op::Reserve(hold) => Done::Reserved(reserve_pg(conn, hold).await?),
        Op::Settle(s) => Done::Settled(settle_pg(conn, s).await?),
        Op::Customer(new) => Done::Customer(create_customer_pg(conn, new).await?),
    })
}

async fn apply_sqlite(conn: &mut SqliteConnection, op: &Op, frame: Frame) -> Result<Done, sqlx::Error> {
    Ok(match op {
        Op::Reserve(hold) => Done::Reserved(reserve_sqlite(conn, hold, frame).await?),
        Op::Settle(s) => Done::Settled(settle_sqlite(conn, s, frame).await?),
        // A customer's creation is several statements of its own: the frame goes apart.
        Op::Customer(new) => {
            if frame.open != Open::No {
                sqlx::raw_sql(frame.open.sql()).execute(&mut *conn).await?;
            }
            let created = create_customer_sqlite(conn, new).await?;
            if frame.commit {
                sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
            }
            Done::Customer(created)
        }
    })
}

/// A batch's reservations and settlements, each kind in `ops`' order (its customers apart).
fn split<'a>(ops: &[&'a Op]) -> (Vec<&'a Settlement>, Vec<&'a Hold>) {
    let settlements = ops.iter().filter_map(|op| if let Op::Settle(s) = op { Some(&**s) } else { None }).collect();
    let holds = ops.iter().filter_map(|op| if let Op::Reserve(h) = op { Some(h) } else { None }).collect();
    (settlements, holds)
}

/// A batch's answers (settlements first, as [`split`] ordered them) in the order of `ops`,
/// without its customers.
fn merge(ops: &[&Op], decided: Vec<Done>, settlements: usize) -> Result<Vec<Done>, sqlx::Error> {
    let mut decided = decided.into_iter();
    let settled: Vec<_> = decided.by_ref().take(settlements).collect();
    let (mut settled, mut reserved) = (settled.into_iter(), decided);
    let mut done = Vec::with_capacity(ops.len());
    for op in ops {
        let next = match op {
            Op::Settle(_) => settled.next(),
            Op::Reserve(_) => reserved.next(),
            Op::Customer(_) => continue,
        };
        done.push(next.ok_or(sqlx::Error::RowNotFound)?);
    }
    Ok(done)
}

/// A batch's reservations and settlements as one statement (see [`batch_pg`]); the answers in
/// the order of `ops`, without its customers.
async fn apply_pg_batch(conn: &mut PgConnection, ops: &[&Op]) -> Result<Vec<Done>, sqlx::Error> {
    let (settlements, holds) = split(ops);
    if settlements.is_empty() && holds.is_empty() {
        return Ok(Vec::new());
    }
    let decided = batch_pg::apply(conn, &settlements, &holds).await?;
    merge(ops, decided, settlements.len())
}

/// How a writer's batches commit on SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// As the database is configured.
    Configured,
    /// Without waiting for the disk (`synchronous = NORMAL`, WAL); a batch with settlements is
    /// answered once a [`Syncer`] has made the WAL durable after its commit.
    Relaxed,
}

/// A connection a writer keeps between batches (its page cache stays warm, no pool round
/// trip), and on SQLite whether it currently commits [`Commit::Relaxed`]; on PostgreSQL
/// whether it plans the ledger's statements once ([`Conn::acquire_for_writer`]).
enum Conn {
    Postgres { conn: PoolConnection<Postgres>, generic: bool },
    Sqlite { conn: PoolConnection<Sqlite>, relaxed: bool },
}

impl Conn {
    async fn acquire(db: &Db) -> Result<Self, sqlx::Error> {
        Ok(match db {
            Db::Postgres(pool) => Conn::Postgres { conn: pool.acquire().await?, generic: false },
            Db::Sqlite(pool) => Conn::Sqlite { conn: pool.acquire().await?, relaxed: false },
        })
    }

    /// A connection for a writer. On PostgreSQL it uses one generic plan for each prepared
    /// statement: the batch statement is a large one, planned in 1.5–2.6 ms (0.2 ms for its
    /// generic plan, on an idle server), and by default PostgreSQL plans it anew for the first
    /// five executions on each connection, and afterwards whenever it estimates the generic
    /// plan dearer. Its plan does not depend on the values bound (every lookup is by id), so
    /// one plan serves every batch.
    async fn acquire_for_writer(db: &Db) -> Result<Self, sqlx::Error> {
        let mut conn = Self::acquire(db).await?;
        if let Conn::Postgres { conn: pg, generic } = &mut conn {
            // Set already; should it fail, the connection is closed rather than reused.
            *generic = true;
            if let Err(e) = sqlx::query("SET plan_cache_mode = force_generic_plan").execute(&mut **pg).await {
                conn.discard();
                return Err(e);
            }
        }
        Ok(conn)
    }

    /// Applies `ops` in one transaction, in order; nothing of it is kept if any fails.
    async fn apply(&mut self, ops: &[&Op], commit: Commit) -> Result<Vec<Done>, sqlx::Error> {
        let mut done = Vec::with_capacity(ops.len());
        match self {
            // One statement alone is atomic already: no BEGIN and COMMIT round trips.
            Conn::Postgres { conn, .. } if ops.len() == 1 => {
                for op in ops {
                    done.push(apply_pg(conn, op).await?);
                }
            }
            // First-call customers are statements of their own: a transaction around them and
            // the batch's one statement.
            Conn::Postgres { conn, .. } if ops.iter().any(|op| matches!(op, Op::Customer(_))) => {
                let mut tx = conn.begin().await?;
                let mut created = Vec::new();
                for op in ops {
                    if let Op::Customer(new) = op {
                        created.push(Done::Customer(create_customer_pg(&mut tx, new).await?));
                    }
                }
                let mut created = created.into_iter();
                let mut batched = apply_pg_batch(&mut tx, ops).await?.into_iter();
                for op in ops {
                    let next = if matches!(op, Op::Customer(_)) { created.next() } else { batched.next() };
                    done.push(next.ok_or(sqlx::Error::RowNotFound)?);
                }
                tx.commit().await?;
            }
            Conn::Postgres { conn, .. } => done = apply_pg_batch(conn, ops).await?,
            Conn::Sqlite { conn, relaxed } => {
                let relax = commit == Commit::Relaxed;
                let mut open = if relax && !*relaxed { Open::BeginRelaxed } else { Open::Begin };
                // Set already; should anything fail, the connection (and its open transaction,
                // rolled back) is closed, not reused.
                *relaxed = relax;
                // Reservations and settlements only: the whole batch in one text (see [`batch_sqlite`]).
                if ops.len() > 1 && !ops.iter().any(|op| matches!(op, Op::Customer(_))) {
                    let (settlements, holds) = split(ops);
                    let frame = Frame { open, commit: true };
                    let decided = batch_sqlite::apply(conn, &settlements, &holds, frame).await?;
                    return merge(ops, decided, settlements.len());
                }
                for (i, op) in ops.iter().enumerate() {
                    let frame = Frame { open, commit: i + 1 == ops.len() };
                    done.push(apply_sqlite(conn, op, frame).await?);
                    open = Open::No;
                }
            }
        }
        Ok(done)
    }

    /// Gives the connection back to the pool as the pool configured it.
    async fn release(self) {
        let restored = match self {
            Conn::Sqlite { mut conn, relaxed: true } => sqlx::query("PRAGMA synchronous = FULL")
                .execute(&mut *conn)
                .await
                .map(drop)
                .map_err(|_| Conn::Sqlite { conn, relaxed: true }),
            Conn::Postgres { mut conn, generic: true } => sqlx::query("RESET plan_cache_mode")
                .execute(&mut *conn)
                .await
                .map(drop)
                .map_err(|_| Conn::Postgres { conn, generic: true }),
            _ => return,
        };
        if let Err(conn) = restored {
            // Not as configured: closed rather than handed to anyone else.
            conn.discard();
        }
    }

    /// Closes the connection (after an error it may be mid-transaction or relaxed).
    fn discard(self) {
        match self {
            Conn::Postgres { conn, .. } => drop(conn.detach()),
            Conn::Sqlite { conn, .. } => drop(conn.detach()),
        }
    }
}

/// Applies `ops` in one transaction on a connection of its own.
async fn apply_batch(db: &Db, ops: &[&Op], commit: Commit) -> Result<Vec<Done>, sqlx::Error> {
    let mut conn = Conn::acquire(db).await?;
    match conn.apply(ops, commit).await {
        Ok(done) => {
            conn.release().await;
            Ok(done)
        }
        Err(e) => {
            conn.discard();
            Err(e)
        }
    }
}

async fn apply_alone(db: &Db, op: &Op) -> Result<Done, DbError> {
    let mut done = apply_batch(db, &[op], Commit::Configured).await?;
    done.pop().ok_or(DbError::Ledger)
}

/// Makes a SQLite database's commits durable apart from its writer: a batch committed with
/// `synchronous = NORMAL` (written to the WAL file, durable across a crash of the process)
/// waits here for an fsync of the WAL file that starts after its commit, while the writer
/// goes on with the next batch. One fsync covers every batch committed before it, so under
/// load many batches share one. This is the durability `synchronous = FULL` gives (an fsync of
/// the WAL after the commit), without holding the write lock through the fsync.
struct Syncer {
    waiting: std::sync::mpsc::Sender<Vec<(Job, Done)>>,
}

impl Syncer {
    /// A thread of its own (fsync blocks); it ends when the writer drops the syncer.
    fn start(database: &std::path::Path) -> std::io::Result<Self> {
        let (waiting, queue) = std::sync::mpsc::channel::<Vec<(Job, Done)>>();
        let (database, wal) = (database.to_path_buf(), wal_path(database));
        std::thread::Builder::new().name("tollgate-ledger-sync".into()).spawn(move || {
            while let Ok(first) = queue.recv() {
                let mut batches = vec![first];
                batches.extend(queue.try_iter());
                let synced = sync_wal(&database, &wal);
                if let Err(e) = &synced {
                    tracing::error!(error = %e, "could not make the ledger's commits durable");
                }
                for (job, done) in batches.into_iter().flatten() {
                    let outcome = match &synced {
                        Ok(()) => Ok(done),
                        Err(e) => Err(DbError::Durability(e.to_string())),
                    };
                    let _ = job.reply.send(outcome);
                }
            }
        })?;
        Ok(Self { waiting })
    }

    /// Answers `batch` once what it committed is on disk.
    fn answer_when_durable(&self, batch: Vec<(Job, Done)>) {
        if let Err(std::sync::mpsc::SendError(batch)) = self.waiting.send(batch) {
            for (job, _) in batch {
                let _ = job.reply.send(Err(DbError::Ledger));
            }
        }
    }
}

fn wal_path(database: &std::path::Path) -> std::path::PathBuf {
    let mut wal = database.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// An fsync of the WAL file (every frame written before it is on disk). With no WAL file (it
/// was checkpointed into the database and removed), of the database file.
fn sync_wal(database: &std::path::Path, wal: &std::path::Path) -> std::io::Result<()> {
    // Opened read-only and closed again: SQLite keeps no locks on the WAL file itself (they
    // are on the database and its `-shm`), so closing this descriptor releases none of them.
    match std::fs::File::open(wal) {
        Ok(file) => file.sync_data(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::File::open(database)?.sync_data(),
        Err(e) => Err(e),
    }
}

/// An operation waiting for its batch, and who waits for its outcome.
struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done, DbError>>,
}

/// How many operations one transaction takes at most.
const MAX_BATCH: usize = 128;
/// Operations waiting beyond this make their callers wait to enqueue (backpressure).
const QUEUE: usize = 8_192;

/// The proxy's way to the ledger: reservations and settlements applied by writer tasks in
/// batches, one transaction per batch (group commit; see the module docs). One writer on
/// SQLite (it has one writer anyway, and waiting for its lock is slower than a queue), up to
/// four on PostgreSQL, each with its own share of the customers. Cloning is cheap. When the
/// writers are gone every call fails with [`DbError::Ledger`]: the proxy then refuses rather
/// than serve a call it cannot meter.
///
/// On SQLite with `synchronous = FULL`, the writer commits every batch without waiting for
/// the disk (WAL, `NORMAL`: durable across a crash of the process, visible to every other
/// connection at once) and goes on with the next, while a [`Syncer`] thread fsyncs the WAL:
/// a batch with settlements is answered only after an fsync that began after its commit.
/// Reservations (and first-call customers) are answered at once: a reservation lost to a
/// power cut belonged to a call that died with the machine, and a reservation of a call that
/// dies is never charged anyway (housekeeping releases it). What power loss must not take —
/// usage events and spend — is on disk before anyone hears of it, and that fsync also makes
/// every earlier commit durable. PostgreSQL commits every batch durably: there the database
/// can fail apart from the proxy, which carries on.
#[derive(Clone)]
pub struct Ledger {
    /// One queue per writer; a customer's operations always go to the same one.
    writers: Arc<[mpsc::Sender<Job>]>,
    /// Where a hold whose caller stopped waiting is released (see [`Ledger::reserve`]).
    db: Db,
    leases: Arc<lease::Leases>,
    /// This process's life: every hold it makes belongs to it.
    instance: InstanceId,
}

impl Ledger {
    /// Starts the writers on `db` (within a Tokio runtime). They stop once every clone of the
    /// returned handle is dropped and the queue is drained.
    pub fn start(db: Db, sqlite_synchronous: SqliteSync) -> Self {
        let writers = match &db {
            Db::Sqlite(_) => 1,
            Db::Postgres(pool) => (pool.options().get_max_connections() / 2).clamp(1, 4),
        };
        let commit = match (&db, sqlite_synchronous) {
            (Db::Sqlite(_), SqliteSync::Full) => Commit::Relaxed,
            _ => Commit::Configured,
        };
        let writers = (0..writers)
            .map(|_| {
                let (jobs, queue) = mpsc::channel(QUEUE);
                tokio::spawn(write(db.clone(), queue, commit));
                jobs
            })
            .collect();
        let ledger = Self { writers, db, leases: Default::default(), instance: InstanceId::generate() };
        tokio::spawn(journal(Arc::downgrade(&ledger.leases), ledger.db.clone(), ledger.instance.clone()));
        ledger
    }

    /// What this process keeps in memory about its calls in flight (see [`lease`]).
    pub fn lease_table(&self) -> lease::LeaseTableSize {
        self.leases.size()
    }

    /// The process instance this ledger's holds belong to.
    pub fn instance(&self) -> &InstanceId {
        &self.instance
    }

    /// Applies `op` in a batch; its whole wait recorded in [`LEDGER_SECONDS`] when `timed`
    /// (a call carved from a lease, or holding through one, is timed as a whole instead).
    async fn submit(&self, op: Op, timed: bool) -> Result<Done, DbError> {
        // A customer's operations go to one writer: two writers never wait for one row's lock
        // (a hot customer's operations share a batch instead), and they apply in order.
        let writer = match op.customer() {
            Some(customer) if self.writers.len() > 1 => {
                let mut hasher = std::hash::DefaultHasher::new();
                std::hash::Hash::hash(customer, &mut hasher);
                (std::hash::Hasher::finish(&hasher) % self.writers.len() as u64) as usize
            }
            _ => 0,
        };
        let (kind, queued) = (op.kind(), std::time::Instant::now());
        let (reply, outcome) = oneshot::channel();
        let reserves = matches!(op, Op::Reserve(_));
        self.writers[writer].send(Job { op, reply }).await.map_err(|_| DbError::Ledger)?;
        let mut waiting = Waiting { outcome: Some(outcome), db: reserves.then(|| self.db.clone()) };
        let outcome = waiting.outcome().await;
        if timed {
            metrics::histogram!(LEDGER_SECONDS, "op" => kind).record(queued.elapsed().as_secs_f64());
        }
        outcome
    }

    /// [`reserve`], batched with other calls' operations.
    pub async fn reserve(&self, hold: Hold) -> Result<ReserveOutcome, DbError> {
        self.reserve_timed(hold, true).await
    }

    async fn reserve_timed(&self, mut hold: Hold, timed: bool) -> Result<ReserveOutcome, DbError> {
        if let Some(refused) = hold.refused_outright() {
            return Ok(refused);
        }
        hold.instance = Some(self.instance.clone());
        match self.submit(Op::Reserve(hold), timed).await? {
            Done::Reserved(outcome) => Ok(outcome),
            _ => Err(DbError::Ledger),
        }
    }

    /// [`Ledger::reserve`] for a proxied call: carved from its customer's lease when it has
    /// one with room, or held as a new lease when the customer has other calls in flight here
    /// and budget to spare, or else held alone (see [`lease`]). Settled by [`Ledger::settle`]
    /// like any other.
    ///
    /// Leases never refuse what a plain reservation would admit: before a call is refused,
    /// the spare of its customer's leases — this process's, given back at once, and other
    /// processes', given back within [`lease::FRESH`] — is waited for, and the call tried again.
    ///
    /// It is tried again for as long as any lease of the customer still holds spare (up to
    /// [`SPARE_WAIT`]): once on a busy machine a lease may be trimmed late, or another
    /// process may have taken its next lease meanwhile (which it does only while the
    /// customer has many calls' worth left, see [`lease`]), and one retry would then refuse
    /// a call that the budget covers.
    pub async fn reserve_leased(&self, hold: Hold) -> Result<ReserveOutcome, DbError> {
        let started = std::time::Instant::now();
        let mut outcome = self.hold_leased(hold.clone()).await;
        while matches!(outcome, Ok(ReserveOutcome::Insufficient { .. }))
            && started.elapsed() < SPARE_WAIT
            && self.spare_given_back(&hold.customer_id).await?
        {
            outcome = self.hold_leased(hold.clone()).await;
        }
        metrics::histogram!(LEDGER_SECONDS, "op" => "reserve").record(started.elapsed().as_secs_f64());
        outcome
    }

    /// Gives back the spare of `customer`'s leases in this process, and waits for other
    /// processes' leases of it to give theirs back. Returns whether there was any.
    async fn spare_given_back(&self, customer: &CustomerId) -> Result<bool, DbError> {
        let mut any = false;
        for id in self.leases.untrimmed(customer) {
            any |= trim_lease(&self.leases, &self.db, &id).await;
        }
        const ELSEWHERE: &str =
            "SELECT MAX(spare_until) FROM reservations WHERE customer_id = $1 AND spare_until IS NOT NULL";
        let until: Option<i64> =
            with_db!(&self.db, pool => sqlx::query_scalar(ELSEWHERE).bind(customer).fetch_one(pool).await)?;
        if let Some(until) = until {
            // They give it back when it is due (a little after, on a busy machine).
            let due = (until - UnixMillis::now().0).clamp(0, lease::SPARE_FOR.as_millis() as i64) as u64;
            tokio::time::sleep(std::time::Duration::from_millis(due + 50)).await;
            any = true;
        }
        Ok(any)
    }

    async fn hold_leased(&self, hold: Hold) -> Result<ReserveOutcome, DbError> {
        if let Some(refused) = hold.refused_outright() {
            return Ok(refused);
        }
        // A call that comes while another takes its customer's lease waits for it (as long
        // as it would wait to hold alone) rather than hold alone beside it; once.
        let mut may_wait = true;
        let extra = loop {
            let plan = self.leases.plan(&hold, may_wait);
            let how = match &plan {
                lease::Plan::Carved(_) => "carved",
                lease::Plan::Alone => "alone",
                lease::Plan::Lease(_) => "lease",
                lease::Plan::Wait(_) => "waited",
            };
            metrics::counter!(HOLDS_TOTAL, "how" => how).increment(1);
            match plan {
                lease::Plan::Carved(outcome) => return Ok(outcome),
                lease::Plan::Alone => break None,
                lease::Plan::Lease(extra) => break Some(extra),
                lease::Plan::Wait(mut taken) => {
                    may_wait = false;
                    let _ = taken.changed().await;
                }
            }
        };
        // Whatever happens to the attempt (an error, the caller gone), it is accounted for.
        let mut pending = Pending { leases: &self.leases, customer: Some(&hold.customer_id), taking: extra.is_some() };
        if let Some(extra) = extra {
            let spare_until = Some(UnixMillis(UnixMillis::now().0 + lease::SPARE_FOR.as_millis() as i64));
            let more = Hold { amount: Nanos(hold.amount.0 + extra.0), spare_until, ..hold.clone() };
            match self.reserve_timed(more, false).await? {
                // Not that much to spare after all: held alone, if it fits.
                ReserveOutcome::Insufficient { remaining } if remaining >= hold.amount => {
                    self.leases.not_taken(&hold.customer_id);
                    pending.taking = false;
                }
                outcome => {
                    pending.customer = None;
                    let outcome = self.leases.held(&hold, Some(extra), outcome);
                    if matches!(outcome, ReserveOutcome::Reserved { .. }) {
                        // Carved while fresh; then what it has left is given back.
                        let (leases, db, id) = (self.leases.clone(), self.db.clone(), hold.id.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(lease::FRESH).await;
                            trim_lease(&leases, &db, &id).await;
                        });
                    }
                    return Ok(outcome);
                }
            }
        }
        let outcome = self.reserve_timed(hold.clone(), false).await?;
        pending.customer = None;
        Ok(self.leases.held(&hold, None, outcome))
    }

    /// Carves no more from `customer`'s lease in this process (it was changed here: blocked,
    /// its budget or period edited); the next call holds anew. Other processes see the
    /// change within [`lease::FRESH`].
    pub fn forget_lease(&self, customer: &CustomerId) {
        self.leases.forget(customer);
    }

    /// Ends a call: frees its reservation (if still held), charges `record.billed` to the
    /// customer and writes the usage event, atomically, batched with other calls' operations.
    /// Returns once it has committed, with the customer's remaining budget (when there is a
    /// customer). A settlement that lost a lock race (to a write outside the ledger) rolled
    /// back whole, so it is tried again, over about three seconds; its event id is fixed, so
    /// it can never count twice. A call carved from a lease gives back to it what it did not
    /// bill (see [`lease`]).
    pub async fn settle(&self, mut settlement: Settlement) -> Result<Option<Nanos>, DbError> {
        self.leases.settling(&mut settlement);
        let mut wait = std::time::Duration::from_millis(100);
        loop {
            match self.submit(Op::Settle(Box::new(settlement.clone())), true).await {
                Ok(Done::Settled(remaining)) => {
                    if let Some(customer) = &settlement.record.customer_id {
                        self.leases.settled(customer, remaining);
                    }
                    return Ok(remaining);
                }
                Ok(_) => return Err(DbError::Ledger),
                Err(e) if e.is_lock_contention() && wait < std::time::Duration::from_secs(2) => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The customer `new` names, created (with its default budget) if it does not exist yet.
    pub async fn customer(&self, new: NewCustomer) -> Result<Option<Customer>, DbError> {
        match self.submit(Op::Customer(new), true).await? {
            Done::Customer(customer) => Ok(customer),
            _ => Err(DbError::Ledger),
        }
    }
}

/// A call of `customer` planned but not answered yet (and whether it is taking a lease):
/// dropped unanswered, it is no longer in flight.
struct Pending<'a> {
    leases: &'a lease::Leases,
    customer: Option<&'a CustomerId>,
    taking: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(customer) = self.customer {
            self.leases.gone(customer, self.taking);
        }
    }
}

/// A caller waiting for its operation. A reservation's caller that stops waiting (its request
/// was cancelled: the client went away) leaves the hold to be made anyway; it is then
/// released as soon as it is, rather than blocking budget until it expires.
struct Waiting {
    outcome: Option<oneshot::Receiver<Result<Done, DbError>>>,
    /// Set for a reservation: where to release it.
    db: Option<Db>,
}

impl Waiting {
    async fn outcome(&mut self) -> Result<Done, DbError> {
        let Some(outcome) = self.outcome.as_mut() else { return Err(DbError::Ledger) };
        let done = outcome.await.map_err(|_| DbError::Ledger);
        self.outcome = None;
        done?
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let (Some(outcome), Some(db)) = (self.outcome.take(), self.db.take()) else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            if let Ok(Ok(Done::Reserved(ReserveOutcome::Reserved { reservation, .. }))) = outcome.await
                && let Err(e) = release(&db, &reservation.id).await
            {
                tracing::error!(error = %e, "could not release the reservation of a cancelled call; it expires instead");
            }
        });
    }
}

/// A ledger operation's whole wait (queue, batch, commit), by `op`: what the ledger adds to a call.
pub const LEDGER_SECONDS: &str = "tollgate_ledger_seconds";
/// A batch's transaction, from its first statement to its commit.
pub const COMMIT_SECONDS: &str = "tollgate_ledger_commit_seconds";
/// Operations per batch (one transaction, one commit).
pub const BATCH_OPERATIONS: &str = "tollgate_ledger_batch_operations";
/// A proxied call's hold, by `how`: `carved` from a lease in memory, `lease` taken with it,
/// `alone` (a row of its own), and `waited` for a lease being taken (then one of the others).
pub const HOLDS_TOTAL: &str = "tollgate_ledger_holds_total";

/// How long a call that only leases' spare would refuse waits at most for it to be given back
/// (see [`Ledger::reserve_leased`]): a lease's spare is due back within [`lease::SPARE_FOR`],
/// with room for a busy machine.
const SPARE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a writer keeps its connection while nothing comes.
const KEEP_IDLE: std::time::Duration = std::time::Duration::from_millis(200);

/// A writer: takes what is queued (up to [`MAX_BATCH`]), applies it in one transaction,
/// answers, and again; what arrives meanwhile makes the next batch. It keeps its connection
/// between batches while they keep coming (for up to [`KEEP_IDLE`] without any), unless the
/// pool has only one (an in-memory database) to share.
async fn write(db: Db, mut queue: mpsc::Receiver<Job>, commit: Commit) {
    let keep = match &db {
        Db::Sqlite(pool) => pool.options().get_max_connections() > 1,
        Db::Postgres(_) => true,
    };
    let syncer = match &db {
        // An in-memory database has no file: nothing to sync.
        Db::Sqlite(pool) if commit == Commit::Relaxed && pool.connect_options().get_filename().is_file() => {
            Syncer::start(pool.connect_options().get_filename())
                .inspect_err(
                    |e| tracing::warn!(error = %e, "no thread to sync the ledger: each commit waits for the disk"),
                )
                .ok()
        }
        _ => None,
    };
    // Without a syncer, every commit waits for the disk as configured.
    let commit = if syncer.is_some() { Commit::Relaxed } else { Commit::Configured };
    let mut kept: Option<Conn> = None;
    // Operations a batch left for the next (see [`Done::Again`]): they go first.
    let mut again: Vec<Job> = Vec::new();
    loop {
        let mut batch = std::mem::take(&mut again);
        if !batch.is_empty() {
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        } else if kept.is_some() {
            // A quiet spell gives the connection back (a pool being closed waits for it).
            match tokio::time::timeout(KEEP_IDLE, queue.recv_many(&mut batch, MAX_BATCH)).await {
                Ok(_) => {}
                Err(_) => {
                    if let Some(conn) = kept.take() {
                        conn.release().await;
                    }
                }
            }
        }
        if batch.is_empty() && queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            if let Some(conn) = kept {
                conn.release().await;
            }
            return;
        }
        // Rows locked in customer order; a customer's operations in the order they came.
        batch.sort_by(|a, b| a.op.customer().cmp(&b.op.customer()));
        let ops: Vec<&Op> = batch.iter().map(|job| &job.op).collect();
        let settles = ops.iter().any(|op| matches!(op, Op::Settle(_)));
        let conn = match kept.take() {
            Some(conn) => Ok(conn),
            None => Conn::acquire_for_writer(&db).await,
        };
        let started = std::time::Instant::now();
        let applied = match conn {
            Ok(mut conn) => {
                let applied = conn.apply(&ops, commit).await;
                metrics::histogram!(COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
                metrics::histogram!(BATCH_OPERATIONS).record(ops.len() as f64);
                match (&applied, keep) {
                    (Ok(_), true) => kept = Some(conn),
                    (Ok(_), false) => conn.release().await,
                    (Err(_), _) => conn.discard(),
                }
                applied
            }
            Err(e) => Err(e),
        };
        match applied {
            Ok(done) => {
                let (retry, answers): (Vec<_>, Vec<_>) =
                    batch.into_iter().zip(done).partition(|(_, done)| matches!(done, Done::Again));
                again.extend(retry.into_iter().map(|(job, _)| job));
                let answers = answers.into_iter();
                match &syncer {
                    // Only a settlement must be on disk before its caller hears of it; see `Ledger`.
                    Some(syncer) if settles => syncer.answer_when_durable(answers.collect()),
                    _ => {
                        for (job, done) in answers {
                            let _ = job.reply.send(Ok(done));
                        }
                    }
                }
            }
            Err(e) if batch.len() == 1 => {
                tracing::error!(error = %e, "a ledger operation failed");
                if let Some(job) = batch.pop() {
                    let _ = job.reply.send(Err(e.into()));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, operations = batch.len(), "a ledger batch failed; applying its operations one by one");
                for job in batch {
                    let outcome = apply_alone(&db, &job.op).await;
                    if let Err(e) = &outcome {
                        tracing::error!(error = %e, "a ledger operation failed");
                    }
                    let _ = job.reply.send(outcome);
                }
            }
        }
    }
}

/// Writes the calls held by leases that are still in flight to `calls_in_flight` (and
/// removes those that ended), every [`lease::JOURNAL_AFTER`], for as long as the ledger lives
/// (see [`crate::instances`]).
async fn journal(leases: std::sync::Weak<lease::Leases>, db: Db, instance: InstanceId) {
    let mut every = tokio::time::interval(lease::JOURNAL_AFTER);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(leases) = leases.upgrade() else { return };
        let (due, ended) = leases.journal();
        if let Err(e) = crate::instances::journal(&db, &instance, &due, &ended).await {
            tracing::warn!(error = %e, "could not write the calls in flight; trying again");
            leases.unjournal(due, ended);
        }
    }
}

/// Gives back what lease `id` holds for calls not made yet (see [`lease::Leases::trim`]).
/// Returns whether it held any.
async fn trim_lease(leases: &lease::Leases, db: &Db, id: &ReservationId) -> bool {
    let Some(spare) = leases.trim(id) else { return false };
    if let Err(e) = give_back(db, id, spare).await {
        // Held until its last call settles (which deletes its row) instead.
        tracing::warn!(error = %e, reservation = %id, "could not give back a lease's spare");
    }
    spare.0 > 0
}

/// Shrinks lease `id`'s row by `spare` and unholds it from its customer; marks the row as
/// holding no spare. Nothing if the row is gone (its last call settled: all of it was freed).
async fn give_back(db: &Db, id: &ReservationId, spare: Nanos) -> Result<(), DbError> {
    const PG: &str = "WITH r AS (UPDATE reservations SET amount_nanos = amount_nanos - $1, spare_until = NULL \
        WHERE id = $2 RETURNING customer_id) \
        UPDATE customers SET reserved_nanos = reserved_nanos - $1 WHERE id IN (SELECT customer_id FROM r)";
    const UNHOLD: &str = "UPDATE customers SET reserved_nanos = reserved_nanos - $1 \
        WHERE id = (SELECT customer_id FROM reservations WHERE id = $2)";
    const SHRINK: &str = "UPDATE reservations SET amount_nanos = amount_nanos - $1, spare_until = NULL WHERE id = $2";
    match db {
        Db::Postgres(pool) => {
            sqlx::query(PG).bind(spare.0).bind(id).execute(pool).await?;
        }
        Db::Sqlite(pool) => {
            let mut tx = pool.begin().await?;
            sqlx::query(UNHOLD).bind(spare.0).bind(id).execute(&mut *tx).await?;
            sqlx::query(SHRINK).bind(spare.0).bind(id).execute(&mut *tx).await?;
            tx.commit().await?;
        }
    }
    Ok(())
}

/// Pushes a held reservation's expiry to `expires_at` (a long stream keeps its budget held).
/// Returns false when the reservation is gone already (settled, or released by expiry).
pub async fn renew(db: &Db, reservation: &Reservation, expires_at: UnixMillis) -> Result<bool, DbError> {
    const RENEW: &str = "UPDATE reservations SET expires_at = $1 WHERE id = $2";
    let updated = with_db!(db, pool => sqlx::query(RENEW).bind(expires_at.0).bind(&reservation.id).execute(pool).await
        .map(|r| r.rows_affected()))?;
    Ok(updated == 1)
}

/// Frees reservation `id` and what it holds, if it is still there (once, whoever else tries).
/// Returns whether it was.
pub async fn release(db: &Db, id: &ReservationId) -> Result<bool, DbError> {
    const FREE: &str = "DELETE FROM reservations WHERE id = $1 RETURNING customer_id, amount_nanos";
    const UNHOLD: &str = "UPDATE customers SET reserved_nanos = reserved_nanos - $1 WHERE id = $2";
    Ok(with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        let row: Option<(CustomerId, i64)> = sqlx::query_as(FREE).bind(id).fetch_optional(&mut *tx).await?;
        if let Some((customer, amount)) = &row {
            sqlx::query(UNHOLD).bind(*amount).bind(customer).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok::<_, sqlx::Error>(row.is_some())
    }
    .await)?)
}

/// Releases every reservation past its expiry (their calls never settled: a crash, or a
/// process killed mid-call). Each is released exactly once even when several replicas run
/// this at the same time. Returns how many were released.
pub async fn release_expired(db: &Db, now: UnixMillis) -> Result<u64, DbError> {
    const EXPIRED: &str = "SELECT id FROM reservations WHERE expires_at <= $1 ORDER BY expires_at LIMIT 1000";
    let ids: Vec<ReservationId> =
        with_db!(db, pool => sqlx::query_scalar::<_, ReservationId>(EXPIRED).bind(now.0).fetch_all(pool).await)?;
    let mut released = 0;
    for id in ids {
        if release(db, &id).await? {
            released += 1;
        }
    }
    if released > 0 {
        tracing::warn!(released, "released expired reservations (calls that never settled)");
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_frame_opens_and_commits_around_the_same_statements() {
        let framed = Box::leak(Box::new(Framed::new("UPDATE t SET x = $1")));
        let text = |open, commit| framed.get(Frame { open, commit });
        assert_eq!(text(Open::No, false), "UPDATE t SET x = $1");
        assert_eq!(text(Open::No, true), "UPDATE t SET x = $1; COMMIT");
        assert_eq!(text(Open::Begin, false), "BEGIN IMMEDIATE; UPDATE t SET x = $1");
        assert_eq!(text(Open::Begin, true), "BEGIN IMMEDIATE; UPDATE t SET x = $1; COMMIT");
        assert_eq!(
            text(Open::BeginRelaxed, true),
            "PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE; UPDATE t SET x = $1; COMMIT"
        );
    }

    #[test]
    fn the_wal_is_synced_or_else_the_database_it_was_checkpointed_into() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("tollgate.db");
        assert_eq!(wal_path(&database), dir.path().join("tollgate.db-wal"));
        // No database at all: the failure is reported, not hidden.
        assert!(sync_wal(&database, &wal_path(&database)).is_err());
        std::fs::write(&database, b"db").unwrap();
        sync_wal(&database, &wal_path(&database)).unwrap();
        std::fs::write(wal_path(&database), b"wal").unwrap();
        sync_wal(&database, &wal_path(&database)).unwrap();
    }

    #[tokio::test]
    async fn without_its_writers_the_ledger_fails_closed() {
        let (jobs, queue) = mpsc::channel(1);
        drop(queue);
        let db = Db::Sqlite(sqlx::sqlite::SqlitePoolOptions::new().connect_lazy("sqlite::memory:").unwrap());
        let ledger =
            Ledger { writers: Arc::new([jobs]), db, leases: Default::default(), instance: InstanceId::generate() };
        let hold = Hold::new(CustomerId::generate(), BudgetPeriod::Month, Nanos(1), "r".into(), UnixMillis::now());
        assert!(matches!(ledger.reserve(hold).await, Err(DbError::Ledger)));
    }
}

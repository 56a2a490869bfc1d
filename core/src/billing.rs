//! Billing's stored side, between the ledger and Stripe: what provisioning made on the tenant's
//! Stripe account, the outbox of meter events, and the reconciliation against Stripe's meter
//! event summaries. The calls to Stripe are the jobs' (`tollgate-jobs`); everything here is
//! database work, so that the hot path and Stripe meet only in these tables.
//!
//! **Exactly once.** Settled, billable usage events are gathered into *batches* — one per
//! customer and UTC hour at most, each a single meter event. A batch's id is fixed, and its
//! usage events marked with it, in one transaction before the first attempt; the id is the
//! meter event's `identifier` (Stripe refuses a second event with it), and with the attempt's
//! number its `Idempotency-Key`. A batch is marked delivered only once Stripe accepted it, or refused it
//! as a duplicate of the one it already has. Sending again after a crash or a lost answer
//! cannot count twice; a claim (a lease) keeps two workers from sending at once.

use crate::db::{Db, DbError};
use crate::ids::{CustomerId, ProjectId};
use crate::time::UnixMillis;
use crate::with_db;

const HOUR_MS: i64 = 3_600_000;
const MINUTE_MS: i64 = 60_000;
/// Stripe accepts meter events up to 35 days old; a batch is given up on a little before.
pub const MAX_EVENT_AGE_MS: i64 = 35 * 24 * HOUR_MS - HOUR_MS;
/// How long a worker holds a claimed batch or provisioning run before another may take it.
pub const CLAIM_MS: i64 = 60_000;
/// After a failure Stripe says not to retry, provisioning waits for the tenant ("retry now").
pub(crate) const NO_RETRY: i64 = i64::MAX / 2;

/// What provisioning has made for a project, and what it needs to go on.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProjectBilling {
    pub project_id: ProjectId,
    pub project_name: String,
    pub currency: String,
    pub livemode: bool,
    /// Usage settled from this time (when Stripe was connected) is billed.
    pub billing_from: i64,
    pub meter_id: Option<String>,
    pub meter_event_name: Option<String>,
    pub product_id: Option<String>,
    pub price_id: Option<String>,
    pub provision_attempts: i64,
}

impl ProjectBilling {
    /// The meter's event name: fixed per project, so a lost meter id is found again by it.
    pub fn event_name(&self) -> String {
        self.meter_event_name.clone().unwrap_or_else(|| format!("tollgate_usage_{}", self.project_id))
    }

    pub fn is_provisioned(&self) -> bool {
        self.meter_id.is_some() && self.product_id.is_some() && self.price_id.is_some()
    }
}

const PROJECT_BILLING: &str = "SELECT s.project_id, p.name AS project_name, p.currency, s.livemode, \
        s.created_at AS billing_from, s.meter_id, s.meter_event_name, s.product_id, s.price_id, s.provision_attempts \
    FROM stripe_connections s JOIN projects p ON p.id = s.project_id";

pub async fn project_billing(db: &Db, project: &ProjectId) -> Result<Option<ProjectBilling>, DbError> {
    let sql = format!("{PROJECT_BILLING} WHERE s.project_id = $1");
    Ok(
        with_db!(db, pool => sqlx::query_as::<_, ProjectBilling>(sqlx::AssertSqlSafe(sql.clone())).bind(project).fetch_optional(pool).await)?,
    )
}

/// Projects whose provisioning is due (something missing, no backoff running), each claimed
/// for [`CLAIM_MS`] so that one worker provisions a project at a time.
pub async fn claim_projects_to_provision(db: &Db, now: UnixMillis, limit: i64) -> Result<Vec<ProjectBilling>, DbError> {
    const DUE: &str = "SELECT project_id FROM stripe_connections \
        WHERE (meter_id IS NULL OR product_id IS NULL OR price_id IS NULL) AND provision_next_at <= $1 \
        ORDER BY provision_next_at LIMIT $2";
    const CLAIM: &str =
        "UPDATE stripe_connections SET provision_next_at = $1 WHERE project_id = $2 AND provision_next_at <= $3";
    let due: Vec<ProjectId> =
        with_db!(db, pool => sqlx::query_scalar::<_, ProjectId>(DUE).bind(now.0).bind(limit).fetch_all(pool).await)?;
    let mut claimed = Vec::new();
    for project in due {
        let n = with_db!(db, pool => sqlx::query(CLAIM).bind(now.0 + CLAIM_MS).bind(&project).bind(now.0)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 1
            && let Some(billing) = project_billing(db, &project).await?
        {
            claimed.push(billing);
        }
    }
    Ok(claimed)
}

/// Which of the project's Stripe objects provisioning just made (or found).
#[derive(Debug, Clone, Copy)]
pub enum Made<'a> {
    Meter { id: &'a str, event_name: &'a str },
    Product(&'a str),
    Price(&'a str),
}

pub async fn record_made(db: &Db, project: &ProjectId, made: Made<'_>) -> Result<(), DbError> {
    let now = UnixMillis::now().0;
    with_db!(db, pool => async {
        match made {
            Made::Meter { id, event_name } => sqlx::query(
                "UPDATE stripe_connections SET meter_id = $1, meter_event_name = $2, updated_at = $3 WHERE project_id = $4")
                .bind(id).bind(event_name).bind(now).bind(project).execute(pool).await,
            Made::Product(id) => sqlx::query(
                "UPDATE stripe_connections SET product_id = $1, updated_at = $2 WHERE project_id = $3")
                .bind(id).bind(now).bind(project).execute(pool).await,
            Made::Price(id) => sqlx::query(
                "UPDATE stripe_connections SET price_id = $1, updated_at = $2 WHERE project_id = $3")
                .bind(id).bind(now).bind(project).execute(pool).await,
        }
    }.await.map(|_| ()))?;
    Ok(())
}

/// A failed step's outcome: shown on the billing page, and retried after `retry_in` (never,
/// when retrying cannot help, until the tenant asks).
#[derive(Debug, Clone)]
pub struct StepFailure {
    pub message: String,
    pub retry_in_ms: Option<i64>,
}

/// Backoff for provisioning: 10 s × 2ⁿ, capped at one hour.
pub fn provision_backoff_ms(attempts: i64) -> i64 {
    (10_000_i64.saturating_mul(1_i64 << attempts.clamp(0, 20))).min(HOUR_MS)
}

/// Records how the project's provisioning run ended (`None`: done, or nothing failed).
pub async fn record_project_outcome(
    db: &Db,
    project: &ProjectId,
    failure: Option<&StepFailure>,
) -> Result<(), DbError> {
    let now = UnixMillis::now().0;
    match failure {
        None => {
            const OK: &str = "UPDATE stripe_connections SET provision_error = NULL, provision_attempts = 0, \
                provision_next_at = 0 WHERE project_id = $1";
            with_db!(db, pool => sqlx::query(OK).bind(project).execute(pool).await.map(|_| ()))?;
        }
        Some(failure) => {
            const FAILED: &str = "UPDATE stripe_connections SET provision_error = $1, \
                provision_attempts = provision_attempts + 1, provision_next_at = $2 WHERE project_id = $3";
            let next = failure.retry_in_ms.map_or(NO_RETRY, |ms| now + ms);
            let message: String = failure.message.chars().take(500).collect();
            with_db!(db, pool => sqlx::query(FAILED).bind(&message).bind(next).bind(project)
                .execute(pool).await.map(|_| ()))?;
        }
    }
    Ok(())
}

/// An end-customer provisioning has to make (or finish) a Stripe customer and subscription for.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CustomerToProvision {
    pub id: CustomerId,
    pub external_id: String,
    pub email: Option<String>,
    pub stripe_customer_id: Option<String>,
    pub stripe_subscription_id: Option<String>,
    pub stripe_provision_attempts: i64,
    /// Bumped each time a new Stripe customer replaces a deleted one.
    pub stripe_customer_generation: i64,
}

impl CustomerToProvision {
    /// What tells this customer's Stripe objects apart in idempotency keys: its id, and after a
    /// deleted Stripe customer was replaced, which replacement (so Stripe does not answer
    /// the new creation with the deleted customer's).
    pub fn idempotency_tag(&self) -> String {
        match self.stripe_customer_generation {
            0 => self.id.to_string(),
            n => format!("{}-g{n}", self.id),
        }
    }
}

/// The project's customers that need a Stripe customer (they have billable usage to deliver)
/// or a subscription (made or linked, not subscribed yet), each claimed for [`CLAIM_MS`].
pub async fn claim_customers_to_provision(
    db: &Db,
    project: &ProjectBilling,
    now: UnixMillis,
    limit: i64,
) -> Result<Vec<CustomerToProvision>, DbError> {
    const DUE: &str = "SELECT c.id, c.external_id, c.email, c.stripe_customer_id, c.stripe_subscription_id, \
            c.stripe_provision_attempts, c.stripe_customer_generation \
        FROM customers c WHERE c.project_id = $1 AND c.stripe_provision_next_at <= $2 AND ( \
            (c.stripe_customer_id IS NULL AND EXISTS (SELECT 1 FROM usage_events u \
                WHERE u.project_id = $1 AND u.customer_id = c.id AND u.meter_batch_id IS NULL \
                  AND u.status IN ('settled', 'interrupted') AND u.billed_nanos > 0 AND u.created_at >= $3)) \
            OR (c.stripe_customer_id IS NOT NULL AND c.stripe_subscription_id IS NULL \
                AND c.stripe_customer_deleted_at IS NULL)) \
        ORDER BY c.id LIMIT $4";
    const CLAIM: &str =
        "UPDATE customers SET stripe_provision_next_at = $1 WHERE id = $2 AND stripe_provision_next_at <= $3";
    let due: Vec<CustomerToProvision> = with_db!(db, pool => sqlx::query_as::<_, CustomerToProvision>(DUE)
        .bind(&project.project_id).bind(now.0).bind(project.billing_from).bind(limit).fetch_all(pool).await)?;
    let mut claimed = Vec::new();
    for customer in due {
        let n = with_db!(db, pool => sqlx::query(CLAIM).bind(now.0 + CLAIM_MS).bind(&customer.id).bind(now.0)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 1 {
            claimed.push(customer);
        }
    }
    Ok(claimed)
}

/// Records the Stripe customer made for `customer` (never replacing one already set).
pub async fn record_stripe_customer(db: &Db, customer: &CustomerId, stripe_customer_id: &str) -> Result<(), DbError> {
    const SQL: &str = "UPDATE customers SET stripe_customer_id = $1 WHERE id = $2 AND stripe_customer_id IS NULL";
    with_db!(db, pool => sqlx::query(SQL).bind(stripe_customer_id).bind(customer).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// Records the customer's subscription, its status and when it started (Stripe's
/// `start_date`, Unix seconds) as Stripe answered.
pub async fn record_subscription(
    db: &Db,
    customer: &CustomerId,
    subscription_id: &str,
    status: &str,
    started_at: Option<i64>,
) -> Result<(), DbError> {
    const SQL: &str = "UPDATE customers SET stripe_subscription_id = $1, stripe_subscription_status = $2, \
        stripe_subscription_started_at = $3, \
        stripe_provision_error = NULL, stripe_provision_attempts = 0, stripe_provision_next_at = 0 \
        WHERE id = $4 AND stripe_subscription_id IS NULL";
    with_db!(db, pool => sqlx::query(SQL).bind(subscription_id).bind(status).bind(started_at).bind(customer)
        .execute(pool).await.map(|_| ()))?;
    Ok(())
}

pub async fn record_customer_failure(db: &Db, customer: &CustomerId, failure: &StepFailure) -> Result<(), DbError> {
    const SQL: &str = "UPDATE customers SET stripe_provision_error = $1, \
        stripe_provision_attempts = stripe_provision_attempts + 1, stripe_provision_next_at = $2 WHERE id = $3";
    let next = failure.retry_in_ms.map_or(NO_RETRY, |ms| UnixMillis::now().0 + ms);
    let message: String = failure.message.chars().take(500).collect();
    with_db!(db, pool => sqlx::query(SQL).bind(&message).bind(next).bind(customer).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// Provisioning of the customer with this Stripe customer is due again now, if it still has
/// no subscription: something Stripe needed (its billing address, for Stripe Tax) may have
/// arrived.
pub async fn provision_again(db: &Db, project: &ProjectId, stripe_customer: &str) -> Result<bool, DbError> {
    const SQL: &str = "UPDATE customers SET stripe_provision_next_at = 0, stripe_provision_error = NULL \
        WHERE project_id = $1 AND stripe_customer_id = $2 AND stripe_subscription_id IS NULL";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(project).bind(stripe_customer).execute(pool).await
        .map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// "Retry now": provisioning and failed deliveries of the project are due again.
pub async fn retry_now(db: &Db, project: &ProjectId) -> Result<u64, DbError> {
    let now = UnixMillis::now().0;
    let n = with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        sqlx::query("UPDATE stripe_connections SET provision_next_at = 0 WHERE project_id = $1")
            .bind(project).execute(&mut *tx).await?;
        sqlx::query("UPDATE customers SET stripe_provision_next_at = 0 WHERE project_id = $1 AND stripe_provision_error IS NOT NULL")
            .bind(project).execute(&mut *tx).await?;
        let n = sqlx::query("UPDATE meter_batches SET status = 'pending', next_attempt_at = $1, claimed_until = 0 \
                WHERE project_id = $2 AND status = 'failed'")
            .bind(now).bind(project).execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok::<_, sqlx::Error>(n)
    }.await)?;
    Ok(n)
}

// ---------------------------------------------------------------------------------------
// The outbox.

/// A customer whose usage can be invoiced: it has a Stripe customer and a subscription that
/// has not ended. Usage of anyone else waits in the outbox (Stripe would accept the meter
/// events and invoice them nowhere).
const INVOICEABLE: &str = "c.stripe_customer_id IS NOT NULL AND c.stripe_subscription_id IS NOT NULL \
    AND c.stripe_customer_deleted_at IS NULL \
    AND COALESCE(c.stripe_subscription_status, 'active') NOT IN ('canceled', 'incomplete_expired')";

/// Gathers the project's settled, billable usage not yet batched into batches: per customer
/// whose usage can be invoiced, per UTC hour, at most `max_events` events each. Returns how
/// many batches were made.
pub async fn form_batches(db: &Db, project: &ProjectBilling, max_batches: usize) -> Result<usize, DbError> {
    static WAITING: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT u.customer_id, MIN(u.created_at) FROM usage_events u JOIN customers c ON c.id = u.customer_id \
            WHERE u.project_id = $1 AND u.meter_batch_id IS NULL AND u.status IN ('settled', 'interrupted') \
              AND u.billed_nanos > 0 AND u.created_at >= $2 AND {INVOICEABLE} \
            GROUP BY u.customer_id LIMIT $3"
        )
    });
    let Some(event_name) = project.meter_event_name.clone() else { return Ok(0) };
    if !project.is_provisioned() {
        return Ok(0);
    }
    let limit = max_batches as i64;
    let waiting: Vec<(CustomerId, i64)> = with_db!(db, pool => sqlx::query_as::<_, (CustomerId, i64)>(
            sqlx::AssertSqlSafe(WAITING.as_str()))
        .bind(&project.project_id).bind(project.billing_from).bind(limit).fetch_all(pool).await)?;
    let mut made = 0;
    for (customer, first) in waiting {
        let hour_end = first - first.rem_euclid(HOUR_MS) + HOUR_MS;
        if form_batch(db, project, &event_name, &customer, hour_end).await? {
            made += 1;
        }
    }
    Ok(made)
}

/// The most usage events one meter event carries.
const MAX_EVENTS_PER_BATCH: i64 = 5_000;

/// The largest value one meter event may carry: Stripe refuses values of more than 15
/// significant digits ("Adds validation for billing meter event values with more than 15
/// digits", <https://docs.stripe.com/changelog/dahlia/2026-04-22/billing-meter-event-values-validation>).
/// Nano-units make that a million units of the currency, which a large batch in a weak
/// currency reaches.
pub const MAX_METER_EVENT_VALUE: i64 = 999_999_999_999_999;

/// `total` as the values of the meter events that carry it: whole [`MAX_METER_EVENT_VALUE`]s,
/// then the rest; they sum to `total` exactly. A value Stripe takes whole is one part.
pub fn split_value(total: i64) -> Vec<i64> {
    if total <= MAX_METER_EVENT_VALUE {
        return vec![total];
    }
    let mut parts = vec![MAX_METER_EVENT_VALUE; usize::try_from(total / MAX_METER_EVENT_VALUE).unwrap_or(0)];
    if total % MAX_METER_EVENT_VALUE > 0 {
        parts.push(total % MAX_METER_EVENT_VALUE);
    }
    parts
}

async fn form_batch(
    db: &Db,
    project: &ProjectBilling,
    event_name: &str,
    customer: &CustomerId,
    before: i64,
) -> Result<bool, DbError> {
    // `meter_batch_id IS NULL` is repeated outside the subquery: on PostgreSQL a concurrent
    // batcher's rows are re-checked after its commit, so no event lands in two batches.
    const MARK: &str = "UPDATE usage_events SET meter_batch_id = $1 \
        WHERE meter_batch_id IS NULL AND id IN (SELECT id FROM usage_events \
            WHERE project_id = $2 AND customer_id = $3 AND meter_batch_id IS NULL AND status IN ('settled', 'interrupted') \
              AND billed_nanos > 0 AND created_at >= $4 AND created_at < $5 \
            ORDER BY created_at LIMIT $6)";
    const TOTAL: &str = "SELECT CAST(COALESCE(SUM(billed_nanos), 0) AS BIGINT), CAST(COUNT(*) AS BIGINT), \
            CAST(COALESCE(MIN(created_at), 0) AS BIGINT), CAST(COALESCE(MAX(created_at), 0) AS BIGINT) \
        FROM usage_events WHERE meter_batch_id = $1";
    static INSERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "INSERT INTO meter_batches (id, project_id, customer_id, stripe_customer_id, event_name, \
                value_nanos, events, first_at, last_at, status, next_attempt_at, created_at) \
            SELECT $1, $2, c.id, c.stripe_customer_id, $3, $4, $5, $6, $7, 'pending', $8, $8 \
            FROM customers c WHERE c.id = $9 AND {INVOICEABLE}"
        )
    });
    let batch = crate::ids::MeterBatchId::generate();
    let now = UnixMillis::now().0;
    let made = with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        let marked = sqlx::query(MARK).bind(&batch).bind(&project.project_id).bind(customer)
            .bind(project.billing_from).bind(before).bind(MAX_EVENTS_PER_BATCH)
            .execute(&mut *tx).await?.rows_affected();
        if marked == 0 {
            return Ok::<_, sqlx::Error>(false);
        }
        let (value, events, first, last): (i64, i64, i64, i64) =
            sqlx::query_as(TOTAL).bind(&batch).fetch_one(&mut *tx).await?;
        // A value Stripe would refuse for its digits goes as several meter events, each a row
        // of its own (so each is delivered, retried and marked once): the batch's id carries the
        // usage events and the first part, `{id}-1`, `{id}-2`, … the others.
        for (index, part) in split_value(value).into_iter().enumerate() {
            let (id, events) = if index == 0 { (batch.clone(), events) } else { (batch.part(index), 0) };
            let inserted = sqlx::query(sqlx::AssertSqlSafe(INSERT.as_str())).bind(&id).bind(&project.project_id).bind(event_name).bind(part)
                .bind(events).bind(first).bind(last).bind(now).bind(customer)
                .execute(&mut *tx).await?.rows_affected();
            if inserted == 0 {
                // The customer's usage can no longer be invoiced: leave the events waiting.
                return Ok(false);
            }
        }
        tx.commit().await?;
        Ok(true)
    }.await)?;
    Ok(made)
}

/// A batch due for delivery, claimed by this worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueBatch {
    pub id: crate::ids::MeterBatchId,
    pub project_id: ProjectId,
    pub stripe_customer_id: String,
    pub event_name: String,
    pub value_nanos: i64,
    pub last_at: i64,
    pub attempts: i64,
    /// Set when claimed (see [`meter_timestamp`]), kept while it is inside the late-usage
    /// window.
    pub meter_timestamp: Option<i64>,
    /// The meter event's identifier when it is not the batch id: a batch Stripe accepted, then
    /// reported as failed, is sent again under another (see [`crate::meter_errors`]).
    pub meter_identifier: Option<String>,
}

impl DueBatch {
    /// The meter event's `identifier`: the batch id, unless Stripe already has that one.
    pub fn identifier(&self) -> String {
        self.meter_identifier.clone().unwrap_or_else(|| self.id.to_string())
    }

    /// The meter event's timestamp (Unix seconds).
    pub fn timestamp(&self) -> i64 {
        self.meter_timestamp.unwrap_or_else(|| self.last_at.div_euclid(1000))
    }
}

/// The timestamp (Unix seconds) of a meter event for usage that ended at `last_at` (Unix ms),
/// sent at `now`, for a subscription that began at `subscription_start` (Unix seconds):
/// Stripe invoices usage only inside a subscription's periods, and an ended period only
/// while its invoice is a draft (the finalization grace period, an hour by default:
/// https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period). So the
/// usage time, but never before the subscription began (calls made while it was being
/// provisioned go on the first invoice), nor older than `late_window_secs` (usage delivered
/// late, after an outage, goes on the invoice still open rather than on one finalized).
pub fn meter_timestamp(last_at: i64, subscription_start: Option<i64>, now: UnixMillis, late_window_secs: i64) -> i64 {
    let used = last_at.div_euclid(1000);
    let now = now.0.div_euclid(1000);
    used.max(subscription_start.unwrap_or(i64::MIN)).max(now - late_window_secs).min(now)
}

/// How many batches of one customer a claim takes at most, so that one customer's backlog
/// does not hold the others up.
const CLAIM_PER_CUSTOMER: i64 = 10;

/// Claims up to `limit` of the project's batches due for delivery for [`CLAIM_MS`], each
/// counting as an attempt: the oldest of each customer first, taking turns between customers.
/// A customer with a batch claimed by another worker is left to that worker, since Stripe takes
/// one meter event at a time per customer and meter.
///
/// A batch gets its meter event's timestamp ([`meter_timestamp`], with `late_window_secs`)
/// when first claimed, and again only once that stamp has left the window (Stripe down
/// meanwhile). Restamping is safe: a retry carries the same identifier, so if an earlier
/// attempt was in fact accepted (its answer lost), Stripe keeps that one — which was inside
/// the window when sent, so on an open invoice.
pub async fn claim_due_batches(
    db: &Db,
    project: &ProjectId,
    now: UnixMillis,
    limit: i64,
    late_window_secs: i64,
) -> Result<Vec<DueBatch>, DbError> {
    const DUE: &str = "SELECT id FROM (SELECT b.id, b.created_at, ROW_NUMBER() OVER ( \
                PARTITION BY b.stripe_customer_id, b.event_name ORDER BY b.created_at, b.id) AS turn \
            FROM meter_batches b WHERE b.project_id = $1 AND b.status = 'pending' \
              AND b.next_attempt_at <= $2 AND b.claimed_until <= $2 \
              AND NOT EXISTS (SELECT 1 FROM meter_batches o WHERE o.project_id = b.project_id \
                AND o.stripe_customer_id = b.stripe_customer_id AND o.event_name = b.event_name \
                AND o.status = 'pending' AND o.claimed_until > $2)) due \
        WHERE turn <= $4 ORDER BY turn, created_at, id LIMIT $3";
    // Claimed only if no other worker holds a batch of the customer and meter since the
    // selection (this claim's own batches carry its `claimed_until`, $1).
    const CLAIM: &str = "UPDATE meter_batches SET claimed_until = $1, attempts = attempts + 1 \
        WHERE id = $2 AND status = 'pending' AND claimed_until <= $3 \
          AND NOT EXISTS (SELECT 1 FROM meter_batches o WHERE o.project_id = meter_batches.project_id \
            AND o.stripe_customer_id = meter_batches.stripe_customer_id AND o.event_name = meter_batches.event_name \
            AND o.status = 'pending' AND o.claimed_until > $3 AND o.claimed_until <> $1) \
        RETURNING id, project_id, stripe_customer_id, event_name, value_nanos, last_at, attempts, meter_timestamp, \
            meter_identifier";
    const STARTED: &str = "SELECT c.stripe_subscription_started_at FROM meter_batches b \
        JOIN customers c ON c.id = b.customer_id WHERE b.id = $1";
    const STAMP: &str = "UPDATE meter_batches SET meter_timestamp = $1 WHERE id = $2";
    let due: Vec<crate::ids::MeterBatchId> = with_db!(db, pool =>
        sqlx::query_scalar::<_, crate::ids::MeterBatchId>(DUE).bind(project).bind(now.0).bind(limit)
            .bind(CLAIM_PER_CUSTOMER).fetch_all(pool).await)?;
    let mut claimed = Vec::with_capacity(due.len());
    for id in due {
        let batch = with_db!(db, pool => sqlx::query_as::<_, DueBatch>(CLAIM).bind(now.0 + CLAIM_MS).bind(&id)
            .bind(now.0).fetch_optional(pool).await)?;
        let Some(mut batch) = batch else { continue };
        let oldest_invoiceable = now.0.div_euclid(1000) - late_window_secs;
        if batch.meter_timestamp.is_none_or(|stamp| stamp < oldest_invoiceable) {
            let started: Option<i64> = with_db!(db, pool => sqlx::query_scalar::<_, Option<i64>>(STARTED).bind(&id)
                .fetch_optional(pool).await)?
            .flatten();
            let stamp = meter_timestamp(batch.last_at, started, now, late_window_secs);
            // Claimed by this worker alone: nobody else stamps it meanwhile.
            with_db!(db, pool => sqlx::query(STAMP).bind(stamp).bind(&id).execute(pool).await.map(drop))?;
            batch.meter_timestamp = Some(stamp);
        }
        claimed.push(batch);
    }
    Ok(claimed)
}

/// Gives back a claimed batch that was not sent (its attempt is not counted).
pub async fn release_claim(db: &Db, batch: &crate::ids::MeterBatchId) -> Result<(), DbError> {
    const SQL: &str = "UPDATE meter_batches SET claimed_until = 0, attempts = attempts - 1 \
        WHERE id = $1 AND status = 'pending' AND attempts > 0";
    with_db!(db, pool => sqlx::query(SQL).bind(batch).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Stripe has the meter event (accepted now, or refused as a duplicate of one it has).
    Delivered,
    /// Try again at `next_at` (rate limit, Stripe unavailable, a transport error).
    Retry { error: String, next_at: i64 },
    /// Stripe refused it for good (shown to the tenant, who can retry it after a fix).
    Failed { error: String },
}

/// Backoff for deliveries: 2 s × 2ⁿ, capped at 10 minutes.
pub fn delivery_backoff_ms(attempts: i64) -> i64 {
    (2_000_i64.saturating_mul(1_i64 << attempts.clamp(0, 20))).min(10 * MINUTE_MS)
}

pub async fn record_attempt(db: &Db, batch: &crate::ids::MeterBatchId, attempt: &Attempt) -> Result<(), DbError> {
    let now = UnixMillis::now().0;
    with_db!(db, pool => async {
        match attempt {
            Attempt::Delivered => sqlx::query("UPDATE meter_batches SET status = 'delivered', delivered_at = $1, \
                    claimed_until = 0, last_error = NULL WHERE id = $2")
                .bind(now).bind(batch).execute(pool).await,
            Attempt::Retry { error, next_at } => sqlx::query("UPDATE meter_batches SET next_attempt_at = $1, \
                    claimed_until = 0, last_error = $2 WHERE id = $3 AND status = 'pending'")
                .bind(next_at).bind(truncate(error)).bind(batch).execute(pool).await,
            Attempt::Failed { error } => sqlx::query("UPDATE meter_batches SET status = 'failed', claimed_until = 0, \
                    last_error = $1 WHERE id = $2 AND status = 'pending'")
                .bind(truncate(error)).bind(batch).execute(pool).await,
        }
    }.await.map(|_| ()))?;
    Ok(())
}

fn truncate(text: &str) -> String {
    text.chars().take(500).collect()
}

/// Projects with provisioned billing, for the delivery and reconciliation jobs.
pub async fn provisioned_projects(db: &Db) -> Result<Vec<ProjectBilling>, DbError> {
    let sql =
        format!("{PROJECT_BILLING} WHERE s.meter_id IS NOT NULL AND s.price_id IS NOT NULL ORDER BY s.project_id");
    Ok(
        with_db!(db, pool => sqlx::query_as::<_, ProjectBilling>(sqlx::AssertSqlSafe(sql.clone())).fetch_all(pool).await)?,
    )
}

/// Undelivered usage older than this is flagged on the billing page: half of the hour Stripe
/// waits by default before finalizing an invoice ("The default is set to 1 hour for all
/// invoices", <https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period>),
/// after which usage of the past period can no longer be invoiced.
pub const LAG_WARNING_MS: i64 = 30 * MINUTE_MS;

/// What the billing page shows of delivery.
#[derive(Debug, Clone, Default)]
pub struct DeliveryStatus {
    /// Billable usage settled but not yet accepted by Stripe.
    pub waiting_events: i64,
    pub waiting_nanos: i64,
    /// When the oldest of it settled (the delivery lag is now minus this).
    pub oldest_waiting_at: Option<i64>,
    pub delivered_batches: i64,
    pub delivered_nanos: i64,
    pub last_delivered_at: Option<i64>,
    pub failed_batches: i64,
    /// The latest batches that failed or are being retried, with Stripe's answer.
    pub problems: Vec<BatchProblem>,
    /// Customers whose usage cannot be invoiced (their subscription ended), and how much.
    pub uninvoiceable: Vec<Uninvoiceable>,
}

/// A customer with settled usage Stripe would invoice nowhere: its subscription was canceled
/// (in Stripe, or by Tollgate's tenant) or expired before its first payment, or the customer was
/// deleted in Stripe. The usage waits in the outbox, never sent, until the tenant puts it on a
/// one-off invoice ([`crate::one_off`]) or has a new Stripe customer made.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Uninvoiceable {
    pub customer_id: CustomerId,
    pub external_id: String,
    pub subscription_status: Option<String>,
    /// The customer was deleted in Stripe: nothing more can be invoiced to it.
    pub customer_deleted: bool,
    pub events: i64,
    pub nanos: i64,
    /// When the oldest of it settled (Unix ms).
    pub since: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchProblem {
    pub id: String,
    pub customer_external_id: Option<String>,
    pub status: String,
    pub value_nanos: i64,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub next_attempt_at: i64,
    pub last_at: i64,
}

pub async fn delivery_status(db: &Db, project: &ProjectId, billing_from: i64) -> Result<DeliveryStatus, DbError> {
    const UNBATCHED: &str = "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(u.billed_nanos), 0) AS BIGINT), \
            MIN(u.created_at) FROM usage_events u LEFT JOIN customers c ON c.id = u.customer_id \
        WHERE u.project_id = $1 AND u.meter_batch_id IS NULL AND u.status IN ('settled', 'interrupted') \
          AND u.billed_nanos > 0 AND u.created_at >= $2 \
          AND COALESCE(c.stripe_subscription_status, '') NOT IN ('canceled', 'incomplete_expired') \
          AND c.stripe_customer_deleted_at IS NULL";
    const UNINVOICEABLE: &str = "SELECT c.id AS customer_id, c.external_id, \
            c.stripe_subscription_status AS subscription_status, \
            (c.stripe_customer_deleted_at IS NOT NULL) AS customer_deleted, CAST(COUNT(*) AS BIGINT) AS events, \
            CAST(SUM(u.billed_nanos) AS BIGINT) AS nanos, MIN(u.created_at) AS since \
        FROM usage_events u JOIN customers c ON c.id = u.customer_id \
        WHERE u.project_id = $1 AND u.meter_batch_id IS NULL AND u.status IN ('settled', 'interrupted') \
          AND u.billed_nanos > 0 AND u.created_at >= $2 \
          AND (c.stripe_subscription_status IN ('canceled', 'incomplete_expired') \
               OR c.stripe_customer_deleted_at IS NOT NULL) \
        GROUP BY c.id, c.external_id, c.stripe_subscription_status, c.stripe_customer_deleted_at \
        ORDER BY nanos DESC LIMIT 100";
    const BATCHES: &str = "SELECT status, CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(value_nanos), 0) AS BIGINT), \
            CAST(COALESCE(SUM(events), 0) AS BIGINT), MIN(first_at), MAX(delivered_at) \
        FROM meter_batches WHERE project_id = $1 GROUP BY status";
    const PROBLEMS: &str = "SELECT b.id, c.external_id AS customer_external_id, b.status, b.value_nanos, b.attempts, \
            b.last_error, b.next_attempt_at, b.last_at \
        FROM meter_batches b LEFT JOIN customers c ON c.id = b.customer_id \
        WHERE b.project_id = $1 AND b.last_error IS NOT NULL AND b.status <> 'delivered' \
        ORDER BY b.created_at DESC LIMIT 20";
    type Row = (String, i64, i64, i64, Option<i64>, Option<i64>);
    let (events, nanos, oldest): (i64, i64, Option<i64>) = with_db!(db, pool =>
        sqlx::query_as::<_, (i64, i64, Option<i64>)>(UNBATCHED).bind(project).bind(billing_from).fetch_one(pool).await)?;
    let rows: Vec<Row> = with_db!(db, pool => sqlx::query_as::<_, Row>(BATCHES).bind(project).fetch_all(pool).await)?;
    let mut status = DeliveryStatus {
        waiting_events: events,
        waiting_nanos: nanos,
        oldest_waiting_at: oldest,
        ..Default::default()
    };
    for (kind, count, value, events, first_at, delivered_at) in rows {
        if kind == "delivered" {
            status.delivered_batches = count;
            status.delivered_nanos = value;
            status.last_delivered_at = delivered_at;
        } else {
            if kind == "failed" {
                status.failed_batches = count;
            }
            status.waiting_events += events;
            status.waiting_nanos += value;
            status.oldest_waiting_at = match (status.oldest_waiting_at, first_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    status.problems =
        with_db!(db, pool => sqlx::query_as::<_, BatchProblem>(PROBLEMS).bind(project).fetch_all(pool).await)?;
    status.uninvoiceable = with_db!(db, pool => sqlx::query_as::<_, Uninvoiceable>(UNINVOICEABLE).bind(project)
        .bind(billing_from).fetch_all(pool).await)?;
    Ok(status)
}

/// Billable usage settled before Stripe was connected (`billing_from`, Unix ms): Tollgate never
/// sends it to Stripe, so the billing page shows it apart from what waits for delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BeforeConnection {
    pub events: i64,
    pub nanos: i64,
}

pub async fn before_connection(db: &Db, project: &ProjectId, billing_from: i64) -> Result<BeforeConnection, DbError> {
    const SQL: &str = "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(billed_nanos), 0) AS BIGINT) \
        FROM usage_events WHERE project_id = $1 AND meter_batch_id IS NULL AND status IN ('settled', 'interrupted') \
          AND billed_nanos > 0 AND created_at < $2";
    let (events, nanos): (i64, i64) = with_db!(db, pool =>
        sqlx::query_as::<_, (i64, i64)>(SQL).bind(project).bind(billing_from).fetch_one(pool).await)?;
    Ok(BeforeConnection { events, nanos })
}

// ---------------------------------------------------------------------------------------
// Reconciliation.

/// A customer billed through Stripe, and what Tollgate has for them in a period.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BilledCustomer {
    pub id: CustomerId,
    pub stripe_customer_id: String,
    /// Delivered batches whose timestamp is in the window.
    pub delivered_nanos: i64,
    /// How many meter events those are (each a term of Stripe's floating-point sum).
    pub delivered_events: i64,
    /// Of those, what was delivered too recently to be sure to count in Stripe's summaries.
    pub unsettled_nanos: i64,
    /// Batched but not yet accepted, plus settled usage not yet batched, in the window (usage
    /// settled before Stripe was connected is never sent: see [`before_connection`]).
    pub pending_nanos: i64,
}

/// The calendar month (UTC) containing `now`, up to the end of the current minute (Stripe's
/// summaries take minute-aligned bounds).
pub fn reconcile_window(now: UnixMillis) -> (i64, i64) {
    let (start, _) = crate::period::BudgetPeriod::Month.window(now);
    (start, now.0 - now.0.rem_euclid(MINUTE_MS) + MINUTE_MS)
}

/// The project's customers with a Stripe customer and what Tollgate delivered for each with a
/// timestamp in `[start, end)` (Unix ms), what of it was delivered after `settled_before`.
pub async fn billed_customers(
    db: &Db,
    project: &ProjectId,
    start: i64,
    end: i64,
    settled_before: i64,
) -> Result<Vec<BilledCustomer>, DbError> {
    const SQL: &str = "SELECT c.id, c.stripe_customer_id, \
            CAST(COALESCE((SELECT SUM(b.value_nanos) FROM meter_batches b WHERE b.customer_id = c.id \
                AND b.status = 'delivered' AND b.last_at >= $2 AND b.last_at < $3), 0) AS BIGINT) AS delivered_nanos, \
            CAST((SELECT COUNT(*) FROM meter_batches b WHERE b.customer_id = c.id \
                AND b.status = 'delivered' AND b.last_at >= $2 AND b.last_at < $3) AS BIGINT) AS delivered_events, \
            CAST(COALESCE((SELECT SUM(b.value_nanos) FROM meter_batches b WHERE b.customer_id = c.id \
                AND b.status = 'delivered' AND b.last_at >= $2 AND b.last_at < $3 AND b.delivered_at >= $4), 0) \
              AS BIGINT) AS unsettled_nanos, \
            CAST(COALESCE((SELECT SUM(b.value_nanos) FROM meter_batches b WHERE b.customer_id = c.id \
                AND b.status <> 'delivered' AND b.last_at >= $2 AND b.last_at < $3), 0) \
              + COALESCE((SELECT SUM(u.billed_nanos) FROM usage_events u WHERE u.project_id = $1 AND u.customer_id = c.id \
                AND u.meter_batch_id IS NULL AND u.status IN ('settled', 'interrupted') AND u.created_at >= $2 AND u.created_at < $3 \
                AND u.created_at >= (SELECT s.created_at FROM stripe_connections s WHERE s.project_id = $1)), 0) \
              AS BIGINT) AS pending_nanos \
        FROM customers c WHERE c.project_id = $1 AND c.stripe_customer_id IS NOT NULL ORDER BY c.id";
    Ok(with_db!(db, pool => sqlx::query_as::<_, BilledCustomer>(SQL).bind(project).bind(start).bind(end)
        .bind(settled_before).fetch_all(pool).await)?)
}

/// How far Stripe's summary (`stripe`, a floating-point sum) is from what Tollgate delivered,
/// `None` when the difference is explained by what Stripe may not have counted yet and by the
/// summary's rounding alone.
///
/// Stripe counts a meter event in its summaries some time after accepting it ("Stripe processes
/// meter events asynchronously, so aggregated usage in meter event summaries … might not
/// immediately reflect recently received meter events",
/// <https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api>), so the
/// `unsettled` part of `delivered` may or may not be in the summary. `aggregated_value` is a
/// double: below 2^53 every partial sum of whole values is exact, so no difference is allowed;
/// above, each of the `events - 1` additions rounds by at most half a unit in the last place of
/// the (non-negative) total.
pub fn summary_drift(stripe: f64, delivered: i64, unsettled: i64, events: i64) -> Option<i64> {
    let (low, high) = (delivered - unsettled, delivered);
    let magnitude = stripe.abs().max(high as f64);
    let tolerance = if magnitude < 9_007_199_254_740_992.0 {
        0.0
    } else {
        // The unit in the last place of `magnitude` (a normal double, at least 2).
        let exponent = ((magnitude.to_bits() >> 52) & 0x7ff) as i32 - 1023;
        2f64.powi(exponent - 52) * (events.max(1) - 1) as f64 / 2.0
    };
    let stripe_nanos = stripe.round() as i64;
    if stripe < low as f64 - tolerance {
        Some(stripe_nanos - low)
    } else if stripe > high as f64 + tolerance {
        Some(stripe_nanos - high)
    } else {
        None
    }
}

/// What Stripe's summary said for a customer (or why it could not be read).
pub async fn record_reconciliation(
    db: &Db,
    project: &ProjectId,
    customer: &BilledCustomer,
    window: (i64, i64),
    stripe: Result<f64, String>,
) -> Result<(), DbError> {
    const SQL: &str = "INSERT INTO billing_reconciliations (customer_id, period_start, project_id, checked_through, \
            delivered_nanos, stripe_nanos, pending_nanos, drift_nanos, error, checked_at) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
        ON CONFLICT (customer_id, period_start) DO UPDATE SET checked_through = excluded.checked_through, \
            delivered_nanos = excluded.delivered_nanos, \
            stripe_nanos = CASE WHEN excluded.error IS NULL THEN excluded.stripe_nanos ELSE billing_reconciliations.stripe_nanos END, \
            drift_nanos = CASE WHEN excluded.error IS NULL THEN excluded.drift_nanos ELSE billing_reconciliations.drift_nanos END, \
            pending_nanos = excluded.pending_nanos, error = excluded.error, checked_at = excluded.checked_at";
    let (stripe_nanos, drift, error) = match stripe {
        Ok(value) => {
            let drift =
                summary_drift(value, customer.delivered_nanos, customer.unsettled_nanos, customer.delivered_events);
            (Some(value.round() as i64), Some(drift.unwrap_or(0)), None)
        }
        Err(e) => (None, None, Some(truncate(&e))),
    };
    let now = UnixMillis::now().0;
    with_db!(db, pool => sqlx::query(SQL).bind(&customer.id).bind(window.0).bind(project).bind(window.1)
        .bind(customer.delivered_nanos).bind(stripe_nanos).bind(customer.pending_nanos).bind(drift).bind(&error)
        .bind(now).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// One customer's line on the billing page.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CustomerBilling {
    pub id: CustomerId,
    pub external_id: String,
    pub stripe_customer_id: Option<String>,
    pub stripe_subscription_id: Option<String>,
    pub stripe_subscription_status: Option<String>,
    pub stripe_provision_error: Option<String>,
    pub delivered_nanos: Option<i64>,
    pub stripe_nanos: Option<i64>,
    pub pending_nanos: Option<i64>,
    pub drift_nanos: Option<i64>,
    pub reconcile_error: Option<String>,
    pub checked_at: Option<i64>,
}

/// The project's billed customers (with a Stripe customer, or a provisioning error), with
/// the reconciliation of the period starting at `period_start`.
pub async fn customer_billing(
    db: &Db,
    project: &ProjectId,
    period_start: i64,
    limit: i64,
) -> Result<Vec<CustomerBilling>, DbError> {
    const SQL: &str = "SELECT c.id, c.external_id, c.stripe_customer_id, c.stripe_subscription_id, \
            c.stripe_subscription_status, c.stripe_provision_error, r.delivered_nanos, r.stripe_nanos, \
            r.pending_nanos, r.drift_nanos, r.error AS reconcile_error, r.checked_at \
        FROM customers c LEFT JOIN billing_reconciliations r ON r.customer_id = c.id AND r.period_start = $2 \
        WHERE c.project_id = $1 AND (c.stripe_customer_id IS NOT NULL OR c.stripe_provision_error IS NOT NULL) \
        ORDER BY c.external_id LIMIT $3";
    Ok(with_db!(db, pool => sqlx::query_as::<_, CustomerBilling>(SQL).bind(project).bind(period_start).bind(limit)
        .fetch_all(pool).await)?)
}

/// One customer's Stripe side, for their page.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct CustomerStripe {
    pub stripe_customer_id: Option<String>,
    pub stripe_subscription_id: Option<String>,
    pub stripe_subscription_status: Option<String>,
    pub stripe_provision_error: Option<String>,
}

pub async fn customer_stripe(db: &Db, project: &ProjectId, customer: &CustomerId) -> Result<CustomerStripe, DbError> {
    const SQL: &str = "SELECT stripe_customer_id, stripe_subscription_id, stripe_subscription_status, \
        stripe_provision_error FROM customers WHERE id = $1 AND project_id = $2";
    Ok(with_db!(db, pool => sqlx::query_as::<_, CustomerStripe>(SQL).bind(customer).bind(project)
        .fetch_optional(pool).await)?
    .unwrap_or_default())
}

/// What the billing page shows of provisioning.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProvisionStatus {
    pub meter_id: Option<String>,
    pub product_id: Option<String>,
    pub price_id: Option<String>,
    pub provision_error: Option<String>,
    pub provision_attempts: i64,
    pub provision_next_at: i64,
    pub created_at: i64,
}

pub async fn provision_status(db: &Db, project: &ProjectId) -> Result<Option<ProvisionStatus>, DbError> {
    const SQL: &str = "SELECT meter_id, product_id, price_id, provision_error, provision_attempts, provision_next_at, \
        created_at FROM stripe_connections WHERE project_id = $1";
    Ok(with_db!(db, pool => sqlx::query_as::<_, ProvisionStatus>(SQL).bind(project).fetch_optional(pool).await)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoffs_grow_and_are_capped() {
        assert_eq!(delivery_backoff_ms(0), 2_000);
        assert_eq!(delivery_backoff_ms(3), 16_000);
        assert_eq!(delivery_backoff_ms(60), 600_000);
        assert_eq!(provision_backoff_ms(1), 20_000);
        assert_eq!(provision_backoff_ms(40), 3_600_000);
    }

    #[test]
    fn a_meter_timestamp_is_inside_the_subscription_and_the_late_window() {
        let now = UnixMillis(1_800_000_000_000);
        let t = 1_800_000_000;
        // Fresh usage keeps its own time.
        assert_eq!(meter_timestamp((t - 5) * 1000 + 999, Some(t - 100), now, 3_000), t - 5);
        // Usage from before the subscription began is stamped at its start.
        assert_eq!(meter_timestamp((t - 50) * 1000, Some(t - 20), now, 3_000), t - 20);
        // Usage older than the window (Stripe was down) is stamped at the window's edge.
        assert_eq!(meter_timestamp((t - 7_200) * 1000, None, now, 3_000), t - 3_000);
        // Never in the future.
        assert_eq!(meter_timestamp((t + 60) * 1000, Some(t + 30), now, 3_000), t);
    }

    #[test]
    fn values_over_15_digits_are_split_into_parts_that_sum_to_them() {
        assert_eq!(split_value(0), [0]);
        assert_eq!(split_value(MAX_METER_EVENT_VALUE), [MAX_METER_EVENT_VALUE]);
        assert_eq!(split_value(MAX_METER_EVENT_VALUE + 1), [MAX_METER_EVENT_VALUE, 1]);
        assert_eq!(split_value(2 * MAX_METER_EVENT_VALUE), [MAX_METER_EVENT_VALUE; 2]);
        for total in [2_500_000_000_000_123, i64::MAX] {
            let parts = split_value(total);
            assert!(parts.iter().all(|p| (1..=MAX_METER_EVENT_VALUE).contains(p)), "{parts:?}");
            assert!(parts.iter().all(|p| p.to_string().len() <= 15));
            assert_eq!(parts.iter().map(|p| i128::from(*p)).sum::<i128>(), i128::from(total));
        }
    }

    #[test]
    fn summary_drift_allows_lag_and_float_rounding_and_nothing_more() {
        // Exact below 2^53: one nano-unit off is drift.
        assert_eq!(summary_drift(700.0, 700, 0, 3), None);
        assert_eq!(summary_drift(699.0, 700, 0, 3), Some(-1));
        assert_eq!(summary_drift(701.0, 700, 0, 3), Some(1));
        // Delivered recently (300 of the 700): anything from 400 to 700 may be Stripe's count.
        assert_eq!(summary_drift(400.0, 700, 300, 3), None);
        assert_eq!(summary_drift(550.0, 700, 300, 3), None);
        assert_eq!(summary_drift(399.0, 700, 300, 3), Some(-1));
        // Past 2^53, Stripe's double sum of 11 events: the rounding of 10 additions, at most
        // 10 × 2 / 2 nano-units here (a unit in the last place is 2 under 2^54), is allowed.
        let exact: i64 = 7 + 10 * MAX_METER_EVENT_VALUE + 1;
        let double = (0..10).fold(7.0, |sum, _| sum + MAX_METER_EVENT_VALUE as f64) + 1.0;
        assert_ne!(double as i64, exact);
        assert_eq!(summary_drift(double, exact, 0, 12), None);
        assert_eq!(summary_drift(exact as f64 - 10.0, exact, 0, 11), None);
        assert_eq!(summary_drift(exact as f64 - 12.0, exact, 0, 11), Some(-12));
        // A single event is exact at any size.
        assert_eq!(summary_drift(exact as f64 - 2.0, exact, 0, 1), Some(-2));
    }

    #[test]
    fn the_reconcile_window_is_the_month_to_the_end_of_the_minute() {
        // 2026-11-22T10:15:30.500Z
        let (start, end) = reconcile_window(UnixMillis(1_795_342_530_500));
        assert_eq!(start, 1_793_491_200_000, "2026-11-01T00:00:00Z");
        assert_eq!(end, 1_795_342_560_000, "10:16:00");
    }
}

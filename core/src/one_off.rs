//! One-off invoices: settled usage Stripe would put on no invoice — the customer's
//! subscription ended (canceled, or expired before its first payment) — billed at the
//! tenant's request as an invoice item of its amount on an invoice of its own.
//!
//! Requesting one moves the customer's waiting usage out of the outbox in one transaction
//! (its usage events name the one-off in `meter_batch_id`, so no meter event can ever carry
//! them too) and records what is to be sent; the jobs send it (`tollgate_jobs::one_off`) with
//! idempotency keys derived from its id, so a retry makes nothing twice. A one-off that has
//! not reached Stripe can be given back: its usage returns to the outbox.

use crate::billing::NO_RETRY;
use crate::db::{Db, DbError};
use crate::ids::{CustomerId, OneOffInvoiceId, ProjectId};
use crate::money::Nanos;
use crate::time::UnixMillis;
use crate::with_db;

/// Why a customer's usage cannot go on a one-off invoice (shown to the tenant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("there is no usage waiting that Stripe would not invoice")]
    NothingWaiting,
    #[error("the customer's subscription is live: its usage goes on its next invoice")]
    SubscriptionLive,
    #[error("the customer was deleted in Stripe: have a new Stripe customer made for it first")]
    CustomerDeleted,
    #[error("the usage comes to less than the currency's smallest unit, which Stripe cannot charge")]
    BelowMinorUnit,
}

/// A one-off invoice, as the pages show it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OneOff {
    pub id: OneOffInvoiceId,
    pub customer_id: Option<CustomerId>,
    pub customer_external_id: Option<String>,
    pub currency: String,
    pub nanos: i64,
    pub amount_minor: i64,
    pub events: i64,
    pub first_at: i64,
    pub last_at: i64,
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub stripe_invoice_id: Option<String>,
    pub requested_by: String,
    pub created_at: i64,
    pub sent_at: Option<i64>,
}

/// A one-off the jobs are to send now.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueOneOff {
    pub id: OneOffInvoiceId,
    pub project_id: ProjectId,
    pub stripe_customer_id: String,
    pub currency: String,
    pub amount_minor: i64,
    pub events: i64,
    pub first_at: i64,
    pub last_at: i64,
    pub attempts: i64,
    pub stripe_invoice_item_id: Option<String>,
    pub stripe_invoice_id: Option<String>,
}

/// Usage whose subscription ended: what Stripe would accept and invoice nowhere.
const ENDED: &str = "c.stripe_subscription_status IN ('canceled', 'incomplete_expired')";

/// Moves `customer`'s waiting usage (settled since `billing_from`, in no batch) onto a new
/// one-off invoice of its amount in `currency`, rounded half up to the minor unit as Stripe
/// rounds a line. All or nothing: when it is refused, nothing has moved.
pub async fn request(
    db: &Db,
    project: &ProjectId,
    customer: &CustomerId,
    currency: &str,
    billing_from: i64,
    requested_by: &str,
) -> Result<Result<OneOff, Refusal>, DbError> {
    const STATE: &str = "SELECT c.stripe_customer_id, c.stripe_customer_deleted_at, \
            (c.stripe_subscription_status IS NOT NULL AND c.stripe_subscription_status IN ('canceled', 'incomplete_expired')) \
        FROM customers c WHERE c.id = $1 AND c.project_id = $2";
    // As the outbox marks a batch (`billing::form_batch`): `meter_batch_id IS NULL` is checked
    // again outside the subquery so a concurrent claim's rows are never taken twice.
    const MARK: &str = "UPDATE usage_events SET meter_batch_id = $1 \
        WHERE meter_batch_id IS NULL AND id IN (SELECT id FROM usage_events \
            WHERE project_id = $2 AND customer_id = $3 AND meter_batch_id IS NULL \
              AND status IN ('settled', 'interrupted') AND billed_nanos > 0 AND created_at >= $4)";
    const TOTAL: &str = "SELECT CAST(COALESCE(SUM(billed_nanos), 0) AS BIGINT), CAST(COUNT(*) AS BIGINT), \
            CAST(COALESCE(MIN(created_at), 0) AS BIGINT), CAST(COALESCE(MAX(created_at), 0) AS BIGINT) \
        FROM usage_events WHERE meter_batch_id = $1";
    static INSERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "INSERT INTO one_off_invoices (id, project_id, customer_id, stripe_customer_id, currency, nanos, \
                amount_minor, events, first_at, last_at, status, next_attempt_at, requested_by, created_at) \
            SELECT $1, $2, c.id, c.stripe_customer_id, $3, $4, $5, $6, $7, $8, 'pending', $9, $10, $9 \
            FROM customers c WHERE c.id = $11 AND c.stripe_customer_id IS NOT NULL \
              AND c.stripe_customer_deleted_at IS NULL AND {ENDED}"
        )
    });
    let id = OneOffInvoiceId::generate();
    let now = UnixMillis::now().0;
    let per_minor = crate::currency::nanos_per_minor_unit(currency);
    let outcome = with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        let state: Option<(Option<String>, Option<i64>, bool)> =
            sqlx::query_as(STATE).bind(customer).bind(project).fetch_optional(&mut *tx).await?;
        match state {
            None | Some((None, _, _)) => return Ok::<_, sqlx::Error>(Err(Refusal::NothingWaiting)),
            Some((_, Some(_), _)) => return Ok(Err(Refusal::CustomerDeleted)),
            Some((_, None, false)) => return Ok(Err(Refusal::SubscriptionLive)),
            Some((Some(_), None, true)) => {}
        }
        let marked = sqlx::query(MARK).bind(&id).bind(project).bind(customer).bind(billing_from)
            .execute(&mut *tx).await?.rows_affected();
        if marked == 0 {
            return Ok(Err(Refusal::NothingWaiting));
        }
        let (nanos, events, first, last): (i64, i64, i64, i64) =
            sqlx::query_as(TOTAL).bind(&id).fetch_one(&mut *tx).await?;
        let amount_minor = nanos / per_minor + i64::from(nanos % per_minor * 2 >= per_minor);
        if amount_minor == 0 {
            return Ok(Err(Refusal::BelowMinorUnit));
        }
        let inserted = sqlx::query(sqlx::AssertSqlSafe(INSERT.as_str()))
            .bind(&id).bind(project).bind(currency.to_ascii_lowercase()).bind(nanos).bind(amount_minor)
            .bind(events).bind(first).bind(last).bind(now).bind(requested_by).bind(customer)
            .execute(&mut *tx).await?.rows_affected();
        if inserted == 0 {
            return Ok(Err(Refusal::SubscriptionLive));
        }
        tx.commit().await?;
        Ok(Ok(()))
    }.await)?;
    // A refusal returned before the commit rolled the transaction back: nothing moved.
    match outcome {
        Ok(()) => Ok(get(db, project, &id).await?.ok_or(Refusal::NothingWaiting)),
        Err(refusal) => Ok(Err(refusal)),
    }
}

const COLUMNS: &str = "o.id, o.customer_id, c.external_id AS customer_external_id, o.currency, o.nanos, \
    o.amount_minor, o.events, o.first_at, o.last_at, o.status, o.attempts, o.last_error, o.stripe_invoice_id, \
    o.requested_by, o.created_at, o.sent_at";

/// One of `project`'s one-offs.
pub async fn get(db: &Db, project: &ProjectId, id: &OneOffInvoiceId) -> Result<Option<OneOff>, DbError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT {COLUMNS} FROM one_off_invoices o LEFT JOIN customers c ON c.id = o.customer_id \
             WHERE o.project_id = $1 AND o.id = $2"
        )
    });
    Ok(with_db!(db, pool => sqlx::query_as::<_, OneOff>(sqlx::AssertSqlSafe(SQL.as_str()))
        .bind(project).bind(id).fetch_optional(pool).await)?)
}

/// `project`'s latest one-offs (of `customer` only, when given), newest first.
pub async fn list(db: &Db, project: &ProjectId, customer: Option<&CustomerId>) -> Result<Vec<OneOff>, DbError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT {COLUMNS} FROM one_off_invoices o LEFT JOIN customers c ON c.id = o.customer_id \
             WHERE o.project_id = $1 AND ($2 IS NULL OR o.customer_id = $2) ORDER BY o.created_at DESC LIMIT 50"
        )
    });
    Ok(with_db!(db, pool => sqlx::query_as::<_, OneOff>(sqlx::AssertSqlSafe(SQL.as_str()))
        .bind(project).bind(customer).fetch_all(pool).await)?)
}

/// How long a job owns a claimed one-off before another may take it.
const CLAIM_MS: i64 = 5 * 60_000;

/// Pending one-offs due now, each claimed for [`CLAIM_MS`].
pub async fn claim_due(db: &Db, now: UnixMillis, limit: i64) -> Result<Vec<DueOneOff>, DbError> {
    const DUE: &str = "SELECT id, project_id, stripe_customer_id, currency, amount_minor, events, first_at, last_at, \
            attempts, stripe_invoice_item_id, stripe_invoice_id \
        FROM one_off_invoices WHERE status = 'pending' AND next_attempt_at <= $1 AND claimed_until <= $1 \
        ORDER BY next_attempt_at LIMIT $2";
    const CLAIM: &str = "UPDATE one_off_invoices SET claimed_until = $1, attempts = attempts + 1 \
        WHERE id = $2 AND status = 'pending' AND claimed_until <= $3";
    let due: Vec<DueOneOff> = with_db!(db, pool => sqlx::query_as::<_, DueOneOff>(DUE)
        .bind(now.0).bind(limit).fetch_all(pool).await)?;
    let mut claimed = Vec::with_capacity(due.len());
    for mut one in due {
        let n = with_db!(db, pool => sqlx::query(CLAIM).bind(now.0 + CLAIM_MS).bind(&one.id).bind(now.0)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 1 {
            one.attempts += 1;
            claimed.push(one);
        }
    }
    Ok(claimed)
}

/// Records the invoice item Stripe made, before the invoice is made (a retry then skips it).
pub async fn record_item(db: &Db, id: &OneOffInvoiceId, item: &str) -> Result<(), DbError> {
    const SQL: &str = "UPDATE one_off_invoices SET stripe_invoice_item_id = $1 WHERE id = $2";
    with_db!(db, pool => sqlx::query(SQL).bind(item).bind(id).execute(pool).await.map(drop))?;
    Ok(())
}

/// Records the invoice made (still to be finalized).
pub async fn record_invoice(db: &Db, id: &OneOffInvoiceId, invoice: &str) -> Result<(), DbError> {
    const SQL: &str = "UPDATE one_off_invoices SET stripe_invoice_id = $1 WHERE id = $2";
    with_db!(db, pool => sqlx::query(SQL).bind(invoice).bind(id).execute(pool).await.map(drop))?;
    Ok(())
}

/// The invoice is finalized: Stripe collects it from here.
pub async fn record_sent(db: &Db, id: &OneOffInvoiceId) -> Result<(), DbError> {
    const SQL: &str = "UPDATE one_off_invoices SET status = 'sent', sent_at = $1, claimed_until = 0, last_error = NULL \
        WHERE id = $2";
    with_db!(db, pool => sqlx::query(SQL).bind(UnixMillis::now().0).bind(id).execute(pool).await.map(drop))?;
    Ok(())
}

/// An attempt failed: retried after `retry_in_ms`, or (None) failed until the tenant acts.
pub async fn record_failure(
    db: &Db,
    id: &OneOffInvoiceId,
    error: &str,
    retry_in_ms: Option<i64>,
) -> Result<(), DbError> {
    const SQL: &str = "UPDATE one_off_invoices SET status = $1, last_error = $2, next_attempt_at = $3, \
        claimed_until = 0 WHERE id = $4";
    let status = if retry_in_ms.is_some() { "pending" } else { "failed" };
    let next = retry_in_ms.map_or(NO_RETRY, |ms| UnixMillis::now().0 + ms);
    let error: String = error.chars().take(500).collect();
    with_db!(db, pool => sqlx::query(SQL).bind(status).bind(&error).bind(next).bind(id).execute(pool).await.map(drop))?;
    Ok(())
}

/// "Try again" on a failed one-off.
pub async fn retry(db: &Db, project: &ProjectId, id: &OneOffInvoiceId) -> Result<bool, DbError> {
    const SQL: &str = "UPDATE one_off_invoices SET status = 'pending', next_attempt_at = 0 \
        WHERE project_id = $1 AND id = $2 AND status = 'failed'";
    let n =
        with_db!(db, pool => sqlx::query(SQL).bind(project).bind(id).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

/// Gives a failed one-off's usage back to the outbox and forgets it — only one that never
/// made an invoice item in Stripe (else Stripe may still bill it).
pub async fn give_back(db: &Db, project: &ProjectId, id: &OneOffInvoiceId) -> Result<bool, DbError> {
    const DELETE: &str = "DELETE FROM one_off_invoices WHERE project_id = $1 AND id = $2 AND status = 'failed' \
        AND stripe_invoice_item_id IS NULL";
    const RELEASE: &str = "UPDATE usage_events SET meter_batch_id = NULL WHERE project_id = $1 AND meter_batch_id = $2";
    let released = with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        let deleted = sqlx::query(DELETE).bind(project).bind(id).execute(&mut *tx).await?.rows_affected();
        if deleted == 0 {
            return Ok::<_, sqlx::Error>(false);
        }
        sqlx::query(RELEASE).bind(project).bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }.await)?;
    Ok(released)
}

/// Stripe deleted the customer (`customer.deleted`): nothing more can be invoiced to it.
pub async fn record_customer_deleted(db: &Db, project: &ProjectId, stripe_customer: &str) -> Result<u64, DbError> {
    const SQL: &str = "UPDATE customers SET stripe_customer_deleted_at = $1 \
        WHERE project_id = $2 AND stripe_customer_id = $3 AND stripe_customer_deleted_at IS NULL";
    Ok(with_db!(db, pool => sqlx::query(SQL).bind(UnixMillis::now().0).bind(project).bind(stripe_customer)
        .execute(pool).await.map(|r| r.rows_affected()))?)
}

/// "Make a new Stripe customer": forgets the deleted Stripe customer and its subscription, so
/// provisioning makes both again and the waiting usage goes on the new subscription's first
/// invoice (stamped at its start, see `billing::meter_timestamp`).
pub async fn replace_deleted_customer(db: &Db, project: &ProjectId, customer: &CustomerId) -> Result<bool, DbError> {
    const SQL: &str = "UPDATE customers SET stripe_customer_id = NULL, stripe_subscription_id = NULL, \
        stripe_subscription_status = NULL, stripe_subscription_started_at = NULL, stripe_customer_deleted_at = NULL, \
        stripe_provision_error = NULL, stripe_provision_attempts = 0, stripe_provision_next_at = 0, \
        stripe_customer_generation = stripe_customer_generation + 1 \
        WHERE project_id = $1 AND id = $2 AND stripe_customer_deleted_at IS NOT NULL";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(project).bind(customer).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

/// The amount as the pages show it.
pub fn amount(one: &OneOff) -> String {
    crate::currency::display_minor(one.amount_minor, &one.currency)
}

/// The exact usage behind it.
pub fn usage(one: &OneOff) -> Nanos {
    Nanos(one.nanos)
}

/// What of one customer's usage waits because Stripe would invoice it nowhere.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Waiting {
    pub events: i64,
    pub nanos: i64,
    pub customer_deleted: bool,
    pub subscription_status: Option<String>,
}

impl Waiting {
    /// Why, as the pages say it.
    pub fn reason(&self) -> String {
        reason(self.customer_deleted, self.subscription_status.as_deref())
    }
}

/// Why Stripe would invoice a customer's usage nowhere, as the pages say it.
pub fn reason(customer_deleted: bool, subscription_status: Option<&str>) -> String {
    if customer_deleted {
        "customer deleted in Stripe".to_owned()
    } else {
        format!("subscription {}", subscription_status.unwrap_or_default().replace('_', " "))
    }
}

/// `customer`'s usage settled since `billing_from` that Stripe would invoice nowhere, if any.
pub async fn waiting(
    db: &Db,
    project: &ProjectId,
    customer: &CustomerId,
    billing_from: i64,
) -> Result<Option<Waiting>, DbError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT CAST(COUNT(*) AS BIGINT) AS events, CAST(COALESCE(SUM(u.billed_nanos), 0) AS BIGINT) AS nanos, \
                (c.stripe_customer_deleted_at IS NOT NULL) AS customer_deleted, \
                c.stripe_subscription_status AS subscription_status \
            FROM customers c JOIN usage_events u ON u.customer_id = c.id \
            WHERE c.id = $1 AND c.project_id = $2 AND u.meter_batch_id IS NULL \
              AND u.status IN ('settled', 'interrupted') AND u.billed_nanos > 0 AND u.created_at >= $3 \
              AND ({ENDED} OR c.stripe_customer_deleted_at IS NOT NULL) \
            GROUP BY c.stripe_customer_deleted_at, c.stripe_subscription_status"
        )
    });
    Ok(with_db!(db, pool => sqlx::query_as::<_, Waiting>(sqlx::AssertSqlSafe(SQL.as_str()))
        .bind(customer).bind(project).bind(billing_from).fetch_optional(pool).await)?)
}

//! End-customers as their tenant manages them (the dashboard, and later the management API):
//! listing with search, a filter by budget health, sorting and pages; creating and editing with
//! name, email and budget in one statement; blocking. The proxy's own path to a customer is in
//! [`crate::projects`].

use crate::db::{Db, DbError};
use crate::health::{Health, Limits, Standing};
use crate::ids::{CustomerId, ProjectId};
use crate::money::Nanos;
use crate::period::BudgetPeriod;
use crate::projects::{ProjectError, validate_external_id};
use crate::time::UnixMillis;
use crate::with_db;

pub const MAX_NAME_LEN: usize = 200;
pub const MAX_EMAIL_LEN: usize = 254;

/// A customer with what it has spent in its current period.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CustomerRow {
    pub id: CustomerId,
    pub external_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub budget_nanos: i64,
    pub budget_period: String,
    pub period_start: i64,
    pub period_end: i64,
    /// Settled spend of the current period (0 once the period has ended).
    pub spent_nanos: i64,
    pub reserved_nanos: i64,
    pub blocked: bool,
    pub created_at: i64,
    /// Its Stripe subscription is past due or unpaid, or an open invoice's payment failed.
    pub payment_failed: bool,
}

impl CustomerRow {
    pub fn remaining(&self) -> Nanos {
        Nanos((self.budget_nanos - self.spent_nanos - self.reserved_nanos).max(0))
    }

    /// What its budget health is decided from.
    pub fn standing(&self) -> Standing {
        Standing {
            blocked: self.blocked,
            payment_failed: self.payment_failed,
            budget: Nanos(self.budget_nanos),
            spent: Nanos(self.spent_nanos),
        }
    }

    /// Its budget health against the project's `limits`.
    pub fn health(&self, limits: &Limits) -> Health {
        limits.health(&self.standing())
    }

    /// The share of its budget spent this period, in whole percent (rounded down; 100 for a
    /// customer without budget).
    pub fn percent_used(&self) -> i64 {
        if self.budget_nanos <= 0 {
            return 100;
        }
        let pct = i128::from(self.spent_nanos.max(0)) * 100 / i128::from(self.budget_nanos);
        i64::try_from(pct).unwrap_or(i64::MAX)
    }
}

/// How a customer list is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sort {
    /// Highest spend this period first.
    #[default]
    Spend,
    /// Newest first.
    Newest,
    /// By the tenant's id.
    Id,
    /// Highest share of the budget spent first.
    PercentUsed,
    /// By name (the id for a customer without one).
    Name,
    /// Most pressing budget health first (see [`crate::health`]), then highest spend.
    Status,
}

impl Sort {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "spend" => Some(Sort::Spend),
            "newest" => Some(Sort::Newest),
            "id" => Some(Sort::Id),
            "used" => Some(Sort::PercentUsed),
            "name" => Some(Sort::Name),
            "status" => Some(Sort::Status),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Sort::Spend => "spend",
            Sort::Newest => "newest",
            Sort::Id => "id",
            Sort::PercentUsed => "used",
            Sort::Name => "name",
            Sort::Status => "status",
        }
    }

    /// The ORDER BY of a list whose rows are [`COLUMNS`] (`rank`: the health's rank as SQL).
    fn order_by(self, rank: &str) -> String {
        match self {
            Sort::Spend => "spent_nanos DESC, external_id".to_owned(),
            Sort::Newest => "created_at DESC, id DESC".to_owned(),
            Sort::Id => "external_id".to_owned(),
            Sort::PercentUsed => {
                "CASE WHEN budget_nanos > 0 THEN CAST(spent_nanos AS DOUBLE PRECISION) / budget_nanos \
                ELSE 1.0 END DESC, spent_nanos DESC, external_id"
                    .to_owned()
            }
            Sort::Name => "LOWER(COALESCE(name, external_id)), external_id".to_owned(),
            Sort::Status => format!("{rank} DESC, spent_nanos DESC, external_id"),
        }
    }
}

/// The current period's spend as a column: 0 once the period has ended (`$1` is now); and
/// whether a payment failed (a Stripe subscription past due or unpaid, or an open invoice
/// whose payment failed).
const COLUMNS: &str = "id, external_id, name, email, budget_nanos, budget_period, period_start, period_end, \
    CASE WHEN period_end <= $1 THEN 0 ELSE spent_nanos END AS spent_nanos, reserved_nanos, blocked, created_at, \
    (COALESCE(stripe_subscription_status, '') IN ('past_due', 'unpaid') \
     OR EXISTS (SELECT 1 FROM stripe_invoices i WHERE i.project_id = customers.project_id \
        AND i.customer_id = customers.id AND i.status = 'open' AND i.payment_failed)) AS payment_failed";

/// `%`, `_` and `\` taken literally in a LIKE pattern (with `ESCAPE '\'`).
fn like_pattern(search: &str) -> String {
    let mut pattern = String::from("%");
    for c in search.trim().to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Which customers a list shows.
#[derive(Debug, Clone, Copy)]
pub struct ListFilter<'a> {
    /// Matched in their id, name or email.
    pub search: &'a str,
    /// Only customers of this budget health.
    pub health: Option<Health>,
    /// The project's lines, for the health filter and sort.
    pub limits: Limits,
}

/// One page of a project's customers that `filter` selects, and how many it selects in all.
pub async fn list(
    db: &Db,
    project: &ProjectId,
    filter: &ListFilter<'_>,
    sort: Sort,
    limit: i64,
    offset: i64,
) -> Result<(Vec<CustomerRow>, i64), DbError> {
    const FILTER: &str = "project_id = $2 AND (LOWER(external_id) LIKE $3 ESCAPE '\\' \
        OR LOWER(COALESCE(name, '')) LIKE $3 ESCAPE '\\' OR LOWER(COALESCE(email, '')) LIKE $3 ESCAPE '\\')";
    // The health is computed over the rows as listed (spend of the current period).
    let rank = filter.limits.rank_sql("c.blocked", "c.payment_failed", "c.budget_nanos", "c.spent_nanos");
    let health = match filter.health {
        Some(h) => format!("{rank} = {}", h.rank()),
        None => "1 = 1".to_owned(),
    };
    let rows = format!("(SELECT {COLUMNS} FROM customers WHERE {FILTER}) c WHERE {health}");
    let page = format!("SELECT c.* FROM {rows} ORDER BY {} LIMIT $4 OFFSET $5", sort.order_by(&rank));
    let total = format!("SELECT COUNT(*) FROM {rows}");
    let now = UnixMillis::now().0;
    let pattern = like_pattern(filter.search);
    let rows = with_db!(db, pool => sqlx::query_as::<_, CustomerRow>(sqlx::AssertSqlSafe(page.clone()))
        .bind(now).bind(project).bind(&pattern).bind(limit.clamp(1, 500)).bind(offset.max(0)).fetch_all(pool).await)?;
    let total = with_db!(db, pool => sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(total.clone()))
        .bind(now).bind(project).bind(&pattern).fetch_one(pool).await)?;
    Ok((rows, total))
}

/// Up to `limit` customers of `project` ordered by the tenant's id, after `after` (cursor
/// pagination: stable under inserts, unlike offsets).
pub async fn list_after(
    db: &Db,
    project: &ProjectId,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<CustomerRow>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM customers WHERE project_id = $2 AND ($3 IS NULL OR external_id > $3) ORDER BY external_id LIMIT $4"
    );
    Ok(with_db!(db, pool => sqlx::query_as::<_, CustomerRow>(sqlx::AssertSqlSafe(sql.clone()))
        .bind(UnixMillis::now().0).bind(project).bind(after).bind(limit.clamp(1, 500)).fetch_all(pool).await)?)
}

/// A customer of `project` by the tenant's id.
pub async fn find(db: &Db, project: &ProjectId, external_id: &str) -> Result<Option<CustomerRow>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM customers WHERE project_id = $2 AND external_id = $3");
    Ok(with_db!(db, pool => sqlx::query_as::<_, CustomerRow>(sqlx::AssertSqlSafe(sql.clone()))
        .bind(UnixMillis::now().0).bind(project).bind(external_id).fetch_optional(pool).await)?)
}

/// Why a customer could not be deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("no such customer")]
    NotFound,
    #[error("the customer has calls in flight; delete it once they have settled")]
    CallsInFlight,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// How long a deletion is remembered: as long as the longest-lived customer token, so no
/// token issued before the deletion can create the customer again.
pub const DELETION_REMEMBERED_MS: i64 = crate::tokens::MAX_TTL_SECS * 1000;

/// Deletes a customer of `project` that has no call in flight. Its usage events stay in the
/// ledger (without the customer), so billed totals do not change. The deletion is remembered
/// for a day, in the same transaction: a customer token issued before it (a browser or app
/// of that customer's) cannot bring the customer back with the project's default budget.
pub async fn delete(db: &Db, project: &ProjectId, external_id: &str) -> Result<(), DeleteError> {
    const SQL: &str = "DELETE FROM customers WHERE project_id = $1 AND external_id = $2 \
        AND NOT EXISTS (SELECT 1 FROM reservations r WHERE r.customer_id = customers.id)";
    const REMEMBER: &str = "INSERT INTO deleted_customers (project_id, external_id, deleted_at) VALUES ($1, $2, $3) \
        ON CONFLICT (project_id, external_id) DO UPDATE SET deleted_at = excluded.deleted_at";
    let now = UnixMillis::now();
    let n = with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        let n = sqlx::query(SQL).bind(project).bind(external_id).execute(&mut *tx).await?.rows_affected();
        if n == 1 {
            sqlx::query(REMEMBER).bind(project).bind(external_id).bind(now.0).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok::<_, sqlx::Error>(n)
    }.await)
    .map_err(DbError::from)?;
    if n == 1 {
        return Ok(());
    }
    match find(db, project, external_id).await? {
        Some(_) => Err(DeleteError::CallsInFlight),
        None => Err(DeleteError::NotFound),
    }
}

/// A customer of `project` (None for another project's: callers answer 404).
pub async fn get(db: &Db, project: &ProjectId, id: &CustomerId) -> Result<Option<CustomerRow>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM customers WHERE project_id = $2 AND id = $3");
    Ok(with_db!(db, pool => sqlx::query_as::<_, CustomerRow>(sqlx::AssertSqlSafe(sql.clone()))
        .bind(UnixMillis::now().0).bind(project).bind(id).fetch_optional(pool).await)?)
}

/// What a tenant sets about a customer.
#[derive(Debug, Clone)]
pub struct CustomerInput {
    pub external_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub budget: Nanos,
    pub period: BudgetPeriod,
}

impl CustomerInput {
    /// Every problem with this input, by field.
    pub fn problems(&self) -> Vec<ProjectError> {
        let mut problems = Vec::new();
        if let Err(e) = validate_external_id(&self.external_id) {
            problems.push(e);
        }
        let bad = |field, reason: &str| ProjectError::Invalid { field, reason: reason.to_owned() };
        if let Some(name) = &self.name
            && (name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control))
        {
            problems.push(bad("name", "must be at most 200 printable characters"));
        }
        if let Some(email) = &self.email
            && (email.len() > MAX_EMAIL_LEN
                || !email.contains('@')
                || email.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            problems.push(bad("email", "is not an email address"));
        }
        if self.budget.is_negative() {
            problems.push(bad("budget", "must not be negative"));
        }
        problems
    }
}

/// Creates a customer or updates one (by the tenant's id) in one statement: name, email,
/// budget and period together, or nothing. A change of period starts a new window.
pub async fn save(db: &Db, project: &ProjectId, input: &CustomerInput) -> Result<CustomerRow, ProjectError> {
    if let Some(problem) = input.problems().into_iter().next() {
        return Err(problem);
    }
    let external_id = input.external_id.trim();
    let clean = |v: &Option<String>| v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
    let now = UnixMillis::now();
    let (start, end) = input.period.window(now);
    const SQL: &str = "INSERT INTO customers (id, project_id, external_id, name, email, budget_nanos, budget_period, \
        period_start, period_end, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
        ON CONFLICT (project_id, external_id) DO UPDATE SET name = excluded.name, email = excluded.email, \
        budget_nanos = excluded.budget_nanos, \
        spent_nanos = CASE WHEN customers.budget_period = excluded.budget_period THEN customers.spent_nanos ELSE 0 END, \
        period_start = CASE WHEN customers.budget_period = excluded.budget_period THEN customers.period_start ELSE excluded.period_start END, \
        period_end = CASE WHEN customers.budget_period = excluded.budget_period THEN customers.period_end ELSE excluded.period_end END, \
        budget_period = excluded.budget_period";
    with_db!(db, pool => sqlx::query(SQL).bind(CustomerId::generate()).bind(project).bind(external_id)
        .bind(clean(&input.name)).bind(clean(&input.email)).bind(input.budget.0).bind(input.period.as_str())
        .bind(start).bind(end).bind(now.0).execute(pool).await.map(|_| ()))?;
    let sql = format!("SELECT {COLUMNS} FROM customers WHERE project_id = $2 AND external_id = $3");
    let row = with_db!(db, pool => sqlx::query_as::<_, CustomerRow>(sqlx::AssertSqlSafe(sql.clone()))
        .bind(now.0).bind(project).bind(external_id).fetch_optional(pool).await)?;
    row.ok_or(ProjectError::NotFound("customer"))
}

/// Blocks or unblocks a customer of `project`; false if there is none.
pub async fn set_blocked(db: &Db, project: &ProjectId, id: &CustomerId, blocked: bool) -> Result<bool, DbError> {
    // A person's decision replaces a billing hold (payment will not lift it).
    const SQL: &str = "UPDATE customers SET blocked = $1, billing_hold = FALSE WHERE project_id = $2 AND id = $3";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(blocked).bind(project).bind(id).execute(pool).await
        .map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_patterns_take_wildcards_literally() {
        assert_eq!(like_pattern(" Ada_100% "), "%ada\\_100\\%%");
    }
}

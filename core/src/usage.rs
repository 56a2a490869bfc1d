//! Reading the usage ledger (`usage_events`) for people: spend per day, per model, recent
//! calls, the export by day, customer and model (date ranges with cost and margin are
//! [`crate::analytics`]'s). Always scoped to one project, optionally to one customer.

use crate::db::{Db, DbError};
use crate::ids::{CustomerId, ProjectId};
use crate::time::UnixMillis;
use crate::with_db;

pub const DAY_MS: i64 = 86_400_000;

/// Billed spend of one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DaySpend {
    /// The day's first millisecond.
    pub day: i64,
    pub billed_nanos: i64,
    pub calls: i64,
}

/// The last `days` UTC days (today included), oldest first, every day present (0 when idle).
pub async fn daily_spend(
    db: &Db,
    project: &ProjectId,
    customer: Option<&CustomerId>,
    days: i64,
    now: UnixMillis,
) -> Result<Vec<DaySpend>, DbError> {
    let today = now.0 - now.0.rem_euclid(DAY_MS);
    let since = today - (days - 1) * DAY_MS;
    const SQL: &str = "SELECT (created_at / 86400000) * 86400000 AS day, CAST(COALESCE(SUM(billed_nanos), 0) AS BIGINT) AS billed_nanos, \
        COUNT(*) AS calls FROM usage_events WHERE project_id = $1 AND created_at >= $2 AND status = 'settled' \
        AND ($3 IS NULL OR customer_id = $3) GROUP BY (created_at / 86400000) ORDER BY day";
    let rows = with_db!(db, pool => sqlx::query_as::<_, DaySpend>(SQL).bind(project).bind(since).bind(customer)
        .fetch_all(pool).await)?;
    Ok((0..days)
        .map(|i| {
            let day = since + i * DAY_MS;
            rows.iter().find(|r| r.day == day).cloned().unwrap_or(DaySpend { day, billed_nanos: 0, calls: 0 })
        })
        .collect())
}

/// Billed spend per model since `since`, highest first.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ModelSpend {
    pub model: String,
    pub calls: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub billed_nanos: i64,
}

pub async fn spend_by_model(
    db: &Db,
    project: &ProjectId,
    customer: Option<&CustomerId>,
    since: UnixMillis,
) -> Result<Vec<ModelSpend>, DbError> {
    const SQL: &str = "SELECT model, COUNT(*) AS calls, \
        CAST(COALESCE(SUM(input_tokens + cached_input_tokens + cache_write_tokens), 0) AS BIGINT) AS input_tokens, \
        CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens, \
        CAST(COALESCE(SUM(billed_nanos), 0) AS BIGINT) AS billed_nanos FROM usage_events \
        WHERE project_id = $1 AND created_at >= $2 AND status = 'settled' AND ($3 IS NULL OR customer_id = $3) \
        GROUP BY model ORDER BY billed_nanos DESC, model";
    Ok(with_db!(db, pool => sqlx::query_as::<_, ModelSpend>(SQL).bind(project).bind(since.0).bind(customer)
        .fetch_all(pool).await)?)
}

/// One call as the dashboard lists it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallRow {
    pub created_at: i64,
    pub request_id: String,
    pub customer_external_id: Option<String>,
    pub endpoint: String,
    pub model: String,
    pub status: String,
    pub reason: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// What the provider's prices make it; `billed_nanos` is with the markup.
    pub cost_nanos: i64,
    pub billed_nanos: i64,
    pub latency_ms: i64,
    /// Whether the budget lowered its max output (the `clamp` policy).
    pub clamped: bool,
}

/// The newest calls, refused and failed ones included.
pub async fn recent_calls(
    db: &Db,
    project: &ProjectId,
    customer: Option<&CustomerId>,
    limit: i64,
) -> Result<Vec<CallRow>, DbError> {
    calls(db, project, customer, None, None, limit).await
}

/// The newest calls of the project (of one customer, if given; made within `[from, to)`, if
/// given), or only those of one request id (the `x-request-id` its client got), newest first.
pub async fn calls(
    db: &Db,
    project: &ProjectId,
    customer: Option<&CustomerId>,
    request_id: Option<&str>,
    within: Option<(UnixMillis, UnixMillis)>,
    limit: i64,
) -> Result<Vec<CallRow>, DbError> {
    const SQL: &str = "SELECT u.created_at, u.request_id, c.external_id AS customer_external_id, u.endpoint, u.model, \
        u.status, u.reason, u.input_tokens + u.cached_input_tokens + u.cache_write_tokens AS input_tokens, \
        u.output_tokens, u.cost_nanos, u.billed_nanos, u.latency_ms, u.clamped \
        FROM usage_events u LEFT JOIN customers c ON c.id = u.customer_id \
        WHERE u.project_id = $1 AND ($2 IS NULL OR u.customer_id = $2) AND ($3 IS NULL OR u.request_id = $3) \
        AND ($5 IS NULL OR u.created_at >= $5) AND ($6 IS NULL OR u.created_at < $6) \
        ORDER BY u.created_at DESC, u.id DESC LIMIT $4";
    let (from, to) = (within.map(|w| w.0.0), within.map(|w| w.1.0));
    Ok(with_db!(db, pool => sqlx::query_as::<_, CallRow>(SQL).bind(project).bind(customer).bind(request_id)
        .bind(limit).bind(from).bind(to).fetch_all(pool).await)?)
}

/// Usage of one customer, model and UTC day (the export of the ledger).
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct UsageRow {
    pub day: i64,
    pub customer: Option<String>,
    pub model: String,
    pub calls: i64,
    pub refused: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub billed_nanos: i64,
}

/// Usage between `from` (inclusive) and `to` (exclusive), by day, customer and model,
/// optionally for one customer (by the tenant's id).
pub async fn by_day_customer_model(
    db: &Db,
    project: &ProjectId,
    customer: Option<&str>,
    from: UnixMillis,
    to: UnixMillis,
) -> Result<Vec<UsageRow>, DbError> {
    const SQL: &str = "SELECT (u.created_at / 86400000) * 86400000 AS day, c.external_id AS customer, u.model, \
        CAST(COALESCE(SUM(CASE WHEN u.status = 'settled' THEN 1 ELSE 0 END), 0) AS BIGINT) AS calls, \
        CAST(COALESCE(SUM(CASE WHEN u.status = 'refused' THEN 1 ELSE 0 END), 0) AS BIGINT) AS refused, \
        CAST(COALESCE(SUM(u.input_tokens + u.cached_input_tokens + u.cache_write_tokens), 0) AS BIGINT) AS input_tokens, \
        CAST(COALESCE(SUM(u.output_tokens), 0) AS BIGINT) AS output_tokens, \
        CAST(COALESCE(SUM(u.billed_nanos), 0) AS BIGINT) AS billed_nanos \
        FROM usage_events u LEFT JOIN customers c ON c.id = u.customer_id \
        WHERE u.project_id = $1 AND u.created_at >= $2 AND u.created_at < $3 AND ($4 IS NULL OR c.external_id = $4) \
        GROUP BY (u.created_at / 86400000), c.external_id, u.model ORDER BY day, customer, u.model";
    Ok(with_db!(db, pool => sqlx::query_as::<_, UsageRow>(SQL).bind(project).bind(from.0).bind(to.0).bind(customer)
        .fetch_all(pool).await)?)
}

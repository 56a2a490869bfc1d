//! What a reseller earns, on whom: the usage ledger of a date range `[from, to)` summed for
//! the project, and broken down by UTC day, by model and by customer — calls, tokens, what
//! the provider charged (`cost_nanos`), what the customer is billed (`billed_nanos`, markup
//! included) and the margin between them. Always scoped to one project.
//!
//! Calls are counted one way everywhere: `calls` are the settled ones, `refused` those turned
//! away before reaching the provider, `failed` those that failed upstream or were interrupted;
//! together they are every call of the ledger. Money and tokens are summed over all of them
//! (a refused call costs and bills nothing; an interrupted one may be billed).

use crate::db::{Db, DbError};
use crate::ids::{CustomerId, ProjectId};
use crate::time::UnixMillis;
use crate::usage::DAY_MS;
use crate::with_db;

/// The longest range the dashboard asks for (a leap year).
pub const MAX_DAYS: i64 = 366;

/// The figures of a set of usage events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Figures {
    /// Settled calls.
    pub calls: i64,
    pub refused: i64,
    /// Failed upstream, or interrupted.
    pub failed: i64,
    /// Input tokens, cached and cache writes included.
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// What the provider charged (before markup).
    pub cost_nanos: i64,
    /// What the customers are billed (markup included).
    pub billed_nanos: i64,
}

impl Figures {
    /// Billed minus provider cost: what the project earns (negative when it loses).
    pub fn margin_nanos(&self) -> i64 {
        self.billed_nanos.saturating_sub(self.cost_nanos)
    }

    /// Every call of the ledger: settled, refused and failed.
    pub fn all_calls(&self) -> i64 {
        self.calls + self.refused + self.failed
    }
}

/// The sums of [`Figures`] over the events of `usage_events u`, in its field order.
macro_rules! figures {
    () => {
        "CAST(COALESCE(SUM(CASE WHEN u.status = 'settled' THEN 1 ELSE 0 END), 0) AS BIGINT) AS calls, \
         CAST(COALESCE(SUM(CASE WHEN u.status = 'refused' THEN 1 ELSE 0 END), 0) AS BIGINT) AS refused, \
         CAST(COALESCE(SUM(CASE WHEN u.status IN ('failed', 'interrupted') THEN 1 ELSE 0 END), 0) AS BIGINT) AS failed, \
         CAST(COALESCE(SUM(u.input_tokens + u.cached_input_tokens + u.cache_write_tokens), 0) AS BIGINT) AS input_tokens, \
         CAST(COALESCE(SUM(u.output_tokens), 0) AS BIGINT) AS output_tokens, \
         CAST(COALESCE(SUM(u.cost_nanos), 0) AS BIGINT) AS cost_nanos, \
         CAST(COALESCE(SUM(u.billed_nanos), 0) AS BIGINT) AS billed_nanos "
    };
}

/// The events of project `$1` in `[$2, $3)`.
macro_rules! in_range {
    () => {
        " FROM usage_events u WHERE u.project_id = $1 AND u.created_at >= $2 AND u.created_at < $3 "
    };
}

/// The project's figures over `[from, to)`.
pub async fn totals(db: &Db, project: &ProjectId, from: UnixMillis, to: UnixMillis) -> Result<Figures, DbError> {
    const SQL: &str = concat!("SELECT ", figures!(), in_range!());
    Ok(with_db!(db, pool => sqlx::query_as::<_, Figures>(SQL).bind(project).bind(from.0).bind(to.0)
        .fetch_one(pool).await)?)
}

/// The figures of one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DayFigures {
    /// The day's first millisecond.
    pub day: i64,
    #[sqlx(flatten)]
    pub figures: Figures,
}

/// Every UTC day of `[from, to)`, oldest first, idle days included (with zeros).
pub async fn by_day(
    db: &Db,
    project: &ProjectId,
    from: UnixMillis,
    to: UnixMillis,
) -> Result<Vec<DayFigures>, DbError> {
    const SQL: &str = concat!(
        "SELECT (u.created_at / 86400000) * 86400000 AS day, ",
        figures!(),
        in_range!(),
        "GROUP BY (u.created_at / 86400000) ORDER BY day"
    );
    let rows = with_db!(db, pool => sqlx::query_as::<_, DayFigures>(SQL).bind(project).bind(from.0).bind(to.0)
        .fetch_all(pool).await)?;
    let first = from.0 - from.0.rem_euclid(DAY_MS);
    let days = if to.0 > first { (to.0 - first + DAY_MS - 1) / DAY_MS } else { 0 };
    Ok((0..days.min(MAX_DAYS + 1))
        .map(|i| {
            let day = first + i * DAY_MS;
            rows.iter().find(|r| r.day == day).cloned().unwrap_or(DayFigures { day, figures: Figures::default() })
        })
        .collect())
}

/// The figures of one model.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ModelFigures {
    pub model: String,
    #[sqlx(flatten)]
    pub figures: Figures,
}

/// The models called in `[from, to)`, most billed first.
pub async fn by_model(
    db: &Db,
    project: &ProjectId,
    from: UnixMillis,
    to: UnixMillis,
) -> Result<Vec<ModelFigures>, DbError> {
    const SQL: &str =
        concat!("SELECT u.model, ", figures!(), in_range!(), "GROUP BY u.model ORDER BY billed_nanos DESC, u.model");
    Ok(with_db!(db, pool => sqlx::query_as::<_, ModelFigures>(SQL).bind(project).bind(from.0).bind(to.0)
        .fetch_all(pool).await)?)
}

/// The figures of one customer.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CustomerFigures {
    /// None for calls of a deleted customer.
    pub customer_id: Option<CustomerId>,
    /// The tenant's id for the customer.
    pub external_id: Option<String>,
    #[sqlx(flatten)]
    pub figures: Figures,
}

/// The customers who called in `[from, to)`, most billed first: the first `limit` of them (a
/// project may have millions; None: all, for an export).
pub async fn by_customer(
    db: &Db,
    project: &ProjectId,
    from: UnixMillis,
    to: UnixMillis,
    limit: Option<i64>,
) -> Result<Vec<CustomerFigures>, DbError> {
    const SQL: &str = concat!(
        "SELECT u.customer_id, c.external_id, ",
        figures!(),
        " FROM usage_events u LEFT JOIN customers c ON c.id = u.customer_id AND c.project_id = u.project_id \
          WHERE u.project_id = $1 AND u.created_at >= $2 AND u.created_at < $3 \
          GROUP BY u.customer_id, c.external_id ORDER BY billed_nanos DESC, c.external_id LIMIT $4"
    );
    let limit = limit.unwrap_or(i64::MAX);
    Ok(with_db!(db, pool => sqlx::query_as::<_, CustomerFigures>(SQL).bind(project).bind(from.0).bind(to.0)
        .bind(limit).fetch_all(pool).await)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_is_billed_minus_cost_and_may_be_negative() {
        let f = Figures { cost_nanos: 100, billed_nanos: 125, ..Figures::default() };
        assert_eq!(f.margin_nanos(), 25);
        let loss = Figures { cost_nanos: 100, billed_nanos: 40, ..Figures::default() };
        assert_eq!(loss.margin_nanos(), -60);
        let calls = Figures { calls: 3, refused: 2, failed: 1, ..Figures::default() };
        assert_eq!(calls.all_calls(), 6);
    }
}

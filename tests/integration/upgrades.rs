//! Upgrading a database that holds data: the migration that lets budgets roll (a table rebuild
//! on SQLite) keeps every row and every foreign key working.

use tollgate_core::ids::{CustomerId, OrgId, ProjectId, ReservationId, UsageEventId};
use tollgate_core::money::Nanos;
use tollgate_core::period::{BudgetPeriod, ROLLING_DAYS};
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult};

pub fn cases() -> Vec<DbCase> {
    db_cases![rolling_budgets_arrive_without_losing_a_row]
}

async fn rolling_budgets_arrive_without_losing_a_row(db: TestDatabase) -> TestResult {
    let pool = db.connect().await?;
    pool.migrate_until(3).await?;
    let (org, project, customer) = (OrgId::generate(), ProjectId::generate(), CustomerId::generate());
    let (reservation, event) = (ReservationId::generate(), UsageEventId::generate());
    with_db!(&pool, p => async {
        sqlx::query("INSERT INTO organizations (id, name, created_at) VALUES ($1, 'Acme', 1)").bind(&org).execute(p).await?;
        sqlx::query("INSERT INTO projects (id, org_id, name, default_budget_period, created_at) VALUES ($1, $2, 'Chat', 'day', 1)")
            .bind(&project).bind(&org).execute(p).await?;
        sqlx::query("INSERT INTO customers (id, project_id, external_id, name, budget_nanos, budget_period, period_start, \
            period_end, spent_nanos, reserved_nanos, blocked, created_at) VALUES ($1, $2, 'c1', 'Grace', 500, 'month', 10, 20, 7, 3, TRUE, 1)")
            .bind(&customer).bind(&project).execute(p).await?;
        sqlx::query("INSERT INTO reservations (id, customer_id, amount_nanos, request_id, created_at, expires_at) VALUES ($1, $2, 3, 'r', 1, 2)")
            .bind(&reservation).bind(&customer).execute(p).await?;
        sqlx::query("INSERT INTO usage_events (id, project_id, customer_id, request_id, endpoint, model, status, input_tokens, \
            cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, reserved_nanos, cost_nanos, billed_nanos, \
            usage_source, latency_ms, created_at) VALUES ($1, $2, $3, 'r', 'chat.completions', 'm', 'settled', 1, 0, 0, 2, 0, 3, 7, 7, 'provider', 5, 1)")
            .bind(&event).bind(&project).bind(&customer).execute(p).await?;
        Ok::<_, sqlx::Error>(())
    }.await)?;

    pool.migrate().await?;
    assert!(pool.pending_migrations().await?.is_empty());
    let row: (String, i64, String, i64, i64, i64, i64, i64, bool) = with_db!(&pool, p => sqlx::query_as(
        "SELECT name, budget_nanos, budget_period, period_start, period_end, spent_nanos, reserved_nanos, created_at, blocked \
         FROM customers WHERE id = $1").bind(&customer).fetch_one(p).await)?;
    assert_eq!(row, ("Grace".into(), 500, "month".into(), 10, 20, 7, 3, 1, true));
    let period: String = with_db!(&pool, p => sqlx::query_scalar("SELECT default_budget_period FROM projects WHERE id = $1")
        .bind(&project).fetch_one(p).await)?;
    assert_eq!(period, "day");
    let counts: (i64, i64) = with_db!(&pool, p => sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM reservations), (SELECT COUNT(*) FROM usage_events WHERE customer_id IS NOT NULL)")
        .fetch_one(p).await)?;
    assert_eq!(counts, (1, 1), "the rebuild dropped dependent rows");

    // Foreign keys still hold: a reservation for no customer is refused...
    let orphan = with_db!(&pool, p => sqlx::query("INSERT INTO reservations (id, customer_id, amount_nanos, request_id, created_at, expires_at) \
        VALUES ($1, 'cus_nobody', 1, 'r', 1, 2)").bind(ReservationId::generate()).execute(p).await.map(|_| ()));
    assert!(orphan.is_err(), "a reservation of no customer was accepted");
    // ...and rolling budgets are accepted now.
    let rolled =
        tollgate_core::projects::upsert_customer_budget(&pool, &project, "c1", Nanos(900), BudgetPeriod::Rolling)
            .await?;
    assert_eq!(rolled.budget_period, "rolling");
    assert_eq!(rolled.period_end - rolled.period_start, ROLLING_DAYS * 86_400_000);
    // ...and deleting the project still cascades through the rebuilt tables.
    with_db!(&pool, p => sqlx::query("DELETE FROM projects WHERE id = $1").bind(&project).execute(p).await.map(|_| ()))?;
    let left: (i64, i64, i64) = with_db!(&pool, p => sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM customers), (SELECT COUNT(*) FROM reservations), (SELECT COUNT(*) FROM usage_events)")
        .fetch_one(p).await)?;
    assert_eq!(left, (0, 0, 0));
    pool.close().await;
    Ok(())
}

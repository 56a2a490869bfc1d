//! The ledger's writers under a crowd: many reservations and settlements of one customer
//! submitted at once land in the same batches (on PostgreSQL one statement holds a whole
//! batch), and the answers are still what one-at-a-time would give — nothing held past the
//! budget, no hold refused that fit, every settlement charged once.

use futures::future::join_all;
use tollgate_core::ledger::{CallStatus, Hold, ReserveOutcome, Settlement, UsageRecord, UsageSource};
use tollgate_core::money::Nanos;
use tollgate_core::pricing::TokenUsage;
use tollgate_core::projects::{self, BudgetPolicy, Customer};
use tollgate_core::time::UnixMillis;
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{TestDatabase, TestResult, eventually};
use crate::proxy::{OUTPUT_NANOS_PER_TOKEN, Setup, setup};

pub fn cases() -> Vec<crate::helpers::DbCase> {
    db_cases![
        a_crowd_of_holds_fills_the_budget_and_no_further,
        settling_a_crowd_frees_every_hold_and_charges_once,
        a_crowd_rolls_an_ended_period_over_once_and_a_blocked_customer_holds_nothing,
        holds_whose_callers_stopped_waiting_are_released,
    ]
}

/// Amounts of different sizes, so that a large one can fail where a later small one fits.
fn amount(i: i64) -> Nanos {
    Nanos(if i % 7 == 0 { 90 } else { 1 + i % 13 })
}

async fn customer(s: &Setup, name: &str, budget_tokens: i64) -> anyhow::Result<Customer> {
    s.budget(name, budget_tokens).await?;
    projects::find_customer(&s.app.state.db, &s.project.id, name).await?.ok_or_else(|| anyhow::anyhow!("no {name}"))
}

async fn hold_all(s: &Setup, customer: &Customer, amounts: &[Nanos]) -> anyhow::Result<Vec<ReserveOutcome>> {
    let expires = UnixMillis::now().plus_secs(60);
    let holds = amounts.iter().enumerate().map(|(i, amount)| {
        let hold = Hold::new(customer.id.clone(), customer.period(), *amount, format!("req-{i}"), expires);
        s.app.state.ledger.reserve(hold)
    });
    Ok(join_all(holds).await.into_iter().collect::<Result<_, _>>()?)
}

/// What the database holds for `customer`: (reserved_nanos, the sum of its open reservations).
async fn held(s: &Setup, customer: &Customer) -> anyhow::Result<(i64, i64)> {
    let c = projects::get_customer(&s.app.state.db, &customer.id).await?.ok_or_else(|| anyhow::anyhow!("gone"))?;
    let open: i64 = with_db!(&s.app.state.db, pool => sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(amount_nanos), 0) AS BIGINT) FROM reservations WHERE customer_id = $1")
        .bind(&customer.id).fetch_one(pool).await)?;
    Ok((c.reserved_nanos, open))
}

async fn a_crowd_of_holds_fills_the_budget_and_no_further(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    let budget = 2_000 * OUTPUT_NANOS_PER_TOKEN;
    let c = customer(&s, "crowd", 2_000).await?;
    let unit = Nanos(OUTPUT_NANOS_PER_TOKEN * 10);
    let amounts: Vec<Nanos> = (0..400).map(|i| Nanos(amount(i).0 * unit.0)).collect();
    let outcomes = hold_all(&s, &c, &amounts).await?;

    let mut total = 0;
    let mut refused = Vec::new();
    for (outcome, asked) in outcomes.iter().zip(&amounts) {
        match outcome {
            ReserveOutcome::Reserved { reservation, remaining } => {
                assert_eq!(reservation.amount, *asked);
                assert!(remaining.0 >= 0, "held past the budget: {remaining:?} left");
                total += asked.0;
            }
            ReserveOutcome::Insufficient { remaining } => {
                assert!(remaining.0 < asked.0, "refused {asked:?} with {remaining:?} left");
                refused.push(*asked);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(total <= budget, "held {total} of {budget}");
    assert!(!refused.is_empty(), "the crowd asked for more than the budget");
    // Nothing was ever freed, so what is left at the end is at most what any refusal saw:
    // a refused hold larger than that was refused rightly, a smaller one falsely.
    let left = budget - total;
    for asked in &refused {
        assert!(asked.0 > left, "refused {asked:?} though {left} was left at the end");
    }
    assert_eq!(held(&s, &c).await?, (total, total));
    s.app.stop().await
}

async fn settling_a_crowd_frees_every_hold_and_charges_once(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    let c = customer(&s, "settle", 1_000_000).await?;
    let amounts: Vec<Nanos> = (0..300).map(|i| Nanos(amount(i).0 * 1_000)).collect();
    let reservations: Vec<_> = hold_all(&s, &c, &amounts)
        .await?
        .into_iter()
        .map(|outcome| match outcome {
            ReserveOutcome::Reserved { reservation, .. } => reservation,
            other => panic!("a budget this large holds every call: {other:?}"),
        })
        .collect();
    let total: i64 = amounts.iter().map(|a| a.0).sum();
    assert_eq!(held(&s, &c).await?, (total, total));

    // Settled at half what each held, while as many new holds arrive in the same batches.
    let record = |i: usize, billed: Nanos| UsageRecord {
        project_id: s.project.id.clone(),
        customer_id: Some(c.id.clone()),
        // What a batch carries as JSON (SQLite) or arrays (PostgreSQL) comes back as sent.
        request_id: format!("req-{i} \"quoted\" 'single' \\ ü 🙂"),
        endpoint: "chat.completions".into(),
        model: "gpt-4o-mini".into(),
        status: CallStatus::Settled,
        reason: None,
        tokens: TokenUsage { input: 10, output: 5, ..TokenUsage::default() },
        reserved: Nanos(billed.0 * 2),
        cost: billed,
        billed,
        source: UsageSource::Provider,
        latency_ms: 1,
    };
    let settlements = reservations.iter().enumerate().map(|(i, r)| {
        let billed = Nanos(r.amount.0 / 2);
        s.app.state.ledger.settle(Settlement::new(Some(r.clone()), record(i, billed)))
    });
    let (settled, again) = tokio::join!(join_all(settlements), hold_all(&s, &c, &amounts));
    let again = again?;
    for remaining in settled {
        assert!(remaining?.is_some(), "a settlement with a customer reports what it has left");
    }
    let billed: i64 = amounts.iter().map(|a| a.0 / 2).sum();
    assert!(again.iter().all(|o| matches!(o, ReserveOutcome::Reserved { .. })));
    assert_eq!(held(&s, &c).await?, (total, total), "the first holds freed, the second ones held");
    let after = projects::get_customer(&s.app.state.db, &c.id).await?.ok_or_else(|| anyhow::anyhow!("gone"))?;
    assert_eq!(after.spent_nanos, billed);
    let events: (i64, i64) = with_db!(&s.app.state.db, pool => sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(billed_nanos), 0) AS BIGINT) FROM usage_events WHERE customer_id = $1")
        .bind(&c.id).fetch_one(pool).await)?;
    assert_eq!(events, (300, billed));
    let ids: Vec<String> = with_db!(&s.app.state.db, pool => sqlx::query_scalar(
        "SELECT request_id FROM usage_events WHERE customer_id = $1").bind(&c.id).fetch_all(pool).await)?;
    assert!(ids.iter().any(|id| id == "req-7 \"quoted\" 'single' \\ ü 🙂"), "{:?}", ids.first());

    // A settlement applied again (its reservation gone) neither frees nor charges a second time.
    let first = reservations[0].clone();
    let twice = Settlement::new(Some(first), record(0, Nanos(0)));
    s.app.state.ledger.settle(twice).await?;
    assert_eq!(held(&s, &c).await?, (total, total));
    s.app.stop().await
}

async fn a_crowd_rolls_an_ended_period_over_once_and_a_blocked_customer_holds_nothing(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    let ended = customer(&s, "ended", 1_000).await?;
    let blocked = customer(&s, "blocked", 1_000).await?;
    // The whole budget spent in a period that ended a second ago; the other customer blocked.
    let past = UnixMillis::now().0 - 1_000;
    with_db!(&s.app.state.db, pool => sqlx::query(
        "UPDATE customers SET spent_nanos = budget_nanos, period_end = $1 WHERE id = $2")
        .bind(past).bind(&ended.id).execute(pool).await.map(|r| r.rows_affected()))?;
    with_db!(&s.app.state.db, pool => sqlx::query("UPDATE customers SET blocked = TRUE WHERE id = $1")
        .bind(&blocked.id).execute(pool).await.map(|r| r.rows_affected()))?;

    let unit = Nanos(OUTPUT_NANOS_PER_TOKEN);
    let units = [unit; 50];
    let (fresh, refused) = tokio::join!(hold_all(&s, &ended, &units), hold_all(&s, &blocked, &units));
    assert!(fresh?.iter().all(|o| matches!(o, ReserveOutcome::Reserved { .. })), "a new period has its whole budget");
    assert!(refused?.iter().all(|o| matches!(o, ReserveOutcome::Blocked)));

    let after = projects::get_customer(&s.app.state.db, &ended.id).await?.ok_or_else(|| anyhow::anyhow!("gone"))?;
    assert_eq!(after.spent_nanos, 0, "the ended period's spend does not count");
    assert!(after.period_end > UnixMillis::now().0 && after.period_start <= UnixMillis::now().0);
    assert_eq!(held(&s, &ended).await?, (50 * unit.0, 50 * unit.0));
    assert_eq!(held(&s, &blocked).await?, (0, 0));
    s.app.stop().await
}

/// A call cancelled while its reservation is being made (the client went away) does not leave
/// the hold behind: the ledger releases it as soon as it is made, not when it expires.
async fn holds_whose_callers_stopped_waiting_are_released(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    let c = customer(&s, "impatient", 1_000_000).await?;
    let expires = UnixMillis::now().plus_secs(3_600);
    let unit = Nanos(1_000);
    let impatient = (0..200).map(|i| {
        let hold = Hold::new(c.id.clone(), c.period(), unit, format!("req-{i}"), expires);
        tokio::time::timeout(std::time::Duration::from_micros(200), s.app.state.ledger.reserve(hold))
    });
    let outcomes = join_all(impatient).await;
    let mut kept = 0;
    // A timeout's `Ok`: the caller waited long enough to get its hold.
    for outcome in outcomes.iter().flatten() {
        assert!(matches!(outcome, Ok(ReserveOutcome::Reserved { .. })), "{outcome:?}");
        kept += unit.0;
    }
    assert!(kept < 200 * unit.0, "some callers stopped waiting");
    // What the callers that waited got stays held; what the others would have got is freed.
    eventually(std::time::Duration::from_secs(10), || async { Ok(held(&s, &c).await? == (kept, kept)) }).await?;
    s.app.stop().await
}

//! The ledger's writers under a crowd: many reservations and settlements of one customer
//! submitted at once land in the same batches (on PostgreSQL one statement holds a whole
//! batch), and the answers are still what one-at-a-time would give — nothing held past the
//! budget, no hold refused that fit, every settlement charged once.

use futures::future::join_all;
use tollgate_core::config::SqliteSync;
use tollgate_core::ledger::{
    CallStatus, Hold, Ledger, Reservation, ReserveOutcome, Settlement, UsageRecord, UsageSource, lease,
};
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
        settling_many_customers_at_once_charges_each_what_its_calls_billed,
        a_crowd_rolls_an_ended_period_over_once_and_a_blocked_customer_holds_nothing,
        holds_whose_callers_stopped_waiting_are_released,
        a_busy_customer_s_calls_share_a_lease_and_nothing_stays_held_at_rest,
        leased_calls_on_two_processes_never_spend_past_the_budget,
        a_lease_is_carved_no_more_once_its_customer_is_blocked,
        a_call_waits_for_spare_another_process_gives_back_late,
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
    let reservations: Vec<_> = hold_all(&s, &c, &amounts).await?.into_iter().map(reserved).collect();
    let total: i64 = amounts.iter().map(|a| a.0).sum();
    assert_eq!(held(&s, &c).await?, (total, total));

    // Settled at half what each held, while as many new holds arrive in the same batches.
    let record = |i: usize, billed: Nanos| UsageRecord {
        // What a batch carries as JSON (SQLite) or arrays (PostgreSQL) comes back as sent.
        request_id: format!("req-{i} \"quoted\" 'single' \\ ü 🙂"),
        ..settled_call(&s, &c, i, Nanos(billed.0 * 2), billed)
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

/// Batches that hold many customers' settlements (and holds) at once: each customer is
/// charged what its own calls billed and unheld what its own reservations held.
async fn settling_many_customers_at_once_charges_each_what_its_calls_billed(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    let mut customers = Vec::new();
    for k in 0..40 {
        customers.push(customer(&s, &format!("many-{k}"), 1_000_000).await?);
    }
    // Customer k holds 5 calls of (k + 1) µ$ each; its call j is billed j fifths of what it held.
    let unit = |k: usize| Nanos((k as i64 + 1) * 1_000);
    let billed = |k: usize, j: usize| Nanos(unit(k).0 * j as i64 / 5);
    let amounts: Vec<[Nanos; 5]> = (0..customers.len()).map(|k| [unit(k); 5]).collect();
    let holds = customers.iter().zip(&amounts).map(|(c, amounts)| hold_all(&s, c, amounts));
    let held_first: Vec<Vec<Reservation>> = join_all(holds)
        .await
        .into_iter()
        .map(|outcomes| outcomes.map(|o| o.into_iter().map(reserved).collect()))
        .collect::<Result<_, _>>()?;
    let settlements = held_first.iter().enumerate().flat_map(|(k, rs)| {
        let s = &s;
        let c = &customers[k];
        rs.iter().enumerate().map(move |(j, r)| {
            let record = settled_call(s, c, k * 5 + j, unit(k), billed(k, j));
            s.app.state.ledger.settle(Settlement::new(Some(r.clone()), record))
        })
    });
    // A second round of holds arrives while the first is settled, in the same batches.
    let again = customers.iter().zip(&amounts).map(|(c, amounts)| hold_all(&s, c, amounts));
    let (settled, again) = tokio::join!(join_all(settlements), join_all(again));
    for remaining in settled {
        assert!(remaining?.is_some());
    }
    for (k, c) in customers.iter().enumerate() {
        assert!(again[k].as_ref().is_ok_and(|o| o.iter().all(|o| matches!(o, ReserveOutcome::Reserved { .. }))));
        let spent: i64 = (0..5).map(|j| billed(k, j).0).sum();
        let (spent_nanos, reserved_nanos, rows, events) = books(&s, c).await?;
        assert_eq!(
            (spent_nanos, reserved_nanos, rows, events),
            (spent, unit(k).0 * 5, 5, 5),
            "customer {k}: charged its own calls, holding its second round only"
        );
    }
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

/// A settled call's record for `customer`, billed `billed`.
fn settled_call(s: &Setup, customer: &Customer, i: usize, reserved: Nanos, billed: Nanos) -> UsageRecord {
    UsageRecord {
        project_id: s.project.id.clone(),
        customer_id: Some(customer.id.clone()),
        request_id: format!("req-{i}"),
        endpoint: "chat.completions".into(),
        model: "gpt-4o-mini".into(),
        status: CallStatus::Settled,
        reason: None,
        tokens: TokenUsage { input: 10, output: 5, ..TokenUsage::default() },
        reserved,
        cost: billed,
        billed,
        source: UsageSource::Provider,
        latency_ms: 1,
        clamped: false,
    }
}

async fn reserve_leased(
    ledger: &Ledger,
    customer: &Customer,
    amount: Nanos,
    i: usize,
) -> anyhow::Result<ReserveOutcome> {
    let hold =
        Hold::new(customer.id.clone(), customer.period(), amount, format!("req-{i}"), UnixMillis::now().plus_secs(60));
    Ok(ledger.reserve_leased(hold).await?)
}

fn reserved(outcome: ReserveOutcome) -> Reservation {
    match outcome {
        ReserveOutcome::Reserved { reservation, .. } => reservation,
        other => panic!("a budget this large holds every call: {other:?}"),
    }
}

/// What the database has for `customer`: (spent, reserved, open reservation rows, usage events).
async fn books(s: &Setup, customer: &Customer) -> anyhow::Result<(i64, i64, i64, i64)> {
    let (reserved, open) = held(s, customer).await?;
    assert_eq!(reserved, open, "reserved_nanos is the sum of the open reservations");
    let c = projects::get_customer(&s.app.state.db, &customer.id).await?.ok_or_else(|| anyhow::anyhow!("gone"))?;
    let (rows, events): (i64, i64) = with_db!(&s.app.state.db, pool => sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM reservations WHERE customer_id = $1), \
                (SELECT COUNT(*) FROM usage_events WHERE customer_id = $1)")
        .bind(&customer.id).fetch_one(pool).await)?;
    Ok((c.spent_nanos, reserved, rows, events))
}

/// Calls that overlap share one reservation — a lease — carved in memory, and the lease's
/// last call gives back what is left: nothing is held once no call is in flight.
async fn a_busy_customer_s_calls_share_a_lease_and_nothing_stays_held_at_rest(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    let ledger = &s.app.state.ledger;
    let c = customer(&s, "busy", 10_000_000).await?;
    let unit = Nanos(1_000);

    // Alone, nobody else in flight: a hold of its own.
    let first = reserved(reserve_leased(ledger, &c, unit, 0).await?);
    assert!(!first.is_leased());
    // While it is in flight, the next ones share a lease.
    let mut calls = vec![first];
    for i in 1..=100 {
        calls.push(reserved(reserve_leased(ledger, &c, unit, i).await?));
    }
    let leased = calls.iter().filter(|r| r.is_leased()).count();
    assert!(leased >= 95, "only {leased} of 100 overlapping calls were carved from a lease");
    let (_, held_now, rows, _) = books(&s, &c).await?;
    assert!(rows <= 4, "{rows} rows held for 101 calls");
    assert!(held_now >= 101 * unit.0, "{held_now} held for 101 calls in flight");

    // Settled at a quarter, some not billed at all (failed), all at once.
    let settlements = calls.iter().enumerate().map(|(i, r)| {
        let billed = if i % 10 == 3 { Nanos::ZERO } else { Nanos(r.amount.0 / 4) };
        ledger.settle(Settlement::new(Some(r.clone()), settled_call(&s, &c, i, r.amount, billed)))
    });
    for remaining in join_all(settlements).await {
        remaining?;
    }
    let billed: i64 = (0..=100).map(|i| if i % 10 == 3 { 0 } else { unit.0 / 4 }).sum();
    assert_eq!(books(&s, &c).await?, (billed, 0, 0, 101), "(spent, reserved, rows, events) at rest");

    // The next call holds alone again.
    let again = reserved(reserve_leased(ledger, &c, unit, 200).await?);
    assert!(!again.is_leased());
    ledger.settle(Settlement::new(Some(again), settled_call(&s, &c, 200, unit, unit))).await?;
    assert_eq!(books(&s, &c).await?, (billed + unit.0, 0, 0, 102));
    s.app.stop().await
}

/// Two processes (two ledgers on one database, each with its own leases) run a customer's
/// budget dry with overlapping calls: never past the budget, every call charged once, and
/// nothing left held — the budget that is left can be held whole at the end.
async fn leased_calls_on_two_processes_never_spend_past_the_budget(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    let other = Ledger::start(s.app.state.db.clone(), SqliteSync::Full);
    let budget = 200_000 * OUTPUT_NANOS_PER_TOKEN;
    let c = customer(&s, "dry", 200_000).await?;
    let ledgers = [&s.app.state.ledger, &other];

    // 24 callers, 12 on each process, each calling until it is refused: worst cases of
    // different sizes, billed from nothing up to all of it.
    let callers = (0..24).map(|caller| {
        let (ledger, s, c) = (ledgers[caller % 2], &s, &c);
        async move {
            let (mut calls, mut billed, mut leased) = (0i64, 0i64, 0i64);
            for i in 0.. {
                let asked = Nanos(OUTPUT_NANOS_PER_TOKEN * (50 + (caller as i64 * 7 + i) % 150));
                let reservation = match reserve_leased(ledger, c, asked, caller * 100_000 + i as usize).await? {
                    ReserveOutcome::Reserved { reservation, .. } => reservation,
                    ReserveOutcome::Insufficient { .. } => break,
                    // The other process changed the row after this statement's snapshot: again
                    // (as the proxy does).
                    ReserveOutcome::Unknown => continue,
                    other => anyhow::bail!("unexpected {other:?}"),
                };
                leased += i64::from(reservation.is_leased());
                tokio::task::yield_now().await;
                let bill = Nanos(asked.0 * ((caller as i64 + i) % 5) / 4);
                let record = settled_call(s, c, i as usize, asked, bill);
                ledger.settle(Settlement::new(Some(reservation), record)).await?;
                calls += 1;
                billed += bill.0;
            }
            Ok::<_, anyhow::Error>((calls, billed, leased))
        }
    });
    let (mut calls, mut billed, mut leased) = (0, 0, 0);
    for outcome in join_all(callers).await {
        let (n, b, l) = outcome?;
        calls += n;
        billed += b;
        leased += l;
    }
    assert!(leased * 2 > calls, "only {leased} of {calls} calls were carved from leases");
    let (spent, held_now, rows, events) = books(&s, &c).await?;
    assert_eq!((spent, events), (billed, calls), "each call charged once");
    assert_eq!((held_now, rows), (0, 0), "nothing held at rest");
    assert!(spent <= budget, "spent {spent} of {budget}");
    assert!(spent > budget / 10 * 9, "ran dry at {spent} of {budget}");
    // What is left is free to hold, in one piece.
    let left = Nanos(budget - spent);
    let last = reserved(reserve_leased(&other, &c, left, 0).await?);
    other.settle(Settlement::new(Some(last), settled_call(&s, &c, 0, left, Nanos::ZERO))).await?;
    drop(other);
    s.app.stop().await
}

/// A block takes effect on a lease at once in the process where it was made, and within
/// [`lease::FRESH`] in the others; the calls already in flight finish on it.
async fn a_lease_is_carved_no_more_once_its_customer_is_blocked(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    let ledger = &s.app.state.ledger;
    let c = customer(&s, "to-block", 10_000_000).await?;
    let unit = Nanos(1_000);
    let (db, id) = (&s.app.state.db, &c.id);
    let block = move |blocked: bool| async move {
        with_db!(db, pool => sqlx::query("UPDATE customers SET blocked = $1 WHERE id = $2")
            .bind(blocked).bind(id).execute(pool).await.map(|r| r.rows_affected()))
    };
    let mut calls = vec![reserved(reserve_leased(ledger, &c, unit, 0).await?)];
    calls.push(reserved(reserve_leased(ledger, &c, unit, 1).await?));
    assert!(calls[1].is_leased());

    // Blocked by another process: carved from until the lease is no longer fresh.
    block(true).await?;
    calls.push(reserved(reserve_leased(ledger, &c, unit, 2).await?));
    tokio::time::sleep(lease::FRESH + std::time::Duration::from_millis(100)).await;
    assert!(matches!(reserve_leased(ledger, &c, unit, 3).await?, ReserveOutcome::Blocked));

    // Unblocked, a new lease; blocked here: refused at once.
    block(false).await?;
    calls.push(reserved(reserve_leased(ledger, &c, unit, 4).await?));
    calls.push(reserved(reserve_leased(ledger, &c, unit, 5).await?));
    assert!(calls[4].is_leased());
    block(true).await?;
    ledger.forget_lease(&c.id);
    assert!(matches!(reserve_leased(ledger, &c, unit, 6).await?, ReserveOutcome::Blocked));

    for (i, r) in calls.into_iter().enumerate() {
        ledger.settle(Settlement::new(Some(r), settled_call(&s, &c, i, unit, unit))).await?;
    }
    assert_eq!(books(&s, &c).await?, (5 * unit.0, 0, 0, 5), "(spent, reserved, rows, events)");
    s.app.stop().await
}

/// Another process's lease holds spare past its due time (its process is slow: a busy
/// machine), so a call that the budget covers without that spare finds it held on its first
/// try and on a retry at the due time. It waits on — for as long as any spare is held — and
/// is admitted once it is given back, not refused.
async fn a_call_waits_for_spare_another_process_gives_back_late(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    let (pool, ledger) = (&s.app.state.db, &s.app.state.ledger);
    let c = customer(&s, "late", 1_000).await?;
    let budget = 1_000 * OUTPUT_NANOS_PER_TOKEN;
    // The other process's lease: one call's share (a tenth) and spare for the rest, due back
    // already.
    let (share, spare) = (budget / 10, budget - budget / 10);
    let now = UnixMillis::now().0;
    with_db!(pool, pool => sqlx::query(
        "INSERT INTO reservations (id, customer_id, amount_nanos, request_id, created_at, expires_at, spare_until) \
         VALUES ('res_elsewhere', $1, $2, 'req-elsewhere', $3, $4, $5)")
        .bind(&c.id).bind(budget).bind(now).bind(now + 60_000).bind(now - 1).execute(pool).await.map(drop))?;
    with_db!(pool, pool => sqlx::query("UPDATE customers SET reserved_nanos = reserved_nanos + $1 WHERE id = $2")
        .bind(budget).bind(&c.id).execute(pool).await.map(drop))?;

    // It gives the spare back 700 ms late.
    let giving_back = {
        let (pool, id) = (pool.clone(), c.id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(700)).await;
            // The budget first, then the mark, as one transaction would show them.
            with_db!(&pool, pool => sqlx::query("UPDATE customers SET reserved_nanos = reserved_nanos - $1 WHERE id = $2")
                .bind(spare).bind(&id).execute(pool).await.map(drop))?;
            with_db!(&pool, pool => sqlx::query(
                "UPDATE reservations SET amount_nanos = amount_nanos - $1, spare_until = NULL WHERE id = 'res_elsewhere'")
                .bind(spare).execute(pool).await.map(drop))?;
            Ok::<_, anyhow::Error>(())
        })
    };
    let started = std::time::Instant::now();
    let call = reserve_leased(ledger, &c, Nanos(budget - share), 1).await?;
    let waited = started.elapsed();
    giving_back.await??;
    let call = reserved(call);
    assert!(waited >= std::time::Duration::from_millis(600), "admitted after {waited:?}, before the spare came back?");
    ledger.settle(Settlement::new(Some(call), settled_call(&s, &c, 1, Nanos(budget - share), Nanos::ZERO))).await?;
    s.app.stop().await
}

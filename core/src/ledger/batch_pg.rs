//! PostgreSQL: a batch of reservations and settlements as one statement, one round trip.
//!
//! Alone, each operation is one statement ([`super::RESERVE_PG`], [`super::SETTLE_PG`]); a
//! batch of a hundred of them was a hundred round trips to a server sharing the machine's
//! cores. Here the batch's operations go as arrays (`unnest`) into one statement of
//! data-modifying CTEs that does what they would do one after the other:
//!
//! 1. The settlements' reservations are deleted (each at most once: a reservation already
//!    released by expiry returns nothing and is not unheld twice) — or, for a call carved
//!    from a lease, the lease's row shrunk by the call's share (unless the batch also deletes
//!    it: its last call, which frees what is left) —, then every customer the
//!    batch touches is locked (`FOR NO KEY UPDATE`, as an `UPDATE` locks it, in id order, after the deletions: the order
//!    [`super::release_expired`] takes its locks in). What follows is computed from the rows
//!    as locked — their latest committed versions, which nothing else can change until this
//!    statement commits — so the conditional check of a lone reservation holds here too.
//! 2. Settlements, in the order they came: each customer is charged what its settlements
//!    billed and unheld what their reservations held (summed per customer once: a sum looked
//!    up per customer row made a batch of many customers quadratic — 4.5 of a 128-operation
//!    batch's 19 ms).
//! 3. Reservations, in the order they came, against what the settlements left: a period that
//!    has ended rolls over (only if something is held, as alone), and a customer's holds are
//!    held while their running total fits. One customer row is written once, whatever the
//!    batch did to it.
//! 4. The reservations held and the usage events are inserted.
//!
//! Holds form a prefix: once one of a customer's holds does not fit, the later ones are not
//! held either. A later one that would have fit on its own (it asks less than what is left
//! once the prefix is held) is answered [`Done::Again`]: the writer applies it in its next
//! batch. Every other answer is what the operations would have got applied one by one in some
//! order, which is all concurrent calls may expect.

use sqlx::PgConnection;

use super::batch::Answers;
use super::{Done, Hold, ROLLING_MS, Settlement};
use crate::time::UnixMillis;

/// The statement. `$1`–`$20`, `$31` and `$36`: the settlements (the usage event's 19 columns in
/// `usage_events`' order, the reservation to free, the share of it to free: null for all
/// of it, the row deleted; and whether the call was clamped); `$21`–`$28` and `$32`–`$35`: the holds; `$29` now; `$30` the
/// length of a rolling window.
const BATCH_PG: &str = "\
WITH s AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[],
        $15::bigint[], $16::bigint[], $17::text[], $18::bigint[], $19::bigint[], $20::text[], $31::bigint[],
        $36::boolean[])
    WITH ORDINALITY AS s(id, project_id, customer_id, request_id, endpoint, model, status, reason,
        input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
        reserved_nanos, cost_nanos, billed_nanos, usage_source, latency_ms, created_at, reservation_id, part,
        clamped, n)
), h AS MATERIALIZED (
    SELECT * FROM unnest($21::text[], $22::text[], $23::bigint[], $24::text[], $25::text[], $26::bigint[],
        $27::bigint[], $28::bigint[], $32::bigint[], $33::text[], $34::text[], $35::text[])
    WITH ORDINALITY AS h(id, customer_id, amount, period, request_id, expires_at, calendar_start, calendar_end,
        spare_until, instance_id, endpoint, model, n)
), deleted AS (
    DELETE FROM reservations r USING s WHERE r.id = s.reservation_id AND s.part IS NULL
    RETURNING s.n, s.customer_id, r.amount_nanos
), shrunk AS (
    UPDATE reservations r SET amount_nanos = r.amount_nanos - p.total
    FROM (SELECT reservation_id, CAST(SUM(part) AS BIGINT) AS total FROM s
          WHERE part IS NOT NULL AND reservation_id NOT IN
              (SELECT reservation_id FROM s WHERE part IS NULL AND reservation_id IS NOT NULL)
          GROUP BY reservation_id) p
    WHERE r.id = p.reservation_id
    RETURNING r.id
), freed AS (
    SELECT n, customer_id, amount_nanos FROM deleted
    UNION ALL
    SELECT s.n, s.customer_id, s.part FROM s JOIN shrunk ON shrunk.id = s.reservation_id
), locked AS MATERIALIZED (
    SELECT c.id, c.budget_nanos, c.spent_nanos, c.reserved_nanos, c.blocked, c.budget_period,
        c.period_start, c.period_end
    FROM customers c
    WHERE c.id IN (SELECT customer_id FROM s UNION SELECT customer_id FROM h)
        AND (SELECT count(*) FROM freed) >= 0
    ORDER BY c.id
    FOR NO KEY UPDATE
), settled AS MATERIALIZED (
    SELECT l.*, l.period_end <= $29 AS ended,
        l.spent_nanos + COALESCE(b.billed, 0) AS spent_after,
        l.reserved_nanos - COALESCE(f.freed, 0) AS reserved_after
    FROM locked l
    LEFT JOIN (SELECT customer_id, CAST(SUM(billed_nanos) AS BIGINT) AS billed FROM s GROUP BY customer_id) b
        ON b.customer_id = l.id
    LEFT JOIN (SELECT customer_id, CAST(SUM(amount_nanos) AS BIGINT) AS freed FROM freed GROUP BY customer_id) f
        ON f.customer_id = l.id
), settles AS (
    SELECT s.n, s.customer_id, (f.n IS NOT NULL OR s.billed_nanos <> 0) AS charges,
        CAST(SUM(s.billed_nanos) OVER w AS BIGINT) AS billed_so_far,
        CAST(SUM(COALESCE(f.amount_nanos, 0)) OVER w AS BIGINT) AS freed_so_far
    FROM s LEFT JOIN freed f ON f.n = s.n
    WINDOW w AS (PARTITION BY s.customer_id ORDER BY s.n)
), candidates AS (
    SELECT h.*, c.blocked, c.budget_period, c.budget_nanos, c.reserved_after,
        CASE WHEN c.ended THEN 0 ELSE c.spent_after END AS spent_for_holds,
        COALESCE(NOT c.blocked AND c.budget_period = h.period, FALSE) AS eligible
    FROM h LEFT JOIN settled c ON c.id = h.customer_id
), decided AS MATERIALIZED (
    SELECT k.*, (k.eligible AND k.spent_for_holds + k.reserved_after + k.so_far <= k.budget_nanos) AS held
    FROM (SELECT candidates.*,
            CAST(SUM(CASE WHEN eligible THEN amount ELSE 0 END) OVER (PARTITION BY customer_id ORDER BY n) AS BIGINT) AS so_far
          FROM candidates) k
), holds AS MATERIALIZED (
    SELECT customer_id, CAST(SUM(amount) AS BIGINT) AS amount, MIN(calendar_start) AS calendar_start, MIN(calendar_end) AS calendar_end
    FROM decided WHERE held GROUP BY customer_id
), charged AS (
    UPDATE customers c SET
        spent_nanos = CASE WHEN hs.customer_id IS NOT NULL AND t.ended THEN 0 ELSE t.spent_after END,
        period_start = CASE WHEN hs.customer_id IS NULL OR NOT t.ended THEN t.period_start
            WHEN t.budget_period = 'rolling' THEN t.period_start + (($29 - t.period_start) / $30) * $30
            ELSE hs.calendar_start END,
        period_end = CASE WHEN hs.customer_id IS NULL OR NOT t.ended THEN t.period_end
            WHEN t.budget_period = 'rolling' THEN t.period_start + (($29 - t.period_start) / $30 + 1) * $30
            ELSE hs.calendar_end END,
        reserved_nanos = t.reserved_after + COALESCE(hs.amount, 0)
    FROM settled t LEFT JOIN holds hs ON hs.customer_id = t.id
    WHERE c.id = t.id
        AND (hs.customer_id IS NOT NULL OR t.spent_after <> t.spent_nanos OR t.reserved_after <> t.reserved_nanos)
), recorded AS (
    INSERT INTO reservations (id, customer_id, amount_nanos, request_id, created_at, expires_at, spare_until, instance_id,
        endpoint, model)
    SELECT id, customer_id, amount, request_id, $29, expires_at, spare_until, instance_id, endpoint, model
    FROM decided WHERE held
), events AS (
    INSERT INTO usage_events (id, project_id, customer_id, request_id, endpoint, model, status, reason,
        input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
        reserved_nanos, cost_nanos, billed_nanos, usage_source, latency_ms, created_at, clamped)
    SELECT id, project_id, customer_id, request_id, endpoint, model, status, reason,
        input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
        reserved_nanos, cost_nanos, billed_nanos, usage_source, latency_ms, created_at, clamped
    FROM s
)
SELECT FALSE AS hold, x.n, NULL::boolean AS held,
    CASE WHEN x.charges AND t.id IS NOT NULL
        THEN t.budget_nanos - (t.spent_nanos + x.billed_so_far) - (t.reserved_nanos - x.freed_so_far) END AS remaining,
    NULL::boolean AS blocked, NULL::text AS period
FROM settles x LEFT JOIN settled t ON t.id = x.customer_id
UNION ALL
SELECT TRUE, d.n, d.held,
    d.budget_nanos - d.spent_for_holds - d.reserved_after - CASE WHEN d.held THEN d.so_far ELSE COALESCE(hs.amount, 0) END,
    d.blocked, d.budget_period
FROM decided d LEFT JOIN holds hs ON hs.customer_id = d.customer_id";

/// A row of the statement's answer: a settlement's or a hold's, by its place in the batch.
type Answer = (bool, i64, Option<bool>, Option<i64>, Option<bool>, Option<String>);

/// Applies `settlements` then `holds`, each in order, as one statement; the answers in the
/// same order (settlements first). Atomic: nothing of it is kept if it fails.
pub(super) async fn apply(
    conn: &mut PgConnection,
    settlements: &[&Settlement],
    holds: &[&Hold],
) -> Result<Vec<Done>, sqlx::Error> {
    let now = UnixMillis::now();
    let windows: Vec<(i64, i64)> = holds.iter().map(|h| h.period.window(now)).collect();
    let created_at = now.0;
    let event = |f: fn(&Settlement) -> i64| settlements.iter().map(|s| f(s)).collect::<Vec<i64>>();
    let text = |f: fn(&Settlement) -> String| settlements.iter().map(|s| f(s)).collect::<Vec<String>>();
    let rows: Vec<Answer> = sqlx::query_as(BATCH_PG)
        .bind(text(|s| s.event_id.to_string()))
        .bind(text(|s| s.record.project_id.to_string()))
        .bind(settlements.iter().map(|s| s.record.customer_id.as_ref().map(|c| c.to_string())).collect::<Vec<_>>())
        .bind(text(|s| s.record.request_id.clone()))
        .bind(text(|s| s.record.endpoint.clone()))
        .bind(text(|s| s.record.model.clone()))
        .bind(text(|s| s.record.status.as_str().to_owned()))
        .bind(settlements.iter().map(|s| s.record.reason.clone()).collect::<Vec<_>>())
        .bind(event(|s| s.record.tokens.input))
        .bind(event(|s| s.record.tokens.cached_input))
        .bind(event(|s| s.record.tokens.cache_write))
        .bind(event(|s| s.record.tokens.output))
        .bind(event(|s| s.record.tokens.reasoning))
        .bind(event(|s| s.record.reserved.0))
        .bind(event(|s| s.record.cost.0))
        .bind(event(|s| s.record.billed.0))
        .bind(text(|s| s.record.source.as_str().to_owned()))
        .bind(event(|s| s.record.latency_ms))
        .bind(vec![created_at; settlements.len()])
        .bind(settlements.iter().map(|s| s.reservation.as_ref().map(|r| r.id.to_string())).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.id.to_string()).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.customer_id.to_string()).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.amount.0).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.period.as_str()).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.request_id.clone()).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.expires_at.0).collect::<Vec<_>>())
        .bind(windows.iter().map(|w| w.0).collect::<Vec<_>>())
        .bind(windows.iter().map(|w| w.1).collect::<Vec<_>>())
        .bind(now.0)
        .bind(ROLLING_MS)
        .bind(settlements.iter().map(|s| s.part.map(|p| p.0)).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.spare_until.map(|t| t.0)).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.instance.as_ref().map(|i| i.to_string())).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.call.as_ref().map(|c| c.0.clone())).collect::<Vec<_>>())
        .bind(holds.iter().map(|h| h.call.as_ref().map(|c| c.1.clone())).collect::<Vec<_>>())
        .bind(settlements.iter().map(|s| s.record.clamped).collect::<Vec<bool>>())
        .fetch_all(conn)
        .await?;
    let mut answers = Answers::new(settlements.len(), holds);
    for (hold, n, held, remaining, blocked, period) in rows {
        if hold {
            answers.hold(n, held.unwrap_or(false), remaining, blocked, period)?;
        } else {
            answers.settled(n, remaining)?;
        }
    }
    answers.finish()
}

//! SQLite: a batch of reservations and settlements as one text, one call into the
//! connection's thread.
//!
//! Alone, an operation is one text of a few statements ([`super::RESERVE_SQLITE`],
//! [`super::SETTLE_SQLITE`]); a batch of a hundred was a hundred exchanges with sqlx's
//! thread for SQLite, each a message there and an answer back, and that — not SQLite's own
//! work — was most of a batch's time. Here the whole batch goes as two JSON arrays
//! (`json_each`) into one fixed text, run under the batch's write lock (`BEGIN IMMEDIATE`,
//! taken by the frame around it), doing what the operations would do one after the other:
//!
//! 1. Settlements, in the order they came: first what each leaves the customer (from the rows
//!    before they change), then each customer charged what its settlements billed and
//!    unheld what their reservations held, the reservations deleted, the events inserted.
//! 2. Reservations, in the order they came, against what the settlements left: a customer's
//!    holds are held while their running total fits, each recorded as a reservation; then
//!    each customer with holds is charged their sum, rolling an ended period over (only if
//!    something is held, as alone); then what each hold leaves, or why it was refused.
//!
//! Holds form a prefix, as on PostgreSQL (see [`super::batch_pg`]): a later hold of a
//! customer that would have fit on its own comes back [`Done::Again`].

use sqlx::{Row, SqliteConnection};

use super::batch::Answers;
use super::{Done, Frame, Framed, Hold, ROLLING_MS, Settlement};
use crate::time::UnixMillis;

/// The statements (`FREED` stands for [`FREED`]). `$1`: the settlements, each `[the usage
/// event's 19 columns in usage_events' order, the reservation to free, the share of it to
/// free (null: all of it, the row deleted), whether the call was clamped (0 or 1)]`; `$2`: the holds, each `[id, customer,
/// amount, period, request id, expires at, calendar start, calendar end, spare until, instance, endpoint, model]`;
/// `$3` now; `$4`
/// the length of a rolling window.
const BATCH_SQLITE: &str = "\
WITH s AS (SELECT key + 1 AS n, value ->> 2 AS customer_id, value ->> 15 AS billed, value ->> 19 AS reservation_id,
                  value ->> 20 AS part
           FROM json_each($1)),
     x AS (SELECT s.n, s.customer_id, (r.id IS NOT NULL OR s.billed <> 0) AS charges,
                  SUM(s.billed) OVER w AS billed_so_far, SUM(FREED) OVER w AS freed_so_far
           FROM s LEFT JOIN reservations r ON r.id = s.reservation_id
           WINDOW w AS (PARTITION BY s.customer_id ORDER BY s.n))
SELECT 0, x.n, NULL,
    CASE WHEN x.charges AND c.id IS NOT NULL
        THEN c.budget_nanos - (c.spent_nanos + x.billed_so_far) - (c.reserved_nanos - x.freed_so_far) END,
    NULL, NULL
FROM x LEFT JOIN customers c ON c.id = x.customer_id;
UPDATE customers SET reserved_nanos = reserved_nanos - t.freed, spent_nanos = spent_nanos + t.billed
FROM (SELECT s.customer_id, SUM(FREED) AS freed, SUM(s.billed) AS billed
      FROM (SELECT value ->> 2 AS customer_id, value ->> 15 AS billed, value ->> 19 AS reservation_id,
                   value ->> 20 AS part FROM json_each($1)) s
      LEFT JOIN reservations r ON r.id = s.reservation_id
      WHERE s.customer_id IS NOT NULL GROUP BY 1) t
WHERE customers.id = t.customer_id AND (t.freed <> 0 OR t.billed <> 0);
DELETE FROM reservations WHERE id IN (SELECT value ->> 19 FROM json_each($1) WHERE value ->> 20 IS NULL);
UPDATE reservations SET amount_nanos = amount_nanos - t.part
FROM (SELECT value ->> 19 AS id, SUM(value ->> 20) AS part FROM json_each($1) WHERE value ->> 20 IS NOT NULL GROUP BY 1) t
WHERE reservations.id = t.id;
INSERT INTO usage_events (id, project_id, customer_id, request_id, endpoint, model, status, reason,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    reserved_nanos, cost_nanos, billed_nanos, usage_source, latency_ms, created_at, clamped)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7,
    value ->> 8, value ->> 9, value ->> 10, value ->> 11, value ->> 12, value ->> 13, value ->> 14, value ->> 15,
    value ->> 16, value ->> 17, value ->> 18, value ->> 21
FROM json_each($1) ORDER BY key;
WITH h AS (SELECT key + 1 AS n, value ->> 0 AS id, value ->> 1 AS customer_id, value ->> 2 AS amount,
                  value ->> 3 AS period, value ->> 4 AS request_id, value ->> 5 AS expires_at,
                  value ->> 8 AS spare_until, value ->> 9 AS instance_id, value ->> 10 AS endpoint,
                  value ->> 11 AS model
           FROM json_each($2)),
     k AS (SELECT h.*, c.budget_nanos, c.reserved_nanos,
                  CASE WHEN c.period_end <= $3 THEN 0 ELSE c.spent_nanos END AS spent,
                  COALESCE(NOT c.blocked AND c.budget_period = h.period, 0) AS eligible
           FROM h LEFT JOIN customers c ON c.id = h.customer_id),
     d AS (SELECT k.*, SUM(CASE WHEN eligible THEN amount ELSE 0 END)
                  OVER (PARTITION BY customer_id ORDER BY n) AS so_far
           FROM k)
INSERT INTO reservations (id, customer_id, amount_nanos, request_id, created_at, expires_at, spare_until, instance_id,
    endpoint, model)
SELECT id, customer_id, amount, request_id, $3, expires_at, spare_until, instance_id, endpoint, model FROM d
WHERE eligible AND spent + reserved_nanos + so_far <= budget_nanos ORDER BY n;
UPDATE customers SET
    spent_nanos = CASE WHEN period_end <= $3 THEN 0 ELSE spent_nanos END,
    period_start = CASE WHEN period_end > $3 THEN period_start
        WHEN budget_period = 'rolling' THEN period_start + (($3 - period_start) / $4) * $4 ELSE t.calendar_start END,
    period_end = CASE WHEN period_end > $3 THEN period_end
        WHEN budget_period = 'rolling' THEN period_start + (($3 - period_start) / $4 + 1) * $4 ELSE t.calendar_end END,
    reserved_nanos = reserved_nanos + t.amount
FROM (SELECT h.value ->> 1 AS customer_id, SUM(r.amount_nanos) AS amount,
             MIN(h.value ->> 6) AS calendar_start, MIN(h.value ->> 7) AS calendar_end
      FROM json_each($2) h JOIN reservations r ON r.id = h.value ->> 0 GROUP BY 1) t
WHERE customers.id = t.customer_id;
WITH h AS (SELECT key + 1 AS n, value ->> 1 AS customer_id, value ->> 2 AS amount,
                  EXISTS (SELECT 1 FROM reservations r WHERE r.id = value ->> 0) AS held
           FROM json_each($2)),
     k AS (SELECT h.*, SUM(CASE WHEN held THEN amount ELSE 0 END) OVER (PARTITION BY customer_id ORDER BY n) AS held_so_far,
                  SUM(CASE WHEN held THEN amount ELSE 0 END) OVER (PARTITION BY customer_id) AS held_in_all
           FROM h)
SELECT 1, k.n, k.held,
    c.budget_nanos - (CASE WHEN c.period_end <= $3 THEN 0 ELSE c.spent_nanos END) - c.reserved_nanos
        + CASE WHEN k.held THEN k.held_in_all - k.held_so_far ELSE 0 END,
    CAST(c.blocked AS INTEGER), c.budget_period
FROM k LEFT JOIN customers c ON c.id = k.customer_id";

/// What settlement `s` frees of its reservation `r` (read before anything changes): a row it
/// deletes, all of it; a share of a lease, that share — unless the batch deletes the lease's
/// row too (its last call), which then frees it all.
/// (The rows the batch deletes are one uncorrelated subquery: SQLite reads them once per
/// statement, not once per settlement.)
const FREED: &str = "CASE WHEN r.id IS NULL THEN 0 WHEN s.part IS NULL THEN r.amount_nanos \
    WHEN r.id IN (SELECT value ->> 19 FROM json_each($1) WHERE value ->> 20 IS NULL) THEN 0 \
    ELSE s.part END";

static BATCH_SQLITE_FRAMED: std::sync::LazyLock<Framed> =
    std::sync::LazyLock::new(|| Framed::new(&BATCH_SQLITE.replace("FREED", FREED)));

/// Applies `settlements` then `holds`, each in order, as one text within the batch's
/// transaction, which `frame` opens and commits around it; the answers in the same order
/// (settlements first).
pub(super) async fn apply(
    conn: &mut SqliteConnection,
    settlements: &[&Settlement],
    holds: &[&Hold],
    frame: Frame,
) -> Result<Vec<Done>, sqlx::Error> {
    let now = UnixMillis::now();
    let settlements_json = serde_json::Value::Array(
        settlements
            .iter()
            .map(|s| {
                let (r, t) = (&s.record, &s.record.tokens);
                serde_json::json!([
                    s.event_id.as_str(),
                    r.project_id.as_str(),
                    r.customer_id.as_ref().map(|c| c.as_str()),
                    r.request_id,
                    r.endpoint,
                    r.model,
                    r.status.as_str(),
                    r.reason,
                    t.input,
                    t.cached_input,
                    t.cache_write,
                    t.output,
                    t.reasoning,
                    r.reserved.0,
                    r.cost.0,
                    r.billed.0,
                    r.source.as_str(),
                    r.latency_ms,
                    now.0,
                    s.reservation.as_ref().map(|r| r.id.as_str()),
                    s.part.map(|p| p.0),
                    i64::from(r.clamped),
                ])
            })
            .collect(),
    );
    let holds_json = serde_json::Value::Array(
        holds
            .iter()
            .map(|h| {
                let (start, end) = h.period.window(now);
                serde_json::json!([
                    h.id.as_str(),
                    h.customer_id.as_str(),
                    h.amount.0,
                    h.period.as_str(),
                    h.request_id,
                    h.expires_at.0,
                    start,
                    end,
                    h.spare_until.map(|t| t.0),
                    h.instance.as_ref().map(|i| i.as_str()),
                    h.call.as_ref().map(|c| c.0.as_str()),
                    h.call.as_ref().map(|c| c.1.as_str())
                ])
            })
            .collect(),
    );
    let rows = sqlx::query(BATCH_SQLITE_FRAMED.get(frame))
        .bind(settlements_json.to_string())
        .bind(holds_json.to_string())
        .bind(now.0)
        .bind(ROLLING_MS)
        .fetch_all(&mut *conn)
        .await?;
    let mut answers = Answers::new(settlements.len(), holds);
    for row in rows {
        let (kind, n, remaining): (i64, i64, Option<i64>) = (row.try_get(0)?, row.try_get(1)?, row.try_get(3)?);
        if kind == 1 {
            let held = row.try_get::<Option<i64>, _>(2)?.unwrap_or(0) != 0;
            let blocked = row.try_get::<Option<i64>, _>(4)?.map(|b| b != 0);
            answers.hold(n, held, remaining, blocked, row.try_get(5)?)?;
        } else {
            answers.settled(n, remaining)?;
        }
    }
    answers.finish()
}

//! What both backends' batches answer (see [`super::batch_pg`], [`super::batch_sqlite`]).

use super::{Done, Hold, Reservation, ReserveOutcome, reserve_outcome};
use crate::money::Nanos;

/// A batch's answers as its statement returns them: one row per operation, numbered from 1
/// in its kind's order.
pub(super) struct Answers<'a> {
    holds: &'a [&'a Hold],
    settled: Vec<Option<Option<Nanos>>>,
    reserved: Vec<Option<Done>>,
}

impl<'a> Answers<'a> {
    pub(super) fn new(settlements: usize, holds: &'a [&'a Hold]) -> Self {
        Self { holds, settled: vec![None; settlements], reserved: (0..holds.len()).map(|_| None).collect() }
    }

    /// Settlement `n` left its customer `remaining` (none: nothing charged, or no customer).
    pub(super) fn settled(&mut self, n: i64, remaining: Option<i64>) -> Result<(), sqlx::Error> {
        *slot(&mut self.settled, n)? = Some(remaining.map(Nanos));
        Ok(())
    }

    /// Hold `n`: held, leaving `remaining`; or not, the customer as seen (none: gone).
    pub(super) fn hold(
        &mut self,
        n: i64,
        held: bool,
        remaining: Option<i64>,
        blocked: Option<bool>,
        period: Option<String>,
    ) -> Result<(), sqlx::Error> {
        let hold = usize::try_from(n - 1).ok().and_then(|i| self.holds.get(i)).ok_or(sqlx::Error::RowNotFound)?;
        let decided = decide(hold, held, remaining, blocked, period);
        *slot(&mut self.reserved, n)? = Some(decided);
        Ok(())
    }

    /// Every operation's answer, settlements first; an operation without its row is an error
    /// (a fault of the statement, not a refusal).
    pub(super) fn finish(self) -> Result<Vec<Done>, sqlx::Error> {
        let settled = self.settled.into_iter().map(|s| s.map(Done::Settled));
        settled.chain(self.reserved).map(|d| d.ok_or(sqlx::Error::RowNotFound)).collect()
    }
}

fn slot<T>(slots: &mut [Option<T>], n: i64) -> Result<&mut Option<T>, sqlx::Error> {
    usize::try_from(n - 1).ok().and_then(|i| slots.get_mut(i)).ok_or(sqlx::Error::RowNotFound)
}

fn decide(hold: &Hold, held: bool, remaining: Option<i64>, blocked: Option<bool>, period: Option<String>) -> Done {
    if held {
        return Done::Reserved(ReserveOutcome::Reserved {
            reservation: Reservation {
                id: hold.id.clone(),
                customer_id: hold.customer_id.clone(),
                amount: hold.amount,
                held: super::Held::Alone,
                call: None,
            },
            remaining: Nanos(remaining.unwrap_or(0)),
        });
    }
    let eligible = blocked == Some(false) && period.as_deref() == Some(hold.period.as_str());
    match remaining {
        // Refused only because an earlier hold of the batch did not fit: it may on its own.
        Some(left) if eligible && left >= hold.amount.0 => Done::Again,
        _ => Done::Reserved(reserve_outcome(hold, (None, blocked, period, remaining))),
    }
}

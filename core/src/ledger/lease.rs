//! Budget leases: a busy customer's calls share one reservation instead of making one each.
//!
//! A call that finds its customer with another call in flight in this process, and plenty of
//! budget left, reserves more than it needs: its worst case and room for many more calls
//! like it. That row — the *lease* — is an ordinary reservation in the database (counted in
//! `reserved_nanos`, renewed by a long stream, released by expiry should the process die),
//! so every other process and replica sees it held. The calls that follow while it is
//! fresh take their worst case out of it in memory, without waiting for the database
//! ("carving"), as long as it has that much left.
//!
//! Settling a carved call charges what it billed and shrinks the lease's row by as much: the
//! row holds what its calls in flight may still spend plus what is left to carve, never less.
//! The settlement of a lease's last call in flight deletes the row, freeing what is left, so
//! a lease lives only while its customer has calls in flight here: at rest a customer holds
//! nothing. Settlements stay durable before their calls are answered, as alone.
//!
//! The promise holds as without leases: whatever is carved was held in the database first,
//! by one conditional update against the budget. What a lease costs is budget held for calls
//! not made yet (its *spare*), kept small beside what is left: a lease is taken only when the
//! customer has at least [`HEADROOM`] times it left, and stops being carved after [`FRESH`] (a
//! call then holds anew, so a block, a budget or a period changed elsewhere takes effect
//! within it).
//!
//! Leases never refuse what a plain reservation would admit:
//! - After [`FRESH`] a lease gives its spare back ([`Leases::trim`]): from then on its row
//!   holds only what its calls in flight may spend, and each of them frees its whole share
//!   when it settles. Slow calls that outlive many leases do not leave their spare stacked up.
//! - A call about to be refused first has its customer's leases in this process give back
//!   their spare at once, and waits for other processes' leases of the customer to give back
//!   theirs (their rows say until when they hold any: `spare_until`, at most [`SPARE_FOR`]
//!   ahead), then tries once more.
//!
//! A lease's row names only the call that took it, so each call it holds is also kept here
//! with its request id, endpoint, model and share ([`InFlight`]); calls still in flight after
//! [`JOURNAL_AFTER`] are written to the `calls_in_flight` table off the hot path
//! ([`Leases::journal`]), and removed from it once they end. Should the process die, each of
//! them is recorded as an interrupted call of its own (see [`crate::instances`]).
//!
//! Nothing here needs a bound of its own: every entry belongs to a call in flight in this
//! process, and goes with it. A customer is kept while it has calls in flight (or one taking a
//! lease), and forgotten by the settlement, refusal or failure of its last; a lease is kept
//! while it holds calls, and removed by the settlement of its last; each call is removed by its
//! settlement (a call always ends in one: the proxy runs it on a task of its own). Calls written
//! to `calls_in_flight` and ended since wait for the next journal (every
//! [`JOURNAL_AFTER`]). Evicting any of it early would lose track of budget held in the
//! database, so instead [`Leases::size`] says what it holds, exported in `/metrics`, and at
//! rest it is empty.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{Held, Hold, Reservation, ReserveOutcome, Settlement};
use crate::ids::{CustomerId, ReservationId, UsageEventId};
use crate::money::Nanos;
use crate::period::BudgetPeriod;

/// A lease is taken only when the customer has this many times it left.
pub const HEADROOM: i64 = 4;
/// A lease has room for at least this many calls like the one that takes it, and up to
/// [`MAX_CALLS`]: eight per call in flight.
const MIN_CALLS: i64 = 16;
const MAX_CALLS: i64 = 256;
/// How long a lease is carved from after it was taken; then it gives back its spare.
pub const FRESH: Duration = Duration::from_secs(1);
/// How long a lease's row may hold spare, as other processes are told (`spare_until`): a call
/// they would refuse waits for it to be given back, up to this long.
pub const SPARE_FOR: Duration = Duration::from_millis(1_500);

/// What [`Leases::plan`] decided for a hold.
pub(super) enum Plan {
    /// Carved from a lease: held already.
    Carved(ReserveOutcome),
    /// Hold this much more than asked, as a lease.
    Lease(Nanos),
    /// Another call is taking a lease: wait for it to be taken (or not), then plan again.
    Wait(watch::Receiver<()>),
    /// Hold what is asked, alone.
    Alone,
}

/// This process's leases, and what it knows of the customers with calls in flight.
#[derive(Default)]
pub(super) struct Leases {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    customers: HashMap<CustomerId, Local>,
    leases: HashMap<ReservationId, Lease>,
    /// Calls written to `calls_in_flight` that have ended since: to be removed from it.
    ended: Vec<UsageEventId>,
}

/// A call in flight held by a lease: what its process's death would leave to record.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// The id its usage event will have ([`Reservation`]'s `call`): settled, it is in
    /// `usage_events`, so a call that ended is never taken for one in flight.
    pub call: UsageEventId,
    pub lease: ReservationId,
    pub customer: CustomerId,
    pub request_id: String,
    pub endpoint: String,
    pub model: String,
    /// Its share of the lease.
    pub amount: Nanos,
    pub started_at: crate::time::UnixMillis,
    started: Instant,
    /// Written to `calls_in_flight`.
    written: bool,
}

/// A call held by a lease for this long is written to `calls_in_flight` (see the module docs):
/// shorter calls, the many, never are.
pub const JOURNAL_AFTER: Duration = Duration::from_millis(250);

/// A customer with calls in flight in this process.
#[derive(Default)]
struct Local {
    in_flight: i64,
    /// The lease calls are carved from.
    current: Option<ReservationId>,
    /// A lease is being taken (one at a time); dropped when it is taken or not, which wakes
    /// the calls waiting for it.
    taking: Option<watch::Sender<()>>,
    /// What the customer had left beside every hold, as the database last said.
    remaining: Option<Nanos>,
}

impl Local {
    fn idle(&self) -> bool {
        self.in_flight <= 0 && self.current.is_none() && self.taking.is_none()
    }
}

struct Lease {
    customer: CustomerId,
    period: BudgetPeriod,
    /// What is left to carve.
    available: Nanos,
    /// Its calls in flight, by their usage event's id.
    calls: HashMap<UsageEventId, InFlight>,
    taken: Instant,
    /// Its spare was given back ([`Leases::trim`]): carved no more, and each of its calls
    /// frees its whole share when it settles.
    trimmed: bool,
}

impl InFlight {
    /// `hold`'s call, held by lease `lease` for `hold.amount`.
    fn new(lease: &ReservationId, hold: &Hold) -> Self {
        let (endpoint, model) = hold.call.clone().unwrap_or_else(|| ("unknown".to_owned(), "unknown".to_owned()));
        Self {
            call: UsageEventId::generate(),
            lease: lease.clone(),
            customer: hold.customer_id.clone(),
            request_id: hold.request_id.clone(),
            endpoint,
            model,
            amount: hold.amount,
            started_at: crate::time::UnixMillis::now(),
            started: Instant::now(),
            written: false,
        }
    }
}

/// What the lease table holds: all of it is about calls in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseTableSize {
    /// Customers with calls in flight here.
    pub customers: usize,
    /// Leases with calls in flight.
    pub leases: usize,
    /// Calls in flight held by leases.
    pub calls: usize,
    /// Calls written to `calls_in_flight` that ended, to be removed from it.
    pub ended: usize,
}

impl Leases {
    /// What the table holds now.
    pub fn size(&self) -> LeaseTableSize {
        let inner = self.lock();
        LeaseTableSize {
            customers: inner.customers.len(),
            leases: inner.leases.len(),
            calls: inner.leases.values().map(|l| l.calls.len()).sum(),
            ended: inner.ended.len(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: still usable.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Carves `hold` from its customer's lease, or says how to hold it (waiting for a lease
    /// being taken only if `may_wait`).
    pub(super) fn plan(&self, hold: &Hold, may_wait: bool) -> Plan {
        let mut inner = self.lock();
        let Inner { customers, leases, .. } = &mut *inner;
        let local = customers.entry(hold.customer_id.clone()).or_default();
        if let Some(id) = local.current.clone() {
            let usable =
                leases.get(&id).is_some_and(|l| l.period == hold.period && !l.trimmed && l.taken.elapsed() < FRESH);
            if !usable {
                // Stale, or of another period: carved no more; its last call ends it.
                local.current = None;
            } else if let Some(lease) = leases.get_mut(&id)
                && lease.available >= hold.amount
            {
                lease.available = Nanos(lease.available.0 - hold.amount.0);
                let call = InFlight::new(&id, hold);
                let number = call.call.clone();
                lease.calls.insert(call.call.clone(), call);
                local.in_flight += 1;
                let remaining = Nanos(local.remaining.unwrap_or(Nanos::ZERO).0.saturating_add(lease.available.0));
                return Plan::Carved(ReserveOutcome::Reserved {
                    reservation: Reservation {
                        id,
                        customer_id: hold.customer_id.clone(),
                        amount: hold.amount,
                        held: Held::Leased,
                        call: Some(number),
                    },
                    remaining,
                });
            }
            // Too little left for this call (smaller ones may still be carved): it holds
            // anew, maybe as a new lease that replaces this one.
        }
        if let Some(taking) = &local.taking
            && may_wait
        {
            return Plan::Wait(taking.subscribe());
        }
        // From here the call counts among its customer's calls in flight (until it is
        // settled, or refused: see [`Leases::held`], [`Leases::gone`]).
        local.in_flight += 1;
        if local.taking.is_none() && local.in_flight > 1 && hold.amount.0 > 0 {
            let calls = (local.in_flight.saturating_mul(8)).clamp(MIN_CALLS, MAX_CALLS);
            let left = local.remaining.unwrap_or(Nanos::ZERO).0;
            let extra = hold.amount.0.saturating_mul(calls).min(left / HEADROOM - hold.amount.0);
            if extra >= hold.amount.0.saturating_mul(MIN_CALLS / 4) {
                local.taking = Some(watch::Sender::new(()));
                return Plan::Lease(Nanos(extra));
            }
        }
        Plan::Alone
    }

    /// What the database answered `hold` (asked `lease` more than it needs, if any): the
    /// answer for the call, its hold counted among the customer's calls in flight.
    pub(super) fn held(&self, hold: &Hold, lease: Option<Nanos>, outcome: ReserveOutcome) -> ReserveOutcome {
        let mut inner = self.lock();
        let Inner { customers, leases, .. } = &mut *inner;
        let local = customers.entry(hold.customer_id.clone()).or_default();
        if lease.is_some() {
            local.taking = None;
        }
        let outcome = match outcome {
            ReserveOutcome::Reserved { mut reservation, remaining } => {
                local.remaining = Some(remaining);
                reservation.amount = hold.amount;
                reservation.held = Held::Counted;
                if let Some(extra) = lease {
                    reservation.held = Held::Leased;
                    let call = InFlight::new(&reservation.id, hold);
                    reservation.call = Some(call.call.clone());
                    leases.insert(
                        reservation.id.clone(),
                        Lease {
                            customer: hold.customer_id.clone(),
                            period: hold.period,
                            available: extra,
                            calls: HashMap::from([(call.call.clone(), call)]),
                            taken: Instant::now(),
                            trimmed: false,
                        },
                    );
                    local.current = Some(reservation.id.clone());
                    // What is left beside the call's share includes what is left to carve.
                    return ReserveOutcome::Reserved {
                        reservation,
                        remaining: Nanos(remaining.0.saturating_add(extra.0)),
                    };
                }
                ReserveOutcome::Reserved { reservation, remaining }
            }
            ReserveOutcome::Insufficient { remaining } => {
                local.remaining = Some(remaining);
                local.in_flight -= 1;
                // What is left to carve here is the customer's too (a smaller call fits in it).
                let carvable = local.current.as_ref().and_then(|id| leases.get(id)).map_or(0, |l| l.available.0);
                ReserveOutcome::Insufficient { remaining: Nanos(remaining.0.saturating_add(carvable)) }
            }
            other => {
                local.in_flight -= 1;
                other
            }
        };
        forget_if_idle(customers, &hold.customer_id);
        outcome
    }

    /// A lease was not taken after all (not that much to spare): the call holds alone.
    pub(super) fn not_taken(&self, customer: &CustomerId) {
        let mut inner = self.lock();
        if let Some(local) = inner.customers.get_mut(customer) {
            local.taking = None;
        }
    }

    /// A call planned but never held (its attempt failed, or its caller went away), and the
    /// lease it was taking, if it was.
    pub(super) fn gone(&self, customer: &CustomerId, taking: bool) {
        let mut inner = self.lock();
        if let Some(local) = inner.customers.get_mut(customer) {
            local.in_flight -= 1;
            if taking {
                local.taking = None;
            }
        }
        forget_if_idle(&mut inner.customers, customer);
    }

    /// Says what `settlement` frees of a lease: the call's share of what it held, less what
    /// it billed (back to carve), or — its lease's last call — the whole row.
    pub(super) fn settling(&self, settlement: &mut Settlement) {
        let Some(reservation) = &settlement.reservation else { return };
        if reservation.held == Held::Alone {
            return;
        }
        let mut inner = self.lock();
        let Inner { customers, leases, ended, .. } = &mut *inner;
        if reservation.held == Held::Leased {
            settlement.part = match leases.get_mut(&reservation.id) {
                Some(lease) => {
                    if let Some(call) = reservation.call.as_ref().and_then(|c| lease.calls.remove(c))
                        && call.written
                    {
                        ended.push(call.call);
                    }
                    if lease.calls.is_empty() {
                        leases.remove(&reservation.id);
                        None
                    } else if lease.trimmed {
                        // Nothing is carved from it any more: the call's whole share goes.
                        Some(reservation.amount)
                    } else {
                        // Its row holds this call's share and what is left to carve: what it
                        // billed beyond its share comes out of what is left.
                        let billed = settlement.record.billed.0.max(0);
                        let free = billed.min(reservation.amount.0.saturating_add(lease.available.0));
                        lease.available = Nanos(lease.available.0 + reservation.amount.0 - free);
                        Some(Nanos(free))
                    }
                }
                // Not this process's (it cannot be): free nothing, charge what it billed.
                None => Some(Nanos::ZERO),
            };
        }
        if let Some(local) = customers.get_mut(&reservation.customer_id) {
            local.in_flight -= 1;
            if local.current.as_ref().is_some_and(|id| !leases.contains_key(id)) {
                local.current = None;
            }
        }
        forget_if_idle(customers, &reservation.customer_id);
    }

    /// What a settlement left its customer, as the database said.
    pub(super) fn settled(&self, customer: &CustomerId, remaining: Option<Nanos>) {
        let mut inner = self.lock();
        if let (Some(local), Some(remaining)) = (inner.customers.get_mut(customer), remaining) {
            local.remaining = Some(remaining);
        }
    }

    /// Gives back lease `id`'s spare: it is carved no more, and holds only what its calls in
    /// flight may spend. Returns how much its row must shrink by (maybe nothing), or `None`
    /// when the lease is gone or gave its spare back already.
    pub(super) fn trim(&self, id: &ReservationId) -> Option<Nanos> {
        let mut inner = self.lock();
        let Inner { customers, leases, .. } = &mut *inner;
        let lease = leases.get_mut(id).filter(|l| !l.trimmed)?;
        lease.trimmed = true;
        let spare = std::mem::replace(&mut lease.available, Nanos::ZERO);
        if let Some(local) = customers.get_mut(&lease.customer)
            && local.current.as_ref() == Some(id)
        {
            local.current = None;
        }
        Some(spare)
    }

    /// `customer`'s leases in this process that have not given their spare back.
    pub(super) fn untrimmed(&self, customer: &CustomerId) -> Vec<ReservationId> {
        let inner = self.lock();
        inner.leases.iter().filter(|(_, l)| &l.customer == customer && !l.trimmed).map(|(id, _)| id.clone()).collect()
    }

    /// What is due to be written to `calls_in_flight` (calls held by leases for
    /// [`JOURNAL_AFTER`] and not written yet: marked written now) and removed from it (the
    /// numbers of written calls that have ended). Should writing it fail, hand it back with
    /// [`Leases::unjournal`].
    pub fn journal(&self) -> (Vec<InFlight>, Vec<UsageEventId>) {
        let mut inner = self.lock();
        let mut due = Vec::new();
        for call in inner.leases.values_mut().flat_map(|l| l.calls.values_mut()) {
            if !call.written && call.started.elapsed() >= JOURNAL_AFTER {
                call.written = true;
                due.push(call.clone());
            }
        }
        (due, std::mem::take(&mut inner.ended))
    }

    /// What [`Leases::journal`] gave that could not be written: tried again next time.
    pub fn unjournal(&self, due: Vec<InFlight>, ended: Vec<UsageEventId>) {
        let mut inner = self.lock();
        let Inner { leases, ended: still_ended, .. } = &mut *inner;
        for call in due {
            match leases.get_mut(&call.lease).and_then(|l| l.calls.get_mut(&call.call)) {
                Some(in_flight) => in_flight.written = false,
                // Ended meanwhile: it may have been written after all; remove it to be sure.
                None => still_ended.push(call.call),
            }
        }
        still_ended.extend(ended);
    }

    /// Carves no more from `customer`'s lease (it changed: blocked, budget, period); its
    /// calls in flight finish on it.
    pub(super) fn forget(&self, customer: &CustomerId) {
        let mut inner = self.lock();
        if let Some(local) = inner.customers.get_mut(customer) {
            local.current = None;
            local.remaining = None;
        }
    }
}

/// Forgets `customer` if it has nothing in flight here any more.
fn forget_if_idle(customers: &mut HashMap<CustomerId, Local>, customer: &CustomerId) {
    if customers.get(customer).is_some_and(Local::idle) {
        customers.remove(customer);
    }
}

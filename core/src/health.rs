//! Budget health: where a customer stands, as the dashboard shows it (a badge, a filter) and
//! the alerts see it. One status per customer, the most pressing first:
//!
//! 1. *blocked*: the tenant (or a billing hold) blocked the customer; no call goes through.
//! 2. *payment failed*: its Stripe subscription is `past_due` or `unpaid`, or an open invoice
//!    of its has a failed payment.
//! 3. *exhausted*: what is left of its budget pays for no call the project would admit. The
//!    cheapest such call is the project's [`call_floor`] on its cheapest priced model: a
//!    1-token prompt (with the project's estimate margin where the tokenizer is approximate)
//!    and the least output a call may be clamped to (`min_output_tokens`), at the dearest
//!    input rate and with the markup — what the proxy reserves for that call. Under `clamp`
//!    a customer is left with such dust (its spend never reaches the budget exactly), so
//!    exhausted counts as reaching 100 % for the alerts (see [`crate::alerts::due`]).
//! 4. *near limit*: spend reached the project's near-limit share of the budget: its lowest
//!    alert threshold below 100 %, else [`DEFAULT_NEAR_LIMIT_PCT`].
//! 5. *ok*.
//!
//! Spend is the settled spend of the current period: calls in flight do not count, as they
//! do not for the alerts.

use crate::db::{Db, DbError};
use crate::estimate;
use crate::money::Nanos;
use crate::pricing::{self, Price, Tokenizer, tokens_cost, with_markup};
use crate::projects::{self, Project};
use crate::with_db;

/// The near-limit share of a project that set no alert threshold below 100 %.
pub const DEFAULT_NEAR_LIMIT_PCT: i64 = 80;

/// A customer's budget health, least pressing first (the derived order is the severity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    Ok,
    NearLimit,
    Exhausted,
    PaymentFailed,
    Blocked,
}

impl Health {
    /// Every status, most pressing first (the filter's order).
    pub const ALL: [Health; 5] =
        [Health::Blocked, Health::PaymentFailed, Health::Exhausted, Health::NearLimit, Health::Ok];

    /// The status in URLs and CSS classes.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::NearLimit => "near_limit",
            Health::Exhausted => "exhausted",
            Health::PaymentFailed => "payment_failed",
            Health::Blocked => "blocked",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.as_str() == text)
    }

    /// The status as people read it.
    pub fn label(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::NearLimit => "near limit",
            Health::Exhausted => "exhausted",
            Health::PaymentFailed => "payment failed",
            Health::Blocked => "blocked",
        }
    }

    /// Its place in the severity order (0 for ok), as [`Limits::rank_sql`] computes it.
    pub fn rank(self) -> i64 {
        self as i64
    }
}

/// What a customer's health is decided from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub blocked: bool,
    pub payment_failed: bool,
    pub budget: Nanos,
    /// Settled spend of the current period.
    pub spent: Nanos,
}

/// A project's lines: where *near limit* and *exhausted* start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A whole percentage, below 100.
    pub near_limit_pct: i64,
    /// The cheapest call the project would admit (at least one nano).
    pub cheapest_call: Nanos,
}

impl Default for Limits {
    fn default() -> Self {
        Self { near_limit_pct: DEFAULT_NEAR_LIMIT_PCT, cheapest_call: Nanos(1) }
    }
}

/// `ceil(amount × pct / 100)` without overflow, for amounts of 0 and more and pct of 0 to 100.
fn share(amount: i64, pct: i64) -> i64 {
    (amount / 100) * pct + ((amount % 100) * pct + 99) / 100
}

impl Limits {
    /// Whether what is left of `budget` after `spent` pays for no call.
    pub fn exhausted(&self, budget: Nanos, spent: Nanos) -> bool {
        budget.0.saturating_sub(spent.0) < self.cheapest_call.0.max(1)
    }

    /// Whether `spent` reached the near-limit share of `budget`.
    pub fn near_limit(&self, budget: Nanos, spent: Nanos) -> bool {
        spent.0 >= share(budget.0.max(0), self.near_limit_pct.clamp(0, 100))
    }

    /// The status of a customer standing so.
    pub fn health(&self, s: &Standing) -> Health {
        if s.blocked {
            Health::Blocked
        } else if s.payment_failed {
            Health::PaymentFailed
        } else if self.exhausted(s.budget, s.spent) {
            Health::Exhausted
        } else if self.near_limit(s.budget, s.spent) {
            Health::NearLimit
        } else {
            Health::Ok
        }
    }

    /// [`Limits::health`]'s [`Health::rank`] as SQL over `customers`, for filtering and sorting
    /// a list by status in the database: `blocked`, `payment_failed`, `budget` and `spent`
    /// are the SQL of those facts; the two lines are inlined as integers (never text).
    pub fn rank_sql(&self, blocked: &str, payment_failed: &str, budget: &str, spent: &str) -> String {
        let pct = self.near_limit_pct.clamp(0, 100);
        let cheapest = self.cheapest_call.0.max(1);
        format!(
            "(CASE WHEN ({blocked}) THEN {blocked_rank} WHEN ({payment_failed}) THEN {failed_rank} \
             WHEN ({budget}) - ({spent}) < {cheapest} THEN {exhausted_rank} \
             WHEN ({spent}) >= (({budget}) / 100) * {pct} + ((({budget}) % 100) * {pct} + 99) / 100 \
             THEN {near_rank} ELSE {ok_rank} END)",
            blocked_rank = Health::Blocked.rank(),
            failed_rank = Health::PaymentFailed.rank(),
            exhausted_rank = Health::Exhausted.rank(),
            near_rank = Health::NearLimit.rank(),
            ok_rank = Health::Ok.rank(),
        )
    }
}

/// The near-limit share for a project's alert thresholds: the lowest below 100 %.
pub fn near_limit_pct(thresholds: &[i64]) -> i64 {
    thresholds.iter().copied().filter(|&pct| (1..100).contains(&pct)).min().unwrap_or(DEFAULT_NEAR_LIMIT_PCT)
}

/// What the proxy reserves for the least call on a model of `price`: a 1-token prompt (with
/// the estimate margin an approximate tokenizer gets) at the dearest input rate, and
/// `min_output` tokens of output, with the markup.
pub fn call_floor(price: &Price, min_output: i64, margin_bps: i64, markup_bps: i64) -> Nanos {
    let input = estimate::with_margin(price.tokenizer, 1, margin_bps);
    let cost = tokens_cost(input, price.worst_input_rate())
        .checked_add(tokens_cost(min_output.max(1), price.output))
        .unwrap_or(Nanos(i64::MAX));
    with_markup(cost, markup_bps)
}

/// The prices of the models the project's connections serve: its own prices, and the shipped
/// ones in its currency when they apply.
fn served_prices(project: &Project, patterns: &[String], overrides: Vec<projects::PriceOverride>) -> Vec<Price> {
    let mut prices = Vec::new();
    let mut overridden = Vec::new();
    for o in overrides {
        if projects::serves(patterns, &o.model) {
            let tokenizer = pricing::shipped_price(&o.model).map_or(Tokenizer::Approximate, |p| p.tokenizer);
            prices.push(Price {
                input: o.input,
                cached_input: o.cached_input,
                output: o.output,
                cache_write: o.cache_write,
                max_output_tokens: o.max_output_tokens,
                tokenizer,
            });
        }
        overridden.push(o.model);
    }
    if let Some(rate) = project.shipped_price_rate() {
        for model in pricing::shipped_models() {
            if projects::serves(patterns, model)
                && !overridden.iter().any(|o| o == model)
                && let Some(price) = pricing::shipped_price(model)
            {
                prices.push(price.converted(rate));
            }
        }
    }
    prices
}

/// The project's lines: its near-limit share (from the alert thresholds it saved) and its
/// cheapest call (one nano when it serves no priced model).
pub async fn limits(db: &Db, project: &Project) -> Result<Limits, DbError> {
    const THRESHOLDS: &str = "SELECT thresholds FROM alert_settings WHERE project_id = $1";
    let thresholds: Option<String> =
        with_db!(db, pool => sqlx::query_scalar(THRESHOLDS).bind(&project.id).fetch_optional(pool).await)?;
    let thresholds = crate::alerts::parse_thresholds(thresholds.as_deref().unwrap_or_default()).unwrap_or_default();
    let patterns: Vec<String> = projects::list_provider_summaries(db, &project.id)
        .await?
        .into_iter()
        .flat_map(|p| p.models.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let overrides = projects::list_price_overrides(db, &project.id).await?;
    let cheapest = served_prices(project, &patterns, overrides)
        .iter()
        .map(|p| call_floor(p, project.min_output_tokens, project.estimate_margin_bps, project.markup_bps))
        .min()
        .unwrap_or(Nanos(1))
        .max(Nanos(1));
    Ok(Limits { near_limit_pct: near_limit_pct(&thresholds), cheapest_call: cheapest })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(blocked: bool, payment_failed: bool, budget: i64, spent: i64) -> Standing {
        Standing { blocked, payment_failed, budget: Nanos(budget), spent: Nanos(spent) }
    }

    const LIMITS: Limits = Limits { near_limit_pct: 80, cheapest_call: Nanos(1_000) };

    #[test]
    fn the_most_pressing_status_wins() {
        // Blocked, payment failed, exhausted and near limit all at once: blocked.
        assert_eq!(LIMITS.health(&standing(true, true, 10_000, 9_999)), Health::Blocked);
        assert_eq!(LIMITS.health(&standing(false, true, 10_000, 9_999)), Health::PaymentFailed);
        assert_eq!(LIMITS.health(&standing(false, false, 10_000, 9_999)), Health::Exhausted);
        assert_eq!(LIMITS.health(&standing(false, false, 10_000, 8_000)), Health::NearLimit);
        assert_eq!(LIMITS.health(&standing(false, false, 10_000, 7_999)), Health::Ok);
        // Blocked with plenty left is still blocked; a failed payment with nothing spent too.
        assert_eq!(LIMITS.health(&standing(true, false, 10_000, 0)), Health::Blocked);
        assert_eq!(LIMITS.health(&standing(false, true, 10_000, 0)), Health::PaymentFailed);
        let mut sorted = Health::ALL.to_vec();
        sorted.sort();
        assert_eq!(sorted, [Health::Ok, Health::NearLimit, Health::Exhausted, Health::PaymentFailed, Health::Blocked]);
    }

    #[test]
    fn dust_below_the_cheapest_call_is_exhausted() {
        // 0.000006 left of a budget: spend never reaches it, yet no call fits.
        let limits = Limits { near_limit_pct: 80, cheapest_call: Nanos(10_000) };
        assert_eq!(limits.health(&standing(false, false, 1_000_000_000, 1_000_000_000 - 6_000)), Health::Exhausted);
        assert_eq!(limits.health(&standing(false, false, 1_000_000_000, 1_000_000_000 - 10_000)), Health::NearLimit);
        // Nothing left, or less than nothing (the budget lowered below the spend).
        assert!(Limits::default().exhausted(Nanos(5), Nanos(5)));
        assert!(Limits::default().exhausted(Nanos(5), Nanos(9)));
        assert!(!Limits::default().exhausted(Nanos(5), Nanos(4)));
        // No budget at all: exhausted from the start.
        assert_eq!(Limits::default().health(&standing(false, false, 0, 0)), Health::Exhausted);
    }

    #[test]
    fn near_limit_is_the_lowest_threshold_below_100() {
        assert_eq!(near_limit_pct(&[50, 80, 100]), 50);
        assert_eq!(near_limit_pct(&[90, 100, 150]), 90);
        assert_eq!(near_limit_pct(&[100, 120]), DEFAULT_NEAR_LIMIT_PCT);
        assert_eq!(near_limit_pct(&[]), DEFAULT_NEAR_LIMIT_PCT);
        // The share rounds up and never overflows.
        let limits = Limits { near_limit_pct: 80, cheapest_call: Nanos(1) };
        assert!(!limits.near_limit(Nanos(101), Nanos(80)));
        assert!(limits.near_limit(Nanos(101), Nanos(81)));
        assert!(limits.near_limit(Nanos(i64::MAX), Nanos(i64::MAX - i64::MAX / 5)));
        assert!(!limits.near_limit(Nanos(i64::MAX), Nanos(i64::MAX / 2)));
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for h in Health::ALL {
            assert_eq!(Health::parse(h.as_str()), Some(h));
        }
        assert_eq!(Health::parse("active"), None);
        assert_eq!(Health::PaymentFailed.label(), "payment failed");
    }

    #[test]
    fn the_call_floor_is_a_one_token_prompt_and_the_least_clamped_output() {
        let price = Price {
            input: 2_000_000_000,
            cached_input: 1_000_000_000,
            output: 8_000_000_000,
            cache_write: 3_000_000_000,
            max_output_tokens: 4_096,
            tokenizer: Tokenizer::O200kBase,
        };
        // 1 input token at the cache-write rate (3,000) + 16 output tokens (128,000); +25 %.
        assert_eq!(call_floor(&price, 16, 2_000, 0), Nanos(131_000));
        assert_eq!(call_floor(&price, 16, 2_000, 2_500), Nanos(163_750));
        // An approximate tokenizer counts the prompt with its margin: 2 tokens at 20 %.
        let approximate = Price { tokenizer: Tokenizer::Approximate, ..price };
        assert_eq!(call_floor(&approximate, 16, 2_000, 0), Nanos(134_000));
    }
}

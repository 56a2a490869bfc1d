//! Prices per model and the cost of a call. The shipped table (`core/data/prices.toml`) is
//! compiled in; projects override it per model. A model priced nowhere is refused by the
//! caller (fail closed), never treated as free.
//!
//! Prices are nanos per million tokens; costs round *up* to the next nano, so Tollgate never
//! under-reserves or under-bills by rounding.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::money::Nanos;

/// How input tokens of a model can be counted before the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tokenizer {
    O200kBase,
    Cl100kBase,
    /// No exact tokenizer: a conservative character-based bound plus the project's margin.
    Approximate,
}

/// A model's price, nanos per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input: i64,
    pub cached_input: i64,
    pub output: i64,
    pub cache_write: i64,
    pub max_output_tokens: i64,
    pub tokenizer: Tokenizer,
}

/// Tokens of a call, by kind, as the provider reports (or Tollgate counts) them.
/// `input` excludes cached reads and cache writes; `output` includes reasoning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TokenUsage {
    pub input: i64,
    pub cached_input: i64,
    pub cache_write: i64,
    pub output: i64,
    pub reasoning: i64,
}

/// `tokens × per_million / 1e6`, rounded up. Saturates instead of overflowing.
pub fn tokens_cost(tokens: i64, nanos_per_million: i64) -> Nanos {
    let product = i128::from(tokens.max(0)) * i128::from(nanos_per_million.max(0));
    let cost = (product + 999_999) / 1_000_000;
    Nanos(i64::try_from(cost).unwrap_or(i64::MAX))
}

impl Price {
    /// The dearest rate an input token can be billed at (a cache write costs more than a
    /// plain input token), so an input reservation holds whatever the provider does with it.
    pub fn worst_input_rate(&self) -> i64 {
        self.input.max(self.cached_input).max(self.cache_write)
    }

    /// This price in another currency, `rate` nano-units of it per unit of this one (each
    /// rate rounded up to the next nano, like every cost).
    pub fn converted(&self, rate: Nanos) -> Price {
        let convert = |per_million: i64| {
            let product = i128::from(per_million.max(0)) * i128::from(rate.0.max(0));
            i64::try_from((product + 999_999_999) / 1_000_000_000).unwrap_or(i64::MAX)
        };
        Price {
            input: convert(self.input),
            cached_input: convert(self.cached_input),
            output: convert(self.output),
            cache_write: convert(self.cache_write),
            ..*self
        }
    }

    pub fn cost(&self, usage: &TokenUsage) -> Nanos {
        let parts = [
            tokens_cost(usage.input, self.input),
            tokens_cost(usage.cached_input, self.cached_input),
            tokens_cost(usage.cache_write, self.cache_write),
            tokens_cost(usage.output, self.output),
        ];
        parts.iter().fold(Nanos::ZERO, |acc, p| acc.checked_add(*p).unwrap_or(Nanos(i64::MAX)))
    }
}

/// Applies a markup in basis points (10000 = +100 %), rounding up.
pub fn with_markup(cost: Nanos, markup_bps: i64) -> Nanos {
    let billed = (i128::from(cost.0) * i128::from(10_000 + markup_bps.max(0)) + 9_999) / 10_000;
    Nanos(i64::try_from(billed).unwrap_or(i64::MAX))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShippedTable {
    models: HashMap<String, ShippedPrice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShippedPrice {
    input: String,
    #[serde(default)]
    cached_input: Option<String>,
    output: String,
    #[serde(default)]
    cache_write: Option<String>,
    max_output_tokens: i64,
    tokenizer: Tokenizer,
}

const SHIPPED: &str = include_str!("../data/prices.toml");

/// Parses a per-million price such as `"2.50"` into nanos per million tokens.
pub fn parse_per_million(text: &str) -> Option<i64> {
    text.parse::<Nanos>().ok().filter(|n| !n.is_negative()).map(|n| n.0)
}

fn shipped() -> &'static HashMap<String, Price> {
    static TABLE: OnceLock<HashMap<String, Price>> = OnceLock::new();
    TABLE.get_or_init(|| match toml::from_str::<ShippedTable>(SHIPPED) {
        Ok(table) => table
            .models
            .into_iter()
            .filter_map(|(model, p)| {
                let input = parse_per_million(&p.input)?;
                let price = Price {
                    input,
                    cached_input: p.cached_input.as_deref().map_or(Some(input), parse_per_million)?,
                    output: parse_per_million(&p.output)?,
                    cache_write: p.cache_write.as_deref().map_or(Some(input), parse_per_million)?,
                    max_output_tokens: p.max_output_tokens,
                    tokenizer: p.tokenizer,
                };
                Some((model, price))
            })
            .collect(),
        Err(e) => {
            tracing::error!(error = %e, "the shipped price table does not parse: every model is unpriced");
            HashMap::new()
        }
    })
}

/// The shipped price of `model`: its own entry (a snapshot priced apart from its base model
/// has one), else its base model's when it is a dated snapshot.
pub fn shipped_price(model: &str) -> Option<Price> {
    let table = shipped();
    table.get(model).or_else(|| base_model(model).and_then(|base| table.get(base))).copied()
}

/// `gpt-4o-2024-08-06` → `gpt-4o`; `claude-sonnet-4-20250514` → `claude-sonnet-4`.
pub fn base_model(model: &str) -> Option<&str> {
    let (base, suffix) = model.rsplit_once('-')?;
    if suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_digit()) {
        return Some(base);
    }
    // -YYYY-MM-DD
    let mut parts = model.rsplitn(4, '-');
    let (d, m, y) = (parts.next()?, parts.next()?, parts.next()?);
    let base = parts.next()?;
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    (digits(y, 4) && digits(m, 2) && digits(d, 2)).then_some(base)
}

/// Every shipped model name (for `/v1/models` and the dashboard).
pub fn shipped_models() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = shipped().keys().map(String::as_str).collect();
    names.sort_unstable();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_table_parses_completely() {
        let count = SHIPPED.matches("[models.").count();
        assert_eq!(shipped().len(), count, "a shipped price failed to parse");
        let gpt4o = shipped_price("gpt-4o").unwrap();
        assert_eq!(gpt4o.input, 2_500_000_000);
        assert_eq!(gpt4o.output, 10_000_000_000);
    }

    #[test]
    fn dated_snapshots_use_their_base_price_and_unknown_models_have_none() {
        assert_eq!(shipped_price("gpt-4o-2024-08-06"), shipped_price("gpt-4o"));
        assert_eq!(shipped_price("claude-sonnet-4-20250514"), shipped_price("claude-sonnet-4"));
        assert_eq!(shipped_price("gpt-4o-audio-preview"), None);
        assert_eq!(shipped_price("my-finetune"), None);
    }

    /// Dated snapshots that cost what their base model costs, so the table lists only the base.
    const SNAPSHOTS_AT_BASE_PRICE: [(&str, &str); 12] = [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("o3-2025-04-16", "o3"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-haiku-20240307", "claude-3-haiku"),
    ];

    #[test]
    fn every_shipped_name_and_snapshot_resolves_to_its_own_price() {
        let table = shipped();
        for (name, price) in table {
            assert_eq!(shipped_price(name), Some(*price), "{name} resolves to another entry's price");
            // A snapshot is listed apart only when it is priced apart.
            if let Some(base) = base_model(name).and_then(|b| table.get(b)) {
                assert_ne!(price, base, "{name} repeats its base model's price: list the base only");
            }
        }
        for (snapshot, base) in SNAPSHOTS_AT_BASE_PRICE {
            assert!(!table.contains_key(snapshot), "{snapshot} is listed but costs what {base} costs");
            assert_eq!(base_model(snapshot), Some(base));
            assert!(shipped_price(snapshot).is_some() && shipped_price(snapshot) == shipped_price(base), "{snapshot}");
        }
        // Snapshots priced apart, at their published prices (input, output per M; output limit).
        let published = |model: &str| shipped_price(model).map(|p| (p.input, p.output, p.max_output_tokens));
        let usd = |dollars: &str| parse_per_million(dollars).unwrap_or(-1);
        assert_eq!(published("gpt-4o-2024-05-13"), Some((usd("5.0"), usd("15.0"), 4_096)));
        assert_eq!(published("gpt-4o"), Some((usd("2.5"), usd("10.0"), 16_384)));
        assert_eq!(published("gpt-3.5-turbo-0125"), Some((usd("0.5"), usd("1.5"), 4_096)));
        assert_eq!(published("gpt-3.5-turbo-1106"), Some((usd("1.0"), usd("2.0"), 4_096)));
        assert_eq!(published("gpt-4-1106-preview"), Some((usd("10.0"), usd("30.0"), 4_096)));
        assert_eq!(published("gpt-4-0613"), Some((usd("30.0"), usd("60.0"), 8_192)));
    }

    #[test]
    fn costs_round_up_and_sum_by_kind() {
        assert_eq!(tokens_cost(1, 2_500_000_000), Nanos(2_500));
        assert_eq!(tokens_cost(1, 1), Nanos(1)); // a fraction of a nano rounds up
        let price = shipped_price("gpt-4o").unwrap();
        let usage = TokenUsage { input: 1000, cached_input: 0, cache_write: 0, output: 500, reasoning: 0 };
        assert_eq!(price.cost(&usage), Nanos(2_500_000 + 5_000_000));
        assert_eq!(with_markup(Nanos(1_000), 2_500), Nanos(1_250));
        assert_eq!(with_markup(Nanos(3), 3_333), Nanos(4));
    }
}

//! The currencies a project can bill in, and how each is written.
//!
//! Amounts are kept in nano-units of the currency whatever it is; what differs between
//! currencies is the *minor unit* Stripe charges in: a cent for USD, a whole yen for JPY
//! ("zero-decimal"), a fils (a thousandth) for KWD ("three-decimal"). The lists are Stripe's
//! (<https://docs.stripe.com/currencies#zero-decimal>, `#three-decimal`).

use crate::money::{NANOS_PER_UNIT, Nanos};

/// Currencies Stripe charges in whole units: an amount of 500 is ¥500, not ¥5.00.
const ZERO_DECIMAL: &[&str] =
    &["bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"];

/// Currencies Stripe charges in thousandths.
const THREE_DECIMAL: &[&str] = &["bhd", "jod", "kwd", "omr", "tnd"];

/// The currencies a project can choose, ISO 4217 lowercase as Stripe writes them: the
/// major settlement currencies and each kind of minor unit.
pub const SUPPORTED: &[&str] = &[
    "usd", "eur", "gbp", "cad", "aud", "nzd", "chf", "sek", "nok", "dkk", "pln", "czk", "jpy", "krw", "sgd", "hkd",
    "inr", "brl", "mxn", "zar", "aed", "kwd", "bhd", "jod", "omr",
];

/// A currency a project can bill in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("is not a currency Tollgate bills in (one of: {})", SUPPORTED.join(", ").to_uppercase())]
pub struct UnknownCurrency;

impl Currency {
    /// `"USD"`, `" eur "` → the lowercase code, when it is one of [`SUPPORTED`].
    pub fn parse(code: &str) -> Result<Self, UnknownCurrency> {
        let code = code.trim().to_ascii_lowercase();
        if SUPPORTED.contains(&code.as_str()) { Ok(Self(code)) } else { Err(UnknownCurrency) }
    }

    pub fn usd() -> Self {
        Self("usd".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Decimals of the currency's minor unit: 0 for JPY, 3 for KWD, 2 otherwise.
pub fn minor_digits(code: &str) -> u32 {
    let code = code.trim().to_ascii_lowercase();
    if ZERO_DECIMAL.contains(&code.as_str()) {
        0
    } else if THREE_DECIMAL.contains(&code.as_str()) {
        3
    } else {
        2
    }
}

/// Nano-units in one minor unit of the currency (10⁷ for a cent).
pub fn nanos_per_minor_unit(code: &str) -> i64 {
    NANOS_PER_UNIT / 10_i64.pow(minor_digits(code))
}

/// Minor units per nano-unit as a decimal, which is what a metered Stripe price counting
/// nano-units charges per unit (`unit_amount_decimal`, at most 12 decimals): `0.0000001`
/// for USD, `0.000000001` for JPY, `0.000001` for KWD.
pub fn unit_amount_decimal(code: &str) -> String {
    let decimals = 9 - minor_digits(code) as usize;
    format!("0.{}1", "0".repeat(decimals - 1))
}

/// An amount as a reader expects it: grouped thousands, the currency's minor-unit decimals
/// (`1,234.50 USD`, `1,235 JPY`, `0.125 KWD`) — rounded half away from zero — and, for a
/// non-zero amount smaller than the minor unit, as many decimals as it needs
/// (`0.000006 USD`) rather than a misleading `0.00`. [`exact`] gives every digit.
pub fn display(amount: Nanos, code: &str) -> String {
    let abs = amount.0.unsigned_abs();
    if abs != 0 && abs < nanos_per_minor_unit(code).unsigned_abs() {
        let sign = if amount.0 < 0 { "-" } else { "" };
        return format!("{sign}{} {}", Nanos(abs as i64), code.to_ascii_uppercase());
    }
    display_decimals(amount, code, minor_digits(code))
}

/// An amount with exactly `decimals` decimals (at most 9), grouped thousands, rounded half
/// away from zero: a chart's axis labels all share their step's decimals (`0.25 USD`, `0.50 USD`).
pub fn display_decimals(amount: Nanos, code: &str, decimals: u32) -> String {
    let digits = decimals.min(9);
    let unit = 10_u64.pow(9 - digits);
    let abs = amount.0.unsigned_abs();
    let sign = if amount.0 < 0 { "-" } else { "" };
    let code = code.to_ascii_uppercase();
    let minor = (abs + unit / 2) / unit;
    let scale = 10_u64.pow(digits);
    let whole = grouped(minor / scale);
    if digits == 0 {
        format!("{sign}{whole} {code}")
    } else {
        format!("{sign}{whole}.{:0width$} {code}", minor % scale, width = digits as usize)
    }
}

/// Every digit of the amount: `0.630431200 USD` → `0.6304312 USD`.
pub fn exact(amount: Nanos, code: &str) -> String {
    format!("{amount} {}", code.to_ascii_uppercase())
}

/// An amount in the currency's minor unit, as Stripe gives invoice totals: `1234` USD is
/// `12.34 USD`, `1234` JPY is `1,234 JPY`.
pub fn display_minor(amount: i64, code: &str) -> String {
    match amount.checked_mul(nanos_per_minor_unit(code)) {
        Some(nanos) => display(Nanos(nanos), code),
        None => format!("{amount} (minor units) {}", code.to_ascii_uppercase()),
    }
}

fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Nanos {
        s.parse().unwrap()
    }

    #[test]
    fn each_kind_of_minor_unit_is_written_its_way() {
        assert_eq!(display(n("1234.5"), "usd"), "1,234.50 USD");
        assert_eq!(display(n("0.6304312"), "usd"), "0.63 USD");
        assert_eq!(display(n("0.015"), "usd"), "0.02 USD");
        assert_eq!(display(n("0.014999"), "usd"), "0.01 USD");
        assert_eq!(display(n("0"), "usd"), "0.00 USD");
        assert_eq!(display(n("-2.5"), "eur"), "-2.50 EUR");
        assert_eq!(display(n("1234.5"), "jpy"), "1,235 JPY");
        assert_eq!(display(n("0"), "jpy"), "0 JPY");
        assert_eq!(display(n("0.1254"), "kwd"), "0.125 KWD");
        assert_eq!(display(n("1000000"), "kwd"), "1,000,000.000 KWD");
        assert_eq!(display(n("0.01"), "usd"), "0.01 USD", "one cent");
        assert_eq!(display(n("-0.0042"), "usd"), "-0.0042 USD", "a negative margin below a cent");
        assert_eq!(display(n("-1234.5"), "usd"), "-1,234.50 USD", "a negative margin");
    }

    #[test]
    fn a_fixed_number_of_decimals_for_axis_labels() {
        assert_eq!(display_decimals(n("0.25"), "usd", 2), "0.25 USD");
        assert_eq!(display_decimals(n("0.0025"), "usd", 4), "0.0025 USD");
        assert_eq!(display_decimals(n("1500"), "jpy", 0), "1,500 JPY");
        assert_eq!(display_decimals(n("0.125"), "usd", 2), "0.13 USD");
        assert_eq!(display_decimals(n("-0.125"), "usd", 2), "-0.13 USD");
        assert_eq!(display_decimals(n("0.000000001"), "usd", 12), "0.000000001 USD");
    }

    #[test]
    fn dust_below_the_minor_unit_is_not_shown_as_zero() {
        assert_eq!(display(n("0.000006"), "usd"), "0.000006 USD");
        assert_eq!(display(n("0.005"), "usd"), "0.005 USD");
        assert_eq!(display(n("0.4"), "jpy"), "0.40 JPY");
        assert_eq!(display(n("-0.000000001"), "usd"), "-0.000000001 USD");
        assert_eq!(exact(n("0.6304312"), "usd"), "0.6304312 USD");
    }

    #[test]
    fn stripe_amounts_in_minor_units() {
        assert_eq!(display_minor(1234, "usd"), "12.34 USD");
        assert_eq!(display_minor(1234, "jpy"), "1,234 JPY");
        assert_eq!(display_minor(1234, "kwd"), "1.234 KWD");
        assert_eq!(display_minor(i64::MAX, "usd"), format!("{} (minor units) USD", i64::MAX));
    }

    #[test]
    fn the_metered_price_is_one_nano_unit_in_minor_units() {
        assert_eq!(unit_amount_decimal("usd"), "0.0000001");
        assert_eq!(unit_amount_decimal("JPY"), "0.000000001");
        assert_eq!(unit_amount_decimal("kwd"), "0.000001");
        for code in SUPPORTED {
            // One minor unit is exactly 1 / unit_amount_decimal nano-units.
            let unit = unit_amount_decimal(code);
            let decimals = unit.len() - 2;
            assert_eq!(10_i64.pow(decimals as u32), nanos_per_minor_unit(code), "{code}");
            assert!(
                unit.starts_with("0.") && unit.ends_with('1') && unit[2..unit.len() - 1].bytes().all(|b| b == b'0')
            );
        }
    }

    #[test]
    fn only_supported_currencies_parse() {
        assert_eq!(Currency::parse(" JPY ").unwrap().as_str(), "jpy");
        assert!(Currency::parse("xyz").is_err());
        assert!(Currency::parse("").is_err());
    }
}

//! Money as integer nano-units of a currency (1 unit = 1e9 nanos): never a float.
//!
//! `i64` nanos hold ±9.2 billion currency units, far beyond any budget. Arithmetic is
//! checked: an overflow is an error the caller must handle, never a wrap-around.

use std::fmt;
use std::str::FromStr;

pub const NANOS_PER_UNIT: i64 = 1_000_000_000;

/// An amount of money in nano-units of the project's currency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Nanos(pub i64);

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);

    pub fn from_units(units: i64) -> Option<Self> {
        units.checked_mul(NANOS_PER_UNIT).map(Self)
    }

    pub fn checked_add(self, other: Nanos) -> Option<Nanos> {
        self.0.checked_add(other.0).map(Nanos)
    }

    pub fn checked_sub(self, other: Nanos) -> Option<Nanos> {
        self.0.checked_sub(other.0).map(Nanos)
    }

    pub fn checked_mul(self, factor: i64) -> Option<Nanos> {
        self.0.checked_mul(factor).map(Nanos)
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }
}

/// Formats as a decimal amount of currency units with trailing zeros trimmed to at
/// least two decimals: `Nanos(1_500_000_000)` is `1.50`, `Nanos(1_234)` is `0.000001234`.
impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let units = abs / NANOS_PER_UNIT.unsigned_abs();
        let frac = abs % NANOS_PER_UNIT.unsigned_abs();
        let mut frac_s = format!("{frac:09}");
        while frac_s.len() > 2 && frac_s.ends_with('0') {
            frac_s.pop();
        }
        write!(f, "{sign}{units}.{frac_s}")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseMoneyError {
    #[error("not a decimal amount (expected digits, optionally a '.' and up to 9 decimals)")]
    Invalid,
    #[error("more than 9 decimal places")]
    TooPrecise,
    #[error("amount too large")]
    Overflow,
}

/// Parses a decimal amount of currency units such as `12`, `12.5` or `-0.000000001`.
impl FromStr for Nanos {
    type Err = ParseMoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (negative, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (int_part, frac_part) = match digits.split_once('.') {
            Some((i, f)) => (i, f),
            None => (digits, ""),
        };
        let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if (int_part.is_empty() && frac_part.is_empty()) || !all_digits(int_part) || !all_digits(frac_part) {
            return Err(ParseMoneyError::Invalid);
        }
        if frac_part.len() > 9 {
            return Err(ParseMoneyError::TooPrecise);
        }
        let units: i64 =
            if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| ParseMoneyError::Overflow)? };
        let frac: i64 = if frac_part.is_empty() {
            0
        } else {
            let padded = format!("{frac_part:0<9}");
            padded.parse().map_err(|_| ParseMoneyError::Invalid)?
        };
        let abs =
            units.checked_mul(NANOS_PER_UNIT).and_then(|n| n.checked_add(frac)).ok_or(ParseMoneyError::Overflow)?;
        Ok(Nanos(if negative { -abs } else { abs }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_trims_to_two_decimals() {
        assert_eq!(Nanos(1_500_000_000).to_string(), "1.50");
        assert_eq!(Nanos(1_234).to_string(), "0.000001234");
        assert_eq!(Nanos(-2_000_000_000).to_string(), "-2.00");
        assert_eq!(Nanos::ZERO.to_string(), "0.00");
    }

    #[test]
    fn parse_round_trips() {
        for s in ["0.00", "1.50", "0.000001234", "-2.00", "12345.678901234"] {
            let n: Nanos = s.parse().unwrap();
            assert_eq!(n.to_string(), s);
        }
        assert_eq!("5".parse::<Nanos>(), Ok(Nanos(5_000_000_000)));
        assert_eq!(".5".parse::<Nanos>(), Ok(Nanos(500_000_000)));
    }

    #[test]
    fn parse_rejects_bad_input() {
        assert_eq!("".parse::<Nanos>(), Err(ParseMoneyError::Invalid));
        assert_eq!("1.2.3".parse::<Nanos>(), Err(ParseMoneyError::Invalid));
        assert_eq!("1e5".parse::<Nanos>(), Err(ParseMoneyError::Invalid));
        assert_eq!("0.0000000001".parse::<Nanos>(), Err(ParseMoneyError::TooPrecise));
        assert_eq!("99999999999".parse::<Nanos>(), Err(ParseMoneyError::Overflow));
    }

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(Nanos(i64::MAX).checked_add(Nanos(1)), None);
        assert_eq!(Nanos(5).checked_sub(Nanos(7)), Some(Nanos(-2)));
    }
}

//! Budget periods: the window a customer's spend counts against (UTC). `month` and `day` follow
//! the calendar; `rolling` is 30-day windows counted from when the budget was set (a billing
//! cycle of the customer's own); `lifetime` never resets.

use crate::time::UnixMillis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Month,
    Day,
    Rolling,
    Lifetime,
}

/// The length of a `rolling` window.
pub const ROLLING_DAYS: i64 = 30;

/// The end of time for lifetime budgets (year 9999).
pub const FAR_FUTURE_MS: i64 = 253_402_300_799_000;
const DAY_MS: i64 = 86_400_000;

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Month => "month",
            BudgetPeriod::Day => "day",
            BudgetPeriod::Rolling => "rolling",
            BudgetPeriod::Lifetime => "lifetime",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "month" => Some(BudgetPeriod::Month),
            "day" => Some(BudgetPeriod::Day),
            "rolling" => Some(BudgetPeriod::Rolling),
            "lifetime" => Some(BudgetPeriod::Lifetime),
            _ => None,
        }
    }

    /// The `[start, end)` window containing `now`, for a budget set at `now` (a rolling
    /// window starts now).
    pub fn window(self, now: UnixMillis) -> (i64, i64) {
        match self {
            BudgetPeriod::Lifetime => (0, FAR_FUTURE_MS),
            BudgetPeriod::Rolling => (now.0, now.0 + ROLLING_DAYS * DAY_MS),
            BudgetPeriod::Day => {
                let start = now.0 - now.0.rem_euclid(DAY_MS);
                (start, start + DAY_MS)
            }
            BudgetPeriod::Month => {
                let (y, m, _) = civil_from_days(now.0.div_euclid(DAY_MS));
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (days_from_civil(y, m, 1) * DAY_MS, days_from_civil(ny, nm, 1) * DAY_MS)
            }
        }
    }
}

impl BudgetPeriod {
    /// The window containing `now` for a budget whose current (or last) window started at
    /// `current_start`: rolling windows keep their anchor, calendar ones follow the calendar.
    pub fn window_after(self, current_start: i64, now: UnixMillis) -> (i64, i64) {
        match self {
            BudgetPeriod::Rolling => {
                let length = ROLLING_DAYS * DAY_MS;
                let start = current_start + (now.0 - current_start).max(0).div_euclid(length) * length;
                (start, start + length)
            }
            other => other.window(now),
        }
    }
}

/// Unix seconds of an RFC 3339 UTC time as Stripe's v2 API writes it
/// (`2026-11-22T10:15:30.123Z`); `None` for anything else.
pub fn rfc3339_utc_seconds(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok()).flatten()
    };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let rest = &s[19..];
    let rest = match rest.strip_prefix('.') {
        Some(fraction) => fraction.trim_start_matches(|c: char| c.is_ascii_digit()),
        None => rest,
    };
    if !matches!(rest, "Z" | "z" | "+00:00")
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&d)
        || h > 23
        || mi > 59
        || se > 60
    {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_windows_follow_the_calendar() {
        // 2026-02-15T12:00:00Z
        let now = UnixMillis(1_771_156_800_000);
        let (start, end) = BudgetPeriod::Month.window(now);
        assert_eq!(start, 1_769_904_000_000); // 2026-02-01
        assert_eq!(end, 1_772_323_200_000); // 2026-03-01
        // December rolls into the next year.
        let dec = UnixMillis(1_797_000_000_000); // 2026-12-12
        let (s, e) = BudgetPeriod::Month.window(dec);
        assert_eq!((s, e), (1_796_083_200_000, 1_798_761_600_000));
    }

    #[test]
    fn rolling_windows_keep_their_anchor() {
        let set = UnixMillis(1_771_156_800_000);
        let (start, end) = BudgetPeriod::Rolling.window(set);
        assert_eq!((start, end), (set.0, set.0 + 30 * DAY_MS));
        // 45 days later: the second window, still counted from the anchor.
        let later = UnixMillis(set.0 + 45 * DAY_MS);
        assert_eq!(BudgetPeriod::Rolling.window_after(start, later), (set.0 + 30 * DAY_MS, set.0 + 60 * DAY_MS));
        assert_eq!(BudgetPeriod::Month.window_after(start, later), BudgetPeriod::Month.window(later));
    }

    #[test]
    fn stripe_v2_times_are_read() {
        assert_eq!(rfc3339_utc_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_utc_seconds("2026-11-22T10:15:30.123Z"), Some(1_795_342_530));
        assert_eq!(rfc3339_utc_seconds("2026-11-22T10:15:30+01:00"), None);
        assert_eq!(rfc3339_utc_seconds("yesterday"), None);
    }

    #[test]
    fn day_and_lifetime_windows() {
        let now = UnixMillis(1_771_156_800_000);
        assert_eq!(BudgetPeriod::Day.window(now), (1_771_113_600_000, 1_771_200_000_000));
        assert_eq!(BudgetPeriod::Lifetime.window(now), (0, FAR_FUTURE_MS));
    }
}

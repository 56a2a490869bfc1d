//! Formatting for pages: times and money.

use time::OffsetDateTime;
use time::macros::format_description;

/// `2026-11-22 05:39` (UTC) for a time in Unix milliseconds.
pub fn datetime(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(format_description!("[year]-[month]-[day] [hour]:[minute]")).ok())
        .unwrap_or_default()
}

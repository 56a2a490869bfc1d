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

/// `2026-11-22` (UTC) for a time in Unix milliseconds.
pub fn date(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(format_description!("[year]-[month]-[day]")).ok())
        .unwrap_or_default()
}

/// An amount as people read it, in the currency's own minor unit: `1,234.50 USD`,
/// `1,235 JPY`, `0.000006 USD` for dust (see [`tollgate_core::currency::display`]).
pub fn money(nanos: i64, currency: &str) -> String {
    tollgate_core::currency::display(tollgate_core::money::Nanos(nanos), currency)
}

/// Every digit of an amount (`0.6304312 USD`), for tooltips and exports.
pub fn exact_money(nanos: i64, currency: &str) -> String {
    tollgate_core::currency::exact(tollgate_core::money::Nanos(nanos), currency)
}

/// Escapes text for HTML or SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A bar chart of spend per day, drawn as SVG on the server: labelled axes (the amount scale
/// and the first, middle and last dates), a title for screen readers, and each bar's value
/// in its tooltip.
pub fn spend_chart(days: &[tollgate_core::usage::DaySpend], currency: &str) -> String {
    const WIDTH: i64 = 720;
    const HEIGHT: i64 = 220;
    const LEFT: i64 = 80;
    const BOTTOM: i64 = 30;
    const TOP: i64 = 10;
    let plot_w = WIDTH - LEFT - 10;
    let plot_h = HEIGHT - BOTTOM - TOP;
    let max = days.iter().map(|d| d.billed_nanos).max().unwrap_or(0).max(1);
    let total: i64 = days.iter().map(|d| d.billed_nanos).sum();
    let n = days.len().max(1) as i64;
    let slot = plot_w / n;
    let bar = (slot - 2).max(1);
    let title = format!(
        "Spend per day over {} days, {} in all; the highest day {}",
        days.len(),
        money(total, currency),
        money(if total == 0 { 0 } else { max }, currency)
    );
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\" xmlns=\"http://www.w3.org/2000/svg\"><title>{}</title>",
        escape(&title),
        escape(&title)
    );
    // Axes and the amount scale (0 and the top).
    let base = TOP + plot_h;
    svg.push_str(&format!(
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{base}\" stroke=\"#d0d7de\"/><line x1=\"{LEFT}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"#d0d7de\"/>",
        LEFT + plot_w
    ));
    let top_label = if total == 0 { money(0, currency) } else { money(max, currency) };
    svg.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><text x=\"{}\" y=\"{base}\" text-anchor=\"end\">0</text>",
        LEFT - 6,
        TOP + 10,
        escape(&top_label),
        LEFT - 6
    ));
    for (i, day) in days.iter().enumerate() {
        let h = if total == 0 { 0 } else { (day.billed_nanos as i128 * plot_h as i128 / max as i128) as i64 };
        let x = LEFT + 1 + i as i64 * slot;
        let label = format!("{}: {} ({} calls)", date(day.day), money(day.billed_nanos, currency), day.calls);
        svg.push_str(&format!(
            "<rect class=\"bar\" x=\"{x}\" y=\"{}\" width=\"{bar}\" height=\"{h}\"><title>{}</title></rect>",
            base - h,
            escape(&label)
        ));
    }
    // The first date starts at its bar, the last ends at its bar, so neither is cut off.
    let last = days.len().saturating_sub(1);
    for (i, anchor) in [(0, "start"), (days.len() / 2, "middle"), (last, "end")] {
        if let Some(day) = days.get(i) {
            let x = match anchor {
                "start" => LEFT + 1 + i as i64 * slot,
                "end" => LEFT + 1 + i as i64 * slot + bar,
                _ => LEFT + 1 + i as i64 * slot + bar / 2,
            };
            svg.push_str(&format!(
                "<text x=\"{x}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>",
                HEIGHT - 8,
                escape(&date(day.day))
            ));
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::usage::DaySpend;

    #[test]
    fn the_chart_labels_its_axes_and_escapes_text() {
        let days = [
            DaySpend { day: 0, billed_nanos: 0, calls: 0 },
            DaySpend { day: 86_400_000, billed_nanos: 2_500_000_000, calls: 3 },
        ];
        let svg = spend_chart(&days, "u<s>d");
        assert!(svg.contains("1970-01-01") && svg.contains("1970-01-02"));
        assert!(svg.contains("2.50 U&lt;S&gt;D"));
        assert!(!svg.contains("<S>"));
        assert!(svg.contains("role=\"img\""));
    }
}

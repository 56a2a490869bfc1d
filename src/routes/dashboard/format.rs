//! Formatting for pages: times, money (one way everywhere: see [`money`]) and charts drawn as
//! SVG on the server.

use std::fmt;

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

/// An amount on a page: [`money`]'s figure in a `<span class="money">` that never wraps,
/// with every digit in its tooltip (`title`), and marked `negative` below zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    shown: String,
    exact: String,
    negative: bool,
}

/// The amount of `nanos` as [`Money`] for a page (a template prints it as HTML).
pub fn amount(nanos: i64, currency: &str) -> Money {
    Money { shown: money(nanos, currency), exact: exact_money(nanos, currency), negative: nanos < 0 }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let class = if self.negative { "money negative" } else { "money" };
        write!(f, "<span class=\"{class}\" title=\"{}\">{}</span>", escape(&self.exact), escape(&self.shown))
    }
}

/// Its text is escaped when it is written: templates print it as it is.
impl askama::filters::HtmlSafe for Money {}

/// Every digit of an amount (`0.6304312 USD`), for tooltips and exports.
pub fn exact_money(nanos: i64, currency: &str) -> String {
    tollgate_core::currency::exact(tollgate_core::money::Nanos(nanos), currency)
}

/// Escapes text for HTML or SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Axis ticks from 0 to at least `max` (at least 1) in equal steps of 1, 2, 2.5 or 5 × 10^k:
/// 4 to 6 ticks, 5 where possible, the fewer on a tie (`7` → 0, 2, 4, 6, 8; `1234` → 0, 500,
/// 1000, 1500). A `max` too small for 4 ticks of whole units gets a step of 1.
pub fn nice_ticks(max: i64) -> Vec<i64> {
    let max = i128::from(max.max(1));
    let mut best: Option<(i128, i128)> = None;
    let mut power: i128 = 1;
    while power <= max {
        let quarter = if power >= 10 { Some(power * 5 / 2) } else { None };
        for step in [Some(power), Some(2 * power), quarter, Some(5 * power)].into_iter().flatten() {
            let intervals = (max + step - 1) / step;
            let better = match best {
                None => true,
                Some((_, seen)) => (intervals - 4).abs() <= (seen - 4).abs(),
            };
            if (3..=5).contains(&intervals) && better {
                best = Some((step, intervals));
            }
        }
        power *= 10;
    }
    // Only a `max` of 1 or 2 has no step of 3 to 5 intervals: steps of 1.
    let (step, intervals) = best.unwrap_or((1, max));
    (0..=intervals).map(|i| i64::try_from(i * step).unwrap_or(i64::MAX)).collect()
}

/// Decimals a tick step of `step` nano-units needs (`0.25` → 2), at least the currency's own.
fn tick_decimals(step: i64, currency: &str) -> u32 {
    let needed = (0..=9_u32).find(|d| step % 10_i64.pow(9 - d) == 0).unwrap_or(9);
    needed.max(tollgate_core::currency::minor_digits(currency))
}

/// One bar of a chart: its label on the x axis, its value, and its tooltip.
pub struct Bar {
    pub label: String,
    pub value: i64,
    pub title: String,
}

/// A bar chart drawn as SVG: a grid with rounded ticks ([`nice_ticks`]) labelled by
/// `tick_label`, the y labels given the width their longest needs, the first, middle and last
/// x labels, a title for screen readers, and each bar's exact value in its tooltip. With no
/// value above 0 the scale goes up to `idle_max`.
pub fn bar_chart(title: &str, bars: &[Bar], idle_max: i64, tick_label: impl Fn(i64, i64) -> String) -> String {
    const WIDTH: f64 = 720.0;
    const HEIGHT: f64 = 240.0;
    const TOP: f64 = 12.0;
    const BOTTOM: f64 = 30.0;
    const RIGHT: f64 = 12.0;
    /// Wide enough for a digit or letter at the chart's 11px.
    const CHAR_WIDTH: f64 = 7.0;
    let max = bars.iter().map(|b| b.value).max().unwrap_or(0);
    let ticks = nice_ticks(if max > 0 { max } else { idle_max });
    let step = ticks.get(1).copied().unwrap_or(1);
    let top = ticks.last().copied().unwrap_or(1).max(1);
    let labels: Vec<String> = ticks.iter().map(|t| tick_label(*t, step)).collect();
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1);
    let left = (longest as f64 * CHAR_WIDTH + 12.0).clamp(40.0, WIDTH / 2.0);
    let (plot_w, plot_h) = (WIDTH - left - RIGHT, HEIGHT - TOP - BOTTOM);
    let base = TOP + plot_h;
    let y_of = |v: i64| base - (v as f64 / top as f64) * plot_h;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\" xmlns=\"http://www.w3.org/2000/svg\"><title>{}</title>",
        escape(title),
        escape(title)
    );
    for (tick, label) in ticks.iter().zip(&labels) {
        let y = y_of(*tick);
        svg.push_str(&format!(
            "<line class=\"grid\" x1=\"{left:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#d0d7de\"/><text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + plot_w,
            left - 6.0,
            y + 4.0,
            escape(label)
        ));
    }
    let slot = plot_w / bars.len().max(1) as f64;
    let gap = (slot * 0.2).min(2.0);
    let width = (slot - gap).max(0.5);
    for (i, bar) in bars.iter().enumerate() {
        let y = y_of(bar.value.max(0));
        svg.push_str(&format!(
            "<rect class=\"bar\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{width:.1}\" height=\"{:.1}\"><title>{}</title></rect>",
            left + i as f64 * slot + gap / 2.0,
            base - y,
            escape(&bar.title)
        ));
    }
    // The first label starts at its bar, the last ends at its bar, so neither is cut off.
    let last = bars.len().saturating_sub(1);
    let mut shown = Vec::new();
    for (i, anchor) in [(0, "start"), (last, "end"), (bars.len() / 2, "middle")] {
        if shown.contains(&i) {
            continue;
        }
        shown.push(i);
        if let Some(bar) = bars.get(i) {
            let start = left + i as f64 * slot + gap / 2.0;
            let x = match anchor {
                "start" => start,
                "end" => start + width,
                _ => start + width / 2.0,
            };
            svg.push_str(&format!(
                "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>",
                HEIGHT - 8.0,
                escape(&bar.label)
            ));
        }
    }
    svg.push_str("</svg>");
    svg
}

/// A bar chart of money per day: y labels in the currency with the decimals their step needs,
/// each bar's tooltip the day, its exact amount and its calls.
pub fn spend_chart(days: &[tollgate_core::usage::DaySpend], currency: &str) -> String {
    let total: i64 = days.iter().map(|d| d.billed_nanos).sum();
    let max = days.iter().map(|d| d.billed_nanos).max().unwrap_or(0);
    let title = format!(
        "Spend per day over {} days, {} in all; the highest day {}",
        days.len(),
        money(total, currency),
        money(max, currency)
    );
    let bars: Vec<Bar> = days
        .iter()
        .map(|d| Bar {
            label: date(d.day),
            value: d.billed_nanos,
            title: format!("{}: {} ({} calls)", date(d.day), exact_money(d.billed_nanos, currency), d.calls),
        })
        .collect();
    // No spend at all: a scale of a hundred minor units (1 USD, 100 JPY), not of nano-units.
    let idle_max = tollgate_core::currency::nanos_per_minor_unit(currency) * 100;
    bar_chart(&title, &bars, idle_max, |value, step| {
        let decimals = tick_decimals(step, currency);
        tollgate_core::currency::display_decimals(tollgate_core::money::Nanos(value), currency, decimals)
    })
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
        assert!(!svg.contains("style="), "the CSP blocks inline styles");
    }

    #[test]
    fn ticks_are_round_numbers() {
        let units = |v: &[i64]| v.iter().map(|t| t * 100_000_000).collect::<Vec<_>>();
        // 0.6304312 in nano-units: steps of 0.2.
        assert_eq!(nice_ticks(630_431_200), units(&[0, 2, 4, 6, 8]));
        assert_eq!(nice_ticks(7), vec![0, 2, 4, 6, 8]);
        assert_eq!(nice_ticks(1234), vec![0, 500, 1000, 1500]);
        assert_eq!(nice_ticks(8), vec![0, 2, 4, 6, 8]);
        assert_eq!(nice_ticks(100), vec![0, 25, 50, 75, 100]);
        assert_eq!(nice_ticks(0), vec![0, 1]);
        assert_eq!(nice_ticks(2), vec![0, 1, 2]);
        for max in [3, 9, 11, 99, 101, 4_999, 123_456_789, i64::MAX / 10] {
            let ticks = nice_ticks(max);
            assert!((4..=6).contains(&ticks.len()), "{max}: {ticks:?}");
            assert!(*ticks.last().unwrap() >= max, "{max}: {ticks:?}");
            let (step, power) = (ticks[1], 10_i64.pow(ticks[1].ilog10()));
            let round = step % power == 0 && [1, 2, 5].contains(&(step / power));
            let quarter = (step * 10) % power == 0 && step * 10 / power == 25;
            assert!(round || quarter, "{max}: {ticks:?}");
        }
    }

    #[test]
    fn the_y_labels_are_rounded_money_that_fits() {
        let days = [
            DaySpend { day: 0, billed_nanos: 630_431_200, calls: 2 },
            DaySpend { day: 86_400_000, billed_nanos: 100_000_000, calls: 1 },
        ];
        let svg = spend_chart(&days, "usd");
        for label in ["0.00 USD", "0.20 USD", "0.40 USD", "0.60 USD", "0.80 USD"] {
            assert!(svg.contains(&format!(">{label}</text>")), "{label}: {svg}");
        }
        assert!(svg.contains("<title>1970-01-01: 0.6304312 USD (2 calls)</title>"), "the exact value: {svg}");
        // The y labels end 6 units left of the plot, which starts after the longest label.
        assert!(svg.contains("<line class=\"grid\" x1=\"68.0\""), "{svg}");
        let quarters = spend_chart(&[DaySpend { day: 0, billed_nanos: 1_000_000_000, calls: 1 }], "usd");
        assert!(quarters.contains(">0.25 USD</text>") && quarters.contains(">1.00 USD</text>"), "{quarters}");
        let dust = spend_chart(&[DaySpend { day: 0, billed_nanos: 7_000, calls: 1 }], "usd");
        assert!(dust.contains(">0.000002 USD</text>") && dust.contains(">0.000008 USD</text>"), "{dust}");
        let idle = spend_chart(&[DaySpend { day: 0, billed_nanos: 0, calls: 0 }], "usd");
        assert!(idle.contains(">0.00 USD</text>") && idle.contains(">1.00 USD</text>"), "{idle}");
        let yen = spend_chart(&[DaySpend { day: 0, billed_nanos: 1_234_000_000_000, calls: 1 }], "jpy");
        assert!(yen.contains(">1,500 JPY</text>"), "{yen}");
    }

    #[test]
    fn money_is_one_readable_figure_with_every_digit_in_its_tooltip() {
        let m = |nanos: i64, currency: &str| amount(nanos, currency).to_string();
        assert_eq!(m(0, "usd"), "<span class=\"money\" title=\"0.00 USD\">0.00 USD</span>");
        assert_eq!(m(6_000, "usd"), "<span class=\"money\" title=\"0.000006 USD\">0.000006 USD</span>");
        assert_eq!(m(10_000_000, "usd"), "<span class=\"money\" title=\"0.01 USD\">0.01 USD</span>");
        assert_eq!(m(630_431_200, "usd"), "<span class=\"money\" title=\"0.6304312 USD\">0.63 USD</span>");
        assert_eq!(m(1_234_500_000_000, "usd"), "<span class=\"money\" title=\"1234.50 USD\">1,234.50 USD</span>");
        assert_eq!(m(1_234_500_000_000, "jpy"), "<span class=\"money\" title=\"1234.50 JPY\">1,235 JPY</span>");
        assert_eq!(m(125_400_000, "kwd"), "<span class=\"money\" title=\"0.1254 KWD\">0.125 KWD</span>");
        assert_eq!(
            m(-4_200_000, "usd"),
            "<span class=\"money negative\" title=\"-0.0042 USD\">-0.0042 USD</span>",
            "a negative margin"
        );
        assert_eq!(m(1, "u\"sd"), "<span class=\"money\" title=\"0.000000001 U&quot;SD\">0.000000001 U&quot;SD</span>");
    }
}

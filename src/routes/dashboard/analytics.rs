//! Analytics: what the project earns, on whom — provider cost, billed and margin over a date
//! range, by day, model and customer, on a page and as CSV. The range is in the URL
//! (`?from=YYYY-MM-DD&to=YYYY-MM-DD`, both UTC days, `to` included), so a view can be shared;
//! the overview reads it the same way.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use time::{Date, Duration, Month, OffsetDateTime};
use tollgate_core::analytics::{self, Figures, MAX_DAYS};
use tollgate_core::money::Nanos;
use tollgate_core::projects::Project;
use tollgate_core::time::UnixMillis;
use tollgate_core::usage::DaySpend;

use super::error::WebError;
use super::format::{self, Money};
use super::projects::load_project;
use super::session::Member;
use crate::routes::api::usage::csv_field;
use crate::state::AppState;

/// The range of a page or an export as the URL gives it (each part optional).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RangeQuery {
    from: Option<String>,
    to: Option<String>,
    /// For the CSV export: `day`, `model` or `customer`.
    by: Option<String>,
}

/// Whole UTC days from `from` to `to`, both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub from: Date,
    pub to: Date,
}

/// `2026-11-22` → the date; anything else (`2026-2-30`, `22/11/2026`) → None.
fn parse_date(text: &str) -> Option<Date> {
    let mut parts = text.trim().split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit());
    if parts.next().is_some() || !digits(y, 4) || !digits(m, 2) || !digits(d, 2) {
        return None;
    }
    let month = Month::try_from(m.parse::<u8>().ok()?).ok()?;
    Date::from_calendar_date(y.parse().ok()?, month, d.parse().ok()?).ok()
}

fn iso(date: Date) -> String {
    format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day())
}

fn start_ms(date: Date) -> i64 {
    date.midnight().assume_utc().unix_timestamp() * 1000
}

/// Today (UTC).
pub fn today() -> Date {
    OffsetDateTime::now_utc().date()
}

impl DateRange {
    /// The last `days` days, today included.
    pub fn last_days(today: Date, days: i64) -> Self {
        Self { from: today.saturating_sub(Duration::days(days - 1)), to: today }
    }

    /// From the first of this month to today.
    pub fn this_month(today: Date) -> Self {
        Self { from: today.replace_day(1).unwrap_or(today), to: today }
    }

    /// The default: the last 30 days.
    pub fn default_for(today: Date) -> Self {
        Self::last_days(today, 30)
    }

    /// The range `query` asks for (defaults filling what it leaves out), or what is wrong with it.
    pub fn from_query(query: &RangeQuery, today: Date) -> Result<Self, Vec<String>> {
        fn given(text: &Option<String>) -> Option<&str> {
            text.as_deref().map(str::trim).filter(|t| !t.is_empty())
        }
        let mut errors = Vec::new();
        let mut date = |label: &str, text: Option<&str>| match text {
            None => None,
            Some(t) => {
                let parsed = parse_date(t);
                if parsed.is_none() {
                    errors.push(format!("{label}: must be a date such as 2026-11-22 (year-month-day)"));
                }
                parsed
            }
        };
        let from = date("From", given(&query.from));
        let to = date("To", given(&query.to));
        if !errors.is_empty() {
            return Err(errors);
        }
        let range = match (from, to) {
            (None, None) => Self::default_for(today),
            (Some(from), None) => Self { from, to: today.max(from) },
            (None, Some(to)) => Self::last_days(to, 30),
            (Some(from), Some(to)) => Self { from, to },
        };
        if range.from > range.to {
            return Err(vec!["From: must be on or before To".to_owned()]);
        }
        if range.days() > MAX_DAYS {
            return Err(vec![format!("To: the range may span at most {MAX_DAYS} days")]);
        }
        Ok(range)
    }

    /// Days in the range.
    pub fn days(&self) -> i64 {
        (self.to - self.from).whole_days() + 1
    }

    /// Its first millisecond.
    pub fn start(&self) -> UnixMillis {
        UnixMillis(start_ms(self.from))
    }

    /// The millisecond after its last day.
    pub fn end(&self) -> UnixMillis {
        UnixMillis(start_ms(self.to) + tollgate_core::usage::DAY_MS)
    }

    /// `from=…&to=…` for a URL.
    pub fn query(&self) -> String {
        format!("from={}&to={}", iso(self.from), iso(self.to))
    }
}

/// A shortcut to a range.
pub struct Preset {
    pub label: &'static str,
    pub query: String,
    pub current: bool,
}

/// The range form of a page: its fields, shortcuts and where it submits.
pub struct RangeView {
    pub action: String,
    pub from: String,
    pub to: String,
    pub query: String,
    pub presets: Vec<Preset>,
}

impl RangeView {
    pub fn new(action: String, range: DateRange, today: Date) -> Self {
        let presets = [
            ("Last 7 days", DateRange::last_days(today, 7)),
            ("Last 30 days", DateRange::last_days(today, 30)),
            ("This month", DateRange::this_month(today)),
        ]
        .into_iter()
        .map(|(label, preset)| Preset { label, query: preset.query(), current: preset == range })
        .collect();
        Self { action, from: iso(range.from), to: iso(range.to), query: range.query(), presets }
    }

    /// `2026-11-08 – 2026-12-07`.
    pub fn label(&self) -> String {
        if self.from == self.to { self.from.clone() } else { format!("{} – {}", self.from, self.to) }
    }
}

/// The range a page shows and the messages about the one asked for: a bad range is answered
/// with the default one and a message.
pub fn page_range(query: Result<Query<RangeQuery>, QueryRejection>, today: Date) -> (DateRange, Vec<String>) {
    let parsed = match &query {
        Ok(Query(q)) => DateRange::from_query(q, today),
        Err(_) => Err(vec!["The date range could not be read: give from and to once each.".to_owned()]),
    };
    match parsed {
        Ok(range) => (range, vec![]),
        Err(errors) => (DateRange::default_for(today), errors),
    }
}

/// Figures as a page shows them.
pub struct FiguresView {
    pub calls: i64,
    pub refused: i64,
    pub failed: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost: Money,
    pub billed: Money,
    pub margin: Money,
    /// The margin's share of what was billed (`20.0 %`), or `–` when nothing was.
    pub margin_share: String,
}

impl FiguresView {
    pub fn of(f: &Figures, currency: &str) -> Self {
        let margin = f.margin_nanos();
        Self {
            calls: f.calls,
            refused: f.refused,
            failed: f.failed,
            input_tokens: f.input_tokens,
            output_tokens: f.output_tokens,
            cost: format::amount(f.cost_nanos, currency),
            billed: format::amount(f.billed_nanos, currency),
            margin: format::amount(margin, currency),
            margin_share: if f.billed_nanos > 0 {
                format!("{:.1} %", margin as f64 * 100.0 / f.billed_nanos as f64)
            } else {
                "–".to_owned()
            },
        }
    }
}

/// One row of a breakdown: what it is (a link to it, if it has a page) and its figures.
pub struct RowView {
    pub label: String,
    pub link: Option<String>,
    pub f: FiguresView,
}

/// The chart of billed per day.
pub fn day_chart(days: &[analytics::DayFigures], currency: &str) -> String {
    let spend: Vec<DaySpend> = days
        .iter()
        .map(|d| DaySpend { day: d.day, billed_nanos: d.figures.billed_nanos, calls: d.figures.calls })
        .collect();
    format::spend_chart(&spend, currency)
}

#[derive(Template, WebTemplate)]
#[template(path = "analytics.html")]
pub struct AnalyticsPage {
    me: Member,
    project: Project,
    range: RangeView,
    errors: Vec<String>,
    total: FiguresView,
    chart: String,
    days: Vec<RowView>,
    models: Vec<RowView>,
    customers: Vec<RowView>,
    /// More customers called than the page lists (the CSV has them all).
    customers_cut: bool,
}

/// How many customers the page lists, most billed first.
const PAGE_CUSTOMERS: i64 = 500;

fn customer_label(c: &analytics::CustomerFigures) -> String {
    match (&c.external_id, &c.customer_id) {
        (Some(id), _) => id.clone(),
        (None, Some(_)) => "(deleted customer)".to_owned(),
        (None, None) => "(no customer)".to_owned(),
    }
}

/// `GET /projects/{id}/analytics?from&to`.
pub async fn page(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let project = load_project(&state, &me, &id).await?;
    let today = today();
    let (range, errors) = page_range(query, today);
    let (from, to, currency) = (range.start(), range.end(), project.currency.clone());
    let total = analytics::totals(&state.db, &project.id, from, to).await?;
    let days = analytics::by_day(&state.db, &project.id, from, to).await?;
    let models = analytics::by_model(&state.db, &project.id, from, to).await?;
    let customers = analytics::by_customer(&state.db, &project.id, from, to, Some(PAGE_CUSTOMERS + 1)).await?;
    let customers_cut = customers.len() as i64 > PAGE_CUSTOMERS;
    let page = AnalyticsPage {
        range: RangeView::new(format!("/projects/{}/analytics", project.id), range, today),
        errors,
        total: FiguresView::of(&total, &currency),
        chart: day_chart(&days, &currency),
        days: days
            .iter()
            .rev()
            .filter(|d| d.figures.all_calls() > 0 || d.figures.billed_nanos != 0)
            .map(|d| RowView { label: format::date(d.day), link: None, f: FiguresView::of(&d.figures, &currency) })
            .collect(),
        models: models
            .iter()
            .map(|m| RowView { label: m.model.clone(), link: None, f: FiguresView::of(&m.figures, &currency) })
            .collect(),
        customers_cut,
        customers: customers
            .iter()
            .take(PAGE_CUSTOMERS as usize)
            .map(|c| RowView {
                label: customer_label(c),
                link: c.customer_id.as_ref().map(|cid| format!("/projects/{}/customers/{cid}", project.id)),
                f: FiguresView::of(&c.figures, &currency),
            })
            .collect(),
        project,
        me,
    };
    let status = if page.errors.is_empty() { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    Ok((status, page).into_response())
}

/// The CSV columns after each breakdown's first.
const CSV_FIGURES: &str = "calls,refused,failed,input_tokens,output_tokens,provider_cost,billed,margin,currency";

fn csv_figures(f: &Figures, currency: &str) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{}",
        f.calls,
        f.refused,
        f.failed,
        f.input_tokens,
        f.output_tokens,
        Nanos(f.cost_nanos),
        Nanos(f.billed_nanos),
        Nanos(f.margin_nanos()),
        currency.to_ascii_uppercase()
    )
}

/// `GET /projects/{id}/analytics.csv?by=day|model|customer&from&to`: a breakdown as CSV, days
/// as `YYYY-MM-DD` (UTC), money as exact decimal amounts of the project's currency.
pub async fn csv(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let project = load_project(&state, &me, &id).await?;
    let Ok(Query(query)) = query else {
        return Err(WebError::BadRequest(
            "The export's address could not be read: give by, from and to once each.".to_owned(),
        ));
    };
    let range = DateRange::from_query(&query, today()).map_err(|errors| WebError::BadRequest(errors.join(" ")))?;
    let (from, to, currency) = (range.start(), range.end(), project.currency.as_str());
    let by = query.by.as_deref().unwrap_or("day");
    let mut out = String::new();
    match by {
        "day" => {
            out.push_str(&format!("date,{CSV_FIGURES}\n"));
            for d in analytics::by_day(&state.db, &project.id, from, to).await? {
                out.push_str(&format!("{},{}\n", format::date(d.day), csv_figures(&d.figures, currency)));
            }
        }
        "model" => {
            out.push_str(&format!("model,{CSV_FIGURES}\n"));
            for m in analytics::by_model(&state.db, &project.id, from, to).await? {
                out.push_str(&format!("{},{}\n", csv_field(&m.model), csv_figures(&m.figures, currency)));
            }
        }
        "customer" => {
            out.push_str(&format!("customer,{CSV_FIGURES}\n"));
            for c in analytics::by_customer(&state.db, &project.id, from, to, None).await? {
                let label = c.external_id.clone().unwrap_or_default();
                out.push_str(&format!("{},{}\n", csv_field(&label), csv_figures(&c.figures, currency)));
            }
        }
        _ => return Err(WebError::BadRequest("By: must be day, model or customer.".to_owned())),
    }
    let file = format!("attachment; filename=\"{}-by-{by}-{}-{}.csv\"", project.id, iso(range.from), iso(range.to));
    let mut response = out.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(value) = HeaderValue::from_str(&file) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn range(from: Option<&str>, to: Option<&str>) -> Result<DateRange, Vec<String>> {
        let q = RangeQuery { from: from.map(str::to_owned), to: to.map(str::to_owned), by: None };
        DateRange::from_query(&q, date!(2026 - 12 - 07))
    }

    #[test]
    fn ranges_are_read_from_the_url_with_defaults() {
        let last_30 = DateRange { from: date!(2026 - 11 - 08), to: date!(2026 - 12 - 07) };
        assert_eq!(range(None, None), Ok(last_30));
        assert_eq!(range(Some(""), Some(" ")), Ok(last_30));
        assert_eq!(
            range(Some("2026-02-01"), Some("2026-02-28")),
            Ok(DateRange { from: date!(2026 - 02 - 01), to: date!(2026 - 02 - 28) })
        );
        let december = DateRange::this_month(date!(2026 - 12 - 07));
        assert_eq!(december.query(), "from=2026-12-01&to=2026-12-07");
        assert_eq!(december.days(), 7);
        assert_eq!(december.start(), UnixMillis(1_796_083_200_000));
        assert_eq!(december.end().0 - december.start().0, 7 * 86_400_000);
    }

    #[test]
    fn bad_ranges_get_a_message() {
        for (from, to) in [
            (Some("2026-02-30"), None),
            (Some("yesterday"), None),
            (None, Some("2026-1-1")),
            (Some("2026-12-07"), Some("2026-12-01")),
            (Some("2020-01-01"), Some("2026-01-01")),
        ] {
            let errors = range(from, to).expect_err("refused");
            assert!(!errors.is_empty() && errors.iter().all(|e| e.contains(": ")), "{errors:?}");
        }
    }
}

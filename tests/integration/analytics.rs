//! Reseller analytics through the dashboard: calls through the proxy for two customers and two
//! models with a markup, then the analytics page, its CSV exports and the overview agree with
//! the usage events read straight from the database — provider cost, billed and margin — for
//! the date range asked, and a bad range gets a message.

use reqwest::StatusCode;
use tollgate_core::money::Nanos;
use tollgate_core::time::UnixMillis;
use tollgate_core::with_db;

use crate::dashboard::{Browser, PASSWORD, field_value, project_with_traffic};
use crate::db_cases;
use crate::helpers::{DbCase, TestApp, TestDatabase, TestResult, spawn_app};
use crate::mock_provider::MockProvider;

pub fn cases() -> Vec<DbCase> {
    db_cases![
        cost_billed_and_margin_add_up_to_the_usage_events,
        the_date_range_bounds_every_figure_and_bad_dates_get_a_message,
    ]
}

const DAY_MS: i64 = 86_400_000;

/// Cost, billed, settled and refused calls of the project's events in `[from, to)`, per
/// customer (`None`: all), straight from the database.
#[derive(Debug, Default, PartialEq, Eq)]
struct Sums {
    cost: i64,
    billed: i64,
    settled: i64,
    refused: i64,
}

async fn sums(app: &TestApp, project: &str, customer: Option<&str>, from: i64, to: i64) -> anyhow::Result<Sums> {
    const SQL: &str = "SELECT CAST(COALESCE(SUM(u.cost_nanos), 0) AS BIGINT), CAST(COALESCE(SUM(u.billed_nanos), 0) AS BIGINT), \
        CAST(COALESCE(SUM(CASE WHEN u.status = 'settled' THEN 1 ELSE 0 END), 0) AS BIGINT), \
        CAST(COALESCE(SUM(CASE WHEN u.status = 'refused' THEN 1 ELSE 0 END), 0) AS BIGINT) \
        FROM usage_events u LEFT JOIN customers c ON c.id = u.customer_id \
        WHERE u.project_id = $1 AND ($2 IS NULL OR c.external_id = $2) AND u.created_at >= $3 AND u.created_at < $4";
    let (cost, billed, settled, refused): (i64, i64, i64, i64) = with_db!(&app.state.db, pool =>
        sqlx::query_as(SQL).bind(project).bind(customer).bind(from).bind(to).fetch_one(pool).await)?;
    Ok(Sums { cost, billed, settled, refused })
}

/// The exact amount (the tooltip) of the money in the element `id`.
fn exact_amount(html: &str, id: &str) -> Option<Nanos> {
    let marker = format!("id=\"{id}\"><span class=\"money");
    let start = html.find(&marker)? + marker.len();
    let title = html[start..].find("title=\"")? + start + "title=\"".len();
    let end = html[title..].find('"')? + title;
    html[title..end].strip_suffix(" USD")?.parse().ok()
}

/// The number in the element `id`.
fn count_in(html: &str, id: &str) -> Option<i64> {
    let marker = format!("id=\"{id}\">");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('<')? + start;
    html[start..end].trim().parse().ok()
}

/// A CSV export as rows of named fields.
async fn csv(
    app: &TestApp,
    browser: &Browser<'_>,
    path: &str,
) -> anyhow::Result<Vec<std::collections::HashMap<String, String>>> {
    let response = browser.client.get(app.url(path)).send().await?;
    anyhow::ensure!(response.status() == StatusCode::OK, "{path}: {}", response.status());
    let content_type = response.headers()["content-type"].to_str()?.to_owned();
    anyhow::ensure!(content_type == "text/csv; charset=utf-8", "{content_type}");
    let text = response.text().await?;
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap_or_default().split(',').map(str::to_owned).collect();
    Ok(lines
        .map(|line| {
            // No field of these exports holds a comma (customer ids here do not).
            header.iter().cloned().zip(line.split(',').map(str::to_owned)).collect()
        })
        .collect())
}

fn nanos(row: &std::collections::HashMap<String, String>, field: &str) -> Nanos {
    row.get(field).and_then(|v| v.parse().ok()).unwrap_or(Nanos(i64::MIN))
}

/// A project with a 25 % markup and two priced models, two customers with budgets, and calls:
/// `alpha` 2 × mock-model and 1 × mock-big, `beta` 1 × mock-model, and one refused call of a
/// customer without budget. Answers the project's path and id.
async fn project_with_two_customers(
    app: &TestApp,
    ada: &Browser<'_>,
    mock: &MockProvider,
) -> anyhow::Result<(String, String)> {
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let (project_path, key) = project_with_traffic(ada, mock).await?;
    let prices = format!("{project_path}/prices");
    let big = [("model", "mock-big"), ("input", "0.37"), ("output", "3.1"), ("max_output_tokens", "100")];
    anyhow::ensure!(ada.submit(&prices, &prices, &big).await?.status == StatusCode::SEE_OTHER);
    let settings = format!("{project_path}/settings");
    let shown = ada.get(&settings).await?;
    let keep = |name: &str| field_value(&shown.body, name).unwrap_or_default();
    let (min, budget, margin) = (keep("min_output_tokens"), keep("default_budget"), keep("estimate_margin"));
    let fields = [
        ("name", "Chat"),
        ("policy", "reject"),
        ("min_output_tokens", min.as_str()),
        ("markup", "25"),
        ("default_budget", budget.as_str()),
        ("default_period", "month"),
        ("default_customer", ""),
        ("estimate_margin", margin.as_str()),
    ];
    let saved = ada.submit(&settings, &settings, &fields).await?;
    anyhow::ensure!(saved.status == StatusCode::SEE_OTHER, "settings: {}", saved.body);
    let customers = format!("{project_path}/customers");
    for (id, email) in [("alpha", "alpha@example.com"), ("beta", "beta@example.com")] {
        let form = [("external_id", id), ("name", id), ("email", email), ("budget", "10"), ("period", "month")];
        let created = ada.submit(&customers, &customers, &form).await?;
        anyhow::ensure!(created.status == StatusCode::SEE_OTHER, "customer: {}", created.body);
    }
    let call = |customer: &'static str, model: &'static str| {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-tollgate-customer", customer)
            .json(
                &serde_json::json!({"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
    };
    for (customer, model) in
        [("alpha", "mock-model"), ("alpha", "mock-model"), ("alpha", "mock-big"), ("beta", "mock-model")]
    {
        let response = call(customer, model).await?;
        anyhow::ensure!(response.status() == StatusCode::OK, "{customer} {model}: {}", response.text().await?);
    }
    // A customer seen for the first time gets the default budget, 0: refused.
    anyhow::ensure!(call("broke", "mock-model").await?.status() == StatusCode::PAYMENT_REQUIRED);
    let id = project_path.trim_start_matches("/projects/").to_owned();
    Ok((project_path, id))
}

async fn cost_billed_and_margin_add_up_to_the_usage_events(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let mock = MockProvider::start().await?;
    let ada = Browser::new(&app)?;
    let (project_path, project) = project_with_two_customers(&app, &ada, &mock).await?;
    let (from, to) = (UnixMillis::now().0 - 40 * DAY_MS, UnixMillis::now().0 + DAY_MS);
    let all = sums(&app, &project, None, from, to).await?;
    assert_eq!((all.settled, all.refused), (4, 1), "{all:?}");
    assert!(all.cost > 0 && all.billed > all.cost, "a markup: {all:?}");

    // The page: project totals equal the events' sums; margin is billed minus cost.
    let page = ada.get(&format!("{project_path}/analytics")).await?;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert_eq!(exact_amount(&page.body, "total-cost"), Some(Nanos(all.cost)), "{}", page.body);
    assert_eq!(exact_amount(&page.body, "total-billed"), Some(Nanos(all.billed)));
    assert_eq!(exact_amount(&page.body, "total-margin"), Some(Nanos(all.billed - all.cost)));
    assert_eq!(count_in(&page.body, "total-calls"), Some(4));
    assert_eq!(count_in(&page.body, "total-refused"), Some(1));
    assert!(page.body.contains("id=\"by-customer\"") && page.body.contains("id=\"by-model\""), "{}", page.body);
    assert!(page.body.contains(">mock-big<") && page.body.contains(">alpha<"), "{}", page.body);
    assert!(!page.body.contains("style="), "the CSP blocks inline styles");
    assert!(page.body.contains("<svg class=\"chart\""));

    // The overview counts calls the same way and shows the same money.
    let overview = ada.get(&project_path).await?;
    assert_eq!(count_in(&overview.body, "settled-calls"), Some(4), "{}", overview.body);
    assert_eq!(count_in(&overview.body, "refused-calls"), Some(1));
    assert_eq!(exact_amount(&overview.body, "billed"), Some(Nanos(all.billed)));
    assert_eq!(exact_amount(&overview.body, "margin"), Some(Nanos(all.billed - all.cost)));

    // Per customer: the CSV's cost, billed and margin equal each customer's events.
    let rows = csv(&app, &ada, &format!("{project_path}/analytics.csv?by=customer")).await?;
    assert_eq!(rows.len(), 3, "alpha, beta and the refused newcomer: {rows:?}");
    for customer in ["alpha", "beta", "broke"] {
        let row = rows.iter().find(|r| r["customer"] == customer).cloned().unwrap_or_default();
        let expected = sums(&app, &project, Some(customer), from, to).await?;
        assert_eq!(
            (nanos(&row, "provider_cost"), nanos(&row, "billed"), nanos(&row, "margin")),
            (Nanos(expected.cost), Nanos(expected.billed), Nanos(expected.billed - expected.cost)),
            "{customer}: {row:?}"
        );
        assert_eq!(row["calls"], expected.settled.to_string(), "{row:?}");
        assert_eq!(row["refused"], expected.refused.to_string(), "{row:?}");
        assert_eq!(row["currency"], "USD");
    }
    // Per model: the sums add up to the project's, and mock-big's cost is its price (10 input
    // tokens at 0.37 and 20 output tokens at 3.1 per million).
    let models = csv(&app, &ada, &format!("{project_path}/analytics.csv?by=model")).await?;
    let total = |rows: &[std::collections::HashMap<String, String>], field: &str| {
        rows.iter().map(|r| nanos(r, field).0).sum::<i64>()
    };
    assert_eq!((total(&models, "provider_cost"), total(&models, "billed")), (all.cost, all.billed), "{models:?}");
    let big = models.iter().find(|r| r["model"] == "mock-big").cloned().unwrap_or_default();
    assert_eq!(nanos(&big, "provider_cost"), Nanos(10 * 370 + 20 * 3_100), "{big:?}");
    assert_eq!(nanos(&big, "billed"), Nanos((10 * 370 + 20 * 3_100) * 5 / 4), "{big:?}");
    // Per day: every day of the default range (30), ISO dates, the same sums.
    let days = csv(&app, &ada, &format!("{project_path}/analytics.csv?by=day")).await?;
    assert_eq!(days.len(), 30, "{days:?}");
    for row in &days {
        let date = &row["date"];
        let b = date.as_bytes();
        assert!(date.len() == 10 && b[4] == b'-' && b[7] == b'-', "an ISO date: {date}");
    }
    let today = tollgate::routes::dashboard::format::date(UnixMillis::now().0);
    assert_eq!(days.last().map(|r| r["date"].clone()), Some(today));
    assert_eq!((total(&days, "provider_cost"), total(&days, "billed")), (all.cost, all.billed));

    // Another organization sees neither the page nor the export.
    let eve = Browser::new(&app)?;
    eve.sign_up("Evil", "eve@example.com", PASSWORD).await?;
    assert_eq!(eve.get(&format!("{project_path}/analytics")).await?.status, StatusCode::NOT_FOUND);
    assert_eq!(eve.get(&format!("{project_path}/analytics.csv?by=customer")).await?.status, StatusCode::NOT_FOUND);
    app.stop().await
}

async fn the_date_range_bounds_every_figure_and_bad_dates_get_a_message(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let mock = MockProvider::start().await?;
    let ada = Browser::new(&app)?;
    let (project_path, project) = project_with_two_customers(&app, &ada, &mock).await?;
    // beta's call moves 40 days back: out of the default range (the last 30 days).
    let moved = with_db!(&app.state.db, pool => sqlx::query(
        "UPDATE usage_events SET created_at = created_at - $1 WHERE project_id = $2 \
         AND customer_id = (SELECT id FROM customers WHERE external_id = 'beta' AND project_id = $2)")
        .bind(40 * DAY_MS).bind(&project).execute(pool).await.map(|done| done.rows_affected()))?;
    assert_eq!(moved, 1);
    let now = UnixMillis::now().0;
    let today_start = now - now.rem_euclid(DAY_MS);
    let recent = sums(&app, &project, None, today_start - 29 * DAY_MS, today_start + DAY_MS).await?;
    let beta = sums(&app, &project, Some("beta"), 0, now + DAY_MS).await?;
    assert!(beta.billed > 0 && recent.settled == 3, "{recent:?} {beta:?}");

    let page = ada.get(&format!("{project_path}/analytics")).await?;
    assert_eq!(exact_amount(&page.body, "total-billed"), Some(Nanos(recent.billed)), "{}", page.body);
    assert_eq!(exact_amount(&page.body, "total-cost"), Some(Nanos(recent.cost)));
    assert!(!page.body.contains(">beta<"), "beta called before the range: {}", page.body);
    let overview = ada.get(&project_path).await?;
    assert_eq!(exact_amount(&overview.body, "billed"), Some(Nanos(recent.billed)), "{}", overview.body);

    // A range of that one day (a shareable URL) shows beta's call only.
    let day = tollgate::routes::dashboard::format::date(now - 40 * DAY_MS);
    let then = ada.get(&format!("{project_path}/analytics?from={day}&to={day}")).await?;
    assert_eq!(then.status, StatusCode::OK);
    assert_eq!(exact_amount(&then.body, "total-billed"), Some(Nanos(beta.billed)), "{}", then.body);
    assert_eq!(count_in(&then.body, "total-calls"), Some(1));
    assert!(then.body.contains(">beta<") && then.body.contains(&format!("value=\"{day}\"")), "{}", then.body);
    let rows = csv(&app, &ada, &format!("{project_path}/analytics.csv?by=day&from={day}&to={day}")).await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0]["date"].clone(), nanos(&rows[0], "billed")), (day.clone(), Nanos(beta.billed)));

    // The Calls tab takes the same range; a request id is found whenever it was made.
    let beta_request: String = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT request_id FROM usage_events WHERE project_id = $1 \
         AND customer_id = (SELECT id FROM customers WHERE external_id = 'beta' AND project_id = $1)")
        .bind(&project).fetch_one(pool).await)?;
    let shows_beta = |body: &str| body.contains(&format!("data-request-id=\"{beta_request}\""));
    let calls = ada.get(&format!("{project_path}/calls")).await?;
    assert_eq!(calls.status, StatusCode::OK);
    assert!(!shows_beta(&calls.body) && calls.body.contains("id=\"date-range\""), "{}", calls.body);
    let calls_then = ada.get(&format!("{project_path}/calls?from={day}&to={day}")).await?;
    assert!(shows_beta(&calls_then.body), "{}", calls_then.body);
    assert_eq!(calls_then.body.matches("<tr class=\"call ").count(), 1, "{}", calls_then.body);
    let found = ada.get(&format!("{project_path}/calls?request_id={beta_request}")).await?;
    assert!(shows_beta(&found.body), "{}", found.body);
    let bad_calls = ada.get(&format!("{project_path}/calls?from=2026-02-30")).await?;
    assert_eq!(bad_calls.status, StatusCode::BAD_REQUEST);
    assert!(bad_calls.body.contains("From: must be a date"), "{}", bad_calls.body);

    // Bad dates: a message on the page (the default range shown), never a 500.
    for (query, message) in [
        ("from=2026-02-30", "From: must be a date"),
        ("from=yesterday&to=today", "From: must be a date"),
        ("from=2026-12-07&to=2026-12-01", "From: must be on or before To"),
        ("from=2020-01-01&to=2026-01-01", "at most 366 days"),
        ("from=2026-01-01&from=2026-01-02", "could not be read"),
    ] {
        for path in [format!("{project_path}/analytics?{query}"), format!("{project_path}?{query}")] {
            let bad = ada.get(&path).await?;
            assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{path}: {}", bad.body);
            assert!(bad.body.contains(message) && bad.body.contains("class=\"errors\""), "{path}: {}", bad.body);
        }
        let export = ada.get(&format!("{project_path}/analytics.csv?by=day&{query}")).await?;
        assert_eq!(export.status, StatusCode::BAD_REQUEST, "{query}");
        assert!(export.body.contains(message), "{query}: {}", export.body);
    }
    let by = ada.get(&format!("{project_path}/analytics.csv?by=week")).await?;
    assert_eq!(by.status, StatusCode::BAD_REQUEST);
    assert!(by.body.contains("By: must be day, model or customer"), "{}", by.body);
    app.stop().await
}

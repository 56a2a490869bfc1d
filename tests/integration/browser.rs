//! The dashboard end to end in a real headless Chromium, over WebDriver: a new user signs
//! up, sets a project up through its pages (provider, price, policy, key, customer), an app
//! spends the customer's budget through the proxy until a call is refused, and the
//! customer's page shows the spend, what remains, and the refused call. And a newcomer's
//! first run, from sign-up to the analytics CSV, then a walk of every page at 1280 and 390 px
//! wide that fails on a sideways scroll and keeps a screenshot of each page under
//! `target/browser-walk/<width>/<page>.png`.
//!
//! On failure the test saves a screenshot and the page's HTML under
//! `target/browser-failures/<test>-<database>/` and names both in its error.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, ensure};
use futures::FutureExt;
use reqwest::StatusCode;
use serde_json::json;

use crate::db_cases;
use crate::helpers::{DbCase, TestApp, TestDatabase, TestResult, spawn_app, spawn_app_with};
use crate::mock_provider::MockProvider;
use crate::webdriver::Browser;

pub fn cases() -> Vec<DbCase> {
    db_cases![
        a_customer_spends_their_budget_and_the_dashboard_shows_the_refusal,
        a_newcomers_first_run_at_1280_and_390_px,
    ]
}

/// Within the harness's 120 s per test, so that a hung step still leaves a screenshot.
const STEPS_TIMEOUT: Duration = Duration::from_secs(90);

const PASSWORD: &str = "correct horse battery";
const CUSTOMER: &str = "cust-42";

/// Where a failed browser test leaves its screenshot and HTML: `target/browser-failures/<name>`.
fn failure_dir(name: &str) -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(&tmp).join("browser-failures").join(name)
}

/// Where the walk leaves a screenshot of each page at each width, kept whatever the outcome:
/// `target/browser-walk/<width>/<page>.png`.
fn walk_dir(width: u32) -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(&tmp).join("browser-walk").join(width.to_string())
}

/// Runs `steps` in `browser`; if they fail (error, panic or timeout), saves the page the
/// browser is on and adds where to the error.
async fn recorded(browser: &Browser, name: &str, steps: impl Future<Output = TestResult>) -> TestResult {
    let dir = failure_dir(name);
    // What an earlier failed run left would be mistaken for this run's.
    let _ = std::fs::remove_dir_all(&dir);
    let outcome = AssertUnwindSafe(tokio::time::timeout(STEPS_TIMEOUT, steps)).catch_unwind().await;
    let error = match outcome {
        Ok(Ok(Ok(()))) => return Ok(()),
        Ok(Ok(Err(error))) => error,
        Ok(Err(_)) => anyhow!("the browser steps did not finish within {STEPS_TIMEOUT:?}"),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            anyhow!("panicked: {message}")
        }
    };
    let saved = browser.save_page(&dir).await;
    Err(error.context(format!("browser test failed; the page it was on:\n{saved}")))
}

async fn a_customer_spends_their_budget_and_the_dashboard_shows_the_refusal(db: TestDatabase) -> TestResult {
    let name = format!("a_customer_spends_their_budget-{:?}", db.backend).to_lowercase();
    let app = spawn_app(&db).await?;
    let mock = MockProvider::start().await?;
    let browser = Browser::launch().await?;
    let result = recorded(&browser, &name, steps(&browser, &app, &mock)).await;
    let quit = browser.quit().await;
    result?;
    quit?;
    app.stop().await
}

async fn steps(browser: &Browser, app: &TestApp, mock: &MockProvider) -> TestResult {
    // Sign up: the organization's projects, empty.
    browser.goto(&app.url("/signup")).await?;
    browser
        .fill_and_submit(
            "form[action='/signup']",
            &[("org_name", "Acme"), ("email", "ada@example.com"), ("password", PASSWORD)],
        )
        .await?;
    browser.wait_for_url("/projects", |url| url.ends_with("/projects")).await?;
    browser.wait_for_text(".who .email", "ada@example.com (owner)").await?;
    browser.wait_for_text("main", "No project yet").await?;

    // A project: its overview.
    browser.fill_and_submit("form[action='/projects']", &[("name", "Chatbot"), ("default_budget", "0")]).await?;
    let project_url = browser.wait_for_url("a project's page", |url| url.contains("/projects/prj_")).await?;
    browser.wait_for_text("main h1", "Chatbot").await?;
    let project = project_url.rsplit('/').next().unwrap_or_default().to_owned();
    let tab = |name: &str| format!("nav.tabs a[href='/projects/{project}/{name}']");
    // The customers page also has a search form (GET) to the same address.
    let form = |name: &str| format!("form[method='post'][action='/projects/{project}/{name}']");

    // A connection to the mock provider.
    browser.wait_for(&tab("providers")).await?.click().await?;
    browser.wait_for_text("main h1", "Provider connections").await?;
    browser.wait_for("#kind option[value='openai_compatible']").await?.click().await?;
    browser
        .fill_and_submit(
            &form("providers"),
            &[("name", "mock"), ("base_url", &mock.base_url()), ("api_key", "sk-mock-upstream"), ("models", "mock-*")],
        )
        .await?;
    browser.wait_for_text("main table tbody", &mock.base_url()).await?;
    browser.wait_for_text("main table tbody", "openai_compatible").await?;

    // A price for the mock model: 0.001 an output token, so a 100-token call costs 0.10.
    browser.wait_for(&tab("prices")).await?.click().await?;
    browser.wait_for_text("main h1", "Prices").await?;
    browser
        .fill_and_submit(
            &form("prices"),
            &[("model", "mock-model"), ("input", "0"), ("output", "1000"), ("max_output_tokens", "100")],
        )
        .await?;
    browser.wait_for_text("main table tbody", "mock-model").await?;

    // Reject rather than clamp: a call the budget cannot fully pay is refused.
    browser.wait_for(&tab("settings")).await?.click().await?;
    browser.wait_for_text("main h1", "Settings").await?;
    browser.wait_for("input[name='policy'][value='reject']").await?.click().await?;
    browser.wait_for(&format!("{} [type='submit']", form("settings"))).await?.click().await?;
    browser.wait_for_text(".notice", "Settings saved.").await?;
    let reject = browser.wait_for("input[name='policy'][value='reject']").await?;
    ensure!(reject.is_selected().await?, "the saved settings do not show the reject policy");

    // A secret key, shown once.
    browser.wait_for(&tab("keys")).await?.click().await?;
    browser.wait_for_text("main h1", "Keys").await?;
    browser.fill_and_submit(&form("keys"), &[("name", "browser test")]).await?;
    let key = browser.wait_for("#new-key").await?.text().await?.trim().to_owned();
    ensure!(key.starts_with("tg_"), "not a key: {key:?}");

    // A customer with a budget for two and a half calls; their page, nothing spent.
    browser.wait_for(&tab("customers")).await?.click().await?;
    browser.wait_for_text("main h1", "Customers").await?;
    browser.wait_for(&format!("{} #period option[value='month']", form("customers"))).await?.click().await?;
    browser
        .fill_and_submit(
            &form("customers"),
            &[("external_id", CUSTOMER), ("name", "Grace"), ("email", "grace@example.com"), ("budget", "0.25")],
        )
        .await?;
    let customer_url = browser.wait_for_url("the customer's page", |url| url.contains("/customers/cus_")).await?;
    browser.wait_for_text("main h1", CUSTOMER).await?;
    browser.wait_for_text("#spent", "0.00 USD").await?;
    browser.wait_for_text("#remaining", "0.25 USD").await?;
    browser.wait_for_text("main", "No call yet.").await?;

    // The app calls the proxy for this customer until a call is refused: two calls of 0.10
    // fit in 0.25, the third does not.
    let mut statuses = Vec::new();
    while statuses.len() < 10 && statuses.last() != Some(&StatusCode::PAYMENT_REQUIRED) {
        let response = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("X-Tollgate-Customer", CUSTOMER)
            .json(&json!({"model": "mock-model", "max_tokens": 100,
                "messages": [{"role": "user", "content": "Hello!"}]}))
            .send()
            .await?;
        statuses.push(response.status());
        let body = response.text().await?;
        if statuses.last() == Some(&StatusCode::PAYMENT_REQUIRED) {
            ensure!(body.contains("customer_budget_exceeded"), "refused for another reason: {body}");
        }
    }
    ensure!(statuses == [StatusCode::OK, StatusCode::OK, StatusCode::PAYMENT_REQUIRED], "statuses: {statuses:?}");
    ensure!(mock.requests().len() == 2, "the provider saw {} calls, not 2", mock.requests().len());

    // The customer's page: spent, what remains, and the refused call among the settled ones.
    browser.refresh().await?;
    ensure!(browser.current_url().await? == customer_url, "the refresh left the customer's page");
    browser.wait_for_text("#spent", "0.20 USD").await?;
    browser.wait_for_text("#remaining", "0.05 USD").await?;
    let refused = browser.wait_for_text("tr.call.refused", "insufficient budget").await?;
    let refused_text = refused.text().await?;
    ensure!(refused_text.contains("refused") && refused_text.contains("mock-model"), "{refused_text:?}");
    let refused_rows = browser.find_all("tr.call.refused .badge.refused").await?;
    let settled_rows = browser.find_all("tr.call.settled").await?;
    ensure!(
        (refused_rows.len(), settled_rows.len()) == (1, 2),
        "{} refused and {} settled calls shown",
        refused_rows.len(),
        settled_rows.len()
    );
    for row in &settled_rows {
        let text = row.text().await?;
        ensure!(text.contains("0.10 USD") && text.contains("/ 100"), "a settled call shows {text:?}");
    }

    // The page as a failure would save it: a PNG and the HTML, for the last check.
    let saved = tempfile::tempdir()?;
    let report = browser.save_page(saved.path()).await;
    let png = std::fs::read(saved.path().join("screenshot.png")).map_err(|e| anyhow!("{e}: {report}"))?;
    ensure!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the screenshot is no PNG: {report}");
    let html = std::fs::read_to_string(saved.path().join("page.html"))?;
    ensure!(html.contains("insufficient budget") && html.contains(CUSTOMER), "the saved HTML lacks the page");
    Ok(())
}

/// A newcomer's first run, in headless Chromium: sign up, a project in a currency with a
/// default budget, a provider connection to the mock that passes its Test, a key and the curl
/// snippet shown with it run as written; customers driven through the proxy to near limit,
/// exhausted (clamp leaving dust) and blocked (through the confirmation page), shown and
/// filtered on the customers page; analytics equal to the usage events' sums and its CSV. Then
/// every page, at 1280 and at 390 px wide, without a sideways scroll, each one screenshotted
/// under `target/browser-walk/<width>/`.
async fn a_newcomers_first_run_at_1280_and_390_px(db: TestDatabase) -> TestResult {
    let name = format!("a_newcomers_first_run-{:?}", db.backend).to_lowercase();
    // The public URL is where this Tollgate listens, so the snippet reaches it as written.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_LISTEN".into(), format!("127.0.0.1:{port}"));
        env.insert("TOLLGATE_PUBLIC_URL".into(), format!("http://127.0.0.1:{port}"));
    })
    .await?;
    let mock = MockProvider::start().await?;
    let browser = Browser::launch().await?;
    let result = recorded(&browser, &name, first_run_steps(&browser, &app, &mock)).await;
    let quit = browser.quit().await;
    result?;
    quit?;
    app.stop().await
}

/// The pages of the walk: (name, path).
fn walk_pages(project: &str, customer: &str) -> Vec<(&'static str, String)> {
    let p = format!("/projects/{project}");
    vec![
        ("projects", "/projects".to_owned()),
        ("overview", p.clone()),
        ("customers", format!("{p}/customers")),
        ("customer", format!("{p}/customers/{customer}")),
        ("calls", format!("{p}/calls")),
        ("keys", format!("{p}/keys")),
        ("providers", format!("{p}/providers")),
        ("prices", format!("{p}/prices")),
        ("alerts", format!("{p}/alerts")),
        ("billing", format!("{p}/billing")),
        ("settings", format!("{p}/settings")),
        ("analytics", format!("{p}/analytics")),
        ("api", format!("{p}/api")),
        ("confirm-delete", format!("{p}/delete")),
        ("members", "/members".to_owned()),
        ("account", "/account".to_owned()),
        ("not-found", "/no-such-page".to_owned()),
    ]
}

/// A chat call through the proxy for `customer`, asking for `max_tokens` (the mock answers
/// with that many output tokens).
async fn proxy_call(app: &TestApp, key: &str, customer: &str, max_tokens: i64) -> anyhow::Result<reqwest::Response> {
    Ok(app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("X-Tollgate-Customer", customer)
        .json(&json!({"model": "mock-model", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Hello!"}]}))
        .send()
        .await?)
}

/// (customer, status) of each row of the customers page the browser is on.
async fn customer_rows(browser: &Browser) -> anyhow::Result<Vec<(String, String)>> {
    let rows = browser
        .execute(
            "return [...document.querySelectorAll('tr.customer[data-customer]')]\
             .map(r => [r.dataset.customer, r.dataset.status, r.textContent])",
        )
        .await?;
    let rows: Vec<(String, String, String)> = serde_json::from_value(rows)?;
    for (customer, status, text) in &rows {
        // The badge shows the status in words (near_limit: "near limit").
        ensure!(text.contains(&status.replace('_', " ")), "{customer}'s row does not show {status}: {text:?}");
    }
    Ok(rows.into_iter().map(|(c, s, _)| (c, s)).collect())
}

/// The exact amount (the tooltip of its money) of the element `id`, in nanos.
async fn exact_amount(browser: &Browser, id: &str) -> anyhow::Result<tollgate_core::money::Nanos> {
    let title = browser.execute(&format!("return document.querySelector('#{id} .money').title")).await?;
    let title = title.as_str().unwrap_or_default();
    let amount = title.strip_suffix(" USD").ok_or_else(|| anyhow!("#{id}: not an amount in USD: {title:?}"))?;
    amount.parse().map_err(|e| anyhow!("#{id}: {title:?}: {e:?}"))
}

async fn first_run_steps(browser: &Browser, app: &TestApp, mock: &MockProvider) -> TestResult {
    browser.set_window_size(1280, 900).await?;
    // Sign up, and a project in USD whose new customers may spend 0.10 a month.
    browser.goto(&app.url("/signup")).await?;
    browser
        .fill_and_submit(
            "form[action='/signup']",
            &[("org_name", "Acme"), ("email", "ada@example.com"), ("password", PASSWORD)],
        )
        .await?;
    browser.wait_for_url("/projects", |url| url.ends_with("/projects")).await?;
    browser.wait_for("#currency option[value='usd']").await?.click().await?;
    browser.fill_and_submit("form[action='/projects']", &[("name", "Chatbot"), ("default_budget", "0.10")]).await?;
    let project_url = browser.wait_for_url("a project's page", |url| url.contains("/projects/prj_")).await?;
    browser.wait_for_text("main h1", "Chatbot").await?;
    browser.wait_for("#first-run").await?;
    let project = project_url.rsplit('/').next().unwrap_or_default().to_owned();
    let path = |name: &str| app.url(&format!("/projects/{project}/{name}"));
    let form = |name: &str| format!("form[method='post'][action='/projects/{project}/{name}']");

    // A connection to the mock, and its Test passes.
    browser.goto(&path("providers")).await?;
    browser.wait_for("#kind option[value='openai_compatible']").await?.click().await?;
    browser
        .fill_and_submit(
            &form("providers"),
            &[("name", "mock"), ("base_url", &mock.base_url()), ("api_key", "sk-mock-upstream"), ("models", "mock-*")],
        )
        .await?;
    browser.wait_for_text("main table tbody", &mock.base_url()).await?;
    browser.wait_for_text("tr.test-row", "not tested").await?;
    browser.wait_for("tr.test-row form[action$='/test'] button[type='submit']").await?.click().await?;
    browser.wait_for_text("tr.test-row", "test passed").await?;

    // A price: 0.001 an output token, input free.
    browser.goto(&path("prices")).await?;
    browser
        .fill_and_submit(
            &form("prices"),
            &[("model", "mock-model"), ("input", "0"), ("output", "1000"), ("max_output_tokens", "100")],
        )
        .await?;
    browser.wait_for_text("main table tbody", "mock-model").await?;

    // Clamp, down to a single token, with estimates at the asked maximum.
    browser.goto(&path("settings")).await?;
    browser.wait_for("input[name='policy'][value='clamp']").await?.click().await?;
    browser.fill_and_submit(&form("settings"), &[("min_output_tokens", "1"), ("estimate_margin", "0")]).await?;
    browser.wait_for_text(".notice", "Settings saved.").await?;

    // A key, and the curl snippet shown with it, run as written.
    browser.goto(&path("keys")).await?;
    browser.fill_and_submit(&form("keys"), &[("name", "first run")]).await?;
    let key = browser.wait_for("#new-key").await?.text().await?.trim().to_owned();
    ensure!(key.starts_with("tg_"), "not a key: {key:?}");
    browser.wait_for("#snippet-curl").await?;
    let curl = browser.execute("return document.getElementById('snippet-curl').textContent").await?;
    let curl = curl.as_str().unwrap_or_default().to_owned();
    ensure!(curl.starts_with("curl ") && curl.contains(&key), "the snippet: {curl}");
    let answer = crate::first_run::run_curl(&app.client, &curl).await?;
    let status = answer.status();
    let body: serde_json::Value = answer.json().await?;
    ensure!(status == StatusCode::OK, "the snippet was answered {status}: {body}");
    ensure!(body["choices"][0]["message"]["content"].is_string(), "{body}");
    ensure!(mock.requests().len() == 1, "the provider saw {} calls, not the snippet's", mock.requests().len());

    // Customers through the proxy: ok (10 %), near limit (85 %), soon blocked (10 %).
    for (customer, tokens) in [("ok-cust", 10), ("near-cust", 85), ("blocked-cust", 10)] {
        let response = proxy_call(app, &key, customer, tokens).await?;
        ensure!(response.status() == StatusCode::OK, "{customer}: {}", response.text().await?);
    }
    // Exhausted: a budget of 10.5 tokens; a call for 20 is clamped to 10, leaving dust.
    browser.goto(&path("customers")).await?;
    browser
        .fill_and_submit(
            &form("customers"),
            &[("external_id", "dust-cust"), ("name", "Dusty"), ("email", "dust@example.com"), ("budget", "0.0105")],
        )
        .await?;
    browser.wait_for_url("the customer's page", |url| url.contains("/customers/cus_")).await?;
    let dust_url = browser.current_url().await?;
    let dust_id = dust_url.rsplit('/').next().unwrap_or_default().to_owned();
    let clamped = proxy_call(app, &key, "dust-cust", 20).await?;
    ensure!(clamped.status() == StatusCode::OK, "dust-cust: {}", clamped.status());
    let header = clamped.headers().get("x-tollgate-max-output-clamped").cloned();
    ensure!(header.as_ref().and_then(|h| h.to_str().ok()) == Some("10"), "clamped to {header:?}");
    browser.refresh().await?;
    browser.wait_for_text("#health", "exhausted").await?;

    // Blocked, through the confirmation page.
    browser.goto(&format!("{}?q=blocked-cust", path("customers"))).await?;
    browser.wait_for("tr.customer[data-customer='blocked-cust'] a").await?.click().await?;
    browser.wait_for_url("blocked-cust's page", |url| url.contains("/customers/cus_")).await?;
    browser.wait_for_text("main h1", "blocked-cust").await?;
    browser.wait_for("a.button.danger[href$='/block']").await?.click().await?;
    browser.wait_for_url("the block confirmation", |url| url.ends_with("/block")).await?;
    browser.wait_for("#confirm-form button[type='submit']").await?.click().await?;
    browser.wait_for_text("main", "Unblock this customer").await?;

    // The customers page shows each status, and its filter shows exactly the customers of one.
    browser.goto(&path("customers")).await?;
    browser.wait_for("tr.customer").await?;
    let all: std::collections::BTreeMap<String, String> = customer_rows(browser).await?.into_iter().collect();
    for (customer, status) in
        [("ok-cust", "ok"), ("near-cust", "near_limit"), ("dust-cust", "exhausted"), ("blocked-cust", "blocked")]
    {
        ensure!(all.get(customer).map(String::as_str) == Some(status), "{customer} is not {status}: {all:?}");
    }
    for status in ["ok", "near_limit", "exhausted", "blocked"] {
        browser.goto(&format!("{}?status={status}", path("customers"))).await?;
        browser.wait_for("main h1").await?;
        let mut shown: Vec<String> = customer_rows(browser).await?.into_iter().map(|(c, _)| c).collect();
        shown.sort();
        let mut expected: Vec<String> = all.iter().filter(|(_, s)| *s == status).map(|(c, _)| c.clone()).collect();
        expected.sort();
        ensure!(shown == expected, "?status={status} shows {shown:?}, not {expected:?}");
    }

    // Analytics: billed, cost and margin are the usage events' sums.
    let (cost, billed): (i64, i64) = tollgate_core::with_db!(&app.state.db, pool => sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT), CAST(COALESCE(SUM(billed_nanos), 0) AS BIGINT) \
         FROM usage_events WHERE project_id = $1").bind(&project).fetch_one(pool).await)?;
    ensure!(cost > 0 && billed > 0, "no spend recorded: cost {cost}, billed {billed}");
    browser.goto(&path("analytics")).await?;
    browser.wait_for("#total-billed").await?;
    let shown = (
        exact_amount(browser, "total-cost").await?.0,
        exact_amount(browser, "total-billed").await?.0,
        exact_amount(browser, "total-margin").await?.0,
    );
    ensure!(shown == (cost, billed, billed - cost), "analytics shows {shown:?}, the events sum to ({cost}, {billed})");

    // Its CSV, with the browser's session: ISO dates, and the same sums.
    let cookies = browser.cookie_header().await?;
    for by in ["day", "customer", "model"] {
        let response = app
            .client
            .get(path(&format!("analytics.csv?by={by}")))
            .header(reqwest::header::COOKIE, &cookies)
            .send()
            .await?;
        ensure!(response.status() == StatusCode::OK, "analytics.csv?by={by}: {}", response.status());
        let text = response.text().await?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
        let rows: Vec<std::collections::HashMap<&str, &str>> =
            lines.map(|line| header.iter().copied().zip(line.split(',')).collect()).collect();
        ensure!(!rows.is_empty(), "analytics.csv?by={by} has no row: {text}");
        // Amounts in decimal money, exact to the nano.
        let total = |field: &str| {
            rows.iter()
                .map(|r| {
                    r.get(field).and_then(|v| v.parse::<tollgate_core::money::Nanos>().ok()).map_or(i64::MIN, |n| n.0)
                })
                .fold(0i64, i64::saturating_add)
        };
        ensure!((total("provider_cost"), total("billed")) == (cost, billed), "analytics.csv?by={by}: {text}");
        if by == "day" {
            for row in &rows {
                let date = row.get("date").copied().unwrap_or_default();
                let iso = date.len() == 10
                    && date.char_indices().all(|(i, c)| if i == 4 || i == 7 { c == '-' } else { c.is_ascii_digit() });
                ensure!(iso, "not an ISO date: {date:?} in {text}");
            }
        }
    }

    // Every page at both widths: no sideways scroll, and a screenshot of each.
    let mut overflowing = Vec::new();
    for (width, height) in [(1280, 900), (390, 844)] {
        // Not emptied first: the SQLite and the PostgreSQL runs write the same files at once.
        let dir = walk_dir(width);
        for (page, page_path) in walk_pages(&project, &dust_id) {
            browser.set_window_size(width, height).await?;
            browser.goto(&app.url(&page_path)).await?;
            browser.wait_for("main").await?;
            let inner = browser.execute("return window.innerWidth").await?.as_u64().unwrap_or(0);
            ensure!(inner == u64::from(width), "{page}: the viewport is {inner} px wide, not {width}");
            let scroll = browser.execute("return document.documentElement.scrollWidth").await?.as_u64().unwrap_or(0);
            if scroll > inner {
                // What sticks out: the outermost elements whose right edge passes the viewport.
                let culprits = browser
                    .execute(
                        "const w = window.innerWidth; return [...document.querySelectorAll('body *')]\
                         .filter(e => e.getBoundingClientRect().right > w + 0.5)\
                         .filter(e => ['absolute', 'fixed'].includes(getComputedStyle(e).position) \
                           || !(e.parentElement && e.parentElement.getBoundingClientRect().right > w + 0.5))\
                         .slice(0, 5).map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') \
                         + (e.className && typeof e.className === 'string' ? '.' + e.className.split(' ').join('.') : '') \
                         + ' ' + Math.round(e.getBoundingClientRect().right))",
                    )
                    .await?;
                overflowing.push(format!("{page} at {width} px: {scroll} px wide, past the edge: {culprits}"));
            }
            browser.save_screenshot(&dir.join(format!("{page}.png"))).await?;
        }
    }
    browser.set_window_size(1280, 900).await?;
    ensure!(overflowing.is_empty(), "pages that scroll sideways: {overflowing:?}");
    Ok(())
}

//! The dashboard end to end in a real headless Chromium, over WebDriver: a new user signs
//! up, sets a project up through its pages (provider, price, policy, key, customer), an app
//! spends the customer's budget through the proxy until a call is refused, and the
//! customer's page shows the spend, what remains, and the refused call.
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
use crate::helpers::{DbCase, TestApp, TestDatabase, TestResult, spawn_app};
use crate::mock_provider::MockProvider;
use crate::webdriver::Browser;

pub fn cases() -> Vec<DbCase> {
    db_cases![a_customer_spends_their_budget_and_the_dashboard_shows_the_refusal]
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

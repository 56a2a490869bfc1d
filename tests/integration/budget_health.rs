//! Budget health end to end: customers driven through the proxy (against the mock provider)
//! to ok, near limit, exhausted (the `clamp` policy leaving dust), blocked and payment failed;
//! the customers page shows each status and filters on it; the 100 % alert fires for the
//! customer exhausted under clamp; a clamped call is marked and found by its request id.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::alerts::{self, AlertSettingsInput};
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::projects::{self, BudgetPolicy};
use tollgate_core::with_db;

use crate::dashboard::{Browser, PASSWORD};
use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult, eventually};
use crate::proxy::{OUTPUT_NANOS_PER_TOKEN, Setup, setup, setup_with};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        the_customers_page_shows_each_status_and_filters_on_it,
        the_100_percent_alert_fires_for_a_customer_exhausted_under_clamp,
        a_clamped_call_is_marked_and_found_by_its_request_id,
    ]
}

/// A chat call of `customer` asking for `max_tokens` (the mock answers with that many output
/// tokens, and input is free: the call costs its output), with the request id `request_id`.
async fn call(s: &Setup, customer: &str, max_tokens: i64, request_id: &str) -> anyhow::Result<reqwest::Response> {
    let body =
        json!({"model": "mock-model", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hi"}]});
    Ok(s.app
        .client
        .post(s.app.url("/v1/chat/completions"))
        .bearer_auth(&s.key)
        .header("x-tollgate-customer", customer)
        .header("x-request-id", request_id)
        .json(&body)
        .send()
        .await?)
}

/// A budget of `nanos` a month for `customer`.
async fn budget_nanos(s: &Setup, customer: &str, nanos: i64) -> anyhow::Result<()> {
    projects::upsert_customer_budget(&s.app.state.db, &s.project.id, customer, Nanos(nanos), BudgetPeriod::Month)
        .await?;
    Ok(())
}

/// Customers in each state, through the proxy (the cheapest call of the project costs one
/// output token: [`OUTPUT_NANOS_PER_TOKEN`]).
async fn customers_in_each_state(s: &Setup) -> anyhow::Result<()> {
    // ok: 10 % spent.
    s.budget("ok-cust", 100).await?;
    assert_eq!(call(s, "ok-cust", 10, "req-ok").await?.status(), StatusCode::OK);
    // near limit: 85 % spent (the default near-limit share is 80 %).
    s.budget("near-cust", 100).await?;
    assert_eq!(call(s, "near-cust", 85, "req-near").await?.status(), StatusCode::OK);
    // exhausted: 10.5 tokens of budget; a call for 20 is clamped to 10, leaving half a token's
    // dust: 95 % spent, and no call fits what is left.
    budget_nanos(s, "dust-cust", 10 * OUTPUT_NANOS_PER_TOKEN + OUTPUT_NANOS_PER_TOKEN / 2).await?;
    let clamped = call(s, "dust-cust", 20, "support-case-42").await?;
    assert_eq!(clamped.status(), StatusCode::OK);
    assert_eq!(clamped.headers()["x-tollgate-max-output-clamped"], "10");
    assert_eq!(clamped.headers()["x-request-id"], "support-case-42");
    assert_eq!(s.ledger("dust-cust").await?, (10 * OUTPUT_NANOS_PER_TOKEN, 0));
    // blocked: near its limit too, but blocked wins.
    s.budget("blocked-cust", 100).await?;
    assert_eq!(call(s, "blocked-cust", 90, "req-blocked").await?.status(), StatusCode::OK);
    projects::set_customer_blocked(&s.app.state.db, &s.project.id, "blocked-cust", true).await?;
    // payment failed: 5 % spent, its Stripe subscription past due.
    s.budget("late-payer", 100).await?;
    assert_eq!(call(s, "late-payer", 5, "req-late").await?.status(), StatusCode::OK);
    with_db!(&s.app.state.db, pool => sqlx::query(
        "UPDATE customers SET stripe_subscription_status = 'past_due' WHERE project_id = $1 AND external_id = 'late-payer'")
        .bind(&s.project.id).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// (customer, status) of each row of a customers page, in order.
fn rows(html: &str) -> Vec<(String, String)> {
    html.split("data-customer=\"")
        .skip(1)
        .filter_map(|rest| {
            let (customer, rest) = rest.split_once('"')?;
            let status = rest.split("data-status=\"").nth(1)?.split('"').next()?;
            Some((customer.to_owned(), status.to_owned()))
        })
        .collect()
}

fn names(rows: &[(String, String)]) -> Vec<&str> {
    rows.iter().map(|(c, _)| c.as_str()).collect()
}

async fn logged_in(s: &Setup) -> anyhow::Result<Browser<'_>> {
    let browser = Browser::new(&s.app)?;
    let login = browser.log_in("ada@example.com", PASSWORD).await?;
    anyhow::ensure!(login.status == StatusCode::SEE_OTHER, "{}", login.body);
    Ok(browser)
}

async fn the_customers_page_shows_each_status_and_filters_on_it(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    customers_in_each_state(&s).await?;
    let browser = logged_in(&s).await?;
    let list = format!("/projects/{}/customers", s.project.id);

    let page = browser.get(&list).await?;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let shown: BTreeMap<String, String> = rows(&page.body).into_iter().collect();
    let expected: BTreeMap<String, String> = [
        ("ok-cust", "ok"),
        ("near-cust", "near_limit"),
        ("dust-cust", "exhausted"),
        ("blocked-cust", "blocked"),
        ("late-payer", "payment_failed"),
    ]
    .into_iter()
    .map(|(c, h)| (c.to_owned(), h.to_owned()))
    .collect();
    assert_eq!(shown, expected, "{}", page.body);
    // Each spend is a bar (an SVG width, no inline style) with its share.
    assert!(page.body.contains("class=\"fill exhausted\" x=\"0\" y=\"0\" width=\"95\""), "{}", page.body);
    assert!(page.body.contains("class=\"fill near_limit\" x=\"0\" y=\"0\" width=\"85\""), "{}", page.body);
    assert!(!page.body.contains("style="), "an inline style the CSP blocks: {}", page.body);

    // The filter returns exactly the customers of a status, at a shareable URL.
    for (status, customer) in [
        ("ok", "ok-cust"),
        ("near_limit", "near-cust"),
        ("exhausted", "dust-cust"),
        ("blocked", "blocked-cust"),
        ("payment_failed", "late-payer"),
    ] {
        let filtered = browser.get(&format!("{list}?status={status}")).await?;
        assert_eq!(filtered.status, StatusCode::OK);
        assert_eq!(rows(&filtered.body), vec![(customer.to_owned(), status.to_owned())], "{status}: {}", filtered.body);
        assert!(filtered.body.contains("1 customer with status"), "{}", filtered.body);
    }
    // With a search too; and a status that does not exist gets a message, not an error.
    let none = browser.get(&format!("{list}?status=exhausted&q=near")).await?;
    assert!(rows(&none.body).is_empty(), "{}", none.body);
    let bogus = browser.get(&format!("{list}?status=active")).await?;
    assert_eq!(bogus.status, StatusCode::OK);
    assert!(bogus.body.contains("Status: choose one of"), "{}", bogus.body);
    assert_eq!(rows(&bogus.body).len(), 5);

    // Sorting: by status (most pressing first), by share used, by name.
    let by_status = rows(&browser.get(&format!("{list}?sort=status")).await?.body);
    assert_eq!(names(&by_status), ["blocked-cust", "late-payer", "dust-cust", "near-cust", "ok-cust"]);
    let by_used = rows(&browser.get(&format!("{list}?sort=used")).await?.body);
    assert_eq!(names(&by_used), ["dust-cust", "blocked-cust", "near-cust", "ok-cust", "late-payer"]);
    let by_name = rows(&browser.get(&format!("{list}?sort=name")).await?.body);
    assert_eq!(names(&by_name), ["blocked-cust", "dust-cust", "late-payer", "near-cust", "ok-cust"]);

    // A near-limit share set by the alerts: 90 % makes the 85 % customer ok.
    let state = &s.app.state;
    let input = AlertSettingsInput { thresholds: "90, 100".into(), ..Default::default() };
    alerts::save_settings(&state.db, &state.master_key, &s.project.id, &input).await?;
    let near = browser.get(&format!("{list}?status=near_limit")).await?;
    assert!(rows(&near.body).is_empty(), "{}", near.body);
    let ok = rows(&browser.get(&format!("{list}?status=ok")).await?.body);
    assert_eq!(names(&ok), ["near-cust", "ok-cust"]);

    // The customer's page shows the same bar and status.
    let dust = projects::find_customer(&state.db, &s.project.id, "dust-cust").await?.unwrap();
    let page = browser.get(&format!("{list}/{}", dust.id)).await?;
    assert_eq!(page.status, StatusCode::OK);
    let health = page.body.split("id=\"health\"").nth(1).unwrap_or_default();
    assert!(health.starts_with("><span class=\"badge exhausted health\">exhausted</span>"), "{}", page.body);
    assert!(page.body.contains("class=\"fill exhausted\" x=\"0\" y=\"0\" width=\"95\""), "{}", page.body);
    s.app.stop().await
}

/// A webhook receiver over real HTTP: keeps each body.
async fn receiver() -> anyhow::Result<(String, Arc<Mutex<Vec<Value>>>)> {
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let log = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(serde_json::from_str(&body).unwrap_or(Value::Null));
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, received))
}

/// (customer, threshold) of each threshold alert received.
fn thresholds(received: &Mutex<Vec<Value>>) -> Vec<(String, i64)> {
    let mut seen: Vec<(String, i64)> = received
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "budget.threshold_reached")
        .map(|e| {
            let customer = e["data"]["customer"]["id"].as_str().unwrap_or_default().to_owned();
            (customer, e["data"]["threshold_percent"].as_i64().unwrap_or_default())
        })
        .collect();
    seen.sort();
    seen
}

async fn the_100_percent_alert_fires_for_a_customer_exhausted_under_clamp(db: TestDatabase) -> TestResult {
    let (url, received) = receiver().await?;
    let s = setup_with(&db, BudgetPolicy::Clamp, |env| {
        env.insert("TOLLGATE_WORKERS".into(), "true".into());
        env.insert("TOLLGATE_WEBHOOKS_ALLOW_PRIVATE".into(), "true".into());
    })
    .await?;
    let state = &s.app.state;
    let input = AlertSettingsInput { thresholds: "50, 100".into(), webhook_url: url, ..Default::default() };
    alerts::save_settings(&state.db, &state.master_key, &s.project.id, &input).await?;
    // Clamped to 10 of its 10.5 tokens: 95 % spent, and exhausted.
    budget_nanos(&s, "dust-cust", 10 * OUTPUT_NANOS_PER_TOKEN + OUTPUT_NANOS_PER_TOKEN / 2).await?;
    let clamped = call(&s, "dust-cust", 20, "req-dust").await?;
    assert_eq!(clamped.headers()["x-tollgate-max-output-clamped"], "10");
    // 96 % spent, with 4 tokens left: not exhausted, no 100 % alert.
    s.budget("roomy", 100).await?;
    assert_eq!(call(&s, "roomy", 96, "req-roomy").await?.status(), StatusCode::OK);

    let expected = vec![("dust-cust".to_owned(), 50), ("dust-cust".to_owned(), 100), ("roomy".to_owned(), 50)];
    eventually(Duration::from_secs(60), || async { Ok(thresholds(&received).len() >= expected.len()) }).await?;
    // Another scan or two: nothing more fires.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(thresholds(&received), expected);
    let hundred = received.lock().unwrap().iter().find(|e| e["data"]["threshold_percent"] == 100).cloned();
    let hundred = hundred.unwrap_or_default();
    assert_eq!(hundred["data"]["spent_nanos"], 10 * OUTPUT_NANOS_PER_TOKEN, "{hundred}");
    s.app.stop().await
}

async fn a_clamped_call_is_marked_and_found_by_its_request_id(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Clamp).await?;
    customers_in_each_state(&s).await?;
    // The usage event records the clamp; the other calls were not clamped.
    let clamped: Vec<(String, bool)> = with_db!(&s.app.state.db, pool => sqlx::query_as(
        "SELECT request_id, clamped FROM usage_events WHERE project_id = $1 AND clamped ORDER BY request_id")
        .bind(&s.project.id).fetch_all(pool).await)?;
    assert_eq!(clamped, vec![("support-case-42".to_owned(), true)]);

    let browser = logged_in(&s).await?;
    let calls = format!("/projects/{}/calls", s.project.id);
    let all = browser.get(&calls).await?;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert_eq!(all.body.matches("<tr class=\"call ").count(), 5, "{}", all.body);
    assert_eq!(all.body.matches("<span class=\"badge clamped\" title=").count(), 1, "{}", all.body);

    // Found by its request id, with its clamp badge, tokens, cost and billed amount.
    let found = browser.get(&format!("{calls}?request_id=support-case-42")).await?;
    assert_eq!(found.status, StatusCode::OK);
    assert_eq!(found.body.matches("<tr class=\"call ").count(), 1, "{}", found.body);
    let row = found.body.split("<tr class=\"call settled clamped\" data-request-id=\"support-case-42\">").nth(1);
    let row = row.and_then(|r| r.split("</tr>").next()).unwrap_or_default();
    assert!(row.contains("<span class=\"badge clamped\""), "{}", found.body);
    assert!(row.contains(" / 10</td>"), "{row}");
    assert!(row.contains("dust-cust"), "{row}");
    // Another call's id finds that one call, without a badge.
    let other = browser.get(&format!("{calls}?request_id=req-near")).await?;
    assert_eq!(other.body.matches("<tr class=\"call settled\" data-request-id=\"req-near\">").count(), 1);
    assert!(!other.body.contains("<span class=\"badge clamped\" title="), "{}", other.body);
    // An id no call has: none; one too long: a message, not an error.
    let missing = browser.get(&format!("{calls}?request_id=nope")).await?;
    assert!(missing.body.contains("0 calls with request id"), "{}", missing.body);
    let long = browser.get(&format!("{calls}?request_id={}", "x".repeat(300))).await?;
    assert_eq!(long.status, StatusCode::OK);
    assert!(long.body.contains("Request id: at most 200"), "{}", long.body);

    // On the customer's page: its own calls only.
    let dust = projects::find_customer(&s.app.state.db, &s.project.id, "dust-cust").await?.unwrap();
    let page = format!("/projects/{}/customers/{}", s.project.id, dust.id);
    let mine = browser.get(&format!("{page}?request_id=support-case-42")).await?;
    assert_eq!(mine.body.matches("data-request-id=\"support-case-42\"").count(), 1, "{}", mine.body);
    let not_mine = browser.get(&format!("{page}?request_id=req-near")).await?;
    assert_eq!(not_mine.body.matches("<tr class=\"call ").count(), 0, "{}", not_mine.body);
    s.app.stop().await
}

//! A project bills in its own currency (issue 21): a zero-decimal one (JPY) and a
//! three-decimal one (KWD) are priced, metered, invoiced by Stripe and shown in their own
//! minor units, and Tollgate's shipped prices (in USD) apply outside USD only at the rate the
//! project sets — never as if a dollar were a yen.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::currency::Currency;
use tollgate_core::money::Nanos;
use tollgate_core::pricing::{Price, Tokenizer};
use tollgate_core::projects::{self, BudgetPolicy, NewProject, NewProvider, ProjectSettings, ProviderKind};
use tollgate_core::stripe::InvoiceCheck;

use crate::billing::{ACCOUNT, billing_setup_for};
use crate::dashboard::{Browser, PASSWORD};
use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult, spawn_app};
use crate::proxy::setup_project;

pub fn cases() -> Vec<DbCase> {
    db_cases![
        a_yen_project_is_invoiced_in_whole_yen,
        a_dinar_project_is_invoiced_in_thousandths,
        shipped_prices_apply_outside_usd_only_at_the_projects_rate,
        a_new_project_asks_for_its_currency_and_default_budget,
    ]
}

fn project(currency: &str, usd_rate: Option<Nanos>) -> anyhow::Result<NewProject> {
    Ok(NewProject {
        name: "Chat".into(),
        currency: Currency::parse(currency)?,
        usd_rate,
        policy: BudgetPolicy::Reject,
        min_output_tokens: 1,
        ..NewProject::default()
    })
}

/// Seven output tokens at 1.2345678 yen each: 8.6419746 yen, invoiced as 9 (Stripe rounds
/// half up, once per line, to the whole yen).
async fn a_yen_project_is_invoiced_in_whole_yen(db: TestDatabase) -> TestResult {
    invoiced_in_minor_units(db, "jpy", "0.000000001", 9, "9 JPY").await
}

/// The same usage in Kuwaiti dinar: 8.6419746 KWD, invoiced as 8.642 (8,642 fils).
async fn a_dinar_project_is_invoiced_in_thousandths(db: TestDatabase) -> TestResult {
    invoiced_in_minor_units(db, "kwd", "0.000001", 8_642, "8.642 KWD").await
}

async fn invoiced_in_minor_units(db: TestDatabase, currency: &str, unit: &str, total: i64, shown: &str) -> TestResult {
    let b = billing_setup_for(&db, project(currency, None)?, |_| {}).await?;
    b.connect_with_key().await?;
    let price = Price {
        input: 0,
        cached_input: 0,
        output: 1_234_567_800 * 1_000_000,
        cache_write: 0,
        max_output_tokens: 100,
        tokenizer: Tokenizer::O200kBase,
    };
    projects::set_price(&b.s.app.state.db, &b.s.project.id, "mock-model", &price).await?;
    b.calls("kenji", 1, 7).await?;
    b.provision().await?;
    let prices = b.fake.prices(ACCOUNT);
    let made = prices.first().ok_or_else(|| anyhow::anyhow!("no price made"))?;
    assert_eq!(made["currency"], currency, "{made}");
    assert_eq!(made["unit_amount_decimal"], unit, "one nano-unit in the minor unit: {made}");
    b.deliver().await?;
    b.close_periods().await;
    b.invoiced_as_billed("kenji").await?;
    let invoices = b.fake.invoices(ACCOUNT);
    let totals: Vec<i64> = invoices.iter().filter_map(|i| i["total"].as_i64()).filter(|t| *t > 0).collect();
    assert_eq!(totals, [total], "{invoices:#?}");
    let checks = b.invoices_reported().await?;
    assert!(
        checks.contains(&InvoiceCheck::Matches)
            && checks.iter().all(|c| matches!(c, InvoiceCheck::Matches | InvoiceCheck::Unchecked)),
        "{checks:?}"
    );
    let page = b.billing_page().await?;
    assert!(page.contains(shown), "the invoice in its own minor unit: {page}");
    b.s.app.stop().await
}

/// A yen project that set no rate cannot call a model priced only by Tollgate's shipped
/// (USD) table: the call is refused and says why; at 150 yen to the dollar it is billed 150
/// times the dollar price.
async fn shipped_prices_apply_outside_usd_only_at_the_projects_rate(db: TestDatabase) -> TestResult {
    let s = setup_project(&db, project("jpy", None)?, |_| {}).await?;
    let state = &s.app.state;
    projects::add_provider(
        &state.db,
        &state.master_key,
        &s.project.id,
        &NewProvider {
            kind: ProviderKind::OpenAiCompatible,
            name: "openai".into(),
            base_url: Some(s.mock.base_url()),
            api_key: "sk-mock-upstream".into(),
            models: vec!["gpt-4o-mini".into()],
        },
    )
    .await?;
    projects::upsert_customer_budget(
        &state.db,
        &s.project.id,
        "kenji",
        Nanos(1_000 * 1_000_000_000),
        tollgate_core::period::BudgetPeriod::Month,
    )
    .await?;
    let call = json!({"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]});
    let refused = s.chat("kenji", call.clone()).await?;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let error: Value = refused.json().await?;
    assert_eq!(error["error"]["code"], "model_not_priced", "{error}");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("USD") && message.contains("JPY") && message.contains("exchange rate"), "{message}");
    let models: Value = s.app.client.get(s.app.url("/v1/models")).bearer_auth(&s.key).send().await?.json().await?;
    assert!(!models.to_string().contains("gpt-4o-mini"), "an unpriced model is listed: {models}");

    let project = projects::get_project(&state.db, &s.project.id).await?.ok_or_else(|| anyhow::anyhow!("gone"))?;
    let settings = ProjectSettings { usd_rate: Some(Nanos(150 * 1_000_000_000)), ..ProjectSettings::of(&project) };
    projects::update_project(&state.db, &project.org_id, &project.id, &settings).await?;
    state.forget_project(&project.id);
    let answered = s.chat("kenji", call).await?;
    assert_eq!(answered.status(), StatusCode::OK, "{}", answered.text().await?);
    let answer: Value = answered.json().await?;
    let usage = &answer["usage"];
    let shipped = tollgate_core::pricing::shipped_price("gpt-4o-mini").ok_or_else(|| anyhow::anyhow!("unpriced"))?;
    let tokens = tollgate_core::pricing::TokenUsage {
        input: usage["prompt_tokens"].as_i64().unwrap_or(0),
        output: usage["completion_tokens"].as_i64().unwrap_or(0),
        ..Default::default()
    };
    let in_yen = shipped.converted(Nanos(150 * 1_000_000_000)).cost(&tokens);
    assert!(in_yen.0 > 0);
    // Each per-million rate is exactly 150 times the dollar's, so the cost is too (to the nano).
    let in_dollars = shipped.cost(&tokens);
    assert!((in_yen.0 - 150 * in_dollars.0).abs() <= 150, "{in_yen:?} against 150 × {in_dollars:?}");
    let billed: i64 = tollgate_core::with_db!(&state.db, pool => sqlx::query_scalar(
        "SELECT CAST(SUM(billed_nanos) AS BIGINT) FROM usage_events WHERE status = 'settled'").fetch_one(pool).await)?;
    assert_eq!(billed, in_yen.0, "billed at the project's rate");
    s.app.stop().await
}

/// The dashboard's new-project form asks for the currency and the default budget (a new
/// customer's first call is not refused by a 0.00 budget nobody chose), refuses what is not
/// an amount or a currency with a form message, and the project's pages show its currency.
async fn a_new_project_asks_for_its_currency_and_default_budget(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let form = ada.get("/projects").await?;
    assert!(form.body.contains("name=\"currency\"") && form.body.contains("<option value=\"jpy\""), "{}", form.body);
    assert!(form.body.contains("name=\"default_budget\""), "{}", form.body);

    let bad =
        ada.submit("/projects", "/projects", &[("name", "Yen"), ("currency", "xyz"), ("default_budget", "")]).await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("Currency: is not a currency Tollgate bills in"), "{}", bad.body);
    assert!(bad.body.contains("Default budget: must be an amount"), "{}", bad.body);
    assert!(bad.body.contains("value=\"Yen\""), "what was typed is shown again");
    let bad = ada
        .submit(
            "/projects",
            "/projects",
            &[("name", "Yen"), ("currency", "jpy"), ("default_budget", "500"), ("usd_rate", "-1")],
        )
        .await?;
    assert!(bad.body.contains("USD exchange rate: must be"), "{}", bad.body);
    let count: i64 = tollgate_core::with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM projects").fetch_one(pool).await)?;
    assert_eq!(count, 0, "a refused form made a project");

    let made = ada
        .submit(
            "/projects",
            "/projects",
            &[("name", "Yen"), ("currency", "JPY"), ("default_budget", "1500"), ("usd_rate", "151.2")],
        )
        .await?;
    assert_eq!(made.status, StatusCode::SEE_OTHER, "{}", made.body);
    let path = made.location.unwrap_or_default();
    let (currency, budget, rate): (String, i64, Option<i64>) = tollgate_core::with_db!(&app.state.db, pool => sqlx::query_as(
        "SELECT currency, default_budget_nanos, usd_rate_nanos FROM projects").fetch_one(pool).await)?;
    assert_eq!((currency.as_str(), budget, rate), ("jpy", 1_500_000_000_000, Some(151_200_000_000)));
    let overview = ada.get(&path).await?;
    assert!(overview.body.contains("1,500 JPY"), "the default budget in yen: {}", overview.body);
    let prices = ada.get(&format!("{path}/prices")).await?;
    assert!(prices.body.contains("1 USD = 151.20 JPY"), "{}", prices.body);
    app.stop().await
}

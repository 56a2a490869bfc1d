//! How a call names the end-customer it is charged to: the `X-Tollgate-Customer` header,
//! else OpenAI's `user` field (when the project enables it), else the project's default
//! customer, else a 400. A customer seen for the first time is created with the project's
//! default budget; a blocked one is refused with 403; a bad name creates nothing.

use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};
use tollgate_core::accounts::{self, NewOrganization};
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::pricing::{Price, Tokenizer};
use tollgate_core::projects::{self, BudgetPolicy, Customer, KeyKind, NewProject, NewProvider, Project, ProviderKind};
use tollgate_core::time::UnixMillis;
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{DbCase, TestApp, TestDatabase, TestResult, spawn_app};
use crate::mock_provider::MockProvider;

pub fn cases() -> Vec<DbCase> {
    db_cases![
        the_header_wins_over_the_user_field,
        the_user_field_names_the_customer_only_when_the_project_enables_it,
        a_call_naming_no_customer_is_charged_to_the_default_customer,
        a_new_customer_gets_the_project_default_budget_and_period,
        concurrent_first_calls_create_one_customer_within_the_default_budget,
        a_blocked_customer_is_refused_with_403_and_nothing_reaches_the_provider,
        a_bad_customer_header_gets_a_clear_400_and_creates_nothing,
        a_customer_id_is_limited_in_characters_not_bytes,
    ]
}

/// One output token costs 1e6 nanos (0.001 of a unit); input is free, so a call's cost is
/// exactly its output tokens.
const OUTPUT_NANOS_PER_TOKEN: i64 = 1_000_000;
/// Output tokens of the calls below (the mock answers exactly `max_tokens`).
const TOKENS_PER_CALL: i64 = 20;
const CALL_COST: i64 = TOKENS_PER_CALL * OUTPUT_NANOS_PER_TOKEN;

/// How the project names customers and what a new one gets.
struct Naming {
    customer_from_user: bool,
    default_customer: Option<&'static str>,
    default_budget_tokens: i64,
    default_period: BudgetPeriod,
}

impl Default for Naming {
    fn default() -> Self {
        Self {
            customer_from_user: false,
            default_customer: None,
            default_budget_tokens: 1_000,
            default_period: BudgetPeriod::Month,
        }
    }
}

struct Setup {
    app: TestApp,
    mock: MockProvider,
    project: Project,
    key: String,
}

async fn setup(db: &TestDatabase, naming: Naming) -> anyhow::Result<Setup> {
    let app = spawn_app(db).await?;
    let mock = MockProvider::start().await?;
    let state = &app.state;
    let org = accounts::create_organization_with_owner(
        &state.db,
        NewOrganization { name: "Acme", owner_email: "ada@example.com", owner_password: "correct horse battery" },
    )
    .await?;
    let new = NewProject {
        name: "Chat".into(),
        policy: BudgetPolicy::Reject,
        min_output_tokens: 1,
        default_budget: Nanos(naming.default_budget_tokens * OUTPUT_NANOS_PER_TOKEN),
        default_period: naming.default_period,
        ..NewProject::default()
    };
    let project = projects::create_project(&state.db, &org.org_id, &new).await?;
    projects::add_provider(
        &state.db,
        &state.master_key,
        &project.id,
        &NewProvider {
            kind: ProviderKind::OpenAiCompatible,
            name: "mock".into(),
            base_url: Some(mock.base_url()),
            api_key: "sk-mock-upstream".into(),
            models: vec!["mock-*".into()],
        },
    )
    .await?;
    let price = Price {
        input: 0,
        cached_input: 0,
        output: OUTPUT_NANOS_PER_TOKEN * 1_000_000,
        cache_write: 0,
        max_output_tokens: 100,
        tokenizer: Tokenizer::O200kBase,
    };
    projects::set_price(&state.db, &project.id, "mock-model", &price).await?;
    let key = projects::create_key(&state.db, &project.id, KeyKind::Secret, "test").await?.plaintext;
    let s = Setup { app, mock, project, key };
    s.name_customers(naming.customer_from_user, naming.default_customer).await?;
    Ok(s)
}

/// A chat call of `TOKENS_PER_CALL` output tokens, with OpenAI's `user` field if given.
fn hello(user: Option<Value>) -> Value {
    let mut body = json!({"model": "mock-model", "max_tokens": TOKENS_PER_CALL,
        "messages": [{"role": "user", "content": "Hello!"}]});
    if let Some(user) = user {
        body["user"] = user;
    }
    body
}

impl Setup {
    /// Sets how calls name customers (no domain function edits these settings yet), and
    /// drops the proxy's cached copy of the project, as a settings change in the process does.
    async fn name_customers(&self, from_user: bool, default_customer: Option<&str>) -> anyhow::Result<()> {
        with_db!(&self.app.state.db, pool => sqlx::query(
            "UPDATE projects SET customer_from_user = $1, default_customer = $2 WHERE id = $3")
            .bind(from_user).bind(default_customer).bind(&self.project.id).execute(pool).await.map(|_| ()))?;
        self.app.state.keys.forget_project(&self.project.id);
        Ok(())
    }

    /// Sends `body`, with the customer header set to `customer` when given.
    async fn chat(&self, customer: Option<HeaderValue>, body: &Value) -> anyhow::Result<reqwest::Response> {
        let mut request = self.app.client.post(self.app.url("/v1/chat/completions")).bearer_auth(&self.key).json(body);
        if let Some(customer) = customer {
            request = request.header("x-tollgate-customer", customer);
        }
        Ok(request.send().await?)
    }

    /// Sends `body` for the customer named `customer` in the header; expects it served.
    async fn served(&self, customer: Option<&str>, body: &Value) -> anyhow::Result<reqwest::Response> {
        let header = customer.map(HeaderValue::from_str).transpose()?;
        let response = self.chat(header, body).await?;
        anyhow::ensure!(response.status() == StatusCode::OK, "{customer:?}: {}", response.text().await?);
        Ok(response)
    }

    async fn customer(&self, external_id: &str) -> anyhow::Result<Customer> {
        projects::find_customer(&self.app.state.db, &self.project.id, external_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no customer {external_id}"))
    }

    /// The external ids of the project's customers, sorted.
    async fn customer_ids(&self) -> anyhow::Result<Vec<String>> {
        Ok(with_db!(&self.app.state.db, pool => sqlx::query_scalar::<_, String>(
            "SELECT external_id FROM customers WHERE project_id = $1 ORDER BY external_id")
            .bind(&self.project.id).fetch_all(pool).await)?)
    }

    /// The project's usage events as (customer external id, status), in no particular order.
    async fn events(&self) -> anyhow::Result<Vec<(Option<String>, String)>> {
        let mut events = with_db!(&self.app.state.db, pool => sqlx::query_as::<_, (Option<String>, String)>(
            "SELECT c.external_id, e.status FROM usage_events e LEFT JOIN customers c ON c.id = e.customer_id \
             WHERE e.project_id = $1")
            .bind(&self.project.id).fetch_all(pool).await)?;
        events.sort();
        Ok(events)
    }
}

/// Checks an error answer: `status`, OpenAI's error shape, `code`; returns the message.
async fn expect_error(response: reqwest::Response, status: StatusCode, code: &str) -> anyhow::Result<String> {
    let actual = response.status();
    let body: Value = response.json().await?;
    anyhow::ensure!(actual == status, "expected {status}, got {actual}: {body}");
    anyhow::ensure!(body["error"]["code"] == code, "expected code {code}: {body}");
    anyhow::ensure!(body["error"]["type"].is_string() && body["error"].get("param").is_some(), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(!message.is_empty(), "no message: {body}");
    Ok(message)
}

fn event(customer: &str, status: &str) -> (Option<String>, String) {
    (Some(customer.to_owned()), status.to_owned())
}

async fn the_header_wins_over_the_user_field(db: TestDatabase) -> TestResult {
    let s = setup(&db, Naming { customer_from_user: true, ..Naming::default() }).await?;
    s.served(Some("alice"), &hello(Some(json!("bob")))).await?;
    assert_eq!(s.customer_ids().await?, ["alice"], "the header names the customer, not `user`");
    s.served(None, &hello(Some(json!("bob")))).await?;
    assert_eq!(s.customer_ids().await?, ["alice", "bob"]);
    assert_eq!((s.customer("alice").await?.spent_nanos, s.customer("bob").await?.spent_nanos), (CALL_COST, CALL_COST));
    assert_eq!(s.events().await?, [event("alice", "settled"), event("bob", "settled")]);
    s.app.stop().await
}

async fn the_user_field_names_the_customer_only_when_the_project_enables_it(db: TestDatabase) -> TestResult {
    let s = setup(&db, Naming::default()).await?;
    let message =
        expect_error(s.chat(None, &hello(Some(json!("bob")))).await?, StatusCode::BAD_REQUEST, "missing_customer")
            .await?;
    assert!(message.contains("X-Tollgate-Customer"), "{message}");
    assert!(s.customer_ids().await?.is_empty(), "a refused call created a customer");
    assert!(s.events().await?.is_empty(), "a call without a customer was recorded");
    assert!(s.mock.requests().is_empty());

    s.name_customers(true, None).await?;
    s.served(None, &hello(Some(json!("bob")))).await?;
    assert_eq!(s.customer("bob").await?.spent_nanos, CALL_COST);
    // A `user` that is not a string names nobody.
    expect_error(s.chat(None, &hello(Some(json!(42)))).await?, StatusCode::BAD_REQUEST, "missing_customer").await?;
    expect_error(s.chat(None, &hello(None)).await?, StatusCode::BAD_REQUEST, "missing_customer").await?;
    assert_eq!(s.customer_ids().await?, ["bob"]);
    assert_eq!(s.events().await?, [event("bob", "settled")]);
    assert_eq!(s.mock.requests().len(), 1);
    s.app.stop().await
}

async fn a_call_naming_no_customer_is_charged_to_the_default_customer(db: TestDatabase) -> TestResult {
    let s = setup(&db, Naming { default_customer: Some("house"), ..Naming::default() }).await?;
    s.served(None, &hello(None)).await?;
    // `user` is ignored while the project does not take customers from it.
    s.served(None, &hello(Some(json!("bob")))).await?;
    assert_eq!(s.customer_ids().await?, ["house"]);
    assert_eq!(s.customer("house").await?.spent_nanos, 2 * CALL_COST);
    // A named customer is charged, not the default.
    s.served(Some("alice"), &hello(None)).await?;
    s.name_customers(true, Some("house")).await?;
    s.served(None, &hello(Some(json!("bob")))).await?;
    s.served(None, &hello(None)).await?;
    assert_eq!(s.customer_ids().await?, ["alice", "bob", "house"]);
    let spent =
        [s.customer("alice").await?, s.customer("bob").await?, s.customer("house").await?].map(|c| c.spent_nanos);
    assert_eq!(spent, [CALL_COST, CALL_COST, 3 * CALL_COST]);
    s.app.stop().await
}

async fn a_new_customer_gets_the_project_default_budget_and_period(db: TestDatabase) -> TestResult {
    let naming = Naming { default_budget_tokens: 50, default_period: BudgetPeriod::Day, ..Naming::default() };
    let s = setup(&db, naming).await?;
    let before = UnixMillis::now().0;
    let response = s.served(Some("newbie"), &hello(None)).await?;
    assert_eq!(response.headers()["x-tollgate-remaining"], "0.03", "a budget of 0.05 minus 0.02");
    let newbie = s.customer("newbie").await?;
    assert_eq!(newbie.budget_nanos, 50 * OUTPUT_NANOS_PER_TOKEN);
    assert_eq!(newbie.budget_period, "day");
    assert_eq!(newbie.period_end - newbie.period_start, 24 * 60 * 60 * 1000, "a day's window");
    assert!(newbie.period_start <= before && before < newbie.period_end, "the window holds now: {newbie:?}");
    assert_eq!((newbie.spent_nanos, newbie.reserved_nanos), (CALL_COST, 0));
    // The default budget is a hard budget: 50 tokens pay for two calls of 20, not three.
    s.served(Some("newbie"), &hello(None)).await?;
    let refused = s.chat(Some(HeaderValue::from_static("newbie")), &hello(None)).await?;
    expect_error(refused, StatusCode::PAYMENT_REQUIRED, "customer_budget_exceeded").await?;

    // A later change of the project's default applies to customers seen from then on only.
    with_db!(&s.app.state.db, pool => sqlx::query(
        "UPDATE projects SET default_budget_nanos = $1, default_budget_period = 'lifetime' WHERE id = $2")
        .bind(1_000 * OUTPUT_NANOS_PER_TOKEN).bind(&s.project.id).execute(pool).await.map(|_| ()))?;
    s.app.state.keys.forget_project(&s.project.id);
    s.served(Some("later"), &hello(None)).await?;
    let later = s.customer("later").await?;
    assert_eq!((later.budget_nanos, later.budget_period.as_str()), (1_000 * OUTPUT_NANOS_PER_TOKEN, "lifetime"));
    let newbie = s.customer("newbie").await?;
    assert_eq!((newbie.budget_nanos, newbie.budget_period.as_str()), (50 * OUTPUT_NANOS_PER_TOKEN, "day"));
    assert_eq!(newbie.spent_nanos, 2 * CALL_COST);
    s.app.stop().await
}

async fn concurrent_first_calls_create_one_customer_within_the_default_budget(db: TestDatabase) -> TestResult {
    const PAID_CALLS: i64 = 3;
    const CALLS: i64 = 20;
    let naming = Naming { default_budget_tokens: PAID_CALLS * TOKENS_PER_CALL, ..Naming::default() };
    let s = setup(&db, naming).await?;
    let body = hello(None);
    let calls = (0..CALLS).map(|_| s.chat(Some(HeaderValue::from_static("crowd")), &body));
    let mut served = 0;
    for response in futures::future::join_all(calls).await {
        let response = response?;
        match response.status() {
            StatusCode::OK => served += 1,
            _ => {
                expect_error(response, StatusCode::PAYMENT_REQUIRED, "customer_budget_exceeded").await?;
            }
        }
    }
    assert_eq!(s.customer_ids().await?, ["crowd"], "concurrent first calls must share one customer row");
    let crowd = s.customer("crowd").await?;
    assert_eq!(crowd.budget_nanos, PAID_CALLS * CALL_COST, "the default budget");
    assert!(crowd.spent_nanos <= crowd.budget_nanos, "overspent: {crowd:?}");
    assert_eq!((crowd.spent_nanos, crowd.reserved_nanos), (PAID_CALLS * CALL_COST, 0));
    assert_eq!(served, PAID_CALLS, "every call the default budget pays for must have run");
    let events = s.events().await?;
    assert_eq!(events.iter().filter(|e| **e == event("crowd", "settled")).count() as i64, PAID_CALLS);
    assert_eq!(events.iter().filter(|e| **e == event("crowd", "refused")).count() as i64, CALLS - PAID_CALLS);
    assert_eq!(events.len() as i64, CALLS, "one event per call, each for the one customer: {events:?}");
    s.app.stop().await
}

async fn a_blocked_customer_is_refused_with_403_and_nothing_reaches_the_provider(db: TestDatabase) -> TestResult {
    let s = setup(&db, Naming::default()).await?;
    let db_pool = &s.app.state.db;
    projects::upsert_customer_budget(db_pool, &s.project.id, "mallory", Nanos(1_000 * CALL_COST), BudgetPeriod::Month)
        .await?;
    assert!(projects::set_customer_blocked(db_pool, &s.project.id, "mallory", true).await?);
    let mallory = || Some(HeaderValue::from_static("mallory"));
    let response = s.chat(mallory(), &hello(None)).await?;
    let message = expect_error(response, StatusCode::FORBIDDEN, "customer_blocked").await?;
    assert!(message.contains("mallory"), "{message}");
    // A streamed call is refused the same way, before any stream starts.
    let mut streamed = hello(None);
    streamed["stream"] = json!(true);
    let response = s.chat(mallory(), &streamed).await?;
    assert_eq!(response.headers()["content-type"], "application/json");
    expect_error(response, StatusCode::FORBIDDEN, "customer_blocked").await?;

    assert!(s.mock.requests().is_empty(), "a blocked customer's call reached the provider");
    let customer = s.customer("mallory").await?;
    assert_eq!((customer.spent_nanos, customer.reserved_nanos), (0, 0));
    let refusals: Vec<(String, Option<String>, i64, i64, i64, String)> = with_db!(db_pool, pool => sqlx::query_as(
        "SELECT status, reason, cost_nanos, billed_nanos, reserved_nanos, usage_source FROM usage_events WHERE customer_id = $1")
        .bind(&customer.id).fetch_all(pool).await)?;
    let refusal = ("refused".to_owned(), Some("customer blocked".to_owned()), 0, 0, 0, "none".to_owned());
    assert_eq!(refusals, [refusal.clone(), refusal], "one refused event of zero cost per call");

    // Unblocked, the customer is served again.
    assert!(projects::set_customer_blocked(db_pool, &s.project.id, "mallory", false).await?);
    s.served(Some("mallory"), &hello(None)).await?;
    assert_eq!(s.mock.requests().len(), 1);
    s.app.stop().await
}

async fn a_bad_customer_header_gets_a_clear_400_and_creates_nothing(db: TestDatabase) -> TestResult {
    // A bad header must not fall back to `user` or to the default customer either.
    let naming = Naming { customer_from_user: true, default_customer: Some("house"), ..Naming::default() };
    let s = setup(&db, naming).await?;
    let body = hello(Some(json!("bob")));
    let bad = |bytes: &[u8]| HeaderValue::from_bytes(bytes);

    let message =
        expect_error(s.chat(Some(bad(b"caf\xe9")?), &body).await?, StatusCode::BAD_REQUEST, "invalid_customer").await?;
    assert!(message.contains("X-Tollgate-Customer"), "not text: {message}");
    let message =
        expect_error(s.chat(Some(bad(b"")?), &body).await?, StatusCode::BAD_REQUEST, "invalid_customer").await?;
    assert!(message.contains("customer"), "empty: {message}");
    let message =
        expect_error(s.chat(Some(bad(&[b'x'; 201])?), &body).await?, StatusCode::BAD_REQUEST, "invalid_customer")
            .await?;
    assert!(message.contains("200"), "too long: {message}");
    let message =
        expect_error(s.chat(Some(bad(b"tab\there")?), &body).await?, StatusCode::BAD_REQUEST, "invalid_customer")
            .await?;
    assert!(message.contains("printable"), "a control character: {message}");
    // The same rules hold for a customer named by `user`.
    let too_long = hello(Some(json!("u".repeat(201))));
    expect_error(s.chat(None, &too_long).await?, StatusCode::BAD_REQUEST, "invalid_customer").await?;

    assert!(s.customer_ids().await?.is_empty(), "a bad name created a customer");
    assert!(s.events().await?.is_empty(), "a call without a valid customer was recorded");
    assert!(s.mock.requests().is_empty());

    // 200 characters is still a name.
    let longest = "x".repeat(200);
    s.served(Some(&longest), &body).await?;
    assert_eq!(s.customer_ids().await?, [longest]);
    s.app.stop().await
}

/// `validate_external_id` and its error message promise "1 to 200 printable characters".
async fn a_customer_id_is_limited_in_characters_not_bytes(db: TestDatabase) -> TestResult {
    let s = setup(&db, Naming { customer_from_user: true, ..Naming::default() }).await?;
    // 120 characters, 240 bytes in UTF-8 (a header is ASCII only; `user` carries any text).
    let name = "é".repeat(120);
    let response = s.chat(None, &hello(Some(json!(name)))).await?;
    let status = response.status();
    anyhow::ensure!(
        status == StatusCode::OK,
        "a customer id of 120 characters ({} bytes) was refused with {status}: {}",
        name.len(),
        response.text().await?
    );
    assert_eq!(s.customer_ids().await?, std::slice::from_ref(&name));
    // A header carries UTF-8 names too.
    let jose = HeaderValue::from_bytes("José".as_bytes())?;
    let response = s.chat(Some(jose), &hello(None)).await?;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await?);
    let mut ids = s.customer_ids().await?;
    ids.sort();
    assert_eq!(ids, ["José".to_owned(), name]);
    s.app.stop().await
}

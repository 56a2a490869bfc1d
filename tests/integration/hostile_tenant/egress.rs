//! Issue 20, finding 1 (SSRF with the answer read back), and the private-address forms of
//! finding 9: a tenant points a provider connection or an alert webhook at the network
//! Tollgate runs in. Loopback listeners stand in for that network. Without the operator's
//! allowance (`TOLLGATE_EGRESS_ALLOW`, which the harness sets for loopback) every form of a
//! private destination is refused before anything is sent; with it, a redirect is still never
//! followed, and a base URL can never steer the path Tollgate calls.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{StatusCode as AxumStatus, Uri, header};
use axum::response::IntoResponse;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::accounts::{self, NewOrganization};
use tollgate_core::alerts::{self, AlertSettingsInput};
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::pricing::{Price, Tokenizer};
use tollgate_core::projects::{self, BudgetPolicy, KeyKind, NewProject, NewProvider, Project, ProviderKind};
use tollgate_core::with_db;

use crate::dashboard::{Browser, PASSWORD};
use crate::db_cases;
use crate::helpers::{DbCase, TestApp, TestDatabase, TestResult, eventually, spawn_app_with};
use crate::mock_provider::MockProvider;
use crate::proxy::setup_with;

pub fn cases() -> Vec<DbCase> {
    db_cases![
        a_provider_on_an_ipv4_loopback_literal_is_refused,
        a_provider_on_the_ipv6_loopback_is_refused,
        a_provider_on_an_ipv4_mapped_loopback_is_refused,
        a_provider_whose_name_resolves_to_loopback_is_refused,
        count_tokens_goes_through_the_same_policy,
        a_redirecting_provider_is_never_followed,
        base_urls_that_could_steer_the_path_are_refused_when_saved,
        stored_base_urls_that_steer_the_path_fail_closed_and_hide_their_password,
        an_alert_webhook_to_a_special_range_is_never_sent,
    ]
}

/// What the tenant's connection calls in these tests.
const MODEL: &str = "mock-model";
const CLAUDE: &str = "claude-mock";

/// Tollgate without the harness's loopback allowance: the default of a real deployment.
async fn app_without_allowance(db: &TestDatabase) -> anyhow::Result<TestApp> {
    spawn_app_with(db, |env| {
        env.remove("TOLLGATE_EGRESS_ALLOW");
    })
    .await
}

/// A tenant with a project, a key, prices for [`MODEL`] and [`CLAUDE`], a customer with
/// budget, and one provider connection per `(kind, base URL)`.
struct Tenant<'a> {
    app: &'a TestApp,
    project: Project,
    key: String,
}

impl<'a> Tenant<'a> {
    async fn new(app: &'a TestApp, connections: &[(ProviderKind, &str)]) -> anyhow::Result<Self> {
        let state = &app.state;
        let org = accounts::create_organization_with_owner(
            &state.db,
            NewOrganization { name: "Mallory", owner_email: "mallory@example.com", owner_password: PASSWORD },
        )
        .await?;
        let project = projects::create_project(
            &state.db,
            &org.org_id,
            &NewProject { name: "Probe".into(), policy: BudgetPolicy::Reject, ..NewProject::default() },
        )
        .await?;
        for (kind, base_url) in connections {
            let models = match kind {
                ProviderKind::Anthropic => vec![format!("{CLAUDE}*")],
                _ => vec![format!("{MODEL}*")],
            };
            let new = NewProvider {
                kind: *kind,
                name: "probe".into(),
                base_url: Some((*base_url).to_owned()),
                api_key: "sk-probe".into(),
                models,
            };
            projects::add_provider(&state.db, &state.master_key, &project.id, &new).await?;
        }
        let price = Price {
            input: 0,
            cached_input: 0,
            output: 1_000_000_000_000,
            cache_write: 0,
            max_output_tokens: 100,
            tokenizer: Tokenizer::O200kBase,
        };
        for model in [MODEL, CLAUDE] {
            projects::set_price(&state.db, &project.id, model, &price).await?;
        }
        projects::upsert_customer_budget(&state.db, &project.id, "victim", Nanos(1_000_000_000), BudgetPeriod::Month)
            .await?;
        let key = projects::create_key(&state.db, &project.id, KeyKind::Secret, "probe").await?.plaintext;
        Ok(Self { app, project, key })
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .app
            .client
            .post(self.app.url(path))
            .header("x-api-key", &self.key)
            .header("x-tollgate-customer", "victim")
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    async fn chat(&self) -> anyhow::Result<(StatusCode, Value)> {
        let body = json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]});
        self.post("/v1/chat/completions", body).await
    }

    async fn count_tokens(&self) -> anyhow::Result<(StatusCode, Value)> {
        let body = json!({"model": CLAUDE, "messages": [{"role": "user", "content": "Hi"}]});
        self.post("/v1/messages/count_tokens", body).await
    }

    /// (spent, reserved) of the customer: a refused call holds and spends nothing.
    async fn ledger(&self) -> anyhow::Result<(i64, i64)> {
        let c = projects::find_customer(&self.app.state.db, &self.project.id, "victim")
            .await?
            .ok_or_else(|| anyhow::anyhow!("no customer"))?;
        Ok((c.spent_nanos, c.reserved_nanos))
    }
}

/// A listener that records every request's path and answers `answer` to each.
#[derive(Clone)]
struct Listener {
    addr: SocketAddr,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Listener {
    async fn start(bind: &str, answer: fn(&Uri, SocketAddr) -> axum::response::Response) -> anyhow::Result<Self> {
        Self::start_with(bind, answer, None).await
    }

    async fn start_with(
        bind: &str,
        answer: fn(&Uri, SocketAddr) -> axum::response::Response,
        target: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let paths: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = paths.clone();
        let target = target.unwrap_or(addr);
        let app = axum::Router::new().fallback(move |uri: Uri| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(uri.to_string());
                answer(&uri, target)
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { addr, paths })
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

const SECRET: &str = "internal-only: the metadata token is s3cr3t-4242";

fn secret_page(_: &Uri, _: SocketAddr) -> axum::response::Response {
    (AxumStatus::OK, [(header::CONTENT_TYPE, "application/json")], json!({"secret": SECRET}).to_string())
        .into_response()
}

/// Redirects every request to the secret page (`target`): 302 under `/s302`, else 307 (which
/// keeps the method and body).
fn redirect_to_secret(uri: &Uri, target: SocketAddr) -> axum::response::Response {
    let status = if uri.path().starts_with("/s302") { AxumStatus::FOUND } else { AxumStatus::TEMPORARY_REDIRECT };
    (status, [(header::LOCATION, format!("http://{target}/latest/meta-data"))], "moved").into_response()
}

/// Every request (after the first) is refused as a private destination, with a message that
/// says so and names the operator's setting, in the caller's error shape, and holds nothing.
fn assert_refused(status: StatusCode, body: &Value, anthropic: bool) {
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let error = &body["error"];
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("is on a private network"), "{body}");
    assert!(message.contains("TOLLGATE_EGRESS_ALLOW") && message.contains("operator"), "{body}");
    assert_eq!(error["code"], "destination_refused", "{body}");
    if anthropic {
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(error["type"], "permission_error", "{body}");
    } else {
        assert_eq!(error["type"], "permission_error", "{body}");
    }
}

/// A chat call to a provider at `base_url` (served by `listener`) is refused before anything
/// is sent, and recorded as refused.
async fn chat_is_refused(db: TestDatabase, listener: Listener, base_url: &str) -> TestResult {
    let app = app_without_allowance(&db).await?;
    let tenant = Tenant::new(&app, &[(ProviderKind::OpenAiCompatible, base_url)]).await?;
    let (status, body) = tenant.chat().await?;
    assert_refused(status, &body, false);
    assert!(listener.paths().is_empty(), "the provider on loopback was called: {:?}", listener.paths());
    assert_eq!(tenant.ledger().await?, (0, 0));
    let events: Vec<(String, Option<String>)> = with_db!(&app.state.db, pool => sqlx::query_as(
        "SELECT status, reason FROM usage_events").fetch_all(pool).await)?;
    assert_eq!(events, vec![("refused".to_owned(), Some("destination refused".to_owned()))]);
    app.stop().await
}

async fn a_provider_on_an_ipv4_loopback_literal_is_refused(db: TestDatabase) -> TestResult {
    let listener = Listener::start("127.0.0.1:0", secret_page).await?;
    let base = format!("http://{}/v1", listener.addr);
    chat_is_refused(db, listener, &base).await
}

async fn a_provider_on_the_ipv6_loopback_is_refused(db: TestDatabase) -> TestResult {
    let listener = Listener::start("[::1]:0", secret_page).await?;
    let base = format!("http://{}/v1", listener.addr);
    assert!(base.starts_with("http://[::1]:"), "{base}");
    chat_is_refused(db, listener, &base).await
}

async fn a_provider_on_an_ipv4_mapped_loopback_is_refused(db: TestDatabase) -> TestResult {
    let listener = Listener::start("127.0.0.1:0", secret_page).await?;
    let base = format!("http://[::ffff:127.0.0.1]:{}/v1", listener.addr.port());
    chat_is_refused(db, listener, &base).await
}

async fn a_provider_whose_name_resolves_to_loopback_is_refused(db: TestDatabase) -> TestResult {
    let mock = MockProvider::start().await?;
    let port = mock.addr.map(|a| a.port()).unwrap_or_default();
    let app = app_without_allowance(&db).await?;
    let tenant = Tenant::new(&app, &[(ProviderKind::OpenAiCompatible, &format!("http://localhost:{port}/v1"))]).await?;
    let (status, body) = tenant.chat().await?;
    assert_refused(status, &body, false);
    // The addresses a name resolved to are not told (no map of the internal network).
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("localhost") && !message.contains("127.0.0.1"), "{message}");
    assert!(mock.requests().is_empty(), "the provider on loopback was called");
    assert_eq!(tenant.ledger().await?, (0, 0));
    // Recorded: the refused call, and the call released after its name was refused.
    let events: Vec<(String, Option<String>)> = with_db!(&app.state.db, pool => sqlx::query_as(
        "SELECT status, reason FROM usage_events ORDER BY created_at").fetch_all(pool).await)?;
    assert_eq!(events, vec![("failed".to_owned(), Some("destination refused".to_owned()))]);
    app.stop().await
}

async fn count_tokens_goes_through_the_same_policy(db: TestDatabase) -> TestResult {
    let mock = MockProvider::start().await?;
    let app = app_without_allowance(&db).await?;
    let tenant = Tenant::new(&app, &[(ProviderKind::Anthropic, &mock.anthropic_base_url())]).await?;
    let (status, body) = tenant.count_tokens().await?;
    assert_refused(status, &body, true);
    let port = mock.addr.map(|a| a.port()).unwrap_or_default();
    // A name resolving to loopback too (refused when resolved, not before).
    let by_name = format!("http://localhost:{port}");
    with_db!(&app.state.db, pool => sqlx::query("UPDATE provider_connections SET base_url = $1")
        .bind(&by_name).execute(pool).await.map(|_| ()))?;
    app.state.forget_project(&tenant.project.id);
    let (status, body) = tenant.count_tokens().await?;
    assert_refused(status, &body, true);
    assert!(mock.requests().is_empty(), "count_tokens reached the provider on loopback");
    app.stop().await
}

async fn a_redirecting_provider_is_never_followed(db: TestDatabase) -> TestResult {
    // With the harness's loopback allowance both listeners are allowed destinations: what
    // stops the second hop is that redirects are never followed.
    let secret = Listener::start("127.0.0.1:0", secret_page).await?;
    let redirector = Listener::start_with("127.0.0.1:0", redirect_to_secret, Some(secret.addr)).await?;
    let app = spawn_app_with(&db, |_| {}).await?;
    let base = format!("http://{}", redirector.addr);
    let tenant = Tenant::new(
        &app,
        &[
            (ProviderKind::OpenAiCompatible, &format!("{base}/s307/v1")),
            (ProviderKind::Anthropic, &format!("{base}/s302")),
        ],
    )
    .await?;

    let (status, body) = tenant.chat().await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"]["code"], "upstream_redirect", "{body}");
    assert_eq!(body["error"]["type"], "upstream_error", "{body}");
    assert!(!body.to_string().contains("s3cr3t"), "the internal page came back: {body}");

    let (status, body) = tenant.count_tokens().await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!((body["type"].as_str(), body["error"]["type"].as_str()), (Some("error"), Some("api_error")), "{body}");
    assert!(!body.to_string().contains("s3cr3t"), "the internal page came back: {body}");

    assert_eq!(redirector.paths(), vec!["/s307/v1/chat/completions", "/s302/v1/messages/count_tokens"]);
    assert!(secret.paths().is_empty(), "the redirect was followed to {:?}", secret.paths());
    assert_eq!(tenant.ledger().await?, (0, 0));
    app.stop().await
}

async fn base_urls_that_could_steer_the_path_are_refused_when_saved(db: TestDatabase) -> TestResult {
    let app = app_without_allowance(&db).await?;
    let mallory = Browser::new(&app)?;
    mallory.sign_up("Mallory", "mallory@example.com", PASSWORD).await?;
    let project = mallory
        .submit("/projects", "/projects", &[("name", "Probe"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let providers = format!("{project}/providers");
    let cases = [
        ("https://api.example.com/v1/embeddings?x=", "Base URL: must not contain a query string"),
        ("https://api.example.com/v1/embeddings#", "Base URL: must not contain a fragment"),
        ("https://api.example.com/internal#x", "Base URL: must not contain a fragment"),
        ("https://admin:hunter2@api.example.com/v1", "Base URL: must not contain a user name or password"),
        ("https://api.example.com/v1/../admin", "Base URL: must not contain . or .. path segments"),
        ("http://127.0.0.1:9/v1", "Base URL: The destination 127.0.0.1 is on a private network"),
        ("http://[::1]:9/v1", "Base URL: The destination [::1] is on a private network"),
        ("http://169.254.169.254/latest", "Base URL: The destination 169.254.169.254 is on a private network"),
        ("http://localhost:9/v1", "Base URL: The destination localhost is on a private network"),
    ];
    for (base_url, message) in cases {
        let fields = [
            ("kind", "openai_compatible"),
            ("name", "probe"),
            ("api_key", "sk-probe"),
            ("models", "mock-*"),
            ("base_url", base_url),
        ];
        let page = mallory.submit(&providers, &providers, &fields).await?;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{base_url} was saved");
        assert!(page.body.contains(message), "{base_url}: expected {message:?} in {}", page.body);
        if message.contains("private network") {
            assert!(page.body.contains("TOLLGATE_EGRESS_ALLOW"), "{}", page.body);
        }
    }
    let saved: i64 = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM provider_connections").fetch_one(pool).await)?;
    assert_eq!(saved, 0);
    app.stop().await
}

async fn stored_base_urls_that_steer_the_path_fail_closed_and_hide_their_password(db: TestDatabase) -> TestResult {
    // Saved before the rules, straight into the table: each would have the chat call land on
    // another path of the upstream (its embeddings here), or carries a password.
    let upstream = Listener::start("127.0.0.1:0", secret_page).await?;
    let app = spawn_app_with(&db, |_| {}).await?;
    let at = upstream.addr;
    let tenant = Tenant::new(&app, &[(ProviderKind::OpenAiCompatible, &format!("http://{at}/v1"))]).await?;
    for stored in [
        format!("http://{at}/v1/embeddings?x="),
        format!("http://{at}/v1/embeddings#"),
        format!("http://{at}/v1/x/../embeddings#"),
        format!("http://{at}/v1/x/%2e%2e"),
        format!("http://admin:hunter2@{at}/v1"),
    ] {
        with_db!(&app.state.db, pool => sqlx::query("UPDATE provider_connections SET base_url = $1")
            .bind(&stored).execute(pool).await.map(|_| ()))?;
        app.state.forget_project(&tenant.project.id);
        let (status, body) = tenant.chat().await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{stored}: {body}");
        assert_eq!(body["error"]["code"], "invalid_base_url", "{stored}: {body}");
        assert!(!body.to_string().contains("hunter2"), "{body}");
        assert!(upstream.paths().is_empty(), "{stored} steered the call to {:?}", upstream.paths());
    }
    assert_eq!(tenant.ledger().await?, (0, 0));
    // The one still stored has a password: nobody is shown it.
    let mallory = Browser::new(&app)?;
    mallory.log_in("mallory@example.com", PASSWORD).await?;
    let listed = mallory.get(&format!("/projects/{}/providers", tenant.project.id)).await?;
    assert!(listed.body.contains(&format!("http://{at}/v1")), "{}", listed.body);
    assert!(!listed.body.contains("hunter2"), "the base URL's password was shown");
    app.stop().await
}

async fn an_alert_webhook_to_a_special_range_is_never_sent(db: TestDatabase) -> TestResult {
    // NAT64 of 127.0.0.1: the old guard took it for public. The provider (the mock on
    // 127.0.0.1) is allowed; the webhook's range is not.
    let receiver = Listener::start("127.0.0.1:0", secret_page).await?;
    let s = setup_with(&db, BudgetPolicy::Reject, |env| {
        env.insert("TOLLGATE_WORKERS".into(), "true".into());
        env.insert("TOLLGATE_EGRESS_ALLOW".into(), "127.0.0.0/8".into());
    })
    .await?;
    let webhook = format!("http://[64:ff9b::7f00:1]:{}/hook", receiver.addr.port());
    let input = AlertSettingsInput {
        thresholds: "50".into(),
        on_refused: false,
        webhook_url: webhook,
        email_to: String::new(),
    };
    alerts::save_settings(&s.app.state.db, &s.app.state.master_key, &s.project.id, &input).await?;
    s.budget("dan", 100).await?;
    let body = json!({"model": "mock-model", "max_tokens": 60, "messages": [{"role": "user", "content": "Hi"}]});
    assert_eq!(s.chat("dan", body).await?.status(), StatusCode::OK);
    let state = s.app.state.clone();
    let project = s.project.id.clone();
    eventually(Duration::from_secs(30), || async {
        let log = alerts::delivery_log(&state.db, &project, 10).await?;
        Ok(log.first().is_some_and(|d| d.attempts >= 1 && d.last_error.is_some()))
    })
    .await?;
    let log = alerts::delivery_log(&state.db, &project, 10).await?;
    let error = log[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("is on a private network") && error.contains("TOLLGATE_EGRESS_ALLOW"), "{error}");
    assert!(receiver.paths().is_empty());
    s.app.stop().await
}

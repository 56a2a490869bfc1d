//! The dashboard through a cookie-keeping HTTP client, as a browser uses it: sign-up, login,
//! logout, password change and reset, CSRF, throttling, bad input answered with a form
//! message and nothing half-saved, and one organization never seeing another's pages.

use reqwest::StatusCode;
use reqwest::header::{LOCATION, SET_COOKIE};
use tollgate_core::accounts;
use tollgate_core::projects;
use tollgate_core::with_db;

use crate::db_cases;
use crate::fake_smtp::FakeSmtp;
use crate::helpers::{DbCase, TestApp, TestDatabase, TestResult, spawn_app, spawn_app_with};
use crate::mock_provider::MockProvider;

pub fn cases() -> Vec<DbCase> {
    db_cases![
        sign_up_create_a_project_log_out_and_back_in,
        bad_sign_ups_get_a_form_message_and_save_nothing,
        forms_without_the_session_csrf_token_are_refused,
        repeated_wrong_passwords_are_throttled,
        a_password_reset_link_works_once,
        changing_the_password_needs_the_current_one,
        pages_need_a_login_and_send_safe_headers,
        another_organizations_project_is_not_found,
        a_key_made_in_the_dashboard_works_on_the_proxy_until_revoked,
        settings_and_prices_are_checked_saved_and_audited,
        customers_are_managed_and_their_spend_shown,
        the_customer_list_searches_sorts_and_pages,
        members_are_invited_and_roles_are_enforced,
        every_page_and_action_of_another_organization_is_not_found,
        reset_links_and_invitations_are_mailed_when_smtp_is_configured,
        alerts_are_set_checked_and_their_deliveries_logged,
        stripe_is_connected_on_the_billing_page_and_events_listed,
        the_api_reference_is_rendered_from_the_openapi_document,
        nul_characters_in_forms_get_a_message_not_an_error,
        test_connection_asks_stripe_and_shows_the_answer,
        price_and_provider_changes_apply_to_the_next_call,
        irreversible_actions_are_confirmed_on_a_page_of_their_own,
        the_current_tab_is_marked,
        unknown_urls_answer_html_to_browsers_and_json_to_clients,
        billing_shows_the_mode_the_account_reached_and_an_unreachable_public_url,
        usage_from_before_stripe_was_connected_is_shown_apart,
    ]
}

/// A browser: keeps cookies, does not follow redirects (tests look at them).
pub(crate) struct Browser<'a> {
    app: &'a TestApp,
    pub(crate) client: reqwest::Client,
}

pub(crate) struct Page {
    pub status: StatusCode,
    pub location: Option<String>,
    pub body: String,
}

impl Page {
    /// The value of the first `csrf` hidden field.
    pub(crate) fn csrf(&self) -> String {
        field_value(&self.body, "csrf").unwrap_or_default()
    }
}

pub(crate) fn field_value(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')? + start;
    Some(html[start..end].to_owned())
}

impl<'a> Browser<'a> {
    pub(crate) fn new(app: &'a TestApp) -> anyhow::Result<Self> {
        Self::with_headers(app, reqwest::header::HeaderMap::new())
    }

    /// A browser behind a reverse proxy that says it forwards for `chain` (`X-Forwarded-For`).
    pub(crate) fn forwarded_for(app: &'a TestApp, chain: &str) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-forwarded-for", chain.parse()?);
        Self::with_headers(app, headers)
    }

    fn with_headers(app: &'a TestApp, headers: reqwest::header::HeaderMap) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(headers)
            .build()?;
        Ok(Self { app, client })
    }

    async fn page(response: reqwest::Response) -> anyhow::Result<Page> {
        let status = response.status();
        let location = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(Page { status, location, body: response.text().await? })
    }

    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Page> {
        Self::page(self.client.get(self.app.url(path)).send().await?).await
    }

    pub(crate) async fn post(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<Page> {
        Self::page(self.client.post(self.app.url(path)).form(form).send().await?).await
    }

    /// Fills the form of the page at `form_page` (taking its CSRF token) and posts it to `action`.
    pub(crate) async fn submit(&self, form_page: &str, action: &str, fields: &[(&str, &str)]) -> anyhow::Result<Page> {
        let csrf = self.get(form_page).await?.csrf();
        let mut form = vec![("csrf", csrf.as_str())];
        form.extend_from_slice(fields);
        self.post(action, &form).await
    }

    /// Signs up as a person would, confirming the address too: the first account of an install
    /// without SMTP is logged in at once; any other is asked to check its mail, and then logs
    /// in and opens its confirmation link (minted here as the mailed one is: most tests have
    /// no SMTP). Answers the last page (the sign-up's, when nothing was created).
    pub(crate) async fn sign_up(&self, org: &str, email: &str, password: &str) -> anyhow::Result<Page> {
        let page =
            self.submit("/signup", "/signup", &[("org_name", org), ("email", email), ("password", password)]).await?;
        if !page.body.contains("id=\"check-mail\"") {
            return Ok(page);
        }
        let Some(token) = verification_token(self.app, email).await? else { return Ok(page) };
        let login = self.log_in(email, password).await?;
        anyhow::ensure!(login.status == StatusCode::SEE_OTHER, "{}", login.body);
        let verified = self.get(&format!("/verify?token={token}")).await?;
        anyhow::ensure!(verified.body.contains("Your email address is confirmed."), "{}", verified.body);
        self.get("/").await
    }

    pub(crate) async fn log_in(&self, email: &str, password: &str) -> anyhow::Result<Page> {
        self.submit("/login", "/login", &[("email", email), ("password", password), ("next", "")]).await
    }
}

pub(crate) const PASSWORD: &str = "correct horse battery";

/// A fresh confirmation link's token for the unverified account of `email`, if there is one.
pub(crate) async fn verification_token(app: &TestApp, email: &str) -> anyhow::Result<Option<String>> {
    let email = email.trim().to_lowercase();
    let user: Option<tollgate_core::ids::UserId> = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT id FROM users WHERE email = $1 AND verified_at IS NULL").bind(&email).fetch_optional(pool).await)?;
    match user {
        Some(user) => Ok(accounts::start_email_verification(&app.state.db, &user).await?),
        None => Ok(None),
    }
}

async fn count(app: &TestApp, table: &str) -> anyhow::Result<i64> {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    Ok(
        with_db!(&app.state.db, pool => sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.clone())).fetch_one(pool).await)?,
    )
}

async fn sign_up_create_a_project_log_out_and_back_in(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let browser = Browser::new(&app)?;
    assert_eq!(browser.get("/").await?.location.as_deref(), Some("/login"));

    let signed_up = browser.sign_up("Acme", "Ada@Example.com", PASSWORD).await?;
    assert_eq!(signed_up.status, StatusCode::SEE_OTHER, "{}", signed_up.body);
    assert_eq!(signed_up.location.as_deref(), Some("/projects"));
    let projects = browser.get("/projects").await?;
    assert_eq!(projects.status, StatusCode::OK);
    assert!(projects.body.contains("ada@example.com (owner)"), "{}", projects.body);
    assert!(projects.body.contains("No project yet"));

    let created = browser.submit("/projects", "/projects", &[("name", "Chatbot"), ("default_budget", "0")]).await?;
    assert_eq!(created.status, StatusCode::SEE_OTHER, "{}", created.body);
    let project_path = created.location.clone().unwrap_or_default();
    assert!(project_path.starts_with("/projects/prj_"), "{project_path}");
    let project = browser.get(&project_path).await?;
    assert!(project.body.contains("<h1>Chatbot</h1>"), "{}", project.body);
    assert!(
        project.body.contains(&format!("curl http://{}/v1/chat/completions", app.addr))
            || project.body.contains("/v1/chat/completions")
    );
    assert!(browser.get("/projects").await?.body.contains("Chatbot"));

    // The audit log shows who did it.
    let audit = browser.get("/audit").await?;
    assert!(audit.body.contains("project.created") && audit.body.contains("ada@example.com"), "{}", audit.body);

    // Log out: the pages need a login again.
    let csrf = browser.get("/projects").await?.csrf();
    let out = browser.post("/logout", &[("csrf", &csrf)]).await?;
    assert_eq!(out.location.as_deref(), Some("/login"));
    let after = browser.get("/projects").await?;
    assert_eq!(after.status, StatusCode::SEE_OTHER);
    assert_eq!(after.location.as_deref(), Some("/login?next=/projects"));

    let wrong = browser.log_in("ada@example.com", "not the password").await?;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.body.contains("Incorrect email or password."), "{}", wrong.body);
    let back = browser.log_in("ADA@example.com", PASSWORD).await?;
    assert_eq!(back.location.as_deref(), Some("/projects"), "{}", back.body);
    assert!(browser.get("/projects").await?.body.contains("Chatbot"));
    app.stop().await
}

async fn bad_sign_ups_get_a_form_message_and_save_nothing(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let browser = Browser::new(&app)?;
    let cases: [(&str, &str, &str, &str); 5] = [
        ("", "ada@example.com", PASSWORD, "Organization name: must not be empty"),
        (&"x".repeat(101), "ada@example.com", PASSWORD, "Organization name: must be at most 100 characters"),
        ("Acme", "not an email", PASSWORD, "Email: is not an email address"),
        ("Acme", "ada@example.com", "short", "Password: must be at least 10 characters"),
        ("Acme", "", PASSWORD, "Email: must not be empty"),
    ];
    for (org, email, password, message) in cases {
        let page = browser.sign_up(org, email, password).await?;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{message}");
        assert!(page.body.contains(message), "expected {message:?} in {}", page.body);
        // What was typed is kept (but never the password).
        assert!(!page.body.contains(PASSWORD));
    }
    assert_eq!((count(&app, "organizations").await?, count(&app, "users").await?), (0, 0));

    assert_eq!(browser.sign_up("Acme", "ada@example.com", PASSWORD).await?.status, StatusCode::SEE_OTHER);
    let other = Browser::new(&app)?;
    // A taken address is answered as a free one would be (the owner is mailed instead).
    let duplicate = other.sign_up("Other", "ADA@example.com", PASSWORD).await?;
    assert_eq!(duplicate.status, StatusCode::OK);
    assert!(duplicate.body.contains("Check your mail"), "{}", duplicate.body);
    assert_eq!((count(&app, "organizations").await?, count(&app, "users").await?), (1, 1));

    // A project name that is too long: a message, no project.
    let long = "p".repeat(101);
    let page = browser.submit("/projects", "/projects", &[("name", &long), ("default_budget", "0")]).await?;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("Name: must be 1 to 100 characters"), "{}", page.body);
    assert_eq!(count(&app, "projects").await?, 0);
    // Not a form at all: a clear 4xx, no 500.
    let raw =
        browser.client.post(app.url("/projects")).body("{}").header("content-type", "application/json").send().await?;
    assert!(raw.status().is_client_error(), "{}", raw.status());
    app.stop().await
}

async fn forms_without_the_session_csrf_token_are_refused(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let browser = Browser::new(&app)?;
    browser.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let missing = browser.post("/projects", &[("name", "Sneaky"), ("default_budget", "0")]).await?;
    assert_eq!(missing.status, StatusCode::FORBIDDEN);
    // A token from another session (an attacker's own) does not work either.
    let attacker = Browser::new(&app)?;
    let foreign = attacker.get("/login").await?.csrf();
    assert!(!foreign.is_empty());
    let forged = browser.post("/projects", &[("csrf", &foreign), ("name", "Sneaky"), ("default_budget", "0")]).await?;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert!(forged.body.contains("This form has expired"), "{}", forged.body);
    assert_eq!(count(&app, "projects").await?, 0);
    // Logging in cannot be forced by a cross-site form either.
    let login = attacker.post("/login", &[("email", "ada@example.com"), ("password", PASSWORD)]).await?;
    assert_eq!(login.status, StatusCode::FORBIDDEN);
    app.stop().await
}

async fn repeated_wrong_passwords_are_throttled(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    Browser::new(&app)?.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let browser = Browser::new(&app)?;
    for _ in 0..accounts::MAX_LOGINS_PER_ADDRESS_AND_EMAIL {
        assert_eq!(browser.log_in("ada@example.com", "wrong password!").await?.status, StatusCode::UNAUTHORIZED);
    }
    // Now even the right password waits out the window.
    let throttled = browser.log_in("ada@example.com", PASSWORD).await?;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(throttled.body.contains("Too many failed attempts"), "{}", throttled.body);
    // Another account is not locked by this one's failures.
    Browser::new(&app)?.sign_up("Other", "bob@example.com", PASSWORD).await?;
    let bob = Browser::new(&app)?;
    assert_eq!(bob.log_in("bob@example.com", PASSWORD).await?.status, StatusCode::SEE_OTHER);
    app.stop().await
}

async fn a_password_reset_link_works_once(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    Browser::new(&app)?.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let browser = Browser::new(&app)?;
    // The same answer for a known and an unknown email.
    for email in ["ada@example.com", "nobody@example.com"] {
        let page = browser.submit("/password/forgot", "/password/forgot", &[("email", email)]).await?;
        assert_eq!(page.status, StatusCode::OK);
        assert!(page.body.contains("If an account exists for that email"), "{}", page.body);
    }
    assert_eq!(count(&app, "password_resets").await?, 1);
    // The link the operator would relay (written to the log; minted here the same way).
    let token = accounts::start_password_reset(&app.state.db, "ada@example.com").await?.unwrap_or_default();
    let form = browser.get(&format!("/password/reset?token={token}")).await?;
    assert_eq!(form.status, StatusCode::OK);
    assert_eq!(field_value(&form.body, "token").as_deref(), Some(token.as_str()));
    let short =
        browser.post("/password/reset", &[("csrf", &form.csrf()), ("token", &token), ("password", "short")]).await?;
    assert_eq!(short.status, StatusCode::BAD_REQUEST);
    let new_password = "a brand new password";
    let done = browser
        .post("/password/reset", &[("csrf", &form.csrf()), ("token", &token), ("password", new_password)])
        .await?;
    assert_eq!(done.location.as_deref(), Some("/login?reset=1"), "{}", done.body);
    let again = browser
        .post("/password/reset", &[("csrf", &form.csrf()), ("token", &token), ("password", "yet another password")])
        .await?;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert!(again.body.contains("expired or was used already"), "{}", again.body);
    assert_eq!(browser.log_in("ada@example.com", PASSWORD).await?.status, StatusCode::UNAUTHORIZED);
    assert_eq!(browser.log_in("ada@example.com", new_password).await?.status, StatusCode::SEE_OTHER);
    app.stop().await
}

async fn changing_the_password_needs_the_current_one(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let browser = Browser::new(&app)?;
    browser.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let wrong = browser
        .submit("/account", "/account/password", &[("current", "nope nope nope"), ("new", "another password")])
        .await?;
    assert_eq!(wrong.status, StatusCode::BAD_REQUEST);
    assert!(wrong.body.contains("current password is not correct"), "{}", wrong.body);
    let ok =
        browser.submit("/account", "/account/password", &[("current", PASSWORD), ("new", "another password")]).await?;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(ok.body.contains("Your password was changed."));
    let fresh = Browser::new(&app)?;
    assert_eq!(fresh.log_in("ada@example.com", PASSWORD).await?.status, StatusCode::UNAUTHORIZED);
    assert_eq!(fresh.log_in("ada@example.com", "another password").await?.status, StatusCode::SEE_OTHER);
    app.stop().await
}

async fn pages_need_a_login_and_send_safe_headers(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let browser = Browser::new(&app)?;
    for path in ["/projects", "/account", "/audit", "/projects/prj_0190c2a4-0000-7000-8000-000000000000"] {
        let page = browser.get(path).await?;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{path}");
        assert!(page.location.as_deref().is_some_and(|l| l.starts_with("/login?next=")), "{path}");
    }
    let response = browser.client.get(app.url("/login")).send().await?;
    let headers = response.headers();
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(headers["content-security-policy"].to_str()?.contains("default-src 'self'"));
    // The login form's CSRF token is in a cookie of its own: no session before a login.
    let cookies: Vec<String> =
        headers.get_all(SET_COOKIE).iter().filter_map(|v| v.to_str().ok()).map(str::to_owned).collect();
    assert!(cookies.len() == 1 && cookies[0].starts_with("tollgate_form="), "{cookies:?}");
    assert!(cookies[0].contains("HttpOnly") && cookies[0].contains("SameSite=Strict"), "{cookies:?}");
    assert!(!cookies[0].contains("Secure"), "plain HTTP in development: {cookies:?}");
    let css = browser.client.get(app.url("/static/app.css")).send().await?;
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
    assert_eq!(browser.client.get(app.url("/static/nope.js")).send().await?.status(), StatusCode::NOT_FOUND);
    // Login only follows paths of this site.
    let signed_up = browser
        .client
        .post(app.url("/signup"))
        .form(&[
            ("csrf", browser.get("/signup").await?.csrf().as_str()),
            ("org_name", "Acme"),
            ("email", "ada@example.com"),
            ("password", PASSWORD),
        ])
        .send()
        .await?;
    let cookie = signed_up.headers().get(SET_COOKIE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(cookie.starts_with("tollgate_session="), "{cookie}");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP in development: {cookie}");
    let csrf = browser.get("/projects").await?.csrf();
    browser.post("/logout", &[("csrf", &csrf)]).await?;
    let csrf = browser.get("/login").await?.csrf();
    let page = browser
        .post(
            "/login",
            &[("csrf", &csrf), ("email", "ada@example.com"), ("password", PASSWORD), ("next", "//evil.example")],
        )
        .await?;
    assert_eq!(page.location.as_deref(), Some("/projects"));
    // The session id is stored hashed, never as the cookie carries it.
    let stored: Vec<String> =
        with_db!(&app.state.db, pool => sqlx::query_scalar("SELECT id_hash FROM sessions").fetch_all(pool).await)?;
    assert!(!stored.is_empty() && stored.iter().all(|h| h.len() == 64));
    app.stop().await
}

async fn another_organizations_project_is_not_found(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let created = ada.submit("/projects", "/projects", &[("name", "Secret plans"), ("default_budget", "0")]).await?;
    let path = created.location.unwrap_or_default();
    let bob = Browser::new(&app)?;
    bob.sign_up("Globex", "bob@example.com", PASSWORD).await?;
    let page = bob.get(&path).await?;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    assert!(!page.body.contains("Secret plans"));
    assert!(!bob.get("/projects").await?.body.contains("Secret plans"));
    assert!(!bob.get("/audit").await?.body.contains("Secret plans"));
    assert_eq!(bob.get("/projects/not-an-id").await?.status, StatusCode::NOT_FOUND);
    let ada_projects = projects::list_projects(
        &app.state.db,
        &accounts::memberships(&app.state.db, &{
            let user: tollgate_core::ids::UserId = with_db!(&app.state.db, pool => sqlx::query_scalar(
            "SELECT id FROM users WHERE email = 'ada@example.com'").fetch_one(pool).await)?;
            user
        })
        .await?[0]
            .org_id,
    )
    .await?;
    assert_eq!(ada_projects.len(), 1);
    app.stop().await
}

/// The secret shown once after creating a key.
pub(crate) fn shown_key(html: &str) -> Option<String> {
    let start = html.find("id=\"new-key\">")? + "id=\"new-key\">".len();
    let end = html[start..].find('<')? + start;
    Some(html[start..end].trim().to_owned())
}

async fn a_key_made_in_the_dashboard_works_on_the_proxy_until_revoked(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let mock = MockProvider::start().await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project_path = ada
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let providers = format!("{project_path}/providers");
    let keys = format!("{project_path}/keys");

    // A connection: the credential is required, and never shown again once saved.
    let fields = |key: &'static str| {
        vec![("kind", "openai_compatible"), ("name", "mock"), ("api_key", key), ("models", "mock-*")]
    };
    let mut missing = fields("");
    let base = mock.base_url();
    missing.push(("base_url", &base));
    let page = ada.submit(&providers, &providers, &missing).await?;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("API key: must not be empty"), "{}", page.body);
    let mut good = fields("sk-upstream-secret-123");
    good.push(("base_url", &base));
    let added = ada.submit(&providers, &providers, &good).await?;
    assert_eq!(added.status, StatusCode::SEE_OTHER, "{}", added.body);
    let listed = ada.get(&providers).await?;
    assert!(listed.body.contains(&base) && listed.body.contains("mock-*"), "{}", listed.body);
    assert!(!listed.body.contains("sk-upstream-secret-123"), "a saved credential was shown");
    let sealed: String = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT api_key_sealed FROM provider_connections").fetch_one(pool).await)?;
    assert!(!sealed.contains("sk-upstream-secret-123"), "the credential is stored in clear");

    // A key, shown once.
    let created = ada.submit(&keys, &keys, &[("name", "backend"), ("kind", "secret")]).await?;
    assert_eq!(created.status, StatusCode::OK);
    let key = shown_key(&created.body).unwrap_or_default();
    assert!(key.starts_with("tg_sk_"), "{}", created.body);
    let again = ada.get(&keys).await?;
    assert!(!again.body.contains(&key), "the key was shown a second time");
    assert!(again.body.contains(&key[..12]), "the list shows the prefix");

    // It works on the proxy (with a price for the mock's model)...
    let project_id = tollgate_core::ids::ProjectId::parse(project_path.trim_start_matches("/projects/"))
        .ok_or_else(|| anyhow::anyhow!("project id in {project_path}"))?;
    let price = tollgate_core::pricing::Price {
        input: 0,
        cached_input: 0,
        output: 1_000_000_000_000,
        cache_write: 0,
        max_output_tokens: 100,
        tokenizer: tollgate_core::pricing::Tokenizer::O200kBase,
    };
    projects::set_price(&app.state.db, &project_id, "mock-model", &price).await?;
    let budget = tollgate_core::money::Nanos(1_000_000_000);
    let month = tollgate_core::period::BudgetPeriod::Month;
    projects::upsert_customer_budget(&app.state.db, &project_id, "c1", budget, month).await?;
    let call = || {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-tollgate-customer", "c1")
            .json(&serde_json::json!({"model": "mock-model", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let ok = call().await?;
    assert_eq!(ok.status(), StatusCode::OK, "{}", ok.text().await?);
    assert_eq!(mock.credentials()[0].0, "Bearer sk-upstream-secret-123");

    // ...until revoked in one click, with immediate effect.
    let key_id = with_db!(&app.state.db, pool => sqlx::query_scalar::<_, String>(
        "SELECT id FROM api_keys").fetch_one(pool).await)?;
    let page = ada.get(&keys).await?;
    let revoked = ada.post(&format!("{keys}/{key_id}/revoke"), &[("csrf", &page.csrf())]).await?;
    assert_eq!(revoked.location.as_deref(), Some(keys.as_str()));
    assert_eq!(call().await?.status(), StatusCode::UNAUTHORIZED);
    assert!(ada.get(&keys).await?.body.contains("revoked"));
    assert!(ada.get("/audit").await?.body.contains("key.revoked"));

    // Another organization can neither see nor touch any of it.
    let bob = Browser::new(&app)?;
    bob.sign_up("Globex", "bob@example.com", PASSWORD).await?;
    assert_eq!(bob.get(&keys).await?.status, StatusCode::NOT_FOUND);
    assert_eq!(bob.get(&providers).await?.status, StatusCode::NOT_FOUND);
    let csrf = bob.get("/projects").await?.csrf();
    let provider_id = with_db!(&app.state.db, pool => sqlx::query_scalar::<_, String>(
        "SELECT id FROM provider_connections").fetch_one(pool).await)?;
    let denied = bob.post(&format!("{providers}/{provider_id}/delete"), &[("csrf", &csrf)]).await?;
    assert_eq!(denied.status, StatusCode::NOT_FOUND);
    assert_eq!(count(&app, "provider_connections").await?, 1);
    app.stop().await
}

async fn settings_and_prices_are_checked_saved_and_audited(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project_path = ada
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let settings = format!("{project_path}/settings");
    let shown = ada.get(&settings).await?;
    assert_eq!(field_value(&shown.body, "markup").as_deref(), Some("0.00"), "{}", shown.body);
    assert_eq!(
        field_value(&shown.body, "default_max_output_tokens").as_deref(),
        Some("4096"),
        "a new project's default"
    );

    let form = |markup: &'static str, budget: &'static str, default_customer: &'static str| -> Vec<(&str, &str)> {
        vec![
            ("name", "Chat v2"),
            ("policy", "reject"),
            ("min_output_tokens", "32"),
            ("default_max_output_tokens", "2048"),
            ("markup", markup),
            ("default_budget", budget),
            ("default_period", "day"),
            ("customer_from_user", "on"),
            ("default_customer", default_customer),
            ("estimate_margin", "15"),
        ]
    };
    let bad = ada.submit(&settings, &settings, &form("lots", "-3", "")).await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("Markup: must be a percentage"), "{}", bad.body);
    assert!(bad.body.contains("value=\"lots\""), "what was typed is shown again");
    let bad = ada.submit(&settings, &settings, &form("20", "-3", "")).await?;
    assert!(bad.body.contains("Default budget: must not be negative"), "{}", bad.body);
    let too_long: &'static str = Box::leak("x".repeat(201).into_boxed_str());
    let bad = ada.submit(&settings, &settings, &form("20", "5", too_long)).await?;
    assert!(bad.body.contains("Default customer: must be 1 to 200"), "{}", bad.body);
    let mut below_minimum = form("20", "5", "");
    below_minimum[3].1 = "31";
    let bad = ada.submit(&settings, &settings, &below_minimum).await?;
    assert!(bad.body.contains("Default max output: must not be below the minimum"), "{}", bad.body);
    below_minimum[3].1 = "many";
    let bad = ada.submit(&settings, &settings, &below_minimum).await?;
    assert!(bad.body.contains("Default max output: must be a whole number"), "{}", bad.body);
    let unchanged: (String, i64) = with_db!(&app.state.db, pool => sqlx::query_as(
        "SELECT name, markup_bps FROM projects").fetch_one(pool).await)?;
    assert_eq!(unchanged, ("Chat".to_owned(), 0), "a rejected form saved something");

    let saved = ada.submit(&settings, &settings, &form("12.5", "2.50", "house")).await?;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    let after = ada.get(saved.location.as_deref().unwrap_or_default()).await?;
    assert!(after.body.contains("Settings saved."), "{}", after.body);
    assert_eq!(field_value(&after.body, "markup").as_deref(), Some("12.50"));
    assert_eq!(field_value(&after.body, "default_max_output_tokens").as_deref(), Some("2048"));
    let default: Option<i64> = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT default_max_output_tokens FROM projects").fetch_one(pool).await)?;
    assert_eq!(default, Some(2_048));
    let row: (String, String, i64, i64, i64, String, bool, Option<String>, i64) = with_db!(&app.state.db, pool => sqlx::query_as(
        "SELECT name, budget_policy, min_output_tokens, markup_bps, default_budget_nanos, default_budget_period, \
         customer_from_user, default_customer, estimate_margin_bps FROM projects").fetch_one(pool).await)?;
    assert_eq!(
        row,
        ("Chat v2".into(), "reject".into(), 32, 1_250, 2_500_000_000, "day".into(), true, Some("house".into()), 1_500)
    );
    let audit = ada.get("/audit").await?;
    assert!(audit.body.contains("markup 0.00 % → 12.50 %"), "{}", audit.body);
    assert!(audit.body.contains("default max output 4096 → 2048"), "{}", audit.body);

    // Prices: checked, saved, listed, removed.
    let prices = format!("{project_path}/prices");
    let price = |input: &'static str| {
        vec![
            ("model", "my-model"),
            ("input", input),
            ("output", "10"),
            ("cached_input", ""),
            ("cache_write", ""),
            ("max_output_tokens", "4096"),
        ]
    };
    let bad = ada.submit(&prices, &prices, &price("cheap")).await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("Input: must be an amount per million tokens"), "{}", bad.body);
    assert_eq!(count(&app, "price_overrides").await?, 0);
    let ok = ada.submit(&prices, &prices, &price("2.50")).await?;
    assert_eq!(ok.status, StatusCode::SEE_OTHER, "{}", ok.body);
    let listed = ada.get(&prices).await?;
    assert!(listed.body.contains("my-model") && listed.body.contains("2.50"), "{}", listed.body);
    let stored: (i64, i64, i64) = with_db!(&app.state.db, pool => sqlx::query_as(
        "SELECT input, cached_input, output FROM price_overrides").fetch_one(pool).await)?;
    assert_eq!(stored, (2_500_000_000, 2_500_000_000, 10_000_000_000));
    let removed = ada.post(&format!("{prices}/delete"), &[("csrf", &listed.csrf()), ("model", "my-model")]).await?;
    assert_eq!(removed.status, StatusCode::SEE_OTHER);
    assert_eq!(count(&app, "price_overrides").await?, 0);

    // Deleting needs the name typed.
    let delete = format!("{project_path}/delete");
    let refused = ada.submit(&settings, &delete, &[("confirm", "Chat")]).await?;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(count(&app, "projects").await?, 1);
    let deleted = ada.submit(&settings, &delete, &[("confirm", "Chat v2")]).await?;
    assert_eq!(deleted.location.as_deref(), Some("/projects"));
    assert_eq!(count(&app, "projects").await?, 0);
    assert_eq!(ada.get(&settings).await?.status, StatusCode::NOT_FOUND);
    app.stop().await
}

/// A project (made through the dashboard) with a mock connection, a price that makes a
/// call's cost its output tokens × 0.001, and a key; returns (project path, key).
pub(crate) async fn project_with_traffic(
    browser: &Browser<'_>,
    mock: &MockProvider,
) -> anyhow::Result<(String, String)> {
    let project_path = browser
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let providers = format!("{project_path}/providers");
    let base = mock.base_url();
    let fields = [
        ("kind", "openai_compatible"),
        ("name", "mock"),
        ("api_key", "sk-up"),
        ("models", "mock-*"),
        ("base_url", base.as_str()),
    ];
    browser.submit(&providers, &providers, &fields).await?;
    let prices = format!("{project_path}/prices");
    let price = [("model", "mock-model"), ("input", "0"), ("output", "1000"), ("max_output_tokens", "100")];
    let set = browser.submit(&prices, &prices, &price).await?;
    anyhow::ensure!(set.status == StatusCode::SEE_OTHER, "price: {}", set.body);
    let keys = format!("{project_path}/keys");
    let key = shown_key(&browser.submit(&keys, &keys, &[("name", "app"), ("kind", "secret")]).await?.body)
        .unwrap_or_default();
    Ok((project_path, key))
}

async fn customers_are_managed_and_their_spend_shown(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let mock = MockProvider::start().await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let (project_path, key) = project_with_traffic(&ada, &mock).await?;
    let customers_path = format!("{project_path}/customers");

    let form = |budget: &'static str| {
        vec![
            ("external_id", "cust-42"),
            ("name", "Grace"),
            ("email", "grace@example.com"),
            ("budget", budget),
            ("period", "month"),
        ]
    };
    let bad = ada.submit(&customers_path, &customers_path, &form("a lot")).await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("Budget: must be an amount"), "{}", bad.body);
    assert_eq!(count(&app, "customers").await?, 0);
    let created = ada.submit(&customers_path, &customers_path, &form("0.05")).await?;
    assert_eq!(created.status, StatusCode::SEE_OTHER, "{}", created.body);
    let customer_path = created.location.unwrap_or_default();
    let page = ada.get(&customer_path).await?;
    assert!(page.body.contains("Grace") && page.body.contains("0.05 USD"), "{}", page.body);

    // Calls until one is refused: 0.05 pays for 2 calls of 20 tokens (0.02 each), not a third.
    let call = || {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-tollgate-customer", "cust-42")
            .json(&serde_json::json!({"model": "mock-model", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    // Reject is what makes the third call a refusal rather than a clamped call.
    let settings = format!("{project_path}/settings");
    let shown = ada.get(&settings).await?;
    let keep = |name: &str| field_value(&shown.body, name).unwrap_or_default();
    let (min, markup, budget, margin) =
        (keep("min_output_tokens"), keep("markup"), keep("default_budget"), keep("estimate_margin"));
    let saved = ada
        .submit(
            &settings,
            &settings,
            &[
                ("name", "Chat"),
                ("policy", "reject"),
                ("min_output_tokens", &min),
                ("markup", &markup),
                ("default_budget", &budget),
                ("default_period", "month"),
                ("default_customer", ""),
                ("estimate_margin", &margin),
            ],
        )
        .await?;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    assert_eq!(call().await?.status(), StatusCode::OK);
    assert_eq!(call().await?.status(), StatusCode::OK);
    let refusal = call().await?;
    assert_eq!(refusal.status(), StatusCode::PAYMENT_REQUIRED);
    let request_id = refusal.headers()["x-request-id"].to_str()?.to_owned();

    let page = ada.get(&customer_path).await?;
    assert!(
        page.body.contains(&format!("<code class=\"request-id\">{request_id}</code>")),
        "support matches a call by the request id its client saw: {}",
        page.body
    );
    assert!(
        page.body.contains("id=\"spent\"><span class=\"money\" title=\"0.04 USD\">0.04 USD</span>"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("id=\"remaining\"><span class=\"money\" title=\"0.01 USD\">0.01 USD</span>"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("refused</span> insufficient budget"),
        "the refused call is marked with why: {}",
        page.body
    );
    assert!(page.body.contains("<svg class=\"chart\""));
    assert!(page.body.contains("<code>mock-model</code>"), "spend by model: {}", page.body);
    let overview = ada.get(&project_path).await?;
    assert!(overview.body.contains("cust-42") && overview.body.contains("0.04 USD"), "{}", overview.body);

    // Blocking takes effect on the proxy at once; unblocking lifts it.
    let csrf = page.csrf();
    assert_eq!(ada.post(&format!("{customer_path}/block"), &[("csrf", &csrf)]).await?.status, StatusCode::SEE_OTHER);
    assert_eq!(call().await?.status(), StatusCode::FORBIDDEN);
    assert!(ada.get(&customer_path).await?.body.contains("badge blocked"));
    assert_eq!(ada.post(&format!("{customer_path}/unblock"), &[("csrf", &csrf)]).await?.status, StatusCode::SEE_OTHER);
    // Edited: a bigger budget, and the call goes through again.
    let edit = ada.submit(&customer_path, &customers_path, &form("1")).await?;
    assert_eq!(edit.status, StatusCode::SEE_OTHER);
    assert_eq!(call().await?.status(), StatusCode::OK);
    assert_eq!(count(&app, "customers").await?, 1, "editing created a second customer");

    let bob = Browser::new(&app)?;
    bob.sign_up("Globex", "bob@example.com", PASSWORD).await?;
    assert_eq!(bob.get(&customer_path).await?.status, StatusCode::NOT_FOUND);
    assert_eq!(bob.get(&customers_path).await?.status, StatusCode::NOT_FOUND);
    app.stop().await
}

async fn the_customer_list_searches_sorts_and_pages(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project_path = ada
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let project = tollgate_core::ids::ProjectId::parse(project_path.trim_start_matches("/projects/"))
        .ok_or_else(|| anyhow::anyhow!("project id"))?;
    for i in 0..60 {
        let input = tollgate_core::customers::CustomerInput {
            external_id: format!("cust-{i:02}"),
            name: Some(if i == 7 { "Grace Hopper".to_owned() } else { format!("Customer {i}") }),
            email: None,
            budget: tollgate_core::money::Nanos(1_000_000_000),
            period: tollgate_core::period::BudgetPeriod::Month,
        };
        tollgate_core::customers::save(&app.state.db, &project, &input).await?;
    }
    let list = format!("{project_path}/customers");
    let first = ada.get(&format!("{list}?sort=id")).await?;
    assert!(first.body.contains("60 customers") && first.body.contains("Page 1 of 2"), "{}", first.body);
    assert!(first.body.contains(">cust-00<") && !first.body.contains(">cust-55<"));
    let second = ada.get(&format!("{list}?sort=id&page=2")).await?;
    assert!(second.body.contains(">cust-55<") && !second.body.contains(">cust-00<"));
    let found = ada.get(&format!("{list}?q=grace")).await?;
    assert!(found.body.contains("1 customer matching") && found.body.contains(">cust-07<"), "{}", found.body);
    // Wildcards are searched for literally.
    assert!(ada.get(&format!("{list}?q=%25")).await?.body.contains("0 customers"));
    let newest = ada.get(&format!("{list}?sort=newest")).await?;
    let pos = |html: &str, id: &str| html.find(&format!(">{id}<")).unwrap_or(usize::MAX);
    assert!(pos(&newest.body, "cust-59") < pos(&newest.body, "cust-10"), "newest first");
    app.stop().await
}

fn invite_link(html: &str) -> Option<String> {
    let start = html.find("id=\"invite-link\">")? + "id=\"invite-link\">".len();
    let end = html[start..].find('<')? + start;
    let link = html[start..end].trim().replace("&amp;", "&");
    link.find("/invite?").map(|i| link[i..].to_owned())
}

async fn members_are_invited_and_roles_are_enforced(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;

    // The last owner can be neither demoted nor removed.
    let ada_id: String = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT id FROM users WHERE email = 'ada@example.com'").fetch_one(pool).await)?;
    let demoted = ada.submit("/members", &format!("/members/{ada_id}/role"), &[("role", "viewer")]).await?;
    assert_eq!(demoted.status, StatusCode::BAD_REQUEST);
    assert!(demoted.body.contains("at least one owner"), "{}", demoted.body);
    let removed = ada.submit("/members", &format!("/members/{ada_id}/remove"), &[]).await?;
    assert!(removed.body.contains("at least one owner"), "{}", removed.body);

    // Invite Bob as a viewer; he signs up through the link.
    let bad = ada.submit("/members", "/members/invite", &[("email", "not-an-email"), ("role", "viewer")]).await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let invited =
        ada.submit("/members", "/members/invite", &[("email", "Bob@Example.com"), ("role", "viewer")]).await?;
    assert_eq!(invited.status, StatusCode::OK, "{}", invited.body);
    let link = invite_link(&invited.body).ok_or_else(|| anyhow::anyhow!("no link in {}", invited.body))?;
    assert!(ada.get("/members").await?.body.contains("bob@example.com"), "pending invitation listed");
    let bob = Browser::new(&app)?;
    let page = bob.get(&link).await?;
    assert!(page.body.contains("Join Acme") && page.body.contains("viewer"), "{}", page.body);
    let token = field_value(&page.body, "token").unwrap_or_default();
    let short = bob.post("/invite/signup", &[("csrf", &page.csrf()), ("token", &token), ("password", "short")]).await?;
    assert_eq!(short.status, StatusCode::BAD_REQUEST);
    assert!(short.body.contains("Password: must be at least 10"), "{}", short.body);
    let joined =
        bob.post("/invite/signup", &[("csrf", &page.csrf()), ("token", &token), ("password", PASSWORD)]).await?;
    assert_eq!(joined.location.as_deref(), Some("/projects"), "{}", joined.body);
    assert!(bob.get("/projects").await?.body.contains("bob@example.com (viewer)"));
    // The link works once.
    let again = Browser::new(&app)?.get(&link).await?;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);

    // A viewer sees but cannot change anything.
    let project_path = ada
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    assert!(bob.get(&project_path).await?.body.contains("<h1>Chat</h1>"));
    let listing = bob.get("/projects").await?;
    assert!(!listing.body.contains("New project"), "a viewer is not offered the form");
    let refused =
        bob.post("/projects", &[("csrf", &listing.csrf()), ("name", "Mine"), ("default_budget", "0")]).await?;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    for (path, fields) in [
        (format!("{project_path}/keys"), vec![("name", "k"), ("kind", "secret")]),
        (format!("{project_path}/customers"), vec![("external_id", "c"), ("budget", "1"), ("period", "month")]),
        ("/members/invite".to_owned(), vec![("email", "eve@example.com"), ("role", "admin")]),
    ] {
        let mut form = vec![("csrf", listing.csrf())];
        form.extend(fields.into_iter().map(|(k, v)| (k, v.to_owned())));
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(bob.post(&path, &form).await?.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(
        (count(&app, "projects").await?, count(&app, "api_keys").await?, count(&app, "customers").await?),
        (1, 0, 0)
    );

    // Promoted to admin, Bob can.
    let bob_id: String = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT id FROM users WHERE email = 'bob@example.com'").fetch_one(pool).await)?;
    let promoted = ada.submit("/members", &format!("/members/{bob_id}/role"), &[("role", "admin")]).await?;
    assert_eq!(promoted.status, StatusCode::SEE_OTHER, "{}", promoted.body);
    assert_eq!(
        bob.submit("/projects", "/projects", &[("name", "Bob's"), ("default_budget", "0")]).await?.status,
        StatusCode::SEE_OTHER
    );
    // Admins do not manage members.
    assert_eq!(bob.submit("/members", &format!("/members/{ada_id}/remove"), &[]).await?.status, StatusCode::FORBIDDEN);

    // An existing account accepts with the invited email only.
    let carol = Browser::new(&app)?;
    carol.sign_up("Initech", "carol@example.com", PASSWORD).await?;
    let for_dave =
        ada.submit("/members", "/members/invite", &[("email", "dave@example.com"), ("role", "viewer")]).await?;
    let dave_link = invite_link(&for_dave.body).unwrap_or_default();
    let page = carol.get(&dave_link).await?;
    let wrong = carol
        .post(
            "/invite/accept",
            &[("csrf", &page.csrf()), ("token", &field_value(&page.body, "token").unwrap_or_default())],
        )
        .await?;
    assert_eq!(wrong.status, StatusCode::BAD_REQUEST);
    assert!(wrong.body.contains("This invitation is for dave@example.com"), "{}", wrong.body);
    let for_carol =
        ada.submit("/members", "/members/invite", &[("email", "carol@example.com"), ("role", "admin")]).await?;
    let page = carol.get(&invite_link(&for_carol.body).unwrap_or_default()).await?;
    let token = field_value(&page.body, "token").unwrap_or_default();
    let accepted = carol.post("/invite/accept", &[("csrf", &page.csrf()), ("token", &token)]).await?;
    assert_eq!(accepted.location.as_deref(), Some("/projects"), "{}", accepted.body);
    let now_in_acme = carol.get("/projects").await?;
    assert!(
        now_in_acme.body.contains("Chat") && now_in_acme.body.contains("carol@example.com (admin)"),
        "{}",
        now_in_acme.body
    );
    assert!(now_in_acme.body.contains("Initech"), "both organizations are offered in the switcher");

    // Removing a member ends their access.
    let removed = ada.submit("/members", &format!("/members/{bob_id}/remove"), &[]).await?;
    assert_eq!(removed.status, StatusCode::SEE_OTHER);
    assert_eq!(bob.get(&project_path).await?.status, StatusCode::FORBIDDEN);
    let audit = ada.get("/audit").await?;
    for action in ["member.invited", "member.joined", "member.role_changed", "member.removed"] {
        assert!(audit.body.contains(action), "{action} missing from the audit log");
    }
    app.stop().await
}

async fn every_page_and_action_of_another_organization_is_not_found(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let mock = MockProvider::start().await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let (project, _) = project_with_traffic(&ada, &mock).await?;
    let customer = ada
        .submit(
            &format!("{project}/customers"),
            &format!("{project}/customers"),
            &[("external_id", "c1"), ("budget", "1"), ("period", "month")],
        )
        .await?
        .location
        .unwrap_or_default();
    let invited = ada.submit("/members", "/members/invite", &[("email", "x@example.com"), ("role", "viewer")]).await?;
    assert_eq!(invited.status, StatusCode::OK);
    let db = app.state.db.clone();
    let one = |sql: &'static str| {
        let db = db.clone();
        async move { anyhow::Ok(with_db!(&db, pool => sqlx::query_scalar::<_, String>(sql).fetch_one(pool).await)?) }
    };
    let key_id = one("SELECT id FROM api_keys").await?;
    let provider_id = one("SELECT id FROM provider_connections").await?;
    let invitation_id = one("SELECT id FROM invitations").await?;
    let ada_id = one("SELECT id FROM users WHERE email = 'ada@example.com'").await?;

    let mallory = Browser::new(&app)?;
    mallory.sign_up("Evil Corp", "mallory@example.com", PASSWORD).await?;
    for path in [
        project.clone(),
        format!("{project}/keys"),
        format!("{project}/providers"),
        format!("{project}/prices"),
        format!("{project}/settings"),
        format!("{project}/customers"),
        format!("{project}/alerts"),
        format!("{project}/billing"),
        format!("{project}/api"),
        format!("{project}/analytics"),
        format!("{project}/analytics.csv?by=customer"),
        customer.clone(),
        format!("{project}/keys/{key_id}/revoke"),
        format!("{project}/providers/{provider_id}/delete"),
        format!("{customer}/block"),
        format!("{project}/alerts/secret"),
        format!("{project}/billing/disconnect"),
        format!("{project}/delete"),
    ] {
        let page = mallory.get(&path).await?;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "GET {path}");
        assert!(!page.body.contains("Chat"), "GET {path} leaked the project's name");
    }
    let csrf = mallory.get("/projects").await?.csrf();
    let posts: Vec<(String, Vec<(&str, &str)>)> = vec![
        (format!("{project}/keys"), vec![("name", "k"), ("kind", "secret")]),
        (format!("{project}/keys/{key_id}/revoke"), vec![]),
        (format!("{project}/providers"), vec![("kind", "openai"), ("api_key", "k"), ("models", "x")]),
        (format!("{project}/providers/{provider_id}/delete"), vec![]),
        (
            format!("{project}/prices"),
            vec![("model", "m"), ("input", "1"), ("output", "1"), ("max_output_tokens", "1")],
        ),
        (format!("{project}/prices/delete"), vec![("model", "mock-model")]),
        (
            format!("{project}/settings"),
            vec![
                ("name", "Pwned"),
                ("policy", "clamp"),
                ("min_output_tokens", "1"),
                ("markup", "0"),
                ("default_budget", "0"),
                ("default_period", "month"),
                ("estimate_margin", "0"),
            ],
        ),
        (format!("{project}/delete"), vec![("confirm", "Chat")]),
        (format!("{project}/customers"), vec![("external_id", "c1"), ("budget", "99"), ("period", "month")]),
        (format!("{project}/alerts"), vec![("thresholds", "1"), ("webhook_url", "https://evil.example/")]),
        (format!("{project}/alerts/secret"), vec![]),
        (
            format!("{project}/billing"),
            vec![("secret_key", "rk_test_51Hmallory000"), ("webhook_secret", "whsec_mallory_000000000000")],
        ),
        (format!("{project}/billing/disconnect"), vec![]),
        (format!("{project}/billing/connect-stripe"), vec![]),
        (format!("{customer}/block"), vec![]),
        (format!("{customer}/unblock"), vec![]),
        (format!("/members/{ada_id}/role"), vec![("role", "viewer")]),
        (format!("/members/{ada_id}/remove"), vec![]),
        (format!("/invitations/{invitation_id}/revoke"), vec![]),
    ];
    for (path, fields) in posts {
        let mut form = vec![("csrf", csrf.as_str())];
        form.extend(fields);
        let page = mallory.post(&path, &form).await?;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "POST {path}: {}", page.body);
    }
    // Nothing of Acme's changed.
    let state: (String, i64, i64, i64, i64, i64) = with_db!(&app.state.db, pool => sqlx::query_as(
        "SELECT p.name, (SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL), (SELECT COUNT(*) FROM provider_connections), \
         (SELECT COUNT(*) FROM price_overrides), (SELECT budget_nanos FROM customers), (SELECT COUNT(*) FROM invitations) \
         FROM projects p").fetch_one(pool).await)?;
    assert_eq!(state, ("Chat".to_owned(), 1, 1, 1, 1_000_000_000, 1));
    let role: String = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT role FROM memberships WHERE user_id = $1").bind(&ada_id).fetch_one(pool).await)?;
    assert_eq!(role, "owner");
    app.stop().await
}

/// The path and query of the first Tollgate link in a mail.
fn mailed_path(text: &str, prefix: &str) -> Option<String> {
    let start = text.find(prefix)?;
    let end = text[start..].find(char::is_whitespace).map_or(text.len(), |e| start + e);
    Some(text[start..end].to_owned())
}

async fn reset_links_and_invitations_are_mailed_when_smtp_is_configured(db: TestDatabase) -> TestResult {
    let smtp = FakeSmtp::start().await?;
    let url = smtp.url();
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_SMTP_URL".into(), url);
        env.insert("TOLLGATE_SMTP_FROM".into(), "Tollgate <no-reply@example.com>".into());
    })
    .await?;
    // With mail, even the first account confirms its address through the mailed link.
    let ada = Browser::new(&app)?;
    let signed_up = ada
        .submit("/signup", "/signup", &[("org_name", "Acme"), ("email", "ada@example.com"), ("password", PASSWORD)])
        .await?;
    assert!(signed_up.body.contains("Check your mail"), "{}", signed_up.body);
    let confirmation = smtp.mail_to("ada@example.com").await?;
    assert!(confirmation.text().contains("Subject: Confirm your Tollgate account"), "{}", confirmation.text());
    let path = mailed_path(&confirmation.text(), "/verify?token=")
        .ok_or_else(|| anyhow::anyhow!("no link: {}", confirmation.text()))?;
    let asked = ada.get(&path).await?;
    assert!(asked.location.as_deref().is_some_and(|l| l.starts_with("/login?next=/verify")), "{:?}", asked.location);
    let login = ada.get(asked.location.as_deref().unwrap_or_default()).await?;
    let back = ada
        .post(
            "/login",
            &[
                ("csrf", &login.csrf()),
                ("email", "ada@example.com"),
                ("password", PASSWORD),
                ("next", &field_value(&login.body, "next").unwrap_or_default().replace("&amp;", "&")),
            ],
        )
        .await?;
    assert_eq!(back.location.as_deref(), Some(path.as_str()), "{}", back.body);
    assert!(ada.get(&path).await?.body.contains("Your email address is confirmed."));

    let stranger = Browser::new(&app)?;
    stranger.submit("/password/forgot", "/password/forgot", &[("email", "ada@example.com")]).await?;
    let mail = smtp.mail_to_with("ada@example.com", "Subject: Reset your Tollgate password").await?;
    assert!(mail.text().contains("Subject: Reset your Tollgate password"), "{}", mail.text());
    assert!(mail.text().contains("From: Tollgate <no-reply@example.com>"), "{}", mail.text());
    let path = mailed_path(&mail.text(), "/password/reset?token=")
        .ok_or_else(|| anyhow::anyhow!("no link: {}", mail.text()))?;
    let form = stranger.get(&path).await?;
    let token = field_value(&form.body, "token").unwrap_or_default();
    let done = stranger
        .post("/password/reset", &[("csrf", &form.csrf()), ("token", &token), ("password", "mailed new password")])
        .await?;
    assert_eq!(done.location.as_deref(), Some("/login?reset=1"), "{}", done.body);
    // The reset ended every session of the account, this browser's too.
    assert!(ada.get("/members").await?.location.is_some_and(|l| l.starts_with("/login")));
    assert_eq!(ada.log_in("ada@example.com", "mailed new password").await?.status, StatusCode::SEE_OTHER);

    // No mail for an unknown address (and the page says the same as for a known one).
    stranger.submit("/password/forgot", "/password/forgot", &[("email", "nobody@example.com")]).await?;
    ada.submit("/members", "/members/invite", &[("email", "bob@example.com"), ("role", "viewer")]).await?;
    let invitation = smtp.mail_to("bob@example.com").await?;
    assert!(invitation.text().contains("Subject: Join Acme on Tollgate"), "{}", invitation.text());
    let path = mailed_path(&invitation.text(), "/invite?token=").ok_or_else(|| anyhow::anyhow!("no link"))?;
    assert!(Browser::new(&app)?.get(&path).await?.body.contains("Join Acme"));
    assert!(smtp.mails().iter().all(|m| !m.recipients.iter().any(|r| r.contains("nobody@"))));
    app.stop().await
}

async fn alerts_are_set_checked_and_their_deliveries_logged(db: TestDatabase) -> TestResult {
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_WORKERS".into(), "true".into());
        env.insert("TOLLGATE_WEBHOOKS_ALLOW_PRIVATE".into(), "true".into());
    })
    .await?;
    let mock = MockProvider::start().await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let (project, key) = project_with_traffic(&ada, &mock).await?;
    let alerts_page = format!("{project}/alerts");
    let shown = ada.get(&alerts_page).await?;
    assert_eq!(shown.status, StatusCode::OK);
    // Plainly off until saved: nothing filled in or checked that is not saved.
    assert!(shown.body.contains("Alerts are off"), "{}", shown.body);
    assert_eq!(field_value(&shown.body, "thresholds").as_deref(), Some(""), "{}", shown.body);
    assert!(!shown.body.contains("value=\"on\" checked"), "{}", shown.body);
    assert!(shown.body.contains("No delivery yet"));

    // Each bad field gets a message, and nothing is saved.
    for (fields, message) in [
        (vec![("thresholds", "50, lots")], "Thresholds: \"lots\" is not a whole percentage"),
        (vec![("thresholds", "0")], "Thresholds: 0% is out of range"),
        (vec![("thresholds", "50"), ("webhook_url", "ftp://x.example")], "Webhook URL: must start with https://"),
        (
            vec![("thresholds", "50"), ("email_to", "ops at example")],
            "Email recipients: \"ops\" is not an email address",
        ),
    ] {
        let page = ada.submit(&alerts_page, &alerts_page, &fields).await?;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{fields:?}");
        assert!(
            page.body.contains(&message.replace('"', "&#34;")) || page.body.contains(message),
            "{message}: {}",
            page.body
        );
        assert_eq!(count(&app, "alert_settings").await?, 0);
    }

    // A receiver that is not listening: the delivery fails and the log says why.
    let fields =
        [("thresholds", "50"), ("on_refused", "on"), ("webhook_url", "http://127.0.0.1:9/hook"), ("email_to", "")];
    let saved = ada.submit(&alerts_page, &alerts_page, &fields).await?;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    let shown = ada.get(&alerts_page).await?;
    // The saved state is what is shown.
    assert!(
        shown.body.contains("Alerts are on:") && shown.body.contains("reaches 50% of its budget"),
        "{}",
        shown.body
    );
    assert_eq!(field_value(&shown.body, "thresholds").as_deref(), Some("50"), "{}", shown.body);
    assert!(shown.body.contains("value=\"on\" checked"), "{}", shown.body);
    let secret = shown
        .body
        .split("id=\"webhook-secret\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap_or_default()
        .to_owned();
    assert!(secret.starts_with("tgwhsec_"), "{}", shown.body);
    ada.submit(&alerts_page, &format!("{alerts_page}/secret"), &[]).await?;
    let rolled = ada.get(&alerts_page).await?;
    assert!(!rolled.body.contains(&secret), "the secret was not rolled");

    let customers = format!("{project}/customers");
    ada.submit(&customers, &customers, &[("external_id", "c1"), ("budget", "0.01"), ("period", "month")]).await?;
    let call = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-tollgate-customer", "c1")
        .json(&serde_json::json!({"model": "mock-model", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await?;
    assert_eq!(call.status(), StatusCode::OK);
    let mut body = String::new();
    // Within a minute: a delivery whose queued job is slow to be taken is queued again by the
    // scan after 30 s (on a loaded machine that sweep is what delivers it).
    for _ in 0..120 {
        body = ada.get(&alerts_page).await?.body;
        if body.contains("could not reach the receiver") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(body.contains("50% of budget"), "{body}");
    assert!(body.contains("webhook: http://127.0.0.1:9/hook"), "{body}");
    assert!(body.contains("could not reach the receiver"), "{body}");
    assert!(body.contains("next attempt"), "{body}");
    let audit = ada.get("/audit").await?.body;
    assert!(audit.contains("alerts.settings_changed") && audit.contains("alerts.secret_rolled"), "{audit}");
    app.stop().await
}

async fn stripe_is_connected_on_the_billing_page_and_events_listed(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project = ada
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let billing = format!("{project}/billing");
    let shown = ada.get(&billing).await?;
    assert_eq!(shown.status, StatusCode::OK);
    assert!(shown.body.contains("Not connected to Stripe"), "{}", shown.body);
    let project_id = project.trim_start_matches("/projects/");
    assert!(shown.body.contains(&format!("/stripe/webhooks/{project_id}")), "{}", shown.body);

    const WHSEC: &str = "whsec_test_0123456789abcdef0123";
    for (key, secret, message) in [
        ("pk_test_51Habcdefgh1234", WHSEC, "Secret key: must be a Stripe secret or restricted key"),
        ("rk_test_51Habcdefgh1234", "nope", "Webhook signing secret: must be the endpoint"),
    ] {
        let page = ada.submit(&billing, &billing, &[("secret_key", key), ("webhook_secret", secret)]).await?;
        assert_eq!(page.status, StatusCode::BAD_REQUEST);
        assert!(page.body.contains(message), "{message}: {}", page.body);
        assert_eq!(count(&app, "stripe_connections").await?, 0);
    }
    let saved =
        ada.submit(&billing, &billing, &[("secret_key", "rk_test_51Habcdefgh1234"), ("webhook_secret", WHSEC)]).await?;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    let shown = ada.get(&billing).await?.body;
    assert!(shown.contains("rk_test_…1234") && shown.contains("<dt>Mode</dt><dd>test"), "{shown}");
    assert!(!shown.contains("rk_test_51Habcdefgh1234") && !shown.contains(WHSEC), "a secret was shown");

    // Stripe delivers an event to the endpoint the page names; the page lists it.
    let body = serde_json::json!({"id": "evt_dash_1", "object": "event", "type": "invoice.finalized",
        "livemode": false, "created": 1_795_000_000, "data": {"object": {"id": "in_1"}}})
    .to_string();
    let now = tollgate_core::time::UnixMillis::now().0 / 1000;
    let delivered = app
        .client
        .post(app.url(&format!("/stripe/webhooks/{project_id}")))
        .header("stripe-signature", tollgate_core::signature::header(WHSEC, now, body.as_bytes()))
        .body(body)
        .send()
        .await?;
    assert_eq!(delivered.status(), StatusCode::OK);
    let shown = ada.get(&billing).await?.body;
    assert!(shown.contains("evt_dash_1") && shown.contains("invoice.finalized"), "{shown}");

    let disconnected = ada.submit(&billing, &format!("{billing}/disconnect"), &[]).await?;
    assert_eq!(disconnected.status, StatusCode::SEE_OTHER);
    assert_eq!(count(&app, "stripe_connections").await?, 0);
    let audit = ada.get("/audit").await?.body;
    assert!(audit.contains("stripe.connected") && audit.contains("stripe.disconnected"), "{audit}");
    app.stop().await
}

async fn the_api_reference_is_rendered_from_the_openapi_document(db: TestDatabase) -> TestResult {
    // (Plain HTTP: with https the session cookie would be Secure, and this client would drop it.)
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_PUBLIC_URL".into(), "http://gate.example.com".into());
    })
    .await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project = ada
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let overview = ada.get(&project).await?;
    assert!(overview.body.contains(&format!("href=\"{project}/api\"")), "the project nav links the reference");
    let page = ada.get(&format!("{project}/api")).await?;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    // Every operation of the served document is on the page, with its method, path and summary.
    let document: serde_json::Value = app.get("/api/v1/openapi.json").await?.json().await?;
    let mut operations = 0;
    for (path, item) in document["paths"].as_object().into_iter().flatten() {
        for (method, operation) in item.as_object().into_iter().flatten() {
            operations += 1;
            let anchor = operation["operationId"].as_str().unwrap_or_default();
            let section = page.body.split(&format!("id=\"{anchor}\"")).nth(1).unwrap_or_default();
            assert!(
                section.contains(&format!("{}</span> <code>{path}</code>", method.to_uppercase())),
                "{method} {path}"
            );
            let summary = operation["summary"].as_str().unwrap_or_default().replace('\'', "&#39;");
            assert!(section.contains(&summary), "{method} {path}: {summary}");
            for status in operation["responses"].as_object().into_iter().flatten().map(|(s, _)| s) {
                assert!(section.contains(&format!(">{status}</span>")), "{method} {path}: {status}");
            }
        }
    }
    assert_eq!(operations, 15);
    for schema in document["components"]["schemas"].as_object().into_iter().flatten().map(|(name, _)| name) {
        assert!(page.body.contains(&format!("id=\"schema-{schema}\"")), "schema {schema}");
    }
    assert!(page.body.contains("href=\"/api/v1/openapi.json\""));
    assert!(page.body.contains("Authorization: Bearer"));
    // Examples use this Tollgate's public URL.
    assert!(page.body.contains("curl -X POST http://gate.example.com/api/v1/customers \\"), "{}", page.body);
    assert!(!page.body.contains("<script"), "the CSP allows no script");
    app.stop().await
}

async fn nul_characters_in_forms_get_a_message_not_an_error(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project = ada
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let keys = format!("{project}/keys");
    let customers = format!("{project}/customers");
    let providers = format!("{project}/providers");
    for (page, fields) in [
        (keys.as_str(), vec![("name", "web\0app"), ("kind", "secret")]),
        (
            customers.as_str(),
            vec![("external_id", "c1"), ("email", "a\0@b.example"), ("budget", "1"), ("period", "month")],
        ),
        (providers.as_str(), vec![("kind", "openai"), ("name", "x\0"), ("api_key", "sk"), ("models", "gpt-*")]),
        ("/projects", vec![("name", "Chat\0 2"), ("default_budget", "0")]),
    ] {
        let answer = ada.submit(page, page, &fields).await?;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{page}: {}", answer.body);
        assert!(answer.body.contains("NUL character"), "{page}: {}", answer.body);
    }
    assert_eq!(count(&app, "api_keys").await?, 0);
    assert_eq!(count(&app, "customers").await?, 0);
    assert_eq!(count(&app, "provider_connections").await?, 0);
    assert_eq!(count(&app, "projects").await?, 1);
    app.stop().await
}

async fn test_connection_asks_stripe_and_shows_the_answer(db: TestDatabase) -> TestResult {
    let fake = crate::fake_stripe::FakeStripe::start(&[("rk_test_51Hgoodkey1234", "acct_tenant1")]).await?;
    let base = fake.base_url();
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_STRIPE_API_BASE".into(), base);
    })
    .await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project = ada
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let billing = format!("{project}/billing");
    let check = format!("{billing}/check");
    let connect = |key: &'static str| {
        let (ada, billing) = (&ada, billing.clone());
        async move {
            let fields = [("secret_key", key), ("webhook_secret", "whsec_test_0123456789abcdef0123")];
            let page = ada.submit(&billing, &billing, &fields).await?;
            anyhow::ensure!(page.status == StatusCode::SEE_OTHER, "{}", page.body);
            anyhow::Ok(())
        }
    };
    let last_check = |body: &str| {
        body.split("id=\"last-check\">").nth(1).and_then(|r| r.split("</dd>").next()).unwrap_or_default().to_owned()
    };

    connect("rk_test_51Hgoodkey1234").await?;
    assert!(last_check(&ada.get(&billing).await?.body).contains("never"));
    assert_eq!(ada.submit(&billing, &check, &[]).await?.status, StatusCode::SEE_OTHER);
    let shown = last_check(&ada.get(&billing).await?.body);
    assert!(shown.contains("passed") && shown.contains("restricted key, test mode"), "{shown}");
    // A restricted key is checked through list calls its permissions allow, not GET /v1/account.
    let seen = fake.seen();
    let listed = tollgate_jobs::stripe_check::RESTRICTED_KEY_PERMISSIONS.iter().filter(|(_, _, p)| p.is_some()).count();
    assert_eq!(seen.len(), listed, "one list call per permission that has one: {seen:?}");
    for call in &seen {
        assert!(call.method == "GET" && call.path != "/v1/account", "{call:?}");
        assert_eq!((call.key.as_deref(), call.account.as_deref()), (Some("rk_test_51Hgoodkey1234"), None));
    }

    connect("rk_test_51Hrevoked0000").await?;
    ada.submit(&billing, &check, &[]).await?;
    let shown = last_check(&ada.get(&billing).await?.body);
    assert!(shown.contains("failed") && shown.contains("Stripe answered 401: Invalid API Key provided"), "{shown}");
    assert!(!shown.contains("rk_test_51Hrevoked0000"), "the key was shown: {shown}");

    connect("rk_test_51Hgoodkey1234").await?;
    fake.stop();
    ada.submit(&billing, &check, &[]).await?;
    let shown = last_check(&ada.get(&billing).await?.body);
    assert!(shown.contains("Stripe could not be reached"), "{shown}");
    app.stop().await
}

/// The proxy keeps prices and providers for two seconds; a change made in the dashboard
/// applies to the very next call all the same.
async fn price_and_provider_changes_apply_to_the_next_call(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let mock = MockProvider::start().await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let (project_path, key) = project_with_traffic(&ada, &mock).await?;
    let customers = format!("{project_path}/customers");
    let customer = [("external_id", "cust-1"), ("budget", "1.00"), ("period", "month")];
    assert_eq!(ada.submit(&customers, &customers, &customer).await?.status, StatusCode::SEE_OTHER);
    let call = || async {
        let response = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-tollgate-customer", "cust-1")
            .json(&serde_json::json!({"model": "mock-model", "max_tokens": 20,
                "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
            .await?;
        let status = response.status();
        let cost = response.headers().get("x-tollgate-cost").and_then(|v| v.to_str().ok()).map(str::to_owned);
        anyhow::Ok((status, cost, response.text().await?))
    };
    let (status, cost, body) = call().await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(cost.as_deref(), Some("0.02"));

    let prices = format!("{project_path}/prices");
    let price = [("model", "mock-model"), ("input", "0"), ("output", "2000"), ("max_output_tokens", "100")];
    assert_eq!(ada.submit(&prices, &prices, &price).await?.status, StatusCode::SEE_OTHER);
    let (_, cost, body) = call().await?;
    assert_eq!(cost.as_deref(), Some("0.04"), "the new price, at once: {body}");

    // Remove: the page links to the confirmation page, whose form does it.
    let page = ada.get(&format!("{project_path}/providers")).await?;
    let delete = page
        .body
        .split("href=\"")
        .map(|r| r.split('"').next().unwrap_or_default())
        .find(|a| a.ends_with("/delete") && a.contains("/providers/"));
    let delete = delete.ok_or_else(|| anyhow::anyhow!("no provider on the page"))?.to_owned();
    let confirmation = ada.get(&delete).await?;
    assert!(confirmation.body.contains(&format!("action=\"{delete}\"")), "{}", confirmation.body);
    let removed = ada.submit(&delete, &delete, &[]).await?;
    assert_eq!(removed.status, StatusCode::SEE_OTHER, "{}", removed.body);
    let (status, _, body) = call().await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("model_not_routed"), "{body}");
    app.stop().await
}

// ---------------------------------------------------------------------------------------
// Polish: confirmation pages, the current tab, no inline styles, the HTML 404, billing's
// warnings and modes.

/// Templates carry no `style=` attribute (the CSP refuses inline styles): each is read from
/// `templates/` as it is now.
async fn no_template_has_an_inline_style() -> TestResult {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    let mut read = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("html") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        read += 1;
        let lower = text.to_ascii_lowercase();
        assert!(!lower.contains("style="), "{} has an inline style attribute", path.display());
        assert!(!lower.contains("<style"), "{} has a <style> element", path.display());
        assert!(!lower.contains("<script>"), "{} has an inline script", path.display());
    }
    assert!(read > 20, "only {read} templates found in {}", dir.display());
    Ok(())
}

pub fn plain_cases() -> Vec<crate::helpers::PlainCase> {
    crate::plain_cases![no_template_has_an_inline_style]
}

/// The confirmation page at `action` (a GET): it explains, holds the real form posting to
/// `action` with the session's CSRF token, a danger button and a Cancel link to `back`.
async fn assert_confirmation_page(browser: &Browser<'_>, action: &str, back: &str, says: &str) -> TestResult {
    let page = browser.get(action).await?;
    assert_eq!(page.status, StatusCode::OK, "GET {action}: {}", page.body);
    let form = page.body.split("id=\"confirm-form\"").nth(1).unwrap_or_default();
    assert!(page.body.contains(&format!("<form method=\"post\" action=\"{action}\"")), "{action}: {}", page.body);
    assert!(form.contains("name=\"csrf\" value=\"") && !page.csrf().is_empty(), "{action}: {form}");
    assert!(form.contains("class=\"danger\""), "{action}: {form}");
    assert!(form.contains(&format!("<a href=\"{back}\" class=\"cancel\">Cancel</a>")), "{action}: {form}");
    assert!(page.body.contains(says), "{action} does not say {says:?}: {}", page.body);
    // The POST still needs the session's token.
    let forged = browser.post(action, &[("confirm", "x")]).await?;
    assert_eq!(forged.status, StatusCode::FORBIDDEN, "POST {action} without a CSRF token");
    Ok(())
}

async fn irreversible_actions_are_confirmed_on_a_page_of_their_own(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project = ada
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let (keys, providers, alerts, billing, settings) = (
        format!("{project}/keys"),
        format!("{project}/providers"),
        format!("{project}/alerts"),
        format!("{project}/billing"),
        format!("{project}/settings"),
    );
    ada.submit(&keys, &keys, &[("name", "backend"), ("kind", "secret")]).await?;
    let added = ada
        .submit(
            &providers,
            &providers,
            &[("kind", "openai"), ("name", "main"), ("api_key", "sk-upstream"), ("models", "gpt-*")],
        )
        .await?;
    assert_eq!(added.status, StatusCode::SEE_OTHER, "{}", added.body);
    let customer = ada
        .submit(
            &format!("{project}/customers"),
            &format!("{project}/customers"),
            &[("external_id", "c1"), ("budget", "1"), ("period", "month")],
        )
        .await?
        .location
        .unwrap_or_default();
    assert_eq!(ada.submit(&alerts, &alerts, &[("thresholds", "50")]).await?.status, StatusCode::SEE_OTHER);
    let fields = [("secret_key", "rk_test_51Hgoodkey1234"), ("webhook_secret", "whsec_test_0123456789abcdef0123")];
    assert_eq!(ada.submit(&billing, &billing, &fields).await?.status, StatusCode::SEE_OTHER);
    let one = |sql: &'static str| {
        let db = app.state.db.clone();
        async move { anyhow::Ok(with_db!(&db, pool => sqlx::query_scalar::<_, String>(sql).fetch_one(pool).await)?) }
    };
    let key_id = one("SELECT id FROM api_keys").await?;
    let provider_id = one("SELECT id FROM provider_connections").await?;
    let secret = one("SELECT webhook_secret_sealed FROM alert_settings").await.unwrap_or_default();

    let cases = [
        (keys.clone(), format!("{keys}/{key_id}/revoke"), "are refused from now on"),
        (providers.clone(), format!("{providers}/{provider_id}/delete"), "Its credential is deleted"),
        (customer.clone(), format!("{customer}/block"), "Every call for this customer is refused"),
        (alerts.clone(), format!("{alerts}/secret"), "the old one no longer verifies"),
        (billing.clone(), format!("{billing}/disconnect"), "Usage not yet delivered to Stripe is not sent"),
        (settings.clone(), format!("{project}/delete"), "name to confirm."),
    ];
    for (page, action, says) in &cases {
        // The page links to the confirmation; no form there does it in one click.
        let body = ada.get(page).await?.body;
        assert!(body.contains(&format!("href=\"{action}\"")), "{page} has no link to {action}: {body}");
        assert!(!body.contains(&format!("action=\"{action}\"")), "{page} still does {action} in one click");
        assert_confirmation_page(&ada, action, page, says).await?;
    }
    // Nothing happened yet.
    let state: (i64, i64, bool, i64, i64) = with_db!(&app.state.db, pool => sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL), (SELECT COUNT(*) FROM provider_connections), \
         (SELECT blocked FROM customers), (SELECT COUNT(*) FROM stripe_connections), (SELECT COUNT(*) FROM projects)")
        .fetch_one(pool).await)?;
    assert_eq!(state, (1, 1, false, 1, 1));
    assert_eq!(one("SELECT webhook_secret_sealed FROM alert_settings").await.unwrap_or_default(), secret);

    // Confirmed: each form of a confirmation page does what the button said.
    for (_, action, _) in cases.iter().filter(|(_, a, _)| !a.ends_with(&format!("{project}/delete"))) {
        let done = ada.submit(action, action, &[]).await?;
        assert_eq!(done.status, StatusCode::SEE_OTHER, "POST {action}: {}", done.body);
    }
    let state: (i64, i64, bool, i64) = with_db!(&app.state.db, pool => sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL), (SELECT COUNT(*) FROM provider_connections), \
         (SELECT blocked FROM customers), (SELECT COUNT(*) FROM stripe_connections)").fetch_one(pool).await)?;
    assert_eq!(state, (0, 0, true, 0));
    assert_ne!(one("SELECT webhook_secret_sealed FROM alert_settings").await.unwrap_or_default(), secret);
    // A revoked key, a removed provider, a blocked customer, no connection: nothing to confirm.
    for action in [format!("{keys}/{key_id}/revoke"), format!("{billing}/disconnect")] {
        assert_eq!(ada.get(&action).await?.status, StatusCode::NOT_FOUND, "GET {action}");
    }
    let body = ada.get(&customer).await?.body;
    assert!(body.contains(&format!("action=\"{customer}/unblock\"")), "unblocking is one click: {body}");

    // Deleting the project needs its name typed on the confirmation page.
    let delete = format!("{project}/delete");
    let wrong = ada.submit(&delete, &delete, &[("confirm", "Chatt")]).await?;
    assert_eq!(wrong.status, StatusCode::BAD_REQUEST);
    assert!(wrong.body.contains("Type the project&#39;s name exactly") || wrong.body.contains("name exactly"));
    assert!(wrong.body.contains("id=\"confirm-form\""), "the confirmation page again: {}", wrong.body);
    assert_eq!(count(&app, "projects").await?, 1);
    let deleted = ada.submit(&delete, &delete, &[("confirm", "Chat")]).await?;
    assert_eq!(deleted.location.as_deref(), Some("/projects"), "{}", deleted.body);
    assert_eq!(count(&app, "projects").await?, 0);
    app.stop().await
}

async fn the_current_tab_is_marked(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project = ada
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let customer = ada
        .submit(
            &format!("{project}/customers"),
            &format!("{project}/customers"),
            &[("external_id", "c1"), ("budget", "1"), ("period", "month")],
        )
        .await?
        .location
        .unwrap_or_default();
    let tabs = [
        "",
        "/customers",
        "/calls",
        "/keys",
        "/providers",
        "/prices",
        "/alerts",
        "/billing",
        "/settings",
        "/analytics",
        "/api",
    ];
    let marked = |body: &str| -> Vec<(String, String)> {
        body.split("<a href=\"")
            .skip(1)
            .filter_map(|a| {
                let (href, rest) = a.split_once('"')?;
                // A date range's current preset (a query on the page's own path) is not a tab.
                if href.contains('?') {
                    return None;
                }
                let tag_end = rest.find('>')?;
                let current = rest[..tag_end].split("aria-current=\"").nth(1)?.split('"').next()?;
                Some((href.to_owned(), current.to_owned()))
            })
            .collect()
    };
    for tab in tabs {
        let path = format!("{project}{tab}");
        let page = ada.get(&path).await?;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        let expected = vec![("/projects".to_owned(), "true".to_owned()), (path.clone(), "page".to_owned())];
        assert_eq!(marked(&page.body), expected, "{path}");
    }
    // A page within a tab marks the tab as where the member is, not as the page.
    let expected =
        vec![("/projects".to_owned(), "true".to_owned()), (format!("{project}/customers"), "true".to_owned())];
    assert_eq!(marked(&ada.get(&customer).await?.body), expected);
    let expected =
        vec![("/projects".to_owned(), "true".to_owned()), (format!("{project}/settings"), "true".to_owned())];
    assert_eq!(marked(&ada.get(&format!("{project}/delete")).await?.body), expected);
    // The main navigation.
    for section in ["/projects", "/members", "/audit", "/account"] {
        assert_eq!(marked(&ada.get(section).await?.body), vec![(section.to_owned(), "page".to_owned())], "{section}");
    }
    let css = app.get("/static/app.css").await?.text().await?;
    assert!(css.contains("a[aria-current]"), "the current tab has no style");
    app.stop().await
}

async fn unknown_urls_answer_html_to_browsers_and_json_to_clients(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let client = reqwest::Client::new();
    let html = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    let get = |path: &str, accept: Option<&'static str>| {
        let mut request = client.get(app.url(path));
        if let Some(accept) = accept {
            request = request.header(reqwest::header::ACCEPT, accept);
        }
        request.send()
    };
    for path in ["/no/such/page", "/projects/prj_nope/keys/x/y/z", "/static-files"] {
        let answer = get(path, Some(html)).await?;
        assert_eq!(answer.status(), StatusCode::NOT_FOUND, "{path}");
        let kind = answer.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(kind.starts_with("text/html"), "{path}: {kind}");
        let csp = answer.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(csp.contains("default-src 'self'"), "{path}: {csp}");
        let body = answer.text().await?;
        assert!(body.contains("<h1>Not found</h1>") && body.contains("href=\"/\""), "{path}: {body}");
    }
    // API clients, and every path of the proxy, the API and Stripe's endpoints, get JSON.
    for (path, accept) in [
        ("/no/such/page", Some("application/json")),
        ("/no/such/page", None),
        ("/v1/no-such-endpoint", Some(html)),
        ("/api/v1/no-such-thing", Some(html)),
        ("/stripe/nothing", Some(html)),
    ] {
        let answer = get(path, accept).await?;
        assert_eq!(answer.status(), StatusCode::NOT_FOUND, "{path} {accept:?}");
        let kind = answer.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(kind.contains("json"), "{path} {accept:?}: {kind}");
        let body: serde_json::Value = answer.json().await?;
        // The API answers its own problem document; the others the error object.
        let kind = if path.starts_with("/api/") { &body["title"] } else { &body["error"]["type"] };
        assert!(kind == "not_found" || kind == "Not found", "{path} {accept:?}: {body}");
    }
    app.stop().await
}

async fn billing_shows_the_mode_the_account_reached_and_an_unreachable_public_url(db: TestDatabase) -> TestResult {
    let fake = crate::fake_stripe::FakeStripe::start(&[("sk_test_51Hsecretkey0001", "acct_tenant7")]).await?;
    let base = fake.base_url();
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_STRIPE_API_BASE".into(), base);
    })
    .await?;
    assert!(app.state.config.public_url.starts_with("http://"), "{}", app.state.config.public_url);
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project = ada
        .submit("/projects", "/projects", &[("name", "Chat"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let billing = format!("{project}/billing");
    let page = ada.get(&billing).await?.body;
    let warning = page.split("id=\"public-url-warning\">").nth(1).and_then(|r| r.split("</p>").next());
    let warning = warning.unwrap_or_default();
    assert!(
        warning.contains(&app.state.config.public_url) && warning.contains("public HTTPS URL"),
        "no warning about an http public URL: {page}"
    );
    assert!(page.contains("Stripe cannot reach this URL"), "{page}");
    assert!(!page.contains("id=\"stripe-mode\""), "a mode before any connection");

    let fields = [("secret_key", "sk_test_51Hsecretkey0001"), ("webhook_secret", "whsec_test_0123456789abcdef0123")];
    assert_eq!(ada.submit(&billing, &billing, &fields).await?.status, StatusCode::SEE_OTHER);
    let page = ada.get(&billing).await?.body;
    assert!(page.contains("<span class=\"badge test\" id=\"stripe-mode\">test mode</span>"), "{page}");
    // Test connection names the account it reached.
    let checked = ada.submit(&billing, &format!("{billing}/check"), &[]).await?;
    assert_eq!(checked.status, StatusCode::SEE_OTHER, "{}", checked.body);
    let page = ada.get(&billing).await?.body;
    let shown = page.split("id=\"last-check\">").nth(1).and_then(|r| r.split("</dd>").next()).unwrap_or_default();
    assert!(shown.contains("passed") && shown.contains("account acct_tenant7"), "{shown}");
    assert!(shown.contains("Tenant Co") && shown.contains("billing@tenant.example"), "{shown}");
    assert!(shown.contains("test mode"), "{shown}");
    fake.stop();
    app.stop().await
}

async fn usage_from_before_stripe_was_connected_is_shown_apart(db: TestDatabase) -> TestResult {
    use tollgate_jobs::billing as jobs;
    let b = crate::billing::billing_setup_with(&db, |_| {}).await?;
    // Two calls before Stripe is connected, one after, all of one customer.
    b.calls("cust-a", 2, 10).await?;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    b.connect_with_key().await?;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    b.calls("cust-a", 1, 10).await?;
    b.provision().await?;
    let state = &b.s.app.state;
    let billed: Vec<i64> = with_db!(&state.db, pool => sqlx::query_scalar::<_, i64>(
        "SELECT billed_nanos FROM usage_events WHERE status = 'settled' ORDER BY created_at").fetch_all(pool).await)?;
    assert_eq!(billed.len(), 3);
    let before = tollgate_core::billing::before_connection(
        &state.db,
        &b.s.project.id,
        tollgate_core::billing::provision_status(&state.db, &b.s.project.id)
            .await?
            .map(|p| p.created_at)
            .unwrap_or_default(),
    )
    .await?;
    assert_eq!((before.events, before.nanos), (2, billed[0] + billed[1]));

    let page = b.billing_page().await?;
    let shown = page.split("id=\"delivery-before\">").nth(1).and_then(|r| r.split("</dd>").next());
    let shown = shown.unwrap_or_default();
    assert!(shown.contains("2 calls") && shown.contains("not billed"), "{page}");
    let waiting = page.split("id=\"delivery-waiting\">").nth(1).and_then(|r| r.split("</dd>").next());
    assert!(waiting.unwrap_or_default().starts_with("1 calls"), "{page}");

    // "Not yet delivered" counts only what is to be delivered: the call after the connection,
    // then nothing once it is delivered.
    jobs::reconcile(&state.db, &b.services).await?;
    let pending = || async {
        anyhow::Ok(with_db!(&state.db, pool => sqlx::query_scalar::<_, i64>(
            "SELECT pending_nanos FROM billing_reconciliations").fetch_one(pool).await)?)
    };
    assert_eq!(pending().await?, billed[2]);
    b.deliver().await?;
    jobs::reconcile(&state.db, &b.services).await?;
    assert_eq!(pending().await?, 0);
    let page = b.billing_page().await?;
    assert!(page.contains("id=\"delivery-before\""), "still shown apart after delivery: {page}");
    Ok(())
}

//! The guided first run, through the dashboard as a newcomer uses it: the overview's checklist
//! completes itself as the project is set up; the snippet shown with a new key works as
//! pasted; a provider connection is tested with a real models call; the prices page lists
//! every shipped price beside the project's own.

use reqwest::StatusCode;
use reqwest::header::{COOKIE, SET_COOKIE};
use tollgate_core::with_db;

use crate::dashboard::{Browser, PASSWORD, field_value, shown_key};
use crate::db_cases;
use crate::helpers::{DbCase, TestApp, TestDatabase, TestResult, spawn_app, spawn_app_with};
use crate::mock_provider::{MODELS, MockProvider};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        the_checklist_completes_itself_as_the_project_is_set_up,
        the_snippet_with_a_new_key_works_as_pasted,
        a_provider_connection_is_tested_with_a_models_call,
        the_prices_page_lists_every_shipped_price_beside_the_projects_own,
        copy_buttons_copy_in_a_real_browser,
    ]
}

/// Whether checklist step `id` is `done` or `todo` on the overview.
fn step(html: &str, id: &str) -> Option<String> {
    let marker = format!("id=\"step-{id}\" class=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')? + start;
    Some(html[start..end].to_owned())
}

/// The list item of checklist step `id`.
fn step_item<'h>(html: &'h str, id: &str) -> &'h str {
    let start = html.find(&format!("id=\"step-{id}\"")).unwrap_or(html.len());
    let end = html[start..].find("</li>").map_or(html.len(), |e| start + e);
    &html[start..end]
}

/// The steps of the checklist, each with its state, in order.
fn steps(html: &str) -> Vec<(&'static str, String)> {
    ["provider", "budget", "key", "first-call", "stripe", "public-url"]
        .into_iter()
        .map(|id| (id, step(html, id).unwrap_or_else(|| "missing".to_owned())))
        .collect()
}

/// Text as it was before askama escaped it for HTML.
fn unescaped(html: &str) -> String {
    html.replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The text of the `<code id="{id}">` element.
fn code(html: &str, id: &str) -> Option<String> {
    let marker = format!("<code id=\"{id}\">");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find("</code>")? + start;
    Some(unescaped(&html[start..end]))
}

/// The words a POSIX shell makes of `text`: quotes, backslash-newline continuations. A
/// variable to expand is an error (the snippet would not be what runs).
pub(crate) fn shell_words(text: &str) -> anyhow::Result<Vec<String>> {
    let (mut words, mut word, mut in_word) = (Vec::new(), String::new(), false);
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(other) => {
                    word.push(other);
                    in_word = true;
                }
                None => anyhow::bail!("a trailing backslash"),
            },
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => word.push(ch),
                        None => anyhow::bail!("an unclosed single quote"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('$' | '`') => anyhow::bail!("an expansion in double quotes"),
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => word.push(ch),
                            Some('\n') => {}
                            Some(ch) => {
                                word.push('\\');
                                word.push(ch);
                            }
                            None => anyhow::bail!("an unclosed double quote"),
                        },
                        Some(ch) => word.push(ch),
                        None => anyhow::bail!("an unclosed double quote"),
                    }
                }
            }
            '$' | '`' | ';' | '|' | '&' | '<' | '>' => anyhow::bail!("shell syntax {c:?} outside quotes"),
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Sends the request a `curl URL -H … -d …` command line sends.
pub(crate) async fn run_curl(client: &reqwest::Client, command: &str) -> anyhow::Result<reqwest::Response> {
    let words = shell_words(command)?;
    anyhow::ensure!(words.first().map(String::as_str) == Some("curl"), "not a curl command: {command}");
    let (mut url, mut headers, mut body) = (None, Vec::new(), None);
    let mut args = words.into_iter().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-H" => {
                let header = args.next().ok_or_else(|| anyhow::anyhow!("-H without a header"))?;
                let (name, value) = header.split_once(':').ok_or_else(|| anyhow::anyhow!("header {header}"))?;
                headers.push((name.trim().to_owned(), value.trim().to_owned()));
            }
            "-d" => body = Some(args.next().ok_or_else(|| anyhow::anyhow!("-d without a body"))?),
            _ if arg.starts_with("http://") || arg.starts_with("https://") => url = Some(arg),
            other => anyhow::bail!("an option this runner does not know: {other}"),
        }
    }
    let url = url.ok_or_else(|| anyhow::anyhow!("no URL in {command}"))?;
    // curl -d sends a POST.
    let mut request = if body.is_some() { client.post(url) } else { client.get(url) };
    for (name, value) in headers {
        request = request.header(name, value);
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    Ok(request.send().await?)
}

async fn new_project(browser: &Browser<'_>, name: &str, budget: &str) -> anyhow::Result<String> {
    let created = browser.submit("/projects", "/projects", &[("name", name), ("default_budget", budget)]).await?;
    anyhow::ensure!(created.status == StatusCode::SEE_OTHER, "{}", created.body);
    Ok(created.location.unwrap_or_default())
}

/// Adds a connection to the mock; `kind` openai_compatible or anthropic.
async fn add_mock_provider(
    browser: &Browser<'_>,
    project: &str,
    mock: &MockProvider,
    kind: &str,
    name: &str,
    key: &str,
) -> anyhow::Result<()> {
    let providers = format!("{project}/providers");
    let base = if kind == "anthropic" { mock.anthropic_base_url() } else { mock.base_url() };
    let fields = [("kind", kind), ("name", name), ("api_key", key), ("models", "mock-*"), ("base_url", &base)];
    let added = browser.submit(&providers, &providers, &fields).await?;
    anyhow::ensure!(added.status == StatusCode::SEE_OTHER, "{}", added.body);
    Ok(())
}

async fn provider_id(app: &TestApp, name: &str) -> anyhow::Result<String> {
    Ok(with_db!(&app.state.db, pool => sqlx::query_scalar::<_, String>(
        "SELECT id FROM provider_connections WHERE name = $1").bind(name).fetch_one(pool).await)?)
}

/// Presses Test beside connection `name`; answers the providers page after it.
async fn test_provider(app: &TestApp, browser: &Browser<'_>, project: &str, name: &str) -> anyhow::Result<String> {
    let providers = format!("{project}/providers");
    let id = provider_id(app, name).await?;
    let tested = browser.submit(&providers, &format!("{providers}/{id}/test"), &[]).await?;
    anyhow::ensure!(tested.status == StatusCode::SEE_OTHER, "{}", tested.body);
    anyhow::ensure!(tested.location == Some(format!("{providers}#provider-{id}")), "{:?}", tested.location);
    Ok(browser.get(&providers).await?.body)
}

/// The row of connection `id` that shows its last test.
fn test_row<'h>(html: &'h str, id: &str) -> &'h str {
    let marker = format!("id=\"provider-{id}\"");
    let start = html.find(&marker).unwrap_or(html.len());
    let end = html[start..].find("</tr>").map_or(html.len(), |e| start + e);
    &html[start..end]
}

async fn set_price(browser: &Browser<'_>, project: &str, model: &str, input: &str, output: &str) -> TestResult {
    let prices = format!("{project}/prices");
    let fields = [("model", model), ("input", input), ("output", output), ("max_output_tokens", "100")];
    let set = browser.submit(&prices, &prices, &fields).await?;
    anyhow::ensure!(set.status == StatusCode::SEE_OTHER, "{}", set.body);
    Ok(())
}

/// `name=value` of every cookie `response` sets.
fn set_cookies(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next().map(str::to_owned))
        .collect()
}

/// Logs in over plain HTTP to an app whose cookies are Secure (its public URL is https),
/// carrying the cookies by hand; answers the Cookie header of the session.
async fn log_in_by_hand(app: &TestApp, email: &str) -> anyhow::Result<String> {
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let page = client.get(app.url("/login")).send().await?;
    let mut cookies = set_cookies(&page);
    let csrf = field_value(&page.text().await?, "csrf").unwrap_or_default();
    let form = [("csrf", csrf.as_str()), ("email", email), ("password", PASSWORD), ("next", "")];
    let login = client.post(app.url("/login")).header(COOKIE, cookies.join("; ")).form(&form).send().await?;
    anyhow::ensure!(login.status() == StatusCode::SEE_OTHER, "{}", login.text().await?);
    cookies.extend(set_cookies(&login));
    Ok(cookies.join("; "))
}

async fn the_checklist_completes_itself_as_the_project_is_set_up(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let mock = MockProvider::start().await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project = new_project(&ada, "Chat", "0").await?;
    let overview = ada.get(&project).await?.body;
    let todo = |id| (id, "todo".to_owned());
    let done = |id| (id, "done".to_owned());
    assert_eq!(
        steps(&overview),
        vec![todo("provider"), todo("budget"), todo("key"), todo("first-call"), todo("stripe"), todo("public-url")],
        "{overview}"
    );
    assert!(overview.contains("Set up: 0 of 6 steps done"), "{overview}");
    // Each step links the page that does it.
    for (id, page) in [
        ("provider", "/providers"),
        ("budget", "/settings"),
        ("key", "/keys"),
        ("first-call", "#first-call"),
        ("stripe", "/billing"),
    ] {
        assert!(step_item(&overview, id).contains(&format!("<a href=\"{project}{page}\">")), "{id}: {overview}");
    }
    assert!(step_item(&overview, "public-url").contains("TOLLGATE_PUBLIC_URL"), "{overview}");

    // A connection is not enough: its test must succeed.
    add_mock_provider(&ada, &project, &mock, "openai_compatible", "mock", "sk-up").await?;
    assert_eq!(step(&ada.get(&project).await?.body, "provider").as_deref(), Some("todo"));
    test_provider(&app, &ada, &project, "mock").await?;
    assert_eq!(step(&ada.get(&project).await?.body, "provider").as_deref(), Some("done"));

    // A default budget above zero.
    let settings = format!("{project}/settings");
    let form = [
        ("name", "Chat"),
        ("policy", "clamp"),
        ("min_output_tokens", "1"),
        ("default_max_output_tokens", "100"),
        ("markup", "0"),
        ("default_budget", "5"),
        ("default_period", "month"),
        ("estimate_margin", "10"),
    ];
    let saved = ada.submit(&settings, &settings, &form).await?;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    assert_eq!(step(&ada.get(&project).await?.body, "budget").as_deref(), Some("done"));

    // A key; revoked, it no longer counts.
    let keys = format!("{project}/keys");
    let created = ada.submit(&keys, &keys, &[("name", "app"), ("kind", "secret")]).await?.body;
    let key = shown_key(&created).unwrap_or_default();
    assert!(key.starts_with("tg_sk_"), "{created}");
    assert_eq!(step(&ada.get(&project).await?.body, "key").as_deref(), Some("done"));

    // The first call.
    set_price(&ada, &project, "mock-model", "0", "1").await?;
    assert_eq!(step(&ada.get(&project).await?.body, "first-call").as_deref(), Some("todo"));
    let call = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-tollgate-customer", "c1")
        .json(&serde_json::json!({"model": "mock-model", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await?;
    assert_eq!(call.status(), StatusCode::OK, "{}", call.text().await?);
    assert_eq!(step(&ada.get(&project).await?.body, "first-call").as_deref(), Some("done"));

    // Stripe.
    let billing = format!("{project}/billing");
    let fields = [("secret_key", "rk_test_51Habcdefgh1234"), ("webhook_secret", "whsec_test_0123456789abcdef0123")];
    let connected = ada.submit(&billing, &billing, &fields).await?;
    assert_eq!(connected.status, StatusCode::SEE_OTHER, "{}", connected.body);
    let overview = ada.get(&project).await?.body;
    assert_eq!(
        steps(&overview),
        vec![done("provider"), done("budget"), done("key"), done("first-call"), done("stripe"), todo("public-url")],
        "{overview}"
    );
    assert!(overview.contains("Set up: 5 of 6 steps done") && !overview.contains("<details"), "{overview}");
    // Revoking the only key undoes its step.
    let key_id = with_db!(&app.state.db, pool => sqlx::query_scalar::<_, String>("SELECT id FROM api_keys")
        .fetch_one(pool).await)?;
    ada.submit(&keys, &format!("{keys}/{key_id}/revoke"), &[]).await?;
    assert_eq!(step(&ada.get(&project).await?.body, "key").as_deref(), Some("todo"));
    ada.submit(&keys, &keys, &[("name", "app 2"), ("kind", "secret")]).await?;
    app.stop().await?;

    // Served at an https:// public URL, every step is done: the list folds to one line.
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_PUBLIC_URL".into(), "https://gateway.example.com".into());
    })
    .await?;
    let cookie = log_in_by_hand(&app, "ada@example.com").await?;
    let overview = app.client.get(app.url(&project)).header(COOKIE, cookie).send().await?.text().await?;
    assert_eq!(step(&overview, "public-url").as_deref(), Some("done"), "{overview}");
    assert!(steps(&overview).iter().all(|(_, state)| state == "done"), "{overview}");
    assert!(overview.contains("<summary>Set up: all 6 steps done</summary>"), "{overview}");
    assert!(!overview.contains("steps done</h2>"), "{overview}");
    assert!(overview.contains("curl https://gateway.example.com/v1/chat/completions"), "{overview}");
    app.stop().await
}

async fn the_snippet_with_a_new_key_works_as_pasted(db: TestDatabase) -> TestResult {
    // The public URL is where this Tollgate listens, so the snippet reaches it as written.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_LISTEN".into(), format!("127.0.0.1:{port}"));
        env.insert("TOLLGATE_PUBLIC_URL".into(), format!("http://127.0.0.1:{port}"));
    })
    .await?;
    let mock = MockProvider::start().await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project = new_project(&ada, "Chat", "5").await?;

    // Before a priced model is connected, the overview says so and names a placeholder.
    let overview = ada.get(&project).await?.body;
    assert!(overview.contains("id=\"snippet-model-warning\""), "{overview}");
    add_mock_provider(&ada, &project, &mock, "openai_compatible", "mock", "sk-up").await?;
    set_price(&ada, &project, "mock-model", "0", "1").await?;
    let overview = ada.get(&project).await?.body;
    assert!(!overview.contains("id=\"snippet-model-warning\""), "{overview}");
    let placeholder = code(&overview, "snippet-curl").unwrap_or_default();
    assert!(placeholder.contains("\"Authorization: Bearer $TOLLGATE_KEY\""), "{placeholder}");
    assert!(placeholder.contains("\"model\":\"mock-model\""), "{placeholder}");

    let keys = format!("{project}/keys");
    let created = ada.submit(&keys, &keys, &[("name", "app"), ("kind", "secret")]).await?.body;
    let key = shown_key(&created).unwrap_or_default();
    assert!(key.starts_with("tg_sk_"), "{created}");
    let curl = code(&created, "snippet-curl").unwrap_or_default();
    assert!(curl.starts_with(&format!("curl http://127.0.0.1:{port}/v1/chat/completions \\\n")), "{curl}");
    assert!(curl.contains(&key), "{curl}");
    let python = code(&created, "snippet-python").unwrap_or_default();
    assert!(python.contains(&format!("api_key=\"{key}\"")), "{python}");
    assert!(python.contains(&format!("base_url=\"http://127.0.0.1:{port}/v1\"")), "{python}");
    assert!(python.contains("model=\"mock-model\""), "{python}");
    let javascript = code(&created, "snippet-javascript").unwrap_or_default();
    assert!(javascript.contains(&format!("apiKey: \"{key}\"")), "{javascript}");
    assert!(javascript.contains("import OpenAI from \"openai\";"), "{javascript}");
    // Copy buttons, for the key and each snippet, from a script of this origin.
    for target in ["new-key", "snippet-curl", "snippet-python", "snippet-javascript"] {
        assert!(created.contains(&format!("data-copy=\"{target}\" hidden>Copy</button>")), "{target}: {created}");
    }
    assert!(created.contains("<script src=\"/static/copy.js\" defer></script>"), "{created}");
    let script = app.get("/static/copy.js").await?;
    assert_eq!(script.status(), StatusCode::OK);
    assert!(script.text().await?.contains("navigator.clipboard"));

    // The curl snippet, run as written, is answered by the mock through Tollgate.
    let answer = run_curl(&app.client, &curl).await?;
    let status = answer.status();
    let body: serde_json::Value = answer.json().await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["choices"][0]["message"]["content"].is_string(), "{body}");
    let sent = mock.requests();
    assert_eq!(sent.last().map(|r| r["model"].clone()), Some(serde_json::json!("mock-model")));
    let customer: Option<String> = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT external_id FROM customers").fetch_optional(pool).await)?;
    assert_eq!(customer.as_deref(), Some("customer-42"));

    // The key is shown once: not again, nor on the overview.
    assert!(!ada.get(&keys).await?.body.contains(&key));
    assert!(!ada.get(&project).await?.body.contains(&key));
    // A publishable key needs a customer token: no snippet with it.
    let publishable = ada.submit(&keys, &keys, &[("name", "web"), ("kind", "publishable")]).await?.body;
    assert!(publishable.contains("id=\"new-key\"") && !publishable.contains("snippet-curl"), "{publishable}");
    app.stop().await
}

async fn a_provider_connection_is_tested_with_a_models_call(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let mock = MockProvider::start().await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project = new_project(&ada, "Chat", "0").await?;
    let providers = format!("{project}/providers");

    add_mock_provider(&ada, &project, &mock, "openai_compatible", "good", "sk-good-upstream-1").await?;
    let good = provider_id(&app, "good").await?;
    let before = ada.get(&providers).await?.body;
    assert!(test_row(&before, &good).contains("not tested"), "{before}");
    let page = test_provider(&app, &ada, &project, "good").await?;
    let row = test_row(&page, &good);
    assert!(row.contains("test passed") && row.contains(&format!("{} models", MODELS.len())), "{page}");
    assert_eq!(mock.credentials().last().map(|c| c.0.clone()).as_deref(), Some("Bearer sk-good-upstream-1"));
    let recorded: (bool, String) = with_db!(&app.state.db, pool => sqlx::query_as(
        "SELECT last_test_ok, last_test_detail FROM provider_connections WHERE id = $1").bind(&good).fetch_one(pool).await)?;
    assert_eq!(recorded, (true, "3 models".to_owned()));

    // Anthropic's models call: x-api-key and anthropic-version.
    add_mock_provider(&ada, &project, &mock, "anthropic", "claude", "sk-ant-upstream-3").await?;
    let page = test_provider(&app, &ada, &project, "claude").await?;
    let row = test_row(&page, &provider_id(&app, "claude").await?).to_owned();
    assert!(row.contains("test passed") && row.contains("3 models"), "{page}");
    let (credential, version) = mock.credentials().last().cloned().unwrap_or_default();
    assert_eq!((credential.as_str(), version.as_deref()), ("sk-ant-upstream-3", Some("2023-06-01")));

    // A key the provider refuses: its status and message, never the key (which it echoes).
    add_mock_provider(&ada, &project, &mock, "openai_compatible", "bad", "sk-invalid-upstream-2").await?;
    let bad = provider_id(&app, "bad").await?;
    let page = test_provider(&app, &ada, &project, "bad").await?;
    let row = test_row(&page, &bad);
    assert!(row.contains("test failed") && row.contains("HTTP 401 Unauthorized"), "{page}");
    assert!(row.contains("Incorrect API key provided"), "{page}");
    assert!(!page.contains("sk-invalid-upstream-2") && !page.contains("sk-good-upstream-1"), "a key was shown");
    let stored: String = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT last_test_detail FROM provider_connections WHERE id = $1").bind(&bad).fetch_one(pool).await)?;
    assert!(!stored.contains("sk-invalid-upstream-2") && stored.starts_with("HTTP 401"), "{stored}");
    // The good connection's test still stands.
    assert!(test_row(&page, &good).contains("test passed"), "{page}");

    // An unreachable provider: the error, recorded as failed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let base = format!("http://{closed}/v1");
    let fields =
        [("kind", "openai_compatible"), ("name", "gone"), ("api_key", "k"), ("models", "x"), ("base_url", &base)];
    ada.submit(&providers, &providers, &fields).await?;
    let page = test_provider(&app, &ada, &project, "gone").await?;
    let row = test_row(&page, &provider_id(&app, "gone").await?).to_owned();
    assert!(row.contains("test failed") && row.contains("could not be reached"), "{page}");

    // Without the CSRF token, or from another organization: refused, nothing recorded.
    let no_csrf = ada.post(&format!("{providers}/{bad}/test"), &[]).await?;
    assert_ne!(no_csrf.status, StatusCode::SEE_OTHER);
    let bob = Browser::new(&app)?;
    bob.sign_up("Globex", "bob@example.com", PASSWORD).await?;
    let csrf = bob.get("/projects").await?.csrf();
    let denied = bob.post(&format!("{providers}/{good}/test"), &[("csrf", &csrf)]).await?;
    assert_eq!(denied.status, StatusCode::NOT_FOUND);
    let bobs = new_project(&bob, "Other", "0").await?;
    let crossed = bob.post(&format!("{bobs}/providers/{good}/test"), &[("csrf", &csrf)]).await?;
    assert_eq!(crossed.status, StatusCode::NOT_FOUND);
    app.stop().await
}

/// The cells of the shipped-prices row of `model`.
fn shipped_row(html: &str, model: &str) -> String {
    let marker = format!("id=\"shipped-{model}\">");
    let start = html.find(&marker).unwrap_or(html.len());
    let end = html[start..].find("</tr>").map_or(html.len(), |e| start + e);
    html[start..end].to_owned()
}

async fn the_prices_page_lists_every_shipped_price_beside_the_projects_own(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let ada = Browser::new(&app)?;
    ada.sign_up("Acme", "ada@example.com", PASSWORD).await?;
    let project = new_project(&ada, "Chat", "0").await?;
    let prices = format!("{project}/prices");
    let page = ada.get(&prices).await?.body;
    for model in tollgate_core::pricing::shipped_models() {
        assert!(page.contains(&format!("id=\"shipped-{model}\">")), "{model} is not listed");
    }
    let row = shipped_row(&page, "gpt-4o");
    assert!(row.contains(">2.50<") && row.contains(">10.00<") && row.contains("—"), "{row}");

    // The project's own price, beside the shipped one.
    set_price(&ada, &project, "gpt-4o", "2", "8.5").await?;
    let row = shipped_row(&ada.get(&prices).await?.body, "gpt-4o");
    assert!(row.contains(">2.50<") && row.contains(">10.00<"), "{row}");
    assert!(row.contains(">2.00<") && row.contains(">8.50<") && !row.contains("—"), "{row}");
    let other = shipped_row(&ada.get(&prices).await?.body, "gpt-4o-mini");
    assert!(other.contains("—"), "{other}");

    // Outside USD: at the project's rate, or not priced without one.
    let euros = ada
        .submit(
            "/projects",
            "/projects",
            &[("name", "Euro"), ("currency", "eur"), ("default_budget", "0"), ("usd_rate", "0.5")],
        )
        .await?
        .location
        .unwrap_or_default();
    let row = shipped_row(&ada.get(&format!("{euros}/prices")).await?.body, "gpt-4o");
    assert!(row.contains(">1.25<") && row.contains(">5.00<"), "{row}");
    let no_rate = ada
        .submit(
            "/projects",
            "/projects",
            &[("name", "Euro without a rate"), ("currency", "eur"), ("default_budget", "0")],
        )
        .await?
        .location
        .unwrap_or_default();
    let page = ada.get(&format!("{no_rate}/prices")).await?.body;
    let row = shipped_row(&page, "gpt-4o");
    assert!(row.contains("not priced: set a USD rate") && !row.contains("2.50"), "{row}");
    app.stop().await
}

/// In headless Chromium (so under the dashboard's CSP): copy.js shows the copy buttons, and a
/// button copies its text, by the clipboard API or, without one, by selecting it.
async fn copy_buttons_copy_in_a_real_browser(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let browser = crate::webdriver::Browser::launch().await?;
    let result = copy_steps(&browser, &app).await;
    let quit = browser.quit().await;
    result?;
    quit?;
    app.stop().await
}

async fn copy_steps(browser: &crate::webdriver::Browser, app: &TestApp) -> TestResult {
    browser.goto(&app.url("/signup")).await?;
    let account = [("org_name", "Acme"), ("email", "ada@example.com"), ("password", PASSWORD)];
    browser.fill_and_submit("form[action='/signup']", &account).await?;
    browser.wait_for_url("/projects", |url| url.ends_with("/projects")).await?;
    browser.fill_and_submit("form[action='/projects']", &[("name", "Chat"), ("default_budget", "5")]).await?;
    let project = browser.wait_for_url("a project's page", |url| url.contains("/projects/prj_")).await?;
    // The overview: its snippet's copy button is shown.
    browser.wait_for("#first-run").await?;
    let shown = "return [...document.querySelectorAll('button[data-copy]')].filter(b => !b.hidden).length";
    anyhow::ensure!(browser.execute(shown).await? == serde_json::json!(3), "the overview's copy buttons are hidden");
    browser.goto(&format!("{project}/keys")).await?;
    browser.fill_and_submit("form[action$='/keys']", &[("name", "app")]).await?;
    let key = browser.wait_for("#new-key").await?.text().await?.trim().to_owned();
    anyhow::ensure!(browser.execute(shown).await? == serde_json::json!(4), "the copy buttons are hidden");

    // Without the clipboard API, the button selects the text.
    browser.execute("Object.defineProperty(navigator, 'clipboard', {value: undefined}); return null").await?;
    browser.wait_for("button[data-copy='snippet-curl']").await?.click().await?;
    let selected = browser.execute("return window.getSelection().toString()").await?;
    let curl = browser.wait_for("#snippet-curl").await?.text().await?;
    anyhow::ensure!(selected.as_str().map(str::trim) == Some(curl.trim()), "selected {selected}, not {curl}");
    anyhow::ensure!(curl.contains(&key), "{curl}");
    let label = browser.wait_for("button[data-copy='snippet-curl']").await?.text().await?;
    anyhow::ensure!(label == "Copied" || label.starts_with("Selected"), "the button says {label:?}");
    Ok(())
}

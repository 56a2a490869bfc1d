//! Connecting Stripe so that it proves ownership: Stripe Connect only through Stripe's OAuth (the
//! fake's) with a signed, expiring, single-use state; one project per account; disconnecting
//! clears what belonged to the account; and "Test connection" with the README's restricted key.

use reqwest::StatusCode;
use serde_json::Value;
use tollgate_core::stripe;
use tollgate_core::time::UnixMillis;
use tollgate_core::with_db;

use crate::billing::{ACCOUNT, Billing, KEY, PLATFORM_KEY, WHSEC, billing_setup_with};
use crate::dashboard::{Browser, Page};
use crate::fake_stripe::FakeStripe;
use crate::helpers::{DbCase, PlainCase, TestDatabase, TestResult};
use crate::{db_cases, plain_cases};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        connect_onboarding_attaches_an_account_only_with_the_oauth_proof,
        connect_onboarding_refuses_an_account_attached_to_another_project,
        connect_onboarding_disconnect_clears_what_belonged_to_the_account,
        connect_onboarding_test_connection_checks_the_readme_restricted_key,
    ]
}

pub fn plain_cases() -> Vec<PlainCase> {
    plain_cases![fake_stripe_connect_oauth_codes_are_single_use_and_restricted_keys_keep_to_their_permissions]
}

/// The restricted key's permissions as the README lists them.
fn readme_permissions() -> Vec<&'static str> {
    tollgate_jobs::stripe_check::RESTRICTED_KEY_PERMISSIONS.iter().map(|(_, p, _)| *p).collect()
}

/// Clicks "Connect with Stripe" on `billing` and follows Stripe's (the fake's) authorize page,
/// where `approver`'s user approves (`None`: declines); returns the callback's answer.
pub(crate) async fn connect_through_oauth(
    b: &Billing,
    browser: &Browser<'_>,
    billing: &str,
    approver: Option<&str>,
) -> anyhow::Result<Page> {
    let callback = authorize(b, browser, billing, approver).await?;
    browser.get(&callback).await
}

/// Up to Stripe's redirect: the callback path (with its query) Stripe sends the browser to.
async fn authorize(
    b: &Billing,
    browser: &Browser<'_>,
    billing: &str,
    approver: Option<&str>,
) -> anyhow::Result<String> {
    b.fake.set_oauth_approver(approver);
    let start = browser.submit(billing, &format!("{billing}/connect-stripe"), &[]).await?;
    anyhow::ensure!(start.status == StatusCode::SEE_OTHER, "{}: {}", start.status, start.body);
    let authorize = start.location.unwrap_or_default();
    anyhow::ensure!(authorize.starts_with(&format!("{}/oauth/authorize?", b.fake.base_url())), "{authorize}");
    anyhow::ensure!(authorize.contains("client_id=ca_fakeplatform0001") && authorize.contains("scope=read_write"));
    let stripe = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let answer = stripe.get(&authorize).send().await?;
    let back = answer.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let path = back.split_once("://").and_then(|(_, r)| r.find('/').map(|i| r[i..].to_owned())).unwrap_or_default();
    anyhow::ensure!(path.starts_with("/stripe/connect/callback?"), "{back}");
    Ok(path)
}

fn param(path: &str, name: &str) -> String {
    path.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or_default()
        .split('&')
        .find_map(|p| p.strip_prefix(&format!("{name}=")))
        .unwrap_or_default()
        .to_owned()
}

async fn connected_account(b: &Billing) -> anyhow::Result<Option<String>> {
    Ok(stripe::connection(&b.s.app.state.db, &b.s.project.id).await?.and_then(|c| c.account_id))
}

async fn ada(b: &Billing) -> anyhow::Result<(Browser<'_>, String)> {
    let browser = Browser::new(&b.s.app)?;
    browser.log_in("ada@example.com", crate::dashboard::PASSWORD).await?;
    Ok((browser, format!("/projects/{}/billing", b.s.project.id)))
}

async fn connect_onboarding_attaches_an_account_only_with_the_oauth_proof(db: TestDatabase) -> TestResult {
    let b = billing_setup_with(&db, |_| {}).await?;
    let (browser, billing) = ada(&b).await?;

    // Declined on Stripe's page: nothing attached, and the page says so.
    let declined = connect_through_oauth(&b, &browser, &billing, None).await?;
    assert_eq!(declined.status, StatusCode::BAD_REQUEST);
    assert!(declined.body.contains("declined on Stripe"), "{}", declined.body);
    assert_eq!(connected_account(&b).await?, None);

    // A forged state (its signature altered), then the genuine one.
    let callback = authorize(&b, &browser, &billing, Some("acct_owner1")).await?;
    let state = param(&callback, "state");
    let forged = callback.replace(&state, &format!("{}x", &state));
    let refused = browser.get(&forged).await?;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.body.contains("not one this server made"), "{}", refused.body);
    let done = browser.get(&callback).await?;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(connected_account(&b).await?.as_deref(), Some("acct_owner1"));
    let shown = browser.get(&billing).await?.body;
    assert!(shown.contains("Stripe Connect account <code>acct_owner1</code>"), "{shown}");

    // The same state again: used.
    let reused = browser.get(&callback).await?;
    assert_eq!(reused.status, StatusCode::BAD_REQUEST);
    assert!(reused.body.contains("already used"), "{}", reused.body);

    // A code already exchanged (here for this project), with a fresh state: Stripe's invalid_grant.
    let fresh = authorize(&b, &browser, &billing, Some("acct_owner2")).await?;
    let replayed = fresh.replace(&param(&fresh, "code"), &param(&callback, "code"));
    let refused = browser.get(&replayed).await?;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.body.contains("invalid_grant"), "{}", refused.body);
    assert_eq!(connected_account(&b).await?.as_deref(), Some("acct_owner1"));

    // An expired state (made 16 minutes ago).
    let state = &b.s.app.state;
    let user = with_db!(&state.db, pool => sqlx::query_scalar::<_, tollgate_core::ids::UserId>(
        "SELECT id FROM users WHERE email = 'ada@example.com'").fetch_one(pool).await)?;
    let old = UnixMillis(UnixMillis::now().0 - 16 * 60 * 1000);
    let expired =
        tollgate_core::stripe_connect::issue_state(&state.db, &state.master_key, &b.s.project.id, &user, old).await?;
    let late = fresh.replace(&param(&fresh, "state"), &expired);
    let refused = browser.get(&late).await?;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.body.contains("expired"), "{}", refused.body);

    // Another member (of another organization) cannot use Ada's link back from Stripe.
    let mallory = Browser::new(&b.s.app)?;
    mallory.sign_up("Evil Corp", "mallory@example.com", crate::dashboard::PASSWORD).await?;
    let stolen = mallory.get(&fresh).await?;
    assert_eq!(stolen.status, StatusCode::BAD_REQUEST, "{}", stolen.body);
    assert!(stolen.body.contains("another member"), "{}", stolen.body);
    assert_eq!(connected_account(&b).await?.as_deref(), Some("acct_owner1"));
    // Typing an account id is no longer a way in.
    let typed = browser.submit(&billing, &format!("{billing}/connect-account"), &[("account_id", "acct_x")]).await?;
    assert!(
        typed.status == StatusCode::NOT_FOUND || typed.status == StatusCode::METHOD_NOT_ALLOWED,
        "{}",
        typed.status
    );
    Ok(())
}

async fn connect_onboarding_refuses_an_account_attached_to_another_project(db: TestDatabase) -> TestResult {
    let b = billing_setup_with(&db, |_| {}).await?;
    let (browser, billing) = ada(&b).await?;
    let done = connect_through_oauth(&b, &browser, &billing, Some("acct_shared1")).await?;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let other = browser
        .submit("/projects", "/projects", &[("name", "Second"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    let other_billing = format!("{other}/billing");
    let refused = connect_through_oauth(&b, &browser, &other_billing, Some("acct_shared1")).await?;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.body.contains("acct_shared1 already bills another project"), "{}", refused.body);
    let attached: i64 = with_db!(&b.s.app.state.db, pool => sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM stripe_connections WHERE account_id = 'acct_shared1'").fetch_one(pool).await)?;
    assert_eq!(attached, 1);
    Ok(())
}

async fn connect_onboarding_disconnect_clears_what_belonged_to_the_account(db: TestDatabase) -> TestResult {
    let b = billing_setup_with(&db, |_| {}).await?;
    let (browser, billing) = ada(&b).await?;
    assert_eq!(connect_through_oauth(&b, &browser, &billing, Some("acct_first1")).await?.status, StatusCode::SEE_OTHER);
    b.calls("cust-a", 2, 10).await?;
    b.provision().await?;
    b.deliver().await?;
    let db_ = &b.s.app.state.db;
    let cus: String = with_db!(db_, pool => sqlx::query_scalar::<_, String>(
        "SELECT stripe_customer_id FROM customers WHERE external_id = 'cust-a'").fetch_one(pool).await)?;
    let invoice = b.fake.make_invoice("acct_first1", &cus, "open", 500);
    let connect = b.s.app.url("/stripe/webhooks/connect");
    let secret = "whsec_test_connect0123456789abcd";
    let (status, _) = b.fake.send_event(&connect, secret, "invoice.finalized", invoice, Some("acct_first1")).await?;
    assert_eq!(status, StatusCode::OK);
    b.process_events().await?;
    let count = |sql: &'static str| async move {
        anyhow::Ok(with_db!(db_, pool => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await)?)
    };
    assert_eq!(count("SELECT COUNT(*) FROM stripe_invoices").await?, 1);

    let disconnected = browser.submit(&billing, &format!("{billing}/disconnect"), &[]).await?;
    assert_eq!(disconnected.status, StatusCode::SEE_OTHER);
    assert_eq!(count("SELECT COUNT(*) FROM stripe_invoices").await?, 0);
    assert_eq!(count("SELECT COUNT(*) FROM stripe_connections").await?, 0);
    assert_eq!(
        count(
            "SELECT COUNT(*) FROM customers WHERE stripe_customer_id IS NOT NULL OR stripe_subscription_id IS NOT NULL"
        )
        .await?,
        0
    );

    // Another account provisions afresh: its own meter, product, price, customer, subscription.
    assert_eq!(
        connect_through_oauth(&b, &browser, &billing, Some("acct_second1")).await?.status,
        StatusCode::SEE_OTHER
    );
    b.calls("cust-a", 1, 10).await?;
    b.provision().await?;
    b.deliver().await?;
    assert_eq!(b.fake.meters("acct_second1").len(), 1);
    assert_eq!(b.fake.customers("acct_second1").len(), 1);
    assert_eq!(b.fake.subscriptions("acct_second1").len(), 1);
    let cus2: String = with_db!(db_, pool => sqlx::query_scalar::<_, String>(
        "SELECT stripe_customer_id FROM customers WHERE external_id = 'cust-a'").fetch_one(pool).await)?;
    assert_ne!(cus, cus2);
    assert!(!b.fake.meter_events("acct_second1").is_empty());

    // Replacing the Connect account with a key clears what the Connect account held, too.
    let saved = browser.submit(&billing, &billing, &[("secret_key", KEY), ("webhook_secret", WHSEC)]).await?;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    assert_eq!(count("SELECT COUNT(*) FROM customers WHERE stripe_customer_id IS NOT NULL").await?, 0);
    assert_eq!(count("SELECT COUNT(*) FROM stripe_connections WHERE meter_id IS NOT NULL").await?, 0);
    Ok(())
}

async fn connect_onboarding_test_connection_checks_the_readme_restricted_key(db: TestDatabase) -> TestResult {
    let b = billing_setup_with(&db, |_| {}).await?;
    b.fake.add_restricted_key(KEY, ACCOUNT, &readme_permissions());
    b.connect_with_key().await?;
    let (browser, billing) = ada(&b).await?;
    let check = format!("{billing}/check");
    let last_check = |body: &str| {
        body.split("id=\"last-check\">").nth(1).and_then(|r| r.split("</dd>").next()).unwrap_or_default().to_owned()
    };
    assert_eq!(browser.submit(&billing, &check, &[]).await?.status, StatusCode::SEE_OTHER);
    let shown = last_check(&browser.get(&billing).await?.body);
    assert!(shown.contains("passed") && shown.contains("test mode") && shown.contains("invoices"), "{shown}");
    assert!(b.fake.seen().iter().all(|r| r.path != "/v1/account"), "GET /v1/account is refused to restricted keys");

    // The same key without Invoice items: Write (one-off invoices need it).
    let fewer: Vec<&str> = readme_permissions().into_iter().filter(|p| *p != "rak_invoiceitem_write").collect();
    b.fake.add_restricted_key(KEY, ACCOUNT, &fewer);
    browser.submit(&billing, &check, &[]).await?;
    let shown = last_check(&browser.get(&billing).await?.body);
    assert!(
        shown.contains("failed") && shown.contains("Invoice items: Write") && shown.contains("rak_invoiceitem_read"),
        "{shown}"
    );
    // The README lists every one of them.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))?;
    for permission in readme_permissions() {
        assert!(readme.contains(permission), "README misses {permission}");
    }
    Ok(())
}

async fn fake_stripe_connect_oauth_codes_are_single_use_and_restricted_keys_keep_to_their_permissions() -> TestResult {
    let fake = FakeStripe::start(&[]).await?;
    fake.add_platform_key(PLATFORM_KEY, "acct_platform");
    fake.add_connect_client("ca_client1", PLATFORM_KEY);
    fake.set_oauth_approver(Some("acct_user1"));
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let base = fake.base_url();
    let authorize = format!(
        "{base}/oauth/authorize?response_type=code&client_id=ca_client1&scope=read_write&state=s1&redirect_uri=https%3A%2F%2Fgate.example%2Fcb"
    );
    let answer = http.get(&authorize).send().await?;
    let back = answer.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(back.starts_with("https://gate.example/cb?code=ac_") && back.ends_with("&state=s1"), "{back}");
    let code = param(&back, "code");
    // An unknown client id is refused.
    let unknown = http.get(authorize.replace("ca_client1", "ca_nobody")).send().await?;
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);

    let exchange = |code: String| {
        let http = http.clone();
        let url = format!("{base}/oauth/token");
        async move {
            let answer = http
                .post(url)
                .bearer_auth(PLATFORM_KEY)
                .form(&[("grant_type", "authorization_code"), ("code", code.as_str())])
                .send()
                .await?;
            anyhow::Ok((answer.status(), answer.json::<Value>().await?))
        }
    };
    let (status, grant) = exchange(code.clone()).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((grant["stripe_user_id"].as_str(), grant["livemode"].as_bool()), (Some("acct_user1"), Some(false)));
    assert_eq!(grant["scope"], "read_write");
    let (status, used) = exchange(code).await?;
    assert_eq!((status, used["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    let (status, unknown) = exchange("ac_nonesuch".to_owned()).await?;
    assert_eq!((status, unknown["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    // The exchange connected the account: the platform acts on it.
    let acting = http
        .get(format!("{base}/v1/customers?limit=1"))
        .bearer_auth(PLATFORM_KEY)
        .header("stripe-account", "acct_user1")
        .send()
        .await?;
    assert_eq!(acting.status(), StatusCode::OK);
    // Declined: access_denied, with the state.
    fake.set_oauth_approver(None);
    let answer = http.get(&authorize).send().await?;
    let back = answer.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(back.contains("error=access_denied") && back.contains("state=s1"), "{back}");

    // Restricted keys: only their permissions; Write includes Read; /v1/account needs KYC read.
    fake.add_restricted_key("rk_test_51Hrestricted01", "acct_rk", &["rak_customer_write", "rak_invoice_read"]);
    let get = |path: &'static str| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let answer = http.get(url).bearer_auth("rk_test_51Hrestricted01").send().await?;
            anyhow::Ok((answer.status(), answer.json::<Value>().await?))
        }
    };
    assert_eq!(get("/v1/customers?limit=1").await?.0, StatusCode::OK);
    assert_eq!(get("/v1/invoices?limit=1").await?.0, StatusCode::OK);
    let (status, body) = get("/v1/products?limit=1").await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("on account 'acct_rk'") && message.contains("Having the 'rak_product_read' permission"),
        "{message}"
    );
    let (status, body) = get("/v1/account").await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("rak_accounts_kyc_id_numbers_read"));
    let post = http
        .post(format!("{base}/v1/billing/meters"))
        .bearer_auth("rk_test_51Hrestricted01")
        .form(&[("display_name", "x"), ("event_name", "x"), ("default_aggregation[formula]", "sum")])
        .send()
        .await?;
    assert_eq!(post.status(), StatusCode::FORBIDDEN);
    assert!(post.text().await?.contains("rak_billing_meter_write"));
    fake.stop();
    Ok(())
}

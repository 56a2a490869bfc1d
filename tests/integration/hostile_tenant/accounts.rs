//! Accounts and sessions against a stranger (issue 20, findings 2, 6, 7 and part of 9): an
//! address registered before its owner arrives, sessions that outlive a password, login
//! throttling raced or turned against the owner, a proxy's address shared by everyone,
//! reset and sign-up floods, sign-up telling which addresses have accounts, session rows for
//! anonymous visits, and `next` leading off the site.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tollgate_core::accounts::{self, NewOrganization};
use tollgate_core::time::UnixMillis;
use tollgate_core::with_db;

use crate::dashboard::{Browser, PASSWORD, field_value};
use crate::db_cases;
use crate::fake_smtp::FakeSmtp;
use crate::helpers::{DbCase, TestApp, TestDatabase, TestResult, eventually, spawn_app, spawn_app_with};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        an_address_signed_up_by_someone_else_cannot_be_used_to_join,
        a_password_change_or_reset_ends_the_other_sessions,
        a_session_ends_at_its_absolute_lifetime,
        closed_sign_up_creates_nothing_and_invitations_still_work,
        sixty_concurrent_wrong_passwords_count_as_sixty,
        many_addresses_slow_an_email_down_without_locking_its_owner_out,
        the_client_address_comes_from_a_trusted_proxy_only,
        reset_requests_and_sign_ups_are_throttled,
        sign_up_answers_alike_whether_or_not_the_address_has_an_account,
        unverified_accounts_expire_with_their_organizations,
        an_anonymous_visit_writes_no_session_row,
        next_never_leaves_the_site,
        invitations_are_throttled_per_organization,
    ]
}

const EMAIL: &str = "ada@example.com";

async fn scalar(app: &TestApp, sql: &'static str) -> anyhow::Result<i64> {
    Ok(with_db!(&app.state.db, pool => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await)?)
}

async fn with_smtp(db: &TestDatabase, smtp: &FakeSmtp, extra: &[(&str, &str)]) -> anyhow::Result<TestApp> {
    let url = smtp.url();
    let extra: Vec<(String, String)> = extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    spawn_app_with(db, move |env| {
        env.insert("TOLLGATE_SMTP_URL".into(), url);
        env.insert("TOLLGATE_SMTP_FROM".into(), "Tollgate <no-reply@example.com>".into());
        env.extend(extra);
    })
    .await
}

/// An organization made by the operator (`tollgate admin create-org`): its owner is verified.
async fn operator_made(app: &TestApp, name: &str, email: &str) -> anyhow::Result<()> {
    let new = NewOrganization { name, owner_email: email, owner_password: PASSWORD };
    accounts::create_organization_with_owner(&app.state.db, new).await?;
    Ok(())
}

fn sign_up_form<'a>(org: &'a str, email: &'a str, password: &'a str) -> [(&'a str, &'a str); 3] {
    [("org_name", org), ("email", email), ("password", password)]
}

/// The hijack of the issue: an attacker signs up with the victim's address before the victim
/// is invited, keeps the session, and after the victim resets the password and joins, makes
/// keys in the victim's organization. Now: the attacker cannot confirm the address, so cannot
/// join (nor invite); the victim's reset ends the attacker's session; the victim joins alone.
async fn an_address_signed_up_by_someone_else_cannot_be_used_to_join(db: TestDatabase) -> TestResult {
    const VICTIM: &str = "victim@victim.example";
    const ATTACKERS: &str = "the attacker's password";
    const VICTIMS: &str = "the victim's own password";
    let smtp = FakeSmtp::start().await?;
    let app = with_smtp(&db, &smtp, &[]).await?;
    operator_made(&app, "Victim Corp", "boss@victim.example").await?;
    let boss = Browser::new(&app)?;
    assert_eq!(boss.log_in("boss@victim.example", PASSWORD).await?.status, StatusCode::SEE_OTHER);
    let project = boss
        .submit("/projects", "/projects", &[("name", "Prod"), ("default_budget", "0")])
        .await?
        .location
        .unwrap_or_default();
    assert!(project.starts_with("/projects/prj_"), "{project}");

    // The attacker signs up with the victim's address: "check your mail", which goes to the
    // victim's mailbox. The attacker can log in to what it made, but not confirm it.
    let attacker = Browser::new(&app)?;
    let signed_up = attacker.submit("/signup", "/signup", &sign_up_form("Lookalike", VICTIM, ATTACKERS)).await?;
    assert_eq!(signed_up.status, StatusCode::OK, "{}", signed_up.body);
    assert!(signed_up.body.contains("Check your mail"), "{}", signed_up.body);
    let confirmation = smtp.link_to(VICTIM, "/verify?token=").await?;
    assert_eq!(attacker.log_in(VICTIM, ATTACKERS).await?.status, StatusCode::SEE_OTHER);
    let guessed = attacker.get("/verify?token=a-guess").await?;
    assert_eq!(guessed.status, StatusCode::BAD_REQUEST, "{}", guessed.body);
    let account = attacker.get("/account").await?;
    assert!(account.body.contains("Confirm your email address"), "{}", account.body);
    let stale_csrf = account.csrf();
    // Nor may it have mail sent anywhere.
    let invited =
        attacker.submit("/members", "/members/invite", &[("email", "x@example.com"), ("role", "admin")]).await?;
    assert_eq!(invited.status, StatusCode::BAD_REQUEST, "{}", invited.body);
    assert!(invited.body.contains("Confirm your email address first"), "{}", invited.body);

    // The victim is invited. Even holding the invitation's link (mailed to the victim only),
    // the attacker's unverified account cannot accept it.
    let invited = boss.submit("/members", "/members/invite", &[("email", VICTIM), ("role", "admin")]).await?;
    assert_eq!(invited.status, StatusCode::OK, "{}", invited.body);
    assert!(!invited.body.contains("id=\"invite-link\""), "with mail, the link goes to the invited mailbox only");
    let invitation = smtp.link_to(VICTIM, "/invite?token=").await?;
    let page = attacker.get(&invitation).await?;
    let token = field_value(&page.body, "token").unwrap_or_default();
    let refused = attacker.post("/invite/accept", &[("csrf", &page.csrf()), ("token", &token)]).await?;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert!(refused.body.contains("Confirm your email address first"), "{}", refused.body);
    let victim_corp_members = "SELECT COUNT(*) FROM memberships m JOIN organizations o ON o.id = m.org_id \
                               WHERE o.name = 'Victim Corp'";
    assert_eq!(scalar(&app, victim_corp_members).await?, 1);

    // The victim opens the confirmation link it never asked for: without the account's
    // password, nothing is confirmed.
    let victim = Browser::new(&app)?;
    let asked = victim.get(&confirmation).await?;
    assert!(asked.location.as_deref().is_some_and(|l| l.starts_with("/login?next=")), "{:?}", asked.location);
    let unverified = "SELECT COUNT(*) FROM users WHERE email = 'victim@victim.example' AND verified_at IS NULL";
    assert_eq!(scalar(&app, unverified).await?, 1);

    // The account exists, so the victim takes it back by resetting its password by mail.
    let page = victim.get(&invitation).await?;
    let taken =
        victim.post("/invite/signup", &[("csrf", &page.csrf()), ("token", &token), ("password", VICTIMS)]).await?;
    assert!(taken.body.contains("exists already"), "{}", taken.body);
    victim.submit("/password/forgot", "/password/forgot", &[("email", VICTIM)]).await?;
    let reset = smtp.link_to(VICTIM, "/password/reset?token=").await?;
    let form = victim.get(&reset).await?;
    let reset_token = field_value(&form.body, "token").unwrap_or_default();
    let done = victim
        .post("/password/reset", &[("csrf", &form.csrf()), ("token", &reset_token), ("password", VICTIMS)])
        .await?;
    assert_eq!(done.location.as_deref(), Some("/login?reset=1"), "{}", done.body);

    // The attacker's session is dead, and its password with it.
    let dead = attacker.get("/projects").await?;
    assert_eq!(dead.location.as_deref(), Some("/login?next=/projects"), "{}", dead.body);
    assert_eq!(attacker.log_in(VICTIM, ATTACKERS).await?.status, StatusCode::UNAUTHORIZED);

    // The victim (confirmed by the reset) joins, and the attacker's old cookie and form
    // token make no key in Victim Corp.
    assert_eq!(victim.log_in(VICTIM, VICTIMS).await?.status, StatusCode::SEE_OTHER);
    let page = victim.get(&invitation).await?;
    let joined = victim.post("/invite/accept", &[("csrf", &page.csrf()), ("token", &token)]).await?;
    assert_eq!(joined.location.as_deref(), Some("/projects"), "{}", joined.body);
    assert_eq!(scalar(&app, victim_corp_members).await?, 2);
    let forged = attacker
        .post(&format!("{project}/keys"), &[("csrf", &stale_csrf), ("name", "mine now"), ("kind", "secret")])
        .await?;
    assert!(forged.location.as_deref().is_some_and(|l| l.starts_with("/login")), "{}", forged.body);
    assert_eq!(scalar(&app, "SELECT COUNT(*) FROM api_keys").await?, 0);
    app.stop().await
}

async fn a_password_change_or_reset_ends_the_other_sessions(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    let laptop = Browser::new(&app)?;
    laptop.sign_up("Acme", EMAIL, PASSWORD).await?;
    let (phone, stolen) = (Browser::new(&app)?, Browser::new(&app)?);
    for browser in [&phone, &stolen] {
        assert_eq!(browser.log_in(EMAIL, PASSWORD).await?.status, StatusCode::SEE_OTHER);
        assert_eq!(browser.get("/projects").await?.status, StatusCode::OK);
    }
    let logged_out = |page: crate::dashboard::Page| page.location.as_deref() == Some("/login?next=/projects");

    // A change keeps the session that made it and ends the others.
    let changed =
        laptop.submit("/account", "/account/password", &[("current", PASSWORD), ("new", "a second password")]).await?;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    assert_eq!(laptop.get("/projects").await?.status, StatusCode::OK);
    assert!(logged_out(phone.get("/projects").await?));
    assert!(logged_out(stolen.get("/projects").await?));

    // A reset (whoever asks for it has the mailbox) ends them all.
    assert_eq!(phone.log_in(EMAIL, "a second password").await?.status, StatusCode::SEE_OTHER);
    let token = accounts::start_password_reset(&app.state.db, EMAIL).await?.unwrap_or_default();
    let other = Browser::new(&app)?;
    let form = other.get(&format!("/password/reset?token={token}")).await?;
    let done = other
        .post("/password/reset", &[("csrf", &form.csrf()), ("token", &token), ("password", "a third password")])
        .await?;
    assert_eq!(done.location.as_deref(), Some("/login?reset=1"), "{}", done.body);
    assert!(logged_out(laptop.get("/projects").await?));
    assert!(logged_out(phone.get("/projects").await?));
    assert_eq!(scalar(&app, "SELECT COUNT(*) FROM sessions").await?, 0);
    app.stop().await
}

/// Scaled down: a lifetime of 3 s instead of 30 days, the idle expiry (12 h) far away.
async fn a_session_ends_at_its_absolute_lifetime(db: TestDatabase) -> TestResult {
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_SESSION_LIFETIME_SECONDS".into(), "3".into());
    })
    .await?;
    let browser = Browser::new(&app)?;
    let started = Instant::now();
    browser.sign_up("Acme", EMAIL, PASSWORD).await?;
    assert_eq!(browser.get("/projects").await?.status, StatusCode::OK);
    // Being active does not extend it.
    eventually(Duration::from_secs(20), || async {
        let page = browser.get("/projects").await?;
        Ok(page.location.as_deref() == Some("/login?next=/projects"))
    })
    .await?;
    assert!(started.elapsed() >= Duration::from_secs(1), "ended after {:?}", started.elapsed());
    // Logging in again starts a new lifetime.
    assert_eq!(browser.log_in(EMAIL, PASSWORD).await?.status, StatusCode::SEE_OTHER);
    assert_eq!(browser.get("/projects").await?.status, StatusCode::OK);
    app.stop().await
}

async fn closed_sign_up_creates_nothing_and_invitations_still_work(db: TestDatabase) -> TestResult {
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_SIGNUP_OPEN".into(), "false".into());
    })
    .await?;
    let stranger = Browser::new(&app)?;
    let page = stranger.get("/signup").await?;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(page.body.contains("Sign-up is closed") && !page.body.contains("action=\"/signup\""), "{}", page.body);
    let login = stranger.get("/login").await?;
    assert!(!login.body.contains("href=\"/signup\""), "the login page offers no sign-up");
    let mut form = vec![("csrf", login.csrf())];
    form.extend(sign_up_form("Acme", EMAIL, PASSWORD).map(|(k, v)| (k, v.to_owned())));
    let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let posted = stranger.post("/signup", &form).await?;
    assert_eq!(posted.status, StatusCode::FORBIDDEN, "{}", posted.body);
    assert_eq!(scalar(&app, "SELECT COUNT(*) FROM users").await?, 0);

    // The operator's organization invites; the invited person joins.
    operator_made(&app, "Acme", EMAIL).await?;
    let ada = Browser::new(&app)?;
    ada.log_in(EMAIL, PASSWORD).await?;
    let invited =
        ada.submit("/members", "/members/invite", &[("email", "bob@example.com"), ("role", "viewer")]).await?;
    let start = invited.body.find("/invite?token=").unwrap_or_default();
    let end = invited.body[start..].find('<').map_or(invited.body.len(), |e| start + e);
    let link = invited.body[start..end].trim().replace("&amp;", "&");
    let bob = Browser::new(&app)?;
    let page = bob.get(&link).await?;
    let token = field_value(&page.body, "token").unwrap_or_default();
    let joined =
        bob.post("/invite/signup", &[("csrf", &page.csrf()), ("token", &token), ("password", PASSWORD)]).await?;
    assert_eq!(joined.location.as_deref(), Some("/projects"), "{}", joined.body);
    app.stop().await
}

async fn sixty_concurrent_wrong_passwords_count_as_sixty(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    operator_made(&app, "Acme", EMAIL).await?;
    let browser = Browser::new(&app)?;
    let csrf = browser.get("/login").await?.csrf();
    let passwords: Vec<String> = (0..60).map(|i| format!("wrong password {i}")).collect();
    let attempts = passwords.iter().map(|password| async {
        browser.post("/login", &[("csrf", csrf.as_str()), ("email", EMAIL), ("password", password), ("next", "")]).await
    });
    let mut statuses = Vec::new();
    for page in futures::future::join_all(attempts).await {
        statuses.push(page?.status);
    }
    let count = |status: StatusCode| statuses.iter().filter(|s| **s == status).count();
    let allowed = usize::try_from(accounts::MAX_LOGINS_PER_ADDRESS_AND_EMAIL)?;
    assert_eq!((count(StatusCode::UNAUTHORIZED), count(StatusCode::TOO_MANY_REQUESTS)), (allowed, 60 - allowed));
    let counted = "SELECT failures FROM login_failures WHERE throttle_key = 'login:127.0.0.1:ada@example.com'";
    assert_eq!(scalar(&app, counted).await?, 60);
    // The right password from here waits out the window too.
    assert_eq!(browser.log_in(EMAIL, PASSWORD).await?.status, StatusCode::TOO_MANY_REQUESTS);
    app.stop().await
}

/// Scaled down: the per-email backoff's longest wait is 1 s instead of 30 s.
async fn many_addresses_slow_an_email_down_without_locking_its_owner_out(db: TestDatabase) -> TestResult {
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_TRUSTED_PROXIES".into(), "127.0.0.1".into());
        env.insert("TOLLGATE_LOGIN_BACKOFF_MAX_SECONDS".into(), "1".into());
    })
    .await?;
    operator_made(&app, "Acme", EMAIL).await?;
    // Guesses from many addresses: past the free attempts of the email, most are slowed.
    let mut slowed = 0;
    for bot in 0..6 {
        let bot = Browser::forwarded_for(&app, &format!("203.0.113.{}", 10 + bot))?;
        for _ in 0..5 {
            let page = bot.log_in(EMAIL, "a wrong guess!").await?;
            match page.status {
                StatusCode::UNAUTHORIZED => {}
                StatusCode::TOO_MANY_REQUESTS => {
                    assert!(page.body.contains("Try again in 1 s"), "{}", page.body);
                    slowed += 1;
                }
                other => anyhow::bail!("a guess got {other}: {}", page.body),
            }
        }
    }
    assert!(slowed > 0, "the backoff slowed no guess");
    // The owner, from an address never seen, gets in within the longest wait.
    let owner = Browser::forwarded_for(&app, "198.51.100.7")?;
    let started = Instant::now();
    eventually(Duration::from_secs(20), || async {
        let page = owner.log_in(EMAIL, PASSWORD).await?;
        match page.status {
            StatusCode::SEE_OTHER => Ok(true),
            StatusCode::TOO_MANY_REQUESTS => Ok(false),
            other => anyhow::bail!("the owner got {other}: {}", page.body),
        }
    })
    .await?;
    assert!(started.elapsed() < Duration::from_secs(15), "the owner waited {:?}", started.elapsed());
    app.stop().await
}

async fn the_client_address_comes_from_a_trusted_proxy_only(db: TestDatabase) -> TestResult {
    // Without a trusted proxy, X-Forwarded-For is the client's own word: changing it gains nothing.
    let app = spawn_app(&db).await?;
    operator_made(&app, "Acme", EMAIL).await?;
    for i in 0..accounts::MAX_LOGINS_PER_ADDRESS_AND_EMAIL {
        let spoofing = Browser::forwarded_for(&app, &format!("198.51.100.{i}"))?;
        assert_eq!(spoofing.log_in(EMAIL, "a wrong guess!").await?.status, StatusCode::UNAUTHORIZED);
    }
    let spoofing = Browser::forwarded_for(&app, "198.51.100.99")?;
    assert_eq!(spoofing.log_in(EMAIL, "a wrong guess!").await?.status, StatusCode::TOO_MANY_REQUESTS);
    app.stop().await?;

    // Behind a trusted proxy each client counts apart, keyed on the proxy's own hop: what
    // the client wrote to its left is not believed.
    let app = spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_TRUSTED_PROXIES".into(), "127.0.0.0/8, 10.0.0.0/8".into());
    })
    .await?;
    with_db!(&app.state.db, pool => sqlx::query("DELETE FROM login_failures").execute(pool).await.map(|_| ()))?;
    let mistyper = Browser::forwarded_for(&app, "203.0.113.5, 10.0.0.2")?;
    for _ in 0..accounts::MAX_LOGINS_PER_ADDRESS_AND_EMAIL {
        assert_eq!(mistyper.log_in(EMAIL, "a wrong guess!").await?.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(mistyper.log_in(EMAIL, PASSWORD).await?.status, StatusCode::TOO_MANY_REQUESTS);
    for spoofed in ["192.0.2.1, 203.0.113.5", "192.0.2.2,203.0.113.5, 10.0.0.9"] {
        let page = Browser::forwarded_for(&app, spoofed)?.log_in(EMAIL, PASSWORD).await?;
        assert_eq!(page.status, StatusCode::TOO_MANY_REQUESTS, "{spoofed}");
    }
    // Someone else behind the same proxy is not held back.
    let colleague = Browser::forwarded_for(&app, "203.0.113.6")?;
    assert_eq!(colleague.log_in(EMAIL, PASSWORD).await?.status, StatusCode::SEE_OTHER);
    let keys: Vec<String> = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT throttle_key FROM login_failures WHERE throttle_key LIKE 'login:%'").fetch_all(pool).await)?;
    assert!(keys.contains(&"login:203.0.113.5:ada@example.com".to_owned()), "{keys:?}");
    assert!(keys.iter().all(|k| !k.contains("192.0.2.") && !k.contains("10.0.0.")), "{keys:?}");
    app.stop().await
}

async fn reset_requests_and_sign_ups_are_throttled(db: TestDatabase) -> TestResult {
    let smtp = FakeSmtp::start().await?;
    let app = with_smtp(&db, &smtp, &[("TOLLGATE_TRUSTED_PROXIES", "127.0.0.1")]).await?;
    operator_made(&app, "Acme", EMAIL).await?;

    // Reset requests for one email, from anywhere.
    for i in 0..accounts::MAX_RESET_REQUESTS_PER_EMAIL {
        let page = Browser::forwarded_for(&app, &format!("198.51.100.{i}"))?
            .submit("/password/forgot", "/password/forgot", &[("email", EMAIL)])
            .await?;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    }
    let page = Browser::forwarded_for(&app, "198.51.100.50")?
        .submit("/password/forgot", "/password/forgot", &[("email", EMAIL)])
        .await?;
    assert_eq!(page.status, StatusCode::TOO_MANY_REQUESTS, "{}", page.body);
    assert!(page.body.contains("Too many reset requests"), "{}", page.body);
    assert_eq!(scalar(&app, "SELECT COUNT(*) FROM password_resets").await?, accounts::MAX_RESET_REQUESTS_PER_EMAIL);
    // Reset requests from one address, whatever the email.
    let one = Browser::forwarded_for(&app, "203.0.113.1")?;
    for i in 0..accounts::MAX_RESET_REQUESTS_PER_ADDRESS {
        let email = format!("someone{i}@example.com");
        assert_eq!(
            one.submit("/password/forgot", "/password/forgot", &[("email", &email)]).await?.status,
            StatusCode::OK
        );
    }
    let refused = one.submit("/password/forgot", "/password/forgot", &[("email", "another@example.com")]).await?;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);

    // Sign-ups from one address, whatever the email: refused before anything is made.
    let users = "SELECT COUNT(*) FROM users";
    let one = Browser::forwarded_for(&app, "203.0.113.2")?;
    for i in 0..accounts::MAX_SIGN_UPS_PER_ADDRESS {
        let email = format!("new{i}@example.com");
        let page = one.submit("/signup", "/signup", &sign_up_form("Org", &email, PASSWORD)).await?;
        assert!(page.body.contains("Check your mail"), "{}", page.body);
    }
    let before = scalar(&app, users).await?;
    let refused = one.submit("/signup", "/signup", &sign_up_form("Org", "one.more@example.com", PASSWORD)).await?;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.body);
    assert!(refused.body.contains("Too many sign-ups"), "{}", refused.body);
    // Sign-ups for one email, from anywhere (each would mail that address).
    for i in 0..accounts::MAX_SIGN_UPS_PER_EMAIL {
        let page = Browser::forwarded_for(&app, &format!("192.0.2.{i}"))?
            .submit("/signup", "/signup", &sign_up_form("Org", "target@example.com", PASSWORD))
            .await?;
        assert!(page.body.contains("Check your mail"), "{}", page.body);
    }
    let refused = Browser::forwarded_for(&app, "192.0.2.99")?
        .submit("/signup", "/signup", &sign_up_form("Org", "target@example.com", PASSWORD))
        .await?;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.body);
    assert_eq!(scalar(&app, users).await?, before + 1, "only the first sign-up for target@ made an account");
    app.stop().await
}

async fn sign_up_answers_alike_whether_or_not_the_address_has_an_account(db: TestDatabase) -> TestResult {
    let smtp = FakeSmtp::start().await?;
    let app = with_smtp(&db, &smtp, &[]).await?;
    operator_made(&app, "Acme", EMAIL).await?;
    let taken =
        Browser::new(&app)?.submit("/signup", "/signup", &sign_up_form("Other", EMAIL, "some password!")).await?;
    let free = Browser::new(&app)?
        .submit("/signup", "/signup", &sign_up_form("Other", "bob@example.com", "some password!"))
        .await?;
    assert_eq!((taken.status, free.status), (StatusCode::OK, StatusCode::OK));
    let strip = |page: &crate::dashboard::Page, email: &str| page.body.replace(email, "EMAIL");
    assert_eq!(strip(&taken, EMAIL), strip(&free, "bob@example.com"));
    // Nothing was made for the taken address; its owner is told instead, with a way back in.
    assert_eq!(scalar(&app, "SELECT COUNT(*) FROM organizations").await?, 2);
    let notice = smtp.mail_to_with(EMAIL, "Subject: Your Tollgate account").await?;
    assert!(notice.text().contains("/password/forgot"), "{}", notice.text());
    assert!(!notice.text().contains("/verify?token="), "{}", notice.text());
    smtp.link_to("bob@example.com", "/verify?token=").await?;
    // The owner's password is untouched.
    assert_eq!(Browser::new(&app)?.log_in(EMAIL, PASSWORD).await?.status, StatusCode::SEE_OTHER);
    app.stop().await
}

async fn unverified_accounts_expire_with_their_organizations(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    Browser::new(&app)?.sign_up("Acme", EMAIL, PASSWORD).await?;
    // A later sign-up (no mail here: its link would be in the log) is left unconfirmed.
    let mallory = Browser::new(&app)?;
    let page = mallory.submit("/signup", "/signup", &sign_up_form("Evil", "mallory@example.com", PASSWORD)).await?;
    assert!(page.body.contains("Check your mail"), "{}", page.body);
    assert_eq!(mallory.log_in("mallory@example.com", PASSWORD).await?.status, StatusCode::SEE_OTHER);
    let project = mallory.submit("/projects", "/projects", &[("name", "Spam"), ("default_budget", "0")]).await?;
    assert_eq!(project.status, StatusCode::SEE_OTHER, "an unverified owner uses its own organization");
    // The link can be mailed again, a few times.
    for _ in 0..accounts::MAX_VERIFICATION_MAILS_PER_ACCOUNT {
        let again = mallory.submit("/account", "/account/verify", &[]).await?;
        assert!(again.body.contains("We sent a new confirmation link"), "{}", again.body);
    }
    let again = mallory.submit("/account", "/account/verify", &[]).await?;
    assert_eq!(again.status, StatusCode::TOO_MANY_REQUESTS, "{}", again.body);

    let housekeeping = || tollgate_jobs::housekeeping::run(&app.state.db, UnixMillis::now());
    housekeeping().await?;
    assert_eq!(scalar(&app, "SELECT COUNT(*) FROM users").await?, 2, "not a week old yet");
    let week_ago = UnixMillis::now().plus_secs(-accounts::VERIFICATION_TTL_SECS - 60).0;
    with_db!(&app.state.db, pool => sqlx::query("UPDATE users SET created_at = $1").bind(week_ago).execute(pool)
        .await.map(|_| ()))?;
    housekeeping().await?;
    let emails: Vec<String> =
        with_db!(&app.state.db, pool => sqlx::query_scalar("SELECT email FROM users").fetch_all(pool).await)?;
    assert_eq!(emails, [EMAIL]);
    assert_eq!(scalar(&app, "SELECT COUNT(*) FROM organizations").await?, 1);
    assert_eq!(scalar(&app, "SELECT COUNT(*) FROM projects").await?, 0);
    assert!(mallory.get("/projects").await?.location.is_some_and(|l| l.starts_with("/login")));
    app.stop().await
}

async fn an_anonymous_visit_writes_no_session_row(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    operator_made(&app, "Acme", EMAIL).await?;
    let visitor = Browser::new(&app)?;
    for path in ["/", "/login", "/login?next=/projects", "/signup", "/password/forgot", "/password/reset?token=x"] {
        assert!(visitor.get(path).await?.status.is_success() || path == "/", "{path}");
    }
    assert_eq!(visitor.get("/projects").await?.status, StatusCode::SEE_OTHER);
    assert_eq!(visitor.log_in(EMAIL, "a wrong password").await?.status, StatusCode::UNAUTHORIZED);
    visitor.submit("/password/forgot", "/password/forgot", &[("email", EMAIL)]).await?;
    assert_eq!(scalar(&app, "SELECT COUNT(*) FROM sessions").await?, 0);
    // A login makes the first row.
    assert_eq!(visitor.log_in(EMAIL, PASSWORD).await?.status, StatusCode::SEE_OTHER);
    assert_eq!(scalar(&app, "SELECT COUNT(*) FROM sessions").await?, 1);
    app.stop().await
}

async fn next_never_leaves_the_site(db: TestDatabase) -> TestResult {
    let app = spawn_app(&db).await?;
    operator_made(&app, "Acme", EMAIL).await?;
    let browser = Browser::new(&app)?;
    for next in [
        "/\t/evil.example/phish",
        "/\\evil.example/phish",
        "/\\/evil.example",
        "//evil.example/phish",
        "/projects\nSet-Cookie: planted=1",
        "/\r\n/evil.example",
        "/ /evil.example",
        "https://evil.example/phish",
        "http:/evil.example",
        "javascript:alert(1)",
        " /projects",
        "",
    ] {
        let form = browser.get("/login").await?;
        let page = browser
            .post("/login", &[("csrf", &form.csrf()), ("email", EMAIL), ("password", PASSWORD), ("next", next)])
            .await?;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{next:?}: {}", page.body);
        assert_eq!(page.location.as_deref(), Some("/projects"), "{next:?}");
    }
    // A path of this site is followed.
    let form = browser.get("/login?next=/projects%3Fpage%3D2").await?;
    let next = field_value(&form.body, "next").unwrap_or_default();
    let page = browser
        .post("/login", &[("csrf", &form.csrf()), ("email", EMAIL), ("password", PASSWORD), ("next", &next)])
        .await?;
    assert_eq!(page.location.as_deref(), Some("/projects?page=2"));
    app.stop().await
}

/// Beyond the list: every invitation mails a link from this server's address to an
/// address the tenant chose, under an organization name the tenant chose — unthrottled, a
/// stranger's free organization was a mail relay. An organization may send a few per window.
async fn invitations_are_throttled_per_organization(db: TestDatabase) -> TestResult {
    let smtp = FakeSmtp::start().await?;
    let app = with_smtp(&db, &smtp, &[]).await?;
    operator_made(&app, "Acme", EMAIL).await?;
    let ada = Browser::new(&app)?;
    ada.log_in(EMAIL, PASSWORD).await?;
    let max = tollgate::routes::dashboard::members::MAX_INVITATIONS_PER_WINDOW;
    for i in 0..max {
        let email = format!("person{i}@example.net");
        let page = ada.submit("/members", "/members/invite", &[("email", &email), ("role", "viewer")]).await?;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    }
    let refused =
        ada.submit("/members", "/members/invite", &[("email", "one.more@example.net"), ("role", "viewer")]).await?;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.body);
    assert!(refused.body.contains("Too many invitations"), "{}", refused.body);
    assert_eq!(scalar(&app, "SELECT COUNT(*) FROM invitations").await?, max);
    app.stop().await
}

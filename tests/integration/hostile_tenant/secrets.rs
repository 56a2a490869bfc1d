//! Secrets at rest and the smaller findings of issue 20: no secret kept in clear by the
//! idempotency store, sealed secrets bound to their row, data files readable by their owner
//! only.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::crypto::{MasterKey, SealedFor};
use tollgate_core::projects::{self, BudgetPolicy, NewProject, NewProvider, ProviderKind};
use tollgate_core::with_db;

use crate::helpers::{DbCase, PlainCase, TestDatabase, TestResult, spawn_app};
use crate::proxy::{Setup, setup};
use crate::{db_cases, plain_cases};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        the_idempotency_store_keeps_no_secret_in_clear,
        a_sealed_key_copied_to_another_tenant_does_not_open,
        secrets_sealed_before_binding_are_resealed_at_startup,
        count_tokens_refuses_a_blocked_customer,
    ]
}

pub fn plain_cases() -> Vec<PlainCase> {
    plain_cases![data_files_are_readable_by_their_owner_only, hsts_is_sent_when_served_over_https]
}

async fn stored_answers(s: &Setup) -> anyhow::Result<Vec<String>> {
    Ok(with_db!(&s.app.state.db, pool => sqlx::query_scalar::<_, String>(
        "SELECT response_body FROM idempotency_keys WHERE response_body IS NOT NULL").fetch_all(pool).await)?)
}

/// Finding 8: a key-creating request under an `Idempotency-Key` used to leave the new key (and a
/// minted customer token) in the table for a day. The answer is stored sealed, and the retry
/// still answers exactly as the first request did.
async fn the_idempotency_store_keeps_no_secret_in_clear(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    let post = |path: &'static str, key: &'static str, body: Value| {
        s.app.client.post(s.app.url(path)).bearer_auth(&s.key).header("idempotency-key", key).json(&body).send()
    };
    let mut secrets = Vec::new();
    for (path, key, body, field, prefix) in [
        ("/api/v1/keys", "new-key-1", json!({"name": "backend", "kind": "secret"}), "key", "tg_sk_"),
        ("/api/v1/customer-tokens", "token-1", json!({"customer": "cust-1"}), "token", "tgct_"),
    ] {
        let first = post(path, key, body.clone()).await?;
        assert_eq!(first.status(), StatusCode::CREATED);
        let first_type = first.headers()["content-type"].clone();
        let first = first.text().await?;
        let secret = serde_json::from_str::<Value>(&first)?[field].as_str().unwrap_or_default().to_owned();
        assert!(secret.starts_with(prefix), "{first}");
        let retry = post(path, key, body).await?;
        assert_eq!(retry.status(), StatusCode::CREATED);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        assert_eq!(retry.headers()["content-type"], first_type);
        assert_eq!(retry.text().await?, first, "the replay answers as the first request did");
        secrets.push(secret);
    }
    let stored = stored_answers(&s).await?;
    assert_eq!(stored.len(), 2);
    for body in &stored {
        assert!(!body.contains("tg_sk_") && !body.contains("tgct_"), "a secret is stored in clear: {body}");
        for secret in &secrets {
            // Not even a recognisable part of it (what a hint would show).
            assert!(!body.contains(&secret[secret.len() - 12..]), "a secret is stored in clear: {body}");
        }
        assert!(body.starts_with("v2:"), "{body}");
    }
    // The stored answer opens only for its own project and key.
    let sealed = &stored[0];
    let master = &s.app.state.master_key;
    assert!(master.open(sealed, &SealedFor::idempotent_response(&s.project.id, "another-key")).is_err());
    s.app.stop().await
}

/// Finding 9: a sealed provider key copied into another tenant's provider row used to open
/// there, so the other tenant's calls went out with it. Now it does not open: the call fails
/// closed with a clear error and never reaches the upstream with the stolen key.
async fn a_sealed_key_copied_to_another_tenant_does_not_open(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    let state = &s.app.state;
    let other = projects::create_project(
        &state.db,
        &s.project.org_id,
        &NewProject { name: "Attacker".into(), min_output_tokens: 1, ..NewProject::default() },
    )
    .await?;
    let provider = projects::add_provider(
        &state.db,
        &state.master_key,
        &other.id,
        &NewProvider {
            kind: ProviderKind::OpenAiCompatible,
            name: "mine".into(),
            base_url: Some(s.mock.base_url()),
            api_key: "sk-attacker-own".into(),
            models: vec!["mock-*".into()],
        },
    )
    .await?;
    projects::set_price(
        &state.db,
        &other.id,
        "mock-model",
        &tollgate_core::pricing::Price {
            input: 0,
            cached_input: 0,
            output: 1,
            cache_write: 0,
            max_output_tokens: 100,
            tokenizer: tollgate_core::pricing::Tokenizer::O200kBase,
        },
    )
    .await?;
    // The victim's sealed credential, copied into the attacker's row.
    let victim: String = with_db!(&state.db, pool => sqlx::query_scalar(
        "SELECT api_key_sealed FROM provider_connections WHERE project_id = $1 AND kind = 'openai_compatible'")
        .bind(&s.project.id).fetch_one(pool).await)?;
    with_db!(&state.db, pool => sqlx::query("UPDATE provider_connections SET api_key_sealed = $1 WHERE id = $2")
        .bind(&victim).bind(&provider).execute(pool).await.map(drop))?;
    // A budget, so that only the credential stands between the call and the upstream.
    projects::upsert_customer_budget(
        &state.db,
        &other.id,
        "c1",
        tollgate_core::money::Nanos(1_000_000_000_000),
        tollgate_core::period::BudgetPeriod::Month,
    )
    .await?;
    let key = projects::create_key(&state.db, &other.id, projects::KeyKind::Secret, "k").await?.plaintext;
    let before = s.mock.credentials().len();
    let answer = s
        .app
        .client
        .post(s.app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-tollgate-customer", "c1")
        .json(&json!({"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await?;
    let status = answer.status();
    let body: Value = answer.json().await?;
    assert!(status.is_client_error() || status.is_server_error(), "{status} {body}");
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("credential"), "{body}");
    assert_eq!(body["error"]["code"], "provider_credential_unreadable", "{body}");
    assert!(
        s.mock.credentials()[before..].iter().all(|(c, _)| !c.contains("sk-mock-upstream")),
        "the victim's key went upstream"
    );
    s.app.stop().await
}

/// An upgrade never loses a secret: values sealed before they were bound to their row (`v1`)
/// are re-sealed for their row at startup, and an answer stored in clear is sealed.
async fn secrets_sealed_before_binding_are_resealed_at_startup(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("c1", 1_000).await?;
    let state = s.app.state.clone();
    let master: MasterKey = state.master_key.clone();
    let old = master.seal_unbound_for_tests("sk-mock-upstream");
    with_db!(&state.db, pool => sqlx::query("UPDATE provider_connections SET api_key_sealed = $1 WHERE project_id = $2")
        .bind(&old).bind(&s.project.id).execute(pool).await.map(drop))?;
    with_db!(&state.db, pool => sqlx::query("INSERT INTO idempotency_keys \
        (project_id, idem_key, request_hash, created_at, status_code, content_type, response_body) \
        VALUES ($1, 'old', 'h', $2, 201, 'application/json', '{\"key\":\"tg_sk_old\"}')")
        .bind(&s.project.id).bind(tollgate_core::time::UnixMillis::now().0).execute(pool).await.map(drop))?;
    s.app.stop().await?;

    let app = spawn_app(&db).await?;
    let sealed: Vec<String> = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT api_key_sealed FROM provider_connections").fetch_all(pool).await)?;
    assert_eq!(sealed.len(), 2);
    assert!(sealed.iter().all(|v| v.starts_with("v2:")), "{sealed:?}");
    let stored: String = with_db!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT response_body FROM idempotency_keys WHERE idem_key = 'old'").fetch_one(pool).await)?;
    assert!(stored.starts_with("v2:") && !stored.contains("tg_sk_"), "{stored}");
    // The re-sealed key still serves calls.
    let answer = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&s.key)
        .header("x-tollgate-customer", "c1")
        .json(&json!({"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await?;
    assert_eq!(answer.status(), StatusCode::OK, "{}", answer.text().await?);
    assert_eq!(s.mock.credentials().last().map(|c| c.0.clone()), Some("Bearer sk-mock-upstream".to_owned()));
    // Twice is once: a second start finds nothing to do.
    assert_eq!(tollgate_core::reseal::reseal_unbound_secrets(&app.state.db, &master).await?, 0);
    app.stop().await
}

/// Finding 9: the SQLite database was created world-readable. On a fresh data directory the
/// database, its `-wal` and `-shm` files and the master key are the owner's alone.
async fn data_files_are_readable_by_their_owner_only() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDatabase::sqlite()?;
    let app = crate::helpers::spawn_app_with(&db, |env| {
        env.remove("TOLLGATE_MASTER_KEY");
    })
    .await?;
    // Something written, so the WAL exists.
    app.get("/healthz").await?;
    let dir = db.dir.path();
    for name in ["tollgate.db", "tollgate.db-wal", "tollgate.db-shm", "master.key"] {
        let mode = std::fs::metadata(dir.join(name))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
    }
    app.stop().await
}

/// Finding 9: no `Strict-Transport-Security`. Served over HTTPS (an `https://` public URL),
/// every answer carries it — proxy, dashboard, API, errors; a plain-HTTP local run does not.
async fn hsts_is_sent_when_served_over_https() -> TestResult {
    let db = TestDatabase::sqlite()?;
    let app = crate::helpers::spawn_app_with(&db, |env| {
        env.insert("TOLLGATE_PUBLIC_URL".into(), "https://gateway.example.com".into());
    })
    .await?;
    for path in ["/healthz", "/login", "/v1/models", "/api/v1/customers", "/no-such-page"] {
        let answer = app.get(path).await?;
        assert_eq!(
            answer.headers().get("strict-transport-security").and_then(|v| v.to_str().ok()),
            Some("max-age=31536000"),
            "{path}: {}",
            answer.status()
        );
    }
    app.stop().await?;
    let db = TestDatabase::sqlite()?;
    let app = spawn_app(&db).await?;
    let answer = app.get("/healthz").await?;
    assert!(answer.headers().get("strict-transport-security").is_none(), "sent over plain HTTP");
    app.stop().await
}

/// Finding 9: `count_tokens` ignored a blocked customer (it reserves nothing, so it never met
/// the reservation's check). A blocked customer now gets the refusal `/v1/messages` gives, and
/// nothing reaches the upstream; others still count.
async fn count_tokens_refuses_a_blocked_customer(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("blocked", 1_000).await?;
    projects::set_customer_blocked(&s.app.state.db, &s.project.id, "blocked", true).await?;
    let call = |path: &'static str, customer: &'static str| {
        s.app
            .client
            .post(s.app.url(path))
            .header("x-api-key", &s.key)
            .header("anthropic-version", "2023-06-01")
            .header("x-tollgate-customer", customer)
            .json(
                &json!({"model": "claude-mock", "max_tokens": 5, "messages": [{"role": "user", "content": "Hello!"}]}),
            )
            .send()
    };
    let before = s.mock.credentials().len();
    let on_messages = call("/v1/messages", "blocked").await?;
    let (status, messages): (StatusCode, Value) = (on_messages.status(), on_messages.json().await?);
    assert_eq!(status, StatusCode::FORBIDDEN, "{messages}");
    let counted = call("/v1/messages/count_tokens", "blocked").await?;
    assert_eq!(counted.status(), status);
    assert_eq!(counted.json::<Value>().await?, messages, "the same refusal as on messages");
    assert_eq!(s.mock.credentials().len(), before, "a blocked customer's count reached the upstream");
    let other = call("/v1/messages/count_tokens", "someone-else").await?;
    assert_eq!(other.status(), StatusCode::OK);
    let unknown: Option<i64> = with_db!(&s.app.state.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM customers WHERE external_id = 'someone-else'").fetch_optional(pool).await)?;
    assert_eq!(unknown, Some(0), "counting created a customer");
    s.app.stop().await
}

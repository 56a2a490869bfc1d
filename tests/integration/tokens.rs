//! Publishable keys with customer tokens: the token names the customer, so a client can spend
//! only its own customer's budget. Wrong customer, expired, forged, another project's token:
//! all refused, and the victim's budget untouched.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_core::projects::{self, BudgetPolicy, KeyKind, NewProject};
use tollgate_core::time::UnixMillis;
use tollgate_core::tokens;

use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult};
use crate::proxy::{OUTPUT_NANOS_PER_TOKEN, Setup, setup};

pub fn cases() -> Vec<DbCase> {
    db_cases![a_publishable_key_spends_only_its_token_customer_budget]
}

fn hello() -> Value {
    json!({"model": "mock-model", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
}

impl Setup {
    async fn mint(&self, customer: &str, ttl: i64) -> anyhow::Result<String> {
        let response = self
            .app
            .client
            .post(self.app.url("/api/v1/customer-tokens"))
            .bearer_auth(&self.key)
            .json(&json!({"customer": customer, "ttl_seconds": ttl}))
            .send()
            .await?;
        anyhow::ensure!(response.status() == StatusCode::CREATED, "mint: {}", response.text().await?);
        let body: Value = response.json().await?;
        Ok(body["token"].as_str().unwrap_or_default().to_owned())
    }

    async fn client_call(
        &self,
        key: &str,
        token: Option<&str>,
        customer_header: Option<&str>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut request = self.app.client.post(self.app.url("/v1/chat/completions")).bearer_auth(key).json(&hello());
        if let Some(token) = token {
            request = request.header("x-tollgate-customer-token", token);
        }
        if let Some(customer) = customer_header {
            request = request.header("x-tollgate-customer", customer);
        }
        let response = request.send().await?;
        Ok((response.status(), response.json().await.unwrap_or(Value::Null)))
    }
}

async fn a_publishable_key_spends_only_its_token_customer_budget(db: TestDatabase) -> TestResult {
    let s = setup(&db, BudgetPolicy::Reject).await?;
    s.budget("alice", 100).await?;
    s.budget("bob", 100).await?;
    let pk = projects::create_key(&s.app.state.db, &s.project.id, KeyKind::Publishable, "web").await?.plaintext;
    let alice = s.mint("alice", 600).await?;

    // Alice's token spends Alice's budget.
    let (status, _) = s.client_call(&pk, Some(&alice), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.ledger("alice").await?, (10 * OUTPUT_NANOS_PER_TOKEN, 0));
    let (status, _) = s.client_call(&pk, Some(&alice), Some("alice")).await?;
    assert_eq!(status, StatusCode::OK, "a header naming the token's own customer is fine");

    // Attacks, each refused with Bob's budget untouched.
    let (status, body) = s.client_call(&pk, Some(&alice), Some("bob")).await?;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::FORBIDDEN, json!("customer_mismatch")));
    let (status, body) = s.client_call(&pk, None, Some("bob")).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token: {body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("customer token"));
    // Expired.
    let expired =
        tokens::mint(&s.app.state.master_key, &s.project.id, "bob", UnixMillis::now(), UnixMillis::now().0 / 1000 - 1);
    let (status, body) = s.client_call(&pk, Some(&expired), None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("expired"), "{body}");
    // Forged: Bob's claims with Alice's signature, and a token signed with another key.
    let bob_claims = tokens::mint(
        &s.app.state.master_key,
        &s.project.id,
        "bob",
        UnixMillis::now(),
        UnixMillis::now().0 / 1000 + 600,
    );
    let forged =
        format!("{}.{}", bob_claims.split_once('.').map_or("", |p| p.0), alice.split_once('.').map_or("", |p| p.1));
    assert_eq!(s.client_call(&pk, Some(&forged), None).await?.0, StatusCode::UNAUTHORIZED);
    let stranger = tokens::mint(
        &tollgate_core::crypto::MasterKey::generate(),
        &s.project.id,
        "bob",
        UnixMillis::now(),
        UnixMillis::now().0 / 1000 + 600,
    );
    assert_eq!(s.client_call(&pk, Some(&stranger), None).await?.0, StatusCode::UNAUTHORIZED);
    assert_eq!(s.client_call(&pk, Some("tgct_garbage"), None).await?.0, StatusCode::UNAUTHORIZED);
    // Another project's token, however genuine.
    let other = projects::create_project(
        &s.app.state.db,
        &s.project.org_id,
        &NewProject { name: "Other".into(), ..Default::default() },
    )
    .await?;
    let other_token =
        tokens::mint(&s.app.state.master_key, &other.id, "bob", UnixMillis::now(), UnixMillis::now().0 / 1000 + 600);
    let (status, body) = s.client_call(&pk, Some(&other_token), None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("another project"), "{body}");

    assert_eq!(s.ledger("bob").await?, (0, 0), "the victim's budget was touched");
    assert_eq!(s.mock.requests().len(), 2, "only Alice's two calls reached the provider");

    // Minting needs the secret key, a customer and a sane lifetime.
    let mint = |key: String, body: Value| {
        let request = s.app.client.post(s.app.url("/api/v1/customer-tokens")).bearer_auth(key).json(&body);
        async move { anyhow::Ok(request.send().await?.status()) }
    };
    assert_eq!(mint(pk.clone(), json!({"customer": "bob"})).await?, StatusCode::UNAUTHORIZED);
    assert_eq!(mint(s.key.clone(), json!({})).await?, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        mint(s.key.clone(), json!({"customer": "bob", "ttl_seconds": 90_000})).await?,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(mint(s.key.clone(), json!({"customer": "bob", "ttl_seconds": 60})).await?, StatusCode::CREATED);
    s.app.stop().await
}

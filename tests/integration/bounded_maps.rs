//! What the server keeps in memory stays bounded (see `tollgate::memory`): with small bounds,
//! many keys, customers, projects and API keys fill each map past its bound, the sizes in
//! `/metrics` never exceed it, and what was evicted is read again correctly — a key revoked
//! while evicted is refused, a budget or a price changed while evicted holds. The lease table
//! empties once the calls are done.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::pricing::{Price, Tokenizer};
use tollgate_core::projects::{self, BudgetPolicy, KeyKind, NewProject, NewProvider, ProviderKind};

use crate::db_cases;
use crate::helpers::{DbCase, TestApp, TestDatabase, TestResult, eventually};
use crate::proxy::{OUTPUT_NANOS_PER_TOKEN, Setup, setup_with};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        the_key_cache_stays_bounded_and_an_evicted_revoked_key_stays_refused,
        the_customer_cache_stays_bounded_and_a_budget_changed_while_evicted_holds,
        the_project_cache_stays_bounded_and_a_price_changed_while_evicted_holds,
        the_api_rate_buckets_stay_bounded,
        the_lease_table_empties_when_the_calls_are_done,
        metric_labels_never_carry_a_clients_method,
    ]
}

const MAX_KEYS: usize = 4;
const MAX_CUSTOMERS: usize = 5;
const MAX_PROJECTS: usize = 3;
const MAX_API_KEYS: usize = 3;

async fn small(db: &TestDatabase) -> anyhow::Result<Setup> {
    setup_with(db, BudgetPolicy::Reject, |env| {
        env.insert("TOLLGATE_CACHE_MAX_KEYS".into(), MAX_KEYS.to_string());
        env.insert("TOLLGATE_CACHE_MAX_CUSTOMERS".into(), MAX_CUSTOMERS.to_string());
        env.insert("TOLLGATE_CACHE_MAX_PROJECTS".into(), MAX_PROJECTS.to_string());
        env.insert("TOLLGATE_API_RATE_MAX_KEYS".into(), MAX_API_KEYS.to_string());
    })
    .await
}

/// The value of `name{labels}` in `/metrics`.
async fn metric(app: &TestApp, name: &str, labels: &str) -> anyhow::Result<f64> {
    let text = app.get("/metrics").await?.text().await?;
    let prefix = format!("{name}{{{labels}}} ");
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .ok_or_else(|| anyhow::anyhow!("no {name}{{{labels}}} in /metrics:\n{text}"))?;
    Ok(value.trim().parse()?)
}

/// `tollgate_cache_entries{cache}`, checked against its capacity and `bound`.
async fn cache_size(app: &TestApp, cache: &str, bound: usize) -> anyhow::Result<usize> {
    let labels = format!("cache=\"{cache}\"");
    let entries = metric(app, "tollgate_cache_entries", &labels).await?;
    let capacity = metric(app, "tollgate_cache_capacity", &labels).await?;
    assert_eq!(capacity, bound as f64, "{cache}: capacity");
    assert!(entries <= bound as f64, "{cache}: {entries} entries, over its bound of {bound}");
    Ok(entries as usize)
}

fn hello(max_tokens: i64) -> Value {
    json!({"model": "mock-model", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hello!"}]})
}

async fn models(s: &Setup, key: &str) -> anyhow::Result<StatusCode> {
    Ok(s.app.client.get(s.app.url("/v1/models")).bearer_auth(key).send().await?.status())
}

async fn the_key_cache_stays_bounded_and_an_evicted_revoked_key_stays_refused(db: TestDatabase) -> TestResult {
    let s = small(&db).await?;
    let db_ = &s.app.state.db;
    let mut keys = Vec::new();
    for i in 0..4 * MAX_KEYS {
        keys.push(projects::create_key(db_, &s.project.id, KeyKind::Secret, &format!("k{i}")).await?);
    }
    // Every key is served, unknown ones refused; the cache never holds more than its bound.
    let mut largest = 0;
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(models(&s, &key.plaintext).await?, StatusCode::OK);
        assert_eq!(models(&s, &format!("tg_sk_unknown{i}")).await?, StatusCode::UNAUTHORIZED);
        largest = largest.max(cache_size(&s.app, "keys", MAX_KEYS).await?);
        assert!(s.app.state.keys.sizes().0 <= MAX_KEYS);
        cache_size(&s.app, "key_last_used", MAX_KEYS).await?;
    }
    assert_eq!(largest, MAX_KEYS, "the cache fills up to its bound");

    // The first key was evicted long ago. Revoked in the database only (as another replica
    // would), it is refused at once: it is read again, not served from a stale entry.
    projects::revoke_key(db_, &s.project.id, &keys[0].id).await?;
    assert_eq!(models(&s, &keys[0].plaintext).await?, StatusCode::UNAUTHORIZED);

    // The second key: evicted, used again (read again, cached again), then revoked through the
    // management API: refused at once.
    for key in &keys[2..2 + MAX_KEYS] {
        assert_eq!(models(&s, &key.plaintext).await?, StatusCode::OK);
    }
    assert_eq!(models(&s, &keys[1].plaintext).await?, StatusCode::OK);
    let revoke = s
        .app
        .client
        .post(s.app.url(&format!("/api/v1/keys/{}/revoke", keys[1].id)))
        .bearer_auth(&keys[2].plaintext)
        .send()
        .await?;
    assert_eq!(revoke.status(), StatusCode::OK, "{}", revoke.text().await?);
    assert_eq!(models(&s, &keys[1].plaintext).await?, StatusCode::UNAUTHORIZED);
    // The keys not revoked still work, evicted or not.
    for key in &keys[2..] {
        assert_eq!(models(&s, &key.plaintext).await?, StatusCode::OK);
    }
    cache_size(&s.app, "keys", MAX_KEYS).await?;
    s.app.stop().await
}

async fn the_customer_cache_stays_bounded_and_a_budget_changed_while_evicted_holds(db: TestDatabase) -> TestResult {
    let s = small(&db).await?;
    let customers: Vec<String> = (0..4 * MAX_CUSTOMERS).map(|i| format!("cust-{i}")).collect();
    let mut largest = 0;
    for customer in &customers {
        s.budget(customer, 100).await?;
        let response = s.chat(customer, hello(20)).await?;
        assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await?);
        largest = largest.max(cache_size(&s.app, "customers", MAX_CUSTOMERS).await?);
        assert!(s.app.state.proxy_cache.sizes().1 <= MAX_CUSTOMERS);
    }
    assert_eq!(largest, MAX_CUSTOMERS, "the cache fills up to its bound");

    // Evicted long ago: cust-0's budget cut to what it spent, cust-1's raised. Both hold at
    // once (no change goes through the cache that would forget them).
    s.budget("cust-0", 20).await?;
    s.budget("cust-1", 1_000).await?;
    let refused = s.chat("cust-0", hello(20)).await?;
    assert_eq!(refused.status(), StatusCode::PAYMENT_REQUIRED, "{}", refused.text().await?);
    let served = s.chat("cust-1", hello(100)).await?;
    assert_eq!(served.status(), StatusCode::OK, "{}", served.text().await?);
    assert_eq!(served.headers()["x-tollgate-remaining"], "0.88", "1000 tokens less 20 and 100");
    assert_eq!(s.ledger("cust-0").await?, (20 * OUTPUT_NANOS_PER_TOKEN, 0));
    assert_eq!(s.ledger("cust-1").await?, (120 * OUTPUT_NANOS_PER_TOKEN, 0));
    // A customer never seen, past the bound, is created with the project's default budget
    // (none here): refused, and nothing spent.
    let unknown = s.chat("never-seen", hello(20)).await?;
    assert_eq!(unknown.status(), StatusCode::PAYMENT_REQUIRED);
    cache_size(&s.app, "customers", MAX_CUSTOMERS).await?;
    s.app.stop().await
}

/// Another project of the same organization, served by the same mock, with `output` nanos
/// per output token for `mock-model`, and a secret key.
async fn another_project(s: &Setup, i: usize, output: i64) -> anyhow::Result<(projects::Project, String)> {
    let state = &s.app.state;
    let project = projects::create_project(
        &state.db,
        &s.project.org_id,
        &NewProject {
            name: format!("Other {i}"),
            policy: BudgetPolicy::Reject,
            min_output_tokens: 1,
            ..NewProject::default()
        },
    )
    .await?;
    projects::add_provider(
        &state.db,
        &state.master_key,
        &project.id,
        &NewProvider {
            kind: ProviderKind::OpenAiCompatible,
            name: "mock".into(),
            base_url: Some(s.mock.base_url()),
            api_key: "sk-mock-upstream".into(),
            models: vec!["mock-*".into()],
        },
    )
    .await?;
    set_output_price(s, &project.id, output).await?;
    projects::upsert_customer_budget(
        &state.db,
        &project.id,
        "c",
        Nanos(1_000 * OUTPUT_NANOS_PER_TOKEN),
        BudgetPeriod::Month,
    )
    .await?;
    let key = projects::create_key(&state.db, &project.id, KeyKind::Secret, "test").await?.plaintext;
    Ok((project, key))
}

async fn set_output_price(s: &Setup, project: &tollgate_core::ids::ProjectId, output: i64) -> anyhow::Result<()> {
    let price = Price {
        input: 0,
        cached_input: 0,
        output: output * 1_000_000,
        cache_write: 0,
        max_output_tokens: 100,
        tokenizer: Tokenizer::O200kBase,
    };
    projects::set_price(&s.app.state.db, project, "mock-model", &price).await?;
    Ok(())
}

async fn project_chat(s: &Setup, key: &str) -> anyhow::Result<reqwest::Response> {
    Ok(s.app
        .client
        .post(s.app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-tollgate-customer", "c")
        .json(&hello(20))
        .send()
        .await?)
}

async fn the_project_cache_stays_bounded_and_a_price_changed_while_evicted_holds(db: TestDatabase) -> TestResult {
    let s = small(&db).await?;
    let mut others = Vec::new();
    for i in 0..3 * MAX_PROJECTS {
        others.push(another_project(&s, i, OUTPUT_NANOS_PER_TOKEN).await?);
    }
    let mut largest = 0;
    for (_, key) in &others {
        let response = project_chat(&s, key).await?;
        assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await?);
        assert_eq!(response.headers()["x-tollgate-cost"], "0.02");
        largest = largest.max(cache_size(&s.app, "project_configs", MAX_PROJECTS).await?);
    }
    assert_eq!(largest, MAX_PROJECTS, "the cache fills up to its bound");
    // Customers across projects share one bound.
    cache_size(&s.app, "customers", MAX_CUSTOMERS).await?;

    // The first project's configuration was evicted; its price doubled meanwhile (in the
    // database only): the next call costs the new price.
    let (first, key) = &others[0];
    set_output_price(&s, &first.id, 2 * OUTPUT_NANOS_PER_TOKEN).await?;
    let response = project_chat(&s, key).await?;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await?);
    assert_eq!(response.headers()["x-tollgate-cost"], "0.04");
    cache_size(&s.app, "project_configs", MAX_PROJECTS).await?;
    s.app.stop().await
}

async fn the_api_rate_buckets_stay_bounded(db: TestDatabase) -> TestResult {
    let s = small(&db).await?;
    let mut largest = 0;
    for i in 0..3 * MAX_API_KEYS {
        let key = projects::create_key(&s.app.state.db, &s.project.id, KeyKind::Secret, &format!("api{i}")).await?;
        for _ in 0..2 {
            let response = s.app.client.get(s.app.url("/api/v1/project")).bearer_auth(&key.plaintext).send().await?;
            assert_eq!(response.status(), StatusCode::OK);
        }
        largest = largest.max(cache_size(&s.app, "api_rate_buckets", MAX_API_KEYS).await?);
    }
    assert_eq!(largest, MAX_API_KEYS, "the buckets fill up to their bound");
    // An idle bucket fills up again within two seconds, and is then dropped as one never used.
    eventually(std::time::Duration::from_secs(10), || async {
        Ok(cache_size(&s.app, "api_rate_buckets", MAX_API_KEYS).await? == 0)
    })
    .await?;
    let (status, _) = s.api(Method::GET, "/api/v1/project", None).await?;
    assert_eq!(status, StatusCode::OK);
    s.app.stop().await
}

async fn the_lease_table_empties_when_the_calls_are_done(db: TestDatabase) -> TestResult {
    let s = small(&db).await?;
    // A hot customer (its calls share leases) and many others, at once.
    s.budget("hot", 100_000).await?;
    let others: Vec<String> = (0..3 * MAX_CUSTOMERS).map(|i| format!("other-{i}")).collect();
    for customer in &others {
        s.budget(customer, 1_000).await?;
    }
    let hot = (0..40).map(|_| s.chat("hot", hello(10)));
    let rest = others.iter().flat_map(|c| [s.chat(c, hello(10)), s.chat(c, hello(10))]);
    let results = futures::future::join_all(hot.chain(rest)).await;
    for result in results {
        let response = result?;
        assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await?);
    }
    // Settled, every call is gone from the table (written ones once journaled).
    eventually(std::time::Duration::from_secs(10), || async {
        Ok(s.app.state.ledger.lease_table() == Default::default())
    })
    .await?;
    for entries in ["customers", "leases", "calls", "ended"] {
        let labels = format!("entries=\"{entries}\"");
        assert_eq!(metric(&s.app, "tollgate_lease_table_entries", &labels).await?, 0.0, "{entries}");
    }
    assert_eq!(s.ledger("hot").await?, (400 * OUTPUT_NANOS_PER_TOKEN, 0), "nothing held at rest");
    s.app.stop().await
}

async fn metric_labels_never_carry_a_clients_method(db: TestDatabase) -> TestResult {
    let s = small(&db).await?;
    let method = Method::from_bytes(b"BREWCOFFEE")?;
    s.app.client.request(method, s.app.url("/healthz")).send().await?;
    let text = s.app.get("/metrics").await?.text().await?;
    assert!(!text.contains("BREWCOFFEE"), "a client's method became a label");
    assert!(text.contains("method=\"OTHER\""), "{text}");
    s.app.stop().await
}

//! Several `tollgate serve` processes on one database, as an operator scales them: one
//! customer's budget holds against a crowd of calls spread over both, JSON and streamed, and
//! no reservation is left behind.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tollgate_core::Db;
use tollgate_core::accounts::{self, NewOrganization};
use tollgate_core::crypto::MasterKey;
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::pricing::{Price, Tokenizer};
use tollgate_core::projects::{self, BudgetPolicy, Customer, KeyKind, NewProject, NewProvider, ProviderKind};
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult, eventually};
use crate::mock_provider::MockProvider;

pub fn cases() -> Vec<DbCase> {
    db_cases![
        two_processes_never_spend_past_one_budget,
        two_processes_never_spend_past_one_budget_streaming,
        processes_starting_at_once_all_come_up,
        slow_overlapping_calls_on_one_process_are_all_admitted,
        slow_overlapping_calls_on_two_processes_are_all_admitted,
        slow_overlapping_calls_with_budget_to_spare_are_all_admitted,
        a_killed_process_s_holds_are_released_by_the_other_within_a_minute,
        a_process_restarted_after_a_kill_releases_its_holds_at_once,
        each_call_a_killed_process_s_leases_held_is_recorded_as_interrupted,
    ]
}

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// The budget pays for exactly this many calls.
const N: i64 = 5;
/// Calls fired at once: twenty times what the budget pays for.
const CALLS: i64 = 20 * N;
/// Output tokens of every call: the mock answers exactly `max_tokens`.
const TOKENS_PER_CALL: i64 = 20;
/// One output token costs 1e6 nanos and input is free, so a call costs exactly its output.
const OUTPUT_NANOS_PER_TOKEN: i64 = 1_000_000;
const CALL_COST: i64 = TOKENS_PER_CALL * OUTPUT_NANOS_PER_TOKEN;
const CUSTOMER: &str = "shared-customer";
/// A model whose calls take [`SLOW_CALL`] each (the mock waits before answering).
const SLOW_MODEL: &str = "mock-wait-5000";
const SLOW_CALL: Duration = Duration::from_secs(5);
/// How often a slow call starts: 200 of them overlap.
const CALL_EVERY: Duration = Duration::from_millis(25);

/// A `tollgate serve` child process, its log (stderr) collected line by line.
struct Replica {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Replica {
    fn start(cwd: &Path, env: &HashMap<String, String>) -> anyhow::Result<Self> {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").current_dir(cwd).kill_on_drop(true);
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("TOLLGATE_") || k == "RUST_LOG") {
            cmd.env_remove(key);
        }
        let mut child = cmd.envs(env).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut log) = sink.lock() {
                    log.push(line);
                }
            }
        });
        Ok(Self { child, log })
    }

    fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Waits for the "listening on http://…" line and returns the base URL; fails as soon
    /// as the process exits.
    async fn base_url(&mut self) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.log_text();
            let found = text
                .split("listening on ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| c.is_whitespace() || c == '"').next())
                .map(str::to_owned);
            if let Some(url) = found {
                return Ok(url);
            }
            if let Some(status) = self.child.try_wait()? {
                // Let the reader drain the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                anyhow::bail!("exited ({status}) before listening; log:\n{}", self.log_text());
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "never listened; log:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process outright (SIGKILL: no shutdown, nothing settled).
    async fn kill(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("already exited; log:\n{}", self.log_text()))?;
        let status = Command::new("kill").args(["-KILL", &pid.to_string()]).status().await?;
        anyhow::ensure!(status.success(), "kill failed");
        tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await??;
        Ok(())
    }

    /// Stops the process with SIGTERM; returns its exit code and log.
    async fn terminate(mut self) -> anyhow::Result<(i32, String)> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("already exited; log:\n{}", self.log_text()))?;
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        anyhow::ensure!(status.success(), "kill failed");
        let exit = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await??;
        // Let the reader drain the last lines.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok((exit.code().unwrap_or(-1), self.log_text()))
    }
}

/// One project whose only customer can pay for exactly `N` calls.
struct Tenant {
    db: Db,
    project: projects::Project,
    key: String,
    budget: Nanos,
}

/// Creates the project through the test's own pool: the replicas read everything from the
/// database on each call, so they see it without being told.
async fn set_up_tenant(db: &TestDatabase, mock: &MockProvider) -> anyhow::Result<Tenant> {
    let pool = db.connect().await?;
    let master_key = MasterKey::from_base64(&db.env()["TOLLGATE_MASTER_KEY"])?;
    let org = accounts::create_organization_with_owner(
        &pool,
        NewOrganization { name: "Acme", owner_email: "ada@example.com", owner_password: "correct horse battery" },
    )
    .await?;
    let project = projects::create_project(
        &pool,
        &org.org_id,
        &NewProject {
            name: "Chat".into(),
            policy: BudgetPolicy::Reject,
            min_output_tokens: 1,
            ..NewProject::default()
        },
    )
    .await?;
    projects::add_provider(
        &pool,
        &master_key,
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
    let price = tenant_price();
    projects::set_price(&pool, &project.id, "mock-model", &price).await?;
    projects::set_price(&pool, &project.id, SLOW_MODEL, &price).await?;
    let key = projects::create_key(&pool, &project.id, KeyKind::Secret, "replicas").await?.plaintext;
    let budget = Nanos(N * CALL_COST);
    projects::upsert_customer_budget(&pool, &project.id, CUSTOMER, budget, BudgetPeriod::Month).await?;
    Ok(Tenant { db: pool, project, key, budget })
}

/// Every model's price: one output token costs [`OUTPUT_NANOS_PER_TOKEN`], input is free.
fn tenant_price() -> Price {
    Price {
        input: 0,
        cached_input: 0,
        output: OUTPUT_NANOS_PER_TOKEN * 1_000_000,
        cache_write: 0,
        max_output_tokens: 100,
        tokenizer: Tokenizer::O200kBase,
    }
}

impl Tenant {
    async fn customer(&self) -> anyhow::Result<Customer> {
        projects::find_customer(&self.db, &self.project.id, CUSTOMER)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no customer {CUSTOMER}"))
    }

    /// Open reservations of the customer.
    async fn reservations(&self, customer: &Customer) -> anyhow::Result<i64> {
        Ok(with_db!(&self.db, pool => sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM reservations WHERE customer_id = $1").bind(&customer.id).fetch_one(pool).await)?)
    }

    /// The customer's usage events with `status`: (how many, total billed, total cost).
    async fn events(&self, customer: &Customer, status: &str) -> anyhow::Result<(i64, i64, i64)> {
        Ok(with_db!(&self.db, pool => sqlx::query_as::<_, (i64, i64, i64)>(
            "SELECT COUNT(*), CAST(COALESCE(SUM(billed_nanos), 0) AS BIGINT), CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) \
             FROM usage_events WHERE customer_id = $1 AND status = $2")
            .bind(&customer.id).bind(status).fetch_one(pool).await)?)
    }
}

/// How one call ended, after its answer was read to the end.
enum Outcome {
    Served,
    Refused,
}

/// Posts chat request `body` for [`CUSTOMER`] to `base`, under `request_id` if given.
async fn post_chat(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: &Value,
    request_id: Option<String>,
) -> reqwest::Result<reqwest::Response> {
    let mut request =
        client.post(format!("{base}/v1/chat/completions")).bearer_auth(key).header("x-tollgate-customer", CUSTOMER);
    if let Some(id) = request_id {
        request = request.header("x-request-id", id);
    }
    request.json(body).send().await
}

/// Sends one call to `base` and checks its answer: a complete completion of
/// `TOKENS_PER_CALL` tokens, or a 402 in OpenAI's error shape.
async fn call(client: &reqwest::Client, base: &str, key: &str, stream: bool) -> anyhow::Result<Outcome> {
    let body = json!({"model": "mock-model", "max_tokens": TOKENS_PER_CALL, "stream": stream,
        "messages": [{"role": "user", "content": "Hello!"}]});
    let response = post_chat(client, base, key, &body, None).await?;
    let status = response.status();
    let text = response.text().await?;
    match status {
        StatusCode::OK if stream => {
            anyhow::ensure!(text.trim_end().ends_with("data: [DONE]"), "{base}: a stream did not finish: {text}");
            let tokens = text.matches("\"content\":\"tok \"").count() as i64;
            anyhow::ensure!(tokens == TOKENS_PER_CALL, "{base}: streamed {tokens} tokens: {text}");
            Ok(Outcome::Served)
        }
        StatusCode::OK => {
            let answer: Value = serde_json::from_str(&text)?;
            anyhow::ensure!(answer["usage"]["completion_tokens"] == TOKENS_PER_CALL, "{base}: {answer}");
            Ok(Outcome::Served)
        }
        StatusCode::PAYMENT_REQUIRED => {
            let answer: Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{base}: a 402 without a JSON body ({e}): {text}"))?;
            let error = &answer["error"];
            anyhow::ensure!(
                error["type"] == "insufficient_budget"
                    && error["code"] == "customer_budget_exceeded"
                    && error["message"].as_str().is_some_and(|m| !m.is_empty())
                    && error.get("param").is_some()
                    && error["currency"] == "usd"
                    && error["needed"] == "0.02",
                "{base}: a 402 not in OpenAI's error shape: {answer}"
            );
            Ok(Outcome::Refused)
        }
        other => anyhow::bail!("{base}: unexpected {other}: {text}"),
    }
}

async fn two_processes_never_spend_past_one_budget(db: TestDatabase) -> TestResult {
    crowd_on_two_replicas(db, false).await
}

async fn two_processes_never_spend_past_one_budget_streaming(db: TestDatabase) -> TestResult {
    crowd_on_two_replicas(db, true).await
}

/// Starts two replicas on `db`, fires `CALLS` identical concurrent calls for one customer,
/// alternating between them, and checks the ledger afterwards.
async fn crowd_on_two_replicas(db: TestDatabase, stream: bool) -> TestResult {
    // One after the other: the first brings the database up to date (starting at once is
    // `processes_starting_at_once_all_come_up`).
    let mut first = Replica::start(db.dir.path(), &db.env())?;
    let first_base = first.base_url().await?;
    let mut second = Replica::start(db.dir.path(), &db.env())?;
    let bases = [first_base, second.base_url().await?];
    anyhow::ensure!(bases[0] != bases[1], "both replicas listen on {}", bases[0]);
    let replicas = [first, second];
    let mock = MockProvider::start().await?;
    let tenant = set_up_tenant(&db, &mock).await?;

    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let calls = (0..CALLS as usize).map(|i| call(&client, &bases[i % 2], &tenant.key, stream));
    let outcomes = futures::future::try_join_all(calls).await?;
    let served = outcomes.iter().filter(|o| matches!(o, Outcome::Served)).count() as i64;
    let refused = outcomes.iter().filter(|o| matches!(o, Outcome::Refused)).count() as i64;

    // A stream settles after its last byte is sent: give the settlement tasks a moment.
    eventually(Duration::from_secs(10), || async { Ok(tenant.customer().await?.reserved_nanos == 0) }).await?;
    let customer = tenant.customer().await?;
    assert!(customer.spent_nanos <= tenant.budget.0, "overspent: {} > {}", customer.spent_nanos, tenant.budget.0);
    assert_eq!(served, N, "every call that fitted the budget must have been served");
    assert_eq!(refused, CALLS - N);
    assert_eq!(customer.spent_nanos, N * CALL_COST);
    assert_eq!(customer.reserved_nanos, 0, "a reservation leaked");
    assert_eq!(tenant.reservations(&customer).await?, 0, "reservation rows left behind");
    assert_eq!(mock.requests().len() as i64, N, "the provider must see exactly the served calls");

    let settled = tenant.events(&customer, "settled").await?;
    assert_eq!(settled, (N, N * CALL_COST, N * CALL_COST), "settled events: (count, billed, cost)");
    assert_eq!(tenant.events(&customer, "refused").await?, (CALLS - N, 0, 0), "refused events: (count, billed, cost)");
    assert_eq!(tenant.events(&customer, "failed").await?.0, 0);

    for replica in replicas {
        let (code, log) = replica.terminate().await?;
        assert_eq!(code, 0, "{log}");
        assert!(!log.contains("settlement failed"), "{log}");
        assert!(!log.contains("ledger unavailable"), "{log}");
    }
    Ok(())
}

/// Replicas of a deployment start together: each applies the migrations it finds pending,
/// and all of them must come up (`Db::migrate` promises it is safe from several processes).
async fn processes_starting_at_once_all_come_up(db: TestDatabase) -> TestResult {
    let env = db.env();
    let mut replicas: Vec<Replica> = (0..3).map(|_| Replica::start(db.dir.path(), &env)).collect::<Result<_, _>>()?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    for replica in &mut replicas {
        let base = replica.base_url().await?;
        let ready = client.get(format!("{base}/readyz")).send().await?;
        assert_eq!(ready.status(), StatusCode::OK, "{}", ready.text().await?);
    }
    assert!(db.connect().await?.pending_migrations().await?.is_empty());
    for replica in replicas {
        let (code, log) = replica.terminate().await?;
        assert_eq!(code, 0, "{log}");
    }
    Ok(())
}

async fn slow_overlapping_calls_on_one_process_are_all_admitted(db: TestDatabase) -> TestResult {
    slow_overlapping_calls(db, 1, 200, 200).await
}

async fn slow_overlapping_calls_on_two_processes_are_all_admitted(db: TestDatabase) -> TestResult {
    slow_overlapping_calls(db, 2, 200, 200).await
}

async fn slow_overlapping_calls_with_budget_to_spare_are_all_admitted(db: TestDatabase) -> TestResult {
    slow_overlapping_calls(db, 2, 300, 1_000).await
}

/// Leases never refuse an affordable call: `calls` slow calls (each [`SLOW_CALL`], one every
/// [`CALL_EVERY`], so two hundred overlap and their customer's leases go stale under them),
/// spread over `processes` replicas, against a budget for `budget_calls` of them (at least
/// as many) — every one admitted, nothing spent past the budget, nothing left held. (In the
/// field: 10 s calls 50 ms apart; the same shape, twice as fast.)
async fn slow_overlapping_calls(db: TestDatabase, processes: usize, calls: usize, budget_calls: i64) -> TestResult {
    let mut replicas = Vec::new();
    let mut bases = Vec::new();
    for _ in 0..processes {
        let mut replica = Replica::start(db.dir.path(), &db.env())?;
        bases.push(replica.base_url().await?);
        replicas.push(replica);
    }
    let mock = MockProvider::start().await?;
    let tenant = set_up_tenant(&db, &mock).await?;
    let budget = Nanos(budget_calls * CALL_COST);
    projects::upsert_customer_budget(&tenant.db, &tenant.project.id, CUSTOMER, budget, BudgetPeriod::Month).await?;

    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let mut handles = Vec::new();
    for i in 0..calls {
        let (client, base, key) = (client.clone(), bases[i % processes].clone(), tenant.key.clone());
        handles.push(tokio::spawn(async move {
            let body = json!({"model": SLOW_MODEL, "max_tokens": TOKENS_PER_CALL,
                "messages": [{"role": "user", "content": "Hello!"}]});
            let response = post_chat(&client, &base, &key, &body, None).await?;
            anyhow::Ok((response.status(), response.text().await?))
        }));
        tokio::time::sleep(CALL_EVERY).await;
    }
    let mut refused = Vec::new();
    for handle in handles {
        let (status, text) = handle.await??;
        if status != StatusCode::OK {
            refused.push(format!("{status}: {text}"));
        }
    }
    assert!(refused.is_empty(), "{} of {calls} affordable calls refused: {:?}", refused.len(), refused.first());

    eventually(Duration::from_secs(10), || async { Ok(tenant.customer().await?.reserved_nanos == 0) }).await?;
    let customer = tenant.customer().await?;
    assert_eq!(customer.spent_nanos, calls as i64 * CALL_COST);
    assert!(customer.spent_nanos <= budget.0);
    assert_eq!(tenant.reservations(&customer).await?, 0, "reservation rows left behind");
    assert_eq!(tenant.events(&customer, "settled").await?.0, calls as i64);
    assert!(SLOW_CALL > tollgate_core::ledger::lease::FRESH, "the calls must outlive their leases' freshness");
    for replica in replicas {
        let (code, log) = replica.terminate().await?;
        assert_eq!(code, 0, "{log}");
    }
    Ok(())
}

/// A model whose calls outlast the process that serves them in the crash tests.
const HUNG_MODEL: &str = "mock-wait-60000";
/// Calls in flight when their process is killed.
const IN_FLIGHT: i64 = 6;

/// Starts `IN_FLIGHT` calls of [`HUNG_MODEL`] on `base`, with request ids `killed-<i>`, and
/// waits until all of them hold their budget. Their answers never come (the process dies).
async fn calls_in_flight(tenant: &Tenant, base: &str) -> anyhow::Result<()> {
    hung_calls(tenant, base, IN_FLIGHT).await?;
    eventually(Duration::from_secs(20), || async {
        Ok(tenant.customer().await?.reserved_nanos == IN_FLIGHT * CALL_COST)
    })
    .await
}

/// Starts `calls` calls of [`HUNG_MODEL`] on `base`, 20 ms apart (as calls come in use: the
/// later ones find the earlier in flight), with request ids `killed-<i>`.
async fn hung_calls(tenant: &Tenant, base: &str, calls: i64) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    for i in 0..calls {
        let (client, base, key) = (client.clone(), base.to_owned(), tenant.key.clone());
        tokio::spawn(async move {
            let body = json!({"model": HUNG_MODEL, "max_tokens": TOKENS_PER_CALL,
                "messages": [{"role": "user", "content": "Hello!"}]});
            let _ = post_chat(&client, &base, &key, &body, Some(format!("killed-{i:02}"))).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A call worth all that is left of the budget once the killed calls' holds are back: only
/// admitted then. (The price's limit is 100 tokens, five calls' worth.)
async fn big_call(client: &reqwest::Client, base: &str, key: &str) -> anyhow::Result<StatusCode> {
    let body = json!({"model": "mock-model", "max_tokens": 5 * TOKENS_PER_CALL,
        "messages": [{"role": "user", "content": "Hello!"}]});
    Ok(post_chat(client, base, key, &body, None).await?.status())
}

/// The killed calls, recorded as interrupted: (request id, reserved, billed), by request id.
async fn interrupted(tenant: &Tenant) -> anyhow::Result<Vec<(String, i64, i64)>> {
    Ok(with_db!(&tenant.db, pool => sqlx::query_as::<_, (String, i64, i64)>(
        "SELECT request_id, reserved_nanos, billed_nanos FROM usage_events WHERE status = 'interrupted' \
         ORDER BY request_id").fetch_all(pool).await)?)
}

/// kill -9 of one of two replicas with calls in flight: the other keeps serving, sees the
/// dead one's heartbeat stop, and gives its holds back within a minute; the killed calls are
/// recorded as interrupted, not billed (the default).
async fn a_killed_process_s_holds_are_released_by_the_other_within_a_minute(db: TestDatabase) -> TestResult {
    let mut doomed = Replica::start(db.dir.path(), &db.env())?;
    let doomed_base = doomed.base_url().await?;
    let mut survivor = Replica::start(db.dir.path(), &db.env())?;
    let survivor_base = survivor.base_url().await?;
    let mock = MockProvider::start().await?;
    let tenant = set_up_tenant(&db, &mock).await?;
    projects::set_price(&tenant.db, &tenant.project.id, HUNG_MODEL, &tenant_price()).await?;
    let budget = Nanos(10 * CALL_COST);
    projects::upsert_customer_budget(&tenant.db, &tenant.project.id, CUSTOMER, budget, BudgetPeriod::Month).await?;

    calls_in_flight(&tenant, &doomed_base).await?;
    doomed.kill().await?;
    let killed_at = tokio::time::Instant::now();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    // The survivor serves on: one call fits beside the dead one's holds; a big one does not yet.
    assert!(matches!(call(&client, &survivor_base, &tenant.key, false).await?, Outcome::Served));
    assert_eq!(big_call(&client, &survivor_base, &tenant.key).await?, StatusCode::PAYMENT_REQUIRED);
    eventually(Duration::from_secs(60), || async {
        Ok(big_call(&client, &survivor_base, &tenant.key).await? == StatusCode::OK)
    })
    .await?;
    let waited = killed_at.elapsed();
    assert!(waited < Duration::from_secs(60), "the dead process's holds came back after {waited:?}");
    // The big call fits once most holds are back; the recovery finishes a moment later (it
    // releases them one by one), and forgets the dead instance last.
    eventually(Duration::from_secs(10), || async {
        let instances: i64 = with_db!(&tenant.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM instances")
            .fetch_one(pool).await)?;
        Ok(instances == 1 && tenant.customer().await?.reserved_nanos == 0)
    })
    .await?;

    let customer = tenant.customer().await?;
    assert_eq!(customer.reserved_nanos, 0);
    assert_eq!(customer.spent_nanos, 6 * CALL_COST, "the killed calls are not billed by default");
    let expected: Vec<_> = (0..IN_FLIGHT).map(|i| (format!("killed-{i:02}"), CALL_COST, 0)).collect();
    assert_eq!(interrupted(&tenant).await?, expected);
    let (code, log) = survivor.terminate().await?;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("recovered a dead instance"), "{log}");
    Ok(())
}

/// A replica serving under the instance name `replica-a` (so a restart under `env` recovers
/// its earlier life at once), and a tenant whose customer has a budget for `budget_calls`
/// calls of [`HUNG_MODEL`]. Returns the environment to restart with, the replica, its base
/// URL, the mock (kept alive) and the tenant.
async fn named_replica(
    db: &TestDatabase,
    budget_calls: i64,
) -> anyhow::Result<(HashMap<String, String>, Replica, String, MockProvider, Tenant)> {
    let mut env = db.env();
    env.insert("TOLLGATE_INSTANCE_NAME".into(), "replica-a".into());
    let mut replica = Replica::start(db.dir.path(), &env)?;
    let base = replica.base_url().await?;
    let mock = MockProvider::start().await?;
    let tenant = set_up_tenant(db, &mock).await?;
    projects::set_price(&tenant.db, &tenant.project.id, HUNG_MODEL, &tenant_price()).await?;
    let budget = Nanos(budget_calls * CALL_COST);
    projects::upsert_customer_budget(&tenant.db, &tenant.project.id, CUSTOMER, budget, BudgetPeriod::Month).await?;
    Ok((env, replica, base, mock, tenant))
}

/// kill -9 of the only process, then a restart under the same instance name: the restarted
/// process gives back what its earlier life held as it starts; with a project that bills
/// interrupted calls, each is billed at what it had reserved.
async fn a_process_restarted_after_a_kill_releases_its_holds_at_once(db: TestDatabase) -> TestResult {
    let (env, first, base, _mock, tenant) = named_replica(&db, 12).await?;
    let mut settings = projects::ProjectSettings::of(&tenant.project);
    settings.bill_interrupted = true;
    projects::update_project(&tenant.db, &tenant.project.org_id, &tenant.project.id, &settings).await?;

    calls_in_flight(&tenant, &base).await?;
    first.kill().await?;
    let mut again = Replica::start(db.dir.path(), &env)?;
    let base = again.base_url().await?;
    // Started: the earlier life's holds are back already, no heartbeat waited for.
    let customer = tenant.customer().await?;
    assert_eq!(customer.reserved_nanos, 0);
    assert_eq!(customer.spent_nanos, IN_FLIGHT * CALL_COST, "billed at what they had reserved");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    assert_eq!(big_call(&client, &base, &tenant.key).await?, StatusCode::OK);
    let expected: Vec<_> = (0..IN_FLIGHT).map(|i| (format!("killed-{i:02}"), CALL_COST, CALL_COST)).collect();
    assert_eq!(interrupted(&tenant).await?, expected);
    let (code, log) = again.terminate().await?;
    assert_eq!(code, 0, "{log}");
    Ok(())
}

/// kill -9 of a process whose busy customer's calls share leases (a lease's row names only
/// the call that took it): after the restart, each call in flight is recorded as interrupted
/// under its own request id with its own share, and nothing stays held.
async fn each_call_a_killed_process_s_leases_held_is_recorded_as_interrupted(db: TestDatabase) -> TestResult {
    const CALLS: i64 = 20;
    // Budget for 1,000 calls: plenty to spare, so the calls take leases.
    let (env, first, base, _mock, tenant) = named_replica(&db, 1_000).await?;

    hung_calls(&tenant, &base, CALLS).await?;
    // Every call is in flight, written down a moment after it started (what the process
    // would leave behind should it die now).
    eventually(Duration::from_secs(20), || async {
        // Each leased call written; each call held alone (the first: no other in flight yet) its own row.
        let known: i64 = with_db!(&tenant.db, pool => sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM calls_in_flight) + (SELECT COUNT(*) FROM reservations r \
             WHERE NOT EXISTS (SELECT 1 FROM calls_in_flight c WHERE c.reservation_id = r.id))")
            .fetch_one(pool).await)?;
        Ok(known == CALLS)
    })
    .await?;
    let customer = tenant.customer().await?;
    let rows = tenant.reservations(&customer).await?;
    assert!(rows < CALLS, "the calls share leases: {rows} reservation rows for {CALLS} calls");

    first.kill().await?;
    let mut again = Replica::start(db.dir.path(), &env)?;
    again.base_url().await?;
    let customer = tenant.customer().await?;
    assert_eq!(customer.reserved_nanos, 0, "the leases' spare and the calls' shares are all back");
    assert_eq!(customer.spent_nanos, 0, "interrupted calls are not billed by default");
    assert_eq!(tenant.reservations(&customer).await?, 0);
    let expected: Vec<_> = (0..CALLS).map(|i| (format!("killed-{i:02}"), CALL_COST, 0)).collect();
    assert_eq!(interrupted(&tenant).await?, expected, "one interrupted event per call, with its share");
    let left: i64 =
        with_db!(&tenant.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM calls_in_flight").fetch_one(pool).await)?;
    assert_eq!(left, 0, "the recovered calls are forgotten");
    let (code, log) = again.terminate().await?;
    assert_eq!(code, 0, "{log}");
    Ok(())
}

//! The matrix of issue 7: baseline (straight to the mock) against Tollgate with everything on,
//! JSON and streaming, one hot customer and many, on SQLite (synchronous FULL and NORMAL) and
//! PostgreSQL; then the correctness checks in the database. Prints markdown tables.
//!
//! It builds nothing: it runs the `tollgate` binary it is given (by default
//! `target/release/tollgate` of this workspace) and starts the mock as a child process of its
//! own executable, so the mock, Tollgate and the load generator are three processes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::load::{self, LoadReport, LoadSpec};

/// The model: in Tollgate's shipped price table, so no price override is needed.
const MODEL: &str = "gpt-4o-mini";
/// Output tokens asked for (and so produced, one per chunk, by the mock).
pub(crate) const MAX_TOKENS: u32 = 20;
/// A budget no run exhausts (in currency units), so every call of the timed runs succeeds.
const LARGE_BUDGET: &str = "1000000";
/// The tight budget of the overspend check: about 70 calls' worth.
const TIGHT_BUDGET: &str = "0.001";
const TIGHT_BUDGET_NANOS: i64 = 1_000_000;

/// What the matrix runs.
#[derive(Debug, Clone)]
pub struct MatrixConfig {
    pub tollgate: PathBuf,
    pub rates: Vec<f64>,
    pub duration: Duration,
    pub customers: u64,
    pub latency_ms: u64,
    pub chunks: u32,
    pub chunk_interval_ms: u64,
    pub postgres_url: Option<String>,
    /// Run SQLite with `synchronous = FULL`.
    pub sqlite_full: bool,
    /// Also run SQLite with `synchronous = NORMAL`.
    pub sqlite_normal: bool,
    /// Also run streamed calls.
    pub stream: bool,
    /// Measure the baseline again right before each run through Tollgate (the machine drifts
    /// between runs by more than the latency a proxy should add).
    pub paired_baseline: bool,
}

impl MatrixConfig {
    fn calls(&self) -> Vec<Call> {
        if self.stream { vec![Call::Json, Call::Stream] } else { vec![Call::Json] }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Call {
    Json,
    Stream,
}

impl Call {
    fn label(self) -> &'static str {
        match self {
            Call::Json => "json",
            Call::Stream => "stream",
        }
    }

    pub(crate) fn body(self) -> String {
        let mut body = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
            "max_tokens": MAX_TOKENS,
        });
        if self == Call::Stream {
            body["stream"] = true.into();
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        body.to_string()
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Database {
    Sqlite { synchronous: &'static str },
    Postgres { admin_url: String },
}

impl Database {
    pub(crate) fn label(&self) -> String {
        match self {
            Database::Sqlite { synchronous } => format!("sqlite ({synchronous})"),
            Database::Postgres { .. } => "postgres".to_owned(),
        }
    }
}

/// One timed run through Tollgate.
struct Row {
    db: String,
    call: Call,
    customers: u64,
    rate: f64,
    report: LoadReport,
    /// The same load straight to the mock, right before (with `paired_baseline`).
    baseline: Option<LoadReport>,
    cpu_percent: f64,
    peak_rss_mb: f64,
    ledger: LedgerWaits,
}

impl Row {
    /// What its added latency is measured against: its own baseline, else the one at the start.
    fn baseline<'a>(&'a self, at_start: &'a HashMap<(Call, u64), LoadReport>) -> Option<&'a LoadReport> {
        self.baseline.as_ref().or_else(|| at_start.get(&(self.call, self.rate as u64)))
    }

    /// The first cells of its table rows: database, call, customers, rate.
    fn case(&self) -> String {
        format!("| {} | {} | {} | {} |", self.db, self.call.label(), self.customers, self.rate)
    }
}

/// What Tollgate's `/metrics` say of its ledger over one run: mean waits and batch size.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LedgerWaits {
    pub(crate) reserve_ms: f64,
    pub(crate) settle_ms: f64,
    pub(crate) commit_ms: f64,
    pub(crate) operations_per_batch: f64,
}

/// The `_sum` and `_count` of every histogram and summary in a Prometheus text page.
#[derive(Debug, Default)]
pub(crate) struct Scrape(HashMap<String, f64>);

impl Scrape {
    pub(crate) async fn take(client: &reqwest::Client, base: &str) -> anyhow::Result<Self> {
        let text = client.get(format!("{base}/metrics")).send().await?.error_for_status()?.text().await?;
        let values = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(name, _)| name.contains("_sum") || name.contains("_count") || name.contains("_total"))
            .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
            .collect();
        Ok(Self(values))
    }

    /// The mean of `metric` (with `labels`, as rendered) between `self` and `later`.
    fn mean_since(&self, later: &Scrape, metric: &str, labels: &str) -> f64 {
        let delta = |suffix: &str| {
            let key = format!("{metric}{suffix}{labels}");
            later.0.get(&key).copied().unwrap_or(0.0) - self.0.get(&key).copied().unwrap_or(0.0)
        };
        let count = delta("_count");
        if count > 0.0 { delta("_sum") / count } else { 0.0 }
    }

    /// How much `metric` (with `labels`, as rendered) grew between `self` and `later`.
    pub(crate) fn growth_since(&self, later: &Scrape, metric: &str, labels: &str) -> f64 {
        let key = format!("{metric}{labels}");
        later.0.get(&key).copied().unwrap_or(0.0) - self.0.get(&key).copied().unwrap_or(0.0)
    }

    pub(crate) fn ledger_since(&self, later: &Scrape) -> LedgerWaits {
        LedgerWaits {
            reserve_ms: 1000.0 * self.mean_since(later, "tollgate_ledger_seconds", "{op=\"reserve\"}"),
            settle_ms: 1000.0 * self.mean_since(later, "tollgate_ledger_seconds", "{op=\"settle\"}"),
            commit_ms: 1000.0 * self.mean_since(later, "tollgate_ledger_commit_seconds", ""),
            operations_per_batch: self.mean_since(later, "tollgate_ledger_batch_operations", ""),
        }
    }
}

/// The correctness findings for one database.
pub(crate) struct Checks {
    pub(crate) db: String,
    ok_calls: u64,
    /// Calls the load generator counted as errors (a timeout, a dropped connection): Tollgate
    /// may have settled them all the same (the call ran; the client stopped listening).
    abandoned_calls: u64,
    settled_events: i64,
    open_reservations: i64,
    customers_over_budget: i64,
    ledger_mismatches: i64,
    tight_ok: u64,
    tight_refused: u64,
    tight_spent_nanos: i64,
}

impl Checks {
    pub(crate) fn passed(&self) -> bool {
        let (ok, abandoned) =
            (i64::try_from(self.ok_calls).unwrap_or(-1), i64::try_from(self.abandoned_calls).unwrap_or(0));
        (ok..=ok + abandoned).contains(&self.settled_events)
            && self.open_reservations == 0
            && self.customers_over_budget == 0
            && self.ledger_mismatches == 0
            && self.tight_spent_nanos <= TIGHT_BUDGET_NANOS
    }
}

/// Runs the whole matrix and prints its tables; fails if a correctness check fails.
pub async fn run(config: MatrixConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.tollgate.is_file(),
        "{} not found: build it first with `cargo build --release -p tollgate -p tollgate-bench`",
        config.tollgate.display()
    );
    let started = std::time::Instant::now();
    let (mut mock, mock_addr) = start_mock(config.latency_ms, config.chunks, config.chunk_interval_ms).await?;
    let mock_url = format!("http://{mock_addr}/v1/chat/completions");
    eprintln!("mock on {mock_addr}");

    // Baselines: the same loads straight to the mock.
    let mut baselines: HashMap<(Call, u64), LoadReport> = HashMap::new();
    for call in config.calls() {
        for &rate in &config.rates {
            let spec = spec(&mock_url, rate, config.duration, vec![], 1, call);
            let report = load::run(&load::client_for(rate, spec.timeout)?, &spec).await?;
            eprintln!("baseline {} {rate}/s: {}", call.label(), report.summary());
            baselines.insert((call, rate as u64), report);
        }
    }

    let mut databases = Vec::new();
    if config.sqlite_full {
        databases.push(Database::Sqlite { synchronous: "full" });
    }
    if config.sqlite_normal {
        databases.push(Database::Sqlite { synchronous: "normal" });
    }
    match &config.postgres_url {
        Some(url) => databases.push(Database::Postgres { admin_url: url.clone() }),
        None => eprintln!("TOLLGATE_BENCH_POSTGRES_URL not set: PostgreSQL skipped"),
    }

    let mut rows = Vec::new();
    let mut checks = Vec::new();
    for db in &databases {
        let (db_rows, db_checks) = run_database(&config, db, &mock_addr).await?;
        rows.extend(db_rows);
        checks.push(db_checks);
    }
    let _ = mock.kill().await;

    println!("{}", render(&config, &baselines, &rows, &checks));
    println!("Matrix wall time: {:.0} s", started.elapsed().as_secs_f64());
    if let Some(failed) = checks.iter().find(|c| !c.passed()) {
        bail!("correctness check failed on {}", failed.db);
    }
    Ok(())
}

pub(crate) fn spec(
    url: &str,
    rate: f64,
    duration: Duration,
    headers: Vec<(String, String)>,
    customers: u64,
    call: Call,
) -> LoadSpec {
    LoadSpec {
        url: url.to_owned(),
        rate,
        duration,
        headers,
        customers,
        body: call.body(),
        stream: call == Call::Stream,
        timeout: Duration::from_secs(10),
    }
}

/// The mock as a child process: `latency_ms` before each answer, `chunks` output tokens
/// `chunk_interval_ms` apart. Returns it and the address it listens on.
pub(crate) async fn start_mock(
    latency_ms: u64,
    chunks: u32,
    chunk_interval_ms: u64,
) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe().context("locating tollgate-bench")?;
    let mut child = Command::new(exe)
        .args(["mock", "--listen", "127.0.0.1:0"])
        .arg(format!("--latency-ms={latency_ms}"))
        .arg(format!("--chunks={chunks}"))
        .arg(format!("--chunk-interval-ms={chunk_interval_ms}"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the mock")?;
    let stdout = child.stdout.take().context("the mock's stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).await?;
    let addr = line.trim().strip_prefix("listening on ").context("the mock did not say where it listens")?.to_owned();
    Ok((child, addr))
}

/// A running `tollgate serve` with its project set up.
pub(crate) struct Tollgate {
    child: Child,
    pub(crate) pid: u32,
    pub(crate) base: String,
    pub(crate) key: String,
    data_dir: PathBuf,
    pub(crate) database_url: String,
}

impl Tollgate {
    pub(crate) async fn start(
        binary: &Path,
        db: &Database,
        database_url: &str,
        mock_addr: &str,
    ) -> anyhow::Result<Self> {
        let data_dir = std::env::temp_dir().join(format!("tollgate-bench-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&data_dir)?;
        let port = free_port()?;
        let mut env = vec![
            ("TOLLGATE_DATA_DIR".to_owned(), data_dir.display().to_string()),
            ("TOLLGATE_DATABASE_URL".to_owned(), database_url.to_owned()),
            ("TOLLGATE_LISTEN".to_owned(), format!("127.0.0.1:{port}")),
            // Request logs off: the benchmark measures the proxy, not the terminal.
            ("TOLLGATE_LOG".to_owned(), "warn".to_owned()),
            ("TOLLGATE_OWNER_PASSWORD".to_owned(), "a long benchmark password".to_owned()),
            // The mock provider listens on loopback, which the egress policy refuses by default.
            ("TOLLGATE_EGRESS_ALLOW".to_owned(), "127.0.0.0/8,::1".to_owned()),
        ];
        if let Database::Sqlite { synchronous } = db {
            env.push(("TOLLGATE_SQLITE_SYNCHRONOUS".to_owned(), (*synchronous).to_owned()));
        }
        let binary = binary.to_path_buf();
        admin(&binary, &env, &["migrate"], None).await?;
        let out = admin(
            &binary,
            &env,
            &["admin", "create-org", "--name", "Bench", "--owner-email", "bench@example.com"],
            None,
        )
        .await?;
        let org = word(&out, 1)?;
        let out = admin(
            &binary,
            &env,
            &[
                "admin",
                "create-project",
                "--org",
                &org,
                "--name",
                "Bench",
                "--policy",
                "clamp",
                "--default-budget",
                LARGE_BUDGET,
                "--period",
                "lifetime",
            ],
            None,
        )
        .await?;
        let project = word(&out, 1)?;
        let base_url = format!("http://{mock_addr}/v1");
        admin(
            &binary,
            &env,
            &[
                "admin",
                "add-provider",
                "--project",
                &project,
                "--kind",
                "openai_compatible",
                "--base-url",
                &base_url,
                "--models",
                MODEL,
                "--api-key-stdin",
            ],
            Some("sk-bench-upstream"),
        )
        .await?;
        let key = admin(&binary, &env, &["admin", "create-key", "--project", &project], None).await?.trim().to_owned();
        admin(
            &binary,
            &env,
            &[
                "admin",
                "set-budget",
                "--project",
                &project,
                "--customer",
                "tight",
                "--amount",
                TIGHT_BUDGET,
                "--period",
                "lifetime",
            ],
            None,
        )
        .await?;

        // Its warnings (slow statements, slow pool acquires) go to a file that outlives the run.
        let log_path =
            std::env::temp_dir().join(format!("tollgate-bench-{}.log", db.label().replace([' ', '(', ')'], "")));
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        eprintln!("{}: tollgate's log in {}", db.label(), log_path.display());
        let child = Command::new(&binary)
            .arg("serve")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("starting tollgate serve")?;
        let pid = child.id().context("tollgate's pid")?;
        let base = format!("http://127.0.0.1:{port}");
        let tollgate = Tollgate { child, pid, base, key, data_dir, database_url: database_url.to_owned() };
        tollgate.wait_ready().await?;
        Ok(tollgate)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(r) = client.get(format!("{}/readyz", self.base)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("tollgate did not become ready on {}", self.base)
    }

    pub(crate) fn headers(&self, customer: &str) -> Vec<(String, String)> {
        vec![
            ("authorization".to_owned(), format!("Bearer {}", self.key)),
            ("x-tollgate-customer".to_owned(), customer.to_owned()),
        ]
    }

    /// Stops the server with SIGTERM (in-flight requests finish), killing it after 15 s.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status().await;
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
        Ok(())
    }
}

/// Runs a `tollgate` command to completion, with `stdin` written to it, and returns its stdout.
async fn admin(binary: &Path, env: &[(String, String)], args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(binary)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running tollgate {}", args.join(" ")))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).await?;
        pipe.write_all(b"\n").await?;
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!("tollgate {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn word(text: &str, n: usize) -> anyhow::Result<String> {
    text.split_whitespace().nth(n).map(str::to_owned).with_context(|| format!("unexpected output: {text}"))
}

pub(crate) fn unique() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The database URL Tollgate gets, creating a PostgreSQL database of our own when asked.
pub(crate) async fn create_database(db: &Database, name: &str) -> anyhow::Result<String> {
    match db {
        Database::Sqlite { .. } => {
            let dir = std::env::temp_dir().join(format!("{name}.d"));
            std::fs::create_dir_all(&dir)?;
            Ok(format!("sqlite://{}", dir.join("tollgate.db").display()))
        }
        Database::Postgres { admin_url } => {
            let pool = sqlx::PgPool::connect(admin_url).await.context("connecting to TOLLGATE_BENCH_POSTGRES_URL")?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&pool).await?;
            // Settings for every session of the benchmark's database only, to look inside a run
            // (e.g. `session_preload_libraries=auto_explain;auto_explain.log_min_duration=20`).
            if let Ok(settings) = std::env::var("TOLLGATE_BENCH_POSTGRES_SETTINGS") {
                for setting in settings.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    let (key, value) =
                        setting.split_once('=').context("TOLLGATE_BENCH_POSTGRES_SETTINGS: name=value")?;
                    let sql =
                        format!("ALTER DATABASE {name} SET {} = '{}'", key.trim(), value.trim().replace('\'', "''"));
                    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await?;
                }
            }
            pool.close().await;
            Ok(replace_database(admin_url, name))
        }
    }
}

pub(crate) async fn drop_database(db: &Database, name: &str) -> anyhow::Result<()> {
    match db {
        Database::Sqlite { .. } => {
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("{name}.d")));
        }
        Database::Postgres { admin_url } => {
            let pool = sqlx::PgPool::connect(admin_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                .execute(&pool)
                .await?;
            pool.close().await;
        }
    }
    Ok(())
}

/// `postgres://u@h:5432/postgres?x=y` with `name` as its database.
fn replace_database(url: &str, name: &str) -> String {
    let (url, query) = url.split_once('?').map_or((url, None), |(u, q)| (u, Some(q)));
    let authority_end = url.find("://").map_or(0, |i| i + 3);
    let base = match url[authority_end..].find('/') {
        Some(i) => &url[..authority_end + i],
        None => url,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

async fn run_database(config: &MatrixConfig, db: &Database, mock_addr: &str) -> anyhow::Result<(Vec<Row>, Checks)> {
    let name = format!("tollgate_bench_{}_{}", std::process::id(), unique() % 1_000_000);
    let database_url = create_database(db, &name).await?;
    let result = async {
        let tollgate = Tollgate::start(&config.tollgate, db, &database_url, mock_addr).await?;
        let measured = measure(config, db, &tollgate, mock_addr).await;
        let checks = match &measured {
            Ok((_, calls, tight)) => Some(check(db, &tollgate.database_url, *calls, *tight).await),
            Err(_) => None,
        };
        tollgate.stop().await?;
        let (rows, _, _) = measured?;
        let checks = checks.context("no checks")??;
        Ok::<_, anyhow::Error>((rows, checks))
    }
    .await;
    drop_database(db, &name).await?;
    result
}

/// The timed runs against one Tollgate; returns the rows, the successful and the errored calls in all, and
/// the tight customer's (successful, refused) calls.
async fn measure(
    config: &MatrixConfig,
    db: &Database,
    tollgate: &Tollgate,
    mock_addr: &str,
) -> anyhow::Result<(Vec<Row>, (u64, u64), (u64, u64))> {
    let url = format!("{}/v1/chat/completions", tollgate.base);
    let mock_url = format!("http://{mock_addr}/v1/chat/completions");
    let mut ok_calls = 0;
    let mut abandoned = 0;
    // Warm up (connections, caches, the hot customer's row): not timed.
    let warm = spec(&url, 200.0, Duration::from_secs(1), tollgate.headers("hot"), 1, Call::Json);
    let report = load::run(&load::client_for(200.0, warm.timeout)?, &warm).await?;
    ok_calls += report.ok;
    abandoned += report.errors;

    let mut rows = Vec::new();
    for call in config.calls() {
        for (customer, customers) in [("hot", 1), ("cust-{i}", config.customers)] {
            for &rate in &config.rates {
                // The same load straight to the mock, just before: what this run is compared with.
                let baseline = if config.paired_baseline {
                    let direct = spec(&mock_url, rate, config.duration, vec![], 1, call);
                    Some(load::run(&load::client_for(rate, direct.timeout)?, &direct).await?)
                } else {
                    None
                };
                let spec = spec(&url, rate, config.duration, tollgate.headers(customer), customers, call);
                let client = load::client_for(rate, spec.timeout)?;
                let scraper = reqwest::Client::new();
                let metrics_before = Scrape::take(&scraper, &tollgate.base).await?;
                let cpu_before = cpu_seconds(tollgate.pid)?;
                let started = std::time::Instant::now();
                let report = load::run(&client, &spec).await?;
                let cpu = cpu_seconds(tollgate.pid)? - cpu_before;
                let ledger = metrics_before.ledger_since(&Scrape::take(&scraper, &tollgate.base).await?);
                let cpu_percent = 100.0 * cpu / started.elapsed().as_secs_f64();
                ok_calls += report.ok;
                abandoned += report.errors;
                eprintln!("{} {} x{customers} {rate}/s: {}", db.label(), call.label(), report.summary());
                let saturated = report.errors > 0 || report.total_ms(0.99) > 1000.0;
                rows.push(Row {
                    db: db.label(),
                    call,
                    customers,
                    rate,
                    report,
                    baseline,
                    cpu_percent,
                    peak_rss_mb: peak_rss_kb(tollgate.pid)? as f64 / 1024.0,
                    ledger,
                });
                if saturated {
                    eprintln!("saturated: higher rates skipped for this case");
                    break;
                }
            }
        }
    }

    let (tight_ok, refused) = overspend(db, tollgate).await?;
    ok_calls += tight_ok;
    Ok((rows, (ok_calls, abandoned), (tight_ok, refused)))
}

/// Overspend: a customer whose budget covers about 70 calls gets 1,000 at 500/s. Returns its
/// successful and refused calls ([`check`] then finds what it spent).
pub(crate) async fn overspend(db: &Database, tollgate: &Tollgate) -> anyhow::Result<(u64, u64)> {
    let url = format!("{}/v1/chat/completions", tollgate.base);
    let tight = spec(&url, 500.0, Duration::from_secs(2), tollgate.headers("tight"), 1, Call::Json);
    let report = load::run(&load::client_for(500.0, tight.timeout)?, &tight).await?;
    eprintln!("{} tight budget: {}", db.label(), report.summary());
    let refused = report.statuses.iter().filter(|(s, _)| (400..500).contains(*s)).map(|(_, n)| n).sum();
    Ok((report.ok, refused))
}

/// Seconds of CPU (user + system) `pid` has used, from /proc/<pid>/stat.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, s)| s).context("/proc/<pid>/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from `state` (field 3).
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).context("utime/stime");
    let total = ticks(11)? + ticks(12)?;
    // USER_HZ is 100 on every Linux this runs on.
    Ok(total as f64 / 100.0)
}

/// The peak resident set (VmHWM) of `pid` in kB.
pub(crate) fn peak_rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmHWM in /proc/<pid>/status")
}

/// The ledger's invariants, polled until the usage events of the last calls are written.
pub(crate) async fn check(
    db: &Database,
    url: &str,
    (ok_calls, abandoned_calls): (u64, u64),
    tight: (u64, u64),
) -> anyhow::Result<Checks> {
    let pool = Pool::connect(db, url).await?;
    let mut checks;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        checks = Checks {
            db: db.label(),
            ok_calls,
            abandoned_calls,
            settled_events: pool.scalar("SELECT COUNT(*) FROM usage_events WHERE status = 'settled'").await?,
            open_reservations: pool.scalar("SELECT COUNT(*) FROM reservations").await?,
            customers_over_budget: pool
                .scalar(
                    "SELECT COUNT(*) FROM customers c WHERE c.spent_nanos + c.reserved_nanos > c.budget_nanos \
                     OR (SELECT COALESCE(SUM(u.billed_nanos), 0) FROM usage_events u \
                         WHERE u.customer_id = c.id AND u.status = 'settled') > c.budget_nanos",
                )
                .await?,
            ledger_mismatches: pool
                .scalar(
                    "SELECT COUNT(*) FROM customers c WHERE c.spent_nanos <> \
                     (SELECT COALESCE(SUM(u.billed_nanos), 0) FROM usage_events u \
                      WHERE u.customer_id = c.id AND u.status = 'settled')",
                )
                .await?,
            tight_ok: tight.0,
            tight_refused: tight.1,
            tight_spent_nanos: pool.scalar("SELECT spent_nanos FROM customers WHERE external_id = 'tight'").await?,
        };
        if checks.passed() || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(checks)
}

/// A connection to Tollgate's database for the checks, either kind.
pub(crate) enum Pool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Pool {
    pub(crate) async fn connect(db: &Database, url: &str) -> anyhow::Result<Self> {
        Ok(match db {
            Database::Sqlite { .. } => Pool::Sqlite(sqlx::SqlitePool::connect(url).await?),
            Database::Postgres { .. } => Pool::Postgres(sqlx::PgPool::connect(url).await?),
        })
    }

    /// The single integer `sql` selects.
    pub(crate) async fn scalar(&self, sql: &'static str) -> anyhow::Result<i64> {
        Ok(match self {
            Pool::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await?,
            Pool::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await?,
        })
    }
}

/// A table's title, header row and alignment row.
pub(crate) fn table_head(out: &mut String, title: &str, header: &str, align: &str) {
    let _ = writeln!(out, "{title}");
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "{align}");
}

fn render(
    config: &MatrixConfig,
    baselines: &HashMap<(Call, u64), LoadReport>,
    rows: &[Row],
    checks: &[Checks],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Mock: {} ms latency, {} output tokens{}; {} s per rate; many customers = {}.\n",
        config.latency_ms,
        MAX_TOKENS,
        if config.chunk_interval_ms > 0 {
            format!(" streamed {} ms apart", config.chunk_interval_ms)
        } else {
            String::new()
        },
        config.duration.as_secs_f64(),
        config.customers
    );
    table_head(
        &mut out,
        "Baseline (load generator -> mock), ms:\n",
        "| call | rate/s | p50 | p90 | p99 | max | first byte p50 | first byte p99 | errors |",
        "| --- | --: | --: | --: | --: | --: | --: | --: | --: |",
    );
    for call in config.calls() {
        for &rate in &config.rates {
            if let Some(b) = baselines.get(&(call, rate as u64)) {
                let fb = |q| if call == Call::Stream { format!("{:.2}", b.first_byte_ms(q)) } else { "-".to_owned() };
                let _ = writeln!(
                    out,
                    "| {} | {rate} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
                    call.label(),
                    b.total_ms(0.5),
                    b.total_ms(0.9),
                    b.total_ms(0.99),
                    b.total_ms(1.0),
                    fb(0.5),
                    fb(0.99),
                    b.errors
                );
            }
        }
    }
    table_head(
        &mut out,
        if config.paired_baseline {
            "\nThrough Tollgate: latency added over the same load straight to the mock, measured right before, ms:\n"
        } else {
            "\nThrough Tollgate: latency added over the baseline at the same rate, ms:\n"
        },
        "| database | call | customers | rate/s | achieved/s | ok | errors | +p50 | +p90 | +p99 | +max | +first byte p50 | +first byte p99 | CPU % | peak RSS MB | baseline p50 | baseline p99 |",
        "| --- | --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: |",
    );
    for row in rows {
        let Some(b) = row.baseline(baselines) else { continue };
        let r = &row.report;
        let add = |q| r.total_ms(q) - b.total_ms(q);
        let fb = |q| {
            if row.call == Call::Stream {
                format!("{:.2}", r.first_byte_ms(q) - b.first_byte_ms(q))
            } else {
                "-".to_owned()
            }
        };
        let _ = writeln!(
            out,
            "{} {:.0} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {:.0} | {:.1} | {:.2} | {:.2} |",
            row.case(),
            r.achieved_rate,
            r.ok,
            r.errors,
            add(0.5),
            add(0.9),
            add(0.99),
            add(1.0),
            fb(0.5),
            fb(0.99),
            row.cpu_percent,
            row.peak_rss_mb,
            b.total_ms(0.5),
            b.total_ms(0.99)
        );
    }
    table_head(
        &mut out,
        "\nWhere a call waits in Tollgate's ledger (means over each run, from its /metrics), ms:\n",
        "| database | call | customers | rate/s | reserve wait | settle wait | batch transaction | operations per batch |",
        "| --- | --- | --: | --: | --: | --: | --: | --: |",
    );
    for row in rows {
        let l = row.ledger;
        let _ = writeln!(
            out,
            "{} {:.2} | {:.2} | {:.2} | {:.1} |",
            row.case(),
            l.reserve_ms,
            l.settle_ms,
            l.commit_ms,
            l.operations_per_batch
        );
    }
    table_head(
        &mut out,
        "\nHighest tested rate with added p99 < 1 ms and no errors:\n",
        "| database | call | customers | rate/s |",
        "| --- | --- | --: | --: |",
    );
    let mut seen: Vec<(String, Call, u64)> = Vec::new();
    for row in rows {
        let case = (row.db.clone(), row.call, row.customers);
        if seen.contains(&case) {
            continue;
        }
        let best = rows
            .iter()
            .filter(|r| (r.db.as_str(), r.call, r.customers) == (case.0.as_str(), case.1, case.2))
            .filter(|r| {
                r.baseline(baselines)
                    .is_some_and(|b| r.report.errors == 0 && r.report.total_ms(0.99) - b.total_ms(0.99) < 1.0)
            })
            .map(|r| r.rate)
            .fold(None, |best: Option<f64>, r| Some(best.map_or(r, |b| b.max(r))));
        let best = best.map_or_else(|| "none".to_owned(), |r| r.to_string());
        let _ = writeln!(out, "| {} | {} | {} | {best} |", case.0, case.1.label(), case.2);
        seen.push(case);
    }
    render_checks(&mut out, checks);
    out
}

/// The correctness table: one row per database.
pub(crate) fn render_checks(out: &mut String, checks: &[Checks]) {
    table_head(
        out,
        "\nCorrectness (after all runs):\n",
        "| database | successful calls | settled usage events | open reservations | customers over budget | spent != sum of events | tight customer: ok / refused, spent of 1,000,000 nanos | verdict |",
        "| --- | --: | --: | --: | --: | --: | --- | --- |",
    );
    for c in checks {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} / {}, {} | {} |",
            c.db,
            match c.abandoned_calls {
                0 => c.ok_calls.to_string(),
                n => format!("{} (+{n} the client gave up on)", c.ok_calls),
            },
            c.settled_events,
            c.open_reservations,
            c.customers_over_budget,
            c.ledger_mismatches,
            c.tight_ok,
            c.tight_refused,
            c.tight_spent_nanos,
            if c.passed() { "pass" } else { "FAIL" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn names_its_own_database() {
        assert_eq!(replace_database("postgres://p@127.0.0.1:5432/postgres", "b"), "postgres://p@127.0.0.1:5432/b");
        assert_eq!(
            replace_database("postgres://p@h/postgres?sslmode=disable", "b"),
            "postgres://p@h/b?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://p@h", "b"), "postgres://p@h/b");
    }
}

//! The concurrency sweep of issue 23: closed loops at rising concurrency (32, 64, 128 and 256
//! connections by default), for one busy customer and for many customers, on each database;
//! throughput and latency percentiles per step, where the ledger's time went (from Tollgate's
//! `/metrics`), and the ledger's checks at the end. Prints markdown tables.
//!
//! A closed loop finds what the open loop of [`crate::matrix`] cannot: a throughput that falls
//! as concurrency rises (something serialised behind a lock), since each client waits for its
//! answer before it sends again.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use crate::load::{self, LoadReport};
use crate::matrix::{self, Call, Database, LedgerWaits, Scrape, Tollgate};

/// What the sweep runs.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    pub tollgate: PathBuf,
    pub connections: Vec<usize>,
    pub duration: Duration,
    pub customers: u64,
    pub latency_ms: u64,
    pub chunks: u32,
    pub chunk_interval_ms: u64,
    /// Run SQLite (synchronous = FULL, the default configuration).
    pub sqlite: bool,
    pub postgres_url: Option<String>,
    /// Only these cases: `busy`, `many` (both when empty).
    pub cases: Vec<String>,
}

/// One step: a closed loop at one concurrency.
struct Step {
    db: String,
    customers: u64,
    connections: usize,
    report: LoadReport,
    cpu_percent: f64,
    peak_rss_mb: f64,
    ledger: LedgerWaits,
    /// Holds by how they were made (see [`Holds`]).
    holds: Holds,
}

/// How the step's calls were held, from Tollgate's `tollgate_ledger_holds_total`.
#[derive(Debug, Clone, Copy, Default)]
struct Holds {
    carved: f64,
    lease: f64,
    alone: f64,
    waited: f64,
}

impl Holds {
    fn since(before: &Scrape, after: &Scrape) -> Self {
        let how = |how: &str| before.growth_since(after, "tollgate_ledger_holds_total", &format!("{{how=\"{how}\"}}"));
        Self { carved: how("carved"), lease: how("lease"), alone: how("alone"), waited: how("waited") }
    }

    /// `part` as a percentage of the holds made.
    fn percent(&self, part: f64) -> String {
        let made = self.carved + self.lease + self.alone;
        if made > 0.0 { format!("{:.0}%", 100.0 * part / made) } else { "-".to_owned() }
    }
}

/// Runs the sweep and prints its tables; fails if a correctness check fails.
pub async fn run(config: SweepConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.tollgate.is_file(),
        "{} not found: build it first with `cargo build --release -p tollgate -p tollgate-bench`",
        config.tollgate.display()
    );
    let started = std::time::Instant::now();
    let (mut mock, mock_addr) = matrix::start_mock(config.latency_ms, config.chunks, config.chunk_interval_ms).await?;
    eprintln!("mock on {mock_addr}");

    // The same loops straight to the mock: the most any step could reach.
    let mock_url = format!("http://{mock_addr}/v1/chat/completions");
    let mut baselines = Vec::new();
    for &connections in &config.connections {
        let report = closed_loop(&config, &mock_url, vec![], 1, connections).await?;
        eprintln!("baseline x{connections}: {}", report.summary());
        baselines.push((connections, report));
    }

    let mut databases = Vec::new();
    if config.sqlite {
        databases.push(Database::Sqlite { synchronous: "full" });
    }
    match &config.postgres_url {
        Some(url) => databases.push(Database::Postgres { admin_url: url.clone() }),
        None => eprintln!("TOLLGATE_BENCH_POSTGRES_URL not set: PostgreSQL skipped"),
    }
    let mut steps = Vec::new();
    let mut checks = Vec::new();
    for db in &databases {
        let name = format!("tollgate_sweep_{}_{}", std::process::id(), matrix::unique() % 1_000_000);
        let database_url = matrix::create_database(db, &name).await?;
        let result = async {
            let tollgate = Tollgate::start(&config.tollgate, db, &database_url, &mock_addr).await?;
            let swept = sweep(&config, db, &tollgate).await;
            let checked = match &swept {
                Ok((_, calls)) => match matrix::overspend(db, &tollgate).await {
                    Ok(tight) => {
                        let calls = (calls.0 + tight.0, calls.1);
                        Some(matrix::check(db, &tollgate.database_url, calls, tight).await)
                    }
                    Err(e) => Some(Err(e)),
                },
                Err(_) => None,
            };
            tollgate.stop().await?;
            let (db_steps, _) = swept?;
            let checked = checked.ok_or_else(|| anyhow::anyhow!("no checks"))??;
            Ok::<_, anyhow::Error>((db_steps, checked))
        }
        .await;
        matrix::drop_database(db, &name).await?;
        let (db_steps, checked) = result?;
        steps.extend(db_steps);
        checks.push(checked);
    }
    let _ = mock.kill().await;

    println!("{}", render(&config, &baselines, &steps, &checks));
    println!("Sweep wall time: {:.0} s", started.elapsed().as_secs_f64());
    if let Some(failed) = checks.iter().find(|c| !c.passed()) {
        bail!("correctness check failed on {}", failed.db);
    }
    Ok(())
}

/// A closed loop of JSON calls at `connections` against `url`.
async fn closed_loop(
    config: &SweepConfig,
    url: &str,
    headers: Vec<(String, String)>,
    customers: u64,
    connections: usize,
) -> anyhow::Result<LoadReport> {
    let spec = matrix::spec(url, 0.0, config.duration, headers, customers, Call::Json);
    let client = load::client_keeping(connections, spec.timeout)?;
    load::closed(&client, &spec, connections).await
}

/// Every step against one Tollgate; returns them and the successful and errored calls in all.
async fn sweep(config: &SweepConfig, db: &Database, tollgate: &Tollgate) -> anyhow::Result<(Vec<Step>, (u64, u64))> {
    let url = format!("{}/v1/chat/completions", tollgate.base);
    let (mut ok_calls, mut abandoned) = (0, 0);
    // Warm up (connections, caches, the busy customer's row): not counted.
    let warm = closed_loop(
        &SweepConfig { duration: Duration::from_secs(1), ..config.clone() },
        &url,
        tollgate.headers("hot"),
        1,
        32,
    )
    .await?;
    ok_calls += warm.ok;
    abandoned += warm.errors;
    let scraper = reqwest::Client::new();
    let mut steps = Vec::new();
    for (case, customer, customers) in [("busy", "hot", 1), ("many", "cust-{i}", config.customers)] {
        if !config.cases.is_empty() && !config.cases.iter().any(|c| c == case) {
            continue;
        }
        for &connections in &config.connections {
            let before = Scrape::take(&scraper, &tollgate.base).await?;
            let cpu_before = matrix::cpu_seconds(tollgate.pid)?;
            let started = std::time::Instant::now();
            let report = closed_loop(config, &url, tollgate.headers(customer), customers, connections).await?;
            let cpu = matrix::cpu_seconds(tollgate.pid)? - cpu_before;
            let after = Scrape::take(&scraper, &tollgate.base).await?;
            let (ledger, holds) = (before.ledger_since(&after), Holds::since(&before, &after));
            ok_calls += report.ok;
            abandoned += report.errors;
            eprintln!("{} x{customers} closed x{connections}: {}", db.label(), report.summary());
            steps.push(Step {
                db: db.label(),
                customers,
                connections,
                report,
                cpu_percent: 100.0 * cpu / started.elapsed().as_secs_f64(),
                peak_rss_mb: matrix::peak_rss_kb(tollgate.pid)? as f64 / 1024.0,
                ledger,
                holds,
            });
        }
    }
    Ok((steps, (ok_calls, abandoned)))
}

fn render(
    config: &SweepConfig,
    baselines: &[(usize, LoadReport)],
    steps: &[Step],
    checks: &[matrix::Checks],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Closed loop, JSON calls; mock: {} ms latency, {} output tokens; {} s per step; many customers = {}.\n",
        config.latency_ms,
        matrix::MAX_TOKENS,
        config.duration.as_secs_f64(),
        config.customers
    );
    matrix::table_head(
        &mut out,
        "Baseline (closed loop straight to the mock), ms:\n",
        "| connections | calls/s | p50 | p90 | p99 | max | errors |",
        "| --: | --: | --: | --: | --: | --: | --: |",
    );
    for (connections, r) in baselines {
        let _ = writeln!(
            out,
            "| {connections} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            r.achieved_rate,
            r.total_ms(0.5),
            r.total_ms(0.9),
            r.total_ms(0.99),
            r.total_ms(1.0),
            r.errors
        );
    }
    matrix::table_head(
        &mut out,
        "\nThrough Tollgate (closed loop), latency in ms; \"of lowest\": throughput against the same case's lowest concurrency:\n",
        "| database | customers | connections | calls/s | of lowest | ok | errors | p50 | p90 | p99 | max | CPU % | peak RSS MB | reserve wait | settle wait | batch transaction | operations per batch | holds carved / lease / alone | waited for a lease |",
        "| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: |",
    );
    for step in steps {
        let r = &step.report;
        let lowest = steps
            .iter()
            .filter(|s| s.db == step.db && s.customers == step.customers)
            .min_by_key(|s| s.connections)
            .map_or(0.0, |s| s.report.achieved_rate);
        let of_lowest = if lowest > 0.0 { format!("{:.0}%", 100.0 * r.achieved_rate / lowest) } else { "-".to_owned() };
        let l = step.ledger;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {of_lowest} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {} / {} / {} | {} |",
            step.db,
            step.customers,
            step.connections,
            r.achieved_rate,
            r.ok,
            r.errors,
            r.total_ms(0.5),
            r.total_ms(0.9),
            r.total_ms(0.99),
            r.total_ms(1.0),
            step.cpu_percent,
            step.peak_rss_mb,
            l.reserve_ms,
            l.settle_ms,
            l.commit_ms,
            l.operations_per_batch,
            step.holds.percent(step.holds.carved),
            step.holds.percent(step.holds.lease),
            step.holds.percent(step.holds.alone),
            step.holds.percent(step.holds.waited)
        );
    }
    matrix::render_checks(&mut out, checks);
    out
}

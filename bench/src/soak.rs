//! The soak of issue 23: one Tollgate under a fixed open-loop rate for a long time, with the
//! traffic of a real tenant mixed in (many customers and a busy one, JSON and streams, calls
//! refused for want of budget, clients that hang up mid-stream), sampled every interval for
//! what leaks (resident memory, open descriptors, database connections) and what degrades
//! (latency percentiles, achieved rate, errors); then the ledger read straight from the
//! database. Writes the samples as CSV and markdown and plots them as an SVG.
//!
//! Call `i` is due at `t0 + i / rate` and its latency is measured from that due time, as in
//! [`crate::load`]. Who it names and what kind of call it is follow two low-discrepancy
//! sequences of `i` (no random numbers), so every share holds in every interval.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::load;
use crate::matrix::{self, Call, Database, Pool, Tollgate};

/// What a refusal customer may spend in all: two calls (about 14,000 nanos each), then every
/// call is refused.
const REFUSAL_BUDGET: &str = "0.00003";

/// What the soak runs.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub tollgate: PathBuf,
    pub database: Database,
    /// Calls per second.
    pub rate: f64,
    pub duration: Duration,
    /// Distinct customers among the calls that name neither the busy one nor a refusal one.
    pub customers: u64,
    /// Of all calls, the share naming the one busy customer.
    pub busy_share: f64,
    /// Of all calls, the share streamed to the end.
    pub stream_share: f64,
    /// Of all calls, the share streamed and dropped by the client after the first chunk.
    pub cancel_share: f64,
    /// Of all calls, the share naming a customer with a tiny budget (refused once it is spent).
    pub refusal_share: f64,
    /// How many such customers.
    pub refusal_customers: u64,
    /// How often to sample.
    pub sample: Duration,
    /// Where the CSV, markdown and SVG go.
    pub out: PathBuf,
    pub latency_ms: u64,
    pub chunks: u32,
    pub chunk_interval_ms: u64,
}

/// Whom a call names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Busy,
    Many(u64),
    Refusal(u64),
}

/// How a call is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Json,
    Stream,
    /// Streamed, and dropped by the client once the first chunk arrived.
    Cancel,
}

impl SoakConfig {
    /// Call `i`'s customer and kind: the shares of [`SoakConfig`], spread evenly over `i` by the
    /// R2 sequence (each coordinate is equidistributed, and the two are independent).
    fn plan(&self, i: u64) -> (Who, Kind) {
        let frac = |x: f64| x - x.floor();
        let u = frac(0.5 + i as f64 * 0.754_877_666_246_692_7);
        let v = frac(0.5 + i as f64 * 0.569_840_290_998_053_2);
        let who = if u < self.refusal_share {
            Who::Refusal(i % self.refusal_customers.max(1))
        } else if u < self.refusal_share + self.busy_share {
            Who::Busy
        } else {
            Who::Many(i % self.customers.max(1))
        };
        let kind = if v < self.cancel_share {
            Kind::Cancel
        } else if v < self.cancel_share + self.stream_share {
            Kind::Stream
        } else {
            Kind::Json
        };
        (who, kind)
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.rate > 0.0, "--rate must be positive");
        anyhow::ensure!(!self.sample.is_zero(), "--sample must be positive");
        for (name, share) in [
            ("--busy-share", self.busy_share),
            ("--stream-share", self.stream_share),
            ("--cancel-share", self.cancel_share),
            ("--refusal-share", self.refusal_share),
        ] {
            anyhow::ensure!((0.0..=1.0).contains(&share), "{name} must be between 0 and 1");
        }
        anyhow::ensure!(self.busy_share + self.refusal_share <= 1.0, "--busy-share + --refusal-share exceed 1");
        anyhow::ensure!(self.stream_share + self.cancel_share <= 1.0, "--stream-share + --cancel-share exceed 1");
        Ok(())
    }
}

/// `90s`, `30m`, `1h`, `500ms`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("{text:?}: expected a number and a unit, e.g. 90s or 30m"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// How one call ended, as the client saw it.
#[derive(Debug)]
enum Outcome {
    /// A 2xx answered in full (a stream through `[DONE]`), and its latency from its due time.
    Ok(Duration),
    /// 402: the customer's budget could not pay for it.
    Refused,
    /// A stream the client dropped after its first chunk, as planned.
    Cancelled,
    /// Anything else, by kind (`http 500`, `timeout`, `transport`, `no [DONE]`, …).
    Failed(String),
}

/// Outcomes counted over a span of time (a sampling interval, or the whole run).
struct Tally {
    latency: Histogram<u64>,
    ok: u64,
    refused: u64,
    cancelled: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            // 1 µs to 10 minutes, 3 significant digits, as in `load`.
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).context("histogram bounds")?,
            ok: 0,
            refused: 0,
            cancelled: 0,
            errors: BTreeMap::new(),
        })
    }

    fn record(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Ok(latency) => {
                self.ok += 1;
                self.latency.saturating_record(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1));
            }
            Outcome::Refused => self.refused += 1,
            Outcome::Cancelled => self.cancelled += 1,
            Outcome::Failed(kind) => *self.errors.entry(kind.clone()).or_default() += 1,
        }
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// `kind n, kind n` (or `-`).
    fn error_kinds(&self) -> String {
        if self.errors.is_empty() {
            return "-".to_owned();
        }
        self.errors.iter().map(|(kind, n)| format!("{kind} {n}")).collect::<Vec<_>>().join(", ")
    }
}

/// What one sampling interval saw.
struct Sample {
    /// Seconds since the first call was due, at the end of the interval.
    at: f64,
    rss_mib: f64,
    fds: u64,
    db_connections: u64,
    p50_ms: f64,
    p99_ms: f64,
    /// Successful calls per second over the interval.
    ok_rate: f64,
    ok: u64,
    refused: u64,
    cancelled: u64,
    errors: u64,
    error_kinds: String,
}

/// How to count Tollgate's database connections.
enum Connections {
    /// Sessions on its database in `pg_stat_activity`, but ours.
    Postgres(sqlx::PgPool),
    /// Tollgate's open descriptors of the database file (one per SQLite connection).
    Sqlite(PathBuf),
}

impl Connections {
    async fn open(db: &Database, url: &str) -> anyhow::Result<Self> {
        Ok(match db {
            Database::Postgres { .. } => {
                Connections::Postgres(sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(url).await?)
            }
            Database::Sqlite { .. } => {
                let path = url.strip_prefix("sqlite://").context("a sqlite:// URL")?;
                let path = path.split('?').next().unwrap_or(path);
                Connections::Sqlite(std::fs::canonicalize(path).with_context(|| format!("finding {path}"))?)
            }
        })
    }

    async fn count(&self, pid: u32) -> anyhow::Result<u64> {
        match self {
            Connections::Postgres(pool) => {
                let n: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .fetch_one(pool)
                .await?;
                Ok(u64::try_from(n).unwrap_or(0))
            }
            Connections::Sqlite(file) => {
                let mut n = 0;
                for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
                    if let Ok(target) = std::fs::read_link(entry?.path())
                        && target == *file
                    {
                        n += 1;
                    }
                }
                Ok(n)
            }
        }
    }
}

/// Tollgate's resident set (VmRSS) in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS in /proc/<pid>/status")?;
    Ok(kb as f64 / 1024.0)
}

/// Tollgate's open file descriptors.
fn open_fds(pid: u32) -> anyhow::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// Runs the soak on one database, writes and prints its tables, plot and checks; fails if a
/// check fails.
pub async fn run(config: SoakConfig) -> anyhow::Result<()> {
    config.check()?;
    anyhow::ensure!(
        config.tollgate.is_file(),
        "{} not found: build it first with `cargo build --release -p tollgate -p tollgate-bench`",
        config.tollgate.display()
    );
    std::fs::create_dir_all(&config.out).with_context(|| format!("creating {}", config.out.display()))?;
    let (mut mock, mock_addr) = matrix::start_mock(config.latency_ms, config.chunks, config.chunk_interval_ms).await?;
    eprintln!("mock on {mock_addr}");
    let db = &config.database;
    let name = format!("tollgate_soak_{}_{}", std::process::id(), matrix::unique() % 1_000_000);
    let database_url = matrix::create_database(db, &name).await?;
    let result = async {
        let tollgate = Tollgate::start(&config.tollgate, db, &database_url, &mock_addr).await?;
        let soaked = soak(&config, &tollgate).await;
        let checked = match &soaked {
            Ok((_, total)) => Some(check(db, &tollgate.database_url, total).await),
            Err(_) => None,
        };
        tollgate.stop().await?;
        let (samples, total) = soaked?;
        let checks = checked.context("no checks")??;
        Ok::<_, anyhow::Error>((samples, total, checks))
    }
    .await;
    matrix::drop_database(db, &name).await?;
    let _ = mock.kill().await;
    let (samples, total, checks) = result?;

    let stem = format!("soak-{}", db.label().replace([' ', '(', ')'], ""));
    let table = render(&config, &samples, &total, &checks);
    let files = [
        (format!("{stem}.csv"), csv(&samples)),
        (format!("{stem}.md"), table.clone()),
        (format!("{stem}.svg"), plot(&format!("Tollgate soak, {}, {} calls/s", db.label(), config.rate), &samples)),
    ];
    for (file, text) in &files {
        let path = config.out.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{table}");
    println!(
        "Written: {}",
        files.iter().map(|(f, _)| config.out.join(f).display().to_string()).collect::<Vec<_>>().join(", ")
    );
    if checks.iter().any(|c| !c.pass) {
        bail!("ledger check failed on {}", db.label());
    }
    Ok(())
}

/// Gives each refusal customer its tiny budget through the management API.
async fn create_refusal_customers(config: &SoakConfig, tollgate: &Tollgate) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for j in 0..config.refusal_customers {
        let body = serde_json::json!({"id": format!("refusal-{j}"), "budget": REFUSAL_BUDGET, "period": "lifetime"});
        client
            .post(format!("{}/api/v1/customers", tollgate.base))
            .bearer_auth(&tollgate.key)
            .json(&body)
            .send()
            .await?
            .error_for_status()
            .context("creating a refusal customer")?;
    }
    Ok(())
}

/// The timed load with its samples; returns them and the whole run's tally.
async fn soak(config: &SoakConfig, tollgate: &Tollgate) -> anyhow::Result<(Vec<Sample>, Tally)> {
    if config.refusal_share > 0.0 {
        create_refusal_customers(config, tollgate).await?;
    }
    let connections = Connections::open(&config.database, &tollgate.database_url).await?;
    let count = (config.rate * config.duration.as_secs_f64()).round() as u64;
    eprintln!(
        "{}: {count} calls at {}/s over {:.0} s, sampled every {:.0} s",
        config.database.label(),
        config.rate,
        config.duration.as_secs_f64(),
        config.sample.as_secs_f64()
    );
    let client = load::client_for(config.rate, Duration::from_secs(10))?;
    let url = format!("{}/v1/chat/completions", tollgate.base);
    let bodies = (Call::Json.body(), Call::Stream.body());
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let t0 = Instant::now() + Duration::from_millis(20);
    let period = Duration::from_secs_f64(1.0 / config.rate);
    let generator = {
        let (config, key) = (config.clone(), tollgate.key.clone());
        tokio::spawn(async move {
            let mut max_lag = Duration::ZERO;
            for i in 0..count {
                let due = t0 + period.mul_f64(i as f64);
                tokio::time::sleep_until(due).await;
                max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
                let (who, kind) = config.plan(i);
                let customer = match who {
                    Who::Busy => "busy".to_owned(),
                    Who::Many(n) => format!("cust-{n}"),
                    Who::Refusal(n) => format!("refusal-{n}"),
                };
                let body = if kind == Kind::Json { bodies.0.clone() } else { bodies.1.clone() };
                let request = client
                    .post(&url)
                    .bearer_auth(&key)
                    .header("x-tollgate-customer", customer)
                    .header("content-type", "application/json")
                    .body(body);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(call(request, due, kind).await);
                });
            }
            max_lag
        })
    };

    let pid = tollgate.pid;
    let mut samples = Vec::new();
    let mut window = Tally::new()?;
    let mut total = Tally::new()?;
    let mut window_start = t0;
    let mut ticker = tokio::time::interval_at(t0 + config.sample, config.sample);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            outcome = rx.recv() => match outcome {
                Some(outcome) => {
                    window.record(&outcome);
                    total.record(&outcome);
                }
                None => break,
            },
            _ = ticker.tick() => {
                let now = Instant::now();
                let sample = take_sample(pid, &connections, t0, window_start, now, &window).await?;
                eprintln!("{}", progress(&sample));
                samples.push(sample);
                window = Tally::new()?;
                window_start = now;
            }
        }
    }
    let now = Instant::now();
    if now.saturating_duration_since(window_start) > Duration::from_millis(500) || samples.is_empty() {
        let sample = take_sample(pid, &connections, t0, window_start, now, &window).await?;
        eprintln!("{}", progress(&sample));
        samples.push(sample);
    }
    let max_lag = generator.await.context("the load generator panicked")?;
    eprintln!(
        "sent {count}: ok {}, refused {}, cancelled {}, errors {} ({}); generator lag max {:.1} ms",
        total.ok,
        total.refused,
        total.cancelled,
        total.error_count(),
        total.error_kinds(),
        max_lag.as_secs_f64() * 1e3
    );
    Ok((samples, total))
}

/// Sends one call and reads its answer as `kind` says.
async fn call(request: reqwest::RequestBuilder, due: Instant, kind: Kind) -> Outcome {
    let failed = |e: reqwest::Error| Outcome::Failed(if e.is_timeout() { "timeout" } else { "transport" }.to_owned());
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let status = response.status();
    if !status.is_success() {
        // Read it whole, so the connection goes back to the pool.
        let _ = response.bytes().await;
        return if status.as_u16() == 402 {
            Outcome::Refused
        } else {
            Outcome::Failed(format!("http {}", status.as_u16()))
        };
    }
    if kind == Kind::Cancel {
        // The client goes away mid-stream: dropping the response closes its connection.
        return match response.chunk().await {
            Ok(Some(_)) => Outcome::Cancelled,
            Ok(None) => Outcome::Failed("empty stream".to_owned()),
            Err(e) => failed(e),
        };
    }
    let mut tail: Vec<u8> = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if kind == Kind::Stream {
                    // Keep only what the `[DONE]` check needs.
                    tail.extend_from_slice(&chunk);
                    let keep = tail.len().saturating_sub(64);
                    tail.drain(..keep);
                }
            }
            Ok(None) => break,
            Err(e) => return failed(e),
        }
    }
    if kind == Kind::Stream && !tail.windows(6).any(|w| w == b"[DONE]") {
        return Outcome::Failed("no [DONE]".to_owned());
    }
    Outcome::Ok(due.elapsed())
}

async fn take_sample(
    pid: u32,
    connections: &Connections,
    t0: Instant,
    from: Instant,
    to: Instant,
    window: &Tally,
) -> anyhow::Result<Sample> {
    let seconds = to.saturating_duration_since(from).as_secs_f64();
    Ok(Sample {
        at: to.saturating_duration_since(t0).as_secs_f64(),
        rss_mib: rss_mib(pid)?,
        fds: open_fds(pid)?,
        db_connections: connections.count(pid).await?,
        p50_ms: load::quantile_ms(&window.latency, 0.5),
        p99_ms: load::quantile_ms(&window.latency, 0.99),
        ok_rate: if seconds > 0.0 { window.ok as f64 / seconds } else { 0.0 },
        ok: window.ok,
        refused: window.refused,
        cancelled: window.cancelled,
        errors: window.error_count(),
        error_kinds: window.error_kinds(),
    })
}

fn progress(s: &Sample) -> String {
    format!(
        "t={:.0}s rss {:.1} MiB, fds {}, db connections {}, p50 {:.2} ms, p99 {:.2} ms, ok {:.0}/s, refused {}, cancelled {}, errors {}",
        s.at, s.rss_mib, s.fds, s.db_connections, s.p50_ms, s.p99_ms, s.ok_rate, s.refused, s.cancelled, s.error_kinds
    )
}

/// One check of the ledger, as printed.
struct LedgerCheck {
    name: &'static str,
    detail: String,
    pass: bool,
}

/// The ledger's figures after the run.
#[derive(Debug, Default, PartialEq)]
struct LedgerFigures {
    settled: i64,
    refused: i64,
    failed: i64,
    interrupted: i64,
    settled_disconnected: i64,
    recorded_twice: i64,
    reservations: i64,
    reserved_nanos: i64,
    calls_in_flight: i64,
    over_budget: i64,
    spent_mismatches: i64,
    customers: i64,
}

impl LedgerFigures {
    async fn read(pool: &Pool) -> anyhow::Result<Self> {
        Ok(Self {
            settled: pool.scalar("SELECT COUNT(*) FROM usage_events WHERE status = 'settled'").await?,
            refused: pool.scalar("SELECT COUNT(*) FROM usage_events WHERE status = 'refused'").await?,
            failed: pool.scalar("SELECT COUNT(*) FROM usage_events WHERE status = 'failed'").await?,
            interrupted: pool.scalar("SELECT COUNT(*) FROM usage_events WHERE status = 'interrupted'").await?,
            settled_disconnected: pool
                .scalar("SELECT COUNT(*) FROM usage_events WHERE status = 'settled' AND reason = 'client disconnected'")
                .await?,
            recorded_twice: pool.scalar("SELECT COUNT(*) - COUNT(DISTINCT request_id) FROM usage_events").await?,
            reservations: pool.scalar("SELECT COUNT(*) FROM reservations").await?,
            reserved_nanos: pool
                .scalar("SELECT CAST(COALESCE(SUM(reserved_nanos), 0) AS BIGINT) FROM customers")
                .await?,
            calls_in_flight: pool.scalar("SELECT COUNT(*) FROM calls_in_flight").await?,
            // Every budget in the soak is a lifetime one: its period is the whole run.
            over_budget: pool
                .scalar(
                    "SELECT COUNT(*) FROM customers c WHERE c.spent_nanos + c.reserved_nanos > c.budget_nanos \
                     OR (SELECT COALESCE(SUM(u.billed_nanos), 0) FROM usage_events u \
                         WHERE u.customer_id = c.id AND u.status IN ('settled', 'interrupted')) > c.budget_nanos",
                )
                .await?,
            spent_mismatches: pool
                .scalar(
                    "SELECT COUNT(*) FROM customers c WHERE c.spent_nanos <> \
                     (SELECT COALESCE(SUM(u.billed_nanos), 0) FROM usage_events u \
                      WHERE u.customer_id = c.id AND u.status IN ('settled', 'interrupted'))",
                )
                .await?,
            customers: pool.scalar("SELECT COUNT(*) FROM customers").await?,
        })
    }

    /// The checks of issue 23 against what the load generator saw.
    fn checks(&self, total: &Tally) -> Vec<LedgerCheck> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let answered = n(total.ok) + n(total.cancelled);
        // A call the client gave up on (timeout, dropped connection) may have been settled or
        // refused all the same.
        let unknown = n(total.error_count());
        let within = |value: i64, least: i64| (least..=least + unknown).contains(&value);
        let gave_up = if unknown > 0 { format!(" (+ up to {unknown} the client gave up on)") } else { String::new() };
        vec![
            LedgerCheck {
                name: "one usage event per successful call",
                detail: format!(
                    "{} settled events; {} successful calls + {} streams the client cancelled = {answered}{gave_up}; \
                     {} settled as `client disconnected`",
                    self.settled, total.ok, total.cancelled, self.settled_disconnected
                ),
                pass: within(self.settled, answered),
            },
            LedgerCheck {
                name: "every refusal recorded",
                detail: format!("{} refused events; {} answers 402{gave_up}", self.refused, total.refused),
                pass: within(self.refused, n(total.refused)),
            },
            LedgerCheck {
                name: "no call recorded twice",
                detail: format!(
                    "{} request ids with more than one event; {} failed, {} interrupted events",
                    self.recorded_twice, self.failed, self.interrupted
                ),
                pass: self.recorded_twice == 0 && self.interrupted == 0,
            },
            LedgerCheck {
                name: "nothing left reserved once idle",
                detail: format!(
                    "{} reservation rows, {} nanos reserved on customers, {} calls in flight",
                    self.reservations, self.reserved_nanos, self.calls_in_flight
                ),
                pass: self.reservations == 0 && self.reserved_nanos == 0 && self.calls_in_flight == 0,
            },
            LedgerCheck {
                name: "nobody over budget",
                detail: format!("{} of {} customers", self.over_budget, self.customers),
                pass: self.over_budget == 0,
            },
            LedgerCheck {
                name: "spent equals the sum of events",
                detail: format!("{} of {} customers differ", self.spent_mismatches, self.customers),
                pass: self.spent_mismatches == 0,
            },
        ]
    }
}

/// The ledger's checks, polled for up to 30 s (the last settlements land, leases give back
/// their spare) until they pass or stop changing.
async fn check(db: &Database, url: &str, total: &Tally) -> anyhow::Result<Vec<LedgerCheck>> {
    let pool = Pool::connect(db, url).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let figures = LedgerFigures::read(&pool).await?;
        let checks = figures.checks(total);
        if checks.iter().all(|c| c.pass) || std::time::Instant::now() > deadline {
            return Ok(checks);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn render(config: &SoakConfig, samples: &[Sample], total: &Tally, checks: &[LedgerCheck]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Soak on {}: {} calls/s for {:.0} s; {} customers, one busy one taking {:.0}% of calls, {:.0}% to {} \
         customers with {REFUSAL_BUDGET} each; {:.0}% streamed, {:.0}% streams cancelled after the first chunk; \
         mock {} ms latency, {} output tokens {} ms apart when streamed; sampled every {:.0} s.\n",
        config.database.label(),
        config.rate,
        config.duration.as_secs_f64(),
        config.customers,
        100.0 * config.busy_share,
        100.0 * config.refusal_share,
        config.refusal_customers,
        100.0 * config.stream_share,
        100.0 * config.cancel_share,
        config.latency_ms,
        matrix::MAX_TOKENS,
        config.chunk_interval_ms,
        config.sample.as_secs_f64()
    );
    matrix::table_head(
        &mut out,
        "Samples (latency of successful calls answered in the interval, from their due time):\n",
        "| t s | RSS MiB | fds | DB connections | p50 ms | p99 ms | ok/s | ok | refused | cancelled | errors |",
        "| --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --- |",
    );
    for s in samples {
        let _ = writeln!(
            out,
            "| {:.0} | {:.1} | {} | {} | {:.2} | {:.2} | {:.0} | {} | {} | {} | {} |",
            s.at,
            s.rss_mib,
            s.fds,
            s.db_connections,
            s.p50_ms,
            s.p99_ms,
            s.ok_rate,
            s.ok,
            s.refused,
            s.cancelled,
            s.error_kinds
        );
    }
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let _ = writeln!(
            out,
            "\nFirst to last sample: RSS {:.1} -> {:.1} MiB, fds {} -> {}, DB connections {} -> {}.",
            first.rss_mib, last.rss_mib, first.fds, last.fds, first.db_connections, last.db_connections
        );
    }
    let _ = writeln!(
        out,
        "Whole run: ok {}, refused {}, cancelled {}, errors {} ({}); p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms.",
        total.ok,
        total.refused,
        total.cancelled,
        total.error_count(),
        total.error_kinds(),
        load::quantile_ms(&total.latency, 0.5),
        load::quantile_ms(&total.latency, 0.99),
        load::quantile_ms(&total.latency, 1.0)
    );
    let _ = writeln!(out, "\nLedger, read from the database once idle:\n");
    for c in checks {
        let _ = writeln!(out, "- {} {}: {}", if c.pass { "PASS" } else { "FAIL" }, c.name, c.detail);
    }
    out
}

fn csv(samples: &[Sample]) -> String {
    let mut out =
        "t_s,rss_mib,fds,db_connections,p50_ms,p99_ms,ok_per_s,ok,refused,cancelled,errors,error_kinds\n".to_owned();
    for s in samples {
        let _ = writeln!(
            out,
            "{:.1},{:.2},{},{},{:.3},{:.3},{:.1},{},{},{},{},\"{}\"",
            s.at,
            s.rss_mib,
            s.fds,
            s.db_connections,
            s.p50_ms,
            s.p99_ms,
            s.ok_rate,
            s.ok,
            s.refused,
            s.cancelled,
            s.errors,
            s.error_kinds.replace('"', "'")
        );
    }
    out
}

/// One panel of the plot: its title and its series (label, colour, one value per sample).
struct Panel<'a> {
    title: &'a str,
    series: Vec<(&'a str, &'a str, Vec<f64>)>,
}

const PLOT_WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 150.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 45.0;

/// The samples over time as an SVG: four panels stacked on one time axis.
fn plot(title: &str, samples: &[Sample]) -> String {
    let column = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let panels = [
        Panel { title: "Resident memory (MiB)", series: vec![("RSS", "#1f77b4", column(|s| s.rss_mib))] },
        Panel { title: "Open file descriptors", series: vec![("fds", "#2ca02c", column(|s| s.fds as f64))] },
        Panel {
            title: "Database connections",
            series: vec![("connections", "#9467bd", column(|s| s.db_connections as f64))],
        },
        Panel {
            title: "Latency of successful calls (ms)",
            series: vec![("p50", "#ff7f0e", column(|s| s.p50_ms)), ("p99", "#d62728", column(|s| s.p99_ms))],
        },
    ];
    let times = column(|s| s.at);
    let t_max = times.iter().copied().fold(0.0, f64::max).max(1.0);
    let height = TOP + panels.len() as f64 * (PANEL_HEIGHT + GAP) + 10.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_WIDTH}" height="{height}" viewBox="0 0 {PLOT_WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{}</text>"#, escape(title));
    let inner = PLOT_WIDTH - LEFT - RIGHT;
    for (p, panel) in panels.iter().enumerate() {
        let top = TOP + p as f64 * (PANEL_HEIGHT + GAP);
        let bottom = top + PANEL_HEIGHT;
        let y_max = nice_ceiling(panel.series.iter().flat_map(|(_, _, v)| v.iter().copied()).fold(0.0, f64::max));
        let x = |t: f64| LEFT + inner * t / t_max;
        let y = |v: f64| bottom - PANEL_HEIGHT * v / y_max;
        let _ =
            writeln!(svg, r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#, top - 6.0, escape(panel.title));
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{top}" width="{inner}" height="{PANEL_HEIGHT}" fill="none" stroke="#999"/>"##
        );
        for k in 0..=4 {
            let v = y_max * f64::from(k) / 4.0;
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + inner,
                LEFT - 5.0,
                y(v) + 4.0,
                label(v),
                yy = y(v)
            );
        }
        for k in 0..=5 {
            let t = t_max * f64::from(k) / 5.0;
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{}" text-anchor="middle" fill="#555">{}</text>"##,
                x(t),
                bottom + 14.0,
                time_label(t)
            );
        }
        for (n, (name, colour, values)) in panel.series.iter().enumerate() {
            let points = times
                .iter()
                .zip(values)
                .map(|(&t, &v)| format!("{:.1},{:.1}", x(t), y(v)))
                .collect::<Vec<_>>()
                .join(" ");
            let _ = writeln!(svg, r#"<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#);
            let lx = LEFT + inner - 120.0 + 60.0 * n as f64;
            let _ = writeln!(
                svg,
                r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
                lx + 14.0,
                lx + 18.0,
                top - 2.0,
                ly = top - 6.0
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// The smallest 1, 2 or 5 × 10ⁿ at least `v` (1 for nothing to show).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|&c| c >= v).unwrap_or(10.0 * magnitude)
}

fn label(v: f64) -> String {
    if v == v.trunc() { format!("{v:.0}") } else { format!("{v:.2}") }
}

fn time_label(seconds: f64) -> String {
    if seconds >= 120.0 { format!("{:.0} min", seconds / 60.0) } else { format!("{seconds:.0} s") }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SoakConfig {
        SoakConfig {
            tollgate: PathBuf::new(),
            database: Database::Sqlite { synchronous: "full" },
            rate: 1000.0,
            duration: Duration::from_secs(60),
            customers: 10_000,
            busy_share: 0.2,
            stream_share: 0.3,
            cancel_share: 0.02,
            refusal_share: 0.02,
            refusal_customers: 10,
            sample: Duration::from_secs(10),
            out: PathBuf::new(),
            latency_ms: 5,
            chunks: 20,
            chunk_interval_ms: 2,
        }
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn the_plan_keeps_its_shares_in_every_thousand_calls() {
        let config = config();
        for start in [0u64, 1_000_000] {
            let (mut busy, mut refusal, mut stream, mut cancel) = (0, 0, 0, 0);
            for i in start..start + 1000 {
                let (who, kind) = config.plan(i);
                busy += u32::from(who == Who::Busy);
                refusal += u32::from(matches!(who, Who::Refusal(_)));
                stream += u32::from(kind == Kind::Stream);
                cancel += u32::from(kind == Kind::Cancel);
            }
            assert!((195..=205).contains(&busy), "busy {busy}");
            assert!((17..=23).contains(&refusal), "refusal {refusal}");
            assert!((295..=305).contains(&stream), "stream {stream}");
            assert!((17..=23).contains(&cancel), "cancel {cancel}");
        }
    }

    #[test]
    fn the_plot_has_a_line_per_series() {
        let sample = |at: f64| Sample {
            at,
            rss_mib: 40.0 + at,
            fds: 30,
            db_connections: 5,
            p50_ms: 7.0,
            p99_ms: 12.0,
            ok_rate: 1000.0,
            ok: 10_000,
            refused: 10,
            cancelled: 20,
            errors: 0,
            error_kinds: "-".to_owned(),
        };
        let svg = plot("t <1>", &[sample(10.0), sample(20.0), sample(30.0)]);
        assert_eq!(svg.matches("<polyline").count(), 5);
        assert!(svg.contains("t &lt;1&gt;"));
        assert_eq!(nice_ceiling(43.0), 50.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
    }
}

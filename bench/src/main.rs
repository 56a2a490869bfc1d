//! `tollgate-bench`: the benchmark harness of issue 7 (see BENCHMARKS.md).
//!
//! - `mock`: a deterministic OpenAI chat-completions stand-in (JSON and SSE).
//! - `load`: an open-loop constant-rate load generator reporting HDR percentiles.
//! - `matrix`: baseline against Tollgate across databases, call kinds and customer spreads,
//!   with the correctness checks; prints markdown tables.
//! - `sweep`: closed loops at rising concurrency, one busy customer and many, on each
//!   database, with the same checks; prints markdown tables.
//! - `soak`: a fixed rate of mixed calls for a long time on one database, sampled for leaks
//!   and latency, then the ledger's checks; writes a CSV, a markdown table and an SVG plot.

mod load;
mod matrix;
mod mock;
mod soak;
mod sweep;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tollgate-bench", about = "Tollgate's benchmark harness")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the mock provider; prints `listening on ADDR` first.
    Mock {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[command(flatten)]
        pacing: Pacing,
    },
    /// Send requests at a fixed rate and print the latency percentiles.
    Load {
        /// The URL to POST to.
        #[arg(long)]
        url: String,
        /// Requests per second.
        #[arg(long)]
        rate: f64,
        /// Seconds to send for.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// `Name: value`, repeatable; `{i}` in a value becomes the request's index modulo --customers.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Distinct values of `{i}` in headers.
        #[arg(long, default_value_t = 1)]
        customers: u64,
        /// The JSON body.
        #[arg(long)]
        body: String,
        /// Read answers as server-sent events (reports time to first byte; needs `[DONE]`).
        #[arg(long)]
        stream: bool,
        /// Seconds before a request counts as an error.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Run the whole matrix against a release build of tollgate and print the tables.
    Matrix {
        /// The tollgate binary (build it with `cargo build --release -p tollgate`).
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/tollgate"))]
        tollgate: PathBuf,
        /// Comma-separated request rates per second.
        #[arg(long, value_delimiter = ',', default_value = "500,1000,2000,5000")]
        rates: Vec<f64>,
        /// Seconds per rate.
        #[arg(long, default_value_t = 4.0)]
        duration: f64,
        /// Distinct customers in the many-customers case.
        #[arg(long, default_value_t = 1000)]
        customers: u64,
        /// Run SQLite with synchronous = FULL (the default configuration).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        sqlite_full: bool,
        /// Also run SQLite with synchronous = NORMAL (TOLLGATE_SQLITE_SYNCHRONOUS=normal).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        sqlite_normal: bool,
        /// Also run streamed calls (`false` runs JSON calls only).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        stream: bool,
        /// Measure the baseline again right before each run through Tollgate and subtract that
        /// (`false`: subtract the baselines measured once at the start).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        paired_baseline: bool,
        /// A PostgreSQL server whose user may create databases; unset skips PostgreSQL.
        #[arg(long, env = "TOLLGATE_BENCH_POSTGRES_URL")]
        postgres_url: Option<String>,
        #[command(flatten)]
        pacing: Pacing,
    },
    /// Closed loops at rising concurrency against a release build of tollgate, one busy
    /// customer and many, on each database; prints the tables.
    Sweep {
        /// The tollgate binary (build it with `cargo build --release -p tollgate`).
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/tollgate"))]
        tollgate: PathBuf,
        /// Comma-separated concurrencies (clients each waiting for its answer before it sends again).
        #[arg(long, value_delimiter = ',', default_value = "32,64,128,256")]
        connections: Vec<usize>,
        /// Seconds per step.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Distinct customers in the many-customers case.
        #[arg(long, default_value_t = 1000)]
        customers: u64,
        /// Run SQLite (synchronous = FULL).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        sqlite: bool,
        /// Comma-separated cases to run: `busy` (one customer), `many` (default: both).
        #[arg(long, value_delimiter = ',')]
        cases: Vec<String>,
        /// A PostgreSQL server whose user may create databases; unset skips PostgreSQL.
        #[arg(long, env = "TOLLGATE_BENCH_POSTGRES_URL")]
        postgres_url: Option<String>,
        #[command(flatten)]
        pacing: Pacing,
    },
    /// A fixed rate of mixed calls for a long time against a release build of tollgate on one
    /// database, sampled every interval; then the ledger's checks. Writes CSV, markdown, SVG.
    Soak {
        /// The tollgate binary (build it with `cargo build --release -p tollgate`).
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/tollgate"))]
        tollgate: PathBuf,
        /// The database Tollgate runs on (`postgres` needs --postgres-url).
        #[arg(long, value_enum, default_value_t = SoakDatabase::Sqlite)]
        database: SoakDatabase,
        /// A PostgreSQL server whose user may create databases (for `--database postgres`).
        #[arg(long, env = "TOLLGATE_BENCH_POSTGRES_URL")]
        postgres_url: Option<String>,
        /// Calls per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// How long to send for: `90s`, `30m`, `1h` (plain numbers are seconds).
        #[arg(long, default_value = "30m", value_parser = soak::parse_duration)]
        duration: Duration,
        /// Distinct customers among the calls that name neither the busy one nor a refusal one.
        #[arg(long, default_value_t = 10_000)]
        customers: u64,
        /// Share of calls naming the one busy customer.
        #[arg(long, default_value_t = 0.2)]
        busy_share: f64,
        /// Share of calls streamed to the end.
        #[arg(long, default_value_t = 0.3)]
        stream_share: f64,
        /// Share of calls streamed and dropped by the client after the first chunk.
        #[arg(long, default_value_t = 0.02)]
        cancel_share: f64,
        /// Share of calls naming a customer whose tiny budget runs out (then refused with 402).
        #[arg(long, default_value_t = 0.02)]
        refusal_share: f64,
        /// How many such customers.
        #[arg(long, default_value_t = 10)]
        refusal_customers: u64,
        /// How often to sample: `10s`.
        #[arg(long, default_value = "10s", value_parser = soak::parse_duration)]
        sample: Duration,
        /// Where to write `soak-<database>.csv`, `.md` and `.svg`.
        #[arg(long, default_value = "soak")]
        out: PathBuf,
        /// The mock's milliseconds before the answer (the first chunk when streaming).
        #[arg(long, default_value_t = 5)]
        latency_ms: u64,
        /// The mock's milliseconds between stream chunks (so a cancel lands mid-stream).
        #[arg(long, default_value_t = 2)]
        chunk_interval_ms: u64,
    },
}

/// The databases the soak runs on.
#[derive(clap::ValueEnum, Clone, Copy)]
enum SoakDatabase {
    /// SQLite, synchronous = FULL (the default configuration).
    Sqlite,
    Postgres,
}

/// The mock's timing.
#[derive(clap::Args, Clone, Copy)]
struct Pacing {
    /// Milliseconds before the answer (the first chunk when streaming).
    #[arg(long, default_value_t = 5)]
    latency_ms: u64,
    /// Output tokens (one per chunk) when a request names no max_tokens.
    #[arg(long, default_value_t = 20)]
    chunks: u32,
    /// Milliseconds between stream chunks.
    #[arg(long, default_value_t = 0)]
    chunk_interval_ms: u64,
}

impl Pacing {
    fn mock(self) -> mock::MockConfig {
        mock::MockConfig {
            latency: Duration::from_millis(self.latency_ms),
            chunks: self.chunks,
            chunk_interval: Duration::from_millis(self.chunk_interval_ms),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Cmd::Mock { listen, pacing } => mock::run(listen, pacing.mock()).await,
        Cmd::Load { url, rate, duration, headers, customers, body, stream, timeout } => {
            let headers = headers
                .iter()
                .map(|h| {
                    h.split_once(':')
                        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                        .with_context(|| format!("--header {h:?}: expected `Name: value`"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let spec = load::LoadSpec {
                url,
                rate,
                duration: Duration::from_secs_f64(duration),
                headers,
                customers,
                body,
                stream,
                timeout: Duration::from_secs_f64(timeout),
            };
            let report = load::run(&load::client_for(rate, spec.timeout)?, &spec).await?;
            println!("{}", report.summary());
            Ok(())
        }
        Cmd::Matrix {
            tollgate,
            rates,
            duration,
            customers,
            sqlite_full,
            sqlite_normal,
            stream,
            paired_baseline,
            postgres_url,
            pacing,
        } => {
            matrix::run(matrix::MatrixConfig {
                tollgate,
                rates,
                duration: Duration::from_secs_f64(duration),
                customers,
                latency_ms: pacing.latency_ms,
                chunks: pacing.chunks,
                chunk_interval_ms: pacing.chunk_interval_ms,
                postgres_url,
                sqlite_full,
                sqlite_normal,
                stream,
                paired_baseline,
            })
            .await
        }
        Cmd::Sweep { tollgate, connections, duration, customers, sqlite, cases, postgres_url, pacing } => {
            sweep::run(sweep::SweepConfig {
                tollgate,
                connections,
                duration: Duration::from_secs_f64(duration),
                customers,
                latency_ms: pacing.latency_ms,
                chunks: pacing.chunks,
                chunk_interval_ms: pacing.chunk_interval_ms,
                sqlite,
                postgres_url,
                cases,
            })
            .await
        }
        Cmd::Soak {
            tollgate,
            database,
            postgres_url,
            rate,
            duration,
            customers,
            busy_share,
            stream_share,
            cancel_share,
            refusal_share,
            refusal_customers,
            sample,
            out,
            latency_ms,
            chunk_interval_ms,
        } => {
            let database = match database {
                SoakDatabase::Sqlite => matrix::Database::Sqlite { synchronous: "full" },
                SoakDatabase::Postgres => matrix::Database::Postgres {
                    admin_url: postgres_url
                        .context("--database postgres needs --postgres-url or TOLLGATE_BENCH_POSTGRES_URL")?,
                },
            };
            soak::run(soak::SoakConfig {
                tollgate,
                database,
                rate,
                duration,
                customers,
                busy_share,
                stream_share,
                cancel_share,
                refusal_share,
                refusal_customers,
                sample,
                out,
                latency_ms,
                chunks: matrix::MAX_TOKENS,
                chunk_interval_ms,
            })
            .await
        }
    }
}

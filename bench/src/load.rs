//! Load generators: an open loop at a constant rate ([`run`]), and a closed loop at a fixed
//! concurrency ([`closed`]).
//!
//! Request `i` is due at `t0 + i / rate` and is sent then whatever happened to the earlier
//! ones (each request is its own task), and its latency is measured from that *due* time, not
//! from when it was actually sent: a stalled server or a late generator shows up as latency
//! instead of silently lowering the rate (no coordinated omission). Latencies go into HDR
//! histograms (microseconds, 3 significant digits).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::time::Instant;

/// What to send and how often.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub url: String,
    /// Requests per second.
    pub rate: f64,
    pub duration: Duration,
    /// Extra headers; `{i}` in a value is replaced by the request's index modulo `customers`.
    pub headers: Vec<(String, String)>,
    /// How many distinct values `{i}` takes (1: every request names the same one).
    pub customers: u64,
    pub body: String,
    /// Read the answer as server-sent events: time to first byte, and success needs `[DONE]`.
    pub stream: bool,
    /// A request slower than this counts as an error.
    pub timeout: Duration,
}

impl LoadSpec {
    /// Request `i`: the body, and the headers with `{i}` replaced by `i` modulo `customers`.
    fn request(&self, client: &reqwest::Client, i: u64) -> reqwest::RequestBuilder {
        let mut request = client.post(&self.url).header("content-type", "application/json");
        for (name, value) in &self.headers {
            request = if value.contains("{i}") {
                request.header(name, value.replace("{i}", &(i % self.customers.max(1)).to_string()))
            } else {
                request.header(name, value)
            };
        }
        request.body(self.body.clone())
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    /// Answers by status code (`0`: transport error or timeout; `-1`: stream without `[DONE]`).
    pub statuses: BTreeMap<i32, u64>,
    /// Successful requests per second, from the first due time to the last answer.
    pub achieved_rate: f64,
    /// The worst lag of the generator itself behind the schedule.
    pub max_send_lag: Duration,
    /// Due time to the last byte of successful answers, in microseconds.
    pub total: Histogram<u64>,
    /// Due time to the first byte of the body of successful answers, in microseconds.
    pub first_byte: Histogram<u64>,
}

impl LoadReport {
    /// `q` in 0..=1 of the total latency, in milliseconds.
    pub fn total_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.total, q)
    }

    /// `q` in 0..=1 of the time to first byte, in milliseconds.
    pub fn first_byte_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.first_byte, q)
    }

    /// A human summary, one line per measure.
    pub fn summary(&self) -> String {
        let line = |name: &str, h: &Histogram<u64>| {
            format!(
                "{name}: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                quantile_ms(h, 0.5),
                quantile_ms(h, 0.9),
                quantile_ms(h, 0.99),
                quantile_ms(h, 1.0)
            )
        };
        let mut out = format!(
            "sent {}, ok {}, errors {} {:?}, achieved {:.0} req/s, generator lag max {:.3} ms\n{}",
            self.sent,
            self.ok,
            self.errors,
            self.statuses,
            self.achieved_rate,
            self.max_send_lag.as_secs_f64() * 1e3,
            line("total", &self.total)
        );
        if !self.first_byte.is_empty() {
            out.push('\n');
            out.push_str(&line("first byte", &self.first_byte));
        }
        out
    }
}

/// `q` of `h` in milliseconds (0 when empty; `q = 1` is the maximum).
pub fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    let micros = if q >= 1.0 { h.max() } else { h.value_at_quantile(q) };
    micros as f64 / 1e3
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs to 10 minutes.
    Histogram::new_with_bounds(1, 600_000_000, 3).context("histogram bounds")
}

/// An HTTP client whose pool keeps enough idle keep-alive connections for `rate` with up to
/// about 100 ms of latency.
pub fn client_for(rate: f64, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    client_keeping((rate / 10.0).ceil().max(16.0) as usize, timeout)
}

/// An HTTP client whose pool keeps up to `idle` keep-alive connections.
pub fn client_keeping(idle: usize, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(idle)
        .pool_idle_timeout(Duration::from_secs(30))
        .timeout(timeout)
        .tcp_nodelay(true)
        .http1_only()
        .build()
        .context("building the HTTP client")
}

struct Outcome {
    status: i32,
    ok: bool,
    first_byte: Option<Duration>,
    total: Duration,
}

/// Runs `spec` with `client` and reports once every request has answered or timed out.
pub async fn run(client: &reqwest::Client, spec: &LoadSpec) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(spec.rate > 0.0, "the rate must be positive");
    let count = (spec.rate * spec.duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / spec.rate);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let mut max_send_lag = Duration::ZERO;
    let t0 = Instant::now() + Duration::from_millis(20);
    for i in 0..count {
        let due = t0 + period.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        max_send_lag = max_send_lag.max(Instant::now().saturating_duration_since(due));
        let request = spec.request(client, i);
        let tx = tx.clone();
        let stream = spec.stream;
        tokio::spawn(async move {
            let outcome = send(request, due, stream).await;
            let _ = tx.send(outcome);
        });
    }
    drop(tx);
    let mut report = LoadReport {
        sent: count,
        ok: 0,
        errors: 0,
        statuses: BTreeMap::new(),
        achieved_rate: 0.0,
        max_send_lag,
        total: histogram()?,
        first_byte: histogram()?,
    };
    let mut last = t0;
    while let Some(outcome) = rx.recv().await {
        *report.statuses.entry(outcome.status).or_default() += 1;
        if !outcome.ok {
            report.errors += 1;
            continue;
        }
        report.ok += 1;
        last = last.max(Instant::now());
        report.total.saturating_record(micros(outcome.total));
        if let Some(first) = outcome.first_byte {
            report.first_byte.saturating_record(micros(first));
        }
    }
    let elapsed = last.saturating_duration_since(t0).as_secs_f64();
    report.achieved_rate = if elapsed > 0.0 { report.ok as f64 / elapsed } else { 0.0 };
    Ok(report)
}

/// Runs `spec` as a closed loop: `connections` clients, each sending its next request as soon
/// as its last one is answered, until `spec.duration` has passed (`spec.rate` is not used).
/// Latency is measured from each request's sending: what a client at that concurrency sees.
/// The throughput is the successful requests over the time to the last answer.
pub async fn closed(client: &reqwest::Client, spec: &LoadSpec, connections: usize) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(connections > 0, "at least one connection");
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t0 = Instant::now();
    let end = t0 + spec.duration;
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (client, spec, next) = (client.clone(), spec.clone(), next.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while Instant::now() < end {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let started = Instant::now();
                    let outcome = send(spec.request(&client, i), started, spec.stream).await;
                    outcomes.push((outcome, Instant::now()));
                }
                outcomes
            })
        })
        .collect();
    let mut report = LoadReport {
        sent: 0,
        ok: 0,
        errors: 0,
        statuses: BTreeMap::new(),
        achieved_rate: 0.0,
        max_send_lag: Duration::ZERO,
        total: histogram()?,
        first_byte: histogram()?,
    };
    let mut last = t0;
    for worker in workers {
        for (outcome, at) in worker.await.context("a closed-loop client panicked")? {
            report.sent += 1;
            *report.statuses.entry(outcome.status).or_default() += 1;
            if !outcome.ok {
                report.errors += 1;
                continue;
            }
            report.ok += 1;
            last = last.max(at);
            report.total.saturating_record(micros(outcome.total));
            if let Some(first) = outcome.first_byte {
                report.first_byte.saturating_record(micros(first));
            }
        }
    }
    let elapsed = last.saturating_duration_since(t0).as_secs_f64();
    report.achieved_rate = if elapsed > 0.0 { report.ok as f64 / elapsed } else { 0.0 };
    Ok(report)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

async fn send(request: reqwest::RequestBuilder, due: Instant, stream: bool) -> Outcome {
    let failed = |status: i32| Outcome { status, ok: false, first_byte: None, total: due.elapsed() };
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(_) => return failed(0),
    };
    let status = i32::from(response.status().as_u16());
    let success = response.status().is_success();
    let mut first_byte = None;
    let mut tail: Vec<u8> = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if first_byte.is_none() {
                    first_byte = Some(due.elapsed());
                }
                if stream {
                    // Keep only what the `[DONE]` check needs.
                    tail.extend_from_slice(&chunk);
                    let keep = tail.len().saturating_sub(64);
                    tail.drain(..keep);
                }
            }
            Ok(None) => break,
            Err(_) => return failed(0),
        }
    }
    let total = due.elapsed();
    if !success {
        return Outcome { status, ok: false, first_byte, total };
    }
    if stream && !tail.windows(6).any(|w| w == b"[DONE]") {
        return Outcome { status: -1, ok: false, first_byte, total };
    }
    Outcome { status, ok: true, first_byte: if stream { first_byte } else { None }, total }
}

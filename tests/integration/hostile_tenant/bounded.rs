//! Bounded work per request (issue 20, findings 3, 4 and 5): one request cannot stall the
//! others, a tenant's upstream cannot exhaust the server, and a slow client cannot hold a
//! connection. The upstream here is a bare loopback server ([`Hostile`]) that does what no
//! provider does: answers 300 MB, streams past `max_tokens` forever, sends one endless
//! event, falls silent, or never answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate_core::estimate;
use tollgate_core::pricing::{Price, Tokenizer};
use tollgate_core::projects::{self, BudgetPolicy, NewProvider, ProviderKind};
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult, eventually};
use crate::proxy::{OUTPUT_NANOS_PER_TOKEN, Setup, setup_with};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        two_large_bodies_leave_the_server_responsive,
        a_huge_upstream_answer_is_refused_with_bounded_memory,
        a_stream_past_its_max_output_is_cut_and_billed_what_was_reserved,
        one_endless_event_is_cut_and_settled_for_what_was_delivered,
        a_client_leaving_a_silent_stream_frees_its_reservation_at_once,
        calls_are_cut_at_their_maximum_duration,
        trickling_connections_are_closed_by_their_timeouts,
        shutdown_with_hanging_upstreams_ends_within_the_grace_period,
    ]
}

/// Tests that measure the process's memory or time run one at a time (each test runs in a
/// runtime of its own: a Tokio mutex works across them).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The models the hostile upstream serves, all priced like the mock's (output only).
const HOSTILE_MODELS: &[&str] =
    &["hostile-huge-json", "hostile-endless", "hostile-huge-event", "hostile-silent", "hostile-hang"];

/// A model counted with tiktoken (o200k_base), served by the mock, its input priced too
/// (0.001 a token, as its output): large inputs cost.
const INPUT_PRICED: &str = "gpt-4o-mini";

/// The proxy's test project, plus a connection serving `hostile-*` from [`Hostile`], and one
/// serving [`INPUT_PRICED`] from the mock provider.
async fn setup(db: &TestDatabase, env: &[(&str, &str)]) -> anyhow::Result<(Setup, Hostile)> {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let s = setup_with(db, BudgetPolicy::Reject, |e| e.extend(env)).await?;
    let hostile = Hostile::start().await?;
    let state = &s.app.state;
    projects::add_provider(
        &state.db,
        &state.master_key,
        &s.project.id,
        &NewProvider {
            kind: ProviderKind::OpenAiCompatible,
            name: "hostile".into(),
            base_url: Some(hostile.base_url()),
            api_key: "sk-hostile".into(),
            models: vec!["hostile-*".into()],
        },
    )
    .await?;
    projects::add_provider(
        &state.db,
        &state.master_key,
        &s.project.id,
        &NewProvider {
            kind: ProviderKind::OpenAiCompatible,
            name: "mock gpt".into(),
            base_url: Some(s.mock.base_url()),
            api_key: "sk-mock-upstream".into(),
            models: vec![INPUT_PRICED.into()],
        },
    )
    .await?;
    let price = Price {
        input: 0,
        cached_input: 0,
        output: OUTPUT_NANOS_PER_TOKEN * 1_000_000,
        cache_write: 0,
        max_output_tokens: 100,
        tokenizer: Tokenizer::O200kBase,
    };
    for model in HOSTILE_MODELS {
        projects::set_price(&state.db, &s.project.id, model, &price).await?;
    }
    let input_priced = Price { input: OUTPUT_NANOS_PER_TOKEN * 1_000_000, ..price };
    projects::set_price(&state.db, &s.project.id, INPUT_PRICED, &input_priced).await?;
    Ok((s, hostile))
}

fn call(model: &str, max_tokens: i64, stream: bool) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "stream": stream,
        "messages": [{"role": "user", "content": "Hello!"}]})
}

/// The one usage event of the test: (status, reason, output tokens, billed nanos).
async fn only_event(s: &Setup) -> anyhow::Result<(String, Option<String>, i64, i64)> {
    Ok(with_db!(&s.app.state.db, pool => sqlx::query_as(
        "SELECT status, reason, output_tokens, billed_nanos FROM usage_events").fetch_one(pool).await)?)
}

/// Tokens of `text` as the proxy counts what a `hostile-*` model delivered: a model without
/// a shipped price has no known tokenizer, so its bytes.
fn tokens(text: &str) -> i64 {
    estimate::count_text(Tokenizer::Approximate, text)
}

/// Two 15 MB prompts (the proxy's limit is 16 MB) from customers who cannot pay for them,
/// and a 1 MB one from a customer who can: the health check answers within a second all
/// along. The large ones are refused from the least their input could count (bytes over
/// the longest token), without counting them; the paid one is counted exactly off the
/// async threads and forwarded.
async fn two_large_bodies_leave_the_server_responsive(db: TestDatabase) -> TestResult {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (s, _hostile) = setup(&db, &[]).await?;
    s.budget("broke-1", 1_000).await?;
    s.budget("broke-2", 1_000).await?;
    s.budget("rich", 100_000_000).await?;
    // Each call on a task of its own, so that the health checks hold none of them back, its
    // body serialized beforehand (the client shares the server's two threads: its own work
    // must not be what delays the checks).
    let bodies = ["broke-1", "broke-2", "rich"].map(|customer| {
        let bytes = if customer == "rich" { 1 << 20 } else { 15 << 20 };
        let body = json!({"model": INPUT_PRICED, "max_tokens": 10,
            "messages": [{"role": "user", "content": random_words(bytes)}]});
        (customer, serde_json::to_vec(&body).unwrap_or_default())
    });
    let post = |(customer, body): (&'static str, Vec<u8>)| {
        let (client, url, key) = (s.app.client.clone(), s.app.url("/v1/chat/completions"), s.key.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let response = client
                .post(url)
                .bearer_auth(key)
                .header("x-tollgate-customer", customer)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let status = response.status();
            let answer: Value = response.json().await?;
            Ok::<_, anyhow::Error>((status, answer, started.elapsed()))
        })
    };
    let calls = bodies.map(post);
    let mut slowest = Duration::ZERO;
    let mut checks = 0;
    while !calls.iter().all(|c| c.is_finished()) {
        let started = Instant::now();
        let health = s.app.get("/healthz").await?;
        assert_eq!(health.status(), StatusCode::OK);
        slowest = slowest.max(started.elapsed());
        checks += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("  /healthz: slowest of {checks} checks {slowest:?} while the large bodies were in flight");
    let [first, second, paid] = calls;
    for (status, error, took) in [first.await??, second.await??] {
        println!("  a 15 MB prompt refused in {took:?}");
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{}", brief(&error));
        assert_eq!(error["error"]["code"], "customer_budget_exceeded");
    }
    let (status, answer, took) = paid.await??;
    println!("  a 1 MB prompt counted and forwarded in {took:?}");
    assert_eq!(status, StatusCode::OK, "{}", brief(&answer));
    assert!(slowest < Duration::from_secs(1), "/healthz took {slowest:?}");
    assert!(checks >= 1, "no health check ran");
    assert_eq!(s.events("refused").await?, 2);
    assert_eq!(s.ledger("broke-1").await?, (0, 0));
    s.app.stop().await
}

/// `bytes` of random lower-case words: text whose every piece the tokenizer has to merge
/// (about 150 ms a megabyte in the dev profile, six times ordinary prose).
fn random_words(bytes: usize) -> String {
    let mut seed = 7u64;
    let mut text = String::with_capacity(bytes);
    while text.len() < bytes {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        text.push(if (seed >> 20).is_multiple_of(40) { ' ' } else { (b'a' + (seed >> 33) as u8 % 26) as char });
    }
    text
}

/// The start of an answer, for a failure's message (an answer may be 300 MB).
fn brief(answer: &Value) -> String {
    answer.to_string().chars().take(300).collect()
}

/// The process's resident memory, in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    kb * 1024
}

/// A 300 MB JSON answer (chunked, so no length gives it away): the proxy stops reading at
/// its 32 MB cap, answers an upstream error in the caller's shape, and releases the call.
async fn a_huge_upstream_answer_is_refused_with_bounded_memory(db: TestDatabase) -> TestResult {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (s, hostile) = setup(&db, &[]).await?;
    s.budget("big-answer", 1_000).await?;
    let baseline = resident_bytes();
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampling = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(resident_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let response = s.chat("big-answer", call("hostile-huge-json", 10, false)).await?;
    let status = response.status();
    let error: Value = response.json().await?;
    sampling.abort();
    let grew = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    let sent = hostile.sent.load(Ordering::Relaxed);
    println!("  resident memory grew by {} MB; the upstream got {} MB out", grew >> 20, sent >> 20);
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{}", brief(&error));
    assert_eq!(error["error"]["code"], "upstream_too_large");
    assert!(grew < 200 << 20, "the server's memory grew by {} MB", grew >> 20);
    assert!(sent < 200 << 20, "the proxy read {} MB of the answer", sent >> 20);
    assert_eq!(s.ledger("big-answer").await?, (0, 0));
    let (status, reason, _, billed) = only_event(&s).await?;
    assert_eq!((status.as_str(), reason.as_deref(), billed), ("failed", Some("upstream answer too large"), 0));
    s.app.stop().await
}

/// Reads a streamed answer to its end (or fails after `limit`), returning its text.
async fn read_stream(response: reqwest::Response, limit: Duration) -> anyhow::Result<String> {
    let mut text = String::new();
    let mut body = response.bytes_stream();
    tokio::time::timeout(limit, async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk?));
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("the stream was not cut within {limit:?}"))??;
    Ok(text)
}

/// An upstream that ignores `max_tokens` and streams forever is cut once what it delivered
/// counts past the max output, the margin (50%) and the slack (256 tokens); the customer
/// pays what was reserved, not more, and the upstream's connection is closed.
async fn a_stream_past_its_max_output_is_cut_and_billed_what_was_reserved(db: TestDatabase) -> TestResult {
    let (s, hostile) = setup(&db, &[]).await?;
    s.budget("flooded", 1_000).await?;
    let response = s.chat("flooded", call("hostile-endless", 20, true)).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let text = read_stream(response, Duration::from_secs(30)).await?;
    let delivered = text.matches("\"content\":\"tok \"").count() as i64;
    println!("  cut after {delivered} events");
    // Each event is one token: cut past 20 + 50% + 256, metered in pieces of 256 bytes (64 events).
    assert!(delivered > 20 + 10 + 256 - 64 && delivered <= 20 + 10 + 256 + 2 * 64, "{delivered} events delivered");
    eventually(Duration::from_secs(10), || async { Ok(s.ledger("flooded").await?.1 == 0) }).await?;
    assert_eq!(s.ledger("flooded").await?, (20 * OUTPUT_NANOS_PER_TOKEN, 0));
    let (status, reason, output, _) = only_event(&s).await?;
    assert_eq!((status.as_str(), reason.as_deref(), output), ("settled", Some("the stream passed its max output"), 20));
    eventually(Duration::from_secs(10), || async { Ok(hostile.closed.load(Ordering::Relaxed) == 1) }).await?;
    s.app.stop().await
}

/// Three words, then one event that never ends: the stream is cut at the 1 MB event cap
/// (in linear time: the framer looks at each byte once) and settled for the three words.
async fn one_endless_event_is_cut_and_settled_for_what_was_delivered(db: TestDatabase) -> TestResult {
    let (s, hostile) = setup(&db, &[]).await?;
    s.budget("one-event", 1_000).await?;
    let started = Instant::now();
    let response = s.chat("one-event", call("hostile-huge-event", 20, true)).await?;
    let text = read_stream(response, Duration::from_secs(30)).await?;
    println!(
        "  cut after {:?}; the upstream got {} KB out",
        started.elapsed(),
        hostile.sent.load(Ordering::Relaxed) >> 10
    );
    assert_eq!(text.matches("\"content\":\"tok \"").count(), 3, "{}", &text[..text.len().min(500)]);
    assert!(!text.contains("aaaa"), "the endless event was forwarded");
    eventually(Duration::from_secs(10), || async { Ok(s.ledger("one-event").await?.1 == 0) }).await?;
    assert_eq!(s.ledger("one-event").await?.0, tokens("tok tok tok ") * OUTPUT_NANOS_PER_TOKEN);
    let (status, reason, _, _) = only_event(&s).await?;
    assert_eq!((status.as_str(), reason.as_deref()), ("settled", Some("upstream event too large")));
    eventually(Duration::from_secs(10), || async { Ok(hostile.closed.load(Ordering::Relaxed) == 1) }).await?;
    s.app.stop().await
}

/// An upstream that sends three words and falls silent, its connection open: the client
/// leaves, and the call is settled for the three words at once — not when the next event
/// would have been forwarded (never), nor after the five-minute idle timeout.
async fn a_client_leaving_a_silent_stream_frees_its_reservation_at_once(db: TestDatabase) -> TestResult {
    let (s, hostile) = setup(&db, &[]).await?;
    s.budget("leaver", 1_000).await?;
    let response = s.chat("leaver", call("hostile-silent", 100, true)).await?;
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while seen.matches("tok ").count() < 3 {
        let chunk = body.next().await.ok_or_else(|| anyhow::anyhow!("stream ended early"))??;
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(s.ledger("leaver").await?.1, 100 * OUTPUT_NANOS_PER_TOKEN, "the call holds its reservation");
    let left = Instant::now();
    drop(body);
    eventually(Duration::from_secs(10), || async { Ok(s.ledger("leaver").await?.1 == 0) }).await?;
    println!("  reservation freed {:?} after the client left", left.elapsed());
    let (spent, _) = s.ledger("leaver").await?;
    assert_eq!(spent, tokens("tok tok tok ") * OUTPUT_NANOS_PER_TOKEN);
    let (status, reason, _, _) = only_event(&s).await?;
    assert_eq!((status.as_str(), reason.as_deref()), ("settled", Some("client disconnected")));
    eventually(Duration::from_secs(10), || async { Ok(hostile.closed.load(Ordering::Relaxed) == 1) }).await?;
    s.app.stop().await
}

/// With a maximum duration of 2 s: a silent stream is cut and settled for what it delivered,
/// and a JSON call whose upstream never answers gets a 504 and is released.
async fn calls_are_cut_at_their_maximum_duration(db: TestDatabase) -> TestResult {
    let (s, _hostile) = setup(&db, &[("TOLLGATE_UPSTREAM_MAX_SECONDS", "2")]).await?;
    s.budget("patient", 1_000).await?;
    let started = Instant::now();
    let (streamed, json) = tokio::join!(
        async {
            let response = s.chat("patient", call("hostile-silent", 100, true)).await?;
            read_stream(response, Duration::from_secs(30)).await
        },
        async {
            let response = s.chat("patient", call("hostile-hang", 100, false)).await?;
            Ok::<_, anyhow::Error>((response.status(), response.json::<Value>().await?))
        }
    );
    println!("  both cut after {:?}", started.elapsed());
    assert_eq!(streamed?.matches("tok ").count(), 3);
    let (status, error) = json?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{}", brief(&error));
    assert_eq!(error["error"]["code"], "upstream_timeout");
    eventually(Duration::from_secs(10), || async { Ok(s.ledger("patient").await?.1 == 0) }).await?;
    assert_eq!(s.ledger("patient").await?.0, tokens("tok tok tok ") * OUTPUT_NANOS_PER_TOKEN);
    let reasons: Vec<(String, Option<String>)> = with_db!(&s.app.state.db, pool => sqlx::query_as(
        "SELECT status, reason FROM usage_events ORDER BY status").fetch_all(pool).await)?;
    let cut = Some("the call reached its maximum duration".to_owned());
    assert_eq!(reasons, vec![("failed".to_owned(), cut.clone()), ("settled".to_owned(), cut)]);
    s.app.stop().await
}

/// Six connections trickle a byte every 300 ms, three of them in their headers and three in
/// their bodies, plus one that sends nothing: with a 1 s header timeout and a 2 s body
/// timeout, each is closed within a few seconds (without the timeouts all stay open).
async fn trickling_connections_are_closed_by_their_timeouts(db: TestDatabase) -> TestResult {
    let (s, _hostile) =
        setup(&db, &[("TOLLGATE_HEADER_READ_TIMEOUT_SECONDS", "1"), ("TOLLGATE_BODY_READ_TIMEOUT_SECONDS", "2")])
            .await?;
    let addr = s.app.addr;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         x-tollgate-customer: c\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n",
        s.key
    );
    let mut slow = Vec::new();
    for i in 0..6 {
        // Headers trickled from the start, or sent whole and then the body trickled.
        let (sent_first, trickled) = if i < 3 { ("", head.clone()) } else { (head.as_str(), "{".repeat(1000)) };
        slow.push(trickle(addr, sent_first.to_owned(), trickled.into_bytes()));
    }
    let idle = async {
        let mut stream = TcpStream::connect(addr).await?;
        let started = Instant::now();
        let mut buf = [0u8; 256];
        tokio::time::timeout(Duration::from_secs(20), async { while stream.read(&mut buf).await.unwrap_or(0) > 0 {} })
            .await
            .map_err(|_| anyhow::anyhow!("an idle connection stayed open"))?;
        Ok::<_, anyhow::Error>(started.elapsed())
    };
    let (closed, idle) = tokio::join!(futures::future::join_all(slow), idle);
    for (i, took) in closed.into_iter().enumerate() {
        let took = took?;
        println!("  trickling connection {i} closed after {took:?}");
        assert!(took < Duration::from_secs(10), "connection {i} stayed open {took:?}");
    }
    println!("  idle connection closed after {:?}", idle?);
    s.app.stop().await
}

/// Connects, sends `first`, then `trickled` one byte every 300 ms, until the server closes
/// the connection (or 20 s pass: an error). Returns how long the connection lived.
async fn trickle(addr: SocketAddr, first: String, trickled: Vec<u8>) -> anyhow::Result<Duration> {
    let mut stream = TcpStream::connect(addr).await?;
    let started = Instant::now();
    stream.write_all(first.as_bytes()).await?;
    let (mut reader, mut writer) = stream.into_split();
    let closed = async {
        let mut buf = [0u8; 1024];
        while reader.read(&mut buf).await.unwrap_or(0) > 0 {}
    };
    let writing = async {
        for byte in trickled {
            if writer.write_all(&[byte]).await.is_err() {
                // The server has closed its side: the read above sees it.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        std::future::pending::<()>().await;
    };
    tokio::time::timeout(Duration::from_secs(20), async {
        tokio::select! {
            () = closed => {}
            () = writing => {}
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("a trickling connection was still open after 20 s"))?;
    Ok(started.elapsed())
}

/// With a 2 s grace period, a JSON call whose upstream never answers and a stream whose
/// upstream fell silent are cut at four fifths of it and settled (the stream for what it
/// delivered, the JSON call released), and shutdown is over within the grace period.
async fn shutdown_with_hanging_upstreams_ends_within_the_grace_period(db: TestDatabase) -> TestResult {
    let (s, _hostile) = setup(&db, &[("TOLLGATE_SHUTDOWN_GRACE_SECONDS", "2")]).await?;
    s.budget("during-shutdown", 1_000).await?;
    let stream = s.chat("during-shutdown", call("hostile-silent", 100, true)).await?;
    let mut body = stream.bytes_stream();
    let mut seen = String::new();
    while seen.matches("tok ").count() < 3 {
        let chunk = body.next().await.ok_or_else(|| anyhow::anyhow!("stream ended early"))??;
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let (client, url, key) = (s.app.client.clone(), s.app.url("/v1/chat/completions"), s.key.clone());
    let json = tokio::spawn(async move {
        let response = client
            .post(url)
            .bearer_auth(key)
            .header("x-tollgate-customer", "during-shutdown")
            .json(&call("hostile-hang", 100, false))
            .send()
            .await?;
        Ok::<_, anyhow::Error>((response.status(), response.json::<Value>().await?))
    });
    eventually(Duration::from_secs(10), || async {
        Ok(s.ledger("during-shutdown").await?.1 == 200 * OUTPUT_NANOS_PER_TOKEN)
    })
    .await?;
    let check = db.connect().await?;
    let (project, app) = (s.project.id.clone(), s.app);
    let stopping = Instant::now();
    app.stop().await?;
    let took = stopping.elapsed();
    println!("  shutdown took {took:?} with a grace period of 2 s");
    assert!(took < Duration::from_millis(2_900), "shutdown took {took:?}");
    let (status, error) = json.await??;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", brief(&error));
    assert_eq!(error["error"]["code"], "shutting_down");
    let customer = projects::find_customer(&check, &project, "during-shutdown").await?.unwrap();
    assert_eq!((customer.spent_nanos, customer.reserved_nanos), (tokens("tok tok tok ") * OUTPUT_NANOS_PER_TOKEN, 0));
    let reasons: Vec<(String, Option<String>)> = with_db!(&check, pool => sqlx::query_as(
        "SELECT status, reason FROM usage_events ORDER BY status").fetch_all(pool).await)?;
    let cut = Some("the server shut down".to_owned());
    assert_eq!(reasons, vec![("failed".to_owned(), cut.clone()), ("settled".to_owned(), cut)]);
    Ok(())
}

/// An OpenAI-compatible upstream that misbehaves by model name (one request per
/// connection, which it closes):
/// - `hostile-huge-json`: a 300 MB JSON answer, chunked;
/// - `hostile-endless`: a stream of one-word events that ignores `max_tokens` and never ends;
/// - `hostile-huge-event`: three one-word events, then one event that never ends;
/// - `hostile-silent`: three one-word events, then silence, the connection held open;
/// - `hostile-hang`: never answers.
///
/// `sent` counts the bytes it wrote; `closed`, the streams whose reader went away.
#[derive(Clone)]
struct Hostile {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
}

impl Hostile {
    async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let hostile = Hostile { addr: listener.local_addr()?, sent: Default::default(), closed: Default::default() };
        let serving = hostile.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let hostile = serving.clone();
                tokio::spawn(async move { hostile.answer(stream).await });
            }
        });
        Ok(hostile)
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Writes one chunk of a chunked body; false once the reader has gone.
    async fn chunk(&self, stream: &mut TcpStream, data: &[u8]) -> bool {
        let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
        framed.extend_from_slice(data);
        framed.extend_from_slice(b"\r\n");
        let written = stream.write_all(&framed).await.is_ok();
        if written {
            self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        written
    }

    /// Waits for the reader to close the connection (reads to its end).
    async fn until_closed(&self, stream: &mut TcpStream) {
        let mut buf = [0u8; 1024];
        while stream.read(&mut buf).await.unwrap_or(0) > 0 {}
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    async fn answer(&self, mut stream: TcpStream) {
        let Some(request) = read_request(&mut stream).await else { return };
        let model = request["model"].as_str().unwrap_or("").to_owned();
        let head = |content_type: &str| {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            )
        };
        let word = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"},\"finish_reason\":null}]}\n\n";
        match model.as_str() {
            "hostile-huge-json" => {
                let _ = stream.write_all(head("application/json").as_bytes()).await;
                let opening = b"{\"id\":\"x\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"";
                let filler = vec![b'a'; 64 * 1024];
                if !self.chunk(&mut stream, opening).await {
                    return;
                }
                for _ in 0..(300 * 1024 * 1024 / filler.len()) {
                    if !self.chunk(&mut stream, &filler).await {
                        return;
                    }
                }
                let _ = self.chunk(&mut stream, b"\"}}]}").await;
                let _ = stream.write_all(b"0\r\n\r\n").await;
            }
            "hostile-endless" => {
                let _ = stream.write_all(head("text/event-stream").as_bytes()).await;
                while self.chunk(&mut stream, word.as_bytes()).await {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                self.closed.fetch_add(1, Ordering::Relaxed);
            }
            "hostile-huge-event" => {
                let _ = stream.write_all(head("text/event-stream").as_bytes()).await;
                for _ in 0..3 {
                    self.chunk(&mut stream, word.as_bytes()).await;
                }
                self.chunk(&mut stream, b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"").await;
                let filler = vec![b'a'; 16 * 1024];
                while self.chunk(&mut stream, &filler).await {
                    tokio::task::yield_now().await;
                }
                self.closed.fetch_add(1, Ordering::Relaxed);
            }
            "hostile-silent" => {
                let _ = stream.write_all(head("text/event-stream").as_bytes()).await;
                for _ in 0..3 {
                    self.chunk(&mut stream, word.as_bytes()).await;
                }
                self.until_closed(&mut stream).await;
            }
            _ => self.until_closed(&mut stream).await,
        }
    }
}

/// Reads one HTTP/1.1 request (its head, then a body of its `content-length`) as JSON.
async fn read_request(stream: &mut TcpStream) -> Option<Value> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok())?;
    while buffer.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buffer.extend_from_slice(&chunk[..n]);
    }
    serde_json::from_slice(&buffer[head_end..head_end + length]).ok()
}

//! Python clients against Tollgate. The venv with the packages pinned in
//! `tests/python/requirements.txt` is made (or found up to date) once per test process by
//! `tests/python/setup.sh`; [`PythonScript`] runs a script of `tests/python/` in it and hands
//! back what it printed. The official `openai` and `anthropic` SDKs drive the proxy here, and
//! [`token_parity`] compares our token counts with OpenAI's `tiktoken`, and
//! [`stripe_signatures`] our webhook signature checks with Stripe's `stripe` package.

mod stripe_signatures;
mod token_parity;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use reqwest::StatusCode;
use serde_json::Value;
use tollgate_core::accounts::{self, NewOrganization};
use tollgate_core::money::Nanos;
use tollgate_core::period::BudgetPeriod;
use tollgate_core::pricing::{Price, Tokenizer};
use tollgate_core::projects::{self, BudgetPolicy, KeyKind, NewProject, NewProvider, Project, ProviderKind};
use tollgate_core::with_db;

use crate::db_cases;
use crate::helpers::{DbCase, PlainCase, TestApp, TestDatabase, TestResult, eventually, spawn_app};
use crate::mock_provider::MockProvider;

pub fn cases() -> Vec<DbCase> {
    db_cases![
        openai_sdk_chat_streams_reads_headers_and_surfaces_refusals,
        anthropic_sdk_messages_stream_count_and_surface_refusals,
        openai_sdk_gets_calls_tollgate_cannot_bound_refused,
        anthropic_sdk_gets_calls_tollgate_cannot_bound_refused,
    ]
}

pub fn plain_cases() -> Vec<PlainCase> {
    token_parity::cases().into_iter().chain(stripe_signatures::cases()).collect()
}

/// How long one script may run before it is killed and its test fails.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// `tests/python/`, where the scripts and the requirements are.
fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("python")
}

/// Cargo's target directory (the parent of `CARGO_TARGET_TMPDIR`, which honours
/// `CARGO_TARGET_DIR`): the venv and tiktoken's cache live there, out of the source tree.
fn target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).to_path_buf()
}

/// Runs `init` once per test process, off the async runtime; every caller gets its outcome.
async fn once_blocking(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    init: fn() -> Result<PathBuf, String>,
) -> anyhow::Result<PathBuf> {
    let outcome = tokio::task::spawn_blocking(move || cell.get_or_init(init).clone()).await?;
    outcome.map_err(anyhow::Error::msg)
}

/// The venv's interpreter, once `setup.sh` made sure the venv is up to date.
pub async fn interpreter() -> anyhow::Result<PathBuf> {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once_blocking(&VENV, || {
        let venv = target_dir().join("python-venv");
        let setup = scripts_dir().join("setup.sh");
        let output = std::process::Command::new("bash")
            .arg(&setup)
            .arg(&venv)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("could not run {}: {e}", setup.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} failed ({}), so no Python test can run:\n{}{}",
                setup.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(venv.join("bin").join("python"))
    })
    .await
}

/// The `assets/` folder of the tiktoken-rs that `tollgate_core` is built with, found with
/// `cargo metadata` (it holds the BPE files that Python's tiktoken would download).
async fn tiktoken_rs_assets() -> anyhow::Result<PathBuf> {
    static ASSETS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once_blocking(&ASSETS, || {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        // Offline, only this machine's platform: packages for other platforms (never
        // downloaded by a build here) are not needed.
        let rustc = std::process::Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
            .arg("-vV")
            .output()
            .map_err(|e| format!("could not run rustc -vV: {e}"))?;
        let host = String::from_utf8_lossy(&rustc.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
            .ok_or("rustc -vV names no host")?;
        let output = std::process::Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", &host, "--manifest-path"])
            .arg(&manifest)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("could not run cargo metadata: {e}"))?;
        if !output.status.success() {
            return Err(format!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr)));
        }
        let metadata: Value =
            serde_json::from_slice(&output.stdout).map_err(|e| format!("cargo metadata printed no JSON: {e}"))?;
        let manifest_path = tiktoken_rs_manifest(&metadata)
            .ok_or("cargo metadata does not show the tiktoken-rs that tollgate-core depends on")?;
        Ok(Path::new(manifest_path).with_file_name("assets"))
    })
    .await
}

/// The manifest path of the package that `tollgate-core` resolves `tiktoken_rs` to.
fn tiktoken_rs_manifest(metadata: &Value) -> Option<&str> {
    let packages = metadata["packages"].as_array()?;
    let core = packages.iter().find(|p| p["name"] == "tollgate-core")?;
    let nodes = metadata.pointer("/resolve/nodes")?.as_array()?;
    let node = nodes.iter().find(|n| n["id"] == core["id"])?;
    let dep = node["deps"].as_array()?.iter().find(|d| d["name"] == "tiktoken_rs")?;
    packages.iter().find(|p| p["id"] == dep["pkg"])?["manifest_path"].as_str()
}

/// A script of `tests/python/` to run in the venv: arguments, environment, then
/// [`run`](Self::run) (must exit 0) or [`output`](Self::output) (any exit).
pub struct PythonScript {
    name: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

/// What a finished script printed, and how it exited.
#[derive(Debug)]
pub struct PythonOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl PythonScript {
    pub fn new(name: &str) -> Self {
        Self { name: name.to_owned(), args: Vec::new(), env: Vec::new() }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Lets `tiktoken` work offline: its cache (in the target directory) is seeded from
    /// tiktoken-rs's copies of the BPE files by `tiktoken_offline.py`.
    pub async fn with_offline_tiktoken(self) -> anyhow::Result<Self> {
        let assets = tiktoken_rs_assets().await?;
        Ok(self.env("TOLLGATE_TIKTOKEN_ASSETS", assets).env("TIKTOKEN_CACHE_DIR", target_dir().join("tiktoken-cache")))
    }

    /// The command line, for messages.
    fn describe(&self) -> String {
        let args = self.args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
        format!("tests/python/{} {args}", self.name)
    }

    /// Runs the script to its end, whatever its exit status.
    pub async fn output(&self) -> anyhow::Result<PythonOutput> {
        let python = interpreter().await?;
        let mut command = tokio::process::Command::new(&python);
        command
            .arg(scripts_dir().join(&self.name))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // Keep `__pycache__` out of the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(SCRIPT_TIMEOUT, command.output())
            .await
            .with_context(|| format!("{} still running after {SCRIPT_TIMEOUT:?}", self.describe()))?
            .with_context(|| format!("could not start {}", python.display()))?;
        Ok(PythonOutput {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Runs the script and fails, showing everything it printed, unless it exits 0.
    pub async fn run(&self) -> anyhow::Result<PythonOutput> {
        let output = self.output().await?;
        if !output.status.success() {
            anyhow::bail!(
                "{} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.describe(),
                output.status,
                output.stdout.trim_end(),
                output.stderr.trim_end()
            );
        }
        Ok(output)
    }

    /// Runs the script and parses its stdout as JSON.
    pub async fn run_json(&self) -> anyhow::Result<Value> {
        let output = self.run().await?;
        serde_json::from_str(&output.stdout).with_context(|| {
            format!("{} printed no JSON:\n{}\n--- stderr ---\n{}", self.describe(), output.stdout, output.stderr)
        })
    }
}

// ---------------------------------------------------------------------------------------
// The official `openai` SDK against the proxy.

/// One output token costs 1e6 nanos (0.001); input is free, so a call's cost is its output
/// tokens (as in `proxy.rs`).
const OUTPUT_NANOS_PER_TOKEN: i64 = 1_000_000;

/// A running Tollgate with a project whose provider is the mock, and a secret key.
struct SdkSetup {
    app: TestApp,
    mock: MockProvider,
    project: Project,
    key: String,
}

async fn sdk_setup(db: &TestDatabase, policy: BudgetPolicy) -> anyhow::Result<SdkSetup> {
    let app = spawn_app(db).await?;
    let mock = MockProvider::start().await?;
    let db = &app.state.db;
    let org = accounts::create_organization_with_owner(
        db,
        NewOrganization { name: "Py", owner_email: "py@example.com", owner_password: "correct horse battery" },
    )
    .await?;
    let project = projects::create_project(
        db,
        &org.org_id,
        &NewProject { name: "SDK".into(), policy, min_output_tokens: 1, ..NewProject::default() },
    )
    .await?;
    let provider = NewProvider {
        kind: ProviderKind::OpenAiCompatible,
        name: "mock".into(),
        base_url: Some(mock.base_url()),
        api_key: "sk-mock-upstream".into(),
        models: vec!["mock-*".into()],
    };
    projects::add_provider(db, &app.state.master_key, &project.id, &provider).await?;
    let price = Price {
        input: 0,
        cached_input: 0,
        output: OUTPUT_NANOS_PER_TOKEN * 1_000_000,
        cache_write: 0,
        max_output_tokens: 100,
        tokenizer: Tokenizer::O200kBase,
    };
    projects::set_price(db, &project.id, "mock-model", &price).await?;
    let key = projects::create_key(db, &project.id, KeyKind::Secret, "python").await?.plaintext;
    Ok(SdkSetup { app, mock, project, key })
}

impl SdkSetup {
    async fn budget(&self, customer: &str, output_tokens: i64) -> anyhow::Result<()> {
        let amount = Nanos(output_tokens * OUTPUT_NANOS_PER_TOKEN);
        projects::upsert_customer_budget(&self.app.state.db, &self.project.id, customer, amount, BudgetPeriod::Month)
            .await?;
        Ok(())
    }

    /// (spent, reserved) of a customer.
    async fn ledger(&self, customer: &str) -> anyhow::Result<(i64, i64)> {
        let c = projects::find_customer(&self.app.state.db, &self.project.id, customer)
            .await?
            .with_context(|| format!("no customer {customer}"))?;
        Ok((c.spent_nanos, c.reserved_nanos))
    }

    /// (status, output tokens, billed nanos) of the usage event of a request.
    async fn usage_event(&self, request_id: &str) -> anyhow::Result<Option<(String, i64, i64)>> {
        Ok(with_db!(&self.app.state.db, pool => sqlx::query_as(
            "SELECT status, output_tokens, billed_nanos FROM usage_events WHERE request_id = $1")
            .bind(request_id).fetch_optional(pool).await)?)
    }

    async fn usage_events(&self) -> anyhow::Result<i64> {
        Ok(with_db!(&self.app.state.db, pool => sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM usage_events").fetch_one(pool).await)?)
    }
}

/// The request id a scenario of `openai_chat.py` reported.
fn request_id(scenario: &Value) -> anyhow::Result<&str> {
    scenario["request_id"].as_str().with_context(|| format!("no request id in {scenario}"))
}

async fn openai_sdk_chat_streams_reads_headers_and_surfaces_refusals(db: TestDatabase) -> TestResult {
    let s = sdk_setup(&db, BudgetPolicy::Reject).await?;
    s.budget("rich", 1_000).await?;
    s.budget("poor", 3).await?;
    let results = PythonScript::new("openai_chat.py")
        .arg("--base-url")
        .arg(s.app.url("/v1"))
        .arg("--customer")
        .arg("rich")
        .arg("--poor-customer")
        .arg("poor")
        .env("OPENAI_API_KEY", &s.key)
        .run_json()
        .await?;

    // A plain chat: the SDK parses our body into its types.
    let chat = &results["chat"];
    assert_eq!(chat["content"], "tok ".repeat(5), "{chat}");
    assert_eq!(chat["finish_reason"], "length");
    assert_eq!(chat["usage"]["completion_tokens"], 5);

    // A stream without `include_usage`: content chunks only, though Tollgate asked upstream
    // for usage to settle by.
    let plain = &results["stream"];
    assert_eq!(plain["content"], "tok ".repeat(4), "{plain}");
    assert_eq!(plain["content_chunks"], 4, "{plain}");
    assert_eq!(plain["usage_chunks"], 0, "the client did not ask for usage: {plain}");
    // With it, the usage chunk arrives, last.
    let with_usage = &results["stream_with_usage"];
    assert_eq!(with_usage["content"], "tok ".repeat(3), "{with_usage}");
    assert_eq!(with_usage["usage_chunks"], 1, "{with_usage}");
    assert_eq!(with_usage["last_chunk_usage"]["completion_tokens"], 3, "{with_usage}");
    let upstream = s.mock.requests();
    assert_eq!(upstream.len(), 4, "chat, two streams and the raw call reach the provider; refusals don't");
    assert!(upstream.iter().filter(|r| r["stream"] == true).all(|r| r["stream_options"]["include_usage"] == true));

    // `with_raw_response` shows our headers next to the parsed body.
    let raw = &results["raw"];
    assert_eq!(raw["status"], 200);
    assert_eq!(raw["cost"], "0.002", "{raw}");
    // 1.0 less the 5 + 4 + 3 + 2 tokens so far (a stream still settling holds exactly its cost).
    assert_eq!(raw["remaining"], "0.986", "{raw}");
    assert_eq!(raw["completion_tokens"], 2);

    // A refusal is the SDK's status error, carrying our error body; streamed or not.
    for name in ["refusal", "stream_refusal"] {
        let refusal = &results[name];
        assert_eq!(refusal["exception"], "APIStatusError", "{name}: {refusal}");
        assert_eq!(refusal["is_api_status_error"], true);
        assert_eq!(refusal["status_code"], 402, "{name}: {refusal}");
        assert_eq!(refusal["code"], "customer_budget_exceeded");
        assert_eq!(refusal["body"]["code"], "customer_budget_exceeded", "the SDK unwraps `error`: {refusal}");
        assert_eq!(refusal["body"]["type"], "insufficient_budget");
        assert_eq!(refusal["response_json"]["error"]["code"], "customer_budget_exceeded");
        assert_eq!(refusal["response_json"]["error"]["remaining"], "0.003");
    }

    // The ledger: every SDK call is one usage event, found by the request id the SDK saw.
    let expected =
        [("chat", "settled", 5), ("stream", "settled", 4), ("stream_with_usage", "settled", 3), ("raw", "settled", 2)];
    for (name, status, tokens) in expected {
        let id = request_id(&results[name])?.to_owned();
        // Streams settle when the stream ends, just after the client saw its last byte.
        eventually(Duration::from_secs(5), || async { Ok(s.usage_event(&id).await?.is_some()) }).await?;
        let event = s.usage_event(&id).await?;
        assert_eq!(event, Some((status.to_owned(), tokens, tokens * OUTPUT_NANOS_PER_TOKEN)), "{name}");
    }
    let raw_event = s.usage_event(request_id(raw)?).await?;
    assert_eq!(raw_event.map(|(_, _, billed)| Nanos(billed).to_string()), Some("0.002".to_owned()));
    for name in ["refusal", "stream_refusal"] {
        let event = s.usage_event(request_id(&results[name])?).await?;
        assert_eq!(event, Some(("refused".to_owned(), 0, 0)), "{name}");
    }
    assert_eq!(s.usage_events().await?, 6, "the SDK must not retry a refusal");
    eventually(Duration::from_secs(5), || async { Ok(s.ledger("rich").await? == (14 * OUTPUT_NANOS_PER_TOKEN, 0)) })
        .await?;
    assert_eq!(s.ledger("poor").await?, (0, 0));

    // A wrong key is the SDK's AuthenticationError, with our body too.
    let unauthorized = PythonScript::new("openai_chat.py")
        .arg("--base-url")
        .arg(s.app.url("/v1"))
        .arg("--customer")
        .arg("rich")
        .arg("--only-chat")
        .env("OPENAI_API_KEY", "tg_sk_wrong")
        .run_json()
        .await?;
    assert_eq!(unauthorized["chat"]["exception"], "AuthenticationError", "{unauthorized}");
    assert_eq!(unauthorized["chat"]["status_code"], StatusCode::UNAUTHORIZED.as_u16());
    assert_eq!(unauthorized["chat"]["code"], "invalid_api_key");
    assert_eq!(s.usage_events().await?, 6);
    s.app.stop().await
}

/// The admission rule as the official `openai` SDK meets it: a hosted tool, a file by id and
/// a hosted web search are each the SDK's `BadRequestError` carrying our code and the field,
/// recorded as refused, and never reach the provider.
async fn openai_sdk_gets_calls_tollgate_cannot_bound_refused(db: TestDatabase) -> TestResult {
    let s = sdk_setup(&db, BudgetPolicy::Reject).await?;
    s.budget("rich", 1_000).await?;
    let results = PythonScript::new("openai_chat.py")
        .arg("--base-url")
        .arg(s.app.url("/v1"))
        .arg("--customer")
        .arg("rich")
        .arg("--only-unbounded")
        .env("OPENAI_API_KEY", &s.key)
        .run_json()
        .await?;
    let expected = [
        ("hosted_tool", "unbounded_tool", "tools[0]"),
        ("file_by_id", "unbounded_input", "input[0].content[0]"),
        ("web_search_options", "unbounded_tool", "web_search_options"),
    ];
    for (kind, code, param) in expected {
        let refusal = &results[kind];
        assert_eq!(refusal["exception"], "BadRequestError", "{kind}: {refusal}");
        assert_eq!(refusal["status_code"], 400, "{kind}: {refusal}");
        assert_eq!(refusal["code"], code, "{kind}: {refusal}");
        assert_eq!(refusal["body"]["param"], param, "{kind}: {refusal}");
        let event = s.usage_event(request_id(refusal)?).await?;
        assert_eq!(event, Some(("refused".to_owned(), 0, 0)), "{kind}");
    }
    assert!(s.mock.requests().is_empty(), "the provider saw a call Tollgate cannot bound");
    assert_eq!(s.ledger("rich").await?, (0, 0));
    s.app.stop().await
}

/// The admission rule as the official `anthropic` SDK meets it: a document by URL and the
/// server tools web search and code execution are each the SDK's `BadRequestError` carrying
/// our code and naming the field, recorded as refused, and never reach the provider.
async fn anthropic_sdk_gets_calls_tollgate_cannot_bound_refused(db: TestDatabase) -> TestResult {
    let s = crate::proxy::setup(&db, BudgetPolicy::Reject).await?;
    s.budget("rich", 1_000).await?;
    let results = PythonScript::new("anthropic_messages.py")
        .arg("--base-url")
        .arg(s.app.url(""))
        .arg("--customer")
        .arg("rich")
        .arg("--only-unbounded")
        .env("ANTHROPIC_API_KEY", &s.key)
        .run_json()
        .await?;
    let expected = [
        ("document_by_url", "unbounded_input", "messages[0].content[0]"),
        ("web_search", "unbounded_tool", "tools[0]"),
        ("code_execution", "unbounded_tool", "tools[0]"),
    ];
    for (kind, code, field) in expected {
        let refusal = &results[kind];
        assert_eq!(refusal["exception"], "BadRequestError", "{kind}: {refusal}");
        assert_eq!(refusal["status_code"], 400, "{kind}: {refusal}");
        assert_eq!(refusal["body"]["type"], "error", "{kind}: {refusal}");
        assert_eq!(refusal["body"]["error"]["type"], "invalid_request_error", "{kind}: {refusal}");
        assert_eq!(refusal["body"]["error"]["code"], code, "{kind}: {refusal}");
        let message = refusal["body"]["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("`{field}`")), "{kind}: the message must name the field: {message}");
        let event: Option<(String, i64)> = with_db!(&s.app.state.db, pool => sqlx::query_as(
            "SELECT status, billed_nanos FROM usage_events WHERE request_id = $1")
            .bind(request_id(refusal)?).fetch_optional(pool).await)?;
        assert_eq!(event, Some(("refused".to_owned(), 0)), "{kind}");
    }
    assert!(s.mock.requests().is_empty(), "the provider saw a call Tollgate cannot bound");
    assert_eq!(s.ledger("rich").await?, (0, 0));
    s.app.stop().await
}

/// The official `anthropic` SDK on `/v1/messages` (and the `openai` SDK on `/v1/responses`):
/// JSON, streams, raw headers, count_tokens, and refusals as the SDK's status errors.
async fn anthropic_sdk_messages_stream_count_and_surface_refusals(db: TestDatabase) -> TestResult {
    let s = crate::proxy::setup(&db, BudgetPolicy::Reject).await?;
    s.budget("rich", 1_000).await?;
    s.budget("poor", 3).await?;
    let results = PythonScript::new("anthropic_messages.py")
        .arg("--base-url")
        .arg(s.app.url(""))
        .arg("--customer")
        .arg("rich")
        .arg("--poor-customer")
        .arg("poor")
        .env("ANTHROPIC_API_KEY", &s.key)
        .run_json()
        .await?;

    let message = &results["message"];
    assert_eq!(message["text"], "tok ".repeat(5), "{message}");
    assert_eq!(message["output_tokens"], 5, "{message}");
    assert_eq!(message["stop_reason"], "max_tokens", "{message}");
    let stream = &results["stream"];
    assert_eq!(stream["text"], "tok ".repeat(4), "{stream}");
    assert_eq!(stream["output_tokens"], 4, "{stream}");
    let raw = &results["raw"];
    assert_eq!(raw["status"], 200, "{raw}");
    assert_eq!(raw["cost"], "0.002", "{raw}");
    assert_eq!(results["count_tokens"]["input_tokens"], 42, "{}", results["count_tokens"]);
    let responses = &results["responses"];
    assert_eq!(responses["text"], "tok ".repeat(3), "{responses}");
    assert_eq!(responses["streamed"], "tok ".repeat(2), "{responses}");
    assert_eq!(responses["streamed_output_tokens"], 2, "{responses}");

    for refused in [&results["refused"], &results["refused_stream"]] {
        assert_eq!(refused["is_api_status_error"], true, "the SDK's status error: {refused}");
        assert_eq!(refused["status_code"], 402, "{refused}");
        assert_eq!(refused["body"]["type"], "error", "{refused}");
        assert_eq!(refused["body"]["error"]["type"], "insufficient_budget", "{refused}");
        assert_eq!(refused["body"]["error"]["code"], "customer_budget_exceeded", "{refused}");
        assert_eq!(refused["body"]["error"]["remaining"], "0.003", "{refused}");
    }
    assert_eq!(results["bad_key"]["exception"], "AuthenticationError", "{}", results["bad_key"]);

    // The ledger: 5 + 4 + 2 message tokens and 3 + 2 responses tokens, nothing held; two
    // refusals recorded once each (no SDK retry).
    eventually(Duration::from_secs(5), || async { Ok(s.ledger("rich").await? == (16 * 1_000_000, 0)) }).await?;
    assert_eq!(s.ledger("poor").await?, (0, 0));
    assert_eq!(s.events("settled").await?, 5);
    assert_eq!(s.events("refused").await?, 2);
    let (version_sent, credential) = s
        .mock
        .credentials()
        .into_iter()
        .map(|(credential, version)| (version, credential))
        .find(|(version, _)| version.is_some())
        .ok_or_else(|| anyhow::anyhow!("no Anthropic request reached the provider"))?;
    assert_eq!(credential, "sk-ant-mock-upstream");
    assert!(version_sent.is_some_and(|v| !v.is_empty()));
    s.app.stop().await
}

//! The `tollgate` binary as an operator runs it: defaults, bad configuration, `migrate`,
//! `worker`, `admin`, logs and shutdown on SIGTERM.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::{DbCase, PlainCase, TestDatabase, TestResult, eventually};
use crate::{db_cases, plain_cases};

pub fn plain_cases() -> Vec<PlainCase> {
    plain_cases![
        serve_with_no_configuration_creates_sqlite_and_serves,
        json_logs_carry_the_request_id,
        bad_configuration_exits_2_naming_the_setting,
        production_refuses_to_start_without_a_master_key,
    ]
}

pub fn db_cases() -> Vec<DbCase> {
    db_cases![
        migrate_brings_an_empty_database_up_to_date,
        admin_creates_an_organization_from_the_shell,
        admin_stands_up_a_working_project_without_the_browser,
        worker_runs_alone_and_stops_on_sigterm,
    ]
}

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A `tollgate` child process whose stderr (the log) is collected line by line.
struct Process {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

fn command(cwd: &Path, env: &HashMap<String, String>, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(cwd).kill_on_drop(true);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("TOLLGATE_") || k == "RUST_LOG") {
        cmd.env_remove(key);
    }
    cmd.envs(env);
    cmd
}

impl Process {
    fn start(cwd: &Path, env: &HashMap<String, String>, args: &[&str]) -> anyhow::Result<Self> {
        let mut child =
            command(cwd, env, args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
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

    /// Waits for the "listening on http://…" line and returns the base URL.
    async fn base_url(&self) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
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
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "never listened; log:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn terminate(mut self) -> anyhow::Result<(i32, String)> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("already exited"))?;
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        anyhow::ensure!(status.success(), "kill failed");
        let exit = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await??;
        // Let the reader drain the last lines.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok((exit.code().unwrap_or(-1), self.log_text()))
    }
}

/// Runs a command to completion: (exit code, stdout, stderr).
async fn run(
    cwd: &Path,
    env: &HashMap<String, String>,
    args: &[&str],
    stdin: &str,
) -> anyhow::Result<(i32, String, String)> {
    let mut child =
        command(cwd, env, args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn serve_with_no_configuration_creates_sqlite_and_serves() -> TestResult {
    let cwd = tempfile::tempdir()?;
    // Only the port is set (0: any free one); everything else is the default.
    let env = HashMap::from([("TOLLGATE_LISTEN".to_owned(), "127.0.0.1:0".to_owned())]);
    let process = Process::start(cwd.path(), &env, &[])?;
    let base = process.base_url().await?;
    let client = reqwest::Client::new();
    assert_eq!(client.get(format!("{base}/healthz")).send().await?.status(), 200);
    assert_eq!(client.get(format!("{base}/readyz")).send().await?.status(), 200);
    let data = cwd.path().join("data");
    assert!(data.join("tollgate.db").is_file(), "no SQLite database under ./data");
    let key = std::fs::read_to_string(data.join("master.key"))?;
    let (code, log) = process.terminate().await?;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains(key.trim()), "the master key was logged");
    // A clean close checkpoints the WAL into the database file and removes it.
    assert!(!data.join("tollgate.db-wal").exists(), "WAL left behind: pending writes not flushed");
    Ok(())
}

async fn json_logs_carry_the_request_id() -> TestResult {
    let db = tempfile::tempdir()?;
    let env = HashMap::from([
        ("TOLLGATE_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("TOLLGATE_DATA_DIR".to_owned(), db.path().display().to_string()),
        ("TOLLGATE_LOG_FORMAT".to_owned(), "json".to_owned()),
        ("TOLLGATE_WORKERS".to_owned(), "false".to_owned()),
    ]);
    let process = Process::start(db.path(), &env, &[])?;
    let base = process.base_url().await?;
    reqwest::Client::new().get(format!("{base}/healthz")).header("x-request-id", "json-log-test-1").send().await?;
    eventually(Duration::from_secs(5), || {
        let found = process.log_text().contains("json-log-test-1");
        async move { Ok(found) }
    })
    .await?;
    let (code, log) = process.terminate().await?;
    assert_eq!(code, 0, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("json-log-test-1"))
        .ok_or_else(|| anyhow::anyhow!("no line with the request id"))?;
    let parsed: serde_json::Value = serde_json::from_str(line)?;
    assert_eq!(parsed["span"]["request_id"], "json-log-test-1", "{line}");
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line).map_err(|e| anyhow::anyhow!("not JSON: {line}: {e}"))?;
    }
    Ok(())
}

async fn bad_configuration_exits_2_naming_the_setting() -> TestResult {
    let cwd = tempfile::tempdir()?;
    let env = HashMap::from([("TOLLGATE_LISTEN".to_owned(), "port eighty".to_owned())]);
    let (code, _, stderr) = run(cwd.path(), &env, &[], "").await?;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("TOLLGATE_LISTEN"), "{stderr}");

    let file = cwd.path().join("tollgate.toml");
    std::fs::write(&file, "database_url = \"mysql://root:hunter2@db/x\"\n")?;
    let (code, _, stderr) = run(cwd.path(), &HashMap::new(), &["--config", "tollgate.toml", "migrate"], "").await?;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("`database_url` in tollgate.toml"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "a password was printed: {stderr}");
    assert!(!cwd.path().join("data").exists(), "nothing may be created on a configuration error");
    Ok(())
}

async fn production_refuses_to_start_without_a_master_key() -> TestResult {
    let cwd = tempfile::tempdir()?;
    let env = HashMap::from([("TOLLGATE_MODE".to_owned(), "production".to_owned())]);
    let (code, _, stderr) = run(cwd.path(), &env, &[], "").await?;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("TOLLGATE_MASTER_KEY is required in production mode"), "{stderr}");
    Ok(())
}

async fn migrate_brings_an_empty_database_up_to_date(db: TestDatabase) -> TestResult {
    let env = db.env();
    let (code, stdout, stderr) = run(db.dir.path(), &env, &["migrate"], "").await?;
    assert_eq!(code, 0, "{stderr}");
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))?.count();
    assert!(stdout.contains(&format!("is up to date ({shipped} migrations applied)")), "{stdout}");
    let pool = db.connect().await?;
    assert!(pool.pending_migrations().await?.is_empty());
    let (code, stdout, _) = run(db.dir.path(), &env, &["migrate"], "").await?;
    assert_eq!(code, 0);
    assert!(stdout.contains("(0 migrations applied)"), "{stdout}");
    // The job queue's tables exist too.
    let store = tollgate_jobs::JobStore::open(&db.url, tollgate_core::config::SqliteSync::Normal).await?;
    assert_eq!(store.housekeeping_jobs_count().await?, 0);
    Ok(())
}

async fn admin_creates_an_organization_from_the_shell(db: TestDatabase) -> TestResult {
    let env = db.env();
    let args =
        ["admin", "create-org", "--name", "Acme AI", "--owner-email", "ada@example.com", "--owner-password-stdin"];
    let (code, stdout, stderr) = run(db.dir.path(), &env, &args, "correct horse battery\n").await?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("organization org_"), "{stdout}");
    assert!(!stdout.contains("correct horse") && !stderr.contains("correct horse"));

    let (code, stdout, _) = run(db.dir.path(), &env, &["admin", "list-orgs"], "").await?;
    assert_eq!(code, 0);
    assert!(stdout.contains("\tAcme AI\tada@example.com"), "{stdout}");

    let (code, _, stderr) = run(db.dir.path(), &env, &args, "correct horse battery\n").await?;
    assert_eq!(code, 1);
    assert!(stderr.contains("email: an account with this email already exists"), "{stderr}");

    let (code, _, stderr) =
        run(db.dir.path(), &env, &["admin", "create-org", "--name", "X", "--owner-email", "x@example.com"], "").await?;
    assert_eq!(code, 1);
    assert!(stderr.contains("TOLLGATE_OWNER_PASSWORD"), "{stderr}");
    Ok(())
}

async fn worker_runs_alone_and_stops_on_sigterm(db: TestDatabase) -> TestResult {
    let env = db.env();
    let (code, _, stderr) = run(db.dir.path(), &env, &["worker"], "").await?;
    assert_eq!(code, 1, "a worker must refuse an unmigrated database");
    assert!(stderr.contains("tollgate migrate"), "{stderr}");

    let (code, _, stderr) = run(db.dir.path(), &env, &["migrate"], "").await?;
    assert_eq!(code, 0, "{stderr}");
    let process = Process::start(db.dir.path(), &env, &["worker"])?;
    let pool = db.connect().await?;
    eventually(Duration::from_secs(15), || async {
        Ok(tollgate_jobs::housekeeping::newest_heartbeat_age_ms(&pool).await?.is_some())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", process.log_text()))?;
    let (code, log) = process.terminate().await?;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("job workers stopped"), "{log}");
    Ok(())
}

async fn admin_stands_up_a_working_project_without_the_browser(db: TestDatabase) -> TestResult {
    let env = db.env();
    let dir = db.dir.path();
    let created = |stdout: &str, prefix: &str| {
        stdout
            .split_whitespace()
            .find(|w| w.starts_with(prefix))
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no {prefix} in {stdout}"))
    };
    let args = ["admin", "create-org", "--name", "Acme", "--owner-email", "ada@example.com", "--owner-password-stdin"];
    let (code, stdout, stderr) = run(dir, &env, &args, "correct horse battery\n").await?;
    assert_eq!(code, 0, "{stderr}");
    let org = created(&stdout, "org_")?;
    let args =
        ["admin", "create-project", "--org", &org, "--name", "Chat", "--policy", "reject", "--default-budget", "1.00"];
    let (code, stdout, stderr) = run(dir, &env, &args, "").await?;
    assert_eq!(code, 0, "{stderr}");
    let project = created(&stdout, "prj_")?;
    let mock = crate::mock_provider::MockProvider::start().await?;
    let base = mock.base_url();
    let args = [
        "admin",
        "add-provider",
        "--project",
        &project,
        "--kind",
        "openai_compatible",
        "--base-url",
        &base,
        "--models",
        "gpt-4o-mini",
        "--api-key-stdin",
    ];
    let (code, _, stderr) = run(dir, &env, &args, "sk-upstream-secret\n").await?;
    assert_eq!(code, 0, "{stderr}");
    let (code, key, stderr) = run(dir, &env, &["admin", "create-key", "--project", &project], "").await?;
    assert_eq!(code, 0, "{stderr}");
    let key = key.trim().to_owned();
    assert!(key.starts_with("tg_sk_"), "{key}");
    let args =
        ["admin", "set-budget", "--project", &project, "--customer", "cust-9", "--amount", "2.50", "--period", "day"];
    let (code, stdout, stderr) = run(dir, &env, &args, "").await?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("budget 2.50 per day"), "{stdout}");
    let (code, _, stderr) =
        run(dir, &env, &["admin", "set-budget", "--project", &project, "--customer", "x", "--amount=-1"], "").await?;
    assert_eq!(code, 1);
    assert!(stderr.contains("--amount"), "{stderr}");

    // The project works: the key authenticates, the provider is called with its own key.
    let app = crate::helpers::spawn_app(&db).await?;
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-tollgate-customer", "cust-9")
        .json(&serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await?;
    assert_eq!(response.status(), 200, "{}", response.text().await?);
    assert_eq!(mock.requests().len(), 1);
    app.stop().await
}

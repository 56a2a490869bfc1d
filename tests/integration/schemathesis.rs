//! Schemathesis against the management API: the OpenAPI document Tollgate serves is the
//! contract. Schemathesis (pinned in `tests/python/requirements.txt`, run from the tests' venv)
//! reads `/api/v1/openapi.json`, generates requests from it (its examples, boundary values,
//! random data, and stateful sequences that follow links between operations), and checks every
//! answer: no 5xx, status code, content type, headers and body as documented, schema-breaking
//! requests refused, auth enforced. Any failure fails the test, with schemathesis's report.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tollgate::routes::api::openapi::SECURITY_SCHEME;
use tollgate_core::projects::BudgetPolicy;

use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult};
use crate::proxy::setup_with;

pub fn cases() -> Vec<DbCase> {
    db_cases![the_management_api_keeps_to_its_openapi_document]
}

/// Test cases per operation and phase; with a fixed seed the run is reproducible, and it takes
/// about 10 s.
const MAX_EXAMPLES: &str = "25";
const SEED: &str = "20261122";
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// Every check but `positive_data_acceptance`, which expects any request the schema allows to
/// succeed: some rules span fields or state and are not expressible in a schema (`budget` is
/// required only when the customer does not exist yet, `from` must be within 366 days of `to`,
/// a cursor must be one the API gave out), so those requests rightly get 422.
const CHECKS: [&str; 4] = ["--checks", "all", "--exclude-checks", "positive_data_acceptance"];

async fn the_management_api_keeps_to_its_openapi_document(db: TestDatabase) -> TestResult {
    // No rate limit in the way: schemathesis sends a few hundred requests a second.
    let s = setup_with(&db, BudgetPolicy::Clamp, |env| {
        env.insert("TOLLGATE_API_RATE_PER_SECOND".into(), "1000000".into());
    })
    .await?;
    // Something to read: a customer with usage (so the usage export has rows), and one more.
    s.api(reqwest::Method::POST, "/api/v1/customers", Some(json!({"id": "seeded", "budget": "5", "name": "Ada"})))
        .await?;
    s.api(reqwest::Method::POST, "/api/v1/customers", Some(json!({"id": "a,b", "budget": "1"}))).await?;
    let hello = json!({"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    assert!(s.chat("seeded", hello).await?.status().is_success());

    let python = crate::python::interpreter().await?;
    let schemathesis = python.with_file_name("schemathesis");
    let work = tempfile::tempdir()?;
    // The key goes through the security scheme (not a plain header) so that schemathesis knows
    // it is the auth, and can check that requests without it are refused.
    let config = work.path().join("schemathesis.toml");
    std::fs::write(&config, format!("[auth.openapi.{SECURITY_SCHEME}]\nbearer = \"${{TOLLGATE_TEST_KEY}}\"\n"))?;
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/schemathesis_hooks.py");
    let mut command = tokio::process::Command::new(&schemathesis);
    command
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(s.app.url("/api/v1/openapi.json"))
        .args(CHECKS)
        .args(["--max-examples", MAX_EXAMPLES, "--seed", SEED, "--generation-database", "none", "--no-color"])
        .env("TOLLGATE_TEST_KEY", &s.key)
        .env("SCHEMATHESIS_HOOKS", &hooks)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(work.path())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let started = Instant::now();
    let output = tokio::time::timeout(RUN_TIMEOUT, command.output())
        .await
        .with_context(|| format!("schemathesis still running after {RUN_TIMEOUT:?}"))?
        .with_context(|| format!("could not start {}", schemathesis.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    anyhow::ensure!(
        output.status.success(),
        "schemathesis found problems ({}):\n{}\n{}",
        output.status,
        stdout.trim_end(),
        stderr.trim_end()
    );
    // It must really have tested every operation (an empty document would pass too).
    let document = serde_json::to_value(tollgate::routes::api::openapi::document())?;
    let operations: usize = document["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, item)| {
            item.as_object()
                .into_iter()
                .flatten()
                .filter(|(method, _)| ["get", "post", "patch", "delete", "put"].contains(&method.as_str()))
                .count()
        })
        .sum();
    assert!(operations >= 13, "{document}");
    let tested = stdout.lines().find(|l| l.trim_start().starts_with("Tested:")).unwrap_or_default().trim();
    assert_eq!(tested, format!("Tested: {operations}"), "{stdout}");
    let cases = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.contains(" generated"))
        .unwrap_or_default();
    eprintln!("    schemathesis: {cases}; {operations} operations; {:.1} s", started.elapsed().as_secs_f64());
    s.app.stop().await
}

//! The test harness: a fresh database per test, `spawn_app` to start the real server on
//! port 0, and a typed client.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use libtest_mimic::{Failed, Trial};
use tokio_util::sync::CancellationToken;
use tollgate::Application;
use tollgate::state::AppState;
use tollgate_core::Config;
use tollgate_core::crypto::MasterKey;
use tollgate_core::db::Backend;

pub type TestResult = anyhow::Result<()>;
type BoxFut = Pin<Box<dyn Future<Output = TestResult> + Send>>;

/// A test that runs once per database backend.
pub struct DbCase {
    pub name: &'static str,
    pub run: fn(TestDatabase) -> BoxFut,
}

/// A test that needs no database of its own.
pub struct PlainCase {
    pub name: &'static str,
    pub run: fn() -> BoxFut,
}

/// `db_cases![a, b]`: registers async fns `a(db: TestDatabase)`, `b(…)` as database tests.
#[macro_export]
macro_rules! db_cases {
    ($($f:ident),* $(,)?) => {
        vec![$($crate::helpers::DbCase { name: concat!(module_path!(), "::", stringify!($f)), run: |db| Box::pin($f(db)) }),*]
    };
}

/// `plain_cases![a, b]`: registers async fns without arguments.
#[macro_export]
macro_rules! plain_cases {
    ($($f:ident),* $(,)?) => {
        vec![$($crate::helpers::PlainCase { name: concat!(module_path!(), "::", stringify!($f)), run: || Box::pin($f()) }),*]
    };
}

pub fn postgres_admin_url() -> Option<String> {
    std::env::var("TOLLGATE_TEST_POSTGRES_URL").ok().filter(|u| !u.trim().is_empty())
}

fn test_name(module_path: &str) -> String {
    module_path.trim_start_matches("integration::").to_owned()
}

pub fn db_trials(cases: Vec<DbCase>, postgres: Option<String>) -> Vec<Trial> {
    let mut trials = Vec::new();
    for case in cases {
        let name = test_name(case.name);
        let run = case.run;
        trials.push(Trial::test(format!("{name}::sqlite"), move || {
            run_in_runtime(async move {
                let db = TestDatabase::sqlite()?;
                run(db).await
            })
        }));
        let pg = postgres.clone();
        let trial = Trial::test(format!("{name}::postgres"), move || {
            let Some(admin_url) = pg else {
                return Ok(());
            };
            run_in_runtime(async move {
                let db = TestDatabase::postgres(&admin_url).await?;
                let name = db.pg_name.clone();
                let result = run(db).await;
                drop_postgres_database(&admin_url, name.as_deref()).await;
                result
            })
        });
        trials.push(trial.with_ignored_flag(postgres.is_none()));
    }
    trials
}

pub fn plain_trials(cases: Vec<PlainCase>) -> Vec<Trial> {
    cases
        .into_iter()
        .map(|case| {
            let run = case.run;
            Trial::test(test_name(case.name), move || run_in_runtime(run()))
        })
        .collect()
}

fn run_in_runtime(test: impl Future<Output = TestResult>) -> Result<(), Failed> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(format!("runtime: {e}")))?;
    let result = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(120), test).await });
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Failed::from(format!("{e:?}"))),
        Err(_) => Err(Failed::from("timed out after 120 s")),
    }
}

/// A database of the test's own, plus a scratch directory (the data directory).
pub struct TestDatabase {
    #[allow(dead_code)] // for tests that must differ per backend
    pub backend: Backend,
    pub url: String,
    pub dir: tempfile::TempDir,
    pg_name: Option<String>,
    /// One key per test database, so every process of a test can open what another sealed.
    master_key: String,
}

impl TestDatabase {
    pub fn sqlite() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
        Ok(Self { backend: Backend::Sqlite, url, dir, pg_name: None, master_key: MasterKey::generate().to_base64() })
    }

    async fn postgres(admin_url: &str) -> anyhow::Result<Self> {
        use sqlx::Connection;
        let name = format!("tollgate_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await?;
        conn.close().await?;
        Ok(Self {
            backend: Backend::Postgres,
            url: with_database(admin_url, &name),
            dir: tempfile::tempdir()?,
            pg_name: Some(name),
            master_key: MasterKey::generate().to_base64(),
        })
    }

    /// Environment for a Tollgate process (or in-process config) on this database.
    pub fn env(&self) -> HashMap<String, String> {
        HashMap::from([
            ("TOLLGATE_DATABASE_URL".to_owned(), self.url.clone()),
            ("TOLLGATE_DATA_DIR".to_owned(), self.dir.path().display().to_string()),
            ("TOLLGATE_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
            ("TOLLGATE_MASTER_KEY".to_owned(), self.master_key.clone()),
            ("TOLLGATE_SHUTDOWN_GRACE_SECONDS".to_owned(), "5".to_owned()),
            ("TOLLGATE_WORKERS".to_owned(), "false".to_owned()),
            // No test reaches the real Stripe: a closed port unless a test brings the fake.
            ("TOLLGATE_STRIPE_API_BASE".to_owned(), "http://127.0.0.1:9".to_owned()),
            // A test machine's disk need not survive power loss.
            ("TOLLGATE_SQLITE_SYNCHRONOUS".to_owned(), "normal".to_owned()),
            // Mock providers and receivers listen on loopback, which the egress policy refuses
            // unless allowed; tests of the policy remove this.
            ("TOLLGATE_EGRESS_ALLOW".to_owned(), "127.0.0.0/8,::1".to_owned()),
        ])
    }

    /// A connection pool of the test's own on this database.
    pub async fn connect(&self) -> anyhow::Result<tollgate_core::Db> {
        Ok(tollgate_core::Db::connect_url(&self.url, &Default::default()).await?)
    }
}

/// Replaces the database name in a PostgreSQL URL.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let prefix = match base[authority_end..].find('/') {
        Some(i) => &base[..authority_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

async fn drop_postgres_database(admin_url: &str, name: Option<&str>) {
    use sqlx::Connection;
    let Some(name) = name else { return };
    match sqlx::PgConnection::connect(admin_url).await {
        Ok(mut conn) => {
            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await {
                eprintln!("warning: could not drop test database {name}: {e}");
            }
            let _ = conn.close().await;
        }
        Err(e) => eprintln!("warning: could not drop test database {name}: {e}"),
    }
}

/// A running Tollgate on port 0, stopped when dropped.
pub struct TestApp {
    pub addr: SocketAddr,
    pub state: AppState,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Starts the real server on `db`, without background workers.
pub async fn spawn_app(db: &TestDatabase) -> anyhow::Result<TestApp> {
    spawn_app_with(db, |_| {}).await
}

/// Starts the real server on `db` after `customize` adjusted its environment.
pub async fn spawn_app_with(
    db: &TestDatabase,
    customize: impl FnOnce(&mut HashMap<String, String>),
) -> anyhow::Result<TestApp> {
    let mut env = db.env();
    customize(&mut env);
    let config = Config::load(None, &env)?;
    tollgate::telemetry::init_logs(config.log_format, &std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".to_owned()));
    let app = Application::build(config).await?;
    let addr = app.local_addr();
    let state = app.state().clone();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    Ok(TestApp { addr, state, client, shutdown, server: Some(server) })
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self.client.get(self.url(path)).send().await?)
    }

    /// Requests a graceful shutdown and waits for the server to finish it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.await??;
        }
        Ok(())
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

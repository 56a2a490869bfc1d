//! The job queues. apalis keeps them in the application's own database: on SQLite in its
//! own small pool opened with the application's connection settings (we run apalis's
//! migrations ourselves instead of its `setup`, which would turn `synchronous` off on a
//! connection), on PostgreSQL in the `apalis` schema.

use apalis::prelude::{TaskBuilder, TaskSink};
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;
use std::str::FromStr;
use std::time::Duration;
use tollgate_core::config::{SqliteSync, redact_url};
use tollgate_core::db::sqlite_options;

use crate::alerts::AlertDelivery;
use crate::housekeeping::Housekeeping;

const HOUSEKEEPING_QUEUE: &str = "tollgate.housekeeping";
const ALERTS_QUEUE: &str = "tollgate.alerts";

#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    #[error("cannot open the job queue database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("setting up the job queue tables failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("pushing a job failed: {0}")]
    Push(String),
    #[error("setting up the job queue tables: {0}")]
    Lock(#[from] tollgate_core::db::DbError),
}

/// The queues of one database. Cheap to clone; every clone pushes to the same queues.
#[derive(Clone)]
pub enum JobStore {
    Sqlite { pool: sqlx::SqlitePool, housekeeping: SqliteStorage<Housekeeping>, alerts: SqliteStorage<AlertDelivery> },
    Postgres { pool: sqlx::PgPool, housekeeping: PostgresStorage<Housekeeping>, alerts: PostgresStorage<AlertDelivery> },
}

/// How often a queue's consumer beats its heartbeat in the queue (apalis' default: 30 s).
/// Measured on a loaded machine (PostgreSQL, apalis 1.0): a consumer sometimes stopped
/// fetching between heartbeats, so a job due at once (an alert's first attempt, a 1 s retry)
/// waited 26–28 s for the next beat, which always fetched it. A beat every 2 s bounds that
/// stall to 2 s, for one small query per consumer and beat. (A consumer whose beats stop for
/// ten of them — its process died — has the jobs it had locked queued again after 20 s.)
const QUEUE_HEARTBEAT: Duration = Duration::from_secs(2);

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobStore::Sqlite { .. } => f.write_str("JobStore::Sqlite"),
            JobStore::Postgres { .. } => f.write_str("JobStore::Postgres"),
        }
    }
}

impl JobStore {
    /// Opens the queues in the database at `url` and brings their tables up to date.
    pub async fn open(url: &str, sqlite_sync: SqliteSync) -> Result<Self, JobStoreError> {
        let connect_err = |source| JobStoreError::Connect { url: redact_url(url), source };
        if url.starts_with("sqlite:") {
            let sync = match sqlite_sync {
                SqliteSync::Full => sqlx::sqlite::SqliteSynchronous::Full,
                SqliteSync::Normal => sqlx::sqlite::SqliteSynchronous::Normal,
            };
            let options = sqlite_options(url).map_err(connect_err)?.synchronous(sync);
            let pool = SqlitePoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(connect_err)?;
            let _lock = tollgate_core::db::lock_sqlite_migrations(pool.connect_options().get_filename()).await?;
            SqliteStorage::<()>::migrations().run(&pool).await?;
            let config = |queue| apalis_sqlite::Config::default().queue(queue).heartbeat_interval(QUEUE_HEARTBEAT);
            Ok(JobStore::Sqlite {
                housekeeping: SqliteStorage::new(&pool).with_config(config(HOUSEKEEPING_QUEUE)),
                alerts: SqliteStorage::new(&pool).with_config(config(ALERTS_QUEUE)),
                pool,
            })
        } else {
            let options = sqlx::postgres::PgConnectOptions::from_str(url).map_err(connect_err)?;
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(connect_err)?;
            PostgresStorage::<()>::migrations().run(&pool).await?;
            let config = |queue| apalis_postgres::Config::default().queue(queue).heartbeat_interval(QUEUE_HEARTBEAT);
            Ok(JobStore::Postgres {
                housekeeping: PostgresStorage::new(&pool).with_config(config(HOUSEKEEPING_QUEUE)),
                alerts: PostgresStorage::new(&pool).with_config(config(ALERTS_QUEUE)),
                pool,
            })
        }
    }

    /// Closes the queue's connections (after the workers have stopped).
    pub async fn close(&self) {
        match self {
            JobStore::Sqlite { pool, .. } => pool.close().await,
            JobStore::Postgres { pool, .. } => pool.close().await,
        }
    }

    /// Jobs of any state in the housekeeping queue (for tests and diagnostics).
    pub async fn housekeeping_jobs_count(&self) -> Result<i64, sqlx::Error> {
        match self {
            JobStore::Sqlite { pool, .. } => {
                sqlx::query_scalar("SELECT COUNT(*) FROM Jobs WHERE job_type = $1")
                    .bind(HOUSEKEEPING_QUEUE)
                    .fetch_one(pool)
                    .await
            }
            JobStore::Postgres { pool, .. } => {
                sqlx::query_scalar("SELECT COUNT(*) FROM apalis.jobs WHERE job_type = $1")
                    .bind(HOUSEKEEPING_QUEUE)
                    .fetch_one(pool)
                    .await
            }
        }
    }

    /// Queues a housekeeping run. With an `idempotency_key`, a second push with the same key
    /// (from another replica, for the same minute) is a no-op.
    pub async fn push_housekeeping(
        &self,
        job: Housekeeping,
        idempotency_key: Option<String>,
    ) -> Result<(), JobStoreError> {
        let mut builder = TaskBuilder::new(job).max_attempts(5);
        if let Some(key) = idempotency_key {
            builder = builder.idempotency_key(key);
        }
        let task = builder.build();
        let result = match self {
            JobStore::Sqlite { housekeeping, .. } => {
                housekeeping.clone().push_task(task).await.map_err(|e| e.to_string())
            }
            JobStore::Postgres { housekeeping, .. } => {
                housekeeping.clone().push_task(task).await.map_err(|e| e.to_string())
            }
        };
        already_queued_is_ok(result)
    }

    /// Queues one attempt of an alert delivery, after `delay` if given. The idempotency key
    /// defaults to the delivery and its attempt count, so one attempt is queued once.
    pub async fn push_alert_delivery(
        &self,
        job: AlertDelivery,
        delay: Option<Duration>,
        idempotency_key: Option<String>,
    ) -> Result<(), JobStoreError> {
        let key = idempotency_key.unwrap_or_else(|| format!("alert-delivery:{}:{}", job.delivery, job.attempts));
        let mut builder = TaskBuilder::new(job).max_attempts(3).idempotency_key(key);
        if let Some(delay) = delay {
            builder = builder.run_after(delay);
        }
        let task = builder.build();
        let result = match self {
            JobStore::Sqlite { alerts, .. } => alerts.clone().push_task(task).await.map_err(|e| e.to_string()),
            JobStore::Postgres { alerts, .. } => alerts.clone().push_task(task).await.map_err(|e| e.to_string()),
        };
        already_queued_is_ok(result)
    }
}

fn already_queued_is_ok(result: Result<(), String>) -> Result<(), JobStoreError> {
    match result {
        Ok(()) => Ok(()),
        // PostgreSQL refuses a duplicate idempotency key; SQLite ignores it. Both mean "already queued".
        Err(e) if e.contains("duplicate key") || e.contains("unique") => Ok(()),
        Err(e) => Err(JobStoreError::Push(e)),
    }
}

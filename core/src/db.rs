//! The database handle: SQLite (embedded default) or PostgreSQL (production, several
//! replicas), behind one [`Db`] value. Queries are written once in SQL both accept
//! (`$1` placeholders, `RETURNING`, `ON CONFLICT`, integer milliseconds for time) and run
//! on either pool through [`with_db!`](crate::with_db).
//!
//! Our migrations keep their history in `tollgate_migrations`, apart from the job queue's
//! own, so the two migrators never mistake each other's entries for missing ones.

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use crate::config::{Config, SqliteSync, redact_url};

pub const MIGRATIONS_TABLE: &str = "tollgate_migrations";

/// A pool on one of the two supported databases. Cloning is cheap (pools are shared).
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs `$body` with `$pool` bound to the concrete pool, once per backend. The body is
/// compiled for both, so one SQL text serves both databases.
#[macro_export]
macro_rules! with_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($pool) => $body,
            $crate::db::Db::Postgres($pool) => $body,
        }
    };
}

/// Holds an exclusive lock on `<database file>.migrate-lock` until dropped, so that processes
/// starting together on one SQLite file migrate one after the other (SQLite's migrator has no
/// lock of its own). None for an in-memory database.
pub async fn lock_sqlite_migrations(database: &std::path::Path) -> Result<Option<std::fs::File>, DbError> {
    let name = database.as_os_str();
    if name.is_empty() || name == ":memory:" {
        return Ok(None);
    }
    let mut path = name.to_owned();
    path.push(".migrate-lock");
    let shown = std::path::PathBuf::from(&path).display().to_string();
    let locked = tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        file.lock()?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))
    .and_then(|r| r);
    locked.map(Some).map_err(|source| DbError::Lock { path: shown, source })
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("cannot create the database directory {path}: {source}")]
    Directory { path: String, source: std::io::Error },
    #[error("cannot create or restrict the database file {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot take the migration lock {path}: {source}")]
    Lock { path: String, source: std::io::Error },
    #[error(transparent)]
    Query(#[from] sqlx::Error),
    /// The ledger's writers have stopped: nothing can be reserved or settled.
    #[error("the ledger's writers have stopped")]
    Ledger,
    /// A commit could not be made durable (the fsync of the database's log failed).
    #[error("could not make a commit durable: {0}")]
    Durability(String),
}

impl DbError {
    /// Whether the statement failed before it could commit because another writer held a lock
    /// (SQLite busy or locked; PostgreSQL serialization failure, deadlock, lock timeout): the
    /// transaction rolled back, so it can be tried again without doing anything twice.
    pub fn is_lock_contention(&self) -> bool {
        let DbError::Query(sqlx::Error::Database(e)) = self else { return false };
        matches!(e.code().as_deref(), Some("5" | "6" | "261" | "262" | "517" | "773" | "40001" | "40P01" | "55P03"))
    }
}

/// Settings for opening a pool, taken from [`Config`] or given directly (tests, tools).
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub sqlite_synchronous: SqliteSync,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self { max_connections: 10, sqlite_synchronous: SqliteSync::Full }
    }
}

impl Db {
    pub async fn connect(config: &Config) -> Result<Self, DbError> {
        let settings = PoolSettings {
            max_connections: config.database_max_connections,
            sqlite_synchronous: config.sqlite_synchronous,
        };
        Self::connect_url(config.database_url.expose_secret(), &settings).await
    }

    pub async fn connect_url(url: &str, settings: &PoolSettings) -> Result<Self, DbError> {
        let connect_err = |source| DbError::Connect { url: redact_url(url), source };
        if url.starts_with("sqlite:") {
            let options = sqlite_options(url).map_err(connect_err)?;
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            if !in_memory {
                ensure_parent_dir(options.get_filename())?;
                ensure_private_file(options.get_filename())?;
            }
            let sync = match settings.sqlite_synchronous {
                SqliteSync::Full => SqliteSynchronous::Full,
                SqliteSync::Normal => SqliteSynchronous::Normal,
            };
            // Processes opening a new file at once would race to switch it to WAL (which
            // fails with "database is locked" rather than waiting): open it under the lock.
            let _lock = if in_memory { None } else { lock_sqlite_migrations(options.get_filename()).await? };
            let pool = SqlitePoolOptions::new()
                // An in-memory database exists once per connection: keep exactly one.
                .max_connections(if in_memory { 1 } else { settings.max_connections })
                .min_connections(if in_memory { 1 } else { 0 })
                .idle_timeout(if in_memory { None } else { Some(Duration::from_secs(600)) })
                .max_lifetime(if in_memory { None } else { Some(Duration::from_secs(1800)) })
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options.synchronous(sync))
                .await
                .map_err(connect_err)?;
            Ok(Db::Sqlite(pool))
        } else {
            let options = PgConnectOptions::from_str(url).map_err(connect_err)?;
            let pool = PgPoolOptions::new()
                .max_connections(settings.max_connections)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(connect_err)?;
            Ok(Db::Postgres(pool))
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    fn migrator(&self) -> Migrator {
        let mut migrator = match self {
            Db::Sqlite(_) => sqlx::migrate!("../migrations/sqlite"),
            Db::Postgres(_) => sqlx::migrate!("../migrations/postgres"),
        };
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator
    }

    /// Applies every migration not yet applied. Safe to run concurrently from several
    /// processes: PostgreSQL's migrator takes an advisory lock; on SQLite a lock file beside
    /// the database serialises them.
    pub async fn migrate(&self) -> Result<(), DbError> {
        let migrator = self.migrator();
        let _lock = match self {
            Db::Sqlite(pool) => lock_sqlite_migrations(pool.connect_options().get_filename()).await?,
            Db::Postgres(_) => None,
        };
        with_db!(self, pool => migrator.run(pool).await)?;
        Ok(())
    }

    /// Applies the migrations up to version `last` only: upgrade tests build yesterday's
    /// database with it, fill it, then [`Db::migrate`] the rest.
    pub async fn migrate_until(&self, last: i64) -> Result<(), DbError> {
        let mut migrator = self.migrator();
        // sqlx offers no public filter; its `migrations` field is public for `migrate!()`.
        let kept: Vec<_> = migrator.iter().filter(|m| m.version <= last).cloned().collect();
        migrator.migrations = std::borrow::Cow::Owned(kept);
        migrator.set_ignore_missing(true);
        with_db!(self, pool => migrator.run(pool).await)?;
        Ok(())
    }

    /// Versions this binary knows that the database has not applied successfully.
    pub async fn pending_migrations(&self) -> Result<Vec<i64>, DbError> {
        let migrator = self.migrator();
        const SQL: &str = "SELECT version FROM tollgate_migrations WHERE success = TRUE";
        let applied: Vec<i64> = match with_db!(self, pool => sqlx::query_scalar::<_, i64>(SQL).fetch_all(pool).await) {
            Ok(v) => v,
            // No history table at all: nothing applied yet.
            Err(sqlx::Error::Database(e)) if is_undefined_table(e.message()) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        Ok(migrator.iter().map(|m| m.version).filter(|v| !applied.contains(v)).collect())
    }

    /// One round trip, to prove the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        with_db!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Waits for checked-out connections to return, then closes the pool. SQLite
    /// checkpoints its WAL when the last connection closes.
    pub async fn close(&self) {
        with_db!(self, pool => pool.close().await)
    }
}

fn is_undefined_table(message: &str) -> bool {
    message.contains("no such table") || (message.contains("relation") && message.contains("does not exist"))
}

/// SQLite as an application database: WAL (readers never block the writer), a busy
/// timeout instead of instant `SQLITE_BUSY`, foreign keys enforced.
pub fn sqlite_options(url: &str) -> Result<SqliteConnectOptions, sqlx::Error> {
    Ok(SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true))
}

fn ensure_parent_dir(path: &std::path::Path) -> Result<(), DbError> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir)
            .map_err(|source| DbError::Directory { path: dir.display().to_string(), source }),
        _ => Ok(()),
    }
}

/// Creates the database file readable by its owner only, or takes group and world access
/// away from an existing one. SQLite gives its `-wal` and `-shm` files the database file's
/// permissions, so they follow.
#[cfg(unix)]
fn ensure_private_file(path: &std::path::Path) -> Result<(), DbError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| DbError::File { path: path.display().to_string(), source };
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mode = std::fs::metadata(path).map_err(err)?.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700)).map_err(err)?;
                tracing::warn!(path = %path.display(), "the database file was readable by others; it is now owner-only");
            }
            Ok(())
        }
        Err(e) => Err(err(e)),
    }
}

#[cfg(not(unix))]
fn ensure_private_file(_path: &std::path::Path) -> Result<(), DbError> {
    Ok(())
}

/// Whether an error is a unique-constraint violation (a duplicate).
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.is_unique_violation())
}

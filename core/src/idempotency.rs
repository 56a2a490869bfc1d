//! Idempotency keys of the management API: the first request with a key claims it, its
//! answer is stored, and a retry of the same request gets that answer again instead of doing
//! the work twice. Another request with the same key is refused, as is a retry while the
//! first is still running. Keys are kept a day. The stored answer may hold a secret (a new
//! key, a customer token), so it is sealed under the master key, bound to its project and key.

use crate::crypto::{MasterKey, SealedFor};
use crate::db::{Db, DbError};
use crate::ids::ProjectId;
use crate::time::UnixMillis;
use crate::with_db;

pub const KEEP_SECS: i64 = 24 * 3600;

/// What a key has seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// New: this request does the work, then [`complete`]s (or [`abandon`]s) the key.
    Claimed,
    /// The same request was answered before: replay this.
    Replay { status: u16, content_type: Option<String>, body: String },
    /// The first request with this key is still running.
    InProgress,
    /// The key was used for a different request.
    Mismatch,
}

#[derive(sqlx::FromRow)]
struct Row {
    request_hash: String,
    status_code: Option<i64>,
    content_type: Option<String>,
    response_body: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Query(#[from] sqlx::Error),
    /// The stored answer does not open with this master key for this project and key.
    #[error("the stored answer of this Idempotency-Key cannot be decrypted")]
    Sealed,
}

pub async fn claim(
    db: &Db,
    master: &MasterKey,
    project: &ProjectId,
    key: &str,
    request_hash: &str,
) -> Result<Claim, IdempotencyError> {
    const INSERT: &str = "INSERT INTO idempotency_keys (project_id, idem_key, request_hash, created_at) \
                          VALUES ($1, $2, $3, $4) ON CONFLICT (project_id, idem_key) DO NOTHING";
    let now = UnixMillis::now();
    // A key older than a day is free again.
    const EXPIRE: &str = "DELETE FROM idempotency_keys WHERE project_id = $1 AND idem_key = $2 AND created_at <= $3";
    with_db!(db, pool => sqlx::query(EXPIRE).bind(project).bind(key).bind(now.plus_secs(-KEEP_SECS).0)
        .execute(pool).await.map(|_| ()))?;
    let inserted = with_db!(db, pool => sqlx::query(INSERT).bind(project).bind(key).bind(request_hash).bind(now.0)
        .execute(pool).await.map(|r| r.rows_affected()))?;
    if inserted == 1 {
        return Ok(Claim::Claimed);
    }
    const SELECT: &str = "SELECT request_hash, status_code, content_type, response_body FROM idempotency_keys \
                          WHERE project_id = $1 AND idem_key = $2";
    let row =
        with_db!(db, pool => sqlx::query_as::<_, Row>(SELECT).bind(project).bind(key).fetch_optional(pool).await)?;
    Ok(match row {
        None => Claim::InProgress,
        Some(r) if r.request_hash != request_hash => Claim::Mismatch,
        Some(Row { status_code: Some(status), content_type, response_body, .. }) => Claim::Replay {
            status: u16::try_from(status).unwrap_or(200),
            content_type,
            body: match response_body {
                Some(sealed) => master
                    .open(&sealed, &SealedFor::idempotent_response(project, key))
                    .map_err(|_| IdempotencyError::Sealed)?,
                None => String::new(),
            },
        },
        Some(_) => Claim::InProgress,
    })
}

/// Stores the answer of a claimed key, sealed.
pub async fn complete(
    db: &Db,
    master: &MasterKey,
    project: &ProjectId,
    key: &str,
    status: u16,
    content_type: Option<&str>,
    body: &str,
) -> Result<(), DbError> {
    const SQL: &str = "UPDATE idempotency_keys SET status_code = $1, content_type = $2, response_body = $3 \
                       WHERE project_id = $4 AND idem_key = $5";
    let sealed = master.seal(body, &SealedFor::idempotent_response(project, key));
    with_db!(db, pool => sqlx::query(SQL).bind(i64::from(status)).bind(content_type).bind(&sealed).bind(project).bind(key)
        .execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// Frees a claimed key whose request failed in a way worth retrying (a server error).
pub async fn abandon(db: &Db, project: &ProjectId, key: &str) -> Result<(), DbError> {
    const SQL: &str = "DELETE FROM idempotency_keys WHERE project_id = $1 AND idem_key = $2 AND status_code IS NULL";
    with_db!(db, pool => sqlx::query(SQL).bind(project).bind(key).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// Removes keys older than a day (housekeeping).
pub async fn prune(db: &Db, now: UnixMillis) -> Result<u64, DbError> {
    const SQL: &str = "DELETE FROM idempotency_keys WHERE created_at <= $1";
    Ok(with_db!(db, pool => sqlx::query(SQL).bind(now.plus_secs(-KEEP_SECS).0).execute(pool).await
        .map(|r| r.rows_affected()))?)
}

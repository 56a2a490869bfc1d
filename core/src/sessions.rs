//! Browser sessions of the dashboard, stored in the database under the SHA-256 of their id
//! (the id itself is the bearer secret in the cookie, so it is never stored).

use sha2::{Digest, Sha256};

use crate::db::{Db, DbError};
use crate::time::UnixMillis;
use crate::with_db;

fn id_hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// Inserts a new session; false if the id is taken (a collision: the caller picks another).
pub async fn create(db: &Db, id: &str, data: &str, expires_at: UnixMillis) -> Result<bool, DbError> {
    const SQL: &str =
        "INSERT INTO sessions (id_hash, data, expires_at) VALUES ($1, $2, $3) ON CONFLICT (id_hash) DO NOTHING";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(id_hash(id)).bind(data).bind(expires_at.0).execute(pool).await
        .map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

/// Writes a session, creating it if needed.
pub async fn save(db: &Db, id: &str, data: &str, expires_at: UnixMillis) -> Result<(), DbError> {
    const SQL: &str = "INSERT INTO sessions (id_hash, data, expires_at) VALUES ($1, $2, $3) \
                       ON CONFLICT (id_hash) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at";
    with_db!(db, pool => sqlx::query(SQL).bind(id_hash(id)).bind(data).bind(expires_at.0).execute(pool).await
        .map(|_| ()))?;
    Ok(())
}

/// A live session's data and expiry.
pub async fn load(db: &Db, id: &str, now: UnixMillis) -> Result<Option<(String, UnixMillis)>, DbError> {
    const SQL: &str = "SELECT data, expires_at FROM sessions WHERE id_hash = $1 AND expires_at > $2";
    let row: Option<(String, i64)> = with_db!(db, pool => sqlx::query_as(SQL).bind(id_hash(id)).bind(now.0)
        .fetch_optional(pool).await)?;
    Ok(row.map(|(data, expires)| (data, UnixMillis(expires))))
}

pub async fn delete(db: &Db, id: &str) -> Result<(), DbError> {
    with_db!(db, pool => sqlx::query("DELETE FROM sessions WHERE id_hash = $1").bind(id_hash(id)).execute(pool).await
        .map(|_| ()))?;
    Ok(())
}

/// Removes expired sessions (housekeeping); returns how many.
pub async fn delete_expired(db: &Db, now: UnixMillis) -> Result<u64, DbError> {
    Ok(with_db!(db, pool => sqlx::query("DELETE FROM sessions WHERE expires_at <= $1").bind(now.0).execute(pool).await
        .map(|r| r.rows_affected()))?)
}

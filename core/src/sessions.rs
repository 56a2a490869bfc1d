//! Browser sessions of the dashboard, stored in the database under the SHA-256 of their id
//! (the id itself is the bearer secret in the cookie, so it is never stored), with the user
//! logged in with each, so that all of a user's sessions can be ended at once.

use sha2::{Digest, Sha256};

use crate::db::{Db, DbError};
use crate::time::UnixMillis;
use crate::with_db;

fn id_hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// What is stored of a session besides its id: its data (JSON), when it expires, and who is
/// logged in with it (so that a password change or reset can end the others).
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    pub data: &'a str,
    pub expires_at: UnixMillis,
    pub user_id: Option<&'a str>,
}

/// Inserts a new session; false if the id is taken (a collision: the caller picks another).
pub async fn create(db: &Db, id: &str, session: Stored<'_>) -> Result<bool, DbError> {
    const SQL: &str = "INSERT INTO sessions (id_hash, data, expires_at, user_id) VALUES ($1, $2, $3, $4) \
                       ON CONFLICT (id_hash) DO NOTHING";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(id_hash(id)).bind(session.data).bind(session.expires_at.0)
        .bind(session.user_id).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

/// Writes an existing session. One that was ended meanwhile (logged out, or ended by a
/// password change elsewhere) stays ended: it is not written back.
pub async fn save(db: &Db, id: &str, session: Stored<'_>) -> Result<(), DbError> {
    const SQL: &str = "UPDATE sessions SET data = $2, expires_at = $3, user_id = $4 WHERE id_hash = $1";
    with_db!(db, pool => sqlx::query(SQL).bind(id_hash(id)).bind(session.data).bind(session.expires_at.0)
        .bind(session.user_id).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// Ends every session of `user` but the one whose id is `keep` (none: all of them); returns
/// how many ended.
pub async fn end_all_for_user(db: &Db, user: &str, keep: Option<&str>) -> Result<u64, DbError> {
    const SQL: &str = "DELETE FROM sessions WHERE user_id = $1 AND id_hash <> $2";
    let keep = keep.map(id_hash).unwrap_or_default();
    Ok(with_db!(db, pool => sqlx::query(SQL).bind(user).bind(keep).execute(pool).await.map(|r| r.rows_affected()))?)
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

//! Stripe billing's stored side: each project's connection to its Stripe account (secrets
//! encrypted at rest), and the intake of Stripe's webhook events, each stored once by its id
//! before Stripe is told it arrived, for a job to process.

use crate::crypto::MasterKey;
use crate::db::{Db, DbError};
use crate::ids::ProjectId;
use crate::time::UnixMillis;
use crate::with_db;

#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("a stored Stripe secret cannot be decrypted with this master key")]
    Secret,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for StripeError {
    fn from(e: sqlx::Error) -> Self {
        StripeError::Db(e.into())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> StripeError {
    StripeError::Invalid { field, reason: reason.into() }
}

/// A project's connection as shown (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Connection {
    pub mode: String,
    pub account_id: Option<String>,
    pub key_hint: Option<String>,
    pub livemode: bool,
    pub last_check_at: Option<i64>,
    pub last_check_error: Option<String>,
    pub updated_at: i64,
}

/// Whether a secret or restricted key is for live or test mode; `None` if it is no such key.
pub fn key_livemode(key: &str) -> Option<bool> {
    let rest = ["sk_live_", "rk_live_"].iter().find_map(|p| key.strip_prefix(p)).map(|r| (true, r));
    let rest = rest.or_else(|| ["sk_test_", "rk_test_"].iter().find_map(|p| key.strip_prefix(p)).map(|r| (false, r)));
    let (live, rest) = rest?;
    (rest.len() >= 8 && rest.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(live)
}

/// `rk_test_…wxyz`: enough to recognise a key, not to use it.
fn hint(key: &str) -> String {
    let prefix: String = key.chars().take(8).collect();
    let tail: String = key.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
    format!("{prefix}…{tail}")
}

fn check_webhook_secret(secret: &str) -> Result<(), StripeError> {
    let valid = secret.strip_prefix("whsec_").is_some_and(|r| r.len() >= 16 && r.bytes().all(|b| b.is_ascii_graphic()));
    if valid { Ok(()) } else { Err(invalid("webhook_secret", "must be the endpoint's signing secret (whsec_…)")) }
}

/// Connects the project with a secret or restricted key the tenant pasted (`sk_…`/`rk_…`,
/// test or live) and the webhook endpoint's signing secret (`whsec_…`). Both are encrypted.
pub async fn connect_with_key(
    db: &Db,
    master: &MasterKey,
    project: &ProjectId,
    secret_key: &str,
    webhook_secret: &str,
) -> Result<Connection, StripeError> {
    let (secret_key, webhook_secret) = (secret_key.trim(), webhook_secret.trim());
    let livemode = key_livemode(secret_key).ok_or_else(|| {
        invalid("secret_key", "must be a Stripe secret or restricted key (sk_test_…, rk_test_…, sk_live_…, rk_live_…)")
    })?;
    check_webhook_secret(webhook_secret)?;
    const SQL: &str = "INSERT INTO stripe_connections (project_id, mode, account_id, secret_key_sealed, key_hint, \
            webhook_secret_sealed, livemode, created_at, updated_at) \
        VALUES ($1, 'key', NULL, $2, $3, $4, $5, $6, $6) \
        ON CONFLICT (project_id) DO UPDATE SET mode = 'key', account_id = NULL, \
            secret_key_sealed = excluded.secret_key_sealed, key_hint = excluded.key_hint, \
            webhook_secret_sealed = excluded.webhook_secret_sealed, livemode = excluded.livemode, \
            last_check_at = NULL, last_check_error = NULL, updated_at = excluded.updated_at";
    let now = UnixMillis::now().0;
    let (sealed_key, sealed_webhook) = (master.seal(secret_key), master.seal(webhook_secret));
    with_db!(db, pool => sqlx::query(SQL).bind(project).bind(&sealed_key).bind(hint(secret_key))
        .bind(&sealed_webhook).bind(livemode).bind(now).execute(pool).await.map(|_| ()))?;
    connection(db, project).await?.ok_or_else(|| invalid("project", "no such project"))
}

/// The project's connection, if it has one.
pub async fn connection(db: &Db, project: &ProjectId) -> Result<Option<Connection>, StripeError> {
    const SQL: &str = "SELECT mode, account_id, key_hint, livemode, last_check_at, last_check_error, updated_at \
        FROM stripe_connections WHERE project_id = $1";
    Ok(with_db!(db, pool => sqlx::query_as::<_, Connection>(SQL).bind(project).fetch_optional(pool).await)?)
}

/// Removes the project's connection (its stored events stay, for the record).
pub async fn disconnect(db: &Db, project: &ProjectId) -> Result<bool, StripeError> {
    const SQL: &str = "DELETE FROM stripe_connections WHERE project_id = $1";
    let removed = with_db!(db, pool => sqlx::query(SQL).bind(project).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(removed > 0)
}

/// The webhook signing secret and live mode of the project's connection.
pub async fn webhook_secret(
    db: &Db,
    master: &MasterKey,
    project: &ProjectId,
) -> Result<Option<(String, bool)>, StripeError> {
    const SQL: &str = "SELECT webhook_secret_sealed, livemode FROM stripe_connections WHERE project_id = $1";
    let row: Option<(String, bool)> =
        with_db!(db, pool => sqlx::query_as::<_, (String, bool)>(SQL).bind(project).fetch_optional(pool).await)?;
    match row {
        Some((sealed, livemode)) => Ok(Some((master.open(&sealed).map_err(|_| StripeError::Secret)?, livemode))),
        None => Ok(None),
    }
}

/// The fields of a webhook event Tollgate files it by.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct EventEnvelope {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub livemode: bool,
    pub created: i64,
}

/// Whether an event was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    Stored,
    /// Stripe sent it before (it retries until acknowledged, and may repeat anyway).
    AlreadyStored,
}

/// Stores `event` (its raw `payload`) once by id, for the processing job.
pub async fn store_event(
    db: &Db,
    project: &ProjectId,
    event: &EventEnvelope,
    payload: &str,
) -> Result<Intake, StripeError> {
    const SQL: &str = "INSERT INTO stripe_events (id, project_id, type, livemode, created, payload, received_at) \
        VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING";
    let now = UnixMillis::now().0;
    let inserted = with_db!(db, pool => sqlx::query(SQL).bind(&event.id).bind(project).bind(&event.kind)
        .bind(event.livemode).bind(event.created).bind(payload).bind(now).execute(pool).await
        .map(|r| r.rows_affected()))?;
    Ok(if inserted == 1 { Intake::Stored } else { Intake::AlreadyStored })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_their_mode() {
        assert_eq!(key_livemode("rk_test_51Habcdefgh"), Some(false));
        assert_eq!(key_livemode("sk_live_51Habcdefgh"), Some(true));
        assert_eq!(key_livemode("pk_test_51Habcdefgh"), None, "a publishable key cannot bill");
        assert_eq!(key_livemode("sk_test_"), None);
        assert_eq!(key_livemode("sk_test_abc def ghij"), None);
        assert_eq!(hint("rk_test_51Habcdefghwxyz"), "rk_test_…wxyz");
    }
}

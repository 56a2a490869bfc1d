//! The one-time upgrade of secrets stored before they were bound to their row: values sealed
//! as `v1` (no associated data) are sealed again as `v2` for their row, and idempotent answers
//! stored in clear are sealed. Run at every start after the migrations; it finds nothing to do
//! once done, and each row is swapped only if it still holds what was read (so replicas
//! starting together cannot undo each other).

use crate::crypto::{MasterKey, SealedFor};
use crate::db::{Db, DbError};
use crate::ids::{ProjectId, ProviderId};
use crate::with_db;

/// How many values were sealed again.
pub async fn reseal_unbound_secrets(db: &Db, master: &MasterKey) -> Result<u64, DbError> {
    let mut done = 0;

    const PROVIDERS: &str = "SELECT id, api_key_sealed FROM provider_connections WHERE api_key_sealed LIKE 'v1:%'";
    const PROVIDER: &str = "UPDATE provider_connections SET api_key_sealed = $1 WHERE id = $2 AND api_key_sealed = $3";
    let rows = with_db!(db, pool => sqlx::query_as::<_, (ProviderId, String)>(PROVIDERS).fetch_all(pool).await)?;
    for (id, old) in rows {
        if let Some(new) = reseal(master, &old, &SealedFor::provider_api_key(&id)) {
            done += swap(db, PROVIDER, &new, id.as_str(), &old).await?;
        }
    }

    type Column = (&'static str, &'static str, fn(&ProjectId) -> SealedFor);
    let per_project: [Column; 3] = [
        ("stripe_connections", "secret_key_sealed", SealedFor::stripe_secret_key),
        ("stripe_connections", "webhook_secret_sealed", SealedFor::stripe_webhook_secret),
        ("alert_settings", "webhook_secret_sealed", SealedFor::alert_webhook_secret),
    ];
    for (table, column, row) in per_project {
        let select = format!("SELECT project_id, {column} FROM {table} WHERE {column} LIKE 'v1:%'");
        let update = format!("UPDATE {table} SET {column} = $1 WHERE project_id = $2 AND {column} = $3");
        let rows = with_db!(db, pool => sqlx::query_as::<_, (ProjectId, String)>(sqlx::AssertSqlSafe(select.clone())).fetch_all(pool).await)?;
        for (project, old) in rows {
            if let Some(new) = reseal(master, &old, &row(&project)) {
                done += swap(db, &update, &new, project.as_str(), &old).await?;
            }
        }
    }

    // Answers stored in clear before they were sealed (JSON, never starting `v2:`).
    const ANSWERS: &str = "SELECT project_id, idem_key, response_body FROM idempotency_keys \
                           WHERE response_body IS NOT NULL AND response_body NOT LIKE 'v2:%'";
    const ANSWER: &str = "UPDATE idempotency_keys SET response_body = $1 \
                          WHERE project_id = $2 AND idem_key = $3 AND response_body = $4";
    let rows = with_db!(db, pool => sqlx::query_as::<_, (ProjectId, String, String)>(ANSWERS).fetch_all(pool).await)?;
    for (project, key, body) in rows {
        let sealed = master.seal(&body, &SealedFor::idempotent_response(&project, &key));
        done += with_db!(db, pool => sqlx::query(ANSWER).bind(&sealed).bind(&project).bind(&key).bind(&body)
            .execute(pool).await.map(|r| r.rows_affected()))?;
    }
    if done > 0 {
        tracing::info!(values = done, "sealed stored secrets again, each bound to its row");
    }
    Ok(done)
}

/// A `v1` value sealed for `row`, or None (logged) if it does not open with this master key:
/// it is left as it was, and fails where it is used, as it did before.
fn reseal(master: &MasterKey, old: &str, row: &SealedFor) -> Option<String> {
    match master.reseal(old, row) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(row = ?row, error = %e, "a stored secret cannot be re-sealed; left as it was");
            None
        }
    }
}

async fn swap(db: &Db, sql: &str, new: &str, id: &str, old: &str) -> Result<u64, DbError> {
    Ok(
        with_db!(db, pool => sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).bind(new).bind(id).bind(old).execute(pool).await
        .map(|r| r.rows_affected()))?,
    )
}

//! What a project still lacks before its first call works (the dashboard's first-run
//! checklist), read from the database in one round trip, and the record of provider tests
//! (the Test button's models call) that the checklist reads.

use crate::db::{Db, DbError};
use crate::ids::{ProjectId, ProviderId};
use crate::time::UnixMillis;
use crate::with_db;

/// How far a project is set up: each field is one step of the first run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Progress {
    /// A provider connection exists.
    pub provider_connected: bool,
    /// A provider connection's last test succeeded.
    pub provider_tested: bool,
    /// A key that is not revoked exists.
    pub key_created: bool,
    /// A call reached a decision (settled, refused, failed or interrupted).
    pub first_call: bool,
    /// Stripe is connected.
    pub stripe_connected: bool,
}

/// The steps of `project` done so far (its default budget and public URL are read elsewhere:
/// the project row and the configuration).
pub async fn progress(db: &Db, project: &ProjectId) -> Result<Progress, DbError> {
    const SQL: &str = "SELECT \
        EXISTS (SELECT 1 FROM provider_connections WHERE project_id = $1) AS provider_connected, \
        EXISTS (SELECT 1 FROM provider_connections WHERE project_id = $1 AND last_test_ok = TRUE) AS provider_tested, \
        EXISTS (SELECT 1 FROM api_keys WHERE project_id = $1 AND revoked_at IS NULL) AS key_created, \
        EXISTS (SELECT 1 FROM usage_events WHERE project_id = $1) AS first_call, \
        EXISTS (SELECT 1 FROM stripe_connections WHERE project_id = $1) AS stripe_connected";
    Ok(with_db!(db, pool => sqlx::query_as::<_, Progress>(SQL).bind(project).fetch_one(pool).await)?)
}

/// The last test of a provider connection.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ProviderTest {
    pub provider_id: ProviderId,
    pub at: i64,
    pub ok: bool,
    /// "12 models", or the provider's status and message.
    pub detail: String,
}

/// The longest detail kept of a test's outcome.
const MAX_DETAIL_CHARS: usize = 300;

/// Records the outcome of testing `provider` of `project`; false if the project has no such
/// connection.
pub async fn record_provider_test(
    db: &Db,
    project: &ProjectId,
    provider: &ProviderId,
    at: UnixMillis,
    ok: bool,
    detail: &str,
) -> Result<bool, DbError> {
    const SQL: &str = "UPDATE provider_connections SET last_test_at = $1, last_test_ok = $2, last_test_detail = $3 \
                       WHERE id = $4 AND project_id = $5";
    let detail: String = detail.chars().take(MAX_DETAIL_CHARS).collect();
    let n = with_db!(db, pool => sqlx::query(SQL).bind(at.0).bind(ok).bind(&detail).bind(provider).bind(project)
        .execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

/// The last test of each connection of `project` that was tested.
pub async fn provider_tests(db: &Db, project: &ProjectId) -> Result<Vec<ProviderTest>, DbError> {
    const SQL: &str = "SELECT id AS provider_id, last_test_at AS at, last_test_ok AS ok, \
                       COALESCE(last_test_detail, '') AS detail FROM provider_connections \
                       WHERE project_id = $1 AND last_test_at IS NOT NULL AND last_test_ok IS NOT NULL";
    Ok(with_db!(db, pool => sqlx::query_as::<_, ProviderTest>(SQL).bind(project).fetch_all(pool).await)?)
}

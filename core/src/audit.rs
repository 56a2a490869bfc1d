//! The audit log: who changed what in an organization, and when. Written by the dashboard
//! and the management API beside each change they make.

use crate::db::{Db, DbError};
use crate::ids::{AuditId, OrgId, UserId};
use crate::time::UnixMillis;
use crate::with_db;

/// Who made a change.
#[derive(Debug, Clone)]
pub struct Actor {
    pub user_id: Option<UserId>,
    /// Kept even if the user is deleted later.
    pub label: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditEntry {
    pub actor_email: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    pub created_at: i64,
}

/// Records one change. `action` is a dotted verb (`key.revoked`), `target` what it applied
/// to (a name or id), `detail` a short human sentence. Never put secrets in any of them.
pub async fn record(
    db: &Db,
    org: &OrgId,
    actor: &Actor,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<(), DbError> {
    const SQL: &str = "INSERT INTO audit_log (id, org_id, actor_id, actor_email, action, target, detail, created_at) \
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
    with_db!(db, pool => sqlx::query(SQL).bind(AuditId::generate()).bind(org).bind(&actor.user_id).bind(&actor.label)
        .bind(action).bind(target).bind(detail).bind(UnixMillis::now().0).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// The newest entries of an organization's log, newest first.
pub async fn list(db: &Db, org: &OrgId, limit: i64) -> Result<Vec<AuditEntry>, DbError> {
    const SQL: &str = "SELECT actor_email, action, target, detail, created_at FROM audit_log WHERE org_id = $1 \
                       ORDER BY created_at DESC, id DESC LIMIT $2";
    Ok(with_db!(db, pool => sqlx::query_as::<_, AuditEntry>(SQL).bind(org).bind(limit).fetch_all(pool).await)?)
}

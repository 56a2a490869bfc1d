//! Organizations (tenants), users and memberships: the accounts side of the domain, used by
//! `tollgate admin` and by the dashboard (sign-up, login, password changes and resets).

use crate::crypto;
use crate::db::{Db, DbError, is_unique_violation};
use crate::ids::{OrgId, UserId};
use crate::time::UnixMillis;
use crate::with_db;

/// A member's role in an organization, from most to least powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

pub const MIN_PASSWORD_LEN: usize = 10;
pub const MAX_PASSWORD_LEN: usize = 1024;
pub const MAX_NAME_LEN: usize = 100;
pub const MAX_EMAIL_LEN: usize = 254;

/// Why an account could not be created; each names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("organization name: {0}")]
    OrgName(&'static str),
    #[error("email: {0}")]
    Email(&'static str),
    #[error("password: {0}")]
    Password(String),
    #[error("email: an account with this email already exists")]
    EmailTaken,
    #[error("This reset link has expired or was used already. Ask for a new one.")]
    ResetLink,
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Hash(#[from] crypto::PasswordHashError),
}

impl From<sqlx::Error> for AccountError {
    fn from(e: sqlx::Error) -> Self {
        AccountError::Db(e.into())
    }
}

#[derive(Debug)]
pub struct NewOrganization<'a> {
    pub name: &'a str,
    pub owner_email: &'a str,
    pub owner_password: &'a str,
}

#[derive(Debug, Clone)]
pub struct CreatedOrganization {
    pub org_id: OrgId,
    pub owner_id: UserId,
}

/// Creates an organization and its owner in one transaction: either both exist afterwards
/// or neither does.
pub async fn create_organization_with_owner(
    db: &Db,
    new: NewOrganization<'_>,
) -> Result<CreatedOrganization, AccountError> {
    let name = validate_org_name(new.name)?;
    let email = normalize_email(new.owner_email)?;
    validate_password(new.owner_password)?;
    let hash = crypto::hash_password(new.owner_password)?;

    let org_id = OrgId::generate();
    let owner_id = UserId::generate();
    let now = UnixMillis::now().0;
    // The transaction runs in its own async block so that `?` ends the block, not the function.
    let result: Result<(), sqlx::Error> = with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO organizations (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&org_id)
            .bind(&name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO users (id, email, password_hash, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&owner_id)
            .bind(&email)
            .bind(&hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO memberships (org_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&org_id)
            .bind(&owner_id)
            .bind(Role::Owner.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }
    .await);
    match result {
        Ok(()) => Ok(CreatedOrganization { org_id, owner_id }),
        Err(e) if is_unique_violation(&e) => Err(AccountError::EmailTaken),
        Err(e) => Err(e.into()),
    }
}

/// An organization as listed for an operator.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrganizationSummary {
    pub id: OrgId,
    pub name: String,
    pub owner_email: Option<String>,
    pub created_at: i64,
}

pub async fn list_organizations(db: &Db) -> Result<Vec<OrganizationSummary>, DbError> {
    const SQL: &str = "SELECT o.id, o.name, o.created_at, \
         (SELECT u.email FROM memberships m JOIN users u ON u.id = m.user_id \
          WHERE m.org_id = o.id AND m.role = 'owner' ORDER BY m.created_at LIMIT 1) AS owner_email \
         FROM organizations o ORDER BY o.created_at";
    Ok(with_db!(db, pool => sqlx::query_as::<_, OrganizationSummary>(SQL).fetch_all(pool).await)?)
}

fn validate_org_name(name: &str) -> Result<String, AccountError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(AccountError::OrgName("must not be empty"));
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(AccountError::OrgName("must be at most 100 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(AccountError::OrgName("must not contain control characters"));
    }
    Ok(name.to_owned())
}

/// Trims and lower-cases an email address after checking its shape (`local@domain.tld`).
pub fn normalize_email(email: &str) -> Result<String, AccountError> {
    let email = email.trim().to_lowercase();
    if email.is_empty() {
        return Err(AccountError::Email("must not be empty"));
    }
    if email.len() > MAX_EMAIL_LEN {
        return Err(AccountError::Email("must be at most 254 characters"));
    }
    let valid = match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
                && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    };
    if !valid {
        return Err(AccountError::Email("is not an email address"));
    }
    Ok(email)
}

pub fn validate_password(password: &str) -> Result<(), AccountError> {
    let len = password.chars().count();
    if len < MIN_PASSWORD_LEN {
        return Err(AccountError::Password(format!("must be at least {MIN_PASSWORD_LEN} characters")));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(AccountError::Password(format!("must be at most {MAX_PASSWORD_LEN} bytes")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Logging in

/// A logged-in person's identity.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct User {
    pub id: UserId,
    pub email: String,
}

/// An organization a user belongs to, with their role in it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Membership {
    pub org_id: OrgId,
    pub org_name: String,
    pub role: String,
}

impl Membership {
    pub fn role(&self) -> Role {
        Role::parse(&self.role).unwrap_or(Role::Viewer)
    }
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }

    /// Whether this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        let rank = |r: Role| match r {
            Role::Owner => 3,
            Role::Admin => 2,
            Role::Viewer => 1,
        };
        rank(self) >= rank(needed)
    }
}

/// Failed logins allowed per email, and per client address, within [`THROTTLE_WINDOW_SECS`].
pub const MAX_FAILURES_PER_EMAIL: i64 = 5;
pub const MAX_FAILURES_PER_CLIENT: i64 = 20;
pub const THROTTLE_WINDOW_SECS: i64 = 15 * 60;

/// Why a login did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("Incorrect email or password.")]
    Invalid,
    #[error("Too many failed attempts. Try again in a few minutes.")]
    Throttled,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Checks an email and password, with throttling per email and per client address. The
/// password is verified against a stand-in hash when the email is unknown, so the answer
/// takes as long either way.
pub async fn login(db: &Db, email: &str, password: &str, client: &str) -> Result<User, LoginError> {
    let email = email.trim().to_lowercase();
    let keys = [format!("email:{email}"), format!("client:{client}")];
    let now = UnixMillis::now();
    for (key, max) in keys.iter().zip([MAX_FAILURES_PER_EMAIL, MAX_FAILURES_PER_CLIENT]) {
        if recent_failures(db, key, now).await? >= max {
            return Err(LoginError::Throttled);
        }
    }
    const SQL: &str = "SELECT id, email, password_hash FROM users WHERE email = $1";
    let row: Option<(UserId, String, String)> =
        with_db!(db, pool => sqlx::query_as(SQL).bind(&email).fetch_optional(pool).await).map_err(DbError::from)?;
    let hash = row.as_ref().map_or_else(|| crypto::dummy_password_hash().to_owned(), |r| r.2.clone());
    let password = password.to_owned();
    let verified =
        tokio::task::spawn_blocking(move || crypto::verify_password(&password, &hash)).await.unwrap_or(false);
    match row {
        Some((id, email, _)) if verified => {
            clear_failures(db, &keys[0]).await?;
            Ok(User { id, email })
        }
        _ => {
            for key in &keys {
                record_failure(db, key, now).await?;
            }
            Err(LoginError::Invalid)
        }
    }
}

async fn recent_failures(db: &Db, key: &str, now: UnixMillis) -> Result<i64, DbError> {
    const SQL: &str = "SELECT failures FROM login_failures WHERE throttle_key = $1 AND window_start > $2";
    let since = now.plus_secs(-THROTTLE_WINDOW_SECS).0;
    Ok(with_db!(db, pool => sqlx::query_scalar::<_, i64>(SQL).bind(key).bind(since).fetch_optional(pool).await)?
        .unwrap_or(0))
}

async fn record_failure(db: &Db, key: &str, now: UnixMillis) -> Result<(), DbError> {
    // A window that has passed starts over; otherwise the count goes up, in one statement.
    const SQL: &str = "INSERT INTO login_failures (throttle_key, failures, window_start) VALUES ($1, 1, $2)         ON CONFLICT (throttle_key) DO UPDATE SET           failures = CASE WHEN login_failures.window_start <= $3 THEN 1 ELSE login_failures.failures + 1 END,           window_start = CASE WHEN login_failures.window_start <= $3 THEN $2 ELSE login_failures.window_start END";
    let since = now.plus_secs(-THROTTLE_WINDOW_SECS).0;
    with_db!(db, pool => sqlx::query(SQL).bind(key).bind(now.0).bind(since).execute(pool).await.map(|_| ()))?;
    Ok(())
}

async fn clear_failures(db: &Db, key: &str) -> Result<(), DbError> {
    with_db!(db, pool => sqlx::query("DELETE FROM login_failures WHERE throttle_key = $1").bind(key).execute(pool)
        .await.map(|_| ()))?;
    Ok(())
}

pub async fn get_user(db: &Db, id: &UserId) -> Result<Option<User>, DbError> {
    Ok(with_db!(db, pool => sqlx::query_as::<_, User>("SELECT id, email FROM users WHERE id = $1").bind(id)
        .fetch_optional(pool).await)?)
}

/// The organizations a user belongs to, oldest membership first.
pub async fn memberships(db: &Db, user: &UserId) -> Result<Vec<Membership>, DbError> {
    const SQL: &str = "SELECT m.org_id, o.name AS org_name, m.role FROM memberships m                        JOIN organizations o ON o.id = m.org_id WHERE m.user_id = $1 ORDER BY m.created_at, o.name";
    Ok(with_db!(db, pool => sqlx::query_as::<_, Membership>(SQL).bind(user).fetch_all(pool).await)?)
}

/// Changes a password after checking the current one.
pub async fn change_password(db: &Db, user: &UserId, current: &str, new: &str) -> Result<(), AccountError> {
    const SQL: &str = "SELECT password_hash FROM users WHERE id = $1";
    let hash: Option<String> = with_db!(db, pool => sqlx::query_scalar(SQL).bind(user).fetch_optional(pool).await)?;
    let current = current.to_owned();
    let hash = hash.unwrap_or_else(|| crypto::dummy_password_hash().to_owned());
    let ok = tokio::task::spawn_blocking(move || crypto::verify_password(&current, &hash)).await.unwrap_or(false);
    if !ok {
        return Err(AccountError::Password("the current password is not correct".to_owned()));
    }
    set_password(db, user, new).await
}

async fn set_password(db: &Db, user: &UserId, new: &str) -> Result<(), AccountError> {
    validate_password(new)?;
    let new = new.to_owned();
    let hash = tokio::task::spawn_blocking(move || crypto::hash_password(&new))
        .await
        .map_err(|_| crypto::PasswordHashError)??;
    with_db!(db, pool => sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2").bind(&hash).bind(user)
        .execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// How long a password reset link works.
pub const RESET_TTL_SECS: i64 = 60 * 60;

/// Starts a password reset: a one-time token for the account of `email`, if there is one.
pub async fn start_password_reset(db: &Db, email: &str) -> Result<Option<String>, DbError> {
    let Ok(email) = normalize_email(email) else { return Ok(None) };
    let user: Option<UserId> = with_db!(db, pool => sqlx::query_scalar("SELECT id FROM users WHERE email = $1")
        .bind(&email).fetch_optional(pool).await)?;
    let Some(user) = user else { return Ok(None) };
    let token = crypto::random_token();
    const SQL: &str = "INSERT INTO password_resets (token_hash, user_id, expires_at) VALUES ($1, $2, $3)";
    with_db!(db, pool => sqlx::query(SQL).bind(crypto::token_hash(&token)).bind(&user)
        .bind(UnixMillis::now().plus_secs(RESET_TTL_SECS).0).execute(pool).await.map(|_| ()))?;
    Ok(Some(token))
}

/// Whether a reset token is live (not used, not expired).
pub async fn reset_token_is_live(db: &Db, token: &str) -> Result<bool, DbError> {
    const SQL: &str =
        "SELECT COUNT(*) FROM password_resets WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2";
    let n: i64 = with_db!(db, pool => sqlx::query_scalar(SQL).bind(crypto::token_hash(token))
        .bind(UnixMillis::now().0).fetch_one(pool).await)?;
    Ok(n > 0)
}

/// Uses a reset token (once) to set a new password; every other reset link of the account
/// stops working too.
pub async fn finish_password_reset(db: &Db, token: &str, new: &str) -> Result<UserId, AccountError> {
    validate_password(new)?;
    const CLAIM: &str = "UPDATE password_resets SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL                          AND expires_at > $1 RETURNING user_id";
    let now = UnixMillis::now().0;
    let user: Option<UserId> = with_db!(db, pool => sqlx::query_scalar(CLAIM).bind(now)
        .bind(crypto::token_hash(token)).fetch_optional(pool).await)?;
    let user = user.ok_or(AccountError::ResetLink)?;
    set_password(db, &user, new).await?;
    with_db!(db, pool => sqlx::query("UPDATE password_resets SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL")
        .bind(now).bind(&user).execute(pool).await.map(|_| ()))?;
    Ok(user)
}

// ---------------------------------------------------------------------------------------
// Members and invitations

/// A member of an organization, as listed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MemberRow {
    pub user_id: UserId,
    pub email: String,
    pub role: String,
    pub created_at: i64,
}

pub async fn list_members(db: &Db, org: &OrgId) -> Result<Vec<MemberRow>, DbError> {
    const SQL: &str = "SELECT m.user_id, u.email, m.role, m.created_at FROM memberships m JOIN users u ON u.id = m.user_id \
                       WHERE m.org_id = $1 ORDER BY m.created_at, u.email";
    Ok(with_db!(db, pool => sqlx::query_as::<_, MemberRow>(SQL).bind(org).fetch_all(pool).await)?)
}

/// Why a change to the members could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("An organization keeps at least one owner: make someone else owner first.")]
    LastOwner,
    #[error("no such member")]
    NotFound,
    #[error("Email: {0}")]
    Email(&'static str),
    #[error("{0} is already a member.")]
    AlreadyMember(String),
    #[error("This invitation has expired, was revoked, or was used already.")]
    InvitationGone,
    #[error("This invitation is for {0}: log in with that email to accept it.")]
    WrongAccount(String),
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for MemberError {
    fn from(e: sqlx::Error) -> Self {
        MemberError::Db(e.into())
    }
}

/// Changes a member's role; the last owner cannot be demoted. The check and the change are
/// one statement, so two owners demoting each other at once cannot leave none.
pub async fn set_role(db: &Db, org: &OrgId, user: &UserId, role: Role) -> Result<(), MemberError> {
    const SQL: &str = "UPDATE memberships SET role = $1 WHERE org_id = $2 AND user_id = $3 \
        AND ($1 = 'owner' OR role <> 'owner' \
             OR (SELECT COUNT(*) FROM memberships o WHERE o.org_id = $2 AND o.role = 'owner') > 1)";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(role.as_str()).bind(org).bind(user).execute(pool).await
        .map(|r| r.rows_affected()))?;
    if n == 1 {
        return Ok(());
    }
    if member_role(db, org, user).await?.is_some() { Err(MemberError::LastOwner) } else { Err(MemberError::NotFound) }
}

/// Removes a member; the last owner cannot be removed (one statement, as in [`set_role`]).
pub async fn remove_member(db: &Db, org: &OrgId, user: &UserId) -> Result<(), MemberError> {
    const SQL: &str = "DELETE FROM memberships WHERE org_id = $1 AND user_id = $2 \
        AND (role <> 'owner' OR (SELECT COUNT(*) FROM memberships o WHERE o.org_id = $1 AND o.role = 'owner') > 1)";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(org).bind(user).execute(pool).await.map(|r| r.rows_affected()))?;
    if n == 1 {
        return Ok(());
    }
    if member_role(db, org, user).await?.is_some() { Err(MemberError::LastOwner) } else { Err(MemberError::NotFound) }
}

async fn member_role(db: &Db, org: &OrgId, user: &UserId) -> Result<Option<String>, DbError> {
    const SQL: &str = "SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2";
    Ok(with_db!(db, pool => sqlx::query_scalar::<_, String>(SQL).bind(org).bind(user).fetch_optional(pool).await)?)
}

/// How long an invitation link works.
pub const INVITATION_TTL_SECS: i64 = 7 * 24 * 3600;

/// A pending invitation.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Invitation {
    pub id: crate::ids::InvitationId,
    pub org_id: OrgId,
    pub org_name: String,
    pub email: String,
    pub role: String,
    pub expires_at: i64,
}

/// Invites `email` to `org` as `role` (admin or viewer); returns the one-time link token.
pub async fn invite(
    db: &Db,
    org: &OrgId,
    email: &str,
    role: Role,
    by: &UserId,
) -> Result<(Invitation, String), MemberError> {
    let email = normalize_email(email).map_err(|e| match e {
        AccountError::Email(why) => MemberError::Email(why),
        other => MemberError::Account(other),
    })?;
    if role == Role::Owner {
        return Err(MemberError::Email("invite as admin or viewer; an owner can promote a member afterwards"));
    }
    const MEMBER: &str =
        "SELECT COUNT(*) FROM memberships m JOIN users u ON u.id = m.user_id WHERE m.org_id = $1 AND u.email = $2";
    let already: i64 = with_db!(db, pool => sqlx::query_scalar(MEMBER).bind(org).bind(&email).fetch_one(pool).await)?;
    if already > 0 {
        return Err(MemberError::AlreadyMember(email));
    }
    let token = crypto::random_token();
    let id = crate::ids::InvitationId::generate();
    let now = UnixMillis::now();
    const SQL: &str = "INSERT INTO invitations (id, org_id, email, role, token_hash, invited_by, created_at, expires_at) \
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
    with_db!(db, pool => sqlx::query(SQL).bind(&id).bind(org).bind(&email).bind(role.as_str())
        .bind(crypto::token_hash(&token)).bind(by).bind(now.0).bind(now.plus_secs(INVITATION_TTL_SECS).0)
        .execute(pool).await.map(|_| ()))?;
    let invitation =
        find_invitation_by_hash(db, &crypto::token_hash(&token)).await?.ok_or(MemberError::InvitationGone)?;
    Ok((invitation, token))
}

const INVITATION_COLUMNS: &str = "i.id, i.org_id, o.name AS org_name, i.email, i.role, i.expires_at";

async fn find_invitation_by_hash(db: &Db, hash: &str) -> Result<Option<Invitation>, DbError> {
    let sql = format!(
        "SELECT {INVITATION_COLUMNS} FROM invitations i JOIN organizations o ON o.id = i.org_id \
                       WHERE i.token_hash = $1 AND i.accepted_at IS NULL AND i.expires_at > $2"
    );
    Ok(with_db!(db, pool => sqlx::query_as::<_, Invitation>(sqlx::AssertSqlSafe(sql.clone())).bind(hash)
        .bind(UnixMillis::now().0).fetch_optional(pool).await)?)
}

/// The live invitation a link's token names.
pub async fn invitation(db: &Db, token: &str) -> Result<Option<Invitation>, DbError> {
    find_invitation_by_hash(db, &crypto::token_hash(token)).await
}

/// An organization's pending invitations.
pub async fn list_invitations(db: &Db, org: &OrgId) -> Result<Vec<Invitation>, DbError> {
    let sql = format!(
        "SELECT {INVITATION_COLUMNS} FROM invitations i JOIN organizations o ON o.id = i.org_id \
                       WHERE i.org_id = $1 AND i.accepted_at IS NULL AND i.expires_at > $2 ORDER BY i.created_at"
    );
    Ok(with_db!(db, pool => sqlx::query_as::<_, Invitation>(sqlx::AssertSqlSafe(sql.clone())).bind(org)
        .bind(UnixMillis::now().0).fetch_all(pool).await)?)
}

/// Withdraws a pending invitation of `org`.
pub async fn revoke_invitation(db: &Db, org: &OrgId, id: &crate::ids::InvitationId) -> Result<bool, DbError> {
    const SQL: &str = "DELETE FROM invitations WHERE id = $1 AND org_id = $2 AND accepted_at IS NULL";
    let n = with_db!(db, pool => sqlx::query(SQL).bind(id).bind(org).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

/// Accepts an invitation for an existing account (whose email must be the invited one).
/// The invitation is claimed and the membership made in one transaction, once.
pub async fn accept_invitation(db: &Db, token: &str, user: &User) -> Result<Invitation, MemberError> {
    let invitation = invitation(db, token).await?.ok_or(MemberError::InvitationGone)?;
    if invitation.email != user.email {
        return Err(MemberError::WrongAccount(invitation.email));
    }
    join(db, &invitation, &user.id, None).await?;
    Ok(invitation)
}

/// Creates the invited person's account and membership in one transaction.
pub async fn sign_up_with_invitation(db: &Db, token: &str, password: &str) -> Result<(User, Invitation), MemberError> {
    let invitation = invitation(db, token).await?.ok_or(MemberError::InvitationGone)?;
    validate_password(password)?;
    let password = password.to_owned();
    let hash = tokio::task::spawn_blocking(move || crypto::hash_password(&password))
        .await
        .map_err(|_| AccountError::Hash(crypto::PasswordHashError))?
        .map_err(AccountError::from)?;
    let user = User { id: UserId::generate(), email: invitation.email.clone() };
    join(db, &invitation, &user.id, Some((&user.email, &hash))).await?;
    Ok((user, invitation))
}

async fn join(
    db: &Db,
    invitation: &Invitation,
    user: &UserId,
    new_account: Option<(&str, &str)>,
) -> Result<(), MemberError> {
    const CLAIM: &str =
        "UPDATE invitations SET accepted_at = $1 WHERE id = $2 AND accepted_at IS NULL AND expires_at > $1";
    const USER: &str = "INSERT INTO users (id, email, password_hash, created_at) VALUES ($1, $2, $3, $4)";
    const MEMBER: &str = "INSERT INTO memberships (org_id, user_id, role, created_at) VALUES ($1, $2, $3, $4) \
                          ON CONFLICT (org_id, user_id) DO NOTHING";
    let now = UnixMillis::now().0;
    let result: Result<bool, sqlx::Error> = with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        let claimed = sqlx::query(CLAIM).bind(now).bind(&invitation.id).execute(&mut *tx).await?.rows_affected() == 1;
        if !claimed {
            tx.rollback().await?;
            return Ok(false);
        }
        if let Some((email, hash)) = new_account {
            sqlx::query(USER).bind(user).bind(email).bind(hash).bind(now).execute(&mut *tx).await?;
        }
        sqlx::query(MEMBER).bind(&invitation.org_id).bind(user).bind(&invitation.role).bind(now).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }
    .await);
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(MemberError::InvitationGone),
        Err(e) if is_unique_violation(&e) => Err(MemberError::Account(AccountError::EmailTaken)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalized_and_checked() {
        assert_eq!(normalize_email("  Ada@Example.COM ").unwrap(), "ada@example.com");
        for bad in ["", "ada", "ada@", "@example.com", "ada@example", "a da@example.com", "ada@.com"] {
            assert!(normalize_email(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn passwords_have_a_minimum_length() {
        assert!(validate_password("short").is_err());
        assert!(validate_password("long enough!").is_ok());
    }

    #[test]
    fn org_names_are_trimmed_and_bounded() {
        assert_eq!(validate_org_name("  Acme ").unwrap(), "Acme");
        assert!(validate_org_name("   ").is_err());
        assert!(validate_org_name(&"x".repeat(101)).is_err());
    }
}

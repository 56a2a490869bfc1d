//! Organizations (tenants), users and memberships: the accounts side of the domain, used by
//! `tollgate admin` and by the dashboard (sign-up, login, password changes and resets).
//!
//! An account's email address is *verified* once its holder showed they read that mailbox (a
//! confirmation link, a reset link, an invitation link) while knowing the password; until then
//! the account can use the organizations it created, but cannot join another or invite anyone,
//! and it is deleted after [`VERIFICATION_TTL_SECS`]. Setting a password (change or reset) ends
//! every other session of the account, so someone who once had it loses it.

use std::time::Duration;

use crate::crypto;
use crate::db::{Db, DbError, is_unique_violation};
use crate::ids::{OrgId, UserId};
use crate::sessions;
use crate::throttle::{self, Backoff};
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
    #[error("This confirmation link has expired, was used already, or is for another account.")]
    VerificationLink,
    #[error("Too many sign-ups from here, or for this email. Try again in a few minutes.")]
    TooManySignUps,
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
/// or neither does. The owner counts as verified: this is the operator's command
/// (`tollgate admin create-org`), who vouches for the address.
pub async fn create_organization_with_owner(
    db: &Db,
    new: NewOrganization<'_>,
) -> Result<CreatedOrganization, AccountError> {
    let (name, email) = validate_new_organization(&new)?;
    let hash = hash_password(new.owner_password).await?;
    let created = insert_organization(db, &name, &email, &hash, Verified::Yes).await?;
    Ok(created.organization)
}

fn validate_new_organization(new: &NewOrganization<'_>) -> Result<(String, String), AccountError> {
    let name = validate_org_name(new.name)?;
    let email = normalize_email(new.owner_email)?;
    validate_password(new.owner_password)?;
    Ok((name, email))
}

/// Hashes a password off the async threads (argon2 takes tens of milliseconds of CPU).
async fn hash_password(password: &str) -> Result<String, AccountError> {
    let password = password.to_owned();
    Ok(tokio::task::spawn_blocking(move || crypto::hash_password(&password))
        .await
        .map_err(|_| crypto::PasswordHashError)??)
}

/// Whether a new owner's address counts as verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verified {
    Yes,
    No,
    /// Only if no account exists yet (the first owner of a fresh install), decided in the
    /// statement that inserts the account.
    IfFirstAccount,
}

struct Inserted {
    organization: CreatedOrganization,
    verified: bool,
}

async fn insert_organization(
    db: &Db,
    name: &str,
    email: &str,
    hash: &str,
    verified: Verified,
) -> Result<Inserted, AccountError> {
    const USER: &str = "INSERT INTO users (id, email, password_hash, created_at, verified_at) \
        VALUES ($1, $2, $3, $4, CASE WHEN $5 = 'yes' OR ($5 = 'first' AND NOT EXISTS (SELECT 1 FROM users)) \
                                     THEN $4 END) \
        RETURNING verified_at";
    let org_id = OrgId::generate();
    let owner_id = UserId::generate();
    let now = UnixMillis::now().0;
    let verified = match verified {
        Verified::Yes => "yes",
        Verified::No => "no",
        Verified::IfFirstAccount => "first",
    };
    // The transaction runs in its own async block so that `?` ends the block, not the function.
    let result: Result<Option<i64>, sqlx::Error> = with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO organizations (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&org_id)
            .bind(name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let verified_at: Option<i64> = sqlx::query_scalar(USER)
            .bind(&owner_id)
            .bind(email)
            .bind(hash)
            .bind(now)
            .bind(verified)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO memberships (org_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&org_id)
            .bind(&owner_id)
            .bind(Role::Owner.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(verified_at)
    }
    .await);
    match result {
        Ok(verified_at) => {
            Ok(Inserted { organization: CreatedOrganization { org_id, owner_id }, verified: verified_at.is_some() })
        }
        Err(e) if is_unique_violation(&e) => Err(AccountError::EmailTaken),
        Err(e) => Err(e.into()),
    }
}

/// What a sign-up did. The person signing up is told the same either way ("check your mail"),
/// so that sign-up does not tell whether an address has an account.
#[derive(Debug)]
pub enum SignUp {
    /// A new organization and its owner. `verification` is the token of the confirmation link
    /// to mail; None when the owner counts as verified already (the first account of an
    /// install without mail).
    Created { organization: CreatedOrganization, verification: Option<String> },
    /// The address has an account already: nothing was created (mail its owner instead).
    EmailTaken { email: String },
}

/// Signs a stranger from `client` (an address) up: a new organization with its owner,
/// unverified (but see [`SignUp::Created`]). A well-formed sign-up is counted per address and
/// per email before its password is hashed (a flood costs little, and cannot mail one address
/// over and over); the password is hashed whether or not the address is taken, so both answers
/// take as long.
pub async fn sign_up(
    db: &Db,
    new: NewOrganization<'_>,
    client: &str,
    first_account_verified: bool,
) -> Result<SignUp, AccountError> {
    let (name, email) = validate_new_organization(&new)?;
    if !allow_sign_up(db, client, &email).await? {
        return Err(AccountError::TooManySignUps);
    }
    let hash = hash_password(new.owner_password).await?;
    let verified = if first_account_verified { Verified::IfFirstAccount } else { Verified::No };
    match insert_organization(db, &name, &email, &hash, verified).await {
        Ok(Inserted { organization, verified: true }) => Ok(SignUp::Created { organization, verification: None }),
        Ok(Inserted { organization, verified: false }) => {
            let verification = new_verification_token(db, &organization.owner_id).await?;
            Ok(SignUp::Created { organization, verification: Some(verification) })
        }
        Err(AccountError::EmailTaken) => Ok(SignUp::EmailTaken { email }),
        Err(e) => Err(e),
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
    /// When the address was verified (see the module's documentation); None: not yet.
    pub verified_at: Option<i64>,
}

impl User {
    pub fn is_verified(&self) -> bool {
        self.verified_at.is_some()
    }
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

/// Login attempts allowed per pair of client address and email within a window
/// ([`throttle::WINDOW_SECS`]): someone guessing from one address stops here, and nobody else
/// (the account's owner from another address) is held back by it.
pub const MAX_LOGINS_PER_ADDRESS_AND_EMAIL: i64 = 5;
/// Failed login attempts allowed per client address, whatever the email, within a window:
/// one address trying many accounts.
pub const MAX_LOGINS_PER_ADDRESS: i64 = 50;
/// Failed login attempts of one email, from any address, before its backoff starts; then
/// each attempt waits a delay after the one before, doubling from one second up to the
/// operator's maximum (30 s by default): guessing from many addresses is slowed, and the
/// owner from a fresh address waits at most that maximum.
pub const FREE_LOGINS_PER_EMAIL: i64 = 10;

/// Why a login did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("Incorrect email or password.")]
    Invalid,
    #[error("Too many failed attempts. Try again in a few minutes.")]
    Throttled,
    #[error("Too many failed attempts for this account. Try again in {seconds} s.")]
    Backoff { seconds: u64 },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Checks an email and password from `client` (an address), throttled per pair of address and
/// email, per address, and with a per-email backoff whose longest wait is `backoff_max`. Each
/// attempt is counted before its password is checked, in the statement that decides whether
/// it may go on, so concurrent guesses cannot slip past the limits. The password is verified
/// against a stand-in hash when the email is unknown, so the answer takes as long either way.
pub async fn login(
    db: &Db,
    email: &str,
    password: &str,
    client: &str,
    backoff_max: Duration,
) -> Result<User, LoginError> {
    let Ok(email) = normalize_email(email) else { return Err(LoginError::Invalid) };
    let pair = format!("login:{client}:{email}");
    let address = format!("login-address:{client}");
    let account = format!("login-email:{email}");
    let now = UnixMillis::now();
    if !throttle::take(db, &pair, MAX_LOGINS_PER_ADDRESS_AND_EMAIL, now).await? {
        return Err(LoginError::Throttled);
    }
    if !throttle::take(db, &address, MAX_LOGINS_PER_ADDRESS, now).await? {
        throttle::give_back(db, &pair).await?;
        return Err(LoginError::Throttled);
    }
    let backoff = Backoff { free: FREE_LOGINS_PER_EMAIL, first_delay: Duration::from_secs(1), max_delay: backoff_max };
    if let Err(wait) = throttle::claim(db, &account, backoff, now).await? {
        // Waiting for the account's backoff is not a guess: it costs this address nothing.
        throttle::give_back(db, &pair).await?;
        throttle::give_back(db, &address).await?;
        return Err(LoginError::Backoff {
            seconds: u64::try_from(wait.as_millis().div_ceil(1000)).unwrap_or(u64::MAX),
        });
    }
    const SQL: &str = "SELECT id, email, verified_at, password_hash FROM users WHERE email = $1";
    let row: Option<(UserId, String, Option<i64>, String)> =
        with_db!(db, pool => sqlx::query_as(SQL).bind(&email).fetch_optional(pool).await).map_err(DbError::from)?;
    let hash = row.as_ref().map_or_else(|| crypto::dummy_password_hash().to_owned(), |r| r.3.clone());
    let password = password.to_owned();
    let verified =
        tokio::task::spawn_blocking(move || crypto::verify_password(&password, &hash)).await.unwrap_or(false);
    match row {
        Some((id, email, verified_at, _)) if verified => {
            throttle::clear(db, &pair).await?;
            throttle::give_back(db, &address).await?;
            throttle::give_back(db, &account).await?;
            Ok(User { id, email, verified_at })
        }
        _ => Err(LoginError::Invalid),
    }
}

pub async fn get_user(db: &Db, id: &UserId) -> Result<Option<User>, DbError> {
    const SQL: &str = "SELECT id, email, verified_at FROM users WHERE id = $1";
    Ok(with_db!(db, pool => sqlx::query_as::<_, User>(SQL).bind(id).fetch_optional(pool).await)?)
}

/// The organizations a user belongs to, oldest membership first.
pub async fn memberships(db: &Db, user: &UserId) -> Result<Vec<Membership>, DbError> {
    const SQL: &str = "SELECT m.org_id, o.name AS org_name, m.role FROM memberships m                        JOIN organizations o ON o.id = m.org_id WHERE m.user_id = $1 ORDER BY m.created_at, o.name";
    Ok(with_db!(db, pool => sqlx::query_as::<_, Membership>(SQL).bind(user).fetch_all(pool).await)?)
}

/// Changes a password after checking the current one, and ends every other session of the
/// account (`keep_session`: the id of the session making the change, which stays).
pub async fn change_password(
    db: &Db,
    user: &UserId,
    current: &str,
    new: &str,
    keep_session: Option<&str>,
) -> Result<(), AccountError> {
    const SQL: &str = "SELECT password_hash FROM users WHERE id = $1";
    let hash: Option<String> = with_db!(db, pool => sqlx::query_scalar(SQL).bind(user).fetch_optional(pool).await)?;
    let current = current.to_owned();
    let hash = hash.unwrap_or_else(|| crypto::dummy_password_hash().to_owned());
    let ok = tokio::task::spawn_blocking(move || crypto::verify_password(&current, &hash)).await.unwrap_or(false);
    if !ok {
        return Err(AccountError::Password("the current password is not correct".to_owned()));
    }
    set_password(db, user, new).await?;
    sessions::end_all_for_user(db, user.as_str(), keep_session).await?;
    Ok(())
}

async fn set_password(db: &Db, user: &UserId, new: &str) -> Result<(), AccountError> {
    validate_password(new)?;
    let hash = hash_password(new).await?;
    with_db!(db, pool => sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2").bind(&hash).bind(user)
        .execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// How long a password reset link works.
pub const RESET_TTL_SECS: i64 = 60 * 60;

/// Starts a password reset: a one-time token for the account of `email`, if there is one.
/// Callers throttle first ([`allow_reset_request`]).
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
/// stops working too, and every session of the account ends (whoever held one must now know
/// the new password). The link came by mail, so the address counts as verified from now on.
pub async fn finish_password_reset(db: &Db, token: &str, new: &str) -> Result<UserId, AccountError> {
    validate_password(new)?;
    const CLAIM: &str = "UPDATE password_resets SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL \
                         AND expires_at > $1 RETURNING user_id";
    let now = UnixMillis::now().0;
    let user: Option<UserId> = with_db!(db, pool => sqlx::query_scalar(CLAIM).bind(now)
        .bind(crypto::token_hash(token)).fetch_optional(pool).await)?;
    let user = user.ok_or(AccountError::ResetLink)?;
    set_password(db, &user, new).await?;
    with_db!(db, pool => sqlx::query("UPDATE password_resets SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL")
        .bind(now).bind(&user).execute(pool).await.map(|_| ()))?;
    mark_verified(db, &user, now).await?;
    sessions::end_all_for_user(db, user.as_str(), None).await?;
    Ok(user)
}

// ---------------------------------------------------------------------------------------
// Verifying an address

/// How long a confirmation link works, and how long an unverified account lives.
pub const VERIFICATION_TTL_SECS: i64 = 7 * 24 * 3600;

/// A new confirmation link's token for an unverified account; None if the account is verified
/// already (or gone). Callers that mail it on request throttle first ([`allow_verification_mail`]).
pub async fn start_email_verification(db: &Db, user: &UserId) -> Result<Option<String>, DbError> {
    match get_user(db, user).await? {
        Some(u) if !u.is_verified() => Ok(Some(new_verification_token(db, user).await?)),
        _ => Ok(None),
    }
}

async fn new_verification_token(db: &Db, user: &UserId) -> Result<String, DbError> {
    let token = crypto::random_token();
    const SQL: &str = "INSERT INTO email_verifications (token_hash, user_id, expires_at) VALUES ($1, $2, $3)";
    with_db!(db, pool => sqlx::query(SQL).bind(crypto::token_hash(&token)).bind(user)
        .bind(UnixMillis::now().plus_secs(VERIFICATION_TTL_SECS).0).execute(pool).await.map(|_| ()))?;
    Ok(token)
}

/// Verifies `user`'s address with a confirmation link's token. The caller must be logged in as
/// that account: the link proves the mailbox, the login proves the password, and only both
/// together make the account its holder's (someone who clicks a link sent by another's sign-up
/// verifies nothing).
pub async fn verify_email(db: &Db, token: &str, user: &UserId) -> Result<(), AccountError> {
    const CLAIM: &str = "UPDATE email_verifications SET used_at = $1 WHERE token_hash = $2 AND user_id = $3 \
                         AND used_at IS NULL AND expires_at > $1";
    let now = UnixMillis::now().0;
    let claimed = with_db!(db, pool => sqlx::query(CLAIM).bind(now).bind(crypto::token_hash(token)).bind(user)
        .execute(pool).await.map(|r| r.rows_affected()))?;
    if claimed == 0 {
        return Err(AccountError::VerificationLink);
    }
    mark_verified(db, user, now).await?;
    Ok(())
}

async fn mark_verified(db: &Db, user: &UserId, now: i64) -> Result<(), DbError> {
    const SQL: &str = "UPDATE users SET verified_at = $1 WHERE id = $2 AND verified_at IS NULL";
    with_db!(db, pool => sqlx::query(SQL).bind(now).bind(user).execute(pool).await.map(|_| ()))?;
    Ok(())
}

/// Deletes the accounts left unverified for [`VERIFICATION_TTL_SECS`], with the organizations
/// they alone belong to (an unverified account can neither join another nor invite anyone),
/// and spent or expired confirmation links (housekeeping); returns how many rows went.
pub async fn delete_expired_unverified(db: &Db, now: UnixMillis) -> Result<u64, DbError> {
    const EXPIRED: &str = "SELECT id FROM users WHERE verified_at IS NULL AND created_at <= $1";
    const ORGS: &str = "DELETE FROM organizations WHERE id IN \
        (SELECT m.org_id FROM memberships m WHERE m.user_id = $1) \
        AND NOT EXISTS (SELECT 1 FROM memberships o WHERE o.org_id = organizations.id AND o.user_id <> $1)";
    const USER: &str = "DELETE FROM users WHERE id = $1 AND verified_at IS NULL";
    const LINKS: &str = "DELETE FROM email_verifications WHERE expires_at <= $1 OR used_at IS NOT NULL";
    let cutoff = now.plus_secs(-VERIFICATION_TTL_SECS).0;
    let expired: Vec<UserId> = with_db!(db, pool => sqlx::query_scalar(EXPIRED).bind(cutoff).fetch_all(pool).await)?;
    let mut removed = 0;
    for user in expired {
        let result: Result<u64, sqlx::Error> = with_db!(db, pool => async {
            let mut tx = pool.begin().await?;
            let orgs = sqlx::query(ORGS).bind(&user).execute(&mut *tx).await?.rows_affected();
            let users = sqlx::query(USER).bind(&user).execute(&mut *tx).await?.rows_affected();
            tx.commit().await?;
            Ok(orgs + users)
        }
        .await);
        removed += result?;
        sessions::end_all_for_user(db, user.as_str(), None).await?;
    }
    removed += with_db!(db, pool => sqlx::query(LINKS).bind(now.0).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(removed)
}

// ---------------------------------------------------------------------------------------
// Throttling what strangers can ask for

/// Reset requests allowed per client address, and per email, within a window.
pub const MAX_RESET_REQUESTS_PER_ADDRESS: i64 = 10;
pub const MAX_RESET_REQUESTS_PER_EMAIL: i64 = 3;
/// Sign-ups allowed per client address, and per email, within a window.
pub const MAX_SIGN_UPS_PER_ADDRESS: i64 = 5;
pub const MAX_SIGN_UPS_PER_EMAIL: i64 = 3;
/// Confirmation links one account may ask to be mailed again within a window.
pub const MAX_VERIFICATION_MAILS_PER_ACCOUNT: i64 = 3;

/// Counts a reset request from `client` for `email`; false if over a limit (nothing is sent).
pub async fn allow_reset_request(db: &Db, client: &str, email: &str) -> Result<bool, DbError> {
    let email = email.trim().to_lowercase();
    take_all(
        db,
        &[
            (format!("reset-address:{client}"), MAX_RESET_REQUESTS_PER_ADDRESS),
            (format!("reset-email:{email}"), MAX_RESET_REQUESTS_PER_EMAIL),
        ],
    )
    .await
}

/// Counts a sign-up from `client` for `email` (normalized); false if over a limit.
async fn allow_sign_up(db: &Db, client: &str, email: &str) -> Result<bool, DbError> {
    take_all(
        db,
        &[
            (format!("signup-address:{client}"), MAX_SIGN_UPS_PER_ADDRESS),
            (format!("signup-email:{email}"), MAX_SIGN_UPS_PER_EMAIL),
        ],
    )
    .await
}

/// Counts a request to mail `user` a confirmation link again; false if over the limit.
pub async fn allow_verification_mail(db: &Db, user: &UserId) -> Result<bool, DbError> {
    take_all(db, &[(format!("verify-mail:{user}"), MAX_VERIFICATION_MAILS_PER_ACCOUNT)]).await
}

/// Counts one attempt against each key in turn; false at the first over its limit.
async fn take_all(db: &Db, limits: &[(String, i64)]) -> Result<bool, DbError> {
    let now = UnixMillis::now();
    for (key, limit) in limits {
        if !throttle::take(db, key, *limit, now).await? {
            return Ok(false);
        }
    }
    Ok(true)
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
    #[error("Confirm your email address first: open the link we mailed you (the Account page sends it again).")]
    Unverified,
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

/// Invites `email` to `org` as `role` (admin or viewer); returns the one-time link token. The
/// inviter must be verified (an unverified account could otherwise have mail sent anywhere).
pub async fn invite(
    db: &Db,
    org: &OrgId,
    email: &str,
    role: Role,
    by: &User,
) -> Result<(Invitation, String), MemberError> {
    if !by.is_verified() {
        return Err(MemberError::Unverified);
    }
    let by = &by.id;
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

/// Accepts an invitation for an existing, verified account (whose email must be the invited
/// one). The invitation is claimed and the membership made in one transaction, once.
pub async fn accept_invitation(db: &Db, token: &str, user: &User) -> Result<Invitation, MemberError> {
    let invitation = invitation(db, token).await?.ok_or(MemberError::InvitationGone)?;
    if invitation.email != user.email {
        return Err(MemberError::WrongAccount(invitation.email));
    }
    // Read again: the caller's copy may predate a verification, never the other way round.
    let verified = get_user(db, &user.id).await?.is_some_and(|u| u.is_verified());
    if !verified {
        return Err(MemberError::Unverified);
    }
    join(db, &invitation, &user.id, None).await?;
    Ok(invitation)
}

/// Creates the invited person's account and membership in one transaction. The link came by
/// mail to the invited address, so the account is verified.
pub async fn sign_up_with_invitation(db: &Db, token: &str, password: &str) -> Result<(User, Invitation), MemberError> {
    let invitation = invitation(db, token).await?.ok_or(MemberError::InvitationGone)?;
    validate_password(password)?;
    let hash = hash_password(password).await?;
    let now = UnixMillis::now().0;
    let user = User { id: UserId::generate(), email: invitation.email.clone(), verified_at: Some(now) };
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
    const USER: &str =
        "INSERT INTO users (id, email, password_hash, created_at, verified_at) VALUES ($1, $2, $3, $4, $4)";
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

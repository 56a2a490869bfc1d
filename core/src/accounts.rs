//! Organizations (tenants), users and memberships: the accounts side of the domain, used by
//! `tollgate admin` now and by the dashboard's sign-up later.

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

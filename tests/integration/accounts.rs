//! Organizations with their owner: created whole or not at all.

use tollgate_core::accounts::{self, AccountError, NewOrganization};
use tollgate_core::{crypto, with_db};

use crate::db_cases;
use crate::helpers::{DbCase, TestDatabase, TestResult};

pub fn cases() -> Vec<DbCase> {
    db_cases![
        an_organization_is_created_with_its_owner,
        a_duplicate_email_is_refused_and_nothing_is_half_saved,
        bad_input_names_the_field,
    ]
}

async fn migrated(db: &TestDatabase) -> anyhow::Result<tollgate_core::Db> {
    let pool = db.connect().await?;
    pool.migrate().await?;
    Ok(pool)
}

async fn counts(db: &tollgate_core::Db) -> anyhow::Result<(i64, i64, i64)> {
    let q = |table: &'static str| format!("SELECT COUNT(*) FROM {table}");
    let mut out = [0i64; 3];
    for (i, table) in ["organizations", "users", "memberships"].into_iter().enumerate() {
        let sql = q(table);
        out[i] = with_db!(db, pool => sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql)).fetch_one(pool).await)?;
    }
    Ok((out[0], out[1], out[2]))
}

async fn an_organization_is_created_with_its_owner(db: TestDatabase) -> TestResult {
    let db = migrated(&db).await?;
    let created = accounts::create_organization_with_owner(
        &db,
        NewOrganization { name: "  Acme AI ", owner_email: "Ada@Example.com", owner_password: "correct horse battery" },
    )
    .await?;
    let orgs = accounts::list_organizations(&db).await?;
    assert_eq!(orgs.len(), 1);
    assert_eq!(orgs[0].id, created.org_id);
    assert_eq!(orgs[0].name, "Acme AI");
    assert_eq!(orgs[0].owner_email.as_deref(), Some("ada@example.com"));
    let (hash, role): (String, String) = with_db!(&db, pool => sqlx::query_as(
        "SELECT u.password_hash, m.role FROM users u JOIN memberships m ON m.user_id = u.id WHERE u.id = $1")
        .bind(&created.owner_id).fetch_one(pool).await)?;
    assert_eq!(role, "owner");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(crypto::verify_password("correct horse battery", &hash));
    Ok(())
}

async fn a_duplicate_email_is_refused_and_nothing_is_half_saved(db: TestDatabase) -> TestResult {
    let db = migrated(&db).await?;
    let first =
        NewOrganization { name: "Acme", owner_email: "ada@example.com", owner_password: "correct horse battery" };
    accounts::create_organization_with_owner(&db, first).await?;
    let second =
        NewOrganization { name: "Other", owner_email: " ADA@example.com", owner_password: "another long password" };
    let err = accounts::create_organization_with_owner(&db, second).await.unwrap_err();
    assert!(matches!(err, AccountError::EmailTaken), "{err:?}");
    assert_eq!(err.to_string(), "email: an account with this email already exists");
    // The second organization must not exist without its owner.
    assert_eq!(counts(&db).await?, (1, 1, 1));
    Ok(())
}

async fn bad_input_names_the_field(db: TestDatabase) -> TestResult {
    let db = migrated(&db).await?;
    let cases = [
        ("", "ada@example.com", "long enough pw", "organization name"),
        ("Acme", "not-an-email", "long enough pw", "email"),
        ("Acme", "ada@example.com", "short", "password"),
        (&*"n".repeat(101), "ada@example.com", "long enough pw", "organization name"),
    ];
    for (name, email, password, field) in cases {
        let err = accounts::create_organization_with_owner(
            &db,
            NewOrganization { name, owner_email: email, owner_password: password },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().starts_with(field), "{field}: {err}");
    }
    assert_eq!(counts(&db).await?, (0, 0, 0));
    Ok(())
}

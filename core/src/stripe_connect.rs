//! Stripe Connect onboarding that proves ownership: a tenant attaches its Stripe account only by
//! going through Stripe's OAuth flow for Standard accounts, with a signed, expiring, single-use
//! `state` naming the project and the member who started it; and disconnecting clears what
//! belonged to the account, so another account provisions afresh.
//!
//! The flow (Stripe, "Using OAuth with Standard accounts",
//! <https://docs.stripe.com/connect/oauth-standard-accounts>, and "Connect OAuth reference",
//! <https://docs.stripe.com/connect/oauth-reference>): the member is sent to
//! `/oauth/authorize?response_type=code&client_id=ca_…&scope=read_write&state=…&redirect_uri=…`;
//! Stripe sends the browser back to the redirect URI with `code` and `state` (or with
//! `error=access_denied` when the user declines); the platform then exchanges the code at
//! `POST /oauth/token` (`grant_type=authorization_code`, the platform's secret key), and the
//! answer's `stripe_user_id` is the account. A code is single-use and short-lived on Stripe's side;
//! `state` is the platform's own protection (the reference's "state: an arbitrary string value we
//! will pass back to you, useful for CSRF protection").
//!
//! State format: `<payload>.<signature>`, base64url without padding; the payload is JSON
//! `{"p": project, "u": user, "n": nonce, "exp": Unix ms}`, the signature HMAC-SHA256 under a key
//! derived from the master key. The nonce is stored until the callback consumes it, atomically.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::crypto::{MasterKey, hmac_sha256, random_token};
use crate::db::{Db, DbError};
use crate::ids::{ProjectId, UserId};
use crate::time::UnixMillis;
use crate::with_db;

/// How long a member has to come back from Stripe.
pub const STATE_TTL_MS: i64 = 15 * 60 * 1000;

/// Stripe's OAuth host (the authorize page and the token endpoint).
pub const DEFAULT_OAUTH_BASE: &str = "https://connect.stripe.com";

/// What a genuine state names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectState {
    #[serde(rename = "p")]
    pub project: ProjectId,
    #[serde(rename = "u")]
    pub user: UserId,
    #[serde(rename = "n")]
    pub nonce: String,
    pub exp: i64,
}

/// Why a state is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the link back from Stripe is not one this server made")]
    Forged,
    #[error("the link back from Stripe has expired (it is valid for 15 minutes): connect again")]
    Expired,
    #[error("the link back from Stripe was already used: connect again")]
    Used,
    #[error("the link back from Stripe was made for another member or project")]
    Elsewhere,
}

fn signing_key(master: &MasterKey) -> [u8; 32] {
    master.derive("tollgate stripe connect oauth state v1")
}

/// Makes a state for `user` connecting `project`, and stores its nonce until it is used or
/// expires. Expired nonces are swept here.
pub async fn issue_state(
    db: &Db,
    master: &MasterKey,
    project: &ProjectId,
    user: &UserId,
    now: UnixMillis,
) -> Result<String, DbError> {
    let claims =
        ConnectState { project: project.clone(), user: user.clone(), nonce: random_token(), exp: now.0 + STATE_TTL_MS };
    const SWEEP: &str = "DELETE FROM stripe_connect_states WHERE expires_at <= $1";
    const SQL: &str =
        "INSERT INTO stripe_connect_states (nonce, project_id, user_id, expires_at) VALUES ($1, $2, $3, $4)";
    with_db!(db, pool => async {
        sqlx::query(SWEEP).bind(now.0).execute(pool).await?;
        sqlx::query(SQL).bind(&claims.nonce).bind(project).bind(user).bind(claims.exp).execute(pool).await?;
        Ok::<(), sqlx::Error>(())
    }.await)?;
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
    let signature = URL_SAFE_NO_PAD.encode(hmac_sha256(&signing_key(master), payload.as_bytes()));
    Ok(format!("{payload}.{signature}"))
}

/// The claims of a state this server signed and that has not expired (not yet consumed: see
/// [`consume_state`]).
pub fn read_state(master: &MasterKey, state: &str, now: UnixMillis) -> Result<ConnectState, StateError> {
    let (payload, signature) = state.trim().split_once('.').ok_or(StateError::Forged)?;
    let presented = URL_SAFE_NO_PAD.decode(signature).map_err(|_| StateError::Forged)?;
    let expected = hmac_sha256(&signing_key(master), payload.as_bytes());
    if !crate::signature::constant_time_eq(&presented, &expected) {
        return Err(StateError::Forged);
    }
    let claims: ConnectState = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(StateError::Forged)?;
    if claims.exp <= now.0 {
        return Err(StateError::Expired);
    }
    Ok(claims)
}

/// Consumes the state's nonce: true once, for the member and project it names, before it
/// expires; one statement, so two callbacks racing with the same state cannot both pass.
pub async fn consume_state(db: &Db, claims: &ConnectState, now: UnixMillis) -> Result<bool, DbError> {
    const SQL: &str = "DELETE FROM stripe_connect_states \
        WHERE nonce = $1 AND project_id = $2 AND user_id = $3 AND expires_at > $4";
    let removed = with_db!(db, pool => sqlx::query(SQL).bind(&claims.nonce).bind(&claims.project).bind(&claims.user)
        .bind(now.0).execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(removed == 1)
}

/// The Stripe page a member is sent to (`/oauth/authorize` on `oauth_base`).
pub fn authorize_url(oauth_base: &str, client_id: &str, state: &str, redirect_uri: &str) -> String {
    let query = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("scope", "read_write"),
        ("state", state),
        ("redirect_uri", redirect_uri),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()))
    .collect::<Vec<_>>()
    .join("&");
    format!("{}/oauth/authorize?{query}", oauth_base.trim_end_matches('/'))
}

/// The path Stripe sends the member back to (registered in the platform's Connect settings as
/// `{TOLLGATE_PUBLIC_URL}` followed by this).
pub const CALLBACK_PATH: &str = "/stripe/connect/callback";

/// Forgets everything the project's Stripe account held for it, in one transaction: the
/// connection (with the meter, product and price ids provisioning recorded on it), each
/// customer's Stripe customer and subscription, the mirrored invoices, and the reconciliations
/// against the account's meter. Meter events not yet delivered are marked refused (they name
/// the old account's customers): nothing of the old account is sent to the next one.
/// Webhook events stay, for the record. True if the project was connected.
pub async fn clear_account(db: &Db, project: &ProjectId) -> Result<bool, DbError> {
    const CUSTOMERS: &str = "UPDATE customers SET stripe_customer_id = NULL, stripe_subscription_id = NULL, \
        stripe_subscription_status = NULL, stripe_subscription_state_at = NULL, stripe_provision_error = NULL, \
        stripe_provision_attempts = 0, stripe_provision_next_at = 0, stripe_subscription_started_at = NULL \
        WHERE project_id = $1";
    const INVOICES: &str = "DELETE FROM stripe_invoices WHERE project_id = $1";
    const RECONCILIATIONS: &str = "DELETE FROM billing_reconciliations \
        WHERE customer_id IN (SELECT id FROM customers WHERE project_id = $1)";
    const BATCHES: &str = "UPDATE meter_batches SET status = 'failed', \
        last_error = 'not delivered: the Stripe account was disconnected' \
        WHERE project_id = $1 AND status = 'pending'";
    const CONNECTION: &str = "DELETE FROM stripe_connections WHERE project_id = $1";
    let removed = with_db!(db, pool => async {
        let mut tx = pool.begin().await?;
        for sql in [CUSTOMERS, INVOICES, RECONCILIATIONS, BATCHES] {
            sqlx::query(sql).bind(project).execute(&mut *tx).await?;
        }
        let removed = sqlx::query(CONNECTION).bind(project).execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok::<u64, sqlx::Error>(removed)
    }
    .await)?;
    Ok(removed > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_verify_only_unaltered_and_unexpired() {
        let master = MasterKey::generate();
        let claims = ConnectState {
            project: ProjectId::generate(),
            user: UserId::generate(),
            nonce: "n1".to_owned(),
            exp: 10_000,
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let signature = URL_SAFE_NO_PAD.encode(hmac_sha256(&signing_key(&master), payload.as_bytes()));
        let state = format!("{payload}.{signature}");
        assert_eq!(read_state(&master, &state, UnixMillis(9_999)), Ok(claims));
        assert_eq!(read_state(&master, &state, UnixMillis(10_000)), Err(StateError::Expired));
        assert_eq!(read_state(&MasterKey::generate(), &state, UnixMillis(0)), Err(StateError::Forged));
        let forged = format!("{}.{signature}", URL_SAFE_NO_PAD.encode(b"{\"p\":\"x\"}"));
        assert_eq!(read_state(&master, &forged, UnixMillis(0)), Err(StateError::Forged));
        assert_eq!(read_state(&master, "nonsense", UnixMillis(0)), Err(StateError::Forged));
    }

    #[test]
    fn the_authorize_link_carries_what_stripe_asks_for() {
        let url =
            authorize_url("https://connect.stripe.com/", "ca_123", "a.b", "https://t.example/stripe/connect/callback");
        assert_eq!(
            url,
            "https://connect.stripe.com/oauth/authorize?response_type=code&client_id=ca_123&scope=read_write\
             &state=a.b&redirect_uri=https%3A%2F%2Ft.example%2Fstripe%2Fconnect%2Fcallback"
        );
    }

    #[test]
    fn the_operator_settings_are_checked() {
        use crate::config::Config;
        let env = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<std::collections::HashMap<_, _>>()
        };
        let c = Config::load(None, &env(&[])).unwrap();
        assert_eq!((c.stripe_connect_client_id, c.stripe_oauth_base.as_str()), (None, DEFAULT_OAUTH_BASE));
        let c = Config::load(
            None,
            &env(&[
                ("TOLLGATE_STRIPE_CONNECT_CLIENT_ID", "ca_Abc123"),
                ("TOLLGATE_STRIPE_OAUTH_BASE", "http://127.0.0.1:9/"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (c.stripe_connect_client_id.as_deref(), c.stripe_oauth_base.as_str()),
            (Some("ca_Abc123"), "http://127.0.0.1:9")
        );
        let e = Config::load(None, &env(&[("TOLLGATE_STRIPE_CONNECT_CLIENT_ID", "acct_123")])).unwrap_err();
        assert!(e.to_string().contains("TOLLGATE_STRIPE_CONNECT_CLIENT_ID"), "{e}");
        let e = Config::load(None, &env(&[("TOLLGATE_STRIPE_OAUTH_BASE", "connect.stripe.com")])).unwrap_err();
        assert!(e.to_string().contains("TOLLGATE_STRIPE_OAUTH_BASE"), "{e}");
    }
}

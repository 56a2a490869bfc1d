//! Customer tokens: what makes a publishable key safe to ship in a browser or mobile app.
//! A call made with a publishable key must carry a token that the tenant's backend minted
//! (`POST /api/v1/customer-tokens`); the token names one customer of one project and expires,
//! so a client can spend only its own customer's budget, and only for a while.
//!
//! Format: `tgct_<payload>.<signature>`, both base64url without padding. The payload is JSON
//! `{"p": project id, "c": customer id, "exp": Unix seconds, "iat_ms": Unix milliseconds}`; the signature is
//! HMAC-SHA256(project signing key, payload text), where the project's signing key is derived
//! from the master key and the project id. Nothing is stored: a token is checked by its
//! signature and expiry alone — with one exception: a customer deleted after a token was
//! issued is not brought back by that token (see [`CustomerToken::issued_at`]).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::crypto::{MasterKey, hmac_sha256};
use crate::ids::ProjectId;
use crate::time::UnixMillis;

pub const PREFIX: &str = "tgct_";
/// A token lives at most a day; 15 minutes unless asked otherwise.
pub const MAX_TTL_SECS: i64 = 24 * 3600;
pub const DEFAULT_TTL_SECS: i64 = 15 * 60;

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerToken {
    #[serde(rename = "p")]
    pub project: ProjectId,
    #[serde(rename = "c")]
    pub customer: String,
    /// Unix seconds.
    pub exp: i64,
    /// When it was issued, in Unix milliseconds (a customer deleted and a new token minted
    /// within the same second must still be told apart). Absent from tokens minted before it
    /// was added.
    #[serde(rename = "iat_ms", default, skip_serializing_if = "Option::is_none")]
    pub issued_at_ms: Option<i64>,
}

impl CustomerToken {
    /// When the token was issued: a customer deleted since then stays deleted for it. A token
    /// without an issue time is taken to be as old as a token can be.
    pub fn issued_at(&self) -> UnixMillis {
        UnixMillis(self.issued_at_ms.unwrap_or((self.exp - MAX_TTL_SECS) * 1000))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the customer token is malformed")]
    Malformed,
    #[error("the customer token's signature is not valid")]
    BadSignature,
    #[error("the customer token has expired")]
    Expired,
}

fn signing_key(master: &MasterKey, project: &ProjectId) -> [u8; 32] {
    master.derive(&format!("tollgate customer tokens v1 {project}"))
}

/// A token for `customer` of `project`, issued at `issued_at` and valid until `exp` (Unix
/// seconds).
pub fn mint(master: &MasterKey, project: &ProjectId, customer: &str, issued_at: UnixMillis, exp: i64) -> String {
    let claims =
        CustomerToken { project: project.clone(), customer: customer.to_owned(), exp, issued_at_ms: Some(issued_at.0) };
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
    let signature = URL_SAFE_NO_PAD.encode(hmac_sha256(&signing_key(master, project), payload.as_bytes()));
    format!("{PREFIX}{payload}.{signature}")
}

/// The claims of a genuine, unexpired token.
pub fn verify(master: &MasterKey, token: &str, now: UnixMillis) -> Result<CustomerToken, TokenError> {
    let body = token.trim().strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let (payload, signature) = body.split_once('.').ok_or(TokenError::Malformed)?;
    let claims: CustomerToken = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(TokenError::Malformed)?;
    let presented = URL_SAFE_NO_PAD.decode(signature).map_err(|_| TokenError::Malformed)?;
    let expected = hmac_sha256(&signing_key(master, &claims.project), payload.as_bytes());
    // Constant time: no early exit on the first differing byte.
    let same = presented.len() == expected.len()
        && presented.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if !same {
        return Err(TokenError::BadSignature);
    }
    if claims.exp * 1000 <= now.0 {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_unaltered_and_unexpired() {
        let master = MasterKey::generate();
        let project = ProjectId::generate();
        let now = UnixMillis(1_800_000_000_000);
        let token = mint(&master, &project, "cust-a", UnixMillis(1_800_000_000_250), 1_800_000_600);
        let claims = verify(&master, &token, now).unwrap();
        assert_eq!((claims.project.clone(), claims.customer.as_str()), (project.clone(), "cust-a"));
        assert_eq!(claims.issued_at(), UnixMillis(1_800_000_000_250));
        assert_eq!(verify(&master, &token, UnixMillis(1_800_000_600_000)), Err(TokenError::Expired));
        assert_eq!(verify(&MasterKey::generate(), &token, now), Err(TokenError::BadSignature));
        // Swapping in another customer's payload breaks the signature.
        let other = mint(&master, &project, "cust-b", UnixMillis(1_800_000_000_250), 1_800_000_600);
        let forged = format!("{}.{}", other.split_once('.').unwrap().0, token.split_once('.').unwrap().1);
        assert_eq!(verify(&master, &forged, now), Err(TokenError::BadSignature));
        assert_eq!(verify(&master, "tgct_nonsense", now), Err(TokenError::Malformed));
        assert_eq!(verify(&master, "Bearer x", now), Err(TokenError::Malformed));
    }

    #[test]
    fn a_token_without_issue_time_counts_as_old_as_a_token_can_be() {
        let claims: CustomerToken = serde_json::from_str(r#"{"p":"prj_x","c":"a","exp":1800086400}"#).unwrap();
        assert_eq!(claims.issued_at(), UnixMillis(1_800_000_000_000));
    }
}

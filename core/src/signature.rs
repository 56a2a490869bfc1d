//! Timestamped HMAC signatures in Stripe's scheme, used both ways: Tollgate signs its alert
//! webhooks with it, and checks Stripe's webhooks with it.
//!
//! The header is `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`, possibly
//! with several `v1=` values (Stripe sends one per active secret while a secret is rolled) and
//! other schemes (`v0=`), which are ignored. A signature is valid when one `v1` matches and `t`
//! is within the tolerance of now.

use crate::crypto::hmac_sha256_any_key;

/// How far from now a signature's timestamp may be (Stripe's default: 5 minutes).
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header has no timestamp (t=…)")]
    NoTimestamp,
    #[error("the signature header has no v1 signature")]
    NoSignature,
    #[error("the signature's timestamp is outside the tolerance (a replay, or a clock far off)")]
    OutsideTolerance,
    #[error("no v1 signature matches the body and the secret")]
    Mismatch,
}

/// The hex `v1` signature of `body` sent at `timestamp`.
pub fn v1(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    hex::encode(hmac_sha256_any_key(secret.as_bytes(), &message))
}

/// The whole header for `body` sent at `timestamp`.
pub fn header(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", v1(secret, timestamp, body))
}

/// Checks `header` against `body` and `secret` at `now_secs`.
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.trim().parse::<i64>().ok(),
            Some(("v1", v)) => signatures.push(v.trim()),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::NoTimestamp)?;
    if signatures.is_empty() {
        return Err(SignatureError::NoSignature);
    }
    let expected = v1(secret, timestamp, body);
    if !signatures.iter().any(|s| constant_time_eq(s.as_bytes(), expected.as_bytes())) {
        return Err(SignatureError::Mismatch);
    }
    if now_secs.saturating_sub(timestamp).abs() > tolerance_secs {
        return Err(SignatureError::OutsideTolerance);
    }
    Ok(())
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_reject() {
        let body = br#"{"id":"alr_1"}"#;
        let h = header("tgwhsec_x", 1_700_000_000, body);
        assert_eq!(verify("tgwhsec_x", &h, body, 1_700_000_100, 300), Ok(()));
        assert_eq!(verify("tgwhsec_x", &h, body, 1_700_000_400, 300), Err(SignatureError::OutsideTolerance));
        assert_eq!(verify("tgwhsec_y", &h, body, 1_700_000_100, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify("tgwhsec_x", &h, b"{}", 1_700_000_100, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify("tgwhsec_x", &format!("v0=00,{h},v1=00"), body, 1_700_000_000, 300), Ok(()));
        assert_eq!(verify("tgwhsec_x", "v1=00", body, 1_700_000_000, 300), Err(SignatureError::NoTimestamp));
        assert_eq!(verify("tgwhsec_x", "t=1", body, 1, 300), Err(SignatureError::NoSignature));
    }
}

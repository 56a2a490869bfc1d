//! Stripe webhook signatures: Tollgate's verifier (`tollgate_core::signature`) must agree with
//! Stripe's official `stripe` package on vectors it produces (`tests/python/stripe_signatures.py`):
//! valid, expired, tampered body and timestamp, wrong secret, several `v1=` values, `v0` only,
//! no timestamp, unicode and empty bodies.

use serde::Deserialize;
use tollgate_core::signature::{self, DEFAULT_TOLERANCE_SECS};

use super::PythonScript;
use crate::helpers::{PlainCase, TestResult};
use crate::plain_cases;

pub fn cases() -> Vec<PlainCase> {
    plain_cases![stripe_webhook_signatures_are_checked_as_stripe_checks_them]
}

#[derive(Debug, Deserialize)]
struct Vector {
    name: String,
    payload: String,
    secret: String,
    header: String,
    now: i64,
    stripe_accepts: bool,
}

async fn stripe_webhook_signatures_are_checked_as_stripe_checks_them() -> TestResult {
    let vectors: Vec<Vector> = serde_json::from_value(PythonScript::new("stripe_signatures.py").run_json().await?)?;
    assert!(vectors.len() >= 15, "only {} vectors", vectors.len());
    let mut disagreements = Vec::new();
    for v in &vectors {
        let ours = signature::verify(&v.secret, &v.header, v.payload.as_bytes(), v.now, DEFAULT_TOLERANCE_SECS);
        if ours.is_ok() != v.stripe_accepts {
            disagreements.push(format!("{}: stripe accepts = {}, tollgate: {ours:?}", v.name, v.stripe_accepts));
        }
    }
    assert!(disagreements.is_empty(), "disagreements with the stripe package:\n{}", disagreements.join("\n"));
    // The vectors mean what their names say (so the script cannot drift into trivial cases).
    let accepted: Vec<&str> = vectors.iter().filter(|v| v.stripe_accepts).map(|v| v.name.as_str()).collect();
    assert_eq!(
        accepted,
        [
            "valid",
            "valid, 299 s old",
            "several v1, the last valid (secret being rolled)",
            "several v1, the first valid",
            "v0 beside a valid v1",
            "unicode body",
            "empty body"
        ]
    );
    Ok(())
}

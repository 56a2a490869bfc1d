//! The `hostile_tenant` suite: what a stranger with a free account (or an end user with a
//! publishable key, or an upstream the tenant controls) tries, and what stops each attempt.
//! One module per front: each finding of issue 20 is a test here that failed before its fix.

mod accounts;
mod bounded;
mod egress;
mod identity;
mod secrets;

use crate::helpers::{DbCase, PlainCase};

/// The suite's tests that run on each database.
pub fn cases() -> Vec<DbCase> {
    let suites: Vec<Vec<DbCase>> =
        vec![accounts::cases(), bounded::cases(), egress::cases(), identity::cases(), secrets::cases()];
    suites.into_iter().flatten().collect()
}

/// The suite's tests that need no database of their own.
pub fn plain_cases() -> Vec<PlainCase> {
    let suites: Vec<Vec<PlainCase>> = vec![secrets::plain_cases()];
    suites.into_iter().flatten().collect()
}

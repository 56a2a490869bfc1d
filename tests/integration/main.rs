//! Tollgate's integration tests: the real server on a real database over real HTTP.
//!
//! Every database test runs twice: on SQLite, and on PostgreSQL when
//! `TOLLGATE_TEST_POSTGRES_URL` names a server (each test then gets a database of its own,
//! dropped afterwards). Without it the PostgreSQL variants are reported as ignored, and
//! a banner says so.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod accounts;
mod admission;
mod alerts;
mod analytics;
mod api;
mod apis;
mod billing;
mod bounded_maps;
mod browser;
mod budget_health;
mod cli;
mod connect_onboarding;
mod currencies;
mod customers;
mod dashboard;
mod fake_smtp;
mod fake_stripe;
mod fake_stripe_payment_rules;
mod fake_stripe_rules;
mod first_run;
mod helpers;
mod hostile_tenant;
mod invoicing;
mod jobs;
mod ledger;
mod limits;
mod meter_errors;
mod mock_provider;
mod ops;
mod payment_collection;
mod proxy;
mod python;
mod replicas;
mod schemathesis;
mod stripe_sdk;
mod stripe_webhooks;
mod tokens;
mod upgrades;
mod webdriver;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let postgres = helpers::postgres_admin_url();
    if postgres.is_none() && !args.list {
        eprintln!(
            "\n  PostgreSQL tests SKIPPED: set TOLLGATE_TEST_POSTGRES_URL (e.g. postgres://postgres@127.0.0.1:5432/postgres)\n  to run every database test on PostgreSQL as well.\n"
        );
    }
    let db_cases = [
        ops::cases(),
        accounts::cases(),
        jobs::cases(),
        cli::db_cases(),
        proxy::cases(),
        admission::cases(),
        ledger::cases(),
        apis::cases(),
        limits::cases(),
        replicas::cases(),
        customers::cases(),
        dashboard::cases(),
        python::cases(),
        upgrades::cases(),
        api::cases(),
        tokens::cases(),
        alerts::cases(),
        stripe_webhooks::cases(),
        billing::cases(),
        meter_errors::cases(),
        connect_onboarding::cases(),
        invoicing::cases(),
        currencies::cases(),
        payment_collection::cases(),
        schemathesis::cases(),
        browser::cases(),
        hostile_tenant::cases(),
        bounded_maps::cases(),
        first_run::cases(),
        budget_health::cases(),
        analytics::cases(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut trials = helpers::db_trials(db_cases, postgres);
    trials.extend(helpers::plain_trials(cli::plain_cases()));
    trials.extend(helpers::plain_trials(python::plain_cases()));
    trials.extend(helpers::plain_trials(stripe_sdk::cases()));
    trials.extend(helpers::plain_trials(fake_stripe_rules::cases()));
    trials.extend(helpers::plain_trials(fake_stripe_payment_rules::cases()));
    trials.extend(helpers::plain_trials(connect_onboarding::plain_cases()));
    trials.extend(helpers::plain_trials(hostile_tenant::plain_cases()));
    trials.extend(helpers::plain_trials(dashboard::plain_cases()));
    libtest_mimic::run(&args, trials).exit_code()
}

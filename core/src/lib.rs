//! Tollgate's shared domain: the types and functions both the server (`tollgate`) and the
//! background jobs (`tollgate-jobs`) use. Nothing here serves HTTP or knows job queues.
//!
//! - [`money`] and [`ids`]: types that carry meaning (`Nanos`, `OrgId`, …).
//! - [`bounded`]: the bounded map behind every per-key, per-customer and per-project cache.
//! - [`config`]: settings from the environment and an optional TOML file, validated once.
//! - [`crypto`]: the master key, encryption at rest, password hashing; [`reseal`] upgrades old sealed values.
//! - [`db`]: the database handle for SQLite or PostgreSQL, and migrations.
//! - [`accounts`]: organizations, users, memberships, logins and password resets.
//! - [`sessions`] and [`audit`]: dashboard sessions, and who changed what.
//! - [`throttle`]: attempt counters (logins, reset requests, sign-ups), each decided in one statement.
//! - [`projects`]: projects, keys, providers, prices and end-customers.
//! - [`pricing`] and [`period`]: what a call costs, and the window a budget counts in.
//! - [`ledger`]: reserve before a call, settle after it, and the usage events.
//! - [`tokens`]: customer tokens, which make publishable keys safe in clients.
//! - [`customers`] and [`usage`]: customers as tenants manage them, and the ledger read for people;
//!   [`analytics`]: cost, billed and margin of a date range by day, model and customer.
//! - [`signature`]: Stripe-style timestamped HMAC signatures (our alert webhooks, Stripe's webhooks).
//! - [`stripe`]: each project's Stripe connection, and Stripe's webhook events as received.
//! - [`payment_collection`]: how a project's subscriptions collect payment, and the return URLs
//!   of payment-method setup and customer portal links.
//! - [`alerts`]: budget alerts, which fire once per customer and period, and their deliveries.
//! - [`health`]: a customer's budget health (ok, near limit, exhausted, payment failed, blocked).
//! - [`egress`]: where a tenant-chosen destination (provider, webhook) may be, and the one
//!   client that calls it.
//! - [`first_run`]: what a project still lacks before its first call works, and provider tests.

pub mod accounts;
pub mod alerts;
pub mod analytics;
pub mod audit;
pub mod billing;
pub mod bounded;
pub mod config;
pub mod crypto;
pub mod currency;
pub mod customers;
pub mod db;
pub mod egress;
pub mod estimate;
pub mod first_run;
pub mod health;
pub mod idempotency;
pub mod ids;
pub mod instances;
pub mod ledger;
pub mod meter_errors;
pub mod money;
pub mod one_off;
pub mod payment_collection;
pub mod period;
pub mod pricing;
pub mod projects;
pub mod reseal;
pub mod sessions;
pub mod signature;
pub mod stripe;
pub mod stripe_connect;
pub mod throttle;
pub mod time;
pub mod tokens;
pub mod usage;
pub mod vision;

pub use config::Config;
pub use db::Db;

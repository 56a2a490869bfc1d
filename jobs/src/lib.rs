//! The slow path: background work on apalis, in the `serve` process or in separate
//! `tollgate worker` processes. It meets the hot path (proxy → ledger) only at the database
//! and at the job queue, whose storage lives in the same database as everything else.
//!
//! - [`JobStore`]: the queues (apalis storage on SQLite or PostgreSQL) and how to push onto them.
//! - [`run_workers`]: the workers of one process, until shutdown.
//! - [`housekeeping`]: the periodic jobs (worker heartbeat, pruning).
//! - [`alerts`]: budget alerts found by a scan and delivered (webhook, mail) with retries.
//! - [`billing`]: Stripe provisioning, the meter event outbox's delivery, reconciliation.
//! - [`mail`]: outgoing mail.
//! - [`one_off`]: one-off invoices for usage no subscription invoice would carry.
//! - [`meter_errors`]: thin events from event destinations (meter error reports), fetched and applied.
//! - [`payment_links`]: payment-method setup and customer portal links for end-customers.
//! - [`stripe_api`]: calls to Stripe's API, with errors classified for retries.

pub mod alerts;
pub mod billing;
pub mod housekeeping;
pub mod mail;
pub mod meter_errors;
pub mod one_off;
pub mod payment_links;
pub mod saved_payment_methods;
mod store;
pub mod stripe_api;
pub mod stripe_check;
pub mod stripe_oauth;
mod workers;

pub use alerts::AlertServices;
pub use billing::BillingServices;
pub use store::{JobStore, JobStoreError};
pub use workers::{WorkerOptions, run_workers};

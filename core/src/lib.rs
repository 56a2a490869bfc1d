//! Tollgate's shared domain: the types and functions both the server (`tollgate`) and the
//! background jobs (`tollgate-jobs`) use. Nothing here knows about HTTP or job queues.
//!
//! - [`money`] and [`ids`]: types that carry meaning (`Nanos`, `OrgId`, …).
//! - [`config`]: settings from the environment and an optional TOML file, validated once.
//! - [`crypto`]: the master key, encryption at rest, password hashing.
//! - [`db`]: the database handle for SQLite or PostgreSQL, and migrations.
//! - [`accounts`]: organizations, users and memberships.

pub mod accounts;
pub mod config;
pub mod crypto;
pub mod db;
pub mod ids;
pub mod money;
pub mod time;

pub use config::Config;
pub use db::Db;

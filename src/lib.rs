//! Tollgate's server: the HTTP face (proxy, dashboard, management API, operations
//! endpoints) and the command line that starts it. Domain logic lives in `tollgate-core`;
//! background work in `tollgate-jobs`.
//!
//! - [`cli`]: `tollgate serve | worker | migrate | admin`.
//! - [`app`]: builds the router and runs the server with graceful shutdown.
//! - [`serve`]: the HTTP/1.1 server loop, its read timeouts; [`shutdown`]: signals, calls in flight.
//! - [`routes`]: one module per face; [`middleware`]: request id, metrics.
//! - [`mail`]: outgoing mail (SMTP, or the log).
//! - [`memory`]: what the process keeps in memory, each structure's bound and its gauge.

pub mod app;
pub mod cli;
pub mod memory;
pub mod middleware;
pub mod routes;
pub mod serve;
pub mod shutdown;
pub mod state;
pub mod telemetry;

pub use app::Application;

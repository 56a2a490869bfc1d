//! Cross-cutting layers, each in its own module; [`crate::app::router`] stacks them in one
//! place so their order is visible.

pub mod client_addr;
pub mod hsts;
pub mod http_metrics;
pub mod request_id;

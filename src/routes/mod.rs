//! The HTTP faces, one module each.

pub mod api;
pub mod dashboard;
pub mod ops;
pub mod proxy;
pub mod stripe;

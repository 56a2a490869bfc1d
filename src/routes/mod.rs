//! The HTTP faces, one module each.

pub mod ops;
pub mod proxy;

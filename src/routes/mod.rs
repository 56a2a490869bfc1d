//! The HTTP faces, one module each.

pub mod ops;

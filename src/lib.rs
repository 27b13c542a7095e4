//! # mmada-rs
//!
//! Facade over the workspace crates, for integration tests, benches and users who want one
//! dependency. See `crates/README.md` for the crate charter.

pub use mmada_model as model;

//! The federation's rules as pure data-in/data-out code.
//!
//! Architecture invariant: this crate does no I/O. It knows nothing of tokio, libp2p, axum
//! or redb; clocks, randomness and storage are passed in by the caller (`node`, or the
//! simulator). `tests/tests/e2e.rs` checks the dependency tree to keep this true.

pub mod catalogue;
pub mod checkdigit;
pub mod coupon;
pub mod directory;
pub mod document;
pub mod gs1;
pub mod handoff;
pub mod ledger;
pub mod municipality;
pub mod person;
pub mod replication;
pub mod statistics;
pub mod terminal;
pub mod tip;
pub mod validation;

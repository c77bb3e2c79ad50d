//! The protocol crate's one integration-test binary.

mod codecs;
mod replication;
mod validation;

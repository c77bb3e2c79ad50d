//! `vrs-node`: a municipality's node — storage, HTTP API, resident import, coupon issuance.
//!
//! The rules (validation, document shapes) live in the `protocol` crate; this crate owns the
//! I/O around them: redb ([`store`]), the single group-committing writer ([`writer`]), axum
//! ([`api`]), files ([`import`], [`issuance`]) and the clock ([`clock`]).

pub mod api;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod demo_federation;
pub mod federation;
mod gate;
pub mod handoff;
pub mod import;
pub mod issuance;
pub mod ledger;
pub mod movers;
pub mod national;
pub mod national_api;
pub mod p2p;
pub mod peer_limits;
pub mod problem;
pub mod smoke;
pub mod statistics;
pub mod store;
pub mod terminal;
pub mod terminals;
pub mod tls;
pub mod writer;

//! The sans-IO core: pure, deterministic logic. Nothing in here touches tokio, quinn, fjall,
//! a clock or a socket; time and randomness come in as arguments (`.ci/run` checks this).
//!
//! - [`ids`]: node ids and actor ids.
//! - [`epoch`]: key actors and node incarnations, so that no dot is ever issued twice.
//! - [`ring`]: partitions, the claim, preference lists.
//! - [`cluster`]: the versioned ring and member states that gossip carries.
//! - [`version`]: dotted version vector sets (siblings and causality).
//! - [`object`]: what a key stores, its record and context formats, put and merge rules.
//! - [`quorum`]: consistency levels and quorum trackers.
//! - [`request`]: the coordinator's request state machines.
//! - [`placement`]: targets of a request, with sloppy-quorum fallbacks.
//! - [`gossip`], [`failure`]: scuttlebutt membership and phi accrual failure detection.
//! - [`hints`]: hinted handoff record formats.
//! - [`retire`]: which actors a key's clock may forget, and how old contexts naming them read.
//! - [`tictac`]: tictac Merkle trees and the exchange steps of active anti-entropy.

pub mod cluster;
pub mod epoch;
pub mod failure;
pub mod gossip;
pub mod handoff;
pub mod hints;
pub mod ids;
pub mod object;
pub mod placement;
pub mod quorum;
pub mod request;
pub mod retire;
pub mod ring;
pub mod tictac;
pub mod version;

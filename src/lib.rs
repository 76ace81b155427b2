//! dynkv: a leaderless, eventually consistent, Dynamo-style key-value store.
//!
//! # Layout
//! - [`core`]: the sans-IO core — ring, versions (DVVSet), objects, quorums, request state
//!   machines. Pure and deterministic; no tokio, quinn, fjall, clock or socket.
//! - [`protocol`]: the client and peer messages, carried in versioned frames.
//! - [`net`]: the transport seam — QUIC with mutual TLS, and an in-memory network with fault
//!   injection for simulation; both serialize every message.
//! - [`storage`]: the fjall store, one keyspace per partition, with group commit.
//! - [`http`]: the Riak-compatible HTTP API, `/stats` and `/metrics`.
//! - [`server`]: the node (request coordination) and the process around it.
//! - [`client`]: the Rust client library.
//! - [`bench`]: workloads, key distributions, histograms and reports of `dynkv bench`.
//! - [`config`]: the documented, validated node configuration.

pub mod bench;
pub mod client;
pub mod config;
pub mod core;
pub mod http;
pub mod net;
pub mod pb;
pub mod protocol;
pub mod server;
pub mod storage;

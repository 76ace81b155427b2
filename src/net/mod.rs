//! The network shell: how one node's messages reach another.
//!
//! Everything above this module talks to a [`Transport`]: "send this request to that node and
//! give me its answer within this time". Two implementations pass one shared test suite:
//!
//! - [`quic::QuicPeers`] (with [`quic::QuicServer`] on the answering side) for production: one
//!   long-lived, mutually authenticated QUIC connection per peer, carrying pipelined requests
//!   over a small pool of long-lived bidirectional streams ([`rpc`]).
//! - [`memory::MemoryTransport`] for deterministic simulation: no sockets, seeded randomness,
//!   tokio's clock, and fault injection (cut links, isolate nodes, loss, delay, duplication).
//!
//! The module is generic over the message types: the node-to-node protocol and the client
//! protocol are two instantiations of the same machinery.
//!
//! # Layout
//! - [`frame`]: the versioned wire frame and its codec (both transports use it).
//! - [`tls`]: the cluster PKI (CA, node certificates) and the rustls/quinn configurations.
//! - [`rpc`]: request/response over one QUIC connection, client and server halves.
//! - [`quic`]: endpoints, the accept loop, the per-peer connection cache.
//! - [`memory`]: the in-memory network for simulation.
//!
//! # Wire format
//! Every message travels in one frame: a fixed 16-byte header followed by the body.
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..2 | magic | `b"DK"`; anything else is not our protocol and closes the connection |
//! | 2 | wire version | `1`; a frame of another version closes the connection |
//! | 3 | kind | `0` request, `1` response, `2` error (the body is a UTF-8 reason) |
//! | 4..12 | request id | u64 big-endian; a response carries the id of its request |
//! | 12..16 | body length | u32 big-endian; checked against [`RpcLimits::max_frame_bytes`] before any allocation |
//! | 16.. | body | MessagePack (rmp-serde, structs as maps so fields can be added later) |

pub mod budget;
pub mod frame;
pub mod memory;
pub mod quic;
pub mod rpc;
pub mod tls;

#[cfg(test)]
mod suite;
#[cfg(test)]
mod test_support;

use crate::core::ids::NodeId;
use std::time::Duration;

pub use frame::FrameError;
pub use memory::{MemoryNetwork, MemoryTransport};
pub use quic::{QuicPeers, QuicServer};
pub use rpc::{BoxFuture, Handler};

/// The most bidirectional streams a peer may hold open on one connection. The client side uses
/// [`RpcLimits::streams_per_connection`] of them; the server accepts up to this many so that a
/// peer with a larger pool still works, and QUIC flow control enforces the bound.
pub const MAX_STREAMS_PER_CONNECTION: usize = 64;

/// Request frames up to this size share a connection's first stream; see
/// [`RpcLimits::streams_per_connection`].
pub const SMALL_FRAME_BYTES: usize = 16 * 1024;

/// The seam between the node logic and the network.
///
/// The returned future is `'static` so a caller can spawn it or race it without borrowing the
/// transport. A call either returns the peer's response or a [`TransportError`]; it never takes
/// (much) longer than `timeout`.
pub trait Transport<Req, Resp>: Send + Sync + 'static {
    fn call(
        &self,
        to: &NodeId,
        request: Req,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Resp, TransportError>>;
}

/// Why a call produced no response. Every variant is a normal event on a real network; callers
/// treat them all as "no answer from that replica" and differ only in logging and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No response arrived in time. The request may or may not have been processed.
    #[error("no response from {peer} within {timeout_ms} ms")]
    Timeout { peer: NodeId, timeout_ms: u64 },
    /// A connection could not be established (no route, no answer to the handshake).
    #[error("cannot reach {peer}: {reason}")]
    Unreachable { peer: NodeId, reason: String },
    /// The connection failed or was closed (TLS refused, peer shut down, protocol violation);
    /// the request may or may not have been processed.
    #[error("connection to {peer} failed: {reason}")]
    Connection { peer: NodeId, reason: String },
    /// The request or its response could not be framed: too large, or not decodable.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// No address is known for this node.
    #[error("no address known for node {peer}")]
    UnknownPeer { peer: NodeId },
    /// The peer received the request but answered with an error instead of a response (its
    /// body did not decode, the handler panicked, or the response was too large to send).
    #[error("{peer} could not answer: {reason}")]
    Remote { peer: NodeId, reason: String },
}

/// Bounds that protect a node from its peers and from itself. Every size or count read from
/// the network is checked against one of these before memory is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcLimits {
    /// Largest frame body accepted or sent, in bytes. A larger outgoing message fails with
    /// [`FrameError::TooLarge`] before anything is sent; a larger incoming length closes the
    /// connection before any allocation. Default 64 MiB: well above the largest value plus
    /// metadata a node stores, small enough that a few in flight cannot exhaust memory.
    pub max_frame_bytes: u32,
    /// Long-lived bidirectional streams a client opens per connection. Default 4. Requests of
    /// at most [`SMALL_FRAME_BYTES`] all go on the first stream, so that one writer batches
    /// them into shared packets and send calls (spreading them over 4 streams cost a third of
    /// the throughput); larger ones are spread round-robin over the others, so a large frame
    /// never holds small ones up behind it (head-of-line blocking). A new stream per request
    /// would cost 2–5× more CPU. At most [`MAX_STREAMS_PER_CONNECTION`].
    pub streams_per_connection: usize,
    /// Requests a server runs at once for one connection. When reached, the server stops
    /// reading that connection's streams until a handler finishes, so QUIC flow control pushes
    /// back on the sender instead of queueing without bound. Default 1024.
    pub max_in_flight_per_connection: usize,
    /// Requests a server runs at once over all its connections; past it, no connection's
    /// streams are read until a handler finishes. Default 4096.
    pub max_in_flight_requests: usize,
    /// Connections a server keeps at once (handshakes included). One more is accepted only to
    /// be closed with [`rpc::CLOSE_TOO_MANY_CONNECTIONS`] and a reason naming the limit
    /// (`limit_name`); past twice the limit, new ones are refused without a handshake.
    /// Default 1024.
    pub max_connections: usize,
    /// The config field that sets `max_connections`, named in refusals.
    pub limit_name: &'static str,
    /// Bytes of request frames a server holds at once over all its connections, from the
    /// moment a frame's header is read until its handler finished. Past it, no more request
    /// bodies are read (senders wait on QUIC flow control), so memory stays bounded however
    /// many connections send large requests. At least `max_frame_bytes`. Default 256 MiB.
    pub max_in_flight_bytes: u64,
    /// Ack-eliciting packets the other side of each connection may receive before it must
    /// acknowledge them (QUIC's ACK frequency extension). Default 1: no request is made, and
    /// the peer acknowledges every second packet as RFC 9000 says. Node-to-node connections
    /// ask for [`PEER_ACK_ELICITING_THRESHOLD`]: their pipelined traffic otherwise sends
    /// nearly one ACK packet per request packet. From 1 to 1024.
    pub ack_eliciting_threshold: u32,
}

/// The [`RpcLimits::ack_eliciting_threshold`] of node-to-node connections. Measured on
/// workload A: 8 instead of 1 cut the datagrams per operation from 1.81 to 1.43 and the CPU
/// per operation by 9%; 32 bought nothing more.
pub const PEER_ACK_ELICITING_THRESHOLD: u32 = 8;

impl Default for RpcLimits {
    fn default() -> Self {
        RpcLimits {
            max_frame_bytes: 64 * 1024 * 1024,
            streams_per_connection: 4,
            max_in_flight_per_connection: 1024,
            max_in_flight_requests: 4096,
            max_connections: 1024,
            limit_name: "max_connections",
            max_in_flight_bytes: 256 * 1024 * 1024,
            ack_eliciting_threshold: 1,
        }
    }
}

/// A [`RpcLimits`] field outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rpc limit {field} = {value} is invalid; allowed: {allowed}")]
pub struct LimitsError {
    pub field: &'static str,
    pub value: u64,
    pub allowed: &'static str,
}

impl RpcLimits {
    /// Checks every field; called by the constructors that take limits.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.max_frame_bytes == 0 {
            return Err(LimitsError {
                field: "max_frame_bytes",
                value: 0,
                allowed: "1 to 4294967295",
            });
        }
        if self.streams_per_connection == 0
            || self.streams_per_connection > MAX_STREAMS_PER_CONNECTION
        {
            return Err(LimitsError {
                field: "streams_per_connection",
                value: self.streams_per_connection as u64,
                allowed: "1 to 64",
            });
        }
        if !(1..=1024).contains(&self.ack_eliciting_threshold) {
            return Err(LimitsError {
                field: "ack_eliciting_threshold",
                value: u64::from(self.ack_eliciting_threshold),
                allowed: "1 to 1024",
            });
        }
        if self.max_in_flight_bytes < u64::from(self.max_frame_bytes) {
            return Err(LimitsError {
                field: "max_in_flight_bytes",
                value: self.max_in_flight_bytes,
                allowed: "at least max_frame_bytes",
            });
        }
        for (field, value) in [
            ("max_connections", self.max_connections),
            (
                "max_in_flight_per_connection",
                self.max_in_flight_per_connection,
            ),
            ("max_in_flight_requests", self.max_in_flight_requests),
        ] {
            if value == 0 {
                return Err(LimitsError {
                    field,
                    value: 0,
                    allowed: "at least 1",
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_valid_and_bad_ones_name_the_field() {
        assert_eq!(RpcLimits::default().validate(), Ok(()));
        let defaults = RpcLimits::default;
        for (limits, field) in [
            (
                RpcLimits {
                    streams_per_connection: 0,
                    ..defaults()
                },
                "streams_per_connection",
            ),
            (
                RpcLimits {
                    max_frame_bytes: 0,
                    ..defaults()
                },
                "max_frame_bytes",
            ),
            (
                RpcLimits {
                    ack_eliciting_threshold: 0,
                    ..defaults()
                },
                "ack_eliciting_threshold",
            ),
        ] {
            assert_eq!(limits.validate().unwrap_err().field, field);
        }
    }
}

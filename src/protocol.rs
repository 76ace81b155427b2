//! The messages of dynkv's two native protocols, both carried in versioned frames by
//! [`crate::net`]: the client protocol (client → any node) and the peer protocol (node → node,
//! mutual TLS only). See PROTOCOL.md for the whole description.
//!
//! Every field that arrives from the network is checked with `validate` before use; the
//! frame layer has already bounded the message's total size.

use crate::core::object::{Content, MAX_BUCKET_BYTES, MAX_KEY_BYTES, StoredObject};
use crate::core::quorum::{Quorum, QuorumShortfall};
use crate::core::ring::PartitionId;
use serde::{Deserialize, Serialize};

/// Options of a get, as the client chose them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetOptions {
    pub r: Quorum,
    pub pr: Quorum,
    /// Milliseconds; `None` uses the node's default.
    pub timeout_ms: Option<u64>,
}

/// Options of a put or delete.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutOptions {
    pub w: Quorum,
    pub dw: Quorum,
    pub pw: Quorum,
    pub timeout_ms: Option<u64>,
    /// Answer with the object as stored after the write (its siblings and context).
    pub return_body: bool,
}

/// A value a client writes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewContent {
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub content_type: String,
    pub user_metadata: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    Ping,
    Get {
        #[serde(with = "serde_bytes")]
        bucket: Vec<u8>,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        options: GetOptions,
    },
    Put {
        #[serde(with = "serde_bytes")]
        bucket: Vec<u8>,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The opaque context of the read this write follows; `None` for a blind write.
        context: Option<serde_bytes::ByteBuf>,
        content: NewContent,
        options: PutOptions,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        bucket: Vec<u8>,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        context: Option<serde_bytes::ByteBuf>,
        options: PutOptions,
    },
}

/// The kinds of error a client can get; each maps to one HTTP status in the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// A bad option, key, bucket or context (HTTP 400).
    InvalidRequest,
    /// A value or object over its size limit (HTTP 413).
    TooLarge,
    /// Too few replicas answered (HTTP 503).
    QuorumUnmet(QuorumShortfall),
    /// The request's timeout passed first (HTTP 503).
    Timeout(Option<QuorumShortfall>),
    /// A node-local failure (disk, bug) (HTTP 500).
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ClientError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ClientError {
    pub fn invalid(message: impl Into<String>) -> Self {
        ClientError {
            kind: ErrorKind::InvalidRequest,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ClientError {
            kind: ErrorKind::Internal,
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    Pong {
        node: String,
    },
    /// The key's live siblings (at least one) and the context to write back with.
    Found {
        siblings: Vec<Content>,
        #[serde(with = "serde_bytes")]
        context: Vec<u8>,
    },
    /// No live value; `context` is set when the key has a tombstone, so that a write that
    /// follows this read supersedes the delete.
    NotFound {
        context: Option<serde_bytes::ByteBuf>,
    },
    /// A put or delete met its quorum. `siblings` is filled when `return_body` was asked.
    Stored {
        siblings: Vec<Content>,
        #[serde(with = "serde_bytes")]
        context: Vec<u8>,
    },
    Error(ClientError),
}

/// Node-to-node requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    Ping,
    /// Read a replica's copy of one key.
    ReplicaGet {
        partition: PartitionId,
        #[serde(with = "serde_bytes")]
        bucket: Vec<u8>,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Merge `object` into the replica's copy (a coordinated put or a read repair).
    ReplicaPut {
        partition: PartitionId,
        #[serde(with = "serde_bytes")]
        bucket: Vec<u8>,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        object: StoredObject,
    },
    /// A client put or delete that must be coordinated by a replica of its key; the receiving
    /// node coordinates it (and does not forward it again).
    Coordinate(ClientRequest),
    /// One page of a coverage scan (list buckets, list keys): the live keys of `partition`
    /// this node holds after `start_after`, of `bucket` only when given, or with `bucket`
    /// `None` the distinct bucket names (each with an empty key).
    ListKeys {
        partition: PartitionId,
        bucket: Option<serde_bytes::ByteBuf>,
        start_after: Option<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>,
        limit: u32,
    },
    /// A bucket's properties were set: the receiver caches `props` (their stored encoding)
    /// in place of its copy, so the change is seen at once without waiting for a quorum read.
    BucketPropsChanged {
        #[serde(with = "serde_bytes")]
        bucket: Vec<u8>,
        #[serde(with = "serde_bytes")]
        props: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerResponse {
    Pong,
    Object(Option<StoredObject>),
    /// The replica stored the merge; `durable` says its journal was fsynced first.
    Stored {
        durable: bool,
    },
    Client(ClientResponse),
    /// The replica could not do what was asked.
    Failed {
        message: String,
    },
    /// A page of [`PeerRequest::ListKeys`]; `next` is where the following page starts, `None`
    /// at the end of the partition.
    Keys {
        entries: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>,
        next: Option<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>,
    },
}

/// Checks a bucket and key read from the network or the command line.
pub fn validate_bucket_and_key(bucket: &[u8], key: &[u8]) -> Result<(), ClientError> {
    if bucket.is_empty() {
        return Err(ClientError::invalid("bucket name is empty"));
    }
    if bucket.len() > MAX_BUCKET_BYTES {
        return Err(ClientError::invalid(format!(
            "bucket name is {} bytes; at most {MAX_BUCKET_BYTES} are allowed",
            bucket.len()
        )));
    }
    if key.is_empty() {
        return Err(ClientError::invalid("key is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ClientError {
            kind: ErrorKind::TooLarge,
            message: format!(
                "key is {} bytes; at most {MAX_KEY_BYTES} are allowed",
                key.len()
            ),
        });
    }
    Ok(())
}

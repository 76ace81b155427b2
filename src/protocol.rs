//! The messages of dynkv's two native protocols, both carried in versioned frames by
//! [`crate::net`]: the client protocol (client → any node) and the peer protocol (node → node,
//! mutual TLS only). See PROTOCOL.md for the whole description.
//!
//! Every field that arrives from the network is checked with `validate` before use; the
//! frame layer has already bounded the message's total size.

use crate::core::cluster::ClusterState;
use crate::core::gossip::{Digest, MemberRecord};
use crate::core::handoff::Handoff;
use crate::core::ids::NodeId;
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
    /// Let fallbacks stand in for down primaries; `None` means yes (Riak's default).
    #[serde(default)]
    pub sloppy_quorum: Option<bool>,
    /// Ask every replica at once, as Riak does, instead of only as many as `r` and `pr`
    /// need (the rest are asked if those fail or are slow). `None` means no, except for the
    /// node's `read_repair_chance` share of reads.
    #[serde(default)]
    pub ask_all_replicas: Option<bool>,
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
    /// Let fallbacks stand in for down primaries; `None` means yes (Riak's default).
    #[serde(default)]
    pub sloppy_quorum: Option<bool>,
    /// A delete without a context first reads the key at this level and deletes what the
    /// read returned, as Riak does; `None` is the bucket's `r`. Puts ignore it.
    #[serde(default)]
    pub r: Option<Quorum>,
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
    /// This node's view of every member (`dynkv admin members`).
    Members,
    /// This node's summary (`dynkv admin status`).
    Status,
    /// The ring this node holds: version, owners, member states, staged changes and pending
    /// transfers (`dynkv admin ring`).
    Ring,
    /// Every handoff of the pending ring change, cluster-wide, with its sender's progress
    /// (`dynkv admin transfers`).
    Transfers,
    /// This node's anti-entropy: each partition's tree and exchanges (`dynkv admin aae`).
    Aae,
    /// Run this node's exchanges now, of `partition` or of every partition it is a primary
    /// of (`dynkv admin aae repair`); answered with [`ClientResponse::Aae`] once done.
    AaeRepair {
        partition: Option<u32>,
    },
    /// A staged ring change, or the plan of those staged (`dynkv admin cluster ...`); made
    /// by the claimant, wherever it arrives.
    Cluster(ClusterRequest),
    /// Another request with the client token: a node with `client_token` set serves only
    /// these (and `Ping`) on its client port. Unwrapped by the listener, never nested.
    WithToken {
        token: String,
        request: Box<ClientRequest>,
    },
}

/// Whether a client's token is the configured one, compared in time independent of where
/// the first difference is.
pub fn token_matches(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

/// What the client port serves of `request` when the node requires `required` (its
/// `client_token`): the request itself, or an `Unauthorized` error naming the setting.
pub fn authorize(
    request: ClientRequest,
    required: Option<&str>,
) -> Result<ClientRequest, ClientError> {
    let unauthorized = |message: &str| ClientError {
        kind: ErrorKind::Unauthorized,
        message: message.to_string(),
    };
    match (request, required) {
        (ClientRequest::WithToken { request, .. }, _)
            if matches!(*request, ClientRequest::WithToken { .. }) =>
        {
            Err(ClientError::invalid(
                "a token-carrying request must not wrap another",
            ))
        }
        (ClientRequest::WithToken { token, request }, Some(required)) => {
            if token_matches(&token, required) {
                Ok(*request)
            } else {
                Err(unauthorized(
                    "the client token is wrong (client_token of the node; --token or DYNKV_TOKEN of the client)",
                ))
            }
        }
        (ClientRequest::WithToken { request, .. }, None) => Ok(*request),
        (ClientRequest::Ping, _) => Ok(ClientRequest::Ping),
        (request, None) => Ok(request),
        (_, Some(_)) => Err(unauthorized(
            "this node requires a client token (client_token): give it with --token or DYNKV_TOKEN",
        )),
    }
}

/// One member as the answering node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub node: String,
    pub peer_addr: String,
    pub client_addr: String,
    pub up: bool,
    /// Suspicion level of the failure detector (0 for the answering node itself).
    pub phi: f64,
    /// Milliseconds since the node's last heartbeat arrived; `None` for the answering node.
    pub silent_ms: Option<u64>,
    pub generation: u64,
    /// Hints the member holds for down primaries, as it last gossiped.
    #[serde(default)]
    pub hints_held: u64,
    /// Its state in the answering node's ring: `joining` (known, owns nothing), `valid`,
    /// `leaving`, `exiting` or `down`.
    #[serde(default)]
    pub state: String,
    /// The ring version the member holds, as it last gossiped.
    #[serde(default)]
    pub ring_version: u64,
}

/// A node's summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub partition_count: u32,
    pub partitions_owned: u32,
    /// The version of the ring this node routes by (0: provisional, still joining).
    #[serde(default)]
    pub ring_version: u64,
    pub members_up: u32,
    pub members_down: u32,
    /// Approximate number of records stored (overwrites count until compaction).
    pub keys_estimate: u64,
    /// Hints this node holds for down primaries.
    pub hints_held: u64,
    pub hints_delivered: u64,
    /// Bytes of the hints held (keys and values), bounded by `hints.max_bytes`.
    #[serde(default)]
    pub hint_bytes: u64,
    /// Writes for which a down primary got no fallback (so no hint) because it had been
    /// silent longer than the hint window.
    #[serde(default)]
    pub hints_skipped_past_window: u64,
    /// Replica writes this node refused as a fallback because its hints were at
    /// `hints.max_bytes`.
    #[serde(default)]
    pub hints_refused_full: u64,
    /// Replica merges that met two different versions under one dot (a dot issued twice);
    /// both versions were kept. Zero unless something is wrong (see `core::epoch`).
    #[serde(default)]
    pub dot_collisions: u64,
    /// Handoffs of the pending ring change still to do, cluster-wide (0: nothing moving).
    #[serde(default)]
    pub transfers_pending: u64,
    /// Keys and bytes this node has sent in ring-change handoffs since it started.
    #[serde(default)]
    pub handoff_keys_sent: u64,
    #[serde(default)]
    pub handoff_bytes_sent: u64,
    /// Stray copies (of keys this node no longer replicates after a flip) that the cleanups
    /// since it started deleted, and those of them a new replica lacked, so they were handed
    /// to it first.
    #[serde(default)]
    pub stray_keys_deleted: u64,
    #[serde(default)]
    pub stray_keys_handed: u64,
    /// Anti-entropy since the node started: exchanges it ran, segments found differing,
    /// keys repaired (on either side) and the bytes of objects written by repairs.
    #[serde(default)]
    pub aae_exchanges: u64,
    #[serde(default)]
    pub aae_segments_differing: u64,
    #[serde(default)]
    pub aae_keys_repaired: u64,
    #[serde(default)]
    pub aae_bytes_repaired: u64,
    /// Bytes of tree hashes and key digests this node's exchanges received (payload only).
    #[serde(default)]
    pub aae_bytes_exchanged: u64,
    /// Keys this node holds as tombstones only (in partitions whose tree is built), and
    /// tombstones it has reaped since it started.
    #[serde(default)]
    pub tombstones_held: u64,
    #[serde(default)]
    pub tombstones_reaped: u64,
    /// Actor entries this node removed from its copies' clocks since it started (see
    /// `core::retire`).
    #[serde(default)]
    pub actors_retired: u64,
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
    /// The node requires a client token and the request had none or a wrong one (HTTP 401).
    Unauthorized,
    /// The node's disk is nearly full (`storage.min_free_mib`): writes are refused until
    /// space returns (HTTP 507).
    InsufficientStorage,
    /// The node no longer coordinates requests: it has finished leaving the cluster, or is
    /// finishing (HTTP 503); another member serves them.
    NotServing,
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    Members(Vec<MemberInfo>),
    Status(NodeStatus),
    Ring(RingInfo),
    Plan(PlanInfo),
    /// The pending handoffs of ring version `ring_version` (none: nothing is moving).
    Aae(AaeInfo),
    Transfers {
        ring_version: u64,
        transfers: Vec<TransferInfo>,
        /// A committed change is still pending: with no transfers left, it is waiting for
        /// the claimant to flip the ring.
        #[serde(default)]
        pending: bool,
    },
    Error(ClientError),
}

/// `dynkv admin cluster ...`: Riak's staged cluster commands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterRequest {
    /// Stage the join of `node` (`None`: the node this request is sent to, started with
    /// `--member` seeds of the cluster it joins).
    Join { node: Option<String> },
    /// `cluster join PEER` on a node started alone: give up its own one-node cluster, gossip
    /// with `peer` (a member of the cluster to join, reached at `peer_addr`) until its ring
    /// arrives, then stage this node's join. An empty `peer` is asked of the member.
    JoinVia { peer: String, peer_addr: String },
    /// Stage the leave of `node` (`None`: the node this request is sent to).
    Leave { node: Option<String> },
    /// Stage the removal of a node that is gone for good.
    Remove { node: String },
    /// Stage the replacement of `old` by the joining node `new`.
    Replace { old: String, new: String },
    /// What committing the staged changes would move.
    Plan,
    /// Drop every staged change.
    Clear,
    /// Take the last plan shown (or the one made on `ring_version`): fails if the ring moved
    /// on since, if a member is down or does not hold the current ring yet, or if transfers
    /// are pending.
    Commit { ring_version: Option<u64> },
    /// Change `transfer_limit` on every member now (until its restart).
    TransferLimit { limit: u32 },
}

/// A plan as `dynkv admin cluster plan` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanInfo {
    /// The ring version the plan was made on.
    pub ring_version: u64,
    /// The staged changes: (node, change).
    pub staged: Vec<(String, String)>,
    /// Every partition that would move: (partition, from, to).
    pub transfers: Vec<(u32, String, String)>,
    /// Partitions owned before and after, per node.
    pub ownership: Vec<(String, u32, u32)>,
    /// Records and bytes each moving partition holds on its current owner, as that owner
    /// estimates them (fjall counts overwrites until compaction, and bytes on disk,
    /// compressed): (partition, records, bytes). A partition whose owner did not answer is
    /// missing.
    #[serde(default)]
    pub sizes: Vec<(u32, u64, u64)>,
}

/// A ring as `dynkv admin ring` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingInfo {
    /// The cluster's id (empty while this node's ring is provisional).
    pub cluster: String,
    /// 0 while provisional (the node has not joined yet).
    pub version: u64,
    /// The owner of each partition, in partition order.
    pub owners: Vec<String>,
    /// Every member named by the ring, with its state and the partitions it owns.
    pub members: Vec<RingMember>,
    /// Changes staged for the next commit: (node, change).
    pub staged: Vec<(String, String)>,
    /// Handoffs still to do before the pending ring flips (key partition, from, to).
    pub transfers: Vec<(u32, String, String)>,
    /// The owners once the pending change flips (empty when nothing is pending).
    #[serde(default)]
    pub pending_owners: Vec<String>,
}

/// One handoff as `dynkv admin transfers` shows it, with its sender's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferInfo {
    /// The key partition whose keys move.
    pub partition: u32,
    pub from: String,
    pub to: String,
    /// "active" (streaming now), "queued" (waiting for a slot of `transfer_limit`, or for
    /// its sender to be reachable) or "retrying" (the last attempt failed; it resumes).
    pub state: String,
    pub keys_sent: u64,
    pub bytes_sent: u64,
    /// The sender's estimate of the partition's records.
    pub keys_estimated: u64,
    /// Since this attempt started.
    pub elapsed_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingMember {
    pub node: String,
    pub state: String,
    pub partitions: u32,
}

/// A node's anti-entropy state, for `dynkv admin aae`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AaeInfo {
    pub enabled: bool,
    pub exchange_interval_ms: u64,
    /// `reap` or `keep` (`tombstones.mode`).
    #[serde(default)]
    pub tombstones_mode: String,
    #[serde(default)]
    pub tombstone_grace_secs: u64,
    /// Every partition this node keeps a tree for or exchanges, in partition order.
    pub partitions: Vec<AaePartitionInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AaePartitionInfo {
    pub partition: u32,
    /// `built`, `building` (the first build), `rebuilding`, or `none` (no tree yet).
    pub tree: String,
    pub builds: u64,
    pub writes_since_build: u64,
    /// Exchanges this node started for the partition, one per peer (the last).
    pub exchanges: Vec<AaeExchangeInfo>,
    /// When this node's next exchange of the partition is due, from now; `None` when it is
    /// not a primary of it.
    pub next_due_ms: Option<u64>,
    /// Keys held as tombstones only.
    #[serde(default)]
    pub tombstones: u64,
    /// The last reaping pass this node ran over the partition: how long ago, and its result.
    #[serde(default)]
    pub last_reap: Option<AaeExchangeInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AaeExchangeInfo {
    pub peer: String,
    pub ago_ms: u64,
    /// `in sync`, `N keys repaired`, or what stopped it.
    pub result: String,
}

/// Most segments one exchange compares keys of (bounds the digests asked and answered).
pub const MAX_AAE_SEGMENTS: usize = 256;
/// Most key digests an answer carries.
pub const MAX_AAE_DIGESTS: usize = 200_000;

/// Most keys one [`PeerRequest::ReapCheck`], [`PeerRequest::Reap`] or
/// [`PeerRequest::CopyCheck`] names.
pub const MAX_REAP_KEYS: usize = 1000;

/// A key and the record digest ([`crate::core::tictac::record_digest`]) of a copy: the
/// tombstone a reaper holds, or the stray a cleanup is about to delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReapKey {
    #[serde(with = "serde_bytes")]
    pub bucket: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub digest: u64,
}

/// Node-to-node requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    Ping,
    /// Read a replica's copy of one key (with `hint_for`, the copy a fallback keeps for that
    /// primary).
    ReplicaGet {
        partition: PartitionId,
        #[serde(with = "serde_bytes")]
        bucket: Vec<u8>,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        hint_for: Option<NodeId>,
        /// The routing version of the sender's ring ([`ClusterState::routing_version`]): a
        /// replica whose routing is newer answers [`PeerResponse::StaleRing`] (0: no check).
        #[serde(default)]
        ring_version: u64,
    },
    /// Merge `object` into the replica's copy (a coordinated put or a read repair).
    ReplicaPut {
        partition: PartitionId,
        #[serde(with = "serde_bytes")]
        bucket: Vec<u8>,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        object: StoredObject,
        /// Set when the receiver is a fallback: it keeps the object as a hint for this primary.
        hint_for: Option<NodeId>,
        /// As in [`PeerRequest::ReplicaGet`].
        #[serde(default)]
        ring_version: u64,
    },
    /// A client put or delete that must be coordinated by a replica of its key; the receiving
    /// node coordinates it (and does not forward it again). Sent by earlier releases; still
    /// served.
    Coordinate(ClientRequest),
    /// Approximate records and bytes the receiver holds under each partition, for a plan.
    PartitionSizes {
        partitions: Vec<PartitionId>,
    },
    /// Handoff: merge these records (full version sets) of a key partition into the
    /// receiver's copies, for the pending ring; answered `Stored` once all are durable.
    Handoff {
        partition: PartitionId,
        records: Vec<HandoffRecord>,
    },
    /// To the claimant: the sender finished `handoff` (its receiver acknowledged every
    /// record durably).
    HandoffDone {
        handoff: Handoff,
    },
    /// The sender's handoffs in progress, for `admin transfers`.
    TransferProgress,
    /// Anti-entropy step 1: the receiver's branch hashes of `partition`'s tree.
    AaeBranches {
        partition: PartitionId,
    },
    /// Step 2: its segment hashes under `branches`.
    AaeSegments {
        partition: PartitionId,
        branches: Vec<u16>,
    },
    /// Step 3: its key digests in `segments` (at most [`MAX_AAE_SEGMENTS`]).
    AaeKeys {
        partition: PartitionId,
        segments: Vec<u16>,
    },
    /// Tombstone reaping, step 1: whether the receiver holds each of these tombstones
    /// (at most [`MAX_REAP_KEYS`]), read once durable.
    ReapCheck {
        partition: PartitionId,
        keys: Vec<ReapKey>,
    },
    /// Step 2: delete each copy that is still the tombstone named.
    Reap {
        partition: PartitionId,
        keys: Vec<ReapKey>,
    },
    /// How many hints the receiver holds for `partition` (a reaper asks every member).
    HintCount {
        partition: PartitionId,
    },
    /// How long ago the receiver's oldest operation in flight on `partition` began (a
    /// reaper waits until each began after every primary held the tombstones), and
    /// whether it may hold stray copies.
    InFlight {
        partition: PartitionId,
    },
    /// Set this node's `transfer_limit` until it restarts.
    SetTransferLimit {
        limit: u32,
    },
    /// A staged ring change for the claimant; `hops` counts forwards so none loops.
    Cluster {
        request: ClusterRequest,
        hops: u8,
    },
    /// [`PeerRequest::Coordinate`] with an id the sender drew for this write: the receiver
    /// remembers it for a while and answers a second copy (a duplicated message, a retry)
    /// with the first one's outcome instead of coordinating the write twice.
    CoordinateOnce {
        /// The node that forwarded the write; with `request_id`, the write's identity.
        sender: NodeId,
        request_id: u64,
        request: ClientRequest,
    },
    /// Gossip step 1: what the sender knows.
    GossipDigest {
        digests: Vec<Digest>,
        /// The sender's ring version, so the receiver answers with its ring when it is newer.
        #[serde(default)]
        ring_version: u64,
        /// The sender's [`ClusterState::fingerprint`]: at an equal version, a different one
        /// means the two states were made apart, and the receiver answers with its own (0:
        /// a sender that does not say).
        #[serde(default)]
        ring_fingerprint: u64,
    },
    /// Gossip step 3: the records the receiver asked for, and the sender's ring when the
    /// receiver's was older.
    GossipPush {
        records: Vec<MemberRecord>,
        #[serde(default)]
        ring: Option<Box<ClusterState>>,
    },
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
    /// A stray cleanup's check before it deletes copies it no longer replicates (DESIGN §6):
    /// for each key (at most [`MAX_REAP_KEYS`]), whether the receiver holds a copy with that
    /// record digest, read once durable. The sender hands the others to it first.
    CopyCheck {
        partition: PartitionId,
        keys: Vec<ReapKey>,
    },
    /// To the claimant: exiting member `node` (the sender) finished its leave: it holds no
    /// hint and no copy it does not replicate, refuses client requests and has none in
    /// flight. The claimant records it as `left`.
    LeaveFinished {
        node: NodeId,
    },
    /// Actor retirement, step 1 (see `core::retire`): for each key (at most
    /// [`MAX_REAP_KEYS`]), whether the receiver holds a copy with that record digest, read
    /// once durable, and the key actor it still coordinates that copy under.
    RetireCheck {
        partition: PartitionId,
        keys: Vec<ReapKey>,
    },
    /// Step 2: remove the named actors' idle entries from each copy that still has the
    /// digest named.
    Retire {
        partition: PartitionId,
        keys: Vec<RetireKey>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerResponse {
    Pong,
    Object(Option<StoredObject>),
    /// The replica stored the merge; `durable` says its journal was fsynced first.
    Stored {
        durable: bool,
    },
    Client(ClientResponse),
    /// Answer to [`PeerRequest::PartitionSizes`]: (partition, records, bytes).
    PartitionSizes(Vec<(PartitionId, u64, u64)>),
    /// Gossip step 2: records newer than the digest, and the nodes to send back.
    GossipReply {
        records: Vec<MemberRecord>,
        requests: Vec<NodeId>,
        /// The receiver's ring, when it is newer than the sender's.
        #[serde(default)]
        ring: Option<Box<ClusterState>>,
        /// The receiver's ring version, so the sender pushes its ring when it is newer.
        #[serde(default)]
        ring_version: u64,
        /// The receiver's [`ClusterState::fingerprint`] (0: a receiver that does not say).
        #[serde(default)]
        ring_fingerprint: u64,
    },
    /// The replica could not do what was asked.
    Failed {
        message: String,
    },
    /// The sender routed by an older ring than the receiver's, by which the receiver does
    /// not replicate the key: here is the receiver's ring, to adopt and route the request
    /// again by (nothing was read or stored).
    StaleRing(Box<ClusterState>),
    /// [`PeerResponse::Stored`], for a sender that routed by an older ring: the receiver's
    /// ring, by which the write may need other replicas too.
    StoredOnNewerRing {
        durable: bool,
        ring: Box<ClusterState>,
    },
    /// Answer to [`PeerRequest::TransferProgress`].
    TransferProgress(Vec<TransferInfo>),
    /// Answer to [`PeerRequest::AaeBranches`] (`None`: no tree built yet; a build starts).
    AaeBranches(Option<Vec<u32>>),
    /// Answer to [`PeerRequest::AaeSegments`], one list per branch asked.
    AaeSegments(Option<Vec<Vec<u32>>>),
    /// Answer to [`PeerRequest::AaeKeys`].
    AaeKeys(Vec<crate::core::tictac::KeyDigest>),
    /// Answer to [`PeerRequest::ReapCheck`], one per key asked.
    ReapCheck(Vec<bool>),
    /// Answer to [`PeerRequest::Reap`]: how many copies the receiver deleted.
    Reaped {
        reaped: u64,
    },
    /// Answer to [`PeerRequest::HintCount`].
    HintCount(u64),
    /// Answer to [`PeerRequest::InFlight`]: the oldest operation's age in milliseconds
    /// (rounded up), if any is in flight, and whether the receiver may still hold copies
    /// it no longer replicates (its cleanup after the last ring change has not finished).
    InFlight {
        oldest_age_ms: Option<u64>,
        strays: bool,
    },
    /// A page of [`PeerRequest::ListKeys`]; `next` is where the following page starts, `None`
    /// at the end of the partition.
    Keys {
        entries: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>,
        next: Option<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>,
    },
    /// Answer to [`PeerRequest::CopyCheck`], one per key asked.
    CopyCheck(Vec<bool>),
    /// Answer to [`PeerRequest::RetireCheck`], one per key asked.
    RetireCheck(Vec<RetireAnswer>),
    /// Answer to [`PeerRequest::Retire`]: how many copies the receiver changed.
    Retired {
        retired: u64,
    },
}

/// One key of a [`PeerRequest::Retire`]: the copy checked, and the actors to retire from it
/// (at most [`crate::core::object::MAX_CONTEXT_ACTORS`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetireKey {
    #[serde(with = "serde_bytes")]
    pub bucket: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub digest: u64,
    pub actors: Vec<crate::core::ids::Actor>,
}

/// One key's answer to a [`PeerRequest::RetireCheck`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetireAnswer {
    /// The receiver holds a copy with the digest named, durably.
    pub held: bool,
    /// The key actor the receiver would coordinate its next write of the copy under, if it
    /// still trusts one: never to be retired.
    pub coordinator: Option<crate::core::ids::Actor>,
}

/// One key's object in a [`PeerRequest::Handoff`] batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffRecord {
    #[serde(with = "serde_bytes")]
    pub bucket: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub object: StoredObject,
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

#[cfg(test)]
mod token_tests {
    use super::*;

    fn wrapped(token: &str, request: ClientRequest) -> ClientRequest {
        ClientRequest::WithToken {
            token: token.into(),
            request: Box::new(request),
        }
    }

    #[test]
    fn the_client_token_is_required_only_when_configured_and_compared_exactly() {
        // No token configured: plain and wrapped requests are served.
        assert_eq!(
            authorize(ClientRequest::Status, None),
            Ok(ClientRequest::Status)
        );
        assert_eq!(
            authorize(wrapped("any", ClientRequest::Status), None),
            Ok(ClientRequest::Status)
        );
        // Configured: ping is open, the rest needs the token.
        let required = Some("s3cret");
        assert_eq!(
            authorize(ClientRequest::Ping, required),
            Ok(ClientRequest::Ping)
        );
        for refused in [
            authorize(ClientRequest::Status, required),
            authorize(wrapped("s3cre", ClientRequest::Status), required),
            authorize(wrapped("s3cret!", ClientRequest::Status), required),
            authorize(wrapped("", ClientRequest::Status), required),
        ] {
            assert_eq!(refused.unwrap_err().kind, ErrorKind::Unauthorized);
        }
        assert_eq!(
            authorize(wrapped("s3cret", ClientRequest::Status), required),
            Ok(ClientRequest::Status)
        );
        let nested = wrapped("s3cret", wrapped("s3cret", ClientRequest::Status));
        assert_eq!(
            authorize(nested, required).unwrap_err().kind,
            ErrorKind::InvalidRequest
        );
    }
}

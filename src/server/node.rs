//! One node's request handling: it coordinates client gets, puts and deletes over the
//! [`Transport`] seam, serves its peers' replica reads and writes from the [`Store`], keeps
//! hints for down primaries and hands them back.
//!
//! The same `Node` runs over QUIC in `dynkv server` and over the in-memory network in the
//! simulation tests. The decisions are made by the core (`placement::targets`,
//! `coordinate_put`, `merge_replica`, `GetCoordinator`, `WriteTracker`); this file sends
//! messages, keeps time and stores.

use crate::core::cluster::ClusterState;
use crate::core::epoch::{KeyActor, NodeEpoch};
use crate::core::hints::{self, HintKey, HintRecord};
use crate::core::ids::{Actor, NodeId};
use crate::core::object::{
    Content, Context, LocalRecord, ObjectError, StoredObject, colliding_versions, coordinate_put,
    decode_local_record, decode_record, encode_local_record, live_siblings, merge_replica,
    object_size_bytes, rescue_version,
};
use crate::core::placement;
use crate::core::quorum::{BucketDefaults, QuorumOutcome, ReadQuorum, WriteQuorum};
use crate::core::request::{
    GetCoordinator, PutCoordinator, PutRoute, ReadFanout, ReplicaAck, ReplicaError, Target,
    route_put,
};
use crate::core::ring::{PartitionId, Ring};
use crate::net::Transport;
use crate::protocol::{
    ClientError, ClientRequest, ClientResponse, ErrorKind, GetOptions, NewContent, NodeStatus,
    PeerRequest, PeerResponse, PutOptions, validate_bucket_and_key,
};
use crate::storage::{HintWrite, StorageError, Store, UpdateError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, info, warn};

pub use super::membership::{Membership, StaticMembership};

mod aae;
mod buckets;
mod cluster;
mod coverage;
mod get;
mod handoff;
mod inflight;
mod put;
mod reap;
mod replica;
mod retire;
mod transfer;
pub use aae::AaeSettings;
pub use buckets::{BucketProps, MAX_TOMBSTONE_GRACE_SECS, PROPS_BUCKET};
use inflight::InFlightGuard;
use put::Write;
pub use reap::TombstoneSettings;

/// The settings a node's request handling needs.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub bucket_defaults: BucketDefaults,
    pub allow_mult: bool,
    pub request_timeout: Duration,
    pub max_value_bytes: u64,
    pub max_object_bytes: u64,
    /// Largest object a replica merge may store or a read return (`limits.max_merged_object_bytes`).
    pub max_merged_object_bytes: u64,
    pub max_siblings: u32,
    /// The store fsyncs before it acknowledges, so this node's acks count for `dw`.
    pub durable_writes: bool,
    /// A primary silent longer than this gets no fallback for new writes (no new hints);
    /// hints already held are kept until delivered.
    pub hint_window: Duration,
    /// Fraction of gets that ask every replica, not just the ones `r` and `pr` need, so
    /// that read repair reaches the replicas a plain read skips (Cassandra's
    /// `read_repair_chance`).
    pub read_repair_chance: f64,
    /// A get asks the remaining replicas when the asked ones have not met its quorum after
    /// this long (Cassandra's speculative retry).
    pub speculative_retry: Duration,
    /// Hints sent to a returning primary per batch (each batch is acknowledged before the next).
    pub handoff_batch: usize,
    /// Ring-change handoffs sent at once (`transfer_limit`; changed at runtime by
    /// `admin transfer-limit`).
    pub transfer_limit: u32,
    /// Bytes per second each handoff may send; 0 is unbounded.
    pub transfer_max_bytes_per_sec: u64,
    /// Seed of the node's random draws (which gets ask every replica); `None` draws one from
    /// the OS. Simulation seeds it so that a run replays.
    pub rng_seed: Option<u64>,
    /// Where timestamps (last-modified, hint creation) come from.
    pub wall_clock: WallClock,
    /// Refuses writes while the data directory's disk is nearly full (`None`: never).
    pub space: Option<Arc<crate::storage::SpaceGuard>>,
    /// Active anti-entropy (`[aae]`).
    pub aae: AaeSettings,
    /// Tombstone reaping (`[tombstones]`).
    pub tombstones: TombstoneSettings,
}

/// The wall clock a node stamps versions with. Real nodes read the system clock; the
/// simulator's follows the runtime's paused clock, so a simulated clock jump moves it too and
/// a seed replays the same timestamps.
#[derive(Clone, Copy, Debug, Default)]
pub enum WallClock {
    #[default]
    System,
    /// `start_micros` at the runtime instant `origin`, advancing with the runtime's clock.
    FollowsRuntime { start_micros: u64, origin: Instant },
}

impl WallClock {
    /// Microseconds since the Unix epoch.
    pub fn now_micros(&self) -> u64 {
        match self {
            WallClock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|elapsed| elapsed.as_micros() as u64)
                .unwrap_or(0),
            WallClock::FollowsRuntime {
                start_micros,
                origin,
            } => start_micros + origin.elapsed().as_micros() as u64,
        }
    }
}

pub type PeerTransport = Arc<dyn Transport<PeerRequest, PeerResponse>>;

#[derive(Default)]
struct Counters {
    hints_delivered: AtomicU64,
    hints_skipped_past_window: AtomicU64,
    hints_refused_full: AtomicU64,
    /// Replica merges that met two different versions under one dot (see `epoch`).
    dot_collisions: AtomicU64,
    handoff_keys_sent: AtomicU64,
    handoff_bytes_sent: AtomicU64,
    stray_keys_deleted: AtomicU64,
    stray_keys_handed: AtomicU64,
}

/// Hands out this incarnation's key actors (see `core::epoch`); shared with the store's
/// writer, where the choice is made atomically with the write.
#[derive(Clone)]
struct KeyActors {
    epoch: NodeEpoch,
    next_sequence: Arc<AtomicU64>,
}

impl KeyActors {
    fn fresh(&self) -> KeyActor {
        self.epoch
            .derive(self.next_sequence.fetch_add(1, Ordering::Relaxed))
    }

    fn choose(&self, remembered: Option<KeyActor>) -> KeyActor {
        self.epoch.choose(remembered, || self.fresh())
    }
}

struct NodeInner {
    id: NodeId,
    key_actors: KeyActors,
    store: Store,
    membership: Arc<dyn Membership>,
    peers: PeerTransport,
    settings: NodeSettings,
    /// The node's random draws, seeded from `settings.rng_seed`.
    rng: parking_lot::Mutex<rand::rngs::StdRng>,
    counters: Counters,
    bucket_cache: buckets::BucketCache,
    /// Forwarded writes coordinated recently, by sender and request id.
    forwarded: put::ForwardedWrites,
    /// Ring-change handoffs this node sends, and its cleanup after a flip.
    transfers: transfer::Transfers,
    /// Anti-entropy exchanges this node ran.
    aae: aae::AaeState,
    reap: reap::ReapState,
    retire: retire::RetireState,
    /// Operations that may write copies, by partition (a reaper waits them out).
    in_flight: Arc<inflight::InFlight>,
}

/// A node's request handler; cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

/// A handle that does not keep a node alive; used to tell when a stopped node's last task
/// has finished, so its store can be reopened.
pub struct WeakNode(std::sync::Weak<NodeInner>);

impl WeakNode {
    pub fn is_dead(&self) -> bool {
        self.0.strong_count() == 0
    }
}

/// Where this node keeps its copy of a key: as a replica, or as a hint for a down primary.
#[derive(Clone, Debug)]
struct Copy {
    partition: PartitionId,
    bucket: Vec<u8>,
    key: Vec<u8>,
    hint_for: Option<NodeId>,
}

impl Copy {
    fn hint_key(&self, primary: &NodeId) -> Vec<u8> {
        hints::encode_key(&HintKey {
            primary: primary.clone(),
            partition: self.partition,
            bucket: self.bucket.clone(),
            key: self.key.clone(),
        })
    }
}

/// Why a write could not be applied to a local copy.
enum LocalWriteError {
    Refused(ClientError),
    Storage(String),
    /// The write's context claims more of some actors' histories than this copy holds.
    UnknownContext(Box<UnknownContext>),
}

impl LocalWriteError {
    /// Why a write that carried no context (`what`: a merge, a retirement) failed.
    fn without_context(self, what: &str) -> String {
        match self {
            LocalWriteError::Refused(error) => error.message,
            LocalWriteError::Storage(message) => message,
            LocalWriteError::UnknownContext(_) => format!("{what} has no context to check"),
        }
    }
}

/// What a coordinator's copy does not cover of a write's context: (actor, counter claimed,
/// counter held) per such actor, and the write's context and content, handed back for a
/// retry (so the common path moves them instead of keeping copies).
struct UnknownContext {
    beyond: Vec<(Actor, u64, u64)>,
    context: Option<Context>,
    content: Content,
}

impl Node {
    /// Why writes are refused now (a nearly full disk), if they are.
    fn space_refusal(&self) -> Option<String> {
        self.inner
            .settings
            .space
            .as_ref()
            .and_then(|space| space.refusal())
    }
}

impl From<ObjectError> for LocalWriteError {
    fn from(error: ObjectError) -> Self {
        LocalWriteError::Storage(error.to_string())
    }
}

fn error_response(kind: ErrorKind, message: impl Into<String>) -> ClientResponse {
    ClientResponse::Error(ClientError {
        kind,
        message: message.into(),
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Node {
    pub fn new(
        id: NodeId,
        store: Store,
        membership: Arc<dyn Membership>,
        peers: PeerTransport,
        settings: NodeSettings,
    ) -> Self {
        let key_actors = KeyActors {
            epoch: store.epoch(),
            next_sequence: Arc::new(AtomicU64::new(0)),
        };
        let rng = match settings.rng_seed {
            // Each node of a simulated cluster draws its own sequence from the shared seed.
            Some(seed) => rand::SeedableRng::seed_from_u64(seed ^ key_actors.epoch.base),
            None => rand::SeedableRng::from_os_rng(),
        };
        let node = Node {
            inner: Arc::new(NodeInner {
                id,
                rng: parking_lot::Mutex::new(rng),
                transfers: transfer::Transfers::new(settings.transfer_limit),
                aae: aae::AaeState::default(),
                reap: reap::ReapState::default(),
                retire: retire::RetireState::default(),
                in_flight: Arc::default(),
                key_actors,
                store,
                membership,
                peers,
                settings,
                counters: Counters::default(),
                bucket_cache: buckets::BucketCache::default(),
                forwarded: put::ForwardedWrites::default(),
            }),
        };
        // A node started on the data of one that was removed or finished leaving serves
        // nothing (`dynkv server` refuses to start it at all).
        node.stop_serving_if_gone();
        node
    }

    pub fn id(&self) -> &NodeId {
        &self.inner.id
    }

    pub fn downgrade(&self) -> WeakNode {
        WeakNode(Arc::downgrade(&self.inner))
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn membership(&self) -> &Arc<dyn Membership> {
        &self.inner.membership
    }

    /// The ring this node routes by now.
    pub fn ring(&self) -> Arc<Ring> {
        self.inner.membership.ring()
    }

    /// Serves one client request, coordinating it (or forwarding a write to a replica).
    pub async fn handle_client(&self, request: ClientRequest) -> ClientResponse {
        if let ClientRequest::Get { bucket, .. }
        | ClientRequest::Put { bucket, .. }
        | ClientRequest::Delete { bucket, .. } = &request
            && bucket.first() == Some(&0)
        {
            return ClientResponse::Error(ClientError::invalid(
                "bucket names that start with a NUL byte are reserved",
            ));
        }
        self.client_request(request, false).await
    }

    async fn client_request(&self, request: ClientRequest, forwarded: bool) -> ClientResponse {
        let node = &self.inner.id;
        // Reads (their repairs) and writes may carry old versions: a node that finished
        // leaving coordinates none, so the others need not wait for it once it is off.
        let _serving = if matches!(
            request,
            ClientRequest::Get { .. } | ClientRequest::Put { .. } | ClientRequest::Delete { .. }
        ) {
            match self.inner.transfers.begin_client_request() {
                Some(guard) => Some(guard),
                None => {
                    return ClientResponse::Error(ClientError {
                        kind: crate::protocol::ErrorKind::NotServing,
                        message: format!(
                            "{node} has left the cluster (or is finishing its leave) and no longer serves requests; send them to another member"
                        ),
                    });
                }
            }
        } else {
            None
        };
        match request {
            ClientRequest::Ping => ClientResponse::Pong {
                node: node.to_string(),
            },
            ClientRequest::Members => ClientResponse::Members(self.inner.membership.view()),
            ClientRequest::WithToken { .. } => ClientResponse::Error(ClientError::invalid(
                "a token-carrying request reached the node unwrapped by its listener",
            )),
            ClientRequest::Ring => ClientResponse::Ring(self.ring_info()),
            ClientRequest::Transfers => self.transfers_cluster_wide().await,
            ClientRequest::Aae => ClientResponse::Aae(self.aae_info()),
            ClientRequest::AaeRepair { partition } => self.aae_repair(partition).await,
            ClientRequest::Cluster(request) => self.cluster_change(request, 0).await,
            ClientRequest::Status => match self.status() {
                Ok(status) => ClientResponse::Status(status),
                Err(error) => ClientResponse::Error(error),
            },
            ClientRequest::Get {
                bucket,
                key,
                options,
            } => {
                // Per-request spans are debug level: at info, formatting their fields and
                // entering them on every poll cost ~3% of a loaded node (perf).
                let span = debug_span!("get", %node, bucket = %text(&bucket), key = %text(&key));
                self.get(bucket, key, options).instrument(span).await
            }
            ClientRequest::Put {
                bucket,
                key,
                context,
                content,
                options,
            } => {
                let span = debug_span!("put", %node, bucket = %text(&bucket), key = %text(&key), forwarded);
                let write = Write {
                    bucket,
                    key,
                    context: context.map(|bytes| bytes.into_vec()),
                    content: Some(content),
                    options,
                };
                self.write(write, forwarded).instrument(span).await
            }
            ClientRequest::Delete {
                bucket,
                key,
                context,
                options,
            } => {
                let span = debug_span!("delete", %node, bucket = %text(&bucket), key = %text(&key), forwarded);
                let write = Write {
                    bucket,
                    key,
                    context: context.map(|bytes| bytes.into_vec()),
                    content: None,
                    options,
                };
                self.write(write, forwarded).instrument(span).await
            }
        }
    }

    /// This node's summary: ring share, members up and down, keys, hints.
    /// The ring this node routes by, as `admin ring` shows it.
    fn ring_info(&self) -> crate::protocol::RingInfo {
        let ring = self.inner.membership.ring();
        let state = self
            .inner
            .membership
            .gossip()
            .map(|gossip| gossip.cluster_state());
        let owned = |node: &NodeId| ring.partitions_owned_by(node).len() as u32;
        let members = match &state {
            Some(state) => state
                .members()
                .iter()
                .map(|(node, member_state)| crate::protocol::RingMember {
                    node: node.to_string(),
                    state: member_state.as_str().to_string(),
                    partitions: owned(node),
                })
                .collect(),
            None => ring
                .members()
                .iter()
                .map(|node| crate::protocol::RingMember {
                    node: node.to_string(),
                    state: "valid".to_string(),
                    partitions: owned(node),
                })
                .collect(),
        };
        crate::protocol::RingInfo {
            cluster: state
                .as_ref()
                .map(|state| state.cluster().to_string())
                .unwrap_or_default(),
            version: ring.version(),
            owners: ring.owners().iter().map(ToString::to_string).collect(),
            members,
            staged: state
                .as_ref()
                .map(|state| cluster::describe_staged(state))
                .unwrap_or_default(),
            transfers: state
                .as_ref()
                .map(|state| {
                    state
                        .handoffs()
                        .iter()
                        .map(|t| (t.partition, t.from.to_string(), t.to.to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            pending_owners: state
                .as_ref()
                .and_then(|state| state.pending())
                .map(|pending| pending.owners().iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
        }
    }

    pub fn status(&self) -> Result<NodeStatus, ClientError> {
        let ring = self.inner.membership.ring();
        let members = self.inner.membership.view();
        let up = members.iter().filter(|member| member.up).count() as u32;
        let hints_held = self
            .inner
            .store
            .hint_count()
            .map_err(|error| ClientError::internal(error.to_string()))?;
        Ok(NodeStatus {
            node: self.inner.id.to_string(),
            partition_count: ring.partition_count(),
            partitions_owned: ring.partitions_owned_by(&self.inner.id).len() as u32,
            ring_version: ring.version(),
            members_up: up,
            members_down: members.len() as u32 - up,
            keys_estimate: self.inner.store.key_count_estimate(),
            hints_held,
            hints_delivered: self.inner.counters.hints_delivered.load(Ordering::Relaxed),
            hint_bytes: self.inner.store.hint_tally().bytes,
            hints_skipped_past_window: self
                .inner
                .counters
                .hints_skipped_past_window
                .load(Ordering::Relaxed),
            hints_refused_full: self
                .inner
                .counters
                .hints_refused_full
                .load(Ordering::Relaxed),
            dot_collisions: self.inner.counters.dot_collisions.load(Ordering::Relaxed),
            transfers_pending: self
                .inner
                .membership
                .gossip()
                .map_or(0, |gossip| gossip.cluster_state().handoffs().len() as u64),
            handoff_keys_sent: self
                .inner
                .counters
                .handoff_keys_sent
                .load(Ordering::Relaxed),
            handoff_bytes_sent: self
                .inner
                .counters
                .handoff_bytes_sent
                .load(Ordering::Relaxed),
            stray_keys_deleted: self
                .inner
                .counters
                .stray_keys_deleted
                .load(Ordering::Relaxed),
            stray_keys_handed: self
                .inner
                .counters
                .stray_keys_handed
                .load(Ordering::Relaxed),
            aae_exchanges: self.inner.aae.exchanges.load(Ordering::Relaxed),
            aae_segments_differing: self.inner.aae.segments_differing.load(Ordering::Relaxed),
            aae_keys_repaired: self.inner.aae.keys_repaired.load(Ordering::Relaxed),
            aae_bytes_repaired: self.inner.aae.bytes_repaired.load(Ordering::Relaxed),
            aae_bytes_exchanged: self.inner.aae.bytes_exchanged.load(Ordering::Relaxed),
            tombstones_held: self.tombstones_held(),
            tombstones_reaped: self.inner.reap.reaped.load(Ordering::Relaxed),
            actors_retired: self.inner.retire.retired.load(Ordering::Relaxed),
        })
    }

    /// This node's routing version (see [`ClusterState::routing_version`]); 0 without gossip.
    pub(super) fn routing_version(&self) -> u64 {
        self.inner
            .membership
            .gossip()
            .map_or(0, |gossip| gossip.cluster_state().routing_version())
    }

    /// This node's cluster state when a sender that routed by `ring_version` is behind it.
    /// A copy this node no longer replicates by it is neither read (it may be gone) nor
    /// written (it would be deleted as a stray): the answer is the newer ring, to route the
    /// request again by. A copy it still replicates is read or written as asked, and a
    /// write's answer carries the newer ring too: the write may be missing from replicas
    /// only that ring names (a node it is being handed to), which the coordinator then
    /// writes as well.
    ///
    /// A sender on this node's own routing version is checked the same way, since it may
    /// have chosen its targets by the ring before (it adopted this one between placing the
    /// request and sending it): a copy stored here then would be a stray that this node's
    /// cleanup, already done, never deletes, and a stray's stale versions can come back once
    /// their tombstone is reaped. Returns the state and whether it is newer than the
    /// sender's.
    fn ring_for_sender(&self, ring_version: u64) -> Option<(Arc<ClusterState>, bool)> {
        let state = self.inner.membership.gossip()?.cluster_state();
        let routing_version = state.routing_version();
        (ring_version != 0 && ring_version <= routing_version)
            .then_some((state, ring_version < routing_version))
    }

    /// Serves one request from a peer node.
    pub async fn handle_peer(&self, request: PeerRequest) -> PeerResponse {
        if let PeerRequest::ReplicaGet { partition, .. }
        | PeerRequest::ReplicaPut { partition, .. }
        | PeerRequest::Handoff { partition, .. } = &request
        {
            let partition_count = self.inner.membership.ring().partition_count();
            if *partition >= partition_count {
                warn!(node = %self.inner.id, partition, partition_count, "peer named a partition outside the ring");
                return PeerResponse::Failed {
                    message: format!(
                        "partition {partition} is outside the ring (0..{partition_count})"
                    ),
                };
            }
        }
        // A sender routing by an older ring: this node answers only for what it replicates
        // by its own ring, and says so when it stores (see `ring_for_stale_sender`).
        let mut newer_ring = None;
        if let PeerRequest::ReplicaGet {
            partition,
            bucket,
            hint_for: None,
            ring_version,
            ..
        }
        | PeerRequest::ReplicaPut {
            partition,
            bucket,
            hint_for: None,
            ring_version,
            ..
        } = &request
            && let Some((state, newer)) = self.ring_for_sender(*ring_version)
        {
            let writing = matches!(request, PeerRequest::ReplicaPut { .. });
            let n_val = match self.bucket_props(bucket).await {
                Ok(props) => props.n_val as usize,
                Err(error) => {
                    return PeerResponse::Failed {
                        message: error.message,
                    };
                }
            };
            let pending = writing.then(|| state.pending()).flatten();
            if !crate::core::handoff::keeps(
                state.ring(),
                pending,
                *partition,
                n_val,
                &self.inner.id,
            ) {
                return PeerResponse::StaleRing(Box::new((*state).clone()));
            }
            if newer {
                newer_ring = Some(Box::new((*state).clone()));
            }
        }
        match request {
            PeerRequest::Ping => PeerResponse::Pong,
            PeerRequest::ReplicaGet {
                partition,
                bucket,
                key,
                hint_for,
                ring_version: _,
            } => {
                let copy = Copy {
                    partition,
                    bucket,
                    key,
                    hint_for,
                };
                match self.read_copy(&copy) {
                    Ok(object) => PeerResponse::Object(object),
                    Err(message) => PeerResponse::Failed { message },
                }
            }
            PeerRequest::ReplicaPut {
                partition,
                bucket,
                key,
                object,
                hint_for,
                ring_version: _,
            } => {
                if let Err(error) = object.validate() {
                    warn!(node = %self.inner.id, error = %error, "refused an invalid replica object");
                    return PeerResponse::Failed {
                        message: format!("invalid object: {error}"),
                    };
                }
                if let Err(error) = validate_bucket_and_key(&bucket, &key) {
                    return PeerResponse::Failed {
                        message: error.message,
                    };
                }
                if let Some(reason) = self.space_refusal() {
                    return PeerResponse::Failed { message: reason };
                }
                let copy = Copy {
                    partition,
                    bucket,
                    key,
                    hint_for,
                };
                let durable = self.inner.settings.durable_writes;
                let _operation = self.inner.in_flight.begin(partition);
                match self.merge_copy(&copy, object).await {
                    Ok(()) => match newer_ring {
                        Some(ring) => PeerResponse::StoredOnNewerRing { durable, ring },
                        None => PeerResponse::Stored { durable },
                    },
                    Err(message) => PeerResponse::Failed { message },
                }
            }
            PeerRequest::Coordinate(request) => {
                PeerResponse::Client(Box::pin(self.client_request(request, true)).await)
            }
            PeerRequest::PartitionSizes { partitions } => {
                let partition_count = self.inner.membership.ring().partition_count();
                if partitions.len() > partition_count as usize {
                    return PeerResponse::Failed {
                        message: format!(
                            "asked for {} partitions; the ring has {partition_count}",
                            partitions.len()
                        ),
                    };
                }
                PeerResponse::PartitionSizes(
                    partitions
                        .into_iter()
                        .map(|partition| {
                            let (records, bytes) = self.inner.store.partition_estimate(partition);
                            (partition, records, bytes)
                        })
                        .collect(),
                )
            }
            PeerRequest::Cluster { request, hops } => {
                PeerResponse::Client(Box::pin(self.cluster_change(request, hops)).await)
            }
            PeerRequest::CoordinateOnce {
                sender,
                request_id,
                request,
            } => {
                let once = self.inner.forwarded.claim(sender.clone(), request_id);
                let response = once
                    .get_or_init(
                        || async move { Box::pin(self.client_request(request, true)).await },
                    )
                    .await;
                self.inner.forwarded.settled(sender, request_id, response);
                PeerResponse::Client(response.clone())
            }
            PeerRequest::GossipDigest {
                digests,
                ring_version,
                ring_fingerprint,
            } => match self.inner.membership.gossip() {
                Some(gossip) if crate::core::gossip::check_entry_count(digests.len()).is_ok() => {
                    let (records, requests) = gossip.answer(&digests);
                    let ours = gossip.cluster_state();
                    let ring = ours
                        .is_news_to(ring_version, ring_fingerprint)
                        .then(|| Box::new((*ours).clone()));
                    PeerResponse::GossipReply {
                        records,
                        requests,
                        ring,
                        ring_version: ours.version(),
                        ring_fingerprint: ours.fingerprint(),
                    }
                }
                Some(_) => PeerResponse::Failed {
                    message: "too many gossip digests".into(),
                },
                None => PeerResponse::Failed {
                    message: "this node does not gossip".into(),
                },
            },
            PeerRequest::GossipPush { records, ring } => match self.inner.membership.gossip() {
                Some(gossip) if crate::core::gossip::check_entry_count(records.len()).is_ok() => {
                    gossip.apply(records);
                    if let Some(ring) = ring {
                        gossip.offer_cluster_state(*ring);
                    }
                    PeerResponse::Pong
                }
                _ => PeerResponse::Failed {
                    message: "gossip push refused".into(),
                },
            },
            PeerRequest::ListKeys {
                partition,
                bucket,
                start_after,
                limit,
            } => self.serve_list_keys(partition, bucket, start_after, limit),
            PeerRequest::Handoff { partition, records } => {
                self.receive_handoff(partition, records).await
            }
            PeerRequest::LeaveFinished { node } => match self.record_leave_finished(&node) {
                Ok(()) => PeerResponse::Pong,
                Err(message) => PeerResponse::Failed { message },
            },
            PeerRequest::HandoffDone { handoff } => match self.record_handoff_done(&handoff) {
                Ok(()) => PeerResponse::Pong,
                Err(message) => PeerResponse::Failed { message },
            },
            PeerRequest::ReapCheck { partition, keys } => {
                self.serve_reap_check(partition, keys).await
            }
            PeerRequest::Reap { partition, keys } => self.serve_reap(partition, keys).await,
            PeerRequest::InFlight { partition } => PeerResponse::InFlight {
                oldest_age_ms: self
                    .inner
                    .in_flight
                    .oldest_age(partition)
                    .map(|age| age.as_micros().div_ceil(1000) as u64),
                strays: self.may_hold_strays(),
            },
            PeerRequest::HintCount { partition } => PeerResponse::HintCount(
                self.inner
                    .store
                    .hint_tally()
                    .by_partition
                    .get(&partition)
                    .copied()
                    .unwrap_or(0),
            ),
            request @ (PeerRequest::AaeBranches { .. }
            | PeerRequest::AaeSegments { .. }
            | PeerRequest::AaeKeys { .. }) => self.serve_aae(request).await,
            PeerRequest::TransferProgress => {
                PeerResponse::TransferProgress(self.transfer_progress())
            }
            PeerRequest::SetTransferLimit { limit } => {
                self.set_transfer_limit(limit.min(crate::config::MAX_TRANSFER_LIMIT));
                PeerResponse::Pong
            }
            PeerRequest::BucketPropsChanged { bucket, props } => {
                self.learn_bucket_props(&bucket, &props);
                PeerResponse::Pong
            }
            PeerRequest::CopyCheck { partition, keys } => {
                self.serve_copy_check(partition, keys).await
            }
            PeerRequest::RetireCheck { partition, keys } => {
                self.serve_retire_check(partition, keys).await
            }
            PeerRequest::Retire { partition, keys } => self.serve_retire(partition, keys).await,
        }
    }

    fn timeout_of(&self, timeout_ms: Option<u64>) -> Duration {
        timeout_ms
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis)
            .unwrap_or(self.inner.settings.request_timeout)
    }

    /// The key's partition and the replicas to ask (fallbacks for down primaries when
    /// `sloppy`). A cluster smaller than `n_val` keeps one copy per node, so the levels are
    /// later capped at the number of targets.
    fn placement(
        &self,
        bucket: &[u8],
        key: &[u8],
        n_val: u32,
        sloppy: bool,
    ) -> (PartitionId, Vec<Target>) {
        self.placement_with(bucket, key, n_val, sloppy, |_| true)
    }

    /// [`Node::placement`] for a write: a primary silent for longer than the hint window
    /// gets no fallback, so no new hint is created for it (Cassandra's max_hint_window). It
    /// is still asked and counts as a failed reply; hints already held are kept.
    ///
    /// While a ring change is pending the write also goes to the pending ring's replicas,
    /// and the replica sets returned (indexes into the targets) are both rings': the write
    /// must meet its quorum in each.
    fn write_placement(
        &self,
        bucket: &[u8],
        key: &[u8],
        n_val: u32,
        sloppy: bool,
    ) -> (PartitionId, Vec<Target>, Vec<Vec<usize>>) {
        let membership = &self.inner.membership;
        let window = self.inner.settings.hint_window;
        let mut skipped = false;
        let mut within_window = |primary: &NodeId| {
            let within = membership
                .silent_for(primary)
                .is_none_or(|silent| silent < window);
            skipped |= !within;
            within
        };
        let (partition, targets) =
            self.placement_with(bucket, key, n_val, sloppy, &mut within_window);
        let (targets, sets) = match membership.pending_ring() {
            Some(pending) => {
                let pending_targets = placement::targets(
                    &pending,
                    partition,
                    n_val as usize,
                    sloppy,
                    |node| *node == self.inner.id || membership.is_up(node),
                    &mut within_window,
                );
                placement::spanning_targets(targets, pending_targets)
            }
            None => {
                let all = (0..targets.len()).collect();
                (targets, vec![all])
            }
        };
        if skipped {
            self.inner
                .counters
                .hints_skipped_past_window
                .fetch_add(1, Ordering::Relaxed);
        }
        (partition, targets, sets)
    }

    fn placement_with(
        &self,
        bucket: &[u8],
        key: &[u8],
        n_val: u32,
        sloppy: bool,
        may_stand_in: impl FnMut(&NodeId) -> bool,
    ) -> (PartitionId, Vec<Target>) {
        let ring = self.inner.membership.ring();
        let partition = ring.partition_for_key(bucket, key);
        let n_val = n_val as usize;
        let membership = &self.inner.membership;
        let targets = placement::targets(
            &ring,
            partition,
            n_val,
            sloppy,
            |node| *node == self.inner.id || membership.is_up(node),
            may_stand_in,
        );
        (partition, targets)
    }
}

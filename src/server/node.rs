//! One node's request handling: it coordinates client gets, puts and deletes over the
//! [`Transport`] seam, serves its peers' replica reads and writes from the [`Store`], keeps
//! hints for down primaries and hands them back.
//!
//! The same `Node` runs over QUIC in `dynkv server` and over the in-memory network in the
//! simulation tests. The decisions are made by the core (`placement::targets`,
//! `coordinate_put`, `merge_replica`, `GetCoordinator`, `WriteTracker`); this file sends
//! messages, keeps time and stores.

use crate::core::epoch::{KeyActor, NodeEpoch};
use crate::core::hints::{self, HintKey, HintRecord};
use crate::core::ids::NodeId;
use crate::core::object::{
    Content, Context, LocalRecord, ObjectError, StoredObject, colliding_versions, coordinate_put,
    decode_local_record, decode_record, encode_local_record, live_siblings, merge_replica,
    object_size_bytes, rescue_version,
};
use crate::core::placement;
use crate::core::quorum::{BucketDefaults, QuorumOutcome, ReadQuorum, WriteQuorum, WriteTracker};
use crate::core::request::{GetCoordinator, ReadFanout, Target};
use crate::core::ring::{PartitionId, Ring};
use crate::net::Transport;
use crate::protocol::{
    ClientError, ClientRequest, ClientResponse, ErrorKind, GetOptions, NewContent, NodeStatus,
    PeerRequest, PeerResponse, PutOptions, validate_bucket_and_key,
};
use crate::storage::{HintWrite, Store, UpdateError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, info, warn};

pub use super::membership::{Membership, StaticMembership};

mod buckets;
mod coverage;
pub use buckets::{BucketProps, PROPS_BUCKET};

/// The settings a node's request handling needs.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub bucket_defaults: BucketDefaults,
    pub allow_mult: bool,
    pub request_timeout: Duration,
    pub max_value_bytes: u64,
    pub max_object_bytes: u64,
    pub max_siblings: u32,
    /// The store fsyncs before it acknowledges, so this node's acks count for `dw`.
    pub durable_writes: bool,
    /// Hints older than this are dropped instead of delivered.
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
}

/// What [`Node::ask_replicas`] needs to start replica reads of one get.
struct ReplicaRead<'a> {
    partition: PartitionId,
    bucket: &'a [u8],
    key: &'a [u8],
    targets: &'a [Target],
    deadline: Instant,
    replies: &'a mpsc::Sender<(usize, Result<Option<StoredObject>, ()>)>,
}

pub type PeerTransport = Arc<dyn Transport<PeerRequest, PeerResponse>>;

#[derive(Default)]
struct Counters {
    hints_delivered: AtomicU64,
    hints_expired: AtomicU64,
    /// Replica merges that met two different versions under one dot (see `epoch`).
    dot_collisions: AtomicU64,
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
    counters: Counters,
    bucket_cache: buckets::BucketCache,
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
}

impl From<ObjectError> for LocalWriteError {
    fn from(error: ObjectError) -> Self {
        LocalWriteError::Storage(error.to_string())
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
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
        Node {
            inner: Arc::new(NodeInner {
                id,
                key_actors,
                store,
                membership,
                peers,
                settings,
                counters: Counters::default(),
                bucket_cache: buckets::BucketCache::default(),
            }),
        }
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
        match request {
            ClientRequest::Ping => ClientResponse::Pong {
                node: node.to_string(),
            },
            ClientRequest::Members => ClientResponse::Members(self.inner.membership.view()),
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
            members_up: up,
            members_down: members.len() as u32 - up,
            keys_estimate: self.inner.store.key_count_estimate(),
            hints_held,
            hints_delivered: self.inner.counters.hints_delivered.load(Ordering::Relaxed),
            hints_expired: self.inner.counters.hints_expired.load(Ordering::Relaxed),
            dot_collisions: self.inner.counters.dot_collisions.load(Ordering::Relaxed),
        })
    }

    /// Serves one request from a peer node.
    pub async fn handle_peer(&self, request: PeerRequest) -> PeerResponse {
        if let PeerRequest::ReplicaGet { partition, .. }
        | PeerRequest::ReplicaPut { partition, .. } = &request
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
        match request {
            PeerRequest::Ping => PeerResponse::Pong,
            PeerRequest::ReplicaGet {
                partition,
                bucket,
                key,
                hint_for,
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
                let copy = Copy {
                    partition,
                    bucket,
                    key,
                    hint_for,
                };
                match self.merge_copy(&copy, object).await {
                    Ok(()) => PeerResponse::Stored {
                        durable: self.inner.settings.durable_writes,
                    },
                    Err(message) => PeerResponse::Failed { message },
                }
            }
            PeerRequest::Coordinate(request) => {
                PeerResponse::Client(Box::pin(self.client_request(request, true)).await)
            }
            PeerRequest::GossipDigest { digests } => match self.inner.membership.gossip() {
                Some(gossip) if crate::core::gossip::check_entry_count(digests.len()).is_ok() => {
                    let (records, requests) = gossip.answer(&digests);
                    PeerResponse::GossipReply { records, requests }
                }
                Some(_) => PeerResponse::Failed {
                    message: "too many gossip digests".into(),
                },
                None => PeerResponse::Failed {
                    message: "this node does not gossip".into(),
                },
            },
            PeerRequest::GossipPush { records } => match self.inner.membership.gossip() {
                Some(gossip) if crate::core::gossip::check_entry_count(records.len()).is_ok() => {
                    gossip.apply(records);
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
            PeerRequest::BucketPropsChanged { bucket, props } => {
                self.learn_bucket_props(&bucket, &props);
                PeerResponse::Pong
            }
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
        let ring = self.inner.membership.ring();
        let partition = ring.partition_for_key(bucket, key);
        let n_val = n_val as usize;
        let membership = &self.inner.membership;
        let targets = placement::targets(&ring, partition, n_val, sloppy, |node| {
            *node == self.inner.id || membership.is_up(node)
        });
        (partition, targets)
    }

    /// Reads this node's copy of a key (a replica, or a hint it keeps for a primary).
    fn read_copy(&self, copy: &Copy) -> Result<Option<StoredObject>, String> {
        let store = &self.inner.store;
        match &copy.hint_for {
            None => {
                let bytes = store
                    .get(copy.partition, &copy.bucket, &copy.key)
                    .map_err(|error| error.to_string())?;
                bytes
                    .map(|bytes| decode_record(&bytes))
                    .transpose()
                    .map_err(|error| {
                        warn!(node = %self.inner.id, partition = copy.partition, error = %error, "stored record is unreadable");
                        error.to_string()
                    })
            }
            Some(primary) => {
                let bytes = store
                    .hint_get(&copy.hint_key(primary))
                    .map_err(|error| error.to_string())?;
                bytes
                    .map(|bytes| hints::decode_record(&bytes).map(|record| record.object))
                    .transpose()
                    .map_err(|error| error.to_string())
            }
        }
    }

    /// Atomically transforms this node's copy of a key and stores the result durably.
    /// `transform` gets the current record and returns the new one (`None`: keep) and an
    /// output.
    /// `transform` runs on the store's writer, batched with other updates.
    async fn update_copy<T: Send + 'static>(
        &self,
        copy: &Copy,
        transform: impl FnOnce(Option<LocalRecord>) -> Result<(Option<LocalRecord>, T), LocalWriteError>
        + Send
        + 'static,
    ) -> Result<T, LocalWriteError> {
        let store = &self.inner.store;
        let result = match &copy.hint_for {
            None => {
                store
                    .update(copy.partition, &copy.bucket, &copy.key, move |current| {
                        let local = current.map(decode_local_record).transpose()?;
                        let (updated, output) = transform(local)?;
                        Ok((updated.map(|record| encode_local_record(&record)), output))
                    })
                    .await
            }
            Some(primary) => {
                store
                    .hint_update(&copy.hint_key(primary), move |current| {
                        let existing = current
                            .map(hints::decode_record)
                            .transpose()
                            .map_err(|error| LocalWriteError::Storage(error.to_string()))?;
                        let created_micros = existing
                            .as_ref()
                            .map_or_else(now_micros, |record| record.created_micros);
                        let local = existing.map(|record| LocalRecord {
                            object: record.object,
                            coordinator: record.coordinator,
                        });
                        let (updated, output) = transform(local)?;
                        let write = match updated {
                            Some(record) => HintWrite::Put(hints::encode_record(&HintRecord {
                                created_micros,
                                object: record.object,
                                coordinator: record.coordinator,
                            })),
                            None => HintWrite::Keep,
                        };
                        Ok((write, output))
                    })
                    .await
            }
        };
        result.map_err(|error| match error {
            UpdateError::Rejected { source } => source,
            UpdateError::Storage { source } => LocalWriteError::Storage(source.to_string()),
        })
    }

    /// A replica's write: merge the incoming object into this node's copy.
    ///
    /// A version that the incoming object and this copy hold under one dot, with different
    /// contents, is a dot issued twice: the merge would keep one and drop the other, so the
    /// dropped one is recorded again under a fresh key actor, counted and logged.
    async fn merge_copy(&self, copy: &Copy, incoming: StoredObject) -> Result<(), String> {
        let allow_mult = self.bucket_props(&copy.bucket).await.keeps_siblings();
        let key_actors = self.inner.key_actors.clone();
        let result = self
            .update_copy(copy, move |local| {
                let collisions = local
                    .as_ref()
                    .map(|local| colliding_versions(&local.object, &incoming))
                    .unwrap_or_default();
                if let Some(local) = &local
                    && collisions.is_empty()
                    && local.object.descends(&incoming)
                {
                    // Nothing new: skip the write (and its fsync).
                    return Ok((None, 0));
                }
                let coordinator = local.as_ref().and_then(|local| local.coordinator);
                let mut merged = merge_replica(
                    local.as_ref().map(|local| &local.object),
                    &incoming,
                    allow_mult,
                );
                for (ours, theirs) in &collisions {
                    for version in [ours, theirs] {
                        if !merged.values().contains(&version) {
                            merged =
                                rescue_version(&merged, version.clone(), key_actors.fresh().actor);
                        }
                    }
                }
                Ok((
                    Some(LocalRecord {
                        object: merged,
                        coordinator,
                    }),
                    collisions.len(),
                ))
            })
            .await;
        match result {
            Ok(0) => Ok(()),
            Ok(collisions) => {
                self.inner
                    .counters
                    .dot_collisions
                    .fetch_add(collisions as u64, Ordering::Relaxed);
                metrics::counter!("dynkv_dot_collisions_total").increment(collisions as u64);
                warn!(node = %self.inner.id, partition = copy.partition, collisions, "a replica merge met different versions under one dot; both were kept");
                Ok(())
            }
            Err(LocalWriteError::Refused(error)) => Err(error.message),
            Err(LocalWriteError::Storage(message)) => Err(message),
        }
    }

    async fn get(&self, bucket: Vec<u8>, key: Vec<u8>, options: GetOptions) -> ClientResponse {
        if let Err(error) = validate_bucket_and_key(&bucket, &key) {
            return ClientResponse::Error(error);
        }
        let props = self.bucket_props(&bucket).await;
        let quorum = match ReadQuorum::resolve(options.r, options.pr, &props.defaults()) {
            Ok(quorum) => quorum,
            Err(error) => return ClientResponse::Error(ClientError::invalid(error.to_string())),
        };
        let deadline = Instant::now() + self.timeout_of(options.timeout_ms);
        let sloppy = options.sloppy_quorum.unwrap_or(true);
        let (partition, targets) = self.placement(&bucket, &key, props.n_val, sloppy);
        let quorum = ReadQuorum {
            r: quorum.r.min(targets.len() as u32),
            pr: quorum.pr.min(targets.len() as u32),
            ..quorum
        };
        let fanout = if options.ask_all_replicas.unwrap_or(false) || self.draw_read_repair() {
            ReadFanout::All
        } else {
            ReadFanout::Needed
        };
        let mut coordinator = GetCoordinator::new(quorum, &targets, Some(&self.inner.id), fanout);
        let (replies_sender, mut replies) = mpsc::channel(targets.len().max(1));
        let read = ReplicaRead {
            partition,
            bucket: &bucket,
            key: &key,
            targets: &targets,
            deadline,
            replies: &replies_sender,
        };
        self.ask_replicas(&read, coordinator.to_ask());
        let speculate_at = Instant::now() + self.inner.settings.speculative_retry;
        let mut speculated = false;
        let outcome = loop {
            match coordinator.outcome() {
                QuorumOutcome::Pending => {}
                decided => break Some(decided),
            }
            if coordinator.complete() {
                // Every asked replica answered and nobody is left to ask.
                break None;
            }
            let wake_at = if speculated {
                deadline
            } else {
                speculate_at.min(deadline)
            };
            match tokio::time::timeout_at(wake_at, replies.recv()).await {
                Ok(Some((index, reply))) => {
                    coordinator.on_reply(&targets[index], reply);
                    self.ask_replicas(&read, coordinator.to_ask());
                }
                Ok(None) => break None,
                Err(_) if !speculated && Instant::now() < deadline => {
                    speculated = true;
                    let more = coordinator.speculate();
                    if !more.is_empty() {
                        debug!(asked = more.len(), "replicas slow: speculative read");
                    }
                    self.ask_replicas(&read, more);
                }
                Err(_) => break None,
            }
        };
        drop(replies_sender);
        let response = match outcome {
            Some(QuorumOutcome::Won) => match coordinator.merged() {
                None => ClientResponse::NotFound { context: None },
                Some(object) => {
                    // Replicas may hold concurrent winners of a last-write-wins bucket.
                    let reconciled;
                    let object = if props.keeps_siblings() {
                        object
                    } else {
                        reconciled = buckets::reconcile_latest(object);
                        &reconciled
                    };
                    let context = Context::of(object).encode();
                    let siblings = live_siblings(object);
                    if siblings.is_empty() {
                        ClientResponse::NotFound {
                            context: Some(serde_bytes::ByteBuf::from(context)),
                        }
                    } else {
                        ClientResponse::Found { siblings, context }
                    }
                }
            },
            Some(QuorumOutcome::Lost(shortfall)) => error_response(
                ErrorKind::QuorumUnmet(shortfall.clone()),
                shortfall.to_string(),
            ),
            Some(QuorumOutcome::Pending) | None => {
                let shortfall = coordinator.tracker().timeout_shortfall();
                let message = match &shortfall {
                    Some(shortfall) => format!("timed out: {shortfall}"),
                    None => "timed out".to_string(),
                };
                error_response(ErrorKind::Timeout(shortfall), message)
            }
        };
        // Read repair runs after the answer, once the slower replicas have replied. A get whose
        // asked replicas all answered and agree (the usual r=1 or r=quorum read) has nothing
        // left to do: no task for it.
        if coordinator.complete() && coordinator.read_repairs().is_empty() {
            return response;
        }
        let node = self.clone();
        tokio::spawn(
            async move {
                while !coordinator.complete() {
                    match tokio::time::timeout_at(deadline, replies.recv()).await {
                        Ok(Some((index, reply))) => {
                            coordinator.on_reply(&targets[index], reply);
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                let Some(merged) = coordinator.merged().cloned() else {
                    return;
                };
                let stale = coordinator.read_repairs();
                for target in targets.iter().filter(|target| stale.contains(&target.node)) {
                    debug!(replica = %target.node, "read repair");
                    super::counters::record_read_repair();
                    let copy = Copy {
                        partition,
                        bucket: bucket.clone(),
                        key: key.clone(),
                        hint_for: target.hint_for.clone(),
                    };
                    let deadline = Instant::now() + node.inner.settings.request_timeout;
                    node.replica_put(&target.node, copy, merged.clone(), deadline)
                        .await;
                }
            }
            .in_current_span(),
        );
        response
    }

    /// Whether this read asks every replica for read repair (`read_repair_chance`).
    fn draw_read_repair(&self) -> bool {
        let chance = self.inner.settings.read_repair_chance;
        chance > 0.0 && rand::random::<f64>() < chance
    }

    /// Starts reads of the targets at `indexes`; each reply arrives on `read.replies`.
    fn ask_replicas(&self, read: &ReplicaRead<'_>, indexes: Vec<usize>) {
        for index in indexes {
            let target = &read.targets[index];
            let copy = Copy {
                partition: read.partition,
                bucket: read.bucket.to_vec(),
                key: read.key.to_vec(),
                hint_for: target.hint_for.clone(),
            };
            if target.node == self.inner.id {
                // This node's own copy is a synchronous read: no task. The channel has room
                // for one reply per target, so the send cannot fail for want of space.
                let reply = self.read_copy(&copy).map_err(|_| ());
                let _ = read.replies.try_send((index, reply));
                continue;
            }
            let node = self.clone();
            let sender = read.replies.clone();
            let target = target.node.clone();
            let deadline = read.deadline;
            tokio::spawn(
                async move {
                    let reply = node.replica_get(&target, copy, deadline).await;
                    let _ = sender.send((index, reply)).await;
                }
                .in_current_span(),
            );
        }
    }

    /// Reads one replica's copy: locally without the network, otherwise over the transport.
    async fn replica_get(
        &self,
        node: &NodeId,
        copy: Copy,
        deadline: Instant,
    ) -> Result<Option<StoredObject>, ()> {
        if node == &self.inner.id {
            return self.read_copy(&copy).map_err(|_| ());
        }
        let request = PeerRequest::ReplicaGet {
            partition: copy.partition,
            bucket: copy.bucket,
            key: copy.key,
            hint_for: copy.hint_for,
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        match self.inner.peers.call(node, request, timeout).await {
            Ok(PeerResponse::Object(Some(object))) => match object.validate() {
                Ok(()) => Ok(Some(object)),
                Err(error) => {
                    warn!(peer = %node, error = %error, "peer sent an invalid object");
                    Err(())
                }
            },
            Ok(PeerResponse::Object(None)) => Ok(None),
            Ok(other) => {
                debug!(peer = %node, response = ?other, "replica get failed");
                Err(())
            }
            Err(error) => {
                debug!(peer = %node, error = %error, "replica get failed");
                Err(())
            }
        }
    }

    /// Sends an object to one replica (or fallback) to merge; the answer is (acked, durable).
    async fn replica_put(
        &self,
        node: &NodeId,
        copy: Copy,
        object: StoredObject,
        deadline: Instant,
    ) -> (bool, bool) {
        if node == &self.inner.id {
            return match self.merge_copy(&copy, object).await {
                Ok(()) => (true, self.inner.settings.durable_writes),
                Err(_) => (false, false),
            };
        }
        let request = PeerRequest::ReplicaPut {
            partition: copy.partition,
            bucket: copy.bucket,
            key: copy.key,
            object,
            hint_for: copy.hint_for,
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        match self.inner.peers.call(node, request, timeout).await {
            Ok(PeerResponse::Stored { durable }) => (true, durable),
            Ok(other) => {
                debug!(peer = %node, response = ?other, "replica put failed");
                (false, false)
            }
            Err(error) => {
                debug!(peer = %node, error = %error, "replica put failed");
                (false, false)
            }
        }
    }

    async fn write(&self, write: Write, forwarded: bool) -> ClientResponse {
        if let Err(error) = validate_bucket_and_key(&write.bucket, &write.key) {
            return ClientResponse::Error(error);
        }
        let settings = &self.inner.settings;
        let props = self.bucket_props(&write.bucket).await;
        let quorum = match WriteQuorum::resolve(
            write.options.w,
            write.options.dw,
            write.options.pw,
            &props.defaults(),
        ) {
            Ok(quorum) => quorum,
            Err(error) => return ClientResponse::Error(ClientError::invalid(error.to_string())),
        };
        if let Some(content) = &write.content
            && content.value.len() as u64 > settings.max_value_bytes
        {
            return error_response(
                ErrorKind::TooLarge,
                format!(
                    "value is {} bytes; the limit is {} bytes (limits.max_value_bytes)",
                    content.value.len(),
                    settings.max_value_bytes
                ),
            );
        }
        let context = match write.context.as_deref().map(Context::decode).transpose() {
            Ok(context) => context,
            Err(error) => {
                return ClientResponse::Error(ClientError::invalid(format!(
                    "bad context: {error}"
                )));
            }
        };
        let timeout = self.timeout_of(write.options.timeout_ms);
        let deadline = Instant::now() + timeout;
        let sloppy = write.options.sloppy_quorum.unwrap_or(true);
        let (partition, targets) = self.placement(&write.bucket, &write.key, props.n_val, sloppy);
        let Some(local_target) = targets
            .iter()
            .find(|target| target.node == self.inner.id)
            .cloned()
        else {
            if forwarded {
                // The sender thought this node was a target; the rings disagree. Refuse
                // rather than bounce the write around.
                return ClientResponse::Error(ClientError::internal(
                    "forwarded write reached a node that is not a replica of its key",
                ));
            }
            return self.forward(write, &targets, deadline).await;
        };
        if local_target.hint_for.is_some() && !forwarded {
            // This node is only a fallback for the key: an up primary holds the key's history
            // and coordinates under its own key actor, so this node's hint copy does not
            // become a coordinator's copy (see `core::epoch`).
            let primaries: Vec<Target> = targets
                .iter()
                .filter(|target| target.primary && target.node != self.inner.id)
                .cloned()
                .collect();
            if !primaries.is_empty() {
                return self.forward(write, &primaries, deadline).await;
            }
        }
        let primaries = targets.iter().filter(|target| target.primary).count() as u32;
        let quorum = WriteQuorum {
            w: quorum.w.min(targets.len() as u32),
            dw: quorum.dw.min(targets.len() as u32),
            pw: quorum.pw.min(targets.len() as u32),
            ..quorum
        };
        if quorum.pw > primaries {
            // Fallbacks never count as primaries: say so at once rather than after the timeout.
            let shortfall = crate::core::quorum::QuorumShortfall {
                requirement: "pw".into(),
                answered: primaries,
                required: quorum.pw,
                asked: targets.len() as u32,
            };
            return error_response(
                ErrorKind::QuorumUnmet(shortfall.clone()),
                format!("{shortfall}: only {primaries} primary replicas are up"),
            );
        }

        let content = match write.content {
            Some(NewContent {
                value,
                content_type,
                user_metadata,
            }) => Content {
                value,
                content_type,
                user_metadata,
                last_modified_micros: now_micros(),
                deleted: false,
            },
            None => Content::tombstone(now_micros()),
        };
        let local_copy = Copy {
            partition,
            bucket: write.bucket.clone(),
            key: write.key.clone(),
            hint_for: local_target.hint_for.clone(),
        };
        let object = match self
            .coordinate_local(&local_copy, context, content, props.keeps_siblings())
            .await
        {
            Ok(object) => object,
            Err(LocalWriteError::Refused(error)) => return ClientResponse::Error(error),
            Err(LocalWriteError::Storage(message)) => {
                warn!(error = %message, "local write failed");
                return ClientResponse::Error(ClientError::internal(format!(
                    "local write failed: {message}"
                )));
            }
        };

        let mut tracker = WriteTracker::new(quorum, targets.len() as u32, primaries);
        let mut outcome = tracker.record(local_target.primary, true, settings.durable_writes);
        let (acks_sender, mut acks) = mpsc::channel(targets.len().max(1));
        for target in targets.iter().filter(|target| target.node != self.inner.id) {
            let node = self.clone();
            let sender = acks_sender.clone();
            let copy = Copy {
                partition,
                bucket: write.bucket.clone(),
                key: write.key.clone(),
                hint_for: target.hint_for.clone(),
            };
            let (target_node, primary, object) =
                (target.node.clone(), target.primary, object.clone());
            tokio::spawn(
                async move {
                    let (acked, durable) =
                        node.replica_put(&target_node, copy, object, deadline).await;
                    let _ = sender.send((primary, acked, durable)).await;
                }
                .in_current_span(),
            );
        }
        drop(acks_sender);
        while outcome == QuorumOutcome::Pending {
            match tokio::time::timeout_at(deadline, acks.recv()).await {
                Ok(Some((primary, acked, durable))) => {
                    outcome = tracker.record(primary, acked, durable);
                }
                Ok(None) | Err(_) => break,
            }
        }
        match outcome {
            QuorumOutcome::Won => {
                let siblings = if write.options.return_body {
                    live_siblings(&object)
                } else {
                    Vec::new()
                };
                ClientResponse::Stored {
                    siblings,
                    context: Context::of(&object).encode(),
                }
            }
            QuorumOutcome::Lost(shortfall) => error_response(
                ErrorKind::QuorumUnmet(shortfall.clone()),
                shortfall.to_string(),
            ),
            QuorumOutcome::Pending => {
                let shortfall = tracker.timeout_shortfall();
                let message = match &shortfall {
                    Some(shortfall) => {
                        format!("timed out after {} ms: {shortfall}", timeout.as_millis())
                    }
                    None => format!("timed out after {} ms", timeout.as_millis()),
                };
                error_response(ErrorKind::Timeout(shortfall), message)
            }
        }
    }

    /// The coordinator's local step: read, supersede what the context covers, add the new
    /// value with a fresh dot of this node's actor, check the limits, store durably.
    async fn coordinate_local(
        &self,
        copy: &Copy,
        context: Option<Context>,
        content: Content,
        allow_mult: bool,
    ) -> Result<StoredObject, LocalWriteError> {
        let max_siblings = self.inner.settings.max_siblings;
        let max_object_bytes = self.inner.settings.max_object_bytes;
        let key_actors = self.inner.key_actors.clone();
        self.update_copy(copy, move |local| {
            // The actor this copy's writes are coordinated under; a copy this node has not
            // coordinated into since it was born (or since an unclean stop) gets a fresh one,
            // so no dot is ever issued twice (see `core::epoch`).
            let key_actor = key_actors.choose(local.as_ref().and_then(|local| local.coordinator));
            let local = local.map(|local| local.object);
            // A delete without a context removes what this replica has seen, as Riak
            // fetches the vclock first for such a delete.
            let context = match (&context, content.deleted, &local) {
                (None, true, Some(local)) => Some(Context::of(local)),
                _ => context,
            };
            let updated = coordinate_put(
                local.as_ref(),
                context.as_ref(),
                content,
                key_actor.actor,
                allow_mult,
            );
            let siblings = updated.value_count();
            if siblings > max_siblings as usize {
                return Err(LocalWriteError::Refused(ClientError {
                    kind: ErrorKind::TooLarge,
                    message: format!(
                        "the key would have {siblings} siblings; at most {} are allowed (limits.max_siblings): read it and write back with its context to resolve them",
                        max_siblings
                    ),
                }));
            }
            let size = object_size_bytes(&updated) as u64;
            if size > max_object_bytes {
                return Err(LocalWriteError::Refused(ClientError {
                    kind: ErrorKind::TooLarge,
                    message: format!(
                        "the object would be {size} bytes with its siblings; the limit is {} bytes (limits.max_object_bytes)",
                        max_object_bytes
                    ),
                }));
            }
            let record = LocalRecord {
                object: updated.clone(),
                coordinator: Some(key_actor),
            };
            Ok((Some(record), updated))
        })
        .await
    }

    /// Sends a write to a target of its key to coordinate, trying each in turn.
    async fn forward(&self, write: Write, targets: &[Target], deadline: Instant) -> ClientResponse {
        let request = match write.content {
            Some(content) => ClientRequest::Put {
                bucket: write.bucket,
                key: write.key,
                context: write.context.map(serde_bytes::ByteBuf::from),
                content,
                options: write.options,
            },
            None => ClientRequest::Delete {
                bucket: write.bucket,
                key: write.key,
                context: write.context.map(serde_bytes::ByteBuf::from),
                options: write.options,
            },
        };
        let mut last_error = String::from("no replica to forward to");
        for target in targets {
            let timeout = deadline.saturating_duration_since(Instant::now());
            if timeout.is_zero() {
                break;
            }
            // Leave later replicas a share of the time if this one does not answer.
            let attempt = (timeout / 2).max(Duration::from_millis(1));
            match self
                .inner
                .peers
                .call(
                    &target.node,
                    PeerRequest::Coordinate(request.clone()),
                    attempt,
                )
                .await
            {
                Ok(PeerResponse::Client(response)) => return response,
                Ok(other) => last_error = format!("{} answered {other:?}", target.node),
                Err(error) => last_error = format!("{}: {error}", target.node),
            }
        }
        error_response(
            ErrorKind::Timeout(None),
            format!("no replica could coordinate the write: {last_error}"),
        )
    }

    /// Hinted handoff, one pass: for every member that is up and for which this node holds
    /// hints, sends them in batches (each batch acknowledged before the next) and deletes each
    /// hint once its primary acknowledged it, unless it changed meanwhile. Hints older than
    /// the hint window are dropped and counted. Returns the number delivered.
    pub async fn hand_off_hints(&self) -> u64 {
        let members = self.inner.membership.ring().members();
        let mut delivered = 0;
        for primary in members.iter().filter(|member| **member != self.inner.id) {
            if !self.inner.membership.is_up(primary) {
                continue;
            }
            delivered += self.hand_off_to(primary).await;
        }
        delivered
    }

    async fn hand_off_to(&self, primary: &NodeId) -> u64 {
        let prefix = hints::primary_prefix(primary);
        let batch = self.inner.settings.handoff_batch.max(1);
        let window_micros = self.inner.settings.hint_window.as_micros() as u64;
        let mut delivered = 0;
        let mut start_after: Option<Vec<u8>> = None;
        loop {
            let page = match self
                .inner
                .store
                .scan_hints(&prefix, start_after.as_deref(), batch)
            {
                Ok(page) => page,
                Err(error) => {
                    warn!(error = %error, "cannot scan hints");
                    return delivered;
                }
            };
            let Some((last_key, _)) = page.last() else {
                return delivered;
            };
            start_after = Some(last_key.clone());
            let mut sends = tokio::task::JoinSet::new();
            for (hint_key, hint_bytes) in page {
                let (key, record) = match (
                    hints::decode_key(&hint_key),
                    hints::decode_record(&hint_bytes),
                ) {
                    (Ok(key), Ok(record)) => (key, record),
                    _ => {
                        warn!(primary = %primary, "dropping an unreadable hint");
                        self.delete_hint_if_unchanged(&hint_key, hint_bytes).await;
                        continue;
                    }
                };
                if hints::expired(record.created_micros, now_micros(), window_micros) {
                    if self.delete_hint_if_unchanged(&hint_key, hint_bytes).await {
                        self.inner
                            .counters
                            .hints_expired
                            .fetch_add(1, Ordering::Relaxed);
                        warn!(primary = %primary, "hint outlived the hint window and was dropped");
                    }
                    continue;
                }
                let node = self.clone();
                let primary = primary.clone();
                sends.spawn(async move {
                    let copy = Copy {
                        partition: key.partition,
                        bucket: key.bucket,
                        key: key.key,
                        hint_for: None,
                    };
                    let deadline = Instant::now() + node.inner.settings.request_timeout;
                    let (acked, _) = node
                        .replica_put(&primary, copy, record.object, deadline)
                        .await;
                    (acked, hint_key, hint_bytes)
                });
            }
            let mut failures = 0;
            while let Some(sent) = sends.join_next().await {
                let Ok((acked, hint_key, hint_bytes)) = sent else {
                    failures += 1;
                    continue;
                };
                if !acked {
                    failures += 1;
                } else if self.delete_hint_if_unchanged(&hint_key, hint_bytes).await {
                    delivered += 1;
                    self.inner
                        .counters
                        .hints_delivered
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            if failures > 0 {
                // The primary is not taking them; try again next pass.
                debug!(primary = %primary, failures, "hint delivery paused");
                return delivered;
            }
        }
    }

    /// Deletes a hint if it still holds `expected`; a hint that changed since it was read
    /// (a newer write for the primary arrived) is kept for the next pass.
    async fn delete_hint_if_unchanged(&self, hint_key: &[u8], expected: Vec<u8>) -> bool {
        let result = self
            .inner
            .store
            .hint_update(hint_key, move |current| {
                Ok::<_, ()>(if current == Some(&expected[..]) {
                    (HintWrite::Delete, true)
                } else {
                    (HintWrite::Keep, false)
                })
            })
            .await;
        result.unwrap_or(false)
    }

    /// Runs hinted handoff every `interval` until the task is aborted.
    pub async fn run_handoff(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let delivered = self.hand_off_hints().await;
            if delivered > 0 {
                info!(node = %self.inner.id, delivered, "hints handed off");
            }
        }
    }
}

/// A put (with content) or a delete (without).
struct Write {
    bucket: Vec<u8>,
    key: Vec<u8>,
    context: Option<Vec<u8>>,
    content: Option<NewContent>,
    options: PutOptions,
}

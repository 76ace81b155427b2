//! One node's request handling: it coordinates client gets, puts and deletes over the
//! [`Transport`] seam and serves its peers' replica reads and writes from the [`Store`].
//!
//! The same `Node` runs over QUIC in `dynkv server` and over the in-memory network in the
//! simulation tests. The decisions are made by the core (`coordinate_put`, `merge_replica`,
//! `GetCoordinator`, `WriteTracker`); this file sends messages, keeps time and stores.

use crate::core::ids::{Actor, NodeId};
use crate::core::object::{
    Content, Context, StoredObject, coordinate_put, decode_record, encode_record, live_siblings,
    merge_replica, object_size_bytes,
};
use crate::core::quorum::{BucketDefaults, QuorumOutcome, ReadQuorum, WriteQuorum, WriteTracker};
use crate::core::request::{GetCoordinator, Target};
use crate::core::ring::{PartitionId, Ring};
use crate::net::Transport;
use crate::protocol::{
    ClientError, ClientRequest, ClientResponse, ErrorKind, GetOptions, NewContent, PeerRequest,
    PeerResponse, PutOptions, validate_bucket_and_key,
};
use crate::storage::{Store, UpdateError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

mod buckets;
mod coverage;
pub use buckets::{BucketProps, PROPS_BUCKET};

/// Where the node learns the current ring. Static (from the config) for now; the gossip
/// membership replaces it behind this seam.
pub trait Membership: Send + Sync + 'static {
    fn ring(&self) -> Arc<Ring>;
}

/// A member list fixed at start-up.
pub struct StaticMembership {
    ring: Arc<Ring>,
}

impl StaticMembership {
    pub fn new(ring: Ring) -> Self {
        StaticMembership {
            ring: Arc::new(ring),
        }
    }
}

impl Membership for StaticMembership {
    fn ring(&self) -> Arc<Ring> {
        self.ring.clone()
    }
}

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
}

pub type PeerTransport = Arc<dyn Transport<PeerRequest, PeerResponse>>;

struct NodeInner {
    id: NodeId,
    actor: Actor,
    store: Store,
    membership: Arc<dyn Membership>,
    peers: PeerTransport,
    settings: NodeSettings,
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

/// Why a write could not be applied to the local store.
enum LocalWriteError {
    Refused(ClientError),
    Storage(String),
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

impl Node {
    pub fn new(
        id: NodeId,
        store: Store,
        membership: Arc<dyn Membership>,
        peers: PeerTransport,
        settings: NodeSettings,
    ) -> Self {
        let actor = store.actor();
        Node {
            inner: Arc::new(NodeInner {
                id,
                actor,
                store,
                membership,
                peers,
                settings,
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
        match request {
            ClientRequest::Ping => ClientResponse::Pong {
                node: self.inner.id.to_string(),
            },
            ClientRequest::Get {
                bucket,
                key,
                options,
            } => {
                let span = info_span!("get", node = %self.inner.id, bucket = %String::from_utf8_lossy(&bucket), key = %String::from_utf8_lossy(&key));
                self.get(bucket, key, options).instrument(span).await
            }
            ClientRequest::Put {
                bucket,
                key,
                context,
                content,
                options,
            } => {
                let span = info_span!("put", node = %self.inner.id, bucket = %String::from_utf8_lossy(&bucket), key = %String::from_utf8_lossy(&key), forwarded);
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
                let span = info_span!("delete", node = %self.inner.id, bucket = %String::from_utf8_lossy(&bucket), key = %String::from_utf8_lossy(&key), forwarded);
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
            } => match self.read_local(partition, &bucket, &key) {
                Ok(object) => PeerResponse::Object(object),
                Err(message) => PeerResponse::Failed { message },
            },
            PeerRequest::ReplicaPut {
                partition,
                bucket,
                key,
                object,
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
                match self.merge_local(partition, &bucket, &key, &object).await {
                    Ok(()) => PeerResponse::Stored {
                        durable: self.inner.settings.durable_writes,
                    },
                    Err(message) => PeerResponse::Failed { message },
                }
            }
            PeerRequest::Coordinate(request) => {
                PeerResponse::Client(Box::pin(self.client_request(request, true)).await)
            }
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

    /// The key's partition and replicas. A cluster smaller than `n_val` keeps one copy per
    /// node, so the levels are later capped at the number of replicas found.
    fn placement(&self, bucket: &[u8], key: &[u8], n_val: u32) -> (PartitionId, Vec<Target>) {
        let ring = self.inner.membership.ring();
        let partition = ring.partition_for_key(bucket, key);
        let n_val = n_val as usize;
        let targets = ring
            .preference_list(partition, n_val)
            .into_iter()
            .map(|(_, node)| Target {
                node,
                primary: true,
            })
            .collect();
        (partition, targets)
    }

    fn read_local(
        &self,
        partition: PartitionId,
        bucket: &[u8],
        key: &[u8],
    ) -> Result<Option<StoredObject>, String> {
        let bytes = self
            .inner
            .store
            .get(partition, bucket, key)
            .map_err(|error| error.to_string())?;
        match bytes {
            None => Ok(None),
            Some(bytes) => decode_record(&bytes).map(Some).map_err(|error| {
                warn!(node = %self.inner.id, partition, error = %error, "stored record is unreadable");
                error.to_string()
            }),
        }
    }

    async fn merge_local(
        &self,
        partition: PartitionId,
        bucket: &[u8],
        key: &[u8],
        incoming: &StoredObject,
    ) -> Result<(), String> {
        let allow_mult = self.bucket_props(bucket).await.keeps_siblings();
        let result = self
            .inner
            .store
            .update(partition, bucket, key, |current| {
                let local = current.map(decode_record).transpose()?;
                if let Some(local) = &local
                    && local.descends(incoming)
                {
                    // Nothing new: skip the write (and its fsync).
                    return Ok((None, ()));
                }
                let merged = merge_replica(local.as_ref(), incoming, allow_mult);
                Ok((Some(encode_record(&merged)), ()))
            })
            .await;
        result.map_err(|error: UpdateError<crate::core::object::ObjectError>| error.to_string())
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
        let (partition, targets) = self.placement(&bucket, &key, props.n_val);
        let quorum = ReadQuorum {
            r: quorum.r.min(targets.len() as u32),
            pr: quorum.pr.min(targets.len() as u32),
            ..quorum
        };
        let mut coordinator = GetCoordinator::new(quorum, &targets);
        let (replies_sender, mut replies) = mpsc::channel(targets.len().max(1));
        for (index, target) in targets.iter().enumerate() {
            let node = self.clone();
            let sender = replies_sender.clone();
            let target = target.clone();
            let (bucket, key) = (bucket.clone(), key.clone());
            tokio::spawn(async move {
                let reply = node
                    .replica_get(&target.node, partition, bucket, key, deadline)
                    .await;
                let _ = sender.send((index, reply)).await;
            });
        }
        drop(replies_sender);

        let outcome = loop {
            match coordinator.outcome() {
                QuorumOutcome::Pending => {}
                decided => break Some(decided),
            }
            match tokio::time::timeout_at(deadline, replies.recv()).await {
                Ok(Some((index, reply))) => {
                    coordinator.on_reply(&targets[index], reply);
                }
                Ok(None) | Err(_) => break None,
            }
        };
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
        // Read repair runs after the answer, once the slower replicas have replied.
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
                for stale in coordinator.read_repairs() {
                    debug!(replica = %stale, "read repair");
                    super::counters::record_read_repair();
                    node.replica_put(
                        &stale,
                        partition,
                        bucket.clone(),
                        key.clone(),
                        merged.clone(),
                        Instant::now() + node.inner.settings.request_timeout,
                    )
                    .await;
                }
            }
            .in_current_span(),
        );
        response
    }

    /// Reads one replica's copy: locally without the network, otherwise over the transport.
    async fn replica_get(
        &self,
        node: &NodeId,
        partition: PartitionId,
        bucket: Vec<u8>,
        key: Vec<u8>,
        deadline: Instant,
    ) -> Result<Option<StoredObject>, ()> {
        if node == &self.inner.id {
            return self.read_local(partition, &bucket, &key).map_err(|_| ());
        }
        let request = PeerRequest::ReplicaGet {
            partition,
            bucket,
            key,
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

    /// Sends a merged object to one replica; the answer is (acked, durable).
    async fn replica_put(
        &self,
        node: &NodeId,
        partition: PartitionId,
        bucket: Vec<u8>,
        key: Vec<u8>,
        object: StoredObject,
        deadline: Instant,
    ) -> (bool, bool) {
        if node == &self.inner.id {
            return match self.merge_local(partition, &bucket, &key, &object).await {
                Ok(()) => (true, self.inner.settings.durable_writes),
                Err(_) => (false, false),
            };
        }
        let request = PeerRequest::ReplicaPut {
            partition,
            bucket,
            key,
            object,
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
        let (partition, targets) = self.placement(&write.bucket, &write.key, props.n_val);
        if !targets.iter().any(|target| target.node == self.inner.id) {
            if forwarded {
                // The sender thought this node was a replica; the rings disagree. Refuse
                // rather than bounce the write around.
                return ClientResponse::Error(ClientError::internal(
                    "forwarded write reached a node that is not a replica of its key",
                ));
            }
            return self.forward(write, &targets, deadline).await;
        }
        let quorum = WriteQuorum {
            w: quorum.w.min(targets.len() as u32),
            dw: quorum.dw.min(targets.len() as u32),
            pw: quorum.pw.min(targets.len() as u32),
            ..quorum
        };

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
        let object = match self
            .coordinate_local(
                partition,
                &write.bucket,
                &write.key,
                context,
                content,
                props.keeps_siblings(),
            )
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

        let mut tracker = WriteTracker::new(quorum, targets.len() as u32, targets.len() as u32);
        let mut outcome = tracker.record(true, true, settings.durable_writes);
        let (acks_sender, mut acks) = mpsc::channel(targets.len().max(1));
        for target in targets.iter().filter(|target| target.node != self.inner.id) {
            let node = self.clone();
            let sender = acks_sender.clone();
            let target = target.clone();
            let (bucket, key, object) = (write.bucket.clone(), write.key.clone(), object.clone());
            tokio::spawn(
                async move {
                    let (acked, durable) = node
                        .replica_put(&target.node, partition, bucket, key, object, deadline)
                        .await;
                    let _ = sender.send((target.primary, acked, durable)).await;
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
        partition: PartitionId,
        bucket: &[u8],
        key: &[u8],
        context: Option<Context>,
        content: Content,
        allow_mult: bool,
    ) -> Result<StoredObject, LocalWriteError> {
        let settings = &self.inner.settings;
        let actor = self.inner.actor;
        let result = self
            .inner
            .store
            .update(partition, bucket, key, |current| {
                let local = match current.map(decode_record).transpose() {
                    Ok(local) => local,
                    Err(error) => return Err(LocalWriteError::Storage(error.to_string())),
                };
                // A delete without a context removes what this replica has seen, as Riak
                // fetches the vclock first for such a delete.
                let context = match (&context, content.deleted, &local) {
                    (None, true, Some(local)) => Some(Context::of(local)),
                    _ => context,
                };
                let updated = coordinate_put(local.as_ref(), context.as_ref(), content, actor, allow_mult);
                let siblings = updated.value_count();
                if siblings > settings.max_siblings as usize {
                    return Err(LocalWriteError::Refused(ClientError {
                        kind: ErrorKind::TooLarge,
                        message: format!(
                            "the key would have {siblings} siblings; at most {} are allowed (limits.max_siblings): read it and write back with its context to resolve them",
                            settings.max_siblings
                        ),
                    }));
                }
                let size = object_size_bytes(&updated) as u64;
                if size > settings.max_object_bytes {
                    return Err(LocalWriteError::Refused(ClientError {
                        kind: ErrorKind::TooLarge,
                        message: format!(
                            "the object would be {size} bytes with its siblings; the limit is {} bytes (limits.max_object_bytes)",
                            settings.max_object_bytes
                        ),
                    }));
                }
                Ok((Some(encode_record(&updated)), updated))
            })
            .await;
        result.map_err(|error| match error {
            UpdateError::Rejected { source } => source,
            UpdateError::Storage { source } => LocalWriteError::Storage(source.to_string()),
        })
    }

    /// Sends a write to a replica of its key to coordinate, trying each replica in turn.
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
            let attempt = timeout / 2;
            match self
                .inner
                .peers
                .call(
                    &target.node,
                    PeerRequest::Coordinate(request.clone()),
                    attempt.max(Duration::from_millis(1)),
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
}

/// A put (with content) or a delete (without).
struct Write {
    bucket: Vec<u8>,
    key: Vec<u8>,
    context: Option<Vec<u8>>,
    content: Option<NewContent>,
    options: PutOptions,
}

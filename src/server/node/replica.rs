//! A node's own copies of keys (replica records and hints) and the calls that read or merge
//! another replica's copy: every read-modify-write goes through the store's writer.

use super::*;

impl Node {
    /// Reads this node's copy of a key (a replica, or a hint it keeps for a primary).
    pub(super) fn read_copy(&self, copy: &Copy) -> Result<Option<StoredObject>, String> {
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

    /// Why this node must not write its own (not hinted) copy of `copy`'s key, if it must
    /// not: it replicates the key's partition neither under the ring it routes by nor under
    /// a pending one. Whoever asks (a coordinator here, read repair, a merge, a handoff), such
    /// a copy would be a stray that this node's cleanup may already have passed: nothing
    /// would delete it, and a later ring change would hand its stale versions back to the
    /// replicas after their tombstones were reaped.
    async fn stray_refusal(&self, copy: &Copy) -> Option<ClientError> {
        let state = self.inner.membership.gossip()?.cluster_state();
        let n_val = match self.bucket_props(&copy.bucket).await {
            Ok(props) => props.n_val as usize,
            Err(error) => return Some(error),
        };
        if crate::core::handoff::keeps(
            state.ring(),
            state.pending(),
            copy.partition,
            n_val,
            &self.inner.id,
        ) {
            return None;
        }
        Some(ClientError {
            kind: ErrorKind::Timeout(None),
            message: format!(
                "{} does not replicate partition {} of this key under ring version {}: nothing was stored here; retry (the request was routed by another ring)",
                self.inner.id,
                copy.partition,
                state.version()
            ),
        })
    }

    /// Atomically transforms this node's copy of a key and stores the result durably.
    /// `transform` gets the current record and returns the new one (`None`: keep) and an
    /// output.
    /// `transform` runs on the store's writer, batched with other updates.
    pub(super) async fn update_copy<T: Send + 'static>(
        &self,
        copy: &Copy,
        transform: impl FnOnce(Option<LocalRecord>) -> Result<(Option<LocalRecord>, T), LocalWriteError>
        + Send
        + 'static,
    ) -> Result<T, LocalWriteError> {
        if copy.hint_for.is_none()
            && let Some(refusal) = self.stray_refusal(copy).await
        {
            return Err(LocalWriteError::Refused(refusal));
        }
        let store = &self.inner.store;
        let clock = self.inner.settings.wall_clock;
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
                            .map_or_else(|| clock.now_micros(), |record| record.created_micros);
                        // A hint copy's key actors die with it; only primaries retire.
                        let local = existing.map(|record| LocalRecord {
                            object: record.object,
                            coordinator: record.coordinator,
                            retiring: false,
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
            UpdateError::Storage { source } => {
                if matches!(source, StorageError::HintsFull { .. }) {
                    self.inner
                        .counters
                        .hints_refused_full
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(node = %self.inner.id, error = %source, "refused a write as a fallback");
                }
                LocalWriteError::Storage(source.to_string())
            }
        })
    }

    /// A replica's write: merge the incoming object into this node's copy.
    ///
    /// A version that the incoming object and this copy hold under one dot, with different
    /// contents, is a dot issued twice: the merge would keep one and drop the other, so the
    /// dropped one is recorded again under a fresh key actor, counted and logged.
    pub(super) async fn merge_copy(
        &self,
        copy: &Copy,
        incoming: StoredObject,
    ) -> Result<(), String> {
        // Properties that cannot be read keep every sibling: a later write through a node
        // that can read them reconciles, and nothing is dropped on a guess.
        let allow_mult = self
            .bucket_props(&copy.bucket)
            .await
            .map_or(true, |props| props.keeps_siblings());
        let key_actors = self.inner.key_actors.clone();
        let max_merged_object_bytes = self.inner.settings.max_merged_object_bytes;
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
                // A rescued version's one-off actor never coordinates again.
                let retiring =
                    local.as_ref().is_some_and(|local| local.retiring) || !collisions.is_empty();
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
                // Copies written through different coordinators can each be within
                // `max_object_bytes` and together exceed what a frame carries; this copy stays
                // as it is (nothing acknowledged here is dropped) and the sender hears why.
                let size = object_size_bytes(&merged) as u64;
                if size > max_merged_object_bytes {
                    return Err(LocalWriteError::Refused(ClientError {
                        kind: ErrorKind::TooLarge,
                        message: format!(
                            "merging would make the object {size} bytes; the limit is {max_merged_object_bytes} bytes (limits.max_merged_object_bytes): read the key with r=1 and write back with its context to resolve its siblings"
                        ),
                    }));
                }
                Ok((
                    Some(LocalRecord {
                        object: merged,
                        coordinator,
                        retiring,
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
            Err(error) => Err(error.without_context("a replica merge")),
        }
    }

    /// Reads one replica's copy: locally without the network, otherwise over the transport.
    pub(super) async fn replica_get(
        &self,
        node: &NodeId,
        copy: Copy,
        deadline: Instant,
    ) -> Result<Option<StoredObject>, ReplicaError> {
        if node == &self.inner.id {
            return self.read_local(&copy);
        }
        let request = PeerRequest::ReplicaGet {
            partition: copy.partition,
            bucket: copy.bucket,
            key: copy.key,
            hint_for: copy.hint_for,
            ring_version: self.routing_version(),
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        let result = match self.inner.peers.call(node, request, timeout).await {
            Ok(PeerResponse::Object(Some(object))) => match object.validate() {
                Ok(()) => Ok(Some(object)),
                Err(error) => {
                    warn!(peer = %node, error = %error, "peer sent an invalid object");
                    Err(ReplicaError::InvalidObject {
                        node: node.clone(),
                        reason: error.to_string(),
                    })
                }
            },
            Ok(PeerResponse::Object(None)) => Ok(None),
            Ok(other) => Err(self.refusal(node, other)),
            Err(error) => Err(unreachable(node, error)),
        };
        if let Err(error) = &result {
            debug!(error = %error, "replica get failed");
        }
        result
    }

    /// This node's own copy, as a replica read.
    pub(super) fn read_local(&self, copy: &Copy) -> Result<Option<StoredObject>, ReplicaError> {
        self.read_copy(copy)
            .map_err(|message| ReplicaError::Refused {
                node: self.inner.id.clone(),
                message,
            })
    }

    /// Sends an object to one replica (or fallback) to merge.
    pub(super) async fn replica_put(
        &self,
        node: &NodeId,
        copy: Copy,
        object: StoredObject,
        deadline: Instant,
    ) -> Result<ReplicaAck, ReplicaError> {
        if node == &self.inner.id {
            return match self.merge_copy(&copy, object).await {
                Ok(()) => Ok(ReplicaAck {
                    durable: self.inner.settings.durable_writes,
                }),
                Err(message) => Err(ReplicaError::Refused {
                    node: node.clone(),
                    message,
                }),
            };
        }
        let request = PeerRequest::ReplicaPut {
            partition: copy.partition,
            bucket: copy.bucket,
            key: copy.key,
            object,
            hint_for: copy.hint_for,
            ring_version: self.routing_version(),
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        let result = match self.inner.peers.call(node, request, timeout).await {
            Ok(PeerResponse::Stored { durable }) => Ok(ReplicaAck { durable }),
            Ok(PeerResponse::StoredOnNewerRing { durable, ring }) => {
                // The coordinator sees the newer routing and writes its other replicas.
                self.adopt(*ring);
                Ok(ReplicaAck { durable })
            }
            Ok(other) => Err(self.refusal(node, other)),
            Err(error) => Err(unreachable(node, error)),
        };
        if let Err(error) = &result {
            debug!(error = %error, "replica put failed");
        }
        result
    }
}

/// A call that got no answer (timeout, closed connection, unknown peer).
fn unreachable(node: &NodeId, error: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Unreachable {
        node: node.clone(),
        reason: error.to_string(),
    }
}

impl Node {
    /// Takes a newer ring a replica answered with (as gossip would, a moment later).
    fn adopt(&self, state: ClusterState) {
        if let Some(gossip) = self.inner.membership.gossip() {
            gossip.offer_cluster_state(state);
        }
    }

    /// A peer's answer that is not the one asked for. A newer ring is adopted at once, so
    /// that the request can be routed again by it.
    fn refusal(&self, node: &NodeId, response: PeerResponse) -> ReplicaError {
        let message = match response {
            PeerResponse::Failed { message } => message,
            PeerResponse::StaleRing(state) => {
                let routing_version = state.routing_version();
                self.adopt(*state);
                return ReplicaError::StaleRing {
                    node: node.clone(),
                    routing_version,
                };
            }
            other => format!("unexpected answer {other:?}"),
        };
        ReplicaError::Refused {
            node: node.clone(),
            message,
        }
    }
}

//! Coordinating a get: which replicas to ask, speculation, the answer, read repair.

use super::*;

/// What [`Node::ask_replicas`] needs to start replica reads of one get.
pub(super) struct ReplicaRead<'a> {
    pub(super) partition: PartitionId,
    pub(super) bucket: &'a [u8],
    pub(super) key: &'a [u8],
    pub(super) targets: &'a [Target],
    pub(super) deadline: Instant,
    pub(super) replies: &'a mpsc::Sender<(usize, Result<Option<StoredObject>, ReplicaError>)>,
}

impl Node {
    pub(super) async fn get(
        &self,
        bucket: Vec<u8>,
        key: Vec<u8>,
        options: GetOptions,
    ) -> ClientResponse {
        if let Err(error) = validate_bucket_and_key(&bucket, &key) {
            return ClientResponse::Error(error);
        }
        let props = match self.bucket_props(&bucket).await {
            Ok(props) => props,
            Err(error) => return ClientResponse::Error(error),
        };
        let quorum = match ReadQuorum::resolve(options.r, options.pr, &props.defaults()) {
            Ok(quorum) => quorum,
            Err(error) => return ClientResponse::Error(ClientError::invalid(error.to_string())),
        };
        let deadline = Instant::now() + self.timeout_of(options.timeout_ms);
        let sloppy = options.sloppy_quorum.unwrap_or(true);
        let routed_by = self.routing_version();
        let (partition, targets) = self.placement(&bucket, &key, props.n_val, sloppy);
        // Its read repair may write versions read before a delete reached every replica: a
        // reaper waits for it (see `inflight`).
        let operation = self.inner.in_flight.begin(partition);
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
        if outcome != Some(QuorumOutcome::Won) && self.routing_version() > routed_by {
            // A replica routes by a newer ring, now adopted here: read again by it.
            debug!(routed_by, "read routed again by a newer ring");
            return Box::pin(self.get(bucket, key, options)).await;
        }
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
                    let size = object_size_bytes(object) as u64;
                    let limit = self.inner.settings.max_merged_object_bytes;
                    let context = Context::of(object).encode(&bucket, &key);
                    let siblings = live_siblings(object);
                    if size > limit {
                        // Each copy fits the limit (replica merges past it are refused), so
                        // one copy, read at r=1, is always answerable and its context
                        // resolves what it holds.
                        error_response(
                            ErrorKind::TooLarge,
                            format!(
                                "the replicas' copies merge to {size} bytes, past the limit of {limit} bytes (limits.max_merged_object_bytes): read with r=1 to get one copy and write back with its context to resolve its siblings"
                            ),
                        )
                    } else if siblings.is_empty() {
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
                let _operation = operation;
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
                    crate::server::counters::record_read_repair();
                    let copy = Copy {
                        partition,
                        bucket: bucket.clone(),
                        key: key.clone(),
                        hint_for: target.hint_for.clone(),
                    };
                    let deadline = Instant::now() + node.inner.settings.request_timeout;
                    let _ = node
                        .replica_put(&target.node, copy, merged.clone(), deadline)
                        .await;
                }
            }
            .in_current_span(),
        );
        response
    }

    /// Whether this read asks every replica for read repair (`read_repair_chance`).
    pub(super) fn draw_read_repair(&self) -> bool {
        let chance = self.inner.settings.read_repair_chance;
        chance > 0.0 && rand::Rng::random::<f64>(&mut *self.inner.rng.lock()) < chance
    }

    /// Starts reads of the targets at `indexes`; each reply arrives on `read.replies`.
    pub(super) fn ask_replicas(&self, read: &ReplicaRead<'_>, indexes: Vec<usize>) {
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
                let reply = self.read_local(&copy);
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
}

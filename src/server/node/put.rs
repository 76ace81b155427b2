//! Coordinating a put or delete: routing to a coordinator, the coordinator's local write
//! under its key actor, replication and the quorum.

use super::*;
use crate::net::TransportError;
use std::collections::{HashMap, VecDeque};

impl Node {
    pub(super) async fn write(&self, mut write: Write, forwarded: bool) -> ClientResponse {
        if let Err(error) = validate_bucket_and_key(&write.bucket, &write.key) {
            return ClientResponse::Error(error);
        }
        if let Some(reason) = self.space_refusal() {
            return error_response(ErrorKind::InsufficientStorage, reason);
        }
        if write.content.is_none() && write.context.is_none() && !forwarded {
            // A delete without a context deletes what a read at its `r` returns (DESIGN §4),
            // not just what the coordinator happens to hold.
            match self.read_before_delete(&write).await {
                Ok(context) => write.context = Some(context),
                Err(response) => return response,
            }
        }
        // A context is checked before anything else: one of another key is refused at once.
        let context = match write
            .context
            .as_deref()
            .map(|bytes| Context::decode(bytes, &write.bucket, &write.key))
            .transpose()
        {
            Ok(context) => context,
            Err(error) => {
                return ClientResponse::Error(ClientError::invalid(format!(
                    "bad context: {error}"
                )));
            }
        };
        let settings = &self.inner.settings;
        let props = match self.bucket_props(&write.bucket).await {
            Ok(props) => props,
            Err(error) => return ClientResponse::Error(error),
        };
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
        let timeout = self.timeout_of(write.options.timeout_ms);
        let deadline = Instant::now() + timeout;
        let sloppy = write.options.sloppy_quorum.unwrap_or(true);
        let routed_by = self.routing_version();
        let (partition, targets, replica_sets) =
            self.write_placement(&write.bucket, &write.key, props.n_val, sloppy);
        // Until its last replica write is answered, this write may carry versions read
        // before a delete reached every replica: a reaper waits for it (see `inflight`).
        let operation = self.inner.in_flight.begin(partition);
        let membership = &self.inner.membership;
        let local = match route_put(&targets, &self.inner.id, forwarded, |node| {
            membership.is_up(node)
        }) {
            PutRoute::Coordinate { local } => local,
            PutRoute::Forward { to } => {
                let to: Vec<Target> = to.into_iter().map(|index| targets[index].clone()).collect();
                return self.forward(write, &to, deadline).await;
            }
            PutRoute::Misrouted => {
                return ClientResponse::Error(ClientError::internal(
                    "forwarded write reached a node that is not a replica of its key",
                ));
            }
        };
        let mut coordinator = match PutCoordinator::with_sets(quorum, targets, local, replica_sets)
        {
            Ok(coordinator) => coordinator,
            Err(shortfall) => {
                // Fallbacks never count as primaries: say so at once, not after the timeout.
                let message = format!(
                    "{shortfall}: only {} primary replicas are up",
                    shortfall.answered
                );
                return error_response(ErrorKind::QuorumUnmet(shortfall), message);
            }
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
                last_modified_micros: settings.wall_clock.now_micros(),
                deleted: false,
            },
            None => Content::tombstone(settings.wall_clock.now_micros()),
        };
        let local_copy = Copy {
            partition,
            bucket: write.bucket.clone(),
            key: write.key.clone(),
            hint_for: coordinator.local().hint_for.clone(),
        };
        let mut attempt = self
            .coordinate_local(&local_copy, context, content, props.keeps_siblings(), false)
            .await;
        if let Err(LocalWriteError::UnknownContext(unknown)) = attempt {
            // The client read versions this copy has not seen yet (or claims ones nobody
            // issued): bring this copy up to date from the other replicas, then try once more.
            let UnknownContext {
                context, content, ..
            } = *unknown;
            let (answered, asked) = self
                .catch_up(&local_copy, coordinator.targets(), deadline)
                .await;
            let primaries_down = coordinator
                .targets()
                .iter()
                .any(|target| target.hint_for.is_some());
            // With every primary's copy merged here, an actor none of them names is retired
            // (or its versions are still on their way): its claim is dropped (`core::retire`).
            let every_primary_answered = answered == asked && !primaries_down;
            attempt = match self
                .coordinate_local(
                    &local_copy,
                    context,
                    content,
                    props.keeps_siblings(),
                    every_primary_answered,
                )
                .await
            {
                Err(LocalWriteError::UnknownContext(unknown)) => {
                    return unknown_context_response(
                        &unknown.beyond,
                        answered,
                        asked,
                        primaries_down,
                    );
                }
                other => other,
            };
        }
        let object = match attempt {
            Ok(object) => object,
            Err(LocalWriteError::Refused(error)) => return ClientResponse::Error(error),
            Err(LocalWriteError::Storage(message)) => {
                warn!(error = %message, "local write failed");
                return ClientResponse::Error(ClientError::internal(format!(
                    "local write failed: {message}"
                )));
            }
            Err(LocalWriteError::UnknownContext(_)) => {
                unreachable!("an unknown context is retried once above")
            }
        };

        let (mut outcome, mut failures) = self
            .replicate(&mut coordinator, &local_copy, &object, deadline, &operation)
            .await;
        if self.routing_version() > routed_by {
            // A replica routes by a newer ring, now adopted here: the write's object (already
            // stored here) goes to the key's targets by that ring, as a forward would, when
            // it names replicas this write did not reach or the quorum was not met. (A
            // pending ring's new replica may be past this key in its handoff already.)
            let (_, targets, replica_sets) =
                self.write_placement(&write.bucket, &write.key, props.n_val, sloppy);
            let reached = |target: &Target| coordinator.targets().contains(target);
            let local = targets
                .iter()
                .position(|target| target.node == self.inner.id)
                .filter(|index| targets[*index].hint_for == local_copy.hint_for);
            if (outcome != QuorumOutcome::Won || !targets.iter().all(reached))
                && let Some(local) = local
                && let Ok(rerouted) =
                    PutCoordinator::with_sets(quorum, targets, local, replica_sets)
            {
                debug!(routed_by, "write routed again by a newer ring");
                coordinator = rerouted;
                (outcome, failures) = self
                    .replicate(&mut coordinator, &local_copy, &object, deadline, &operation)
                    .await;
            }
        }
        let reasons = if failures.is_empty() {
            String::new()
        } else {
            format!("; {}", failures.join("; "))
        };
        match outcome {
            QuorumOutcome::Won => {
                let siblings = if write.options.return_body {
                    live_siblings(&object)
                } else {
                    Vec::new()
                };
                ClientResponse::Stored {
                    siblings,
                    context: Context::of(&object).encode(&write.bucket, &write.key),
                }
            }
            QuorumOutcome::Lost(shortfall) => error_response(
                ErrorKind::QuorumUnmet(shortfall.clone()),
                format!("{shortfall}{reasons}"),
            ),
            QuorumOutcome::Pending => {
                let (shortfall, message) = coordinator.timeout(timeout.as_millis());
                error_response(ErrorKind::Timeout(shortfall), format!("{message}{reasons}"))
            }
        }
    }

    /// Sends `object` (stored here already) to the coordinator's other targets and waits for
    /// the quorum; with the outcome, why each replica that failed did (for the client's
    /// error: counts alone do not say why, and a quorum lost early counts only the acks
    /// that came before the failure that lost it). A timeout's message names the replicas
    /// that did not answer ([`PutCoordinator::timeout`]).
    async fn replicate(
        &self,
        coordinator: &mut PutCoordinator,
        local_copy: &Copy,
        object: &StoredObject,
        deadline: Instant,
        operation: &Arc<InFlightGuard>,
    ) -> (QuorumOutcome, Vec<String>) {
        let mut outcome = coordinator.on_local_write(self.inner.settings.durable_writes);
        let replicas = coordinator.replicas();
        let (acks_sender, mut acks) = mpsc::channel(replicas.len().max(1));
        for index in replicas {
            let target = &coordinator.targets()[index];
            let node = self.clone();
            let sender = acks_sender.clone();
            let copy = Copy {
                hint_for: target.hint_for.clone(),
                ..local_copy.clone()
            };
            let (target_node, object) = (target.node.clone(), object.clone());
            let operation = operation.clone();
            tokio::spawn(
                async move {
                    let ack = node.replica_put(&target_node, copy, object, deadline).await;
                    drop(operation);
                    let _ = sender.send((index, ack)).await;
                }
                .in_current_span(),
            );
        }
        drop(acks_sender);
        let mut failures: Vec<String> = Vec::new();
        while outcome == QuorumOutcome::Pending {
            match tokio::time::timeout_at(deadline, acks.recv()).await {
                Ok(Some((index, ack))) => {
                    if let Err(failure) = &ack {
                        failures.push(failure.to_string());
                    }
                    outcome = coordinator.on_ack(index, ack);
                }
                Ok(None) | Err(_) => break,
            }
        }
        (outcome, failures)
    }

    /// The coordinator's local step: read, supersede what the context covers, add the new
    /// value with a fresh dot of this node's actor, check the limits, store durably. With
    /// `drop_unknown_actors` (this copy holds every primary's), the context's claims on
    /// actors the copy does not name are dropped rather than refused.
    pub(super) async fn coordinate_local(
        &self,
        copy: &Copy,
        context: Option<Context>,
        content: Content,
        allow_mult: bool,
        drop_unknown_actors: bool,
    ) -> Result<StoredObject, LocalWriteError> {
        let max_siblings = self.inner.settings.max_siblings;
        let max_object_bytes = self.inner.settings.max_object_bytes;
        let key_actors = self.inner.key_actors.clone();
        self.update_copy(copy, move |local| {
            // The actor this copy's writes are coordinated under; a copy this node has not
            // coordinated into since it was born (or since this node started) gets a fresh one,
            // so no dot is ever issued twice (see `core::epoch`).
            let remembered = local.as_ref().and_then(|local| local.coordinator);
            let key_actor = key_actors.choose(remembered);
            // A key actor given up here never coordinates again: its entry can be retired
            // once its values are superseded everywhere (see `core::retire`).
            let retiring = local.as_ref().is_some_and(|local| local.retiring)
                || remembered.is_some_and(|remembered| remembered != key_actor);
            let local = local.map(|local| local.object);
            // A context may supersede only versions that were issued: an entry beyond what
            // this copy holds is either a version the client read elsewhere (the caller
            // catches this copy up and retries) or forged, and trusting it would let this
            // write's clock cover dots its actor issues later (DESIGN §4).
            let known = local.as_ref().map(|local| local.join()).unwrap_or_default();
            let context = match context {
                Some(context) if drop_unknown_actors => {
                    Some(context.without_actors_unknown_to(&known))
                }
                other => other,
            };
            let beyond = context
                .as_ref()
                .map_or_else(Vec::new, |context| context.beyond(&known));
            if !beyond.is_empty() {
                return Err(LocalWriteError::UnknownContext(Box::new(UnknownContext {
                    beyond,
                    context,
                    content,
                })));
            }
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
                retiring,
            };
            Ok((Some(record), updated))
        })
        .await
    }

    /// The context of a read of the key a context-less delete names, at the delete's `r`:
    /// the delete supersedes exactly what the read returned (nothing, when nothing is found).
    async fn read_before_delete(&self, write: &Write) -> Result<Vec<u8>, ClientResponse> {
        let options = GetOptions {
            r: write.options.r.unwrap_or_default(),
            timeout_ms: write.options.timeout_ms,
            sloppy_quorum: write.options.sloppy_quorum,
            ..GetOptions::default()
        };
        match self
            .get(write.bucket.clone(), write.key.clone(), options)
            .await
        {
            ClientResponse::Found { context, .. } => Ok(context),
            ClientResponse::NotFound {
                context: Some(context),
            } => Ok(context.into_vec()),
            ClientResponse::NotFound { context: None } => {
                Ok(Context::default().encode(&write.bucket, &write.key))
            }
            ClientResponse::Error(error) => Err(ClientResponse::Error(ClientError {
                kind: error.kind,
                message: format!("the read before the delete failed: {}", error.message),
            })),
            other => Err(ClientResponse::Error(ClientError::internal(format!(
                "the read before the delete answered {other:?}"
            )))),
        }
    }

    /// Brings the coordinator's copy up to date before a write whose context it does not
    /// cover: reads every other target's copy and merges them into its own. Returns how many
    /// of the other targets answered, and how many were asked.
    async fn catch_up(&self, copy: &Copy, targets: &[Target], deadline: Instant) -> (usize, usize) {
        let mut reads = tokio::task::JoinSet::new();
        for target in targets.iter().filter(|target| target.node != self.inner.id) {
            let copy = Copy {
                hint_for: target.hint_for.clone(),
                ..copy.clone()
            };
            let (node, target) = (self.clone(), target.node.clone());
            reads.spawn(
                async move { node.replica_get(&target, copy, deadline).await }.in_current_span(),
            );
        }
        let asked = reads.len();
        let mut answered = 0;
        let mut merged: Option<StoredObject> = None;
        while let Some(reply) = reads.join_next().await {
            let Ok(Ok(object)) = reply else { continue };
            answered += 1;
            if let Some(object) = object {
                merged = Some(match merged {
                    Some(merged) => merged.sync(&object),
                    None => object,
                });
            }
        }
        if let Some(merged) = merged
            && let Err(error) = self.merge_copy(copy, merged).await
        {
            warn!(error = %error, "could not merge the replicas' copies before a write");
        }
        debug!(answered, asked, "caught up before a write");
        (answered, asked)
    }

    /// Sends a write to a target of its key to coordinate. The next target is tried only when
    /// the request certainly did not reach the previous one (no connection, no address): after
    /// a timeout or a lost connection the write may have been coordinated, and a second
    /// coordinator would store it twice (a duplicate sibling), so the client gets the error.
    /// The request id makes a duplicated message harmless at the coordinator.
    pub(super) async fn forward(
        &self,
        write: Write,
        targets: &[Target],
        deadline: Instant,
    ) -> ClientResponse {
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
        let request_id: u64 = rand::Rng::random(&mut *self.inner.rng.lock());
        let mut last_error = String::from("no replica to forward to");
        for target in targets {
            let timeout = deadline.saturating_duration_since(Instant::now());
            if timeout.is_zero() {
                break;
            }
            let call = PeerRequest::CoordinateOnce {
                sender: self.inner.id.clone(),
                request_id,
                request: request.clone(),
            };
            match self.inner.peers.call(&target.node, call, timeout).await {
                Ok(PeerResponse::Client(response)) => return response,
                Ok(other) => {
                    last_error = format!("{} answered {other:?}", target.node);
                    break;
                }
                Err(
                    error @ (TransportError::Unreachable { .. }
                    | TransportError::UnknownPeer { .. }),
                ) => last_error = format!("{}: {error}", target.node),
                Err(error) => {
                    return error_response(
                        ErrorKind::Timeout(None),
                        format!(
                            "the write was forwarded to {} to coordinate and its outcome is unknown (it may have been stored): {error}",
                            target.node
                        ),
                    );
                }
            }
        }
        error_response(
            ErrorKind::Timeout(None),
            format!("no replica could coordinate the write: {last_error}"),
        )
    }
}

/// How long a coordinator remembers a forwarded write's id, and how many it remembers.
const FORWARDED_MEMORY: Duration = Duration::from_secs(120);
const FORWARDED_CAPACITY: usize = 100_000;
/// Most bytes of outcomes it keeps: a `returnbody` outcome carries every sibling (up to
/// `max_object_bytes`), so a count alone would let 100,000 of them hold gigabytes.
const FORWARDED_MAX_BYTES: usize = 64 * 1024 * 1024;

/// The forwarded writes a coordinator saw recently: a second copy of one (a duplicated
/// message, a retry by its sender) gets the first one's outcome, awaited if still running.
#[derive(Default)]
pub(super) struct ForwardedWrites {
    seen: parking_lot::Mutex<ForwardedTable>,
}

type Outcome = Arc<tokio::sync::OnceCell<ClientResponse>>;

#[derive(Default)]
struct ForwardedTable {
    /// Each write's outcome, and the bytes it was counted at once settled.
    by_id: HashMap<(NodeId, u64), (Outcome, usize)>,
    /// Ids in the order they were first seen, to forget the oldest first.
    order: VecDeque<(Instant, (NodeId, u64))>,
    /// Bytes of every settled outcome held.
    bytes: usize,
}

impl ForwardedTable {
    /// Forgets the oldest ids until none is older than [`FORWARDED_MEMORY`], fewer than
    /// [`FORWARDED_CAPACITY`] are held, and their outcomes take at most `max_bytes`.
    fn forget_oldest(&mut self, now: Instant, max_bytes: usize) {
        while let Some((seen_at, _)) = self.order.front() {
            if now.duration_since(*seen_at) < FORWARDED_MEMORY
                && self.order.len() < FORWARDED_CAPACITY
                && self.bytes <= max_bytes
            {
                break;
            }
            if let Some((_, id)) = self.order.pop_front()
                && let Some((_, bytes)) = self.by_id.remove(&id)
            {
                self.bytes -= bytes;
            }
        }
    }
}

impl ForwardedWrites {
    /// The outcome cell of the forwarded write `request_id` (64 random bits drawn by its
    /// `sender`): a new one the first time, the same one for every copy within
    /// [`FORWARDED_MEMORY`].
    pub(super) fn claim(&self, sender: NodeId, request_id: u64) -> Outcome {
        let now = Instant::now();
        let mut table = self.seen.lock();
        table.forget_oldest(now, FORWARDED_MAX_BYTES);
        let id = (sender, request_id);
        if let Some((outcome, _)) = table.by_id.get(&id) {
            return outcome.clone();
        }
        let outcome = Outcome::default();
        table.by_id.insert(id.clone(), (outcome.clone(), 0));
        table.order.push_back((now, id));
        outcome
    }

    /// Counts the outcome of `request_id` once it is known, forgetting the oldest outcomes
    /// past [`FORWARDED_MAX_BYTES`].
    pub(super) fn settled(&self, sender: NodeId, request_id: u64, response: &ClientResponse) {
        self.settled_within(sender, request_id, response, FORWARDED_MAX_BYTES);
    }

    fn settled_within(
        &self,
        sender: NodeId,
        request_id: u64,
        response: &ClientResponse,
        max_bytes: usize,
    ) {
        let size = response_bytes(response);
        let mut table = self.seen.lock();
        let table = &mut *table;
        if let Some((_, counted)) = table.by_id.get_mut(&(sender, request_id))
            && *counted == 0
        {
            *counted = size;
            table.bytes += size;
        }
        table.forget_oldest(Instant::now(), max_bytes);
    }

    /// Bytes of the outcomes held, measured afresh (for tests).
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.seen
            .lock()
            .by_id
            .values()
            .filter_map(|(outcome, _)| outcome.get())
            .map(response_bytes)
            .sum()
    }
}

/// What a remembered outcome takes, roughly: its siblings and context, plus a fixed part.
fn response_bytes(response: &ClientResponse) -> usize {
    const FIXED: usize = 128;
    FIXED
        + match response {
            ClientResponse::Stored { siblings, context } => {
                siblings.iter().map(Content::size_bytes).sum::<usize>() + context.len()
            }
            ClientResponse::Error(error) => error.message.len(),
            _ => 0,
        }
}

/// The answer to a write whose context names versions no replica that answered holds.
fn unknown_context_response(
    beyond: &[(Actor, u64, u64)],
    answered: usize,
    asked: usize,
    primaries_down: bool,
) -> ClientResponse {
    let named: Vec<String> = beyond
        .iter()
        .take(3)
        .map(|(actor, claimed, held)| {
            format!("actor {actor:016x} at {claimed} where the replicas hold {held}")
        })
        .collect();
    let named = named.join(", ");
    if answered == asked && !primaries_down {
        // Every primary answered: nobody issued these versions for this key.
        ClientResponse::Error(ClientError::invalid(format!(
            "bad context: it claims versions that no replica of this key holds ({named}); read the key again for a current context"
        )))
    } else {
        error_response(
            ErrorKind::Timeout(None),
            format!(
                "cannot check the context: it claims versions this coordinator does not hold ({named}), and {} of {asked} other replicas did not answer{}; retry, or read the key again",
                asked - answered,
                if primaries_down {
                    " and some primaries are down"
                } else {
                    ""
                }
            ),
        )
    }
}

/// A put (with content) or a delete (without).
pub(super) struct Write {
    pub(super) bucket: Vec<u8>,
    pub(super) key: Vec<u8>,
    pub(super) context: Option<Vec<u8>>,
    pub(super) content: Option<NewContent>,
    pub(super) options: PutOptions,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored_with_body(bytes: usize) -> ClientResponse {
        ClientResponse::Stored {
            siblings: vec![Content {
                value: vec![7; bytes],
                content_type: String::new(),
                user_metadata: Vec::new(),
                last_modified_micros: 1,
                deleted: false,
            }],
            context: vec![1; 16],
        }
    }

    /// Outcomes with large bodies are forgotten oldest first once they pass the byte bound;
    /// a duplicate of a recent write still gets its outcome.
    #[tokio::test]
    async fn remembered_outcomes_stay_within_the_byte_bound() {
        let forwarded = ForwardedWrites::default();
        let sender = NodeId::new("n2").unwrap();
        let max_bytes = 10 * 1024 * 1024;
        for request_id in 0..100u64 {
            let outcome = forwarded.claim(sender.clone(), request_id);
            let response = outcome
                .get_or_init(|| async { stored_with_body(1024 * 1024) })
                .await;
            forwarded.settled_within(sender.clone(), request_id, response, max_bytes);
        }
        let held = forwarded.held_bytes();
        assert!(
            held <= max_bytes,
            "{held} bytes of outcomes held; the bound is {max_bytes}"
        );
        assert!(held >= max_bytes / 2, "only {held} bytes held");
        let recent = forwarded.claim(sender.clone(), 99);
        assert!(recent.get().is_some(), "the newest outcome was forgotten");
        let oldest = forwarded.claim(sender, 0);
        assert!(oldest.get().is_none(), "the oldest outcome is still held");
    }
}

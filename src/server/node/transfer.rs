//! Ownership handoff of a committed ring change (DESIGN §6): each node sends the handoffs it is
//! the source of, the claimant flips the ring once none remain, and after the flip each node
//! deletes the copies it no longer replicates.
//!
//! A handoff streams a key partition's records (full version sets) in batches; the receiver
//! merges each like a replica write and acknowledges a batch once it is durable, and the next
//! batch waits for that acknowledgement (back-pressure). Only once every batch is acknowledged
//! does the sender tell the claimant. A handoff that fails is tried again from the start at the
//! next check (merges are idempotent), so a crash of either side only costs time.

use super::*;
use crate::core::cluster::{ClusterState, MemberState};
use crate::core::handoff::{self, Handoff};
use crate::protocol::{HandoffRecord, ReapKey, TransferInfo};
use crate::storage::ScannedRecord;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32};

/// Records per handoff batch.
const HANDOFF_BATCH_RECORDS: usize = 128;
/// Bytes of records per handoff batch (a single larger record still goes alone).
const HANDOFF_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How long a handoff reported done may still be listed as pending before it is reported
/// again.
const REPORT_AGAIN_AFTER: Duration = Duration::from_secs(10);

/// How long a cleanup that had to keep strays (a replica of theirs down or not taking them)
/// waits before its next pass, instead of rescanning them every transfer check.
const CLEANUP_RETRY_AFTER: Duration = Duration::from_secs(10);

/// This node's handoffs as sender, and its cleanup after a flip.
pub(super) struct Transfers {
    limit: AtomicU32,
    running: parking_lot::Mutex<HashMap<Handoff, Progress>>,
    /// The ring (version and fingerprint) whose stray copies this node has deleted.
    cleaned: parking_lot::Mutex<(u64, u64)>,
    cleaning: AtomicBool,
    /// When a cleanup that kept strays may run again, and how many it kept (so that an
    /// unchanged count is not logged again at every pass).
    cleanup_retry: parking_lot::Mutex<(Option<Instant>, u64)>,
    /// The ring version of the last plan this node showed as claimant (0: none), which a
    /// `commit` takes.
    pub(super) planned_version: AtomicU64,
    /// Set once this exiting node holds nothing the cluster needs: from then on it
    /// coordinates no client request (see [`Node::finish_leave_if_done`]).
    pub(super) serving_stopped: AtomicBool,
    /// Client requests this node is coordinating (counted before `serving_stopped` is
    /// read, so that a leave waits for every request that read it unset).
    pub(super) client_requests: AtomicU64,
}

impl Transfers {
    pub(super) fn new(limit: u32) -> Self {
        Transfers {
            limit: AtomicU32::new(limit),
            running: parking_lot::Mutex::default(),
            cleaned: parking_lot::Mutex::new((0, 0)),
            cleaning: AtomicBool::new(false),
            cleanup_retry: parking_lot::Mutex::new((None, 0)),
            planned_version: AtomicU64::new(0),
            serving_stopped: AtomicBool::new(false),
            client_requests: AtomicU64::new(0),
        }
    }

    /// Registers a client request for this node to coordinate; `None` once it has stopped
    /// serving (it finished, or is finishing, its leave).
    pub(super) fn begin_client_request(&self) -> Option<ClientRequestGuard<'_>> {
        // SeqCst on both sides: either the leave sees this request counted, or this
        // request sees `serving_stopped` set.
        self.client_requests.fetch_add(1, Ordering::SeqCst);
        let guard = ClientRequestGuard(&self.client_requests);
        (!self.serving_stopped.load(Ordering::SeqCst)).then_some(guard)
    }
}

/// A client request being coordinated; uncounted on drop.
pub(super) struct ClientRequestGuard<'a>(&'a AtomicU64);

impl Drop for ClientRequestGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one cleanup pass after a flip did.
#[derive(Debug, Default)]
struct Cleanup {
    /// Strays deleted.
    deleted: u64,
    /// Strays a replica lacked, handed to it before they were deleted.
    handed: u64,
    /// Strays kept because a replica of theirs could not be checked or handed them, with
    /// the first reason.
    kept: u64,
    kept_because: Option<String>,
}

#[derive(Clone, Debug)]
struct Progress {
    state: &'static str,
    keys_sent: u64,
    bytes_sent: u64,
    keys_estimated: u64,
    started: Instant,
    /// The commit this handoff belongs to (the pending ring's version): a cursor of another
    /// commit's handoff is never resumed.
    change_version: u64,
    /// The last key whose batch the receiver acknowledged: a failed handoff resumes after it.
    resume_after: Option<(Vec<u8>, Vec<u8>)>,
}

impl Node {
    /// Looks for handoffs to send, a flip to make and copies to delete every `interval`, until
    /// the task is aborted.
    pub async fn run_transfers(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.transfer_step().await;
        }
    }

    /// One check: start handoffs up to the limit; as claimant, flip a change whose handoffs
    /// are all done; once every member holds the current ring, delete stray copies.
    pub async fn transfer_step(&self) {
        let Some(gossip) = self.inner.membership.gossip() else {
            return;
        };
        let state = gossip.cluster_state();
        metrics::gauge!("dynkv_ring_version").set(state.version() as f64);
        metrics::gauge!("dynkv_transfers_pending").set(state.handoffs().len() as f64);
        metrics::gauge!("dynkv_partitions_owned")
            .set(state.ring().partitions_owned_by(&self.inner.id).len() as f64);
        if state.pending().is_some() {
            self.start_handoffs(&state);
            let claimant = state
                .claimant(|node| node == &self.inner.id || self.inner.membership.is_up(node))
                .cloned();
            if claimant.as_ref() == Some(&self.inner.id)
                && let Some(flipped) = state.flip()
            {
                info!(node = %self.inner.id, version = flipped.version(), "ring change complete: the pending ring is now current");
                gossip.offer_cluster_state(flipped);
            }
            return;
        }
        self.inner.transfers.running.lock().clear();
        self.stop_serving_if_gone();
        if self.moves_no_data() {
            return;
        }
        self.clean_up_if_converged(&state);
        self.finish_leave_if_done(&state).await;
        self.stop_serving_if_gone();
    }

    /// Whether this node must move no data at all: the cluster holds it removed (or done
    /// with its leave). A removed node's copies and hints are abandoned with it: the others
    /// reap tombstones and retire actors without waiting for it, so a stale copy or hint
    /// it handed back later could bring a deleted or superseded version back. It hands no
    /// stray, delivers no hint and runs no exchange; it only waits to be stopped.
    pub(super) fn moves_no_data(&self) -> bool {
        self.gone_from_cluster().is_some()
    }

    /// A node the cluster holds removed or left coordinates no client request.
    pub(super) fn stop_serving_if_gone(&self) {
        if self.gone_from_cluster().is_some() {
            self.inner
                .transfers
                .serving_stopped
                .store(true, Ordering::SeqCst);
        }
    }

    /// An exiting member (it owns nothing more) finishes its leave once it holds nothing
    /// the cluster still needs: its cleanup after the flip has handed and deleted every copy
    /// it no longer replicates, and every hint it took as a fallback is delivered. It then
    /// stops coordinating client requests, waits until none it began is in flight, and
    /// tells the claimant, which records it as `left`. From then on no request, hint or
    /// copy of it can bring an old version back, so the others stop waiting for it (to
    /// reap, to commit) once it is switched off.
    async fn finish_leave_if_done(&self, state: &Arc<ClusterState>) {
        if state.state_of(&self.inner.id) != Some(MemberState::Exiting)
            || !self.cleaned_up_after(state)
        {
            return;
        }
        let hints = self.inner.store.hint_tally().count;
        if hints > 0 {
            debug!(node = %self.inner.id, hints, "leave not finished: hints to deliver");
            return;
        }
        let transfers = &self.inner.transfers;
        if !transfers.serving_stopped.swap(true, Ordering::SeqCst) {
            info!(node = %self.inner.id, "this node owns nothing and holds no hint or stray copy: it no longer coordinates client requests");
        }
        if transfers.client_requests.load(Ordering::SeqCst) > 0 || !self.inner.in_flight.is_empty()
        {
            return;
        }
        match self.report_leave_finished().await {
            Ok(()) => info!(node = %self.inner.id, "leave finished; told the claimant"),
            Err(error) => {
                warn!(node = %self.inner.id, error = %error, "cannot report the finished leave yet; trying again")
            }
        }
    }

    /// Tells the claimant that this node finished its leave.
    async fn report_leave_finished(&self) -> Result<(), String> {
        self.tell_claimant(PeerRequest::LeaveFinished {
            node: self.inner.id.clone(),
        })
        .await
    }

    /// Sends a report to the claimant this node sees up; `Ok` once it answered `Pong`.
    async fn tell_claimant(&self, request: PeerRequest) -> Result<(), String> {
        let (_, claimant) = self.claimant_now()?;
        let claimant = claimant.ok_or("no claimant is up")?;
        match self
            .inner
            .peers
            .call(&claimant, request, self.inner.settings.request_timeout)
            .await
        {
            Ok(PeerResponse::Pong) => Ok(()),
            Ok(PeerResponse::Failed { message }) => Err(message),
            Ok(other) => Err(format!("the claimant answered {other:?}")),
            Err(error) => Err(error.to_string()),
        }
    }

    /// The cluster state, when this node is the claimant; otherwise why it cannot record.
    fn state_as_claimant(&self) -> Result<Arc<ClusterState>, String> {
        let (state, claimant) = self.claimant_now()?;
        if claimant.as_ref() != Some(&self.inner.id) {
            return Err(format!(
                "{} is not the claimant ({})",
                self.inner.id,
                claimant.map_or("none".to_string(), |node| node.to_string())
            ));
        }
        Ok(state)
    }

    /// The claimant's side of [`PeerRequest::LeaveFinished`].
    pub(super) fn record_leave_finished(&self, node: &NodeId) -> Result<(), String> {
        let state = self.state_as_claimant()?;
        let next = state
            .leave_finished(node)
            .map_err(|error| error.to_string())?;
        if next.version() > state.version()
            && let Some(gossip) = self.inner.membership.gossip()
        {
            info!(node = %self.inner.id, left = %node, version = next.version(), "member finished its leave");
            gossip.offer_cluster_state(next);
        }
        Ok(())
    }

    fn start_handoffs(&self, state: &Arc<ClusterState>) {
        let transfers = &self.inner.transfers;
        let limit = transfers.limit.load(Ordering::Relaxed) as usize;
        let mut running = transfers.running.lock();
        running.retain(|handoff, _| state.handoffs().contains(handoff));
        let change_version = state.pending().map_or(0, Ring::version);
        running.retain(|_, progress| progress.change_version == change_version);
        let mut active = running
            .values()
            .filter(|progress| progress.state == "active")
            .count();
        for handoff in state.handoffs() {
            if handoff.from != self.inner.id {
                continue;
            }
            let progress = running.entry(handoff.clone()).or_insert_with(|| Progress {
                state: "queued",
                keys_sent: 0,
                bytes_sent: 0,
                keys_estimated: self.inner.store.partition_estimate(handoff.partition).0,
                started: Instant::now(),
                change_version,
                resume_after: None,
            });
            // A done handoff was recorded by the claimant, and gossip drops it soon. Should
            // that record be lost (two claimants made the same version and the other one's
            // was kept), the handoff is reported again: it resumes at its end.
            if progress.state == "active"
                || (progress.state == "done" && progress.started.elapsed() < REPORT_AGAIN_AFTER)
            {
                continue;
            }
            if active >= limit
                || !(handoff.to == self.inner.id || self.inner.membership.is_up(&handoff.to))
            {
                continue;
            }
            progress.state = "active";
            progress.started = Instant::now();
            let resume_after = progress.resume_after.clone();
            active += 1;
            let node = self.clone();
            let span = debug_span!("handoff", partition = handoff.partition, to = %handoff.to);
            let (state, handoff) = (state.clone(), handoff.clone());
            tokio::spawn(
                async move {
                    let outcome = node.send_handoff(&state, &handoff, resume_after).await;
                    let succeeded = node.handoff_finished(&handoff, outcome).await;
                    // The slot is free: after a success, start the next handoff now rather
                    // than at the next check. A failure waits for the check, so a handoff that
                    // fails at once cannot spin.
                    if succeeded && let Some(gossip) = node.inner.membership.gossip() {
                        let latest = gossip.cluster_state();
                        if latest.pending().is_some() {
                            node.start_handoffs(&latest);
                        }
                    }
                }
                .instrument(span),
            );
        }
    }

    fn update_progress(&self, handoff: &Handoff, change: impl FnOnce(&mut Progress)) {
        if let Some(progress) = self.inner.transfers.running.lock().get_mut(handoff) {
            change(progress);
        }
    }

    /// Streams `handoff`'s records after `resume_after` to its receiver, each batch
    /// acknowledged durably before the next. Only the keys this node is the source of for
    /// their bucket's `n_val` go. A key written after its batch went reaches the receiver
    /// anyway: while the change is pending, every write goes to the pending ring's replicas.
    async fn send_handoff(
        &self,
        state: &ClusterState,
        handoff: &Handoff,
        resume_after: Option<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), String> {
        let pending = state.pending().ok_or("the change is no longer pending")?;
        let removed = |node: &NodeId| state.state_of(node) == Some(MemberState::Down);
        let mut sources_by_n_val: HashMap<u32, bool> = HashMap::new();
        let mut start_after = resume_after;
        let rate = self.inner.settings.transfer_max_bytes_per_sec;
        let started = Instant::now();
        let mut bytes_total: u64 = 0;
        loop {
            let page = self.next_page(handoff.partition, &mut start_after)?;
            if page.is_empty() {
                return Ok(());
            }
            let page_end = start_after.clone();
            let mut records = Vec::with_capacity(page.len());
            let mut batch_bytes = 0usize;
            for (bucket, key, value) in page {
                let n_val = match self.bucket_props(&bucket).await {
                    Ok(props) => props.n_val,
                    Err(error) => return Err(format!("bucket properties: {}", error.message)),
                };
                let is_source = *sources_by_n_val.entry(n_val).or_insert_with(|| {
                    handoff::sources(
                        state.ring(),
                        pending,
                        handoff.partition,
                        n_val as usize,
                        &handoff.to,
                        removed,
                    )
                    .contains(&self.inner.id)
                });
                if !is_source {
                    continue;
                }
                let object = decode_record(&value).map_err(|error| {
                    format!(
                        "a stored record of partition {} is unreadable: {error}",
                        handoff.partition
                    )
                })?;
                batch_bytes += value.len();
                records.push(HandoffRecord {
                    bucket,
                    key,
                    object,
                });
                if batch_bytes >= HANDOFF_BATCH_BYTES {
                    self.send_handoff_batch(handoff, std::mem::take(&mut records), batch_bytes)
                        .await?;
                    bytes_total += batch_bytes as u64;
                    batch_bytes = 0;
                }
            }
            if !records.is_empty() {
                self.send_handoff_batch(handoff, records, batch_bytes)
                    .await?;
                bytes_total += batch_bytes as u64;
            }
            self.update_progress(handoff, |progress| progress.resume_after = page_end);
            if rate > 0 {
                // Hold the average at the configured rate.
                let due = started + Duration::from_secs_f64(bytes_total as f64 / rate as f64);
                tokio::time::sleep_until(due).await;
            }
        }
    }

    /// The next page of `partition`'s records after `start_after`, which moves to the
    /// page's last key (an empty page: the end).
    pub(super) fn next_page(
        &self,
        partition: PartitionId,
        start_after: &mut Option<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Vec<crate::storage::ScannedRecord>, String> {
        let page = self
            .inner
            .store
            .scan_partition(
                partition,
                start_after
                    .as_ref()
                    .map(|(bucket, key)| (&bucket[..], &key[..])),
                HANDOFF_BATCH_RECORDS,
            )
            .map_err(|error| error.to_string())?;
        if let Some((bucket, key, _)) = page.last() {
            *start_after = Some((bucket.clone(), key.clone()));
        }
        Ok(page)
    }

    async fn send_handoff_batch(
        &self,
        handoff: &Handoff,
        records: Vec<HandoffRecord>,
        bytes: usize,
    ) -> Result<(), String> {
        let count = records.len() as u64;
        self.merge_records_into(&handoff.to, handoff.partition, records)
            .await?;
        self.update_progress(handoff, |progress| {
            progress.keys_sent += count;
            progress.bytes_sent += bytes as u64;
        });
        let counters = &self.inner.counters;
        counters
            .handoff_keys_sent
            .fetch_add(count, Ordering::Relaxed);
        counters
            .handoff_bytes_sent
            .fetch_add(bytes as u64, Ordering::Relaxed);
        metrics::counter!("dynkv_handoff_keys_sent_total").increment(count);
        metrics::counter!("dynkv_handoff_bytes_sent_total").increment(bytes as u64);
        Ok(())
    }

    /// Has `to` merge `records` of `partition` (a [`PeerRequest::Handoff`]); `Ok` once it
    /// acknowledged them durably.
    async fn merge_records_into(
        &self,
        to: &NodeId,
        partition: PartitionId,
        records: Vec<HandoffRecord>,
    ) -> Result<(), String> {
        let _operation = self.inner.in_flight.begin(partition);
        let response = if *to == self.inner.id {
            self.receive_handoff(partition, records).await
        } else {
            let request = PeerRequest::Handoff { partition, records };
            self.inner
                .peers
                .call(to, request, self.inner.settings.request_timeout * 4)
                .await
                .map_err(|error| error.to_string())?
        };
        match response {
            PeerResponse::Stored { durable } if durable || !self.inner.settings.durable_writes => {
                Ok(())
            }
            PeerResponse::Stored { .. } => Err(format!("{to} did not store the batch durably")),
            PeerResponse::Failed { message } => Err(format!("{to} refused: {message}")),
            other => Err(format!("{to} answered {other:?}")),
        }
    }

    /// The receiver's side: merges every record like a replica write (the DVVSet sync), all
    /// at once so they share the store's fsyncs, and answers once all are durable.
    pub(super) async fn receive_handoff(
        &self,
        partition: PartitionId,
        records: Vec<HandoffRecord>,
    ) -> PeerResponse {
        if let Some(reason) = self.space_refusal() {
            return PeerResponse::Failed { message: reason };
        }
        let mut merges = tokio::task::JoinSet::new();
        for record in records {
            if let Err(error) = record.object.validate() {
                return PeerResponse::Failed {
                    message: format!("invalid object: {error}"),
                };
            }
            if let Err(error) = validate_bucket_and_key(&record.bucket, &record.key) {
                return PeerResponse::Failed {
                    message: error.message,
                };
            }
            let node = self.clone();
            merges.spawn(async move {
                let copy = Copy {
                    partition,
                    bucket: record.bucket,
                    key: record.key,
                    hint_for: None,
                };
                node.merge_copy(&copy, record.object).await
            });
        }
        while let Some(merged) = merges.join_next().await {
            match merged {
                Ok(Ok(())) => {}
                Ok(Err(message)) => return PeerResponse::Failed { message },
                Err(error) => {
                    return PeerResponse::Failed {
                        message: error.to_string(),
                    };
                }
            }
        }
        PeerResponse::Stored {
            durable: self.inner.settings.durable_writes,
        }
    }

    /// Records how a handoff ended; returns whether it succeeded.
    async fn handoff_finished(&self, handoff: &Handoff, outcome: Result<(), String>) -> bool {
        let outcome = match outcome {
            Ok(()) => self.report_handoff_done(handoff).await,
            Err(error) => Err(error),
        };
        match outcome {
            Ok(()) => {
                info!(node = %self.inner.id, partition = handoff.partition, to = %handoff.to, "handoff complete");
                self.update_progress(handoff, |progress| {
                    progress.state = "done";
                    progress.started = Instant::now();
                });
                true
            }
            Err(error) => {
                warn!(node = %self.inner.id, partition = handoff.partition, to = %handoff.to, error = %error, "handoff failed; it will resume");
                self.update_progress(handoff, |progress| progress.state = "retrying");
                false
            }
        }
    }

    /// The cluster state this node holds and the claimant it sees up.
    fn claimant_now(&self) -> Result<(Arc<ClusterState>, Option<NodeId>), String> {
        let gossip = self
            .inner
            .membership
            .gossip()
            .ok_or("membership is static")?;
        let state = gossip.cluster_state();
        let claimant = state
            .claimant(|node| node == &self.inner.id || self.inner.membership.is_up(node))
            .cloned();
        Ok((state, claimant))
    }

    /// Tells the claimant that `handoff` is done.
    async fn report_handoff_done(&self, handoff: &Handoff) -> Result<(), String> {
        let (_, claimant) = self.claimant_now()?;
        if claimant.as_ref() == Some(&self.inner.id) {
            return self.record_handoff_done(handoff);
        }
        self.tell_claimant(PeerRequest::HandoffDone {
            handoff: handoff.clone(),
        })
        .await
    }

    /// The claimant's side of [`PeerRequest::HandoffDone`].
    pub(super) fn record_handoff_done(&self, handoff: &Handoff) -> Result<(), String> {
        let state = self.state_as_claimant()?;
        match state.handoff_done(handoff) {
            Some(next) => {
                if let Some(gossip) = self.inner.membership.gossip() {
                    gossip.offer_cluster_state(next);
                }
                Ok(())
            }
            // Recorded before (a retried report) or of a change that is over.
            None => Ok(()),
        }
    }

    /// This node's handoffs as sender, for `admin transfers`.
    pub(super) fn transfer_progress(&self) -> Vec<TransferInfo> {
        self.inner
            .transfers
            .running
            .lock()
            .iter()
            .filter(|(_, progress)| progress.state != "done")
            .map(|(handoff, progress)| TransferInfo {
                partition: handoff.partition,
                from: handoff.from.to_string(),
                to: handoff.to.to_string(),
                state: progress.state.to_string(),
                keys_sent: progress.keys_sent,
                bytes_sent: progress.bytes_sent,
                keys_estimated: progress.keys_estimated,
                elapsed_ms: progress.started.elapsed().as_millis() as u64,
            })
            .collect()
    }

    /// Every pending handoff with its sender's progress; a sender that does not answer shows
    /// its handoffs as queued.
    pub(super) async fn transfers_cluster_wide(&self) -> ClientResponse {
        let Some(gossip) = self.inner.membership.gossip() else {
            return ClientResponse::Transfers {
                ring_version: self.inner.membership.ring().version(),
                transfers: Vec::new(),
                pending: false,
            };
        };
        let state = gossip.cluster_state();
        let mut senders: Vec<NodeId> = state.handoffs().iter().map(|h| h.from.clone()).collect();
        senders.sort();
        senders.dedup();
        let mut asks = tokio::task::JoinSet::new();
        for sender in senders {
            let node = self.clone();
            asks.spawn(async move {
                if sender == node.inner.id {
                    return node.transfer_progress();
                }
                let timeout = node.inner.settings.request_timeout;
                match node
                    .inner
                    .peers
                    .call(&sender, PeerRequest::TransferProgress, timeout)
                    .await
                {
                    Ok(PeerResponse::TransferProgress(progress)) => progress,
                    _ => Vec::new(),
                }
            });
        }
        let reported: Vec<TransferInfo> = asks.join_all().await.into_iter().flatten().collect();
        let transfers = state
            .handoffs()
            .iter()
            .map(|handoff| {
                reported
                    .iter()
                    .find(|info| {
                        info.partition == handoff.partition
                            && info.from == handoff.from.as_str()
                            && info.to == handoff.to.as_str()
                    })
                    .cloned()
                    .unwrap_or_else(|| TransferInfo {
                        partition: handoff.partition,
                        from: handoff.from.to_string(),
                        to: handoff.to.to_string(),
                        state: "queued".into(),
                        keys_sent: 0,
                        bytes_sent: 0,
                        keys_estimated: 0,
                        elapsed_ms: 0,
                    })
            })
            .collect();
        // A member gossiping a newer ring means this node has not heard of a commit or a
        // flip yet: nothing is settled until it has.
        let behind = self
            .inner
            .membership
            .view()
            .iter()
            .any(|member| member.ring_version > state.version());
        ClientResponse::Transfers {
            ring_version: state.version(),
            transfers,
            pending: state.pending().is_some() || behind,
        }
    }

    /// Returns once this node learns that it was removed from the cluster (`admin cluster
    /// remove`) or finished its leave: the ring version that says so, and which. Such a node
    /// must not serve: it is no longer routed to, and the others no longer wait for it.
    pub async fn removed_from_cluster(&self) -> (u64, MemberState) {
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        loop {
            ticker.tick().await;
            if let Some(gone) = self.gone_from_cluster() {
                return gone;
            }
        }
    }

    /// The ring version and this node's state when the cluster holds it removed (`down`)
    /// or finished with its leave (`left`): such a node must serve nothing more.
    pub fn gone_from_cluster(&self) -> Option<(u64, MemberState)> {
        let state = self.inner.membership.gossip()?.cluster_state();
        state
            .state_of(&self.inner.id)
            .filter(|member| member.is_gone())
            .map(|member| (state.version(), member))
    }

    /// Whether this node may still hold copies it no longer replicates: its cleanup after
    /// the current ring's flip has not finished (since it started, if it restarted: a crash
    /// can undo deletes not yet synced). A reaper waits for it, since a stale copy here
    /// would become a replica's again if a later change gave the partition back.
    pub(super) fn may_hold_strays(&self) -> bool {
        self.inner
            .membership
            .gossip()
            .is_some_and(|gossip| !self.cleaned_up_after(&gossip.cluster_state()))
    }

    /// Whether this node's cleanup after `state`'s flip is done: for it, or for a newer one.
    /// A state of the same version made apart (a tie another claimant won) is not `state`.
    fn cleaned_up_after(&self, state: &ClusterState) -> bool {
        let (version, fingerprint) = *self.inner.transfers.cleaned.lock();
        version > state.version()
            || (version == state.version() && fingerprint == state.fingerprint())
    }

    pub(super) fn set_transfer_limit(&self, limit: u32) {
        info!(node = %self.inner.id, limit, "transfer limit changed");
        self.inner.transfers.limit.store(limit, Ordering::Relaxed);
    }

    /// After a flip, once every member that is up holds the current ring (so none routes a
    /// read by the old one), deletes the copies this node no longer replicates, each only if
    /// it did not change since it was read.
    fn clean_up_if_converged(&self, state: &Arc<ClusterState>) {
        let transfers = &self.inner.transfers;
        if self.cleaned_up_after(state) || !state.is_committed() {
            return;
        }
        let behind = self.inner.membership.view().into_iter().any(|member| {
            member.up
                && member.ring_version < state.version()
                && member.state != "down"
                && member.state != "left"
        });
        let waiting = transfers
            .cleanup_retry
            .lock()
            .0
            .is_some_and(|at| Instant::now() < at);
        if behind || waiting || transfers.cleaning.swap(true, Ordering::AcqRel) {
            return;
        }
        let node = self.clone();
        let state = state.clone();
        tokio::spawn(async move {
            match node.delete_strays(&state).await {
                Ok(cleanup) => {
                    let Cleanup {
                        deleted,
                        handed,
                        kept,
                        ..
                    } = cleanup;
                    if deleted > 0 || handed > 0 {
                        info!(node = %node.inner.id, deleted, handed, version = state.version(), "deleted copies this node no longer replicates (handed: those a replica lacked, sent to it first)");
                    }
                    let mut retry = node.inner.transfers.cleanup_retry.lock();
                    if let Some(reason) = cleanup.kept_because {
                        if kept != retry.1 {
                            info!(node = %node.inner.id, kept, reason = %reason, "kept copies this node no longer replicates until their replicas can take them");
                        }
                        *retry = (Some(Instant::now() + CLEANUP_RETRY_AFTER), kept);
                    } else {
                        *retry = (None, 0);
                        *node.inner.transfers.cleaned.lock() =
                            (state.version(), state.fingerprint());
                    }
                }
                Err(error) => {
                    warn!(node = %node.inner.id, error = %error, "cleanup after a ring change failed; it will run again")
                }
            }
            node.inner
                .transfers
                .cleaning
                .store(false, Ordering::Release);
        });
    }

    /// Deletes the copies this node no longer replicates under `state`'s ring, a page at a
    /// time: each stray goes only once every current replica of its key holds it (or a copy
    /// merged from it) durably, and only if it did not change since it was read. Strays of
    /// a replica that is down or does not take them are kept (and counted); the others go.
    async fn delete_strays(&self, state: &Arc<ClusterState>) -> Result<Cleanup, String> {
        let ring = state.ring();
        let mut cleanup = Cleanup::default();
        let mut n_vals: HashMap<Vec<u8>, u32> = HashMap::new();
        for partition in self.inner.store.partitions() {
            if partition >= ring.partition_count() {
                continue;
            }
            // The first owner keeps the partition's keys for every n_val.
            if ring.owner(partition) == &self.inner.id {
                continue;
            }
            let mut start_after: Option<(Vec<u8>, Vec<u8>)> = None;
            loop {
                let page = self.next_page(partition, &mut start_after)?;
                if page.is_empty() {
                    break;
                }
                // The page's strays, by the replicas their keys have now.
                let mut strays: BTreeMap<Vec<NodeId>, Vec<ScannedRecord>> = BTreeMap::new();
                for (bucket, key, value) in page {
                    let n_val = match n_vals.get(&bucket) {
                        Some(n_val) => *n_val,
                        None => {
                            let n_val = self
                                .bucket_props(&bucket)
                                .await
                                .map_err(|error| error.message)?
                                .n_val;
                            n_vals.insert(bucket.clone(), n_val);
                            n_val
                        }
                    };
                    let replicas = handoff::replicas(ring, partition, n_val as usize);
                    if replicas.contains(&self.inner.id) {
                        continue;
                    }
                    strays
                        .entry(replicas)
                        .or_default()
                        .push((bucket, key, value));
                }
                for (replicas, records) in strays {
                    match self
                        .hand_strays_to_replicas(partition, &replicas, &records)
                        .await
                    {
                        Ok(handed) => cleanup.handed += handed,
                        Err(reason) => {
                            cleanup.kept += records.len() as u64;
                            cleanup.kept_because.get_or_insert(reason);
                            continue;
                        }
                    }
                    for (bucket, key, value) in records {
                        // Whatever changed meanwhile decides: any other ring stops this
                        // pass, a newer one or one of this version made apart that the tie
                        // rule prefers. It is not done for this version: a state of the
                        // same version that replaced this one is cleaned up by a pass of
                        // its own.
                        let now = self
                            .inner
                            .membership
                            .gossip()
                            .map(|gossip| gossip.cluster_state());
                        if now.is_some_and(|now| !Arc::ptr_eq(&now, state)) {
                            return Err(format!(
                                "the ring changed during the cleanup, after {} deletes",
                                cleanup.deleted
                            ));
                        }
                        if self
                            .inner
                            .store
                            .delete_if_unchanged(partition, &bucket, &key, value)
                            .await
                            .map_err(|error| error.to_string())?
                        {
                            cleanup.deleted += 1;
                            self.inner
                                .counters
                                .stray_keys_deleted
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        Ok(cleanup)
    }

    /// Makes sure each of `replicas` holds every one of `strays` (records of `partition`
    /// this node is about to delete) durably, as DESIGN §6 asks of an old owner: the
    /// handoffs before the flip sent what this node held then, but a write acknowledged by
    /// quorums of both replica sets may have missed the new replica. Each replica is asked
    /// which copies it holds as they are ([`PeerRequest::CopyCheck`]) and handed the others
    /// like a handoff batch (a merge, so a newer copy there stays newer). A replica that
    /// does not answer the check (a release without it) is handed them all. An error (a
    /// replica seen down, or one that did not take them) means the caller keeps these
    /// strays for a later pass. Returns how many records were handed.
    async fn hand_strays_to_replicas(
        &self,
        partition: PartitionId,
        replicas: &[NodeId],
        strays: &[ScannedRecord],
    ) -> Result<u64, String> {
        let others: Vec<&NodeId> = replicas
            .iter()
            .filter(|node| **node != self.inner.id)
            .collect();
        // A replica seen down is not asked: its strays wait for it (no call, no timeout).
        if let Some(down) = others
            .iter()
            .find(|node| !self.inner.membership.is_up(node))
        {
            return Err(format!("{down} is down"));
        }
        let keys: Vec<ReapKey> = strays
            .iter()
            .map(|(bucket, key, value)| ReapKey {
                bucket: bucket.clone(),
                key: key.clone(),
                digest: crate::core::tictac::record_digest(value),
            })
            .collect();
        let mut handed = 0;
        for replica in others {
            let request = PeerRequest::CopyCheck {
                partition,
                keys: keys.clone(),
            };
            let timeout = self.inner.settings.request_timeout;
            let held = match self.inner.peers.call(replica, request, timeout).await {
                Ok(PeerResponse::CopyCheck(held)) if held.len() == keys.len() => held,
                answer => {
                    debug!(node = %self.inner.id, partition, %replica, ?answer, "copy check not answered; handing every stray");
                    vec![false; keys.len()]
                }
            };
            let mut missing = Vec::new();
            let mut missing_bytes = 0;
            let lacked = strays.iter().zip(held).filter(|(_, held)| !held);
            let last = lacked.clone().count();
            for (index, ((bucket, key, value), _)) in lacked.enumerate() {
                let object = decode_record(value).map_err(|error| {
                    format!("a stored record of partition {partition} is unreadable: {error}")
                })?;
                missing.push(HandoffRecord {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    object,
                });
                missing_bytes += value.len();
                if missing_bytes >= HANDOFF_BATCH_BYTES || index + 1 == last {
                    let count = missing.len() as u64;
                    missing_bytes = 0;
                    self.merge_records_into(replica, partition, std::mem::take(&mut missing))
                        .await
                        .map_err(|error| format!("handing strays to {replica}: {error}"))?;
                    handed += count;
                    self.inner
                        .counters
                        .stray_keys_handed
                        .fetch_add(count, Ordering::Relaxed);
                    metrics::counter!("dynkv_stray_keys_handed_total").increment(count);
                }
            }
        }
        Ok(handed)
    }

    /// A cleanup's [`PeerRequest::CopyCheck`]: for each key, whether this node holds a copy
    /// with that record digest, durably.
    pub(super) async fn serve_copy_check(
        &self,
        partition: PartitionId,
        keys: Vec<ReapKey>,
    ) -> PeerResponse {
        if let Some(refusal) = super::reap::too_many_reap_keys(&keys) {
            return refusal;
        }
        match self.holds_copies(partition, &keys, |_| true).await {
            Ok(held) => PeerResponse::CopyCheck(held),
            Err(message) => PeerResponse::Failed { message },
        }
    }
}

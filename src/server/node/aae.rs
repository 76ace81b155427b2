//! Active anti-entropy (`core::tictac`, `storage::AaeTrees`): on a jittered schedule this
//! node takes the next partition it is the first owner of and exchanges its tree with each
//! other primary of it: branches, then the segments under differing branches, the same
//! segments again after a pause (a quarter of the exchange interval: what differed only by
//! writes in flight is dropped), then the key digests in the segments that differed both
//! times. Each differing key is read from both sides, merged (DVVSet
//! sync, as read repair does) and written where it was behind. At most
//! `aae.max_repairs_per_exchange` keys are repaired per exchange; the rest wait for the next.
//!
//! No exchange runs while a ring change is pending (its handoffs move the same data, and the
//! replica sets are changing). Trees are built at start and rebuilt every
//! `aae.rebuild_interval_secs`, one partition per exchange interval.

use super::*;
use crate::core::tictac::{Exchange, ExchangeStep, KeyDifference};
use crate::protocol::{
    AaeExchangeInfo, AaeInfo, AaePartitionInfo, MAX_AAE_DIGESTS, MAX_AAE_SEGMENTS,
};
use rand::Rng;
use std::collections::BTreeMap;

/// Anti-entropy settings (`[aae]` in the config).
#[derive(Clone, Debug)]
pub struct AaeSettings {
    pub enabled: bool,
    pub exchange_interval: Duration,
    pub max_repairs_per_exchange: usize,
    pub rebuild_interval: Duration,
}

impl Default for AaeSettings {
    fn default() -> Self {
        AaeSettings {
            enabled: true,
            exchange_interval: Duration::from_secs(1),
            max_repairs_per_exchange: 1000,
            rebuild_interval: Duration::from_secs(24 * 3600),
        }
    }
}

/// The outcome of one exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ExchangeOutcome {
    InSync,
    Repaired(u64),
    Failed(String),
}

impl std::fmt::Display for ExchangeOutcome {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeOutcome::InSync => write!(formatter, "in sync"),
            ExchangeOutcome::Repaired(1) => write!(formatter, "1 key repaired"),
            ExchangeOutcome::Repaired(keys) => write!(formatter, "{keys} keys repaired"),
            ExchangeOutcome::Failed(reason) => write!(formatter, "{reason}"),
        }
    }
}

/// What this node remembers of its exchanges.
#[derive(Default)]
pub(super) struct AaeState {
    /// (partition, peer) → when the last exchange ended and how.
    last: parking_lot::Mutex<BTreeMap<(PartitionId, NodeId), (Instant, ExchangeOutcome)>>,
    /// The partition after which the next exchange looks.
    cursor: parking_lot::Mutex<Option<PartitionId>>,
    /// Held while a partition is exchanged and reaped.
    running: tokio::sync::Mutex<()>,
    /// When the next scheduled exchange runs.
    next_tick: parking_lot::Mutex<Option<Instant>>,
    pub(super) exchanges: AtomicU64,
    pub(super) segments_differing: AtomicU64,
    pub(super) keys_repaired: AtomicU64,
    pub(super) bytes_repaired: AtomicU64,
    /// Bytes of tree hashes and key digests peers sent this node's exchanges.
    pub(super) bytes_exchanged: AtomicU64,
}

impl Node {
    /// Runs exchanges and tree rebuilds until the task is aborted.
    pub async fn run_aae(self) {
        let settings = self.inner.settings.aae.clone();
        if !settings.enabled || self.inner.store.aae_trees().is_none() {
            return;
        }
        // Every tree this node has data for is built before the first exchange.
        for partition in self.inner.store.partitions() {
            if let Err(error) = self.inner.store.build_tree(partition).await {
                warn!(partition, error = %error, "cannot build an anti-entropy tree");
            }
        }
        let mut rebuild_queue: Vec<PartitionId> = Vec::new();
        let mut rebuild_round_at = Instant::now() + settings.rebuild_interval;
        loop {
            let jitter = {
                let quarter = settings.exchange_interval.as_millis() as u64 / 4;
                Duration::from_millis(self.inner.rng.lock().random_range(0..=quarter.max(1)))
            };
            let wake = Instant::now() + settings.exchange_interval - settings.exchange_interval / 8
                + jitter;
            *self.inner.aae.next_tick.lock() = Some(wake);
            tokio::time::sleep_until(wake).await;
            if Instant::now() >= rebuild_round_at {
                rebuild_queue = self.inner.store.partitions();
                rebuild_round_at = Instant::now() + settings.rebuild_interval;
            }
            if let Some(partition) = rebuild_queue.pop()
                && let Err(error) = self.inner.store.build_tree(partition).await
            {
                warn!(partition, error = %error, "cannot rebuild an anti-entropy tree");
            }
            if self.moves_no_data() {
                continue;
            }
            if let Some(partition) = self.next_exchange_partition() {
                self.exchange_and_reap(partition).await;
            }
            self.retire_next_partition().await;
        }
    }

    /// Partitions whose key partition this node is the first owner of, by the current ring.
    fn first_owned_partitions(&self) -> Vec<PartitionId> {
        let ring = self.inner.membership.ring();
        ring.partitions_owned_by(&self.inner.id)
    }

    /// The first-owned partition after the last one exchanged, round robin; none while a
    /// ring change is pending.
    fn next_exchange_partition(&self) -> Option<PartitionId> {
        if self.inner.membership.pending_ring().is_some() {
            return None;
        }
        let owned = self.first_owned_partitions();
        let mut cursor = self.inner.aae.cursor.lock();
        let next = owned
            .iter()
            .copied()
            .find(|partition| cursor.is_none_or(|last| *partition > last))
            .or_else(|| owned.first().copied())?;
        *cursor = Some(next);
        Some(next)
    }

    /// Exchanges `partition` with each other primary, then reaps its tombstones that may go,
    /// one partition at a time on this node (scheduled and asked-for runs wait for each
    /// other), so that a reap never overlaps this node's exchange of the same keys.
    pub(super) async fn exchange_and_reap(&self, partition: PartitionId) {
        let _one_at_a_time = self.inner.aae.running.lock().await;
        self.exchange_partition(partition).await;
        self.reap_partition(partition).await;
    }

    /// Exchanges `partition` with each other primary of it; returns the outcomes.
    pub(super) async fn exchange_partition(
        &self,
        partition: PartitionId,
    ) -> Vec<(NodeId, ExchangeOutcome)> {
        let ring = self.inner.membership.ring();
        if partition >= ring.partition_count() {
            return Vec::new();
        }
        let n_val = self.inner.settings.bucket_defaults.n_val as usize;
        let peers: Vec<NodeId> = ring
            .preference_list(partition, n_val)
            .into_iter()
            .map(|(_, node)| node)
            .filter(|node| node != &self.inner.id)
            .collect();
        let mut outcomes = Vec::new();
        for peer in peers {
            let outcome = if !self.inner.membership.is_up(&peer) {
                ExchangeOutcome::Failed(format!("{peer} is down"))
            } else if self.inner.membership.pending_ring().is_some() {
                ExchangeOutcome::Failed("a ring change is pending".into())
            } else {
                self.exchange_with(partition, &peer)
                    .instrument(debug_span!("aae_exchange", partition, peer = %peer))
                    .await
            };
            match &outcome {
                ExchangeOutcome::Repaired(keys) => {
                    info!(node = %self.inner.id, partition, peer = %peer, keys, "anti-entropy repaired keys")
                }
                ExchangeOutcome::Failed(reason) => {
                    debug!(partition, peer = %peer, reason = %reason, "anti-entropy exchange stopped")
                }
                ExchangeOutcome::InSync => {}
            }
            self.inner.aae.exchanges.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("dynkv_aae_exchanges_total").increment(1);
            self.inner
                .aae
                .last
                .lock()
                .insert((partition, peer.clone()), (Instant::now(), outcome.clone()));
            outcomes.push((peer, outcome));
        }
        outcomes
    }

    /// One exchange of `partition`'s tree with `peer`, to its repairs.
    async fn exchange_with(&self, partition: PartitionId, peer: &NodeId) -> ExchangeOutcome {
        // Its repairs write copies read from both sides: a reaper waits for it.
        let _operation = self.inner.in_flight.begin(partition);
        let Some(trees) = self.inner.store.aae_trees() else {
            return ExchangeOutcome::Failed("anti-entropy trees are off".into());
        };
        if trees.branches(partition).is_none()
            && let Err(error) = self.inner.store.build_tree(partition).await
        {
            return ExchangeOutcome::Failed(format!("cannot build the tree: {error}"));
        }
        let timeout = self.inner.settings.request_timeout;
        let ask = |request: PeerRequest| self.inner.peers.call(peer, request, timeout);
        let mut exchange = Exchange::new(
            self.inner.settings.aae.max_repairs_per_exchange,
            MAX_AAE_SEGMENTS,
        );
        let theirs = match ask(PeerRequest::AaeBranches { partition }).await {
            Ok(PeerResponse::AaeBranches(Some(branches))) => {
                self.count_exchanged(4 * branches.len());
                branches
            }
            Ok(PeerResponse::AaeBranches(None)) => {
                return ExchangeOutcome::Failed(format!("{peer} is building its tree"));
            }
            other => return failed_step(peer, "branches", other),
        };
        let Some(ours) = trees.branches(partition) else {
            return ExchangeOutcome::Failed("this node's tree is not built".into());
        };
        let mut step = match exchange.on_branches(&ours, &theirs) {
            Ok(step) => step,
            Err(error) => return ExchangeOutcome::Failed(error.to_string()),
        };
        if let ExchangeStep::AskSegments(branches) = &step {
            let (ours, theirs) = match self.segments_of_both(partition, peer, branches).await {
                Ok(both) => both,
                Err(outcome) => return outcome,
            };
            step = match exchange.on_segments(branches, &ours, &theirs) {
                Ok(step) => step,
                Err(error) => return ExchangeOutcome::Failed(error.to_string()),
            };
        }
        if let ExchangeStep::ConfirmSegments(branches) = &step {
            // Writes in flight settle within milliseconds; a quarter of the exchange interval
            // (250 ms by default) lets them land on both sides before the second look.
            tokio::time::sleep(self.inner.settings.aae.exchange_interval / 4).await;
            let (ours, theirs) = match self.segments_of_both(partition, peer, branches).await {
                Ok(both) => both,
                Err(outcome) => return outcome,
            };
            step = match exchange.on_segments_again(branches, &ours, &theirs) {
                Ok(step) => step,
                Err(error) => return ExchangeOutcome::Failed(error.to_string()),
            };
        }
        if let ExchangeStep::AskKeys(segments) = &step {
            self.inner
                .aae
                .segments_differing
                .fetch_add(segments.len() as u64, Ordering::Relaxed);
            metrics::counter!("dynkv_aae_segments_differing_total")
                .increment(segments.len() as u64);
            let theirs = match ask(PeerRequest::AaeKeys {
                partition,
                segments: segments.clone(),
            })
            .await
            {
                Ok(PeerResponse::AaeKeys(digests)) => {
                    self.count_exchanged(
                        digests
                            .iter()
                            .map(|digest| digest.bucket.len() + digest.key.len() + 8)
                            .sum(),
                    );
                    digests
                }
                other => return failed_step(peer, "key digests", other),
            };
            let ours = match self.key_digests(partition, segments.clone()).await {
                Ok(digests) => digests,
                Err(message) => return ExchangeOutcome::Failed(message),
            };
            step = exchange.on_keys(ours, theirs);
        }
        match step {
            ExchangeStep::InSync => ExchangeOutcome::InSync,
            ExchangeStep::Repair(differences) => {
                let mut repaired = 0;
                for difference in differences {
                    match self.repair_key(partition, peer, &difference).await {
                        Ok(true) => repaired += 1,
                        Ok(false) => {}
                        Err(message) => {
                            return ExchangeOutcome::Failed(format!(
                                "{message} (after {repaired} keys repaired)"
                            ));
                        }
                    }
                }
                self.inner
                    .aae
                    .keys_repaired
                    .fetch_add(repaired, Ordering::Relaxed);
                metrics::counter!("dynkv_aae_keys_repaired_total").increment(repaired);
                if repaired == 0 {
                    ExchangeOutcome::InSync
                } else {
                    ExchangeOutcome::Repaired(repaired)
                }
            }
            ExchangeStep::AskSegments(_)
            | ExchangeStep::ConfirmSegments(_)
            | ExchangeStep::AskKeys(_) => {
                ExchangeOutcome::Failed("the exchange stopped early".into())
            }
        }
    }

    /// Our segment hashes under `branches` of `partition` and `peer`'s, or how the exchange
    /// ends when either side cannot give them.
    async fn segments_of_both(
        &self,
        partition: PartitionId,
        peer: &NodeId,
        branches: &[crate::core::tictac::Branch],
    ) -> Result<(Vec<Vec<u32>>, Vec<Vec<u32>>), ExchangeOutcome> {
        let request = PeerRequest::AaeSegments {
            partition,
            branches: branches.to_vec(),
        };
        let timeout = self.inner.settings.request_timeout;
        let theirs = match self.inner.peers.call(peer, request, timeout).await {
            Ok(PeerResponse::AaeSegments(Some(segments))) => {
                self.count_exchanged(segments.iter().map(|branch| 4 * branch.len()).sum());
                segments
            }
            other => return Err(failed_step(peer, "segments", other)),
        };
        let ours = self
            .inner
            .store
            .aae_trees()
            .and_then(|trees| trees.segments(partition, branches))
            .ok_or_else(|| ExchangeOutcome::Failed("this node's tree is not built".into()))?;
        Ok((ours, theirs))
    }

    fn count_exchanged(&self, bytes: usize) {
        self.inner
            .aae
            .bytes_exchanged
            .fetch_add(bytes as u64, Ordering::Relaxed);
        metrics::counter!("dynkv_aae_bytes_exchanged_total").increment(bytes as u64);
    }

    /// This node's key digests in `segments` of `partition` (a scan of the partition, off
    /// the async workers).
    async fn key_digests(
        &self,
        partition: PartitionId,
        segments: Vec<u16>,
    ) -> Result<Vec<crate::core::tictac::KeyDigest>, String> {
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.key_digests(partition, &segments))
            .await
            .map_err(|error| format!("the digest scan failed: {error}"))?
            .map_err(|error| error.to_string())
    }

    /// Brings one key's copies here and on `peer` to their merge; whether either changed.
    async fn repair_key(
        &self,
        partition: PartitionId,
        peer: &NodeId,
        difference: &KeyDifference,
    ) -> Result<bool, String> {
        let copy = Copy {
            partition,
            bucket: difference.bucket.clone(),
            key: difference.key.clone(),
            hint_for: None,
        };
        // A bucket with its own n_val may not be replicated on both sides: such a key is
        // left alone rather than copied where it does not belong.
        let n_val = self
            .bucket_props(&difference.bucket)
            .await
            .map_err(|error| error.message)?
            .n_val as usize;
        let replicas = self
            .inner
            .membership
            .ring()
            .preference_list(partition, n_val);
        let replicates = |node: &NodeId| replicas.iter().any(|(_, replica)| replica == node);
        if !replicates(&self.inner.id) || !replicates(peer) {
            return Ok(false);
        }
        let deadline = Instant::now() + self.inner.settings.request_timeout;
        let ours = self.read_copy(&copy)?;
        let theirs = self
            .replica_get(peer, copy.clone(), deadline)
            .await
            .map_err(|error| error.to_string())?;
        let merged = match (&ours, &theirs) {
            (Some(ours), Some(theirs)) => ours.sync(theirs),
            (Some(only), None) | (None, Some(only)) => only.clone(),
            (None, None) => return Ok(false),
        };
        let bytes = crate::core::object::object_size_bytes(&merged) as u64;
        let mut changed = false;
        if ours.as_ref() != Some(&merged) {
            self.merge_copy(&copy, merged.clone()).await?;
            self.inner
                .aae
                .bytes_repaired
                .fetch_add(bytes, Ordering::Relaxed);
            changed = true;
        }
        if theirs.as_ref() != Some(&merged) {
            self.replica_put(peer, copy, merged, deadline)
                .await
                .map_err(|error| error.to_string())?;
            self.inner
                .aae
                .bytes_repaired
                .fetch_add(bytes, Ordering::Relaxed);
            changed = true;
        }
        Ok(changed)
    }

    /// A peer's exchange step, served from this node's tree.
    pub(super) async fn serve_aae(&self, request: PeerRequest) -> PeerResponse {
        let Some(trees) = self.inner.store.aae_trees() else {
            return PeerResponse::Failed {
                message: "anti-entropy is off on this node (aae.enabled = false)".into(),
            };
        };
        match request {
            PeerRequest::AaeBranches { partition } => {
                let branches = trees.branches(partition);
                if branches.is_none() {
                    // Built in the background; the asking node tries again next time.
                    let store = self.inner.store.clone();
                    tokio::spawn(async move { store.build_tree(partition).await });
                }
                PeerResponse::AaeBranches(branches)
            }
            PeerRequest::AaeSegments {
                partition,
                branches,
            } => {
                if branches.len() > crate::core::tictac::BRANCHES
                    || branches
                        .iter()
                        .any(|branch| *branch as usize >= crate::core::tictac::BRANCHES)
                {
                    return PeerResponse::Failed {
                        message: format!("{} branches asked, or one out of range", branches.len()),
                    };
                }
                PeerResponse::AaeSegments(trees.segments(partition, &branches))
            }
            PeerRequest::AaeKeys {
                partition,
                segments,
            } => {
                if segments.len() > MAX_AAE_SEGMENTS {
                    return PeerResponse::Failed {
                        message: format!(
                            "{} segments asked; at most {MAX_AAE_SEGMENTS}",
                            segments.len()
                        ),
                    };
                }
                match self.key_digests(partition, segments).await {
                    Ok(mut digests) => {
                        digests.truncate(MAX_AAE_DIGESTS);
                        PeerResponse::AaeKeys(digests)
                    }
                    Err(message) => PeerResponse::Failed { message },
                }
            }
            _ => PeerResponse::Failed {
                message: "not an anti-entropy request".into(),
            },
        }
    }

    /// `dynkv admin aae`: every partition's tree and the last exchange with each peer.
    pub(super) fn aae_info(&self) -> AaeInfo {
        let settings = &self.inner.settings.aae;
        let trees = self
            .inner
            .store
            .aae_trees()
            .map(|trees| trees.status())
            .unwrap_or_default();
        let owned = self.first_owned_partitions();
        let last = self.inner.aae.last.lock().clone();
        let now = Instant::now();
        let next_tick = *self.inner.aae.next_tick.lock();
        let cursor = *self.inner.aae.cursor.lock();
        let mut partitions: BTreeMap<PartitionId, AaePartitionInfo> = BTreeMap::new();
        for tree in trees {
            partitions.insert(
                tree.partition,
                AaePartitionInfo {
                    partition: tree.partition,
                    tree: match (tree.built, tree.building) {
                        (true, true) => "rebuilding",
                        (true, false) => "built",
                        (false, true) => "building",
                        (false, false) => "none",
                    }
                    .into(),
                    builds: tree.builds,
                    writes_since_build: tree.writes_since_build,
                    tombstones: tree.tombstones,
                    ..AaePartitionInfo::default()
                },
            );
        }
        // Owned partitions come up in turn after the cursor: the k-th next is k ticks away.
        let position = |partition: PartitionId| -> u64 {
            let after = cursor.map_or(0, |cursor| owned.iter().filter(|p| **p <= cursor).count());
            let index = owned.iter().position(|p| *p == partition).unwrap_or(0);
            ((index + owned.len() - after) % owned.len().max(1)) as u64
        };
        for partition in &owned {
            let info = partitions
                .entry(*partition)
                .or_insert_with(|| AaePartitionInfo {
                    partition: *partition,
                    tree: "none".into(),
                    ..AaePartitionInfo::default()
                });
            let first = next_tick.map_or(0, |tick| {
                tick.saturating_duration_since(now).as_millis() as u64
            });
            info.next_due_ms =
                Some(first + position(*partition) * settings.exchange_interval.as_millis() as u64);
        }
        for ((partition, peer), (at, outcome)) in last {
            let info = partitions
                .entry(partition)
                .or_insert_with(|| AaePartitionInfo {
                    partition,
                    tree: "none".into(),
                    ..AaePartitionInfo::default()
                });
            info.exchanges.push(AaeExchangeInfo {
                peer: peer.to_string(),
                ago_ms: now.saturating_duration_since(at).as_millis() as u64,
                result: outcome.to_string(),
            });
        }
        for (partition, (at, outcome)) in self.inner.reap.last.lock().clone() {
            if let Some(info) = partitions.get_mut(&partition) {
                info.last_reap = Some(AaeExchangeInfo {
                    peer: String::new(),
                    ago_ms: now.saturating_duration_since(at).as_millis() as u64,
                    result: outcome.to_string(),
                });
            }
        }
        let tombstones = &self.inner.settings.tombstones;
        AaeInfo {
            enabled: settings.enabled && self.inner.store.aae_trees().is_some(),
            exchange_interval_ms: settings.exchange_interval.as_millis() as u64,
            tombstones_mode: if tombstones.reap { "reap" } else { "keep" }.into(),
            tombstone_grace_secs: tombstones.grace.as_secs(),
            partitions: partitions.into_values().collect(),
        }
    }

    /// `dynkv admin aae repair [PARTITION]`: exchanges now, then the state.
    pub(super) async fn aae_repair(&self, partition: Option<PartitionId>) -> ClientResponse {
        if !self.inner.settings.aae.enabled || self.inner.store.aae_trees().is_none() {
            return ClientResponse::Error(ClientError::invalid(
                "anti-entropy is off on this node (aae.enabled = false)",
            ));
        }
        let partitions = match partition {
            Some(partition) if partition >= self.inner.membership.ring().partition_count() => {
                return ClientResponse::Error(ClientError::invalid(format!(
                    "partition {partition} is outside the ring (0..{})",
                    self.inner.membership.ring().partition_count()
                )));
            }
            Some(partition) => vec![partition],
            None => self.first_owned_partitions(),
        };
        for partition in partitions {
            self.exchange_and_reap(partition).await;
        }
        ClientResponse::Aae(self.aae_info())
    }
}

fn failed_step(
    peer: &NodeId,
    step: &str,
    answer: Result<PeerResponse, crate::net::TransportError>,
) -> ExchangeOutcome {
    ExchangeOutcome::Failed(match answer {
        Ok(PeerResponse::Failed { message }) => format!("{peer} refused the {step}: {message}"),
        Ok(other) => format!("{peer} answered the {step} with {other:?}"),
        Err(error) => format!("{peer} did not answer the {step}: {error}"),
    })
}

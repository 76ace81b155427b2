//! Tombstone reaping (`tombstones.mode = "reap"`). A delete leaves a tombstone so that the
//! deleted version cannot come back from a replica, a hint or a delayed message that still
//! holds it. Once no such copy can exist, the tombstone is only cost; this removes it.
//!
//! After its anti-entropy exchange of a partition, the partition's first owner (the node
//! that runs its exchanges, so no two nodes reap one partition) takes a pass over the
//! tombstones it holds there. A tombstone is reaped only when all of these hold:
//! - its grace period (the bucket's `tombstone_grace_secs`, else `tombstones.grace_secs`)
//!   has passed since the newest delete in it;
//! - every member that owns partitions is up, all hold this node's ring version, and no
//!   ring change is pending (no transfer moves the partition, no stale owner is left);
//! - no member holds a hint for the partition (a fallback's copy may be older): each is
//!   asked directly, and one that does not answer holds reaping back;
//! - every primary of the key answers that it holds the *identical* tombstone (the same
//!   record digest), read durably: a copy a crash could still roll back does not count;
//! - no operation that began before every primary was known to hold the tombstone is still
//!   in flight on any member: a write, read repair, exchange or hint delivery that read a
//!   copy before the delete reached it may carry the deleted version (see `inflight`);
//! - and then, at each primary, its copy is still that tombstone: each deletes only if it is
//!   unchanged, in the same writer job as its anti-entropy tree update.
//!
//! The conditions are checked before the primaries are asked and again before they reap.
//! A partial reap (a primary that did not answer) is harmless: anti-entropy copies the
//! tombstone back, and a later pass reaps it. A new write after a reap is coordinated into a
//! copy without a key actor, so it gets a fresh one and no dot is issued twice (see
//! `core::epoch`).

use super::*;
use crate::protocol::{MAX_REAP_KEYS, ReapKey};
use crate::storage::Tombstone;
use std::collections::BTreeMap;

/// Tombstone settings (`[tombstones]` in the config).
#[derive(Clone, Debug)]
pub struct TombstoneSettings {
    /// `tombstones.mode = "reap"`.
    pub reap: bool,
    pub grace: Duration,
    pub max_reaps_per_pass: usize,
}

impl Default for TombstoneSettings {
    fn default() -> Self {
        TombstoneSettings {
            reap: true,
            grace: Duration::from_secs(4 * 3600),
            max_reaps_per_pass: 1000,
        }
    }
}

/// The outcome of one reaping pass over a partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ReapOutcome {
    /// No tombstone is held in the partition.
    NoTombstones,
    /// Tombstones were looked at; `reaped` of them went from every primary.
    Reaped { examined: u64, reaped: u64 },
    /// Nothing may be reaped now, for this reason.
    Blocked(String),
}

impl std::fmt::Display for ReapOutcome {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReapOutcome::NoTombstones => write!(formatter, "no tombstones"),
            ReapOutcome::Reaped { examined, reaped } => {
                write!(formatter, "{reaped} of {examined} tombstones reaped")
            }
            ReapOutcome::Blocked(reason) => write!(formatter, "not reaping: {reason}"),
        }
    }
}

/// A key as (bucket, key).
pub(super) type BucketAndKey = (Vec<u8>, Vec<u8>);

/// Per partition, the last key a pass looked at, where the next one starts.
pub(super) type ScanCursors = parking_lot::Mutex<BTreeMap<PartitionId, BucketAndKey>>;

/// What a pass over a partition reads: up to `limit` items after a key.
type PartitionScan<T> =
    fn(&Store, PartitionId, Option<(&[u8], &[u8])>, usize) -> Result<Vec<T>, StorageError>;

/// The next items (at most `limit`) that `scan` finds in `partition` after its cursor in
/// `cursors`, wrapping around at the end without repeating what the first scan found. The
/// cursor moves to the last one when the page was full, and back to the start otherwise.
pub(super) async fn next_wrapping<T: Send + 'static>(
    store: &Store,
    cursors: &ScanCursors,
    partition: PartitionId,
    limit: usize,
    scan: PartitionScan<T>,
    name: fn(&T) -> BucketAndKey,
) -> Result<Vec<T>, String> {
    let start = cursors.lock().get(&partition).cloned();
    let store = store.clone();
    let found = tokio::task::spawn_blocking(move || {
        let start_after = start
            .as_ref()
            .map(|(bucket, key)| (bucket.as_slice(), key.as_slice()));
        let mut found = scan(&store, partition, start_after, limit)?;
        if found.len() < limit && start.is_some() {
            let seen: std::collections::HashSet<BucketAndKey> = found.iter().map(name).collect();
            let again = scan(&store, partition, None, limit - found.len())?;
            found.extend(again.into_iter().filter(|item| !seen.contains(&name(item))));
        }
        Ok::<_, StorageError>(found)
    })
    .await
    .map_err(|error| error.to_string())?
    .map_err(|error| error.to_string())?;
    let mut cursors = cursors.lock();
    match found.last() {
        Some(last) if found.len() >= limit => {
            cursors.insert(partition, name(last));
        }
        _ => {
            cursors.remove(&partition);
        }
    }
    Ok(found)
}

/// What this node remembers of its reaping passes.
#[derive(Default)]
pub(super) struct ReapState {
    /// partition → when the last pass ended and how.
    pub(super) last: parking_lot::Mutex<BTreeMap<PartitionId, (Instant, ReapOutcome)>>,
    /// partition → the last key a pass looked at, where the next one starts.
    cursors: ScanCursors,
    /// Tombstones this node deleted (its own copies).
    pub(super) reaped: AtomicU64,
}

impl Node {
    /// One reaping pass over `partition` (this node runs its exchanges); records and
    /// returns the outcome.
    pub(super) async fn reap_partition(&self, partition: PartitionId) -> ReapOutcome {
        let outcome = self
            .reap_pass(partition)
            .instrument(debug_span!("reap", partition))
            .await;
        match &outcome {
            ReapOutcome::Reaped { reaped, .. } if *reaped > 0 => {
                info!(node = %self.inner.id, partition, reaped, "tombstones reaped")
            }
            ReapOutcome::Blocked(reason) => {
                debug!(node = %self.inner.id, partition, reason = %reason, "not reaping")
            }
            _ => {}
        }
        self.inner
            .reap
            .last
            .lock()
            .insert(partition, (Instant::now(), outcome.clone()));
        metrics::gauge!("dynkv_tombstones_held").set(self.tombstones_held() as f64);
        outcome
    }

    async fn reap_pass(&self, partition: PartitionId) -> ReapOutcome {
        let settings = self.inner.settings.tombstones.clone();
        if !settings.reap {
            return ReapOutcome::Blocked("tombstones.mode = keep".into());
        }
        let Some(trees) = self.inner.store.aae_trees() else {
            return ReapOutcome::Blocked("anti-entropy is off (aae.enabled = false)".into());
        };
        match trees.tombstones(partition) {
            None => return ReapOutcome::Blocked("the partition's tree is not built".into()),
            Some(0) => return ReapOutcome::NoTombstones,
            Some(_) => {}
        }
        let members = match self.reaping_blocked(partition).await {
            Ok(members) => members,
            Err(reason) => return ReapOutcome::Blocked(reason),
        };
        let candidates = match self
            .next_tombstones(partition, settings.max_reaps_per_pass)
            .await
        {
            Ok(candidates) => candidates,
            Err(message) => return ReapOutcome::Blocked(message),
        };
        let examined = candidates.len() as u64;
        // Ripe tombstones, grouped by the primaries of their bucket's n_val.
        let now_micros = self.inner.settings.wall_clock.now_micros();
        let ring = self.inner.membership.ring();
        let mut groups: BTreeMap<Vec<NodeId>, Vec<Tombstone>> = BTreeMap::new();
        for tombstone in candidates {
            let props = match self.bucket_props(&tombstone.bucket).await {
                Ok(props) => props,
                Err(error) => return ReapOutcome::Blocked(error.message),
            };
            let grace = props
                .tombstone_grace_secs
                .map_or(settings.grace, Duration::from_secs);
            let ripe_at = tombstone
                .since_micros
                .saturating_add(grace.as_micros() as u64);
            if now_micros < ripe_at {
                continue;
            }
            let primaries: Vec<NodeId> = ring
                .preference_list(partition, props.n_val as usize)
                .into_iter()
                .map(|(_, node)| node)
                .collect();
            if !primaries.contains(&self.inner.id) {
                continue;
            }
            groups.entry(primaries).or_default().push(tombstone);
        }
        let mut reaped = 0;
        for (primaries, tombstones) in groups {
            match self
                .reap_group(partition, &primaries, &members, tombstones)
                .await
            {
                Ok(count) => reaped += count,
                Err(reason) => return ReapOutcome::Blocked(reason),
            }
        }
        ReapOutcome::Reaped { examined, reaped }
    }

    /// Why no tombstone of `partition` may be reaped now, if one may not. Every member that
    /// may hold data is asked for its hints of the partition directly (gossip's figures can
    /// be a handoff pass old, and a member that crashed just after making a hint may still
    /// look up to the failure detector): one that does not answer holds reaping back.
    /// Otherwise returns the other members that may coordinate requests (those asked, and
    /// joiners that are up), for [`Node::wait_out_operations`].
    pub(super) async fn reaping_blocked(
        &self,
        partition: PartitionId,
    ) -> Result<Vec<NodeId>, String> {
        let membership = &self.inner.membership;
        let Some(gossip) = membership.gossip() else {
            return Err("membership is static: hints held elsewhere are not known".into());
        };
        if membership.pending_ring().is_some() {
            return Err("a ring change is pending".into());
        }
        let version = gossip.cluster_state().version();
        let mut asked = Vec::new();
        // Members to ask what they have in flight: any node may coordinate a request.
        let mut coordinators = Vec::new();
        for member in membership.view() {
            // Removed members never serve again; joiners own nothing (and hold no hints)
            // until a committed change, which is then pending. A joiner that is up takes
            // requests, though: it is asked what it has in flight.
            // A member that finished its leave holds no hint and coordinates nothing more
            // (it stopped serving before it said it was done).
            if member.state == "down" || member.state == "left" {
                continue;
            }
            if member.state == "joining" {
                if member.up
                    && member.node != self.inner.id.as_str()
                    && let Ok(joiner) = NodeId::new(member.node.clone())
                {
                    coordinators.push(joiner);
                }
                continue;
            }
            // A leaver (`exiting`) is asked like any member: it may still hold hints it took
            // as a fallback before the ring flipped, and hand them back when it restarts.
            if !member.up && member.state == "exiting" {
                return Err(format!(
                    "{} is down before it finished its leave (it may hold hints): start it again to finish, or `dynkv admin cluster remove {}`",
                    member.node, member.node
                ));
            }
            if !member.up {
                return Err(format!("{} is down", member.node));
            }
            if member.ring_version != version {
                return Err(format!(
                    "{} holds ring version {}, this node {version}",
                    member.node, member.ring_version
                ));
            }
            if member.node != self.inner.id.as_str() {
                asked.push(member.node);
            }
        }
        let own = self
            .inner
            .store
            .hint_tally()
            .by_partition
            .get(&partition)
            .copied()
            .unwrap_or(0);
        if own > 0 {
            return Err(format!("{own} hints for the partition are held here"));
        }
        let timeout = self.inner.settings.request_timeout;
        for member in asked {
            let Ok(peer) = NodeId::new(member.clone()) else {
                return Err(format!("member {member:?} has no valid id"));
            };
            match self
                .inner
                .peers
                .call(&peer, PeerRequest::HintCount { partition }, timeout)
                .await
            {
                Ok(PeerResponse::HintCount(0)) => {}
                Ok(PeerResponse::HintCount(held)) => {
                    return Err(format!("{held} hints for the partition are held on {peer}"));
                }
                Ok(other) => {
                    return Err(format!("{peer} answered the hint count with {other:?}"));
                }
                Err(error) => {
                    return Err(format!("{peer} did not say what hints it holds: {error}"));
                }
            }
            coordinators.push(peer);
        }
        Ok(coordinators)
    }

    /// Waits until no operation on `partition` that began before `confirmed` (when every
    /// primary was known to hold the tombstones) is in flight on this node or on any of
    /// `members`: such an operation may carry a version the tombstones deleted, read
    /// before they reached every replica (see `inflight`). Gives up after the request
    /// timeout (and a second): an operation that old holds reaping back until a later pass.
    /// A member whose cleanup after the last ring change has not finished holds it back
    /// too: a stale copy it keeps would be a replica's again if a later change gave the
    /// partition back to it.
    pub(super) async fn wait_out_operations(
        &self,
        partition: PartitionId,
        confirmed: Instant,
        members: &[NodeId],
    ) -> Result<(), String> {
        let timeout = self.inner.settings.request_timeout;
        let give_up = Instant::now() + timeout + Duration::from_secs(1);
        let mut waiting: Vec<Option<&NodeId>> = std::iter::once(None)
            .chain(members.iter().map(Some))
            .collect();
        loop {
            let mut still = Vec::new();
            for member in waiting {
                // Ages are measured when the member answers, later than now: an operation
                // younger than this began after `confirmed`.
                let since_confirmed = confirmed.elapsed();
                let (oldest, strays) = match member {
                    None => (
                        self.inner.in_flight.oldest_age(partition),
                        self.may_hold_strays(),
                    ),
                    Some(peer) => match self
                        .inner
                        .peers
                        .call(peer, PeerRequest::InFlight { partition }, timeout)
                        .await
                    {
                        Ok(PeerResponse::InFlight {
                            oldest_age_ms,
                            strays,
                        }) => (oldest_age_ms.map(Duration::from_millis), strays),
                        Ok(other) => {
                            return Err(format!(
                                "{peer} answered the in-flight question with {other:?}"
                            ));
                        }
                        Err(error) => {
                            return Err(format!(
                                "{peer} did not say what it has in flight: {error}"
                            ));
                        }
                    },
                };
                let holder = || member.map_or_else(|| self.inner.id.to_string(), NodeId::to_string);
                match oldest {
                    Some(age) if age >= since_confirmed => still.push((
                        member,
                        format!(
                            "an operation on the partition that began before the tombstones were confirmed is still in flight on {} ({} ms old)",
                            holder(),
                            age.as_millis()
                        ),
                    )),
                    _ if strays => still.push((
                        member,
                        format!(
                            "{} has not finished deleting the copies it no longer replicates",
                            holder()
                        ),
                    )),
                    _ => {}
                }
            }
            let Some((_, reason)) = still.first() else {
                return Ok(());
            };
            if Instant::now() >= give_up {
                return Err(reason.clone());
            }
            waiting = still.into_iter().map(|(member, _)| member).collect();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The next tombstones of `partition` after the last pass's cursor (wrapping around at
    /// the end), at most `limit`.
    async fn next_tombstones(
        &self,
        partition: PartitionId,
        limit: usize,
    ) -> Result<Vec<Tombstone>, String> {
        next_wrapping(
            &self.inner.store,
            &self.inner.reap.cursors,
            partition,
            limit,
            Store::tombstones,
            |tombstone| (tombstone.bucket.clone(), tombstone.key.clone()),
        )
        .await
        .map_err(|error| format!("the tombstone scan failed: {error}"))
    }

    /// Reaps `tombstones` (all with the same `primaries`, this node among them) from every
    /// primary that holds each identically; returns how many went from all of them.
    async fn reap_group(
        &self,
        partition: PartitionId,
        primaries: &[NodeId],
        members: &[NodeId],
        tombstones: Vec<Tombstone>,
    ) -> Result<u64, String> {
        let timeout = self.inner.settings.request_timeout;
        let peers: Vec<&NodeId> = primaries
            .iter()
            .filter(|node| **node != self.inner.id)
            .collect();
        let mut reaped = 0;
        for chunk in tombstones.chunks(MAX_REAP_KEYS) {
            // Check: every primary holds the identical tombstone, durably.
            let keys: Vec<ReapKey> = chunk
                .iter()
                .map(|tombstone| ReapKey {
                    bucket: tombstone.bucket.clone(),
                    key: tombstone.key.clone(),
                    digest: tombstone.digest,
                })
                .collect();
            let mut same = self.holds_tombstones(partition, &keys).await?;
            for peer in &peers {
                let request = PeerRequest::ReapCheck {
                    partition,
                    keys: keys.clone(),
                };
                match self.inner.peers.call(peer, request, timeout).await {
                    Ok(PeerResponse::ReapCheck(answers)) if answers.len() == keys.len() => {
                        for (same, holds) in same.iter_mut().zip(answers) {
                            *same &= holds;
                        }
                    }
                    Ok(other) => return Err(format!("{peer} answered the check with {other:?}")),
                    Err(error) => return Err(format!("{peer} did not answer the check: {error}")),
                }
            }
            let confirmed = Instant::now();
            let keys: Vec<ReapKey> = keys
                .into_iter()
                .zip(&same)
                .filter_map(|(key, same)| same.then_some(key))
                .collect();
            if keys.is_empty() {
                continue;
            }
            self.wait_out_operations(partition, confirmed, members)
                .await?;
            // Whatever changed while the primaries were asked stops the pass.
            self.reaping_blocked(partition).await?;
            debug!(
                node = %self.inner.id,
                partition,
                keys = ?keys.iter().map(|key| String::from_utf8_lossy(&key.key)).collect::<Vec<_>>(),
                "reaping from every primary"
            );
            for peer in &peers {
                let request = PeerRequest::Reap {
                    partition,
                    keys: keys.clone(),
                };
                match self.inner.peers.call(peer, request, timeout).await {
                    Ok(PeerResponse::Reaped { .. }) => {}
                    Ok(other) => return Err(format!("{peer} answered the reap with {other:?}")),
                    Err(error) => return Err(format!("{peer} did not answer the reap: {error}")),
                }
            }
            reaped += self.reap_own_copies(partition, &keys).await?;
        }
        Ok(reaped)
    }

    /// Deletes this node's copies among `keys` that are still the tombstone named; returns
    /// how many went.
    async fn reap_own_copies(
        &self,
        partition: PartitionId,
        keys: &[ReapKey],
    ) -> Result<u64, String> {
        let targets: Vec<(Vec<u8>, Vec<u8>, u64)> = keys
            .iter()
            .map(|key| (key.bucket.clone(), key.key.clone(), key.digest))
            .collect();
        let reaped = self
            .inner
            .store
            .reap_tombstones(partition, &targets)
            .await
            .map_err(|error| error.to_string())?;
        self.inner.reap.reaped.fetch_add(reaped, Ordering::Relaxed);
        metrics::counter!("dynkv_tombstones_reaped_total").increment(reaped);
        Ok(reaped)
    }

    /// For each key, whether this node holds that very tombstone (the digest named, every
    /// sibling a tombstone), read once durable.
    async fn holds_tombstones(
        &self,
        partition: PartitionId,
        keys: &[ReapKey],
    ) -> Result<Vec<bool>, String> {
        self.holds_copies(partition, keys, |summary| summary.tombstone_since.is_some())
            .await
    }

    /// For each key, whether this node holds a copy with the digest named that also passes
    /// `also`, read once durable.
    pub(super) async fn holds_copies(
        &self,
        partition: PartitionId,
        keys: &[ReapKey],
        also: impl Fn(&crate::core::tictac::RecordSummary) -> bool,
    ) -> Result<Vec<bool>, String> {
        let names: Vec<(Vec<u8>, Vec<u8>)> = keys
            .iter()
            .map(|key| (key.bucket.clone(), key.key.clone()))
            .collect();
        let summaries = self
            .inner
            .store
            .durable_summaries(partition, &names)
            .await
            .map_err(|error| error.to_string())?;
        Ok(keys
            .iter()
            .zip(summaries)
            .map(|(key, summary)| {
                summary.is_some_and(|summary| summary.digest == key.digest && also(&summary))
            })
            .collect())
    }

    /// A reaper's check: for each key, whether this node holds that very tombstone, durably.
    pub(super) async fn serve_reap_check(
        &self,
        partition: PartitionId,
        keys: Vec<ReapKey>,
    ) -> PeerResponse {
        if let Some(refusal) = too_many_reap_keys(&keys) {
            return refusal;
        }
        match self.holds_tombstones(partition, &keys).await {
            Ok(answers) => PeerResponse::ReapCheck(answers),
            Err(message) => PeerResponse::Failed { message },
        }
    }

    /// A reaper's order: delete each copy that is still the tombstone named.
    pub(super) async fn serve_reap(
        &self,
        partition: PartitionId,
        keys: Vec<ReapKey>,
    ) -> PeerResponse {
        if let Some(refusal) = too_many_reap_keys(&keys) {
            return refusal;
        }
        match self.reap_own_copies(partition, &keys).await {
            Ok(reaped) => PeerResponse::Reaped { reaped },
            Err(message) => PeerResponse::Failed { message },
        }
    }

    /// Tombstones held in this node's partitions (as its trees count them).
    pub(super) fn tombstones_held(&self) -> u64 {
        self.inner.store.aae_trees().map_or(0, |trees| {
            trees.status().iter().map(|tree| tree.tombstones).sum()
        })
    }
}

/// The refusal of a peer's reap request (or copy check) naming more than [`MAX_REAP_KEYS`]
/// keys.
pub(super) fn too_many_reap_keys(keys: &[ReapKey]) -> Option<PeerResponse> {
    (keys.len() > MAX_REAP_KEYS).then(|| PeerResponse::Failed {
        message: format!("{} keys named; at most {MAX_REAP_KEYS}", keys.len()),
    })
}

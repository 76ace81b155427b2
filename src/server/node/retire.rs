//! Actor retirement passes (the rule is `core::retire`'s). A node that gave up a key actor
//! of a copy (after a restart, or for a rescued version) marks the record
//! ([`LocalRecord::retiring`]); its trees count such records per partition. After each
//! anti-entropy round, the node takes a pass over one partition it is a primary of where it
//! holds marked records:
//! 1. the tombstone reaper's conditions hold (every member up on one ring, no change
//!    pending, no hint for the partition anywhere);
//! 2. every other primary says whether it holds the same copy (record digest, durably) and
//!    which key actor it still coordinates the copy under ([`PeerRequest::RetireCheck`]);
//! 3. the actors to retire are the copy's idle ones that no primary coordinates under;
//! 4. every operation on the partition that began before the check is waited out, and the
//!    conditions are checked again;
//! 5. each other primary, then this node, removes those actors' entries from its copy if
//!    the copy is still the one checked ([`PeerRequest::Retire`]).
//!
//! A record stays marked while its clock names an actor that no primary coordinates under
//! and that still holds a value (a sibling nobody resolved yet); once every such actor is
//! retired, the mark goes. A pass that stops part way leaves the mark, and a later one
//! finishes.

use super::*;
use crate::core::object::encode_record;
use crate::core::retire::{retirable_actors, retire};
use crate::core::tictac::record_digest;
use crate::protocol::{MAX_REAP_KEYS, ReapKey, RetireAnswer, RetireKey};
use crate::storage::RetiringRecord;
use std::collections::BTreeMap;

/// What this node remembers of its retirement passes.
#[derive(Default)]
pub(super) struct RetireState {
    /// partition → the last key a pass looked at, where the next one starts.
    cursors: super::reap::ScanCursors,
    /// The partition the last pass looked at, so that passes go round the partitions.
    last_partition: parking_lot::Mutex<Option<PartitionId>>,
    /// Actor entries this node removed from its own copies.
    pub(super) retired: AtomicU64,
}

/// Records one pass looks at, at most.
const MAX_RECORDS_PER_PASS: usize = 1000;

impl Node {
    /// One retirement pass over the next partition (round robin) where this node holds
    /// records asking for one; returns how many actor entries went from this node's copies.
    pub(super) async fn retire_next_partition(&self) -> u64 {
        let Some(trees) = self.inner.store.aae_trees() else {
            return 0;
        };
        let waiting: Vec<PartitionId> = trees
            .status()
            .into_iter()
            .filter(|tree| tree.retiring > 0)
            .map(|tree| tree.partition)
            .collect();
        let partition = {
            let mut last = self.inner.retire.last_partition.lock();
            let next = waiting
                .iter()
                .copied()
                .find(|partition| last.is_none_or(|last| *partition > last))
                .or_else(|| waiting.first().copied());
            *last = next;
            next
        };
        let Some(partition) = partition else {
            return 0;
        };
        match self
            .retire_pass(partition)
            .instrument(debug_span!("retire", partition))
            .await
        {
            Ok(retired) => {
                if retired > 0 {
                    debug!(node = %self.inner.id, partition, retired, "actors retired");
                }
                retired
            }
            Err(reason) => {
                debug!(node = %self.inner.id, partition, reason = %reason, "not retiring actors");
                0
            }
        }
    }

    async fn retire_pass(&self, partition: PartitionId) -> Result<u64, String> {
        let members = self.reaping_blocked(partition).await?;
        let records = self.next_retiring_records(partition).await?;
        let ring = self.inner.membership.ring();
        let mut groups: BTreeMap<Vec<NodeId>, Vec<RetiringRecord>> = BTreeMap::new();
        for record in records {
            let props = self
                .bucket_props(&record.bucket)
                .await
                .map_err(|error| error.message)?;
            let primaries: Vec<NodeId> = ring
                .preference_list(partition, props.n_val as usize)
                .into_iter()
                .map(|(_, node)| node)
                .collect();
            // A copy this node no longer replicates is handed off and deleted, not retired.
            if primaries.contains(&self.inner.id) {
                groups.entry(primaries).or_default().push(record);
            }
        }
        let mut retired = 0;
        for (primaries, records) in groups {
            retired += self
                .retire_group(partition, &primaries, &members, records)
                .await?;
        }
        Ok(retired)
    }

    /// The next records of `partition` that ask for a pass, after the last pass's cursor
    /// (wrapping around at the end).
    async fn next_retiring_records(
        &self,
        partition: PartitionId,
    ) -> Result<Vec<RetiringRecord>, String> {
        super::reap::next_wrapping(
            &self.inner.store,
            &self.inner.retire.cursors,
            partition,
            MAX_RECORDS_PER_PASS,
            Store::retiring,
            |record| (record.bucket.clone(), record.key.clone()),
        )
        .await
        .map_err(|error| format!("the retirement scan failed: {error}"))
    }

    /// Retires what may go from `records` (all with the same `primaries`, this node among
    /// them); returns how many actor entries went from this node's copies.
    async fn retire_group(
        &self,
        partition: PartitionId,
        primaries: &[NodeId],
        members: &[NodeId],
        records: Vec<RetiringRecord>,
    ) -> Result<u64, String> {
        let timeout = self.inner.settings.request_timeout;
        let peers: Vec<&NodeId> = primaries
            .iter()
            .filter(|node| **node != self.inner.id)
            .collect();
        let mut retired = 0;
        for chunk in records.chunks(MAX_REAP_KEYS) {
            let keys: Vec<ReapKey> = chunk
                .iter()
                .map(|record| ReapKey {
                    bucket: record.bucket.clone(),
                    key: record.key.clone(),
                    digest: record.digest,
                })
                .collect();
            // Each primary's answer: whether it holds this very copy, and the actor it
            // still coordinates the copy under.
            let mut answers = vec![self.retire_answers(partition, &keys).await?];
            for peer in &peers {
                let request = PeerRequest::RetireCheck {
                    partition,
                    keys: keys.clone(),
                };
                match self.inner.peers.call(peer, request, timeout).await {
                    Ok(PeerResponse::RetireCheck(held)) if held.len() == keys.len() => {
                        answers.push(held)
                    }
                    Ok(other) => return Err(format!("{peer} answered the check with {other:?}")),
                    Err(error) => return Err(format!("{peer} did not answer the check: {error}")),
                }
            }
            let confirmed = Instant::now();
            let mut plan = Vec::new();
            for (index, record) in chunk.iter().enumerate() {
                let per_primary: Vec<RetireAnswer> =
                    answers.iter().map(|answers| answers[index]).collect();
                if !per_primary.iter().all(|answer| answer.held) {
                    continue;
                }
                let coordinating: Vec<Actor> = per_primary
                    .iter()
                    .filter_map(|answer| answer.coordinator)
                    .collect();
                let actors = retirable_actors(&record.record.object, &coordinating);
                // Actors that no primary coordinates under but that still hold a value
                // keep the record marked until someone resolves those values.
                let unresolved = record.record.object.entries().iter().any(|entry| {
                    !entry.values().is_empty() && !coordinating.contains(&entry.actor())
                });
                plan.push((
                    RetireKey {
                        bucket: record.bucket.clone(),
                        key: record.key.clone(),
                        digest: record.digest,
                        actors,
                    },
                    !unresolved,
                ));
            }
            if plan.is_empty() {
                continue;
            }
            let to_peers: Vec<RetireKey> = plan
                .iter()
                .filter(|(key, _)| !key.actors.is_empty())
                .map(|(key, _)| key.clone())
                .collect();
            if !to_peers.is_empty() {
                self.wait_out_operations(partition, confirmed, members)
                    .await?;
                // Whatever changed while the primaries were asked stops the pass.
                self.reaping_blocked(partition).await?;
                for peer in &peers {
                    let request = PeerRequest::Retire {
                        partition,
                        keys: to_peers.clone(),
                    };
                    match self.inner.peers.call(peer, request, timeout).await {
                        Ok(PeerResponse::Retired { .. }) => {}
                        Ok(other) => {
                            return Err(format!("{peer} answered the retirement with {other:?}"));
                        }
                        Err(error) => {
                            return Err(format!("{peer} did not answer the retirement: {error}"));
                        }
                    }
                }
            }
            retired += self.retire_own_copies(partition, plan).await?;
        }
        Ok(retired)
    }

    /// For each key: whether this node holds a copy with the digest named, durably, and the
    /// key actor it would coordinate the copy's next write under, if it trusts one.
    async fn retire_answers(
        &self,
        partition: PartitionId,
        keys: &[ReapKey],
    ) -> Result<Vec<RetireAnswer>, String> {
        // The key actor is read before the digest: a write between the two changes the
        // digest, and the retirement then finds the copy changed and leaves it.
        let mut coordinators = Vec::with_capacity(keys.len());
        for key in keys {
            let record = self
                .inner
                .store
                .get(partition, &key.bucket, &key.key)
                .map_err(|error| error.to_string())?;
            let coordinator = record
                .as_deref()
                .and_then(|bytes| decode_local_record(bytes).ok())
                .and_then(|record| record.coordinator)
                .filter(|key_actor| self.inner.key_actors.epoch.trusts(key_actor))
                .map(|key_actor| key_actor.actor);
            coordinators.push(coordinator);
        }
        let held = self.holds_copies(partition, keys, |_| true).await?;
        Ok(held
            .into_iter()
            .zip(coordinators)
            .map(|(held, coordinator)| RetireAnswer { held, coordinator })
            .collect())
    }

    /// Removes the named actors' idle entries from this node's copies that still have the
    /// digest named, and, where `done`, clears the copy's mark; returns how many entries
    /// went.
    async fn retire_own_copies(
        &self,
        partition: PartitionId,
        plan: Vec<(RetireKey, bool)>,
    ) -> Result<u64, String> {
        let mut retired = 0;
        for (key, done) in plan {
            retired += self.retire_copy(partition, key, done).await?;
        }
        self.inner
            .retire
            .retired
            .fetch_add(retired, Ordering::Relaxed);
        metrics::counter!("dynkv_actors_retired_total").increment(retired);
        Ok(retired)
    }

    /// One copy's retirement (see [`Self::retire_own_copies`]).
    async fn retire_copy(
        &self,
        partition: PartitionId,
        key: RetireKey,
        clear_mark: bool,
    ) -> Result<u64, String> {
        let copy = Copy {
            partition,
            bucket: key.bucket,
            key: key.key,
            hint_for: None,
        };
        let epoch = self.inner.key_actors.epoch;
        let result = self
            .update_copy(&copy, move |local| {
                let Some(local) = local else {
                    return Ok((None, 0));
                };
                if record_digest(&encode_record(&local.object)) != key.digest {
                    // Written since the check: a later pass looks again.
                    return Ok((None, 0));
                }
                let own = local
                    .coordinator
                    .filter(|key_actor| epoch.trusts(key_actor))
                    .map(|key_actor| key_actor.actor);
                let retired = retire(&local.object, &key.actors, own);
                let removed = retired.as_ref().map_or(0, |retired| {
                    (local.object.entries().len() - retired.entries().len()) as u64
                });
                if retired.is_none() && !(clear_mark && local.retiring) {
                    return Ok((None, 0));
                }
                let record = LocalRecord {
                    object: retired.unwrap_or(local.object),
                    coordinator: local.coordinator,
                    retiring: local.retiring && !clear_mark,
                };
                Ok((Some(record), removed))
            })
            .await;
        result.map_err(|error| error.without_context("a retirement"))
    }

    /// A retirement's check: each key's [`RetireAnswer`] on this node.
    pub(super) async fn serve_retire_check(
        &self,
        partition: PartitionId,
        keys: Vec<ReapKey>,
    ) -> PeerResponse {
        if let Some(refusal) = super::reap::too_many_reap_keys(&keys) {
            return refusal;
        }
        match self.retire_answers(partition, &keys).await {
            Ok(answers) => PeerResponse::RetireCheck(answers),
            Err(message) => PeerResponse::Failed { message },
        }
    }

    /// A retirement's order: remove the named actors' idle entries from each copy that is
    /// still the one checked (the mark of a copy this node marked itself stays: its own
    /// pass clears it).
    pub(super) async fn serve_retire(
        &self,
        partition: PartitionId,
        keys: Vec<RetireKey>,
    ) -> PeerResponse {
        if keys.len() > MAX_REAP_KEYS {
            return PeerResponse::Failed {
                message: format!("{} keys named; at most {MAX_REAP_KEYS}", keys.len()),
            };
        }
        if let Some(key) = keys
            .iter()
            .find(|key| key.actors.len() > crate::core::object::MAX_CONTEXT_ACTORS)
        {
            return PeerResponse::Failed {
                message: format!(
                    "{} actors named for one key; at most {}",
                    key.actors.len(),
                    crate::core::object::MAX_CONTEXT_ACTORS
                ),
            };
        }
        let plan = keys.into_iter().map(|key| (key, false)).collect();
        match self.retire_own_copies(partition, plan).await {
            Ok(retired) => PeerResponse::Retired { retired },
            Err(message) => PeerResponse::Failed { message },
        }
    }
}

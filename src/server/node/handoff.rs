//! Hinted handoff: a fallback hands the hints it keeps back to their returning primaries.

use super::*;
use crate::core::cluster::MemberState;

impl Node {
    /// Hinted handoff, one pass: for every member that is up and for which this node holds
    /// hints, sends them in batches (each batch acknowledged before the next) and deletes each
    /// hint once its primary acknowledged it durably, unless it changed meanwhile. A hint is
    /// never dropped for its age: it holds acknowledged writes (the hint window limits only
    /// the creation of hints, see `Node::write_placement`). Returns the number delivered.
    ///
    /// Around a ring change, a hint goes where its primary's copy went (see
    /// [`Node::hint_destinations`]), so a member that left or was removed does not strand the
    /// hints held for it.
    pub async fn hand_off_hints(&self) -> u64 {
        let state = self
            .inner
            .membership
            .gossip()
            .map(|gossip| gossip.cluster_state());
        let mut primaries = self.inner.membership.ring().members();
        if let Some(state) = &state {
            primaries.extend(state.members().keys().cloned());
        }
        primaries.sort();
        primaries.dedup();
        let mut delivered = 0;
        for primary in primaries.iter().filter(|member| **member != self.inner.id) {
            // A down member's hints wait for it, unless a ring change may send them elsewhere.
            let redirected = state.as_ref().is_some_and(|state| {
                state.pending().is_some()
                    || !matches!(
                        state.state_of(primary),
                        Some(MemberState::Valid | MemberState::Joining)
                    )
            });
            if !self.inner.membership.is_up(primary) && !redirected {
                continue;
            }
            delivered += self.hand_off_to(primary).await;
        }
        delivered
    }

    /// Where a hint kept for `primary` goes: to the primary while it replicates the key
    /// under the current or the pending ring; while a change is pending, also to the pending
    /// ring's new replicas of the key (the primary's handoff to them may be over already);
    /// and when the primary replicates the key under neither ring (it left, or was removed),
    /// to the key's replicas under the ring that will be current.
    pub(super) async fn hint_destinations(
        &self,
        primary: &NodeId,
        partition: PartitionId,
        bucket: &[u8],
    ) -> Vec<NodeId> {
        let ring = self.inner.membership.ring();
        let pending = self.inner.membership.pending_ring();
        let n_val = match self.bucket_props(bucket).await {
            Ok(props) => props.n_val as usize,
            Err(_) => self.inner.settings.bucket_defaults.n_val as usize,
        };
        let replicas = |ring: &Ring| -> Vec<NodeId> {
            ring.preference_list(partition, n_val)
                .into_iter()
                .map(|(_, node)| node)
                .collect()
        };
        let current = replicas(&ring);
        let next = pending.as_deref().map(replicas);
        let mut destinations = Vec::new();
        if current.contains(primary) || next.as_ref().is_some_and(|next| next.contains(primary)) {
            destinations.push(primary.clone());
            if let Some(next) = &next {
                destinations.extend(
                    next.iter()
                        .filter(|node| !current.contains(node) && *node != primary)
                        .cloned(),
                );
            }
        } else {
            destinations.extend(next.unwrap_or(current));
        }
        destinations
    }

    pub(super) async fn hand_off_to(&self, primary: &NodeId) -> u64 {
        let prefix = hints::primary_prefix(primary);
        let batch = self.inner.settings.handoff_batch.max(1);
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
                let destinations = self
                    .hint_destinations(primary, key.partition, &key.bucket)
                    .await;
                let membership = &self.inner.membership;
                if destinations.is_empty()
                    || destinations.iter().any(|destination| {
                        destination != &self.inner.id && !membership.is_up(destination)
                    })
                {
                    // Not every destination can take it now: keep it for a later pass.
                    continue;
                }
                let node = self.clone();
                sends.spawn(async move {
                    // A hint may be older than a tombstone its primaries hold: a reaper
                    // waits for its delivery to be answered (see `inflight`).
                    let _operation = node.inner.in_flight.begin(key.partition);
                    let deadline = Instant::now() + node.inner.settings.request_timeout;
                    let mut delivered = true;
                    for destination in &destinations {
                        let copy = Copy {
                            partition: key.partition,
                            bucket: key.bucket.clone(),
                            key: key.key.clone(),
                            hint_for: None,
                        };
                        let ack = node
                            .replica_put(destination, copy, record.object.clone(), deadline)
                            .await;
                        // A hint goes only once its destinations hold it durably (DESIGN §6),
                        // unless this cluster runs without fsync before acknowledging.
                        delivered &= match ack {
                            Ok(ReplicaAck { durable }) => {
                                durable || !node.inner.settings.durable_writes
                            }
                            Err(_) => false,
                        };
                    }
                    (delivered, hint_key, hint_bytes)
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
    pub(super) async fn delete_hint_if_unchanged(
        &self,
        hint_key: &[u8],
        expected: Vec<u8>,
    ) -> bool {
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
            if let Some(gossip) = self.inner.membership.gossip() {
                let tally = self.inner.store.hint_tally();
                gossip.set_local_hints(tally.by_partition.into_iter().collect());
            }
            if self.moves_no_data() {
                continue;
            }
            let delivered = self.hand_off_hints().await;
            if delivered > 0 {
                info!(node = %self.inner.id, delivered, "hints handed off");
            }
        }
    }
}

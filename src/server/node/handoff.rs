//! Hinted handoff: a fallback hands the hints it keeps back to their returning primaries.

use super::*;

impl Node {
    /// Hinted handoff, one pass: for every member that is up and for which this node holds
    /// hints, sends them in batches (each batch acknowledged before the next) and deletes each
    /// hint once its primary acknowledged it durably, unless it changed meanwhile. A hint is
    /// never dropped for its age: it holds acknowledged writes (the hint window limits only
    /// the creation of hints, see `Node::write_placement`). Returns the number delivered.
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
                    let ack = node
                        .replica_put(&primary, copy, record.object, deadline)
                        .await;
                    // A hint goes only once its primary holds it durably (DESIGN §6), unless
                    // this cluster runs without fsync before acknowledging.
                    let delivered = match ack {
                        Ok(ReplicaAck { durable }) => {
                            durable || !node.inner.settings.durable_writes
                        }
                        Err(_) => false,
                    };
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
            let delivered = self.hand_off_hints().await;
            if delivered > 0 {
                info!(node = %self.inner.id, delivered, "hints handed off");
            }
        }
    }
}

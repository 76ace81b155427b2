//! Operations in flight, per partition: what a tombstone reaper must wait out.
//!
//! A coordinator that read or merged a copy before a delete reached every replica may still
//! carry the deleted version: a put that caught up from a stale replica, a write replicating
//! an object its coordinator held before the tombstone arrived, a read repair, an
//! anti-entropy push, a handoff batch. Delivered after the tombstone was reaped, such an
//! object would bring the deleted version back. A tombstone's grace period bounds this only
//! as long as no operation outlives it; a stalled process or a clock that jumps past the
//! grace breaks that bound. So each node registers every operation that may write copies
//! of a partition from the moment it starts until its last write to any replica is
//! answered, and a reaper, once every primary holds the tombstone, waits until every
//! member's operations on the partition began after that (see `reap`).

use crate::core::ring::PartitionId;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::{Duration, Instant};

/// This node's operations in flight, by partition.
#[derive(Default)]
pub(super) struct InFlight {
    /// partition → (operation number → when it began).
    running: parking_lot::Mutex<HashMap<PartitionId, BTreeMap<u64, Instant>>>,
    next: AtomicU64,
}

/// One registered operation; it ends when the last clone is dropped.
pub(super) struct InFlightGuard {
    registry: Arc<InFlight>,
    partition: PartitionId,
    number: u64,
}

impl InFlight {
    /// Registers an operation on `partition` that begins now.
    pub(super) fn begin(self: &Arc<Self>, partition: PartitionId) -> Arc<InFlightGuard> {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        self.running
            .lock()
            .entry(partition)
            .or_default()
            .insert(number, Instant::now());
        Arc::new(InFlightGuard {
            registry: self.clone(),
            partition,
            number,
        })
    }

    /// Whether no operation is in flight on any partition.
    pub(super) fn is_empty(&self) -> bool {
        self.running.lock().is_empty()
    }

    /// How long ago the oldest operation on `partition` still in flight began.
    pub(super) fn oldest_age(&self, partition: PartitionId) -> Option<Duration> {
        let running = self.running.lock();
        let oldest = running.get(&partition)?.values().min()?;
        Some(oldest.elapsed())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut running = self.registry.running.lock();
        if let Some(operations) = running.get_mut(&self.partition) {
            operations.remove(&self.number);
            if operations.is_empty() {
                running.remove(&self.partition);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_oldest_operation_is_reported_until_its_last_guard_drops() {
        let registry = Arc::new(InFlight::default());
        assert_eq!(registry.oldest_age(3), None);
        let first = registry.begin(3);
        tokio::time::advance(Duration::from_secs(2)).await;
        let second = registry.begin(3);
        let other = registry.begin(4);
        assert_eq!(registry.oldest_age(3), Some(Duration::from_secs(2)));
        let clone = first.clone();
        drop(first);
        assert_eq!(registry.oldest_age(3), Some(Duration::from_secs(2)));
        drop(clone);
        assert_eq!(registry.oldest_age(3), Some(Duration::ZERO));
        drop(second);
        assert_eq!(registry.oldest_age(3), None);
        assert_eq!(registry.oldest_age(4), Some(Duration::ZERO));
        drop(other);
        assert!(registry.running.lock().is_empty());
    }
}

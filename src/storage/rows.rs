//! The row cache: the latest record of recently written keys, in front of fjall.
//!
//! Every get and every read-before-write of the store looks its key up in fjall, which walks
//! the memtables' skiplists and, past them, the tables' indexes: on a node under workload A
//! about 8% of its CPU (ARCHITECTURE, "Profile"). Cassandra keeps a row cache for the same
//! reason. Here it is direct-mapped (one slot per key hash, a newer key takes the slot) and
//! filled only by the store's writer, which makes every change of a partition keyspace: a
//! slot is set after an insert and cleared after a remove, in the same writer job. Readers
//! never fill it, so a reader that read an older record from fjall can never put it back
//! over a newer one. What a slot holds is therefore always the record fjall holds for its
//! key, durable or not yet (the store's get makes no durability promise either).

use parking_lot::Mutex;

/// Rows (stored key and record) larger than this are not cached: the cache's memory stays at
/// most `slots × MAX_CACHED_ROW_BYTES` (plus a few words per slot), and a large record costs
/// more to copy out of the cache than its lookup costs in fjall.
pub(super) const MAX_CACHED_ROW_BYTES: usize = 1024;

struct Row {
    partition: u32,
    stored_key: Box<[u8]>,
    /// A `Vec` so that a newer record of the same key reuses its buffer: its capacity is at
    /// most the largest record this slot held for the key, within `MAX_CACHED_ROW_BYTES`.
    record: Vec<u8>,
}

pub(super) struct RowCache {
    slots: Box<[Mutex<Option<Row>>]>,
}

impl RowCache {
    /// A cache of `slots` rows (rounded up to a power of two); `None` for 0 slots (off).
    pub(super) fn new(slots: usize) -> Option<RowCache> {
        if slots == 0 {
            return None;
        }
        let slots = slots.next_power_of_two();
        Some(RowCache {
            slots: (0..slots).map(|_| Mutex::new(None)).collect(),
        })
    }

    fn slot(&self, partition: u32, stored_key: &[u8]) -> &Mutex<Option<Row>> {
        // FNV-1a: the key is already a hash-placed key, so any cheap mix spreads it.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(partition);
        for byte in stored_key {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let index = (hash as usize) & (self.slots.len() - 1);
        &self.slots[index]
    }

    /// The cached record of `stored_key` in `partition`, if its slot holds it.
    pub(super) fn get(&self, partition: u32, stored_key: &[u8]) -> Option<Vec<u8>> {
        let slot = self.slot(partition, stored_key).lock();
        match &*slot {
            Some(row) if row.partition == partition && *row.stored_key == *stored_key => {
                Some(row.record.to_vec())
            }
            _ => None,
        }
    }

    /// Called by the writer after it stored `record` for `stored_key`.
    pub(super) fn stored(&self, partition: u32, stored_key: &[u8], record: &[u8]) {
        let mut slot = self.slot(partition, stored_key).lock();
        if stored_key.len() + record.len() > MAX_CACHED_ROW_BYTES {
            // An older, smaller record of this key must not stay behind.
            if slot
                .as_ref()
                .is_some_and(|row| row.partition == partition && *row.stored_key == *stored_key)
            {
                *slot = None;
            }
            return;
        }
        match &mut *slot {
            // The usual case under updates: the slot holds this key already, so its buffers
            // are reused (no allocation, no free).
            Some(row) if row.partition == partition && *row.stored_key == *stored_key => {
                row.record.clear();
                // Exact, so that the capacity never passes the largest record (a plain
                // extend may double it).
                row.record.reserve_exact(record.len());
                row.record.extend_from_slice(record);
            }
            other => {
                *other = Some(Row {
                    partition,
                    stored_key: stored_key.into(),
                    record: record.to_vec(),
                });
            }
        }
    }

    /// Called by the writer after it removed `stored_key`.
    pub(super) fn removed(&self, partition: u32, stored_key: &[u8]) {
        let mut slot = self.slot(partition, stored_key).lock();
        if slot
            .as_ref()
            .is_some_and(|row| row.partition == partition && *row.stored_key == *stored_key)
        {
            *slot = None;
        }
    }

    /// Forgets every row of `partition` (its keyspace was dropped).
    pub(super) fn forget_partition(&self, partition: u32) {
        for slot in self.slots.iter() {
            let mut slot = slot.lock();
            if slot.as_ref().is_some_and(|row| row.partition == partition) {
                *slot = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_holds_the_last_record_stored_and_forgets_a_removed_or_large_one() {
        let cache = RowCache::new(4).unwrap();
        assert_eq!(cache.get(1, b"k"), None);
        cache.stored(1, b"k", b"v1");
        cache.stored(1, b"k", b"v2");
        assert_eq!(cache.get(1, b"k").as_deref(), Some(&b"v2"[..]));
        assert_eq!(cache.get(2, b"k"), None, "another partition's key");
        cache.removed(1, b"k");
        assert_eq!(cache.get(1, b"k"), None);
        cache.stored(1, b"k", b"v3");
        cache.stored(1, b"k", &vec![7; MAX_CACHED_ROW_BYTES]);
        assert_eq!(cache.get(1, b"k"), None, "a large record replaces nothing");
        cache.stored(1, b"a", b"x");
        cache.forget_partition(1);
        assert_eq!(cache.get(1, b"a"), None);
        assert!(RowCache::new(0).is_none());
    }

    #[test]
    fn keys_sharing_a_slot_never_answer_for_each_other() {
        let cache = RowCache::new(1).unwrap();
        cache.stored(1, b"a", b"va");
        cache.stored(1, b"b", b"vb");
        assert_eq!(cache.get(1, b"a"), None);
        assert_eq!(cache.get(1, b"b").as_deref(), Some(&b"vb"[..]));
        cache.removed(1, b"a");
        assert_eq!(cache.get(1, b"b").as_deref(), Some(&b"vb"[..]));
    }
}

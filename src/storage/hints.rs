//! The hint store: one keyspace, `hints`, where a fallback keeps the objects it received for
//! a down primary until the primary has acknowledged them. Values are opaque here (their
//! format is `core::hints`; keys are read only for their partition); what this adds is
//! atomic update-or-delete, so a hint is removed only if it did not change while it was being
//! delivered, and an exact tally of what is held, bounded by `hints_max_bytes`.

use super::{StorageError, Store, UpdateError};
use crate::core::hints::decode_key;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::Ordering;

pub(super) const HINTS_KEYSPACE: &str = "hints";

/// One stored hint: its key and its value.
pub type HintEntry = (Vec<u8>, Vec<u8>);

/// What the hints keyspace holds: counted once at open, then kept exact by the writer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HintTally {
    /// Hints held.
    pub count: u64,
    /// Bytes of their keys and values.
    pub bytes: u64,
    /// Hints held per partition (partitions holding none are absent).
    pub by_partition: BTreeMap<u32, u64>,
}

impl HintTally {
    fn add(&mut self, key: &[u8], value_bytes: usize) {
        self.count += 1;
        self.bytes += (key.len() + value_bytes) as u64;
        if let Ok(hint) = decode_key(key) {
            *self.by_partition.entry(hint.partition).or_default() += 1;
        }
    }

    fn remove(&mut self, key: &[u8], value_bytes: usize) {
        self.count = self.count.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub((key.len() + value_bytes) as u64);
        if let Ok(hint) = decode_key(key)
            && let Some(held) = self.by_partition.get_mut(&hint.partition)
        {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.by_partition.remove(&hint.partition);
            }
        }
    }
}

/// What a hint update does to the stored hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HintWrite {
    /// Leave it as it is.
    Keep,
    /// Store these bytes.
    Put(Vec<u8>),
    /// Remove it.
    Delete,
}

impl Store {
    /// The stored hint under `hint_key`.
    pub fn hint_get(&self, hint_key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner
            .hints
            .get(hint_key)
            .map_err(|source| StorageError::Hints {
                operation: "read",
                source,
            })
    }

    /// Atomic read-modify-write (or delete) of one hint; durable when it returns, like
    /// [`Store::update`] (and run by the same writer). A write that would grow the hints
    /// past `hints_max_bytes` fails with [`StorageError::HintsFull`] and changes nothing.
    pub async fn hint_update<T, E>(
        &self,
        hint_key: &[u8],
        update: impl FnOnce(Option<&[u8]>) -> Result<(HintWrite, T), E> + Send + 'static,
    ) -> Result<T, UpdateError<E>>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        let hints = self.inner.hints.clone();
        let counters = self.inner.counters.clone();
        let hints_held = self.inner.hints_held.clone();
        let limit = self.inner.hints_max_bytes;
        let hint_key = hint_key.to_vec();
        self.inner
            .submit(move |answer| {
                let failed = |operation, source| {
                    UpdateError::from(StorageError::Hints { operation, source })
                };
                let current = match hints.get(&hint_key) {
                    Ok(current) => current,
                    Err(source) => return answer.now(Err(failed("read", source))),
                };
                let (write, output) = match update(current.as_deref()) {
                    Ok(result) => result,
                    Err(source) => return answer.now(Err(UpdateError::Rejected { source })),
                };
                let old_size = current.as_ref().map(|value| value.len());
                let (written, new_size) = match write {
                    HintWrite::Keep => return answer.when_durable(false, output),
                    HintWrite::Put(bytes) => {
                        let grows = (bytes.len() + hint_key.len()) as u64;
                        let shrinks = old_size.map_or(0, |size| (size + hint_key.len()) as u64);
                        let held = hints_held.lock().bytes;
                        if grows > shrinks && held.saturating_sub(shrinks) + grows > limit {
                            let full = StorageError::HintsFull {
                                held,
                                needed: grows - shrinks,
                                limit,
                            };
                            return answer.now(Err(UpdateError::from(full)));
                        }
                        let size = bytes.len();
                        (hints.insert(&hint_key, bytes), Some(size))
                    }
                    HintWrite::Delete => (hints.remove(hint_key.clone()), None),
                };
                if let Err(source) = written {
                    return answer.now(Err(failed("write", source)));
                }
                // The writer runs hint updates one at a time, so the tally stays exact.
                {
                    let mut tally = hints_held.lock();
                    if let Some(size) = old_size {
                        tally.remove(&hint_key, size);
                    }
                    if let Some(size) = new_size {
                        tally.add(&hint_key, size);
                    }
                }
                counters.writes.fetch_add(1, Ordering::Relaxed);
                answer.when_durable(true, output)
            })
            .await
    }

    /// Up to `limit` hints `(key, value)` whose key starts with `prefix`, after `start_after`
    /// (exclusive), in key order.
    pub fn scan_hints(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<HintEntry>, StorageError> {
        let start = match start_after {
            Some(after) => Bound::Excluded(after.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        self.inner
            .hints
            .range(start, limit, |key| key.starts_with(prefix))
            .map_err(|source| StorageError::Hints {
                operation: "scan",
                source,
            })
    }

    /// The number of hints held: counted once at open, then kept by the writer, so status
    /// and `/stats` can ask it on every request.
    pub fn hint_count(&self) -> Result<u64, StorageError> {
        Ok(self.inner.hints_held.lock().count)
    }

    /// What the hints keyspace holds: count, bytes and hints per partition.
    pub fn hint_tally(&self) -> HintTally {
        self.inner.hints_held.lock().clone()
    }
}

/// Tallies the hints in the keyspace (a scan in pages; once, at open).
pub(super) fn tally_hints(hints: &super::engine::Space) -> Result<HintTally, StorageError> {
    const PAGE: usize = 1024;
    let mut tally = HintTally::default();
    let mut start = Bound::Unbounded;
    loop {
        let page = hints
            .range(start, PAGE, |_| true)
            .map_err(|source| StorageError::Hints {
                operation: "count",
                source,
            })?;
        for (key, value) in &page {
            tally.add(key, value.len());
        }
        match page.last() {
            Some((last, _)) if page.len() == PAGE => start = Bound::Excluded(last.clone()),
            _ => return Ok(tally),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageConfig;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hints_update_scan_delete_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StorageConfig::default()).unwrap();
        for (key, value) in [
            (&b"\x01a1"[..], &b"x"[..]),
            (b"\x01a2", b"y"),
            (b"\x01b1", b"z"),
        ] {
            store
                .hint_update(key, |_| Ok::<_, ()>((HintWrite::Put(value.to_vec()), ())))
                .await
                .unwrap();
        }
        let a_hints = store.scan_hints(b"\x01a", None, 10).unwrap();
        assert_eq!(a_hints.len(), 2);
        let page = store.scan_hints(b"\x01a", Some(b"\x01a1"), 10).unwrap();
        assert_eq!(page, vec![(b"\x01a2".to_vec(), b"y".to_vec())]);
        assert_eq!(store.hint_count().unwrap(), 3);
        // Replacing a hint does not add one.
        store
            .hint_update(b"\x01b1", |_| {
                Ok::<_, ()>((HintWrite::Put(b"z2".to_vec()), ()))
            })
            .await
            .unwrap();
        assert_eq!(store.hint_count().unwrap(), 3);
        // Compare-and-delete: a changed hint is kept.
        let deleted = store
            .hint_update(b"\x01a1", |current| {
                Ok::<_, ()>(if current == Some(&b"stale"[..]) {
                    (HintWrite::Delete, true)
                } else {
                    (HintWrite::Keep, false)
                })
            })
            .await
            .unwrap();
        assert!(!deleted);
        store
            .hint_update(b"\x01a1", |_| Ok::<_, ()>((HintWrite::Delete, ())))
            .await
            .unwrap();
        assert_eq!(store.hint_get(b"\x01a1").unwrap(), None);
        assert_eq!(store.hint_count().unwrap(), 2);
        // Deleting a hint that is not there changes nothing.
        store
            .hint_update(b"\x01a1", |_| Ok::<_, ()>((HintWrite::Delete, ())))
            .await
            .unwrap();
        assert_eq!(store.hint_count().unwrap(), 2);
        store.close().await.unwrap();
        let store = Store::open(dir.path(), StorageConfig::default()).unwrap();
        assert_eq!(store.hint_count().unwrap(), 2, "hints are durable");
        assert_eq!(
            store.scan_partition(0, None, 10).unwrap(),
            Vec::new(),
            "hints are not partition data"
        );
    }
}

//! The hint store: one keyspace, `hints`, where a fallback keeps the objects it received for
//! a down primary until the primary has acknowledged them. Keys and values are opaque here
//! (their format is `core::hints`); what this adds is atomic update-or-delete, so a hint is
//! removed only if it did not change while it was being delivered.

use super::{StorageError, Store, UpdateError};
use std::ops::Bound;
use std::sync::atomic::Ordering;

pub(super) const HINTS_KEYSPACE: &str = "hints";

/// One stored hint: its key and its value.
pub type HintEntry = (Vec<u8>, Vec<u8>);

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
    /// [`Store::update`] (and run by the same writer).
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
                let existed = current.is_some();
                // The change in the number of hints held, if the write succeeds.
                let (written, change) = match write {
                    HintWrite::Keep => return answer.when_durable(false, output),
                    HintWrite::Put(bytes) => (hints.insert(hint_key, bytes), i64::from(!existed)),
                    HintWrite::Delete => (hints.remove(hint_key), -i64::from(existed)),
                };
                if let Err(source) = written {
                    return answer.now(Err(failed("write", source)));
                }
                // The writer runs hint updates one at a time, so the count stays exact.
                match change {
                    1 => hints_held.fetch_add(1, Ordering::Relaxed),
                    -1 => hints_held.fetch_sub(1, Ordering::Relaxed),
                    _ => 0,
                };
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
        Ok(self.inner.hints_held.load(Ordering::Relaxed))
    }
}

/// Counts the hints in the keyspace (a scan of the keys; once, at open).
pub(super) fn count_hints(hints: &super::engine::Space) -> Result<u64, StorageError> {
    hints.count().map_err(|source| StorageError::Hints {
        operation: "count",
        source,
    })
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

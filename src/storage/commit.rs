//! Group commit: one task turns many journal appends into one fsync.
//!
//! Writers append to fjall's journal, then bump `written` (a sequence number) and wait on
//! `durable`. The committer waits until `written > durable`, takes `target = written`, runs
//! `persist(SyncData)` and publishes `durable = target`. A writer's bump happens after its
//! append returned, so every write numbered up to `target` is in the journal file before the
//! fsync starts, and one fsync acknowledges all of them.
//!
//! The fsync runs in `spawn_blocking`: it keeps the runtime's worker threads free, and under
//! tokio's paused clock (simulation tests) an in-flight blocking task stops the clock from
//! jumping ahead while the disk is busy, which a plain thread would not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use fjall::{Database, PersistMode};
use tokio::sync::{oneshot, watch};

use super::{PersistError, StorageError};

/// How often the journal is fsynced when writes are acknowledged before their fsync.
pub(super) const PERIODIC_PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// What the committer has made durable, as seen by waiting writers.
#[derive(Clone, Debug, Default)]
pub(super) struct DurableState {
    /// Every write numbered up to this one has been fsynced.
    pub(super) durable_seq: u64,
    /// Set when an fsync failed. fjall poisons the database after a failed fsync, so no later
    /// write can become durable either: the failure is sticky.
    pub(super) failure: Option<Arc<PersistError>>,
}

/// Counters behind [`super::StorageStats`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) writes: AtomicU64,
    pub(super) fsyncs: AtomicU64,
}

/// Everything the committer task owns. It holds no strong reference to the store or the
/// database: dropping the last store handle releases the database (and its directory lock) at
/// once, so a crashed node can be reopened straight away, and ends the task.
pub(super) struct Committer {
    pub(super) database: Weak<Database>,
    pub(super) written: watch::Receiver<u64>,
    pub(super) durable: watch::Sender<DurableState>,
    pub(super) counters: Arc<Counters>,
    pub(super) shutdown: oneshot::Receiver<()>,
    pub(super) sync_writes: bool,
}

impl Committer {
    /// Runs until the store is dropped or closed. Whoever closes the store makes the last
    /// writes durable; a store that is just dropped behaves like a crash.
    pub(super) async fn run(mut self) -> Result<(), StorageError> {
        let mut durable_seq = 0;
        loop {
            let target = if self.sync_writes {
                tokio::select! {
                    written = self.written.wait_for(|written| *written > durable_seq) => match written {
                        Ok(written) => *written,
                        Err(_) => break,
                    },
                    _ = &mut self.shutdown => break,
                }
            } else {
                tokio::select! {
                    () = tokio::time::sleep(PERIODIC_PERSIST_INTERVAL) => *self.written.borrow(),
                    _ = &mut self.shutdown => break,
                }
            };
            if target <= durable_seq {
                continue;
            }
            let Some(database) = self.database.upgrade() else {
                break;
            };
            self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
            match persist(database, PersistMode::SyncData).await {
                Ok(()) => {
                    durable_seq = target;
                    tracing::trace!(durable_seq, "journal fsynced");
                    self.durable
                        .send_modify(|state| state.durable_seq = durable_seq);
                }
                Err(failure) => {
                    let failure = Arc::new(failure);
                    tracing::error!(error = %failure, target, durable_seq, "journal fsync failed");
                    self.durable
                        .send_modify(|state| state.failure = Some(failure.clone()));
                    return Err(StorageError::Persist { source: failure });
                }
            }
        }
        Ok(())
    }
}

/// Runs fjall's `persist` on the blocking pool (see the module doc for why not a thread).
pub(super) async fn persist(
    database: Arc<Database>,
    mode: PersistMode,
) -> Result<(), PersistError> {
    match tokio::task::spawn_blocking(move || database.persist(mode)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(PersistError::Engine { source }),
        Err(source) => Err(PersistError::TaskFailed { source }),
    }
}

//! Group commit through one writer: every read-modify-write of the store is a [`Job`] queued
//! to the writer task, which takes all queued jobs as one batch, runs them in order on the
//! blocking pool (read, transform, append to fjall's journal), fsyncs the journal once, and
//! only then lets each job's caller go on.
//!
//! Why one writer and not many writers sharing an fsync: fjall holds its journal lock for the
//! whole fsync, so a journal append on a runtime worker thread stalls that thread until the
//! disk answers. Here no append ever waits on a runtime thread, the jobs queued while the disk
//! is busy form the next batch (the busier the disk, the larger the batch), and the jobs of a
//! batch need no per-key lock: the writer runs them one after another.
//!
//! A job that writes nothing still finishes after its batch's fsync: what it read may have
//! been written earlier in the same batch. Earlier batches are already durable.
//!
//! Each batch runs in `spawn_blocking`: it keeps the runtime's worker threads free, and under
//! tokio's paused clock (simulation tests) an in-flight blocking task stops the clock from
//! jumping ahead while the disk is busy, which a plain thread would not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use fjall::PersistMode;

use super::engine::Engine;
use tokio::sync::{mpsc, oneshot};

use super::{PersistError, StorageError};

/// How often the journal is fsynced when writes are acknowledged before their fsync.
pub(super) const PERIODIC_PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// Most jobs in one batch; the rest wait for the next. Bounds the time one batch holds its
/// callers and the memory of the finish list.
const MAX_BATCH_JOBS: usize = 1024;

/// What a job's caller is told once the job's batch is durable (or could not be made so).
pub(super) type Finish = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

/// One read-modify-write, run on the writer's blocking thread.
pub(super) struct Job {
    run: Box<dyn FnOnce() -> JobDone + Send>,
}

/// What a job did: whether it appended to the journal, and whom to tell when it is durable
/// (`None`: the job already told its caller, e.g. of a read error).
pub(super) struct JobDone {
    pub(super) wrote: bool,
    pub(super) finish: Option<Finish>,
}

impl Job {
    pub(super) fn new(run: impl FnOnce() -> JobDone + Send + 'static) -> Job {
        Job { run: Box::new(run) }
    }
}

impl JobDone {
    /// The job has told its caller already and wrote nothing.
    pub(super) fn answered() -> JobDone {
        JobDone {
            wrote: false,
            finish: None,
        }
    }
}

/// Counters behind [`super::StorageStats`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) writes: AtomicU64,
    pub(super) fsyncs: AtomicU64,
}

/// Everything the writer task owns. It holds no strong reference to the database between
/// batches: dropping the last store handle releases the database (and its directory lock) at
/// once, so a crashed node can be reopened straight away, and ends the task.
pub(super) struct Writer {
    pub(super) database: Weak<Engine>,
    pub(super) jobs: mpsc::UnboundedReceiver<Job>,
    pub(super) counters: Arc<Counters>,
    pub(super) shutdown: oneshot::Receiver<()>,
    pub(super) sync_writes: bool,
    /// Set once, when the store can no longer make writes durable (see [`super::Store::failed`]).
    pub(super) failure: tokio::sync::watch::Sender<Option<String>>,
}

impl Writer {
    /// Runs until the store is dropped or closed. Whoever closes the store makes the last
    /// writes durable; a store that is just dropped behaves like a crash: queued jobs are
    /// dropped unrun, and their callers see [`StorageError::CommitterStopped`].
    pub(super) async fn run(mut self) -> Result<(), StorageError> {
        // After a failed fsync fjall refuses further writes; every later job is failed too.
        let mut failure: Option<Arc<PersistError>> = None;
        // Writes appended but not fsynced (only without `sync_writes`).
        let mut unsynced = false;
        let mut periodic = tokio::time::interval(PERIODIC_PERSIST_INTERVAL);
        periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                biased;
                _ = &mut self.shutdown => break,
                job = self.jobs.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                _ = periodic.tick(), if !self.sync_writes => {
                    if unsynced {
                        unsynced = false;
                        let Some(database) = self.database.upgrade() else { break };
                        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                        if let Err(error) = persist(database, PersistMode::SyncData).await {
                            let error = Arc::new(error);
                            tracing::error!(error = %error, "periodic journal fsync failed");
                            self.failure.send_replace(Some(format!("journal fsync failed: {error}")));
                            return Err(StorageError::Persist { source: error });
                        }
                    }
                    continue;
                }
            };
            let mut batch = Vec::with_capacity(16);
            batch.push(first);
            while batch.len() < MAX_BATCH_JOBS {
                match self.jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let Some(database) = self.database.upgrade() else {
                break;
            };
            let sync_writes = self.sync_writes;
            let counters = self.counters.clone();
            let earlier_failure = failure.clone();
            let ran = tokio::task::spawn_blocking(move || {
                run_batch(&database, batch, sync_writes, earlier_failure, &counters)
            })
            .await;
            match ran {
                Ok(BatchOutcome { wrote, failed }) => {
                    unsynced |= wrote && !self.sync_writes;
                    if let Some(error) = failed {
                        if failure.is_none() {
                            tracing::error!(error = %error, "journal fsync failed");
                            self.failure
                                .send_replace(Some(format!("journal fsync failed: {error}")));
                        }
                        failure = Some(error);
                    }
                }
                Err(join_error) => {
                    // The batch's callers were told nothing: their senders were dropped with
                    // the panicking task, so they see `CommitterStopped`.
                    let error = Arc::new(PersistError::TaskFailed { source: join_error });
                    tracing::error!(error = %error, "storage writer batch failed");
                    self.failure
                        .send_replace(Some(format!("a storage batch failed: {error}")));
                    return Err(StorageError::Persist { source: error });
                }
            }
        }
        Ok(())
    }
}

struct BatchOutcome {
    wrote: bool,
    failed: Option<Arc<PersistError>>,
}

/// Runs a batch's jobs in order, fsyncs once if any wrote (with `sync_writes`), then tells
/// every caller.
fn run_batch(
    database: &Engine,
    batch: Vec<Job>,
    sync_writes: bool,
    earlier_failure: Option<Arc<PersistError>>,
    counters: &Counters,
) -> BatchOutcome {
    if let Some(failure) = earlier_failure {
        // Run nothing: the journal may hold a torn append, and fjall refuses writes anyway.
        drop(batch);
        return BatchOutcome {
            wrote: false,
            failed: Some(failure),
        };
    }
    let mut finishes = Vec::with_capacity(batch.len());
    let mut wrote = false;
    for job in batch {
        let done = (job.run)();
        wrote |= done.wrote;
        finishes.extend(done.finish);
    }
    // The batch's appends are still in the journal's buffer (keyspaces are opened with
    // manual journal persist): one write hands them to the OS, plus an fsync when writes are
    // acknowledged only once durable.
    let persisted = if wrote {
        let mode = if sync_writes {
            counters.fsyncs.fetch_add(1, Ordering::Relaxed);
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        database
            .persist(mode)
            .map_err(|source| Arc::new(PersistError::Engine { source }))
    } else {
        Ok(())
    };
    for finish in finishes {
        finish(
            persisted
                .clone()
                .map_err(|source| StorageError::Persist { source }),
        );
    }
    BatchOutcome {
        wrote,
        failed: persisted.err(),
    }
}

/// Runs fjall's `persist` on the blocking pool (see the module doc for why not a thread).
pub(super) async fn persist(database: Arc<Engine>, mode: PersistMode) -> Result<(), PersistError> {
    match tokio::task::spawn_blocking(move || database.persist(mode)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(PersistError::Engine { source }),
        Err(source) => Err(PersistError::TaskFailed { source }),
    }
}

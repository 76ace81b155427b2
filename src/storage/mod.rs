//! The node's durable store, on fjall.
//!
//! The store deals in bytes: it never looks inside a value (the record format, with its own
//! version header, belongs to the caller). What it guarantees is that an acknowledged write
//! survives a crash, and that read-modify-write of one key is atomic.
//!
//! # Layout
//!
//! ```text
//! <data dir>/
//!   node.meta        actor id drawn when the directory was created, format version, checksum
//!   node.meta.tmp    only during creation (written, fsynced, then renamed over node.meta)
//!   fjall/           the fjall database, one keyspace per ring partition: p0000, p0042, ...
//! ```
//!
//! One keyspace per partition (created on the partition's first write) lets handoff stream a
//! partition in key order and drop it in one step once the new owner has it. A wiped
//! directory has no `node.meta`, so the node comes back as a new actor: a version-vector
//! counter is never reissued under an old actor (Riak's KV679 bug).
//!
//! # Key encoding
//!
//! Inside a partition's keyspace a record is stored under `u16` big-endian bucket length,
//! bucket, key (see `key.rs`). Buckets are limited to [`MAX_BUCKET_BYTES`] and keys to
//! [`MAX_KEY_BYTES`], so the stored key fits fjall's 65535-byte limit. Scans return records
//! in stored-key order: by bucket length, then bucket, then key.
//!
//! # Durability: group commit
//!
//! With [`StorageConfig::sync_writes`] (the default) a write is acknowledged only after the
//! journal holding it is fsynced. Fsyncs are shared: every read-modify-write is queued to one
//! writer task, which runs all queued ones as a batch (fjall hands each append to the OS, so
//! it survives a crash of the process) and fsyncs once per batch; see `commit.rs`. A failed
//! fsync fails every write of its batch, and every later one, since fjall refuses writes
//! after it.
//!
//! Without `sync_writes` a write is acknowledged once it is in the OS page cache (it survives
//! a process crash, not a power loss) and the journal is fsynced every second.
//!
//! Dropping the last handle without [`Store::close`] behaves like a crash: nothing more is
//! fsynced, and the directory lock is released at once so the node can be reopened.
//!
//! Reads do not wait for durability: [`Store::get`] can return a value whose write is still
//! waiting for its fsync. [`Store::update`] returns only once the value it read is durable.
//! Updates need no per-key lock: the writer runs them one after another.

mod aae;
mod commit;
mod engine;
mod hints;
mod key;
mod meta;
mod rows;
mod space;
pub use meta::write_file_durably;
pub use space::{SpaceGuard, available_bytes};

pub use aae::{AaeTrees, TreeStatus};
pub use engine::{DiskSnapshot, EngineError, MemoryDisk};
pub use hints::{HintEntry, HintTally, HintWrite};

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use engine::{Engine, Space};
use fjall::{Database, PersistMode};
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::core::epoch::NodeEpoch;
use crate::core::ids::Actor;
use commit::{Counters, Job, JobDone, Writer};

pub use key::{MAX_BUCKET_BYTES, MAX_KEY_BYTES};

/// Name of the fjall database directory inside the data directory.
const DATABASE_DIR: &str = "fjall";

/// One record returned by [`Store::scan_partition`]: `(bucket, key, value)`.
pub type ScannedRecord = (Vec<u8>, Vec<u8>, Vec<u8>);

/// A key held as a tombstone only, found by [`Store::tombstones`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tombstone {
    pub bucket: Vec<u8>,
    pub key: Vec<u8>,
    /// Its record digest ([`crate::core::tictac::record_digest`]).
    pub digest: u64,
    /// The newest tombstone's wall-clock time, in microseconds.
    pub since_micros: u64,
}

/// A record that asks for an actor retirement pass, found by [`Store::retiring`].
#[derive(Clone, Debug)]
pub struct RetiringRecord {
    pub bucket: Vec<u8>,
    pub key: Vec<u8>,
    /// Its record digest ([`crate::core::tictac::record_digest`]).
    pub digest: u64,
    pub record: crate::core::object::LocalRecord,
}

/// How the store trades durability for latency, and how much memory it may cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageConfig {
    /// Fsync the journal before acknowledging a write (group commit). Default `true`. With
    /// `false`, writes are acknowledged once handed to the OS and fsynced every second.
    pub sync_writes: bool,
    /// Size of fjall's block cache in bytes. Default 64 MiB.
    pub cache_bytes: u64,
    /// Most bytes (keys and values) the hints keyspace may hold; a hint write that would
    /// grow it past this is refused ([`StorageError::HintsFull`]). Default 1 GiB.
    pub hints_max_bytes: u64,
    /// Most bytes one keyspace (partition) keeps in its memtable before flushing it to disk.
    /// Every keyspace has one, and one more while it is flushed, so the memtables of a node
    /// take up to twice this times its keyspaces: fjall's journal bound does not flush them
    /// soon enough to bound memory (seen in `tests/flood.rs`). Default 64 MiB.
    pub memtable_bytes: u64,
    /// Keep a tictac tree per partition for active anti-entropy (see `aae.rs`), changed by
    /// every write. Default `true`; off, no tree exists and exchanges have nothing to ask.
    pub aae_trees: bool,
    /// Slots of the row cache: the latest record of recently written keys, in front of fjall
    /// (see `rows.rs`); each holds a key and record of at most 1 KiB together. 0 turns it
    /// off. Default 16384 (16 MiB at most).
    pub row_cache_slots: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            sync_writes: true,
            cache_bytes: 64 * 1024 * 1024,
            hints_max_bytes: 1024 * 1024 * 1024,
            memtable_bytes: 64 * 1024 * 1024,
            aae_trees: true,
            row_cache_slots: 16384,
        }
    }
}

/// Counts since the store was opened, for metrics and for tests that show fsync batching.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageStats {
    /// Records written by [`Store::update`].
    pub writes: u64,
    /// Journal fsyncs started by the writer (each covers a batch of writes).
    pub fsyncs: u64,
}

/// Why a metadata file could not be read; see [`StorageError::CorruptMeta`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaProblem {
    #[error("the file is larger than a metadata file can be")]
    TooLarge,
    #[error("the file is not UTF-8 text")]
    NotText,
    #[error("the file is truncated")]
    Truncated,
    #[error("the first line is not the dynkv storage metadata header")]
    WrongHeader,
    #[error("the line for {field} is missing")]
    MissingField { field: &'static str },
    #[error("the value of {field} is malformed")]
    InvalidField { field: &'static str },
    #[error("the checksum does not match the contents")]
    ChecksumMismatch,
    #[error("the file has an unexpected extra line")]
    UnexpectedLine,
}

/// Why a journal fsync failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("the engine could not persist the journal")]
    Engine {
        #[source]
        source: EngineError,
    },
    #[error("the fsync task panicked or was cancelled")]
    TaskFailed {
        #[source]
        source: tokio::task::JoinError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("the store must be opened inside a tokio runtime (it spawns its writer task)")]
    NoRuntime,
    #[error("cannot create data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read metadata file {path}")]
    ReadMeta {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write metadata file {path}")]
    WriteMeta {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata file {path} is corrupt: {problem}")]
    CorruptMeta { path: PathBuf, problem: MetaProblem },
    #[error(
        "metadata file {path} has format version {found}; this build reads version {supported}"
    )]
    UnsupportedMetaVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("the OS random number generator failed while drawing an actor id")]
    Entropy {
        #[source]
        source: rand::rand_core::OsError,
    },
    #[error("cannot list the keyspaces of the database")]
    ListKeyspaces {
        #[source]
        source: EngineError,
    },
    #[error("cannot open the database in {path}")]
    OpenDatabase {
        path: PathBuf,
        #[source]
        source: fjall::Error,
    },
    #[error("cannot open or create the keyspace of partition {partition}")]
    OpenPartition {
        partition: u32,
        #[source]
        source: EngineError,
    },
    #[error("cannot drop the keyspace of partition {partition}")]
    DropPartition {
        partition: u32,
        #[source]
        source: EngineError,
    },
    #[error(
        "hint storage is full: {held} bytes of hints are held and this hint needs {needed} more; the limit is {limit} bytes (hints.max_bytes)"
    )]
    HintsFull { held: u64, needed: u64, limit: u64 },
    #[error("bucket is {length} bytes long; at most {MAX_BUCKET_BYTES} are allowed")]
    BucketTooLong { length: usize },
    #[error("key is {length} bytes long; at most {MAX_KEY_BYTES} are allowed")]
    KeyTooLong { length: usize },
    #[error("read from partition {partition} failed")]
    Read {
        partition: u32,
        #[source]
        source: EngineError,
    },
    #[error("write to partition {partition} failed")]
    Write {
        partition: u32,
        #[source]
        source: EngineError,
    },
    #[error(
        "partition {partition} holds a stored key of {length} bytes that is not a valid encoding"
    )]
    CorruptStoredKey { partition: u32, length: usize },
    #[error("the journal could not be made durable; the write is not acknowledged")]
    Persist {
        #[source]
        source: Arc<PersistError>,
    },
    #[error("hint store {operation} failed")]
    Hints {
        operation: &'static str,
        #[source]
        source: EngineError,
    },
    #[error("the storage writer stopped before the write was durable")]
    CommitterStopped,
    #[error("the store was flushed but {other_handles} other handles still hold it open")]
    StillShared { other_handles: usize },
}

/// The outcome of a failed [`Store::update`]: the caller's closure refused, or the store failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError<E> {
    /// The closure returned an error; nothing was written.
    #[error(transparent)]
    Rejected { source: E },
    #[error(transparent)]
    Storage {
        #[from]
        source: StorageError,
    },
}

/// The node's store. Cheap to clone: every clone shares one database and one writer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    actor: Actor,
    /// This start's incarnation (see `core::epoch`), and where to record a clean stop.
    epoch: NodeEpoch,
    meta: meta::MetaLocation,
    /// The only strong handle besides in-flight batches (see [`Writer`]).
    database: Arc<Engine>,
    /// Every partition keyspace that exists, loaded at open and extended on first write, so a
    /// read of a missing partition needs no lock on fjall's keyspace table.
    partitions: RwLock<HashMap<u32, Space>>,
    /// Hinted handoff: objects kept for down primaries (see `hints.rs`).
    hints: Space,
    /// What `hints` holds, kept exact by the writer (see [`Store::hint_tally`]).
    hints_held: Arc<parking_lot::Mutex<hints::HintTally>>,
    hints_max_bytes: u64,
    /// Read-modify-writes for the writer task. Unbounded on purpose: every queued job has a
    /// caller awaiting it, so the queue holds at most one job per request in flight (bounded
    /// per connection by `RpcLimits::max_in_flight_per_connection`).
    jobs: mpsc::UnboundedSender<Job>,
    counters: Arc<Counters>,
    /// Why the store can no longer make writes durable, once that happens.
    failure: tokio::sync::watch::Receiver<Option<String>>,
    /// Anti-entropy trees, changed by the writer with every write (`None`: kept off).
    trees: Option<AaeTrees>,
    /// The latest record of recently written keys, kept by the writer (`None`: off).
    rows: Option<Arc<rows::RowCache>>,
    writer: JoinHandle<Result<(), StorageError>>,
    /// Dropped (with the last handle, or by `close`) to stop the writer.
    shutdown: oneshot::Sender<()>,
}

impl Store {
    /// Opens the data directory `dir`, creating it (and the node's actor id) if needed.
    ///
    /// Must be called inside a tokio runtime, which runs the writer task. It does blocking
    /// disk IO (journal recovery), so async callers may want `spawn_blocking`.
    #[tracing::instrument(name = "storage_open", skip_all, fields(dir = %dir.display()))]
    pub fn open(dir: &Path, config: StorageConfig) -> Result<Store, StorageError> {
        tokio::runtime::Handle::try_current().map_err(|_| StorageError::NoRuntime)?;
        std::fs::create_dir_all(dir).map_err(|source| StorageError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let location = meta::MetaLocation::Dir(dir.to_path_buf());
        let epoch = meta::open_epoch(&location)?;
        let database_dir = dir.join(DATABASE_DIR);
        let database = Database::builder(&database_dir)
            .cache_size(config.cache_bytes)
            .open()
            .map_err(|source| StorageError::OpenDatabase {
                path: database_dir,
                source,
            })?;
        let memtable_bytes = config.memtable_bytes;
        Store::open_engine(
            Engine::Fjall(database, memtable_bytes),
            location,
            epoch,
            config,
        )
    }

    /// Opens a store on a simulated disk (see `engine.rs`): for deterministic simulation
    /// only, where [`MemoryDisk::crash`] loses what was not persisted. Every real node runs
    /// on fjall ([`Store::open`]).
    pub fn open_in_memory(
        disk: &Arc<MemoryDisk>,
        config: StorageConfig,
    ) -> Result<Store, StorageError> {
        tokio::runtime::Handle::try_current().map_err(|_| StorageError::NoRuntime)?;
        let handle = disk.attach();
        let location = meta::MetaLocation::Memory(handle.disk().clone());
        let epoch = meta::open_epoch(&location)?;
        Store::open_engine(Engine::Memory(handle), location, epoch, config)
    }

    fn open_engine(
        database: Engine,
        location: meta::MetaLocation,
        epoch: NodeEpoch,
        config: StorageConfig,
    ) -> Result<Store, StorageError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| StorageError::NoRuntime)?;
        let actor = epoch.base;
        let database = Arc::new(database);
        let hints =
            database
                .keyspace(hints::HINTS_KEYSPACE)
                .map_err(|source| StorageError::Hints {
                    operation: "open",
                    source,
                })?;
        let hints_held = hints::tally_hints(&hints)?;
        let mut partitions = HashMap::new();
        let names = database
            .keyspace_names()
            .map_err(|source| StorageError::ListKeyspaces { source })?;
        for name in names {
            if name == hints::HINTS_KEYSPACE {
                continue;
            }
            let Some(partition) = parse_partition_name(&name) else {
                tracing::warn!(keyspace = %name, "ignoring keyspace that is not a partition");
                continue;
            };
            let keyspace = database
                .keyspace(&name)
                .map_err(|source| StorageError::OpenPartition { partition, source })?;
            partitions.insert(partition, keyspace);
        }

        let (jobs_sender, jobs_receiver) = mpsc::unbounded_channel();
        let (failure_sender, failure) = tokio::sync::watch::channel(None);
        let (shutdown_sender, shutdown_receiver) = oneshot::channel();
        let counters = Arc::new(Counters::default());
        let writer = Writer {
            database: Arc::downgrade(&database),
            jobs: jobs_receiver,
            counters: counters.clone(),
            shutdown: shutdown_receiver,
            sync_writes: config.sync_writes,
            failure: failure_sender,
        };
        let writer_span = tracing::info_span!("storage_writer", actor);
        let writer = runtime.spawn(tracing::Instrument::instrument(writer.run(), writer_span));

        tracing::info!(
            actor,
            partitions = partitions.len(),
            sync_writes = config.sync_writes,
            "storage opened"
        );
        Ok(Store {
            inner: Arc::new(Inner {
                actor,
                epoch,
                meta: location,
                database,
                partitions: RwLock::new(partitions),
                hints,
                hints_held: Arc::new(parking_lot::Mutex::new(hints_held)),
                hints_max_bytes: config.hints_max_bytes,
                jobs: jobs_sender,
                counters,
                failure,
                trees: config.aae_trees.then(AaeTrees::default),
                rows: rows::RowCache::new(config.row_cache_slots).map(Arc::new),
                writer,
                shutdown: shutdown_sender,
            }),
        })
    }

    /// This node's actor id, drawn when its data directory was created.
    pub fn actor(&self) -> Actor {
        self.inner.actor
    }

    /// Resolves, with the reason, once the store can no longer make writes durable: an fsync
    /// failed (fjall refuses every later write, and the kernel may have dropped the dirty
    /// pages, so a retry could report success for data that is gone) or a storage batch
    /// panicked. The node must then stop acknowledging and serving (DESIGN §4): the server
    /// exits, and its peers route around it.
    pub async fn failed(&self) -> String {
        let mut failure = self.inner.failure.clone();
        loop {
            if let Some(reason) = failure.borrow_and_update().clone() {
                return reason;
            }
            if failure.changed().await.is_err() {
                // The writer is gone without a failure (the store was closed): never resolve.
                std::future::pending::<()>().await;
            }
        }
    }

    /// This start's incarnation and the key actors it may trust (see `core::epoch`).
    pub fn epoch(&self) -> NodeEpoch {
        self.inner.epoch
    }

    /// The stored value of `(bucket, key)` in `partition` (the key's ring partition).
    ///
    /// May return a value whose write is not yet durable (see the module doc).
    pub fn get(
        &self,
        partition: u32,
        bucket: &[u8],
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let stored_key = key::encode(bucket, key)?;
        if let Some(record) = self
            .inner
            .rows
            .as_ref()
            .and_then(|rows| rows.get(partition, &stored_key))
        {
            self.inner
                .database
                .check_attached()
                .map_err(|source| StorageError::Read { partition, source })?;
            return Ok(Some(record));
        }
        let Some(keyspace) = self.inner.existing_partition(partition) else {
            return Ok(None);
        };
        keyspace
            .get(&stored_key)
            .map_err(|source| StorageError::Read { partition, source })
    }

    /// Atomic read-modify-write of one key.
    ///
    /// `update` gets the current value and returns the value to store (`None`: store nothing)
    /// and an output for the caller. It runs on the store's writer (a blocking-pool thread),
    /// one update after another, so two updates of one key never lose each other; it should
    /// be quick, since the updates batched with it wait for it.
    ///
    /// Returns the output once the write, or if nothing was written the value `update` read,
    /// is durable. An error from `update` writes nothing and is returned as
    /// [`UpdateError::Rejected`].
    pub async fn update<T, E>(
        &self,
        partition: u32,
        bucket: &[u8],
        key: &[u8],
        update: impl FnOnce(Option<&[u8]>) -> Result<(Option<Vec<u8>>, T), E> + Send + 'static,
    ) -> Result<T, UpdateError<E>>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        let stored_key = key::encode(bucket, key)?;
        let keyspace = self.inner.partition_for_write(partition)?;
        let counters = self.inner.counters.clone();
        let trees = self.inner.trees.clone();
        let rows = self.inner.rows.clone();
        let position = crate::core::ring::key_position(bucket, key);
        self.inner
            .submit(move |answer| {
                let cached = rows
                    .as_ref()
                    .and_then(|rows| rows.get(partition, &stored_key));
                let current = match cached
                    .map_or_else(|| keyspace.get(&stored_key), |c| Ok(Some(c)))
                {
                    Ok(current) => current,
                    Err(source) => {
                        return answer.now(Err(StorageError::Read { partition, source }.into()));
                    }
                };
                let (new_value, output) = match update(current.as_deref()) {
                    Ok(result) => result,
                    Err(source) => return answer.now(Err(UpdateError::Rejected { source })),
                };
                let Some(new_value) = new_value else {
                    return answer.when_durable(false, output);
                };
                if let Some(trees) = &trees {
                    // In this job, so the tree and the store change together.
                    trees.apply(
                        partition,
                        &stored_key,
                        position,
                        current.as_deref(),
                        Some(&new_value),
                    );
                }
                if let Some(rows) = &rows {
                    rows.stored(partition, &stored_key, &new_value);
                }
                if let Err(source) = keyspace.insert(&stored_key, new_value) {
                    if let Some(rows) = &rows {
                        rows.removed(partition, &stored_key);
                    }
                    return answer.now(Err(StorageError::Write { partition, source }.into()));
                }
                counters.writes.fetch_add(1, Ordering::Relaxed);
                answer.when_durable(true, output)
            })
            .await
    }

    /// Up to `limit` records `(bucket, key, value)` of `partition` that follow `start_after`
    /// (exclusive) in stored-key order, for handoff and anti-entropy. Pass the last record's
    /// `(bucket, key)` to get the next page; an empty page means the end.
    pub fn scan_partition(
        &self,
        partition: u32,
        start_after: Option<(&[u8], &[u8])>,
        limit: usize,
    ) -> Result<Vec<ScannedRecord>, StorageError> {
        let start = match start_after {
            Some((bucket, key)) => Bound::Excluded(key::encode(bucket, key)?),
            None => Bound::Unbounded,
        };
        let Some(keyspace) = self.inner.existing_partition(partition) else {
            return Ok(Vec::new());
        };
        let pairs = keyspace
            .range(start, limit, |_| true)
            .map_err(|source| StorageError::Read { partition, source })?;
        let mut records = Vec::with_capacity(pairs.len());
        for (stored_key, value) in pairs {
            let (bucket, key) = key::decode(&stored_key).ok_or(StorageError::CorruptStoredKey {
                partition,
                length: stored_key.len(),
            })?;
            records.push((bucket.to_vec(), key.to_vec(), value));
        }
        Ok(records)
    }

    /// Deletes `(bucket, key)` of `partition` if it still holds exactly `expected` (a copy
    /// this node no longer replicates, read before the check): a write that arrived since
    /// keeps it. Returns whether it was deleted, once the delete is durable.
    pub async fn delete_if_unchanged(
        &self,
        partition: u32,
        bucket: &[u8],
        key: &[u8],
        expected: Vec<u8>,
    ) -> Result<bool, StorageError> {
        let stored_key = key::encode(bucket, key)?;
        let Some(keyspace) = self.inner.existing_partition(partition) else {
            return Ok(false);
        };
        let trees = self.inner.trees.clone();
        let rows = self.inner.rows.clone();
        let position = crate::core::ring::key_position(bucket, key);
        self.inner
            .submit_storage(move |answer| {
                match keyspace.get(&stored_key) {
                    Ok(Some(current)) if current == expected => {}
                    Ok(_) => return answer.when_durable(false, false),
                    Err(source) => {
                        return answer.now(Err(StorageError::Read { partition, source }.into()));
                    }
                }
                if let Some(trees) = &trees {
                    trees.apply(partition, &stored_key, position, Some(&expected), None);
                }
                if let Some(rows) = &rows {
                    rows.removed(partition, &stored_key);
                }
                if let Err(source) = keyspace.remove(stored_key) {
                    return answer.now(Err(StorageError::Write { partition, source }.into()));
                }
                answer.when_durable(true, true)
            })
            .await
    }

    /// The [`RecordSummary`](crate::core::tictac::RecordSummary) of each `(bucket, key)` of
    /// `partition` (`None`: no copy), once what they were read from is durable: one writer
    /// job, so every write before it is in the journal and fsynced. Tombstone reaping must
    /// not count a copy that a crash could still roll back.
    pub async fn durable_summaries(
        &self,
        partition: u32,
        keys: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<Vec<Option<crate::core::tictac::RecordSummary>>, StorageError> {
        let stored_keys = keys
            .iter()
            .map(|(bucket, key)| key::encode(bucket, key))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(keyspace) = self.inner.existing_partition(partition) else {
            return Ok(vec![None; keys.len()]);
        };
        self.inner
            .submit_storage(move |answer| {
                let mut summaries = Vec::with_capacity(stored_keys.len());
                for stored_key in &stored_keys {
                    match keyspace.get(stored_key) {
                        Ok(current) => summaries.push(
                            current.map(|record| crate::core::tictac::record_summary(&record)),
                        ),
                        Err(source) => {
                            return answer
                                .now(Err(StorageError::Read { partition, source }.into()));
                        }
                    }
                }
                answer.when_durable(false, summaries)
            })
            .await
    }

    /// Reaps the tombstone of each `(bucket, key, digest)` of `partition` whose copy is still
    /// a tombstone with that record digest (a write since the check keeps it), each in the
    /// same writer job as its tree update, all in one job. Returns how many were deleted,
    /// once the deletes are durable.
    pub async fn reap_tombstones(
        &self,
        partition: u32,
        keys: &[(Vec<u8>, Vec<u8>, u64)],
    ) -> Result<u64, StorageError> {
        let targets = keys
            .iter()
            .map(|(bucket, key, digest)| {
                Ok((
                    key::encode(bucket, key)?,
                    crate::core::ring::key_position(bucket, key),
                    *digest,
                ))
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        let Some(keyspace) = self.inner.existing_partition(partition) else {
            return Ok(0);
        };
        let trees = self.inner.trees.clone();
        let rows = self.inner.rows.clone();
        self.inner
            .submit_storage(move |answer| {
                let mut reaped = 0;
                for (stored_key, position, digest) in targets {
                    let current = match keyspace.get(&stored_key) {
                        Ok(Some(current)) => current,
                        Ok(None) => continue,
                        Err(source) => {
                            return answer
                                .now(Err(StorageError::Read { partition, source }.into()));
                        }
                    };
                    let summary = crate::core::tictac::record_summary(&current);
                    if summary.digest != digest || summary.tombstone_since.is_none() {
                        continue;
                    }
                    // The header said so; the object itself must say so too before it goes.
                    let decoded = crate::core::object::decode_local_record(&current);
                    if !decoded.is_ok_and(|record| {
                        crate::core::object::tombstone_since(&record.object).is_some()
                    }) {
                        continue;
                    }
                    if let Some(trees) = &trees {
                        trees.apply(partition, &stored_key, position, Some(&current), None);
                    }
                    if let Some(rows) = &rows {
                        rows.removed(partition, &stored_key);
                    }
                    if let Err(source) = keyspace.remove(stored_key) {
                        return answer.now(Err(StorageError::Write { partition, source }.into()));
                    }
                    reaped += 1;
                }
                answer.when_durable(reaped > 0, reaped)
            })
            .await
    }

    /// Up to `limit` keys of `partition` held as tombstones only, with their record digest
    /// and tombstone time, in stored-key order after `start_after` (a scan of the partition).
    pub fn tombstones(
        &self,
        partition: u32,
        start_after: Option<(&[u8], &[u8])>,
        limit: usize,
    ) -> Result<Vec<Tombstone>, StorageError> {
        self.scan_picking(partition, start_after, limit, |bucket, key, record| {
            let summary = crate::core::tictac::record_summary(record);
            summary.tombstone_since.map(|since_micros| Tombstone {
                bucket: bucket.to_vec(),
                key: key.to_vec(),
                digest: summary.digest,
                since_micros,
            })
        })
    }

    /// Up to `limit` records of `partition` that ask for an actor retirement pass
    /// ([`crate::core::object::LocalRecord::retiring`]), decoded, with their record digest,
    /// in stored-key order after `start_after` (a scan of the partition). A record that does
    /// not decode is skipped: anti-entropy reports it.
    pub fn retiring(
        &self,
        partition: u32,
        start_after: Option<(&[u8], &[u8])>,
        limit: usize,
    ) -> Result<Vec<RetiringRecord>, StorageError> {
        self.scan_picking(partition, start_after, limit, |bucket, key, record| {
            let summary = crate::core::tictac::record_summary(record);
            if !summary.retiring {
                return None;
            }
            let record = crate::core::object::decode_local_record(record).ok()?;
            Some(RetiringRecord {
                bucket: bucket.to_vec(),
                key: key.to_vec(),
                digest: summary.digest,
                record,
            })
        })
    }

    /// Up to `limit` of what `pick` makes of `partition`'s records after `start_after`, in
    /// stored-key order.
    fn scan_picking<T>(
        &self,
        partition: u32,
        start_after: Option<(&[u8], &[u8])>,
        limit: usize,
        pick: impl Fn(&[u8], &[u8], &[u8]) -> Option<T>,
    ) -> Result<Vec<T>, StorageError> {
        const PAGE: usize = 1000;
        let mut found = Vec::new();
        let mut cursor: Option<(Vec<u8>, Vec<u8>)> =
            start_after.map(|(bucket, key)| (bucket.to_vec(), key.to_vec()));
        while found.len() < limit {
            let page = self.scan_partition(
                partition,
                cursor
                    .as_ref()
                    .map(|(bucket, key)| (bucket.as_slice(), key.as_slice())),
                PAGE,
            )?;
            let Some((bucket, key, _)) = page.last() else {
                break;
            };
            cursor = Some((bucket.clone(), key.clone()));
            for (bucket, key, record) in page {
                if found.len() < limit
                    && let Some(picked) = pick(&bucket, &key, &record)
                {
                    found.push(picked);
                }
            }
        }
        Ok(found)
    }

    /// The anti-entropy trees (`None` when `aae_trees` is off).
    pub fn aae_trees(&self) -> Option<&AaeTrees> {
        self.inner.trees.as_ref()
    }

    /// Builds `partition`'s anti-entropy tree from a scan, a page of records per writer job
    /// (see `aae.rs`), and makes it the tree exchanges use. Returns whether a build ran
    /// (none when trees are off, or while another build of the partition runs).
    pub async fn build_tree(&self, partition: u32) -> Result<bool, StorageError> {
        const PAGE: usize = 1000;
        let Some(trees) = self.inner.trees.clone() else {
            return Ok(false);
        };
        if !trees.start_build(partition) {
            return Ok(false);
        }
        loop {
            let keyspace = self.inner.existing_partition(partition);
            let builder = trees.clone();
            let done = self
                .inner
                .submit_storage(move |answer| {
                    let Some(cursor) = builder.build_cursor(partition) else {
                        return answer.now(Ok(true));
                    };
                    let pairs = match &keyspace {
                        Some(keyspace) => {
                            let start = match cursor {
                                Some(cursor) => Bound::Excluded(cursor),
                                None => Bound::Unbounded,
                            };
                            match keyspace.range(start, PAGE, |_| true) {
                                Ok(pairs) => pairs,
                                Err(source) => {
                                    return answer.now(Err(StorageError::Read {
                                        partition,
                                        source,
                                    }
                                    .into()));
                                }
                            }
                        }
                        None => Vec::new(),
                    };
                    let mut page = Vec::with_capacity(pairs.len());
                    for (stored_key, record) in pairs {
                        let Some((bucket, key)) = key::decode(&stored_key) else {
                            return answer.now(Err(StorageError::CorruptStoredKey {
                                partition,
                                length: stored_key.len(),
                            }
                            .into()));
                        };
                        let position = crate::core::ring::key_position(bucket, key);
                        page.push((stored_key, position, record));
                    }
                    let last = page.is_empty();
                    builder.build_page(partition, &page);
                    answer.now(Ok(last))
                })
                .await;
            match done {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(source) => {
                    trees.abandon_build(partition);
                    return Err(source);
                }
            }
        }
    }

    /// The key digests (see `core::tictac`) of `partition`'s records in `segments`, read in
    /// pages, for an exchange: every record of the partition is read.
    pub fn key_digests(
        &self,
        partition: u32,
        segments: &[crate::core::tictac::Segment],
    ) -> Result<Vec<crate::core::tictac::KeyDigest>, StorageError> {
        const PAGE: usize = 1000;
        let mut digests = Vec::new();
        let mut start_after: Option<(Vec<u8>, Vec<u8>)> = None;
        loop {
            let page = self.scan_partition(
                partition,
                start_after
                    .as_ref()
                    .map(|(bucket, key)| (bucket.as_slice(), key.as_slice())),
                PAGE,
            )?;
            let Some((bucket, key, _)) = page.last() else {
                return Ok(digests);
            };
            start_after = Some((bucket.clone(), key.clone()));
            digests.extend(aae::digests_in_segments(&page, segments));
        }
    }

    /// The partitions this node holds a keyspace for.
    pub fn partitions(&self) -> Vec<u32> {
        let mut partitions: Vec<u32> = self.inner.partitions.read().keys().copied().collect();
        partitions.sort_unstable();
        partitions
    }

    /// Drops a partition's keyspace with everything in it (after handoff has moved it).
    /// Returns whether the partition existed.
    pub fn drop_partition(&self, partition: u32) -> Result<bool, StorageError> {
        let Some(keyspace) = self.inner.partitions.write().remove(&partition) else {
            return Ok(false);
        };
        self.inner
            .database
            .delete_keyspace(keyspace)
            .map_err(|source| StorageError::DropPartition { partition, source })?;
        if let Some(trees) = &self.inner.trees {
            trees.forget(partition);
        }
        if let Some(rows) = &self.inner.rows {
            rows.forget_partition(partition);
        }
        tracing::info!(partition, "partition dropped");
        Ok(true)
    }

    /// Approximate number of records across all partitions (overwrites count more than once
    /// until compaction).
    pub fn key_count_estimate(&self) -> u64 {
        self.inner
            .partitions
            .read()
            .values()
            .map(|keyspace| keyspace.approximate_len())
            .sum()
    }

    /// Approximate records and bytes this node holds under `partition` (0 and 0 when it
    /// holds nothing there), for plans of ring changes.
    pub fn partition_estimate(&self, partition: u32) -> (u64, u64) {
        self.inner
            .partitions
            .read()
            .get(&partition)
            .map_or((0, 0), |keyspace| {
                (keyspace.approximate_len(), keyspace.approximate_bytes())
            })
    }

    /// Counts of writes and fsyncs since open.
    pub fn stats(&self) -> StorageStats {
        StorageStats {
            writes: self.inner.counters.writes.load(Ordering::Relaxed),
            fsyncs: self.inner.counters.fsyncs.load(Ordering::Relaxed),
        }
    }

    /// Makes every write durable and, if this is the last handle, stops the writer and
    /// releases the database so the directory can be opened again.
    ///
    /// If other handles remain the data is still flushed, and the answer is
    /// [`StorageError::StillShared`]: the directory stays locked until they are dropped.
    #[tracing::instrument(name = "storage_close", skip_all, fields(actor = self.inner.actor))]
    pub async fn close(self) -> Result<(), StorageError> {
        commit::persist(self.inner.database.clone(), PersistMode::SyncAll)
            .await
            .map_err(|failure| StorageError::Persist {
                source: Arc::new(failure),
            })?;
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            Err(shared) => {
                return Err(StorageError::StillShared {
                    other_handles: Arc::strong_count(&shared) - 1,
                });
            }
        };
        let Inner {
            database,
            partitions,
            writer,
            shutdown,
            epoch,
            meta,
            ..
        } = inner;
        drop(shutdown);
        let committed = writer.await;
        drop(partitions);
        // fjall joins its background threads when the last database handle drops.
        let released = tokio::task::spawn_blocking(move || drop(database)).await;
        committed
            .map_err(|source| StorageError::Persist {
                source: Arc::new(PersistError::TaskFailed { source }),
            })
            .and_then(|result| result)?;
        released.map_err(|source| StorageError::Persist {
            source: Arc::new(PersistError::TaskFailed { source }),
        })?;
        // Everything is durable: the next start may keep this incarnation's key actors.
        meta::write_epoch(&meta, &epoch, true)?;
        tracing::info!("storage closed");
        Ok(())
    }
}

impl Inner {
    fn existing_partition(&self, partition: u32) -> Option<Space> {
        self.partitions.read().get(&partition).cloned()
    }

    fn partition_for_write(&self, partition: u32) -> Result<Space, StorageError> {
        if let Some(keyspace) = self.existing_partition(partition) {
            return Ok(keyspace);
        }
        let mut partitions = self.partitions.write();
        if let Some(keyspace) = partitions.get(&partition) {
            return Ok(keyspace.clone());
        }
        let keyspace = self
            .database
            .keyspace(&partition_name(partition))
            .map_err(|source| StorageError::OpenPartition { partition, source })?;
        partitions.insert(partition, keyspace.clone());
        if let Some(trees) = &self.trees {
            // A new keyspace is empty: its tree is built already.
            trees.created_empty(partition);
        }
        tracing::debug!(partition, "partition created");
        Ok(keyspace)
    }

    /// [`Self::submit`] for a job that nothing rejects: only storage errors remain.
    async fn submit_storage<T: Send + 'static>(
        &self,
        job: impl FnOnce(Answer<T, std::convert::Infallible>) -> JobDone + Send + 'static,
    ) -> Result<T, StorageError> {
        match self.submit(job).await {
            Ok(output) => Ok(output),
            Err(UpdateError::Storage { source }) => Err(source),
            Err(UpdateError::Rejected { source }) => match source {},
        }
    }

    /// Queues `job` to the writer and waits for its answer. `job` gets an [`Answer`] to give
    /// its caller the result, at once or once the job's batch is durable.
    async fn submit<T, E>(
        &self,
        job: impl FnOnce(Answer<T, E>) -> JobDone + Send + 'static,
    ) -> Result<T, UpdateError<E>>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        let (sender, receiver) = oneshot::channel();
        let queued = self.jobs.send(Job::new(move || job(Answer { sender })));
        if queued.is_err() {
            return Err(StorageError::CommitterStopped.into());
        }
        // A dropped sender means the writer stopped (the store was dropped, or a batch
        // panicked) before the job was answered.
        receiver
            .await
            .unwrap_or(Err(StorageError::CommitterStopped.into()))
    }
}

/// How a writer job answers its caller.
pub(super) struct Answer<T, E> {
    sender: oneshot::Sender<Result<T, UpdateError<E>>>,
}

impl<T: Send + 'static, E: Send + 'static> Answer<T, E> {
    /// Answers at once (an error, or nothing to wait for); the job wrote nothing.
    fn now(self, result: Result<T, UpdateError<E>>) -> JobDone {
        // The caller may have gone (its request timed out); nobody is left to tell.
        let _ = self.sender.send(result);
        JobDone::answered()
    }

    /// Answers `output` once the job's batch is durable, or with the fsync's error.
    fn when_durable(self, wrote: bool, output: T) -> JobDone {
        JobDone {
            wrote,
            finish: Some(Box::new(move |durable: Result<(), StorageError>| {
                let _ = self
                    .sender
                    .send(durable.map(|()| output).map_err(UpdateError::from));
            })),
        }
    }
}

/// Keyspace name of a partition: `p` and at least four digits, so names sort like numbers for
/// every ring size up to 4096 partitions.
fn partition_name(partition: u32) -> String {
    format!("p{partition:04}")
}

fn parse_partition_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix('p')?;
    if digits.len() < 4 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let partition = digits.parse().ok()?;
    (partition_name(partition) == name).then_some(partition)
}

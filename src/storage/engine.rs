//! The ordered key-value engine under the store: fjall on disk for every real node, or an
//! in-memory disk for deterministic simulation.
//!
//! The in-memory disk models what a crash does to an unsynced store: it keeps a *durable*
//! image (what the last persist made durable) and a *volatile* one (what reads see).
//! `persist` copies the volatile image over the durable one; [`MemoryDisk::crash`] throws the
//! volatile image away and detaches every handle opened before it, so the crashed node's
//! in-flight tasks can neither read nor write any more, and a restart opens what was durable.
//! What it does not model: torn writes within a persist, fsync errors, and the OS's writeback
//! of unsynced data (a real crash may keep some of it; here it keeps none, the harsher case).
//! Both engines pass the same storage test suite (`tests.rs`).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use fjall::{KeyspaceCreateOptions, PersistMode};
use parking_lot::Mutex;

/// Why the engine failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Fjall(#[from] fjall::Error),
    #[error("the in-memory disk was detached by a simulated crash")]
    Detached,
}

/// One stored pair.
pub(super) type Pair = (Vec<u8>, Vec<u8>);

/// A whole database: fjall's, or an in-memory disk's.
pub(super) enum Engine {
    /// A fjall database and the memtable size each keyspace opened in it gets.
    Fjall(fjall::Database, u64),
    Memory(MemoryHandle),
}

/// One keyspace (a partition, or the hints).
#[derive(Clone)]
pub(super) enum Space {
    Fjall(fjall::Keyspace),
    Memory { disk: MemoryHandle, name: String },
}

impl Engine {
    /// Fails as a read of this engine's keyspaces would when the store is detached (a
    /// simulated crash), so that what the row cache answers obeys the same crash model.
    pub(super) fn check_attached(&self) -> Result<(), EngineError> {
        match self {
            Engine::Fjall(..) => Ok(()),
            Engine::Memory(disk) => disk.with(|_| ()),
        }
    }

    pub(super) fn keyspace(&self, name: &str) -> Result<Space, EngineError> {
        match self {
            Engine::Fjall(database, memtable_bytes) => {
                // Appends stay in the journal's buffer until the writer's batch ends and
                // `persist` writes them with one call: fjall would otherwise flush it with a
                // `write(2)` per insert (an eighth of a node's syscalls under load). Fjall
                // keeps this option per keyspace from its creation on.
                Ok(Space::Fjall(database.keyspace(name, || {
                    KeyspaceCreateOptions::default()
                        .max_memtable_size(*memtable_bytes)
                        .manual_journal_persist(true)
                })?))
            }
            Engine::Memory(disk) => {
                disk.with(|state| {
                    state.volatile.entry(name.to_string()).or_default();
                })?;
                Ok(Space::Memory {
                    disk: disk.clone(),
                    name: name.to_string(),
                })
            }
        }
    }

    pub(super) fn keyspace_names(&self) -> Result<Vec<String>, EngineError> {
        match self {
            Engine::Fjall(database, _) => Ok(database
                .list_keyspace_names()
                .iter()
                .map(|name| name.to_string())
                .collect()),
            Engine::Memory(disk) => disk.with(|state| state.volatile.keys().cloned().collect()),
        }
    }

    pub(super) fn delete_keyspace(&self, space: Space) -> Result<(), EngineError> {
        match (self, space) {
            (Engine::Fjall(database, _), Space::Fjall(keyspace)) => {
                Ok(database.delete_keyspace(keyspace)?)
            }
            (Engine::Memory(disk), Space::Memory { name, .. }) => disk.with(|state| {
                state.volatile.remove(&name);
            }),
            _ => unreachable!("a keyspace always belongs to the engine that opened it"),
        }
    }

    /// Makes every write so far durable (fjall: fsync of the journal), or with
    /// `PersistMode::Buffer` only hands the journal's buffer to the OS, so that a crash of
    /// the process (not of the machine) loses nothing.
    pub(super) fn persist(&self, mode: PersistMode) -> Result<(), EngineError> {
        match self {
            Engine::Fjall(database, _) => Ok(database.persist(mode)?),
            // The in-memory disk has no buffer of its own: what reads see is the OS's copy.
            Engine::Memory(_) if mode == PersistMode::Buffer => Ok(()),
            Engine::Memory(disk) => {
                disk.wait_while_persists_are_held()?;
                disk.with(|state| state.durable = state.volatile.clone())
            }
        }
    }
}

impl Space {
    pub(super) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        match self {
            Space::Fjall(keyspace) => Ok(keyspace.get(key)?.map(|value| value.to_vec())),
            Space::Memory { disk, name } => disk.with(|state| {
                state
                    .volatile
                    .get(name)
                    .and_then(|pairs| pairs.get(key))
                    .cloned()
            }),
        }
    }

    pub(super) fn insert(&self, key: &[u8], value: Vec<u8>) -> Result<(), EngineError> {
        match self {
            Space::Fjall(keyspace) => Ok(keyspace.insert(key, value)?),
            Space::Memory { disk, name } => disk.with(|state| {
                state
                    .volatile
                    .entry(name.clone())
                    .or_default()
                    .insert(key.to_vec(), value);
            }),
        }
    }

    pub(super) fn remove(&self, key: Vec<u8>) -> Result<(), EngineError> {
        match self {
            Space::Fjall(keyspace) => Ok(keyspace.remove(key)?),
            Space::Memory { disk, name } => disk.with(|state| {
                if let Some(pairs) = state.volatile.get_mut(name) {
                    pairs.remove(&key);
                }
            }),
        }
    }

    /// Pairs from `start` in key order while `keep(key)` holds, at most `limit`.
    pub(super) fn range(
        &self,
        start: Bound<Vec<u8>>,
        limit: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<Pair>, EngineError> {
        let mut pairs = Vec::with_capacity(limit.min(1024));
        match self {
            Space::Fjall(keyspace) => {
                for entry in keyspace.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
                    if pairs.len() >= limit {
                        break;
                    }
                    let (key, value) = entry.into_inner()?;
                    if !keep(&key) {
                        break;
                    }
                    pairs.push((key.to_vec(), value.to_vec()));
                }
            }
            Space::Memory { disk, name } => disk.with(|state| {
                let Some(stored) = state.volatile.get(name) else {
                    return;
                };
                for (key, value) in stored.range((start, Bound::Unbounded)) {
                    if pairs.len() >= limit || !keep(key) {
                        break;
                    }
                    pairs.push((key.clone(), value.clone()));
                }
            })?,
        }
        Ok(pairs)
    }

    /// Every key, counted (a scan; once, at open).
    pub(super) fn count(&self) -> Result<u64, EngineError> {
        match self {
            Space::Fjall(keyspace) => {
                let mut count = 0;
                for entry in keyspace.iter() {
                    entry.key()?;
                    count += 1;
                }
                Ok(count)
            }
            Space::Memory { disk, name } => disk.with(|state| {
                state
                    .volatile
                    .get(name)
                    .map_or(0, |pairs| pairs.len() as u64)
            }),
        }
    }

    /// Approximate bytes the keyspace takes on disk (fjall: its segments, compressed; the
    /// memtable is not counted); the simulated disk counts its keys and values.
    pub(super) fn approximate_bytes(&self) -> u64 {
        match self {
            Space::Fjall(keyspace) => keyspace.disk_space(),
            Space::Memory { disk, name } => disk
                .with(|state| {
                    state.volatile.get(name).map_or(0, |pairs| {
                        pairs
                            .iter()
                            .map(|(key, value)| (key.len() + value.len()) as u64)
                            .sum()
                    })
                })
                .unwrap_or(0),
        }
    }

    /// Approximate number of pairs (fjall counts overwrites until compaction).
    pub(super) fn approximate_len(&self) -> u64 {
        match self {
            Space::Fjall(keyspace) => keyspace.approximate_len() as u64,
            Space::Memory { .. } => self.count().unwrap_or(0),
        }
    }
}

type Image = BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>;

#[derive(Default)]
struct DiskState {
    /// What survives a crash.
    durable: Image,
    /// What reads see: the durable image plus every write since the last persist.
    volatile: Image,
    /// The metadata file (`node.meta`), written durably at once.
    meta: Option<String>,
    /// Bumped by every open and every crash; handles of an older generation are detached.
    generation: u64,
}

/// A copy of a [`MemoryDisk`]'s durable contents ([`MemoryDisk::snapshot`]).
#[derive(Clone)]
pub struct DiskSnapshot {
    image: Image,
    meta: Option<String>,
}

/// A simulated disk that outlives the nodes that open it (see the module doc).
#[derive(Default)]
pub struct MemoryDisk {
    state: Mutex<DiskState>,
    /// While set, a persist waits (a slow disk): writes are visible to reads but not yet
    /// durable nor acknowledged, the window in which a crash loses what a peer may have read.
    persists_held: std::sync::atomic::AtomicBool,
}

impl MemoryDisk {
    pub fn new() -> Arc<MemoryDisk> {
        Arc::new(MemoryDisk::default())
    }

    /// A crash: everything not persisted is lost, and every open handle is detached.
    pub fn crash(&self) {
        let mut state = self.state.lock();
        state.volatile = state.durable.clone();
        state.generation += 1;
    }

    /// Attaches a new handle, detaching any earlier one (as a restarted process would).
    pub(super) fn attach(self: &Arc<Self>) -> MemoryHandle {
        let mut state = self.state.lock();
        state.generation += 1;
        MemoryHandle {
            disk: self.clone(),
            generation: state.generation,
        }
    }

    /// What the disk holds durably now, as a backup or a VM snapshot would copy it.
    pub fn snapshot(&self) -> DiskSnapshot {
        let state = self.state.lock();
        DiskSnapshot {
            image: state.durable.clone(),
            meta: state.meta.clone(),
        }
    }

    /// Puts a snapshot back, as restoring a backup does (with the node stopped): every open
    /// handle is detached.
    pub fn restore(&self, snapshot: &DiskSnapshot) {
        let mut state = self.state.lock();
        state.durable = snapshot.image.clone();
        state.volatile = snapshot.image.clone();
        state.meta = snapshot.meta.clone();
        state.generation += 1;
    }

    /// Holds every persist until released (or until a crash detaches it).
    pub fn hold_persists(&self, held: bool) {
        self.persists_held
            .store(held, std::sync::atomic::Ordering::SeqCst);
    }

    pub(super) fn read_meta(&self) -> Option<String> {
        self.state.lock().meta.clone()
    }

    pub(super) fn write_meta(&self, text: String) {
        self.state.lock().meta = Some(text);
    }
}

/// A store's access to a [`MemoryDisk`], valid until the next crash or open.
#[derive(Clone)]
pub(super) struct MemoryHandle {
    disk: Arc<MemoryDisk>,
    generation: u64,
}

impl MemoryHandle {
    fn with<T>(&self, operation: impl FnOnce(&mut DiskState) -> T) -> Result<T, EngineError> {
        let mut state = self.disk.state.lock();
        if state.generation != self.generation {
            return Err(EngineError::Detached);
        }
        Ok(operation(&mut state))
    }

    pub(super) fn disk(&self) -> &Arc<MemoryDisk> {
        &self.disk
    }

    /// Runs on the writer's blocking thread, so waiting here stalls only the writer.
    fn wait_while_persists_are_held(&self) -> Result<(), EngineError> {
        while self
            .disk
            .persists_held
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            self.with(|_| ())?;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }
}

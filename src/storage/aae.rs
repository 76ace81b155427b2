//! The store's anti-entropy trees: one tictac tree per partition keyspace (see
//! `core::tictac`), kept in memory and changed by the writer in the same job as the write it
//! reflects, so a tree never shows a write the store does not hold, nor misses one it does.
//!
//! Trees are not persisted: every start builds them from a scan, as does a scheduled rebuild
//! (which also corrects any drift). A build reads the partition in pages, each page a writer
//! job, so writes go on between pages: a write to a key the build has passed (at or below
//! its cursor) is applied to the tree being built too; one above the cursor is not, since the
//! build reads that key later. The writer runs jobs one at a time, so this is exact. Until
//! its first build is done a partition has no tree to exchange; a rebuild keeps serving the
//! old tree, kept current, until the new one replaces it.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::core::tictac::{self, Branch, KeyDigest, Segment, TicTacTree};

/// A partition's tree and its build.
#[derive(Default)]
struct PartitionTree {
    /// The tree exchanges use; `None` until the first build is done.
    built: Option<TicTacTree>,
    /// Keys whose every sibling is a tombstone, as the built tree counts them.
    tombstones: u64,
    /// Keys whose record asks for an actor retirement pass, as the built tree counts them.
    retiring: u64,
    /// A build in progress.
    building: Option<Build>,
    /// Builds completed (the first one makes the tree usable).
    builds: u64,
    /// Writes applied since the last build completed.
    writes_since_build: u64,
}

/// A build in progress: the tree and tombstone count so far, and the last stored key read.
struct Build {
    tree: TicTacTree,
    tombstones: u64,
    retiring: u64,
    cursor: Option<Vec<u8>>,
}

/// What [`AaeTrees::status`] reports of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeStatus {
    pub partition: u32,
    /// The tree can be exchanged.
    pub built: bool,
    /// A build (the first, or a rebuild) is running.
    pub building: bool,
    pub builds: u64,
    pub writes_since_build: u64,
    pub root: Option<u32>,
    /// Keys held as tombstones only (counted once the first build is done).
    pub tombstones: u64,
    /// Keys whose clock may hold actors to retire (counted once the first build is done).
    pub retiring: u64,
}

/// Every partition's tree on this node.
#[derive(Default, Clone)]
pub struct AaeTrees {
    trees: Arc<Mutex<HashMap<u32, PartitionTree>>>,
}

impl AaeTrees {
    /// Applies one key's change, from the writer: its record `old` (none: absent) became
    /// `new` (none: deleted). `stored_key` orders the key against a build's cursor;
    /// `position` is its ring position.
    pub(super) fn apply(
        &self,
        partition: u32,
        stored_key: &[u8],
        position: u64,
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) {
        if old == new {
            return;
        }
        let segment = tictac::segment_of_position(position);
        let old = old.map(tictac::record_summary);
        let new = new.map(tictac::record_summary);
        let entry = |summary: Option<tictac::RecordSummary>| {
            summary.map(|summary| tictac::entry_hash(position, summary.digest))
        };
        let is_tombstone = |summary: Option<tictac::RecordSummary>| {
            summary.is_some_and(|summary| summary.tombstone_since.is_some())
        };
        let is_retiring = |summary: Option<tictac::RecordSummary>| {
            summary.is_some_and(|summary| summary.retiring)
        };
        let (old_tombstone, new_tombstone) = (is_tombstone(old), is_tombstone(new));
        let (old_retiring, new_retiring) = (is_retiring(old), is_retiring(new));
        let count = |tombstones: &mut u64, retiring: &mut u64| {
            *tombstones =
                (*tombstones + u64::from(new_tombstone)).saturating_sub(u64::from(old_tombstone));
            *retiring =
                (*retiring + u64::from(new_retiring)).saturating_sub(u64::from(old_retiring));
        };
        let (old, new) = (entry(old), entry(new));
        let mut trees = self.trees.lock();
        let tree = trees.entry(partition).or_default();
        tree.writes_since_build += 1;
        if let Some(built) = &mut tree.built {
            built.update(segment, old, new);
            count(&mut tree.tombstones, &mut tree.retiring);
        }
        if let Some(build) = &mut tree.building
            && build
                .cursor
                .as_deref()
                .is_some_and(|cursor| stored_key <= cursor)
        {
            build.tree.update(segment, old, new);
            count(&mut build.tombstones, &mut build.retiring);
        }
    }

    /// A partition keyspace was created, empty: its (empty) tree is built, unless one is
    /// kept already.
    pub(super) fn created_empty(&self, partition: u32) {
        self.trees
            .lock()
            .entry(partition)
            .or_insert_with(|| PartitionTree {
                built: Some(TicTacTree::new()),
                ..PartitionTree::default()
            });
    }

    /// Starts a build of `partition`'s tree (a no-op while one runs); returns whether one
    /// started.
    pub(super) fn start_build(&self, partition: u32) -> bool {
        let mut trees = self.trees.lock();
        let tree = trees.entry(partition).or_default();
        if tree.building.is_some() {
            return false;
        }
        tree.building = Some(Build {
            tree: TicTacTree::new(),
            tombstones: 0,
            retiring: 0,
            cursor: None,
        });
        true
    }

    /// The cursor of `partition`'s build: where its next page starts (`None` before the
    /// first page); the outer `None` when no build runs.
    pub(super) fn build_cursor(&self, partition: u32) -> Option<Option<Vec<u8>>> {
        let trees = self.trees.lock();
        let build = trees.get(&partition)?.building.as_ref()?;
        Some(build.cursor.clone())
    }

    /// Folds one page of a build into its tree, from the writer: each record as
    /// (stored key, ring position, record); an empty page ends the build, which replaces
    /// the tree exchanges use.
    pub(super) fn build_page(&self, partition: u32, page: &[(Vec<u8>, u64, Vec<u8>)]) {
        let mut trees = self.trees.lock();
        let Some(tree) = trees.get_mut(&partition) else {
            return;
        };
        let Some(build) = &mut tree.building else {
            return;
        };
        if page.is_empty() {
            if let Some(done) = tree.building.take() {
                tree.built = Some(done.tree);
                tree.tombstones = done.tombstones;
                tree.retiring = done.retiring;
                tree.builds += 1;
                tree.writes_since_build = 0;
            }
            return;
        }
        for (stored_key, position, record) in page {
            let summary = tictac::record_summary(record);
            build.tree.update(
                tictac::segment_of_position(*position),
                None,
                Some(tictac::entry_hash(*position, summary.digest)),
            );
            build.tombstones += u64::from(summary.tombstone_since.is_some());
            build.retiring += u64::from(summary.retiring);
            build.cursor = Some(stored_key.clone());
        }
    }

    /// Drops a build that failed; the tree exchanges use (if any) stays.
    pub(super) fn abandon_build(&self, partition: u32) {
        if let Some(tree) = self.trees.lock().get_mut(&partition) {
            tree.building = None;
        }
    }

    /// Forgets a partition's tree (its keyspace was dropped).
    pub(super) fn forget(&self, partition: u32) {
        self.trees.lock().remove(&partition);
    }

    /// The branch hashes of `partition`'s tree; `None` until its first build is done.
    pub fn branches(&self, partition: u32) -> Option<Vec<u32>> {
        let trees = self.trees.lock();
        Some(trees.get(&partition)?.built.as_ref()?.branches().to_vec())
    }

    /// The segment hashes under each of `branches`; `None` until the first build is done.
    pub fn segments(&self, partition: u32, branches: &[Branch]) -> Option<Vec<Vec<u32>>> {
        let trees = self.trees.lock();
        let tree = trees.get(&partition)?.built.as_ref()?;
        Some(
            branches
                .iter()
                .map(|branch| tree.segments_of(*branch).to_vec())
                .collect(),
        )
    }

    /// Keys of `partition` whose record asks for an actor retirement pass; `None` until its
    /// first build is done.
    pub fn retiring(&self, partition: u32) -> Option<u64> {
        let trees = self.trees.lock();
        let tree = trees.get(&partition)?;
        tree.built.as_ref().map(|_| tree.retiring)
    }

    /// Keys of `partition` held as tombstones only; `None` until its first build is done.
    pub fn tombstones(&self, partition: u32) -> Option<u64> {
        let trees = self.trees.lock();
        let tree = trees.get(&partition)?;
        tree.built.as_ref().map(|_| tree.tombstones)
    }

    /// Every partition's tree state, in partition order.
    pub fn status(&self) -> Vec<TreeStatus> {
        let trees = self.trees.lock();
        let mut status: Vec<TreeStatus> = trees
            .iter()
            .map(|(partition, tree)| TreeStatus {
                partition: *partition,
                built: tree.built.is_some(),
                building: tree.building.is_some(),
                builds: tree.builds,
                writes_since_build: tree.writes_since_build,
                root: tree.built.as_ref().map(TicTacTree::root),
                tombstones: tree.tombstones,
                retiring: tree.retiring,
            })
            .collect();
        status.sort_by_key(|tree| tree.partition);
        status
    }
}

/// The key digests of the records of a page that fall in `segments`.
pub(super) fn digests_in_segments(
    records: &[super::ScannedRecord],
    segments: &[Segment],
) -> Vec<KeyDigest> {
    records
        .iter()
        .filter(|(bucket, key, _)| segments.contains(&tictac::segment_of(bucket, key)))
        .map(|(bucket, key, record)| KeyDigest {
            bucket: bucket.clone(),
            key: key.clone(),
            digest: tictac::record_digest(record),
        })
        .collect()
}

//! Tictac Merkle trees for active anti-entropy (AAE), after Riak's tictac AAE and the
//! kv_index_tictactree library.
//!
//! One tree per key partition on each node covers the records that node stores under the
//! partition (replica copies, not hints). A key falls in one of [`SEGMENTS`] segments, taken
//! from its ring position (the low bits, independent of the high bits that pick the
//! partition). A segment's hash is the XOR of its keys' entry hashes, an entry hash covering
//! the key and its version set ([`record_digest`]); a branch's hash is the XOR of its
//! segments', and the root the XOR of the branches'. XOR makes a write an O(1) update (XOR
//! the old entry out and the new one in) with no rescan, and makes the tree independent of
//! the order keys were added in, so two replicas holding the same records have equal trees.
//!
//! Shape: [`BRANCHES`] branches of [`SEGMENTS_PER_BRANCH`] segments (16,384 segments of 4
//! bytes): 66 KiB per partition tree. A node of a Q = 64 ring with 3 nodes and n_val 3
//! replicates all 64 partitions: 4.1 MiB; at Q = 1024 on 8 nodes, 384 partitions: 25 MiB.
//! With 1,000,000 keys in a partition a segment holds about 61 keys, so one differing key
//! costs an exchange two levels of hashes (512 bytes of branches, 512 of segments) and about
//! 61 key digests from each side.
//!
//! An exchange ([`Exchange`]) walks the two trees from the branches down and ends with the
//! keys whose digests differ between the two sides, each marked with what the other side
//! lacks; the shell fetches both copies, merges them (DVVSet sync) and writes the merge where
//! it is behind.
//!
//! Segments that differ are compared a second time after a pause, and only those that differ
//! both times go on to the key step (Riak's tictac exchange also compares twice and keeps
//! what differed in both). Under writes the two trees are read moments apart, so a segment
//! holding a write that one replica has applied and the other has not yet differs without
//! anything to repair; and the key step reads every record of the partition on both sides
//! (there is no by-segment index), which at 10M keys is most of what anti-entropy costs. A
//! segment that is really out of sync still differs after the pause: a write that changes
//! another of its keys in between cannot make it equal.

use crate::core::ring::key_position;
use std::collections::BTreeMap;

/// Branches (level 1) of a tree.
pub const BRANCHES: usize = 128;
/// Segments (leaves) under each branch.
pub const SEGMENTS_PER_BRANCH: usize = 128;
/// Segments of a tree.
pub const SEGMENTS: usize = BRANCHES * SEGMENTS_PER_BRANCH;

/// A segment index, `0..SEGMENTS`.
pub type Segment = u16;
/// A branch index, `0..BRANCHES`.
pub type Branch = u16;

/// The segment of a key: the low 14 bits of its ring position.
pub fn segment_of(bucket: &[u8], key: &[u8]) -> Segment {
    segment_of_position(key_position(bucket, key))
}

/// The segment of a key at ring position `position` ([`key_position`]).
pub fn segment_of_position(position: u64) -> Segment {
    (position % SEGMENTS as u64) as Segment
}

/// The branch a segment is under.
pub fn branch_of(segment: Segment) -> Branch {
    segment / SEGMENTS_PER_BRANCH as u16
}

/// The digest of a stored record: of its replicated object only (see
/// [`crate::core::object::LocalRecord`]; the key actor a node keeps beside it differs between
/// replicas that hold the same copy). Equal objects encode alike (entries sorted by actor,
/// values newest first), so equal digests mean equal copies, and a copy that differs in
/// anything a merge would change differs here. A record that does not decode is digested
/// whole (it then differs from every good copy, and the exchange's merge reports it).
pub fn record_digest(record: &[u8]) -> u64 {
    record_summary(record).digest
}

/// What the trees and tombstone reaping need of a stored record, from one decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordSummary {
    /// [`record_digest`].
    pub digest: u64,
    /// [`crate::core::object::tombstone_since`]: set when every sibling is a tombstone.
    pub tombstone_since: Option<u64>,
    /// [`crate::core::object::LocalRecord::retiring`].
    pub retiring: bool,
}

/// The [`RecordSummary`] of a stored record. A current-format record is not decoded: its
/// header holds the tombstone state and its tail is the object's encoding. Older formats are
/// decoded and their object encoded as the current format holds it, so a copy digests alike
/// whichever format stores it.
pub fn record_summary(record: &[u8]) -> RecordSummary {
    if let Some(header) = crate::core::object::record_header(record) {
        return RecordSummary {
            digest: first_u64(blake3::hash(header.object).as_bytes()),
            tombstone_since: header.tombstone_since,
            retiring: header.retiring,
        };
    }
    match crate::core::object::decode_local_record(record) {
        Ok(local) => {
            let object = crate::core::object::encode_object(&local.object);
            RecordSummary {
                digest: first_u64(blake3::hash(&object).as_bytes()),
                tombstone_since: crate::core::object::tombstone_since(&local.object),
                retiring: local.retiring,
            }
        }
        Err(_) => RecordSummary {
            digest: first_u64(blake3::hash(record).as_bytes()),
            tombstone_since: None,
            retiring: false,
        },
    }
}

/// The entry hash of the key at ring position `position` ([`key_position`]) holding a
/// record with `digest`: what the key adds to its segment's hash.
pub fn entry_hash(position: u64, digest: u64) -> u32 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&position.to_be_bytes());
    bytes[8..].copy_from_slice(&digest.to_be_bytes());
    let hash = blake3::hash(&bytes);
    let mut first = [0u8; 4];
    first.copy_from_slice(&hash.as_bytes()[..4]);
    u32::from_be_bytes(first)
}

fn first_u64(bytes: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(first)
}

/// One partition's tree.
#[derive(Clone, PartialEq, Eq)]
pub struct TicTacTree {
    segments: Vec<u32>,
    branches: Vec<u32>,
}

impl std::fmt::Debug for TicTacTree {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "TicTacTree {{ root: {:08x} }}", self.root())
    }
}

impl Default for TicTacTree {
    fn default() -> Self {
        Self::new()
    }
}

impl TicTacTree {
    /// The tree of no keys.
    pub fn new() -> Self {
        TicTacTree {
            segments: vec![0; SEGMENTS],
            branches: vec![0; BRANCHES],
        }
    }

    /// Applies a change of one key: its entry hash `old` (none: the key was absent) becomes
    /// `new` (none: the key is gone).
    pub fn update(&mut self, segment: Segment, old: Option<u32>, new: Option<u32>) {
        let change = old.unwrap_or(0) ^ new.unwrap_or(0);
        let segment = segment as usize % SEGMENTS;
        self.segments[segment] ^= change;
        self.branches[segment / SEGMENTS_PER_BRANCH] ^= change;
    }

    /// Adds a key (as when building from a scan).
    pub fn insert(&mut self, bucket: &[u8], key: &[u8], digest: u64) {
        let position = key_position(bucket, key);
        self.update(
            segment_of_position(position),
            None,
            Some(entry_hash(position, digest)),
        );
    }

    /// The root hash: the XOR of every key's entry hash.
    pub fn root(&self) -> u32 {
        self.branches.iter().fold(0, |root, branch| root ^ branch)
    }

    /// Every branch's hash, in branch order.
    pub fn branches(&self) -> &[u32] {
        &self.branches
    }

    /// The segment hashes under `branch`, in segment order.
    pub fn segments_of(&self, branch: Branch) -> &[u32] {
        let start = (branch as usize % BRANCHES) * SEGMENTS_PER_BRANCH;
        &self.segments[start..start + SEGMENTS_PER_BRANCH]
    }
}

/// The segments whose hashes differ under `branches`, given both sides' segment hashes of
/// each branch in the same order.
fn differing_segments(
    branches: &[Branch],
    ours: &[Vec<u32>],
    theirs: &[Vec<u32>],
) -> Result<Vec<Segment>, ExchangeError> {
    if ours.len() != branches.len() || theirs.len() != branches.len() {
        return Err(ExchangeError::Malformed(format!(
            "segments of {} and {} branches for {} asked",
            ours.len(),
            theirs.len(),
            branches.len()
        )));
    }
    let mut segments = Vec::new();
    for ((branch, ours), theirs) in branches.iter().zip(ours).zip(theirs) {
        if ours.len() != SEGMENTS_PER_BRANCH || theirs.len() != SEGMENTS_PER_BRANCH {
            return Err(ExchangeError::Malformed(format!(
                "branch {branch}: {} and {} segments, expected {SEGMENTS_PER_BRANCH}",
                ours.len(),
                theirs.len()
            )));
        }
        let first = branch * SEGMENTS_PER_BRANCH as u16;
        segments.extend(
            differing(ours, theirs)
                .into_iter()
                .map(|offset| first + offset),
        );
    }
    Ok(segments)
}

/// The indexes at which two equally long hash lists differ.
fn differing(ours: &[u32], theirs: &[u32]) -> Vec<u16> {
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(index, _)| index as u16)
        .collect()
}

/// What one side holds of a key in a differing segment: its record's digest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct KeyDigest {
    #[serde(with = "serde_bytes")]
    pub bucket: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub digest: u64,
}

/// A key whose copies differ between the two sides of an exchange.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyDifference {
    pub bucket: Vec<u8>,
    pub key: Vec<u8>,
    /// Which sides hold a copy: a key only one side holds is copied to the other; a key both
    /// hold with different digests is merged and written to both.
    pub local: bool,
    pub remote: bool,
}

/// Why an exchange stopped before comparing keys.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    #[error("malformed exchange answer: {0}")]
    Malformed(String),
}

/// The next step of an [`Exchange`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExchangeStep {
    /// Ask the peer for its segment hashes under these branches.
    AskSegments(Vec<Branch>),
    /// Segments differed under these branches: after a pause, take both sides' segment
    /// hashes under them again and pass them to [`Exchange::on_segments_again`].
    ConfirmSegments(Vec<Branch>),
    /// Ask both sides for the key digests in these segments.
    AskKeys(Vec<Segment>),
    /// Repair these keys; the exchange is over.
    Repair(Vec<KeyDifference>),
    /// The trees agree: nothing to repair.
    InSync,
}

/// One exchange of a partition's trees with a peer, from the side that starts it: branches,
/// then the segments under differing branches, then the keys in differing segments. Sans-IO:
/// the shell fetches what each step asks and feeds the answers back.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// Most keys one exchange repairs (`aae.max_repairs_per_exchange`); the rest wait for
    /// the next exchange.
    max_repairs: usize,
    /// Most segments whose keys one exchange compares: bounds the keys read per exchange.
    max_segments: usize,
    /// Segments found differing: to be confirmed, then asked for.
    segments: Vec<Segment>,
}

impl Exchange {
    pub fn new(max_repairs: usize, max_segments: usize) -> Self {
        Exchange {
            max_repairs: max_repairs.max(1),
            max_segments: max_segments.max(1),
            segments: Vec::new(),
        }
    }

    /// Step 1: both sides' branch hashes.
    pub fn on_branches(
        &mut self,
        ours: &[u32],
        theirs: &[u32],
    ) -> Result<ExchangeStep, ExchangeError> {
        if ours.len() != BRANCHES || theirs.len() != BRANCHES {
            return Err(ExchangeError::Malformed(format!(
                "{} and {} branches, expected {BRANCHES}",
                ours.len(),
                theirs.len()
            )));
        }
        let branches = differing(ours, theirs);
        Ok(if branches.is_empty() {
            ExchangeStep::InSync
        } else {
            ExchangeStep::AskSegments(branches)
        })
    }

    /// Step 2: for each branch asked, our segment hashes and theirs.
    pub fn on_segments(
        &mut self,
        branches: &[Branch],
        ours: &[Vec<u32>],
        theirs: &[Vec<u32>],
    ) -> Result<ExchangeStep, ExchangeError> {
        let mut segments = differing_segments(branches, ours, theirs)?;
        segments.truncate(self.max_segments);
        let mut branches: Vec<Branch> =
            segments.iter().map(|segment| branch_of(*segment)).collect();
        branches.dedup();
        self.segments = segments;
        Ok(if branches.is_empty() {
            // The branches differed but no segment does: a tree changed between the steps.
            ExchangeStep::InSync
        } else {
            ExchangeStep::ConfirmSegments(branches)
        })
    }

    /// Step 2b: both sides' segment hashes under the branches of
    /// [`ExchangeStep::ConfirmSegments`], taken again after a pause. Only the segments that
    /// differed the first time and differ again are asked for.
    pub fn on_segments_again(
        &mut self,
        branches: &[Branch],
        ours: &[Vec<u32>],
        theirs: &[Vec<u32>],
    ) -> Result<ExchangeStep, ExchangeError> {
        let again = differing_segments(branches, ours, theirs)?;
        self.segments.retain(|segment| again.contains(segment));
        Ok(if self.segments.is_empty() {
            ExchangeStep::InSync
        } else {
            ExchangeStep::AskKeys(self.segments.clone())
        })
    }

    /// The segments asked for in the last [`ExchangeStep::AskKeys`].
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Step 3: both sides' key digests in the segments asked; the keys to repair (at most
    /// `max_repairs`, in key order).
    pub fn on_keys(&mut self, ours: Vec<KeyDigest>, theirs: Vec<KeyDigest>) -> ExchangeStep {
        // (bucket, key) → (our digest, theirs).
        type Sides = (Option<u64>, Option<u64>);
        let mut keys: BTreeMap<(Vec<u8>, Vec<u8>), Sides> = BTreeMap::new();
        for digest in ours {
            keys.entry((digest.bucket, digest.key)).or_default().0 = Some(digest.digest);
        }
        for digest in theirs {
            keys.entry((digest.bucket, digest.key)).or_default().1 = Some(digest.digest);
        }
        let differences: Vec<KeyDifference> = keys
            .into_iter()
            .filter(|(_, (local, remote))| local != remote)
            .map(|((bucket, key), (local, remote))| KeyDifference {
                bucket,
                key,
                local: local.is_some(),
                remote: remote.is_some(),
            })
            .take(self.max_repairs)
            .collect();
        if differences.is_empty() {
            ExchangeStep::InSync
        } else {
            ExchangeStep::Repair(differences)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A store's contents: key → digest.
    type Contents = BTreeMap<(Vec<u8>, Vec<u8>), u64>;

    fn rebuilt(contents: &Contents) -> TicTacTree {
        let mut tree = TicTacTree::new();
        for ((bucket, key), digest) in contents {
            tree.insert(bucket, key, *digest);
        }
        tree
    }

    /// Applies one write or delete to both the contents and the tree, as the write path does.
    fn apply(tree: &mut TicTacTree, contents: &mut Contents, key: Vec<u8>, new: Option<u64>) {
        let bucket = b"b".to_vec();
        let old = contents.get(&(bucket.clone(), key.clone())).copied();
        let position = key_position(&bucket, &key);
        tree.update(
            segment_of_position(position),
            old.map(|digest| entry_hash(position, digest)),
            new.map(|digest| entry_hash(position, digest)),
        );
        match new {
            Some(digest) => contents.insert((bucket, key), digest),
            None => contents.remove(&(bucket, key)),
        };
    }

    fn digests(contents: &Contents, segments: &[Segment]) -> Vec<KeyDigest> {
        contents
            .iter()
            .filter(|((bucket, key), _)| segments.contains(&segment_of(bucket, key)))
            .map(|((bucket, key), digest)| KeyDigest {
                bucket: bucket.clone(),
                key: key.clone(),
                digest: *digest,
            })
            .collect()
    }

    /// Runs an exchange between two stores' trees to its end.
    fn exchange(
        ours: (&TicTacTree, &Contents),
        theirs: (&TicTacTree, &Contents),
        max_repairs: usize,
    ) -> ExchangeStep {
        let mut exchange = Exchange::new(max_repairs, SEGMENTS);
        let mut step = exchange
            .on_branches(ours.0.branches(), theirs.0.branches())
            .unwrap();
        if let ExchangeStep::AskSegments(branches) = &step {
            let of = |tree: &TicTacTree| -> Vec<Vec<u32>> {
                branches
                    .iter()
                    .map(|branch| tree.segments_of(*branch).to_vec())
                    .collect()
            };
            step = exchange
                .on_segments(branches, &of(ours.0), &of(theirs.0))
                .unwrap();
        }
        if let ExchangeStep::ConfirmSegments(branches) = &step {
            let of = |tree: &TicTacTree| -> Vec<Vec<u32>> {
                branches
                    .iter()
                    .map(|branch| tree.segments_of(*branch).to_vec())
                    .collect()
            };
            step = exchange
                .on_segments_again(branches, &of(ours.0), &of(theirs.0))
                .unwrap();
        }
        if let ExchangeStep::AskKeys(segments) = &step {
            step = exchange.on_keys(digests(ours.1, segments), digests(theirs.1, segments));
        }
        step
    }

    proptest! {
        /// Whatever writes and deletes happen, in whatever order, the incrementally kept
        /// tree equals one rebuilt from the final contents.
        #[test]
        fn an_incrementally_updated_tree_equals_a_rebuild(
            operations in prop::collection::vec((0u8..40, prop::option::of(0u64..5)), 0..200)
        ) {
            let mut tree = TicTacTree::new();
            let mut contents = Contents::new();
            for (key, digest) in operations {
                apply(&mut tree, &mut contents, vec![key], digest);
            }
            prop_assert_eq!(&tree, &rebuilt(&contents));
            if contents.is_empty() {
                prop_assert_eq!(tree.root(), 0);
            }
        }

        /// An exchange between two replicas finds exactly the keys whose copies differ.
        #[test]
        fn an_exchange_finds_exactly_the_differing_keys(
            shared in prop::collection::btree_map(0u16..2000, 0u64..4, 0..300),
            only_ours in prop::collection::btree_map(2000u16..2100, 0u64..4, 0..5),
            only_theirs in prop::collection::btree_map(2100u16..2200, 0u64..4, 0..5),
            changed in prop::collection::btree_set(0u16..2000, 0..5),
        ) {
            let key = |index: u16| (b"b".to_vec(), index.to_be_bytes().to_vec());
            let mut ours: Contents = shared.iter().map(|(k, d)| (key(*k), *d)).collect();
            let mut theirs = ours.clone();
            ours.extend(only_ours.iter().map(|(k, d)| (key(*k), *d)));
            theirs.extend(only_theirs.iter().map(|(k, d)| (key(*k), *d)));
            let mut expected = Vec::new();
            for index in &changed {
                if let Some(digest) = theirs.get_mut(&key(*index)) {
                    *digest += 100;
                    expected.push((key(*index), true, true));
                }
            }
            expected.extend(only_ours.keys().map(|k| (key(*k), true, false)));
            expected.extend(only_theirs.keys().map(|k| (key(*k), false, true)));
            expected.sort();
            let step = exchange((&rebuilt(&ours), &ours), (&rebuilt(&theirs), &theirs), usize::MAX);
            let found: Vec<_> = match step {
                ExchangeStep::InSync => Vec::new(),
                ExchangeStep::Repair(differences) => differences
                    .into_iter()
                    .map(|d| ((d.bucket, d.key), d.local, d.remote))
                    .collect(),
                other => panic!("the exchange stopped at {other:?}"),
            };
            prop_assert_eq!(found, expected);
        }
    }

    #[test]
    fn equal_trees_are_in_sync_at_the_first_step() {
        let mut contents = Contents::new();
        let mut tree = TicTacTree::new();
        for index in 0..1000u32 {
            apply(
                &mut tree,
                &mut contents,
                index.to_be_bytes().to_vec(),
                Some(1),
            );
        }
        let mut exchange = Exchange::new(10, 10);
        assert_eq!(
            exchange.on_branches(tree.branches(), tree.branches()),
            Ok(ExchangeStep::InSync)
        );
    }

    #[test]
    fn one_differing_key_among_many_narrows_to_its_segment() {
        let mut ours = Contents::new();
        let mut tree = TicTacTree::new();
        for index in 0..100_000u32 {
            apply(&mut tree, &mut ours, index.to_be_bytes().to_vec(), Some(1));
        }
        let mut theirs_tree = tree.clone();
        let mut theirs = ours.clone();
        let missing = 4242u32.to_be_bytes().to_vec();
        apply(&mut theirs_tree, &mut theirs, missing.clone(), None);
        let mut exchange = Exchange::new(10, 10);
        let ExchangeStep::AskSegments(branches) = exchange
            .on_branches(tree.branches(), theirs_tree.branches())
            .unwrap()
        else {
            panic!("the trees differ");
        };
        assert_eq!(branches, vec![branch_of(segment_of(b"b", &missing))]);
        let segments = |t: &TicTacTree| vec![t.segments_of(branches[0]).to_vec()];
        let step = exchange
            .on_segments(&branches, &segments(&tree), &segments(&theirs_tree))
            .unwrap();
        assert_eq!(step, ExchangeStep::ConfirmSegments(branches.clone()));
        let step = exchange
            .on_segments_again(&branches, &segments(&tree), &segments(&theirs_tree))
            .unwrap();
        assert_eq!(
            step,
            ExchangeStep::AskKeys(vec![segment_of(b"b", &missing)])
        );
    }

    /// A segment that differed only while a write was in flight (equal on the second look)
    /// costs no key step; one that still differs, and one that a write changed in between
    /// but that is still out of sync, are asked for.
    #[test]
    fn only_segments_that_differ_twice_reach_the_key_step() {
        let mut ours = Contents::new();
        let mut tree = TicTacTree::new();
        for index in 0..100_000u32 {
            apply(&mut tree, &mut ours, index.to_be_bytes().to_vec(), Some(1));
        }
        let (mut theirs_tree, mut theirs) = (tree.clone(), ours.clone());
        // Three keys in three different branches.
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for index in 0..100_000u32 {
            let key = index.to_be_bytes().to_vec();
            let branch = branch_of(segment_of(b"b", &key));
            if keys
                .iter()
                .all(|k| branch_of(segment_of(b"b", k)) != branch)
            {
                keys.push(key);
            }
            if keys.len() == 3 {
                break;
            }
        }
        let [in_flight, missing, rewritten] = [keys[0].clone(), keys[1].clone(), keys[2].clone()];
        // First look: their copy lacks a write in flight and a write it really missed; ours
        // lacks one of the third key.
        apply(&mut tree, &mut ours, in_flight.clone(), Some(2));
        apply(&mut theirs_tree, &mut theirs, missing.clone(), None);
        apply(&mut tree, &mut ours, rewritten.clone(), Some(3));
        let mut exchange = Exchange::new(10, SEGMENTS);
        let ExchangeStep::AskSegments(branches) = exchange
            .on_branches(tree.branches(), theirs_tree.branches())
            .unwrap()
        else {
            panic!("the trees differ");
        };
        let of = |t: &TicTacTree, branches: &[Branch]| -> Vec<Vec<u32>> {
            branches
                .iter()
                .map(|b| t.segments_of(*b).to_vec())
                .collect()
        };
        let step = exchange
            .on_segments(
                &branches,
                &of(&tree, &branches),
                &of(&theirs_tree, &branches),
            )
            .unwrap();
        let ExchangeStep::ConfirmSegments(confirm) = step else {
            panic!("{step:?}");
        };
        assert_eq!(confirm.len(), 3);
        // Second look: the write in flight has landed on their side; both sides wrote the
        // third key again, and ours still differs from theirs.
        apply(&mut theirs_tree, &mut theirs, in_flight.clone(), Some(2));
        apply(&mut tree, &mut ours, rewritten.clone(), Some(4));
        apply(&mut theirs_tree, &mut theirs, rewritten.clone(), Some(5));
        let step = exchange
            .on_segments_again(&confirm, &of(&tree, &confirm), &of(&theirs_tree, &confirm))
            .unwrap();
        let mut expected = vec![segment_of(b"b", &missing), segment_of(b"b", &rewritten)];
        expected.sort();
        assert_eq!(step, ExchangeStep::AskKeys(expected));
        // And once in sync, a second look ends the exchange.
        let mut exchange = Exchange::new(10, SEGMENTS);
        exchange
            .on_segments(&confirm, &of(&tree, &confirm), &of(&theirs_tree, &confirm))
            .unwrap();
        assert_eq!(
            exchange
                .on_segments_again(&confirm, &of(&tree, &confirm), &of(&tree, &confirm))
                .unwrap(),
            ExchangeStep::InSync
        );
    }

    #[test]
    fn repairs_are_bounded_per_exchange() {
        let ours: Contents = (0..50u16)
            .map(|index| ((b"b".to_vec(), index.to_be_bytes().to_vec()), 1))
            .collect();
        let theirs = Contents::new();
        let step = exchange((&rebuilt(&ours), &ours), (&rebuilt(&theirs), &theirs), 7);
        let ExchangeStep::Repair(differences) = step else {
            panic!("{step:?}");
        };
        assert_eq!(differences.len(), 7);
        assert!(differences.iter().all(|d| d.local && !d.remote));
    }

    #[test]
    fn malformed_answers_are_refused_with_the_reason() {
        let mut exchange = Exchange::new(1, 1);
        let error = exchange.on_branches(&[0; BRANCHES], &[0; 3]).unwrap_err();
        assert!(error.to_string().contains("expected 128"), "{error}");
        let error = exchange
            .on_segments(&[1], &[vec![0; SEGMENTS_PER_BRANCH]], &[vec![0; 2]])
            .unwrap_err();
        assert!(error.to_string().contains("branch 1"), "{error}");
    }

    #[test]
    fn equal_copies_have_equal_digests_whatever_the_merge_order() {
        use crate::core::object::{Content, StoredObject, encode_record};
        let content = |value: &str| Content {
            value: value.as_bytes().to_vec(),
            content_type: String::new(),
            user_metadata: Vec::new(),
            last_modified_micros: 1,
            deleted: false,
        };
        let empty = StoredObject::empty();
        let one = StoredObject::update(StoredObject::new(content("a")), &empty, 7);
        let two = StoredObject::update(StoredObject::new(content("b")), &one, 7);
        let other_actor = StoredObject::update(StoredObject::new(content("a")), &empty, 8);
        let digest = |object: &StoredObject| record_digest(&encode_record(object));
        assert_ne!(digest(&empty), digest(&one));
        assert_ne!(digest(&one), digest(&two), "a sibling differs");
        assert_ne!(digest(&one), digest(&other_actor));
        // Two replicas that merged the same copies in either order agree.
        assert_eq!(
            digest(&two.sync(&other_actor)),
            digest(&other_actor.sync(&two))
        );
        assert_eq!(digest(&two.sync(&two)), digest(&two));
        // The key actor a coordinating replica keeps beside its copy is not replicated.
        let coordinated =
            crate::core::object::encode_local_record(&crate::core::object::LocalRecord {
                object: two.clone(),
                coordinator: Some(crate::core::epoch::KeyActor {
                    actor: 42,
                    incarnation: 3,
                }),
                retiring: true,
            });
        assert_ne!(coordinated, encode_record(&two));
        assert_eq!(record_digest(&coordinated), digest(&two));
    }
}

//! The consistent-hash ring: Q fixed partitions, the claim that assigns them to nodes, and
//! the preference lists that say which nodes hold a key (Dynamo's strategy 3, as in Riak).
//!
//! # Layout
//! - [`key_position`] hashes a bucket and key onto the 64-bit ring; [`Ring::partition_of`]
//!   keeps the top log2(Q) bits, so partition `p` covers positions `[p, p + 1) * 2^64 / Q`.
//! - [`Ring::new`] and [`Ring::rebalance`] are the claim: pure functions of the previous ring,
//!   the sorted member set and the target `n_val`, so every node that computes a ring from
//!   the same inputs gets the same ring.
//! - [`Ring::preference_list`] walks clockwise from a partition, skipping nodes already listed.
//!
//! # What the claim guarantees
//! With Q partitions, S members and `n = min(target_n_val, S)`:
//! - **Balance**, always: every member owns `floor(Q/S)` or `ceil(Q/S)` partitions.
//! - **Determinism**, always: the result depends only on the previous ring, the member *set*
//!   (the order given does not matter) and `target_n_val`.
//! - **Spacing**: every `n` cyclically consecutive partitions (including the wrap from Q-1 to
//!   0) have distinct owners whenever `S >= 2n - 1`, or `Q % S == 0`, or `Q % S >= n`. Outside
//!   these cases it can be impossible (S = n = 3, Q = 64: three distinct owners in every window
//!   of three force period 3, which does not divide 64), and the claim only does its best.
//! - **Movement**: [`Ring::rebalance`] first tries an incremental claim, as Riak's: the
//!   partitions of departed members and the excess of members above their share go to
//!   members below their share, each where the receiver has no copy within `n - 1`
//!   partitions. A join to a balanced ring thus moves only the new member's `floor(Q/S)` or
//!   `ceil(Q/S)` partitions, all to it, and a departure only the departed member's, unless
//!   the spacing needs more: where no receiver fits, a chain of moves makes room, and
//!   crowding left over is moved away the same way. Those chains are the only moves beyond
//!   the minimum: none or a few per change in tests, about Q/8 in the worst case seen (a
//!   departure leaving exactly S = 2n - 1 members, where each partition fits one member).
//!   The striped claim (Riak's `claim_rebalance_n`), rotated to keep as many owners
//!   as a rotation can, replaces the incremental one when that breaks the spacing and the
//!   stripes do not, or when both are spaced and the stripes move less.
//!
//! Measured at Q = 64, n = 3, one member at a time (`growth_and_shrink_one_node_at_a_time`):
//! growing 1→2 moves 32, 2→3: 21, 3→4: 32 (striped: a 3-member ring cannot be spaced, and the
//! 16-move incremental claim keeps its crowding), 4→5: 12, 5→6: 10, .., 15→16: 4. Shrinking
//! moves exactly the departed member's partitions, except 5→4 (34) and 3→2 (27), striped.
//!
//! The preference list always holds `min(n_val, S)` distinct nodes, whatever the spacing.

use crate::core::ids::NodeId;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeSet, VecDeque};

/// Partitions of a new cluster unless the operator chooses otherwise: Riak's default, with
/// which a dozen nodes own 5 or 6 partitions each.
pub const DEFAULT_PARTITION_COUNT: u32 = 64;
/// Fewest partitions a ring may have: below this, one node's share is too coarse to balance.
pub const MIN_PARTITION_COUNT: u32 = 8;
/// Most partitions a ring may have: every ring is gossiped whole, so it must stay small.
pub const MAX_PARTITION_COUNT: u32 = 4096;

/// Index of a partition, `0..partition_count`, clockwise from position 0.
pub type PartitionId = u32;

/// Position of a key on the ring: the first 8 bytes (big-endian) of blake3 over
/// `len(bucket) as u64 BE ‖ bucket ‖ len(key) as u64 BE ‖ key`.
///
/// The length prefixes keep `("ab", "c")` and `("a", "bc")` apart. This encoding decides where
/// every stored key lives, so changing it is a data migration.
pub fn key_position(bucket: &[u8], key: &[u8]) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(bucket.len() as u64).to_be_bytes());
    hasher.update(bucket);
    hasher.update(&(key.len() as u64).to_be_bytes());
    hasher.update(key);
    let digest = hasher.finalize();
    let mut first_bytes = [0u8; 8];
    first_bytes.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_be_bytes(first_bytes)
}

/// Why a ring could not be built or was refused after decoding.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error(
        "partition count {partition_count} is not a power of two in {MIN_PARTITION_COUNT}..={MAX_PARTITION_COUNT}"
    )]
    BadPartitionCount { partition_count: usize },
    #[error("a ring needs at least one member")]
    NoMembers,
    #[error("member {node} is listed more than once")]
    DuplicateMember { node: NodeId },
    #[error(
        "{member_count} members cannot share {partition_count} partitions: every member must own at least one"
    )]
    TooManyMembers {
        member_count: usize,
        partition_count: usize,
    },
    #[error("target n_val must be at least 1")]
    ZeroTargetNVal,
    #[error("ring version {version} is the last one; no newer ring can be made")]
    VersionExhausted { version: u64 },
}

/// The owner of every partition, and the version that orders rings of one cluster.
///
/// The fields are private and every constructor, decoding included, validates them, so a
/// `Ring` in hand always has a power-of-two partition count in range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedRing")]
pub struct Ring {
    version: u64,
    /// `owners[p]` owns partition `p`; the length is the partition count.
    owners: Vec<NodeId>,
    /// The distinct owners, sorted: derived from `owners` once, because every request's
    /// placement asks how many there are.
    #[serde(skip)]
    members: Vec<NodeId>,
}

/// The wire shape of [`Ring`] before validation, so decoding cannot build an invalid ring.
#[derive(Deserialize)]
struct UncheckedRing {
    version: u64,
    owners: Vec<NodeId>,
}

impl TryFrom<UncheckedRing> for Ring {
    type Error = RingError;
    fn try_from(unchecked: UncheckedRing) -> Result<Self, Self::Error> {
        let ring = Ring::assemble(unchecked.version, unchecked.owners);
        ring.validate()?;
        Ok(ring)
    }
}

/// A claim's result and how it was reached, so tests can check the fallback policy.
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))]
struct Claim {
    ring: Ring,
    /// Spacing violations of the incremental attempt (before any fallback).
    incremental_violations: usize,
    /// Partitions the incremental attempt moved.
    incremental_moves: usize,
    /// Whether the fresh striped claim replaced the incremental one.
    used_striped_fallback: bool,
    /// Whether swaps beyond the incremental claim's moves removed its crowding.
    used_swap_repair: bool,
}

impl Ring {
    /// Fresh claim for a new cluster: partition `i` goes to member `i mod S` (members sorted),
    /// with the last partial stripe shifted so the wrap from Q-1 to 0 keeps the spacing.
    /// The first ring is version 1, so version 0 never names a real ring.
    ///
    /// `partition_count` must be a power of two in 8..=4096; `members` must be non-empty,
    /// without duplicates, and no more than the partitions.
    pub fn new(
        partition_count: u32,
        members: &[NodeId],
        target_n_val: usize,
    ) -> Result<Ring, RingError> {
        let partition_count = partition_count as usize;
        check_partition_count(partition_count)?;
        let members = sorted_members(members, partition_count, target_n_val)?;
        let spacing = target_n_val.min(members.len());
        let owners = striped_owners(partition_count, members.len(), spacing)
            .into_iter()
            .map(|member| members[member].clone())
            .collect();
        Ok(Ring::assemble(1, owners))
    }

    /// Claim for a changed member set, starting from `self`: version + 1, and as few moved
    /// partitions as the incremental claim allows (see the module doc for the exact policy).
    pub fn rebalance(&self, members: &[NodeId], target_n_val: usize) -> Result<Ring, RingError> {
        self.claim(members, target_n_val).map(|claim| claim.ring)
    }

    fn claim(&self, members: &[NodeId], target_n_val: usize) -> Result<Claim, RingError> {
        self.validate()?;
        let partition_count = self.owners.len();
        let members = sorted_members(members, partition_count, target_n_val)?;
        let version = self
            .version
            .checked_add(1)
            .ok_or(RingError::VersionExhausted {
                version: self.version,
            })?;
        let spacing = target_n_val.min(members.len());
        let current: Vec<Option<usize>> = self
            .owners
            .iter()
            .map(|owner| members.binary_search(owner).ok())
            .collect();

        // The fallback policy: keep the incremental claim when it is spaced and moves no more
        // than it must; otherwise take the rotated stripes if they are spaced and the
        // incremental claim is not, or if both are spaced and the stripes move less.
        let mut used_swap_repair = false;
        let incremental = incremental_owners(&current, members.len(), spacing).map(|owners| {
            // Where the incremental claim leaves crowding, swaps of two partitions' owners
            // (which keep the balance) can often remove it for a few more moves than the
            // minimum, far fewer than the stripes take. A repair that cannot remove all of it
            // (spacing may be impossible) is not worth its moves.
            let mut repaired = owners.clone();
            repair_by_swaps(&current, &mut repaired, spacing);
            if count_violations(&repaired, spacing) == 0 {
                used_swap_repair = repaired != owners;
                repaired
            } else {
                owners
            }
        });
        let incremental_violations = incremental
            .as_ref()
            .map_or(usize::MAX, |owners| count_violations(owners, spacing));
        let incremental_moves = incremental
            .as_ref()
            .map_or(usize::MAX, |owners| count_moves(&current, owners));
        let (owners, used_striped_fallback) = match incremental {
            Some(owners)
                if incremental_violations == 0
                    && incremental_moves == least_moves(&current, members.len()) =>
            {
                (owners, false)
            }
            incremental => {
                let striped = best_rotated_stripes(&current, members.len(), spacing);
                let striped_better = count_violations(&striped, spacing) == 0
                    && (incremental_violations > 0
                        || count_moves(&current, &striped) < incremental_moves);
                match incremental {
                    Some(owners) if !striped_better => (owners, false),
                    _ => (striped, true),
                }
            }
        };
        let ring = Ring::assemble(
            version,
            owners
                .into_iter()
                .map(|member| members[member].clone())
                .collect(),
        );
        Ok(Claim {
            ring,
            incremental_violations,
            incremental_moves,
            used_striped_fallback,
            used_swap_repair: used_swap_repair && !used_striped_fallback,
        })
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// A ring of the given owners (one per partition) and version.
    pub fn from_owners(version: u64, owners: Vec<NodeId>) -> Result<Ring, RingError> {
        let ring = Ring::assemble(version, owners);
        ring.validate()?;
        Ok(ring)
    }

    /// A ring of these owners, with its member list derived from them (not validated).
    fn assemble(version: u64, owners: Vec<NodeId>) -> Ring {
        let distinct: BTreeSet<&NodeId> = owners.iter().collect();
        let members = distinct.into_iter().cloned().collect();
        Ring {
            version,
            owners,
            members,
        }
    }

    /// The same owners under another version (the cluster state sets it).
    pub fn with_version(self, version: u64) -> Ring {
        Ring { version, ..self }
    }

    /// The owner of every partition, in partition order.
    pub fn owners(&self) -> &[NodeId] {
        &self.owners
    }

    pub fn partition_count(&self) -> u32 {
        // Validated to be at most MAX_PARTITION_COUNT, so this never saturates.
        u32::try_from(self.owners.len()).unwrap_or(u32::MAX)
    }

    /// The partition holding `position`: its top log2(Q) bits.
    pub fn partition_of(&self, position: u64) -> PartitionId {
        let bits = self.owners.len().trailing_zeros();
        if bits == 0 || bits >= u64::BITS {
            return 0;
        }
        // At most 12 bits remain after the shift, so the cast is lossless.
        (position >> (u64::BITS - bits)) as PartitionId
    }

    pub fn partition_for_key(&self, bucket: &[u8], key: &[u8]) -> PartitionId {
        self.partition_of(key_position(bucket, key))
    }

    /// The owner of `partition`.
    ///
    /// # Panics
    /// If `partition >= partition_count()`: partition ids come from this ring, not from users.
    pub fn owner(&self, partition: PartitionId) -> &NodeId {
        &self.owners[partition as usize]
    }

    /// Every node owning at least one partition, sorted and distinct.
    pub fn members(&self) -> Vec<NodeId> {
        self.members.clone()
    }

    /// How many distinct nodes own partitions.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    pub fn partitions_owned_by(&self, node: &NodeId) -> Vec<PartitionId> {
        (0..self.partition_count())
            .filter(|&partition| self.owner(partition) == node)
            .collect()
    }

    /// Walk clockwise from `partition` (itself first), collecting owners not yet listed, until
    /// `n_val` distinct nodes or every member is listed. Each entry is the partition whose owner
    /// was taken and that owner; the first `n_val` entries are the primaries, and a sloppy
    /// quorum continues the same walk.
    ///
    /// # Panics
    /// If `partition >= partition_count()`.
    pub fn preference_list(
        &self,
        partition: PartitionId,
        n_val: usize,
    ) -> Vec<(PartitionId, NodeId)> {
        let partition_count = self.partition_count();
        assert!(
            partition < partition_count,
            "partition {partition} is not on this ring"
        );
        let mut list: Vec<(PartitionId, NodeId)> = Vec::with_capacity(n_val);
        for step in 0..partition_count {
            if list.len() == n_val {
                break;
            }
            let current = (partition + step) % partition_count;
            let owner = self.owner(current);
            if !list.iter().any(|(_, listed)| listed == owner) {
                list.push((current, owner.clone()));
            }
        }
        list
    }

    /// Partitions whose owner differs in `next`, as (partition, from, to): the handoffs a
    /// ring change needs. Partitions beyond the shorter ring are ignored; rings of one
    /// cluster always share a partition count.
    pub fn transfers_to(&self, next: &Ring) -> Vec<(PartitionId, NodeId, NodeId)> {
        (0..self.partition_count().min(next.partition_count()))
            .filter_map(|partition| {
                let from = self.owner(partition);
                let to = next.owner(partition);
                (from != to).then(|| (partition, from.clone(), to.clone()))
            })
            .collect()
    }

    /// Number of windows of `n_val` cyclically consecutive partitions in which some node
    /// appears twice: 0 means every such window maps to `n_val` distinct nodes, so the first
    /// `n_val` partitions walked from any partition are already the whole preference list.
    pub fn spacing_violations(&self, n_val: usize) -> usize {
        let members = &self.members;
        let owners: Vec<usize> = self
            .owners
            .iter()
            .map(|owner| members.binary_search(owner).unwrap_or(0))
            .collect();
        count_violations(&owners, n_val)
    }

    /// Check a decoded ring: a power-of-two partition count in 8..=4096 and at least one
    /// owner. Node ids are validated when they are decoded.
    pub fn validate(&self) -> Result<(), RingError> {
        if self.owners.is_empty() {
            return Err(RingError::NoMembers);
        }
        check_partition_count(self.owners.len())
    }
}

fn check_partition_count(partition_count: usize) -> Result<(), RingError> {
    let in_range =
        (MIN_PARTITION_COUNT as usize..=MAX_PARTITION_COUNT as usize).contains(&partition_count);
    if in_range && partition_count.is_power_of_two() {
        Ok(())
    } else {
        Err(RingError::BadPartitionCount { partition_count })
    }
}

/// The members sorted (the claim works on indices into this order, which makes it
/// independent of the order given), after checking they can form a ring.
fn sorted_members(
    members: &[NodeId],
    partition_count: usize,
    target_n_val: usize,
) -> Result<Vec<NodeId>, RingError> {
    if target_n_val == 0 {
        return Err(RingError::ZeroTargetNVal);
    }
    if members.is_empty() {
        return Err(RingError::NoMembers);
    }
    let mut sorted = members.to_vec();
    sorted.sort();
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(RingError::DuplicateMember {
            node: pair[0].clone(),
        });
    }
    if sorted.len() > partition_count {
        return Err(RingError::TooManyMembers {
            member_count: sorted.len(),
            partition_count,
        });
    }
    Ok(sorted)
}

/// Whether the window of `window` cyclically consecutive partitions starting at `start` names
/// some owner twice.
fn window_crowded(owners: &[usize], start: usize, window: usize) -> bool {
    let partition_count = owners.len();
    (0..window).any(|offset| {
        let owner = owners[(start + offset) % partition_count];
        (offset + 1..window).any(|later| owners[(start + later) % partition_count] == owner)
    })
}

/// Crowded windows among those containing partition `a` or `b`.
fn crowded_windows_around(owners: &[usize], a: usize, b: usize, window: usize) -> usize {
    let partition_count = owners.len();
    let mut starts: Vec<usize> = (0..window)
        .flat_map(|back| {
            [
                (a + partition_count - back) % partition_count,
                (b + partition_count - back) % partition_count,
            ]
        })
        .collect();
    starts.sort_unstable();
    starts.dedup();
    starts
        .into_iter()
        .filter(|&start| window_crowded(owners, start, window))
        .count()
}

/// Most crowded windows [`repair_by_swaps`] takes on (and most swaps it makes).
const MAX_REPAIRED_WINDOWS: usize = 64;

/// Removes crowded windows by swapping the owners of two partitions at a time, each step the
/// swap that removes the most crowding and, among those, moves the fewest partitions away
/// from `current`; stops when no swap helps. Deterministic: ties go to the lowest indices.
fn repair_by_swaps(current: &[Option<usize>], owners: &mut [usize], window: usize) {
    let partition_count = owners.len();
    if window <= 1 || partition_count < window {
        return;
    }
    // Worth trying only where spacing is possible (the cases the module doc lists) and the
    // crowding is local: each step costs O(crowded × Q × window²), and wide crowding is what
    // the stripes are for.
    let member_count = owners.iter().max().map_or(0, |&highest| highest + 1);
    let spacing_possible = member_count >= 2 * window - 1
        || partition_count.is_multiple_of(member_count)
        || partition_count % member_count >= window;
    if !spacing_possible || count_violations(owners, window) > MAX_REPAIRED_WINDOWS {
        return;
    }
    for _ in 0..MAX_REPAIRED_WINDOWS {
        if count_violations(owners, window) == 0 {
            return;
        }
        // One side of a useful swap lies in a crowded window.
        let crowded: BTreeSet<usize> = (0..partition_count)
            .filter(|&start| window_crowded(owners, start, window))
            .flat_map(|start| (0..window).map(move |offset| (start + offset) % partition_count))
            .collect();
        let mut best: Option<(isize, isize, usize, usize)> = None;
        for &a in &crowded {
            for b in 0..partition_count {
                if owners[a] == owners[b] {
                    continue;
                }
                let moved = |owners: &[usize]| {
                    [a, b]
                        .iter()
                        .filter(|&&p| current[p] != Some(owners[p]))
                        .count() as isize
                };
                let crowded_before = crowded_windows_around(owners, a, b, window) as isize;
                let moved_before = moved(owners);
                owners.swap(a, b);
                let crowded_after = crowded_windows_around(owners, a, b, window) as isize;
                let moved_after = moved(owners);
                owners.swap(a, b);
                let gain = crowded_before - crowded_after;
                let cost = moved_after - moved_before;
                let (low, high) = (a.min(b), a.max(b));
                if gain > 0
                    && best.is_none_or(|(best_gain, best_cost, best_low, best_high)| {
                        (gain, -cost, Reverse((low, high)))
                            > (best_gain, -best_cost, Reverse((best_low, best_high)))
                    })
                {
                    best = Some((gain, cost, low, high));
                }
            }
        }
        match best {
            Some((_, _, a, b)) => owners.swap(a, b),
            None => return,
        }
    }
}

/// Partitions whose owner differs between `current` and `next`.
fn count_moves(current: &[Option<usize>], next: &[usize]) -> usize {
    current
        .iter()
        .zip(next)
        .filter(|(current, next)| **current != Some(**next))
        .count()
}

/// The fewest moves any balanced claim needs from `current` (member indices, `None` for a
/// departed owner): every departed member's partition, every partition above k + 1, and one
/// from each k + 1 holder beyond the r that may keep it.
fn least_moves(current: &[Option<usize>], member_count: usize) -> usize {
    let partition_count = current.len();
    let share = partition_count / member_count;
    let members_with_extra = partition_count % member_count;
    let mut counts = vec![0usize; member_count];
    for &member in current.iter().flatten() {
        counts[member] += 1;
    }
    let departed = current.iter().filter(|owner| owner.is_none()).count();
    let excess: usize = counts
        .iter()
        .map(|&count| count.saturating_sub(share + 1))
        .sum();
    let above_share = counts.iter().filter(|&&count| count > share).count();
    departed + excess + above_share.saturating_sub(members_with_extra)
}

/// Striping with a repaired tail. With Q = kS + r, partitions below kS go to `i mod S`. The r
/// tail partitions go to members m, m+1, .., m+r-1: member m+t sits S - m after its copy in
/// the last full stripe and r + m before its copy in the first one, so spacing n holds when
/// n - r <= m <= S - n. Taking m = max(0, n - r) satisfies that whenever r == 0, r >= n or
/// S >= 2n - r (in particular S >= 2n - 1).
fn striped_owners(partition_count: usize, member_count: usize, spacing: usize) -> Vec<usize> {
    let full_stripes_end = partition_count / member_count * member_count;
    let tail_length = partition_count % member_count;
    let tail_first_member = spacing
        .saturating_sub(tail_length)
        .min(member_count - tail_length);
    (0..partition_count)
        .map(|partition| {
            if partition < full_stripes_end {
                partition % member_count
            } else {
                tail_first_member + partition - full_stripes_end
            }
        })
        .collect()
}

/// The striped claim rotated by the offset that leaves the most partitions with their
/// current owner. Rotation keeps balance and spacing, so this only saves movement.
fn best_rotated_stripes(
    current: &[Option<usize>],
    member_count: usize,
    spacing: usize,
) -> Vec<usize> {
    let partition_count = current.len();
    let striped = striped_owners(partition_count, member_count, spacing);
    let moves_with = |offset: usize| {
        (0..partition_count)
            .filter(|&partition| {
                current[partition] != Some(striped[(partition + offset) % partition_count])
            })
            .count()
    };
    let best_offset = (0..partition_count)
        .min_by_key(|&offset| (moves_with(offset), offset))
        .unwrap_or(0);
    (0..partition_count)
        .map(|partition| striped[(partition + best_offset) % partition_count])
        .collect()
}

/// Failed attempts after which spacing repair gives up. A repair that succeeds meets few dead
/// ends; when the spacing is out of reach, this bounds the work (each attempt searches every
/// partition and member) and the striped fallback decides.
const REPAIR_FAILURE_LIMIT: usize = 64;

/// The incremental claim, as Riak's: departed members' partitions and the excess of members
/// above their share go to members below their share, placed where the receiver has no copy
/// within `spacing - 1` partitions. Returns the owners by member index, or `None` only if the
/// counting argument on `IncrementalClaim` were broken.
fn incremental_owners(
    current: &[Option<usize>],
    member_count: usize,
    spacing: usize,
) -> Option<Vec<usize>> {
    let mut claim = IncrementalClaim::new(current, member_count, spacing);
    claim.fill_orphans()?;
    claim.fill_shortfalls()?;
    claim.repair_spacing();
    claim.owners.into_iter().collect()
}

/// State of an incremental claim in progress, by member index (`None`: no owner yet).
///
/// Shares: with Q = kS + r, r members end with k + 1 and the rest with k. Which members get
/// the k + 1 is decided as the claim goes, so a member already holding k + 1 keeps it and a
/// receiver can take a last partition where it fits best. While unbalanced, a receiver and
/// (once no partition lacks an owner) a donor always exist: if every member had at least k
/// and at least r of them k + 1 or more, the counts would already sum to Q or more.
#[derive(Clone)]
struct IncrementalClaim<'a> {
    original: &'a [Option<usize>],
    owners: Vec<Option<usize>>,
    counts: Vec<usize>,
    share: usize,
    members_with_extra: usize,
    /// Members holding more than `share`.
    above_share: usize,
    spacing: usize,
}

impl<'a> IncrementalClaim<'a> {
    fn new(original: &'a [Option<usize>], member_count: usize, spacing: usize) -> Self {
        let partition_count = original.len();
        let mut counts = vec![0usize; member_count];
        for &member in original.iter().flatten() {
            counts[member] += 1;
        }
        let share = partition_count / member_count;
        IncrementalClaim {
            original,
            owners: original.to_vec(),
            above_share: counts.iter().filter(|&&count| count > share).count(),
            counts,
            share,
            members_with_extra: partition_count % member_count,
            spacing,
        }
    }

    fn partition_count(&self) -> usize {
        self.owners.len()
    }

    fn member_count(&self) -> usize {
        self.counts.len()
    }

    fn can_receive(&self, member: usize) -> bool {
        let count = self.counts[member];
        count < self.share || (count == self.share && self.above_share < self.members_with_extra)
    }

    fn can_donate(&self, member: usize) -> bool {
        let count = self.counts[member];
        count > self.share + 1
            || (count == self.share + 1 && self.above_share > self.members_with_extra)
    }

    fn give(&mut self, partition: usize, member: usize) {
        if let Some(previous) = self.owners[partition].replace(member) {
            if self.counts[previous] == self.share + 1 {
                self.above_share -= 1;
            }
            self.counts[previous] -= 1;
        }
        self.counts[member] += 1;
        if self.counts[member] == self.share + 1 {
            self.above_share += 1;
        }
    }

    fn take_away(&mut self, partition: usize) {
        if let Some(previous) = self.owners[partition].take() {
            if self.counts[previous] == self.share + 1 {
                self.above_share -= 1;
            }
            self.counts[previous] -= 1;
        }
    }

    /// Whether `member` has no copy within `spacing - 1` partitions of `partition`.
    fn fits(&self, partition: usize, member: usize) -> bool {
        let partition_count = self.partition_count();
        (1..self.spacing.min(partition_count)).all(|distance| {
            self.owners[(partition + distance) % partition_count] != Some(member)
                && self.owners[(partition + partition_count - distance) % partition_count]
                    != Some(member)
        })
    }

    /// Whether the owner of `partition` has another copy within `spacing - 1` of it.
    fn crowded(&self, partition: usize) -> bool {
        self.owners[partition].is_some_and(|owner| !self.fits(partition, owner))
    }

    /// Departed members' partitions must move: each goes to the receiver furthest below its
    /// share among those that fit there, or through a chain (see `place_spaced`); only when
    /// neither exists is the spacing given up for that partition.
    fn fill_orphans(&mut self) -> Option<()> {
        for orphan in 0..self.partition_count() {
            if self.owners[orphan].is_some() {
                continue;
            }
            if !self.place_spaced(orphan) {
                let receiver = (0..self.member_count())
                    .filter(|&member| self.can_receive(member))
                    .min_by_key(|&member| (self.counts[member], member))?;
                self.give(orphan, receiver);
            }
        }
        Some(())
    }

    /// Members above their share give to those below, the neediest receiver first. The
    /// receiver takes, in order of preference, a partition where it fits, one where the donor
    /// is crowded (so the move also repairs spacing), and the one furthest from its own
    /// partitions, which spreads its partitions evenly and leaves room for later claims.
    fn fill_shortfalls(&mut self) -> Option<()> {
        while let Some(receiver) = (0..self.member_count())
            .filter(|&member| self.can_receive(member))
            .min_by_key(|&member| (self.counts[member], member))
        {
            let distances = distances_to_member(&self.owners, receiver);
            let partition = (0..self.partition_count())
                .filter(|&partition| {
                    self.owners[partition].is_some_and(|donor| self.can_donate(donor))
                })
                .max_by_key(|&partition| {
                    (
                        distances[partition] >= self.spacing,
                        self.crowded(partition),
                        distances[partition],
                        Reverse(partition),
                    )
                })?;
            self.give(partition, receiver);
        }
        Some(())
    }

    /// Move crowded partitions away, each through `place_spaced`, in passes over the ring
    /// while a pass makes progress. Every success leaves fewer crowded partitions (the new
    /// owners fit where they take, the givers only lose copies), so this ends. If crowding
    /// remains, the claim is left as it was: moving partitions without reaching full spacing
    /// buys little, and the caller may still prefer the striped claim.
    fn repair_spacing(&mut self) {
        let before = self.clone();
        let mut failures_left = REPAIR_FAILURE_LIMIT;
        let mut progress = true;
        while progress && failures_left > 0 {
            progress = false;
            for partition in 0..self.partition_count() {
                if !self.crowded(partition) {
                    continue;
                }
                let attempt = self.clone();
                self.take_away(partition);
                if self.place_spaced(partition) {
                    progress = true;
                } else {
                    *self = attempt;
                    failures_left -= 1;
                    if failures_left == 0 {
                        break;
                    }
                }
            }
        }
        if (0..self.partition_count()).any(|partition| self.crowded(partition)) {
            *self = before;
        }
    }

    /// Give `orphan` (a partition without owner) to a receiver that fits there, else through
    /// a chain: the orphan goes to a member that fits, which passes one of its partitions to
    /// another member that fits there, and so on until a member below its share is reached.
    /// Every member in the chain but the last keeps its count.
    ///
    /// The chain is the cheapest in moves (0-1 breadth-first search over members): passing on
    /// a partition that already moved in this claim costs nothing, passing one still with its
    /// original owner costs one extra move. Returns false, changing nothing, if no placement
    /// keeps the spacing.
    fn place_spaced(&mut self, orphan: usize) -> bool {
        let member_count = self.member_count();
        let direct = (0..member_count)
            .filter(|&member| self.can_receive(member) && self.fits(orphan, member))
            .min_by_key(|&member| (self.counts[member], member));
        if let Some(receiver) = direct {
            self.give(orphan, receiver);
            return true;
        }
        // The chain starts at any member that fits at the orphan.
        let mut cost: Vec<usize> = (0..member_count)
            .map(|member| {
                if self.fits(orphan, member) {
                    0
                } else {
                    usize::MAX
                }
            })
            .collect();
        let mut queue: VecDeque<usize> = (0..member_count)
            .filter(|&member| cost[member] == 0)
            .collect();
        // How each member was reached: from which member, taking which of its partitions.
        let mut reached_by: Vec<Option<(usize, usize)>> = vec![None; member_count];
        let mut settled = vec![false; member_count];
        while let Some(giver) = queue.pop_front() {
            if settled[giver] {
                continue;
            }
            settled[giver] = true;
            if self.can_receive(giver) {
                continue;
            }
            for partition in 0..self.partition_count() {
                if self.owners[partition] != Some(giver) {
                    continue;
                }
                let extra = usize::from(self.original[partition] == Some(giver));
                let new_cost = cost[giver] + extra;
                for taker in 0..member_count {
                    if !settled[taker] && new_cost < cost[taker] && self.fits(partition, taker) {
                        cost[taker] = new_cost;
                        reached_by[taker] = Some((giver, partition));
                        if extra == 0 {
                            queue.push_front(taker);
                        } else {
                            queue.push_back(taker);
                        }
                    }
                }
            }
        }
        let Some(last) = (0..member_count)
            .filter(|&member| self.can_receive(member) && cost[member] < usize::MAX)
            .min_by_key(|&member| (cost[member], self.counts[member], member))
        else {
            return false;
        };
        let mut taker = last;
        while let Some((giver, partition)) = reached_by[taker] {
            self.give(partition, taker);
            taker = giver;
        }
        self.give(orphan, taker);
        true
    }
}

/// For every partition, the cyclic distance to the nearest partition owned by `member`
/// (the partition count if it owns none).
fn distances_to_member(owners: &[Option<usize>], member: usize) -> Vec<usize> {
    let partition_count = owners.len();
    let mut distances = vec![partition_count; partition_count];
    // Two laps each way carry the nearest copy across the wrap from Q-1 to 0.
    let mut since_last: Option<usize> = None;
    for step in 0..2 * partition_count {
        let partition = step % partition_count;
        since_last = if owners[partition] == Some(member) {
            Some(0)
        } else {
            since_last.map(|distance| distance + 1)
        };
        if let Some(distance) = since_last {
            distances[partition] = distances[partition].min(distance);
        }
    }
    since_last = None;
    for step in (0..2 * partition_count).rev() {
        let partition = step % partition_count;
        since_last = if owners[partition] == Some(member) {
            Some(0)
        } else {
            since_last.map(|distance| distance + 1)
        };
        if let Some(distance) = since_last {
            distances[partition] = distances[partition].min(distance);
        }
    }
    distances
}

/// Windows of `window` cyclically consecutive partitions holding some owner twice, in O(Q).
/// A copy of a member `gap` partitions after another lies in the windows starting from
/// `gap - window + 1` before the first copy up to the first copy; a difference array counts
/// the union of those starts.
fn count_violations(owners: &[usize], window: usize) -> usize {
    let partition_count = owners.len();
    if window <= 1 || partition_count == 0 {
        return 0;
    }
    let member_count = owners.iter().max().map_or(0, |&highest| highest + 1);
    let distinct = owners.iter().collect::<BTreeSet<_>>().len();
    if window > distinct {
        // More places than owners: every window repeats someone.
        return partition_count;
    }
    let mut next_copy: Vec<Option<usize>> = vec![None; member_count];
    let mut window_starts = vec![0isize; partition_count + 1];
    for step in (0..2 * partition_count).rev() {
        let partition = step % partition_count;
        let owner = owners[partition];
        if step < partition_count
            && let Some(next) = next_copy[owner]
        {
            let gap = next - step;
            if gap < window {
                // Windows starting at step + gap - (window - 1) ..= step, cyclically.
                let first = (step + gap + partition_count - (window - 1)) % partition_count;
                let count = window - gap;
                if first + count <= partition_count {
                    window_starts[first] += 1;
                    window_starts[first + count] -= 1;
                } else {
                    window_starts[first] += 1;
                    window_starts[partition_count] -= 1;
                    window_starts[0] += 1;
                    window_starts[first + count - partition_count] -= 1;
                }
            }
        }
        next_copy[owner] = Some(step);
    }
    let mut covering = 0isize;
    let mut violations = 0;
    for change in &window_starts[..partition_count] {
        covering += change;
        if covering > 0 {
            violations += 1;
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    /// `node-00`, `node-01`, ..: sorted order is joining order.
    fn nodes(count: usize) -> Vec<NodeId> {
        (0..count)
            .map(|index| node(&format!("node-{index:02}")))
            .collect()
    }

    fn assert_balanced(ring: &Ring, member_count: usize) {
        let partition_count = ring.partition_count() as usize;
        let mut counts: BTreeMap<&NodeId, usize> = BTreeMap::new();
        for partition in 0..ring.partition_count() {
            *counts.entry(ring.owner(partition)).or_default() += 1;
        }
        assert_eq!(counts.len(), member_count, "every member owns something");
        let low = partition_count / member_count;
        let high = partition_count.div_ceil(member_count);
        for (owner, count) in counts {
            assert!(
                (low..=high).contains(&count),
                "{owner} owns {count}, not {low}..={high}"
            );
        }
    }

    fn assert_preference_lists_distinct(ring: &Ring, n_val: usize) {
        let member_count = ring.member_count();
        for partition in 0..ring.partition_count() {
            let list = ring.preference_list(partition, n_val);
            let distinct: BTreeSet<&NodeId> = list.iter().map(|(_, owner)| owner).collect();
            assert_eq!(list.len(), n_val.min(member_count));
            assert_eq!(distinct.len(), list.len());
            assert_eq!(list[0], (partition, ring.owner(partition).clone()));
            for (taken, owner) in &list {
                assert_eq!(ring.owner(*taken), owner);
            }
        }
    }

    /// Whether the module doc promises zero spacing violations for `n_val`.
    fn spacing_promised(partition_count: usize, member_count: usize, n_val: usize) -> bool {
        let remainder = partition_count % member_count;
        member_count >= n_val
            && (member_count >= 2 * n_val - 1 || remainder == 0 || remainder >= n_val)
    }

    fn moved(before: &Ring, after: &Ring) -> usize {
        before.transfers_to(after).len()
    }

    /// The fewest moves any balanced claim for `members` needs from `before`, counted from
    /// the rings themselves (independently of the claim's own bookkeeping).
    fn fewest_moves(before: &Ring, members: &[NodeId]) -> usize {
        let partition_count = before.partition_count() as usize;
        let share = partition_count / members.len();
        let members_with_extra = partition_count % members.len();
        let counts: Vec<usize> = members
            .iter()
            .map(|member| before.partitions_owned_by(member).len())
            .collect();
        let departed = partition_count - counts.iter().sum::<usize>();
        let excess: usize = counts
            .iter()
            .map(|&count| count.saturating_sub(share + 1))
            .sum();
        let above_share = counts.iter().filter(|&&count| count > share).count();
        departed + excess + above_share.saturating_sub(members_with_extra)
    }

    /// The fallback policy, as implications on what `claim` reports.
    fn assert_policy(before: &Ring, members: &[NodeId], claim: &Claim) {
        let fewest = fewest_moves(before, members);
        let moved_count = moved(before, &claim.ring);
        assert!(moved_count >= fewest);
        if claim.incremental_violations == 0 && claim.incremental_moves == fewest {
            assert!(
                !claim.used_striped_fallback,
                "a spaced, minimal claim is kept"
            );
        }
        if claim.used_striped_fallback {
            assert!(claim.incremental_violations > 0 || moved_count < claim.incremental_moves);
        } else {
            assert_eq!(moved_count, claim.incremental_moves);
        }
    }

    fn naive_violations(owners: &[usize], window: usize) -> usize {
        (0..owners.len())
            .filter(|&start| {
                let seen: BTreeSet<usize> = (0..window)
                    .map(|offset| owners[(start + offset) % owners.len()])
                    .collect();
                seen.len() < window
            })
            .count()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn fresh_claims_are_balanced_spaced_and_deterministic(
            partition_count in prop::sample::select(vec![8u32, 16, 64, 256, 1024]),
            member_count in 1usize..=40,
            n_val in 2usize..=5,
            rotation in 0usize..40,
        ) {
            let member_count = member_count.min(partition_count as usize);
            let members = nodes(member_count);
            let ring = Ring::new(partition_count, &members, n_val).unwrap();
            assert_balanced(&ring, member_count);
            assert_preference_lists_distinct(&ring, n_val);
            if spacing_promised(partition_count as usize, member_count, n_val) {
                prop_assert_eq!(ring.spacing_violations(n_val), 0);
            }
            if member_count < n_val && (partition_count as usize).is_multiple_of(member_count) {
                prop_assert_eq!(ring.spacing_violations(member_count), 0);
            }
            let mut shuffled = members.clone();
            shuffled.rotate_left(rotation % member_count);
            shuffled.reverse();
            prop_assert_eq!(Ring::new(partition_count, &shuffled, n_val).unwrap(), ring);
        }

        #[test]
        fn rebalances_are_balanced_spaced_and_follow_the_policy(
            partition_count in prop::sample::select(vec![8u32, 16, 64, 256, 1024]),
            before_count in 1usize..=40,
            removed in prop::collection::btree_set(0usize..40, 0..4),
            added in 0usize..4,
            n_val in 2usize..=5,
        ) {
            let before_count = before_count.min(partition_count as usize);
            let before = Ring::new(partition_count, &nodes(before_count), n_val).unwrap();
            let mut members: Vec<NodeId> = nodes(before_count + added)
                .into_iter()
                .enumerate()
                .filter(|(index, _)| !removed.contains(index))
                .map(|(_, member)| member)
                .collect();
            members.truncate(partition_count as usize);
            prop_assume!(!members.is_empty());
            let claim = before.claim(&members, n_val).unwrap();
            let after = &claim.ring;
            prop_assert_eq!(after.version(), before.version() + 1);
            assert_balanced(after, members.len());
            assert_preference_lists_distinct(after, n_val);
            if spacing_promised(partition_count as usize, members.len(), n_val) {
                prop_assert_eq!(after.spacing_violations(n_val), 0);
            }
            assert_policy(&before, &members, &claim);
            if !claim.used_striped_fallback && moved(&before, after) == fewest_moves(&before, &members) {
                // A minimal claim only empties departed members and excesses into shortfalls.
                let share = partition_count as usize / members.len();
                let joined: Vec<&NodeId> =
                    members.iter().filter(|member| !before.members().contains(member)).collect();
                let departed: Vec<NodeId> =
                    before.members().into_iter().filter(|member| !members.contains(member)).collect();
                for (partition, from, to) in before.transfers_to(after) {
                    let from_count = before.partitions_owned_by(&from).len();
                    let to_count = before.partitions_owned_by(&to).len();
                    prop_assert!(!members.contains(&from) || from_count > share, "{partition}");
                    prop_assert!(to_count <= share, "{partition}");
                    if departed.is_empty() && joined.len() == 1 {
                        prop_assert_eq!(&to, joined[0], "a single join only feeds the new member");
                    }
                    if joined.is_empty() && departed.len() == 1 {
                        prop_assert_eq!(&from, &departed[0], "a single departure only empties it");
                    }
                }
            }
            let mut reversed = members.clone();
            reversed.reverse();
            prop_assert_eq!(&before.rebalance(&reversed, n_val).unwrap(), after);
        }

        #[test]
        fn violations_match_a_naive_count(
            owners in prop::collection::vec(0usize..6, 1..40),
            window in 0usize..8,
        ) {
            prop_assert_eq!(count_violations(&owners, window), naive_violations(&owners, window));
        }
    }

    /// Grow 1 → 16 members one at a time at Q = 64, n_val = 3, then shrink back to 1.
    ///
    /// Measured moves (* = striped fallback):
    /// grow  1→2: 32, 3: 21, 4: 26+, 5: 12, 6: 10, 7: 9, 8: 8, 9: 7, 10: 6, 11: 5, 12: 5,
    ///       13: 4, 14: 4, 15: 4, 16: 4;
    /// shrink 16→15: 4, 14: 4, 13: 4, 12: 5, 11: 5, 10: 5, 9: 6, 8: 7, 7: 8, 6: 9, 5: 10,
    ///       4: 49*, 3: 16, 2: 27+, 1: 32 (* striped, + repaired by swaps).
    /// Every other incremental step moves exactly the fewest partitions a balanced claim can.
    #[test]
    fn growth_and_shrink_one_node_at_a_time() {
        let n_val = 3;
        let all = nodes(16);
        let mut ring = Ring::new(64, &all[..1], n_val).unwrap();
        let mut fallbacks = Vec::new();
        let mut moves = Vec::new();
        for member_count in (2..=16).chain((1..=15).rev()) {
            let previous_count = ring.member_count();
            let members = &all[..member_count];
            let claim = ring.claim(members, n_val).unwrap();
            assert_balanced(&claim.ring, member_count);
            assert_policy(&ring, members, &claim);
            let moved_count = moved(&ring, &claim.ring);
            if claim.used_striped_fallback {
                fallbacks.push((previous_count, member_count));
            } else if claim.used_swap_repair {
                // Swaps that removed crowding cost moves beyond the minimum, fewer than the
                // stripes (which would move about twice the minimum here).
                assert_eq!(claim.ring.spacing_violations(n_val.min(member_count)), 0);
                let fewest = fewest_moves(&ring, members);
                assert!(
                    moved_count < 2 * fewest,
                    "{previous_count}→{member_count}: {moved_count} moved, {fewest} at least"
                );
            } else {
                // A join to a balanced ring takes at most the new member's share; a departure
                // moves the departed member's partitions, at most ceil(Q/S_old) <= ceil(Q/S_new).
                assert!(moved_count <= 64usize.div_ceil(member_count));
                assert_eq!(moved_count, fewest_moves(&ring, members));
            }
            if spacing_promised(64, member_count, n_val) {
                assert_eq!(claim.ring.spacing_violations(n_val), 0);
            }
            moves.push(moved_count);
            ring = claim.ring;
        }
        println!("moves {moves:?}, fallbacks {fallbacks:?}");
        assert_eq!(&moves[..4], &[32, 21, 26, 12], "1→2→3→4→5");
        assert_eq!(fallbacks, vec![(5, 4)]);
        assert!(fallbacks.iter().all(|&(_, after)| after < 2 * n_val - 1));
    }

    #[test]
    fn join_moves_partitions_only_to_the_new_node_and_leave_only_from_the_old() {
        let five: Vec<NodeId> = ["a", "c", "e", "g", "i"].into_iter().map(node).collect();
        let ring = Ring::new(64, &five, 3).unwrap();
        let joiner = node("f");
        let six = [five.clone(), vec![joiner.clone()]].concat();
        let claim = ring.claim(&six, 3).unwrap();
        assert!(!claim.used_striped_fallback);
        let transfers = ring.transfers_to(&claim.ring);
        assert!((10..=11).contains(&transfers.len()), "{}", transfers.len());
        assert!(transfers.iter().all(|(_, _, to)| *to == joiner));
        assert_eq!(claim.ring.spacing_violations(3), 0);

        let grown = claim.ring;
        let remaining: Vec<NodeId> = six
            .iter()
            .filter(|member| **member != joiner)
            .cloned()
            .collect();
        let claim = grown.claim(&remaining, 3).unwrap();
        assert!(!claim.used_striped_fallback);
        let transfers = grown.transfers_to(&claim.ring);
        assert_eq!(transfers.len(), grown.partitions_owned_by(&joiner).len());
        assert!(transfers.iter().all(|(_, from, _)| *from == joiner));
        assert_eq!(claim.ring.spacing_violations(3), 0);

        // Here the last of c's partitions fits at no member below its share, so one other
        // partition is passed along to make room (a chain of one extra move).
        let leaver = node("c");
        let remaining: Vec<NodeId> = six
            .iter()
            .filter(|member| **member != leaver)
            .cloned()
            .collect();
        let claim = grown.claim(&remaining, 3).unwrap();
        assert!(!claim.used_striped_fallback);
        let transfers = grown.transfers_to(&claim.ring);
        let from_leaver = transfers
            .iter()
            .filter(|(_, from, _)| *from == leaver)
            .count();
        assert_eq!(from_leaver, grown.partitions_owned_by(&leaver).len());
        assert_eq!(transfers.len() - from_leaver, 1);
        assert_eq!(claim.ring.spacing_violations(3), 0);
    }

    #[test]
    fn unchanged_members_move_nothing() {
        let ring = Ring::new(64, &nodes(7), 3).unwrap();
        let again = ring.rebalance(&nodes(7), 3).unwrap();
        assert_eq!(again.version(), 2);
        assert!(ring.transfers_to(&again).is_empty());
    }

    #[test]
    fn impossible_spacing_still_gives_full_preference_lists() {
        // Three nodes, n_val 3, Q = 64: no claim can space every window.
        let ring = Ring::new(64, &nodes(3), 3).unwrap();
        assert!(ring.spacing_violations(3) > 0);
        assert_preference_lists_distinct(&ring, 3);
        assert_preference_lists_distinct(&ring, 5);
    }

    #[test]
    fn key_position_is_stable_and_length_prefixed() {
        let position = key_position(b"bucket", b"key");
        assert_eq!(position, key_position(b"bucket", b"key"));
        assert_ne!(key_position(b"ab", b"c"), key_position(b"a", b"bc"));
        assert_ne!(key_position(b"", b"abc"), key_position(b"abc", b""));
        // Pinned: a change here relocates every stored key.
        assert_eq!(position, 3_283_096_158_412_506_187);
    }

    #[test]
    fn partition_of_takes_the_top_bits() {
        for partition_count in [8u32, 64, 4096] {
            let ring = Ring::new(partition_count, &nodes(2), 1).unwrap();
            assert_eq!(ring.partition_of(0), 0);
            assert_eq!(ring.partition_of(u64::MAX), partition_count - 1);
            let width = u64::MAX / u64::from(partition_count) + 1;
            assert_eq!(ring.partition_of(width - 1), 0);
            assert_eq!(ring.partition_of(width), 1);
            let key_partition = ring.partition_for_key(b"b", b"k");
            assert_eq!(key_partition, ring.partition_of(key_position(b"b", b"k")));
        }
    }

    #[test]
    fn accessors_agree() {
        let members = nodes(5);
        let ring = Ring::new(64, &members, 3).unwrap();
        assert_eq!(ring.version(), 1);
        assert_eq!(ring.partition_count(), 64);
        assert_eq!(ring.members(), members);
        let owned: usize = members
            .iter()
            .map(|member| ring.partitions_owned_by(member).len())
            .sum();
        assert_eq!(owned, 64);
        assert!(ring.partitions_owned_by(&node("stranger")).is_empty());
        assert_eq!(ring.spacing_violations(1), 0);
        assert_eq!(
            ring.spacing_violations(6),
            64,
            "six distinct owners among five members"
        );
        assert_eq!(ring.preference_list(3, 0), Vec::new());
    }

    #[test]
    fn serialization_round_trips_and_decoding_validates() {
        let ring = Ring::new(64, &nodes(5), 3)
            .unwrap()
            .rebalance(&nodes(6), 3)
            .unwrap();
        let bytes = rmp_serde::to_vec(&ring).unwrap();
        let decoded: Ring = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(decoded, ring);
        assert_eq!(decoded.validate(), Ok(()));

        let too_few = Ring::assemble(1, nodes(4));
        assert_eq!(
            too_few.validate(),
            Err(RingError::BadPartitionCount { partition_count: 4 })
        );
        let not_power = Ring::assemble(1, [nodes(8), nodes(4)].concat());
        assert_eq!(
            not_power.validate(),
            Err(RingError::BadPartitionCount {
                partition_count: 12
            })
        );
        let empty = Ring::assemble(1, Vec::new());
        assert_eq!(empty.validate(), Err(RingError::NoMembers));
        let too_many = Ring::assemble(1, vec![node("a"); 8192]);
        assert_eq!(
            too_many.validate(),
            Err(RingError::BadPartitionCount {
                partition_count: 8192
            })
        );
        for invalid in [too_few, not_power, empty, too_many] {
            let bytes = rmp_serde::to_vec(&invalid).unwrap();
            assert!(rmp_serde::from_slice::<Ring>(&bytes).is_err());
        }
        // An owner that is not a valid node id, and bytes that are no ring at all.
        assert!(rmp_serde::from_slice::<Ring>(b"\x92\x01\x91\xa3x y").is_err());
        assert!(rmp_serde::from_slice::<Ring>(b"garbage").is_err());
    }

    #[test]
    fn bad_claims_are_refused() {
        let members = nodes(3);
        for partition_count in [0u32, 4, 12, 8192] {
            assert_eq!(
                Ring::new(partition_count, &members, 3),
                Err(RingError::BadPartitionCount {
                    partition_count: partition_count as usize
                })
            );
        }
        assert_eq!(Ring::new(64, &[], 3), Err(RingError::NoMembers));
        assert_eq!(Ring::new(64, &members, 0), Err(RingError::ZeroTargetNVal));
        let duplicated = [members.clone(), vec![members[1].clone()]].concat();
        assert_eq!(
            Ring::new(64, &duplicated, 3),
            Err(RingError::DuplicateMember {
                node: members[1].clone()
            })
        );
        assert_eq!(
            Ring::new(8, &nodes(9), 3),
            Err(RingError::TooManyMembers {
                member_count: 9,
                partition_count: 8
            })
        );
        let ring = Ring::new(8, &members, 3).unwrap();
        assert_eq!(ring.rebalance(&[], 3), Err(RingError::NoMembers));
        let last = Ring {
            version: u64::MAX,
            ..ring
        };
        assert_eq!(
            last.rebalance(&members, 3),
            Err(RingError::VersionExhausted { version: u64::MAX })
        );
    }

    #[test]
    fn violations_are_counted_per_window_including_the_wrap() {
        // a b a c: windows of 2 are all distinct; of 3, those starting at 0 and 2 repeat a.
        assert_eq!(count_violations(&[0, 1, 0, 2], 2), 0);
        assert_eq!(count_violations(&[0, 1, 0, 2], 3), 2);
        // a b c a: only the wrap window (a, a) of 2 repeats.
        assert_eq!(count_violations(&[0, 1, 2, 0], 2), 1);
        assert_eq!(count_violations(&[0, 1, 2, 0], 3), 2);
    }
}

#[cfg(test)]
mod movement_table {
    use super::*;

    fn nodes(count: usize) -> Vec<NodeId> {
        (0..count)
            .map(|index| NodeId::new(format!("node{index:02}")).unwrap())
            .collect()
    }

    /// Partitions moved by every join S→S+1 and every leave S+1→S, S = 3..15, at Q = 64 and
    /// Q = 256, against the ideal (the joiner's share Q/(S+1); the leaver's partitions).
    #[test]
    fn claim_movement_against_the_ideal() {
        let n_val = 3;
        let all = nodes(16);
        let mut report = String::from("  Q  change   moved ideal ratio  spaced\n");
        let mut worst: f64 = 0.0;
        let mut ratios = Vec::new();
        for partition_count in [64u32, 256] {
            let mut ring = Ring::new(partition_count, &all[..3], n_val).unwrap();
            for size in 3..=15usize {
                let grown = ring.rebalance(&all[..=size], n_val).unwrap();
                let moved = ring.transfers_to(&grown).len();
                let ideal = f64::from(partition_count) / (size + 1) as f64;
                let ratio = moved as f64 / ideal;
                report.push_str(&format!(
                    "{partition_count:>4} join {size:>2}→{:<2} {moved:>4} {ideal:>6.1} {ratio:>5.2} {}\n",
                    size + 1,
                    grown.spacing_violations(n_val) == 0
                ));
                if size + 1 >= 2 * n_val - 1 || (partition_count as usize).is_multiple_of(size + 1)
                {
                    assert_eq!(grown.spacing_violations(n_val), 0, "{size}→{}", size + 1);
                }
                worst = worst.max(ratio);
                ratios.push(ratio);
                // A leave from the grown ring, of a member in the middle.
                let leaver = &all[size / 2];
                let remaining: Vec<NodeId> = all[..=size]
                    .iter()
                    .filter(|m| *m != leaver)
                    .cloned()
                    .collect();
                let shrunk = grown.rebalance(&remaining, n_val).unwrap();
                let moved = grown.transfers_to(&shrunk).len();
                let ideal = grown.partitions_owned_by(leaver).len() as f64;
                let ratio = moved as f64 / ideal;
                report.push_str(&format!(
                    "{partition_count:>4} leave {:>2}→{size:<2} {moved:>4} {ideal:>6.1} {ratio:>5.2} {}\n",
                    size + 1,
                    shrunk.spacing_violations(n_val) == 0
                ));
                if size >= 2 * n_val - 1 || (partition_count as usize).is_multiple_of(size) {
                    assert_eq!(shrunk.spacing_violations(n_val), 0, "{}→{size}", size + 1);
                }
                worst = worst.max(ratio);
                ratios.push(ratio);
                ring = grown;
            }
        }
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        println!("{report}mean ratio {mean:.3}, worst {worst:.3}");
        assert!(mean <= 1.25, "mean moved/ideal {mean:.3} is over 1.25");
        assert!(
            worst <= 1.5,
            "a change moved {worst:.3}× its ideal, over 1.5"
        );
    }
}

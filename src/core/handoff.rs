//! Which data moves when a committed ring change takes effect (DESIGN §6).
//!
//! A node stores each key under the key's partition (the first partition of its walk), and a
//! key's replicas are the first `n_val` distinct owners of the walk from there. So a ring
//! change moves data per *key partition*: where the walk from it names a node that it did not
//! name before, that node must receive the keys before the ring flips.
//!
//! # One replica slot at a time
//! For a key partition and an `n_val`, the nodes leaving its replica list (`departing`) and
//! those entering it (`arriving`) are paired in walk order: the first arriving node receives
//! the first departing node's copy, and so on. A write acknowledged before the change reached
//! `w` replicas; each replica that stays keeps its copy, and each that goes passes its copy to
//! the one taking its slot, so `w` replicas of the new list hold the write once every handoff
//! is done. An arriving node with no departing partner (the list grows), or whose partner was
//! removed by force (it is gone with its copy), receives from every surviving old replica,
//! which between them hold every acknowledged write: this is how a removed node's data is
//! rebuilt.
//!
//! Buckets may set their own `n_val`, and the pairing differs per `n_val`, so a handoff is
//! enumerated for every `n_val` up to [`MAX_N_VAL`] and the sender sends a key only where it
//! is a source for that key's bucket `n_val` ([`sources`]). Nothing is sent twice for one
//! bucket, and no key is left behind for any.

use crate::core::ids::NodeId;
use crate::core::ring::{PartitionId, Ring};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The largest `n_val` a bucket may have (bucket properties refuse more).
pub const MAX_N_VAL: usize = 16;

/// One key partition's keys going from an old replica to a new one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Handoff {
    /// The key partition whose keys move.
    pub partition: PartitionId,
    pub from: NodeId,
    pub to: NodeId,
}

/// The replicas of `partition`'s keys of buckets with `n_val` under `ring`, in preference
/// order.
pub fn replicas(ring: &Ring, partition: PartitionId, n_val: usize) -> Vec<NodeId> {
    ring.preference_list(partition, n_val)
        .into_iter()
        .map(|(_, node)| node)
        .collect()
}

/// The nodes `to` receives `partition`'s keys of buckets with `n_val` from, when the ring
/// changes from `old` to `next`; empty when `to` already was a replica (or is not one).
/// `is_removed` names nodes removed by force: they cannot send.
pub fn sources(
    old: &Ring,
    next: &Ring,
    partition: PartitionId,
    n_val: usize,
    to: &NodeId,
    is_removed: impl Fn(&NodeId) -> bool,
) -> Vec<NodeId> {
    let before = replicas(old, partition, n_val);
    let after = replicas(next, partition, n_val);
    let arriving: Vec<&NodeId> = after.iter().filter(|node| !before.contains(node)).collect();
    let Some(slot) = arriving.iter().position(|node| *node == to) else {
        return Vec::new();
    };
    let departing: Vec<&NodeId> = before.iter().filter(|node| !after.contains(node)).collect();
    match departing.get(slot) {
        Some(partner) if !is_removed(partner) => vec![(*partner).clone()],
        _ => before
            .iter()
            .filter(|node| !is_removed(node) && *node != to)
            .cloned()
            .collect(),
    }
}

/// Every handoff the change from `old` to `next` needs, for every bucket `n_val`.
pub fn handoffs_between(
    old: &Ring,
    next: &Ring,
    is_removed: impl Fn(&NodeId) -> bool,
) -> Vec<Handoff> {
    let mut handoffs = BTreeSet::new();
    let largest = MAX_N_VAL.min(old.member_count().max(next.member_count()));
    for partition in 0..old.partition_count().min(next.partition_count()) {
        let longest_after = replicas(next, partition, largest);
        for n_val in 1..=largest {
            for to in &longest_after[..n_val.min(longest_after.len())] {
                for from in sources(old, next, partition, n_val, to, &is_removed) {
                    handoffs.insert(Handoff {
                        partition,
                        from,
                        to: to.clone(),
                    });
                }
            }
        }
    }
    handoffs.into_iter().collect()
}

/// Whether `node` must keep its copies of `partition`'s keys of buckets with `n_val`: it is a
/// replica under the ring it routes by, or will be under the pending one.
pub fn keeps(
    ring: &Ring,
    pending: Option<&Ring>,
    partition: PartitionId,
    n_val: usize,
    node: &NodeId,
) -> bool {
    replicas(ring, partition, n_val).contains(node)
        || pending.is_some_and(|next| replicas(next, partition, n_val).contains(node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn nodes(count: usize) -> Vec<NodeId> {
        (1..=count)
            .map(|index| NodeId::new(format!("n{index}")).unwrap())
            .collect()
    }

    /// A model of every write acknowledged at `w` of some `n_val` before the change: which
    /// replicas of the old ring hold it after the handoffs (each of `to` merges what its
    /// sources held). Checks that every choice of `w` replicas still reaches `w` new ones.
    fn assert_quorums_survive(old: &Ring, next: &Ring, removed: &BTreeSet<NodeId>) {
        let handoffs = handoffs_between(old, next, |node| removed.contains(node));
        for partition in 0..old.partition_count() {
            for n_val in 1..=3usize {
                let before = replicas(old, partition, n_val);
                let after = replicas(next, partition, n_val);
                // Each old replica's copy is one "slot"; a write reached some subset of slots.
                for held_by in 0u32..(1 << before.len()) {
                    let holders: BTreeSet<&NodeId> = before
                        .iter()
                        .enumerate()
                        .filter(|(index, node)| {
                            held_by & (1 << index) != 0 && !removed.contains(*node)
                        })
                        .map(|(_, node)| node)
                        .collect();
                    let written = held_by.count_ones() as usize;
                    let mut after_holders = 0;
                    for node in &after {
                        let keeps = holders.contains(node);
                        let receives =
                            sources(old, next, partition, n_val, node, |n| removed.contains(n))
                                .iter()
                                .any(|from| {
                                    holders.contains(from)
                                        && handoffs.contains(&Handoff {
                                            partition,
                                            from: from.clone(),
                                            to: node.clone(),
                                        })
                                });
                        if keeps || receives {
                            after_holders += 1;
                        }
                    }
                    let lost = before
                        .iter()
                        .enumerate()
                        .filter(|(index, node)| {
                            held_by & (1 << index) != 0 && removed.contains(*node)
                        })
                        .count();
                    if written > lost {
                        assert!(
                            after_holders >= (written - lost).min(after.len()),
                            "partition {partition} n_val {n_val}: a write on {written} old replicas \
                             ({lost} removed) is on {after_holders} new ones"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_join_moves_each_copy_once_to_the_node_taking_its_slot() {
        let three = Ring::new(64, &nodes(3), 3).unwrap();
        let four = three.rebalance(&nodes(4), 3).unwrap();
        let handoffs = handoffs_between(&three, &four, |_| false);
        assert!(!handoffs.is_empty());
        let joiner = NodeId::new("n4").unwrap();
        assert!(handoffs.iter().all(|handoff| handoff.to == joiner));
        // For the default n_val every receiving partition has exactly one source.
        let mut per_partition: BTreeMap<PartitionId, usize> = BTreeMap::new();
        for partition in 0..64 {
            let got = sources(&three, &four, partition, 3, &joiner, |_| false);
            assert!(got.len() <= 1, "{got:?}");
            *per_partition.entry(partition).or_default() += got.len();
        }
        let receiving = per_partition.values().filter(|count| **count > 0).count();
        let after_count = (0..64)
            .filter(|p| replicas(&four, *p, 3).contains(&joiner))
            .count();
        assert_eq!(receiving, after_count);
        assert_quorums_survive(&three, &four, &BTreeSet::new());
    }

    #[test]
    fn a_leave_and_a_remove_keep_every_quorum_write() {
        let four = Ring::new(64, &nodes(4), 3).unwrap();
        let three: Vec<NodeId> = nodes(4)
            .into_iter()
            .filter(|n| n.as_str() != "n2")
            .collect();
        let after = four.rebalance(&three, 3).unwrap();
        assert_quorums_survive(&four, &after, &BTreeSet::new());
        let removed: BTreeSet<NodeId> = [NodeId::new("n2").unwrap()].into();
        assert_quorums_survive(&four, &after, &removed);
        let handoffs = handoffs_between(&four, &after, |node| removed.contains(node));
        assert!(handoffs.iter().all(|handoff| handoff.from.as_str() != "n2"));
    }

    #[test]
    fn growing_past_the_old_member_count_takes_from_every_replica() {
        let two = Ring::new(16, &nodes(2), 3).unwrap();
        let three = two.rebalance(&nodes(3), 3).unwrap();
        let joiner = NodeId::new("n3").unwrap();
        for partition in 0..16 {
            assert_eq!(
                sources(&two, &three, partition, 3, &joiner, |_| false).len(),
                2,
                "n3 takes a third slot: both old copies"
            );
        }
        assert_quorums_survive(&two, &three, &BTreeSet::new());
    }

    #[test]
    fn a_node_keeps_what_it_replicates_now_or_after_the_pending_change() {
        let three = Ring::new(64, &nodes(3), 3).unwrap();
        let four = three.rebalance(&nodes(4), 3).unwrap();
        let joiner = NodeId::new("n4").unwrap();
        for partition in 0..64 {
            assert!(keeps(
                &three,
                None,
                partition,
                3,
                &NodeId::new("n1").unwrap()
            ));
            assert_eq!(
                keeps(&three, Some(&four), partition, 2, &joiner),
                replicas(&four, partition, 2).contains(&joiner)
            );
            assert!(!keeps(&three, None, partition, 3, &joiner));
        }
    }
}

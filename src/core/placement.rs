//! Which nodes a request goes to: the key's primaries, and with sloppy quorum a fallback for
//! each primary judged down (the next healthy node of the ring walk), which keeps a hint for
//! the primary it stands in for.

use crate::core::ids::NodeId;
use crate::core::request::Target;
use crate::core::ring::{PartitionId, Ring};

/// The targets of a request on `partition`, in preference order.
///
/// Primaries are the first `n_val` distinct owners of the ring walk. A primary that `is_up`
/// rejects is replaced, when `sloppy` is set and `may_stand_in` allows it, by the next node
/// of the walk that is up and not already a target; otherwise it is still asked (the
/// detector may be wrong, and a failed reply is counted as one).
pub fn targets(
    ring: &Ring,
    partition: PartitionId,
    n_val: usize,
    sloppy: bool,
    is_up: impl Fn(&NodeId) -> bool,
    mut may_stand_in: impl FnMut(&NodeId) -> bool,
) -> Vec<Target> {
    let member_count = ring.member_count();
    let walk: Vec<NodeId> = ring
        .preference_list(partition, member_count)
        .into_iter()
        .map(|(_, node)| node)
        .collect();
    let primary_count = n_val.min(walk.len());
    let (primaries, rest) = walk.split_at(primary_count);
    let mut fallbacks = rest.iter().filter(|node| is_up(node));
    primaries
        .iter()
        .map(|primary| {
            if sloppy
                && !is_up(primary)
                && may_stand_in(primary)
                && let Some(fallback) = fallbacks.next()
            {
                return Target {
                    node: fallback.clone(),
                    primary: false,
                    hint_for: Some(primary.clone()),
                };
            }
            Target {
                node: primary.clone(),
                primary: true,
                hint_for: None,
            }
        })
        .collect()
}

/// The targets of a write while a ring change is pending: the current ring's, then those of
/// the pending ring not already listed (a node with the same role is asked once), and the
/// two replica sets as indexes into the list, for [`crate::core::request::PutCoordinator`].
pub fn spanning_targets(
    current: Vec<Target>,
    pending: Vec<Target>,
) -> (Vec<Target>, Vec<Vec<usize>>) {
    let mut targets = current;
    let current_set: Vec<usize> = (0..targets.len()).collect();
    let mut pending_set = Vec::with_capacity(pending.len());
    for target in pending {
        let index = match targets
            .iter()
            .position(|listed| listed.node == target.node && listed.hint_for == target.hint_for)
        {
            Some(index) => {
                // The same copy: a primary in either ring is a primary of this write.
                targets[index].primary |= target.primary;
                index
            }
            None => {
                targets.push(target);
                targets.len() - 1
            }
        };
        pending_set.push(index);
    }
    (targets, vec![current_set, pending_set])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_ring_adds_its_new_replicas_and_a_second_set() {
        let three = ring(3);
        let members: Vec<NodeId> = (1..=4)
            .map(|index| NodeId::new(format!("n{index}")).unwrap())
            .collect();
        let four = three.rebalance(&members, 3).unwrap();
        let joiner = NodeId::new("n4").unwrap();
        for partition in 0..64 {
            let current = targets(&three, partition, 3, true, |_| true, |_| true);
            let pending = targets(&four, partition, 3, true, |_| true, |_| true);
            let (all, sets) = spanning_targets(current.clone(), pending.clone());
            assert_eq!(&all[..3], &current[..]);
            assert_eq!(sets[0], vec![0, 1, 2]);
            let named: Vec<&NodeId> = sets[1].iter().map(|index| &all[*index].node).collect();
            let expected: Vec<&NodeId> = pending.iter().map(|target| &target.node).collect();
            assert_eq!(named, expected);
            let gains = pending.iter().any(|target| target.node == joiner);
            assert_eq!(all.len(), if gains { 4 } else { 3 }, "{all:?}");
        }
    }

    fn ring(count: usize) -> Ring {
        let members: Vec<NodeId> = (1..=count)
            .map(|index| NodeId::new(format!("n{index}")).unwrap())
            .collect();
        Ring::new(64, &members, 3).unwrap()
    }

    #[test]
    fn all_up_gives_the_primaries() {
        let ring = ring(5);
        for partition in 0..64 {
            let targets = targets(&ring, partition, 3, true, |_| true, |_| true);
            let expected: Vec<NodeId> = ring
                .preference_list(partition, 3)
                .into_iter()
                .map(|(_, node)| node)
                .collect();
            assert_eq!(
                targets
                    .iter()
                    .map(|target| target.node.clone())
                    .collect::<Vec<_>>(),
                expected
            );
            assert!(
                targets
                    .iter()
                    .all(|target| target.primary && target.hint_for.is_none())
            );
        }
    }

    #[test]
    fn a_down_primary_is_replaced_by_the_next_healthy_node_with_a_hint() {
        let ring = ring(5);
        for partition in 0..64 {
            let walk: Vec<NodeId> = ring
                .preference_list(partition, 5)
                .into_iter()
                .map(|(_, node)| node)
                .collect();
            let down = walk[1].clone();
            let sloppy = targets(&ring, partition, 3, true, |node| *node != down, |_| true);
            assert_eq!(sloppy.len(), 3);
            assert_eq!(
                sloppy[1].node, walk[3],
                "the first node after the primaries stands in"
            );
            assert_eq!(sloppy[1].hint_for.as_ref(), Some(&down));
            assert!(!sloppy[1].primary);
            let strict = targets(&ring, partition, 3, false, |node| *node != down, |_| true);
            assert_eq!(
                strict[1].node, down,
                "without sloppy quorum the primary is still asked"
            );
            assert!(strict[1].primary);
            let past_window = targets(
                &ring,
                partition,
                3,
                true,
                |node| *node != down,
                |node| *node != down,
            );
            assert_eq!(
                past_window[1].node, down,
                "a primary down past the hint window gets no fallback: it is still asked"
            );
            assert!(past_window[1].primary && past_window[1].hint_for.is_none());
        }
    }

    #[test]
    fn no_fallback_when_every_other_node_is_down() {
        let ring = ring(3);
        let down = NodeId::new("n2").unwrap();
        let chosen = targets(&ring, 0, 3, true, |node| *node != down, |_| true);
        assert!(chosen.iter().all(|target| target.primary), "{chosen:?}");
    }
}

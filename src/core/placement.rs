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
    let member_count = ring.members().len();
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

#[cfg(test)]
mod tests {
    use super::*;

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

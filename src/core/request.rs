//! Request state machines of a coordinator. They take replies in and say what to answer and
//! what to repair; the shell sends the messages and runs the timers.

use crate::core::ids::NodeId;
use crate::core::object::StoredObject;
use crate::core::quorum::{QuorumOutcome, ReadQuorum, ReadTracker};

/// One replica asked by a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub node: NodeId,
    /// The node is one of the key's primaries (not a fallback standing in for one).
    pub primary: bool,
    /// For a fallback: the down primary it stands in for and keeps a hint for.
    pub hint_for: Option<NodeId>,
}

/// Which replicas a get asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFanout {
    /// Every target at once, as Riak does: the answer still comes after `r` replies, and the
    /// later replies feed read repair.
    All,
    /// Only as many as `r` and `pr` need, as Cassandra does: fewer messages per read. A
    /// replica that fails is replaced by the next target at once, and
    /// [`GetCoordinator::speculate`] asks the rest when the asked ones are slow.
    Needed,
}

/// A get in progress: says which replicas to ask, collects their replies, merges them, and
/// names the replicas that need read repair once every asked replica has answered.
#[derive(Debug)]
pub struct GetCoordinator {
    tracker: ReadTracker,
    /// Target indexes in the order they are asked: the local replica first (no network),
    /// primaries before fallbacks when `pr` needs primaries.
    order: Vec<usize>,
    /// How many of `order` have been handed out to ask.
    asked: usize,
    /// Replies needed from the asked replicas (the larger of `r` and `pr`).
    needed: usize,
    /// Each replica that answered, with its object (`None` is a not-found).
    replies: Vec<(NodeId, Option<StoredObject>)>,
    merged: Option<StoredObject>,
    /// Asked replicas that have not answered or failed yet.
    outstanding: usize,
}

impl GetCoordinator {
    /// `local` is the coordinating node, read first when it is a target.
    pub fn new(
        quorum: ReadQuorum,
        targets: &[Target],
        local: Option<&NodeId>,
        fanout: ReadFanout,
    ) -> Self {
        let asked = targets.len() as u32;
        let primaries = targets.iter().filter(|target| target.primary).count() as u32;
        let rank = |index: &usize| {
            let target = &targets[*index];
            let is_local = local.is_some_and(|local| *local == target.node);
            // With a `pr`, primaries go first so the first replies can meet it.
            let fallback_first_class = quorum.pr > 0 && !target.primary;
            (fallback_first_class, !is_local)
        };
        let mut order: Vec<usize> = (0..targets.len()).collect();
        order.sort_by_key(rank);
        let needed = match fanout {
            ReadFanout::All => targets.len(),
            ReadFanout::Needed => (quorum.r.max(quorum.pr) as usize).clamp(1, targets.len().max(1)),
        }
        .min(targets.len());
        GetCoordinator {
            tracker: ReadTracker::new(quorum, asked, primaries),
            order,
            asked: 0,
            needed,
            replies: Vec::with_capacity(targets.len()),
            merged: None,
            outstanding: 0,
        }
    }

    /// Target indexes to ask now: at first the needed ones; after a failure, replacements
    /// while the replies still in flight could not meet the quorum. Empty once enough are
    /// in flight, the outcome is decided, or every target was asked.
    pub fn to_ask(&mut self) -> Vec<usize> {
        if self.tracker.outcome() != QuorumOutcome::Pending {
            return Vec::new();
        }
        let wanted = self
            .needed
            .saturating_sub(self.replies.len() + self.outstanding);
        self.hand_out(wanted)
    }

    /// Every target not asked yet (for when the asked ones are slow: Cassandra's
    /// speculative retry). Empty once the outcome is decided.
    pub fn speculate(&mut self) -> Vec<usize> {
        if self.tracker.outcome() != QuorumOutcome::Pending {
            return Vec::new();
        }
        self.hand_out(self.order.len())
    }

    fn hand_out(&mut self, count: usize) -> Vec<usize> {
        let end = (self.asked + count).min(self.order.len());
        let handed = self.order[self.asked..end].to_vec();
        self.asked = end;
        self.outstanding += handed.len();
        handed
    }

    /// Records a replica's reply: `Ok(None)` is not-found, `Err(())` a failure or timeout.
    /// Call [`GetCoordinator::to_ask`] after it: a failure may call for a replacement.
    pub fn on_reply(
        &mut self,
        target: &Target,
        reply: Result<Option<StoredObject>, ()>,
    ) -> QuorumOutcome {
        self.outstanding = self.outstanding.saturating_sub(1);
        match reply {
            Ok(object) => {
                if let Some(object) = &object {
                    self.merged = Some(match self.merged.take() {
                        Some(merged) => merged.sync(object),
                        None => object.clone(),
                    });
                }
                self.replies.push((target.node.clone(), object));
                self.tracker.record(target.primary, true)
            }
            // The tracker counts failures against every target, asked or not, so a failure
            // loses the quorum only when no replacement could make up for it.
            Err(()) => self.tracker.record(target.primary, false),
        }
    }

    pub fn outcome(&self) -> QuorumOutcome {
        self.tracker.outcome()
    }

    pub fn tracker(&self) -> &ReadTracker {
        &self.tracker
    }

    /// Every asked replica has answered or failed.
    pub fn complete(&self) -> bool {
        self.outstanding == 0
    }

    /// Targets asked so far.
    pub fn asked(&self) -> usize {
        self.asked
    }

    /// The merge of every reply so far; `None` when every replica said not-found.
    pub fn merged(&self) -> Option<&StoredObject> {
        self.merged.as_ref()
    }

    /// Replicas whose reply is older than the merged object (including not-found replies
    /// while some replica has the key): they are sent the merged object.
    pub fn read_repairs(&self) -> Vec<NodeId> {
        let Some(merged) = &self.merged else {
            return Vec::new();
        };
        self.replies
            .iter()
            .filter(|(_, reply)| match reply {
                Some(object) => !object.equal(merged),
                None => true,
            })
            .map(|(node, _)| node.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::object::{Content, Context, coordinate_put};

    fn content(value: &str) -> Content {
        Content {
            value: value.as_bytes().to_vec(),
            content_type: String::new(),
            user_metadata: Vec::new(),
            last_modified_micros: 0,
            deleted: false,
        }
    }

    fn targets() -> Vec<Target> {
        ["a", "b", "c"]
            .iter()
            .map(|name| Target {
                node: NodeId::new(*name).unwrap(),
                primary: true,
                hint_for: None,
            })
            .collect()
    }

    #[test]
    fn merges_replies_and_repairs_stale_replicas() {
        let old = coordinate_put(None, None, content("old"), 1, true);
        let new = coordinate_put(
            Some(&old),
            Some(&Context::of(&old)),
            content("new"),
            1,
            true,
        );
        let targets = targets();
        let quorum = ReadQuorum {
            n_val: 3,
            r: 2,
            pr: 0,
        };
        let mut get = GetCoordinator::new(quorum, &targets, None, ReadFanout::All);
        assert_eq!(get.to_ask(), vec![0, 1, 2]);
        assert_eq!(
            get.on_reply(&targets[0], Ok(Some(old.clone()))),
            QuorumOutcome::Pending
        );
        assert_eq!(
            get.on_reply(&targets[1], Ok(Some(new.clone()))),
            QuorumOutcome::Won
        );
        assert!(!get.complete());
        get.on_reply(&targets[2], Ok(None));
        assert!(get.complete());
        assert_eq!(get.merged(), Some(&new));
        let mut repairs = get.read_repairs();
        repairs.sort();
        assert_eq!(
            repairs,
            vec![targets[0].node.clone(), targets[2].node.clone()]
        );
    }

    #[test]
    fn failures_lose_the_quorum_with_counts() {
        let targets = targets();
        let quorum = ReadQuorum {
            n_val: 3,
            r: 3,
            pr: 0,
        };
        let mut get = GetCoordinator::new(quorum, &targets, None, ReadFanout::All);
        assert_eq!(get.to_ask().len(), 3);
        assert_eq!(get.on_reply(&targets[0], Ok(None)), QuorumOutcome::Pending);
        let QuorumOutcome::Lost(shortfall) = get.on_reply(&targets[1], Err(())) else {
            panic!("r=all with a failed replica cannot be met");
        };
        assert_eq!(
            shortfall.to_string(),
            "1 of 3 replicas replied, 3 required (r)"
        );
        assert!(get.merged().is_none());
        assert!(get.read_repairs().is_empty());
    }

    #[test]
    fn needed_fanout_asks_the_local_replica_first_and_only_r() {
        let targets = targets();
        let quorum = ReadQuorum {
            n_val: 3,
            r: 1,
            pr: 0,
        };
        let local = targets[2].node.clone();
        let mut get = GetCoordinator::new(quorum, &targets, Some(&local), ReadFanout::Needed);
        assert_eq!(get.to_ask(), vec![2]);
        assert!(
            get.to_ask().is_empty(),
            "one reply is in flight: enough for r=1"
        );
        let object = coordinate_put(None, None, content("v"), 1, true);
        assert_eq!(
            get.on_reply(&targets[2], Ok(Some(object.clone()))),
            QuorumOutcome::Won
        );
        assert!(get.complete());
        assert_eq!(get.asked(), 1);
        assert_eq!(get.merged(), Some(&object));
    }

    #[test]
    fn needed_fanout_replaces_a_failed_replica_and_speculates_on_the_rest() {
        let targets = targets();
        let quorum = ReadQuorum {
            n_val: 3,
            r: 2,
            pr: 0,
        };
        let mut get = GetCoordinator::new(quorum, &targets, None, ReadFanout::Needed);
        assert_eq!(get.to_ask(), vec![0, 1]);
        assert_eq!(get.on_reply(&targets[0], Err(())), QuorumOutcome::Pending);
        assert_eq!(get.to_ask(), vec![2], "the failed replica is replaced");
        assert!(get.speculate().is_empty(), "every target was asked");
        assert_eq!(get.on_reply(&targets[1], Ok(None)), QuorumOutcome::Pending);
        assert_eq!(get.on_reply(&targets[2], Ok(None)), QuorumOutcome::Won);

        let mut slow = GetCoordinator::new(quorum, &targets, None, ReadFanout::Needed);
        assert_eq!(slow.to_ask(), vec![0, 1]);
        assert_eq!(slow.speculate(), vec![2]);
        assert_eq!(slow.on_reply(&targets[2], Ok(None)), QuorumOutcome::Pending);
        assert_eq!(slow.on_reply(&targets[0], Ok(None)), QuorumOutcome::Won);
        assert!(
            !slow.complete(),
            "replica 1 is still out: read repair waits for it"
        );
    }

    #[test]
    fn needed_fanout_asks_primaries_first_when_pr_needs_them() {
        let mut targets = targets();
        targets[0].primary = false;
        targets[0].hint_for = Some(NodeId::new("d").unwrap());
        let quorum = ReadQuorum {
            n_val: 3,
            r: 1,
            pr: 2,
        };
        let local = targets[0].node.clone();
        let mut get = GetCoordinator::new(quorum, &targets, Some(&local), ReadFanout::Needed);
        assert_eq!(
            get.to_ask(),
            vec![1, 2],
            "the local fallback cannot count for pr"
        );
        get.on_reply(&targets[1], Ok(None));
        assert!(
            matches!(get.on_reply(&targets[2], Err(())), QuorumOutcome::Lost(_)),
            "pr=2 with one of the two primaries failed is lost"
        );
    }
}

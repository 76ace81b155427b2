//! Request state machines of a coordinator. They take replies in and say what to answer and
//! what to repair; the shell sends the messages and runs the timers.

use crate::core::ids::NodeId;
use crate::core::object::StoredObject;
use crate::core::quorum::{
    QuorumOutcome, QuorumShortfall, ReadQuorum, ReadTracker, WriteQuorum, WriteTracker,
};

/// One replica asked by a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub node: NodeId,
    /// The node is one of the key's primaries (not a fallback standing in for one).
    pub primary: bool,
    /// For a fallback: the down primary it stands in for and keeps a hint for.
    pub hint_for: Option<NodeId>,
}

/// A replica's acknowledgement of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaAck {
    /// The replica's journal was fsynced before it answered (counts for `dw`).
    pub durable: bool,
}

/// Why a replica read or write failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error("{node} did not answer: {reason}")]
    Unreachable { node: NodeId, reason: String },
    #[error("{node} refused: {message}")]
    Refused { node: NodeId, message: String },
    #[error("{node} sent an invalid object: {reason}")]
    InvalidObject { node: NodeId, reason: String },
    /// The replica routes by a newer ring (which the asking node then adopts): it did
    /// nothing, and the request is routed again by that ring.
    #[error("{node} holds a newer ring (routing version {routing_version})")]
    StaleRing { node: NodeId, routing_version: u64 },
}

/// Where a put (or delete) is coordinated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutRoute {
    /// This node coordinates; `targets[local]` is its own copy.
    Coordinate { local: usize },
    /// Forward the write to these targets, tried in order, to coordinate.
    Forward { to: Vec<usize> },
    /// A forwarded write reached a node that is not one of its targets: the rings disagree.
    /// Refused rather than bounced around.
    Misrouted,
}

/// Decides who coordinates a write that reached `local`: a target coordinates (DESIGN §4);
/// any other node forwards to the targets. A node that is only a *fallback* for the key
/// forwards to an up primary when there is one: the primary holds the key's history, and
/// the fallback's hint copy does not become a coordinator's copy (see `epoch`). A write that
/// was already forwarded is coordinated where it lands, or refused. `is_up` is this node's
/// failure detector: targets judged up are tried first, and a fallback forwards only to a
/// primary judged up (a primary down past the hint window stays a target without a fallback).
pub fn route_put(
    targets: &[Target],
    local: &NodeId,
    forwarded: bool,
    is_up: impl Fn(&NodeId) -> bool,
) -> PutRoute {
    let Some(index) = targets.iter().position(|target| target.node == *local) else {
        if forwarded {
            return PutRoute::Misrouted;
        }
        let (mut to, down): (Vec<usize>, Vec<usize>) =
            (0..targets.len()).partition(|index| is_up(&targets[*index].node));
        to.extend(down);
        return PutRoute::Forward { to };
    };
    if targets[index].hint_for.is_some() && !forwarded {
        let primaries: Vec<usize> = targets
            .iter()
            .enumerate()
            .filter(|(_, target)| target.primary && target.node != *local && is_up(&target.node))
            .map(|(index, _)| index)
            .collect();
        if !primaries.is_empty() {
            return PutRoute::Forward { to: primaries };
        }
    }
    PutRoute::Coordinate { local: index }
}

/// A put in progress at its coordinator: the levels capped to the targets found, the local
/// write and each replica's acknowledgement in, the outcome out.
///
/// While a ring change is pending a put has two replica sets, the current ring's and the
/// pending ring's (DESIGN §6), and must meet its levels in each: then the write is on a quorum
/// of whichever ring reads use, before and after the flip.
#[derive(Debug)]
pub struct PutCoordinator {
    targets: Vec<Target>,
    local: usize,
    /// Each replica set: the indexes of its targets and its acknowledgements.
    sets: Vec<(Vec<usize>, WriteTracker)>,
    /// Per target: whether it has answered (acknowledged or failed), so a timeout can name
    /// the ones that did not.
    answered: Vec<bool>,
}

impl PutCoordinator {
    /// Levels are capped at the number of targets (a cluster smaller than `n_val` keeps one
    /// copy per node, as a 1-node Riak dev cluster answers `w=3`). Fails at once when `pw`
    /// needs more primaries than are up: fallbacks never count as primaries.
    pub fn new(
        quorum: WriteQuorum,
        targets: Vec<Target>,
        local: usize,
    ) -> Result<Self, QuorumShortfall> {
        let all = (0..targets.len()).collect();
        Self::with_sets(quorum, targets, local, vec![all])
    }

    /// A put that must meet `quorum` in each of `sets` (indexes into `targets`; every target
    /// in at least one set).
    pub fn with_sets(
        quorum: WriteQuorum,
        targets: Vec<Target>,
        local: usize,
        sets: Vec<Vec<usize>>,
    ) -> Result<Self, QuorumShortfall> {
        let mut trackers = Vec::with_capacity(sets.len());
        for set in sets {
            let asked = set.len() as u32;
            let primaries = set.iter().filter(|index| targets[**index].primary).count() as u32;
            let capped = WriteQuorum {
                w: quorum.w.min(asked),
                dw: quorum.dw.min(asked),
                pw: quorum.pw.min(asked),
                ..quorum
            };
            if capped.pw > primaries {
                return Err(QuorumShortfall {
                    requirement: "pw".into(),
                    answered: primaries,
                    required: capped.pw,
                    asked,
                });
            }
            trackers.push((set, WriteTracker::new(capped, asked, primaries)));
        }
        Ok(PutCoordinator {
            answered: vec![false; targets.len()],
            targets,
            local,
            sets: trackers,
        })
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The coordinator's own target.
    pub fn local(&self) -> &Target {
        &self.targets[self.local]
    }

    /// Indexes of the targets the coordinated object goes to: every one but the local.
    pub fn replicas(&self) -> Vec<usize> {
        (0..self.targets.len())
            .filter(|index| *index != self.local)
            .collect()
    }

    fn record(&mut self, index: usize, acked: bool, durable: bool) -> QuorumOutcome {
        if let Some(answered) = self.answered.get_mut(index) {
            *answered = true;
        }
        let primary = self.targets.get(index).is_some_and(|target| target.primary);
        for (set, tracker) in &mut self.sets {
            if set.contains(&index) {
                tracker.record(primary, acked, durable);
            }
        }
        self.outcome()
    }

    /// The coordinator's own copy is stored (durably, if `durable`).
    pub fn on_local_write(&mut self, durable: bool) -> QuorumOutcome {
        self.record(self.local, true, durable)
    }

    /// One replica answered (or failed, or timed out).
    pub fn on_ack(&mut self, index: usize, ack: Result<ReplicaAck, ReplicaError>) -> QuorumOutcome {
        match ack {
            Ok(ReplicaAck { durable }) => self.record(index, true, durable),
            Err(_) => self.record(index, false, false),
        }
    }

    /// Won once every set is won; lost as soon as one is.
    pub fn outcome(&self) -> QuorumOutcome {
        let mut outcome = QuorumOutcome::Won;
        for (_, tracker) in &self.sets {
            match tracker.outcome() {
                lost @ QuorumOutcome::Lost(_) => return lost,
                QuorumOutcome::Pending => outcome = QuorumOutcome::Pending,
                QuorumOutcome::Won => {}
            }
        }
        outcome
    }

    /// What a put that ran out of time answers: "timed out after T ms: 2 of 3 replicas
    /// acknowledged, 3 required (w); n3 did not answer in time", with the first unmet
    /// requirement and each target that had not answered (the counts alone do not say which).
    pub fn timeout(&self, timeout_ms: u128) -> (Option<QuorumShortfall>, String) {
        let shortfall = self
            .sets
            .iter()
            .find_map(|(_, tracker)| tracker.timeout_shortfall());
        let mut message = match &shortfall {
            Some(shortfall) => format!("timed out after {timeout_ms} ms: {shortfall}"),
            None => format!("timed out after {timeout_ms} ms"),
        };
        for (target, _) in self
            .targets
            .iter()
            .zip(&self.answered)
            .filter(|(_, answered)| !**answered)
        {
            message.push_str(&format!("; {} did not answer in time", target.node));
        }
        (shortfall, message)
    }
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

    /// Records a replica's reply: `Ok(None)` is not-found, `Err` a failure or timeout.
    /// Call [`GetCoordinator::to_ask`] after it: a failure may call for a replacement.
    pub fn on_reply(
        &mut self,
        target: &Target,
        reply: Result<Option<StoredObject>, ReplicaError>,
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
            Err(_) => self.tracker.record(target.primary, false),
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
    use crate::core::quorum::{BucketDefaults, Quorum};

    fn unreachable(target: &Target) -> ReplicaError {
        ReplicaError::Unreachable {
            node: target.node.clone(),
            reason: "timed out".into(),
        }
    }

    fn put_target(name: &str, primary: bool, hint_for: Option<&str>) -> Target {
        Target {
            node: NodeId::new(name).unwrap(),
            primary,
            hint_for: hint_for.map(|node| NodeId::new(node).unwrap()),
        }
    }

    #[test]
    fn a_write_is_coordinated_by_a_target_and_a_fallback_hands_it_to_a_primary() {
        let n4 = NodeId::new("n4").unwrap();
        let n9 = NodeId::new("n9").unwrap();
        // n1 is down: n4 stands in for it.
        let targets = vec![
            put_target("n4", false, Some("n1")),
            put_target("n2", true, None),
            put_target("n3", true, None),
        ];
        assert_eq!(
            route_put(&targets, &n4, false, |_| true),
            PutRoute::Forward { to: vec![1, 2] }
        );
        assert_eq!(
            route_put(&targets, &n4, true, |_| true),
            PutRoute::Coordinate { local: 0 }
        );
        assert_eq!(
            route_put(&targets, &n9, false, |_| true),
            PutRoute::Forward { to: vec![0, 1, 2] }
        );
        assert_eq!(
            route_put(&targets, &n9, true, |_| true),
            PutRoute::Misrouted
        );
        assert_eq!(
            route_put(&targets, &NodeId::new("n2").unwrap(), false, |_| true),
            PutRoute::Coordinate { local: 1 }
        );
        // Only fallbacks are up: the fallback coordinates (under a fresh key actor).
        let only_fallbacks = vec![put_target("n4", false, Some("n1"))];
        assert_eq!(
            route_put(&only_fallbacks, &n4, false, |_| true),
            PutRoute::Coordinate { local: 0 }
        );
        // A primary still listed but judged down (no fallback was left for it, or it is
        // past the hint window) is not forwarded to; other nodes try it last.
        let n1_down = vec![
            put_target("n4", false, Some("n2")),
            put_target("n1", true, None),
        ];
        let up = |node: &NodeId| node.as_str() != "n1";
        assert_eq!(
            route_put(&n1_down, &n4, false, up),
            PutRoute::Coordinate { local: 0 }
        );
        assert_eq!(
            route_put(&n1_down, &n9, false, up),
            PutRoute::Forward { to: vec![0, 1] }
        );
        let n1_first = vec![n1_down[1].clone(), n1_down[0].clone()];
        assert_eq!(
            route_put(&n1_first, &n9, false, up),
            PutRoute::Forward { to: vec![1, 0] }
        );
    }

    #[test]
    fn a_put_counts_acks_caps_levels_and_refuses_an_unmeetable_pw() {
        let targets = vec![
            put_target("n1", true, None),
            put_target("n2", true, None),
            put_target("n4", false, Some("n3")),
        ];
        let quorum = WriteQuorum::resolve(
            Quorum::All,
            Quorum::Default,
            Quorum::Default,
            &BucketDefaults::default(),
        )
        .unwrap();
        let mut put = PutCoordinator::new(quorum, targets.clone(), 0).unwrap();
        assert_eq!(put.replicas(), vec![1, 2]);
        assert_eq!(put.on_local_write(true), QuorumOutcome::Pending);
        assert_eq!(
            put.on_ack(1, Ok(ReplicaAck { durable: true })),
            QuorumOutcome::Pending
        );
        let (shortfall, message) = put.timeout(2000);
        assert_eq!(
            shortfall.map(|shortfall| shortfall.requirement),
            Some("w".into())
        );
        assert!(
            message.contains("2 of 3 replicas acknowledged, 3 required (w)"),
            "{message}"
        );
        assert!(
            message.ends_with("; n4 did not answer in time"),
            "{message}"
        );
        assert!(matches!(
            put.on_ack(2, Err(unreachable(&targets[2]))),
            QuorumOutcome::Lost(_)
        ));
        // pw=all with a fallback among the targets cannot be met: refused at once.
        let strict = WriteQuorum::resolve(
            Quorum::Quorum,
            Quorum::Default,
            Quorum::All,
            &BucketDefaults::default(),
        )
        .unwrap();
        let refused = PutCoordinator::new(strict, targets, 0).expect_err("pw unmeetable");
        assert_eq!((refused.answered, refused.required), (2, 3));
        // Levels are capped to the targets found: w=all on a one-node cluster is one ack.
        let alone = PutCoordinator::new(quorum, vec![put_target("n1", true, None)], 0);
        let mut alone = alone.unwrap();
        assert_eq!(alone.on_local_write(true), QuorumOutcome::Won);
    }
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
        let QuorumOutcome::Lost(shortfall) =
            get.on_reply(&targets[1], Err(unreachable(&targets[1])))
        else {
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
        assert_eq!(
            get.on_reply(&targets[0], Err(unreachable(&targets[0]))),
            QuorumOutcome::Pending
        );
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
            matches!(
                get.on_reply(&targets[2], Err(unreachable(&targets[2]))),
                QuorumOutcome::Lost(_)
            ),
            "pr=2 with one of the two primaries failed is lost"
        );
    }
}

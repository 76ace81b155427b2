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

/// A get in progress: collects replica replies, merges them, and names the replicas that
/// need read repair once every reply is in.
#[derive(Debug)]
pub struct GetCoordinator {
    tracker: ReadTracker,
    /// Each replica that answered, with its object (`None` is a not-found).
    replies: Vec<(NodeId, Option<StoredObject>)>,
    merged: Option<StoredObject>,
    outstanding: usize,
}

impl GetCoordinator {
    pub fn new(quorum: ReadQuorum, targets: &[Target]) -> Self {
        let asked = targets.len() as u32;
        let primaries = targets.iter().filter(|target| target.primary).count() as u32;
        GetCoordinator {
            tracker: ReadTracker::new(quorum, asked, primaries),
            replies: Vec::with_capacity(targets.len()),
            merged: None,
            outstanding: targets.len(),
        }
    }

    /// Records a replica's reply: `Ok(None)` is not-found, `Err(())` a failure or timeout.
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
            Err(()) => self.tracker.record(target.primary, false),
        }
    }

    pub fn outcome(&self) -> QuorumOutcome {
        self.tracker.outcome()
    }

    pub fn tracker(&self) -> &ReadTracker {
        &self.tracker
    }

    /// Every replica has answered or failed.
    pub fn complete(&self) -> bool {
        self.outstanding == 0
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
        let mut get = GetCoordinator::new(quorum, &targets);
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
        let mut get = GetCoordinator::new(quorum, &targets);
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
}

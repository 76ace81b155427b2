//! The cluster's ring as data (DESIGN §6): a version, the owner of every partition and the
//! state of every member, carried by gossip. Ownership is never recomputed from the member
//! list: a node that appears in gossip is *joining* and owns nothing until a committed change
//! gives it partitions, and every node converges to the highest version it hears of.
//!
//! # Versions
//! - Version 1 is the bootstrap ring: the members named when the cluster was created, claimed
//!   by [`Ring::new`]. Every node created with the same member list computes the same one.
//! - Version 0 is *provisional*: what a node that is not in its own member list (it was
//!   started to join an existing cluster) routes with until gossip brings it the real ring.
//!   It is never adopted by others, since any real version supersedes it.
//! - Every committed state names its cluster: 16 hex digits of blake3 over the partition
//!   count and the sorted bootstrap members. A state of another cluster is never adopted, so
//!   a node that formed a cluster of its own (started alone) cannot overwrite, or be
//!   overwritten by, a cluster it is pointed at; joining one is an explicit step.
//! - Versions only grow. Two different states of one version (which only two claimants
//!   committing at once could make) are ordered by their owners, so every node still picks
//!   the same one.

use crate::core::gossip::MAX_MEMBERS;
use crate::core::ids::NodeId;
use crate::core::ring::{Ring, RingError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a member stands in the ring (Riak's member states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MemberState {
    /// Known to the cluster, owns nothing yet.
    Joining,
    /// Owns partitions (or may be given some).
    Valid,
    /// Staged to leave: hands its partitions to the others, then exits.
    Leaving,
    /// Has handed everything over and may stop.
    Exiting,
    /// Removed by force (`remove`): its partitions are rebuilt from the other replicas, and
    /// a restart of it is refused.
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Valid => "valid",
            MemberState::Leaving => "leaving",
            MemberState::Exiting => "exiting",
            MemberState::Down => "down",
        }
    }
}

/// A versioned ring and its members' states. Every constructor, decoding included, checks
/// that each owner is a member in a state that may own partitions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedClusterState")]
pub struct ClusterState {
    /// Which cluster this is (empty in a provisional state).
    cluster: String,
    ring: Ring,
    members: BTreeMap<NodeId, MemberState>,
}

#[derive(Deserialize)]
struct UncheckedClusterState {
    cluster: String,
    ring: Ring,
    members: BTreeMap<NodeId, MemberState>,
}

impl TryFrom<UncheckedClusterState> for ClusterState {
    type Error = ClusterStateError;
    fn try_from(unchecked: UncheckedClusterState) -> Result<Self, Self::Error> {
        let state = ClusterState {
            cluster: unchecked.cluster,
            ring: unchecked.ring,
            members: unchecked.members,
        };
        state.validate()?;
        Ok(state)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterStateError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("the ring names {count} members; at most {MAX_MEMBERS} are allowed")]
    TooManyMembers { count: usize },
    #[error(
        "partition {partition} is owned by {owner}, which is not a member that may own partitions"
    )]
    OwnerNotMember { partition: u32, owner: NodeId },
}

impl ClusterState {
    /// Ring version 1 of a new cluster: `members` are valid and claim the partitions.
    pub fn bootstrap(
        partition_count: u32,
        members: &[NodeId],
        n_val: usize,
    ) -> Result<ClusterState, ClusterStateError> {
        let ring = Ring::new(partition_count, members, n_val)?;
        let mut sorted = ring.members();
        sorted.sort();
        let mut hasher = blake3::Hasher::new();
        hasher.update(&partition_count.to_be_bytes());
        for member in &sorted {
            hasher.update(&(member.as_str().len() as u64).to_be_bytes());
            hasher.update(member.as_str().as_bytes());
        }
        let digest = hasher.finalize();
        let cluster = digest.as_bytes()[..8]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        Self::of_ring(cluster, ring)
    }

    /// The version-0 state a joining node routes with until it hears the real ring: its seeds
    /// as if they were the whole cluster.
    pub fn provisional(
        partition_count: u32,
        seeds: &[NodeId],
        n_val: usize,
    ) -> Result<ClusterState, ClusterStateError> {
        let ring = Ring::new(partition_count, seeds, n_val)?.with_version(0);
        Self::of_ring(String::new(), ring)
    }

    fn of_ring(cluster: String, ring: Ring) -> Result<ClusterState, ClusterStateError> {
        let members = ring
            .members()
            .into_iter()
            .map(|member| (member, MemberState::Valid))
            .collect();
        let state = ClusterState {
            cluster,
            ring,
            members,
        };
        state.validate()?;
        Ok(state)
    }

    pub fn version(&self) -> u64 {
        self.ring.version()
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Whether this is a real ring (version 1 or later), not a joining node's provisional one.
    pub fn is_committed(&self) -> bool {
        self.version() > 0
    }

    /// The member's state in this ring; `None` for a node the ring does not name (a node
    /// heard of by gossip but not yet joined is shown as joining).
    pub fn state_of(&self, node: &NodeId) -> Option<MemberState> {
        self.members.get(node).copied()
    }

    pub fn members(&self) -> &BTreeMap<NodeId, MemberState> {
        &self.members
    }

    /// The cluster this state belongs to (empty while provisional).
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Whether a node holding `self` should take `other` instead: a state of the same cluster
    /// (or any committed one, while `self` is provisional) with a higher version, or at one
    /// version the greater owner list (a deterministic choice every node makes alike).
    pub fn is_superseded_by(&self, other: &ClusterState) -> bool {
        if !other.is_committed() {
            return false;
        }
        if !self.is_committed() {
            return true;
        }
        if other.cluster != self.cluster {
            return false;
        }
        match other.version().cmp(&self.version()) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => {
                (other.ring.owners(), &other.members) > (self.ring.owners(), &self.members)
            }
        }
    }

    pub fn validate(&self) -> Result<(), ClusterStateError> {
        self.ring.validate()?;
        if self.members.len() > MAX_MEMBERS {
            return Err(ClusterStateError::TooManyMembers {
                count: self.members.len(),
            });
        }
        for (partition, owner) in self.ring.owners().iter().enumerate() {
            let may_own = matches!(
                self.members.get(owner),
                Some(MemberState::Valid | MemberState::Leaving)
            );
            if !may_own {
                return Err(ClusterStateError::OwnerNotMember {
                    partition: partition as u32,
                    owner: owner.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(names: &[&str]) -> Vec<NodeId> {
        names
            .iter()
            .map(|name| NodeId::new(*name).unwrap())
            .collect()
    }

    #[test]
    fn bootstrap_is_version_one_with_every_member_valid_and_the_same_on_every_node() {
        let a = ClusterState::bootstrap(64, &nodes(&["n1", "n2", "n3"]), 3).unwrap();
        let b = ClusterState::bootstrap(64, &nodes(&["n3", "n1", "n2"]), 3).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.version(), 1);
        assert!(a.is_committed());
        assert!(
            a.members()
                .values()
                .all(|state| *state == MemberState::Valid)
        );
        assert_eq!(a.state_of(&NodeId::new("n4").unwrap()), None);
    }

    #[test]
    fn any_real_ring_supersedes_a_provisional_one_and_versions_only_grow() {
        let provisional = ClusterState::provisional(64, &nodes(&["n1"]), 3).unwrap();
        assert!(!provisional.is_committed());
        let real = ClusterState::bootstrap(64, &nodes(&["n1", "n2", "n3"]), 3).unwrap();
        assert!(provisional.is_superseded_by(&real));
        assert!(!real.is_superseded_by(&provisional));
        assert!(!real.is_superseded_by(&real.clone()));
        // Another cluster's ring is never taken, whatever its version.
        let other = ClusterState::bootstrap(64, &nodes(&["n1", "n2", "n4"]), 3).unwrap();
        assert_ne!(other.cluster(), real.cluster());
        assert!(!real.is_superseded_by(&other) && !other.is_superseded_by(&real));
        // One cluster, one version, two contents: both sides choose the same one.
        let mut twin = real.clone();
        twin.ring = Ring::new(64, &nodes(&["n3", "n2", "n1"]), 1).unwrap();
        assert_ne!(twin, real);
        assert_ne!(
            real.is_superseded_by(&twin),
            twin.is_superseded_by(&real),
            "exactly one of two same-version states wins"
        );
    }

    #[test]
    fn a_decoded_state_whose_owner_is_not_a_member_is_refused() {
        let state = ClusterState::bootstrap(8, &nodes(&["n1", "n2"]), 2).unwrap();
        let mut members = state.members().clone();
        members.remove(&NodeId::new("n2").unwrap());
        #[derive(Serialize)]
        struct Raw<'a> {
            cluster: &'a str,
            ring: &'a Ring,
            members: BTreeMap<NodeId, MemberState>,
        }
        let bytes = rmp_serde::to_vec_named(&Raw {
            cluster: state.cluster(),
            ring: state.ring(),
            members,
        })
        .unwrap();
        let error = rmp_serde::from_slice::<ClusterState>(&bytes).unwrap_err();
        assert!(error.to_string().contains("not a member"), "{error}");
        let bytes = rmp_serde::to_vec_named(&state).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<ClusterState>(&bytes).unwrap(),
            state
        );
    }
}

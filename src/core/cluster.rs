//! The cluster's ring as data (DESIGN §6): a version, the owner of every partition and the
//! state of every member, carried by gossip. Ownership is never recomputed from the member
//! list: a node that appears in gossip is *joining* and owns nothing until a committed change
//! gives it partitions, and every node converges to the highest version it hears of.
//!
//! # Changes (Riak's staged `cluster` commands)
//! [`ClusterState::stage`] records a join, leave, remove or replace; [`ClusterState::plan`]
//! shows what committing them would move (through the claim, so few partitions move);
//! [`ClusterState::commit`] takes that plan only if the state has not changed since: the new
//! ownership becomes the *pending* ring, and every key partition whose replica list changes
//! gets its [`Handoff`]s (see `core::handoff`). While a change is pending, reads use the
//! current ring and writes reach a quorum of both. [`ClusterState::handoff_done`] records one
//! handoff; once none remain, [`ClusterState::flip`] makes the pending ring current in one
//! version. Every step is a new version made by one member, the claimant
//! ([`ClusterState::claimant`]), so changes are serialized. The streaming of keys lives in
//! the IO shell.
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
use crate::core::handoff::{Handoff, handoffs_between};
use crate::core::ids::NodeId;
use crate::core::ring::{PartitionId, Ring, RingError};
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
    /// Owns nothing more: finishing its leave (delivering the hints it holds, deleting the
    /// copies it no longer replicates).
    Exiting,
    /// Removed by force (`remove`): its partitions are rebuilt from the other replicas, and
    /// a restart of it is refused.
    Down,
    /// Has finished its leave: it owns nothing, holds no hint and no copy, and coordinates
    /// nothing more, so the others no longer wait for it (reaping, commits) when it is
    /// switched off; a restart of it is refused. Riak takes such a node out of the ring.
    Left,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Valid => "valid",
            MemberState::Leaving => "leaving",
            MemberState::Exiting => "exiting",
            MemberState::Down => "down",
            MemberState::Left => "left",
        }
    }

    /// Whether the member is gone for good (removed, or its leave finished): it is never
    /// waited for, and a restart of it is refused.
    pub fn is_gone(self) -> bool {
        matches!(self, MemberState::Down | MemberState::Left)
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
    /// Changes staged for the next commit, by the node they concern.
    #[serde(default)]
    staged: BTreeMap<NodeId, StagedChange>,
    /// The committed ownership that takes effect once every handoff is done.
    #[serde(default)]
    pending: Option<Ring>,
    /// Key partitions' data still to move for the pending ring.
    #[serde(default)]
    handoffs: Vec<Handoff>,
    /// The version at which the routing (the ring's owners, the pending ring) last changed:
    /// a replica asked by a coordinator whose routing is older tells it so (0: not known,
    /// a state saved by an earlier release).
    #[serde(default)]
    routed_at: u64,
}

#[derive(Deserialize)]
struct UncheckedClusterState {
    cluster: String,
    ring: Ring,
    members: BTreeMap<NodeId, MemberState>,
    #[serde(default)]
    staged: BTreeMap<NodeId, StagedChange>,
    #[serde(default)]
    pending: Option<Ring>,
    #[serde(default)]
    handoffs: Vec<Handoff>,
    #[serde(default)]
    routed_at: u64,
}

/// A ring change an operator staged (`dynkv admin cluster join|leave|remove|replace`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StagedChange {
    /// The node enters the claim.
    Join,
    /// The node hands its partitions to the others, then exits.
    Leave,
    /// The node is gone for good: its partitions are rebuilt from the other replicas.
    Remove,
    /// The node's partitions go, one for one, to `by` (a joining node).
    Replace { by: NodeId },
}

/// One partition moving to a new owner (in a [`Plan`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Transfer {
    pub partition: PartitionId,
    pub from: NodeId,
    pub to: NodeId,
}

/// What committing the staged changes would do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The version the plan was computed on: a commit of it fails once the state moved on.
    pub base_version: u64,
    /// Every partition that changes owner.
    pub transfers: Vec<Transfer>,
    /// Partitions owned before and after, per node.
    pub ownership: BTreeMap<NodeId, (usize, usize)>,
    /// The owners after the change, in partition order.
    next_owners: Vec<NodeId>,
}

/// Why a ring change cannot be staged or committed; each names what the operator can do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChangeError {
    #[error("{node} is already a member ({state}); only a new node can join")]
    AlreadyMember { node: NodeId, state: &'static str },
    #[error("{node} is not a valid member ({state}), so it cannot {action}")]
    NotValid {
        node: NodeId,
        state: &'static str,
        action: &'static str,
    },
    #[error("{node} is not a member of this cluster")]
    Unknown { node: NodeId },
    #[error("{node} cannot replace {old}: a replacement must be a new node")]
    BadReplacement { old: NodeId, node: NodeId },
    #[error("no changes are staged")]
    NothingStaged,
    #[error("the staged changes would leave no member to own the partitions")]
    NoMembersLeft,
    #[error(
        "{count} transfers of the last commit are still pending; wait for them (admin transfers)"
    )]
    TransfersPending { count: usize },
    #[error(
        "the plan changed: it was made on ring version {planned}, and the ring is now version {current}; run plan again"
    )]
    PlanChanged { planned: u64, current: u64 },
    #[error("this node's ring is provisional; it has not joined a cluster yet")]
    Provisional,
    #[error("{node} is staged to replace {old}; clear the staged changes before removing it")]
    ReplacementStaged { node: NodeId, old: NodeId },
    #[error("{node} is {state}, not exiting: only a node that owns nothing can finish a leave")]
    NotExiting { node: NodeId, state: &'static str },
    #[error(transparent)]
    Ring(#[from] RingError),
}

impl TryFrom<UncheckedClusterState> for ClusterState {
    type Error = ClusterStateError;
    fn try_from(unchecked: UncheckedClusterState) -> Result<Self, Self::Error> {
        let state = ClusterState {
            cluster: unchecked.cluster,
            ring: unchecked.ring,
            members: unchecked.members,
            staged: unchecked.staged,
            pending: unchecked.pending,
            handoffs: unchecked.handoffs,
            routed_at: unchecked.routed_at,
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
    #[error("the state lists {count} staged changes or transfers; at most {limit} are allowed")]
    TooManyEntries { count: usize, limit: usize },
    #[error("a transfer of partition {partition} is invalid: {reason}")]
    BadTransfer { partition: u32, reason: String },
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
            routed_at: ring.version(),
            ring,
            members,
            staged: BTreeMap::new(),
            pending: None,
            handoffs: Vec::new(),
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

    /// The version at which the owners a request is routed by (the ring and the pending
    /// ring) last changed; staging and handoff reports leave it alone. 0 when not known.
    pub fn routing_version(&self) -> u64 {
        self.routed_at
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

    /// Whether a peer that gossips `version` and `fingerprint` should be sent this state:
    /// it is older, or of this version but made apart from it (a fingerprint of 0 is a peer
    /// that does not say). The receiver keeps whichever [`ClusterState::is_superseded_by`]
    /// prefers.
    pub fn is_news_to(&self, version: u64, fingerprint: u64) -> bool {
        self.is_committed()
            && (version < self.version()
                || (version == self.version()
                    && fingerprint != 0
                    && fingerprint != self.fingerprint()))
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
            std::cmp::Ordering::Equal => other.tie_break_key() > self.tie_break_key(),
        }
    }

    /// Two states of one version made apart (a claimant cut off from the others staged a
    /// change while another did) are ordered by everything they hold, so that every node
    /// keeps the same one: ordered by owners and members alone, two states differing only in
    /// their staged changes stayed apart for good, each node planning its own.
    #[allow(clippy::type_complexity)]
    fn tie_break_key(
        &self,
    ) -> (
        &[NodeId],
        &BTreeMap<NodeId, MemberState>,
        &BTreeMap<NodeId, StagedChange>,
        Option<&[NodeId]>,
        &[Handoff],
        u64,
    ) {
        (
            self.ring.owners(),
            &self.members,
            &self.staged,
            self.pending.as_ref().map(Ring::owners),
            &self.handoffs,
            self.routed_at,
        )
    }

    /// A digest of everything [`ClusterState::is_superseded_by`] orders by, version
    /// included: two nodes that gossip equal versions but different fingerprints hold states
    /// made apart (two claimants at once) and exchange them, so that both keep the one the
    /// tie rule prefers. Comparing versions alone left them apart for good.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = blake3::Hasher::new();
        // Writing to a hasher cannot fail, and every field serializes.
        let _ = rmp_serde::encode::write(&mut hasher, &(self.version(), self.tie_break_key()));
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_bytes()[..8]);
        // 0 is what a peer that does not send fingerprints appears to send.
        u64::from_le_bytes(first).max(1)
    }

    pub fn staged(&self) -> &BTreeMap<NodeId, StagedChange> {
        &self.staged
    }

    /// The committed ring that takes effect once its handoffs are done.
    pub fn pending(&self) -> Option<&Ring> {
        self.pending.as_ref()
    }

    /// Handoffs still to do for the pending ring.
    pub fn handoffs(&self) -> &[Handoff] {
        &self.handoffs
    }

    /// The member that makes every ring change, so that changes are serialized: the lowest
    /// valid (or leaving) member that `is_up` says is up. Nodes that judge liveness alike
    /// agree; when they do not, two claimants may each make a version, and the tie rule of
    /// [`ClusterState::is_superseded_by`] keeps one (the other change is made again).
    pub fn claimant(&self, is_up: impl Fn(&NodeId) -> bool) -> Option<&NodeId> {
        self.members
            .iter()
            .filter(|(_, state)| matches!(state, MemberState::Valid | MemberState::Leaving))
            .map(|(node, _)| node)
            .find(|node| is_up(node))
    }

    /// This state with one more version and `change` made to it.
    fn next_version(&self, change: impl FnOnce(&mut ClusterState)) -> Result<Self, ChangeError> {
        if !self.is_committed() {
            return Err(ChangeError::Provisional);
        }
        let version = self
            .version()
            .checked_add(1)
            .ok_or(RingError::VersionExhausted {
                version: self.version(),
            })?;
        let mut next = self.clone();
        next.ring = next.ring.with_version(version);
        change(&mut next);
        Ok(next)
    }

    fn state_name(&self, node: &NodeId) -> &'static str {
        self.state_of(node)
            .map_or("not a member", MemberState::as_str)
    }

    /// Stages `change` for `node` (replacing what was staged for it before).
    pub fn stage(&self, node: &NodeId, change: StagedChange) -> Result<Self, ChangeError> {
        let state = self.state_of(node);
        match &change {
            StagedChange::Join => {
                if let Some(state) = state.filter(|state| *state != MemberState::Joining) {
                    return Err(ChangeError::AlreadyMember {
                        node: node.clone(),
                        state: state.as_str(),
                    });
                }
            }
            StagedChange::Remove
                if matches!(state, Some(MemberState::Joining | MemberState::Exiting)) =>
            {
                // A joiner that died before its join was committed, or a leaver switched off
                // before it finished: neither owns anything, so removing it moves nothing.
                if let Some((old, _)) = self.staged.iter().find(
                    |(_, staged)| matches!(staged, StagedChange::Replace { by } if by == node),
                ) {
                    return Err(ChangeError::ReplacementStaged {
                        node: node.clone(),
                        old: old.clone(),
                    });
                }
            }
            StagedChange::Leave | StagedChange::Remove | StagedChange::Replace { .. } => {
                if state != Some(MemberState::Valid) {
                    return Err(ChangeError::NotValid {
                        node: node.clone(),
                        state: self.state_name(node),
                        action: match change {
                            StagedChange::Leave => "leave",
                            StagedChange::Remove => "be removed",
                            _ => "be replaced",
                        },
                    });
                }
                if let StagedChange::Replace { by } = &change
                    && (by == node
                        || !matches!(self.state_of(by), None | Some(MemberState::Joining)))
                {
                    return Err(ChangeError::BadReplacement {
                        old: node.clone(),
                        node: by.clone(),
                    });
                }
            }
        }
        self.next_version(|next| {
            if change == StagedChange::Join {
                next.members.insert(node.clone(), MemberState::Joining);
            }
            if let StagedChange::Replace { by } = &change {
                next.members.insert(by.clone(), MemberState::Joining);
            }
            next.staged.insert(node.clone(), change);
        })
    }

    /// Drops every staged change and every joining member (as Riak's `cluster clear`): a
    /// joiner owns nothing until a commit, so forgetting it moves nothing, and a joiner that
    /// died no longer holds every later commit back. A live one can join again.
    pub fn clear(&self) -> Result<Self, ChangeError> {
        let joiners: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, state)| **state == MemberState::Joining)
            .map(|(node, _)| node.clone())
            .collect();
        if self.staged.is_empty() && joiners.is_empty() {
            return Err(ChangeError::NothingStaged);
        }
        self.next_version(|next| {
            next.staged.clear();
            for joiner in &joiners {
                next.members.remove(joiner);
            }
        })
    }

    /// Records that exiting member `node` finished its leave: it holds no hint and no copy
    /// and coordinates nothing more (it said so itself), so it is `left`.
    pub fn leave_finished(&self, node: &NodeId) -> Result<Self, ChangeError> {
        match self.state_of(node) {
            Some(MemberState::Exiting) => {}
            // Recorded before: a retried report.
            Some(MemberState::Left) => return Ok(self.clone()),
            _ => {
                return Err(ChangeError::NotExiting {
                    node: node.clone(),
                    state: self.state_name(node),
                });
            }
        }
        self.next_version(|next| {
            next.members.insert(node.clone(), MemberState::Left);
        })
    }

    /// What committing the staged changes would move. Joins and leaves go through the claim
    /// (balanced, spaced, few moves); a replacement takes its old node's partitions one for
    /// one.
    pub fn plan(&self, n_val: usize) -> Result<Plan, ChangeError> {
        if !self.is_committed() {
            return Err(ChangeError::Provisional);
        }
        if self.staged.is_empty() {
            return Err(ChangeError::NothingStaged);
        }
        self.check_nothing_pending()?;
        let mut substitutes: BTreeMap<&NodeId, &NodeId> = BTreeMap::new();
        let mut members: Vec<NodeId> = Vec::new();
        for (node, state) in &self.members {
            let staying = match self.staged.get(node) {
                Some(StagedChange::Join) => true,
                Some(StagedChange::Leave | StagedChange::Remove) => false,
                Some(StagedChange::Replace { by }) => {
                    substitutes.insert(node, by);
                    false
                }
                None => *state == MemberState::Valid,
            };
            if staying {
                members.push(node.clone());
            }
        }
        // Substitute first, so that a replacement moves nothing beyond the old node's share.
        let substituted: Vec<NodeId> = self
            .ring
            .owners()
            .iter()
            .map(|owner| (*substitutes.get(owner).unwrap_or(&owner)).clone())
            .collect();
        members.extend(substitutes.values().map(|by| (*by).clone()));
        members.sort();
        members.dedup();
        if members.is_empty() {
            return Err(ChangeError::NoMembersLeft);
        }
        let substituted_ring = Ring::from_owners(self.version(), substituted)?;
        let next = if substituted_ring.members() == members {
            substituted_ring
        } else {
            substituted_ring.rebalance(&members, n_val)?
        };
        let transfers: Vec<Transfer> = self
            .ring
            .transfers_to(&next)
            .into_iter()
            .map(|(partition, from, to)| Transfer {
                partition,
                from,
                to,
            })
            .collect();
        let mut ownership: BTreeMap<NodeId, (usize, usize)> = BTreeMap::new();
        for owner in self.ring.owners() {
            ownership.entry(owner.clone()).or_default().0 += 1;
        }
        for owner in next.owners() {
            ownership.entry(owner.clone()).or_default().1 += 1;
        }
        for member in &members {
            ownership.entry(member.clone()).or_default();
        }
        Ok(Plan {
            base_version: self.version(),
            transfers,
            ownership,
            next_owners: next.owners().to_vec(),
        })
    }

    fn check_nothing_pending(&self) -> Result<(), ChangeError> {
        match &self.pending {
            Some(_) => Err(ChangeError::TransfersPending {
                count: self.handoffs.len(),
            }),
            None => Ok(()),
        }
    }

    /// Commits `plan` (made by [`ClusterState::plan`] on this very version): joiners become
    /// valid, leavers leaving, removed nodes down, and the plan's ownership becomes the
    /// pending ring with the handoffs it needs. A plan that moves no data takes effect at once.
    pub fn commit(&self, plan: &Plan) -> Result<Self, ChangeError> {
        if plan.base_version != self.version() {
            return Err(ChangeError::PlanChanged {
                planned: plan.base_version,
                current: self.version(),
            });
        }
        self.check_nothing_pending()?;
        let next_ring = Ring::from_owners(self.version(), plan.next_owners.clone())?;
        let removed = |node: &NodeId| {
            self.staged.get(node) == Some(&StagedChange::Remove)
                || self.state_of(node) == Some(MemberState::Down)
        };
        let handoffs = handoffs_between(&self.ring, &next_ring, removed);
        self.next_version(|next| {
            for (node, change) in std::mem::take(&mut next.staged) {
                match change {
                    StagedChange::Join => {
                        next.members.insert(node, MemberState::Valid);
                    }
                    StagedChange::Leave => {
                        next.members.insert(node, MemberState::Leaving);
                    }
                    StagedChange::Remove => {
                        next.members.insert(node, MemberState::Down);
                    }
                    StagedChange::Replace { by } => {
                        next.members.insert(by, MemberState::Valid);
                        next.members.insert(node, MemberState::Leaving);
                    }
                }
            }
            let version = next.version();
            next.routed_at = version;
            if handoffs.is_empty() {
                next.ring = next_ring.with_version(version);
                next.settle_leavers();
            } else {
                next.pending = Some(next_ring.with_version(version));
                next.handoffs = handoffs;
            }
        })
    }

    /// Records that `handoff` is complete (its receiver holds everything it was sent,
    /// durably); `None` when it is not pending (already recorded, or of another change).
    pub fn handoff_done(&self, handoff: &Handoff) -> Option<Self> {
        let index = self
            .handoffs
            .iter()
            .position(|pending| pending == handoff)?;
        self.next_version(|next| {
            next.handoffs.remove(index);
        })
        .ok()
    }

    /// Makes the pending ring current, once no handoff remains: one version, so every node
    /// switches at once. Leaving members that own nothing more are exiting.
    pub fn flip(&self) -> Option<Self> {
        if self.pending.is_none() || !self.handoffs.is_empty() {
            return None;
        }
        self.next_version(|next| {
            if let Some(pending) = next.pending.take() {
                next.ring = pending.with_version(next.version());
            }
            next.routed_at = next.version();
            next.settle_leavers();
        })
        .ok()
    }

    /// Leaving members that own nothing more are exiting.
    fn settle_leavers(&mut self) {
        let owners: std::collections::BTreeSet<&NodeId> = self.ring.owners().iter().collect();
        for (node, state) in self.members.iter_mut() {
            if *state == MemberState::Leaving && !owners.contains(node) {
                *state = MemberState::Exiting;
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
        if self.staged.len() > MAX_MEMBERS {
            return Err(ClusterStateError::TooManyEntries {
                count: self.staged.len(),
                limit: MAX_MEMBERS,
            });
        }
        let partition_count = self.ring.partition_count();
        let limit = partition_count as usize * MAX_MEMBERS;
        if self.handoffs.len() > limit {
            return Err(ClusterStateError::TooManyEntries {
                count: self.handoffs.len(),
                limit,
            });
        }
        for handoff in &self.handoffs {
            let reason = if self.pending.is_none() {
                Some("no change is pending".to_string())
            } else if handoff.partition >= partition_count {
                Some("outside the ring".to_string())
            } else if !self.members.contains_key(&handoff.from) {
                Some(format!("{} is not a member", handoff.from))
            } else if !self.members.contains_key(&handoff.to) {
                Some(format!("{} is not a member", handoff.to))
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(ClusterStateError::BadTransfer {
                    partition: handoff.partition,
                    reason,
                });
            }
        }
        if let Some(pending) = &self.pending {
            pending.validate()?;
            if pending.partition_count() != partition_count {
                return Err(ClusterStateError::BadTransfer {
                    partition: 0,
                    reason: "the pending ring has another partition count".into(),
                });
            }
            for (partition, owner) in pending.owners().iter().enumerate() {
                if self.members.get(owner) != Some(&MemberState::Valid) {
                    return Err(ClusterStateError::OwnerNotMember {
                        partition: partition as u32,
                        owner: owner.clone(),
                    });
                }
            }
        }
        for (partition, owner) in self.ring.owners().iter().enumerate() {
            // A removed (down) node keeps its partitions until the pending ring flips.
            let may_own = match self.members.get(owner) {
                Some(MemberState::Valid | MemberState::Leaving) => true,
                Some(MemberState::Down) => self.pending.is_some(),
                _ => false,
            };
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

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn three() -> ClusterState {
        ClusterState::bootstrap(64, &nodes(&["n1", "n2", "n3"]), 3).unwrap()
    }

    /// Completes every pending handoff, each in one version, then flips the ring.
    fn complete_all(mut state: ClusterState) -> ClusterState {
        let pending = state.pending().cloned();
        if pending.is_some() {
            assert_eq!(
                state.routing_version(),
                state.version(),
                "a commit changes the routing"
            );
        }
        while let Some(handoff) = state.handoffs().first().cloned() {
            assert_eq!(state.flip(), None, "no flip while a handoff is pending");
            let next = state.handoff_done(&handoff).unwrap();
            assert_eq!(next.version(), state.version() + 1);
            assert_eq!(
                next.routing_version(),
                state.routing_version(),
                "a handoff report leaves the routing alone"
            );
            assert_eq!(next.handoffs().len(), state.handoffs().len() - 1);
            assert_eq!(
                next.ring().owners(),
                state.ring().owners(),
                "ownership waits for the flip"
            );
            assert_eq!(next.handoff_done(&handoff), None, "recorded once");
            state = next;
        }
        let flipped = state.flip().unwrap();
        assert_eq!(flipped.version(), state.version() + 1);
        assert_eq!(flipped.routing_version(), flipped.version());
        assert_eq!(
            Some(flipped.ring().owners()),
            pending.as_ref().map(Ring::owners)
        );
        assert_eq!(flipped.pending(), None);
        flipped
    }

    #[test]
    fn a_staged_join_plans_the_new_nodes_share_and_flips_once_its_handoffs_are_done() {
        let state = three();
        let staged = state.stage(&node("n4"), StagedChange::Join).unwrap();
        assert_eq!(staged.version(), 2);
        assert_eq!(
            staged.routing_version(),
            1,
            "staging routes nothing differently"
        );
        assert_eq!(staged.state_of(&node("n4")), Some(MemberState::Joining));
        assert!(staged.ring().partitions_owned_by(&node("n4")).is_empty());
        let plan = staged.plan(3).unwrap();
        assert_eq!(plan.transfers.len(), 16);
        assert!(plan.transfers.iter().all(|t| t.to == node("n4")));
        assert_eq!(plan.ownership[&node("n4")], (0, 16));
        let committed = staged.commit(&plan).unwrap();
        assert_eq!(committed.state_of(&node("n4")), Some(MemberState::Valid));
        assert!(!committed.handoffs().is_empty());
        assert!(committed.handoffs().iter().all(|h| h.to == node("n4")));
        // Ownership has not moved yet: reads keep the old owners until the flip.
        assert_eq!(committed.ring().owners(), state.ring().owners());
        assert_eq!(committed.pending().unwrap().owners(), &plan.next_owners[..]);
        assert_eq!(
            committed
                .stage(&node("n5"), StagedChange::Join)
                .unwrap()
                .plan(3),
            Err(ChangeError::TransfersPending {
                count: committed.handoffs().len()
            })
        );
        let done = complete_all(committed);
        assert_eq!(done.ring().partitions_owned_by(&node("n4")).len(), 16);
        assert_eq!(done.ring().spacing_violations(3), 0);
        let bytes = rmp_serde::to_vec_named(&done).unwrap();
        assert_eq!(rmp_serde::from_slice::<ClusterState>(&bytes).unwrap(), done);
    }

    #[test]
    fn a_joiner_that_died_is_dropped_by_clear_or_removed_and_moves_nothing() {
        let staged = three().stage(&node("n4"), StagedChange::Join).unwrap();
        // `clear` forgets the joiner with the staged join.
        let cleared = staged.clear().unwrap();
        assert_eq!(cleared.state_of(&node("n4")), None);
        assert!(cleared.staged().is_empty());
        assert_eq!(cleared.clear(), Err(ChangeError::NothingStaged));
        // `remove` takes a joiner: committed, it is down and nothing moves.
        let removing = staged.stage(&node("n4"), StagedChange::Remove).unwrap();
        let leaving = removing.stage(&node("n2"), StagedChange::Leave).unwrap();
        let plan = leaving.plan(3).unwrap();
        assert!(plan.transfers.iter().all(|t| t.to != node("n4")));
        let committed = leaving.commit(&plan).unwrap();
        assert_eq!(committed.state_of(&node("n4")), Some(MemberState::Down));
        assert_eq!(committed.state_of(&node("n2")), Some(MemberState::Leaving));
        let done = complete_all(committed);
        assert_eq!(done.state_of(&node("n2")), Some(MemberState::Exiting));
        assert!(done.ring().partitions_owned_by(&node("n4")).is_empty());
        // A joiner named as a replacement cannot be removed behind the replacement's back.
        let replacing = three()
            .stage(&node("n3"), StagedChange::Replace { by: node("n5") })
            .unwrap();
        assert_eq!(
            replacing.stage(&node("n5"), StagedChange::Remove),
            Err(ChangeError::ReplacementStaged {
                node: node("n5"),
                old: node("n3")
            })
        );
    }

    #[test]
    fn only_an_exiting_member_finishes_its_leave_and_a_left_one_is_gone() {
        let state = three();
        assert!(matches!(
            state.leave_finished(&node("n3")),
            Err(ChangeError::NotExiting { .. })
        ));
        let staged = state.stage(&node("n3"), StagedChange::Leave).unwrap();
        let committed = staged.commit(&staged.plan(3).unwrap()).unwrap();
        assert!(
            committed.leave_finished(&node("n3")).is_err(),
            "a leaver that still owns partitions has not finished"
        );
        let exiting = complete_all(committed);
        assert_eq!(exiting.state_of(&node("n3")), Some(MemberState::Exiting));
        let left = exiting.leave_finished(&node("n3")).unwrap();
        assert_eq!(left.version(), exiting.version() + 1);
        assert_eq!(left.state_of(&node("n3")), Some(MemberState::Left));
        assert!(MemberState::Left.is_gone() && !MemberState::Exiting.is_gone());
        assert_eq!(
            left.leave_finished(&node("n3")).unwrap(),
            left,
            "idempotent"
        );
        // A member switched off before it finished can be removed instead.
        let removed = exiting.stage(&node("n3"), StagedChange::Remove).unwrap();
        let removed = removed.commit(&removed.plan(3).unwrap()).unwrap();
        assert_eq!(removed.state_of(&node("n3")), Some(MemberState::Down));
        // A left member neither joins again under its old name nor claims.
        assert!(matches!(
            left.stage(&node("n3"), StagedChange::Join),
            Err(ChangeError::AlreadyMember { .. })
        ));
        assert_eq!(left.claimant(|_| true), Some(&node("n1")));
        let bytes = rmp_serde::to_vec_named(&left).unwrap();
        assert_eq!(rmp_serde::from_slice::<ClusterState>(&bytes).unwrap(), left);
    }

    #[test]
    fn a_commit_of_a_stale_plan_is_refused() {
        let staged = three().stage(&node("n4"), StagedChange::Join).unwrap();
        let plan = staged.plan(3).unwrap();
        let restaged = staged.stage(&node("n5"), StagedChange::Join).unwrap();
        assert_eq!(
            restaged.commit(&plan),
            Err(ChangeError::PlanChanged {
                planned: 2,
                current: 3
            })
        );
        let cleared = restaged.clear().unwrap();
        assert!(cleared.staged().is_empty());
        assert_eq!(cleared.plan(3), Err(ChangeError::NothingStaged));
    }

    #[test]
    fn leave_remove_and_replace_move_exactly_what_they_must() {
        let four = complete_all({
            let staged = three().stage(&node("n4"), StagedChange::Join).unwrap();
            staged.commit(&staged.plan(3).unwrap()).unwrap()
        });
        // Leave: only the leaver's partitions move; it exits once they have.
        let owned = four.ring().partitions_owned_by(&node("n2")).len();
        let staged = four.stage(&node("n2"), StagedChange::Leave).unwrap();
        let plan = staged.plan(3).unwrap();
        assert!(plan.transfers.len() >= owned);
        assert!(
            plan.transfers.len() * 2 <= owned * 3,
            "{} moves",
            plan.transfers.len()
        );
        let leaving = staged.commit(&plan).unwrap();
        assert_eq!(leaving.state_of(&node("n2")), Some(MemberState::Leaving));
        let left = complete_all(leaving);
        assert_eq!(left.state_of(&node("n2")), Some(MemberState::Exiting));
        assert!(left.ring().partitions_owned_by(&node("n2")).is_empty());

        // Remove: the node is down at once and keeps its partitions only until they flip.
        let staged = four.stage(&node("n3"), StagedChange::Remove).unwrap();
        let removed = staged.commit(&staged.plan(3).unwrap()).unwrap();
        assert_eq!(removed.state_of(&node("n3")), Some(MemberState::Down));
        removed.validate().unwrap();
        let removed = complete_all(removed);
        assert!(removed.ring().partitions_owned_by(&node("n3")).is_empty());

        // Replace: the old node's partitions, one for one, and nothing else.
        let owned = four.ring().partitions_owned_by(&node("n1"));
        let staged = four
            .stage(&node("n1"), StagedChange::Replace { by: node("n9") })
            .unwrap();
        let plan = staged.plan(3).unwrap();
        let moved: Vec<PartitionId> = plan.transfers.iter().map(|t| t.partition).collect();
        assert_eq!(moved, owned);
        assert!(plan.transfers.iter().all(|t| t.to == node("n9")));
    }

    #[test]
    fn changes_that_make_no_sense_are_refused_with_the_reason() {
        let state = three();
        assert!(matches!(
            state.stage(&node("n1"), StagedChange::Join),
            Err(ChangeError::AlreadyMember { .. })
        ));
        let error = state.stage(&node("n7"), StagedChange::Leave).unwrap_err();
        assert!(error.to_string().contains("not a valid member"), "{error}");
        assert!(matches!(
            state.stage(&node("n1"), StagedChange::Replace { by: node("n2") }),
            Err(ChangeError::BadReplacement { .. })
        ));
        let provisional = ClusterState::provisional(64, &nodes(&["n1"]), 3).unwrap();
        assert_eq!(
            provisional.stage(&node("n4"), StagedChange::Join),
            Err(ChangeError::Provisional)
        );
        let all_gone = ["n1", "n2", "n3"]
            .iter()
            .try_fold(state, |state, name| {
                state.stage(&node(name), StagedChange::Leave)
            })
            .unwrap();
        assert_eq!(all_gone.plan(3), Err(ChangeError::NoMembersLeft));
    }

    #[test]
    fn the_claimant_is_the_lowest_member_seen_up() {
        let state = three();
        assert_eq!(state.claimant(|_| true), Some(&node("n1")));
        assert_eq!(state.claimant(|n| n != &node("n1")), Some(&node("n2")));
        assert_eq!(state.claimant(|_| false), None);
    }

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
        // Two claimants that could not see each other staged different changes at one
        // version, over the same owners and members: still exactly one wins.
        let mut leave = real.clone();
        leave
            .staged
            .insert(NodeId::new("n3").unwrap(), StagedChange::Leave);
        let mut remove = real.clone();
        remove
            .staged
            .insert(NodeId::new("n2").unwrap(), StagedChange::Remove);
        assert_ne!(
            leave.is_superseded_by(&remove),
            remove.is_superseded_by(&leave),
            "exactly one of two same-version stagings wins"
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

//! Membership by gossip, scuttlebutt style (as Cassandra's gossiper and chitchat).
//!
//! Every node owns one [`MemberRecord`] about itself: its addresses, a `generation` that grows
//! on every restart, and a heartbeat `version` that it bumps every gossip round. A round with
//! a peer is three messages:
//!
//! 1. the initiator sends a digest `(node, generation, version)` of every record it knows;
//! 2. the peer answers with every record it has that is newer than the digest (or missing
//!    from it), and asks for the nodes where the initiator's digest is newer;
//! 3. the initiator sends those records.
//!
//! A record replaces another when its `(generation, version)` is greater, so the merge is a
//! per-node max: commutative, associative and idempotent, and every node converges on the
//! newest record of every member. A newer heartbeat of a node is a heartbeat for its
//! [`PhiAccrual`] detector, however many hops it took.
//!
//! Pure: time (`now_ms`) and randomness (`rng`) are arguments, so a seed reproduces a run.

use crate::core::failure::{DEFAULT_WINDOW, PhiAccrual};
use crate::core::ids::NodeId;
use crate::core::ring::MAX_PARTITION_COUNT;
use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most records a gossip message may carry; also bounds the member table.
pub const MAX_MEMBERS: usize = 4096;
/// Longest address text in a record.
pub const MAX_ADDRESS_BYTES: usize = 255;

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub node: NodeId,
    /// Grows on every restart of the node, so a restarted node's records win over its old ones.
    pub generation: u64,
    /// Heartbeat: grows every gossip round within a generation.
    pub version: u64,
    /// Node-to-node address (host:port).
    pub peer_addr: String,
    /// Client address (host:port).
    pub client_addr: String,
    /// Hints the node holds, per partition (partitions with none are absent), as of its
    /// last heartbeat: with every member's record, a node can tell that no hint for a
    /// partition exists anywhere (tombstone reaping needs it).
    #[serde(default)]
    pub hints: Vec<(u32, u64)>,
    /// The ring version the node holds, as of its last heartbeat: a ring change is committed
    /// only once every member up holds the same.
    #[serde(default)]
    pub ring_version: u64,
}

impl MemberRecord {
    /// A member known only by its id and peer address (a seed, a peer named by an operator),
    /// until its own records arrive: generation 0, so any real record wins.
    pub fn unheard(node: NodeId, peer_addr: &str) -> Self {
        MemberRecord {
            node,
            generation: 0,
            version: 0,
            peer_addr: peer_addr.to_string(),
            client_addr: String::new(),
            hints: Vec::new(),
            ring_version: 0,
        }
    }

    fn stamp(&self) -> (u64, u64) {
        (self.generation, self.version)
    }

    /// Checks a record read from the network.
    pub fn validate(&self) -> Result<(), GossipError> {
        if self.peer_addr.len() > MAX_ADDRESS_BYTES || self.client_addr.len() > MAX_ADDRESS_BYTES {
            return Err(GossipError::AddressTooLong {
                node: self.node.clone(),
            });
        }
        if self.hints.len() > MAX_PARTITION_COUNT as usize {
            return Err(GossipError::TooManyHintEntries {
                node: self.node.clone(),
                count: self.hints.len(),
            });
        }
        Ok(())
    }
}

/// One entry of a digest: what the sender knows of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub node: NodeId,
    pub generation: u64,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    #[error("gossip message carries {count} entries; at most {MAX_MEMBERS} are allowed")]
    TooManyEntries { count: usize },
    #[error("gossip record of {node} has an address longer than {MAX_ADDRESS_BYTES} bytes")]
    AddressTooLong { node: NodeId },
    #[error(
        "gossip record of {node} lists hints for {count} partitions; a ring has at most {MAX_PARTITION_COUNT}"
    )]
    TooManyHintEntries { node: NodeId, count: usize },
}

/// Checks the size of a gossip message's entry list before it is used.
pub fn check_entry_count(count: usize) -> Result<(), GossipError> {
    if count > MAX_MEMBERS {
        return Err(GossipError::TooManyEntries { count });
    }
    Ok(())
}

/// Tunables of gossip and failure detection.
#[derive(Clone, Debug, PartialEq)]
pub struct GossipConfig {
    /// Peers contacted per round.
    pub fanout: usize,
    /// Time between rounds; also the detector's initial mean heartbeat interval.
    pub interval_ms: u64,
    /// Suspicion above which a node is judged down (Cassandra's phi_convict_threshold).
    pub phi_threshold: f64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            fanout: 3,
            interval_ms: 500,
            phi_threshold: 8.0,
        }
    }
}

/// A change that a merge brought, for logs and for the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    Joined(NodeId),
    Restarted(NodeId),
    AddressChanged(NodeId),
}

/// How one node sees one member.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberView {
    pub record: MemberRecord,
    pub up: bool,
    pub phi: f64,
    /// Milliseconds since the last heartbeat reached this node (`None`: never, or self).
    pub silent_ms: Option<u64>,
}

/// One node's gossip state: the newest record of every member and a detector per peer.
#[derive(Clone, Debug)]
pub struct Gossip {
    local: NodeId,
    config: GossipConfig,
    members: BTreeMap<NodeId, MemberRecord>,
    detectors: BTreeMap<NodeId, PhiAccrual>,
}

impl Gossip {
    /// Starts with this node's own record (its generation already chosen by the caller).
    pub fn new(local: MemberRecord, config: GossipConfig) -> Self {
        let mut members = BTreeMap::new();
        let local_id = local.node.clone();
        members.insert(local_id.clone(), local);
        Gossip {
            local: local_id,
            config,
            members,
            detectors: BTreeMap::new(),
        }
    }

    pub fn local(&self) -> &NodeId {
        &self.local
    }

    pub fn config(&self) -> &GossipConfig {
        &self.config
    }

    /// Bumps this node's heartbeat; called once per round.
    pub fn tick(&mut self) {
        if let Some(record) = self.members.get_mut(&self.local) {
            record.version += 1;
        }
    }

    pub fn local_record(&self) -> Option<&MemberRecord> {
        self.members.get(&self.local)
    }

    pub fn record(&self, node: &NodeId) -> Option<&MemberRecord> {
        self.members.get(node)
    }

    /// Every known member id, sorted.
    pub fn member_ids(&self) -> Vec<NodeId> {
        self.members.keys().cloned().collect()
    }

    pub fn records(&self) -> Vec<MemberRecord> {
        self.members.values().cloned().collect()
    }

    pub fn digests(&self) -> Vec<Digest> {
        self.members
            .values()
            .map(|record| Digest {
                node: record.node.clone(),
                generation: record.generation,
                version: record.version,
            })
            .collect()
    }

    /// Picks the peers of this round: `fanout` random members, drawn from the live ones, plus
    /// one member judged down (so recoveries are noticed) and, while this node knows few
    /// members, one of the `seeds`.
    pub fn select_peers<R: Rng>(&self, now_ms: u64, seeds: &[NodeId], rng: &mut R) -> Vec<NodeId> {
        let others: Vec<&NodeId> = self
            .members
            .keys()
            .filter(|node| **node != self.local)
            .collect();
        let (live, down): (Vec<&NodeId>, Vec<&NodeId>) = others
            .into_iter()
            .partition(|node| self.is_up(node, now_ms));
        let mut chosen: Vec<NodeId> = live
            .choose_multiple(rng, self.config.fanout)
            .map(|node| (*node).clone())
            .collect();
        if let Some(node) = down.choose(rng) {
            chosen.push((*node).clone());
        }
        let unknown_seeds: Vec<&NodeId> = seeds
            .iter()
            .filter(|seed| **seed != self.local && !chosen.contains(seed))
            .collect();
        if (self.members.len() <= seeds.len() || chosen.is_empty())
            && let Some(seed) = unknown_seeds.choose(rng)
        {
            chosen.push((*seed).clone());
        }
        chosen
    }

    /// Step 2 (at the receiver): the records newer than the sender's digest, and the nodes
    /// whose record the sender has newer.
    pub fn answer_digest(&self, digests: &[Digest]) -> (Vec<MemberRecord>, Vec<NodeId>) {
        let mut theirs: BTreeMap<&NodeId, (u64, u64)> = BTreeMap::new();
        for digest in digests {
            theirs.insert(&digest.node, (digest.generation, digest.version));
        }
        let newer_here = self
            .members
            .values()
            .filter(|record| {
                theirs
                    .get(&record.node)
                    .is_none_or(|stamp| record.stamp() > *stamp)
            })
            .cloned()
            .collect();
        let newer_there = digests
            .iter()
            .filter(|digest| {
                self.members
                    .get(&digest.node)
                    .is_none_or(|record| record.stamp() < (digest.generation, digest.version))
            })
            .map(|digest| digest.node.clone())
            .collect();
        (newer_here, newer_there)
    }

    /// Records for the nodes a peer asked for (step 3).
    pub fn records_for(&self, nodes: &[NodeId]) -> Vec<MemberRecord> {
        nodes
            .iter()
            .filter_map(|node| self.members.get(node).cloned())
            .collect()
    }

    /// Merges records from a peer: each replaces the known one if newer. A newer heartbeat
    /// of a peer feeds its failure detector.
    pub fn apply(&mut self, records: Vec<MemberRecord>, now_ms: u64) -> Vec<MembershipChange> {
        let mut changes = Vec::new();
        for record in records {
            if record.node == self.local {
                // Only this node speaks for itself. A record of ours with a higher generation
                // (our data was restored from elsewhere) is outrun on our next restart.
                continue;
            }
            if record.validate().is_err() {
                continue;
            }
            let node = record.node.clone();
            let change = match self.members.get(&node) {
                None if self.members.len() >= MAX_MEMBERS => continue,
                None => Some(MembershipChange::Joined(node.clone())),
                Some(known) if record.stamp() <= known.stamp() => continue,
                Some(known) if record.generation > known.generation => {
                    Some(MembershipChange::Restarted(node.clone()))
                }
                Some(known) if known.peer_addr != record.peer_addr => {
                    Some(MembershipChange::AddressChanged(node.clone()))
                }
                Some(_) => None,
            };
            if matches!(change, Some(MembershipChange::Restarted(_))) {
                // A restarted node starts a fresh history of intervals.
                self.detectors.remove(&node);
            }
            let initial = self.config.interval_ms;
            self.detectors
                .entry(node.clone())
                .or_insert_with(|| PhiAccrual::new(initial, DEFAULT_WINDOW))
                .heartbeat(now_ms);
            self.members.insert(node, record);
            changes.extend(change);
        }
        changes
    }

    /// Adds members known from configuration or disk without a heartbeat yet; they count as
    /// up until they have been silent for the detection time.
    pub fn remember(&mut self, records: Vec<MemberRecord>, now_ms: u64) {
        for record in records {
            if record.node == self.local || self.members.contains_key(&record.node) {
                continue;
            }
            let initial = self.config.interval_ms;
            self.detectors
                .entry(record.node.clone())
                .or_insert_with(|| PhiAccrual::new(initial, DEFAULT_WINDOW))
                .heartbeat(now_ms);
            self.members.insert(record.node.clone(), record);
        }
    }

    pub fn phi(&self, node: &NodeId, now_ms: u64) -> f64 {
        if *node == self.local {
            return 0.0;
        }
        self.detectors
            .get(node)
            .map_or(f64::INFINITY, |detector| detector.phi(now_ms))
    }

    /// Sets the hints this node reports holding, per partition; they travel with its next
    /// heartbeat.
    pub fn set_local_hints(&mut self, hints: Vec<(u32, u64)>) {
        if let Some(record) = self.members.get_mut(&self.local) {
            record.hints = hints;
        }
    }

    /// Publishes the ring version this node holds with its next heartbeats.
    pub fn set_local_ring_version(&mut self, ring_version: u64) {
        if let Some(record) = self.members.get_mut(&self.local) {
            record.ring_version = ring_version;
        }
    }

    /// Hints held for `partition` by every member, as last heard from each.
    pub fn hints_for_partition(&self, partition: u32) -> u64 {
        self.members
            .values()
            .flat_map(|record| record.hints.iter())
            .filter(|(held_for, _)| *held_for == partition)
            .map(|(_, count)| count)
            .sum()
    }

    /// Milliseconds since `node`'s last heartbeat reached this node (`None`: itself, or
    /// never heard).
    pub fn silent_ms(&self, node: &NodeId, now_ms: u64) -> Option<u64> {
        if *node == self.local {
            return None;
        }
        self.detectors
            .get(node)
            .and_then(PhiAccrual::last_heartbeat_ms)
            .map(|last| now_ms.saturating_sub(last))
    }

    /// This node's judgement of `node`: itself is always up; unknown nodes are down.
    pub fn is_up(&self, node: &NodeId, now_ms: u64) -> bool {
        self.phi(node, now_ms) <= self.config.phi_threshold
    }

    pub fn view(&self, now_ms: u64) -> Vec<MemberView> {
        self.members
            .values()
            .map(|record| {
                let silent_ms = self.silent_ms(&record.node, now_ms);
                MemberView {
                    record: record.clone(),
                    up: self.is_up(&record.node, now_ms),
                    phi: self.phi(&record.node, now_ms),
                    silent_ms,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn record(name: &str, generation: u64) -> MemberRecord {
        MemberRecord {
            node: NodeId::new(name).unwrap(),
            generation,
            version: 0,
            peer_addr: format!("{name}:1"),
            client_addr: format!("{name}:2"),
            hints: Vec::new(),
            ring_version: 0,
        }
    }

    /// One full round between `from` and `to`, as the shell runs it over the network.
    fn exchange(nodes: &mut [Gossip], from: usize, to: usize, now_ms: u64) {
        let digests = nodes[from].digests();
        let (updates, requests) = nodes[to].answer_digest(&digests);
        nodes[from].apply(updates, now_ms);
        let pushed = nodes[from].records_for(&requests);
        nodes[to].apply(pushed, now_ms);
    }

    /// Runs rounds until every node knows every member and holds its newest generation;
    /// returns the number of rounds.
    fn rounds_to_converge(count: usize, seed: u64) -> usize {
        let config = GossipConfig::default();
        let mut nodes: Vec<Gossip> = (0..count)
            .map(|index| Gossip::new(record(&format!("n{index}"), 1), config.clone()))
            .collect();
        let seeds = vec![NodeId::new("n0").unwrap()];
        // Every node knows the seed only, as a node started with `--seed n0=...`.
        for node in nodes.iter_mut().skip(1) {
            node.remember(vec![record("n0", 0)], 0);
        }
        let mut rng = StdRng::seed_from_u64(seed);
        for round in 1..=200 {
            let now_ms = round as u64 * config.interval_ms;
            for index in 0..count {
                nodes[index].tick();
                let peers = nodes[index].select_peers(now_ms, &seeds, &mut rng);
                for peer in peers {
                    let target = peer.as_str()[1..].parse::<usize>().unwrap();
                    exchange(&mut nodes, index, target, now_ms);
                }
            }
            let agreed = nodes.iter().all(|node| {
                node.members.len() == count
                    && node.members.values().all(|record| record.generation == 1)
            });
            if agreed {
                return round;
            }
        }
        panic!("{count} nodes did not converge in 200 rounds");
    }

    #[test]
    fn membership_converges_from_one_seed() {
        // Rounds measured (seeds 0..3): printed with --nocapture; with 500 ms rounds the
        // simulated time is rounds × 0.5 s.
        for count in [5, 20, 100] {
            let rounds: Vec<usize> = (0..3).map(|seed| rounds_to_converge(count, seed)).collect();
            println!("{count} nodes: rounds to agree {rounds:?}");
            assert!(
                rounds.iter().all(|rounds| *rounds <= 20),
                "{count} nodes: {rounds:?}"
            );
        }
    }

    #[test]
    fn hints_per_partition_travel_with_the_record_and_are_bounded() {
        let mut local = Gossip::new(record("a", 1), GossipConfig::default());
        local.set_local_hints(vec![(3, 2), (7, 1)]);
        local.tick();
        let mut remote = record("b", 1);
        remote.version = 1;
        remote.hints = vec![(3, 5)];
        local.apply(vec![remote.clone()], 0);
        assert_eq!(local.hints_for_partition(3), 7);
        assert_eq!(local.hints_for_partition(7), 1);
        assert_eq!(local.hints_for_partition(9), 0);
        // A newer heartbeat with no hints clears them.
        remote.version = 2;
        remote.hints.clear();
        local.apply(vec![remote.clone()], 500);
        assert_eq!(local.hints_for_partition(3), 2);
        remote.hints = (0..=MAX_PARTITION_COUNT)
            .map(|partition| (partition, 1))
            .collect();
        assert!(matches!(
            remote.validate(),
            Err(GossipError::TooManyHintEntries { .. })
        ));
    }

    #[test]
    fn newer_records_win_and_restarts_are_seen() {
        let mut local = Gossip::new(record("a", 1), GossipConfig::default());
        assert_eq!(
            local.apply(vec![record("b", 1)], 0),
            vec![MembershipChange::Joined(NodeId::new("b").unwrap())]
        );
        let mut older = record("b", 1);
        older.version = 0;
        assert!(local.apply(vec![older], 10).is_empty());
        assert_eq!(
            local.apply(vec![record("b", 2)], 20),
            vec![MembershipChange::Restarted(NodeId::new("b").unwrap())]
        );
        // Nobody else may speak for this node.
        let mut forged = record("a", 99);
        forged.peer_addr = "evil:1".into();
        local.apply(vec![forged], 30);
        assert_eq!(local.local_record().unwrap().peer_addr, "a:1");
    }

    #[test]
    fn a_silent_member_is_judged_down_and_back_up_on_its_next_heartbeat() {
        let config = GossipConfig::default();
        let mut local = Gossip::new(record("a", 1), config.clone());
        let b = NodeId::new("b").unwrap();
        let mut remote = record("b", 1);
        for beat in 0..10u64 {
            remote.version = beat + 1;
            local.apply(vec![remote.clone()], beat * 500);
        }
        let last = 9 * 500;
        assert!(local.is_up(&b, last + 1_000));
        assert!(
            !local.is_up(&b, last + 10_000),
            "silent for 10 s with 500 ms heartbeats"
        );
        remote.version += 1;
        local.apply(vec![remote], last + 30_000);
        assert!(local.is_up(&b, last + 30_000));
        assert!(
            local.is_up(&NodeId::new("a").unwrap(), u64::MAX),
            "a node is never down to itself"
        );
        assert!(
            !local.is_up(&NodeId::new("z").unwrap(), 0),
            "an unknown node is not up"
        );
    }
}

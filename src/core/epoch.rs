//! Which actor a node coordinates a key's writes under, so that **no actor ever issues the
//! same dot twice**, whatever was lost, handed off, reaped or not yet fsynced.
//!
//! A dot `(actor, counter)` is safe to issue only from a copy of the key that holds every dot
//! that actor ever issued for it. A node cannot know that of an actor it used in a copy it no
//! longer has: a fallback's hint copy is deleted once handed back, a partition is dropped after
//! handoff, a tombstone is reaped, and after a crash the store may have lost writes that were
//! not yet fsynced (and that a read may already have shown to another node). Riak's KV679 bugs
//! are exactly this: a vnode reissued a counter of its own actor from a copy that no longer
//! covered it, and the other replicas took the new value for the old one.
//!
//! dynkv's rule, after Riak's per-key epochs:
//! - A node coordinates a key under a **key actor** that it draws fresh for the copy it
//!   coordinates into, and remembers in that copy's local record (never replicated). Every
//!   later write it coordinates into the same copy reuses it. A copy that is deleted takes its
//!   key actor with it, so a copy born again (a new hint, a merge from a replica, a handoff)
//!   gets a fresh one on its next coordinated write.
//! - A key actor is derived from the node's base actor (drawn with the data directory), its
//!   **incarnation** (counted up at every start and persisted before the node serves) and a
//!   sequence number within the incarnation, so two key actors never coincide except by a
//!   64-bit hash collision, as with base actors.
//! - After an unclean stop the node **trusts no key actor of an earlier incarnation**
//!   (`trusted_from` moves to the new incarnation): what a crash lost may have left a copy
//!   behind the counters its actor issued. After a clean stop (everything fsynced) the old key
//!   actors stay in use, so a restart does not grow every key's clock.
//!
//! The cost: a key's clock holds one entry per (node, copy lifetime) that coordinated it,
//! instead of one per node.

use crate::core::ids::Actor;
use serde::{Deserialize, Serialize};

/// The actor a node coordinates one key's writes under, and the incarnation that drew it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyActor {
    pub actor: Actor,
    pub incarnation: u64,
}

/// What a node knows of its own lifetimes: its base actor, this start's incarnation, and the
/// first incarnation whose key actors it still trusts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeEpoch {
    pub base: Actor,
    pub incarnation: u64,
    /// The incarnation of the last unclean start (or the first start): key actors drawn
    /// before it are never reused.
    pub trusted_from: u64,
}

impl NodeEpoch {
    /// The epoch of the next start, given the last one persisted and whether the node
    /// stopped cleanly after it (`None`: a new data directory).
    pub fn next(base: Actor, previous: Option<(u64, u64)>, stopped_cleanly: bool) -> NodeEpoch {
        let (incarnation, trusted_from) = match previous {
            None => (1, 1),
            Some((incarnation, trusted_from)) => {
                let incarnation = incarnation.saturating_add(1);
                let trusted_from = if stopped_cleanly {
                    trusted_from
                } else {
                    incarnation
                };
                (incarnation, trusted_from)
            }
        };
        NodeEpoch {
            base,
            incarnation,
            trusted_from,
        }
    }

    /// The `sequence`-th key actor of this incarnation.
    pub fn derive(&self, sequence: u64) -> KeyActor {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"dynkv key actor v1");
        hasher.update(&self.base.to_le_bytes());
        hasher.update(&self.incarnation.to_le_bytes());
        hasher.update(&sequence.to_le_bytes());
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_bytes()[..8]);
        // Zero is the "no actor" sentinel of the data directory's identity.
        let actor = u64::from_le_bytes(first).max(1);
        KeyActor {
            actor,
            incarnation: self.incarnation,
        }
    }

    /// Whether this node may keep coordinating under a key actor remembered in a copy.
    pub fn trusts(&self, key_actor: &KeyActor) -> bool {
        (self.trusted_from..=self.incarnation).contains(&key_actor.incarnation)
    }

    /// The key actor to coordinate a write under: the copy's own if it is trusted, otherwise
    /// a fresh one from `fresh`.
    pub fn choose(
        &self,
        remembered: Option<KeyActor>,
        fresh: impl FnOnce() -> KeyActor,
    ) -> KeyActor {
        match remembered {
            Some(key_actor) if self.trusts(&key_actor) => key_actor,
            _ => fresh(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_stop_keeps_trust_and_an_unclean_one_drops_it() {
        let first = NodeEpoch::next(7, None, false);
        assert_eq!((first.incarnation, first.trusted_from), (1, 1));
        let clean = NodeEpoch::next(7, Some((1, 1)), true);
        assert_eq!((clean.incarnation, clean.trusted_from), (2, 1));
        let unclean = NodeEpoch::next(7, Some((2, 1)), false);
        assert_eq!((unclean.incarnation, unclean.trusted_from), (3, 3));
        let drawn_in_first = first.derive(0);
        assert!(clean.trusts(&drawn_in_first));
        assert!(!unclean.trusts(&drawn_in_first));
        assert_eq!(
            clean.choose(Some(drawn_in_first), || clean.derive(0)),
            drawn_in_first
        );
        assert_ne!(
            unclean.choose(Some(drawn_in_first), || unclean.derive(0)),
            drawn_in_first
        );
    }

    #[test]
    fn key_actors_differ_by_sequence_incarnation_and_node() {
        let epoch = NodeEpoch::next(7, Some((4, 1)), true);
        let mut seen = std::collections::BTreeSet::new();
        for sequence in 0..1000 {
            assert!(seen.insert(epoch.derive(sequence).actor));
        }
        let later = NodeEpoch::next(7, Some((5, 1)), true);
        let other_node = NodeEpoch::next(8, Some((4, 1)), true);
        assert!(!seen.contains(&later.derive(0).actor));
        assert!(!seen.contains(&other_node.derive(0).actor));
        // A key actor from a future incarnation (a copied data directory) is not trusted.
        assert!(!epoch.trusts(&later.derive(0)));
    }
}

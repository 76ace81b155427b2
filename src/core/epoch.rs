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
//!   **incarnation** (counted up at every start and persisted before the node serves), a
//!   **start nonce** (64 random bits drawn at every start, never persisted) and a sequence
//!   number within the start, so two key actors never coincide except by a 64-bit hash
//!   collision, as with base actors. The nonce is what makes a restored backup or VM snapshot
//!   safe: it rewinds the persisted incarnation, and without the nonce the node would mint
//!   again the very key actors it had minted after the backup was taken.
//! - A node **trusts only the key actors of its current start** (`trusted_from` is always the
//!   current incarnation). After an unclean stop the copy may have lost writes its actor
//!   issued; after a clean stop the data directory may be restored from a backup taken before
//!   later writes under the same actor. Either way the old actor's counter can no longer be
//!   trusted, and nothing on the node can tell these cases from a plain restart.
//!
//! The cost: a key's clock gains one entry per (node, copy lifetime, start) that coordinated
//! it; actor retirement (`retire`) removes the entries of actors that coordinate no more once
//! every replica has superseded their versions.

use crate::core::ids::Actor;
use serde::{Deserialize, Serialize};

/// The actor a node coordinates one key's writes under, and the incarnation that drew it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyActor {
    pub actor: Actor,
    pub incarnation: u64,
}

/// What a node knows of its own lifetimes: its base actor, this start's incarnation and
/// nonce, and the first incarnation whose key actors it trusts (this one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeEpoch {
    pub base: Actor,
    pub incarnation: u64,
    /// Random bits drawn at this start (by the shell): key actors of two starts never
    /// coincide, even when a restored backup makes them share an incarnation number.
    pub nonce: u64,
    /// Key actors drawn before it are never reused: always this start's incarnation.
    pub trusted_from: u64,
}

impl NodeEpoch {
    /// The epoch of the next start, given the last incarnation persisted (`None`: a new data
    /// directory) and this start's random `nonce`.
    pub fn next(base: Actor, previous: Option<u64>, nonce: u64) -> NodeEpoch {
        let incarnation = previous.map_or(1, |previous| previous.saturating_add(1));
        NodeEpoch {
            base,
            incarnation,
            nonce,
            trusted_from: incarnation,
        }
    }

    /// The `sequence`-th key actor of this incarnation.
    pub fn derive(&self, sequence: u64) -> KeyActor {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"dynkv key actor v2");
        hasher.update(&self.base.to_le_bytes());
        hasher.update(&self.incarnation.to_le_bytes());
        hasher.update(&self.nonce.to_le_bytes());
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
    fn only_the_current_start_is_trusted() {
        let first = NodeEpoch::next(7, None, 11);
        assert_eq!((first.incarnation, first.trusted_from), (1, 1));
        let second = NodeEpoch::next(7, Some(1), 12);
        assert_eq!((second.incarnation, second.trusted_from), (2, 2));
        let drawn_in_first = first.derive(0);
        assert!(first.trusts(&drawn_in_first));
        assert!(!second.trusts(&drawn_in_first));
        assert_eq!(
            first.choose(Some(drawn_in_first), || first.derive(1)),
            drawn_in_first
        );
        assert_ne!(
            second.choose(Some(drawn_in_first), || second.derive(0)),
            drawn_in_first
        );
    }

    #[test]
    fn key_actors_differ_by_sequence_start_and_node() {
        let epoch = NodeEpoch::next(7, Some(4), 100);
        let mut seen = std::collections::BTreeSet::new();
        for sequence in 0..1000 {
            assert!(seen.insert(epoch.derive(sequence).actor));
        }
        let later = NodeEpoch::next(7, Some(5), 100);
        let other_node = NodeEpoch::next(8, Some(4), 100);
        assert!(!seen.contains(&later.derive(0).actor));
        assert!(!seen.contains(&other_node.derive(0).actor));
        // A start from a restored backup repeats an incarnation number; its nonce differs,
        // and so does every key actor it mints.
        let restored = NodeEpoch::next(7, Some(4), 101);
        assert_eq!(restored.incarnation, epoch.incarnation);
        for sequence in 0..1000 {
            assert!(!seen.contains(&restored.derive(sequence).actor));
        }
        // A key actor from a future incarnation (a copied data directory) is not trusted.
        assert!(!epoch.trusts(&later.derive(0)));
    }
}

//! Actor retirement: which actors a key's clock may forget, so that a key written through a
//! node that crashes often keeps a short clock.
//!
//! Every restart makes a node draw fresh key actors (see `epoch`): the old ones may have
//! issued dots that a crash lost or that a restored backup does not hold, so they are never
//! used again. Without retirement
//! each such actor keeps its entry in the key's clock for good, and a node that crashed a
//! thousand times would push its keys' contexts past the decoding limit.
//!
//! **The rule.** An actor's entry is removed from every primary's copy of a key only when
//! all of these hold at once:
//! - the entry holds no live value in a copy that every primary holds identically (the same
//!   record digest, read durably): every dot the actor issued is superseded everywhere, so
//!   the entry carries history only;
//! - the actor coordinates no more: it is not the trusted key actor of any primary's copy
//!   (each primary says which it trusts), and a node never takes up an actor it gave up;
//! - nothing can bring an older copy back: the tombstone reaper's conditions hold (every
//!   member up on one ring with no change pending, no hint for the partition anywhere, no
//!   stray copy left, every operation that began before the check finished);
//! - each primary removes it only if its copy is still the one checked.
//!
//! What removal keeps: the values (an idle entry has none), and every merge's outcome. A
//! copy that still names the actor merges with one that does not into the copy that names it
//! (the entry has no value to revive), so a partial retirement is harmless and a later pass
//! finishes it.
//!
//! **Old contexts.** A client may still hold a context naming a retired actor. Its claim is
//! read as covering what the retirement covered: all of that actor's dots, none of which is
//! live anywhere. A coordinator therefore drops a context's claim on an actor that no replica
//! of the key names, once every primary has answered its catch-up read
//! ([`crate::core::object::Context::without_actors_unknown_to`]); the write then supersedes
//! exactly what the client saw that still exists. Dropping a claim can only keep a version
//! as a sibling, never lose one, so a forged claim on an unknown actor does no harm either.
//! A claim beyond what a known actor issued is still refused (DESIGN §4).

use crate::core::ids::Actor;
use crate::core::object::StoredObject;

/// The actors of `object` that may be retired, given the key actors the primaries still
/// coordinate under (`coordinating`): those whose entries hold no live value, except those.
pub fn retirable_actors(object: &StoredObject, coordinating: &[Actor]) -> Vec<Actor> {
    object
        .idle_actors()
        .into_iter()
        .filter(|actor| !coordinating.contains(actor))
        .collect()
}

/// A primary's step: `object` without the idle entries of `actors`, unless one of them is
/// the actor this primary coordinates under (`own`, a check that cannot fail when the
/// retirement was planned from current answers). `None` when nothing would change.
pub fn retire(object: &StoredObject, actors: &[Actor], own: Option<Actor>) -> Option<StoredObject> {
    let actors: Vec<Actor> = actors
        .iter()
        .copied()
        .filter(|actor| Some(*actor) != own)
        .collect();
    let retired = object.without_idle(&actors);
    (retired.entries().len() != object.entries().len()).then_some(retired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::object::{Content, Context, coordinate_put, live_siblings};
    use proptest::prelude::*;

    fn content(value: &str) -> Content {
        Content {
            value: value.as_bytes().to_vec(),
            content_type: String::new(),
            user_metadata: Vec::new(),
            last_modified_micros: 1,
            deleted: false,
        }
    }

    fn values(object: &StoredObject) -> Vec<Vec<u8>> {
        let mut values: Vec<Vec<u8>> = live_siblings(object)
            .into_iter()
            .map(|content| content.value)
            .collect();
        values.sort();
        values
    }

    /// A key written `rounds` times through one node that crashed before each write (a
    /// fresh actor each time), each write with the context of the one before.
    fn written_through_crashes(rounds: u64) -> (StoredObject, Vec<Context>) {
        let mut object = coordinate_put(None, None, content("v0"), 1, true);
        let mut contexts = vec![Context::of(&object)];
        for round in 1..=rounds {
            let context = Context::of(&object);
            object = coordinate_put(
                Some(&object),
                Some(&context),
                content(&format!("v{round}")),
                1 + round,
                true,
            );
            contexts.push(Context::of(&object));
        }
        (object, contexts)
    }

    #[test]
    fn a_key_written_through_crashes_keeps_one_actor_after_retirement() {
        let (object, contexts) = written_through_crashes(40);
        assert_eq!(object.entries().len(), 41);
        let current = 41;
        let retirable = retirable_actors(&object, &[current]);
        assert_eq!(retirable.len(), 40);
        let retired = retire(&object, &retirable, Some(current)).unwrap();
        assert_eq!(retired.entries().len(), 1);
        assert_eq!(values(&retired), values(&object));
        // A context read before the crashes names only retired actors: its claims go, and
        // the write is a sibling of what it never saw, not a refusal.
        let old = contexts[0].without_actors_unknown_to(&retired.join());
        assert!(old.0.is_empty());
        let written = coordinate_put(Some(&retired), Some(&old), content("late"), 42, true);
        assert_eq!(
            values(&written),
            vec![b"late".to_vec(), b"v40".to_vec()],
            "the late write keeps v40, which it never saw"
        );
        // The current context still supersedes v40 after retirement.
        let current_context = contexts[40].without_actors_unknown_to(&retired.join());
        let written = coordinate_put(
            Some(&retired),
            Some(&current_context),
            content("next"),
            current,
            true,
        );
        assert_eq!(values(&written), vec![b"next".to_vec()]);
    }

    #[test]
    fn the_coordinating_actor_and_actors_with_live_values_are_never_retired() {
        // Actor 1 wrote v0; actor 2 wrote concurrently (no context): both are live.
        let first = coordinate_put(None, None, content("v0"), 1, true);
        let both = coordinate_put(Some(&first), None, content("v1"), 2, true);
        assert!(retirable_actors(&both, &[]).is_empty());
        assert_eq!(retire(&both, &[1, 2], None), None);
        // Actor 3 resolves them: 1 and 2 are idle; 2 is still some primary's key actor.
        let resolved = coordinate_put(
            Some(&both),
            Some(&Context::of(&both)),
            content("v2"),
            3,
            true,
        );
        assert_eq!(retirable_actors(&resolved, &[2, 3]), vec![1]);
        // A primary never retires the actor it coordinates under.
        let kept = retire(&resolved, &[1, 2], Some(2)).unwrap();
        assert_eq!(
            kept.entries().iter().map(|e| e.actor()).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }

    fn arbitrary_history() -> impl Strategy<Value = (StoredObject, Vec<StoredObject>)> {
        // Writes through actors 1..=5, each with the context of a random earlier state or
        // none, so that some actors end idle and some hold siblings.
        prop::collection::vec(
            (1..=5u64, any::<bool>(), any::<prop::sample::Index>()),
            1..20,
        )
        .prop_map(|writes| {
            let mut states: Vec<StoredObject> = vec![StoredObject::empty()];
            let mut current = StoredObject::empty();
            for (step, (actor, with_context, earlier)) in writes.into_iter().enumerate() {
                let seen = earlier.get(&states).clone();
                let context = with_context.then(|| Context::of(&seen));
                let written = coordinate_put(
                    Some(&seen),
                    context.as_ref(),
                    content(&format!("w{step}")),
                    actor,
                    true,
                );
                current = current.sync(&written);
                states.push(written);
            }
            (current, states)
        })
    }

    proptest! {
        /// Retirement never drops a value, and a copy that still names the retired actors
        /// merges with a retired one back into itself: a partial retirement is harmless.
        #[test]
        fn retirement_keeps_every_value_and_partial_retirement_heals(
            (object, _) in arbitrary_history(),
            keep in prop::collection::vec(1..=5u64, 0..3),
        ) {
            let retirable = retirable_actors(&object, &keep);
            let retired = retire(&object, &retirable, None).unwrap_or_else(|| object.clone());
            prop_assert_eq!(values(&retired), values(&object));
            prop_assert!(object.descends(&retired));
            prop_assert_eq!(retired.sync(&object), object.clone());
            prop_assert_eq!(object.sync(&retired), object.clone());
            for actor in &keep {
                prop_assert_eq!(retired.join().get(*actor), object.join().get(*actor));
            }
        }

        /// A write with any context read earlier (its claims on retired actors dropped)
        /// keeps the same values on the retired copy as the full context on the original.
        #[test]
        fn an_old_context_supersedes_the_same_values_after_retirement(
            (object, states) in arbitrary_history(),
            earlier in any::<prop::sample::Index>(),
        ) {
            let retirable = retirable_actors(&object, &[]);
            let retired = retire(&object, &retirable, None).unwrap_or_else(|| object.clone());
            let context = Context::of(earlier.get(&states));
            let on_original =
                coordinate_put(Some(&object), Some(&context), content("new"), 9, true);
            let trimmed = context.without_actors_unknown_to(&retired.join());
            let on_retired =
                coordinate_put(Some(&retired), Some(&trimmed), content("new"), 9, true);
            prop_assert_eq!(values(&on_retired), values(&on_original));
        }
    }
}

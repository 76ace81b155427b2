//! Causality tracking for the values of a key: version vectors and dotted version vector sets
//! (DVVSet, Almeida et al., "Scalable and Accurate Causality Tracking for Eventually Consistent
//! Stores").
//!
//! Actors are replica nodes, never clients, so a clock has at most one entry per replica that
//! ever coordinated a write to the key. Every write gets a *dot* `(actor, counter)` that names it
//! uniquely in the whole system; the clocks below rely on that: a dot names one value.
//!
//! Decoded clocks are untrusted. Decoding checks them (`validate`), and no function here panics
//! on malformed input.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::core::ids::Actor;

/// How many writes one actor has coordinated for a key.
pub type Counter = u64;

/// Most actors a decoded clock may name. Each is a replica that coordinated a write for the key,
/// so real clocks stay far below this.
pub const MAX_ACTORS: usize = 1 << 16;

/// Most values (siblings) a decoded clock may hold. The put path should refuse writes well
/// before this, because a stored clock above it could no longer be decoded.
pub const MAX_VALUES: usize = 1 << 16;

/// Most anonymous values a decoded clock may hold. Stored clocks normally have none, and merging
/// them compares every pair, so the limit is small.
pub const MAX_ANONYMOUS_VALUES: usize = 256;

/// Largest counter a decoded clock may carry, so that adding a dot can never overflow.
pub const MAX_COUNTER: Counter = Counter::MAX / 2;

/// Why a decoded version vector or DVVSet is malformed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    #[error("actor {next} follows actor {previous}; actors must be in increasing order")]
    UnsortedActors { previous: Actor, next: Actor },
    #[error("actor {actor} appears more than once")]
    DuplicateActor { actor: Actor },
    #[error("actor {actor} has a zero counter")]
    ZeroCounter { actor: Actor },
    #[error("actor {actor} has counter {counter}, above the limit {max}")]
    CounterTooLarge {
        actor: Actor,
        counter: Counter,
        max: Counter,
    },
    #[error("{actors} actors, above the limit {max}")]
    TooManyActors { actors: usize, max: usize },
    #[error("actor {actor} lists {values} values but has only {counter} dots")]
    MoreValuesThanCounter {
        actor: Actor,
        counter: Counter,
        values: usize,
    },
    #[error("{values} values, above the limit {max}")]
    TooManyValues { values: usize, max: usize },
    #[error("{values} anonymous values, above the limit {max}")]
    TooManyAnonymousValues { values: usize, max: usize },
    #[error("anonymous value at position {index} repeats an earlier one")]
    DuplicateAnonymousValue { index: usize },
}

/// A version vector: for each actor, how many of its writes are in a causal history.
///
/// Entries are sorted by actor, one per actor, with counters above zero, so equal histories
/// have equal representations. `merge` is the pointwise maximum: commutative, associative and
/// idempotent, and `a.merge(b).descends(a)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "VersionVectorWire")]
pub struct VersionVector {
    entries: Vec<(Actor, Counter)>,
}

/// The encoded shape of a [`VersionVector`], checked before it becomes one.
#[derive(Deserialize)]
#[serde(rename = "VersionVector")]
struct VersionVectorWire {
    entries: Vec<(Actor, Counter)>,
}

impl TryFrom<VersionVectorWire> for VersionVector {
    type Error = VersionError;

    fn try_from(wire: VersionVectorWire) -> Result<Self, Self::Error> {
        VersionVector::from_entries(wire.entries)
    }
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter of `actor`, 0 when the history holds none of its writes.
    pub fn get(&self, actor: Actor) -> Counter {
        self.entries
            .binary_search_by_key(&actor, |&(entry_actor, _)| entry_actor)
            .ok()
            .and_then(|index| self.entries.get(index))
            .map_or(0, |&(_, counter)| counter)
    }

    pub fn entries(&self) -> &[(Actor, Counter)] {
        &self.entries
    }

    /// Builds a vector from untrusted entries (decoded from the wire), checking that they are
    /// sorted by actor, unique, non-zero and within the limits.
    pub fn from_entries(entries: Vec<(Actor, Counter)>) -> Result<Self, VersionError> {
        validate_counters(entries.iter().copied(), entries.len())?;
        Ok(Self { entries })
    }

    /// The pointwise maximum: the union of both histories.
    pub fn merge(&self, other: &Self) -> Self {
        let mut entries = Vec::with_capacity(self.entries.len().max(other.entries.len()));
        merge_join(
            &self.entries,
            &other.entries,
            |&(actor, _)| actor,
            |side| {
                entries.push(match side {
                    Side::Left(&entry) | Side::Right(&entry) => entry,
                    Side::Both(&(actor, left), &(_, right)) => (actor, left.max(right)),
                })
            },
        );
        Self { entries }
    }

    /// Whether this history includes all of `other`'s (pointwise `self >= other`).
    pub fn descends(&self, other: &Self) -> bool {
        counters_descend(&self.entries, &other.entries, |&entry| entry)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One actor's part of a [`DvvSet`]: the actor's dots `1..=counter` are in the history, and
/// `values` holds the values of its newest dots that nothing has superseded yet, newest first
/// (`values[i]` has dot `counter - i`).
///
/// Dots up to `counter - values.len()` are all superseded: a context is downward closed, so
/// a write always supersedes a prefix of each actor's dots, and this shape is exact.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Entry<V> {
    actor: Actor,
    counter: Counter,
    values: Vec<V>,
}

impl<V> Entry<V> {
    pub fn actor(&self) -> Actor {
        self.actor
    }

    pub fn counter(&self) -> Counter {
        self.counter
    }

    /// Live values of this actor's newest dots, newest first.
    pub fn values(&self) -> &[V] {
        &self.values
    }

    /// The highest dot of this actor that is known and superseded; every dot above it is live.
    fn floor(&self) -> Counter {
        self.counter.saturating_sub(as_counter(self.values.len()))
    }
}

/// A dotted version vector set: the values of one key that are concurrent (siblings), together
/// with the causal history that explains them.
///
/// `sync` merges two replicas' copies. Where every dot names one value (true of every clock this
/// module builds) and neither side holds anonymous values (true of every stored clock), `sync`
/// is a join-semilattice:
/// - commutative: `a.sync(b) == b.sync(a)`;
/// - associative: `a.sync(b).sync(c) == a.sync(b.sync(c))`;
/// - idempotent: `a.sync(a) == a`;
/// - inflationary: `a.sync(b).descends(a)`, and `a.sync(b).join() == a.join().merge(b.join())`;
/// - it never loses a write: a value of `a` missing from `a.sync(b)` has a dot that `b` knows and
///   has superseded.
///
/// Anonymous values (a client's write that has no dot yet) follow the paper: they survive a
/// `sync` unless the other side's history is strictly newer. With them `sync` stays commutative
/// and idempotent, but cannot be associative, since one history is shared by all of them.
/// Equality treats them as a set, because `sync` may list them in either order.
#[derive(Clone, Debug, Eq, Deserialize)]
#[serde(
    try_from = "DvvSetWire<V>",
    bound(deserialize = "V: Deserialize<'de> + PartialEq")
)]
pub struct DvvSet<V> {
    entries: Vec<Entry<V>>,
    anonymous: Vec<V>,
}

// A clock and its entries are encoded positionally (a MessagePack array of the fields in
// declaration order), even where the wire names the fields of other structs: they are in
// every replica message and every stored record, and their field names were a good part of
// the decoding work. The derived `Deserialize` reads both shapes, so a peer that still sends
// the named map is understood, and the array is what the disk format always held. A new field
// here therefore needs a new wire and record version.
impl<V: Serialize> Serialize for Entry<V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut fields = serializer.serialize_tuple(3)?;
        fields.serialize_element(&self.actor)?;
        fields.serialize_element(&self.counter)?;
        fields.serialize_element(&self.values)?;
        fields.end()
    }
}

impl<V: Serialize> Serialize for DvvSet<V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut fields = serializer.serialize_tuple(2)?;
        fields.serialize_element(&self.entries)?;
        fields.serialize_element(&self.anonymous)?;
        fields.end()
    }
}

/// The encoded shape of a [`DvvSet`], checked before it becomes one.
#[derive(Deserialize)]
#[serde(rename = "DvvSet")]
struct DvvSetWire<V> {
    entries: Vec<Entry<V>>,
    anonymous: Vec<V>,
}

impl<V: PartialEq> TryFrom<DvvSetWire<V>> for DvvSet<V> {
    type Error = VersionError;

    fn try_from(wire: DvvSetWire<V>) -> Result<Self, Self::Error> {
        let clock = DvvSet {
            entries: wire.entries,
            anonymous: wire.anonymous,
        };
        clock.validate()?;
        Ok(clock)
    }
}

impl<V: PartialEq> PartialEq for DvvSet<V> {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
            && self.anonymous.len() == other.anonymous.len()
            && self
                .anonymous
                .iter()
                .all(|value| other.anonymous.contains(value))
            && other
                .anonymous
                .iter()
                .all(|value| self.anonymous.contains(value))
    }
}

impl<V> DvvSet<V> {
    /// Per actor, the dots `1..=counter` in the history.
    pub fn entries(&self) -> &[Entry<V>] {
        &self.entries
    }

    /// Values that have no dot yet: a client's write before a coordinator recorded it.
    pub fn anonymous(&self) -> &[V] {
        &self.anonymous
    }
}

impl<V: PartialEq> DvvSet<V> {
    /// Checks the structure of a decoded clock: actors sorted and unique, counters non-zero,
    /// no more values than dots, anonymous values distinct, everything within the limits.
    /// Decoding already calls this; calling it again is harmless.
    pub fn validate(&self) -> Result<(), VersionError> {
        validate_counters(
            self.entries
                .iter()
                .map(|entry| (entry.actor, entry.counter)),
            self.entries.len(),
        )?;
        let mut total = self.anonymous.len();
        for entry in &self.entries {
            if as_counter(entry.values.len()) > entry.counter {
                return Err(VersionError::MoreValuesThanCounter {
                    actor: entry.actor,
                    counter: entry.counter,
                    values: entry.values.len(),
                });
            }
            total = total.saturating_add(entry.values.len());
        }
        if total > MAX_VALUES {
            return Err(VersionError::TooManyValues {
                values: total,
                max: MAX_VALUES,
            });
        }
        if self.anonymous.len() > MAX_ANONYMOUS_VALUES {
            return Err(VersionError::TooManyAnonymousValues {
                values: self.anonymous.len(),
                max: MAX_ANONYMOUS_VALUES,
            });
        }
        for (index, value) in self.anonymous.iter().enumerate() {
            if self
                .anonymous
                .iter()
                .take(index)
                .any(|earlier| earlier == value)
            {
                return Err(VersionError::DuplicateAnonymousValue { index });
            }
        }
        Ok(())
    }
}

impl<V: Clone + PartialEq> DvvSet<V> {
    /// No history and no value: the state of a key never written.
    pub fn empty() -> Self {
        Self {
            entries: Vec::new(),
            anonymous: Vec::new(),
        }
    }

    /// A client's write that carries no context: it supersedes nothing.
    pub fn new(value: V) -> Self {
        Self {
            entries: Vec::new(),
            anonymous: vec![value],
        }
    }

    /// A client's write carrying the context of its read: it supersedes every value that read
    /// returned, and nothing else.
    pub fn new_with_context(context: &VersionVector, value: V) -> Self {
        Self {
            entries: context
                .entries
                .iter()
                .map(|&(actor, counter)| Entry {
                    actor,
                    counter,
                    values: Vec::new(),
                })
                .collect(),
            anonymous: vec![value],
        }
    }

    /// Merges two replicas' copies (see the laws on the type): histories are united, and a value
    /// is kept unless the other side knows its dot and has superseded it.
    pub fn sync(&self, other: &Self) -> Self {
        let mut entries = Vec::with_capacity(self.entries.len().max(other.entries.len()));
        merge_join(
            &self.entries,
            &other.entries,
            |entry| entry.actor,
            |side| {
                entries.push(match side {
                    Side::Left(entry) | Side::Right(entry) => entry.clone(),
                    Side::Both(left, right) => merge_entry(left, right),
                })
            },
        );
        let anonymous = if self.strictly_precedes(other) {
            other.anonymous.clone()
        } else if other.strictly_precedes(self) {
            self.anonymous.clone()
        } else {
            let mut union = self.anonymous.clone();
            for value in &other.anonymous {
                if !union.contains(value) {
                    union.push(value.clone());
                }
            }
            union
        };
        Self { entries, anonymous }
    }

    /// The causal context to hand to a client with the values it read; a write carrying it
    /// supersedes exactly those values.
    pub fn join(&self) -> VersionVector {
        VersionVector {
            entries: self
                .entries
                .iter()
                .filter(|entry| entry.counter > 0)
                .map(|entry| (entry.actor, entry.counter))
                .collect(),
        }
    }

    /// The coordinator's step for a client write `new` (from [`Self::new`] or
    /// [`Self::new_with_context`]): merges the write's context, without its value, into the
    /// local clock, which drops the values that context supersedes, then records the value under
    /// a fresh dot of `actor`.
    ///
    /// `new` normally holds exactly one anonymous value. If it holds several, each gets its own
    /// dot; if none, this is only the merge.
    pub fn update(new: Self, local: &Self, actor: Actor) -> Self {
        let Self { entries, anonymous } = new;
        let context = Self {
            entries,
            anonymous: Vec::new(),
        };
        let mut clock = context.sync(local);
        for value in anonymous {
            clock.record(actor, value);
        }
        clock
    }

    /// [`Self::update`] on a replica that holds no clock for the key.
    pub fn update_without_local(new: Self, actor: Actor) -> Self {
        let Self { entries, anonymous } = new;
        let mut clock = Self {
            entries,
            anonymous: Vec::new(),
        };
        for value in anonymous {
            clock.record(actor, value);
        }
        clock
    }

    /// Every sibling: anonymous values first, then each actor's live values (by actor, newest
    /// first). The order depends only on the clock.
    pub fn values(&self) -> Vec<&V> {
        self.anonymous
            .iter()
            .chain(self.entries.iter().flat_map(|entry| entry.values.iter()))
            .collect()
    }

    pub fn value_count(&self) -> usize {
        self.anonymous.len()
            + self
                .entries
                .iter()
                .map(|entry| entry.values.len())
                .sum::<usize>()
    }

    /// Whether this clock's causal history includes all of `other`'s (values are not compared).
    pub fn descends(&self, other: &Self) -> bool {
        counters_descend(&self.entries, &other.entries, |entry| {
            (entry.actor, entry.counter)
        })
    }

    /// Whether both clocks have the same history and the same live dots, as in the paper:
    /// values themselves and anonymous values are not compared.
    pub fn equal(&self, other: &Self) -> bool {
        self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(&other.entries)
                .all(|(left, right)| {
                    left.actor == right.actor
                        && left.counter == right.counter
                        && left.values.len() == right.values.len()
                })
    }

    /// Transforms every value, keeping dots and history.
    pub fn map<W>(self, mut f: impl FnMut(V) -> W) -> DvvSet<W> {
        let anonymous = self.anonymous.into_iter().map(&mut f).collect();
        let entries = self
            .entries
            .into_iter()
            .map(|entry| Entry {
                actor: entry.actor,
                counter: entry.counter,
                values: entry.values.into_iter().map(&mut f).collect(),
            })
            .collect();
        DvvSet { entries, anonymous }
    }

    /// Keeps one value (for buckets without siblings, last write wins); `winner(a, b)` is true
    /// when `a` beats `b`, and on a tie the earlier value in [`Self::values`] order stays.
    ///
    /// The result has the same history, and the winner keeps its own dot, so replicas that
    /// reconcile and replicas that do not still merge consistently. For that, the candidates
    /// are the anonymous values and each actor's newest value: an older value of the same actor
    /// lost to the newer one in the order that actor's coordinator recorded them.
    pub fn reconcile(&self, winner: impl Fn(&V, &V) -> bool) -> Self {
        enum Place {
            Anonymous,
            Entry(usize),
        }
        let candidates = self
            .anonymous
            .iter()
            .map(|value| (Place::Anonymous, value))
            .chain(
                self.entries
                    .iter()
                    .enumerate()
                    .filter_map(|(index, entry)| {
                        entry
                            .values
                            .first()
                            .map(|value| (Place::Entry(index), value))
                    }),
            );
        let mut best: Option<(Place, &V)> = None;
        for (place, value) in candidates {
            best = match best {
                Some((_, current)) if !winner(value, current) => best,
                _ => Some((place, value)),
            };
        }
        let entries = self
            .entries
            .iter()
            .enumerate()
            .map(|(index, entry)| Entry {
                actor: entry.actor,
                counter: entry.counter,
                values: match &best {
                    Some((Place::Entry(chosen), value)) if *chosen == index => {
                        vec![(*value).clone()]
                    }
                    _ => Vec::new(),
                },
            })
            .collect();
        let anonymous = match &best {
            Some((Place::Anonymous, value)) => vec![(*value).clone()],
            _ => Vec::new(),
        };
        Self { entries, anonymous }
    }

    /// Actors whose dots are all superseded here: their entries hold no live value.
    pub fn idle_actors(&self) -> Vec<Actor> {
        self.entries
            .iter()
            .filter(|entry| entry.values.is_empty())
            .map(|entry| entry.actor)
            .collect()
    }

    /// This clock without the entries of `actors` that hold no live value (entries that do
    /// are kept whole): the same values, a shorter history. Only safe where no copy, message
    /// or context can still bring those actors' values back and none of them issues another
    /// dot; `core::retire` states when that holds.
    pub fn without_idle(&self, actors: &[Actor]) -> Self {
        Self {
            entries: self
                .entries
                .iter()
                .filter(|entry| !(entry.values.is_empty() && actors.contains(&entry.actor)))
                .cloned()
                .collect(),
            anonymous: self.anonymous.clone(),
        }
    }

    /// Whether `other`'s history strictly includes this one's.
    fn strictly_precedes(&self, other: &Self) -> bool {
        other.descends(self) && !self.descends(other)
    }

    /// Adds `value` under the next dot of `actor`.
    fn record(&mut self, actor: Actor, value: V) {
        match self
            .entries
            .binary_search_by_key(&actor, |entry| entry.actor)
        {
            Ok(index) => {
                if let Some(entry) = self.entries.get_mut(index) {
                    // Validated counters stay below MAX_COUNTER, so this never saturates.
                    entry.counter = entry.counter.saturating_add(1);
                    entry.values.insert(0, value);
                }
            }
            Err(index) => self.entries.insert(
                index,
                Entry {
                    actor,
                    counter: 1,
                    values: vec![value],
                },
            ),
        }
    }
}

/// Merges one actor's entries from two clocks: the newest counter, and the live dots that
/// neither side has superseded. As a pair (counter, floor) this is the pointwise maximum, hence
/// the lattice laws.
fn merge_entry<V: Clone>(left: &Entry<V>, right: &Entry<V>) -> Entry<V> {
    let counter = left.counter.max(right.counter);
    let floor = left.floor().max(right.floor());
    // The side with the newest counter lists every live dot. On equal counters both sides list
    // the same values for their common dots (a dot names one value), so either serves.
    let source = if right.counter > left.counter {
        right
    } else {
        left
    };
    let live = usize::try_from(counter.saturating_sub(floor)).unwrap_or(usize::MAX);
    Entry {
        actor: left.actor,
        counter,
        values: source.values.iter().take(live).cloned().collect(),
    }
}

/// Checks an actor-sorted list of counters (a version vector, or a DVVSet's entries).
fn validate_counters(
    entries: impl Iterator<Item = (Actor, Counter)>,
    length: usize,
) -> Result<(), VersionError> {
    if length > MAX_ACTORS {
        return Err(VersionError::TooManyActors {
            actors: length,
            max: MAX_ACTORS,
        });
    }
    let mut previous: Option<Actor> = None;
    for (actor, counter) in entries {
        match previous.map(|previous| (previous, previous.cmp(&actor))) {
            Some((_, Ordering::Equal)) => return Err(VersionError::DuplicateActor { actor }),
            Some((previous, Ordering::Greater)) => {
                return Err(VersionError::UnsortedActors {
                    previous,
                    next: actor,
                });
            }
            _ => {}
        }
        if counter == 0 {
            return Err(VersionError::ZeroCounter { actor });
        }
        if counter > MAX_COUNTER {
            return Err(VersionError::CounterTooLarge {
                actor,
                counter,
                max: MAX_COUNTER,
            });
        }
        previous = Some(actor);
    }
    Ok(())
}

fn as_counter(length: usize) -> Counter {
    Counter::try_from(length).unwrap_or(Counter::MAX)
}

/// Where an actor appears when walking two actor-sorted lists together.
enum Side<'a, T> {
    Left(&'a T),
    Right(&'a T),
    Both(&'a T, &'a T),
}

/// Walks two lists sorted by `key` in key order, reporting each key once with the side(s) that
/// hold it. On unsorted input it still terminates and visits every item.
fn merge_join<'a, T>(
    left: &'a [T],
    right: &'a [T],
    key: impl Fn(&T) -> Actor,
    mut visit: impl FnMut(Side<'a, T>),
) {
    let mut left = left.iter().peekable();
    let mut right = right.iter().peekable();
    loop {
        let side = match (left.peek(), right.peek()) {
            (Some(&left_item), Some(&right_item)) => match key(left_item).cmp(&key(right_item)) {
                Ordering::Less => {
                    left.next();
                    Side::Left(left_item)
                }
                Ordering::Greater => {
                    right.next();
                    Side::Right(right_item)
                }
                Ordering::Equal => {
                    left.next();
                    right.next();
                    Side::Both(left_item, right_item)
                }
            },
            (Some(&left_item), None) => {
                left.next();
                Side::Left(left_item)
            }
            (None, Some(&right_item)) => {
                right.next();
                Side::Right(right_item)
            }
            (None, None) => return,
        };
        visit(side);
    }
}

/// Whether the counters of `left` are pointwise at least those of `right`.
fn counters_descend<T>(left: &[T], right: &[T], counter: impl Fn(&T) -> (Actor, Counter)) -> bool {
    let mut descends = true;
    merge_join(
        left,
        right,
        |item| counter(item).0,
        |side| match side {
            Side::Left(_) => {}
            Side::Right(item) => descends &= counter(item).1 == 0,
            Side::Both(left_item, right_item) => {
                descends &= counter(left_item).1 >= counter(right_item).1
            }
        },
    );
    descends
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    /// A write's name: the actor that coordinated it and that actor's counter.
    type Dot = (Actor, Counter);

    const ACTORS: [Actor; 3] = [1, 2, 3];

    /// Values of arbitrary clocks are derived from their dots, so a dot names one value.
    fn dotted_value(actor: Actor, counter: Counter) -> u64 {
        actor * 1_000 + counter
    }

    /// Arbitrary well-formed clocks over actors 1..=4, without anonymous values.
    fn dotted_clock() -> impl Strategy<Value = DvvSet<u64>> {
        prop::collection::vec((0..6u64, 0..=6u64), 4).prop_map(|shape| {
            let entries = shape
                .into_iter()
                .zip(1..)
                .filter(|&((counter, _), _)| counter > 0)
                .map(|((counter, live), actor)| Entry {
                    actor,
                    counter,
                    values: (0..live.min(counter))
                        .map(|offset| dotted_value(actor, counter - offset))
                        .collect(),
                })
                .collect();
            DvvSet {
                entries,
                anonymous: Vec::new(),
            }
        })
    }

    /// Arbitrary well-formed clocks that may also hold anonymous values.
    fn clock_with_anonymous() -> impl Strategy<Value = DvvSet<u64>> {
        (dotted_clock(), prop::collection::btree_set(0..4u64, 0..3)).prop_map(
            |(mut clock, anonymous)| {
                clock.anonymous = anonymous.into_iter().map(|value| 900_000 + value).collect();
                clock
            },
        )
    }

    #[derive(Clone, Debug)]
    enum Operation {
        /// A client writes through `replica`, with the context of one earlier read (any
        /// replica, any time, so possibly stale) or with no context.
        Put { replica: usize, context: Index },
        /// Anti-entropy: `to` merges `from`'s clock.
        Sync { from: usize, to: usize },
    }

    fn operation() -> impl Strategy<Value = Operation> {
        prop_oneof![
            (0..ACTORS.len(), any::<Index>())
                .prop_map(|(replica, context)| Operation::Put { replica, context }),
            (0..ACTORS.len(), 0..ACTORS.len()).prop_map(|(from, to)| Operation::Sync { from, to }),
        ]
    }

    struct Write {
        value: u64,
        dot: Dot,
        context: BTreeSet<Dot>,
    }

    /// Three replicas (actors 1, 2, 3) driven by clients, with a model of what each replica
    /// should hold computed from dot sets alone.
    struct Simulation {
        replicas: Vec<DvvSet<u64>>,
        /// Model: every dot in each replica's history.
        known: Vec<BTreeSet<Dot>>,
        /// Every state a client could have read: its context and, for the model, its dots.
        reads: Vec<(VersionVector, BTreeSet<Dot>)>,
        writes: Vec<Write>,
        /// Every replica state reached, for checking laws on reachable clocks.
        reached: Vec<DvvSet<u64>>,
    }

    impl Simulation {
        fn new() -> Self {
            Self {
                replicas: vec![DvvSet::empty(); ACTORS.len()],
                known: vec![BTreeSet::new(); ACTORS.len()],
                reads: Vec::new(),
                writes: Vec::new(),
                reached: vec![DvvSet::empty()],
            }
        }

        fn run(operations: &[Operation]) -> Self {
            let mut simulation = Self::new();
            for operation in operations {
                simulation.apply(operation);
            }
            simulation
        }

        fn apply(&mut self, operation: &Operation) {
            match *operation {
                Operation::Put { replica, context } => {
                    let actor = ACTORS[replica];
                    let value = self.writes.len() as u64 + 1;
                    let (new, context) = match self.reads.get(context.index(self.reads.len() + 1)) {
                        Some((vector, dots)) => {
                            (DvvSet::new_with_context(vector, value), dots.clone())
                        }
                        None => (DvvSet::new(value), BTreeSet::new()),
                    };
                    let updated = DvvSet::update(new, &self.replicas[replica], actor);
                    let dot = (actor, updated.join().get(actor));
                    self.known[replica].extend(context.iter().copied());
                    self.known[replica].insert(dot);
                    self.writes.push(Write {
                        value,
                        dot,
                        context,
                    });
                    self.replicas[replica] = updated;
                    self.observe(replica);
                }
                Operation::Sync { from, to } => {
                    self.replicas[to] = self.replicas[to].sync(&self.replicas[from]);
                    let known = self.known[from].clone();
                    self.known[to].extend(known);
                    self.observe(to);
                }
            }
        }

        fn observe(&mut self, replica: usize) {
            let clock = &self.replicas[replica];
            self.reads.push((clock.join(), self.known[replica].clone()));
            self.reached.push(clock.clone());
        }

        /// The model's siblings: written values the replica knows of, minus those that a write
        /// it also knows of had in its context.
        fn expected_values(&self, replica: usize) -> Vec<u64> {
            let known = &self.known[replica];
            let mut values: Vec<u64> = self
                .writes
                .iter()
                .filter(|write| known.contains(&write.dot))
                .filter(|write| {
                    !self.writes.iter().any(|later| {
                        known.contains(&later.dot) && later.context.contains(&write.dot)
                    })
                })
                .map(|write| write.value)
                .collect();
            values.sort_unstable();
            values
        }
    }

    fn sorted_values(clock: &DvvSet<u64>) -> Vec<u64> {
        let mut values: Vec<u64> = clock.values().into_iter().copied().collect();
        values.sort_unstable();
        values
    }

    /// Whether `clock` knows `dot` and has superseded it (its floor for that actor covers it).
    fn supersedes(clock: &DvvSet<u64>, (actor, counter): Dot) -> bool {
        clock
            .entries
            .iter()
            .any(|entry| entry.actor == actor && entry.floor() >= counter)
    }

    /// The live dotted values of a clock, with their dots.
    fn live_dots(clock: &DvvSet<u64>) -> Vec<(Dot, u64)> {
        clock
            .entries
            .iter()
            .flat_map(|entry| {
                entry
                    .values
                    .iter()
                    .zip(0..)
                    .map(move |(&value, offset)| ((entry.actor, entry.counter - offset), value))
            })
            .collect()
    }

    /// The laws of `sync` on two clocks (everything but associativity).
    fn check_pair_laws(a: &DvvSet<u64>, b: &DvvSet<u64>) -> Result<(), TestCaseError> {
        let merged = a.sync(b);
        prop_assert_eq!(&merged, &b.sync(a), "commutative");
        prop_assert_eq!(&a.sync(a), a, "idempotent");
        prop_assert_eq!(&merged.sync(b), &merged, "absorbs its input");
        prop_assert!(merged.descends(a) && merged.descends(b), "inflationary");
        prop_assert_eq!(merged.join(), a.join().merge(&b.join()), "join of sync");
        let kept = merged.values();
        for (dot, value) in live_dots(a) {
            prop_assert!(
                kept.contains(&&value) || supersedes(b, dot),
                "value {} with dot {:?} lost although {:?} does not supersede it",
                value,
                dot,
                b
            );
        }
        for value in &a.anonymous {
            prop_assert!(
                kept.contains(&value) || a.strictly_precedes(b),
                "anonymous value {} lost",
                value
            );
        }
        prop_assert!(merged.validate().is_ok());
        Ok(())
    }

    fn check_associative(
        a: &DvvSet<u64>,
        b: &DvvSet<u64>,
        c: &DvvSet<u64>,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(a.sync(b).sync(c), a.sync(&b.sync(c)), "associative");
        Ok(())
    }

    /// Sequences of client writes and anti-entropy syncs, with the clocks they reach.
    fn reachable_states() -> impl Strategy<Value = Vec<DvvSet<u64>>> {
        prop::collection::vec(operation(), 1..40)
            .prop_map(|operations| Simulation::run(&operations).reached)
    }

    fn pick<'a>(states: &'a [DvvSet<u64>], index: &Index) -> &'a DvvSet<u64> {
        index.get(states)
    }

    proptest! {
        #[test]
        fn sync_laws_hold_on_arbitrary_clocks(
            a in dotted_clock(),
            b in dotted_clock(),
            c in dotted_clock(),
        ) {
            check_pair_laws(&a, &b)?;
            check_associative(&a, &b, &c)?;
        }

        #[test]
        fn sync_laws_hold_with_anonymous_values(
            a in clock_with_anonymous(),
            b in clock_with_anonymous(),
        ) {
            check_pair_laws(&a, &b)?;
        }

        #[test]
        fn sync_laws_hold_on_reachable_clocks(
            states in reachable_states(),
            a in any::<Index>(),
            b in any::<Index>(),
            c in any::<Index>(),
        ) {
            let (a, b, c) = (pick(&states, &a), pick(&states, &b), pick(&states, &c));
            check_pair_laws(a, b)?;
            check_associative(a, b, c)?;
        }

        /// The accuracy claim of DVVSets: a replica holds exactly the writes it knows of that
        /// no write it knows of superseded.
        #[test]
        fn replicas_hold_exactly_the_unsuperseded_writes(
            operations in prop::collection::vec(operation(), 1..40),
        ) {
            let mut simulation = Simulation::new();
            for operation in &operations {
                simulation.apply(operation);
                for (replica, clock) in simulation.replicas.iter().enumerate() {
                    prop_assert!(clock.validate().is_ok());
                    prop_assert_eq!(sorted_values(clock), simulation.expected_values(replica));
                    let known = &simulation.known[replica];
                    for &actor in &ACTORS {
                        let counter = clock.join().get(actor);
                        let model: BTreeSet<Dot> =
                            known.iter().copied().filter(|&(a, _)| a == actor).collect();
                        let expected: BTreeSet<Dot> = (1..=counter).map(|n| (actor, n)).collect();
                        prop_assert_eq!(model, expected, "history of actor {}", actor);
                    }
                }
            }
        }

        #[test]
        fn clocks_stay_bounded_by_the_number_of_actors(
            operations in prop::collection::vec(operation(), 100..300),
        ) {
            let simulation = Simulation::run(&operations);
            for clock in &simulation.replicas {
                prop_assert!(clock.entries().len() <= ACTORS.len());
                prop_assert!(clock.join().len() <= ACTORS.len());
                prop_assert!(clock.anonymous().is_empty());
            }
        }

        #[test]
        fn version_vector_merge_is_a_join(
            a in dotted_clock(),
            b in dotted_clock(),
            c in dotted_clock(),
        ) {
            let (a, b, c) = (a.join(), b.join(), c.join());
            prop_assert_eq!(a.merge(&b), b.merge(&a));
            prop_assert_eq!(a.merge(&b).merge(&c), a.merge(&b.merge(&c)));
            prop_assert_eq!(a.merge(&a), a.clone());
            prop_assert!(a.merge(&b).descends(&a) && a.merge(&b).descends(&b));
            prop_assert_eq!(a.descends(&b), a.merge(&b) == a);
        }

        #[test]
        fn reconcile_keeps_one_value_with_the_same_history(states in reachable_states()) {
            for clock in &states {
                let reconciled = clock.reconcile(|a, b| a > b);
                prop_assert_eq!(reconciled.value_count(), clock.value_count().min(1));
                prop_assert!(reconciled.descends(clock) && clock.descends(&reconciled));
                // The winner keeps its dot, so merging back the unreconciled copy changes nothing.
                prop_assert_eq!(reconciled.sync(clock), reconciled.clone());
                prop_assert!(reconciled.validate().is_ok());
            }
        }

        /// Malformed clocks (never validated) must not make any operation panic.
        #[test]
        fn malformed_clocks_never_panic(
            raw in prop::collection::vec(
                (
                    prop_oneof![Just(0u64), Just(u64::MAX), 0..4u64],
                    prop_oneof![Just(0u64), Just(u64::MAX), 0..4u64],
                    prop::collection::vec(0..8u64, 0..6),
                ),
                0..5,
            ),
            anonymous in prop::collection::vec(0..3u64, 0..4),
            other in dotted_clock(),
        ) {
            let clock = DvvSet {
                entries: raw
                    .into_iter()
                    .map(|(actor, counter, values)| Entry { actor, counter, values })
                    .collect(),
                anonymous,
            };
            let _ = clock.validate();
            let _ = clock.sync(&other);
            let _ = other.sync(&clock);
            let _ = clock.join();
            let _ = clock.descends(&other);
            let _ = clock.reconcile(|a, b| a > b);
            let _ = DvvSet::update(clock.clone(), &other, 1);
            let _ = DvvSet::update(other.clone(), &clock, u64::MAX);
            let _ = DvvSet::update_without_local(clock, 0);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            if let Ok(clock) = rmp_serde::from_slice::<DvvSet<u64>>(&bytes) {
                prop_assert!(clock.validate().is_ok());
            }
            if let Ok(vector) = rmp_serde::from_slice::<VersionVector>(&bytes) {
                prop_assert!(VersionVector::from_entries(vector.entries().to_vec()).is_ok());
            }
        }
    }

    /// Writes `value` through `coordinator` with a client's `context`, returning its dot.
    fn put(
        store: &mut DvvSet<u64>,
        context: &VersionVector,
        value: u64,
        coordinator: Actor,
    ) -> Dot {
        *store = DvvSet::update(DvvSet::new_with_context(context, value), store, coordinator);
        (coordinator, store.join().get(coordinator))
    }

    #[test]
    fn concurrent_writes_with_the_same_context_are_siblings() {
        let store = DvvSet::update_without_local(DvvSet::new(1), 1);
        let context = store.join();

        let mut same_coordinator = store.clone();
        put(&mut same_coordinator, &context, 2, 1);
        put(&mut same_coordinator, &context, 3, 1);
        assert_eq!(sorted_values(&same_coordinator), vec![2, 3]);

        let mut first = store.clone();
        let mut second = store;
        put(&mut first, &context, 2, 1);
        put(&mut second, &context, 3, 2);
        assert_eq!(sorted_values(&first.sync(&second)), vec![2, 3]);
    }

    #[test]
    fn a_write_with_the_context_of_both_siblings_resolves_them() {
        let mut store = DvvSet::update_without_local(DvvSet::new(1), 1);
        let context = store.join();
        put(&mut store, &context, 2, 1);
        put(&mut store, &context, 3, 1);
        assert_eq!(store.value_count(), 2);

        let read = store.join();
        put(&mut store, &read, 4, 2);
        assert_eq!(sorted_values(&store), vec![4]);
    }

    #[test]
    fn a_write_without_context_supersedes_nothing() {
        let mut store = DvvSet::update_without_local(DvvSet::new(1), 1);
        store = DvvSet::update(DvvSet::new(2), &store, 1);
        assert_eq!(sorted_values(&store), vec![1, 2]);
    }

    #[test]
    fn each_anonymous_value_of_an_update_gets_its_own_dot() {
        let mut new = DvvSet::new(1);
        new.anonymous.push(2);
        let store = DvvSet::update(new, &DvvSet::empty(), 7);
        assert_eq!(store.join().get(7), 2);
        assert_eq!(sorted_values(&store), vec![1, 2]);
        assert!(store.anonymous().is_empty());
    }

    #[test]
    fn anonymous_values_yield_only_to_a_strictly_newer_history() {
        let stored = DvvSet::update_without_local(DvvSet::new(1), 1);
        let pending = DvvSet::new_with_context(&stored.join(), 2);
        // The coordinator's result records the pending value under a dot, so it replaces it.
        let recorded = DvvSet::update(pending.clone(), &stored, 1);
        let merged = pending.sync(&recorded);
        assert_eq!(sorted_values(&merged), vec![2]);
        assert!(merged.anonymous().is_empty());
        // A pending write from a concurrent history is kept beside it.
        let concurrent =
            DvvSet::new_with_context(&VersionVector::from_entries(vec![(2, 1)]).unwrap(), 3);
        assert_eq!(sorted_values(&pending.sync(&concurrent)), vec![2, 3]);
        assert_eq!(sorted_values(&pending.sync(&pending)), vec![2]);
    }

    #[test]
    fn reconcile_keeps_one_value_and_descends_the_original() {
        let store = DvvSet::update_without_local(DvvSet::new(1), 1);
        let context = store.join();
        let mut first = store.clone();
        let mut second = store;
        put(&mut first, &context, 2, 1);
        put(&mut second, &context, 3, 2);
        let siblings = first.sync(&second);

        let reconciled = siblings.reconcile(|a, b| a > b);
        assert_eq!(reconciled.values(), vec![&3]);
        assert!(reconciled.descends(&siblings));
        assert!(siblings.descends(&reconciled));
        // A replica that did not reconcile converges to the same single value.
        assert_eq!(siblings.sync(&reconciled), reconciled);

        let oldest = siblings.reconcile(|a, b| a < b);
        assert_eq!(oldest.values(), vec![&2]);
    }

    #[test]
    fn reconcile_weighs_each_actors_newest_value() {
        // Actor 1 coordinated 2 then 3 concurrently; 3 is its newest and stands for it.
        let mut store = DvvSet::update_without_local(DvvSet::new(9), 1);
        let context = store.join();
        put(&mut store, &context, 2, 1);
        put(&mut store, &context, 3, 1);
        assert_eq!(store.reconcile(|a, b| a > b).values(), vec![&3]);
        assert_eq!(store.reconcile(|a, b| a < b).values(), vec![&3]);
    }

    #[test]
    fn equal_compares_history_and_live_dots_not_values() {
        let store = DvvSet::update_without_local(DvvSet::new(1), 1);
        let relabelled = store.clone().map(|value| value + 100);
        assert!(store.equal(&relabelled));
        assert_ne!(store, relabelled);

        let mut newer = store.clone();
        put(&mut newer, &store.join(), 2, 1);
        assert!(!store.equal(&newer));
        assert!(newer.descends(&store) && !store.descends(&newer));
    }

    #[test]
    fn map_keeps_dots_and_order() {
        let mut store = DvvSet::update_without_local(DvvSet::new(1), 1);
        let context = store.join();
        put(&mut store, &context, 2, 1);
        put(&mut store, &context, 3, 2);
        let mapped = store.clone().map(|value| value * 10);
        assert!(mapped.equal(&store));
        assert_eq!(mapped.values(), vec![&20, &30]);
    }

    /// A client of the sibling-explosion scenario: it writes with the context of its own last
    /// read, which the other client's writes have made stale.
    struct Client {
        context: VersionVector,
        last: Option<Dot>,
    }

    struct History {
        /// Every write's dot and the context it carried.
        writes: Vec<(Dot, VersionVector)>,
        /// The most siblings any replica held.
        peak: usize,
    }

    impl History {
        fn superseded(&self, (actor, counter): Dot) -> bool {
            self.writes
                .iter()
                .any(|(_, context)| context.get(actor) >= counter)
        }

        fn check(&mut self, store: &DvvSet<u64>, clients: &[&Client]) {
            self.peak = self.peak.max(store.value_count());
            assert!(
                store.value_count() <= 2,
                "{} siblings after {} writes",
                store.value_count(),
                self.writes.len()
            );
            let live: Vec<Dot> = live_dots(store).into_iter().map(|(dot, _)| dot).collect();
            for client in clients {
                if let Some(dot) = client.last {
                    assert!(
                        live.contains(&dot) || self.superseded(dot),
                        "the write {dot:?} vanished"
                    );
                }
            }
        }
    }

    /// Two clients, each writing with the context of its own last read:
    /// X.read, Y.read, then 200 times { X.write, X.read, Y.write, Y.read }.
    /// `coordinator(i)` picks the replica for the i-th write; after each write the replicas sync.
    fn interleaved_writers(coordinator: impl Fn(usize) -> usize, replica_count: usize) {
        let mut replicas = vec![DvvSet::<u64>::empty(); replica_count];
        let mut history = History {
            writes: Vec::new(),
            peak: 0,
        };
        let mut x = Client {
            context: replicas[0].join(),
            last: None,
        };
        let mut y = Client {
            context: replicas[0].join(),
            last: None,
        };
        let mut next_value = 0;
        for round in 0..200 {
            for turn in 0..2 {
                let index = coordinator(2 * round + turn);
                let actor = ACTORS[index];
                next_value += 1;
                let writer = if turn == 0 { &mut x } else { &mut y };
                let dot = put(&mut replicas[index], &writer.context, next_value, actor);
                history.writes.push((dot, writer.context.clone()));
                writer.last = Some(dot);
                let written = replicas[index].clone();
                for replica in replicas.iter_mut() {
                    *replica = replica.sync(&written);
                }
                writer.context = replicas[(index + 1) % replica_count].join();
                for replica in &replicas {
                    history.check(replica, &[&x, &y]);
                }
            }
        }
        assert_eq!(history.writes.len(), 400);
        // The clients do race: each write leaves the other client's last write as a sibling.
        assert_eq!(history.peak, 2);
    }

    #[test]
    fn stale_writers_do_not_explode_siblings_with_one_coordinator() {
        interleaved_writers(|_| 0, 1);
    }

    #[test]
    fn stale_writers_do_not_explode_siblings_with_alternating_coordinators() {
        interleaved_writers(|write| write % 2, 2);
    }

    /// For contrast, the pre-DVV scheme: one version vector per key plus a sibling list. A
    /// write whose context does not cover the whole vector cannot tell which siblings it saw,
    /// so it keeps them all, and the same interleaving grows one sibling per write.
    #[test]
    fn a_plain_version_vector_explodes_under_the_same_interleaving() {
        let mut clock = VersionVector::new();
        let mut siblings: Vec<u64> = Vec::new();
        let mut put_plain = |context: &VersionVector, value: u64| {
            if context.descends(&clock) {
                siblings.clear();
            }
            siblings.push(value);
            let merged = clock.merge(context);
            let counter = merged.get(1) + 1;
            let mut entries: Vec<(Actor, Counter)> = merged
                .entries()
                .iter()
                .copied()
                .filter(|&(actor, _)| actor != 1)
                .collect();
            entries.push((1, counter));
            entries.sort_unstable();
            clock = VersionVector { entries };
            (clock.clone(), siblings.len())
        };
        let mut x_context = VersionVector::new();
        let mut y_context = VersionVector::new();
        let mut count = 0;
        for round in 0..200 {
            (x_context, _) = put_plain(&x_context, 2 * round);
            (y_context, count) = put_plain(&y_context, 2 * round + 1);
        }
        assert!(count >= 399, "plain version vector kept {count} siblings");
    }

    #[test]
    fn validate_rejects_malformed_clocks() {
        let entry = |actor, counter, values: Vec<u64>| Entry {
            actor,
            counter,
            values,
        };
        let clock = |entries, anonymous| DvvSet { entries, anonymous };
        assert_eq!(
            clock(vec![entry(2, 1, vec![]), entry(1, 1, vec![])], vec![]).validate(),
            Err(VersionError::UnsortedActors {
                previous: 2,
                next: 1
            })
        );
        assert_eq!(
            clock(vec![entry(1, 1, vec![]), entry(1, 2, vec![])], vec![]).validate(),
            Err(VersionError::DuplicateActor { actor: 1 })
        );
        assert_eq!(
            clock(vec![entry(3, 1, vec![7, 8])], vec![]).validate(),
            Err(VersionError::MoreValuesThanCounter {
                actor: 3,
                counter: 1,
                values: 2
            })
        );
        assert_eq!(
            clock(vec![entry(4, 0, vec![])], vec![]).validate(),
            Err(VersionError::ZeroCounter { actor: 4 })
        );
        assert_eq!(
            clock(vec![entry(5, u64::MAX, vec![])], vec![]).validate(),
            Err(VersionError::CounterTooLarge {
                actor: 5,
                counter: u64::MAX,
                max: MAX_COUNTER
            })
        );
        assert_eq!(
            clock(vec![], vec![1, 2, 1]).validate(),
            Err(VersionError::DuplicateAnonymousValue { index: 2 })
        );
        assert_eq!(
            clock(vec![entry(1, 3, vec![7, 8, 9])], vec![4]).validate(),
            Ok(())
        );
    }

    #[test]
    fn from_entries_rejects_malformed_vectors() {
        assert_eq!(
            VersionVector::from_entries(vec![(2, 1), (1, 1)]),
            Err(VersionError::UnsortedActors {
                previous: 2,
                next: 1
            })
        );
        assert_eq!(
            VersionVector::from_entries(vec![(1, 1), (1, 1)]),
            Err(VersionError::DuplicateActor { actor: 1 })
        );
        assert_eq!(
            VersionVector::from_entries(vec![(1, 0)]),
            Err(VersionError::ZeroCounter { actor: 1 })
        );
        let vector = VersionVector::from_entries(vec![(1, 2), (5, 1)]).unwrap();
        assert_eq!((vector.get(1), vector.get(5), vector.get(3)), (2, 1, 0));
    }

    #[test]
    fn clocks_round_trip_through_messagepack() {
        let mut store = DvvSet::update_without_local(DvvSet::new(1), 1);
        let context = store.join();
        put(&mut store, &context, 2, 1);
        put(&mut store, &context, 3, 2);
        for bytes in [
            rmp_serde::to_vec(&store).unwrap(),
            rmp_serde::to_vec_named(&store).unwrap(),
        ] {
            let decoded: DvvSet<u64> = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(decoded, store);
            assert_eq!(decoded.validate(), Ok(()));
        }
        let vector = store.join();
        let decoded: VersionVector =
            rmp_serde::from_slice(&rmp_serde::to_vec(&vector).unwrap()).unwrap();
        assert_eq!(decoded, vector);
    }

    #[test]
    fn decoding_rejects_malformed_clocks() {
        let malformed = DvvSet {
            entries: vec![Entry {
                actor: 1,
                counter: 1,
                values: vec![1u64, 2],
            }],
            anonymous: vec![],
        };
        let bytes = rmp_serde::to_vec(&malformed).unwrap();
        assert!(rmp_serde::from_slice::<DvvSet<u64>>(&bytes).is_err());

        let unsorted = VersionVector {
            entries: vec![(2, 1), (1, 1)],
        };
        let bytes = rmp_serde::to_vec(&unsorted).unwrap();
        assert!(rmp_serde::from_slice::<VersionVector>(&bytes).is_err());
    }
}

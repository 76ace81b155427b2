//! The history checker of the randomized simulation (DESIGN §9.2).
//!
//! Every write of a run has a unique identity: a put's value is unique, a delete is named by
//! its tombstone's content. The checker learns which dot each version got by looking at the
//! replicas' stored objects (after each acknowledged write, on a timer, and at the end), and
//! fails on:
//! - **two versions under one dot** (a dot reissued for another write);
//! - **a lost write**: an acknowledged put whose value is neither live in the final merged
//!   object nor superseded (its dot known to the final history under the same version);
//! - **a resurrection**: a version whose dot the context of an acknowledged write covered
//!   (the client saw it and superseded it), or that some copy was seen to supersede, is live
//!   again at the end;
//! - **a write coordinated twice**: one put's value seen under two dots (a duplicate
//!   sibling: a forwarded write coordinated by two nodes, or twice by one);
//! - **divergence**: after the faults heal, the primaries of a key hold different versions.

#![allow(dead_code)]

use dynkv::core::ids::Actor;
use dynkv::core::object::{Content, StoredObject};
use dynkv::core::version::VersionVector;
use std::collections::{BTreeMap, BTreeSet};

/// A dot of one key: (actor, counter).
pub type Dot = (Actor, u64);

/// What the checker knows of one write (a put of a unique value, or a delete).
#[derive(Debug, Clone)]
pub struct WriteRecord {
    pub key: String,
    /// The put's value; `None` for a delete.
    pub value: Option<String>,
    pub acknowledged: bool,
    /// Values the write's context covered (the client read them, or wrote them), for
    /// failure reports.
    pub covers: BTreeSet<String>,
    /// The write's context: an acknowledged write supersedes every version whose dot it
    /// covers, for good.
    pub context: Option<VersionVector>,
}

/// Everything a run did and saw.
#[derive(Default)]
pub struct History {
    /// Every write, by a unique name (the value of a put, `del:...` for a delete).
    pub writes: BTreeMap<String, WriteRecord>,
    /// The version seen under each dot of each key.
    dots: BTreeMap<(String, Dot), Content>,
    /// Where the same dot held two versions: (key, dot, first, second).
    pub collisions: Vec<(String, Dot, String, String)>,
    /// Dots of versions seen superseded: a copy's clock covered them while it held no
    /// version under them. Once reaped, a deleted key has no copy left to show it.
    superseded: BTreeSet<(String, Dot)>,
}

/// A readable name of a version: its value, or that it is a tombstone.
pub fn describe(content: &Content) -> String {
    if content.deleted {
        format!("<tombstone @{}>", content.last_modified_micros)
    } else {
        String::from_utf8_lossy(&content.value).into_owned()
    }
}

/// Every (dot, version) an object holds (anonymous values have no dot).
pub fn dotted_versions(object: &StoredObject) -> Vec<(Dot, &Content)> {
    let mut versions = Vec::new();
    for entry in object.entries() {
        for (index, content) in entry.values().iter().enumerate() {
            versions.push(((entry.actor(), entry.counter() - index as u64), content));
        }
    }
    versions
}

/// An object as text: each dotted version and the clock, for failure reports.
pub fn dump(object: &StoredObject) -> String {
    let versions: Vec<String> = dotted_versions(object)
        .into_iter()
        .map(|((actor, counter), content)| {
            format!("({:04x},{counter})={}", actor >> 48, describe(content))
        })
        .collect();
    let clock: Vec<String> = object
        .join()
        .entries()
        .iter()
        .map(|(actor, counter)| format!("{:04x}:{counter}", actor >> 48))
        .collect();
    format!("[{}] clock {{{}}}", versions.join(" "), clock.join(" "))
}

/// The values of the live (not deleted) siblings of an object.
pub fn live_values(object: &StoredObject) -> BTreeSet<String> {
    object
        .values()
        .into_iter()
        .filter(|content| !content.deleted)
        .map(|content| String::from_utf8_lossy(&content.value).into_owned())
        .collect()
}

impl History {
    /// Records the versions of a stored copy of `key`; a dot already seen with another
    /// version is a collision.
    pub fn observe(&mut self, key: &str, object: &StoredObject) {
        let held: BTreeSet<Dot> = dotted_versions(object)
            .into_iter()
            .map(|(dot, _)| dot)
            .collect();
        let clock = object.join();
        for (seen_key, dot) in self.dots.keys() {
            if seen_key == key && !held.contains(dot) && clock.get(dot.0) >= dot.1 {
                self.superseded.insert((key.to_string(), *dot));
            }
        }
        for (dot, content) in dotted_versions(object) {
            match self.dots.get(&(key.to_string(), dot)) {
                Some(known) if known != content => {
                    let collision = (key.to_string(), dot, describe(known), describe(content));
                    if !self.collisions.contains(&collision) {
                        self.collisions.push(collision);
                    }
                }
                Some(_) => {}
                None => {
                    self.dots.insert((key.to_string(), dot), content.clone());
                }
            }
        }
    }

    /// The writes of `key` in name order, with their observed dots, for failure reports.
    pub fn dump_writes(&self, key: &str) -> Vec<String> {
        self.writes
            .iter()
            .filter(|(_, record)| record.key == key)
            .map(|(name, record)| {
                let dots: Vec<String> = record
                    .value
                    .as_ref()
                    .map(|value| self.dots_of_value(key, value))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(actor, counter)| format!("({:04x},{counter})", actor >> 48))
                    .collect();
                format!(
                    "{name} acked={} dots={} covers={:?}",
                    record.acknowledged,
                    dots.join(""),
                    record.covers
                )
            })
            .collect()
    }

    /// The dots a put's value was seen under (more than one if it was coordinated twice).
    fn dots_of_value(&self, key: &str, value: &str) -> Vec<Dot> {
        self.dots
            .iter()
            .filter(|((seen_key, _), content)| {
                seen_key == key && !content.deleted && content.value == value.as_bytes()
            })
            .map(|((_, dot), _)| *dot)
            .collect()
    }

    /// Checks the final merged object of every key (the sync of every copy in the cluster)
    /// against the history. Returns one line per violation, and the number of acknowledged
    /// puts whose dot was never seen (so that only presence could be checked for them).
    pub fn violations(&self, finals: &BTreeMap<String, StoredObject>) -> (Vec<String>, usize) {
        let mut problems = Vec::new();
        let mut unseen = 0;
        for (key, dot, first, second) in &self.collisions {
            problems.push(format!(
                "dot {dot:?} of {key} holds two versions: {first} and {second}"
            ));
        }
        // A version seen superseded (a copy's clock covered its dot without holding it) is
        // superseded for good: merges keep it dropped. Live again at the end, it came back
        // from a copy that missed the superseding write, after every copy that had it was
        // gone (a reaped tombstone).
        for (key, object) in finals {
            for (dot, content) in dotted_versions(object) {
                let collided = self
                    .collisions
                    .iter()
                    .any(|(seen_key, seen, ..)| seen_key == key && *seen == dot);
                if !content.deleted && !collided && self.superseded.contains(&(key.clone(), dot)) {
                    problems.push(format!(
                        "{} (dot {dot:?}) of {key} is live again after it was seen superseded",
                        describe(content)
                    ));
                }
            }
        }
        for (name, record) in &self.writes {
            if let Some(value) = &record.value {
                let dots = self.dots_of_value(&record.key, value);
                if dots.len() > 1 {
                    problems.push(format!(
                        "write {name} of {} was coordinated {} times (dots {dots:?})",
                        record.key,
                        dots.len()
                    ));
                }
            }
            if !record.acknowledged {
                continue;
            }
            let seen_superseded = record.value.as_ref().is_some_and(|value| {
                let dots = self.dots_of_value(&record.key, value);
                !dots.is_empty()
                    && dots
                        .iter()
                        .all(|dot| self.superseded.contains(&(record.key.clone(), *dot)))
            });
            let Some(object) = finals.get(&record.key) else {
                // No copy remains: every tombstone was reaped. A put is fine if it was seen
                // superseded.
                if let Some(value) = &record.value {
                    if self.dots_of_value(&record.key, value).is_empty() {
                        unseen += 1;
                    } else if !seen_superseded {
                        problems.push(format!(
                            "acknowledged write {name} of {} is lost: no copy of the key remains",
                            record.key
                        ));
                    }
                }
                continue;
            };
            let live = live_values(object);
            if let Some(context) = &record.context {
                for (dot, content) in dotted_versions(object) {
                    if !content.deleted && context.get(dot.0) >= dot.1 {
                        problems.push(format!(
                            "{} (dot {dot:?}) of {} is live again although acknowledged write {name} superseded it",
                            describe(content),
                            record.key
                        ));
                    }
                }
            }
            let Some(value) = &record.value else {
                continue;
            };
            if live.contains(value) {
                continue;
            }
            let dots = self.dots_of_value(&record.key, value);
            if dots.is_empty() {
                unseen += 1;
                continue;
            }
            let history = object.join();
            let superseded = seen_superseded
                || dots.iter().any(|dot| {
                    let collided = self
                        .collisions
                        .iter()
                        .any(|(key, seen, ..)| *key == record.key && seen == dot);
                    history.get(dot.0) >= dot.1 && !collided
                });
            if !superseded {
                problems.push(format!(
                    "acknowledged write {value} of {} (dots {dots:?}) is lost: final siblings {live:?}",
                    record.key
                ));
            }
        }
        (problems, unseen)
    }
}

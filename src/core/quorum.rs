//! Per-request consistency levels and the quorum trackers that decide a request's outcome.
//!
//! A level (`r`, `w`, `pr`, `pw`, `dw`) is given as `one`, `quorum`, `all`, `default` or an
//! integer, and resolved against the bucket's `n_val` once, at the start of a request. The
//! trackers then take replies one at a time and say whether the request has won, lost (can no
//! longer be satisfied) or is still pending, always with the counts that explain it, so the
//! error a user sees reads "2 of 3 replicas acknowledged, 3 required".

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A consistency level as the user wrote it, before it is resolved against `n_val`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Quorum {
    One,
    Quorum,
    All,
    /// Use the bucket's default for this field.
    #[default]
    Default,
    Count(u32),
}

impl fmt::Display for Quorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quorum::One => f.write_str("one"),
            Quorum::Quorum => f.write_str("quorum"),
            Quorum::All => f.write_str("all"),
            Quorum::Default => f.write_str("default"),
            Quorum::Count(count) => write!(f, "{count}"),
        }
    }
}

/// The text of a level could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a consistency level: use one, quorum, all, default or an integer")]
pub struct ParseQuorumError {
    pub value: String,
}

impl FromStr for Quorum {
    type Err = ParseQuorumError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "one" => Ok(Quorum::One),
            "quorum" => Ok(Quorum::Quorum),
            "all" => Ok(Quorum::All),
            "default" => Ok(Quorum::Default),
            other => other
                .parse::<u32>()
                .map(Quorum::Count)
                .map_err(|_| ParseQuorumError {
                    value: text.to_string(),
                }),
        }
    }
}

/// A resolved level was outside what the bucket allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{field}={given} is out of range: {field} must be between {minimum} and n_val ({n_val}), or one, quorum, all, default"
)]
pub struct QuorumRangeError {
    pub field: &'static str,
    pub given: Quorum,
    pub minimum: u32,
    pub n_val: u32,
}

/// The majority of `n_val` replicas.
pub fn majority(n_val: u32) -> u32 {
    n_val / 2 + 1
}

impl Quorum {
    /// Resolves the level to a count of replicas. `minimum` is 1 for `r`, `w` and `dw` (a request
    /// that waits for nobody is not a request) and 0 for `pr` and `pw`, whose default is "no
    /// primary required".
    pub fn resolve(
        self,
        field: &'static str,
        n_val: u32,
        bucket_default: Quorum,
        minimum: u32,
    ) -> Result<u32, QuorumRangeError> {
        let level = if self == Quorum::Default {
            bucket_default
        } else {
            self
        };
        let count = match level {
            Quorum::One => 1,
            Quorum::Quorum => majority(n_val),
            Quorum::All => n_val,
            // A bucket default of "default" means the built-in default for the field.
            Quorum::Default => {
                if minimum == 0 {
                    0
                } else {
                    majority(n_val)
                }
            }
            Quorum::Count(count) => count,
        };
        if count < minimum || count > n_val {
            return Err(QuorumRangeError {
                field,
                given: self,
                minimum,
                n_val,
            });
        }
        Ok(count)
    }
}

/// Consistency defaults of a bucket, used where a request says `default`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketDefaults {
    pub n_val: u32,
    pub r: Quorum,
    pub w: Quorum,
    pub dw: Quorum,
    pub pr: Quorum,
    pub pw: Quorum,
}

impl Default for BucketDefaults {
    fn default() -> Self {
        BucketDefaults {
            n_val: 3,
            r: Quorum::Quorum,
            w: Quorum::Quorum,
            dw: Quorum::Quorum,
            pr: Quorum::Count(0),
            pw: Quorum::Count(0),
        }
    }
}

/// What a get waits for, resolved against `n_val`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadQuorum {
    pub n_val: u32,
    pub r: u32,
    pub pr: u32,
}

impl ReadQuorum {
    pub fn resolve(
        r: Quorum,
        pr: Quorum,
        bucket: &BucketDefaults,
    ) -> Result<Self, QuorumRangeError> {
        let n_val = bucket.n_val;
        let r = r.resolve("r", n_val, bucket.r, 1)?;
        let pr = pr.resolve("pr", n_val, bucket.pr, 0)?;
        // A primary reply is also a reply, so pr raises r (as Riak does).
        Ok(ReadQuorum {
            n_val,
            r: r.max(pr),
            pr,
        })
    }
}

/// What a put waits for, resolved against `n_val`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteQuorum {
    pub n_val: u32,
    pub w: u32,
    pub dw: u32,
    pub pw: u32,
}

impl WriteQuorum {
    pub fn resolve(
        w: Quorum,
        dw: Quorum,
        pw: Quorum,
        bucket: &BucketDefaults,
    ) -> Result<Self, QuorumRangeError> {
        let n_val = bucket.n_val;
        let w = w.resolve("w", n_val, bucket.w, 1)?;
        let dw = dw.resolve("dw", n_val, bucket.dw, 0)?;
        let pw = pw.resolve("pw", n_val, bucket.pw, 0)?;
        // Every durable or primary ack is also an ack, so they raise w (as Riak does).
        Ok(WriteQuorum {
            n_val,
            w: w.max(dw).max(pw),
            dw,
            pw,
        })
    }
}

/// The outcome of a quorum so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuorumOutcome {
    Pending,
    Won,
    /// The quorum can no longer be met: too many replicas failed.
    Lost(QuorumShortfall),
}

/// The counts that explain a lost (or timed-out) quorum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumShortfall {
    /// Which requirement failed: "r", "pr", "w", "dw" or "pw".
    pub requirement: String,
    pub answered: u32,
    pub required: u32,
    pub asked: u32,
}

impl fmt::Display for QuorumShortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.requirement.as_str() {
            "r" => "replicas replied",
            "pr" => "primary replicas replied",
            "pw" => "primary replicas acknowledged",
            "dw" => "replicas acknowledged durably",
            _ => "replicas acknowledged",
        };
        write!(
            f,
            "{} of {} {what}, {} required ({})",
            self.answered, self.asked, self.required, self.requirement
        )
    }
}

/// One requirement: `needed` of `eligible` replicas must succeed.
#[derive(Clone, Copy, Debug)]
struct Requirement {
    name: &'static str,
    needed: u32,
    eligible: u32,
    succeeded: u32,
    failed: u32,
}

impl Requirement {
    fn new(name: &'static str, needed: u32, eligible: u32) -> Self {
        Requirement {
            name,
            needed,
            eligible,
            succeeded: 0,
            failed: 0,
        }
    }

    fn met(&self) -> bool {
        self.succeeded >= self.needed
    }

    fn impossible(&self) -> bool {
        self.eligible.saturating_sub(self.failed) < self.needed
    }

    fn shortfall(&self, asked: u32) -> QuorumShortfall {
        QuorumShortfall {
            requirement: self.name.to_string(),
            answered: self.succeeded,
            required: self.needed,
            asked,
        }
    }
}

/// Combines requirements into one outcome: won when all are met, lost as soon as one is
/// impossible.
fn combine(requirements: &[Requirement], asked: u32) -> QuorumOutcome {
    if let Some(lost) = requirements
        .iter()
        .find(|requirement| requirement.impossible())
    {
        return QuorumOutcome::Lost(lost.shortfall(asked));
    }
    if requirements.iter().all(Requirement::met) {
        QuorumOutcome::Won
    } else {
        QuorumOutcome::Pending
    }
}

/// Picks the requirement to blame when a request times out: the first one not met.
fn unmet(requirements: &[Requirement], asked: u32) -> Option<QuorumShortfall> {
    requirements
        .iter()
        .find(|requirement| !requirement.met())
        .map(|requirement| requirement.shortfall(asked))
}

/// Counts the replies of a get.
#[derive(Clone, Debug)]
pub struct ReadTracker {
    asked: u32,
    replies: Requirement,
    primary_replies: Requirement,
}

impl ReadTracker {
    /// `asked` replicas were asked, `primaries_asked` of them are primaries for the key.
    pub fn new(quorum: ReadQuorum, asked: u32, primaries_asked: u32) -> Self {
        ReadTracker {
            asked,
            replies: Requirement::new("r", quorum.r, asked),
            primary_replies: Requirement::new("pr", quorum.pr, primaries_asked),
        }
    }

    /// Records a reply (a value or a not-found; both count) or a failure of one replica.
    pub fn record(&mut self, primary: bool, ok: bool) -> QuorumOutcome {
        for requirement in self.requirements_for(primary) {
            if ok {
                requirement.succeeded += 1;
            } else {
                requirement.failed += 1;
            }
        }
        self.outcome()
    }

    fn requirements_for(&mut self, primary: bool) -> impl Iterator<Item = &mut Requirement> {
        let primary_requirement = primary.then_some(&mut self.primary_replies);
        std::iter::once(&mut self.replies).chain(primary_requirement)
    }

    pub fn outcome(&self) -> QuorumOutcome {
        combine(&[self.replies, self.primary_replies], self.asked)
    }

    /// The explanation to give when the request's timeout fires while pending.
    pub fn timeout_shortfall(&self) -> Option<QuorumShortfall> {
        unmet(&[self.replies, self.primary_replies], self.asked)
    }
}

/// Counts the acknowledgements of a put.
#[derive(Clone, Debug)]
pub struct WriteTracker {
    asked: u32,
    acks: Requirement,
    durable_acks: Requirement,
    primary_acks: Requirement,
}

impl WriteTracker {
    pub fn new(quorum: WriteQuorum, asked: u32, primaries_asked: u32) -> Self {
        WriteTracker {
            asked,
            acks: Requirement::new("w", quorum.w, asked),
            durable_acks: Requirement::new("dw", quorum.dw, asked),
            primary_acks: Requirement::new("pw", quorum.pw, primaries_asked),
        }
    }

    /// Records one replica's answer: `acked` false is a failure or refusal; `durable` says
    /// the replica's journal was fsynced before it answered.
    pub fn record(&mut self, primary: bool, acked: bool, durable: bool) -> QuorumOutcome {
        let apply = |requirement: &mut Requirement, success: bool| {
            if success {
                requirement.succeeded += 1;
            } else {
                requirement.failed += 1;
            }
        };
        apply(&mut self.acks, acked);
        apply(&mut self.durable_acks, acked && durable);
        if primary {
            apply(&mut self.primary_acks, acked);
        }
        self.outcome()
    }

    pub fn outcome(&self) -> QuorumOutcome {
        combine(
            &[self.acks, self.durable_acks, self.primary_acks],
            self.asked,
        )
    }

    pub fn timeout_shortfall(&self) -> Option<QuorumShortfall> {
        unmet(
            &[self.acks, self.durable_acks, self.primary_acks],
            self.asked,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket() -> BucketDefaults {
        BucketDefaults::default()
    }

    #[test]
    fn levels_parse_and_resolve() {
        assert_eq!("QUORUM".parse::<Quorum>(), Ok(Quorum::Quorum));
        assert_eq!("2".parse::<Quorum>(), Ok(Quorum::Count(2)));
        assert!("most".parse::<Quorum>().is_err());
        assert!("-1".parse::<Quorum>().is_err());
        let read = ReadQuorum::resolve(Quorum::All, Quorum::Default, &bucket()).unwrap();
        assert_eq!(
            read,
            ReadQuorum {
                n_val: 3,
                r: 3,
                pr: 0
            }
        );
        let write =
            WriteQuorum::resolve(Quorum::One, Quorum::Default, Quorum::Default, &bucket()).unwrap();
        assert_eq!(write.w, 2, "dw defaults to quorum and raises w");
        let write =
            WriteQuorum::resolve(Quorum::One, Quorum::Count(0), Quorum::All, &bucket()).unwrap();
        assert_eq!((write.w, write.dw, write.pw), (3, 0, 3));
    }

    #[test]
    fn out_of_range_levels_name_the_field_and_range() {
        let error = ReadQuorum::resolve(Quorum::Count(4), Quorum::Default, &bucket()).unwrap_err();
        assert_eq!(error.field, "r");
        assert_eq!(
            error.to_string(),
            "r=4 is out of range: r must be between 1 and n_val (3), or one, quorum, all, default"
        );
        let error = WriteQuorum::resolve(
            Quorum::Count(0),
            Quorum::Default,
            Quorum::Default,
            &bucket(),
        )
        .unwrap_err();
        assert_eq!(error.field, "w");
        let error = WriteQuorum::resolve(Quorum::One, Quorum::Count(9), Quorum::Default, &bucket())
            .unwrap_err();
        assert_eq!(error.field, "dw");
    }

    #[test]
    fn write_tracker_wins_and_loses_with_counts() {
        let quorum = WriteQuorum {
            n_val: 3,
            w: 3,
            dw: 0,
            pw: 0,
        };
        let mut tracker = WriteTracker::new(quorum, 3, 3);
        assert_eq!(tracker.record(true, true, true), QuorumOutcome::Pending);
        assert_eq!(tracker.record(true, true, true), QuorumOutcome::Pending);
        let QuorumOutcome::Lost(shortfall) = tracker.record(true, false, false) else {
            panic!("one failure out of three makes w=all impossible");
        };
        assert_eq!(
            shortfall.to_string(),
            "2 of 3 replicas acknowledged, 3 required (w)"
        );

        let quorum = WriteQuorum {
            n_val: 3,
            w: 2,
            dw: 2,
            pw: 0,
        };
        let mut tracker = WriteTracker::new(quorum, 3, 3);
        assert_eq!(tracker.record(true, true, false), QuorumOutcome::Pending);
        assert_eq!(
            tracker.record(true, true, true),
            QuorumOutcome::Pending,
            "dw needs two durable acks"
        );
        assert_eq!(tracker.record(true, true, true), QuorumOutcome::Won);
    }

    #[test]
    fn primaries_are_counted_separately() {
        let quorum = WriteQuorum {
            n_val: 3,
            w: 2,
            dw: 0,
            pw: 2,
        };
        let mut tracker = WriteTracker::new(quorum, 3, 2);
        assert_eq!(tracker.record(false, true, true), QuorumOutcome::Pending);
        assert_eq!(tracker.record(true, true, true), QuorumOutcome::Pending);
        assert!(
            matches!(tracker.record(true, false, false), QuorumOutcome::Lost(s) if s.requirement == "pw")
        );

        let read = ReadQuorum {
            n_val: 3,
            r: 2,
            pr: 0,
        };
        let mut tracker = ReadTracker::new(read, 3, 3);
        assert_eq!(tracker.record(true, true), QuorumOutcome::Pending);
        assert_eq!(
            tracker.timeout_shortfall().unwrap().to_string(),
            "1 of 3 replicas replied, 2 required (r)"
        );
        assert_eq!(tracker.record(true, true), QuorumOutcome::Won);
    }
}

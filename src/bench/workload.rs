//! YCSB-style operation mixes. An "update" is a write of a whole new value of a record.

use rand::Rng;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// One operation of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Read,
    Update,
    /// The no-op request that measures the client path and transport alone (the ceiling).
    Ping,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Update => "update",
            Operation::Ping => "ping",
        }
    }
}

/// The share of reads of a workload; the rest are updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// 50% read, 50% update (YCSB A, "update heavy").
    A,
    /// 95% read, 5% update (YCSB B, "read mostly").
    B,
    /// 100% read (YCSB C).
    C,
    /// 100% update.
    W,
    /// Any read share in percent.
    Custom { read_percent: u8 },
}

impl Workload {
    pub fn read_percent(self) -> u8 {
        match self {
            Workload::A => 50,
            Workload::B => 95,
            Workload::C => 100,
            Workload::W => 0,
            Workload::Custom { read_percent } => read_percent.min(100),
        }
    }

    pub fn choose(self, rng: &mut impl Rng) -> Operation {
        if rng.random_range(0..100u8) < self.read_percent() {
            Operation::Read
        } else {
            Operation::Update
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workload::A => write!(f, "A"),
            Workload::B => write!(f, "B"),
            Workload::C => write!(f, "C"),
            Workload::W => write!(f, "W"),
            Workload::Custom { read_percent } => write!(f, "custom({read_percent}% read)"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown workload {0:?}: use a, b, c, w or read=PERCENT (e.g. read=80)")]
pub struct ParseWorkloadError(String);

impl FromStr for Workload {
    type Err = ParseWorkloadError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower = text.trim().to_ascii_lowercase();
        match lower.as_str() {
            "a" => Ok(Workload::A),
            "b" => Ok(Workload::B),
            "c" => Ok(Workload::C),
            "w" => Ok(Workload::W),
            _ => lower
                .strip_prefix("read=")
                .and_then(|percent| percent.parse::<u8>().ok())
                .filter(|percent| *percent <= 100)
                .map(|read_percent| Workload::Custom { read_percent })
                .ok_or_else(|| ParseWorkloadError(text.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn parses_named_and_custom_workloads() {
        assert_eq!("A".parse(), Ok(Workload::A));
        assert_eq!("w".parse(), Ok(Workload::W));
        assert_eq!("read=80".parse(), Ok(Workload::Custom { read_percent: 80 }));
        assert!("read=101".parse::<Workload>().is_err());
        assert!("z".parse::<Workload>().is_err());
    }

    #[test]
    fn mixes_have_their_read_share() {
        let mut rng = SmallRng::seed_from_u64(3);
        for (workload, low, high) in [
            (Workload::A, 4_800, 5_200),
            (Workload::B, 9_400, 9_600),
            (Workload::C, 10_000, 10_000),
            (Workload::W, 0, 0),
        ] {
            let reads = (0..10_000)
                .filter(|_| workload.choose(&mut rng) == Operation::Read)
                .count();
            assert!((low..=high).contains(&reads), "{workload}: {reads}");
        }
    }
}

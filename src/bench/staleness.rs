//! Staleness as PBS t-visibility measures it (Bailis et al., "Probabilistically Bounded
//! Staleness for Practical Partial Quorums", VLDB 2012): a read issued `t` after a write was
//! acknowledged, of the same key, is stale when it does not return that write. Gaps are
//! tallied in decade buckets: 0–1 ms, 1–10 ms, 10–100 ms, 100–1000 ms, 1 s and more.

use serde::Serialize;

/// Upper bounds (exclusive) of the gap buckets, in microseconds; a last bucket takes the rest.
pub const GAP_BUCKET_BOUNDS_MICROS: [u64; 4] = [1_000, 10_000, 100_000, 1_000_000];
const BUCKETS: usize = GAP_BUCKET_BOUNDS_MICROS.len() + 1;

/// The gaps probes aim for, cycled; the measured gap (not the target) picks the bucket.
/// Short gaps come more often because that is where staleness lives.
pub const PROBE_GAPS_MICROS: [u64; 10] = [0, 0, 0, 0, 300, 2_000, 5_000, 20_000, 50_000, 150_000];

pub fn bucket_of(gap_micros: u64) -> usize {
    GAP_BUCKET_BOUNDS_MICROS
        .iter()
        .position(|&bound| gap_micros < bound)
        .unwrap_or(GAP_BUCKET_BOUNDS_MICROS.len())
}

pub fn bucket_label(bucket: usize) -> String {
    let ms = |micros: u64| micros / 1000;
    match bucket {
        0 => format!("0-{} ms", ms(GAP_BUCKET_BOUNDS_MICROS[0])),
        b if b < GAP_BUCKET_BOUNDS_MICROS.len() => format!(
            "{}-{} ms",
            ms(GAP_BUCKET_BOUNDS_MICROS[b - 1]),
            ms(GAP_BUCKET_BOUNDS_MICROS[b])
        ),
        _ => format!(
            ">={} ms",
            ms(GAP_BUCKET_BOUNDS_MICROS[GAP_BUCKET_BOUNDS_MICROS.len() - 1])
        ),
    }
}

/// Reads and stale reads per gap bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StalenessTally {
    reads: [u64; BUCKETS],
    stale: [u64; BUCKETS],
}

impl StalenessTally {
    pub fn record(&mut self, gap_micros: u64, stale: bool) {
        let bucket = bucket_of(gap_micros);
        self.reads[bucket] += 1;
        if stale {
            self.stale[bucket] += 1;
        }
    }

    pub fn merge(&mut self, other: &StalenessTally) {
        for bucket in 0..BUCKETS {
            self.reads[bucket] += other.reads[bucket];
            self.stale[bucket] += other.stale[bucket];
        }
    }

    pub fn total_reads(&self) -> u64 {
        self.reads.iter().sum()
    }

    pub fn buckets(&self) -> Vec<StalenessBucket> {
        (0..BUCKETS)
            .map(|bucket| StalenessBucket {
                bucket: bucket_label(bucket),
                reads: self.reads[bucket],
                stale: self.stale[bucket],
                stale_fraction: (self.reads[bucket] > 0)
                    .then(|| self.stale[bucket] as f64 / self.reads[bucket] as f64),
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StalenessBucket {
    pub bucket: String,
    pub reads: u64,
    pub stale: u64,
    /// `None` when no read fell in this bucket.
    pub stale_fraction: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_fall_in_decade_buckets() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(999), 0);
        assert_eq!(bucket_of(1_000), 1);
        assert_eq!(bucket_of(9_999), 1);
        assert_eq!(bucket_of(10_000), 2);
        assert_eq!(bucket_of(150_000), 3);
        assert_eq!(bucket_of(1_000_000), 4);
        assert_eq!(bucket_of(u64::MAX), 4);
        let labels: Vec<String> = (0..5).map(bucket_label).collect();
        assert_eq!(
            labels,
            ["0-1 ms", "1-10 ms", "10-100 ms", "100-1000 ms", ">=1000 ms"]
        );
    }

    #[test]
    fn fractions_per_bucket() {
        let mut tally = StalenessTally::default();
        tally.record(100, true);
        tally.record(200, false);
        tally.record(300, false);
        tally.record(400, false);
        tally.record(5_000, false);
        let mut other = StalenessTally::default();
        other.record(50_000, true);
        tally.merge(&other);
        let buckets = tally.buckets();
        assert_eq!(tally.total_reads(), 6);
        assert_eq!((buckets[0].reads, buckets[0].stale), (4, 1));
        assert_eq!(buckets[0].stale_fraction, Some(0.25));
        assert_eq!(buckets[1].stale_fraction, Some(0.0));
        assert_eq!(buckets[2].stale_fraction, Some(1.0));
        assert_eq!(buckets[3].stale_fraction, None);
    }
}

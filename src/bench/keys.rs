//! Key choice: uniform, or zipfian as in YCSB (Gray et al., "Quickly generating billion-record
//! synthetic databases", SIGMOD 1994), scrambled so that the hot keys are spread over the
//! key space and therefore over the ring's partitions rather than packed at its start.

use rand::Rng;

/// YCSB's default skew: the hottest key gets about 1/zeta(n) of the requests.
pub const DEFAULT_ZIPFIAN_THETA: f64 = 0.99;

/// Draws ranks 0..n (0 the most popular) with probability proportional to 1 / (rank+1)^theta.
///
/// Set-up is O(n) (the zeta sum); each draw is O(1).
#[derive(Clone, Debug)]
pub struct ZipfianRanks {
    items: u64,
    theta: f64,
    alpha: f64,
    zeta_n: f64,
    eta: f64,
    half_pow_theta: f64,
}

impl ZipfianRanks {
    /// `items` must be at least 1 and `theta` in (0, 1); both are checked by the caller's
    /// argument parsing, and out-of-range values are clamped here rather than panicking.
    pub fn new(items: u64, theta: f64) -> Self {
        let items = items.max(1);
        let theta = theta.clamp(0.01, 0.999_999);
        let zeta_n = zeta(items, theta);
        let zeta_2 = zeta(2.min(items), theta);
        let eta = if items > 1 {
            (1.0 - (2.0 / items as f64).powf(1.0 - theta)) / (1.0 - zeta_2 / zeta_n)
        } else {
            0.0
        };
        ZipfianRanks {
            items,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zeta_n,
            eta,
            half_pow_theta: 0.5f64.powf(theta),
        }
    }

    pub fn items(&self) -> u64 {
        self.items
    }

    /// The exact probability of `rank`, for tests and reports.
    pub fn probability(&self, rank: u64) -> f64 {
        1.0 / ((rank + 1) as f64).powf(self.theta) / self.zeta_n
    }

    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        let uniform: f64 = rng.random();
        let scaled = uniform * self.zeta_n;
        if scaled < 1.0 {
            return 0;
        }
        if scaled < 1.0 + self.half_pow_theta {
            return 1.min(self.items - 1);
        }
        let rank =
            (self.items as f64 * (self.eta * uniform - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.items - 1)
    }
}

fn zeta(items: u64, theta: f64) -> f64 {
    (1..=items).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

/// FNV-1a of a rank, as YCSB's `ScrambledZipfianGenerator` uses to place hot ranks.
fn fnv1a_64(value: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in value.to_le_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// How a workload picks the record each operation touches.
#[derive(Clone, Debug)]
pub enum KeyChooser {
    Uniform {
        records: u64,
    },
    /// Zipfian ranks scrambled over the records.
    Zipfian(ZipfianRanks),
}

impl KeyChooser {
    pub fn uniform(records: u64) -> Self {
        KeyChooser::Uniform {
            records: records.max(1),
        }
    }

    pub fn zipfian(records: u64, theta: f64) -> Self {
        KeyChooser::Zipfian(ZipfianRanks::new(records, theta))
    }

    pub fn records(&self) -> u64 {
        match self {
            KeyChooser::Uniform { records } => *records,
            KeyChooser::Zipfian(ranks) => ranks.items(),
        }
    }

    /// A record index in 0..records.
    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        match self {
            KeyChooser::Uniform { records } => rng.random_range(0..*records),
            KeyChooser::Zipfian(ranks) => fnv1a_64(ranks.sample(rng)) % ranks.items(),
        }
    }
}

/// The key of record `index`, YCSB style.
pub fn record_key(index: u64) -> Vec<u8> {
    format!("user{index}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn counts(chooser: impl Fn(&mut SmallRng) -> u64, items: usize, draws: usize) -> Vec<u64> {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = vec![0u64; items];
        for _ in 0..draws {
            counts[chooser(&mut rng) as usize] += 1;
        }
        counts
    }

    #[test]
    fn zipfian_rank_frequencies_follow_the_power_law() {
        let ranks = ZipfianRanks::new(1000, DEFAULT_ZIPFIAN_THETA);
        let draws = 200_000;
        let counts = counts(|rng| ranks.sample(rng), 1000, draws);
        // Gray's method is exact for the two hottest ranks and approximate beyond them.
        for rank in 0..2u64 {
            let expected = ranks.probability(rank) * draws as f64;
            let observed = counts[rank as usize] as f64;
            assert!(
                (observed - expected).abs() < expected * 0.05,
                "rank {rank}: observed {observed}, expected {expected:.0}"
            );
        }
        // The mass of the hottest decile matches the power law within a few percent.
        let top: u64 = counts[..100].iter().sum();
        let expected_top: f64 = (0..100).map(|rank| ranks.probability(rank)).sum::<f64>();
        let observed_top = top as f64 / draws as f64;
        assert!(
            (observed_top - expected_top).abs() < 0.05,
            "top decile {observed_top:.3}, expected {expected_top:.3}"
        );
        // Frequencies fall with rank.
        assert!(counts[0] > counts[10] && counts[10] > counts[500]);
        // Every draw is in range (counts would have panicked otherwise).
        assert_eq!(counts.iter().sum::<u64>(), draws as u64);
    }

    #[test]
    fn zipfian_is_deterministic_for_a_seed() {
        let chooser = KeyChooser::zipfian(10_000, DEFAULT_ZIPFIAN_THETA);
        let draw = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..100).map(|_| chooser.next(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn scrambling_spreads_the_hot_keys() {
        let chooser = KeyChooser::zipfian(1000, DEFAULT_ZIPFIAN_THETA);
        let counts = counts(|rng| chooser.next(rng), 1000, 100_000);
        let mut hottest: Vec<usize> = (0..1000).collect();
        hottest.sort_by_key(|&index| std::cmp::Reverse(counts[index]));
        // The ten hottest records are not the first ten indexes.
        assert!(hottest[..10].iter().any(|&index| index >= 10));
        let max = *counts.iter().max().unwrap_or(&0);
        assert!(
            max > 5_000,
            "the hottest record gets several percent: {max}"
        );
    }

    #[test]
    fn uniform_covers_the_range_evenly() {
        let chooser = KeyChooser::uniform(10);
        let counts = counts(|rng| chooser.next(rng), 10, 100_000);
        for count in counts {
            assert!((9_000..11_000).contains(&count), "{count}");
        }
    }

    #[test]
    fn tiny_key_spaces_do_not_panic() {
        let mut rng = SmallRng::seed_from_u64(1);
        for items in [1, 2, 3] {
            let chooser = KeyChooser::zipfian(items, DEFAULT_ZIPFIAN_THETA);
            for _ in 0..1000 {
                assert!(chooser.next(&mut rng) < items);
            }
        }
    }
}

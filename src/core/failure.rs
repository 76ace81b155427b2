//! Phi accrual failure detection (Hayashibara et al., as in Cassandra and Akka).
//!
//! Each peer's heartbeats (a newer gossip heartbeat version of that peer, however it arrived)
//! feed a window of inter-arrival times. `phi` is the suspicion that the peer is down:
//! with exponentially distributed intervals of mean μ, the probability that a live peer stays
//! silent for `t` is e^(−t/μ), so φ = −log10(e^(−t/μ)) = t / μ · log10(e). A peer is judged
//! down when φ exceeds a threshold; the silence that takes is
//! `t = threshold × μ × ln(10)` — about 18.4 μ for the default threshold of 8 (with gossip
//! every 500 ms, μ is about 0.5 s, so about 9 s).
//!
//! Judging a peer down only routes requests around it; nothing removes it from the cluster.
//!
//! An interval longer than [`MAX_INTERVAL_FACTOR`] times the expected one is a silence (a
//! partition, a pause), not a sample of the heartbeat rate: it is left out of the window, as
//! Cassandra's arrival window does, or a healed partition would inflate the mean and slow the
//! detection of the next failure for the next hundred heartbeats.

use std::collections::VecDeque;

/// Intervals remembered per peer.
pub const DEFAULT_WINDOW: usize = 100;

/// Intervals longer than this many expected intervals are not recorded (see the module doc).
pub const MAX_INTERVAL_FACTOR: u64 = 4;

/// The phi accrual detector of one peer. Times are milliseconds on any monotonic clock the
/// caller chooses.
#[derive(Clone, Debug)]
pub struct PhiAccrual {
    last_heartbeat_ms: Option<u64>,
    intervals_ms: VecDeque<u64>,
    interval_sum_ms: u64,
    window: usize,
    /// Assumed mean before any interval was measured (the gossip interval).
    initial_interval_ms: u64,
}

impl PhiAccrual {
    pub fn new(initial_interval_ms: u64, window: usize) -> Self {
        PhiAccrual {
            last_heartbeat_ms: None,
            intervals_ms: VecDeque::with_capacity(window),
            interval_sum_ms: 0,
            window: window.max(1),
            initial_interval_ms: initial_interval_ms.max(1),
        }
    }

    /// Records a heartbeat arriving at `now_ms`.
    pub fn heartbeat(&mut self, now_ms: u64) {
        if let Some(last) = self.last_heartbeat_ms {
            let interval = now_ms.saturating_sub(last);
            if interval > self.initial_interval_ms * MAX_INTERVAL_FACTOR {
                self.last_heartbeat_ms = Some(now_ms);
                return;
            }
            if self.intervals_ms.len() == self.window
                && let Some(oldest) = self.intervals_ms.pop_front()
            {
                self.interval_sum_ms -= oldest;
            }
            self.intervals_ms.push_back(interval);
            self.interval_sum_ms += interval;
        }
        self.last_heartbeat_ms = Some(now_ms);
    }

    /// Mean interval between heartbeats, in milliseconds.
    pub fn mean_interval_ms(&self) -> f64 {
        if self.intervals_ms.is_empty() {
            self.initial_interval_ms as f64
        } else {
            // Never below 1 ms, so a burst of heartbeats cannot make phi explode.
            (self.interval_sum_ms as f64 / self.intervals_ms.len() as f64).max(1.0)
        }
    }

    /// Suspicion level at `now_ms`; 0 right after a heartbeat, growing linearly with silence.
    pub fn phi(&self, now_ms: u64) -> f64 {
        match self.last_heartbeat_ms {
            None => 0.0,
            Some(last) => {
                let silence = now_ms.saturating_sub(last) as f64;
                silence / self.mean_interval_ms() * std::f64::consts::LOG10_E
            }
        }
    }

    pub fn last_heartbeat_ms(&self) -> Option<u64> {
        self.last_heartbeat_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_grows_with_silence_and_resets_on_heartbeat() {
        let mut detector = PhiAccrual::new(500, DEFAULT_WINDOW);
        for beat in 0..20 {
            detector.heartbeat(beat * 500);
        }
        let last = 19 * 500;
        assert!((detector.mean_interval_ms() - 500.0).abs() < 1e-9);
        assert!(detector.phi(last + 100) < 1.0);
        // Threshold 8 is crossed after 8 × 500 ms × ln 10 ≈ 9.2 s of silence, not before.
        assert!(detector.phi(last + 9_000) < 8.0);
        assert!(detector.phi(last + 9_300) > 8.0);
        detector.heartbeat(last + 20_000);
        assert_eq!(detector.phi(last + 20_000), 0.0);
    }

    #[test]
    fn a_healed_silence_does_not_slow_the_next_detection() {
        let mut detector = PhiAccrual::new(500, DEFAULT_WINDOW);
        let mut now = 0;
        for _ in 0..20 {
            now += 500;
            detector.heartbeat(now);
        }
        // A 41 s partition, healed; then heartbeats resume.
        now += 41_000;
        detector.heartbeat(now);
        for _ in 0..5 {
            now += 500;
            detector.heartbeat(now);
        }
        assert!(
            (detector.mean_interval_ms() - 500.0).abs() < 1e-9,
            "{}",
            detector.mean_interval_ms()
        );
        assert!(
            detector.phi(now + 9_300) > 8.0,
            "the next failure is still detected in ~9 s"
        );
    }

    #[test]
    fn the_window_forgets_old_intervals() {
        let mut detector = PhiAccrual::new(1000, 4);
        for beat in 0..5 {
            detector.heartbeat(beat * 1000);
        }
        for beat in 0..4 {
            detector.heartbeat(4000 + (beat + 1) * 100);
        }
        assert!((detector.mean_interval_ms() - 100.0).abs() < 1e-9);
    }
}

//! Latency histograms per operation (HDR, microsecond resolution), errors by kind, and what a
//! run reports: the text table on stdout and the JSON document of `--json-out`.

use super::staleness::StalenessBucket;
use super::workload::Operation;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Highest latency a histogram holds; slower requests are clamped to it (and still counted).
const MAX_TRACKABLE_MICROS: u64 = 120_000_000;
/// Three significant digits: 0.1% resolution at every scale.
const SIGNIFICANT_DIGITS: u8 = 3;

fn new_histogram() -> Histogram<u64> {
    // The bounds are constants known to be valid, so creation cannot fail.
    Histogram::new_with_bounds(1, MAX_TRACKABLE_MICROS, SIGNIFICANT_DIGITS)
        .unwrap_or_else(|error| unreachable!("valid histogram bounds: {error}"))
}

/// What one worker (or a whole phase, once merged) has measured.
#[derive(Clone, Debug)]
pub struct Recorder {
    histograms: BTreeMap<Operation, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            histograms: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, operation: Operation, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_TRACKABLE_MICROS);
        self.histograms
            .entry(operation)
            .or_insert_with(new_histogram)
            .saturating_record(micros);
    }

    /// Counts a failed request under `kind` (e.g. "timeout", "quorum_unmet", "transport").
    pub fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Recorder) {
        for (operation, histogram) in &other.histograms {
            let mine = self
                .histograms
                .entry(*operation)
                .or_insert_with(new_histogram);
            // Same bounds on both sides, so adding cannot fail.
            let _ = mine.add(histogram);
        }
        for (kind, count) in &other.errors {
            *self.errors.entry(kind.clone()).or_default() += count;
        }
    }

    pub fn successes(&self) -> u64 {
        self.histograms.values().map(Histogram::len).sum()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LatencySummary {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl LatencySummary {
    fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        LatencySummary {
            mean: histogram.mean() / 1000.0,
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p99_9: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OperationReport {
    pub count: u64,
    pub throughput_ops_per_sec: f64,
    pub latency_ms: LatencySummary,
}

/// The outcome of one timed phase: a workload, a compare configuration or the ceiling.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhaseReport {
    pub elapsed_secs: f64,
    /// Successful operations.
    pub operations: u64,
    pub throughput_ops_per_sec: f64,
    /// All operations together.
    pub latency_ms: Option<LatencySummary>,
    pub per_operation: BTreeMap<String, OperationReport>,
    pub errors: ErrorReport,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorReport {
    pub total: u64,
    pub by_kind: BTreeMap<String, u64>,
}

impl PhaseReport {
    pub fn new(recorder: &Recorder, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let mut all = new_histogram();
        let mut per_operation = BTreeMap::new();
        for (operation, histogram) in &recorder.histograms {
            let _ = all.add(histogram);
            per_operation.insert(
                operation.name().to_string(),
                OperationReport {
                    count: histogram.len(),
                    throughput_ops_per_sec: histogram.len() as f64 / seconds,
                    latency_ms: LatencySummary::of(histogram),
                },
            );
        }
        PhaseReport {
            elapsed_secs: elapsed.as_secs_f64(),
            operations: all.len(),
            throughput_ops_per_sec: all.len() as f64 / seconds,
            latency_ms: (!all.is_empty()).then(|| LatencySummary::of(&all)),
            per_operation,
            errors: ErrorReport {
                total: recorder.error_count(),
                by_kind: recorder.errors.clone(),
            },
        }
    }

    /// This phase's throughput as a fraction of the ceiling's.
    pub fn fraction_of(&self, ceiling: &PhaseReport) -> Option<f64> {
        (ceiling.throughput_ops_per_sec > 0.0)
            .then(|| self.throughput_ops_per_sec / ceiling.throughput_ops_per_sec)
    }

    /// The table printed after a run: one row per operation, then the total and the errors.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "{:<10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "operation", "count", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        let mut row = |name: &str, count: u64, rate: f64, latency: &LatencySummary| {
            let _ = writeln!(
                text,
                "{:<10} {:>10} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                name,
                count,
                rate,
                latency.p50,
                latency.p90,
                latency.p99,
                latency.p99_9,
                latency.max
            );
        };
        for (name, operation) in &self.per_operation {
            row(
                name,
                operation.count,
                operation.throughput_ops_per_sec,
                &operation.latency_ms,
            );
        }
        if self.per_operation.len() > 1
            && let Some(latency) = &self.latency_ms
        {
            row("all", self.operations, self.throughput_ops_per_sec, latency);
        }
        let _ = write!(
            text,
            "{} operations in {:.2} s: {:.0} ops/s; errors: {}",
            self.operations, self.elapsed_secs, self.throughput_ops_per_sec, self.errors.total
        );
        for (kind, count) in &self.errors.by_kind {
            let _ = write!(text, " {kind}={count}");
        }
        text.push('\n');
        text
    }
}

/// The parameters of a run, echoed in its JSON so a result file explains itself.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunSettings {
    pub workload: String,
    pub key_distribution: String,
    pub records: u64,
    pub value_bytes: usize,
    pub workers: usize,
    pub r: String,
    pub w: String,
    pub duration_secs: Option<f64>,
    pub operations: Option<u64>,
    pub seed: u64,
    pub nodes: Vec<String>,
}

/// `dynkv bench --json-out`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunReport {
    pub settings: RunSettings,
    pub result: PhaseReport,
    /// The no-op (ping) phase through the same client path, when it ran.
    pub ceiling: Option<PhaseReport>,
    pub fraction_of_ceiling: Option<f64>,
    /// CPU the nodes and the client spent during the workload phase, per operation (Linux).
    pub cpu: Option<super::cpu::CpuReport>,
}

/// One configuration of `dynkv bench compare`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConfigReport {
    pub label: String,
    pub w: String,
    pub r: String,
    pub result: PhaseReport,
    pub fraction_of_ceiling: Option<f64>,
    pub staleness: Vec<StalenessBucket>,
}

/// `dynkv bench compare --json-out`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompareReport {
    pub settings: RunSettings,
    pub ceiling: Option<PhaseReport>,
    pub configs: Vec<ConfigReport>,
}

impl CompareReport {
    /// The comparison table: throughput, p50/p99 of all operations, errors and the stale
    /// fraction of each gap bucket.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let buckets: Vec<String> = self
            .configs
            .first()
            .map(|config| config.staleness.iter().map(|b| b.bucket.clone()).collect())
            .unwrap_or_default();
        let _ = write!(
            text,
            "{:<18} {:>9} {:>7} {:>8} {:>8} {:>7}",
            "config", "ops/s", "ceil%", "p50 ms", "p99 ms", "errors"
        );
        for bucket in &buckets {
            let _ = write!(text, " {:>17}", format!("stale {bucket}"));
        }
        text.push('\n');
        for config in &self.configs {
            let latency = config.result.latency_ms.clone();
            let _ = write!(
                text,
                "{:<18} {:>9.0} {:>7} {:>8.2} {:>8.2} {:>7}",
                config.label,
                config.result.throughput_ops_per_sec,
                config
                    .fraction_of_ceiling
                    .map(|fraction| format!("{:.0}%", fraction * 100.0))
                    .unwrap_or_else(|| "-".into()),
                latency.as_ref().map_or(0.0, |l| l.p50),
                latency.as_ref().map_or(0.0, |l| l.p99),
                config.result.errors.total
            );
            for bucket in &config.staleness {
                let cell = match bucket.stale_fraction {
                    Some(fraction) => {
                        format!("{}/{} {:.1}%", bucket.stale, bucket.reads, fraction * 100.0)
                    }
                    None => "-".to_string(),
                };
                let _ = write!(text, " {cell:>17}");
            }
            text.push('\n');
        }
        if let Some(ceiling) = &self.ceiling {
            let _ = writeln!(
                text,
                "ceiling (no-op ping through the same client path): {:.0} ops/s, p99 {:.2} ms",
                ceiling.throughput_ops_per_sec,
                ceiling.latency_ms.as_ref().map_or(0.0, |l| l.p99)
            );
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder() -> Recorder {
        let mut recorder = Recorder::new();
        for millis in 1..=100u64 {
            recorder.record(Operation::Read, Duration::from_millis(millis));
        }
        recorder.record(Operation::Update, Duration::from_micros(500));
        recorder.error("timeout");
        recorder.error("timeout");
        recorder.error("transport");
        recorder
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let report = PhaseReport::new(&recorder(), Duration::from_secs(2));
        let read = &report.per_operation["read"];
        assert_eq!(read.count, 100);
        assert!((read.throughput_ops_per_sec - 50.0).abs() < 1e-9);
        // Three significant digits: within 0.1%.
        assert!(
            (read.latency_ms.p50 - 50.0).abs() < 0.1,
            "{}",
            read.latency_ms.p50
        );
        assert!((read.latency_ms.p99 - 99.0).abs() < 0.1);
        assert!((read.latency_ms.max - 100.0).abs() < 0.1);
        assert_eq!(report.operations, 101);
        assert_eq!(report.errors.total, 3);
        assert_eq!(report.errors.by_kind["timeout"], 2);
    }

    #[test]
    fn merging_adds_counts_and_errors() {
        let mut merged = recorder();
        merged.merge(&recorder());
        assert_eq!(merged.successes(), 202);
        assert_eq!(merged.error_count(), 6);
    }

    #[test]
    fn table_names_every_operation_and_error_kind() {
        let text = PhaseReport::new(&recorder(), Duration::from_secs(1)).render();
        assert!(text.starts_with("operation"));
        for needle in [
            "read",
            "update",
            "all",
            "p99.9 ms",
            "timeout=2",
            "transport=1",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let phase = PhaseReport::new(&recorder(), Duration::from_secs(1));
        let report = RunReport {
            settings: RunSettings {
                workload: "A".into(),
                key_distribution: "zipfian".into(),
                records: 10,
                value_bytes: 100,
                workers: 2,
                r: "quorum".into(),
                w: "quorum".into(),
                duration_secs: None,
                operations: Some(101),
                seed: 1,
                nodes: vec!["127.0.0.1:8700".into()],
            },
            fraction_of_ceiling: phase.fraction_of(&phase),
            ceiling: Some(phase.clone()),
            result: phase,
            cpu: Some(crate::bench::cpu::CpuReport::new(3, 30, 10, 100, 100)),
        };
        let json = serde_json::to_value(&report).expect("serializes");
        let read = &json["result"]["per_operation"]["read"];
        for field in ["p50", "p90", "p99", "p99_9", "max", "mean"] {
            assert!(read["latency_ms"][field].is_number(), "{field}");
        }
        assert_eq!(json["result"]["errors"]["total"], 3);
        assert_eq!(json["settings"]["workload"], "A");
        assert_eq!(json["fraction_of_ceiling"], 1.0);
        assert_eq!(json["cpu"]["nodes"], 3);
        assert!(json["cpu"]["total_us_per_op"].as_f64().is_some());
    }
}

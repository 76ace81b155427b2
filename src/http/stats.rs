//! Request accounting for `/stats` (Riak's JSON shape) and `/metrics` (Prometheus text).
//!
//! `/stats` follows Riak: `node_gets`/`node_puts` and the latency, sibling and object-size
//! figures cover the last minute, the `_total` counters the whole uptime; times are in
//! microseconds. `/metrics` is rendered by `metrics-exporter-prometheus` from the `metrics`
//! facade: `dynkv_requests_total` and the `dynkv_request_duration_seconds` histogram carry
//! `interface`, `operation` and `consistency` labels (the level asked for: `r` for gets, `w`
//! for puts and deletes).

use super::AppState;
use crate::core::object::Content;
use crate::core::quorum::Quorum;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The Riak release whose key/value API dynkv serves, as Riak clients read it for feature
/// detection (`riak_kv_version` in `/stats`, `server_version` over Protocol Buffers; both
/// must be three numbers).
pub const RIAK_COMPATIBLE_VERSION: &str = "2.0.0";

/// The window of the per-minute figures.
const WINDOW: Duration = Duration::from_secs(60);
/// Most samples a window keeps; beyond it the oldest go first.
const WINDOW_CAPACITY: usize = 100_000;
/// Histogram buckets of request latency, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once. Another recorder already installed
/// (by an embedding program) leaves `/metrics` empty rather than failing the node.
pub fn install_prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("dynkv_request_duration_seconds".into()),
                    LATENCY_BUCKETS,
                )
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot install the metrics recorder; /metrics will be empty");
                    None
                }
            }
        })
        .as_ref()
}

/// The series of one label set: its counter and latency histogram.
type Series = (metrics::Counter, metrics::Histogram);

/// Labels of a request series: interface, operation, consistency, outcome.
type SeriesLabels = (&'static str, &'static str, &'static str, &'static str);

/// Handles of every series recorded so far. Registering a series by its labels costs a
/// dozen allocations and a hash of the whole key in the recorder, on every request; the
/// label sets are few (interfaces × operations × levels × outcomes, every label a static
/// string), so each is registered once and then recorded through its handles.
static SERIES: OnceLock<parking_lot::Mutex<std::collections::HashMap<SeriesLabels, Series>>> =
    OnceLock::new();

/// Records one request of either interface for `/metrics`. `consistency` is text a user
/// sent (an HTTP query parameter, a level's spelling); see [`consistency_label`].
pub fn record_metrics(
    interface: &'static str,
    operation: &'static str,
    consistency: &str,
    outcome: &'static str,
    elapsed: Duration,
) {
    record_series(
        (
            interface,
            operation,
            consistency_label(consistency),
            outcome,
        ),
        elapsed,
    );
}

/// [`record_metrics`] for a request that names its level as a [`Quorum`] (or none).
pub fn record_level_metrics(
    interface: &'static str,
    operation: &'static str,
    level: Option<Quorum>,
    outcome: &'static str,
    elapsed: Duration,
) {
    let consistency = level.map_or("none", level_label);
    record_series((interface, operation, consistency, outcome), elapsed);
}

fn record_series(labels: SeriesLabels, elapsed: Duration) {
    let record = |(counter, histogram): &Series| {
        counter.increment(1);
        histogram.record(elapsed.as_secs_f64());
    };
    // Handles taken before the recorder is installed would record nowhere for good, so they
    // are kept only once it is.
    if !matches!(PROMETHEUS.get(), Some(Some(_))) {
        return record(&register_series(labels));
    }
    let mut series = SERIES.get_or_init(Default::default).lock();
    record(
        series
            .entry(labels)
            .or_insert_with(|| register_series(labels)),
    );
}

fn register_series((interface, operation, consistency, outcome): SeriesLabels) -> Series {
    let labels = [
        ("interface", interface),
        ("operation", operation),
        ("consistency", consistency),
    ];
    let counter = metrics::counter!(
        "dynkv_requests_total",
        &[
            ("interface", interface),
            ("operation", operation),
            ("consistency", consistency),
            ("outcome", outcome),
        ]
    );
    let histogram = metrics::histogram!("dynkv_request_duration_seconds", &labels);
    (counter, histogram)
}

/// A level as a label value: its canonical spelling; counts past 16 are `invalid`, so that
/// user input cannot grow the number of series without bound.
fn level_label(level: Quorum) -> &'static str {
    const COUNTS: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    match level {
        Quorum::One => "one",
        Quorum::Quorum => "quorum",
        Quorum::All => "all",
        Quorum::Default => "default",
        Quorum::Count(count) => COUNTS.get(count as usize).copied().unwrap_or("invalid"),
    }
}

/// A level's text as a label value: [`level_label`] of the level it spells, `none` and `all`
/// as they are, and `invalid` for any other text.
fn consistency_label(text: &str) -> &'static str {
    match text.parse::<Quorum>() {
        Ok(level) => level_label(level),
        Err(_) if text == "none" => "none",
        Err(_) if text == "all" => "all",
        Err(_) => "invalid",
    }
}

/// Samples of the last minute.
#[derive(Default)]
struct Window {
    samples: parking_lot::Mutex<VecDeque<(Instant, u64)>>,
}

struct Summary {
    count: u64,
    mean: u64,
    median: u64,
    p95: u64,
    p99: u64,
    max: u64,
}

impl Window {
    fn record(&self, value: u64) {
        let now = Instant::now();
        let mut samples = self.samples.lock();
        samples.push_back((now, value));
        while samples.len() > WINDOW_CAPACITY {
            samples.pop_front();
        }
        while samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > WINDOW)
        {
            samples.pop_front();
        }
    }

    fn summary(&self) -> Summary {
        let now = Instant::now();
        let mut values: Vec<u64> = self
            .samples
            .lock()
            .iter()
            .filter(|(at, _)| now.duration_since(*at) <= WINDOW)
            .map(|(_, value)| *value)
            .collect();
        values.sort_unstable();
        let count = values.len() as u64;
        let percentile = |fraction: f64| -> u64 {
            if values.is_empty() {
                return 0;
            }
            let index = ((values.len() as f64 * fraction).ceil() as usize).clamp(1, values.len());
            values[index - 1]
        };
        Summary {
            count,
            mean: values.iter().sum::<u64>().checked_div(count).unwrap_or(0),
            median: percentile(0.5),
            p95: percentile(0.95),
            p99: percentile(0.99),
            max: values.last().copied().unwrap_or(0),
        }
    }
}

/// One node's HTTP statistics.
pub struct Stats {
    get_times: Window,
    put_times: Window,
    siblings: Window,
    object_sizes: Window,
    gets_total: AtomicU64,
    puts_total: AtomicU64,
    deletes_total: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

fn outcome_of(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=399 => "ok",
        404 => "not_found",
        400..=499 => "client_error",
        503 => "unavailable",
        _ => "error",
    }
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            get_times: Window::default(),
            put_times: Window::default(),
            siblings: Window::default(),
            object_sizes: Window::default(),
            gets_total: AtomicU64::new(0),
            puts_total: AtomicU64::new(0),
            deletes_total: AtomicU64::new(0),
        }
    }

    pub fn record_request(
        &self,
        operation: &'static str,
        consistency: &str,
        status: StatusCode,
        elapsed: Duration,
    ) {
        record_metrics("http", operation, consistency, outcome_of(status), elapsed);
        let micros = elapsed.as_micros() as u64;
        match operation {
            "get" => {
                self.gets_total.fetch_add(1, Ordering::Relaxed);
                self.get_times.record(micros);
            }
            "put" => {
                self.puts_total.fetch_add(1, Ordering::Relaxed);
                self.put_times.record(micros);
            }
            "delete" => {
                self.deletes_total.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// The shape of an object a get found.
    pub fn record_object(&self, siblings: &[Content]) {
        self.siblings.record(siblings.len() as u64);
        let size: usize = siblings.iter().map(Content::size_bytes).sum();
        self.object_sizes.record(size as u64);
        metrics::histogram!("dynkv_get_siblings").record(siblings.len() as f64);
        metrics::histogram!("dynkv_get_object_bytes").record(size as f64);
    }
}

fn summary_fields(fields: &mut serde_json::Map<String, Value>, prefix: &str, summary: &Summary) {
    fields.insert(format!("{prefix}_mean"), json!(summary.mean));
    fields.insert(format!("{prefix}_median"), json!(summary.median));
    fields.insert(format!("{prefix}_95"), json!(summary.p95));
    fields.insert(format!("{prefix}_99"), json!(summary.p99));
    fields.insert(format!("{prefix}_100"), json!(summary.max));
}

/// `GET /stats`: Riak's status document, with the fields that apply to dynkv.
pub(crate) async fn riak_stats(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let stats = &state.stats;
    let node = &state.node;
    let ring = node.ring();
    let get_times = stats.get_times.summary();
    let put_times = stats.put_times.summary();
    let mut fields = serde_json::Map::new();
    fields.insert("nodename".into(), json!(node.id().to_string()));
    fields.insert("node_gets".into(), json!(get_times.count));
    fields.insert(
        "node_gets_total".into(),
        json!(stats.gets_total.load(Ordering::Relaxed)),
    );
    fields.insert("node_puts".into(), json!(put_times.count));
    fields.insert(
        "node_puts_total".into(),
        json!(stats.puts_total.load(Ordering::Relaxed)),
    );
    fields.insert(
        "node_deletes_total".into(),
        json!(stats.deletes_total.load(Ordering::Relaxed)),
    );
    summary_fields(&mut fields, "node_get_fsm_time", &get_times);
    summary_fields(&mut fields, "node_put_fsm_time", &put_times);
    summary_fields(
        &mut fields,
        "node_get_fsm_siblings",
        &stats.siblings.summary(),
    );
    summary_fields(
        &mut fields,
        "node_get_fsm_objsize",
        &stats.object_sizes.summary(),
    );
    fields.insert(
        "read_repairs_total".into(),
        json!(crate::server::counters::read_repairs()),
    );
    let members: Vec<String> = ring.members().iter().map(|id| id.to_string()).collect();
    fields.insert("ring_members".into(), json!(members));
    fields.insert("ring_num_partitions".into(), json!(ring.partition_count()));
    fields.insert(
        "ring_ownership".into(),
        json!(
            members
                .iter()
                .map(|member| {
                    let id = crate::core::ids::NodeId::new(member.clone());
                    let owned = id
                        .map(|id| ring.partitions_owned_by(&id).len())
                        .unwrap_or(0);
                    json!({ "node": member, "partitions": owned })
                })
                .collect::<Vec<_>>()
        ),
    );
    fields.insert("storage_backend".into(), json!("fjall"));
    let storage = node.store().stats();
    fields.insert("storage_writes_total".into(), json!(storage.writes));
    fields.insert("storage_fsyncs_total".into(), json!(storage.fsyncs));
    fields.insert(
        "storage_key_count_estimate".into(),
        json!(node.store().key_count_estimate()),
    );
    if let Ok(status) = node.status() {
        fields.insert("dynkv_hints_held".into(), json!(status.hints_held));
        fields.insert(
            "dynkv_hints_delivered_total".into(),
            json!(status.hints_delivered),
        );
        fields.insert("dynkv_hint_bytes".into(), json!(status.hint_bytes));
        fields.insert(
            "dynkv_hints_skipped_past_window_total".into(),
            json!(status.hints_skipped_past_window),
        );
        fields.insert(
            "dynkv_hints_refused_full_total".into(),
            json!(status.hints_refused_full),
        );
        fields.insert("dot_collisions".into(), json!(status.dot_collisions));
        fields.insert("dynkv_ring_version".into(), json!(status.ring_version));
        fields.insert(
            "dynkv_partitions_owned".into(),
            json!(status.partitions_owned),
        );
        fields.insert(
            "dynkv_transfers_pending".into(),
            json!(status.transfers_pending),
        );
        fields.insert(
            "dynkv_handoff_keys_sent_total".into(),
            json!(status.handoff_keys_sent),
        );
        fields.insert(
            "dynkv_handoff_bytes_sent_total".into(),
            json!(status.handoff_bytes_sent),
        );
        fields.insert(
            "dynkv_stray_keys_deleted_total".into(),
            json!(status.stray_keys_deleted),
        );
        fields.insert(
            "dynkv_stray_keys_handed_total".into(),
            json!(status.stray_keys_handed),
        );
        fields.insert(
            "dynkv_aae_exchanges_total".into(),
            json!(status.aae_exchanges),
        );
        fields.insert(
            "dynkv_aae_segments_differing_total".into(),
            json!(status.aae_segments_differing),
        );
        fields.insert(
            "dynkv_aae_keys_repaired_total".into(),
            json!(status.aae_keys_repaired),
        );
        fields.insert(
            "dynkv_aae_bytes_repaired_total".into(),
            json!(status.aae_bytes_repaired),
        );
        fields.insert(
            "dynkv_aae_bytes_exchanged_total".into(),
            json!(status.aae_bytes_exchanged),
        );
        fields.insert(
            "dynkv_tombstones_held".into(),
            json!(status.tombstones_held),
        );
        fields.insert(
            "dynkv_tombstones_reaped_total".into(),
            json!(status.tombstones_reaped),
        );
        fields.insert(
            "dynkv_actors_retired_total".into(),
            json!(status.actors_retired),
        );
        fields.insert("dynkv_members_up".into(), json!(status.members_up));
        fields.insert("dynkv_members_down".into(), json!(status.members_down));
    }
    // Riak's list of the nodes this one is connected to: here, the members judged up.
    let connected: Vec<String> = node
        .membership()
        .view()
        .into_iter()
        .filter(|member| member.up && member.node != node.id().as_str())
        .map(|member| member.node)
        .collect();
    fields.insert("connected_nodes".into(), json!(connected));
    fields.insert("dynkv_version".into(), json!(env!("CARGO_PKG_VERSION")));
    // Riak clients read `riak_kv_version` first and map it to the features they may use
    // (the Python client: >= 1.0 quorum controls, conditional and head requests and
    // tombstone vclocks; 1.4 bucket-property reset, streamed listing and timeouts; 2.0 bucket
    // types). dynkv serves the key/value API of Riak 2.0 with the `default` bucket type only;
    // what it does not serve (2i, MapReduce, search, data types) is refused with a reason.
    fields.insert("riak_kv_version".into(), json!(RIAK_COMPATIBLE_VERSION));
    fields.insert("riak_pb_version".into(), json!(RIAK_COMPATIBLE_VERSION));
    fields.insert("riak_core_version".into(), json!(RIAK_COMPATIBLE_VERSION));
    fields.insert(
        "sys_system_version".into(),
        json!(format!("dynkv {} (Rust)", env!("CARGO_PKG_VERSION"))),
    );
    fields.insert(
        "sys_system_architecture".into(),
        json!(std::env::consts::ARCH),
    );
    fields.insert(
        "sys_logical_processors".into(),
        json!(std::thread::available_parallelism().map_or(1, |cores| cores.get())),
    );
    fields.insert("sys_process_count".into(), json!(1));
    let document = Value::Object(fields);
    // Riak pretty-prints for a text/plain Accept.
    let pretty = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("text/plain"));
    let body = if pretty {
        serde_json::to_string_pretty(&document).unwrap_or_default()
    } else {
        document.to_string()
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `GET /metrics`: Prometheus text exposition format 0.0.4.
pub(crate) async fn prometheus() -> Response {
    let text = match install_prometheus() {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_become_bounded_labels() {
        assert_eq!(consistency_label("quorum"), "quorum");
        assert_eq!(consistency_label("3"), "3");
        assert_eq!(consistency_label("16"), "16");
        assert_eq!(consistency_label("17"), "invalid");
        assert_eq!(consistency_label("banana"), "invalid");
        assert_eq!(consistency_label("none"), "none");
        assert_eq!(level_label(Quorum::Count(4)), "4");
        assert_eq!(level_label(Quorum::Count(u32::MAX)), "invalid");
    }

    #[test]
    fn every_request_of_a_series_is_counted_through_its_kept_handles() {
        let Some(handle) = install_prometheus() else {
            panic!("this test process has no other recorder");
        };
        // A label set only this test uses, recorded three times: once to register it, then
        // through the kept handles.
        for _ in 0..3 {
            record_level_metrics(
                "native",
                "test_series",
                Some(Quorum::Count(2)),
                "ok",
                Duration::from_millis(1),
            );
        }
        let text = handle.render();
        let counted = text.lines().find(|line| {
            line.starts_with("dynkv_requests_total{")
                && line.contains("operation=\"test_series\"")
                && line.contains("consistency=\"2\"")
        });
        assert_eq!(counted.and_then(|line| line.rsplit(' ').next()), Some("3"));
    }
}

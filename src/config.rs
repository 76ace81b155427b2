//! Node configuration: a TOML file whose every field has a default and a command-line flag
//! (see `dynkv server --help`), validated at start-up with errors that name the field.
//!
//! ```toml
//! node_id = "n1"                       # ring member name; also the TLS certificate's DNS name
//! data_dir = "/var/lib/dynkv"          # fjall store, actor id
//! peer_listen = "0.0.0.0:8710"         # node-to-node QUIC (mutual TLS)
//! client_listen = "0.0.0.0:8700"       # client QUIC (TLS)
//! pb_listen = "0.0.0.0:8087"           # Riak's Protocol Buffers API (Riak clients' default port)
//! pb_tls = false                       # let RpbStartTls upgrade PB connections to TLS
//! http_listen = "0.0.0.0:8098"         # Riak-compatible HTTP API, /stats and /metrics
//! http_tls = false                     # serve HTTPS with the node certificate instead
//! http_token = "s3cret"                # optional: require `Authorization: Bearer s3cret`
//! client_token = "s3cret"              # optional: require this token on the QUIC client port
//! partition_count = 64                 # ring size, fixed at cluster creation
//! request_timeout_ms = 5000            # default timeout of a get/put/delete
//! gossip_interval_ms = 500             # one gossip round (and heartbeat) per interval
//! gossip_fanout = 3                    # peers per round
//! phi_threshold = 8.0                  # down after ~ phi × interval × ln 10 of silence (~9 s)
//! hint_window_secs = 10800             # no new hints for a primary silent longer (3 h)
//! handoff_interval_ms = 1000           # how often hints are offered to returning primaries
//! transfer_limit = 2                   # ring-change handoffs this node sends at once
//! transfer_max_bytes_per_sec = 0       # bound on each handoff's rate; 0 = unbounded
//! read_repair_chance = 0.1             # share of gets that ask every replica (read repair)
//! speculative_retry_ms = 50            # a get asks the other replicas after this long
//! worker_threads = 0                   # async runtime threads; 0 = one per CPU core
//!
//! [[members]]                          # seeds: members contacted at start; the rest is gossiped
//! id = "n1"
//! peer_addr = "10.0.0.1:8710"
//!
//! [tls]
//! ca_cert = "ca.pem"
//! node_cert = "n1.pem"
//! node_key = "n1.key"
//!
//! [buckets]                            # properties of every bucket
//! n_val = 3
//! allow_mult = true
//! r = "quorum"; w = "quorum"; dw = "quorum"; pr = "0"; pw = "0"
//!
//! [limits]
//! max_value_bytes = 8388608
//! max_siblings = 100
//! max_object_bytes = 33554432       # a client write whose key would grow past it: refused
//! max_merged_object_bytes = 50331648 # a replica merge or a read past it: refused (see below)
//! max_frame_bytes = 67108864
//! max_client_connections = 1024       # QUIC client port; one more is closed naming the limit
//! max_peer_connections = 256          # QUIC peer port
//! http_concurrency = 512              # HTTP requests at once; past it 503
//! max_http_connections = 1024         # HTTP connections open at once; past it 503
//! max_in_flight_bytes = 67108864      # request bodies held at once (QUIC client port, HTTP, PB)
//! max_requests_per_connection = 1024  # QUIC requests run at once per connection; then wait
//! max_in_flight_requests = 4096       # QUIC requests run at once per listener; then wait
//!
//! [aae]                                # active anti-entropy (tictac trees)
//! enabled = true
//! exchange_interval_ms = 1000          # one exchange (a partition with its other primaries) per interval
//! max_repairs_per_exchange = 1000
//! rebuild_interval_secs = 86400        # trees are rebuilt from a scan this often (and at start)
//!
//! [tombstones]                         # what becomes of a deleted key's tombstone
//! mode = "reap"                        # "reap": removed once the checks pass (needs aae; see ARCHITECTURE.md); "keep": kept forever
//! grace_secs = 14400                   # kept at least this long (4 h; more than hint_window_secs);
//!                                      # a bucket's tombstone_grace_secs overrides it
//! max_reaps_per_pass = 1000            # tombstones one pass over a partition reaps at most
//!
//! [hints]
//! max_bytes = 1073741824               # hint storage bound; past it fallbacks refuse writes
//!
//! [storage]
//! sync_writes = true                   # fsync the journal (group commit) before every ack
//! cache_mib = 64
//! min_free_mib = 256                  # below this much free disk, writes are refused (507)
//! write_buffer_mib = 256              # memtables over all partitions (each gets its share)
//! row_cache_slots = 16384              # latest record of recently written keys (key and record <= 1 KiB); 0: off
//! ```

use crate::core::ids::NodeId;
use crate::core::quorum::{BucketDefaults, Quorum};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub peer_listen: SocketAddr,
    pub client_listen: SocketAddr,
    /// Riak-compatible HTTP API, `/stats` and `/metrics` (plain HTTP by default, as Riak's
    /// port 8098).
    pub http_listen: SocketAddr,
    /// Riak's Protocol Buffers API (plain TCP, as Riak's port 8087), for the Riak client
    /// libraries that speak it.
    pub pb_listen: SocketAddr,
    /// Let `RpbStartTls` upgrade a Protocol Buffers connection to TLS with the node
    /// certificate (`tls.node_cert`); off, it is refused with a message saying so.
    pub pb_tls: bool,
    /// Serve the HTTP API over TLS with the node certificate (`tls.node_cert`), as the client
    /// port does.
    pub http_tls: bool,
    /// When set, every HTTP request except `/ping` must carry `Authorization: Bearer <token>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_token: Option<String>,
    /// When set, every request on the QUIC client port but `ping` must carry this token
    /// (`dynkv --token`, `DYNKV_TOKEN`, `ClientConfig::token`); without it the port serves
    /// anyone who holds the cluster CA certificate.
    pub client_token: Option<String>,
    pub partition_count: u32,
    pub request_timeout_ms: u64,
    pub gossip_interval_ms: u64,
    pub gossip_fanout: usize,
    pub phi_threshold: f64,
    pub hint_window_secs: u64,
    pub handoff_interval_ms: u64,
    /// Handoffs of a committed ring change this node sends at once (Riak's
    /// `transfer_limit`); `dynkv admin transfer-limit N` changes it while running. 0 pauses.
    pub transfer_limit: u32,
    /// Bytes per second each handoff this node sends may use; 0 means unbounded.
    pub transfer_max_bytes_per_sec: u64,
    /// A get asks only the replicas its `r` and `pr` need; this share of gets asks every
    /// replica instead, so that read repair also reaches the replicas plain reads skip.
    /// Between 0 and 1.
    pub read_repair_chance: f64,
    /// When the replicas a get asked have not met its quorum after this many milliseconds,
    /// it asks the others too (speculative retry).
    pub speculative_retry_ms: u64,
    /// Threads of the node's async runtime; 0 means one per CPU core. Nodes sharing a
    /// machine (as `dynkv dev`'s do) run faster with their share of the cores than with
    /// threads that preempt each other.
    pub worker_threads: usize,
    /// Seeds: members this node contacts at start (it may list itself). The member list is
    /// then learned by gossip and saved in the data directory.
    pub members: Vec<MemberConfig>,
    pub tls: TlsConfig,
    pub buckets: BucketConfig,
    pub limits: LimitsConfig,
    pub hints: HintsConfig,
    pub storage: StorageSettings,
    /// Active anti-entropy: tictac trees per partition, exchanged with the other primaries.
    pub aae: AaeConfig,
    /// Tombstone reaping.
    pub tombstones: TombstonesConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub id: String,
    pub peer_addr: SocketAddr,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM of the cluster CA, which signs every node certificate.
    pub ca_cert: PathBuf,
    /// PEM of this node's certificate (its DNS names include `node_id`).
    pub node_cert: PathBuf,
    /// PEM of this node's private key.
    pub node_key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BucketConfig {
    /// Replicas of each key.
    pub n_val: u32,
    /// Keep concurrent writes as siblings (true) or keep the latest by timestamp (false).
    pub allow_mult: bool,
    pub r: String,
    pub w: String,
    pub dw: String,
    pub pr: String,
    pub pw: String,
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig {
            n_val: 3,
            allow_mult: true,
            r: "quorum".into(),
            w: "quorum".into(),
            dw: "quorum".into(),
            pr: "0".into(),
            pw: "0".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest value a client may write.
    pub max_value_bytes: u64,
    /// Most siblings a key may hold; a write beyond it is refused until a client resolves them.
    pub max_siblings: u32,
    /// Largest object (all siblings together) a client write may leave at its coordinator.
    pub max_object_bytes: u64,
    /// Largest object any copy of a key may hold, and any read may return, once copies
    /// written through different coordinators meet (concurrent writes each within
    /// `max_object_bytes` can add up). A replica merge past it is refused, so every copy
    /// stays within it and fits a frame: a read whose merged answer would exceed it is
    /// refused, naming it, and a read at `r=1` returns one copy, whose context resolves it.
    /// Between `max_object_bytes` and `max_frame_bytes` − 1 MiB.
    pub max_merged_object_bytes: u64,
    /// Largest frame read from the network, checked before allocating.
    pub max_frame_bytes: u32,
    /// Connections the QUIC client port keeps at once; one more is closed with a reason
    /// naming this field.
    pub max_client_connections: u32,
    /// Connections the QUIC peer port keeps at once (peers use one each).
    pub max_peer_connections: u32,
    /// HTTP requests served at once; past it, 503 naming this field.
    pub http_concurrency: u32,
    /// HTTP connections kept open at once; one more gets a 503 naming this field.
    pub max_http_connections: u32,
    /// Bytes of request bodies held at once (from header to answer) by the client-facing
    /// listeners together (QUIC client port, HTTP, Protocol Buffers), and by the peer
    /// listener on its own; past it, no more bodies are read until earlier ones finish (HTTP
    /// and PB refuse, naming this field, after the request timeout). At least
    /// `max_frame_bytes`.
    pub max_in_flight_bytes: u64,
    /// QUIC requests run at once for one connection; past it, that connection's requests are
    /// not read until earlier ones finish (QUIC flow control holds the sender).
    pub max_requests_per_connection: u32,
    /// QUIC requests run at once over all connections of one listener; past it, no request
    /// is read until one finishes.
    pub max_in_flight_requests: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_value_bytes: 8 * 1024 * 1024,
            max_siblings: 100,
            max_object_bytes: 32 * 1024 * 1024,
            max_merged_object_bytes: 48 * 1024 * 1024,
            max_frame_bytes: 64 * 1024 * 1024,
            max_client_connections: 1024,
            max_peer_connections: 256,
            http_concurrency: 512,
            max_http_connections: 1024,
            max_in_flight_bytes: 64 * 1024 * 1024,
            max_requests_per_connection: 1024,
            max_in_flight_requests: 4096,
        }
    }
}

/// Hinted handoff. A fallback keeps every hint until its primary has it durably; hints are
/// never dropped for age. `hint_window_secs` (top level) stops *new* hints for a primary
/// silent longer than it (Cassandra's `max_hint_window`), and `max_bytes` bounds the disk
/// the hints of a node take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HintsConfig {
    /// Most bytes of hints a node keeps; past it, writes that would need a new or larger hint
    /// on this node are refused with an error naming this limit.
    pub max_bytes: u64,
}

impl Default for HintsConfig {
    fn default() -> Self {
        HintsConfig {
            max_bytes: 1024 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AaeConfig {
    /// Keep a tictac tree per partition (every write updates it) and exchange them with the
    /// other primaries, repairing what differs, so a replica that missed a write while it
    /// was up (a timeout, a lost message) catches up without a read asking it.
    pub enabled: bool,
    /// One exchange per interval (jittered by up to a quarter): the next partition this node
    /// is a primary of, with each other primary of it in turn.
    pub exchange_interval_ms: u64,
    /// Most keys one exchange repairs; the rest wait for the partition's next exchange.
    pub max_repairs_per_exchange: u32,
    /// Each tree is rebuilt from a scan this often (trees are also built at every start).
    pub rebuild_interval_secs: u64,
}

impl Default for AaeConfig {
    fn default() -> Self {
        AaeConfig {
            enabled: true,
            exchange_interval_ms: 1000,
            max_repairs_per_exchange: 1000,
            rebuild_interval_secs: 24 * 3600,
        }
    }
}

/// Whether tombstones are reaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TombstoneMode {
    /// Removed once it is safe (see [`TombstonesConfig`]).
    Reap,
    /// Kept forever: always safe, but a deleted key's tombstone is never freed.
    Keep,
}

/// A delete writes a tombstone. With `mode = "reap"`, the first primary of a partition
/// removes a tombstone from every primary once all of these hold: `grace_secs` (or the
/// bucket's `tombstone_grace_secs`) have passed since the delete; every member is up and
/// holds the same ring, with no change pending; no member reports a hint for the partition;
/// every primary holds the identical tombstone, durably; no operation that began before that
/// is still in flight on any member. Each primary removes its copy only
/// if it is still that tombstone. Reaping runs after the partition's anti-entropy exchange,
/// so it needs `aae.enabled`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TombstonesConfig {
    pub mode: TombstoneMode,
    /// Least time a tombstone is kept; more than `hint_window_secs`, so that a primary that
    /// was silent got its hints or was given up on before its tombstones go.
    pub grace_secs: u64,
    /// Most tombstones one pass over a partition reaps.
    pub max_reaps_per_pass: u32,
}

impl Default for TombstonesConfig {
    fn default() -> Self {
        TombstonesConfig {
            mode: TombstoneMode::Reap,
            grace_secs: 4 * 3600,
            max_reaps_per_pass: 1000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// fsync the write-ahead journal before acknowledging a write (one fsync per batch).
    pub sync_writes: bool,
    /// Block cache size.
    pub cache_mib: u64,
    /// Free space the data directory's filesystem must keep: below it, writes are refused
    /// ("insufficient space", HTTP 507) and reads go on; checked every second, so writes
    /// resume by themselves when space returns.
    pub min_free_mib: u64,
    /// Memory for writes not yet flushed to disk, over all partitions: each partition's
    /// memtable is flushed once it holds its share (this divided by `partition_count`, at
    /// least 1 MiB). A memtable being flushed is still in memory while the next fills, so
    /// memtables take up to twice this.
    pub write_buffer_mib: u64,
    /// Slots of the row cache in front of fjall: the latest record of recently written keys
    /// (key and record at most 1 KiB together), so a get or a read-before-write of a hot key
    /// skips fjall's memtable and index lookups. Direct-mapped, so its memory stays under
    /// `slots × 1 KiB`. 0 turns it off.
    pub row_cache_slots: u64,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            sync_writes: true,
            cache_mib: 64,
            min_free_mib: 256,
            write_buffer_mib: 256,
            row_cache_slots: 16384,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "n1".into(),
            data_dir: PathBuf::from("dynkv-data"),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 8710)),
            client_listen: SocketAddr::from(([127, 0, 0, 1], 8700)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8098)),
            pb_listen: SocketAddr::from(([127, 0, 0, 1], 8087)),
            pb_tls: false,
            http_tls: false,
            http_token: None,
            client_token: None,
            partition_count: 64,
            request_timeout_ms: 5000,
            gossip_interval_ms: 500,
            gossip_fanout: 3,
            phi_threshold: 8.0,
            hint_window_secs: 3 * 60 * 60,
            handoff_interval_ms: 1000,
            transfer_limit: 2,
            transfer_max_bytes_per_sec: 0,
            read_repair_chance: 0.1,
            speculative_retry_ms: 50,
            worker_threads: 0,
            members: Vec::new(),
            tls: TlsConfig::default(),
            buckets: BucketConfig::default(),
            limits: LimitsConfig::default(),
            hints: HintsConfig::default(),
            storage: StorageSettings::default(),
            aae: AaeConfig::default(),
            tombstones: TombstonesConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config field `{field}` is invalid: {reason}")]
    Invalid { field: String, reason: String },
}

/// The most row cache slots (`storage.row_cache_slots`): 4 GiB of records at most.
pub const MAX_ROW_CACHE_SLOTS: u64 = 1 << 22;

/// The most handoffs one node may send at once (`transfer_limit`).
pub const MAX_TRANSFER_LIMIT: u32 = 64;

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Settings derived from a validated [`Config`], in the types the node uses.
#[derive(Clone, Debug)]
pub struct Validated {
    pub node_id: NodeId,
    pub members: Vec<(NodeId, SocketAddr)>,
    pub bucket_defaults: BucketDefaults,
}

impl Config {
    /// Each partition's memtable size: its share of `storage.write_buffer_mib`, at least 1 MiB.
    pub fn memtable_bytes(&self) -> u64 {
        (self.storage.write_buffer_mib * 1024 * 1024 / u64::from(self.partition_count.max(1)))
            .max(1024 * 1024)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|error| format!("# cannot render config: {error}"))
    }

    /// Checks every field and converts the ones the node uses in typed form.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        let node_id = NodeId::new(self.node_id.clone())
            .map_err(|error| invalid("node_id", error.to_string()))?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if !self.partition_count.is_power_of_two() || !(8..=4096).contains(&self.partition_count) {
            return Err(invalid(
                "partition_count",
                format!(
                    "{} is not a power of two between 8 and 4096",
                    self.partition_count
                ),
            ));
        }
        if self.request_timeout_ms == 0 || self.request_timeout_ms > 600_000 {
            return Err(invalid(
                "request_timeout_ms",
                "must be between 1 and 600000",
            ));
        }
        let mut members = Vec::with_capacity(self.members.len());
        for (index, member) in self.members.iter().enumerate() {
            let id = NodeId::new(member.id.clone())
                .map_err(|error| invalid(&format!("members[{index}].id"), error.to_string()))?;
            if members.iter().any(|(existing, _)| existing == &id) {
                return Err(invalid(
                    &format!("members[{index}].id"),
                    format!("{id} is listed twice"),
                ));
            }
            members.push((id, member.peer_addr));
        }
        if !(10..=60_000).contains(&self.gossip_interval_ms) {
            return Err(invalid(
                "gossip_interval_ms",
                "must be between 10 and 60000",
            ));
        }
        if !(1..=16).contains(&self.gossip_fanout) {
            return Err(invalid("gossip_fanout", "must be between 1 and 16"));
        }
        if !(self.phi_threshold.is_finite()
            && self.phi_threshold >= 1.0
            && self.phi_threshold <= 100.0)
        {
            return Err(invalid("phi_threshold", "must be between 1 and 100"));
        }
        if self.hint_window_secs == 0 {
            return Err(invalid("hint_window_secs", "must be at least 1"));
        }
        if self.hints.max_bytes < 1024 * 1024 {
            return Err(invalid(
                "hints.max_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if !(10..=600_000).contains(&self.handoff_interval_ms) {
            return Err(invalid(
                "handoff_interval_ms",
                "must be between 10 and 600000",
            ));
        }
        if self.transfer_limit > MAX_TRANSFER_LIMIT {
            return Err(invalid(
                "transfer_limit",
                format!("must be at most {MAX_TRANSFER_LIMIT}"),
            ));
        }
        if !(self.read_repair_chance.is_finite() && (0.0..=1.0).contains(&self.read_repair_chance))
        {
            return Err(invalid("read_repair_chance", "must be between 0 and 1"));
        }
        if !(10..=3_600_000).contains(&self.aae.exchange_interval_ms) {
            return Err(invalid(
                "aae.exchange_interval_ms",
                "must be between 10 and 3600000",
            ));
        }
        if !(1..=100_000).contains(&self.aae.max_repairs_per_exchange) {
            return Err(invalid(
                "aae.max_repairs_per_exchange",
                "must be between 1 and 100000",
            ));
        }
        if self.aae.rebuild_interval_secs < 60 {
            return Err(invalid("aae.rebuild_interval_secs", "must be at least 60"));
        }
        if self.tombstones.mode == TombstoneMode::Reap
            && self.tombstones.grace_secs <= self.hint_window_secs
        {
            return Err(invalid(
                "tombstones.grace_secs",
                format!(
                    "is {} but must be more than hint_window_secs ({}), or set tombstones.mode = \"keep\"",
                    self.tombstones.grace_secs, self.hint_window_secs
                ),
            ));
        }
        if self.tombstones.grace_secs > crate::server::node::MAX_TOMBSTONE_GRACE_SECS {
            return Err(invalid(
                "tombstones.grace_secs",
                "must be at most 316224000 (10 years)",
            ));
        }
        if !(1..=100_000).contains(&self.tombstones.max_reaps_per_pass) {
            return Err(invalid(
                "tombstones.max_reaps_per_pass",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=600_000).contains(&self.speculative_retry_ms) {
            return Err(invalid(
                "speculative_retry_ms",
                "must be between 1 and 600000",
            ));
        }
        if self.worker_threads > 1024 {
            return Err(invalid(
                "worker_threads",
                "must be at most 1024 (0: one per core)",
            ));
        }
        for (field, path) in [
            ("tls.ca_cert", &self.tls.ca_cert),
            ("tls.node_cert", &self.tls.node_cert),
            ("tls.node_key", &self.tls.node_key),
        ] {
            if path.as_os_str().is_empty() {
                return Err(invalid(field, "is required (create one with `dynkv cert`)"));
            }
        }
        for (field, token) in [
            ("http_token", &self.http_token),
            ("client_token", &self.client_token),
        ] {
            if let Some(token) = token
                && (token.is_empty()
                    || token.len() > 256
                    || !token.bytes().all(|byte| byte.is_ascii_graphic()))
            {
                return Err(invalid(
                    field,
                    "must be 1 to 256 printable ASCII characters without spaces",
                ));
            }
        }
        for (field, value) in [
            (
                "limits.max_client_connections",
                self.limits.max_client_connections,
            ),
            (
                "limits.max_peer_connections",
                self.limits.max_peer_connections,
            ),
            ("limits.http_concurrency", self.limits.http_concurrency),
            (
                "limits.max_requests_per_connection",
                self.limits.max_requests_per_connection,
            ),
            (
                "limits.max_in_flight_requests",
                self.limits.max_in_flight_requests,
            ),
            (
                "limits.max_http_connections",
                self.limits.max_http_connections,
            ),
        ] {
            if !(1..=1_000_000).contains(&value) {
                return Err(invalid(field, "must be between 1 and 1000000"));
            }
        }
        if self.limits.max_in_flight_bytes < u64::from(self.limits.max_frame_bytes) {
            return Err(invalid(
                "limits.max_in_flight_bytes",
                "must be at least limits.max_frame_bytes",
            ));
        }
        let buckets = &self.buckets;
        if !(1..=16).contains(&buckets.n_val) {
            return Err(invalid(
                "buckets.n_val",
                format!("{} is not between 1 and 16", buckets.n_val),
            ));
        }
        let parse = |field: &str, text: &str| -> Result<Quorum, ConfigError> {
            text.parse::<Quorum>()
                .map_err(|error| invalid(field, error.to_string()))
        };
        let bucket_defaults = BucketDefaults {
            n_val: buckets.n_val,
            r: parse("buckets.r", &buckets.r)?,
            w: parse("buckets.w", &buckets.w)?,
            dw: parse("buckets.dw", &buckets.dw)?,
            pr: parse("buckets.pr", &buckets.pr)?,
            pw: parse("buckets.pw", &buckets.pw)?,
        };
        // Resolving the defaults once proves every request that says `default` can resolve.
        crate::core::quorum::ReadQuorum::resolve(
            Quorum::Default,
            Quorum::Default,
            &bucket_defaults,
        )
        .map_err(|error| invalid(&format!("buckets.{}", error.field), error.to_string()))?;
        crate::core::quorum::WriteQuorum::resolve(
            Quorum::Default,
            Quorum::Default,
            Quorum::Default,
            &bucket_defaults,
        )
        .map_err(|error| invalid(&format!("buckets.{}", error.field), error.to_string()))?;
        let limits = &self.limits;
        if limits.max_value_bytes == 0 || limits.max_value_bytes > limits.max_object_bytes {
            return Err(invalid(
                "limits.max_value_bytes",
                "must be between 1 and limits.max_object_bytes",
            ));
        }
        if limits.max_merged_object_bytes < limits.max_object_bytes {
            return Err(invalid(
                "limits.max_merged_object_bytes",
                "must be at least limits.max_object_bytes",
            ));
        }
        if limits.max_merged_object_bytes + 1024 * 1024 > u64::from(limits.max_frame_bytes) {
            return Err(invalid(
                "limits.max_frame_bytes",
                "must exceed limits.max_merged_object_bytes by at least 1 MiB, so a full object fits a frame",
            ));
        }
        if self.storage.row_cache_slots > MAX_ROW_CACHE_SLOTS {
            return Err(invalid(
                "storage.row_cache_slots",
                format!("must be at most {MAX_ROW_CACHE_SLOTS} (each slot may hold 1 KiB)"),
            ));
        }
        if self.storage.write_buffer_mib == 0 {
            return Err(invalid("storage.write_buffer_mib", "must be at least 1"));
        }
        if limits.max_siblings == 0 {
            return Err(invalid("limits.max_siblings", "must be at least 1"));
        }
        Ok(Validated {
            node_id,
            members,
            bucket_defaults,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            tls: TlsConfig {
                ca_cert: "ca.pem".into(),
                node_cert: "n1.pem".into(),
                node_key: "n1.key".into(),
            },
            ..Config::default()
        }
    }

    fn field_of(config: &Config) -> String {
        match config.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn defaults_validate_and_round_trip_through_toml() {
        let config = valid();
        let validated = config.validate().unwrap();
        assert!(validated.members.is_empty(), "no seeds: a lone node");
        let parsed: Config = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(parsed, config);
    }

    #[test]
    fn bad_fields_are_named() {
        let mut config = valid();
        config.partition_count = 100;
        assert_eq!(field_of(&config), "partition_count");
        let mut config = valid();
        config.buckets.r = "most".into();
        assert_eq!(field_of(&config), "buckets.r");
        let mut config = valid();
        config.buckets.w = "5".into();
        assert_eq!(field_of(&config), "buckets.w");
        let mut config = valid();
        config.node_id = "Bad Name".into();
        assert_eq!(field_of(&config), "node_id");
        let mut config = valid();
        config.tls.node_key = PathBuf::new();
        assert_eq!(field_of(&config), "tls.node_key");
        let mut config = valid();
        config.phi_threshold = f64::NAN;
        assert_eq!(field_of(&config), "phi_threshold");
        let mut config = valid();
        config.members = vec![
            MemberConfig {
                id: "n2".into(),
                peer_addr: "127.0.0.1:1".parse().unwrap(),
            },
            MemberConfig {
                id: "n2".into(),
                peer_addr: "127.0.0.1:2".parse().unwrap(),
            },
        ];
        assert_eq!(field_of(&config), "members[1].id");
        // A grace period no longer than the hint window could reap a tombstone while a
        // silent primary's hints are still coming; with tombstones kept it does not matter.
        let mut config = valid();
        config.tombstones.mode = TombstoneMode::Reap;
        config.tombstones.grace_secs = config.hint_window_secs;
        assert_eq!(field_of(&config), "tombstones.grace_secs");
        config.tombstones.mode = TombstoneMode::Keep;
        assert!(config.validate().is_ok());
        let mut config = valid();
        config.tombstones.max_reaps_per_pass = 0;
        assert_eq!(field_of(&config), "tombstones.max_reaps_per_pass");
        let parsed: Config =
            toml::from_str("[tombstones]\nmode = \"keep\"\ngrace_secs = 20000\n").unwrap();
        assert_eq!(parsed.tombstones.mode, TombstoneMode::Keep);
        assert_eq!(Config::default().tombstones.mode, TombstoneMode::Reap);
        assert!(toml::from_str::<Config>("[tombstones]\nmode = \"never\"\n").is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let error = toml::from_str::<Config>("node_idd = \"x\"").unwrap_err();
        assert!(error.to_string().contains("node_idd"), "{error}");
    }
}

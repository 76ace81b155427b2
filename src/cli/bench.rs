//! `dynkv bench` and `dynkv bench compare`: closed-loop YCSB-style load against a cluster (a
//! running one, the dev cluster, or one started here with `--local N`), reported as HDR
//! percentiles per operation, errors by kind and JSON; and the consistency comparison of
//! several W/R configurations on the same cluster and data, with measured staleness.
//!
//! Every phase can be read against the ceiling: the same workers sending the no-op `Ping`
//! through the same client path and transport for the same duration or count.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use dynkv::bench::keys::{DEFAULT_ZIPFIAN_THETA, KeyChooser, record_key};
use dynkv::bench::report::{
    CompareReport, ConfigReport, PhaseReport, Recorder, RunReport, RunSettings,
};
use dynkv::bench::staleness::{PROBE_GAPS_MICROS, StalenessTally};
use dynkv::bench::svg::compare_chart;
use dynkv::bench::workload::{Operation, Workload};
use dynkv::client::{Client, ClientConfig, ClientLibError};
use dynkv::core::quorum::Quorum;
use dynkv::protocol::{GetOptions, NewContent, PutOptions};
use parking_lot::Mutex;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Run the same workload under several W/R configurations on the same cluster and data;
    /// print a table, write an SVG chart, and measure stale reads by write-to-read gap.
    Compare(CompareArgs),
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Configurations as W/R pairs, comma separated (one, quorum, all or a number). The
    /// default adds W=1/R=1, the partial quorum whose staleness PBS predicts, to the three
    /// strict ones.
    #[arg(long, default_value = "one/all,quorum/quorum,all/one,one/one")]
    configs: String,
    /// Staleness probes per configuration, each a writer and a reader on different nodes,
    /// running beside the workload.
    #[arg(long, default_value_t = 4)]
    probes: usize,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "bench-compare.svg")]
    svg_out: PathBuf,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Client address of a node; repeat for several (workers are spread over them)
    /// [default: every node of the dev cluster].
    #[arg(long = "node")]
    nodes: Vec<SocketAddr>,
    /// Cluster CA certificate [default: the dev cluster's].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Directory of the dev cluster to reach [default: $DYNKV_DEV_DIR or ~/.local/share/dynkv/dev].
    #[arg(long)]
    dev_dir: Option<PathBuf>,
    /// Client token of nodes that require one (their `client_token`).
    #[arg(long, env = "DYNKV_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Start a fresh N-node `dynkv dev` cluster in a temporary directory for this run.
    #[arg(long, value_name = "N")]
    local: Option<u16>,
    /// Base port of the `--local` cluster (clients on BASE.., peers on BASE+100..).
    #[arg(long, default_value_t = 27100)]
    local_base_port: u16,
    /// Start the `--local` cluster with active anti-entropy off (`dynkv dev --no-aae`), to
    /// measure what it costs against a run with it on.
    #[arg(long)]
    local_no_aae: bool,
    /// The API the workload and its ceiling run over: `native` (QUIC) or `pb` (Riak's
    /// Protocol Buffers API, one connection per worker, to each node's PB address in the dev
    /// cluster's cluster.toml or `--pb-node`). The preload always writes over `native`.
    #[arg(long, default_value = "native")]
    protocol: BenchProtocol,
    /// A node's Protocol Buffers address for `--protocol pb`; repeat for several [default:
    /// every node of the dev cluster].
    #[arg(long = "pb-node")]
    pb_nodes: Vec<SocketAddr>,
    /// a (50% read), b (95% read), c (read only), w (write only) or read=PERCENT.
    #[arg(long, default_value = "a")]
    workload: Workload,
    /// How keys are chosen.
    #[arg(long, value_enum, default_value_t = KeyDistribution::Zipfian)]
    keys: KeyDistribution,
    /// Skew of the zipfian distribution, in (0, 1).
    #[arg(long, default_value_t = DEFAULT_ZIPFIAN_THETA)]
    zipf_theta: f64,
    /// Records written before the run; operations choose among them.
    #[arg(long, default_value_t = 10_000)]
    records: u64,
    /// Do not write the records first (they exist from an earlier run).
    #[arg(long)]
    no_preload: bool,
    /// Size of every written value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Concurrent closed-loop workers (each keeps one request in flight).
    #[arg(long, default_value_t = 50)]
    workers: usize,
    /// Length of the run (of each configuration in compare), in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Stop after this many operations instead of a duration.
    #[arg(long)]
    operations: Option<u64>,
    /// Replies needed by reads: one, quorum, all, default or a number.
    #[arg(long, default_value = "default")]
    r: Quorum,
    /// Acknowledgements needed by writes.
    #[arg(long, default_value = "default")]
    w: Quorum,
    /// Durable acknowledgements needed by writes [default: the same as --w]. With fsync on
    /// every acknowledgement is durable, and a node's default dw (quorum) would otherwise
    /// raise --w one to two acknowledgements.
    #[arg(long)]
    dw: Option<Quorum>,
    /// Per-request timeout in milliseconds [default: the node's].
    #[arg(long)]
    timeout_ms: Option<u64>,
    #[arg(long, default_value = "bench")]
    bucket: String,
    /// Seed of the key and operation choices (worker i uses seed + i).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the no-op ceiling phase.
    #[arg(long)]
    no_ceiling: bool,
    /// Write without the causal context of the key's last read or write; with allow_mult
    /// every such write adds a sibling.
    #[arg(long)]
    blind_writes: bool,
    /// Most records whose causal context the client keeps for their next update (a
    /// direct-mapped cache, so the client's memory does not grow with --records). An update
    /// of a record whose context was evicted writes without one, like --blind-writes.
    #[arg(long, default_value_t = 1_000_000)]
    context_cache_records: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum KeyDistribution {
    Uniform,
    Zipfian,
}

pub async fn run(args: Box<BenchArgs>) -> Result<()> {
    match args.command {
        None => run_workload(args.run).await,
        Some(BenchCommand::Compare(compare)) => run_compare(compare).await,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BenchProtocol {
    Native,
    Pb,
}

/// A `dynkv dev` child started by `--local`; stopped (SIGTERM) and removed on drop.
struct LocalCluster {
    child: std::process::Child,
    dir: PathBuf,
}

impl LocalCluster {
    fn start(nodes: u16, base_port: u16, no_aae: bool) -> Result<LocalCluster> {
        let dir = std::env::temp_dir().join(format!("dynkv-bench-{}", std::process::id()));
        let executable = std::env::current_exe().context("cannot find the dynkv executable")?;
        let mut child = std::process::Command::new(executable)
            .args(["dev", "--fresh", "--nodes", &nodes.to_string()])
            .args(["--base-port", &base_port.to_string()])
            .args(no_aae.then_some("--no-aae"))
            .arg("--dir")
            .arg(&dir)
            // The nodes' logs go to their files; keep dev's own info lines off the report.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot start `dynkv dev`")?;
        let stdout = child.stdout.take().context("dev stdout")?;
        let cluster = LocalCluster { child, dir };
        let mut lines = BufReader::new(stdout).lines();
        let mut up = false;
        for line in lines.by_ref() {
            if line
                .context("reading `dynkv dev` output")?
                .contains("nodes up")
            {
                up = true;
                break;
            }
        }
        if !up {
            bail!(
                "`dynkv dev` stopped before its nodes were up (logs in {})",
                cluster.dir.display()
            );
        }
        // Keep draining so dev never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(cluster)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the child we spawned and still own; no memory is touched.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One client per node, so workers enter the cluster through every node.
/// The clients, and whether some node could not be reached.
async fn connect(args: &RunArgs, dev_dir: Option<&Path>) -> Result<(Vec<Client>, bool)> {
    let dev_dir = dev_dir
        .map(Path::to_path_buf)
        .or_else(|| args.dev_dir.clone());
    let (nodes, ca_pem) =
        super::client::cluster_endpoints(&args.nodes, args.ca.as_deref(), dev_dir.as_deref())?;
    // A node that is down is skipped (benchmarking a degraded cluster is a use), but not all.
    let mut clients = Vec::new();
    let mut unreachable = Vec::new();
    for node in nodes {
        let mut config = ClientConfig::new(vec![node], ca_pem.clone());
        config.token = args.token.clone();
        match Client::connect(config).await {
            Ok(client) => clients.push(client),
            Err(error) => {
                eprintln!("dynkv bench: skipping {node}: {error}");
                unreachable.push(format!("{node}: {error}"));
            }
        }
    }
    if clients.is_empty() {
        anyhow::bail!("no node could be reached: {}", unreachable.join("; "));
    }
    Ok((clients, !unreachable.is_empty()))
}

/// One shard's slots: the record each slot holds, with its context.
type ContextSlots = Vec<Option<(u64, Vec<u8>)>>;

/// The latest causal context seen per record, so that updates supersede what the key holds
/// instead of piling up siblings (a client reading before writing does the same).
struct Contexts {
    shards: Vec<Mutex<ContextSlots>>,
    slots_per_shard: u64,
}

/// Shards of the context cache, so that workers seldom wait on one another's lock.
const CONTEXT_SHARDS: u64 = 64;

impl Contexts {
    /// A direct-mapped cache of at most `records` contexts: a record's slot is fixed, and a
    /// newer record mapped to it evicts the older. Its memory is bounded whatever the number
    /// of records, so a run over 10 million records costs the client no more than one over
    /// one million.
    fn new(records: u64) -> Self {
        let slots_per_shard = records.div_ceil(CONTEXT_SHARDS).max(1);
        Contexts {
            shards: (0..CONTEXT_SHARDS)
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            slots_per_shard,
        }
    }

    fn slot(&self, record: u64) -> (&Mutex<ContextSlots>, usize) {
        let shard = &self.shards[(record % CONTEXT_SHARDS) as usize];
        let index = (record / CONTEXT_SHARDS) % self.slots_per_shard;
        (shard, index as usize)
    }

    fn get(&self, record: u64) -> Option<Vec<u8>> {
        let (shard, index) = self.slot(record);
        match shard.lock().get(index) {
            Some(Some((cached, context))) if *cached == record => Some(context.clone()),
            _ => None,
        }
    }

    fn set(&self, record: u64, context: Vec<u8>) {
        let (shard, index) = self.slot(record);
        let mut slots = shard.lock();
        if slots.len() <= index {
            // Slots are made as records reach them, so a small run allocates little.
            slots.resize(index + 1, None);
        }
        slots[index] = Some((record, context));
    }
}

/// What every request of a phase shares.
struct Plan {
    mix: Mix,
    keys: KeyChooser,
    bucket: Vec<u8>,
    value: Vec<u8>,
    read_options: GetOptions,
    write_options: PutOptions,
    contexts: Option<Contexts>,
}

#[derive(Clone, Copy)]
enum Mix {
    Workload(Workload),
    /// Record `i` written once each, in order (the preload).
    Preload,
    Ping,
}

#[derive(Clone, Copy)]
enum Limit {
    Duration(Duration),
    Operations(u64),
}

impl RunArgs {
    fn limit(&self) -> Limit {
        match self.operations {
            Some(operations) => Limit::Operations(operations),
            None => Limit::Duration(Duration::from_secs_f64(self.duration_secs.max(0.001))),
        }
    }

    fn plan(&self, mix: Mix, r: Quorum, w: Quorum) -> Plan {
        let keys = match self.keys {
            KeyDistribution::Uniform => KeyChooser::uniform(self.records),
            KeyDistribution::Zipfian => KeyChooser::zipfian(self.records, self.zipf_theta),
        };
        Plan {
            mix,
            keys,
            bucket: self.bucket.clone().into_bytes(),
            value: vec![b'x'; self.value_bytes],
            read_options: GetOptions {
                r,
                timeout_ms: self.timeout_ms,
                ..Default::default()
            },
            write_options: PutOptions {
                w,
                dw: self.dw.unwrap_or(w),
                timeout_ms: self.timeout_ms,
                ..Default::default()
            },
            // The preload writes each record once: it has no later update to give a context to.
            contexts: (!self.blind_writes && !matches!(mix, Mix::Preload))
                .then(|| Contexts::new(self.context_cache_records)),
        }
    }

    fn settings(&self, clients: &[Client], r: &str, w: &str) -> RunSettings {
        RunSettings {
            workload: self.workload.to_string(),
            key_distribution: match self.keys {
                KeyDistribution::Uniform => "uniform".into(),
                KeyDistribution::Zipfian => format!("zipfian(theta={})", self.zipf_theta),
            },
            records: self.records,
            value_bytes: self.value_bytes,
            workers: self.workers,
            r: r.to_string(),
            w: w.to_string(),
            duration_secs: self.operations.is_none().then_some(self.duration_secs),
            operations: self.operations,
            seed: self.seed,
            nodes: clients
                .iter()
                .filter_map(Client::connected_node)
                .map(|address| address.to_string())
                .collect(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        if self.records == 0 {
            bail!("--records must be at least 1");
        }
        if self.zipf_theta.is_nan() || self.zipf_theta <= 0.0 || self.zipf_theta >= 1.0 {
            bail!("--zipf-theta must be between 0 and 1 (exclusive)");
        }
        if self.duration_secs.is_nan() || self.duration_secs <= 0.0 {
            bail!("--duration-secs must be positive");
        }
        Ok(())
    }
}

/// The kind of a failed request, as a short snake_case name (e.g. `quorum_unmet`).
fn error_kind(error: &ClientLibError) -> String {
    let debug = match error {
        ClientLibError::Server(error) => format!("{:?}", error.kind),
        other => format!("{other:?}"),
    };
    let name: String = debug
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let mut snake = String::new();
    for (index, character) in name.chars().enumerate() {
        if character.is_ascii_uppercase() && index > 0 {
            snake.push('_');
        }
        snake.push(character.to_ascii_lowercase());
    }
    snake
}

async fn execute(
    client: &Client,
    plan: &Plan,
    operation: Operation,
    record: u64,
) -> Result<(), ClientLibError> {
    match operation {
        Operation::Ping => client.ping().await.map(|_| ()),
        Operation::Read => {
            let key = record_key(record);
            let result = client
                .get(&plan.bucket, &key, plan.read_options.clone())
                .await?;
            if let (Some(contexts), Some(context)) = (&plan.contexts, result.context) {
                contexts.set(record, context);
            }
            Ok(())
        }
        Operation::Update => {
            let key = record_key(record);
            let context = plan.contexts.as_ref().and_then(|c| c.get(record));
            let content = NewContent {
                value: plan.value.clone(),
                ..Default::default()
            };
            let result = client
                .put(
                    &plan.bucket,
                    &key,
                    context.as_deref(),
                    content,
                    plan.write_options.clone(),
                )
                .await?;
            if let Some(contexts) = &plan.contexts {
                contexts.set(record, result.context);
            }
            Ok(())
        }
    }
}

/// What a Protocol Buffers failure counts as.
fn pb_error_kind(error: &dynkv::pb::client::PbClientError) -> String {
    use dynkv::pb::client::PbClientError;
    match error {
        PbClientError::Io(_) => "connection",
        PbClientError::Refused(_) => "refused",
        PbClientError::Unexpected { .. }
        | PbClientError::TooLarge(_)
        | PbClientError::Undecodable(_) => "protocol",
    }
    .to_string()
}

/// [`execute`] over Riak's Protocol Buffers API.
async fn execute_pb(
    pb: &mut dynkv::pb::client::PbClient,
    plan: &Plan,
    operation: Operation,
    record: u64,
) -> Result<(), dynkv::pb::client::PbClientError> {
    match operation {
        Operation::Ping => pb.ping().await,
        Operation::Read => {
            let key = record_key(record);
            let vclock = pb.get(&plan.bucket, &key, plan.read_options.r).await?;
            if let (Some(contexts), Some(vclock)) = (&plan.contexts, vclock) {
                contexts.set(record, vclock);
            }
            Ok(())
        }
        Operation::Update => {
            let key = record_key(record);
            let context = plan.contexts.as_ref().and_then(|c| c.get(record));
            let vclock = pb
                .put(
                    &plan.bucket,
                    &key,
                    context,
                    plan.value.clone(),
                    plan.write_options.w,
                    plan.write_options.dw,
                )
                .await?;
            if let (Some(contexts), Some(vclock)) = (&plan.contexts, vclock) {
                contexts.set(record, vclock);
            }
            Ok(())
        }
    }
}

/// Runs `workers` closed-loop workers until the limit; prints a live progress line on a
/// terminal. Returns what they measured and how long it took.
async fn run_phase(
    name: &str,
    clients: &[Client],
    pb_nodes: &[SocketAddr],
    workers: usize,
    plan: Arc<Plan>,
    limit: Limit,
    seed: u64,
) -> Result<PhaseReport> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let claimed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = match limit {
        Limit::Duration(duration) => Some(started + duration),
        Limit::Operations(_) => None,
    };
    let budget = match limit {
        Limit::Operations(operations) => operations,
        Limit::Duration(_) => u64::MAX,
    };
    let progress = spawn_progress(name.to_string(), done.clone(), failed.clone(), limit);
    let mut tasks = Vec::with_capacity(workers);
    for worker in 0..workers {
        let client = clients[worker % clients.len()].clone();
        // Over Protocol Buffers each worker has its own connection, as Riak clients do.
        let mut pb = match pb_nodes.get(worker % pb_nodes.len().max(1)) {
            Some(address) => Some(
                dynkv::pb::client::PbClient::connect(*address)
                    .await
                    .with_context(|| format!("cannot connect to {address} (Protocol Buffers)"))?,
            ),
            None => None,
        };
        let plan = plan.clone();
        let (done, failed, claimed) = (done.clone(), failed.clone(), claimed.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(worker as u64));
            let mut recorder = Recorder::new();
            loop {
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    break;
                }
                let ticket = claimed.fetch_add(1, Ordering::Relaxed);
                if ticket >= budget {
                    break;
                }
                let (operation, record) = match plan.mix {
                    Mix::Workload(workload) => {
                        (workload.choose(&mut rng), plan.keys.next(&mut rng))
                    }
                    Mix::Preload => (Operation::Update, ticket),
                    Mix::Ping => (Operation::Ping, 0),
                };
                let begun = Instant::now();
                let outcome = match &mut pb {
                    Some(pb) => execute_pb(pb, &plan, operation, record)
                        .await
                        .map_err(|error| pb_error_kind(&error)),
                    None => execute(&client, &plan, operation, record)
                        .await
                        .map_err(|error| error_kind(&error)),
                };
                match outcome {
                    Ok(()) => recorder.record(operation, begun.elapsed()),
                    Err(kind) => {
                        recorder.error(&kind);
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            recorder
        }));
    }
    let mut recorder = Recorder::new();
    for task in tasks {
        recorder.merge(&task.await.context("a bench worker panicked")?);
    }
    let elapsed = started.elapsed();
    progress.finish();
    Ok(PhaseReport::new(&recorder, elapsed))
}

struct Progress {
    stop: Arc<AtomicBool>,
    active: bool,
}

impl Progress {
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.active {
            eprint!("\r{:79}\r", "");
        }
    }
}

/// A `\r` line on stderr, twice a second, only when stderr is a terminal.
fn spawn_progress(
    name: String,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    limit: Limit,
) -> Progress {
    let stop = Arc::new(AtomicBool::new(false));
    let active = std::io::stderr().is_terminal();
    if active {
        let stop = stop.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut last = (Instant::now(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let now = Instant::now();
                let count = done.load(Ordering::Relaxed);
                let rate = (count - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-6);
                last = (now, count);
                let total = match limit {
                    Limit::Duration(duration) => format!("/{:.0} s", duration.as_secs_f64()),
                    Limit::Operations(operations) => format!(" ({count}/{operations} ops)"),
                };
                eprint!(
                    "\r{name}: {:.1}{total}  {count} ops  {rate:.0} ops/s  errors {}   ",
                    started.elapsed().as_secs_f64(),
                    failed.load(Ordering::Relaxed)
                );
                let _ = std::io::stderr().flush();
            }
        });
    }
    Progress { stop, active }
}

async fn preload(args: &RunArgs, clients: &[Client], degraded: bool) -> Result<()> {
    if args.no_preload {
        return Ok(());
    }
    // Every replica gets every record, so reads find them whatever their r; with a node
    // down, w=all could only time out, so a quorum must do.
    let level = if degraded {
        eprintln!("dynkv bench: a node is unreachable, so the preload writes at w=quorum");
        Quorum::Quorum
    } else {
        Quorum::All
    };
    let plan = Arc::new(args.plan(Mix::Preload, Quorum::Default, level));
    let report = run_phase(
        "preload",
        clients,
        &[],
        args.workers,
        plan,
        Limit::Operations(args.records),
        args.seed,
    )
    .await?;
    eprintln!(
        "preloaded {} records in {:.2} s ({} errors)",
        report.operations, report.elapsed_secs, report.errors.total
    );
    Ok(())
}

async fn ceiling(
    args: &RunArgs,
    clients: &[Client],
    pb_nodes: &[SocketAddr],
) -> Result<Option<PhaseReport>> {
    if args.no_ceiling {
        return Ok(None);
    }
    let plan = Arc::new(args.plan(Mix::Ping, Quorum::Default, Quorum::Default));
    let report = run_phase(
        "ceiling (ping)",
        clients,
        pb_nodes,
        args.workers,
        plan,
        args.limit(),
        args.seed,
    )
    .await?;
    Ok(Some(report))
}

/// The pids of a dev cluster's nodes, from the `nN/pid` files `dynkv dev` writes.
fn node_pids(dev_dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(dev_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("pid")).ok())
        .filter_map(|text| text.trim().parse().ok())
        .collect()
}

/// CPU ticks of the node processes and of this client at one moment (Linux `/proc`).
struct CpuSample {
    node_pids: Vec<u32>,
    node_ticks: u64,
    client_ticks: u64,
}

impl CpuSample {
    fn ticks(pid: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        dynkv::bench::cpu::cpu_ticks_of_stat(&text)
    }

    /// `None` where `/proc` cannot be read (not Linux): the report then has no CPU figures.
    fn take(node_pids: &[u32]) -> Option<CpuSample> {
        let client_ticks = Self::ticks("self")?;
        let node_pids: Vec<u32> = node_pids
            .iter()
            .copied()
            .filter(|pid| Self::ticks(&pid.to_string()).is_some())
            .collect();
        let node_ticks = node_pids
            .iter()
            .filter_map(|pid| Self::ticks(&pid.to_string()))
            .sum();
        Some(CpuSample {
            node_pids,
            node_ticks,
            client_ticks,
        })
    }

    fn report_since(self, operations: u64) -> Option<dynkv::bench::cpu::CpuReport> {
        let now = CpuSample::take(&self.node_pids)?;
        // SAFETY: sysconf only reads a system constant.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(dynkv::bench::cpu::CpuReport::new(
            now.node_pids.len(),
            now.node_ticks.saturating_sub(self.node_ticks),
            now.client_ticks.saturating_sub(self.client_ticks),
            ticks_per_second,
            operations,
        ))
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot render the JSON report")?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

async fn start_local(args: &RunArgs) -> Result<Option<LocalCluster>> {
    match args.local {
        None => Ok(None),
        Some(0) => bail!("--local needs at least 1 node"),
        Some(nodes) => {
            let base_port = args.local_base_port;
            let no_aae = args.local_no_aae;
            eprintln!("starting a local {nodes}-node cluster on ports {base_port}..");
            let cluster =
                tokio::task::spawn_blocking(move || LocalCluster::start(nodes, base_port, no_aae))
                    .await
                    .context("local cluster start-up panicked")??;
            Ok(Some(cluster))
        }
    }
}

/// The Protocol Buffers addresses the workload runs against (none: the native API).
fn pb_nodes(args: &RunArgs, local_dir: Option<&Path>) -> Result<Vec<SocketAddr>> {
    if args.protocol == BenchProtocol::Native {
        return Ok(Vec::new());
    }
    if !args.pb_nodes.is_empty() {
        return Ok(args.pb_nodes.clone());
    }
    let dir = local_dir
        .map(Path::to_path_buf)
        .or_else(|| args.dev_dir.clone())
        .unwrap_or_else(super::dev::default_dev_dir);
    let cluster = super::dev::DevCluster::load(&dir)?;
    let nodes: Vec<SocketAddr> = cluster
        .nodes
        .iter()
        .filter_map(|node| node.pb_addr)
        .collect();
    if nodes.is_empty() {
        bail!(
            "the dev cluster in {} names no Protocol Buffers address; give --pb-node",
            dir.display()
        );
    }
    Ok(nodes)
}

async fn run_workload(args: RunArgs) -> Result<()> {
    args.validate()?;
    let local = start_local(&args).await?;
    let (clients, degraded) =
        connect(&args, local.as_ref().map(|cluster| cluster.dir.as_path())).await?;
    let settings = args.settings(&clients, &args.r.to_string(), &args.w.to_string());
    println!(
        "dynkv bench: workload {}, {} keys over {} records, {}-byte values, {} workers, r={} w={}, nodes {}",
        settings.workload,
        settings.key_distribution,
        args.records,
        args.value_bytes,
        args.workers,
        args.r,
        args.w,
        settings.nodes.join(" ")
    );
    let pb_nodes = pb_nodes(&args, local.as_ref().map(|cluster| cluster.dir.as_path()))?;
    preload(&args, &clients, degraded).await?;
    let ceiling = ceiling(&args, &clients, &pb_nodes).await?;
    let plan = Arc::new(args.plan(Mix::Workload(args.workload), args.r, args.w));
    let name = format!("workload {}", args.workload);
    let dev_dir = local
        .as_ref()
        .map(|cluster| cluster.dir.clone())
        .or_else(|| args.dev_dir.clone());
    let node_pids = dev_dir.as_deref().map(node_pids).unwrap_or_default();
    let cpu_before = CpuSample::take(&node_pids);
    let result = run_phase(
        &name,
        &clients,
        &pb_nodes,
        args.workers,
        plan,
        args.limit(),
        args.seed,
    )
    .await?;
    let cpu = cpu_before.and_then(|before| before.report_since(result.operations));
    print!("{}", result.render());
    if let Some(cpu) = &cpu {
        print!("{}", cpu.render());
    }
    let fraction_of_ceiling = ceiling.as_ref().and_then(|c| result.fraction_of(c));
    if let (Some(ceiling), Some(fraction)) = (&ceiling, fraction_of_ceiling) {
        println!(
            "ceiling (no-op ping, same client path): {:.0} ops/s, p99 {:.2} ms; this run reached {:.0}% of it",
            ceiling.throughput_ops_per_sec,
            ceiling.latency_ms.as_ref().map_or(0.0, |l| l.p99),
            fraction * 100.0
        );
    }
    let report = RunReport {
        settings,
        result,
        ceiling,
        fraction_of_ceiling,
        cpu,
    };
    if let Some(path) = &args.json_out {
        write_json(path, &report)?;
    }
    drop(local);
    Ok(())
}

fn parse_configs(text: &str) -> Result<Vec<(Quorum, Quorum)>> {
    text.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let (w, r) = part
                .split_once('/')
                .with_context(|| format!("config {part:?} is not W/R (e.g. quorum/quorum)"))?;
            let w: Quorum = w.parse().with_context(|| format!("W of {part:?}"))?;
            let r: Quorum = r.parse().with_context(|| format!("R of {part:?}"))?;
            Ok((w, r))
        })
        .collect()
}

/// Writes a fresh key, waits a chosen gap after the acknowledgement, then reads it through
/// another node: the read is stale when it does not return the acknowledged value.
async fn probe(
    writer: Client,
    reader: Client,
    bucket: Vec<u8>,
    options: (PutOptions, GetOptions),
    name: String,
    stop: Arc<AtomicBool>,
) -> StalenessTally {
    let mut tally = StalenessTally::default();
    let (write_options, read_options) = options;
    let mut sequence = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let gap_target = PROBE_GAPS_MICROS[sequence % PROBE_GAPS_MICROS.len()];
        let key = format!("{name}-{sequence}").into_bytes();
        sequence += 1;
        let content = NewContent {
            value: key.clone(),
            ..Default::default()
        };
        if writer
            .put(&bucket, &key, None, content, write_options.clone())
            .await
            .is_err()
        {
            continue;
        }
        let acknowledged = Instant::now();
        if gap_target > 0 {
            tokio::time::sleep(Duration::from_micros(gap_target)).await;
        }
        let gap = acknowledged.elapsed();
        if let Ok(read) = reader.get(&bucket, &key, read_options.clone()).await {
            let fresh = read.siblings.iter().any(|sibling| sibling.value == key);
            tally.record(gap.as_micros() as u64, !fresh);
        }
    }
    tally
}

async fn run_compare(compare: CompareArgs) -> Result<()> {
    let args = compare.run.clone();
    args.validate()?;
    let configs = parse_configs(&compare.configs)?;
    if configs.is_empty() {
        bail!("--configs names no configuration");
    }
    let local = start_local(&args).await?;
    let (clients, degraded) =
        connect(&args, local.as_ref().map(|cluster| cluster.dir.as_path())).await?;
    let settings = args.settings(&clients, "per config", "per config");
    println!(
        "dynkv bench compare: workload {}, {} keys over {} records, {}-byte values, {} workers, {} probes, nodes {}",
        settings.workload,
        settings.key_distribution,
        args.records,
        args.value_bytes,
        args.workers,
        compare.probes,
        settings.nodes.join(" ")
    );
    preload(&args, &clients, degraded).await?;
    let ceiling = ceiling(&args, &clients, &[]).await?;
    let run_id = std::process::id();
    let mut reports = Vec::new();
    for (w, r) in configs {
        let label = format!("W={w}/R={r}");
        let stop = Arc::new(AtomicBool::new(false));
        let mut probes = Vec::new();
        for index in 0..compare.probes {
            let writer = clients[index % clients.len()].clone();
            let reader = clients[(index + 1) % clients.len()].clone();
            let options = (
                PutOptions {
                    w,
                    dw: args.dw.unwrap_or(w),
                    timeout_ms: args.timeout_ms,
                    ..Default::default()
                },
                GetOptions {
                    r,
                    timeout_ms: args.timeout_ms,
                    ..Default::default()
                },
            );
            let name = format!("probe-{run_id}-{w}-{r}-{index}");
            probes.push(tokio::spawn(probe(
                writer,
                reader,
                args.bucket.clone().into_bytes(),
                options,
                name,
                stop.clone(),
            )));
        }
        let plan = Arc::new(args.plan(Mix::Workload(args.workload), r, w));
        let result = run_phase(
            &label,
            &clients,
            &[],
            args.workers,
            plan,
            args.limit(),
            args.seed,
        )
        .await?;
        stop.store(true, Ordering::Relaxed);
        let mut tally = StalenessTally::default();
        for probe in probes {
            tally.merge(&probe.await.context("a staleness probe panicked")?);
        }
        println!(
            "{label}: {:.0} ops/s, {} errors, {} staleness reads",
            result.throughput_ops_per_sec,
            result.errors.total,
            tally.total_reads()
        );
        reports.push(ConfigReport {
            label,
            w: w.to_string(),
            r: r.to_string(),
            fraction_of_ceiling: ceiling.as_ref().and_then(|c| result.fraction_of(c)),
            result,
            staleness: tally.buckets(),
        });
    }
    let report = CompareReport {
        settings,
        ceiling,
        configs: reports,
    };
    println!();
    print!("{}", report.render());
    std::fs::write(&compare.svg_out, compare_chart(&report))
        .with_context(|| format!("cannot write {}", compare.svg_out.display()))?;
    println!("chart: {}", compare.svg_out.display());
    if let Some(path) = &args.json_out {
        write_json(path, &report)?;
    }
    drop(local);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_cache_keeps_at_most_its_capacity_and_the_latest_of_each_slot() {
        let contexts = Contexts::new(128);
        for record in 0..10_000u64 {
            contexts.set(record, record.to_le_bytes().to_vec());
        }
        let kept: Vec<u64> = (0..10_000u64)
            .filter(|record| contexts.get(*record).is_some())
            .collect();
        assert_eq!(kept.len(), 128, "one record per slot");
        // Each slot holds the last record written to it, with that record's own context.
        assert!(kept.iter().all(|record| *record >= 10_000 - 128));
        assert_eq!(contexts.get(9_999), Some(9_999u64.to_le_bytes().to_vec()));
        let slots: usize = contexts.shards.iter().map(|shard| shard.lock().len()).sum();
        assert_eq!(slots, 128);
    }

    #[test]
    fn configs_parse_as_w_over_r() {
        let configs = parse_configs("one/all, quorum/quorum,3/1").expect("parses");
        assert_eq!(
            configs,
            vec![
                (Quorum::One, Quorum::All),
                (Quorum::Quorum, Quorum::Quorum),
                (Quorum::Count(3), Quorum::Count(1)),
            ]
        );
        assert!(parse_configs("quorum").is_err());
        assert!(parse_configs("x/1").is_err());
    }

    #[test]
    fn error_kinds_are_snake_case_names() {
        assert_eq!(
            error_kind(&ClientLibError::Transport("reset".into())),
            "transport"
        );
        assert_eq!(
            error_kind(&ClientLibError::Server(
                dynkv::protocol::ClientError::invalid("bad")
            )),
            "invalid_request"
        );
    }
}

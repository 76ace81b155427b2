//! `dynkv demo rebalance`: the whole rebalancing story on a throwaway local cluster, under a
//! quorum workload that checks its own writes.
//!
//! It starts `dynkv dev` with 3 nodes in a directory and on ports of its own, loads keys,
//! keeps readers and writers running, adds a 4th and a 5th node, has one node leave, kills
//! another and removes it, each change planned, committed and watched until its transfers
//! are done. Then it reads back every write that was acknowledged, prints the workload's
//! errors and latency before and during transfers, what moved against the ideal and how fast,
//! and fails if any acknowledged write is missing.

use super::dev::{self, DevCluster};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use dynkv::client::{Client, ClientConfig};
use dynkv::core::quorum::Quorum;
use dynkv::protocol::{
    ClientRequest, ClientResponse, ClusterRequest, GetOptions, NewContent, NodeStatus, PutOptions,
};
use hdrhistogram::Histogram;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum DemoCommand {
    /// Join, join, leave and remove under a quorum workload on a throwaway local cluster;
    /// prints what moved and what the workload saw, and fails if a write was lost.
    Rebalance(RebalanceArgs),
}

#[derive(Args, Debug)]
pub struct RebalanceArgs {
    /// Keys loaded before the first change.
    #[arg(long, default_value_t = 5000)]
    keys: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1000)]
    value_bytes: usize,
    /// Concurrent workload clients (each alternates a quorum write and a quorum read).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Node i listens on BASE+i-1 (clients), BASE+100+i-1 (peers), BASE+200+i-1 (HTTP),
    /// BASE+300+i-1 (Protocol Buffers).
    #[arg(long, default_value_t = 9700)]
    base_port: u16,
    /// Directory of the throwaway cluster [default: a new one under the system temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the directory (configs, data, logs) afterwards.
    #[arg(long)]
    keep: bool,
}

const BUCKET: &[u8] = b"demo";
const PARTITIONS: u32 = 64;

/// Phases of the workload, for its latency and errors.
const BEFORE: u8 = 0;
const DURING: u8 = 1;
const BETWEEN: u8 = 2;

#[derive(Default)]
struct PhaseStats {
    latencies: Option<Histogram<u64>>,
    operations: u64,
    errors: u64,
    last_error: Option<String>,
}

struct Workload {
    phase: AtomicU8,
    stop: AtomicBool,
    stats: Mutex<[PhaseStats; 3]>,
    /// Keys whose write was acknowledged, each with the value written.
    acknowledged: Mutex<Vec<String>>,
    writes: AtomicU64,
}

impl Workload {
    fn record(&self, latency: Duration, outcome: Result<(), String>) {
        let phase = self.phase.load(Ordering::Relaxed) as usize;
        let mut stats = self
            .stats
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let stats = &mut stats[phase];
        stats.operations += 1;
        match outcome {
            Ok(()) => {
                let histogram = stats.latencies.get_or_insert_with(|| {
                    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
                });
                let _ = histogram.record(latency.as_micros().max(1) as u64);
            }
            Err(error) => {
                stats.errors += 1;
                stats.last_error = Some(error);
            }
        }
    }
}

/// One change of the story and what it moved.
struct ChangeReport {
    name: String,
    moved: usize,
    ideal: f64,
    seconds: f64,
    bytes: u64,
    keys: u64,
}

pub async fn run(command: DemoCommand) -> Result<()> {
    let DemoCommand::Rebalance(args) = command;
    rebalance(args).await
}

async fn rebalance(args: RebalanceArgs) -> Result<()> {
    dynkv::net::tls::install_crypto_provider();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("dynkv-demo-{}", std::process::id())));
    if dir.join("cluster.toml").exists() {
        bail!(
            "{} already holds a cluster; give the demo a new --dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    println!(
        "dynkv demo rebalance: a throwaway cluster in {}",
        dir.display()
    );
    let log = std::fs::File::create(dir.join("dev.log"))?;
    let mut dev_process = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "dev",
            "--nodes",
            "3",
            "--partition-count",
            &PARTITIONS.to_string(),
        ])
        .arg("--base-port")
        .arg(args.base_port.to_string())
        .arg("--dir")
        .arg(&dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start `dynkv dev`")?;
    let outcome = story(&args, &dir).await;
    if let Some(pid) = dev_process.id() {
        // SAFETY: kill(2) on the child we spawned; `dev` stops its nodes on SIGTERM.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), dev_process.wait()).await;
    if args.keep || outcome.is_err() {
        println!("the cluster's files are kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

async fn story(args: &RebalanceArgs, dir: &Path) -> Result<()> {
    let cluster = wait_for_cluster(dir).await?;
    let ca_pem = std::fs::read_to_string(&cluster.ca_cert)?;
    let addresses: Vec<_> = cluster.nodes.iter().map(|node| node.client_addr).collect();
    let mut config = ClientConfig::new(addresses, ca_pem.clone());
    config.request_timeout = Duration::from_secs(10);
    let client = Client::connect(config).await?;
    println!(
        "3 nodes up; loading {} keys of {} bytes",
        args.keys, args.value_bytes
    );

    let value = vec![b'x'; args.value_bytes];
    let loaded = Arc::new(AtomicU64::new(0));
    let mut loaders = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (client, value, loaded) = (client.clone(), value.clone(), loaded.clone());
        let keys = args.keys;
        loaders.spawn(async move {
            for index in (worker..keys).step_by(16) {
                let key = format!("load{index}");
                put(&client, &key, &value)
                    .await
                    .map_err(|error| format!("{key}: {error}"))?;
                loaded.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        });
    }
    let bar = progress_bar("load", loaded.clone(), args.keys as u64);
    for result in loaders.join_all().await {
        if let Err(error) = result {
            bar.store(true, Ordering::Relaxed);
            bail!("loading failed: {error}");
        }
    }
    bar.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(600)).await;
    println!("\rloaded {} keys{:40}", args.keys, "");

    let workload = Arc::new(Workload {
        phase: AtomicU8::new(BEFORE),
        stop: AtomicBool::new(false),
        stats: Mutex::new(Default::default()),
        acknowledged: Mutex::new(Vec::new()),
        writes: AtomicU64::new(0),
    });
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..args.workers {
        let (client, workload, value) = (client.clone(), workload.clone(), value.clone());
        let keys = args.keys;
        workers.spawn(async move {
            let mut index = 0u64;
            while !workload.stop.load(Ordering::Relaxed) {
                let key = format!("w{worker}-{index}");
                index += 1;
                let started = Instant::now();
                let outcome = put(&client, &key, &value).await;
                if outcome.is_ok() {
                    workload
                        .acknowledged
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner())
                        .push(key);
                    workload.writes.fetch_add(1, Ordering::Relaxed);
                }
                workload.record(started.elapsed(), outcome);
                let read = format!("load{}", index as usize * 7919 % keys.max(1));
                let started = Instant::now();
                let outcome = get(&client, &read).await.and_then(|found| {
                    if found {
                        Ok(())
                    } else {
                        Err(format!("{read} not found"))
                    }
                });
                workload.record(started.elapsed(), outcome);
            }
        });
    }
    println!(
        "workload: {} clients, each a write at w=quorum then a read at r=quorum",
        args.workers
    );
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut reports = Vec::new();
    for (name, change) in [
        ("join n4", Change::Add),
        ("join n5", Change::Add),
        ("leave n2", Change::Leave("n2")),
        ("remove n3 (killed)", Change::Remove("n3")),
    ] {
        println!("\n== {name}");
        let report = run_change(dir, &client, &workload, name, change).await?;
        workload.phase.store(BETWEEN, Ordering::Relaxed);
        reports.push(report);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    workload.stop.store(true, Ordering::Relaxed);
    workers.join_all().await;

    println!("\nreading back every acknowledged write at r=quorum");
    let mut expected: Vec<String> = (0..args.keys).map(|index| format!("load{index}")).collect();
    expected.extend(
        workload
            .acknowledged
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .iter()
            .cloned(),
    );
    let mut missing = Vec::new();
    for key in &expected {
        let mut found = Err(String::new());
        for _ in 0..3 {
            found = get(&client, key).await;
            if found.is_ok() {
                break;
            }
        }
        if !matches!(found, Ok(true)) {
            missing.push(key.clone());
        }
    }

    println!("\n== report");
    println!(
        "{:<20} {:>7} {:>7} {:>7} {:>9} {:>10} {:>9}",
        "CHANGE", "MOVED", "IDEAL", "RATIO", "SECONDS", "MB SENT", "MB/S"
    );
    for report in &reports {
        let megabytes = report.bytes as f64 / 1e6;
        println!(
            "{:<20} {:>7} {:>7.1} {:>7.2} {:>9.1} {:>10.2} {:>9.2}   ({} keys handed off)",
            report.name,
            report.moved,
            report.ideal,
            report.moved as f64 / report.ideal.max(1.0),
            report.seconds,
            megabytes,
            megabytes / report.seconds.max(0.001),
            report.keys,
        );
    }
    let stats = workload
        .stats
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    for (phase, label) in [
        (BEFORE, "before changes"),
        (DURING, "during transfers"),
        (BETWEEN, "between changes"),
    ] {
        let stats = &stats[phase as usize];
        let p99 = stats.latencies.as_ref().map_or(0.0, |histogram| {
            histogram.value_at_quantile(0.99) as f64 / 1000.0
        });
        let p50 = stats.latencies.as_ref().map_or(0.0, |histogram| {
            histogram.value_at_quantile(0.5) as f64 / 1000.0
        });
        println!(
            "workload {label:<17} {:>7} operations  p50 {p50:.2} ms  p99 {p99:.2} ms  errors {}{}",
            stats.operations,
            stats.errors,
            stats
                .last_error
                .as_ref()
                .map(|error| format!(" (last: {error})"))
                .unwrap_or_default()
        );
    }
    let total_errors: u64 = stats.iter().map(|stats| stats.errors).sum();
    println!(
        "acknowledged writes: {} loaded + {} by the workload; missing: {}; workload errors: {total_errors}",
        args.keys,
        workload.writes.load(Ordering::Relaxed),
        missing.len()
    );
    if !missing.is_empty() {
        bail!(
            "{} acknowledged writes are missing, first: {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
    println!("every acknowledged write was read back");
    Ok(())
}

enum Change {
    Add,
    Leave(&'static str),
    Remove(&'static str),
}

async fn run_change(
    dir: &Path,
    client: &Client,
    workload: &Workload,
    name: &str,
    change: Change,
) -> Result<ChangeReport> {
    let before = ring(client).await?;
    let valid = before
        .members
        .iter()
        .filter(|member| member.state == "valid")
        .count();
    let ideal = match &change {
        Change::Add => {
            dev::add(dir).await?;
            f64::from(PARTITIONS) / (valid + 1) as f64
        }
        Change::Leave(node) | Change::Remove(node) => {
            let owned = before
                .members
                .iter()
                .find(|member| member.node == *node)
                .map_or(0, |member| member.partitions);
            if let Change::Remove(node) = &change {
                kill(dir, node)?;
                println!("killed {node}; waiting until it is seen down");
                wait_until_down(client, node).await?;
            }
            let request = match &change {
                Change::Leave(node) => ClusterRequest::Leave {
                    node: Some(node.to_string()),
                },
                _ => ClusterRequest::Remove {
                    node: node.to_string(),
                },
            };
            cluster(client, request).await?;
            f64::from(owned)
        }
    };
    let plan = match cluster(client, ClusterRequest::Plan).await? {
        ClientResponse::Plan(plan) => plan,
        other => bail!("the plan was answered with {other:?}"),
    };
    println!(
        "plan on ring version {}: {} partitions move (ideal {ideal:.1})",
        plan.ring_version,
        plan.transfers.len()
    );
    for (node, before, after) in &plan.ownership {
        println!("  {node:<4} {before:>3} -> {after:>3} partitions");
    }
    let sent_before = handoff_sent(dir).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        match cluster(client, ClusterRequest::Commit { ring_version: None }).await {
            Ok(_) => break,
            Err(error) if error.to_string().contains("converge") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error.context(format!("commit of {name}"))),
        }
    }
    workload.phase.store(DURING, Ordering::Relaxed);
    println!("committed; transfers:");
    let terminal = std::io::stdout().is_terminal();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut handoffs_seen = 0;
    loop {
        let ClientResponse::Transfers {
            transfers, pending, ..
        } = client.request(ClientRequest::Transfers).await?
        else {
            bail!("the node answered something other than transfers");
        };
        handoffs_seen = handoffs_seen.max(transfers.len());
        if transfers.is_empty() && !pending {
            break;
        }
        let active = transfers.iter().filter(|t| t.state == "active").count();
        let done = handoffs_seen - transfers.len();
        let filled = (done * 40).checked_div(handoffs_seen).unwrap_or(40);
        let line = format!(
            "  [{}{}] {done}/{handoffs_seen} handoffs done, {active} active, {:.1} s",
            "#".repeat(filled),
            ".".repeat(40 - filled),
            started.elapsed().as_secs_f64()
        );
        if terminal {
            print!("\r{line}");
            let _ = std::io::stdout().flush();
        } else if done * 4 / handoffs_seen.max(1) != (done + 1) * 4 / handoffs_seen.max(1) {
            println!("{line}");
        }
        if Instant::now() > deadline {
            bail!("the transfers of {name} did not finish within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let sent_after = handoff_sent(dir).await;
    if terminal {
        println!();
    }
    println!("  {handoffs_seen} handoffs done in {seconds:.1} s; no transfers");
    Ok(ChangeReport {
        name: name.to_string(),
        moved: plan.transfers.len(),
        ideal,
        seconds,
        bytes: sent_after.1.saturating_sub(sent_before.1),
        keys: sent_after.0.saturating_sub(sent_before.0),
    })
}

async fn put(client: &Client, key: &str, value: &[u8]) -> Result<(), String> {
    let options = PutOptions {
        w: Quorum::Quorum,
        ..PutOptions::default()
    };
    let content = NewContent {
        value: value.to_vec(),
        ..NewContent::default()
    };
    client
        .put(BUCKET, key.as_bytes(), None, content, options)
        .await
        .map(|_| ())
        .map_err(|error| error.to_string())
}

async fn get(client: &Client, key: &str) -> Result<bool, String> {
    let options = GetOptions {
        r: Quorum::Quorum,
        ..GetOptions::default()
    };
    client
        .get(BUCKET, key.as_bytes(), options)
        .await
        .map(|result| !result.siblings.is_empty())
        .map_err(|error| error.to_string())
}

async fn ring(client: &Client) -> Result<dynkv::protocol::RingInfo> {
    match client.request(ClientRequest::Ring).await? {
        ClientResponse::Ring(ring) => Ok(ring),
        other => bail!("the ring was answered with {other:?}"),
    }
}

async fn cluster(client: &Client, request: ClusterRequest) -> Result<ClientResponse> {
    match client.request(ClientRequest::Cluster(request)).await? {
        ClientResponse::Error(error) => bail!("{}", error.message),
        other => Ok(other),
    }
}

/// Keys and bytes every running node has sent in handoffs.
async fn handoff_sent(dir: &Path) -> (u64, u64) {
    let Ok(cluster) = DevCluster::load(dir) else {
        return (0, 0);
    };
    let Ok(ca_pem) = std::fs::read_to_string(&cluster.ca_cert) else {
        return (0, 0);
    };
    let mut total = (0, 0);
    for node in &cluster.nodes {
        let mut config = ClientConfig::new(vec![node.client_addr], ca_pem.clone());
        config.request_timeout = Duration::from_secs(2);
        let Ok(client) = Client::connect(config).await else {
            continue;
        };
        if let Ok(ClientResponse::Status(NodeStatus {
            handoff_keys_sent,
            handoff_bytes_sent,
            ..
        })) = client.request(ClientRequest::Status).await
        {
            total.0 += handoff_keys_sent;
            total.1 += handoff_bytes_sent;
        }
    }
    total
}

fn kill(dir: &Path, node: &str) -> Result<()> {
    let pid_file = dir.join(node).join("pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("cannot read {}", pid_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} holds no pid", pid_file.display()))?;
    // SAFETY: kill(2) on a node process `dynkv dev` started for this demo.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    Ok(())
}

async fn wait_until_down(client: &Client, node: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ClientResponse::Members(members)) = client.request(ClientRequest::Members).await
            && members
                .iter()
                .any(|member| member.node == node && !member.up)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{node} was not seen down within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_for_cluster(dir: &Path) -> Result<DevCluster> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(cluster) = DevCluster::load(dir)
            && let Ok(ca_pem) = std::fs::read_to_string(&cluster.ca_cert)
        {
            let mut up = 0;
            for node in &cluster.nodes {
                let mut config = ClientConfig::new(vec![node.client_addr], ca_pem.clone());
                config.request_timeout = Duration::from_secs(2);
                if let Ok(client) = Client::connect(config).await
                    && client.ping().await.is_ok()
                {
                    up += 1;
                }
            }
            if up == cluster.nodes.len() && up > 0 {
                return Ok(cluster);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the demo cluster did not start within 120 s (see {})",
                dir.join("dev.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A progress line on stdout while `done` grows to `total`; set the returned flag to stop.
fn progress_bar(label: &'static str, done: Arc<AtomicU64>, total: u64) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    if std::io::stdout().is_terminal() {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let count = done.load(Ordering::Relaxed);
                let filled = (count * 40 / total.max(1)) as usize;
                print!(
                    "\r{label} [{}{}] {count}/{total}",
                    "#".repeat(filled.min(40)),
                    ".".repeat(40 - filled.min(40))
                );
                let _ = std::io::stdout().flush();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }
    stop
}

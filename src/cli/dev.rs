//! `dynkv dev`: a local cluster on loopback in one command. It makes a CA, a certificate, a
//! config and a data directory per node (kept between runs, so data survives), runs each node
//! as its own `dynkv server` process (so one can be killed and restarted), waits until every
//! node answers, prints how to reach the cluster, and stops the nodes on Ctrl-C.
//!
//! It writes `cluster.toml` in its directory; the CLI client reads it to find the cluster
//! with no flags.

use super::cert::{read_pair, write_pair};
use anyhow::{Context, Result, bail};
use clap::Args;
use dynkv::client::{Client, ClientConfig};
use dynkv::config::{Config, MemberConfig, TlsConfig};
use dynkv::core::ids::NodeId;
use dynkv::net::tls;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tracing::{info, warn};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    #[command(subcommand)]
    action: Option<DevAction>,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Directory for the CA, configs, data and logs [default: $DYNKV_DEV_DIR or ~/.local/share/dynkv/dev].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Node i listens for clients on BASE+i-1, for peers on BASE+100+i-1, for HTTP on
    /// BASE+200+i-1 and for Riak's Protocol Buffers API on BASE+300+i-1.
    #[arg(long, default_value_t = 8700)]
    base_port: u16,
    /// Ring partitions.
    #[arg(long, default_value_t = 64)]
    partition_count: u32,
    /// Replicas per key.
    #[arg(long, default_value_t = 3)]
    n_val: u32,
    /// Default request timeout of each node, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// Delete the directory first: a new CA, new data.
    #[arg(long)]
    fresh: bool,
    /// Run the nodes with active anti-entropy off (`aae.enabled = false`; tombstones are then
    /// kept), e.g. to measure what it costs.
    #[arg(long)]
    no_aae: bool,
    /// Each node's block cache in MiB (`storage.cache_mib`), e.g. to measure data sets
    /// larger than the default cache.
    #[arg(long, default_value_t = dynkv::config::StorageSettings::default().cache_mib)]
    cache_mib: u64,
}

#[derive(clap::Subcommand, Debug)]
enum DevAction {
    /// Add a node to the running dev cluster: its certificate, config and data directory,
    /// started by the running `dynkv dev` (which stops it on Ctrl-C), its join staged and the
    /// plan printed. It owns nothing until the plan is committed.
    Add {
        /// Directory of the running dev cluster [default: $DYNKV_DEV_DIR or ~/.local/share/dynkv/dev].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Stage the leave of NODE from the running dev cluster and print the plan.
    Leave {
        node: String,
        /// Directory of the running dev cluster [default: $DYNKV_DEV_DIR or ~/.local/share/dynkv/dev].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// What `dynkv dev` tells clients about its cluster (`cluster.toml`).
#[derive(Debug, Serialize, Deserialize)]
pub struct DevCluster {
    pub ca_cert: PathBuf,
    pub nodes: Vec<DevNode>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DevNode {
    pub id: String,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    /// Absent in files written before the HTTP API existed.
    #[serde(default)]
    pub http_addr: Option<SocketAddr>,
    /// Riak's Protocol Buffers API; absent in files written before it existed.
    #[serde(default)]
    pub pb_addr: Option<SocketAddr>,
    pub config: PathBuf,
}

pub fn default_dev_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DYNKV_DEV_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/dynkv/dev"),
        None => PathBuf::from("dynkv-dev"),
    }
}

impl DevCluster {
    pub fn load(dir: &Path) -> Result<DevCluster> {
        let path = dir.join("cluster.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("{} is not a dev cluster file", path.display()))
    }
}

/// Creates (once) the CA and each node's certificate and config; returns the cluster file.
fn prepare(args: &DevArgs, dir: &Path) -> Result<DevCluster> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    if let Ok(existing) = DevCluster::load(&dir)
        && existing.nodes.len() != usize::from(args.nodes)
    {
        bail!(
            "{} holds a {}-node dev cluster; membership is static, so pass --fresh to start a {}-node one",
            dir.display(),
            existing.nodes.len(),
            args.nodes
        );
    }
    let pki = dir.join("pki");
    let ca = match read_pair(&pki, "ca") {
        Ok(ca) => ca,
        Err(_) => {
            let ca = tls::generate_ca("dynkv dev cluster CA")?;
            write_pair(&pki, "ca", &ca)?;
            ca
        }
    };
    let address = |offset: u16, index: u16| -> Result<SocketAddr> {
        let port = args
            .base_port
            .checked_add(offset + index)
            .context("--base-port is too high for this many nodes")?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    };
    let mut members = Vec::new();
    for index in 0..args.nodes {
        members.push(MemberConfig {
            id: format!("n{}", index + 1),
            peer_addr: address(100, index)?,
        });
    }
    let mut nodes = Vec::new();
    for index in 0..args.nodes {
        let id = NodeId::new(format!("n{}", index + 1))?;
        let node_dir = dir.join(id.as_str());
        std::fs::create_dir_all(&node_dir)?;
        if read_pair(&pki, id.as_str()).is_err() {
            let certificate = tls::issue_node_certificate(&ca, &id, &["127.0.0.1".to_string()])?;
            write_pair(&pki, id.as_str(), &certificate)?;
        }
        let config = Config {
            node_id: id.to_string(),
            data_dir: node_dir.join("data"),
            peer_listen: address(100, index)?,
            client_listen: address(0, index)?,
            http_listen: address(200, index)?,
            pb_listen: address(300, index)?,
            partition_count: args.partition_count,
            request_timeout_ms: args.request_timeout_ms,
            worker_threads: dev_worker_threads(usize::from(args.nodes)),
            members: members.clone(),
            tls: TlsConfig {
                ca_cert: pki.join("ca.pem"),
                node_cert: pki.join(format!("{id}.pem")),
                node_key: pki.join(format!("{id}.key")),
            },
            buckets: dynkv::config::BucketConfig {
                n_val: args.n_val,
                ..Default::default()
            },
            aae: dynkv::config::AaeConfig {
                enabled: !args.no_aae,
                ..Default::default()
            },
            storage: dynkv::config::StorageSettings {
                cache_mib: args.cache_mib,
                ..Default::default()
            },
            ..Config::default()
        };
        config.validate()?;
        let config_path = node_dir.join("dynkv.toml");
        std::fs::write(&config_path, config.to_toml())
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        nodes.push(DevNode {
            id: id.to_string(),
            client_addr: config.client_listen,
            peer_addr: config.peer_listen,
            http_addr: Some(config.http_listen),
            pb_addr: Some(config.pb_listen),
            config: config_path,
        });
    }
    let cluster = DevCluster {
        ca_cert: pki.join("ca.pem"),
        nodes,
    };
    let text = toml::to_string(&cluster).context("cannot render cluster.toml")?;
    std::fs::write(dir.join("cluster.toml"), text)?;
    Ok(cluster)
}

/// Runtime threads per dev node: the nodes share this machine's cores (with whatever drives
/// them), and more threads than cores only preempt each other.
fn dev_worker_threads(nodes: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    (cores / nodes.max(1)).max(1)
}

fn spawn_node(node: &DevNode) -> Result<Child> {
    let executable = std::env::current_exe().context("cannot find the dynkv executable")?;
    let node_dir = node
        .config
        .parent()
        .context("node config has no directory")?;
    let log_path = node_dir.join("node.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut command = Command::new(executable);
    command
        .arg("server")
        .arg("--config")
        .arg(&node.config)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    stop_when_supervisor_dies(&mut command);
    let child = command
        .spawn()
        .with_context(|| format!("cannot start node {}", node.id))?;
    if let Some(pid) = child.id() {
        std::fs::write(node_dir.join("pid"), format!("{pid}\n"))?;
    }
    Ok(child)
}

/// Makes a node receive SIGTERM (a clean stop) when this supervisor dies, even by SIGKILL,
/// so that no node outlives its `dynkv dev`. Linux sends it when the thread that spawned the
/// node ends: nodes are spawned from the runtime's worker threads or the main thread, which
/// live as long as the supervisor.
fn stop_when_supervisor_dies(command: &mut Command) {
    let supervisor = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure calls only prctl(2) and getppid(2), both
    // async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The supervisor may have died before prctl took effect: then no signal comes.
            if libc::getppid() != supervisor {
                return Err(std::io::Error::other("dynkv dev is gone"));
            }
            Ok(())
        })
    };
}

/// The reason a node gave for stopping: the `error:` line it printed last to its log.
fn stop_reason(node: &DevNode) -> Option<String> {
    let log = std::fs::read_to_string(node.config.with_file_name("node.log")).ok()?;
    let last = log.lines().rev().find(|line| !line.trim().is_empty())?;
    last.strip_prefix("error: ").map(str::to_string)
}

/// Stops every node at once: SIGTERM to all, then up to 10 s for all of them together,
/// then SIGKILL to any still running. Stopping them one after another could take 10 s per
/// node, long enough for whoever stops `dynkv dev` to give up and kill it.
async fn stop_nodes(children: &mut [Child]) {
    for child in children.iter() {
        signal(child, libc::SIGTERM);
    }
    // Every node was signalled at once, so waiting for them in turn under one deadline
    // waits for them together.
    let all_exited = async {
        for child in children.iter_mut() {
            let _ = child.wait().await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), all_exited)
        .await
        .is_err()
    {
        for child in children.iter_mut() {
            if !matches!(child.try_wait(), Ok(Some(_))) {
                warn!(pid = ?child.id(), "node did not stop within 10 s; killing it");
                signal(child, libc::SIGKILL);
                let _ = child.wait().await;
            }
        }
    }
}

async fn wait_until_ready(cluster: &DevCluster, children: &mut [Child]) -> Result<()> {
    let ca_pem = std::fs::read_to_string(&cluster.ca_cert)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for (node, child) in cluster.nodes.iter().zip(children.iter_mut()) {
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "node {} exited during start-up ({status}); see {}",
                    node.id,
                    node.config.with_file_name("node.log").display()
                );
            }
            let mut config = ClientConfig::new(vec![node.client_addr], ca_pem.clone());
            config.request_timeout = Duration::from_secs(2);
            let answered = match Client::connect(config).await {
                Ok(client) => client.ping().await.is_ok(),
                Err(_) => false,
            };
            if answered {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {} did not answer within 60 s", node.id);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

fn signal(child: &Child, signal: i32) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and still own; no memory is touched.
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
    }
}

pub async fn run(args: DevArgs) -> Result<()> {
    match args.action {
        Some(DevAction::Add { dir }) => return add(&dir.unwrap_or_else(default_dev_dir)).await,
        Some(DevAction::Leave { node, dir }) => {
            return leave(&dir.unwrap_or_else(default_dev_dir), node).await;
        }
        None => {}
    }
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let dir = args.dir.clone().unwrap_or_else(default_dev_dir);
    if args.fresh && dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    dynkv::net::tls::install_crypto_provider();
    let cluster = prepare(&args, &dir)?;
    let mut children = Vec::new();
    for node in &cluster.nodes {
        children.push(spawn_node(node)?);
    }
    if let Err(error) = wait_until_ready(&cluster, &mut children).await {
        for child in &children {
            signal(child, libc::SIGKILL);
        }
        return Err(error);
    }
    let dir_text = cluster
        .ca_cert
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."))
        .display()
        .to_string();
    println!(
        "dynkv dev cluster: {} nodes up (data in {dir_text})",
        cluster.nodes.len()
    );
    for (node, child) in cluster.nodes.iter().zip(&children) {
        println!(
            "  {}  client {}  peer {}  http http://{}  pb {}  pid {}",
            node.id,
            node.client_addr,
            node.peer_addr,
            node.http_addr
                .map(|address| address.to_string())
                .unwrap_or_default(),
            node.pb_addr
                .map(|address| address.to_string())
                .unwrap_or_default(),
            child.id().map(|pid| pid.to_string()).unwrap_or_default()
        );
    }
    let default_dir = default_dev_dir();
    let dir_flag = if Path::new(&dir_text) == default_dir.canonicalize().unwrap_or(default_dir) {
        String::new()
    } else {
        format!(" --dev-dir {dir_text}")
    };
    println!();
    println!("Try, from another shell:");
    println!("  dynkv put demo hello 'world' --w all{dir_flag}");
    println!("  dynkv get demo hello --r all{dir_flag}");
    if let Some(http) = cluster.nodes.first().and_then(|node| node.http_addr) {
        println!(
            "  curl -XPUT -H 'Content-Type: text/plain' -d world http://{http}/buckets/demo/keys/hello"
        );
        println!("  curl -i http://{http}/buckets/demo/keys/hello");
    }
    println!("Kill a node:     kill -9 $(cat {dir_text}/n2/pid)");
    println!("Restart it:      dynkv server --config {dir_text}/n2/dynkv.toml");
    println!("Logs:            {dir_text}/nN/node.log     Stop the cluster: Ctrl-C");
    info!(nodes = cluster.nodes.len(), "dev cluster running");

    // Report nodes that exit (a kill from the walkthrough) without stopping the others, and
    // start the nodes `dynkv dev add` writes into cluster.toml.
    let mut cluster = cluster;
    let mut reported = vec![false; children.len()];
    loop {
        tokio::select! {
            _ = super::server::wait_for_shutdown_signal() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Ok(latest) = DevCluster::load(Path::new(&dir_text))
                    && latest.nodes.len() > cluster.nodes.len()
                {
                    for node in &latest.nodes[cluster.nodes.len()..] {
                        match spawn_node(node) {
                            Ok(child) => {
                                info!(node = %node.id, "added node started");
                                children.push(child);
                                reported.push(false);
                            }
                            Err(error) => warn!(node = %node.id, error = %error, "cannot start the added node"),
                        }
                    }
                    cluster = latest;
                }
                for ((node, child), reported) in cluster.nodes.iter().zip(children.iter_mut()).zip(reported.iter_mut()) {
                    if !*reported && let Ok(Some(status)) = child.try_wait() {
                        match stop_reason(node) {
                            // The node said why it stopped (it left, was removed, its
                            // storage failed): a restart would not help.
                            Some(reason) => warn!(node = %node.id, %status, "node stopped: {reason}"),
                            None => warn!(node = %node.id, %status, "node exited; restart it with `dynkv server --config {}`", node.config.display()),
                        }
                        *reported = true;
                    }
                }
            }
        }
    }
    println!("stopping {} nodes", children.len());
    stop_nodes(&mut children).await;
    Ok(())
}

/// `dynkv dev add`: one more node on the next ports of the same pattern, with the existing
/// nodes as its seeds (so it joins rather than creating a cluster). The running `dynkv dev`
/// starts it; this waits until it answers, stages its join and prints the plan.
pub(super) async fn add(dir: &Path) -> Result<()> {
    use dynkv::protocol::{ClientRequest, ClientResponse, ClusterRequest};
    dynkv::net::tls::install_crypto_provider();
    let mut cluster = DevCluster::load(dir).with_context(|| {
        format!(
            "no dev cluster in {}; start one with `dynkv dev`",
            dir.display()
        )
    })?;
    let first = cluster
        .nodes
        .first()
        .context("the dev cluster has no nodes")?;
    let index = u16::try_from(cluster.nodes.len()).context("too many nodes")?;
    let base = first.client_addr.port();
    let address = |offset: u16| -> Result<SocketAddr> {
        let port = base
            .checked_add(offset + index)
            .context("no free port in the dev cluster's pattern")?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    };
    let id = NodeId::new(format!("n{}", index + 1))?;
    let template = Config::load(&first.config)
        .with_context(|| format!("cannot read {}", first.config.display()))?;
    let pki = cluster
        .ca_cert
        .parent()
        .context("the CA certificate has no directory")?
        .to_path_buf();
    let ca = read_pair(&pki, "ca")?;
    let certificate = tls::issue_node_certificate(&ca, &id, &["127.0.0.1".to_string()])?;
    write_pair(&pki, id.as_str(), &certificate)?;
    let node_dir = cluster
        .ca_cert
        .parent()
        .and_then(Path::parent)
        .context("the dev directory is unknown")?
        .join(id.as_str());
    std::fs::create_dir_all(&node_dir)?;
    let config = Config {
        node_id: id.to_string(),
        data_dir: node_dir.join("data"),
        peer_listen: address(100)?,
        client_listen: address(0)?,
        http_listen: address(200)?,
        pb_listen: address(300)?,
        worker_threads: dev_worker_threads(usize::from(index) + 1),
        // Seeds only: a node not in its own member list joins the existing ring.
        members: cluster
            .nodes
            .iter()
            .map(|node| MemberConfig {
                id: node.id.clone(),
                peer_addr: node.peer_addr,
            })
            .collect(),
        tls: TlsConfig {
            ca_cert: pki.join("ca.pem"),
            node_cert: pki.join(format!("{id}.pem")),
            node_key: pki.join(format!("{id}.key")),
        },
        ..template
    };
    config.validate()?;
    let config_path = node_dir.join("dynkv.toml");
    std::fs::write(&config_path, config.to_toml())
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    cluster.nodes.push(DevNode {
        id: id.to_string(),
        client_addr: config.client_listen,
        peer_addr: config.peer_listen,
        http_addr: Some(config.http_listen),
        pb_addr: Some(config.pb_listen),
        config: config_path,
    });
    let text = toml::to_string(&cluster).context("cannot render cluster.toml")?;
    std::fs::write(dir.join("cluster.toml"), text)?;
    println!(
        "{id}: client {}  peer {}  http http://{}  pb {}",
        config.client_listen, config.peer_listen, config.http_listen, config.pb_listen
    );

    let ca_pem = std::fs::read_to_string(&cluster.ca_cert)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        let mut client_config = ClientConfig::new(vec![config.client_listen], ca_pem.clone());
        client_config.request_timeout = Duration::from_secs(5);
        if let Ok(client) = Client::connect(client_config).await
            && client.ping().await.is_ok()
        {
            break client;
        }
        if Instant::now() > deadline {
            bail!(
                "{id} did not answer within 30 s: is `dynkv dev` running in {}? (see {})",
                dir.display(),
                node_dir.join("node.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("{id} is up; staging its join");
    // Until gossip brought it the ring, the new node cannot find the claimant.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client
            .request(ClientRequest::Cluster(ClusterRequest::Join { node: None }))
            .await
        {
            Ok(ClientResponse::Ring(_)) => break,
            Ok(other) => bail!("the join was answered with {other:?}"),
            Err(error) if Instant::now() > deadline => bail!("cannot stage the join: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    match client
        .request(ClientRequest::Cluster(ClusterRequest::Plan))
        .await
    {
        Ok(ClientResponse::Plan(plan)) => {
            println!(
                "plan on ring version {}: {} partitions would move to {id}",
                plan.ring_version,
                plan.transfers
                    .iter()
                    .filter(|(_, _, to)| *to == id.as_str())
                    .count()
            );
            println!("see it whole with `dynkv admin cluster plan`");
        }
        Ok(other) => bail!("the plan was answered with {other:?}"),
        Err(error) => bail!("cannot make the plan: {error}"),
    }
    Ok(())
}

/// `dynkv dev leave NODE`: stages the leave through any node of the dev cluster and prints
/// what the plan would move.
async fn leave(dir: &Path, node: String) -> Result<()> {
    use dynkv::protocol::{ClientRequest, ClientResponse, ClusterRequest};
    dynkv::net::tls::install_crypto_provider();
    let cluster = DevCluster::load(dir).with_context(|| {
        format!(
            "no dev cluster in {}; start one with `dynkv dev`",
            dir.display()
        )
    })?;
    let ca_pem = std::fs::read_to_string(&cluster.ca_cert)?;
    let addresses = cluster.nodes.iter().map(|node| node.client_addr).collect();
    let client = Client::connect(ClientConfig::new(addresses, ca_pem))
        .await
        .context("no node of the dev cluster answers")?;
    let request = ClusterRequest::Leave {
        node: Some(node.clone()),
    };
    match client.request(ClientRequest::Cluster(request)).await {
        Ok(ClientResponse::Ring(_)) => println!("{node}: leave staged"),
        Ok(other) => bail!("the leave was answered with {other:?}"),
        Err(error) => bail!("cannot stage the leave: {error}"),
    }
    match client
        .request(ClientRequest::Cluster(ClusterRequest::Plan))
        .await
    {
        Ok(ClientResponse::Plan(plan)) => println!(
            "plan on ring version {}: {} partitions would move; see it whole with `dynkv admin cluster plan`",
            plan.ring_version,
            plan.transfers.len()
        ),
        Ok(other) => bail!("the plan was answered with {other:?}"),
        Err(error) => bail!("cannot make the plan: {error}"),
    }
    Ok(())
}

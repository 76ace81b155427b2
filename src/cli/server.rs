//! `dynkv server`: one node, from a TOML config file and flags (flags win).

use anyhow::{Context, Result};
use clap::Args;
use dynkv::config::{Config, MemberConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use tracing::info;

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// TOML config file; every field has a default and a flag below.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// This node's id: a ring member name, also its certificate's DNS name [default: n1].
    #[arg(long)]
    node_id: Option<String>,
    /// Data directory [default: dynkv-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node-to-node QUIC address (mutual TLS) [default: 127.0.0.1:8710].
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// Client QUIC address (TLS) [default: 127.0.0.1:8700].
    #[arg(long)]
    client_listen: Option<SocketAddr>,
    /// Riak-compatible HTTP API and metrics address (plain HTTP) [default: 127.0.0.1:8098].
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Serve the HTTP API over TLS with the node certificate [default: false].
    #[arg(long)]
    http_tls: Option<bool>,
    /// Riak's Protocol Buffers API address [default: 127.0.0.1:8087].
    #[arg(long)]
    pb_listen: Option<SocketAddr>,
    /// Let RpbStartTls upgrade Protocol Buffers connections to TLS [default: false].
    #[arg(long)]
    pb_tls: Option<bool>,
    /// Require `Authorization: Bearer TOKEN` on every HTTP request except /ping
    /// [default: none; env DYNKV_HTTP_TOKEN].
    #[arg(long, env = "DYNKV_HTTP_TOKEN", hide_env_values = true)]
    http_token: Option<String>,
    /// Require this token on every request of the QUIC client port except ping
    /// [default: none; env DYNKV_CLIENT_TOKEN].
    #[arg(long, env = "DYNKV_CLIENT_TOKEN", hide_env_values = true)]
    client_token: Option<String>,
    /// A cluster member as ID=PEER_ADDR; repeat for each (this node included).
    #[arg(long = "member", value_parser = parse_member)]
    members: Vec<MemberConfig>,
    /// Ring partitions, a power of two in 8..=4096 [default: 64].
    #[arg(long)]
    partition_count: Option<u32>,
    /// Default request timeout in milliseconds [default: 5000].
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    /// Threads of the async runtime; 0 means one per CPU core [default: 0]
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Cluster CA certificate (PEM).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// This node's certificate (PEM).
    #[arg(long)]
    node_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long)]
    node_key: Option<PathBuf>,
    /// Replicas per key [default: 3].
    #[arg(long)]
    n_val: Option<u32>,
    /// Keep concurrent writes as siblings [default: true].
    #[arg(long)]
    allow_mult: Option<bool>,
    /// fsync the journal before acknowledging writes [default: true].
    #[arg(long)]
    sync_writes: Option<bool>,
    /// Largest value a client may write, in bytes [default: 8388608].
    #[arg(long)]
    max_value_bytes: Option<u64>,
    /// Most siblings a key may hold [default: 100].
    #[arg(long)]
    max_siblings: Option<u32>,
    /// Most bytes of hints this node keeps for down primaries [default: 1073741824].
    #[arg(long)]
    hints_max_bytes: Option<u64>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn parse_member(text: &str) -> Result<MemberConfig, String> {
    let (id, address) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not ID=PEER_ADDR"))?;
    let peer_addr = address
        .parse()
        .map_err(|error| format!("{address:?} is not a socket address: {error}"))?;
    Ok(MemberConfig {
        id: id.to_string(),
        peer_addr,
    })
}

pub fn effective_config(args: ServerArgs) -> Result<(Config, bool)> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    macro_rules! apply {
        ($flag:expr => $($field:tt)+) => {
            if let Some(value) = $flag {
                config.$($field)+ = value;
            }
        };
    }
    apply!(args.node_id => node_id);
    apply!(args.data_dir => data_dir);
    apply!(args.peer_listen => peer_listen);
    apply!(args.client_listen => client_listen);
    apply!(args.http_listen => http_listen);
    apply!(args.http_tls => http_tls);
    apply!(args.pb_listen => pb_listen);
    apply!(args.pb_tls => pb_tls);
    if args.http_token.is_some() {
        config.http_token = args.http_token;
    }
    if args.client_token.is_some() {
        config.client_token = args.client_token;
    }
    apply!(args.partition_count => partition_count);
    apply!(args.request_timeout_ms => request_timeout_ms);
    apply!(args.worker_threads => worker_threads);
    apply!(args.ca_cert => tls.ca_cert);
    apply!(args.node_cert => tls.node_cert);
    apply!(args.node_key => tls.node_key);
    apply!(args.n_val => buckets.n_val);
    apply!(args.allow_mult => buckets.allow_mult);
    apply!(args.sync_writes => storage.sync_writes);
    apply!(args.max_value_bytes => limits.max_value_bytes);
    apply!(args.max_siblings => limits.max_siblings);
    apply!(args.hints_max_bytes => hints.max_bytes);
    if !args.members.is_empty() {
        config.members = args.members;
    }
    Ok((config, args.print_config))
}

/// Runs a node with the effective config (see [`effective_config`]), on a runtime of
/// `config.worker_threads` threads that the caller built.
pub async fn run(config: Config, print_only: bool) -> Result<()> {
    if print_only {
        print!("{}", config.to_toml());
        return Ok(());
    }
    config.validate()?;
    let server = dynkv::server::start(config)
        .await
        .context("node failed to start")?;
    let store = server.node.store().clone();
    tokio::select! {
        _ = wait_for_shutdown_signal() => {}
        (version, state) = server.node.removed_from_cluster() => {
            let node = server.node.id().clone();
            tracing::warn!(node = %node, ring_version = version, state = state.as_str(), "this node is no longer a member of the cluster; stopping");
            server.shutdown().await;
            anyhow::bail!("{}", dynkv::server::ServerError::Departed { node, state: state.as_str(), version });
        }
        reason = store.failed() => {
            // No clean shutdown: nothing more is acknowledged or served, the store is not
            // marked as stopped cleanly, and the next start takes a new incarnation.
            tracing::error!(node = %server.node.id(), reason = %reason, "storage failed; stopping the node");
            anyhow::bail!("storage failed ({reason}); the node stopped so that it acknowledges and serves nothing that may not be durable");
        }
    }
    info!(node = %server.node.id(), "shutting down");
    server.shutdown().await;
    Ok(())
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

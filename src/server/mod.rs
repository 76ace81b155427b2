//! The IO shell of one node: it opens the store, binds the peer (mutual TLS) and client (TLS)
//! QUIC endpoints and the HTTP listener, and serves until asked to shut down.

pub mod counters;
pub mod membership;
pub mod node;

use crate::config::Config;
use crate::core::gossip::{GossipConfig, MemberRecord};
use crate::core::ids::NodeId;
use crate::net::budget::ByteBudget;
use crate::net::quic::{QuicPeers, QuicServer};
use crate::net::tls;
use crate::net::{BoxFuture, PEER_ACK_ELICITING_THRESHOLD, RpcLimits};
use crate::protocol::{ClientRequest, ClientResponse, PeerRequest, PeerResponse};
use crate::storage::{StorageConfig, Store};
use membership::{GossipMembership, GossipSetup, load_members};
use node::{Node, NodeSettings};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot load TLS material: {0}")]
    Tls(String),
    #[error("cannot open the store in {path}: {reason}")]
    Storage { path: String, reason: String },
    #[error("cannot start membership: {0}")]
    Membership(#[from] membership::MembershipError),
    #[error("{}", departed_message(node, state, *version))]
    Departed {
        node: NodeId,
        state: &'static str,
        version: u64,
    },
    #[error("cannot listen on {address}: {reason}")]
    Listen { address: SocketAddr, reason: String },
}

/// What a node that is no longer a member says when it stops or is started again.
fn departed_message(node: &NodeId, state: &str, version: u64) -> String {
    let why = if state == "left" {
        format!("{node} finished leaving the cluster (ring version {version})")
    } else {
        format!(
            "{node} was removed from the cluster (`dynkv admin cluster remove {node}`, ring version {version})"
        )
    };
    format!(
        "{why}; the other members no longer route to it or wait for it, so it serves nothing. To use this machine again, start it with an empty data directory and join it (`dynkv admin cluster join`)"
    )
}

/// A running node. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub node: Node,
    pub peer_addr: SocketAddr,
    pub client_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub pb_addr: SocketAddr,
    http_server: crate::http::HttpServer,
    pb_server: crate::pb::PbServer,
    peer_server: QuicServer,
    client_server: QuicServer,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    /// Stops accepting, closes connections, and flushes the store.
    pub async fn shutdown(self) {
        for task in &self.background {
            task.abort();
        }
        for task in self.background {
            let _ = task.await;
        }
        self.http_server.shutdown().await;
        self.pb_server.shutdown().await;
        self.client_server.shutdown().await;
        self.peer_server.shutdown().await;
        let store = self.node.store().clone();
        drop(self.node);
        if let Err(error) = store.close().await {
            tracing::warn!(error = %error, "store did not close cleanly");
        }
    }
}

/// How often a node looks for handoffs to send, ring flips to make (as claimant) and copies
/// it no longer needs.
const TRANSFER_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Node settings from a validated config.
pub fn node_settings(config: &Config, validated: &crate::config::Validated) -> NodeSettings {
    NodeSettings {
        bucket_defaults: validated.bucket_defaults,
        allow_mult: config.buckets.allow_mult,
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        max_value_bytes: config.limits.max_value_bytes,
        max_object_bytes: config.limits.max_object_bytes,
        max_merged_object_bytes: config.limits.max_merged_object_bytes,
        max_siblings: config.limits.max_siblings,
        durable_writes: config.storage.sync_writes,
        hint_window: Duration::from_secs(config.hint_window_secs),
        read_repair_chance: config.read_repair_chance,
        speculative_retry: Duration::from_millis(config.speculative_retry_ms),
        handoff_batch: 64,
        transfer_limit: config.transfer_limit,
        transfer_max_bytes_per_sec: config.transfer_max_bytes_per_sec,
        rng_seed: None,
        wall_clock: crate::server::node::WallClock::System,
        // Measured by the running server (see `start`), which owns the data directory.
        space: None,
        aae: crate::server::node::AaeSettings {
            enabled: config.aae.enabled,
            exchange_interval: Duration::from_millis(config.aae.exchange_interval_ms),
            max_repairs_per_exchange: config.aae.max_repairs_per_exchange as usize,
            rebuild_interval: Duration::from_secs(config.aae.rebuild_interval_secs),
        },
        tombstones: crate::server::node::TombstoneSettings {
            reap: config.tombstones.mode == crate::config::TombstoneMode::Reap,
            grace: Duration::from_secs(config.tombstones.grace_secs),
            max_reaps_per_pass: config.tombstones.max_reaps_per_pass as usize,
        },
    }
}

pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    let validated = config.validate()?;
    tls::install_crypto_provider();
    let load = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|error| ServerError::Tls(format!("{}: {error}", path.display())))
    };
    let ca_pem = load(&config.tls.ca_cert)?;
    let node_identity = tls::CertifiedKey {
        cert_pem: load(&config.tls.node_cert)?,
        key_pem: load(&config.tls.node_key)?,
    };
    let limits = RpcLimits {
        max_frame_bytes: config.limits.max_frame_bytes,
        max_in_flight_bytes: config.limits.max_in_flight_bytes,
        max_in_flight_per_connection: config.limits.max_requests_per_connection as usize,
        max_in_flight_requests: config.limits.max_in_flight_requests as usize,
        ..RpcLimits::default()
    };

    let store = Store::open(
        &config.data_dir,
        StorageConfig {
            sync_writes: config.storage.sync_writes,
            cache_bytes: config.storage.cache_mib * 1024 * 1024,
            hints_max_bytes: config.hints.max_bytes,
            memtable_bytes: config.memtable_bytes(),
            aae_trees: config.aae.enabled,
            row_cache_slots: usize::try_from(config.storage.row_cache_slots).unwrap_or(usize::MAX),
        },
    )
    .map_err(|error| ServerError::Storage {
        path: config.data_dir.display().to_string(),
        reason: error.to_string(),
    })?;

    let peer_client_tls = tls::peer_client_config(&ca_pem, &node_identity)
        .map_err(|error| ServerError::Tls(error.to_string()))?;
    // Outgoing peer connections leave from the peer address's IP, with any free port.
    let outgoing = SocketAddr::new(config.peer_listen.ip(), 0);
    // Node-to-node connections ask for sparser ACKs both ways (client connections keep QUIC's
    // default: see `RpcLimits::ack_eliciting_threshold`).
    let peer_limits = RpcLimits {
        ack_eliciting_threshold: PEER_ACK_ELICITING_THRESHOLD,
        ..limits.clone()
    };
    let peers =
        QuicPeers::<PeerRequest, PeerResponse>::new(outgoing, peer_client_tls, peer_limits.clone())
            .map_err(|error| ServerError::Listen {
                address: outgoing,
                reason: error.to_string(),
            })?;
    for (id, address) in &validated.members {
        peers.set_address(id.clone(), *address);
    }

    // Membership: the saved table and the seeds, then gossip. The generation grows on every
    // restart (and is at least the wall-clock second, so a wiped node still outranks its
    // old records).
    let saved = load_members(&config.data_dir)?;
    let previous_generation = saved
        .iter()
        .find(|record| record.node == validated.node_id)
        .map_or(0, |record| record.generation);
    let wall_seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let local = MemberRecord {
        node: validated.node_id.clone(),
        generation: (previous_generation + 1).max(wall_seconds),
        version: 0,
        peer_addr: config.peer_listen.to_string(),
        client_addr: config.client_listen.to_string(),
        hints: Vec::new(),
        ring_version: 0,
    };
    let mut known: Vec<MemberRecord> = saved
        .into_iter()
        .filter(|record| record.node != validated.node_id)
        .collect();
    for (id, address) in &validated.members {
        if *id != validated.node_id && !known.iter().any(|record| &record.node == id) {
            known.push(MemberRecord::unheard(id.clone(), &address.to_string()));
        }
    }
    let seeds = validated.members.iter().map(|(id, _)| id.clone()).collect();
    let peers = Arc::new(peers);
    let address_book_peers = peers.clone();
    let address_book = Box::new(move |record: &MemberRecord| {
        if let Ok(address) = record.peer_addr.parse() {
            address_book_peers.set_address(record.node.clone(), address);
        }
    });
    let gossip = Arc::new(GossipMembership::new(GossipSetup {
        local,
        config: GossipConfig {
            fanout: config.gossip_fanout,
            interval_ms: config.gossip_interval_ms,
            phi_threshold: config.phi_threshold,
        },
        seeds,
        known,
        partition_count: config.partition_count,
        n_val: validated.bucket_defaults.n_val as usize,
        address_book,
        members_file_dir: Some(config.data_dir.clone()),
    })?);
    let mut settings = node_settings(&config, &validated);
    settings.space = Some(Arc::new(crate::storage::SpaceGuard::new(
        config.data_dir.clone(),
        config.storage.min_free_mib.saturating_mul(1024 * 1024),
    )));
    let space = settings.space.clone();
    let node = Node::new(
        validated.node_id.clone(),
        store,
        gossip.clone(),
        peers.clone(),
        settings,
    );
    // A node that was removed, or that finished its leave, serves nothing more: its saved
    // ring says so, and the others no longer wait for it (nor take its requests).
    if let Some((version, state)) = node.gone_from_cluster() {
        return Err(ServerError::Departed {
            node: validated.node_id.clone(),
            state: state.as_str(),
            version,
        });
    }
    // Peer selection only needs to differ between nodes and runs.
    let gossip_seed = node.store().actor() ^ wall_seconds;
    let background = vec![
        tokio::spawn(async move {
            // Free space is measured every second; writes resume by themselves.
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            loop {
                ticker.tick().await;
                if let Some(space) = &space {
                    let space = space.clone();
                    let _ = tokio::task::spawn_blocking(move || space.refresh()).await;
                }
            }
        }),
        tokio::spawn(gossip.run(peers, gossip_seed)),
        tokio::spawn(
            node.clone()
                .run_handoff(Duration::from_millis(config.handoff_interval_ms)),
        ),
        tokio::spawn(node.clone().run_transfers(TRANSFER_CHECK_INTERVAL)),
        tokio::spawn(node.clone().run_aae()),
    ];

    let peer_config = tls::peer_server_config(&ca_pem, &node_identity)
        .map_err(|error| ServerError::Tls(error.to_string()))?;
    let peer_node = node.clone();
    let peer_handler = Arc::new(
        move |request: PeerRequest| -> BoxFuture<'static, PeerResponse> {
            let node = peer_node.clone();
            Box::pin(async move { node.handle_peer(request).await })
        },
    );
    let peer_server = QuicServer::bind(
        config.peer_listen,
        peer_config,
        peer_handler,
        RpcLimits {
            max_connections: config.limits.max_peer_connections as usize,
            limit_name: "limits.max_peer_connections",
            ..peer_limits
        },
    )
    .map_err(|error| ServerError::Listen {
        address: config.peer_listen,
        reason: error.to_string(),
    })?;

    let client_config = tls::client_facing_server_config(&node_identity)
        .map_err(|error| ServerError::Tls(error.to_string()))?;
    let client_node = node.clone();
    let client_token: Option<Arc<str>> = config.client_token.as_deref().map(Arc::from);
    let client_handler = Arc::new(
        move |request: ClientRequest| -> BoxFuture<'static, ClientResponse> {
            let node = client_node.clone();
            let token = client_token.clone();
            Box::pin(async move {
                let request = match crate::protocol::authorize(request, token.as_deref()) {
                    Ok(request) => request,
                    Err(error) => return ClientResponse::Error(error),
                };
                let started = std::time::Instant::now();
                let (operation, level) = match &request {
                    ClientRequest::Ping => ("ping", None),
                    ClientRequest::Members
                    | ClientRequest::Status
                    | ClientRequest::Ring
                    | ClientRequest::Transfers
                    | ClientRequest::Aae
                    | ClientRequest::AaeRepair { .. }
                    | ClientRequest::Cluster(_) => ("admin", None),
                    ClientRequest::Get { options, .. } => ("get", Some(options.r)),
                    ClientRequest::Put { options, .. } => ("put", Some(options.w)),
                    ClientRequest::Delete { options, .. } => ("delete", Some(options.w)),
                    ClientRequest::WithToken { .. } => ("invalid", None),
                };
                let response = node.handle_client(request).await;
                let outcome = match &response {
                    ClientResponse::NotFound { .. } => "not_found",
                    ClientResponse::Error(error) => match error.kind {
                        crate::protocol::ErrorKind::InvalidRequest
                        | crate::protocol::ErrorKind::TooLarge
                        | crate::protocol::ErrorKind::Unauthorized => "client_error",
                        crate::protocol::ErrorKind::InsufficientStorage
                        | crate::protocol::ErrorKind::NotServing => "unavailable",
                        crate::protocol::ErrorKind::QuorumUnmet(_)
                        | crate::protocol::ErrorKind::Timeout(_) => "unavailable",
                        crate::protocol::ErrorKind::Internal => "error",
                    },
                    _ => "ok",
                };
                crate::http::stats::record_level_metrics(
                    "native",
                    operation,
                    level,
                    outcome,
                    started.elapsed(),
                );
                response
            })
        },
    );
    // One byte budget for the request bodies of every client-facing listener (the peer
    // listener keeps its own, so a coordinator never waits on budget its replicas need).
    let client_bodies = ByteBudget::new(config.limits.max_in_flight_bytes);
    let budget_wait = Duration::from_millis(config.request_timeout_ms);
    let client_server = QuicServer::bind_sharing(
        config.client_listen,
        client_config,
        client_handler,
        RpcLimits {
            max_connections: config.limits.max_client_connections as usize,
            limit_name: "limits.max_client_connections",
            ..limits
        },
        client_bodies.clone(),
    )
    .map_err(|error| ServerError::Listen {
        address: config.client_listen,
        reason: error.to_string(),
    })?;

    let http_tls = if config.http_tls {
        let mut tls_config = tls::client_facing_server_config(&node_identity)
            .map_err(|error| ServerError::Tls(error.to_string()))?;
        tls_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(Arc::new(tls_config))
    } else {
        None
    };
    let http_server = crate::http::HttpServer::start(
        node.clone(),
        crate::http::HttpSettings {
            address: config.http_listen,
            max_body_bytes: config.limits.max_value_bytes,
            body_budget: client_bodies.clone(),
            budget_wait,
            concurrency: config.limits.http_concurrency as usize,
            max_connections: config.limits.max_http_connections as usize,
            tls: http_tls,
            token: config.http_token.clone(),
        },
    )
    .await
    .map_err(|error| ServerError::Listen {
        address: config.http_listen,
        reason: error.to_string(),
    })?;

    let pb_tls = if config.pb_tls {
        let mut tls_config = tls::client_facing_server_config(&node_identity)
            .map_err(|error| ServerError::Tls(error.to_string()))?;
        // Riak clients start TLS inside the protocol and negotiate no application protocol.
        tls_config.alpn_protocols = Vec::new();
        Some(Arc::new(tls_config))
    } else {
        None
    };
    let pb_server = crate::pb::PbServer::start(
        node.clone(),
        crate::pb::PbSettings {
            address: config.pb_listen,
            max_frame_bytes: config.limits.max_frame_bytes as usize,
            body_budget: client_bodies,
            budget_wait,
            max_connections: config.limits.max_client_connections as usize,
            tls: pb_tls,
            token: config.http_token.clone(),
        },
    )
    .await
    .map_err(|error| ServerError::Listen {
        address: config.pb_listen,
        reason: error.to_string(),
    })?;

    let peer_addr = peer_server.local_addr();
    let client_addr = client_server.local_addr();
    let http_addr = http_server.local_addr;
    let pb_addr = pb_server.local_addr;
    info!(node = %validated.node_id, %peer_addr, %client_addr, %http_addr, %pb_addr, members = validated.members.len(), "node started");
    Ok(RunningServer {
        node,
        peer_addr,
        client_addr,
        http_addr,
        pb_addr,
        http_server,
        pb_server,
        peer_server,
        client_server,
        background,
    })
}

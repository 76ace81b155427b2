//! A whole cluster in one process: the real `Node` code over the in-memory network, each
//! node with its store on a simulated disk (`storage::MemoryDisk`, which passes the same
//! storage suite as fjall) whose crash loses what was not fsynced. Time is tokio's paused
//! clock and all randomness comes from one seed, so a failing seed reproduces.

#![allow(dead_code)]

use dynkv::config::{Config, Validated};
use dynkv::core::gossip::{GossipConfig, MemberRecord};
use dynkv::core::ids::NodeId;
use dynkv::core::object::StoredObject;
use dynkv::core::quorum::BucketDefaults;
use dynkv::core::ring::Ring;
use dynkv::net::{BoxFuture, MemoryNetwork};
use dynkv::protocol::{ClientRequest, ClientResponse, PeerRequest, PeerResponse};
use dynkv::server::membership::{GossipMembership, GossipSetup, Membership, load_members};
use dynkv::server::node::{Node, NodeSettings, StaticMembership, WallClock, WeakNode};
use dynkv::server::node_settings;
use dynkv::storage::{MemoryDisk, StorageConfig, Store};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct SimCluster {
    pub network: MemoryNetwork<PeerRequest, PeerResponse>,
    /// Nodes gossip (and hand off hints) instead of using a static member list.
    gossip: bool,
    seed: u64,
    /// Gossip and handoff tasks of each running node, aborted when it crashes.
    background: BTreeMap<NodeId, Vec<tokio::task::JoinHandle<()>>>,
    pub ring: Ring,
    pub ids: Vec<NodeId>,
    nodes: BTreeMap<NodeId, Node>,
    directories: BTreeMap<NodeId, PathBuf>,
    /// Each node's simulated disk; it outlives the node's crashes.
    disks: BTreeMap<NodeId, Arc<MemoryDisk>>,
    settings: NodeSettings,
    /// Node starts so far, to give every boot its own random sequence.
    boots: u64,
    /// Nodes added after the cluster was created: their seeds are the others, not themselves,
    /// so they join the existing ring instead of creating one.
    joiners: std::collections::BTreeSet<NodeId>,
    /// Each node's bound on hint storage (`hints.max_bytes`).
    pub hints_max_bytes: u64,
    _root: tempfile::TempDir,
}

pub fn default_settings() -> NodeSettings {
    let config = Config::default();
    let validated = Validated {
        node_id: NodeId::new("n1").unwrap(),
        members: Vec::new(),
        bucket_defaults: BucketDefaults::default(),
    };
    let mut settings = node_settings(&config, &validated);
    settings.request_timeout = Duration::from_millis(500);
    settings
}

impl SimCluster {
    pub async fn start(node_count: usize, seed: u64, settings: NodeSettings) -> SimCluster {
        Self::build(
            node_count,
            seed,
            settings,
            false,
            StorageConfig::default().hints_max_bytes,
        )
        .await
    }

    /// A cluster whose nodes find each other by gossip (every node is given every other as a
    /// seed) and hand hints back to returning primaries.
    pub async fn start_gossiping(
        node_count: usize,
        seed: u64,
        settings: NodeSettings,
    ) -> SimCluster {
        Self::build(
            node_count,
            seed,
            settings,
            true,
            StorageConfig::default().hints_max_bytes,
        )
        .await
    }

    /// [`SimCluster::start_gossiping`] with each node's hint storage bounded to
    /// `hints_max_bytes`.
    pub async fn start_gossiping_with(
        node_count: usize,
        seed: u64,
        settings: NodeSettings,
        hints_max_bytes: u64,
    ) -> SimCluster {
        Self::build(node_count, seed, settings, true, hints_max_bytes).await
    }

    async fn build(
        node_count: usize,
        seed: u64,
        mut settings: NodeSettings,
        gossip: bool,
        hints_max_bytes: u64,
    ) -> SimCluster {
        // Timestamps follow the paused clock (a clock jump moves them; a seed replays them).
        settings.wall_clock = WallClock::FollowsRuntime {
            start_micros: 1_800_000_000_000_000,
            origin: tokio::time::Instant::now(),
        };
        let root = tempfile::tempdir().expect("temporary directory");
        let ids: Vec<NodeId> = (1..=node_count)
            .map(|index| NodeId::new(format!("n{index}")).unwrap())
            .collect();
        let ring = Ring::new(64, &ids, settings.bucket_defaults.n_val as usize).unwrap();
        let network = MemoryNetwork::new(rand::SeedableRng::seed_from_u64(seed));
        let mut cluster = SimCluster {
            network,
            gossip,
            seed,
            background: BTreeMap::new(),
            ring,
            ids: ids.clone(),
            nodes: BTreeMap::new(),
            directories: BTreeMap::new(),
            disks: BTreeMap::new(),
            settings,
            boots: 0,
            joiners: Default::default(),
            hints_max_bytes,
            _root: root,
        };
        for id in ids {
            let directory = cluster._root.path().join(id.as_str());
            std::fs::create_dir_all(&directory).expect("node directory");
            cluster.directories.insert(id.clone(), directory);
            cluster.disks.insert(id.clone(), MemoryDisk::new());
            cluster.boot(&id);
        }
        cluster
    }

    /// Opens the node's store from its directory and puts the node on the network.
    fn boot(&mut self, id: &NodeId) {
        let directory = &self.directories[id];
        let store = Store::open_in_memory(
            &self.disks[id],
            StorageConfig {
                sync_writes: self.settings.durable_writes,
                cache_bytes: 8 * 1024 * 1024,
                hints_max_bytes: self.hints_max_bytes,
                ..StorageConfig::default()
            },
        )
        .expect("store opens");
        let transport = Arc::new(self.network.transport(id.clone()));
        let (membership, gossip): (Arc<dyn Membership>, _) = if self.gossip {
            let saved = load_members(directory).expect("member table readable");
            let generation = saved
                .iter()
                .find(|record| &record.node == id)
                .map_or(0, |record| record.generation)
                + 1;
            let record = |node: &NodeId, generation| MemberRecord {
                node: node.clone(),
                generation,
                version: 0,
                peer_addr: format!("{node}:peer"),
                client_addr: format!("{node}:client"),
                hints: Vec::new(),
                ring_version: 0,
            };
            let known = self
                .ids
                .iter()
                .filter(|other| *other != id)
                .map(|other| record(other, 0))
                .collect();
            let seeds = if self.joiners.contains(id) {
                self.ids
                    .iter()
                    .filter(|other| *other != id)
                    .cloned()
                    .collect()
            } else {
                self.ids
                    .iter()
                    .filter(|other| !self.joiners.contains(*other))
                    .cloned()
                    .collect()
            };
            let gossip = Arc::new(
                GossipMembership::new(GossipSetup {
                    local: record(id, generation),
                    config: GossipConfig::default(),
                    seeds,
                    known,
                    partition_count: 64,
                    n_val: self.settings.bucket_defaults.n_val as usize,
                    address_book: Box::new(|_| {}),
                    members_file_dir: Some(directory.clone()),
                })
                .expect("membership starts"),
            );
            (gossip.clone(), Some(gossip))
        } else {
            (Arc::new(StaticMembership::new(self.ring.clone())), None)
        };
        let mut settings = self.settings.clone();
        // Each boot of each node draws its own sequence (the same for every run of the seed),
        // as a real node seeds from the OS.
        self.boots += 1;
        settings.rng_seed = Some(
            self.seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(self.boots),
        );
        let node = Node::new(id.clone(), store, membership, transport.clone(), settings);
        if let Some(gossip) = gossip {
            let seed = self
                .seed
                .wrapping_mul(1000)
                .wrapping_add(self.background.len() as u64);
            self.background.insert(
                id.clone(),
                vec![
                    tokio::spawn(gossip.run(transport, seed)),
                    tokio::spawn(node.clone().run_handoff(Duration::from_millis(500))),
                    tokio::spawn(node.clone().run_transfers(Duration::from_millis(500))),
                    tokio::spawn(node.clone().run_aae()),
                ],
            );
        }
        let handler_node = node.clone();
        self.network.register(
            id.clone(),
            Arc::new(
                move |request: PeerRequest| -> BoxFuture<'static, PeerResponse> {
                    let node = handler_node.clone();
                    Box::pin(async move { node.handle_peer(request).await })
                },
            ),
        );
        self.nodes.insert(id.clone(), node);
    }

    pub fn is_up(&self, id: &NodeId) -> bool {
        self.nodes.contains_key(id)
    }

    pub fn up_nodes(&self) -> Vec<NodeId> {
        self.nodes.keys().cloned().collect()
    }

    /// Crashes a node: it vanishes from the network at once (calls to it time out) and its
    /// disk loses every write not yet fsynced; its in-flight work can no longer touch the
    /// disk and runs out by its deadline. Pass the handle to [`wait_until_stopped`] before
    /// restarting it.
    pub fn crash(&mut self, id: &NodeId) -> Option<WeakNode> {
        self.network.unregister(id);
        if let Some(disk) = self.disks.get(id) {
            disk.crash();
        }
        for task in self.background.remove(id).unwrap_or_default() {
            task.abort();
        }
        self.nodes.remove(id).map(|node| node.downgrade())
    }

    /// A handle on a running node, to send it client requests without holding the cluster.
    pub fn node(&self, id: &NodeId) -> Option<Node> {
        self.nodes.get(id).cloned()
    }

    /// Starts a new node that joins the running (gossiping) cluster, as `dynkv server` with
    /// the existing members as seeds does.
    pub fn add_node(&mut self, id: &NodeId) {
        assert!(self.gossip, "only a gossiping cluster can grow");
        let directory = self._root.path().join(id.as_str());
        std::fs::create_dir_all(&directory).expect("node directory");
        self.directories.insert(id.clone(), directory);
        self.disks.insert(id.clone(), MemoryDisk::new());
        self.joiners.insert(id.clone());
        self.ids.push(id.clone());
        self.boot(id);
    }

    /// The cluster state (versioned ring) a running gossiping node holds.
    pub fn cluster_state(&self, id: &NodeId) -> Option<Arc<dynkv::core::cluster::ClusterState>> {
        let node = self.nodes.get(id)?;
        node.membership()
            .gossip()
            .map(|gossip| gossip.cluster_state())
    }

    /// Restarts a crashed node from its data directory.
    pub fn restart(&mut self, id: &NodeId) {
        assert!(!self.is_up(id), "{id} is running");
        self.boot(id);
    }

    pub async fn client(&self, via: &NodeId, request: ClientRequest) -> ClientResponse {
        match self.nodes.get(via) {
            Some(node) => node.handle_client(request).await,
            None => panic!("client sent a request to {via}, which is down"),
        }
    }

    /// The replica copy of a key on one node, read from its store.
    pub async fn replica(&self, id: &NodeId, bucket: &[u8], key: &[u8]) -> Option<StoredObject> {
        let node = self.nodes.get(id)?;
        replica_copy(node, &self.ring, bucket, key).await
    }

    /// The newest ring a running node holds (the start's ring without gossip).
    pub fn current_ring(&self) -> Ring {
        self.nodes
            .keys()
            .filter_map(|id| self.cluster_state(id))
            .max_by_key(|state| state.version())
            .map_or_else(|| self.ring.clone(), |state| state.ring().clone())
    }

    /// The nodes that hold replicas of a key, under the newest ring.
    pub fn replicas_of(&self, bucket: &[u8], key: &[u8]) -> Vec<NodeId> {
        let ring = self.current_ring();
        let partition = ring.partition_for_key(bucket, key);
        ring.preference_list(partition, self.settings.bucket_defaults.n_val as usize)
            .into_iter()
            .map(|(_, node)| node)
            .collect()
    }
}

/// Every copy of a key that a running node holds: its replica copy and the hints it keeps
/// for any of `ids`.
pub async fn node_copies(
    node: &Node,
    ring: &Ring,
    ids: &[NodeId],
    bucket: &[u8],
    key: &[u8],
) -> Vec<StoredObject> {
    node_copies_by_holder(node, ring, ids, bucket, key)
        .await
        .into_iter()
        .map(|(_, copy)| copy)
        .collect()
}

/// [`node_copies`], each with the primary its hint is kept for (`None`: the replica copy).
pub async fn node_copies_by_holder(
    node: &Node,
    ring: &Ring,
    ids: &[NodeId],
    bucket: &[u8],
    key: &[u8],
) -> Vec<(Option<NodeId>, StoredObject)> {
    let partition = ring.partition_for_key(bucket, key);
    let mut copies = Vec::new();
    let holders = std::iter::once(None).chain(
        ids.iter()
            .filter(|other| *other != node.id())
            .map(|other| Some(other.clone())),
    );
    for hint_for in holders {
        let response = node
            .handle_peer(PeerRequest::ReplicaGet {
                partition,
                bucket: bucket.to_vec(),
                key: key.to_vec(),
                hint_for: hint_for.clone(),
                ring_version: 0,
            })
            .await;
        if let PeerResponse::Object(Some(object)) = response {
            copies.push((hint_for, object));
        }
    }
    copies
}

impl SimCluster {
    /// A node's simulated disk (to slow its fsyncs, say).
    pub fn disk(&self, id: &NodeId) -> Arc<MemoryDisk> {
        self.disks[id].clone()
    }

    /// Handles on every running node.
    pub fn running_nodes(&self) -> Vec<Node> {
        self.nodes.values().cloned().collect()
    }
}

/// Waits (in simulated time) until a crashed node's last task has finished.
pub async fn wait_until_stopped(node: WeakNode) {
    for _ in 0..400 {
        if node.is_dead() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("a crashed node was still in use 20 simulated seconds later");
}

/// The copy of a key that `node` holds, read from its store.
pub async fn replica_copy(
    node: &Node,
    ring: &Ring,
    bucket: &[u8],
    key: &[u8],
) -> Option<StoredObject> {
    let partition = ring.partition_for_key(bucket, key);
    match node
        .handle_peer(PeerRequest::ReplicaGet {
            partition,
            bucket: bucket.to_vec(),
            key: key.to_vec(),
            hint_for: None,
            ring_version: 0,
        })
        .await
    {
        PeerResponse::Object(object) => object,
        other => panic!("replica read on {} failed: {other:?}", node.id()),
    }
}

//! Where a node learns the ring and who is up: the [`Membership`] seam, with a static
//! implementation (a fixed member list, for tests) and the gossip one that `dynkv server` runs.

use crate::core::cluster::{ClusterState, ClusterStateError};
use crate::core::gossip::{Digest, Gossip, GossipConfig, MemberRecord, MembershipChange};
use crate::core::ids::NodeId;
use crate::core::ring::{Ring, RingError};
use crate::net::Transport;
use crate::protocol::{MemberInfo, PeerRequest, PeerResponse};
use parking_lot::{Mutex, RwLock};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, debug, info, info_span, warn};

/// Where the node learns the current ring and which members are up.
pub trait Membership: Send + Sync + 'static {
    fn ring(&self) -> Arc<Ring>;
    /// The committed ring that takes effect once its handoffs are done, while a ring change
    /// is pending: writes reach a quorum of it too.
    fn pending_ring(&self) -> Option<Arc<Ring>> {
        None
    }
    /// This node's judgement; a node judged down is routed around, never removed.
    fn is_up(&self, node: &NodeId) -> bool;
    fn view(&self) -> Vec<MemberInfo>;
    /// How long `node` has been silent, as this node's failure detector sees it (`None`:
    /// never heard, or membership without a detector).
    fn silent_for(&self, _node: &NodeId) -> Option<std::time::Duration> {
        None
    }
    /// The gossip state, when membership is gossiped.
    fn gossip(&self) -> Option<&GossipMembership> {
        None
    }
}

/// A member list fixed at start-up, every member always considered up.
pub struct StaticMembership {
    ring: Arc<Ring>,
}

impl StaticMembership {
    pub fn new(ring: Ring) -> Self {
        StaticMembership {
            ring: Arc::new(ring),
        }
    }
}

impl Membership for StaticMembership {
    fn ring(&self) -> Arc<Ring> {
        self.ring.clone()
    }

    fn is_up(&self, _node: &NodeId) -> bool {
        true
    }

    fn view(&self) -> Vec<MemberInfo> {
        self.ring
            .members()
            .into_iter()
            .map(|node| MemberInfo {
                node: node.to_string(),
                peer_addr: String::new(),
                client_addr: String::new(),
                up: true,
                phi: 0.0,
                silent_ms: None,
                generation: 0,
                hints_held: 0,
                state: "valid".into(),
                ring_version: self.ring.version(),
            })
            .collect()
    }
}

/// Called with each member's record when it is learned or its address changes, so the
/// transport knows where to dial it.
pub type AddressBook = Box<dyn Fn(&MemberRecord) + Send + Sync>;

const MEMBERS_FILE: &str = "members";
const MEMBERS_FORMAT_VERSION: u8 = 1;
/// The cluster state (versioned ring) this node last adopted, saved so a restart keeps it.
const RING_FILE: &str = "ring";
const RING_FORMAT_VERSION: u8 = 1;

/// What [`GossipMembership::new`] starts from.
pub struct GossipSetup {
    /// This node's own record, its generation already chosen.
    pub local: MemberRecord,
    pub config: GossipConfig,
    /// Members contacted while this node knows few others: the `--member` list. When it
    /// names this node (or is empty), a data directory without a saved ring starts ring
    /// version 1 of these members; otherwise this node is joining an existing cluster.
    pub seeds: Vec<NodeId>,
    /// Members from the config (seeds) and from the saved table.
    pub known: Vec<MemberRecord>,
    pub partition_count: u32,
    pub n_val: usize,
    pub address_book: AddressBook,
    /// Where the member table is saved (the data directory); `None` keeps it in memory.
    pub members_file_dir: Option<PathBuf>,
}

/// A cluster state with its ring and pending ring, each shared.
type Routing = (Arc<ClusterState>, Arc<Ring>, Option<Arc<Ring>>);

/// Membership by gossip over the peer transport (see `core::gossip`).
pub struct GossipMembership {
    state: Mutex<Gossip>,
    /// The adopted cluster state, its ring and its pending ring (kept apart so requests clone
    /// an `Arc` only).
    current: RwLock<Routing>,
    seeds: Vec<NodeId>,
    epoch: tokio::time::Instant,
    address_book: AddressBook,
    /// The member table is saved here on every membership change, so a restarted node
    /// knows the cluster without its seeds.
    members_file: Option<PathBuf>,
    ring_file: Option<PathBuf>,
    /// Held while the member table is written. Gossip tasks merge records at once, and
    /// each write goes through the one temporary file beside the table: unserialized, two
    /// writers shared it (one's rename failing, or one's bytes landing in the other's file)
    /// and an older table could be renamed over a newer one.
    members_write: Mutex<()>,
    /// Held while the ring file is written or removed, for the same reasons: two gossip
    /// tasks adopting rings at once left the older ring on disk or failed with "No such file
    /// or directory" (seen in the container suite).
    ring_write: Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Cluster(#[from] ClusterStateError),
    #[error("ring file {path} is unreadable: {reason}")]
    RingFile { path: PathBuf, reason: String },
    #[error("member file {path} is unreadable: {reason}")]
    MembersFile { path: PathBuf, reason: String },
}

/// Reads the member table saved by an earlier run; none when the directory is new.
pub fn load_members(data_dir: &std::path::Path) -> Result<Vec<MemberRecord>, MembershipError> {
    let path = data_dir.join(MEMBERS_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(MembershipError::MembersFile {
                path,
                reason: error.to_string(),
            });
        }
    };
    let unreadable = |reason: String| MembershipError::MembersFile {
        path: path.clone(),
        reason,
    };
    let (&version, body) = bytes
        .split_first()
        .ok_or_else(|| unreadable("empty".into()))?;
    if version != MEMBERS_FORMAT_VERSION {
        return Err(unreadable(format!(
            "format version {version}, expected {MEMBERS_FORMAT_VERSION}"
        )));
    }
    let records: Vec<MemberRecord> =
        rmp_serde::from_slice(body).map_err(|error| unreadable(error.to_string()))?;
    crate::core::gossip::check_entry_count(records.len())
        .map_err(|error| unreadable(error.to_string()))?;
    Ok(records)
}

/// Reads the cluster state saved by an earlier run; none when the directory is new.
pub fn load_ring(data_dir: &std::path::Path) -> Result<Option<ClusterState>, MembershipError> {
    let path = data_dir.join(RING_FILE);
    let unreadable = |reason: String| MembershipError::RingFile {
        path: path.clone(),
        reason,
    };
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(unreadable(error.to_string())),
    };
    let (&version, body) = bytes
        .split_first()
        .ok_or_else(|| unreadable("empty".into()))?;
    if version != RING_FORMAT_VERSION {
        return Err(unreadable(format!(
            "format version {version}, expected {RING_FORMAT_VERSION}"
        )));
    }
    rmp_serde::from_slice(body)
        .map(Some)
        .map_err(|error| unreadable(error.to_string()))
}

impl GossipMembership {
    pub fn new(setup: GossipSetup) -> Result<Self, MembershipError> {
        let GossipSetup {
            local,
            config,
            seeds,
            known,
            partition_count,
            n_val,
            address_book,
            members_file_dir,
        } = setup;
        let mut gossip = Gossip::new(local, config);
        for record in &known {
            address_book(record);
        }
        gossip.remember(known, 0);
        let saved = match &members_file_dir {
            Some(dir) => load_ring(dir)?,
            None => None,
        };
        let local = gossip.local().clone();
        let cluster = match saved {
            Some(saved) if saved.ring().partition_count() != partition_count => {
                return Err(MembershipError::RingFile {
                    path: members_file_dir
                        .as_ref()
                        .map(|dir| dir.join(RING_FILE))
                        .unwrap_or_default(),
                    reason: format!(
                        "the saved ring has {} partitions but partition_count is {partition_count}; \
                         the partition count is fixed when a cluster is created",
                        saved.ring().partition_count()
                    ),
                });
            }
            Some(saved) => saved,
            None if seeds.is_empty() || seeds.contains(&local) => {
                // A new cluster: the members named at creation form ring version 1.
                let mut members = seeds.clone();
                if !members.contains(&local) {
                    members.push(local.clone());
                }
                ClusterState::bootstrap(partition_count, &members, n_val)?
            }
            // Started to join: route by the seeds until gossip brings the real ring; this node
            // owns nothing until a committed change gives it partitions.
            None => ClusterState::provisional(partition_count, &seeds, n_val)?,
        };
        let ring = Arc::new(cluster.ring().clone());
        let pending = cluster.pending().cloned().map(Arc::new);
        gossip.set_local_ring_version(cluster.version());
        let membership = GossipMembership {
            state: Mutex::new(gossip),
            current: RwLock::new((Arc::new(cluster), ring, pending)),
            seeds,
            epoch: tokio::time::Instant::now(),
            address_book,
            members_file: members_file_dir.as_ref().map(|dir| dir.join(MEMBERS_FILE)),
            ring_file: members_file_dir.map(|dir| dir.join(RING_FILE)),
            members_write: Mutex::new(()),
            ring_write: Mutex::new(()),
        };
        membership.save_ring();
        // This start's generation is on disk before anything is gossiped: the next start
        // counts up from it, so a generation never goes backwards, even when the wall clock
        // does (peers drop records whose generation is below the one they hold).
        if let Some(path) = &membership.members_file {
            membership
                .write_members()
                .map_err(|reason| MembershipError::MembersFile {
                    path: path.clone(),
                    reason,
                })?;
        }
        Ok(membership)
    }

    /// The cluster state (versioned ring and member states) this node holds.
    pub fn cluster_state(&self) -> Arc<ClusterState> {
        self.current.read().0.clone()
    }

    /// Takes `offered` if it supersedes the state held (same cluster, higher version, or any
    /// committed state while this node's is provisional); returns whether it did.
    pub fn offer_cluster_state(&self, offered: ClusterState) -> bool {
        {
            let mut current = self.current.write();
            if !current.0.is_superseded_by(&offered) {
                if offered.is_committed()
                    && current.0.is_committed()
                    && offered.cluster() != current.0.cluster()
                {
                    debug!(
                        ours = current.0.cluster(),
                        theirs = offered.cluster(),
                        "ignored the ring of another cluster"
                    );
                }
                return false;
            }
            info!(
                from = current.0.version(),
                to = offered.version(),
                cluster = offered.cluster(),
                "adopted a newer ring"
            );
            let ring = Arc::new(offered.ring().clone());
            let pending = offered.pending().cloned().map(Arc::new);
            *current = (Arc::new(offered), ring, pending);
        }
        // After the ring lock is released: no path holds both locks.
        let version = self.cluster_state().version();
        self.state.lock().set_local_ring_version(version);
        self.save_ring();
        true
    }

    /// `dynkv admin cluster join PEER` on a node started alone: it gives up the one-node
    /// cluster it made at its start, routes by `peer` (a member of the cluster to join) as
    /// a provisional ring until gossip brings the real one, and gossips with `peer`. Refused
    /// once the node's ring names other members: it is in a cluster already.
    pub fn forsake_own_cluster_for(&self, peer: MemberRecord) -> Result<(), String> {
        let local = self.state.lock().local().clone();
        if peer.node == local {
            return Err(format!(
                "{local} cannot join itself: name a member of the cluster to join"
            ));
        }
        {
            let mut current = self.current.write();
            let state = &current.0;
            let others: Vec<String> = state
                .members()
                .keys()
                .filter(|member| **member != local)
                .map(ToString::to_string)
                .collect();
            if state.is_committed() && !others.is_empty() {
                return Err(format!(
                    "{local} is already in cluster {} with {}; `cluster join PEER` is for a node started alone",
                    state.cluster(),
                    others.join(", ")
                ));
            }
            if state.is_committed() {
                // One member owns every partition whatever the n_val.
                let provisional = ClusterState::provisional(
                    state.ring().partition_count(),
                    std::slice::from_ref(&peer.node),
                    1,
                )
                .map_err(|error| error.to_string())?;
                info!(peer = %peer.node, cluster = state.cluster(), "left this node's own one-node cluster to join another");
                let ring = Arc::new(provisional.ring().clone());
                *current = (Arc::new(provisional), ring, None);
            }
        }
        self.state.lock().set_local_ring_version(0);
        if let Some(path) = &self.ring_file {
            let _writing = self.ring_write.lock();
            if let Err(error) = std::fs::remove_file(path)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                return Err(format!("cannot remove {}: {error}", path.display()));
            }
        }
        (self.address_book)(&peer);
        let now_ms = self.now_ms();
        self.state.lock().remember(vec![peer], now_ms);
        self.save_members();
        Ok(())
    }

    /// Tells the transport where `node` listens (as a gossiped record would).
    pub fn learn_address(&self, node: &NodeId, peer_addr: &str) {
        (self.address_book)(&MemberRecord::unheard(node.clone(), peer_addr));
    }

    /// Saves the cluster state held now, if committed (a provisional one is not worth
    /// keeping). Read under the write lock, so the last write is of the newest state whatever
    /// order the callers come in.
    fn save_ring(&self) {
        let Some(path) = &self.ring_file else {
            return;
        };
        let _writing = self.ring_write.lock();
        let state = self.cluster_state();
        if !state.is_committed() {
            return;
        }
        let mut bytes = vec![RING_FORMAT_VERSION];
        if let Err(error) = rmp_serde::encode::write_named(&mut bytes, &*state) {
            warn!(error = %error, "cannot encode the ring");
            return;
        }
        if let Err(error) = crate::storage::write_file_durably(path, &bytes) {
            warn!(path = %path.display(), error = %error, "cannot save the ring");
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.state.lock().config().interval_ms)
    }

    /// Gossip step 2, at the receiver.
    pub fn answer(&self, digests: &[Digest]) -> (Vec<MemberRecord>, Vec<NodeId>) {
        self.state.lock().answer_digest(digests)
    }

    pub fn records_for(&self, nodes: &[NodeId]) -> Vec<MemberRecord> {
        self.state.lock().records_for(nodes)
    }

    /// Merges records from a peer. A new member changes no ownership: it is joining until a
    /// committed ring gives it partitions.
    pub fn apply(&self, records: Vec<MemberRecord>) {
        let now_ms = self.now_ms();
        let (changes, table) = {
            let mut state = self.state.lock();
            let changes = state.apply(records, now_ms);
            (changes, state.records())
        };
        if changes.is_empty() {
            return;
        }
        for change in &changes {
            match change {
                MembershipChange::Joined(node) => info!(member = %node, "member appeared"),
                MembershipChange::Restarted(node) => info!(member = %node, "member restarted"),
                MembershipChange::AddressChanged(node) => {
                    info!(member = %node, "member address changed")
                }
            }
            let node = match change {
                MembershipChange::Joined(node)
                | MembershipChange::Restarted(node)
                | MembershipChange::AddressChanged(node) => node,
            };
            if let Some(record) = table.iter().find(|record| &record.node == node) {
                (self.address_book)(record);
            }
        }
        self.save_members();
    }

    /// Saves the member table held now, read under the write lock (as [`Self::save_ring`]).
    fn save_members(&self) {
        if let Err(error) = self.write_members() {
            warn!(error = %error, "cannot save the member table");
        }
    }

    /// Writes the member table (this node's own record included) durably.
    fn write_members(&self) -> Result<(), String> {
        let Some(path) = &self.members_file else {
            return Ok(());
        };
        let _writing = self.members_write.lock();
        let table = self.state.lock().records();
        let mut bytes = vec![MEMBERS_FORMAT_VERSION];
        rmp_serde::encode::write(&mut bytes, &table)
            .map_err(|error| format!("cannot encode the member table: {error}"))?;
        // Written aside, fsynced and renamed (and the directory fsynced), so a crash or power
        // loss leaves the old table or the new one, never an empty file that stops the node
        // from starting.
        crate::storage::write_file_durably(path, &bytes)
            .map_err(|error| format!("cannot write {}: {error}", path.display()))
    }

    /// Runs gossip rounds until the task is aborted. `seed` seeds peer selection.
    pub async fn run(
        self: Arc<Self>,
        transport: Arc<dyn Transport<PeerRequest, PeerResponse>>,
        seed: u64,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let interval = self.interval();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now_ms = self.now_ms();
            let (peers, digests) = {
                let mut state = self.state.lock();
                state.tick();
                (
                    state.select_peers(now_ms, &self.seeds, &mut rng),
                    state.digests(),
                )
            };
            let (ring_version, ring_fingerprint) = {
                let ours = self.cluster_state();
                (ours.version(), ours.fingerprint())
            };
            for peer in peers {
                let membership = self.clone();
                let transport = transport.clone();
                let digests = digests.clone();
                let span = info_span!("gossip", peer = %peer);
                tokio::spawn(
                    async move {
                        let timeout = interval * 2;
                        let reply = transport
                            .call(
                                &peer,
                                PeerRequest::GossipDigest {
                                    digests,
                                    ring_version,
                                    ring_fingerprint,
                                },
                                timeout,
                            )
                            .await;
                        match reply {
                            Ok(PeerResponse::GossipReply {
                                records,
                                requests,
                                ring,
                                ring_version: their_version,
                                ring_fingerprint: their_fingerprint,
                            }) => {
                                if crate::core::gossip::check_entry_count(
                                    records.len().max(requests.len()),
                                )
                                .is_err()
                                {
                                    warn!("oversized gossip reply ignored");
                                    return;
                                }
                                membership.apply(records);
                                if let Some(ring) = ring {
                                    membership.offer_cluster_state(*ring);
                                }
                                let ours = membership.cluster_state();
                                let push_ring = ours
                                    .is_news_to(their_version, their_fingerprint)
                                    .then(|| Box::new((*ours).clone()));
                                if !requests.is_empty() || push_ring.is_some() {
                                    let records = membership.records_for(&requests);
                                    let _ = transport
                                        .call(
                                            &peer,
                                            PeerRequest::GossipPush {
                                                records,
                                                ring: push_ring,
                                            },
                                            timeout,
                                        )
                                        .await;
                                }
                            }
                            Ok(other) => debug!(response = ?other, "unexpected gossip reply"),
                            Err(error) => debug!(error = %error, "gossip round failed"),
                        }
                    }
                    .instrument(span),
                );
            }
        }
    }
}

impl GossipMembership {
    /// Publishes the hints this node holds, per partition, with its next heartbeats.
    pub fn set_local_hints(&self, hints: Vec<(u32, u64)>) {
        self.state.lock().set_local_hints(hints);
    }

    /// Hints held for `partition` anywhere in the cluster, as last gossiped by each member.
    pub fn hints_for_partition(&self, partition: u32) -> u64 {
        self.state.lock().hints_for_partition(partition)
    }
}

impl Membership for GossipMembership {
    fn ring(&self) -> Arc<Ring> {
        self.current.read().1.clone()
    }

    fn pending_ring(&self) -> Option<Arc<Ring>> {
        self.current.read().2.clone()
    }

    fn is_up(&self, node: &NodeId) -> bool {
        let now_ms = self.now_ms();
        self.state.lock().is_up(node, now_ms)
    }

    fn silent_for(&self, node: &NodeId) -> Option<std::time::Duration> {
        let now_ms = self.now_ms();
        self.state
            .lock()
            .silent_ms(node, now_ms)
            .map(std::time::Duration::from_millis)
    }

    fn view(&self) -> Vec<MemberInfo> {
        let now_ms = self.now_ms();
        let cluster = self.cluster_state();
        self.state
            .lock()
            .view(now_ms)
            .into_iter()
            .map(|view| MemberInfo {
                node: view.record.node.to_string(),
                peer_addr: view.record.peer_addr,
                client_addr: view.record.client_addr,
                up: view.up,
                phi: if view.phi.is_finite() {
                    view.phi
                } else {
                    f64::MAX
                },
                silent_ms: view.silent_ms,
                generation: view.record.generation,
                hints_held: view.record.hints.iter().map(|(_, count)| count).sum(),
                ring_version: view.record.ring_version,
                state: cluster
                    .state_of(&view.record.node)
                    .map_or("joining", |state| state.as_str())
                    .to_string(),
            })
            .collect()
    }

    fn gossip(&self) -> Option<&GossipMembership> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::cluster::StagedChange;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).expect("a valid node id")
    }

    fn membership_saving_in(dir: &std::path::Path, members: &[NodeId]) -> GossipMembership {
        membership_of_generation(dir, members, 1)
    }

    /// A membership of `members[0]` at `generation`, saving its files in `dir`.
    fn membership_of_generation(
        dir: &std::path::Path,
        members: &[NodeId],
        generation: u64,
    ) -> GossipMembership {
        let mut local = MemberRecord::unheard(members[0].clone(), "127.0.0.1:1");
        local.generation = generation;
        GossipMembership::new(GossipSetup {
            local,
            config: GossipConfig::default(),
            seeds: members.to_vec(),
            known: Vec::new(),
            partition_count: 16,
            n_val: 3,
            address_book: Box::new(|_| {}),
            members_file_dir: Some(dir.to_path_buf()),
        })
        .expect("membership starts")
    }

    /// A start writes its own generation to the member table before it gossips, so the next
    /// start counts up from it whatever the wall clock says. Before, the table was written
    /// only on membership changes: a restart with the clock set back chose a generation below
    /// the one peers held, and they ignored the node's records.
    #[test]
    fn a_start_saves_its_generation_before_gossiping() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let members = [node("n1"), node("n2"), node("n3")];
        let _membership = membership_of_generation(dir.path(), &members, 1_005);
        let saved = load_members(dir.path()).expect("member table readable");
        let own = saved.iter().find(|record| record.node == members[0]);
        assert_eq!(own.map(|record| record.generation), Some(1_005));
    }

    /// Gossip tasks adopt rings at once (each peer's answer on its own task). Whatever order
    /// their saves run in, the file on disk must hold the newest ring adopted. Before the
    /// saves were serialized they shared one temporary file, and this failed 5 runs of 5.
    #[test]
    fn rings_adopted_by_many_threads_at_once_leave_the_newest_on_disk() {
        const THREADS: usize = 6;
        let members = [node("n1"), node("n2"), node("n3")];
        let joiner = node("n4");
        let mut states = vec![ClusterState::bootstrap(16, &members, 3).expect("bootstrap")];
        for step in 0..60 {
            let last = states.last().expect("one state at least");
            let next = if step % 2 == 0 {
                last.stage(&joiner, StagedChange::Join)
            } else {
                last.clear()
            };
            states.push(next.expect("a staging step"));
        }
        let newest = states.last().expect("states").version();
        for round in 0..30 {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let membership = membership_saving_in(dir.path(), &members);
            std::thread::scope(|scope| {
                for thread in 0..THREADS {
                    let membership = &membership;
                    let states = &states;
                    scope.spawn(move || {
                        for state in states.iter().skip(1 + thread).step_by(THREADS) {
                            membership.offer_cluster_state(state.clone());
                        }
                    });
                }
            });
            assert_eq!(membership.cluster_state().version(), newest);
            let saved = load_ring(dir.path())
                .expect("the saved ring reads back")
                .expect("a ring was saved");
            assert_eq!(
                saved.version(),
                newest,
                "round {round}: the ring on disk is older than the one adopted"
            );
            assert!(
                !dir.path().join("ring.tmp").exists(),
                "round {round}: a temporary ring file was left behind"
            );
        }
    }
}

//! Staged ring changes (`dynkv admin cluster ...`): every change is made by the claimant, so
//! a request that arrives elsewhere is forwarded to it; the claimant makes the next cluster
//! state, adopts it, and gossip carries it to the others.

use super::*;
use crate::core::cluster::{ClusterState, MemberState, StagedChange};
use crate::protocol::{ClusterRequest, PlanInfo};

/// Forwards a change may take: client → any node → claimant (a joining node first reaches a
/// member, which knows the claimant).
const MAX_CLUSTER_HOPS: u8 = 2;

impl Node {
    pub(super) async fn cluster_change(&self, request: ClusterRequest, hops: u8) -> ClientResponse {
        let Some(gossip) = self.inner.membership.gossip() else {
            return ClientResponse::Error(ClientError::invalid(
                "this node's membership is static; ring changes need gossip",
            ));
        };
        if let ClusterRequest::JoinVia { peer, peer_addr } = request {
            if hops > 0 {
                return ClientResponse::Error(ClientError::invalid(
                    "a join through a peer is made on the joining node only",
                ));
            }
            return self.join_via(gossip, &peer, &peer_addr).await;
        }
        let state = gossip.cluster_state();
        let claimant = state
            .claimant(|node| node == &self.inner.id || self.inner.membership.is_up(node))
            .cloned();
        let claimant = match claimant {
            Some(claimant) if state.is_committed() && claimant == self.inner.id => {
                return self.make_cluster_change(&state, request).await;
            }
            Some(claimant) => claimant,
            None => {
                return error_response(
                    ErrorKind::Timeout(None),
                    "no member that could make ring changes is up".to_string(),
                );
            }
        };
        if hops >= MAX_CLUSTER_HOPS {
            return error_response(
                ErrorKind::Timeout(None),
                format!("the claimant is moving (last asked: {claimant}); try again"),
            );
        }
        // "This node" means the node the client asked; name it before the request travels.
        let this_node = Some(self.inner.id.to_string());
        let request = match request {
            ClusterRequest::Leave { node: None } => ClusterRequest::Leave { node: this_node },
            ClusterRequest::Join { node: None } => ClusterRequest::Join { node: this_node },
            other => other,
        };
        let forwarded = PeerRequest::Cluster {
            request,
            hops: hops + 1,
        };
        match self
            .inner
            .peers
            // The claimant may itself wait up to a request timeout on others (plan sizes)
            // and the request may be forwarded once more.
            .call(
                &claimant,
                forwarded,
                self.inner.settings.request_timeout * (MAX_CLUSTER_HOPS as u32 + 2),
            )
            .await
        {
            Ok(PeerResponse::Client(response)) => response,
            Ok(other) => error_response(
                ErrorKind::Internal,
                format!("the claimant {claimant} answered {other:?}"),
            ),
            Err(error) => error_response(
                ErrorKind::Timeout(None),
                format!("cannot reach the claimant {claimant}: {error}"),
            ),
        }
    }

    /// `cluster join PEER` on a node started alone: it must hold no data of its own (they
    /// would be abandoned with its one-node cluster); then it gossips with the peer until it
    /// holds the cluster's ring, and stages its join through the claimant.
    async fn join_via(
        &self,
        gossip: &crate::server::membership::GossipMembership,
        peer: &str,
        peer_addr: &str,
    ) -> ClientResponse {
        let discovered;
        let peer = if peer.is_empty() {
            match self.discover_peer(gossip, peer_addr).await {
                Ok(node) => {
                    discovered = node.to_string();
                    discovered.as_str()
                }
                Err(message) => return ClientResponse::Error(ClientError::invalid(message)),
            }
        } else {
            peer
        };
        let peer = match NodeId::new(peer) {
            Ok(peer) => peer,
            Err(error) => {
                return ClientResponse::Error(ClientError::invalid(format!(
                    "peer node {peer:?}: {error}"
                )));
            }
        };
        if let Err(error) = peer_addr.parse::<std::net::SocketAddr>() {
            return ClientResponse::Error(ClientError::invalid(format!(
                "peer address {peer_addr:?} is not HOST:PORT with an IP address: {error}"
            )));
        }
        if !gossip.cluster_state().is_committed() {
            // Started with seeds, or already switched: the ring is on its way.
        } else if let Some(partition) = self.a_partition_with_data() {
            return ClientResponse::Error(ClientError::invalid(format!(
                "{} holds data (partition {partition} among others) of its own cluster; joining would abandon it. Start the node with an empty data directory to join",
                self.inner.id
            )));
        }
        let record = crate::core::gossip::MemberRecord::unheard(peer.clone(), peer_addr);
        if let Err(message) = gossip.forsake_own_cluster_for(record) {
            return ClientResponse::Error(ClientError::invalid(message));
        }
        // Gossip brings the cluster's ring within a few rounds.
        let deadline = Instant::now() + self.inner.settings.request_timeout * 3;
        while !gossip.cluster_state().is_committed() {
            if Instant::now() > deadline {
                return error_response(
                    ErrorKind::Timeout(None),
                    format!(
                        "{peer} at {peer_addr} sent no ring yet: is it up, and does its certificate come from this node's CA? (this node keeps trying; run the join again)"
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Box::pin(self.cluster_change(ClusterRequest::Join { node: None }, 0)).await
    }

    /// The id of the member listening at `peer_addr` (given without one): asked of it over
    /// the peer port, whose certificate names its IP address (as `dynkv cert node --host`
    /// issues them), by an empty gossip digest; its answer lists every member's record.
    async fn discover_peer(
        &self,
        gossip: &crate::server::membership::GossipMembership,
        peer_addr: &str,
    ) -> Result<NodeId, String> {
        let address: std::net::SocketAddr = peer_addr.parse().map_err(|error| {
            format!("peer address {peer_addr:?} is not HOST:PORT with an IP address: {error}")
        })?;
        let name_it = "name the member as ID=PEER_ADDR (the id its certificate was issued for)";
        // The IP as the TLS server name: an IPv4 address is also a well-formed node id.
        let by_address = NodeId::new(address.ip().to_string())
            .map_err(|_| format!("{peer_addr} is not an IPv4 address: {name_it}"))?;
        gossip.learn_address(&by_address, peer_addr);
        let answer = self
            .inner
            .peers
            .call(
                &by_address,
                PeerRequest::GossipDigest {
                    digests: Vec::new(),
                    ring_version: 0,
                    ring_fingerprint: 0,
                },
                self.inner.settings.request_timeout,
            )
            .await;
        let records = match answer {
            Ok(PeerResponse::GossipReply { records, .. }) => records,
            Ok(other) => return Err(format!("{peer_addr} answered {other:?}; {name_it}")),
            Err(error) => {
                return Err(format!(
                    "cannot ask {peer_addr} for its id: {error}; {name_it}"
                ));
            }
        };
        records
            .into_iter()
            .find(|record| record.peer_addr == peer_addr)
            .map(|record| record.node)
            .ok_or_else(|| {
                format!("no member of {peer_addr}'s cluster advertises that address; {name_it}")
            })
    }

    /// A partition this node's store holds a record of, if any.
    fn a_partition_with_data(&self) -> Option<PartitionId> {
        self.inner.store.partitions().into_iter().find(|partition| {
            let mut start_after = None;
            self.next_page(*partition, &mut start_after)
                .is_ok_and(|page| !page.is_empty())
        })
    }

    /// The claimant's side: the next state, adopted here and gossiped from here.
    async fn make_cluster_change(
        &self,
        state: &ClusterState,
        request: ClusterRequest,
    ) -> ClientResponse {
        let n_val = self.inner.settings.bucket_defaults.n_val as usize;
        let parse = |name: &str| {
            NodeId::new(name)
                .map_err(|error| ClientError::invalid(format!("node {name:?}: {error}")))
        };
        let staged = match request {
            ClusterRequest::Commit { ring_version } => {
                match self.commit_plan(state, ring_version) {
                    Ok(next) => Ok(next),
                    Err(message) => return ClientResponse::Error(ClientError::invalid(message)),
                }
            }
            ClusterRequest::TransferLimit { limit } => {
                return self.set_transfer_limit_everywhere(limit).await;
            }
            ClusterRequest::Plan => {
                let planned = state.plan(n_val);
                if planned.is_ok() {
                    self.inner
                        .transfers
                        .planned_version
                        .store(state.version(), Ordering::Relaxed);
                }
                return match planned {
                    Ok(plan) => ClientResponse::Plan(PlanInfo {
                        sizes: self.partition_sizes(&plan.transfers).await,
                        ring_version: plan.base_version,
                        staged: describe_staged(state),
                        transfers: plan
                            .transfers
                            .iter()
                            .map(|t| (t.partition, t.from.to_string(), t.to.to_string()))
                            .collect(),
                        ownership: plan
                            .ownership
                            .iter()
                            .map(|(node, (before, after))| {
                                (node.to_string(), *before as u32, *after as u32)
                            })
                            .collect(),
                    }),
                    Err(error) => ClientResponse::Error(ClientError::invalid(error.to_string())),
                };
            }
            ClusterRequest::Clear => state.clear(),
            ClusterRequest::JoinVia { .. } => {
                return ClientResponse::Error(ClientError::invalid(
                    "a join through a peer is made on the joining node only",
                ));
            }
            ClusterRequest::Join { node } => match node.as_deref().map(parse).transpose() {
                Ok(node) => state.stage(
                    &node.unwrap_or_else(|| self.inner.id.clone()),
                    StagedChange::Join,
                ),
                Err(error) => return ClientResponse::Error(error),
            },
            ClusterRequest::Leave { node } => match node.as_deref().map(parse).transpose() {
                Ok(node) => state.stage(
                    &node.unwrap_or_else(|| self.inner.id.clone()),
                    StagedChange::Leave,
                ),
                Err(error) => return ClientResponse::Error(error),
            },
            ClusterRequest::Remove { node } => match parse(&node) {
                Ok(node) => state.stage(&node, StagedChange::Remove),
                Err(error) => return ClientResponse::Error(error),
            },
            ClusterRequest::Replace { old, new } => match (parse(&old), parse(&new)) {
                (Ok(old), Ok(new)) => state.stage(&old, StagedChange::Replace { by: new }),
                (Err(error), _) | (_, Err(error)) => return ClientResponse::Error(error),
            },
        };
        match staged {
            Ok(next) => {
                info!(node = %self.inner.id, version = next.version(), "staged a ring change");
                if let Some(gossip) = self.inner.membership.gossip() {
                    gossip.offer_cluster_state(next);
                }
                ClientResponse::Ring(self.ring_info())
            }
            Err(error) => ClientResponse::Error(ClientError::invalid(error.to_string())),
        }
    }
}

impl Node {
    /// The claimant's commit: the plan shown on this very ring version (or the version the
    /// operator names), only while every member holds the current ring and none is down
    /// (short of one staged for removal).
    fn commit_plan(
        &self,
        state: &ClusterState,
        ring_version: Option<u64>,
    ) -> Result<ClusterState, String> {
        let planned = match ring_version {
            Some(version) => version,
            None => match self.inner.transfers.planned_version.load(Ordering::Relaxed) {
                0 => {
                    return Err(
                        "no plan was shown on this claimant: run `dynkv admin cluster plan` first"
                            .into(),
                    );
                }
                version => version,
            },
        };
        let n_val = self.inner.settings.bucket_defaults.n_val as usize;
        let plan = state.plan(n_val).map_err(|error| error.to_string())?;
        if planned != plan.base_version {
            return Err(crate::core::cluster::ChangeError::PlanChanged {
                planned,
                current: plan.base_version,
            }
            .to_string());
        }
        let view = self.inner.membership.view();
        for (member, member_state) in state.members() {
            // Exiting and left members own nothing and take no part in a change.
            if matches!(member_state, MemberState::Exiting)
                || member_state.is_gone()
                || state.staged().get(member) == Some(&StagedChange::Remove)
                || member == &self.inner.id
            {
                continue;
            }
            let Some(info) = view.iter().find(|info| info.node == member.as_str()) else {
                return Err(format!(
                    "{member} has not been heard from: the ring has not converged; wait, or remove it"
                ));
            };
            if !info.up {
                return Err(format!(
                    "{member} is down: the ring cannot converge; bring it back or stage `remove {member}`"
                ));
            }
            if info.ring_version < state.version() {
                return Err(format!(
                    "{member} holds ring version {} and the claimant {}: the ring has not converged yet; try again in a moment",
                    info.ring_version,
                    state.version()
                ));
            }
        }
        state.commit(&plan).map_err(|error| error.to_string())
    }

    /// Sets `transfer_limit` on every member that is up; answers with the members reached.
    async fn set_transfer_limit_everywhere(&self, limit: u32) -> ClientResponse {
        if limit > crate::config::MAX_TRANSFER_LIMIT {
            return ClientResponse::Error(ClientError::invalid(format!(
                "transfer limit {limit} is over the most allowed, {}",
                crate::config::MAX_TRANSFER_LIMIT
            )));
        }
        self.set_transfer_limit(limit);
        let mut failed = Vec::new();
        for member in self.inner.membership.ring().members().into_iter().chain(
            self.inner
                .membership
                .pending_ring()
                .map(|ring| ring.members())
                .unwrap_or_default(),
        ) {
            if member == self.inner.id {
                continue;
            }
            let request = PeerRequest::SetTransferLimit { limit };
            match self
                .inner
                .peers
                .call(&member, request, self.inner.settings.request_timeout)
                .await
            {
                Ok(PeerResponse::Pong) => {}
                _ => failed.push(member.to_string()),
            }
        }
        if failed.is_empty() {
            ClientResponse::Ring(self.ring_info())
        } else {
            failed.sort();
            failed.dedup();
            error_response(
                ErrorKind::Timeout(None),
                format!(
                    "transfer limit set to {limit}, but not on {} (unreachable)",
                    failed.join(", ")
                ),
            )
        }
    }

    /// Records and bytes of each moving partition on its current owner, asked of every owner
    /// at once; an owner that does not answer in time leaves its partitions out.
    async fn partition_sizes(
        &self,
        transfers: &[crate::core::cluster::Transfer],
    ) -> Vec<(u32, u64, u64)> {
        let mut by_owner: std::collections::BTreeMap<NodeId, Vec<PartitionId>> =
            std::collections::BTreeMap::new();
        for transfer in transfers {
            by_owner
                .entry(transfer.from.clone())
                .or_default()
                .push(transfer.partition);
        }
        let mut asks = tokio::task::JoinSet::new();
        for (owner, partitions) in by_owner {
            if owner == self.inner.id {
                let local = partitions
                    .iter()
                    .map(|&partition| {
                        let (records, bytes) = self.inner.store.partition_estimate(partition);
                        (partition, records, bytes)
                    })
                    .collect::<Vec<_>>();
                asks.spawn(async move { local });
                continue;
            }
            let node = self.clone();
            asks.spawn(async move {
                let request = PeerRequest::PartitionSizes { partitions };
                let timeout = node.inner.settings.request_timeout;
                match node.inner.peers.call(&owner, request, timeout).await {
                    Ok(PeerResponse::PartitionSizes(sizes)) => sizes,
                    Ok(_) | Err(_) => {
                        debug!(owner = %owner, "no partition sizes for the plan");
                        Vec::new()
                    }
                }
            });
        }
        let mut sizes: Vec<(u32, u64, u64)> = asks.join_all().await.into_iter().flatten().collect();
        sizes.sort_unstable();
        sizes
    }
}

/// Staged changes as (node, change) text.
pub(super) fn describe_staged(state: &ClusterState) -> Vec<(String, String)> {
    state
        .staged()
        .iter()
        .map(|(node, change)| {
            let change = match change {
                StagedChange::Join => "join".to_string(),
                StagedChange::Leave => "leave".to_string(),
                StagedChange::Remove => "remove".to_string(),
                StagedChange::Replace { by } => format!("replace by {by}"),
            };
            (node.to_string(), change)
        })
        .collect()
}

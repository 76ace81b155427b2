//! Staged ring changes (`dynkv admin cluster ...`): every change is made by the claimant, so
//! a request that arrives elsewhere is forwarded to it; the claimant makes the next cluster
//! state, adopts it, and gossip carries it to the others.

use super::*;
use crate::core::cluster::{ClusterState, StagedChange};
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
            .call(&claimant, forwarded, self.inner.settings.request_timeout)
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
            ClusterRequest::Plan => {
                return match state.plan(n_val) {
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

//! Tombstone reaping in simulation (DESIGN §4): deleted keys' tombstones go from
//! every replica once their grace period has passed and every condition holds, and not
//! while a hint, a down member or a short grace could still bring the deleted value back.

mod common;

use common::checker::dotted_versions;
use common::sim::{SimCluster, default_settings, node_copies};
use dynkv::core::ids::NodeId;
use dynkv::core::object::StoredObject;
use dynkv::core::quorum::Quorum;
use dynkv::protocol::{ClientRequest, ClientResponse, GetOptions, NewContent, PutOptions};
use std::collections::BTreeSet;
use std::time::Duration;

const BUCKET: &[u8] = b"reap";
const INTERVAL: Duration = Duration::from_millis(200);
const GRACE: Duration = Duration::from_secs(5);

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn put(key: &str, value: &str, context: Option<Vec<u8>>, w: Quorum) -> ClientRequest {
    ClientRequest::Put {
        bucket: BUCKET.to_vec(),
        key: key.as_bytes().to_vec(),
        context: context.map(serde_bytes::ByteBuf::from),
        content: NewContent {
            value: value.as_bytes().to_vec(),
            ..NewContent::default()
        },
        options: PutOptions {
            w,
            return_body: true,
            ..PutOptions::default()
        },
    }
}

fn delete(key: &str, w: Quorum) -> ClientRequest {
    ClientRequest::Delete {
        bucket: BUCKET.to_vec(),
        key: key.as_bytes().to_vec(),
        context: None,
        options: PutOptions {
            w,
            r: Some(Quorum::All),
            ..PutOptions::default()
        },
    }
}

fn get(key: &str) -> ClientRequest {
    ClientRequest::Get {
        bucket: BUCKET.to_vec(),
        key: key.as_bytes().to_vec(),
        options: GetOptions {
            r: Quorum::All,
            ..GetOptions::default()
        },
    }
}

async fn cluster(nodes: usize, seed: u64) -> SimCluster {
    let mut settings = default_settings();
    settings.aae.exchange_interval = INTERVAL;
    settings.tombstones.reap = true;
    settings.tombstones.grace = GRACE;
    let cluster = SimCluster::start_gossiping(nodes, seed, settings).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster
}

/// Every copy of `key` the cluster's running nodes hold (replica copies and hints).
async fn copies(cluster: &SimCluster, key: &str) -> Vec<(NodeId, StoredObject)> {
    let ring = cluster.current_ring();
    let ids: Vec<NodeId> = cluster.up_nodes();
    let mut found = Vec::new();
    for node in cluster.running_nodes() {
        for copy in node_copies(&node, &ring, &ids, BUCKET, key.as_bytes()).await {
            found.push((node.id().clone(), copy));
        }
    }
    found
}

fn reaped_total(cluster: &SimCluster) -> u64 {
    cluster
        .running_nodes()
        .iter()
        .map(|node| node.status().unwrap().tombstones_reaped)
        .sum()
}

fn held_total(cluster: &SimCluster) -> u64 {
    cluster
        .running_nodes()
        .iter()
        .map(|node| node.status().unwrap().tombstones_held)
        .sum()
}

/// Waits up to `intervals` exchange intervals for `done`; returns whether it came.
async fn wait_for(intervals: u32, mut done: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..intervals {
        if done().await {
            return true;
        }
        tokio::time::sleep(INTERVAL).await;
    }
    done().await
}

/// 40 keys written and deleted on 3 nodes: every replica holds each tombstone until the grace
/// period has passed, then none does; a new write to a reaped key is a new version under a
/// dot no earlier version had.
#[tokio::test(start_paused = true)]
async fn tombstones_go_from_every_replica_after_their_grace_period() {
    const KEYS: usize = 40;
    let cluster = cluster(3, 5).await;
    let keys: Vec<String> = (0..KEYS).map(|index| format!("k{index}")).collect();
    for key in &keys {
        let stored = cluster
            .client(&node("n1"), put(key, "first", None, Quorum::All))
            .await;
        assert!(
            matches!(stored, ClientResponse::Stored { .. }),
            "{stored:?}"
        );
        let deleted = cluster.client(&node("n2"), delete(key, Quorum::All)).await;
        assert!(
            matches!(deleted, ClientResponse::Stored { .. }),
            "{deleted:?}"
        );
    }
    // Every version any copy held, to show that no dot is issued again after the reap.
    let mut old_dots = BTreeSet::new();
    for key in &keys {
        for (_, copy) in copies(&cluster, key).await {
            assert!(copy.values().iter().all(|content| content.deleted));
            old_dots.extend(dotted_versions(&copy).into_iter().map(|(dot, _)| dot));
        }
    }
    assert_eq!(held_total(&cluster), 3 * KEYS as u64);
    // Within the grace period nothing is reaped, however many exchanges run.
    tokio::time::sleep(GRACE / 2).await;
    assert_eq!(reaped_total(&cluster), 0);
    for key in &keys {
        assert_eq!(copies(&cluster, key).await.len(), 3, "{key}");
    }
    // After it, a round of exchanges (about 22 intervals on 3 nodes) reaps everything.
    let reaped = wait_for(150, async || {
        for key in &keys {
            if !copies(&cluster, key).await.is_empty() {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        reaped,
        "tombstones left: {} held, {} reaped",
        held_total(&cluster),
        reaped_total(&cluster)
    );
    assert_eq!(reaped_total(&cluster), 3 * KEYS as u64);
    assert_eq!(held_total(&cluster), 0);
    // A reaped key reads as absent, and a new write to it gets a fresh dot.
    let key = &keys[0];
    let response = cluster.client(&node("n3"), get(key)).await;
    assert!(
        matches!(response, ClientResponse::NotFound { .. }),
        "{response:?}"
    );
    let stored = cluster
        .client(&node("n1"), put(key, "again", None, Quorum::All))
        .await;
    assert!(
        matches!(stored, ClientResponse::Stored { .. }),
        "{stored:?}"
    );
    for (holder, copy) in copies(&cluster, key).await {
        for (dot, content) in dotted_versions(&copy) {
            assert!(!content.deleted, "{holder} holds a tombstone again");
            assert!(
                !old_dots.contains(&dot),
                "{holder}: the new write reused dot {dot:?}"
            );
        }
    }
}

/// A fallback holds a hint (a newer value) for a primary it cannot reach, while every
/// member is up and every primary holds the tombstone of a delete. Reaping then would let
/// the hint bring the deleted value back when it is delivered: the hint blocks it. Once the
/// hint is delivered (and merged under the tombstone), the tombstone is reaped.
#[tokio::test(start_paused = true)]
async fn a_hint_for_the_partition_holds_its_tombstones_back() {
    let mut cluster = cluster(4, 9).await;
    // A key whose primaries are n1..n3 in some order; n4 stands in for one of them.
    let (key, primaries) = (0..)
        .map(|index| format!("k{index}"))
        .map(|key| {
            let primaries = cluster.replicas_of(BUCKET, key.as_bytes());
            (key, primaries)
        })
        .find(|(_, primaries)| !primaries.contains(&node("n4")))
        .unwrap();
    let (first, absent) = (primaries[0].clone(), primaries[2].clone());
    let stored = cluster
        .client(&first, put(&key, "v1", None, Quorum::All))
        .await;
    let ClientResponse::Stored { context, .. } = stored else {
        panic!("{stored:?}");
    };
    // `absent` is cut off until judged down; a write with v1's context goes to a fallback.
    cluster.network.isolate(&absent);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let stored = cluster
        .client(&first, put(&key, "v2", Some(context), Quorum::Count(2)))
        .await;
    assert!(
        matches!(stored, ClientResponse::Stored { .. }),
        "{stored:?}"
    );
    // The write was acknowledged by w=2 replies; the fallback's hint may land just after.
    let hinted = wait_for(50, async || {
        let hints: u64 = cluster
            .running_nodes()
            .iter()
            .map(|node| node.store().hint_count().unwrap())
            .sum();
        hints == 1
    })
    .await;
    assert!(hinted, "n4 should hold a hint for {absent}");
    // `absent` is back for everyone but n4, which keeps the hint it cannot hand back.
    cluster.network.rejoin(&absent);
    cluster.network.cut(&node("n4"), &absent);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let deleted = cluster.client(&first, delete(&key, Quorum::All)).await;
    assert!(
        matches!(deleted, ClientResponse::Stored { .. }),
        "{deleted:?}"
    );
    // Long past the grace period, every primary still holds the tombstone.
    tokio::time::sleep(GRACE * 4).await;
    for primary in &primaries {
        let copy = cluster.replica(primary, BUCKET, key.as_bytes()).await;
        assert!(
            copy.as_ref()
                .is_some_and(|copy| copy.values().iter().all(|content| content.deleted)),
            "{primary} reaped {key}'s tombstone while n4 held a hint for it: {copy:?}"
        );
    }
    let ClientResponse::Aae(info) = cluster.client(&first, ClientRequest::Aae).await else {
        panic!("admin aae failed");
    };
    let reaps: Vec<String> = info
        .partitions
        .iter()
        .filter_map(|partition| partition.last_reap.as_ref())
        .map(|reap| reap.result.clone())
        .collect();
    assert!(
        reaps
            .iter()
            .any(|result| result.contains("hints for the partition are held on n4")),
        "{first} should say why it does not reap: {reaps:?}"
    );
    // The hint goes home, under the tombstone; then the tombstone goes too.
    cluster.network.heal(&node("n4"), &absent);
    let gone = wait_for(200, async || copies(&cluster, &key).await.is_empty()).await;
    assert!(gone, "left: {:?}", copies(&cluster, &key).await);
    let response = cluster.client(&first, get(&key)).await;
    assert!(
        matches!(response, ClientResponse::NotFound { .. }),
        "the deleted value came back: {response:?}"
    );
    // A member that crashed holds reaping back too, from the moment it crashed: before the
    // failure detector judges it down (about 9 s, longer than this grace) it looks up, and
    // a hint it made just before the crash may not be in gossip yet; it cannot answer.
    let stored = cluster
        .client(&first, put(&key, "v3", None, Quorum::All))
        .await;
    assert!(
        matches!(stored, ClientResponse::Stored { .. }),
        "{stored:?}"
    );
    let deleted = cluster.client(&first, delete(&key, Quorum::All)).await;
    assert!(
        matches!(deleted, ClientResponse::Stored { .. }),
        "{deleted:?}"
    );
    let weak = cluster.crash(&node("n4"));
    if let Some(weak) = weak {
        common::sim::wait_until_stopped(weak).await;
    }
    tokio::time::sleep(GRACE * 4).await;
    assert_eq!(copies(&cluster, &key).await.len(), 3, "reaped with n4 down");
    cluster.restart(&node("n4"));
    let gone = wait_for(300, async || copies(&cluster, &key).await.is_empty()).await;
    assert!(gone, "left: {:?}", copies(&cluster, &key).await);
}

/// A write that read a copy before a delete reached every replica may carry the deleted
/// versions for as long as it is in flight (here a put that catches up from the replicas
/// and waits out its timeout for one it cannot reach). Reaping while it is in flight would
/// let it store them again; the reaper waits until every operation on the partition began
/// after every primary held the tombstone.
#[tokio::test(start_paused = true)]
async fn a_write_in_flight_since_before_the_delete_holds_its_tombstone_back() {
    let cluster = cluster(3, 11).await;
    let key = "k0";
    let primaries = cluster.replicas_of(BUCKET, key.as_bytes());
    let partition = cluster
        .current_ring()
        .partition_for_key(BUCKET, key.as_bytes());
    let (reaper, writer, cut_off) = (&primaries[0], &primaries[1], &primaries[2]);
    // v1 and a concurrent v1b reach the reaper and `cut_off` only.
    cluster.network.isolate(writer);
    let stored = cluster
        .client(reaper, put(key, "v1", None, Quorum::Count(2)))
        .await;
    let ClientResponse::Stored { context, .. } = stored else {
        panic!("{stored:?}");
    };
    let stored = cluster
        .client(reaper, put(key, "v1b", None, Quorum::Count(2)))
        .await;
    assert!(
        matches!(stored, ClientResponse::Stored { .. }),
        "{stored:?}"
    );
    // `writer` puts v2 with v1's context, which its empty copy does not know: it catches up
    // from the others, gets (v1, v1b) from the reaper at once and waits for `cut_off` until
    // its 20 s timeout.
    cluster.network.cut(writer, cut_off);
    cluster.network.rejoin(writer);
    let mut request = put(key, "v2", Some(context), Quorum::One);
    if let ClientRequest::Put { options, .. } = &mut request {
        options.timeout_ms = Some(20_000);
    }
    let writing = {
        let node = cluster.node(writer).unwrap();
        tokio::spawn(async move { node.handle_client(request).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile a delete covering v1 and v1b reaches every replica, and its grace passes.
    let deleted = cluster.client(reaper, delete(key, Quorum::All)).await;
    assert!(
        matches!(deleted, ClientResponse::Stored { .. }),
        "{deleted:?}"
    );
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    let ClientResponse::Aae(info) = cluster
        .client(
            reaper,
            ClientRequest::AaeRepair {
                partition: Some(partition),
            },
        )
        .await
    else {
        panic!("admin aae repair failed");
    };
    let reap = info
        .partitions
        .iter()
        .find(|info| info.partition == partition)
        .and_then(|info| info.last_reap.as_ref())
        .map(|reap| reap.result.clone());
    assert!(
        reap.as_deref()
            .is_some_and(|result| result.contains("still in flight on")),
        "the reaper should wait for {writer}'s write: {reap:?}"
    );
    // The catch-up used the whole timeout, so the write may time out after its local step;
    // either way, v2 may live and the deleted versions may not.
    let written = writing.await.unwrap();
    assert!(
        matches!(
            written,
            ClientResponse::Stored { .. } | ClientResponse::Error(_)
        ),
        "{written:?}"
    );
    cluster.network.heal_all();
    let mut values = BTreeSet::new();
    for _ in 0..50 {
        tokio::time::sleep(INTERVAL).await;
        for node in &primaries {
            if let Some(copy) = cluster.replica(node, BUCKET, key.as_bytes()).await {
                for content in copy.values() {
                    if !content.deleted {
                        values.insert(String::from_utf8_lossy(&content.value).into_owned());
                    }
                }
            }
        }
    }
    assert!(
        values.is_subset(&BTreeSet::from(["v2".to_string()])),
        "the deleted versions came back: {values:?} (the write: {written:?})"
    );
}

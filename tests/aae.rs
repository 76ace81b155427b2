//! Active anti-entropy in simulation (DESIGN §7): a replica that missed writes while it was
//! up (no hint was made, and no read asks it, with read repair off) catches up by tree
//! exchanges alone; with AAE off it stays behind.

mod common;

use common::sim::{SimCluster, default_settings};
use dynkv::core::ids::NodeId;
use dynkv::core::quorum::Quorum;
use dynkv::protocol::{ClientRequest, ClientResponse, NewContent, PutOptions};
use std::time::Duration;

const BUCKET: &[u8] = b"aae";
const KEYS: usize = 200;
/// The exchange interval of these tests.
const INTERVAL: Duration = Duration::from_millis(200);

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

/// Writes `KEYS` keys through n1 at w=2 without sloppy quorum while n1 cannot reach n3 (both
/// up, each seen up by the other through n2's gossip): n3 misses every one, and no fallback
/// holds a hint for it. Returns the cluster and how many keys n3 misses.
async fn writes_n3_missed(seed: u64, aae: bool) -> (SimCluster, Vec<String>) {
    let mut settings = default_settings();
    settings.read_repair_chance = 0.0;
    settings.aae.enabled = aae;
    settings.aae.exchange_interval = INTERVAL;
    let cluster = SimCluster::start_gossiping(3, seed, settings).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.network.cut(&node("n1"), &node("n3"));
    let mut keys = Vec::new();
    for index in 0..KEYS {
        let key = format!("k{index}");
        let response = cluster
            .client(
                &node("n1"),
                ClientRequest::Put {
                    bucket: BUCKET.to_vec(),
                    key: key.as_bytes().to_vec(),
                    context: None,
                    content: NewContent {
                        value: b"v".to_vec(),
                        ..NewContent::default()
                    },
                    options: PutOptions {
                        w: Quorum::Count(2),
                        sloppy_quorum: Some(false),
                        ..PutOptions::default()
                    },
                },
            )
            .await;
        assert!(
            matches!(response, ClientResponse::Stored { .. }),
            "{key}: {response:?}"
        );
        keys.push(key);
    }
    cluster.network.heal(&node("n1"), &node("n3"));
    (cluster, keys)
}

/// The keys some replica does not hold.
async fn missing_somewhere(cluster: &SimCluster, keys: &[String]) -> Vec<String> {
    let mut missing = Vec::new();
    for key in keys {
        for replica in cluster.replicas_of(BUCKET, key.as_bytes()) {
            if cluster
                .replica(&replica, BUCKET, key.as_bytes())
                .await
                .is_none()
            {
                missing.push(format!("{key} on {replica}"));
            }
        }
    }
    missing
}

/// K: each node runs one exchange per interval (jittered by ±1/8), of the next partition it
/// first-owns, with both other replicas. On 3 nodes a node first-owns at most 22 of 64
/// partitions, and every partition's owner exchanges with n3, so one round of about 22
/// intervals repairs every key (28 measured, with the trees' first builds). The bound is 100:
/// the store's writer is a real thread, so on a loaded machine the paused clock can run past
/// an exchange's timeout and that exchange waits for the next round.
#[tokio::test(start_paused = true)]
async fn a_replica_that_missed_writes_while_up_catches_up_by_exchanges_alone() {
    let (cluster, keys) = writes_n3_missed(17, true).await;
    let missed = missing_somewhere(&cluster, &keys).await;
    assert!(
        missed.len() > KEYS / 2,
        "n3 should have missed the writes: {}",
        missed.len()
    );
    let mut waited = 0;
    loop {
        tokio::time::sleep(INTERVAL).await;
        waited += 1;
        let missing = missing_somewhere(&cluster, &keys).await;
        if missing.is_empty() {
            break;
        }
        assert!(
            waited < 100,
            "after 100 exchange intervals {} copies are still missing: {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
    let repaired: u64 = cluster
        .running_nodes()
        .iter()
        .map(|node| node.status().unwrap().aae_keys_repaired)
        .sum();
    assert!(
        repaired >= missed.len() as u64,
        "{repaired} keys repaired for {} missing copies",
        missed.len()
    );
    eprintln!(
        "{} missing copies repaired by anti-entropy within {waited} intervals of {INTERVAL:?}",
        missed.len()
    );
}

/// The control: the same faults with AAE off leave n3 without the writes (nothing else
/// repairs them), so the test above shows anti-entropy's work.
#[tokio::test(start_paused = true)]
async fn without_anti_entropy_the_missed_writes_stay_missing() {
    let (cluster, keys) = writes_n3_missed(17, false).await;
    tokio::time::sleep(INTERVAL * 100).await;
    let missing = missing_somewhere(&cluster, &keys).await;
    assert!(missing.len() > KEYS / 2, "{}", missing.len());
}

//! Simulation tests (DESIGN §9, layer 2): whole clusters in one process over the in-memory
//! network, under tokio's paused clock, with crashes, restarts, cut links and message loss.
//! A history checker asserts that no acknowledged write is lost and that replicas converge.
//!
//! `DYNKV_SIM_SEEDS=N` runs N seeds of the randomized scenario (default 6).

mod common;

use common::sim::{SimCluster, default_settings, replica_copy, wait_until_stopped};
use dynkv::core::ids::NodeId;
use dynkv::core::object::live_siblings;
use dynkv::core::quorum::Quorum;
use dynkv::protocol::{
    ClientRequest, ClientResponse, ErrorKind, GetOptions, NewContent, PutOptions,
};
use dynkv::server::node::Node;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BUCKET: &[u8] = b"sim";

fn put(key: &str, value: &str, context: Option<Vec<u8>>, w: Quorum) -> ClientRequest {
    ClientRequest::Put {
        bucket: BUCKET.to_vec(),
        key: key.as_bytes().to_vec(),
        context: context.map(serde_bytes::ByteBuf::from),
        content: NewContent {
            value: value.as_bytes().to_vec(),
            content_type: "text/plain".into(),
            user_metadata: Vec::new(),
        },
        options: PutOptions {
            w,
            return_body: true,
            ..PutOptions::default()
        },
    }
}

fn get(key: &str, r: Quorum) -> ClientRequest {
    ClientRequest::Get {
        bucket: BUCKET.to_vec(),
        key: key.as_bytes().to_vec(),
        options: GetOptions {
            r,
            ..GetOptions::default()
        },
    }
}

fn values(siblings: &[dynkv::core::object::Content]) -> BTreeSet<String> {
    siblings
        .iter()
        .map(|content| String::from_utf8_lossy(&content.value).into_owned())
        .collect()
}

/// What the checker knows of one write.
#[derive(Debug, Default, Clone)]
struct WriteRecord {
    key: String,
    acknowledged: bool,
    /// The values visible in the read or put result whose context this write carried: the
    /// write supersedes them (and, transitively, what they superseded).
    covers: BTreeSet<String>,
}

#[derive(Default)]
struct History {
    writes: BTreeMap<String, WriteRecord>,
}

impl History {
    /// Every value superseded, directly or transitively, by the values in `present`.
    fn covered_by(&self, present: &BTreeSet<String>) -> BTreeSet<String> {
        let mut covered = BTreeSet::new();
        let mut frontier: Vec<String> = present.iter().cloned().collect();
        while let Some(value) = frontier.pop() {
            if let Some(record) = self.writes.get(&value) {
                for superseded in &record.covers {
                    if covered.insert(superseded.clone()) {
                        frontier.push(superseded.clone());
                    }
                }
            }
        }
        covered
    }
}

/// One client: reads and writes random keys through random live nodes, carrying contexts
/// from its own reads and writes, and records every write in the history.
async fn run_client(
    client: usize,
    operations: usize,
    keys: usize,
    seed: u64,
    cluster: Arc<Mutex<SimCluster>>,
    history: Arc<Mutex<History>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    // The context (and the values it covers) this client holds for each key.
    let mut contexts: BTreeMap<String, (Vec<u8>, BTreeSet<String>)> = BTreeMap::new();
    for sequence in 0..operations {
        let key = format!("k{}", rng.random_range(0..keys));
        let node = {
            let cluster = cluster.lock().unwrap();
            let up = cluster.up_nodes();
            if up.is_empty() {
                None
            } else {
                cluster.node(&up[rng.random_range(0..up.len())])
            }
        };
        let Some(node) = node else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let level = [Quorum::One, Quorum::Quorum, Quorum::All][rng.random_range(0..3)];
        if rng.random_bool(0.4) {
            if let ClientResponse::Found { siblings, context } =
                node.handle_client(get(&key, level)).await
            {
                contexts.insert(key, (context, values(&siblings)));
            }
        } else {
            let value = format!("c{client}-{sequence}");
            let (context, covers) = match contexts.get(&key) {
                Some((context, covers)) if rng.random_bool(0.85) => {
                    (Some(context.clone()), covers.clone())
                }
                _ => (None, BTreeSet::new()),
            };
            history.lock().unwrap().writes.insert(
                value.clone(),
                WriteRecord {
                    key: key.clone(),
                    acknowledged: false,
                    covers,
                },
            );
            let response = node.handle_client(put(&key, &value, context, level)).await;
            if let ClientResponse::Stored { siblings, context } = response {
                assert!(
                    values(&siblings).contains(&value),
                    "return_body must include the write itself"
                );
                history
                    .lock()
                    .unwrap()
                    .writes
                    .get_mut(&value)
                    .expect("recorded")
                    .acknowledged = true;
                contexts.insert(key, (context, values(&siblings)));
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
    }
}

/// Randomly cuts links, isolates and crashes nodes (at most one down at a time), then heals.
async fn run_faults(seed: u64, rounds: usize, cluster: Arc<Mutex<SimCluster>>) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfa17);
    let mut crashed: Option<NodeId> = None;
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        let ids = cluster.lock().unwrap().ids.clone();
        let pick = |rng: &mut StdRng| ids[rng.random_range(0..ids.len())].clone();
        match rng.random_range(0..5) {
            0 => {
                let (a, b) = (pick(&mut rng), pick(&mut rng));
                if a != b {
                    cluster.lock().unwrap().network.cut(&a, &b);
                }
            }
            1 => {
                let node = pick(&mut rng);
                cluster.lock().unwrap().network.isolate(&node);
            }
            2 => cluster.lock().unwrap().network.heal_all(),
            3 if crashed.is_none() => {
                let node = pick(&mut rng);
                let weak = cluster.lock().unwrap().crash(&node);
                if let Some(weak) = weak {
                    wait_until_stopped(weak).await;
                }
                crashed = Some(node);
            }
            _ => {
                if let Some(node) = crashed.take() {
                    cluster.lock().unwrap().restart(&node);
                }
            }
        }
    }
    let mut cluster = cluster.lock().unwrap();
    cluster.network.heal_all();
    cluster.network.set_loss(0.0);
    if let Some(node) = crashed {
        cluster.restart(&node);
    }
}

async fn randomized_history(seed: u64) {
    let cluster = SimCluster::start(5, seed, default_settings()).await;
    cluster.network.set_loss(0.02);
    cluster
        .network
        .set_delay(Duration::from_millis(0), Duration::from_millis(15));
    let cluster = Arc::new(Mutex::new(cluster));
    let history = Arc::new(Mutex::new(History::default()));
    let keys = 6;
    let mut tasks = Vec::new();
    for client in 0..6 {
        tasks.push(tokio::spawn(run_client(
            client,
            40,
            keys,
            seed * 100 + client as u64,
            cluster.clone(),
            history.clone(),
        )));
    }
    tasks.push(tokio::spawn(run_faults(seed, 12, cluster.clone())));
    for task in tasks {
        task.await.expect("task panicked");
    }

    // Faults healed, every node up: a read at r=all of each key merges every replica and
    // read-repairs the stale ones.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = history.lock().unwrap().writes.clone();
    let history = History { writes: history };
    let acknowledged = history
        .writes
        .values()
        .filter(|record| record.acknowledged)
        .count();
    assert!(
        acknowledged > 20,
        "seed {seed}: only {acknowledged} writes were acknowledged; the scenario is too harsh to test anything"
    );
    for key in (0..keys).map(|index| format!("k{index}")) {
        let node = cluster
            .lock()
            .unwrap()
            .node(&NodeId::new("n1").unwrap())
            .expect("n1 up");
        let mut final_values = BTreeSet::new();
        let mut answered = false;
        for _ in 0..5 {
            match node.handle_client(get(&key, Quorum::All)).await {
                ClientResponse::Found { siblings, .. } => {
                    final_values = values(&siblings);
                    answered = true;
                    break;
                }
                ClientResponse::NotFound { .. } => {
                    answered = true;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        assert!(
            answered,
            "seed {seed}: r=all read of {key} failed after the heal"
        );
        let covered = history.covered_by(&final_values);
        for (value, record) in &history.writes {
            if record.key == key && record.acknowledged {
                assert!(
                    final_values.contains(value) || covered.contains(value),
                    "seed {seed}: acknowledged write {value} of {key} is lost: final siblings {final_values:?}"
                );
            }
        }
        for value in &final_values {
            assert!(
                history.writes.contains_key(value),
                "seed {seed}: {value} was never written"
            );
        }
    }
    // Read repair has had time to run: every replica of every key holds the same object.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ring, replicas) = {
        let cluster = cluster.lock().unwrap();
        let replicas: Vec<(String, Vec<Node>)> = (0..keys)
            .map(|index| {
                let key = format!("k{index}");
                let nodes = cluster
                    .replicas_of(BUCKET, key.as_bytes())
                    .iter()
                    .map(|id| cluster.node(id).expect("every node is up after the heal"))
                    .collect();
                (key, nodes)
            })
            .collect();
        (cluster.ring.clone(), replicas)
    };
    for (key, nodes) in replicas {
        let first = replica_copy(&nodes[0], &ring, BUCKET, key.as_bytes()).await;
        for node in &nodes[1..] {
            let copy = replica_copy(node, &ring, BUCKET, key.as_bytes()).await;
            let same = match (&first, &copy) {
                (Some(a), Some(b)) => a.equal(b),
                (None, None) => true,
                _ => false,
            };
            assert!(
                same,
                "seed {seed}: replica {} of {key} did not converge with {}",
                node.id(),
                nodes[0].id()
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn no_acknowledged_write_is_lost_under_crashes_partitions_and_loss() {
    let seeds: u64 = std::env::var("DYNKV_SIM_SEEDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(6);
    for seed in 0..seeds {
        randomized_history(seed).await;
    }
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

#[tokio::test(start_paused = true)]
async fn w_all_fails_with_counts_while_quorum_succeeds_with_a_replica_cut_off() {
    let cluster = SimCluster::start(3, 1, default_settings()).await;
    let down = node("n3");
    cluster.network.isolate(&down);
    let response = cluster
        .client(&node("n1"), put("k", "v1", None, Quorum::All))
        .await;
    let ClientResponse::Error(error) = response else {
        panic!("w=all with a replica cut off must fail, got {response:?}");
    };
    assert!(
        matches!(error.kind, ErrorKind::Timeout(Some(_))),
        "{error:?}"
    );
    assert!(
        error
            .message
            .contains("2 of 3 replicas acknowledged, 3 required"),
        "{}",
        error.message
    );
    let response = cluster
        .client(&node("n1"), put("k", "v2", None, Quorum::Quorum))
        .await;
    assert!(
        matches!(response, ClientResponse::Stored { .. }),
        "{response:?}"
    );
    let response = cluster.client(&node("n2"), get("k", Quorum::Quorum)).await;
    let ClientResponse::Found { siblings, .. } = response else {
        panic!("r=quorum must answer, got {response:?}");
    };
    // Both blind writes were applied at the coordinator, so both are siblings.
    assert_eq!(
        values(&siblings),
        BTreeSet::from(["v1".to_string(), "v2".to_string()])
    );
    let response = cluster.client(&node("n2"), get("k", Quorum::All)).await;
    assert!(
        matches!(response, ClientResponse::Error(_)),
        "r=all must fail: {response:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn siblings_from_one_context_and_resolution_with_the_read_context() {
    let cluster = SimCluster::start(3, 2, default_settings()).await;
    let n1 = node("n1");
    cluster
        .client(&n1, put("k", "base", None, Quorum::All))
        .await;
    let ClientResponse::Found { context, .. } = cluster.client(&n1, get("k", Quorum::All)).await
    else {
        panic!("base must be readable");
    };
    for value in ["left", "right"] {
        let response = cluster
            .client(
                &node("n2"),
                put("k", value, Some(context.clone()), Quorum::All),
            )
            .await;
        assert!(
            matches!(response, ClientResponse::Stored { .. }),
            "{response:?}"
        );
    }
    let ClientResponse::Found { siblings, context } =
        cluster.client(&n1, get("k", Quorum::All)).await
    else {
        panic!("siblings must be readable");
    };
    assert_eq!(
        values(&siblings),
        BTreeSet::from(["left".to_string(), "right".to_string()])
    );
    cluster
        .client(&node("n3"), put("k", "merged", Some(context), Quorum::All))
        .await;
    let ClientResponse::Found { siblings, .. } = cluster.client(&n1, get("k", Quorum::All)).await
    else {
        panic!("resolved value must be readable");
    };
    assert_eq!(values(&siblings), BTreeSet::from(["merged".to_string()]));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_node_has_every_write_it_acknowledged() {
    let mut cluster = SimCluster::start(3, 3, default_settings()).await;
    for index in 0..40 {
        let response = cluster
            .client(
                &node("n1"),
                put(
                    &format!("key{index}"),
                    &format!("value{index}"),
                    None,
                    Quorum::All,
                ),
            )
            .await;
        assert!(
            matches!(response, ClientResponse::Stored { .. }),
            "{response:?}"
        );
    }
    let victim = node("n2");
    let weak = cluster.crash(&victim).expect("n2 was up");
    wait_until_stopped(weak).await;
    cluster.restart(&victim);
    for index in 0..40 {
        let key = format!("key{index}");
        let copy = cluster.replica(&victim, BUCKET, key.as_bytes()).await;
        let copy = copy.unwrap_or_else(|| panic!("{key} missing on the restarted node"));
        assert_eq!(
            values(&live_siblings(&copy)),
            BTreeSet::from([format!("value{index}")])
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_delete_does_not_resurrect_from_a_stale_replica() {
    let cluster = SimCluster::start(3, 4, default_settings()).await;
    let n1 = node("n1");
    cluster
        .client(&n1, put("k", "doomed", None, Quorum::All))
        .await;
    let stale = node("n3");
    cluster.network.isolate(&stale);
    let ClientResponse::Found { context, .. } = cluster.client(&n1, get("k", Quorum::Quorum)).await
    else {
        panic!("value must be readable");
    };
    let delete = ClientRequest::Delete {
        bucket: BUCKET.to_vec(),
        key: b"k".to_vec(),
        context: Some(serde_bytes::ByteBuf::from(context)),
        options: PutOptions {
            w: Quorum::Quorum,
            ..PutOptions::default()
        },
    };
    let response = cluster.client(&n1, delete).await;
    assert!(
        matches!(response, ClientResponse::Stored { .. }),
        "{response:?}"
    );
    cluster.network.heal_all();
    // n3 still holds the old value; a read through it must not bring it back.
    let response = cluster.client(&stale, get("k", Quorum::All)).await;
    let ClientResponse::NotFound { context } = response else {
        panic!("a deleted key must read as not found, got {response:?}");
    };
    assert!(context.is_some(), "a tombstone read carries a context");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let repaired = cluster
        .replica(&stale, BUCKET, b"k")
        .await
        .expect("n3 has a copy");
    assert!(
        live_siblings(&repaired).is_empty(),
        "read repair must carry the tombstone to n3"
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_options_and_oversized_values_are_refused_with_a_reason() {
    let mut settings = default_settings();
    settings.max_value_bytes = 1024;
    let cluster = SimCluster::start(3, 5, settings).await;
    let n1 = node("n1");
    let response = cluster.client(&n1, get("k", Quorum::Count(4))).await;
    let ClientResponse::Error(error) = response else {
        panic!("r=4 must be refused")
    };
    assert_eq!(error.kind, ErrorKind::InvalidRequest);
    assert!(
        error.message.contains("r=4 is out of range"),
        "{}",
        error.message
    );
    let response = cluster
        .client(&n1, put("k", "v", None, Quorum::Count(0)))
        .await;
    let ClientResponse::Error(error) = response else {
        panic!("w=0 must be refused")
    };
    assert!(error.message.contains("w=0"), "{}", error.message);
    let big = "x".repeat(2048);
    let response = cluster.client(&n1, put("k", &big, None, Quorum::One)).await;
    let ClientResponse::Error(error) = response else {
        panic!("an oversized value must be refused")
    };
    assert_eq!(error.kind, ErrorKind::TooLarge);
    assert!(error.message.contains("2048 bytes"), "{}", error.message);
    let response = cluster
        .client(
            &n1,
            put("k", "v", Some(b"\x01garbage".to_vec()), Quorum::One),
        )
        .await;
    let ClientResponse::Error(error) = response else {
        panic!("a garbage context must be refused")
    };
    assert!(error.message.contains("bad context"), "{}", error.message);
    assert!(matches!(
        cluster.client(&n1, get("k", Quorum::One)).await,
        ClientResponse::NotFound { .. }
    ));
}

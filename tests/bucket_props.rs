//! Bucket properties in a simulated cluster: set on one node, in force on every node (placement
//! by `n_val`, merging by `allow_mult`), after a restart, and changed again without waiting for
//! caches to expire.

mod common;

use common::sim::{SimCluster, default_settings, replica_copy, wait_until_stopped};
use dynkv::core::ids::NodeId;
use dynkv::core::quorum::Quorum;
use dynkv::protocol::{ClientRequest, ClientResponse, GetOptions, NewContent, PutOptions};
use dynkv::server::node::BucketProps;

const BUCKET: &[u8] = b"props-test";

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn blind_put(key: &str, value: &str) -> ClientRequest {
    ClientRequest::Put {
        bucket: BUCKET.to_vec(),
        key: key.as_bytes().to_vec(),
        context: None,
        content: NewContent {
            value: value.as_bytes().to_vec(),
            content_type: "text/plain".into(),
            user_metadata: Vec::new(),
        },
        options: PutOptions {
            w: Quorum::All,
            ..PutOptions::default()
        },
    }
}

fn get_all(key: &str) -> ClientRequest {
    ClientRequest::Get {
        bucket: BUCKET.to_vec(),
        key: key.as_bytes().to_vec(),
        options: GetOptions {
            r: Quorum::All,
            ..GetOptions::default()
        },
    }
}

async fn copies(cluster: &SimCluster, key: &str) -> usize {
    let mut count = 0;
    for id in cluster.up_nodes() {
        let node = cluster.node(&id).expect("node is up");
        if replica_copy(&node, &cluster.ring, BUCKET, key.as_bytes())
            .await
            .is_some()
        {
            count += 1;
        }
    }
    count
}

fn sibling_count(response: &ClientResponse) -> usize {
    match response {
        ClientResponse::Found { siblings, .. } => siblings.len(),
        other => panic!("expected a value, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn properties_set_on_one_node_govern_placement_and_merging_everywhere() {
    let mut cluster = SimCluster::start(5, 7, default_settings()).await;
    let first = cluster.node(&node("n1")).unwrap();
    let defaults = first.default_bucket_props();
    assert_eq!((defaults.n_val, defaults.allow_mult), (3, true));

    // Defaults: three copies, and blind writes through different nodes become siblings.
    for (index, via) in ["n1", "n2", "n3"].into_iter().enumerate() {
        let response = cluster
            .client(&node(via), blind_put("before", &format!("v{index}")))
            .await;
        assert!(
            matches!(response, ClientResponse::Stored { .. }),
            "{response:?}"
        );
    }
    assert_eq!(copies(&cluster, "before").await, 3);
    assert!(sibling_count(&cluster.client(&node("n4"), get_all("before")).await) > 1);

    // n_val = 2 and allow_mult = false, set through n1: refused while the bucket holds a
    // key (its third copy would never be deleted), taken once it holds none.
    let props = BucketProps {
        n_val: 2,
        allow_mult: false,
        ..defaults
    };
    let refused = first
        .set_bucket_props(BUCKET, Some(props))
        .await
        .unwrap_err();
    assert!(
        refused
            .message
            .starts_with("n_val cannot be lowered from 3 to 2 while the bucket holds keys"),
        "{}",
        refused.message
    );
    assert_eq!(first.bucket_props(BUCKET).await, Ok(defaults));
    let response = cluster
        .client(
            &node("n1"),
            ClientRequest::Delete {
                bucket: BUCKET.to_vec(),
                key: b"before".to_vec(),
                context: None,
                options: PutOptions {
                    w: Quorum::All,
                    r: Some(Quorum::All),
                    ..PutOptions::default()
                },
            },
        )
        .await;
    assert!(
        matches!(response, ClientResponse::Stored { .. }),
        "{response:?}"
    );
    first.set_bucket_props(BUCKET, Some(props)).await.unwrap();
    for id in cluster.up_nodes() {
        let seen = cluster.node(&id).unwrap().bucket_props(BUCKET).await;
        assert_eq!(seen, Ok(props), "{id} sees the new properties");
    }
    for (index, via) in ["n2", "n3", "n4", "n5"].into_iter().enumerate() {
        let response = cluster
            .client(&node(via), blind_put("after", &format!("v{index}")))
            .await;
        assert!(
            matches!(response, ClientResponse::Stored { .. }),
            "{response:?}"
        );
    }
    assert_eq!(copies(&cluster, "after").await, 2);
    assert_eq!(
        sibling_count(&cluster.client(&node("n1"), get_all("after")).await),
        1
    );

    // A restarted node has no cache: it reads the properties from the cluster.
    let weak = cluster.crash(&node("n5")).unwrap();
    wait_until_stopped(weak).await;
    cluster.restart(&node("n5"));
    let restarted = cluster.node(&node("n5")).unwrap();
    assert_eq!(restarted.bucket_props(BUCKET).await, Ok(props));
    let response = cluster
        .client(&node("n5"), blind_put("restarted", "x"))
        .await;
    assert!(
        matches!(response, ClientResponse::Stored { .. }),
        "{response:?}"
    );
    assert_eq!(copies(&cluster, "restarted").await, 2);

    // A second change is seen at once by nodes that cached the first (no TTL wait).
    let again = BucketProps {
        allow_mult: true,
        ..props
    };
    cluster
        .node(&node("n3"))
        .unwrap()
        .set_bucket_props(BUCKET, Some(again))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    for id in cluster.up_nodes() {
        let seen = cluster.node(&id).unwrap().bucket_props(BUCKET).await;
        assert_eq!(seen, Ok(again), "{id} sees the second change");
    }

    // With every cache dropped, the properties are read back from their replicas.
    for id in cluster.up_nodes() {
        cluster.node(&id).unwrap().clear_bucket_props_cache();
    }
    for id in cluster.up_nodes() {
        let seen = cluster.node(&id).unwrap().bucket_props(BUCKET).await;
        assert_eq!(seen, Ok(again), "{id} reads the stored properties");
    }

    // Reset: the defaults again; invalid properties are refused.
    first.set_bucket_props(BUCKET, None).await.unwrap();
    assert_eq!(first.bucket_props(BUCKET).await, Ok(defaults));
    let invalid = BucketProps {
        n_val: 2,
        w: Quorum::Count(3),
        ..defaults
    };
    let error = first
        .set_bucket_props(BUCKET, Some(invalid))
        .await
        .unwrap_err();
    assert!(error.message.starts_with("w=3"), "{}", error.message);

    // Clients cannot name the reserved bucket.
    let response = cluster
        .client(
            &node("n1"),
            ClientRequest::Get {
                bucket: b"\0props".to_vec(),
                key: BUCKET.to_vec(),
                options: GetOptions::default(),
            },
        )
        .await;
    assert!(matches!(response, ClientResponse::Error(_)), "{response:?}");
}

/// A node that cannot read a bucket's properties refuses the request; it never serves it
/// with the node defaults. Here the defaults say `allow_mult = false` and the bucket says
/// `true`: a write coordinated under the defaults would reconcile the key's siblings away.
#[tokio::test(start_paused = true)]
async fn a_node_that_cannot_read_the_properties_refuses_instead_of_using_defaults() {
    let mut settings = default_settings();
    settings.allow_mult = false;
    let cluster = SimCluster::start(5, 8, settings).await;
    let props_replicas = cluster.replicas_of(dynkv::server::node::PROPS_BUCKET, BUCKET);
    // A key with a replica that holds no copy of the properties.
    let (key, outsider, data_replicas) = (0..100)
        .map(|index| format!("k{index}"))
        .find_map(|key| {
            let replicas = cluster.replicas_of(BUCKET, key.as_bytes());
            let outsider = replicas
                .iter()
                .find(|id| !props_replicas.contains(id))?
                .clone();
            Some((key, outsider, replicas))
        })
        .expect("some key has a replica outside the properties' replicas");
    let first = cluster.node(&data_replicas[0]).unwrap();
    let mult = BucketProps {
        allow_mult: true,
        ..first.default_bucket_props()
    };
    first.set_bucket_props(BUCKET, Some(mult)).await.unwrap();
    for (via, value) in data_replicas.iter().zip(["left", "right"]) {
        let response = cluster.client(via, blind_put(&key, value)).await;
        assert!(
            matches!(response, ClientResponse::Stored { .. }),
            "{response:?}"
        );
    }
    assert_eq!(
        sibling_count(&cluster.client(&outsider, get_all(&key)).await),
        2
    );

    // The outsider forgets the properties and cannot reach their replicas.
    cluster.node(&outsider).unwrap().clear_bucket_props_cache();
    for replica in &props_replicas {
        cluster.network.cut(&outsider, replica);
    }
    let response = cluster.client(&outsider, blind_put(&key, "latest")).await;
    cluster.network.heal_all();
    let ClientResponse::Found { siblings, .. } = cluster.client(&outsider, get_all(&key)).await
    else {
        panic!("{key} must be readable");
    };
    let values: Vec<&[u8]> = siblings.iter().map(|content| &content.value[..]).collect();
    assert!(
        values.contains(&&b"left"[..]) && values.contains(&&b"right"[..]),
        "siblings were reconciled away: {values:?}"
    );
    match &response {
        ClientResponse::Error(error) => assert!(
            error.message.contains("cannot read the properties"),
            "{}",
            error.message
        ),
        other => panic!("a write was served without its bucket's properties: {other:?}"),
    }
}

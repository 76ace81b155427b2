//! Real processes over QUIC on loopback (DESIGN §9, layer 3): `dynkv dev`, the CLI client,
//! kill -9 and restart, bad input from users and from the network.

mod common;

use common::process::{DevCluster, json, sibling_values, stderr, stdout};
use std::time::{Duration, Instant};

#[test]
fn walkthrough_round_trip_siblings_kill_and_restart() {
    let cluster = DevCluster::start(3, 0);

    // put --w all, get --r all.
    let output = cluster.cli(&["put", "demo", "hello", "world", "--w", "all"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output = cluster.cli(&["get", "demo", "hello", "--r", "all", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let read = json(&output);
    assert_eq!(sibling_values(&read), vec!["world"]);
    let context = read["context"].as_str().expect("a context").to_string();

    // Two writes carrying the same context become siblings...
    for value in ["left", "right"] {
        let output = cluster.cli(&["put", "demo", "hello", value, "--context", &context]);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let read = json(&cluster.cli(&["get", "demo", "hello", "--r", "all", "--json"]));
    assert_eq!(sibling_values(&read), vec!["left", "right"]);
    // ...and a write with the context of that read resolves them.
    let context = read["context"].as_str().expect("a context").to_string();
    let output = cluster.cli(&[
        "put",
        "demo",
        "hello",
        "resolved",
        "--context",
        &context,
        "--w",
        "all",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let read = json(&cluster.cli(&["get", "demo", "hello", "--r", "all", "--json"]));
    assert_eq!(sibling_values(&read), vec!["resolved"]);

    // Keys acknowledged by every replica before the crash.
    for index in 0..20 {
        let output = cluster.cli(&[
            "put",
            "durable",
            &format!("key{index}"),
            &format!("value{index}"),
            "--w",
            "all",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
    }

    // One of three nodes killed: quorum answers, all fails within its timeout with counts.
    cluster.kill_node(3);
    let output = cluster.cli(&[
        "put",
        "demo",
        "after",
        "kill",
        "--w",
        "quorum",
        "--node",
        &cluster.client_addr(1),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output = cluster.cli(&[
        "get",
        "demo",
        "hello",
        "--r",
        "quorum",
        "--json",
        "--node",
        &cluster.client_addr(1),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let started = Instant::now();
    let output = cluster.cli(&[
        "put",
        "demo",
        "hello",
        "needs-all",
        "--w",
        "all",
        "--timeout-ms",
        "1500",
        "--node",
        &cluster.client_addr(1),
    ]);
    assert!(!output.status.success(), "w=all must fail with a node down");
    assert!(
        stderr(&output).contains("2 of 3 replicas acknowledged, 3 required"),
        "{}",
        stderr(&output)
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "w=all did not answer within its timeout"
    );

    // Restart the node by hand; with the two others killed, it alone answers an r=1 read
    // from its own disk: it has every write it acknowledged.
    let mut restarted = cluster.restart_node(3);
    cluster.kill_node(1);
    cluster.kill_node(2);
    for index in 0..20 {
        let output = cluster.cli(&[
            "get",
            "durable",
            &format!("key{index}"),
            "--r",
            "1",
            "--json",
            "--node",
            &cluster.client_addr(3),
        ]);
        assert!(output.status.success(), "key{index}: {}", stderr(&output));
        assert_eq!(
            sibling_values(&json(&output)),
            vec![format!("value{index}")]
        );
    }
    let _ = restarted.kill();
    let _ = restarted.wait();
}

#[test]
fn invalid_options_and_over_limit_values_get_clear_errors() {
    let cluster = DevCluster::start(3, 1);
    let output = cluster.cli(&["get", "demo", "k", "--r", "4"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("r=4 is out of range"),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("n_val (3)"), "{}", stderr(&output));

    let output = cluster.cli(&["put", "demo", "k", "v", "--w", "0"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("w=0 is out of range"),
        "{}",
        stderr(&output)
    );

    let output = cluster.cli(&["put", "demo", "k", "v", "--w", "most"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("is not a consistency level"),
        "{}",
        stderr(&output)
    );

    let output = cluster.cli(&["put", "demo", "k", "v", "--context", "%%%"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--context"), "{}", stderr(&output));

    let big = "x".repeat(9 * 1024 * 1024);
    let mut child = std::process::Command::new(common::process::binary())
        .args(["put", "demo", "big", "--dev-dir"])
        .arg(cluster.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dynkv put runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(big.as_bytes()).expect("value written");
    }
    let output = child.wait_with_output().expect("put finishes");
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("value is 9437184 bytes; the limit is 8388608 bytes"),
        "{}",
        stderr(&output)
    );

    // The cluster still serves after all of that.
    let output = cluster.cli(&["put", "demo", "k", "fine"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let read = json(&cluster.cli(&["get", "demo", "k", "--json"]));
    assert_eq!(sibling_values(&read), vec!["fine"]);
    assert!(stdout(&cluster.cli(&["get", "demo", "k"])).starts_with("fine\ncontext: "));
}

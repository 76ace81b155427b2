//! Active anti-entropy between real `dynkv server` processes (DESIGN §7, layer 3): with read
//! repair off, a replica that missed writes holds every key at `r=one` through it once
//! exchanges have run, and no read asked it before.
//!
//! How it misses them: it is killed, the writes go at w=2 without sloppy quorum (so no
//! fallback holds a hint for it), and it starts again. (Frozen with SIGSTOP instead, it gets
//! most writes anyway: QUIC delivers what the kernel buffered once it resumes.)

mod common;

use common::process::{
    make_pki, server_command_with_config, spawn_server_with_config, start_servers,
};
use std::process::Output;
use std::time::{Duration, Instant};

use common::process::run_dynkv as run;

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_replica_that_missed_writes_holds_them_after_exchanges_with_read_repair_off() {
    let root = tempfile::tempdir().unwrap();
    let pki = make_pki(&root.path().join("pki"), "n1");
    for id in ["n2", "n3"] {
        let issued = run(&[
            "cert",
            "node",
            "--dir",
            &pki.display().to_string(),
            "--id",
            id,
            "--host",
            "127.0.0.1",
        ]);
        assert!(issued.status.success(), "{}", text(&issued));
    }
    let port_at =
        |base: u16, node: u16, offset: u16| format!("127.0.0.1:{}", base + offset + node - 1);
    let (mut servers, base) = start_servers(0, |base| {
        let port = |node: u16, offset: u16| port_at(base, node, offset);
        let members: String = (1..=3)
            .map(|node| {
                format!(
                    "[[members]]\nid = \"n{node}\"\npeer_addr = \"{}\"\n",
                    port(node, 100)
                )
            })
            .collect();
        (1..=3u16)
            .map(|node| {
                let dir = root.path().join(format!("n{node}"));
                // A start on another band begins with no data from the one before.
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                let config = format!(
                    "node_id = \"n{node}\"\ndata_dir = \"{data}\"\nclient_listen = \"{client}\"\n\
                     peer_listen = \"{peer}\"\nhttp_listen = \"{http}\"\npb_listen = \"{pb}\"\nread_repair_chance = 0.0\n\
                     gossip_interval_ms = 200\nrequest_timeout_ms = 2000\n{members}\n\
                     [tls]\nca_cert = \"{pki}/ca.pem\"\nnode_cert = \"{pki}/n{node}.pem\"\nnode_key = \"{pki}/n{node}.key\"\n\
                     [aae]\nexchange_interval_ms = 200\n",
                    data = dir.join("data").display(),
                    client = port(node, 0),
                    peer = port(node, 100),
                    http = port(node, 200),
                    pb = port(node, 300),
                    pki = pki.display(),
                );
                let path = dir.join("dynkv.toml");
                std::fs::write(&path, config).unwrap();
                let pb_address = port(node, 300).parse().unwrap();
                (server_command_with_config(&path), pb_address)
            })
            .collect()
    });
    let port = |node: u16, offset: u16| port_at(base, node, offset);
    let ca = pki.join("ca.pem").display().to_string();
    let on = |node: u16, args: &[&str]| {
        let address = port(node, 0);
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--node", &address, "--ca", &ca]);
        run(&all)
    };
    let sees = |viewer: u16, target: &str, up: bool| {
        let members = on(viewer, &["admin", "members", "--json"]);
        let members: serde_json::Value =
            serde_json::from_slice(&members.stdout).unwrap_or_default();
        members.as_array().is_some_and(|members| {
            members
                .iter()
                .any(|member| member["node"] == target && member["up"] == up)
        })
    };
    wait_for(Duration::from_secs(30), "n1 sees n3 up", || {
        sees(1, "n3", true)
    });

    // n3 dies; writes then miss it and leave no hint; it starts again on its data.
    let n3_config = root.path().join("n3").join("dynkv.toml");
    drop(servers.pop());
    wait_for(Duration::from_secs(30), "n1 and n2 judge n3 down", || {
        sees(1, "n3", false) && sees(2, "n3", false)
    });
    let keys: Vec<String> = (0..100).map(|index| format!("missed{index}")).collect();
    for key in &keys {
        let stored = on(
            1,
            &[
                "put",
                "aae",
                key,
                "v",
                "--w",
                "2",
                "--sloppy-quorum",
                "false",
            ],
        );
        assert!(stored.status.success(), "{key}: {}", text(&stored));
    }
    // A put answers at w=2 while its write to n3 may still wait, until the put's deadline
    // (request_timeout_ms, 2 s), on the one connection attempt to n3 that every caller shares
    // (`net::quic`). The 100 puts take about 1.5 s, so an n3 started at once can complete
    // that attempt and take every write still waiting: two full `cargo test` runs failed
    // with 5 of 100 keys left to the exchanges and every exchange of n1 with n3 in sync.
    // Starting it after the deadlines leaves every write it missed to anti-entropy.
    std::thread::sleep(Duration::from_millis(2000 + 1000));
    servers.push(spawn_server_with_config(&n3_config));
    wait_for(Duration::from_secs(30), "n1 sees n3 up again", || {
        sees(1, "n3", true)
    });

    // No read asks n3 until the exchanges have repaired as many keys as it missed.
    let repaired = || -> u64 {
        (1..=3)
            .map(|node| {
                let status = on(node, &["admin", "status", "--json"]);
                serde_json::from_slice::<serde_json::Value>(&status.stdout)
                    .ok()
                    .and_then(|status| status["aae_keys_repaired"].as_u64())
                    .unwrap_or(0)
            })
            .sum()
    };
    let started = Instant::now();
    while repaired() < keys.len() as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "exchanges repaired {} of {} keys in 60 s:\n{}\n{}\nn3: {}",
            repaired(),
            keys.len(),
            text(&on(1, &["admin", "aae"])),
            text(&on(1, &["admin", "status", "--json"])),
            text(&on(3, &["admin", "status", "--json"]))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "{} keys repaired {:.1} s after n3 was back",
        repaired(),
        started.elapsed().as_secs_f64()
    );
    let missing: Vec<&String> = keys
        .iter()
        .filter(|key| {
            let read = on(3, &["get", "aae", key, "--r", "one"]);
            !(read.status.success()
                && String::from_utf8_lossy(&read.stdout)
                    .lines()
                    .any(|line| line.trim() == "v"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "missed at r=one through n3: {missing:?}; the first read printed {}",
        text(&on(3, &["get", "aae", &keys[0], "--r", "one"]))
    );
    let aae = on(3, &["admin", "aae"]);
    assert!(aae.status.success(), "{}", text(&aae));
    assert!(
        text(&aae).contains("keys repaired") || text(&aae).contains("in sync"),
        "{}",
        text(&aae)
    );
}

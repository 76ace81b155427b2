//! A small closed-loop load generator over the Rust client library, used to measure the dev
//! cluster until `dynkv bench` exists. Each worker keeps one request in flight.
//!
//! ```sh
//! cargo run --release -- dev &                                  # a 3-node cluster
//! cargo run --release --example load -- put 50 20000 quorum     # op, workers, operations, level
//! cargo run --release --example load -- get 50 20000 quorum
//! ```

use dynkv::client::{Client, ClientConfig};
use dynkv::core::quorum::Quorum;
use dynkv::protocol::{GetOptions, NewContent, PutOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(serde::Deserialize)]
struct DevCluster {
    ca_cert: PathBuf,
    nodes: Vec<DevNode>,
}

#[derive(serde::Deserialize)]
struct DevNode {
    client_addr: std::net::SocketAddr,
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let operation = args.first().cloned().unwrap_or_else(|| "put".into());
    let workers: usize = args.get(1).map_or(Ok(50), |text| text.parse())?;
    let operations: usize = args.get(2).map_or(Ok(20_000), |text| text.parse())?;
    let level: Quorum = args
        .get(3)
        .map_or(Ok(Quorum::Quorum), |text| text.parse())?;
    let keys = 10_000usize;

    let dir = std::env::var_os("DYNKV_DEV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".local/share/dynkv/dev")
        });
    let cluster: DevCluster = toml::from_str(&std::fs::read_to_string(dir.join("cluster.toml"))?)?;
    let ca = std::fs::read_to_string(&cluster.ca_cert)?;
    // One client connection per node; workers are spread over them.
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        clients.push(Client::connect(ClientConfig::new(vec![node.client_addr], ca.clone())).await?);
    }
    let value = vec![b'x'; 100];
    if operation == "get" {
        // Preload every key once so gets find values.
        let client = clients[0].clone();
        let mut preload = Vec::new();
        for chunk in 0..workers {
            let client = client.clone();
            let value = value.clone();
            preload.push(tokio::spawn(async move {
                for key in (chunk..keys).step_by(workers) {
                    let content = NewContent {
                        value: value.clone(),
                        ..Default::default()
                    };
                    let _ = client
                        .put(
                            b"load",
                            key.to_string().as_bytes(),
                            None,
                            content,
                            PutOptions::default(),
                        )
                        .await;
                }
            }));
        }
        for task in preload {
            task.await?;
        }
    }

    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let client = clients[worker % clients.len()].clone();
        let operation = operation.clone();
        let value = value.clone();
        let count = operations / workers;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(count);
            let mut errors = 0usize;
            for index in 0..count {
                let key = ((worker * 7919 + index * 104_729) % keys).to_string();
                let begun = Instant::now();
                let ok = if operation == "get" {
                    let options = GetOptions {
                        r: level,
                        ..Default::default()
                    };
                    client.get(b"load", key.as_bytes(), options).await.is_ok()
                } else {
                    let content = NewContent {
                        value: value.clone(),
                        ..Default::default()
                    };
                    let options = PutOptions {
                        w: level,
                        dw: Quorum::Count(0),
                        ..Default::default()
                    };
                    client
                        .put(b"load", key.as_bytes(), None, content, options)
                        .await
                        .is_ok()
                };
                latencies.push(begun.elapsed());
                if !ok {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (mut worker_latencies, worker_errors) = task.await?;
        latencies.append(&mut worker_latencies);
        errors += worker_errors;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    println!(
        "{operation} level={level} workers={workers} ops={} errors={errors} elapsed={:.2}s throughput={:.0} ops/s p50={:.2}ms p99={:.2}ms max={:.2}ms",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
    Ok(())
}

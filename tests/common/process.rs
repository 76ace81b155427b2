//! Helpers to run real `dynkv` processes: a dev cluster and CLI commands against it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_dynkv")
}

/// A base port for one test, distinct per test (by `slot`) and per test process.
pub fn base_port(slot: u16) -> u16 {
    20_000 + (std::process::id() % 150) as u16 * 250 + slot * 10
}

/// A `dynkv server` process started by a test; killed and reaped on drop.
pub struct NodeProcess(pub Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct DevCluster {
    pub dir: tempfile::TempDir,
    pub base_port: u16,
    child: Child,
}

impl DevCluster {
    /// Starts `dynkv dev` and waits for it to report every node up.
    pub fn start(nodes: u16, slot: u16) -> DevCluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let base_port = base_port(slot);
        let mut child = Command::new(binary())
            .args([
                "dev",
                "--nodes",
                &nodes.to_string(),
                "--base-port",
                &base_port.to_string(),
            ])
            .arg("--dir")
            .arg(dir.path())
            .args(["--request-timeout-ms", "2000"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("dynkv dev starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut up = false;
        for line in lines.by_ref() {
            let line = line.expect("dev output");
            if line.contains("nodes up") {
                up = true;
                break;
            }
        }
        assert!(up, "dynkv dev exited before its nodes were up");
        // Keep draining stdout so the dev process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        DevCluster {
            dir,
            base_port,
            child,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn client_addr(&self, node: u16) -> String {
        format!("127.0.0.1:{}", self.base_port + node - 1)
    }

    pub fn peer_addr(&self, node: u16) -> String {
        format!("127.0.0.1:{}", self.base_port + 100 + node - 1)
    }

    /// The base URL of a node's HTTP API (`dynkv dev` puts it at BASE+200+i-1).
    pub fn http_addr(&self, node: u16) -> String {
        format!("http://127.0.0.1:{}", self.base_port + 200 + node - 1)
    }

    pub fn node_config(&self, node: u16) -> PathBuf {
        self.path().join(format!("n{node}")).join("dynkv.toml")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.path().join("pki").join("ca.pem")
    }

    /// Runs a CLI command against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary())
            .args(args)
            .arg("--dev-dir")
            .arg(self.path())
            .output()
            .expect("dynkv CLI runs")
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to a node's process: `STOP` freezes it without
    /// closing its sockets, as a stalled machine would.
    pub fn signal_node(&self, node: u16, signal: &str) {
        let pid_file = self.path().join(format!("n{node}")).join("pid");
        let pid = std::fs::read_to_string(&pid_file).expect("pid file");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), pid.trim()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn kill_node(&self, node: u16) {
        let pid_file = self.path().join(format!("n{node}")).join("pid");
        let pid = std::fs::read_to_string(&pid_file).expect("pid file");
        let status = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        // Wait until the process is gone so the ports are free for a restart.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", pid.trim())).exists() {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
            if stat.contains(") Z ") || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a node by hand, as the walkthrough tells a user to; it is killed when the
    /// returned guard drops (also when the test fails).
    // The child is reaped by the guard's Drop, which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    pub fn restart_node(&self, node: u16) -> NodeProcess {
        let mut child = Command::new(binary())
            .arg("server")
            .arg("--config")
            .arg(self.node_config(node))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("dynkv server starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let output = self.cli(&["ping", "--node", &self.client_addr(node)]);
            if output.status.success() {
                return NodeProcess(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("restarted node {node} never answered");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        // SIGTERM lets dev stop its nodes; wait for it so no process outlives the test.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                _ if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Parses `--json` output of `get` or `put`.
pub fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "not JSON ({error}): {} / {}",
            stdout(output),
            stderr(output)
        )
    })
}

pub fn sibling_values(document: &serde_json::Value) -> Vec<String> {
    let mut values: Vec<String> = document["siblings"]
        .as_array()
        .map(|siblings| {
            siblings
                .iter()
                .filter_map(|sibling| sibling["value"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    values.sort();
    values
}

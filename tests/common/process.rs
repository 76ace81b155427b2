//! Helpers to run real `dynkv` processes: a dev cluster and CLI commands against it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_dynkv")
}

/// Makes the process `command` starts receive SIGKILL when the thread that starts it ends
/// (`PR_SET_PDEATHSIG`). libtest runs each test on a thread of its own, so a process started
/// from a test dies with the test even when the test binary itself is killed and no `Drop`
/// runs; the guards' `Drop` still stops it first, gracefully, in every ordinary case.
pub fn die_with_this_thread(command: &mut Command) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure calls only prctl(2) and getppid(2), both
    // async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect: then no signal would come.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the test process is gone"));
            }
            Ok(())
        })
    };
    command
}

/// Sends `signal` to every process of group `group`; false when none is left.
fn signal_group(group: u32, signal: i32) -> bool {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
    unsafe { libc::kill(-(group as libc::pid_t), signal) == 0 }
}

/// Ports a test may use lie below the kernel's ephemeral range (read from
/// `/proc/sys/net/ipv4/ip_local_port_range`), so no socket bound to port 0 (every QUIC
/// client endpoint, every HTTP client) can take one of them first.
const LOWEST_TEST_PORT: u16 = 10_000;

/// Ports one test process may use: a node set uses BASE+0..9 (client), BASE+100..109 (peer),
/// BASE+200..209 (HTTP) and BASE+300..309 (Protocol Buffers); slots shift BASE by 10, so a
/// band of 400 fits slots 0..=9.
const PORTS_PER_PROCESS: u16 = 400;

/// The lowest port of the kernel's ephemeral range (32,768 where it cannot be read).
fn ephemeral_port_floor() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A base port for one test, distinct per test (by `slot`) and per test process, below the
/// ephemeral range. `attempt` moves to another band after a bind failure.
pub fn base_port_for_attempt(slot: u16, attempt: u32) -> u16 {
    let ceiling = ephemeral_port_floor().saturating_sub(PORTS_PER_PROCESS);
    let bands = (ceiling.saturating_sub(LOWEST_TEST_PORT) / PORTS_PER_PROCESS).max(1) as u32;
    // 37 is prime to most band counts, so retries visit bands far from the first.
    let band = (std::process::id() + attempt * 37) % bands;
    LOWEST_TEST_PORT + band as u16 * PORTS_PER_PROCESS + slot * 10
}

/// A base port for one test, distinct per test (by `slot`) and per test process.
pub fn base_port(slot: u16) -> u16 {
    base_port_for_attempt(slot, 0)
}

/// The last `lines` lines of every `nN/node.log` under a dev directory, for failure messages
/// (the directory is deleted with the test).
pub fn node_log_tails(dir: &Path, lines: usize) -> String {
    let mut report = String::new();
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("node.log"))
        .filter(|path| path.exists())
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        report.push_str(&format!(
            "--- {} (last {} lines)\n",
            log.display(),
            tail.len()
        ));
        for line in tail {
            report.push_str(line);
            report.push('\n');
        }
    }
    report
}

/// A cluster CA and a certificate for node `node_id` on 127.0.0.1, made with `dynkv cert` in
/// `dir`; returns `dir`.
pub fn make_pki(dir: &Path, node_id: &str) -> PathBuf {
    let text = dir.display().to_string();
    for args in [
        vec!["cert", "ca", "--dir", &text],
        vec![
            "cert",
            "node",
            "--dir",
            &text,
            "--id",
            node_id,
            "--host",
            "127.0.0.1",
        ],
    ] {
        let output = Command::new(binary())
            .args(&args)
            .output()
            .expect("dynkv cert runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    dir.to_path_buf()
}

/// `dynkv server` for node n1 with its certificates from `pki` (see [`make_pki`]), its data in
/// `data_dir`, its client port at `base`, peer port at `base + 100`, HTTP at `base + 200` and
/// Protocol Buffers at `base + 300`,
/// logging warnings to stderr; the caller adds its own flags and spawns it.
pub fn server_command(pki: &Path, data_dir: &Path, base: u16) -> Command {
    server_command_for("n1", pki, data_dir, base)
}

/// [`server_command`] for node `node_id` (its certificate `<node_id>.pem` in `pki`).
pub fn server_command_for(node_id: &str, pki: &Path, data_dir: &Path, base: u16) -> Command {
    let address = |offset: u16| format!("127.0.0.1:{}", base + offset);
    let mut command = Command::new(binary());
    command
        .args(["server", "--node-id", node_id, "--data-dir"])
        .arg(data_dir)
        .args([
            "--client-listen",
            &address(0),
            "--peer-listen",
            &address(100),
        ])
        .args(["--http-listen", &address(200)])
        .args(["--pb-listen", &address(300)])
        .arg("--ca-cert")
        .arg(pki.join("ca.pem"))
        .arg("--node-cert")
        .arg(pki.join(format!("{node_id}.pem")))
        .arg("--node-key")
        .arg(pki.join(format!("{node_id}.key")))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    die_with_this_thread(&mut command);
    command
}

/// The Protocol Buffers address of a server that [`server_command`] starts at `base`.
pub fn pb_address(base: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], base + 300))
}

/// Runs the `dynkv` CLI with `args` (without a token from the environment) to its end.
pub fn run_dynkv(args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .args(args)
        .env_remove("DYNKV_TOKEN")
        .output()
        .expect("dynkv runs")
}

/// `dynkv server --config CONFIG`, logging warnings to stderr, not yet spawned.
pub fn server_command_with_config(config: &Path) -> Command {
    let mut command = Command::new(binary());
    command
        .arg("server")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    die_with_this_thread(&mut command);
    command
}

/// `dynkv server --config CONFIG`, logging warnings to stderr, spawned.
pub fn spawn_server_with_config(config: &Path) -> NodeProcess {
    NodeProcess(
        server_command_with_config(config)
            .spawn()
            .expect("dynkv server starts"),
    )
}

/// Starts hand-made servers on a band of ports of their own, as [`DevCluster::start`] does:
/// `commands(base)` gives each server's command for base port `base` and the address of its
/// Protocol Buffers listener, the last one a server binds. When a server exits because one
/// of its ports is taken (by another test process, or a process a killed test left), every
/// server of that attempt is stopped and all start again on another band. Returns the
/// servers, each listening on every port, and the base port they use.
pub fn start_servers(
    slot: u16,
    commands: impl Fn(u16) -> Vec<(Command, SocketAddr)>,
) -> (Vec<NodeProcess>, u16) {
    const ATTEMPTS: u32 = 4;
    let mut failures = String::new();
    for attempt in 0..ATTEMPTS {
        let base = base_port_for_attempt(slot, attempt);
        let mut started = Vec::new();
        let mut taken = false;
        for (mut command, pb_address) in commands(base) {
            let stderr = Arc::new(Mutex::new(String::new()));
            let mut child = command
                .stderr(Stdio::piped())
                .spawn()
                .expect("dynkv server starts");
            let pipe = child.stderr.take().expect("stderr piped");
            let lines = Arc::clone(&stderr);
            // Passes the server's warnings on to the test's stderr, keeping a copy.
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("{line}");
                    let mut kept = lines.lock().unwrap_or_else(|poison| poison.into_inner());
                    kept.push_str(&line);
                    kept.push('\n');
                }
            });
            let mut process = NodeProcess(child);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(status)) = process.0.try_wait() {
                    // Let the reader thread take the last lines.
                    std::thread::sleep(Duration::from_millis(200));
                    let text = stderr
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner())
                        .clone();
                    failures.push_str(&format!(
                        "attempt {attempt} at base port {base}: exited ({status}):\n{text}\n"
                    ));
                    taken = text.contains("Address already in use");
                    if !taken {
                        panic!("a dynkv server exited during start-up\n{failures}");
                    }
                    break;
                }
                if TcpStream::connect_timeout(&pb_address, Duration::from_millis(200)).is_ok() {
                    started.push(process);
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "a dynkv server did not open {pb_address} within 60 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            if taken {
                break;
            }
        }
        if !taken {
            return (started, base);
        }
        // `started` drops here: the servers of this attempt are killed before the next.
    }
    panic!("every band of ports was taken\n{failures}");
}

/// A `dynkv server` process started by a test; killed and reaped on drop.
pub struct NodeProcess(pub Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `dynkv dev` cluster started by a test. `dynkv dev` leads a process group of its own,
/// which its nodes and the nodes the test restarts by hand join; on drop (at the test's end,
/// on a panic or a failed assertion) `dynkv dev` is asked to stop its nodes, and whatever
/// is left of the group after that is killed.
pub struct DevCluster {
    pub dir: tempfile::TempDir,
    pub base_port: u16,
    child: Child,
    /// The process group of `dynkv dev` and every node of this cluster.
    group: u32,
}

impl DevCluster {
    /// Starts `dynkv dev` and waits for it to report every node up. A start that fails
    /// because a port is taken is retried on another band of ports; any other failure
    /// panics with the tail of each node's log.
    pub fn start(nodes: u16, slot: u16) -> DevCluster {
        const ATTEMPTS: u32 = 4;
        let mut failures = String::new();
        for attempt in 0..ATTEMPTS {
            let base_port = base_port_for_attempt(slot, attempt);
            match DevCluster::try_start(nodes, base_port) {
                Ok(cluster) => return cluster,
                Err((dir, logs)) => {
                    failures.push_str(&format!(
                        "attempt {attempt} at base port {base_port} ({}):\n{logs}\n",
                        dir.path().display()
                    ));
                    if !logs.contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("dynkv dev exited before its nodes were up\n{failures}");
    }

    /// One start at `base_port`; on failure, the directory and the tails of the node logs.
    fn try_start(nodes: u16, base_port: u16) -> Result<DevCluster, (tempfile::TempDir, String)> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut command = Command::new(binary());
        command
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
            .process_group(0);
        let mut child = die_with_this_thread(&mut command)
            .spawn()
            .expect("dynkv dev starts");
        let group = child.id();
        let stdout = child.stdout.take().expect("stdout piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut up = false;
        let mut printed = String::new();
        for line in lines.by_ref() {
            let line = line.expect("dev output");
            if line.contains("nodes up") {
                up = true;
                break;
            }
            printed.push_str(&line);
            printed.push('\n');
        }
        if !up {
            let _ = child.kill();
            let _ = child.wait();
            signal_group(group, libc::SIGKILL);
            let logs = format!("dev printed:\n{printed}{}", node_log_tails(dir.path(), 20));
            return Err((dir, logs));
        }
        // Keep draining stdout so the dev process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(DevCluster {
            dir,
            base_port,
            child,
            group,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Makes a process the test starts beside this cluster (a node on its ports) a member
    /// of the cluster's process group, so that it is stopped with the cluster.
    pub fn in_group<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        command.process_group(self.group as i32)
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
        let mut child = self
            .in_group(&mut server_command_with_config(&self.node_config(node)))
            .spawn()
            .expect("dynkv server starts");
        // As `dynkv dev` does, so that `kill_node` (and the README's `kill`) find it.
        let pid_file = self.path().join(format!("n{node}")).join("pid");
        std::fs::write(&pid_file, format!("{}\n", child.id())).expect("pid file written");
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
        // SIGTERM lets dev stop its nodes (in parallel, each within 10 s); then anything left
        // of the group (a node dev could not stop, one restarted by hand) is killed, and the
        // drop waits until the group is gone so that its ports are free for the next test.
        // SAFETY: kill(2) on the pid of our own child; no memory is touched.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
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
        signal_group(self.group, libc::SIGKILL);
        // Nodes restarted by hand are this test's children and stay zombies until their
        // guards reap them, so the wait is bounded rather than until the group is empty.
        let deadline = Instant::now() + Duration::from_secs(5);
        while signal_group(self.group, 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
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

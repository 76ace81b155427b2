//! A node whose disk fills up (a small tmpfs, mounted by the test; needs root, as CI and the
//! dev machine have): writes are refused with "insufficient space", reads keep working,
//! nothing acknowledged is lost, and writes resume by themselves once space returns.

mod common;

use common::process::{make_pki, pb_address, server_command, start_servers};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run(args: &[&str]) -> Output {
    common::process::run_dynkv(args)
}

fn available(path: &Path) -> u64 {
    dynkv::storage::available_bytes(path).expect("statvfs")
}

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_recovers_by_itself() {
    let root = tempfile::tempdir().expect("temporary directory");
    let disk = root.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&disk)
        .stderr(Stdio::null())
        .status();
    if !mounted.is_ok_and(|status| status.success()) {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _mounted = Mounted(disk.clone());

    let pki = make_pki(&root.path().join("pki"), "n1");
    let config = root.path().join("dynkv.toml");
    std::fs::write(&config, "[storage]\nmin_free_mib = 16\ncache_mib = 8\n").unwrap();
    let (mut servers, base) = start_servers(7, |base| {
        let mut command = server_command(&pki, &disk.join("data"), base);
        command.arg("--config").arg(&config);
        vec![(command, pb_address(base))]
    });
    let mut server = servers.remove(0);
    let address = |offset: u16| format!("127.0.0.1:{}", base + offset);
    let ca = pki.join("ca.pem").display().to_string();
    let node = address(0);
    let client = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--node", &node, "--ca", &ca]);
        run(&all)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client(&["ping"]).status.success() {
        assert!(Instant::now() < deadline, "the node never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    for index in 0..10 {
        let stored = client(&["put", "b", &format!("k{index}"), &format!("v{index}")]);
        assert!(
            stored.status.success(),
            "{}",
            String::from_utf8_lossy(&stored.stderr)
        );
    }

    // Fill the disk until less than the 16 MiB reserve is free.
    let filler = disk.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 1024 * 1024];
    while available(&disk) > 8 * 1024 * 1024 {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let attempt = client(&["put", "b", "while-full", "x"]);
        if !attempt.status.success() {
            break attempt;
        }
        assert!(
            Instant::now() < deadline,
            "writes were never refused on a full disk"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("insufficient space"), "{message}");
    assert!(message.contains("storage.min_free_mib"), "{message}");
    let read = client(&["get", "b", "k3"]);
    assert!(
        read.status.success(),
        "reads stop on a full disk: {}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert!(String::from_utf8_lossy(&read.stdout).contains("v3"));
    // HTTP says 507.
    let http = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .args(["-H", "Content-Type: text/plain", "-d", "x"])
        .arg(format!("http://{}/buckets/b/keys/http-full", address(200)))
        .output()
        .expect("curl runs");
    assert_eq!(String::from_utf8_lossy(&http.stdout), "507");

    // Space returns: writes resume without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client(&["put", "b", "after", "back"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "writes did not resume when space returned"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(server.0.try_wait().unwrap().is_none(), "the node exited");
    for index in 0..10 {
        let read = client(&["get", "b", &format!("k{index}")]);
        assert!(String::from_utf8_lossy(&read.stdout).contains(&format!("v{index}")));
    }
    let read = client(&["get", "b", "after"]);
    assert!(String::from_utf8_lossy(&read.stdout).contains("back"));
    let _ = server.0.kill();
}

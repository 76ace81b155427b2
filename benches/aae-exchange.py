#!/usr/bin/env python3
"""Measures anti-entropy and tombstone reaping on three real `dynkv server` processes.

1. Preloads RECORDS keys (`dynkv bench`), with read repair off and scheduled exchanges far
   apart (`aae.exchange_interval_ms = 3600000`), so only the exchanges run here repair.
2. Kills n3, writes one key at w=2 without sloppy quorum (no hint), restarts n3 and waits for
   its trees to be built.
3. Runs `dynkv admin aae repair P` for every partition on its first owner, one at a time,
   timing each (CLI wall time, the CLI's start included) and reading the owner's counters
   before and after: the one exchange that finds the key, against the in-sync ones.
4. Gives bucket `bench` `tombstone_grace_secs = 0`, deletes DELETES keys over HTTP, and times
   `admin aae repair` on every node (exchange, then reap): tombstones reaped per second.

Usage: benches/aae-exchange.py [--binary target/release/dynkv] [--records 100000]
                               [--deletes 10000] [--base-port 27500]
Traffic goes to loopback only; every process started is stopped at the end.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/dynkv")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--deletes", type=int, default=10_000)
    parser.add_argument("--base-port", type=int, default=27500)
    args = parser.parse_args()
    binary = os.path.abspath(args.binary)
    work = tempfile.mkdtemp(prefix="dynkv-aae-")
    servers = {}
    try:
        run(binary, work, servers, args)
    finally:
        for process in servers.values():
            stop(process)
        if os.environ.get("KEEP"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def cli(binary, work, *arguments, node=None, check=True):
    command = [binary, *arguments]
    if node is not None:
        command += ["--node", node, "--ca", f"{work}/pki/ca.pem"]
    else:
        command += ["--dev-dir", work]
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed: {result.stderr}")
    return result


def client_addr(args, index):
    return f"127.0.0.1:{args.base_port + index - 1}"


def http_port(args, index):
    return args.base_port + 200 + index - 1


def start_server(binary, work, name):
    log = open(f"{work}/{name}.log", "a")
    return subprocess.Popen(
        [binary, "server", "--config", f"{work}/{name}/dynkv.toml"],
        stdout=log,
        stderr=log,
        env={**os.environ, "RUST_LOG": "warn"},
    )


def wait_for(what, condition, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")


def status(binary, work, node):
    return json.loads(cli(binary, work, "admin", "status", "--json", node=node).stdout)


def aae(binary, work, node, *extra):
    return json.loads(cli(binary, work, "admin", "aae", *extra, "--json", node=node).stdout)


def run(binary, work, servers, args):
    # Certificates and configs from `dynkv dev`, then servers run here with settings changed.
    dev = subprocess.Popen(
        [binary, "dev", "--fresh", "--dir", work, "--base-port", str(args.base_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in dev.stdout:
        if "nodes up" in line:
            break
    stop(dev)
    for index in (1, 2, 3):
        path = f"{work}/n{index}/dynkv.toml"
        text = open(path).read()
        text = re.sub(r"(?m)^read_repair_chance = .*$", "read_repair_chance = 0.0", text)
        text = re.sub(r"(?m)^exchange_interval_ms = .*$", "exchange_interval_ms = 3600000", text)
        open(path, "w").write(text)
    for index in (1, 2, 3):
        servers[f"n{index}"] = start_server(binary, work, f"n{index}")
    nodes = {f"n{index}": client_addr(args, index) for index in (1, 2, 3)}
    for name, node in nodes.items():
        wait_for(f"{name} to answer", lambda: cli(binary, work, "ping", node=node, check=False).returncode == 0)

    started = time.time()
    cli(binary, work, "bench", "--records", str(args.records), "--workload", "c",
        "--operations", "1", "--no-ceiling", "--keys", "uniform", "--workers", "50")
    print(f"preloaded {args.records} records in {time.time() - started:.1f} s")
    # Whatever the preload left unequal is repaired first, so that one key differs below.
    for node in nodes.values():
        aae(binary, work, node, "repair")

    # Killed, not stopped: a node shutting down still serves peers for a while.
    servers["n3"].kill()
    servers["n3"].wait()
    wait_for(
        "n1 to judge n3 down",
        lambda: not any(
            member["node"] == "n3" and member["up"]
            for member in json.loads(cli(binary, work, "admin", "members", "--json", node=nodes["n1"]).stdout)
        ),
    )
    put = cli(binary, work, "put", "bench", "the-one-key", "missed by n3", "--w", "2",
              "--sloppy-quorum", "false", node=nodes["n1"])
    print(f"put: {put.stdout.strip()} {put.stderr.strip()}")
    servers["n3"] = start_server(binary, work, "n3")
    wait_for("n3 to answer", lambda: cli(binary, work, "ping", node=nodes["n3"], check=False).returncode == 0)
    wait_for(
        "n3's trees",
        lambda: all(partition["tree"] == "built" for partition in aae(binary, work, nodes["n3"])["partitions"]),
        seconds=600,
    )
    wait_for(
        "n1 to see n3 up",
        lambda: all(
            member["up"]
            for member in json.loads(cli(binary, work, "admin", "members", "--json", node=nodes["n1"]).stdout)
        ),
    )

    for name, node in nodes.items():
        counters = status(binary, work, node)
        print(f"{name} before the exchanges: {counters['aae_exchanges']} exchanges, {counters['aae_keys_repaired']} keys repaired, {counters['hints_held']} hints")
    in_sync, found = [], []
    for name, node in nodes.items():
        owned = [p["partition"] for p in aae(binary, work, node)["partitions"] if p.get("next_due_ms") is not None]
        for partition in owned:
            before = status(binary, work, node)
            started = time.perf_counter()
            info = aae(binary, work, node, "repair", str(partition))
            elapsed_ms = (time.perf_counter() - started) * 1000
            for entry in info["partitions"]:
                for exchange in entry["exchanges"] if entry["partition"] == partition else []:
                    if exchange["result"] != "in sync":
                        print(f"partition {partition} on {name} with {exchange['peer']}: {exchange['result']}")
            after = status(binary, work, node)
            exchanged = after["aae_bytes_exchanged"] - before["aae_bytes_exchanged"]
            repaired = after["aae_keys_repaired"] - before["aae_keys_repaired"]
            row = (elapsed_ms, exchanged, repaired, after["aae_bytes_repaired"] - before["aae_bytes_repaired"],
                   after["aae_segments_differing"] - before["aae_segments_differing"], name, partition)
            (found if repaired else in_sync).append(row)
    print(f"{len(in_sync)} in-sync partition exchanges (2 peers each): median {statistics.median(r[0] for r in in_sync):.1f} ms "
          f"CLI wall, {statistics.median(r[1] for r in in_sync):,.0f} bytes of hashes received")
    for elapsed_ms, exchanged, repaired, bytes_repaired, segments, name, partition in found:
        print(f"partition {partition} on {name}: {segments} segments differing, {repaired} key repaired in "
              f"{elapsed_ms:.1f} ms CLI wall; {exchanged:,} bytes of hashes and digests received, "
              f"{bytes_repaired} bytes of objects written")
    if not found:
        print("no exchange found the missed key")

    # Tombstone reaping: grace 0 for the bucket, then delete and reap.
    connection = http.client.HTTPConnection("127.0.0.1", http_port(args, 1))
    connection.request("PUT", "/buckets/bench/props", body=json.dumps({"props": {"tombstone_grace_secs": 0}}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    if response.status != 204:
        sys.exit(f"setting tombstone_grace_secs failed: {response.status}")
    time.sleep(11)  # every node's cached properties expire (10 s)
    keys = [f"user{index}" for index in range(min(args.deletes, args.records))]
    delete_all(args, keys)
    held = sum(status(binary, work, node)["tombstones_held"] for node in nodes.values())
    before = sum(status(binary, work, node)["tombstones_reaped"] for node in nodes.values())
    started = time.perf_counter()
    for node in nodes.values():
        aae(binary, work, node, "repair")
    elapsed = time.perf_counter() - started
    reaped = sum(status(binary, work, node)["tombstones_reaped"] for node in nodes.values()) - before
    print(f"{len(keys)} keys deleted ({held} tombstone copies held); `admin aae repair` on the 3 nodes reaped "
          f"{reaped} copies ({reaped / 3:,.0f} keys) in {elapsed:.1f} s: {reaped / 3 / elapsed:,.0f} keys/s")


def delete_all(args, keys):
    """Deletes `keys` of bucket `bench` over HTTP, 8 connections at once."""
    failures = []

    def worker(part, index):
        connection = http.client.HTTPConnection("127.0.0.1", http_port(args, 1 + index % 3))
        for key in part:
            connection.request("DELETE", f"/buckets/bench/keys/{key}")
            response = connection.getresponse()
            response.read()
            if response.status not in (204, 404):
                failures.append((key, response.status))

    threads = [threading.Thread(target=worker, args=(keys[index::8], index)) for index in range(8)]
    started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        sys.exit(f"{len(failures)} deletes failed, first {failures[0]}")
    print(f"deleted {len(keys)} keys over HTTP in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()

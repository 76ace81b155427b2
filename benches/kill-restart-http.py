#!/usr/bin/env python3
"""A long kill -9 / restart run over HTTP: does any acknowledged write go missing?

Starts `dynkv dev --nodes 5` on loopback (ports below the kernel's ephemeral range), lets four
clients write blind (no context, unique values) to 400 keys at w=quorum through random nodes'
HTTP APIs, and deletes a tenth of the time on the first 100 keys, while a chaos thread kills
one node at a time with SIGKILL (down longer than failure detection, so fallbacks, hints and
handoff run) and restarts it. At the end it restarts any node still down, waits until no
hints are held, reads every key at r=all and counts the acknowledged writes that are missing.
A write counts as possibly deleted (not lost) when a delete of its key started after it did.

Usage: benches/kill-restart-http.py [--seconds 150] [--binary target/release/dynkv]
Exit status 1 if an acknowledged write is missing. Not part of `cargo test` (it takes minutes).
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

NODES = 5
KEYS = 400
DELETE_KEYS = 100
BUCKET = "chaos"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=150)
    parser.add_argument("--binary", default="target/release/dynkv")
    parser.add_argument("--base-port", type=int, default=21000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)
    binary = os.path.abspath(args.binary)
    directory = tempfile.mkdtemp(prefix="dynkv-chaos-")
    dev = subprocess.Popen(
        [binary, "dev", "--nodes", str(NODES), "--fresh", "--dir", directory,
         "--base-port", str(args.base_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in dev.stdout:
        if "nodes up" in line:
            break
    else:
        sys.exit("dynkv dev exited before its nodes were up")
    threading.Thread(target=lambda: [None for _ in dev.stdout], daemon=True).start()

    def http(node):
        return f"http://127.0.0.1:{args.base_port + 200 + node - 1}"

    def cli(*words):
        return subprocess.run([binary, *words, "--dev-dir", directory],
                              capture_output=True, text=True)

    def pid(node):
        with open(os.path.join(directory, f"n{node}", "pid")) as file:
            return int(file.read().strip())

    down = set()
    restarted = []
    lock = threading.Lock()

    def restart(node):
        config = os.path.join(directory, f"n{node}", "dynkv.toml")
        log = open(os.path.join(directory, f"n{node}", "node.log"), "a")
        child = subprocess.Popen([binary, "server", "--config", config],
                                 stdout=log, stderr=log)
        with open(os.path.join(directory, f"n{node}", "pid"), "w") as file:
            file.write(f"{child.pid}\n")
        restarted.append(child)
        with lock:
            down.discard(node)

    refusals = {}  # HTTP status (or "no answer") -> count, for requests not acknowledged
    writes = []   # (key, value, started, acknowledged)
    deletes = []  # (key, started, acknowledged)
    stop = time.monotonic() + args.seconds

    def client(number):
        rng = random.Random(args.seed * 100 + number)
        sequence = 0
        while time.monotonic() < stop:
            with lock:
                up = [node for node in range(1, NODES + 1) if node not in down]
            node = rng.choice(up)
            key = rng.randrange(KEYS)
            url = f"{http(node)}/buckets/{BUCKET}/keys/k{key}?w=quorum&r=quorum"
            started = time.monotonic()
            if key < DELETE_KEYS and rng.random() < 0.1:
                request = urllib.request.Request(url, method="DELETE")
                record = [f"k{key}", started, False]
                deletes.append(record)
            else:
                value = f"c{number}-{sequence}"
                sequence += 1
                request = urllib.request.Request(url, data=value.encode(), method="PUT",
                                                 headers={"Content-Type": "text/plain"})
                record = [f"k{key}", value, started, False]
                writes.append(record)
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    record[-1] = response.status in (200, 204)
            except urllib.error.HTTPError as error:
                record[-1] = error.code == 404 and len(record) == 3
                if not record[-1]:
                    refusals[error.code] = refusals.get(error.code, 0) + 1
            except (urllib.error.URLError, OSError):
                refusals["no answer"] = refusals.get("no answer", 0) + 1

    def chaos():
        rng = random.Random(args.seed)
        while time.monotonic() < stop - 20:
            time.sleep(rng.uniform(3, 8))
            victim = rng.randrange(1, NODES + 1)
            with lock:
                down.add(victim)
            os.kill(pid(victim), signal.SIGKILL)
            kills.append(victim)
            time.sleep(rng.uniform(12, 20))
            restart(victim)

    kills = []
    threads = [threading.Thread(target=client, args=(number,)) for number in range(4)]
    threads.append(threading.Thread(target=chaos))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Every node up, every hint handed back.
    deadline = time.monotonic() + 120
    while True:
        held = 0
        for node in range(1, NODES + 1):
            status = cli("admin", "status", "--json", "--node",
                         f"127.0.0.1:{args.base_port + node - 1}")
            held += json.loads(status.stdout)["hints_held"] if status.returncode == 0 else 1
        if held == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)

    present = {}
    for key in range(KEYS):
        output = cli("get", BUCKET, f"k{key}", "--r", "all", "--json")
        document = json.loads(output.stdout) if output.stdout.strip() else {"siblings": []}
        present[f"k{key}"] = {sibling["value"] for sibling in document.get("siblings", [])}

    acknowledged = [write for write in writes if write[3]]
    delete_starts = {}
    for key, started, _ in deletes:
        delete_starts.setdefault(key, []).append(started)
    lost = []
    possibly_deleted = 0
    for key, value, started, _ in acknowledged:
        if value in present[key]:
            continue
        if any(start > started for start in delete_starts.get(key, [])):
            possibly_deleted += 1
            continue
        lost.append((key, value))
    print(json.dumps({
        "seconds": args.seconds,
        "kills": len(kills),
        "writes_attempted": len(writes),
        "writes_acknowledged": len(acknowledged),
        "deletes_attempted": len(deletes),
        "deletes_acknowledged": sum(1 for record in deletes if record[2]),
        "not_acknowledged_by_status": {str(code): count for code, count in refusals.items()},
        "missing_but_possibly_deleted": possibly_deleted,
        "lost": len(lost),
        "hints_held_at_end": held,
        "examples": lost[:10],
    }, indent=2))
    os.kill(dev.pid, signal.SIGTERM)
    for child in restarted:
        child.terminate()
    dev.wait(timeout=30)
    for child in restarted:
        child.wait(timeout=30)
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()

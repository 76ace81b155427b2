#!/usr/bin/env bash
# dynkv against Redis in the same run: Redis SET and GET with redis-benchmark in
# the bench's shape (50 clients, 100-byte values, random keys over 10,000), then dynkv's
# workloads A (r=w=quorum), C (r=1) and W (w=1) on a fresh 3-node `dynkv dev` cluster with
# the README's settings, and one table: each figure, its ratio to Redis GET (A, C) or SET (W),
# and dynkv's CPU per operation (nodes + client).
#
# Usage: benches/compare-redis.sh [SECONDS_PER_DYNKV_RUN]   (default 15)
# Installs redis-server and redis-tools from Debian's packages when missing. Redis runs on
# 127.0.0.1:6390 with its defaults (no fsync per write: an in-memory cache's numbers, which is
# what users compare a store with); dynkv fsyncs every acknowledged write.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}
port=6390

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  echo "installing redis from the distribution's packages" >&2
  apt-get update -qq && apt-get install -y -qq redis-server redis-tools >/dev/null
fi
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/dynkv
work=$(mktemp -d)
trap 'redis-cli -p $port shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

redis-server --port $port --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --logfile "$work/redis.log" >/dev/null
for _ in $(seq 50); do redis-cli -p $port ping >/dev/null 2>&1 && break; sleep 0.1; done
# Enough requests for a run of several seconds at Redis's speed on this machine.
redis-benchmark -h 127.0.0.1 -p $port -c 50 -d 100 -r 10000 -n 600000 -t set,get --csv \
  > "$work/redis.csv"
redis-cli -p $port shutdown nosave >/dev/null 2>&1 || true

common=(--local 3 --workers 50 --value-bytes 100 --records 10000 --keys uniform
        --duration-secs "$seconds" --no-ceiling)
"$bin" bench "${common[@]}" --workload a --r quorum --w quorum --json-out "$work/a.json" >&2
"$bin" bench "${common[@]}" --workload c --r one --json-out "$work/c.json" >&2
"$bin" bench "${common[@]}" --workload w --w one --json-out "$work/w.json" >&2

python3 - "$work" <<'PY'
import csv, json, sys
work = sys.argv[1]
redis = {}
for row in csv.reader(open(f"{work}/redis.csv")):
    if row and row[0] in ("SET", "GET"):
        redis[row[0]] = float(row[1])
print(f"Redis SET {redis['SET']:,.0f} ops/s, GET {redis['GET']:,.0f} ops/s "
      "(redis-benchmark, 50 clients, 100-byte values, 10,000 random keys)")
print()
print("| dynkv workload | ops/s | p99 ms | ratio | CPU µs/op (nodes + client) |")
print("|---|---|---|---|---|")
for name, label, against in (("a", "A, r=w=quorum", "GET"), ("c", "C, r=1", "GET"),
                             ("w", "W, w=1", "SET")):
    report = json.load(open(f"{work}/{name}.json"))
    result = report["result"]
    ops = result["throughput_ops_per_sec"]
    p99 = result["latency_ms"]["p99"]
    cpu = report.get("cpu") or {}
    cpu_text = (f"{cpu['total_us_per_op']:.1f} ({cpu['node_us_per_op']:.1f} + "
                f"{cpu['client_us_per_op']:.1f})") if cpu else "n/a"
    print(f"| {label} | {ops:,.0f} | {p99:.2f} | {ops / redis[against]:.2f}× Redis {against} | {cpu_text} |")
PY

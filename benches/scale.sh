#!/usr/bin/env bash
# dynkv at scale: for each record count, a fresh 3-node `dynkv dev` cluster is
# preloaded (w=all, a live progress line), then runs workload A (r=w=quorum) and C (r=1) with
# uniform keys, and the script reports per count: ops/s, p99 and CPU per operation of each
# workload, resident memory per node, bytes on disk per key (one node's data directory over
# the record count: with N=3 on 3 nodes every node holds every key), and the seconds a node
# holding every key takes from a restart to answering a read again. Between the preload and
# the runs it waits until the nodes are idle. SCALE_PERF_DIR=DIR records a `perf` profile of
# 8 s of each workload A run there; SCALE_DEV_ARGS adds `dynkv dev` options (e.g.
# "--cache-mib 1024").
#
# Usage: benches/scale.sh [RECORD_COUNTS] [SECONDS_PER_RUN] [VALUE_BYTES]
#        (defaults: "10000 1000000", 20 s, 100 bytes; 10,000,000 takes about a quarter of an
#        hour to preload on the 2-core machine)
# Not part of CI: the preload of millions of records takes minutes and gigabytes of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
counts=${1:-"10000 1000000"}
seconds=${2:-20}
value_bytes=${3:-100}
bin=${DYNKV_BIN:-${CARGO_TARGET_DIR:-target}/release/dynkv}
[ -n "${DYNKV_BIN:-}" ] || cargo build --release --quiet
work=$(mktemp -d)
dev_dir=$work/dev
dev_pid=
cleanup() {
  [ -n "$dev_pid" ] && kill "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null
  pkill -f "$bin server --config $dev_dir/" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

node_pid() { pgrep -f "$bin server --config $dev_dir/$1/dynkv.toml" | head -1; }
# CPU time (user + system, in clock ticks) of the three nodes so far.
node_cpu_ticks() {
  local total=0 pid
  for node in n1 n2 n3; do
    pid=$(node_pid $node)
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo $total
}

echo "| records | workload | ops/s | p99 ms | CPU µs/op | RSS per node MiB | disk bytes/key | restart to first read s |"
echo "|---|---|---|---|---|---|---|---|"
for records in $counts; do
  rm -rf "$dev_dir"
  "$bin" dev --fresh --dir "$dev_dir" ${SCALE_DEV_ARGS:-} >"$work/dev.log" 2>&1 &
  dev_pid=$!
  up=
  for _ in $(seq 150); do
    "$bin" ping --dev-dir "$dev_dir" >/dev/null 2>&1 && { up=1; break; }
    sleep 0.2
  done
  [ -n "$up" ] || { echo "the dev cluster did not start:" >&2; cat "$work/dev.log" >&2; exit 1; }
  common=(--dev-dir "$dev_dir" --workers 50 --value-bytes "$value_bytes" --records "$records"
          --keys uniform --duration-secs "$seconds" --no-ceiling)
  # The preload (a live progress line on a terminal), and one operation after it.
  "$bin" bench "${common[@]}" --workload a --operations 1 >&2
  # Then wait until the nodes are idle (flushes and compactions of the preload done, at most
  # 10 minutes), so the runs measure the workload, not the preload's compaction debt.
  settle_started=$(date +%s)
  quiet=0
  last=$(node_cpu_ticks)
  while [ "$quiet" -lt 3 ] && [ $(( $(date +%s) - settle_started )) -lt 600 ]; do
    sleep 1
    now=$(node_cpu_ticks)
    # Under a tenth of a core over the three nodes, in clock ticks (100 per second).
    if [ $((now - last)) -lt 10 ]; then quiet=$((quiet + 1)); else quiet=0; fi
    last=$now
  done
  echo "records $records: nodes idle $(( $(date +%s) - settle_started )) s after the preload" >&2
  profiler=
  if [ -n "${SCALE_PERF_DIR:-}" ]; then
    (sleep 5; perf record -F 499 -a -g -o "$SCALE_PERF_DIR/perf-a-$records.data" -- sleep 8 \
      >/dev/null 2>&1) &
    profiler=$!
  fi
  "$bin" bench "${common[@]}" --workload a --r quorum --w quorum --no-preload \
    --json-out "$work/a.json" >&2
  [ -z "$profiler" ] || wait "$profiler"
  "$bin" bench "${common[@]}" --workload c --r one --no-preload --json-out "$work/c.json" >&2
  rss=0
  for node in n1 n2 n3; do
    kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$(node_pid $node)/status")
    rss=$((rss + kib))
  done
  disk=$(du -sb "$dev_dir/n1/data" | cut -f1)
  # Restart n1 (SIGTERM, as an operator would) and time it until it answers a read of a
  # preloaded key itself at r=1.
  n1=$(node_pid n1)
  kill "$n1"
  while kill -0 "$n1" 2>/dev/null; do sleep 0.05; done
  started=$(date +%s.%N)
  "$bin" server --config "$dev_dir/n1/dynkv.toml" >>"$work/n1-restart.log" 2>&1 &
  address=$(awk -F'"' '/client_addr/ {print $2; exit}' "$dev_dir/cluster.toml")
  until "$bin" get --dev-dir "$dev_dir" --node "$address" --r one --timeout-ms 1000 bench \
      "user$((records / 2))" >/dev/null 2>&1; do
    sleep 0.05
  done
  restart=$(python3 -c "import time; print(f'{time.time() - $started:.1f}')")
  python3 - "$work" "$records" "$rss" "$disk" "$restart" <<'PY'
import json, sys
work, records, rss_kib, disk, restart = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
for name, label in (("a", "A, r=w=quorum"), ("c", "C, r=1")):
    report = json.load(open(f"{work}/{name}.json"))
    result, cpu = report["result"], report.get("cpu") or {}
    print(f"| {records:,} | {label} | {result['throughput_ops_per_sec']:,.0f} | "
          f"{result['latency_ms']['p99']:.2f} | {cpu.get('total_us_per_op', float('nan')):.1f} | "
          f"{rss_kib / 3 / 1024:,.0f} | {disk / records:,.0f} | {restart} |")
PY
  kill "$dev_pid" 2>/dev/null; wait "$dev_pid" 2>/dev/null || true
  pkill -f "$bin server --config $dev_dir/" 2>/dev/null || true
  dev_pid=
  # The next cluster takes the same ports: wait until every node of this one is gone.
  for _ in $(seq 300); do pgrep -f "$bin server --config $dev_dir/" >/dev/null || break; sleep 0.1; done
done

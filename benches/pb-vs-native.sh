#!/usr/bin/env bash
# Riak's Protocol Buffers API against dynkv's native QUIC API on the same 3-node `dynkv dev`
# cluster: alternating runs of one workload, each client path in turn, then the
# median ops/s and p99 of each. Loopback only; the cluster is stopped at the end.
#
# Usage: benches/pb-vs-native.sh [BINARY] [RUNS_EACH] [WORKLOAD] [SECONDS]
#        (defaults: target/release/dynkv, 3 runs each, workload a at r=w=quorum, 10 s)
set -euo pipefail
binary=${1:-target/release/dynkv}; runs=${2:-3}; workload=${3:-a}; seconds=${4:-10}
case $workload in
  a|b) levels=(--r quorum --w quorum) ;;
  c) levels=(--r one) ;;
  w) levels=(--w one) ;;
  *) levels=() ;;
esac
work=$(mktemp -d)
"$binary" dev --fresh --dir "$work/dev" --base-port 27600 >"$work/dev.log" 2>&1 &
dev=$!
trap 'kill $dev 2>/dev/null; wait $dev 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 120); do grep -q "nodes up" "$work/dev.log" && break; sleep 0.5; done
common=(--dev-dir "$work/dev" --workers 50 --value-bytes 100 --records 10000 --keys uniform
        --duration-secs "$seconds" --workload "$workload" "${levels[@]}")
"$binary" bench "${common[@]}" --operations 1 --no-ceiling >/dev/null 2>&1   # the preload
for run in $(seq "$runs"); do
  for protocol in native pb; do
    "$binary" bench "${common[@]}" --no-preload --protocol "$protocol" \
      --json-out "$work/$protocol-$run.json" >/dev/null 2>"$work/$protocol-$run.log" \
      || { cat "$work/$protocol-$run.log" >&2; exit 1; }
    echo "run $run $protocol done" >&2
  done
done
python3 - "$work" "$runs" "$workload" <<'PY'
import json, statistics, sys
work, runs, workload = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print(f"workload {workload}, {runs} alternating runs each, same cluster")
print("| API | ops/s median (min–max) | p50 ms | p99 ms median (min–max) | ping ceiling ops/s |")
print("|---|---|---|---|---|")
for protocol in ("native", "pb"):
    rows = []
    for run in range(1, runs + 1):
        report = json.load(open(f"{work}/{protocol}-{run}.json"))
        result = report["result"]
        ceiling = (report.get("ceiling") or {}).get("throughput_ops_per_sec", float("nan"))
        rows.append((result["throughput_ops_per_sec"], result["latency_ms"]["p50"], result["latency_ms"]["p99"], ceiling))
    ops = [row[0] for row in rows]; p50 = [row[1] for row in rows]; p99 = [row[2] for row in rows]; ceil = [row[3] for row in rows]
    print(f"| {protocol} | {statistics.median(ops):,.0f} ({min(ops):,.0f}–{max(ops):,.0f}) | {statistics.median(p50):.2f} | "
          f"{statistics.median(p99):.2f} ({min(p99):.2f}–{max(p99):.2f}) | {statistics.median(ceil):,.0f} |")
PY

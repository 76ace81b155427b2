#!/usr/bin/env bash
# Interleaved comparison of two dynkv builds: runs BASE and NEW alternately
# (A B A B ...), each on a fresh `--local 3` cluster, and prints the median and the range of
# ops/s, p99 and CPU µs per operation for each, so a change of a few percent can be told from
# noise. Give the same binary twice to measure the noise floor.
#
# Usage: benches/ab.sh BASE_BINARY NEW_BINARY [RUNS_EACH] [WORKLOAD] [SECONDS]
#        (defaults: 5 runs each, workload a at r=w=quorum, 15 s)
# BASE_ARGS and NEW_ARGS add `dynkv bench` options to each side, e.g. one binary against
# itself with anti-entropy off and on:
#   BASE_ARGS=--local-no-aae benches/ab.sh target/release/dynkv target/release/dynkv 5 a 15
set -euo pipefail
base=$1; new=$2; runs=${3:-5}; workload=${4:-a}; seconds=${5:-15}
case $workload in
  a|b) levels=(--r quorum --w quorum) ;;
  c) levels=(--r one) ;;
  w) levels=(--w one) ;;
  *) levels=() ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for run in $(seq "$runs"); do
  for side in base new; do
    binary=$base; extra=${BASE_ARGS:-}
    if [ $side = new ]; then binary=$new; extra=${NEW_ARGS:-}; fi
    "$binary" bench --local 3 --workers 50 --value-bytes 100 --records 10000 --keys uniform \
      --duration-secs "$seconds" --no-ceiling --workload "$workload" "${levels[@]}" $extra \
      --json-out "$work/$side-$run.json" >/dev/null 2>"$work/$side-$run.log" \
      || { cat "$work/$side-$run.log" >&2; exit 1; }
    echo "run $run $side done" >&2
  done
done
python3 - "$work" "$runs" "$workload" <<'PY'
import json, statistics, sys
work, runs, workload = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def figures(side):
    rows = []
    for run in range(1, runs + 1):
        report = json.load(open(f"{work}/{side}-{run}.json"))
        result, cpu = report["result"], report.get("cpu") or {}
        rows.append((result["throughput_ops_per_sec"], result["latency_ms"]["p99"],
                     cpu.get("total_us_per_op", float("nan")),
                     cpu.get("node_us_per_op", float("nan")),
                     cpu.get("client_us_per_op", float("nan"))))
    return rows
print(f"workload {workload}, {runs} interleaved runs each")
print("| build | ops/s median (min–max) | p99 ms median (min–max) | CPU µs/op median (min–max) | of which nodes, client (medians) |")
print("|---|---|---|---|---|")
for side in ("base", "new"):
    rows = figures(side)
    cells = []
    for index, digits in ((0, 0), (1, 2), (2, 1)):
        values = [row[index] for row in rows]
        cells.append(f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})")
    cells.append(f"{statistics.median(row[3] for row in rows):.1f}, "
                 f"{statistics.median(row[4] for row in rows):.1f}")
    print(f"| {side} | " + " | ".join(cells) + " |")
PY

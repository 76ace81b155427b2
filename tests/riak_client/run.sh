#!/usr/bin/env bash
# Riak client conformance: the official Riak Python client (`riak` 2.7.0 from
# PyPI, in a virtualenv this script makes) against a fresh 3-node `dynkv dev` cluster on
# loopback, through each transport dynkv serves. Prints `N passed, M failed` over all of them
# and exits non-zero if any check failed. `.ci/run` runs it after `cargo test`.
#
# Usage: tests/riak_client/run.sh [DYNKV_BINARY]   (default: target/debug/dynkv, built here)
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/riak_client
binary=${1:-}
if [ -z "$binary" ]; then
  cargo build --quiet
  binary=target/debug/dynkv
fi
venv=${RIAK_CLIENT_VENV:-target/riak-client-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check riak==2.7.0
fi
base_port=${RIAK_CLIENT_BASE_PORT:-28700}
work=$(mktemp -d)
log=$work/dev.log
"$binary" dev --fresh --dir "$work/dev" --base-port "$base_port" >"$log" 2>&1 &
dev=$!
cleanup() {
  kill "$dev" 2>/dev/null || true
  wait "$dev" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 120); do
  grep -q "nodes up" "$log" && break
  kill -0 "$dev" 2>/dev/null || { cat "$log"; echo "dynkv dev stopped"; exit 1; }
  sleep 0.5
done
grep -q "nodes up" "$log" || { cat "$log"; echo "dynkv dev did not come up"; exit 1; }

passed=0
failed=0
run() {
  local transport=$1 port=$2 other=$3 output
  set +e
  output=$(cd "$here" && PYTHONWARNINGS=ignore "$OLDPWD/$venv/bin/python" conformance.py "$transport" 127.0.0.1 "$port" "$other" 2>&1)
  set -e
  echo "$output"
  local line
  line=$(echo "$output" | grep -E "^$transport: [0-9]+ passed, [0-9]+ failed$" | tail -1)
  if [ -z "$line" ]; then
    echo "$transport: the suite did not finish"
    failed=$((failed + 1))
    return
  fi
  passed=$((passed + $(echo "$line" | sed -E 's/.*: ([0-9]+) passed.*/\1/')))
  failed=$((failed + $(echo "$line" | sed -E 's/.* ([0-9]+) failed/\1/')))
}
run http $((base_port + 200)) $((base_port + 300))
run pbc $((base_port + 300)) $((base_port + 200))
echo "riak client conformance: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

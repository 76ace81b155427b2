#!/usr/bin/env bash
# The container suite (DESIGN.md §9 item 4): a 3-node compose cluster built FROM scratch out
# of the release binary, driven from the host through loopback-published ports, with a
# network partition, a pause and a SIGKILL, then a fourth node's join and a leave. Cleans up
# everything it creates and stops by itself within 12 minutes. Last line: "deploy: N passed, M failed".
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

started=$SECONDS
passed=0
failed=0
id="dynkvtest$$"
tag="dynkv-deploy-test:$$"
work=$(mktemp -d "${TMPDIR:-/tmp}/dynkv-deploy.XXXXXX")
watchdog=""
child=""
built_image=0
declare -A ids=()

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "deploy: neither 'docker compose' nor docker-compose is installed" >&2
  exit 1
fi

dc() { timeout 120 "${compose[@]}" -p "$id" -f "$root/deploy/docker-compose.yml" "$@"; }

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  [[ -n $watchdog ]] && kill "$watchdog" 2>/dev/null || true
  if [[ $status -ne 0 || ${DYNKV_DEPLOY_LOGS:-0} == 1 ]] && [[ -f $work/up ]]; then
    echo "--- container logs (last 30 lines each) ---" >&2
    for node in n1 n2 n3 n4; do dc --profile join logs --no-color --tail 30 "$node" >&2 2>&1 || true; done
  fi
  if [[ -f $work/up ]]; then
    docker unpause "$(container n1)" "$(container n2)" "$(container n3)" >/dev/null 2>&1 || true
    # With the profile, so that the joined fourth node goes too.
    dc --profile join down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
  fi
  if [[ $built_image == 1 ]]; then docker rmi -f "$tag" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
  # A failure outside a check (build, setup, timeout, interrupt) counts as one.
  if ((status != 0 && failed == 0)); then failed=1; fi
  echo "deploy: $passed passed, $failed failed"
  exit "$status"
}
trap cleanup EXIT
trap 'echo "deploy: interrupted" >&2; exit 130' INT
on_term() {
  [[ -z $child ]] || kill "$child" 2>/dev/null || true
  echo "deploy: out of time" >&2
  failed=$((failed + 1))
  exit 124
}
trap on_term TERM
# The watchdog: after 12 minutes the script gives up and cleans up. Long steps run in the
# background under `wait`, which the TERM interrupts at once; every other command runs under
# `timeout` of at most two minutes.
# (Stopping the watchdog stops its sleep too, so no stray process outlives the script.)
(
  trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  sleep "${DYNKV_DEPLOY_DEADLINE:-720}" & nap=$!
  wait "$nap" && kill -TERM $$
) 2>/dev/null &
watchdog=$!
long() { "$@" & child=$!; wait "$child"; child=""; }

log() { printf '[%4ds] %s\n' $((SECONDS - started)) "$*"; }
pass() { passed=$((passed + 1)); log "ok   $1"; }
fail() { failed=$((failed + 1)); log "FAIL $1"; [[ -z ${2:-} ]] || printf '%s\n' "$2" | sed 's/^/       /'; }

# ---------------------------------------------------------------- build, certs, cluster

log "building the release binary"
long cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-$root/target}/release/dynkv
log "building image $tag"
built_image=1
DYNKV_SKIP_CARGO=1 long timeout 300 "$root/deploy/build-image.sh" "$tag" >/dev/null

# A /24 that no existing Docker network overlaps.
ip_to_int() { local IFS=.; set -- $1; echo $((($1 << 24) | ($2 << 16) | ($3 << 8) | $4)); }
subnet=""
existing=$(docker network inspect $(docker network ls -q) --format '{{range .IPAM.Config}}{{.Subnet}} {{end}}' 2>/dev/null || true)
for candidate in 172.28.{0..15} 10.213.{0..15}; do
  lo=$(ip_to_int "$candidate.0"); hi=$((lo + 255)); clash=0
  for net in $existing; do
    [[ $net == */* && $net != *:* ]] || continue
    base=$(ip_to_int "${net%/*}"); bits=${net#*/}
    size=$((1 << (32 - bits))); base=$((base & ~(size - 1)))
    if ((lo < base + size && base < hi + 1)); then clash=1; break; fi
  done
  if ((clash == 0)); then subnet=$candidate; break; fi
done
[[ -n $subnet ]] || { echo "deploy: no free /24 for the test network" >&2; exit 1; }

pki=$work/pki
mkdir -p "$pki"
timeout 30 "$bin" cert ca --dir "$pki" >/dev/null
for i in 1 2 3 4; do
  timeout 30 "$bin" cert node --dir "$pki" --id "n$i" --host "n$i" --host "$subnet.1$i" >/dev/null
done
chmod a+r "$pki"/*   # the containers read them as their own (root) user
ca=$pki/ca.pem

export DYNKV_IMAGE=$tag DYNKV_SUBNET=$subnet DYNKV_PKI=$pki
for i in 1 2 3 4; do export "DYNKV_N${i}_CLIENT=127.0.0.1:" "DYNKV_N${i}_HTTP=127.0.0.1:"; done
log "starting the cluster (project $id, subnet $subnet.0/24)"
touch "$work/up"
dc up -d >/dev/null 2>&1
network="${id}_dynkv"
for node in n1 n2 n3; do ids[$node]=$(dc ps -q "$node"); done

container() { echo "${ids[$1]:-none}"; }
ip_of() { echo "$subnet.1${1#n}"; }
# The host side of a published port; it changes when a container restarts or reconnects.
published() { # NODE CONTAINER_PORT/PROTO
  timeout 20 docker port "$(container "$1")" "$2" 2>/dev/null | grep -m1 '^127\.0\.0\.1:' | cut -d: -f2
}
client_addr() { local port; port=$(published "$1" 8700/udp) && [[ -n $port ]] && echo "127.0.0.1:$port"; }
http_base() { local port; port=$(published "$1" 8098/tcp) && [[ -n $port ]] && echo "http://127.0.0.1:$port"; }

# dynkv CLI against one node: cli NODE ARGS...
cli() {
  local node=$1 addr; shift
  addr=$(client_addr "$node") || { echo "no published client port for $node"; return 1; }
  timeout 30 "$bin" "$@" --node "$addr" --ca "$ca"
}
# How many members NODE sees up ("" when it cannot be asked).
up_count() { cli "$1" admin members --json 2>/dev/null | grep -o '"up":true' | wc -l | tr -d ' ' || true; }
# Whether VIEWER sees TARGET as up (yes/no/"" when it cannot be asked).
sees_up() {
  local json; json=$(cli "$1" admin members --json 2>/dev/null) || return 0
  if grep -Eq "\"node\":\"$2\"[^}]*\"up\":true" <<<"$json"; then echo yes; else echo no; fi
}
# wait_for SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local limit=$1 deadline; shift
  deadline=$((SECONDS + limit))
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
}
all_see_three() { for n in "$@"; do [[ $(up_count "$n") == 3 ]] || return 1; done; }
views_of() { # VIEWER TARGET STATE
  [[ $(sees_up "$1" "$2") == "$3" ]]
}
others_see() { # TARGET STATE VIEWERS...
  local target=$1 state=$2; shift 2
  for viewer in "$@"; do views_of "$viewer" "$target" "$state" || return 1; done
}
expect_value() { # NAME EXPECTED COMMAND...
  local name=$1 expected=$2 out; shift 2
  if out=$("$@" 2>&1) && grep -qxF -- "$expected" <<<"$out"; then pass "$name"; else fail "$name" "$out"; fi
}
expect_ok() { # NAME COMMAND...
  local name=$1 out; shift
  if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$out"; fi
}
expect_error() { # NAME PATTERN COMMAND... (PATTERN: an extended regular expression)
  local name=$1 pattern=$2 out; shift 2
  if out=$("$@" 2>&1); then fail "$name" "succeeded: $out"
  elif grep -qE -- "$pattern" <<<"$out"; then pass "$name"
  else fail "$name" "$out"; fi
}
# The error of a w=all put with DOWN unreachable. The quorum is lost at DOWN's failure, which
# may come before or after the live replica's ack, so 1 or 2 acks are counted; the message
# names DOWN either way.
w_all_refused() { echo "[12] of 3 replicas acknowledged, 3 required \\(w\\).*$1 did not answer"; }

if wait_for 90 all_see_three n1 n2 n3; then
  pass "cluster formed: each node sees 3 members up"
else
  fail "cluster formed: each node sees 3 members up" "$(for n in n1 n2 n3; do echo "$n: $(up_count "$n") up"; done)"
  exit 1
fi

# ---------------------------------------------------------------- reads and writes

expect_ok "CLI put on n1 (w=all)" cli n1 put deploy hello world --w all
expect_value "CLI get on n2 (r=all)" world cli n2 get deploy hello --r all
expect_value "CLI get on n3 (pr=all, no sloppy quorum)" world cli n3 get deploy hello --pr all --sloppy-quorum false

http_put() { # NODE KEY VALUE -> HTTP status
  timeout 30 curl -sS -o /dev/null -w '%{http_code}' -XPUT -H 'Content-Type: text/plain' \
    --data-binary "$3" "$(http_base "$1")/buckets/deploy/keys/$2?w=all"
}
http_get() { timeout 30 curl -sS -f "$(http_base "$1")/buckets/deploy/keys/$2"; echo; }
expect_value "HTTP ping on n1" OK bash -c "timeout 30 curl -sS -f '$(http_base n1)/ping'; echo"
expect_value "HTTP PUT on n2 answers 204" 204 http_put n2 viahttp from-curl
expect_value "HTTP GET on n3 of the HTTP write" from-curl http_get n3 viahttp
expect_value "HTTP GET on n1 of the CLI write" world http_get n1 hello
expect_value "CLI get on n1 of the HTTP write" from-curl cli n1 get deploy viahttp

# ---------------------------------------------------------------- faults

quorum_checks() { # LABEL DOWN_NODE LIVE_NODE
  local label=$1 down=$2 live=$3
  expect_ok "$label: put w=quorum on $live succeeds" cli "$live" put deploy "$label-q" v1 --w quorum
  expect_error "$label: put w=all without sloppy quorum fails, naming $down" "$(w_all_refused "$down")" \
    cli "$live" put deploy "$label-all" v1 --w all --sloppy-quorum false --timeout-ms 2000
  expect_value "$label: get r=quorum on $live" v1 cli "$live" get deploy "$label-q" --r quorum
}
detect_down() { # LABEL TARGET VIEWERS...
  local label=$1 target=$2; shift 2
  local t0=$SECONDS
  if wait_for 40 others_see "$target" no "$@"; then
    pass "$label: $* mark $target down (after $((SECONDS - t0)) s)"
  else
    fail "$label: $* mark $target down within 40 s" "$(for v in "$@"; do cli "$v" admin members 2>&1; done)"
  fi
}
detect_up() { # LABEL TARGET
  local label=$1 target=$2 t0=$SECONDS
  if wait_for 60 all_see_three n1 n2 n3; then
    pass "$label: $target is up again in every view (after $((SECONDS - t0)) s)"
  else
    fail "$label: $target is up again in every view" "$(for v in n1 n2 n3; do echo "$v: $(up_count "$v") up"; done)"
  fi
}

# The fault cases run back to back on the same cluster: each must be detected in ~9 s even
# right after the previous one healed (the phi detector leaves healed silences out of its
# window; see src/core/failure.rs).

# (1) partition: n3 leaves the network.
log "fault 1: docker network disconnect n3"
timeout 30 docker network disconnect "$network" "$(container n3)"
detect_down partition n3 n1 n2
quorum_checks partition n3 n1
timeout 30 docker network connect --ip "$(ip_of n3)" "$network" "$(container n3)"
detect_up partition n3

# (2) pause: n2 is frozen (SIGSTOP of every process in it).
log "fault 2: docker pause n2"
timeout 30 docker pause "$(container n2)" >/dev/null
detect_down pause n2 n1 n3
quorum_checks pause n2 n3
timeout 30 docker unpause "$(container n2)" >/dev/null
detect_up pause n2

# (3) SIGKILL: n3 dies; its data must survive, and it must catch up on what it missed.
log "fault 3: docker kill n3"
before=(k-before-1 k-before-2 k-before-3 k-before-4 k-before-5)
while_down=(k-down-1 k-down-2 k-down-3 k-down-4 k-down-5)
for key in "${before[@]}"; do
  expect_ok "kill: put $key w=all before the kill" cli n1 put deploy "$key" "v-$key" --w all
done
timeout 30 docker kill "$(container n3)" >/dev/null
for key in "${while_down[@]}"; do
  expect_ok "kill: put $key w=quorum while n3 is dead" cli n2 put deploy "$key" "v-$key" --w quorum
done
detect_down kill n3 n1 n2
expect_error "kill: put w=all without sloppy quorum fails, naming n3" "$(w_all_refused n3)" \
  cli n1 put deploy kill-all v1 --w all --sloppy-quorum false --timeout-ms 2000
timeout 60 docker start "$(container n3)" >/dev/null
detect_up kill n3
for key in "${before[@]}"; do
  expect_value "kill: n3 serves $key written before the kill (pr=all, no sloppy quorum)" "v-$key" \
    cli n3 get deploy "$key" --pr all --sloppy-quorum false
done
# Reads with r=all repair n3's missing copies; then n1 and n2 are frozen so that n3 can only
# answer from its own store.
for key in "${while_down[@]}"; do
  expect_value "kill: get $key r=all (read repair)" "v-$key" cli n1 get deploy "$key" --r all --sloppy-quorum false
done
sleep 2
timeout 30 docker pause "$(container n1)" "$(container n2)" >/dev/null
for key in "${while_down[@]}"; do
  expect_value "kill: n3 alone holds $key written while it was dead" "v-$key" \
    cli n3 get deploy "$key" --r one --timeout-ms 3000
done
timeout 30 docker unpause "$(container n1)" "$(container n2)" >/dev/null
detect_up "after the kill" all

# ---------------------------------------------------------------- a join and a leave

# Keys written before the join must all be readable at r=one through the new node once its
# handoffs are done, and at r=quorum after a leave.
log "rebalance: writing 60 keys"
ring_keys=()
for i in $(seq 1 60); do ring_keys+=("ring-$i"); done
written=0
for key in "${ring_keys[@]}"; do
  cli n1 put deploy "$key" "v-$key" --w quorum >/dev/null 2>&1 && written=$((written + 1))
done
if ((written == ${#ring_keys[@]})); then pass "rebalance: 60 keys written at w=quorum"; else fail "rebalance: only $written of 60 keys written"; fi
log "rebalance: starting n4 (compose profile join)"
dc --profile join up -d n4 >/dev/null 2>&1
ids[n4]=$(dc --profile join ps -q n4)
member_state() { # VIEWER NODE -> its state in VIEWER's ring ("" when it cannot be asked)
  cli "$1" admin ring --json 2>/dev/null | grep -o "\"node\":\"$2\",\"state\":\"[a-z]*\"" | cut -d'"' -f8 || true
}
owned_by() { # VIEWER NODE -> partitions NODE owns in VIEWER's ring
  cli "$1" admin ring --json 2>/dev/null | grep -o "\"node\":\"$2\",\"state\":\"[a-z]*\",\"partitions\":[0-9]*" | grep -o '[0-9]*$' || true
}
n4_heard() { [[ -n $(client_addr n4) ]] && [[ $(sees_up n1 n4) == yes ]]; }
if wait_for 60 n4_heard; then pass "rebalance: n1 hears of n4 by gossip"; else fail "rebalance: n1 hears of n4 by gossip" "$(cli n1 admin members 2>&1)"; fi
expect_ok "rebalance: admin cluster join through n4" cli n4 admin cluster join
expect_ok "rebalance: admin cluster plan" cli n1 admin cluster plan
expect_ok "rebalance: admin cluster commit" cli n1 admin cluster commit
no_transfers() { [[ $(cli "$1" admin transfers 2>/dev/null) == "no transfers" ]]; }
t0=$SECONDS
# Asked of n1, the claimant (the lowest member), which made the commit.
if wait_for 180 no_transfers n1; then
  pass "rebalance: the join's handoffs finish, 'no transfers' (after $((SECONDS - t0)) s)"
else
  fail "rebalance: the join's handoffs finish within 180 s" "$(cli n1 admin transfers 2>&1)"
fi
expect_value "rebalance: n4 owns 16 of 64 partitions" 16 owned_by n1 n4
missed=()
for key in "${ring_keys[@]}"; do
  out=$(cli n4 get deploy "$key" --r one 2>&1) && grep -qxF -- "v-$key" <<<"$out" || missed+=("$key")
done
if ((${#missed[@]} == 0)); then pass "rebalance: every key read at r=one through n4"
else fail "rebalance: ${#missed[@]} of ${#ring_keys[@]} keys missed at r=one through n4" "${missed[*]}"; fi

log "rebalance: n2 leaves"
expect_ok "rebalance: admin cluster leave through n2" cli n2 admin cluster leave
expect_ok "rebalance: plan the leave" cli n1 admin cluster plan
expect_ok "rebalance: commit the leave" cli n1 admin cluster commit
t0=$SECONDS
if wait_for 180 no_transfers n1; then
  pass "rebalance: the leave's handoffs finish (after $((SECONDS - t0)) s)"
else
  fail "rebalance: the leave's handoffs finish within 180 s" "$(cli n1 admin transfers 2>&1)"
fi
expect_value "rebalance: n2 is exiting" exiting member_state n1 n2
expect_value "rebalance: n2 owns nothing" 0 owned_by n1 n2
missed=()
for key in "${ring_keys[@]}"; do
  out=$(cli n3 get deploy "$key" --r quorum 2>&1) && grep -qxF -- "v-$key" <<<"$out" || missed+=("$key")
done
if ((${#missed[@]} == 0)); then pass "rebalance: every key read at r=quorum after the leave"
else fail "rebalance: ${#missed[@]} of ${#ring_keys[@]} keys missed at r=quorum after the leave" "${missed[*]}"; fi

log "wall time $((SECONDS - started)) s"
# cleanup (the EXIT trap) prints the last line: "deploy: N passed, M failed".
((failed == 0))

#!/usr/bin/env bash
# Start-up to ready over a large fleet, several times: seeds READY_DEPLOYABLES shadow
# deployables, READY_WORKERS workers and READY_INSTANCES instances (READY_PENDING of them
# PENDING) into a temporary etcd once (`resource-plane loadtest --scenario seed`), then
# READY_RUNS times (default 3): starts a fresh etcd on a copy of that data, starts the
# service on it and times process start -> `/health/ready` 200 (every view hydrated),
# polling every 20 ms. READY_BINS="a b" alternates several binaries run by run (default:
# RP_BIN or the release build), so two builds are compared under the same noise.
# Reported, never asserted; everything on 127.0.0.1.
#
#   READY_RUNS=3 scripts/ready.sh
#   READY_BINS="/tmp/rp-old /tmp/rp-new" READY_RUNS=4 scripts/ready.sh
set -euo pipefail

cd "$(dirname "$0")/.."
N=${READY_DEPLOYABLES:-100000}
M=${READY_WORKERS:-10000}
INSTANCES=${READY_INSTANCES:-100000}
PENDING=${READY_PENDING:-5000}
RUNS=${READY_RUNS:-3}
TOOL=ready
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BINS=${READY_BINS:-$BIN}
for b in $BINS; do
  [ -x "$b" ] || {
    echo "ready: $b is not an executable" >&2
    exit 1
  }
done

# Starts etcd on data dir $1; sets ETCD_PID and ETCD.
start_etcd() {
  local ec ep
  ec=$(free_port)
  ep=$(free_port)
  etcd --name ready --data-dir "$1" \
    --listen-client-urls "http://127.0.0.1:$ec" --advertise-client-urls "http://127.0.0.1:$ec" \
    --listen-peer-urls "http://127.0.0.1:$ep" --initial-advertise-peer-urls "http://127.0.0.1:$ep" \
    --initial-cluster "ready=http://127.0.0.1:$ep" --initial-cluster-state new \
    --log-level warn >>"$WORK/etcd.log" 2>&1 &
  ETCD_PID=$!
  PIDS+=("$ETCD_PID")
  wait_http "http://127.0.0.1:$ec/health" 30
  ETCD="127.0.0.1:$ec"
}

stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

echo "ready: seeding $N deployables, $M workers, $INSTANCES instances ($PENDING pending)" >&2
start_etcd "$WORK/seed"
"$BIN" loadtest --json --no-progress --scenario seed --etcd-endpoints "$ETCD" \
  --deployables "$N" --workers "$M" --instances "$INSTANCES" --pending "$PENDING" \
  --workflows 16 >"$WORK/seed.json" 2>"$WORK/seed.txt" || {
  cat "$WORK/seed.txt" >&2
  exit 1
}
stop "$ETCD_PID"

echo "machine: nproc $(nproc), load average before $LOAD_BEFORE"
echo "command: READY_DEPLOYABLES=$N READY_WORKERS=$M READY_INSTANCES=$INSTANCES READY_PENDING=$PENDING READY_RUNS=$RUNS scripts/ready.sh"
echo
echo "| run | binary | load before | start -> /health/ready |"
echo "|---:|---|---|---:|"
run=0
while [ "$run" -lt "$RUNS" ]; do
  for b in $BINS; do
    [ "$run" -lt "$RUNS" ] || break
    run=$((run + 1))
    rm -rf "$WORK/run"
    cp -a "$WORK/seed" "$WORK/run"
    start_etcd "$WORK/run"
    load=$(cut -d" " -f1-3 /proc/loadavg)
    port=$(free_port)
    started=$SECONDS
    t0=$(date +%s.%N)
    env APP_HOST=127.0.0.1 APP_PORT="$port" USE_MOCK_ADAPTERS=false ETCD_ENDPOINTS="$ETCD" \
      KUBE_ADAPTER=sim CLOUD_ADAPTER=sim WORKER_AGENT=heartbeat SHADOW_SEED_FILE= RUST_LOG=warn \
      SCALE_DOWN_IDLE_SECONDS=86400 "$b" >"$WORK/service.log" 2>&1 &
    svc=$!
    PIDS+=("$svc")
    until curl -fs -o /dev/null "http://127.0.0.1:$port/health/ready"; do
      if ! kill -0 "$svc" 2>/dev/null; then
        tail -20 "$WORK/service.log" >&2
        exit 1
      fi
      if [ $((SECONDS - started)) -gt 300 ]; then
        echo "ready: not ready after 300 s" >&2
        exit 1
      fi
      sleep 0.02
    done
    t1=$(date +%s.%N)
    echo "| $run | $(basename "$b") | $load | $(python3 -c "print(f'{$t1 - $t0:.2f} s')") |"
    stop "$svc"
    stop "$ETCD_PID"
    sleep 2
  done
done

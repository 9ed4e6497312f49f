#!/usr/bin/env bash
# Nemesis soak. On 127.0.0.1 only: a 3-member etcd, one moto_server (the EC2 both
# replicas share, so every launch is counted in one place), two API replicas (one is
# the controller leader), and the load-test harness driving the shadow scenario and the
# instances scenario (some instances do_not_disrupt) at once, against both replicas.
# Meanwhile a nemesis injects one fault every SOAK_FAULT_EVERY seconds, in turn:
#   kill-replica  SIGKILL an API replica, restart it on its port
#   kill-etcd     SIGKILL an etcd member, restart it on its data dir
#   pause-leader  SIGSTOP the controller leader for SOAK_PAUSE_SECONDS (> the lease TTL,
#                 so the other replica takes over while it is frozen), then SIGCONT
#   pause-etcd    SIGSTOP an etcd member for SOAK_PAUSE_SECONDS, then SIGCONT
# Every request is recorded (kind, replica, start/end, outcome) and every fault too;
# at the end `resource-plane soak-check` reads them, etcd's full history and moto's EC2
# instances, prints the figures and exits non-zero when any count is not zero:
# acknowledged transitions lost, overlapping holds, instances launched twice,
# do_not_disrupt violations, 5xx other than 503, requests past their deadline.
#
#   SOAK_SECONDS=120 scripts/soak.sh          (or: make soak)
#
# Knobs (defaults): SOAK_SECONDS (120) of load; SOAK_FAULT_EVERY (4) s between faults;
# SOAK_FAULTS (kill-replica,kill-etcd,pause-leader,pause-etcd); SOAK_PAUSE_SECONDS (5);
# SOAK_WORKFLOWS (16) and SOAK_DEPLOYABLES (8) of the shadow scenario; SOAK_RATE (2)
# instances/s, SOAK_THINK_MS (3000), SOAK_DND_RATIO (0.3); SOAK_TIMEOUT_MS (10000)
# client deadline; SOAK_OUT=dir keeps the histories, fault log, verdict and logs there.
# Every process is stopped on exit, Ctrl-C included.
set -euo pipefail

cd "$(dirname "$0")/.."
SECS=${SOAK_SECONDS:-120}
EVERY=${SOAK_FAULT_EVERY:-4}
FAULT_KINDS=${SOAK_FAULTS:-kill-replica,kill-etcd,pause-leader,pause-etcd}
PAUSE=${SOAK_PAUSE_SECONDS:-5}
W=${SOAK_WORKFLOWS:-16}
D=${SOAK_DEPLOYABLES:-8}
RATE=${SOAK_RATE:-2}
THINK=${SOAK_THINK_MS:-3000}
DND=${SOAK_DND_RATIO:-0.3}
TIMEOUT_MS=${SOAK_TIMEOUT_MS:-10000}
LEASE_TTL=3
TOOL=soak
for n in "$SECS" "$EVERY" "$PAUSE" "$W" "$D" "$THINK" "$TIMEOUT_MS"; do
  case $n in
    '' | *[!0-9]*)
      echo "soak: SOAK_* values must be whole numbers (got '$n')" >&2
      exit 64
      ;;
  esac
done
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

MOTO=${MOTO_SERVER:-}
if [ -z "$MOTO" ]; then
  if [ -x "${RP_TOOLS:-/var/tmp/resource-plane-tools}/venv/bin/moto_server" ]; then
    MOTO=${RP_TOOLS:-/var/tmp/resource-plane-tools}/venv/bin/moto_server
  else
    MOTO=$(command -v moto_server || true)
  fi
fi
if [ -z "$MOTO" ]; then
  echo "soak: moto_server is missing (run scripts/setup.sh, or set MOTO_SERVER)" >&2
  exit 1
fi

# Paused processes ignore SIGTERM until continued: continue everything, then SIGKILL
# (a clean etcd shutdown would wait seconds trying to hand over leadership).
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -CONT "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "${SOAK_OUT:-}" ] && [ -d "$WORK" ]; then
    mkdir -p "$SOAK_OUT"
    cp -r "$WORK"/*.jsonl "$WORK"/*.txt "$WORK"/*.json "$WORK"/logs "$SOAK_OUT"/ 2>/dev/null || true
  fi
  rm -rf "$WORK"
}

# Every process started here carries SOAK_WORK in its environment (the test checks
# that none is left after exit).
export SOAK_WORK=$WORK
echo "soak: work dir $WORK" >&2
now_ms() { date +%s%3N; }

# SIGKILLs one of our processes, reaps it and drops it from PIDS (so cleanup never
# signals a reused pid).
kill_ours() { # pid
  local pid keep=()
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do
    [ "$pid" = "$1" ] || keep+=("$pid")
  done
  PIDS=("${keep[@]}")
}
mkdir -p "$WORK/logs"
FAULTS_FILE=$WORK/faults.jsonl
: >"$FAULTS_FILE"
record_fault() { # kind target start_ms
  printf '{"kind":"%s","target":"%s","start_ms":%s,"end_ms":%s}\n' "$1" "$2" "$3" "$(now_ms)" >>"$FAULTS_FILE"
  echo "soak: $(date -u +%T) $1 $2 ($(($(now_ms) - $3)) ms)" >&2
}

# --- etcd: three members ---------------------------------------------------------------
EC=() EP=() ETCD_PID=()
for i in 0 1 2; do
  EC[i]=$(free_port)
  EP[i]=$(free_port)
done
INITIAL="m0=http://127.0.0.1:${EP[0]},m1=http://127.0.0.1:${EP[1]},m2=http://127.0.0.1:${EP[2]}"
ETCD_TOKEN="soak-$$-$RANDOM"
start_etcd() { # member index
  local i=$1
  etcd --name "m$i" --data-dir "$WORK/etcd-m$i" \
    --listen-client-urls "http://127.0.0.1:${EC[i]}" --advertise-client-urls "http://127.0.0.1:${EC[i]}" \
    --listen-peer-urls "http://127.0.0.1:${EP[i]}" --initial-advertise-peer-urls "http://127.0.0.1:${EP[i]}" \
    --initial-cluster "$INITIAL" --initial-cluster-token "$ETCD_TOKEN" --initial-cluster-state new \
    --log-level warn >>"$WORK/logs/etcd-m$i.log" 2>&1 &
  ETCD_PID[i]=$!
  PIDS+=($!)
}
for i in 0 1 2; do start_etcd "$i"; done
for i in 0 1 2; do wait_http "http://127.0.0.1:${EC[i]}/health" 30; done
ETCD_EPS="127.0.0.1:${EC[0]},127.0.0.1:${EC[1]},127.0.0.1:${EC[2]}"

# --- moto: the EC2 both replicas use ----------------------------------------------------
MOTO_PORT=$(free_port)
"$MOTO" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/logs/moto.log" 2>&1 &
PIDS+=($!)
MOTO_URL="http://127.0.0.1:$MOTO_PORT"
wait_http "$MOTO_URL/moto-api/" 60

# --- two API replicas ---------------------------------------------------------------------
PREFIX=/soak
CLUSTER_ID="soak-$$-$RANDOM"
RP=() RPID=()
for i in 0 1; do RP[i]=$(free_port); done
URLS="http://127.0.0.1:${RP[0]},http://127.0.0.1:${RP[1]}"
start_replica() { # replica index
  local i=$1
  # A clean environment: no inherited credentials, nothing but loopback.
  env -i PATH="$PATH" HOME="$WORK" SOAK_WORK="$WORK" \
    APP_HOST=127.0.0.1 APP_PORT="${RP[i]}" USE_MOCK_ADAPTERS=false \
    ETCD_ENDPOINTS="$ETCD_EPS" ETCD_PREFIX="$PREFIX" ETCD_REQUEST_TIMEOUT_MS=1500 ETCD_DIAL_TIMEOUT_MS=1000 \
    SHADOW_SEED_FILE= WORKER_TEMPLATES_FILE=config/worker-templates.yaml \
    KUBE_ADAPTER=sim SIM_KUBE_READY_DELAY_MS=100 CLOUD_ADAPTER=ec2 WORKER_AGENT=heartbeat \
    AWS_ENDPOINT_URL="$MOTO_URL" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true CLUSTER_ID="$CLUSTER_ID" \
    CONTROLLER_INSTANCE_ID="replica-$i" LEADER_LEASE_TTL="$LEASE_TTL" RECONCILE_INTERVAL=1 \
    CLOUD_POLL_MS=200 SCALE_UP_BATCH_MS=100 SCALE_DOWN_IDLE_SECONDS=2 \
    PROCURE_RETRY_DELAY_SECONDS=1 HTTP_WORKERS=2 ACTOR_THREADS=2 RUST_LOG=warn \
    "$BIN" >>"$WORK/logs/replica-$i.log" 2>&1 &
  RPID[i]=$!
  PIDS+=($!)
}
for i in 0 1; do start_replica "$i"; done
for i in 0 1; do
  wait_http "http://127.0.0.1:${RP[i]}/health/ready" 60 || {
    tail -20 "$WORK/logs/replica-$i.log" >&2
    exit 1
  }
done

is_leader() { # replica index
  curl -fs -m 2 "http://127.0.0.1:${RP[$1]}/api/1.0/controller" 2>/dev/null | grep -q '"is_leader":true'
}

# --- the load -----------------------------------------------------------------------------
echo "soak: ${SECS}s of load against $URLS; a fault every ${EVERY}s ($FAULT_KINDS)" >&2
"$BIN" loadtest --scenario shadow --url "$URLS" --workflows "$W" --deployables "$D" \
  --duration "${SECS}s" --max-retry-delay-ms 200 --request-timeout-ms "$TIMEOUT_MS" \
  --history "$WORK/shadow.jsonl" --json --no-progress >"$WORK/shadow.json" 2>"$WORK/shadow.txt" &
LT_SHADOW=$!
PIDS+=($!)
"$BIN" loadtest --scenario instances --url "$URLS" --rate "$RATE" --think-ms "$THINK" \
  --workflows 32 --cpu 24 --memory-gb 96 --dnd-ratio "$DND" --duration "${SECS}s" \
  --request-timeout-ms "$TIMEOUT_MS" \
  --history "$WORK/instances.jsonl" --json --no-progress >"$WORK/instances.json" 2>"$WORK/instances.txt" &
LT_INSTANCES=$!
PIDS+=($!)

# --- the nemesis --------------------------------------------------------------------------
IFS=, read -r -a KINDS <<<"$FAULT_KINDS"
running() { kill -0 "$LT_SHADOW" 2>/dev/null || kill -0 "$LT_INSTANCES" 2>/dev/null; }
fault() { # kind
  local start i
  start=$(now_ms)
  case $1 in
    kill-replica)
      i=$((RANDOM % 2))
      kill_ours "${RPID[i]}"
      sleep 0.5
      start_replica "$i"
      wait_http "http://127.0.0.1:${RP[i]}/health/ready" 60 || tail -20 "$WORK/logs/replica-$i.log" >&2
      record_fault kill-replica "replica-$i" "$start"
      ;;
    kill-etcd)
      i=$((RANDOM % 3))
      kill_ours "${ETCD_PID[i]}"
      sleep 1
      start_etcd "$i"
      wait_http "http://127.0.0.1:${EC[i]}/health" 30 || tail -20 "$WORK/logs/etcd-m$i.log" >&2
      record_fault kill-etcd "etcd-m$i" "$start"
      ;;
    pause-leader)
      i=-1
      if is_leader 0; then i=0; elif is_leader 1; then i=1; fi
      if [ "$i" -lt 0 ]; then
        echo "soak: no leader to pause right now; skipped" >&2
        return
      fi
      start=$(now_ms)
      kill -STOP "${RPID[i]}" || true
      sleep "$PAUSE"
      kill -CONT "${RPID[i]}" || true
      record_fault pause-leader "replica-$i" "$start"
      ;;
    pause-etcd)
      i=$((RANDOM % 3))
      kill -STOP "${ETCD_PID[i]}" || true
      sleep "$PAUSE"
      kill -CONT "${ETCD_PID[i]}" || true
      record_fault pause-etcd "etcd-m$i" "$start"
      ;;
    *)
      echo "soak: unknown fault '$1' in SOAK_FAULTS" >&2
      exit 64
      ;;
  esac
}
sleep 3 # registration first
n=0
hard_stop=$((SECONDS + SECS + 120))
while running && [ "$SECONDS" -lt "$hard_stop" ]; do
  fault "${KINDS[n % ${#KINDS[@]}]}"
  n=$((n + 1))
  for _ in $(seq 1 "$EVERY"); do
    running || break
    sleep 1
  done
done
for lt in "$LT_SHADOW" "$LT_INSTANCES"; do
  rc=0
  wait "$lt" || rc=$?
  # 1: the harness's own invariants broke (the checker below judges); else it could not run.
  if [ "$rc" -gt 1 ]; then
    cat "$WORK/shadow.txt" "$WORK/instances.txt" >&2
    echo "soak: the load harness failed (exit $rc)" >&2
    exit "$rc"
  fi
done

# --- the verdict --------------------------------------------------------------------------
echo "soak: checking the history" >&2
rc=0
"$BIN" soak-check --history "$WORK/shadow.jsonl" --history "$WORK/instances.jsonl" \
  --faults "$FAULTS_FILE" --etcd-endpoints "$ETCD_EPS" --etcd-prefix "$PREFIX" --env int \
  --ec2-endpoint "$MOTO_URL" --cluster-id "$CLUSTER_ID" >"$WORK/verdict.txt" || rc=$?
cat "$WORK/verdict.txt"
echo
echo "command: SOAK_SECONDS=$SECS SOAK_FAULT_EVERY=$EVERY SOAK_FAULTS=$FAULT_KINDS scripts/soak.sh"
echo "machine: nproc $(nproc), load average before $LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$rc"

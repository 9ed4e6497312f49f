#!/usr/bin/env bash
# Scale: seeds SCALE_DEPLOYABLES shadow deployables and SCALE_WORKERS workers (default
# 10,000 each) straight into a temporary etcd (`resource-plane loadtest --scenario seed`,
# the same JSON records the service writes), starts the service on it and measures:
#   - time from process start until /health/ready is 200 (all actors hydrated),
#   - resident memory (VmRSS) after hydration and after the load phases,
#   - GET list latency (p50/p99) of the whole deployable list,
#   - procure/release latency under load (SCALE_WORKFLOWS concurrent workflows).
# Everything is on 127.0.0.1 and bounded: each load phase lasts SCALE_SECONDS (default 10).
#
#   SCALE_DEPLOYABLES=10000 SCALE_WORKERS=10000 SCALE_SECONDS=10 scripts/scale.sh
#   SCALE_REPORT_DIR=DIR (an existing directory): an HTML report of each phase there, DIR/<phase>.html
set -euo pipefail

cd "$(dirname "$0")/.."
N=${SCALE_DEPLOYABLES:-10000}
M=${SCALE_WORKERS:-10000}
SECS=${SCALE_SECONDS:-10}
W=${SCALE_WORKFLOWS:-64}
LIST_CLIENTS=${SCALE_LIST_CLIENTS:-4}
TOOL=scale
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

cpu_ticks() { # utime + stime of a process, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}

rss_mib() {
  awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"
}

lt() { # output file, loadtest options...
  local out=$1
  shift
  echo "scale: resource-plane loadtest $*" >&2
  "$BIN" loadtest --json --no-progress ${SCALE_REPORT_DIR:+--report "$SCALE_REPORT_DIR/$out.html"} \
    "$@" >"$WORK/$out.json" 2>"$WORK/$out.txt" || {
    rc=$?
    cat "$WORK/$out.txt" >&2
    [ "$rc" -eq 1 ] || exit "$rc"
  }
}

EC=$(free_port)
EP=$(free_port)
etcd --name scale --data-dir "$WORK/etcd" \
  --listen-client-urls "http://127.0.0.1:$EC" --advertise-client-urls "http://127.0.0.1:$EC" \
  --listen-peer-urls "http://127.0.0.1:$EP" --initial-advertise-peer-urls "http://127.0.0.1:$EP" \
  --initial-cluster "scale=http://127.0.0.1:$EP" --initial-cluster-state new \
  --log-level warn >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$EC/health" 30
ETCD="127.0.0.1:$EC"

echo "scale: seeding $N deployables and $M workers" >&2
lt seed --scenario seed --etcd-endpoints "$ETCD" --deployables "$N" --workers "$M" --workflows 16

PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
# etcd for state, simulated Kubernetes and cloud (nothing leaves loopback). Seeded
# workers are RUNNING and idle: keep the autoscaler from draining them while we measure.
T0=$(date +%s.%N)
env APP_HOST=127.0.0.1 APP_PORT="$PORT" USE_MOCK_ADAPTERS=false ETCD_ENDPOINTS="$ETCD" \
  KUBE_ADAPTER=sim CLOUD_ADAPTER=sim WORKER_AGENT=heartbeat SHADOW_SEED_FILE= RUST_LOG=warn SCALE_DOWN_IDLE_SECONDS=86400 \
  "$BIN" >"$WORK/service.log" 2>&1 &
SVC=$!
PIDS+=("$SVC")
wait_http "$URL/health/ready" 300 || {
  tail -20 "$WORK/service.log" >&2
  exit 1
}
T1=$(date +%s.%N)
HYDRATE=$(python3 -c "print(f'{$T1 - $T0:.2f}')")
RSS_READY=$(rss_mib "$SVC")
LISTED=$(curl -fs "$URL/api/1.0/int/shadow-deployables" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]))')
WORKERS=$(curl -fs "$URL/api/1.0/workers" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]))')

# Background work that grows with the fleet shows up as CPU while no request arrives.
IDLE_SECS=${SCALE_IDLE_SECONDS:-5}
C0=$(cpu_ticks "$SVC")
sleep "$IDLE_SECS"
C1=$(cpu_ticks "$SVC")
IDLE_CPU=$(python3 -c "print(f'{100 * ($C1 - $C0) / $(getconf CLK_TCK) / $IDLE_SECS:.1f}')")

lt list --url "$URL" --scenario list --workflows "$LIST_CLIENTS" --duration "${SECS}s"
lt procure --url "$URL" --scenario shadow --skip-register --deployables "$N" --workflows "$W" --duration "${SECS}s" \
  --etcd-metrics-url "http://$ETCD/metrics"
RSS_AFTER=$(rss_mib "$SVC")

MEM_GIB=$(awk '/MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)
ETCD_VERSION=$(etcd --version | awk '/etcd Version/ {print $3}')
export MACHINE="nproc $(nproc), ${MEM_GIB} GiB, $(uname -sr), etcd $ETCD_VERSION, load average before the run $LOAD_BEFORE"
export COMMAND="SCALE_DEPLOYABLES=$N SCALE_WORKERS=$M SCALE_SECONDS=$SECS SCALE_WORKFLOWS=$W SCALE_LIST_CLIENTS=$LIST_CLIENTS scripts/scale.sh"
export WORK N M HYDRATE RSS_READY RSS_AFTER LISTED WORKERS W LIST_CLIENTS IDLE_CPU IDLE_SECS
python3 - <<'EOF'
import json, os

e = os.environ
work = e["WORK"]
def load(name):
    with open(os.path.join(work, name + ".json")) as f:
        return json.load(f)
seed, lst, proc = load("seed"), load("list"), load("procure")

def row(report, name):
    for r in report["endpoints"]:
        if r["endpoint"] == name:
            return r
    return {"count": 0, "ops_per_sec": 0.0, "p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "errors": {}}

def errs(r):
    return " ".join(f"{k}:{v}" for k, v in sorted(r["errors"].items())) or "-"

print(f"machine: {e['MACHINE']}")
print(f"command: {e['COMMAND']}")
print()
print("| what | figure | notes |")
print("|---|---:|---|")
print(f"| seed {e['N']} deployables + {e['M']} workers into etcd | {seed['elapsed_secs']:.2f} s | {seed['cycles']} txns of <= 128 puts |")
print(f"| start-up to /health/ready (hydration) | {float(e['HYDRATE']):.2f} s | lists {e['LISTED']} deployables, {e['WORKERS']} workers once ready |")
print(f"| resident memory after hydration (VmRSS) | {e['RSS_READY']} MiB | |")
print(f"| service CPU while idle after hydration | {e['IDLE_CPU']} % of one core | over {e['IDLE_SECS']} s with no request |")
print(f"| resident memory after the load phases | {e['RSS_AFTER']} MiB | |")
l = row(lst, "list")
print(f"| GET list of {e['N']} ({e['LIST_CLIENTS']} clients) p50 / p99 | {l['p50_ms']:.1f} / {l['p99_ms']:.1f} ms | {l['ops_per_sec']:.1f} lists/s, max {l['max_ms']:.1f} ms, errors {errs(l)} |")
for name in ("procure", "procure (busy)", "min-pod-count", "release"):
    r = row(proc, name)
    if r["count"]:
        print(f"| {name} under load ({e['W']} workflows over {e['N']}) p50 / p99 | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms | {r['ops_per_sec']:.1f}/s, max {r['max_ms']:.1f} ms, errors {errs(r)} |")
print(f"| workflow cycles under load | {proc['cycles_per_sec']:.1f}/s | {proc['throughput']:.1f} state transitions/s |")
t = ((proc.get("etcd_rpcs") or {}).get("steps", {})).get("transition")
if t:
    print(f"| etcd RPCs per state transition under load | Txn {t['txn_per_op']:.2f}, Range {t['range_per_op']:.2f} | {t['txn']} Txn, {t['range']} Range / {t['ops']} transitions |")
inv = proc["invariants"]
print()
print("invariants: " + ("OK" if inv["ok"] else "VIOLATED: " + "; ".join(inv["messages"])))
EOF

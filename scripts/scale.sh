#!/usr/bin/env bash
# Scale: the same procure load over a small fleet and over a large one, in one run, on
# one etcd, and what the large one costs at rest. Reported, never asserted.
#   1. small: SCALE_SMALL_DEPLOYABLES (default 64) shadow deployables seeded into a
#      temporary etcd, the service started on it, SCALE_WORKFLOWS workflows for
#      SCALE_SECONDS; the service is stopped.
#   2. large: SCALE_DEPLOYABLES deployables and SCALE_WORKERS workers (default 10,000
#      each), and SCALE_INSTANCES instances of which SCALE_PENDING stay PENDING (larger
#      than any worker: the scheduler's backlog; the rest COMPLETED), seeded straight into
#      the same etcd (`resource-plane loadtest --scenario seed`, the records the service
#      writes); the service started again, and measured:
#        - time from process start until /health/ready is 200 (all actors hydrated),
#        - resident memory (VmRSS) after hydration and after the load phases,
#        - the new leader's start-up sweep (time and CPU), then service CPU while idle
#          over SCALE_IDLE_SECONDS (default 30: one drift check),
#        - GET list latency (p50/p99) of the whole deployable list,
#        - the same procure load as (1), over all the deployables,
#        - with SCALE_SCHEDULE_RATE > 0 (default 50), instances submitted at that rate
#          (placed on the seeded workers, completed after 200 ms): PENDING -> SCHEDULED
#          p50/p99 from the service's `instance_schedule_latency_seconds` histogram.
#   For both procure phases: state changes per second and their ratio large/small, CPU
#   time of the service and of etcd per 1,000 state changes (`/proc/<pid>/stat` utime +
#   stime over the phase), and etcd RPCs per state change by type (etcd's
#   `grpc_server_handled_total` over the phase).
# Everything is on 127.0.0.1 and bounded: each load phase lasts SCALE_SECONDS (default 10).
# SCALE_PERF=path records the service with `perf record --call-graph dwarf` during the
# large procure phase (path), the small one (path.small), the idle window (path.idle) and
# the scheduling phase (path.sched); needs perf and a build with
# CARGO_PROFILE_RELEASE_DEBUG=line-tables-only.
#
#   SCALE_DEPLOYABLES=10000 SCALE_WORKERS=10000 SCALE_SECONDS=10 scripts/scale.sh
#   SCALE_DEPLOYABLES=100000 SCALE_WORKERS=10000 SCALE_INSTANCES=100000 SCALE_PENDING=5000 scripts/scale.sh
#   SCALE_REPORT_DIR=DIR (an existing directory): an HTML report of each phase there, DIR/<phase>.html
set -euo pipefail

cd "$(dirname "$0")/.."
N=${SCALE_DEPLOYABLES:-10000}
M=${SCALE_WORKERS:-10000}
SMALL=${SCALE_SMALL_DEPLOYABLES:-64}
INSTANCES=${SCALE_INSTANCES:-0}
PENDING=${SCALE_PENDING:-0}
SCHED_RATE=${SCALE_SCHEDULE_RATE:-50}
SCHED_SECS=${SCALE_SCHEDULE_SECONDS:-40}
SECS=${SCALE_SECONDS:-10}
W=${SCALE_WORKFLOWS:-64}
LIST_CLIENTS=${SCALE_LIST_CLIENTS:-4}
PERF_OUT=${SCALE_PERF:-}
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
ETCD_PID=$!
PIDS+=("$ETCD_PID")
wait_http "http://127.0.0.1:$EC/health" 30
ETCD="127.0.0.1:$EC"

# Starts the service on the etcd; sets SVC and URL, and HYDRATE (seconds to ready).
# Seeded workers are RUNNING and idle: keep the autoscaler from draining them.
start_service() {
  local port t0 t1
  port=$(free_port)
  URL="http://127.0.0.1:$port"
  t0=$(date +%s.%N)
  env APP_HOST=127.0.0.1 APP_PORT="$port" USE_MOCK_ADAPTERS=false ETCD_ENDPOINTS="$ETCD" \
    KUBE_ADAPTER=sim CLOUD_ADAPTER=sim WORKER_AGENT=heartbeat SHADOW_SEED_FILE= RUST_LOG=warn \
    SCALE_DOWN_IDLE_SECONDS=86400 "$BIN" >"$WORK/service-$port.log" 2>&1 &
  SVC=$!
  PIDS+=("$SVC")
  wait_http "$URL/health/ready" 300 || {
    tail -20 "$WORK/service-$port.log" >&2
    exit 1
  }
  t1=$(date +%s.%N)
  HYDRATE=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
}

stop_service() {
  kill "$SVC" 2>/dev/null || true
  wait "$SVC" 2>/dev/null || true
}

# One procure phase over $2 deployables, with the CPU ticks of the service and etcd and
# etcd's RPC counters before and after (files $WORK/$1.*).
procure_phase() {
  local name=$1 deployables=$2
  curl -fs "http://$ETCD/metrics" >"$WORK/$name.etcd0"
  echo "$(cpu_ticks "$SVC") $(cpu_ticks "$ETCD_PID")" >"$WORK/$name.cpu0"
  lt "$name" --url "$URL" --scenario shadow --skip-register --deployables "$deployables" \
    --workflows "$W" --duration "${SECS}s"
  echo "$(cpu_ticks "$SVC") $(cpu_ticks "$ETCD_PID")" >"$WORK/$name.cpu1"
  curl -fs "http://$ETCD/metrics" >"$WORK/$name.etcd1"
}

# Runs a command, with the service recorded by perf into $1 for $2 seconds meanwhile
# when SCALE_PERF is set.
profiled() { # perf output, seconds, command...
  local out=$1 secs=$2 pid=
  shift 2
  if [ -n "$PERF_OUT" ]; then
    perf record -F 499 --call-graph dwarf -o "$out" -p "$SVC" -- sleep "$secs" >/dev/null 2>&1 &
    pid=$!
  fi
  "$@"
  if [ -n "$pid" ]; then
    wait "$pid" || true
  fi
}

# 1. The small fleet.
echo "scale: seeding $SMALL deployables" >&2
lt seed-small --scenario seed --etcd-endpoints "$ETCD" --deployables "$SMALL" --workflows 16
start_service
LOAD_SMALL=$(cut -d" " -f1-3 /proc/loadavg)
profiled "$PERF_OUT.small" "$SECS" procure_phase small "$SMALL"
stop_service

# 2. The large fleet, on the same etcd.
echo "scale: seeding $N deployables, $M workers, $INSTANCES instances ($PENDING pending)" >&2
SEED_INSTANCES=()
if [ "$INSTANCES" -gt 0 ]; then
  SEED_INSTANCES=(--instances "$INSTANCES" --pending "$PENDING")
fi
lt seed --scenario seed --etcd-endpoints "$ETCD" --deployables "$N" --workers "$M" \
  "${SEED_INSTANCES[@]}" --workflows 16
start_service
RSS_READY=$(rss_mib "$SVC")
LISTED=$(curl -fs "$URL/api/1.0/int/shadow-deployables" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]))')
WORKERS=$(curl -fs "$URL/api/1.0/workers" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]))')

# The new leader's start-up sweep: every deployable's min replicas applied once and
# compared with the cluster. Wait for its first report and count its CPU apart.
S0=$(cpu_ticks "$SVC")
T0=$(date +%s.%N)
for _ in $(seq 1 1200); do
  if curl -fs "$URL/api/1.0/controller" | python3 -c \
    'import json,sys; sys.exit(0 if json.load(sys.stdin)["min_replicas"]["last_check_at"] else 1)'; then
    break
  fi
  sleep 0.5
done
S1=$(cpu_ticks "$SVC")
T1=$(date +%s.%N)
SWEEP_SECS=$(python3 -c "print(f'{$T1 - $T0:.1f}')")
SWEEP_CPU=$(python3 -c "print(f'{($S1 - $S0) / $(getconf CLK_TCK):.2f}')")

# Background work that grows with the fleet shows up as CPU while no request arrives.
# The default window (30 s) holds one drift check (every 15th sweep, 2 s apart).
IDLE_SECS=${SCALE_IDLE_SECONDS:-30}
C0=$(cpu_ticks "$SVC")
profiled "$PERF_OUT.idle" "$IDLE_SECS" sleep "$IDLE_SECS"
C1=$(cpu_ticks "$SVC")
IDLE_CPU=$(python3 -c "print(f'{100 * ($C1 - $C0) / $(getconf CLK_TCK) / $IDLE_SECS:.1f}')")

lt list --url "$URL" --scenario list --workflows "$LIST_CLIENTS" --duration "${SECS}s"
LOAD_LARGE=$(cut -d" " -f1-3 /proc/loadavg)
profiled "$PERF_OUT" "$SECS" procure_phase large "$N"

SCHED=0
if python3 -c "import sys; sys.exit(0 if float('$SCHED_RATE') > 0 else 1)"; then
  SCHED=1
  curl -fs "$URL/metrics" >"$WORK/sched.m0"
  curl -fs "http://$ETCD/metrics" >"$WORK/sched.etcd0"
  profiled "$PERF_OUT.sched" "$SCHED_SECS" lt sched --url "$URL" --scenario instances \
    --rate "$SCHED_RATE" --think-ms 200 --workflows "$W" --duration "${SCHED_SECS}s"
  sleep 1
  curl -fs "$URL/metrics" >"$WORK/sched.m1"
  curl -fs "http://$ETCD/metrics" >"$WORK/sched.etcd1"
fi
RSS_AFTER=$(rss_mib "$SVC")

MEM_GIB=$(awk '/MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)
ETCD_VERSION=$(etcd --version | awk '/etcd Version/ {print $3}')
export MACHINE="nproc $(nproc), ${MEM_GIB} GiB, $(uname -sr), etcd $ETCD_VERSION, load average before the run $LOAD_BEFORE"
export COMMAND="SCALE_DEPLOYABLES=$N SCALE_WORKERS=$M SCALE_SMALL_DEPLOYABLES=$SMALL SCALE_INSTANCES=$INSTANCES SCALE_PENDING=$PENDING SCALE_SCHEDULE_RATE=$SCHED_RATE SCALE_SCHEDULE_SECONDS=$SCHED_SECS SCALE_SECONDS=$SECS SCALE_WORKFLOWS=$W SCALE_LIST_CLIENTS=$LIST_CLIENTS scripts/scale.sh"
export CLK_TCK=$(getconf CLK_TCK)
export WORK N M SMALL INSTANCES PENDING HYDRATE RSS_READY RSS_AFTER LISTED WORKERS W LIST_CLIENTS
export IDLE_CPU IDLE_SECS SWEEP_SECS SWEEP_CPU LOAD_SMALL LOAD_LARGE SCHED SCHED_RATE
python3 - <<'EOF'
import json, os, re

e = os.environ
work = e["WORK"]
def load(name):
    with open(os.path.join(work, name + ".json")) as f:
        return json.load(f)
def text(name):
    with open(os.path.join(work, name)) as f:
        return f.read()

def row(report, name):
    for r in report["endpoints"]:
        if r["endpoint"] == name:
            return r
    return {"count": 0, "ops_per_sec": 0.0, "p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "errors": {}}

def errs(r):
    return " ".join(f"{k}:{v}" for k, v in sorted(r["errors"].items())) or "-"

def grpc(metrics):
    """etcd's handled gRPC calls by method."""
    out = {}
    for m in re.finditer(r'^grpc_server_handled_total\{([^}]*)\} (\S+)$', metrics, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        k = labels.get("grpc_method", "?")
        out[k] = out.get(k, 0.0) + float(m.group(2))
    return out

def phase(name):
    rep = load(name)
    changes = rep["throughput"] * rep["elapsed_secs"]
    s0, e0 = map(float, text(name + ".cpu0").split())
    s1, e1 = map(float, text(name + ".cpu1").split())
    tck = float(e["CLK_TCK"])
    # ms of CPU per 1,000 changes = (ticks / tck * 1000) / (changes / 1000)
    per_k = lambda ticks: ticks / tck * 1e6 / max(changes, 1)
    g0, g1 = grpc(text(name + ".etcd0")), grpc(text(name + ".etcd1"))
    rpcs = {k: (g1.get(k, 0) - g0.get(k, 0)) / max(changes, 1) for k in g1}
    rpcs = {k: v for k, v in rpcs.items() if v >= 0.005}
    return rep, changes, per_k(s1 - s0), per_k(e1 - e0), rpcs

def quantile(q, buckets):
    """Prometheus-style quantile from cumulative (upper bound, count) pairs."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-9)
        prev_le, prev_n = le, n
    return prev_le

def hist(metrics, name):
    out = []
    for m in re.finditer(r'^' + name + r'_bucket\{le="([^"]+)"\} (\S+)$', metrics, re.M):
        out.append((float(m.group(1)), float(m.group(2))))
    return out

seed = load("seed")
small, large, lst = phase("small"), phase("large"), load("list")
print(f"machine: {e['MACHINE']}")
print(f"command: {e['COMMAND']}")
print()
print("| what | figure | notes |")
print("|---|---:|---|")
print(f"| seed {e['N']} deployables + {e['M']} workers + {e['INSTANCES']} instances ({e['PENDING']} pending) into etcd | {seed['elapsed_secs']:.2f} s | {seed['cycles']} txns of <= 128 puts |")
print(f"| start-up to /health/ready (hydration) | {float(e['HYDRATE']):.2f} s | lists {e['LISTED']} deployables, {e['WORKERS']} workers once ready |")
print(f"| resident memory after hydration (VmRSS) | {e['RSS_READY']} MiB | |")
print(f"| leader's start-up sweep after ready (min replicas of every deployable) | {e['SWEEP_SECS']} s | {e['SWEEP_CPU']} s of service CPU |")
print(f"| service CPU while idle after the sweep | {e['IDLE_CPU']} % of one core | over {e['IDLE_SECS']} s with no request (one drift check) |")
print(f"| resident memory after the load phases | {e['RSS_AFTER']} MiB | |")
l = row(lst, "list")
print(f"| GET list of {e['N']} ({e['LIST_CLIENTS']} clients) p50 / p99 | {l['p50_ms']:.1f} / {l['p99_ms']:.1f} ms | {l['ops_per_sec']:.1f} lists/s, max {l['max_ms']:.1f} ms, errors {errs(l)} |")
for label, (rep, changes, svc_cpu, etcd_cpu, rpcs), n, load_avg in (
    ("small", small, e["SMALL"], e["LOAD_SMALL"]),
    ("large", large, e["N"], e["LOAD_LARGE"]),
):
    for name in ("procure", "procure (busy)", "min-pod-count", "release"):
        r = row(rep, name)
        if r["count"]:
            print(f"| {name} under load ({e['W']} workflows over {n}) p50 / p99 | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms | {r['ops_per_sec']:.1f}/s, max {r['max_ms']:.1f} ms, errors {errs(r)} |")
    print(f"| state changes/s over {n} deployables | {rep['throughput']:.1f}/s | {rep['cycles_per_sec']:.1f} cycles/s, load average before {load_avg} |")
    print(f"| CPU per 1,000 state changes over {n}: service / etcd | {svc_cpu:.0f} / {etcd_cpu:.0f} ms | {changes:.0f} changes |")
    print(f"| etcd RPCs per state change over {n} | {', '.join(f'{k} {v:.2f}' for k, v in sorted(rpcs.items()))} | grpc_server_handled_total |")
ratio = large[0]["throughput"] / max(small[0]["throughput"], 1e-9)
print(f"| state changes/s at {e['N']} / at {e['SMALL']} (same run) | {ratio:.2f} | |")
if e["SCHED"] == "1":
    m0, m1 = text("sched.m0"), text("sched.m1")
    name = "instance_schedule_latency_seconds"
    b0 = dict(hist(m0, name))
    b1 = [(le, n - b0.get(le, 0.0)) for le, n in hist(m1, name)]
    p50, p99 = quantile(0.5, b1), quantile(0.99, b1)
    count = b1[-1][1] if b1 else 0
    fmt = lambda v: "-" if v is None else f"{v * 1000:.1f}"
    print(f"| PENDING -> SCHEDULED p50 / p99 ({e['PENDING']} more pending, {e['SCHED_RATE']}/s submitted) | {fmt(p50)} / {fmt(p99)} ms | {count:.0f} placed; from the service's histogram buckets |")
    # What the slow placements may have waited on: etcd's disk, and etcd as the
    # service saw it (same window).
    def over(b0, b1, limit):
        d0, d1 = dict(b0), dict(b1)
        total = d1.get(float("inf"), 0.0) - d0.get(float("inf"), 0.0)
        under = max((d1[le] - d0.get(le, 0.0) for le in d1 if le <= limit), default=0.0)
        return total - under, total
    def txn_hist(metrics):
        sums = {}
        for m in re.finditer(r'^store_call_duration_seconds_bucket\{([^}]*)\} (\S+)$', metrics, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels.get("op") == "txn":
                le = float(labels["le"])
                sums[le] = sums.get(le, 0.0) + float(m.group(2))
        return sorted(sums.items())
    e0, e1 = text("sched.etcd0"), text("sched.etcd1")
    fs = "etcd_disk_wal_fsync_duration_seconds"
    slow_fsync, fsyncs = over(hist(e0, fs), hist(e1, fs), 0.128)
    slow_txn, txns = over(txn_hist(m0), txn_hist(m1), 0.1)
    print(f"|   meanwhile: etcd WAL fsyncs over 128 ms; service store Txns over 100 ms | {slow_fsync:.0f} of {fsyncs:.0f}; {slow_txn:.0f} of {txns:.0f} | etcd and service histograms, same window |")
print()
for label, (rep, *_rest) in (("small", small), ("large", large)):
    inv = rep["invariants"]
    print(f"invariants ({label}): " + ("OK" if inv["ok"] else "VIOLATED: " + "; ".join(inv["messages"])))
EOF

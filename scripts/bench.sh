#!/usr/bin/env bash
# Benchmarks, reported not asserted. In one run, at the same concurrency:
#   1. the etcd ceiling: the service's CAS transaction straight to etcd (raw-etcd);
#   2. the service (etcd mode) procure -> min-pod-count -> release throughput and
#      latency, and its ratio to (1);
#   3. the service in memory mode, and its ratio to GET /health (noop) on the same
#      process;
#   4. etcd RPCs per procure / min-pod-count / release, from etcd's /metrics.
# Everything runs on 127.0.0.1: a temporary etcd on free ports, the release binary on a
# free port. Each phase lasts BENCH_SECONDS (default 10). Processes are cleaned up on exit.
#
#   BENCH_SECONDS=10 BENCH_WORKFLOWS=64 scripts/bench.sh
#   BENCH_REPORT_DIR=DIR (an existing directory): an HTML report of each phase there, DIR/<phase>.html
set -euo pipefail

cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-10}
W=${BENCH_WORKFLOWS:-64}
RPC_ITERATIONS=${BENCH_RPC_ITERATIONS:-200}
TOOL=bench
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

EC=$(free_port)
EP=$(free_port)
etcd --name bench --data-dir "$WORK/etcd" \
  --listen-client-urls "http://127.0.0.1:$EC" --advertise-client-urls "http://127.0.0.1:$EC" \
  --listen-peer-urls "http://127.0.0.1:$EP" --initial-advertise-peer-urls "http://127.0.0.1:$EP" \
  --initial-cluster "bench=http://127.0.0.1:$EP" --initial-cluster-state new \
  --log-level warn >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$EC/health" 30
ETCD="127.0.0.1:$EC"
METRICS="http://127.0.0.1:$EC/metrics"

# Starts the service with extra environment; sets SVC_PID and SVC_URL.
start_service() {
  local port
  port=$(free_port)
  env APP_HOST=127.0.0.1 APP_PORT="$port" SHADOW_SEED_FILE= RUST_LOG=warn "$@" \
    "$BIN" >"$WORK/service-$port.log" 2>&1 &
  SVC_PID=$!
  PIDS+=("$SVC_PID")
  SVC_URL="http://127.0.0.1:$port"
  wait_http "$SVC_URL/health/ready" 60 || {
    tail -20 "$WORK/service-$port.log" >&2
    exit 1
  }
}

stop_service() {
  kill "$SVC_PID" 2>/dev/null || true
  wait "$SVC_PID" 2>/dev/null || true
}

lt() { # output file, loadtest options...
  local out=$1
  shift
  echo "bench: resource-plane loadtest $*" >&2
  # Exit 1 means an invariant broke: the report says which; keep going and show it.
  "$BIN" loadtest --json --no-progress ${BENCH_REPORT_DIR:+--report "$BENCH_REPORT_DIR/$out.html"} \
    "$@" >"$WORK/$out.json" 2>"$WORK/$out.txt" || {
    rc=$?
    cat "$WORK/$out.txt" >&2
    [ "$rc" -eq 1 ] || exit "$rc"
  }
}

echo "bench: phase 1/3: etcd ceiling" >&2
lt raw --scenario raw-etcd --etcd-endpoints "$ETCD" --workflows "$W" --duration "${SECS}s" \
  --etcd-metrics-url "$METRICS"

echo "bench: phase 2/3: service on etcd" >&2
# etcd for state; Kubernetes and the cloud stay simulated (nothing leaves loopback).
start_service USE_MOCK_ADAPTERS=false ETCD_ENDPOINTS="$ETCD" KUBE_ADAPTER=sim CLOUD_ADAPTER=sim WORKER_AGENT=heartbeat
lt rpc --url "$SVC_URL" --scenario shadow --workflows 1 --deployables 1 \
  --iterations "$RPC_ITERATIONS" --duration "${SECS}s" --etcd-metrics-url "$METRICS"
lt svc_etcd --url "$SVC_URL" --scenario shadow --workflows "$W" --deployables "$W" \
  --duration "${SECS}s" --etcd-metrics-url "$METRICS"
stop_service

echo "bench: phase 3/3: memory mode and the HTTP ceiling" >&2
start_service USE_MOCK_ADAPTERS=true
lt svc_mem --url "$SVC_URL" --scenario shadow --workflows "$W" --deployables "$W" --duration "${SECS}s"
lt noop --url "$SVC_URL" --scenario noop --workflows "$W" --duration "${SECS}s"
stop_service

MEM_GIB=$(awk '/MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)
CPU_MODEL=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
ETCD_VERSION=$(etcd --version | awk '/etcd Version/ {print $3}')
export MACHINE="nproc $(nproc), ${MEM_GIB} GiB, ${CPU_MODEL:-unknown CPU}, $(uname -sr), etcd $ETCD_VERSION, load average before the run $LOAD_BEFORE, $(rustc --version 2>/dev/null || echo rustc ?)"
export COMMAND="BENCH_SECONDS=$SECS BENCH_WORKFLOWS=$W BENCH_RPC_ITERATIONS=$RPC_ITERATIONS scripts/bench.sh"
export WORK W SECS
python3 - <<'EOF'
import json, os

work = os.environ["WORK"]
def load(name):
    with open(os.path.join(work, name + ".json")) as f:
        return json.load(f)

raw, rpc, etcd, mem, noop = (load(n) for n in ("raw", "rpc", "svc_etcd", "svc_mem", "noop"))

def row(report, name):
    for r in report["endpoints"]:
        if r["endpoint"] == name:
            return r
    return {"count": 0, "ok": 0, "ops_per_sec": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "errors": {}}

def requests_per_sec(report):
    return sum(r["count"] for r in report["endpoints"]) / max(report["elapsed_secs"], 1e-9)

def errors(report):
    out = {}
    for r in report["endpoints"]:
        for k, v in r["errors"].items():
            out[k] = out.get(k, 0) + v
    return " ".join(f"{k}:{v}" for k, v in sorted(out.items())) or "-"

ceiling = raw["throughput"]
lines = []
def add(num, what, rate, p50="", p99="", ratio="", note=""):
    lines.append((num, what, rate, p50, p99, ratio, note))

def fmt(x, d=1):
    return f"{x:,.{d}f}"

cas = row(raw, "etcd txn")
lost = row(raw, "etcd txn (lost)")
add("1", f"etcd CAS ceiling: raw-etcd, {raw['concurrency']} clients, one key each",
    fmt(ceiling) + " txn/s", fmt(cas["p50_ms"], 2), fmt(cas["p99_ms"], 2), "1.00",
    f"lost CAS {lost['count']}, errors {errors(raw)}")
add("2", "service on etcd: state transitions (procure+min-pod+release)",
    fmt(etcd["throughput"]) + " /s", "", "", f"{etcd['throughput'] / ceiling:.2f}",
    f"{fmt(etcd['cycles_per_sec'])} workflow cycles/s; errors {errors(etcd)}")
for name in ("procure", "procure (busy)", "min-pod-count", "release"):
    r = row(etcd, name)
    add("", f"  {name}", fmt(r["ops_per_sec"]) + " /s", fmt(r["p50_ms"], 2), fmt(r["p99_ms"], 2))
noop_rate = noop["throughput"]
mem_req = requests_per_sec(mem)
add("3", "service in memory mode: state transitions", fmt(mem["throughput"]) + " /s", "", "",
    "", f"{fmt(mem['cycles_per_sec'])} cycles/s; errors {errors(mem)}")
add("", "  all requests (vs noop)", fmt(mem_req) + " req/s", "", "", f"{mem_req / noop_rate:.2f}")
for name in ("procure", "procure (busy)", "min-pod-count", "release"):
    r = row(mem, name)
    add("", f"  {name}", fmt(r["ops_per_sec"]) + " /s", fmt(r["p50_ms"], 2), fmt(r["p99_ms"], 2))
h = row(noop, "health")
add("", "  noop GET /health (HTTP ceiling)", fmt(noop_rate) + " req/s", fmt(h["p50_ms"], 2),
    fmt(h["p99_ms"], 2), "1.00", f"errors {errors(noop)}")
steps = (rpc.get("etcd_rpcs") or {}).get("steps", {})
for step in ("procure", "procure (busy)", "min-pod-count", "release"):
    s = steps.get(step)
    if s:
        add("4" if step == "procure" else "", f"etcd RPCs per {step}",
            f"Txn {s['txn_per_op']:.2f}, Range {s['range_per_op']:.2f}", "", "", "",
            f"over {s['ops']} sequential requests")
total = ((etcd.get("etcd_rpcs") or {}).get("steps", {})).get("transition")
if total:
    add("", f"  under load ({etcd['concurrency']} workflows), per transition",
        f"Txn {total['txn_per_op']:.2f}, Range {total['range_per_op']:.2f}", "", "", "",
        f"{total['txn']} Txn / {total['ops']} transitions")
raw_rpc = ((raw.get("etcd_rpcs") or {}).get("steps", {})).get("cas")
if raw_rpc:
    add("", "  raw-etcd, per CAS", f"Txn {raw_rpc['txn_per_op']:.2f}, Range {raw_rpc['range_per_op']:.2f}")

print(f"machine: {os.environ['MACHINE']}")
print(f"command: {os.environ['COMMAND']}")
print(f"concurrency {os.environ['W']}, {os.environ['SECS']} s per phase; load generator, service and etcd share the machine")
print()
print("| # | what | throughput | p50 ms | p99 ms | ratio | notes |")
print("|---|---|---:|---:|---:|---:|---|")
for l in lines:
    print("| " + " | ".join(str(c) for c in l) + " |")
bad = [n for n, r in (("svc_etcd", etcd), ("svc_mem", mem), ("rpc", rpc)) if not r["invariants"]["ok"]]
print()
if bad:
    for n in bad:
        r = {"svc_etcd": etcd, "svc_mem": mem, "rpc": rpc}[n]
        print(f"invariants VIOLATED in {n}: " + "; ".join(r["invariants"]["messages"]))
else:
    print("invariants: OK in every service phase (no double holder, every PROCURED released, no 5xx)")
EOF

#!/usr/bin/env bash
# Lists and procure by pool: seeds LISTS_DEPLOYABLES shadow deployables (default 10,000)
# into a temporary etcd, starts the service on it and measures, in one run:
#   - GET of the whole list (LISTS_CLIENTS clients, default 4): p50/p99,
#   - GET of a page of LISTS_PAGE (default 100): p50/p99,
#   - procure/release workflows (LISTS_WORKFLOWS, default 64) picking by list-then-race
#     (`--pick list`) and by pool (`--pick pool`): cycles/s, procure p50/p99.
# Every phase lasts LISTS_SECONDS (default 10); everything stays on 127.0.0.1.
#
#   LISTS_DEPLOYABLES=10000 LISTS_SECONDS=10 scripts/lists.sh
set -euo pipefail

cd "$(dirname "$0")/.."
N=${LISTS_DEPLOYABLES:-10000}
SECS=${LISTS_SECONDS:-10}
CLIENTS=${LISTS_CLIENTS:-4}
PAGE=${LISTS_PAGE:-100}
W=${LISTS_WORKFLOWS:-64}
TOOL=lists
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

lt() { # output name, loadtest options...
  local out=$1
  shift
  echo "lists: resource-plane loadtest $*" >&2
  "$BIN" loadtest --json --no-progress "$@" >"$WORK/$out.json" 2>"$WORK/$out.txt" || {
    rc=$?
    cat "$WORK/$out.txt" >&2
    [ "$rc" -eq 1 ] || exit "$rc"
  }
}

EC=$(free_port)
EP=$(free_port)
etcd --name lists --data-dir "$WORK/etcd" \
  --listen-client-urls "http://127.0.0.1:$EC" --advertise-client-urls "http://127.0.0.1:$EC" \
  --listen-peer-urls "http://127.0.0.1:$EP" --initial-advertise-peer-urls "http://127.0.0.1:$EP" \
  --initial-cluster "lists=http://127.0.0.1:$EP" --initial-cluster-state new \
  --log-level warn >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$EC/health" 30
ETCD="127.0.0.1:$EC"
lt seed --scenario seed --etcd-endpoints "$ETCD" --deployables "$N" --workflows 16

PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
env APP_HOST=127.0.0.1 APP_PORT="$PORT" USE_MOCK_ADAPTERS=false ETCD_ENDPOINTS="$ETCD" \
  KUBE_ADAPTER=sim CLOUD_ADAPTER=sim WORKER_AGENT=heartbeat SHADOW_SEED_FILE= RUST_LOG=warn \
  "$BIN" >"$WORK/service.log" 2>&1 &
PIDS+=($!)
wait_http "$URL/health/ready" 300 || {
  tail -20 "$WORK/service.log" >&2
  exit 1
}

lt full --url "$URL" --scenario list --workflows "$CLIENTS" --duration "${SECS}s"
lt page --url "$URL" --scenario list --limit "$PAGE" --workflows "$CLIENTS" --duration "${SECS}s"
lt bylist --url "$URL" --scenario shadow --skip-register --deployables "$N" --workflows "$W" \
  --pick list --duration "${SECS}s"
lt bypool --url "$URL" --scenario shadow --skip-register --deployables "$N" --workflows "$W" \
  --pick pool --duration "${SECS}s"

export WORK N CLIENTS PAGE W SECS LOAD_BEFORE
export LOAD_AFTER="$(cut -d" " -f1-3 /proc/loadavg)"
python3 - <<'PY'
import json, os
e = os.environ
def load(name):
    with open(os.path.join(e["WORK"], name + ".json")) as f:
        return json.load(f)
def row(r, ep):
    return next((x for x in r["endpoints"] if x["endpoint"] == ep), None) or {"p50_ms": 0, "p99_ms": 0, "ops_per_sec": 0}
full, page, bylist, bypool = (load(n) for n in ("full", "page", "bylist", "bypool"))
print(f"lists.sh: {e['N']} deployables, {e['SECS']} s per phase, load average {e['LOAD_BEFORE']} before, {e['LOAD_AFTER']} after")
print("| measure | p50 / p99 | rate |")
print("|---|---|---|")
for name, r in ((f"GET list of {e['N']} ({e['CLIENTS']} clients)", full), (f"GET page of {e['PAGE']} ({e['CLIENTS']} clients)", page)):
    l = row(r, "list")
    print(f"| {name} | {l['p50_ms']:.2f} / {l['p99_ms']:.2f} ms | {l['ops_per_sec']:.0f}/s |")
for name, r in (("--pick list (list, then race by name)", bylist), ("--pick pool (PROCURE by node pool)", bypool)):
    p = row(r, "procure")
    print(f"| {e['W']} workflows {name}: procure | {p['p50_ms']:.2f} / {p['p99_ms']:.2f} ms | {r['cycles_per_sec']:.0f} cycles/s, invariants {'ok' if r['invariants']['ok'] else 'BROKEN'} |")
PY

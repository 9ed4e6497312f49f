#!/usr/bin/env bash
# The change stream's cost to transitions, reported not asserted: the shadow workflow
# (procure -> min-pod-count -> release) on etcd, p50/p99 latency of each step with 0
# subscribers and then with EVENTS_SUBSCRIBERS (default 100) open on
# GET /api/1.0/events, all reading. The subscribers are one python3 process holding N
# loopback connections; it reports how many change events each received and whether any
# was closed with `overflow`.
# Everything runs on 127.0.0.1: a temporary etcd on free ports, the service on a free
# port. Each phase lasts EVENTS_BENCH_SECONDS (default 10, at most 600).
#
#   RP_BIN=target/release/resource-plane EVENTS_SUBSCRIBERS=100 scripts/events-bench.sh
#   (without RP_BIN the release binary is built first, see scripts/lib.sh)
set -euo pipefail

cd "$(dirname "$0")/.."
SECS=${EVENTS_BENCH_SECONDS:-10}
if ! [[ "$SECS" =~ ^[0-9]+$ ]] || [ "$SECS" -lt 1 ] || [ "$SECS" -gt 600 ]; then
  echo "events-bench: EVENTS_BENCH_SECONDS must be 1..600, not $SECS" >&2
  exit 64
fi
N=${EVENTS_SUBSCRIBERS:-100}
if ! [[ "$N" =~ ^[0-9]+$ ]] || [ "$N" -lt 1 ] || [ "$N" -gt 10000 ]; then
  echo "events-bench: EVENTS_SUBSCRIBERS must be 1..10000, not $N" >&2
  exit 64
fi
W=${EVENTS_BENCH_WORKFLOWS:-16}
if ! [[ "$W" =~ ^[0-9]+$ ]] || [ "$W" -lt 1 ]; then
  echo "events-bench: EVENTS_BENCH_WORKFLOWS must be a positive integer, not $W" >&2
  exit 64
fi
TOOL=events-bench
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

EC=$(free_port)
EP=$(free_port)
etcd --name evbench --data-dir "$WORK/etcd" \
  --listen-client-urls "http://127.0.0.1:$EC" --advertise-client-urls "http://127.0.0.1:$EC" \
  --listen-peer-urls "http://127.0.0.1:$EP" --initial-advertise-peer-urls "http://127.0.0.1:$EP" \
  --initial-cluster "evbench=http://127.0.0.1:$EP" --initial-cluster-state new \
  --log-level warn >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$EC/health" 30

PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
env APP_HOST=127.0.0.1 APP_PORT="$PORT" SHADOW_SEED_FILE= RUST_LOG=warn \
  USE_MOCK_ADAPTERS=false ETCD_ENDPOINTS="127.0.0.1:$EC" KUBE_ADAPTER=sim CLOUD_ADAPTER=sim \
  WORKER_AGENT=heartbeat EVENTS_MAX_CLIENTS=$((N + 16)) \
  "$BIN" >"$WORK/service.log" 2>&1 &
PIDS+=($!)
wait_http "$URL/health/ready" 60 || {
  tail -20 "$WORK/service.log" >&2
  exit 1
}

lt() { # output name
  echo "events-bench: loadtest --workflows $W --duration ${SECS}s ($1)" >&2
  "$BIN" loadtest --json --no-progress --url "$URL" --scenario shadow --workflows "$W" \
    --deployables "$W" --duration "${SECS}s" >"$WORK/$1.json" 2>"$WORK/$1.txt" || {
    rc=$?
    cat "$WORK/$1.txt" >&2
    [ "$rc" -eq 1 ] || exit "$rc"
  }
}

lt zero

# N subscribers, reading everything, until told to stop (SIGTERM); then a summary.
python3 - "$PORT" "$N" "$WORK/subscribers.json" <<'EOF' &
import json, selectors, signal, socket, sys

port, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sel = selectors.DefaultSelector()
stats = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /api/1.0/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
    s.setblocking(False)
    st = {"changes": 0, "overflow": 0, "closed": False, "tail": b""}
    stats.append(st)
    sel.register(s, selectors.EVENT_READ, st)
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
with open(out + ".ready", "w") as f:
    f.write("ready")
while not stop:
    for key, _ in sel.select(timeout=0.2):
        st = key.data
        try:
            data = key.fileobj.recv(65536)
        except BlockingIOError:
            continue
        if not data:
            st["closed"] = True
            sel.unregister(key.fileobj)
            continue
        buf = st["tail"] + data
        st["changes"] += buf.count(b"event: change\n")
        st["overflow"] += buf.count(b"event: overflow\n")
        st["tail"] = buf[-15:]
changes = [s["changes"] for s in stats]
json.dump({
    "subscribers": n,
    "min_changes": min(changes),
    "max_changes": max(changes),
    "overflowed": sum(1 for s in stats if s["overflow"]),
    "closed": sum(1 for s in stats if s["closed"]),
}, open(out, "w"))
EOF
SUBS=$!
PIDS+=("$SUBS")
for _ in $(seq 1 600); do
  [ -f "$WORK/subscribers.json.ready" ] && break
  sleep 0.05
done
[ -f "$WORK/subscribers.json.ready" ] || {
  echo "events-bench: the subscribers did not start" >&2
  exit 1
}
OPEN=0
for _ in $(seq 1 200); do
  OPEN=$(curl -fs "$URL/metrics" | awk '/^events_subscribers / {print $2}')
  [ "${OPEN:-0}" -ge "$N" ] && break
  sleep 0.05
done
echo "events-bench: $OPEN subscribers open" >&2

lt many

sleep 1 # the last changes reach the subscribers
kill -TERM "$SUBS"
wait "$SUBS" || true
curl -fs "$URL/metrics" | grep '^events_' >"$WORK/events.prom" || true

export WORK N W SECS
export MACHINE="nproc $(nproc), $(uname -sr), load average before the run $LOAD_BEFORE"
python3 - <<'EOF'
import json, os

work = os.environ["WORK"]
def load(name):
    with open(os.path.join(work, name + ".json")) as f:
        return json.load(f)

zero, many, subs = load("zero"), load("many"), load("subscribers")
def row(report, name):
    for r in report["endpoints"]:
        if r["endpoint"] == name:
            return r
    return {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0}

n = os.environ["N"]
print(f"Change stream cost: shadow workflow on etcd, {os.environ['W']} workflows, "
      f"{os.environ['SECS']} s per phase; {os.environ['MACHINE']}")
print()
print(f"| step | 0 subscribers p50 / p99 ms | {n} subscribers p50 / p99 ms | transitions/s 0 -> {n} |")
print("|---|---|---|---|")
for step in ("procure", "min-pod-count", "release"):
    a, b = row(zero, step), row(many, step)
    ra = a["count"] / max(zero["elapsed_secs"], 1e-9)
    rb = b["count"] / max(many["elapsed_secs"], 1e-9)
    print(f"| {step} | {a['p50_ms']:.2f} / {a['p99_ms']:.2f} | {b['p50_ms']:.2f} / {b['p99_ms']:.2f} | {ra:,.0f} -> {rb:,.0f} |")
print()
print(f"Subscribers: {subs['subscribers']} open, each received {subs['min_changes']:,}"
      f"..{subs['max_changes']:,} change events; {subs['overflowed']} overflowed, "
      f"{subs['closed']} closed by the server.")
with open(os.path.join(work, "events.prom")) as f:
    print("Service metrics: " + ", ".join(l.strip() for l in f if l.strip()))
EOF

#!/usr/bin/env bash
# Shared by scripts/bench.sh, scale.sh and soak.sh (sourced, not run): tool checks, the
# release build, a work dir and process list cleaned up on exit, free loopback ports,
# waiting for an HTTP endpoint. Expects TOOL (the caller's name, for messages).
# RP_BIN=path uses that binary instead of building the release one (the tests do).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/resource-plane-target}
BIN=${RP_BIN:-$CARGO_TARGET_DIR/release/resource-plane}

for bin in etcd python3 curl; do
  command -v "$bin" >/dev/null 2>&1 || {
    echo "$TOOL: $bin is missing (etcd: apt-get install etcd-server, or run scripts/setup.sh)" >&2
    exit 1
  }
done

if [ -z "${RP_BIN:-}" ]; then
  echo "$TOOL: building the release binary" >&2
  cargo build --release --quiet
elif [ ! -x "$RP_BIN" ]; then
  echo "$TOOL: RP_BIN=$RP_BIN is not an executable" >&2
  exit 1
fi

LOAD_BEFORE=$(cut -d" " -f1-3 /proc/loadavg)
WORK=$(mktemp -d -t rp-$TOOL.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_http() { # url, seconds
  local deadline=$((SECONDS + $2))
  until curl -fs -o /dev/null "$1"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$TOOL: $1 not ready after $2 s" >&2
      return 1
    fi
    sleep 0.05
  done
}

#!/usr/bin/env bash
# Installs what building and testing need, only when missing (idempotent, quick when
# everything is there): Debian etcd-server/etcd-client (etcd, etcdctl) and
# protobuf-compiler (protoc, for etcd-client's build script).
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || true
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

for bin in etcd protoc; do
  command -v "$bin" >/dev/null 2>&1 || { echo "setup: $bin is still missing" >&2; exit 1; }
done

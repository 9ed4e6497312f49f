#!/usr/bin/env bash
# Installs what building and testing need, only when missing (idempotent, quick when
# everything is there): Debian etcd-server/etcd-client (etcd, etcdctl) and
# protobuf-compiler (protoc, for etcd-client's build script), and the moto EC2 emulator
# (`moto_server`, from PyPI's moto[server]) for the EC2 adapter's integration tests.
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

# `command -v moto_server` is not enough: a pyenv shim stays on PATH after moto is gone,
# so ask the program itself.
moto_ok() { moto_server --help >/dev/null 2>&1; }
if ! moto_ok; then
  echo "setup: installing moto[server]"
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]'
  # pyenv only puts new console scripts on PATH after a rehash.
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
  moto_ok || { echo "setup: moto_server is still not runnable (is pip's bin directory on PATH?)" >&2; exit 1; }
fi

#!/usr/bin/env bash
# Installs what building, testing and the scripts need, only when missing (idempotent, and
# quick when everything is there). It checks what the build *uses*, not a binary's name:
#   - protoc that can compile an import of google/protobuf/descriptor.proto (etcd-client's
#     build script needs the well-known .proto files: Debian's libprotobuf-dev, which
#     protobuf-compiler only recommends);
#   - etcd and etcdctl (Debian etcd-server, etcd-client) for the real-etcd tests;
#   - curl and python3 (used by scripts/bench.sh, scale.sh, soak.sh);
#   - moto's EC2 emulator, installed from PyPI into a virtualenv this script owns
#     ($RP_TOOLS/venv), so nothing depends on pip's bin directory being on PATH; the
#     Makefile puts $RP_TOOLS/venv/bin first on PATH.
#   - Debian chromium and chromium-driver for the web console's browser tests
#     (tests/integration/ui.rs); SETUP_BROWSER=0 skips them.
set -euo pipefail

RP_TOOLS="${RP_TOOLS:-/var/tmp/resource-plane-tools}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

apt_updated=0
apt_install() {
  echo "setup: installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" -eq 0 ]; then
    $SUDO apt-get update -qq || echo "setup: apt-get update failed; trying the install anyway" >&2
    apt_updated=1
  fi
  if ! $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
    echo "setup: could not install $* (apt-get install $*)" >&2
    exit 1
  fi
}

# protoc must resolve the well-known types, exactly as etcd-client's build script does.
protoc_ok() {
  command -v protoc >/dev/null 2>&1 || return 1
  local d
  d=$(mktemp -d)
  printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\nimport "google/protobuf/timestamp.proto";\nmessage M { google.protobuf.Timestamp t = 1; }\n' >"$d/check.proto"
  local rc=0
  protoc -I"$d" -o "$d/out.pb" "$d/check.proto" >/dev/null 2>&1 || rc=1
  rm -rf "$d"
  return $rc
}

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
protoc_ok || need+=(protobuf-compiler libprotobuf-dev)
command -v curl >/dev/null 2>&1 || need+=(curl ca-certificates)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ "${SETUP_BROWSER:-1}" = 1 ]; then
  [ -x /usr/bin/chromium ] || need+=(chromium)
  [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
fi
if [ ${#need[@]} -gt 0 ]; then apt_install "${need[@]}"; fi

protoc_ok || {
  echo "setup: protoc cannot find google/protobuf/descriptor.proto; install libprotobuf-dev" >&2
  exit 1
}
for pair in etcd:etcd-server etcdctl:etcd-client curl:curl python3:python3; do
  bin=${pair%%:*}
  command -v "$bin" >/dev/null 2>&1 || { echo "setup: $bin is still missing; install the Debian package ${pair#*:}" >&2; exit 1; }
done
if [ "${SETUP_BROWSER:-1}" = 1 ]; then
  for pair in chromium:chromium chromedriver:chromium-driver; do
    [ -x "/usr/bin/${pair%%:*}" ] || { echo "setup: /usr/bin/${pair%%:*} is still missing; install the Debian package ${pair#*:}" >&2; exit 1; }
  done
fi

# moto in our own virtualenv: ask the program itself (a stale shim or a half-installed
# package would pass a `command -v`).
venv="$RP_TOOLS/venv"
moto_ok() { "$venv/bin/moto_server" --help >/dev/null 2>&1; }
if ! moto_ok; then
  echo "setup: installing moto[server] into $venv"
  mkdir -p "$RP_TOOLS"
  python3 -m venv "$venv" || { echo "setup: python3 -m venv failed; install python3-venv" >&2; exit 1; }
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'moto[server]>=5,<6' || {
    echo "setup: pip could not install moto[server] from PyPI" >&2
    exit 1
  }
  moto_ok || { echo "setup: $venv/bin/moto_server is still not runnable" >&2; exit 1; }
fi

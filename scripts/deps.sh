#!/usr/bin/env bash
# Installs what switchyard's tests and demo need on a fresh Debian/Ubuntu machine
# (etcd server and client, protoc, Python's venv), if they are missing. Safe to run again.
set -euo pipefail
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
# The grpcio and grpcurl client tests install their clients into a Python venv.
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian's package may start a system etcd on 127.0.0.1:2379; tests and demo use their own ports.

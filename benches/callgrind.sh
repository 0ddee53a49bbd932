#!/bin/bash
# Instructions per unary call of a switchyard build, counted by callgrind (deterministic,
# unlike timings on a shared machine). Against a held setup (see benches/ab.sh):
#   cargo bench --bench e2e -- run --hold 1200 --targets switchyard --no-write
#   benches/callgrind.sh ETCD_URL [binary=target/release/switchyard] [calls=20000] [calls/s=1000]
# ETCD_URL is the held setup's etcd (the --etcd-endpoints of its `switchyard proxy`). The
# build runs under valgrind on a free loopback port; after 2,000 warm-up calls the counters
# are zeroed, `calls` calls are made at `calls/s` (4 connections, 16 streams each), the
# counters are dumped, and the total is divided by the calls.
set -eu
ETCD=$1; BIN=${2:-target/release/switchyard}; N=${3:-20000}; RATE=${4:-1000}
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind not installed" >&2; exit 2; }
D=$(ls -d /tmp/switchyard-e2e-*/ 2>/dev/null | tail -1)
[ -n "$D" ] && [ -f "${D}unary.bin" ] || { echo "callgrind.sh: no held setup (/tmp/switchyard-e2e-*/unary.bin)" >&2; exit 2; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
OUT=$(mktemp -d /tmp/switchyard-callgrind-XXXXXX)
valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" "$BIN" proxy \
  --listen "127.0.0.1:$PORT" --etcd-endpoints "$ETCD" --admin-listen off >"$OUT/log" 2>&1 &
VG=$!
trap 'kill $VG 2>/dev/null || true' EXIT
load() { h2load -c 4 -m 16 -t 1 -n "$1" ${2:+--rps $2} -d "${D}unary.bin" -H 'content-type: application/grpc' \
  -H 'te: trailers' "http://127.0.0.1:$PORT/switchyard.echo.v1.Echo/Unary" | grep -oE "[0-9]+ succeeded" | cut -d' ' -f1; }
for _ in $(seq 1 60); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.5; done
load 2000 >/dev/null
callgrind_control -z "$VG" >/dev/null
ok=$(load "$N" $((RATE / 4)))
callgrind_control -d "$VG" >/dev/null
sleep 1
total=$(callgrind_annotate "$(ls "$OUT"/cg.out.* | tail -1)" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$BIN: $total instructions for $ok calls = $((total / ok)) per call"

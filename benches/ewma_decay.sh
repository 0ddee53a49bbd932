#!/bin/bash
# The slow node's share of the calls under peak-ewma, for several --ewma-decay values, on a
# held degraded setup (one backend of three 10 ms late):
#   cargo bench --bench e2e -- run --degraded --hold 1500 --no-write
#   benches/ewma_decay.sh ETCD_URL [binary=target/release/switchyard] [rounds=2] [decay ...]
# ETCD_URL is the held setup's etcd. One peak-ewma proxy per decay (default 10s 1s 100ms),
# each with its own admin listener; per round and proxy: 50,000 calls at 10,000 calls/s,
# then 200,000 calls closed loop (h2load, 4 connections x 64 streams). Each endpoint's share
# is the difference of `switchyard_calls_total` across the run.
set -eu
ETCD=$1; BIN=${2:-target/release/switchyard}; ROUNDS=${3:-2}; shift $(( $# < 3 ? $# : 3 ))
DECAYS=("$@"); [ ${#DECAYS[@]} -gt 0 ] || DECAYS=(10s 1s 100ms)
command -v h2load >/dev/null || { echo "ewma_decay.sh: h2load not installed" >&2; exit 2; }
D=$(ls -d /tmp/switchyard-e2e-*/ 2>/dev/null | tail -1)
[ -n "$D" ] && [ -f "${D}unary.bin" ] || { echo "ewma_decay.sh: no held setup (/tmp/switchyard-e2e-*/unary.bin)" >&2; exit 2; }
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
declare -A PORT ADMIN
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
for dec in "${DECAYS[@]}"; do
  PORT[$dec]=$(free); ADMIN[$dec]=$(free)
  RUST_LOG=warn "$BIN" proxy --listen "127.0.0.1:${PORT[$dec]}" --etcd-endpoints "$ETCD" \
    --admin-listen "127.0.0.1:${ADMIN[$dec]}" --balance peak-ewma --ewma-decay "$dec" >/dev/null 2>&1 &
  PIDS+=($!)
done
sleep 2
# "endpoint calls" per endpoint, from the proxy's /metrics.
calls() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^switchyard_calls_total/ && /endpoint="[0-9]/ {
  match($0, /endpoint="[^"]+"/); s[substr($0, RSTART + 10, RLENGTH - 11)] += $NF } END { for (e in s) print e, s[e] }'; }
load() { h2load -c 4 -m 64 -t 1 -n "$2" ${3:+--rps $3} -d "${D}unary.bin" -H 'content-type: application/grpc' \
  -H 'te: trailers' "http://127.0.0.1:$1/switchyard.echo.v1.Echo/Unary" | grep -oE "[0-9.]+ req/s"; }
for round in $(seq 1 "$ROUNDS"); do
  for dec in "${DECAYS[@]}"; do
    for shape in "10k calls/s" "closed loop"; do
      before=$(calls "${ADMIN[$dec]}")
      if [ "$shape" = "closed loop" ]; then rate=$(load "${PORT[$dec]}" 200000); else rate=$(load "${PORT[$dec]}" 50000 2500); fi
      after=$(calls "${ADMIN[$dec]}")
      shares=$(printf '%s\n---\n%s\n' "$before" "$after" | awk '$1 == "---" { a = 1; next } NF == 2 {
        if (a) now[$1] = $2; else was[$1] = $2 } END { for (e in now) { d[e] = now[e] - was[e]; t += d[e] }
        for (e in d) printf " %s=%.1f%%", e, 100 * d[e] / t }')
      echo "round $round, --ewma-decay $dec, $shape ($rate):$shares"
    done
  done
done

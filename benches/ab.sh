#!/bin/bash
# A/B of CPU per call against a held setup (see benches/RESULTS.md): start one with
#   cargo bench --bench e2e -- run --hold 1200 --targets switchyard,haproxy --no-write
# (it prints each target's address and pid; start other switchyard builds on its etcd),
# then run this at each target in turn, alternating:
#   benches/ab.sh ADDR PID [calls=200000] [calls/s per connection, 0 = unlimited; 5000]
#                 [streams per connection; 16]
# h2load runs 4 connections (so 5000 per connection = 20,000 calls/s in all). Printed per
# call that succeeded: the process's CPU (utime+stime from /proc over the run) and its
# user/system split; with BACKEND_PIDS="pid pid pid" in the environment, also the CPU of
# those processes (the backends), and always h2load's own CPU (bash's `time`).
set -eu
ADDR=$1; PID=$2; N=${3:-200000}; R=${4:-5000}; M=${5:-16}
D=$(ls -d /tmp/switchyard-e2e-*/ 2>/dev/null | tail -1)  # the held setup's request body file
[ -n "$D" ] && [ -f "${D}unary.bin" ] || { echo "ab.sh: no held setup (/tmp/switchyard-e2e-*/unary.bin)" >&2; exit 2; }
T=$(getconf CLK_TCK)
# utime and stime of the given pids, in ticks.
ticks() { for p in "$@"; do awk '{print $14, $15}' "/proc/$p/stat"; done | awk '{u+=$1; s+=$2} END {print u+0, s+0}'; }
read -r u0 s0 < <(ticks "$PID")
read -r bu0 bs0 < <(ticks ${BACKEND_PIDS:-})
if [ "$R" = "0" ]; then RPS=""; else RPS="--rps $R"; fi
TIMEFORMAT='H2LOAD_CPU %U %S'
out=$( { time h2load -c 4 -m "$M" -t 1 -n "$N" $RPS -d "${D}unary.bin" -H 'content-type: application/grpc' -H 'te: trailers' "http://$ADDR/switchyard.echo.v1.Echo/Unary"; } 2>&1 )
read -r u1 s1 < <(ticks "$PID")
read -r bu1 bs1 < <(ticks ${BACKEND_PIDS:-})
ok=$(echo "$out" | grep -oE "[0-9]+ succeeded" | cut -d' ' -f1)
rps=$(echo "$out" | grep -oE "finished in [0-9.]+m?s, [0-9.]+ req/s")
h=$(echo "$out" | awk '/^H2LOAD_CPU/ {print $2 + $3}')
us() { echo "$1*1000000/$ok" | bc -l | cut -c1-5; }
line="$ADDR $rps succeeded=$ok cpu_us_per_call=$(us "($u1-$u0+$s1-$s0)/$T") user_us=$(us "($u1-$u0)/$T") sys_us=$(us "($s1-$s0)/$T") h2load_us=$(us "$h")"
[ -n "${BACKEND_PIDS:-}" ] && line="$line backends_us=$(us "($bu1-$bu0+$bs1-$bs0)/$T")"
echo "$line"

#!/bin/bash
# A/B of CPU per call against a held setup (see benches/RESULTS.md): start one with
#   cargo bench --bench e2e -- run --hold 1200 --targets switchyard,haproxy --no-write
# (it prints each target's address and pid; start other switchyard builds on its etcd),
# then run this at each target in turn, alternating:
#   benches/ab.sh ADDR PID [calls=200000] [calls/s per connection, 0 = unlimited; 5000]
#                 [streams per connection; 16]
# h2load runs 4 connections (so 5000 per connection = 20,000 calls/s in all); CPU per call
# is the process's utime+stime from /proc over the run, divided by the calls that succeeded.
set -eu
ADDR=$1; PID=$2; N=${3:-200000}; R=${4:-5000}; M=${5:-16}
D=$(ls -d /tmp/switchyard-e2e-*/ | tail -1)  # the held setup's request body file
T=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$PID/stat; }
a=$(cpu)
if [ "$R" = "0" ]; then RPS=""; else RPS="--rps $R"; fi
out=$(h2load -c 4 -m $M -t 1 -n $N $RPS -d ${D}unary.bin -H 'content-type: application/grpc' -H 'te: trailers' http://$ADDR/switchyard.echo.v1.Echo/Unary)
b=$(cpu)
ok=$(echo "$out" | grep -oE "[0-9]+ succeeded" | cut -d' ' -f1)
rps=$(echo "$out" | grep -oE "finished in [0-9.]+m?s, [0-9.]+ req/s" )
echo "$ADDR $rps succeeded=$ok cpu_us_per_call=$(echo "($b-$a)*1000000/$T/$ok" | bc -l | cut -c1-5)"

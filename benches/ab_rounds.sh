#!/bin/bash
# Alternating A/B rounds of benches/ab.sh over several proxies of one held setup (see
# ab.sh's header), with the ratios taken round by round against the first proxy:
#   benches/ab_rounds.sh ROUNDS CALLS RATE NAME=ADDR=PID [NAME=ADDR=PID ...]
# Each round runs every proxy once, in turn, each round starting one proxy later, so that
# a slow minute of the shared machine hits one round, not one proxy. Printed: each run's
# ab.sh line, then per proxy its CPU per call by round, the median, and its ratio to the
# first proxy's (round by round; median and mean of the rounds' ratios).
set -eu
ROUNDS=$1; N=$2; R=$3; shift 3
here=$(dirname "$0")
names=(); addrs=(); pids=()
for t in "$@"; do
    IFS='=' read -r name addr pid <<<"$t"
    names+=("$name"); addrs+=("$addr"); pids+=("$pid")
done
k=${#names[@]}
out=$(mktemp)
for ((r = 0; r < ROUNDS; r++)); do
    for ((j = 0; j < k; j++)); do
        i=$(((j + r) % k))
        line=$("$here/ab.sh" "${addrs[$i]}" "${pids[$i]}" "$N" "$R")
        echo "round $((r + 1)) ${names[$i]} $line"
        cpu=$(echo "$line" | grep -oE 'cpu_us_per_call=[0-9.]+' | cut -d= -f2)
        echo "$r ${names[$i]} $cpu" >>"$out"
    done
done
echo "load average after: $(cat /proc/loadavg)"
# Per proxy: CPU per call by round, median; ratio to the first proxy, round by round.
awk -v first="${names[0]}" -v order="${names[*]}" '
    { cpu[$2, $1] = $3; rounds = ($1 + 1 > rounds) ? $1 + 1 : rounds }
    function median(a, n,   i, j, t) {
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    END {
        k = split(order, names, " ")
        for (p = 1; p <= k; p++) {
            name = names[p]; line = ""; sum = 0
            for (r = 0; r < rounds; r++) { v[r + 1] = cpu[name, r]; q[r + 1] = cpu[name, r] / cpu[first, r]; sum += q[r + 1]; line = line sprintf("%s%.1f", r ? " / " : "", cpu[name, r]) }
            m = median(v, rounds); mq = median(q, rounds)
            printf "%-12s cpu_us_per_call %s; median %.1f; x %s: median %.3f, mean %.3f\n", name, line, m, first, mq, sum / rounds
        }
    }' "$out"
rm -f "$out"

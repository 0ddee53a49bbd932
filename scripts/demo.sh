#!/usr/bin/env bash
# The demo: a local etcd, three example backends that register themselves in etcd with
# leases, the proxy, and a client whose calls are spread round-robin over the backends.
# Then one backend leaves cleanly and one is killed, and the calls go on.
# Usage: scripts/demo.sh   (ports: DEMO_PORT_BASE, default 27000; everything on 127.0.0.1)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
echo "== building switchyard"
cargo build --quiet --bin switchyard --features demo  # demo-backend, demo-client
bin=target/debug/switchyard
base=${DEMO_PORT_BASE:-27000}
etcd_url="http://127.0.0.1:$((base))"
proxy="127.0.0.1:$((base + 10))"
admin="127.0.0.1:$((base + 11))"
svc=switchyard.echo.v1.Echo
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_port() { # host:port
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; return 1
}

echo "== etcd on $etcd_url (data in $work)"
etcd --name demo --data-dir "$work/etcd" \
  --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "http://127.0.0.1:$((base + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((base + 1))" \
  --initial-cluster "demo=http://127.0.0.1:$((base + 1))" \
  --logger zap --log-level error >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_port "127.0.0.1:$base"

export RUST_LOG=${RUST_LOG:-warn,switchyard=info}
for i in 1 2 3; do
  echo "== backend-$i on 127.0.0.1:$((base + 20 + i)), registering itself as $svc (5 s lease)"
  "$bin" demo-backend --name "backend-$i" --listen "127.0.0.1:$((base + 20 + i))" \
    --service "$svc" --ttl 5s --etcd-endpoints "$etcd_url" >"$work/backend-$i.log" 2>&1 &
  pids+=($!)
  eval "backend_$i=$!"
done
for i in 1 2 3; do wait_port "127.0.0.1:$((base + 20 + i))"; done
for _ in $(seq 1 100); do # until all three have registered
  [ "$("$bin" endpoints --etcd-endpoints "$etcd_url" --json | grep -c '"address"')" = 3 ] && break
  sleep 0.1
done

echo "== switchyard proxy on $proxy (admin on $admin)"
"$bin" proxy --listen "$proxy" --admin-listen "$admin" --etcd-endpoints "$etcd_url" \
  >"$work/proxy.log" 2>&1 &
pids+=($!)
wait_port "$proxy"

echo "== what is registered (switchyard endpoints)"
"$bin" endpoints --etcd-endpoints "$etcd_url"

echo "== 12 calls from one client connection: round-robin per call"
"$bin" demo-client --target "$proxy" --calls 12

echo "== backend-3 stops cleanly (SIGTERM: deregisters, drains)"
kill -TERM "$backend_3"
wait "$backend_3" || true
echo "== 8 more calls: only backend-1 and backend-2 answer"
"$bin" demo-client --target "$proxy" --calls 8

echo "== backend-2 is killed (-9): its key stays until the lease expires, but calls"
echo "   that cannot reach it are retried on backend-1 (no failed call)"
{ kill -KILL "$backend_2"; wait "$backend_2"; } 2>/dev/null || true
"$bin" demo-client --target "$proxy" --calls 6

echo "== calls by backend and grpc-status, from the admin listener (http://$admin/metrics)"
exec 3<>"/dev/tcp/${admin%:*}/${admin#*:}"
printf 'GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n' "$admin" >&3
grep '^switchyard_calls_total' <&3 || true
exec 3<&-

echo "== the proxy's log"
sed -e 's/\x1b\[[0-9;]*m//g' "$work/proxy.log"
echo "== demo done"

#!/usr/bin/env bash
# Validates the deployment files: the example configs (switchyard check-config), the
# systemd unit (systemd-analyze verify + offline security score), the Kubernetes
# manifests (schema check with kubernetes-validate, yamllint), and the monitoring files
# (the Grafana dashboard parses and names only metrics the proxy exports; the alerting
# rules pass promtool's check and unit tests, or a schema check without promtool). Installs what it needs from
# Debian's packages and PyPI. The container image is not built here (no registry for base
# images); its build steps are the ones `cargo build --release --locked` runs.
# Usage: deploy/check.sh   (from anywhere; builds target/debug/switchyard if needed)
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
apt_install() {
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

cargo build --quiet --bin switchyard
bin="$PWD/target/debug/switchyard"

echo "== example configs"
for f in deploy/systemd/switchyard.toml deploy/kubernetes/switchyard.toml; do
  out=$(env -i PATH="$PATH" "$bin" check-config "$f")
  echo "${out%%$'\n'*}"
done

echo "== systemd unit"
command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# verify checks that ExecStart= exists: point it at the binary just built.
sed "s#/usr/local/bin/switchyard#$bin#g" deploy/systemd/switchyard.service >"$tmp/switchyard.service"
SYSTEMD_LOG_LEVEL=warning systemd-analyze verify "$tmp/switchyard.service"
# Exposure score 0 (locked down) .. 10 (unprotected); fail above 2.0.
systemd-analyze security --offline=true --threshold=20 "$tmp/switchyard.service" | tail -1

echo "== kubernetes manifests"
venv="${SWITCHYARD_DEPLOY_VENV:-${TMPDIR:-/tmp}/switchyard-deploy-venv}"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/yamllint" ]; then
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate yamllint
fi
"$venv/bin/yamllint" -s -d '{extends: default, rules: {line-length: {max: 100}, document-start: disable}}' deploy/kubernetes
"$venv/bin/kubernetes-validate" --strict deploy/kubernetes/namespace.yaml deploy/kubernetes/daemonset.yaml

echo "== monitoring"
"$venv/bin/yamllint" -s -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable}}' deploy/monitoring
if command -v promtool >/dev/null 2>&1 \
  || { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
       --no-install-recommends prometheus >/dev/null; } && command -v promtool >/dev/null 2>&1; then
  "$venv/bin/python" deploy/monitoring/check.py
  promtool check rules deploy/monitoring/alerts.yml
  promtool test rules deploy/monitoring/alerts.test.yml
else
  echo "promtool not available (Debian's prometheus package did not install): schema check"
  "$venv/bin/python" deploy/monitoring/check.py --schema
fi
echo "deploy: ok"

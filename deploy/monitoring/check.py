"""Checks the monitoring files: the Grafana dashboard parses and every query in it and in
the alerting rules names only metrics the proxy exports (the names declared in
src/metrics/ and src/observe/, and the process metrics registered there); with --schema, the rules' shape
too (for machines where promtool cannot be installed).

Usage: python3 deploy/monitoring/check.py [--schema]   (needs PyYAML)
"""

import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent

# The prometheus crate's process collector, registered in src/metrics/ (Linux).
PROCESS_METRICS = {
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
}

KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}


def exported() -> set:
    """The metric names the proxy exports, as the exposition spells them."""
    # Metrics are declared in src/metrics/ and, for the access log and traces, src/observe/.
    files = sorted((ROOT / "src" / "metrics").glob("*.rs")) + sorted(
        (ROOT / "src" / "observe").glob("*.rs")
    )
    src = "\n".join(f.read_text() for f in files)
    names = set(re.findall(r'"(switchyard_[a-z0-9_]+)"', src))
    for hist in re.findall(r'HistogramOpts::new\(\s*"(switchyard_[a-z0-9_]+)"', src):
        names |= {hist + "_bucket", hist + "_sum", hist + "_count"}
    if "ProcessCollector" in src:
        names |= PROCESS_METRICS
    return names


def metric_names(expr: str) -> set:
    """The metric names a PromQL expression selects."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{[^}]*\}|\$\w+", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        before = e[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":
            continue  # a number's exponent or a duration's unit
        if e[m.end():].lstrip().startswith("(") or m.group(0) in KEYWORDS:
            continue  # a function or an operator
        names.add(m.group(0))
    return names


def dashboard_queries(dash: dict):
    """(where, expr) for every panel query and templating query."""
    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))
    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            yield f"panel {p.get('title')!r}", t["expr"]
    for v in dash.get("templating", {}).get("list", []):
        m = re.match(r"\s*label_values\(\s*(.*),\s*\w+\s*\)\s*$", v.get("definition", ""))
        if m:
            yield f"variable {v['name']!r}", m.group(1)


def rules(doc: dict):
    for group in doc["groups"]:
        for rule in group["rules"]:
            yield group, rule


def check_schema(doc) -> list:
    """What promtool check rules would reject, for the parts we use."""
    errors = []
    duration = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        return ["alerts.yml: top level must be a map with a `groups` list"]
    names = set()
    for group in doc["groups"]:
        if not isinstance(group.get("name"), str) or group["name"] in names:
            errors.append(f"group {group.get('name')!r}: needs a unique name")
        names.add(group.get("name"))
        for rule in group.get("rules") or []:
            what = rule.get("alert") or rule.get("record")
            if ("alert" in rule) == ("record" in rule):
                errors.append(f"rule {what!r}: exactly one of `alert` and `record`")
            if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
                errors.append(f"rule {what!r}: `expr` must be a non-empty string")
            if "for" in rule and not duration.match(str(rule["for"])):
                errors.append(f"rule {what!r}: `for` is not a duration: {rule['for']!r}")
            for key in ("labels", "annotations"):
                if not all(isinstance(v, str) for v in (rule.get(key) or {}).values()):
                    errors.append(f"rule {what!r}: {key} must be strings")
            unknown = set(rule) - {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
            if unknown:
                errors.append(f"rule {what!r}: unknown keys {sorted(unknown)}")
    return errors


def main() -> int:
    known = exported()
    errors = []
    dash = json.loads((HERE / "grafana-dashboard.json").read_text())
    ids = []
    for where, expr in dashboard_queries(dash):
        used = metric_names(expr)
        if not used:
            errors.append(f"dashboard {where}: no metric found in {expr!r}")
        errors += [f"dashboard {where}: {n} is not exported by the proxy" for n in sorted(used - known)]
    for p in dash["panels"]:
        ids.append(p["id"])
    if len(ids) != len(set(ids)):
        errors.append("dashboard: panel ids are not unique")
    doc = yaml.safe_load((HERE / "alerts.yml").read_text())
    if "--schema" in sys.argv:
        errors += check_schema(doc)
    for _, rule in rules(doc):
        used = metric_names(rule["expr"])
        if not used:
            errors.append(f"alert {rule.get('alert')}: no metric found")
        errors += [f"alert {rule.get('alert')}: {n} is not exported by the proxy" for n in sorted(used - known)]
    for e in errors:
        print(f"monitoring: {e}", file=sys.stderr)
    if not errors:
        queries = sum(1 for _ in dashboard_queries(dash)) + sum(1 for _ in rules(doc))
        print(f"monitoring: {queries} queries name only exported metrics")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

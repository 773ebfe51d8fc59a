"""Shared by the dashboard checks: paths, dashboard/rules parsing, the metric names chorus exports."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = ROOT / "dashboards"
DASHBOARDS = sorted((DASHBOARD_DIR / "grafana").glob("*.json"))
PROMETHEUS_YML = DASHBOARD_DIR / "prometheus.yml"
RULES_YML = DASHBOARD_DIR / "rules.yml"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose_spec.json"
DATASOURCE_UID = "chorus-prometheus"
METRICS_PORT = 9464
# Series Prometheus itself makes (not exported by chorus) that the dashboards/rules may use.
PROMETHEUS_BUILTINS = {"ALERTS", "up"}
# A trailing `<op> <number>`: the form every alerting rule in rules.yml has.
_THRESHOLD = re.compile(r"^(?P<signal>.*\S)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<num>[-+]?[0-9.]+(?:e[-+]?[0-9]+)?)\s*$", re.S)

promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (run `make prometheus`)")


# --- helpers (also used by test_prometheus_live.py) --------------------------------------------

def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(dash: dict) -> list[dict]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    out = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query target."""
    return [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", [])]


def variable_queries(dash: dict) -> dict[str, str]:
    """Template variable name -> its label_values(...) query."""
    return {v["name"]: v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"}


def substitute(expr: str, values: dict[str, str], rate_interval: str = "1m", rng: str = "5m") -> str:
    """Replace Grafana variables: $topic etc. from ``values``, $__rate_interval, $__range, $__interval."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", rng).replace("$__interval", "15s")
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES_YML.read_text())["groups"] for r in g["rules"] if "alert" in r]


def signal_query(rule_expr: str) -> str:
    """`<signal> <op> <threshold>` -> `<signal> <op> bool <threshold>`: one 0/1 series per signal
    series, so a healthy system still returns the series the alert watches."""
    m = _THRESHOLD.match(rule_expr.strip())
    assert m, f"alert expression is not of the form `<signal> <op> <number>`: {rule_expr!r}"
    return f"{m['signal']} {m['op']} bool {m['num']}"


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (identifiers followed by a selector,
    range, closing paren or the end, minus PromQL keywords and label names in by/on clauses)."""
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # drop label matchers (and their values)
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"label_values\(([^,]*),[^)]*\)", r"\1", expr)  # Grafana: label_values(metric, label)
    keywords = {"bool", "and", "or", "unless", "offset", "by", "on", "without", "ignoring", "inf", "nan"}
    found = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_:.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr):
        name = m.group(1)
        if name.lower() in keywords or re.fullmatch(r"[0-9]*[smhdwy]", name):
            continue
        found.add(name)
    return found


def exported_samples() -> dict[str, str]:
    """Sample name -> metric family name for every metric object in stream/metrics.py."""
    from prometheus_client.metrics import MetricWrapperBase

    import stream.metrics as chorus_metrics

    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "gauge": [""], "summary": ["_sum", "_count", "_created"]}
    out = {}
    for obj in vars(chorus_metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for fam in obj.describe():
                for s in suffixes[fam.type]:
                    out[fam.name + s] = fam.name
    return out


def design_doc() -> Path | None:
    for p in (ROOT.parent / "shared" / "DESIGN.md", ROOT / "shared" / "DESIGN.md", ROOT / "docs" / "DESIGN.md"):
        if p.is_file():
            return p
    return None


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def chorus_services(c: dict) -> dict[str, dict]:
    """Compose services that run the chorus image."""
    return {n: s for n, s in c["services"].items() if str(s.get("image", "")).startswith("chorus")}

"""Static checks of dashboards/, docker-compose.yml and the Dockerfile (no Docker engine needed).

promtool (Debian package `prometheus`, installed by `make prometheus`) checks the Prometheus
config, the alerting rules (syntax and `promtool test rules` unit tests with synthetic series) and
the PromQL syntax of every dashboard query. The compose file is validated against the Compose
Specification JSON schema vendored in tests/data/ (see tests/data/README.md).

The shared helpers live in tests/helpers/dashboards.py (also used by tests/system/test_prometheus_live.py).
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helpers.dashboards import (  # noqa: F401
    promtool,
    ROOT, DASHBOARD_DIR, DASHBOARDS, PROMETHEUS_YML, RULES_YML, COMPOSE, COMPOSE_SCHEMA, DATASOURCE_UID, METRICS_PORT, PROMETHEUS_BUILTINS, _THRESHOLD, load_dashboard, panels, dashboard_exprs, variable_queries, substitute, alert_rules, signal_query, metric_names, exported_samples, design_doc, compose, chorus_services,
)


# --- Grafana dashboard ---------------------------------------------------------------------------

def test_dashboard_files_exist():
    assert DASHBOARDS, "no dashboard JSON under dashboards/grafana/"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path):
    dash = load_dashboard(path)
    assert 39 <= dash["schemaVersion"] <= 41, "schemaVersion should be current for Grafana 11/12"
    assert dash["uid"] and dash.get("id") is None and dash["title"]
    ps = panels(dash)
    assert len({p["id"] for p in ps}) == len(ps), "panel ids must be unique"
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{p['title']}: wider than the 24-column grid"
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cell & cells, f"{p['title']}: overlaps another panel"
        cells |= cell
    for p in ps:
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, p["title"]
        assert p.get("targets"), f"{p['title']}: no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID, p["title"]
            assert t["expr"].strip(), p["title"]
    for v in dash["templating"]["list"]:
        assert v["datasource"]["uid"] == DATASOURCE_UID, v["name"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_variables_and_filters(path):
    dash = load_dashboard(path)
    qs = variable_queries(dash)
    assert set(qs) >= {"topic", "indicator"}
    for name, q in qs.items():
        assert re.fullmatch(r"label_values\((chorus_\w+)(\{[^}]*\})?,\s*%s\)" % name, q), q
    # Everything per {topic, indicator} follows the selected topic and indicator.
    for title, expr in dashboard_exprs(dash):
        for sel in re.findall(r"chorus_(?:attribution_\w+|operator_recompute_seconds_bucket)\{([^}]*)\}", expr):
            assert 'topic=~"$topic"' in sel and 'indicator=~"$indicator"' in sel, (title, expr)
        if "chorus_window_agents" in expr:
            assert 'topic=~"$topic"' in expr, (title, expr)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_has_the_required_panels(path):
    exprs = " ".join(e for _, e in dashboard_exprs(load_dashboard(path)))
    for needle in [
        "chorus_attribution_band_share", "chorus_attribution_panel_band_share",
        "chorus_attribution_panel_tvd", "chorus_attribution_panel_spearman",
        "chorus_attribution_panel_rescale_residual", "chorus_attribution_top_share",
        "chorus_attribution_macro_value", "chorus_attribution_completeness_residual",
        "histogram_quantile(0.95, sum by (le) (rate(chorus_operator_recompute_seconds_bucket",
        "rate(chorus_ingest_frames_total", "chorus_ingest_lag_seconds",
        "sum by (reason) (rate(chorus_ingest_frames_invalid_total", "sum by (rule) (increase(chorus_alerts_published_total",
    ]:
        assert needle in exprs, needle
    top = [p for p in panels(load_dashboard(path)) if "chorus_attribution_top_share" in json.dumps(p["targets"])]
    assert top and top[0]["type"] == "table" and top[0]["targets"][0]["instant"], "top culprits: an instant table"


def test_metric_names_exist_in_metrics_module_and_readme():
    exported = exported_samples()
    exprs = [e for d in DASHBOARDS for _, e in dashboard_exprs(load_dashboard(d))]
    exprs += [q for d in DASHBOARDS for q in variable_queries(load_dashboard(d)).values()]
    exprs += [r["expr"] for r in alert_rules()]
    used = set().union(*(metric_names(e) for e in exprs))
    assert {"chorus_attribution_top_share", "chorus_operator_recompute_seconds_bucket"} <= used  # parser sanity
    unknown = used - set(exported) - PROMETHEUS_BUILTINS
    assert not unknown, f"metrics not defined in stream/metrics.py: {sorted(unknown)}"
    # README "Contracts" is the contract of record (it names additions to the design note, DESIGN.md)
    text = (ROOT / "README.md").read_text()
    missing = {exported[n] for n in used if n in exported and exported[n] not in text}
    assert not missing, f"metrics not named in README.md: {sorted(missing)}"


def test_metric_name_parser():
    assert metric_names('sum by (le, topic) (rate(a_b_bucket{x="y z"}[5m])) or on() vector(0)') == {"a_b_bucket"}
    assert metric_names('abs(a) / (abs(b{t=~"$topic"}) + 1e-6) > 0.01') == {"a", "b"}
    assert metric_names('up{job="chorus"} == 0') == {"up"}


@promtool
def test_dashboard_promql_syntax(tmp_path):
    """Every dashboard query parses: promtool checks them as recording rules."""
    rules = []
    for d in DASHBOARDS:
        for i, (title, expr) in enumerate(dashboard_exprs(load_dashboard(d))):
            rules.append({"record": f"chorus_dashboard:check_{i}", "expr": substitute(expr, {"topic": "t", "indicator": "i"})})
    f = tmp_path / "dashboard_exprs.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --- provisioning --------------------------------------------------------------------------------

def test_provisioning_matches_dashboards_and_compose():
    c = compose()
    (ds_file,) = (DASHBOARD_DIR / "provisioning" / "datasources").glob("*.yaml")
    (ds,) = yaml.safe_load(ds_file.read_text())["datasources"]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in c["services"]
    (prov_file,) = (DASHBOARD_DIR / "provisioning" / "dashboards").glob("*.yaml")
    (prov,) = yaml.safe_load(prov_file.read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in c["services"]["grafana"]["volumes"])
    assert mounts["./dashboards/grafana"] == prov["options"]["path"]
    assert mounts["./dashboards/provisioning"] == "/etc/grafana/provisioning"
    home = c["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "dashboards" / "grafana" / Path(home).name).is_file()
    pmounts = dict(v.split(":")[:2] for v in c["services"]["prometheus"]["volumes"] if v.startswith("./"))
    assert pmounts == {"./dashboards/prometheus.yml": "/etc/prometheus/prometheus.yml",
                       "./dashboards/rules.yml": "/etc/prometheus/rules.yml"}


# --- Prometheus config and rules -----------------------------------------------------------------

@promtool
def test_promtool_check_config():
    r = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@promtool
def test_promtool_check_rules():
    r = subprocess.run(["promtool", "check", "rules", str(RULES_YML)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rules_cover_the_required_alerts():
    names = {r["alert"] for r in alert_rules()}
    assert {"ChorusIngestStalled", "ChorusIngestLagHigh", "ChorusCompletenessResidualHigh",
            "ChorusRecomputeSlowerThanHop", "ChorusAttributionErrorHigh"} <= names
    for r in alert_rules():
        signal_query(r["expr"])  # every rule is `<signal> <op> <number>`
        assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"]


def test_prometheus_scrapes_every_chorus_service():
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert cfg["rule_files"] == ["rules.yml"]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "chorus"]
    (sd,) = job["dns_sd_configs"]
    assert sd["port"] == METRICS_PORT
    # the relay serves no /metrics; every other chorus service does
    assert set(sd["names"]) == set(chorus_services(compose())) - {"relay"}


@promtool
def test_alerts_fire_on_synthetic_series(tmp_path):
    """`promtool test rules`: each alert fires on a series that breaks it and stays silent otherwise.
    Thresholds are the documented ones (lag 120 s, residual 1 % of F, busy 90 % of the hop)."""
    lbl = 'topic="t", indicator="i", job="chorus", instance="op:9464"'
    tests = {
        "rule_files": [str(RULES_YML)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # frames arrive for 10 minutes, then stop
                    {"series": 'chorus_ingest_frames_total{type="commit", job="chorus", instance="in:9464"}',
                     "values": "0+600x10 6000x20"},
                    {"series": 'chorus_ingest_lag_seconds{job="chorus", instance="in:9464"}', "values": "5x10 300x20"},
                    {"series": f"chorus_attribution_macro_value{{{lbl}}}", "values": "10x30"},
                    {"series": f"chorus_attribution_completeness_residual{{{lbl}}}", "values": "0.001x10 -0.5x20"},
                    {"series": f"chorus_attribution_error_estimate{{{lbl}}}", "values": "0.0002x10 0.02x20"},
                    # 30 s of recompute per 60 s minute, then 60 s per minute
                    {"series": f"chorus_operator_recompute_seconds_sum{{{lbl}}}", "values": "0+30x10 300+60x20"},
                    {"series": 'up{job="chorus", instance="in:9464", component="ingest"}', "values": "1x10 0x20"},
                ],
                "alert_rule_test": [
                    {"eval_time": "9m", "alertname": "ChorusIngestStalled", "exp_alerts": []},
                    {"eval_time": "9m", "alertname": "ChorusIngestLagHigh", "exp_alerts": []},
                    {"eval_time": "9m", "alertname": "ChorusCompletenessResidualHigh", "exp_alerts": []},
                    {"eval_time": "9m", "alertname": "ChorusAttributionErrorHigh", "exp_alerts": []},
                    {"eval_time": "9m", "alertname": "ChorusRecomputeSlowerThanHop", "exp_alerts": []},
                    {"eval_time": "9m", "alertname": "ChorusTargetDown", "exp_alerts": []},
                    {"eval_time": "25m", "alertname": "ChorusIngestStalled", "exp_alerts": [
                        {"exp_labels": {"severity": "critical"},
                         "exp_annotations": {"summary": "chorus ingest received no firehose frame for 5 minutes"}}]},
                    {"eval_time": "25m", "alertname": "ChorusIngestLagHigh", "exp_alerts": [
                        {"exp_labels": {"severity": "warning"},
                         "exp_annotations": {"summary": "chorus ingest is 5m 0s behind the firehose"}}]},
                    {"eval_time": "25m", "alertname": "ChorusAttributionErrorHigh", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "topic": "t", "indicator": "i"},
                         "exp_annotations": {"summary": "t/i: per-agent attribution error 2% of max |phi|"}}]},
                    {"eval_time": "25m", "alertname": "ChorusCompletenessResidualHigh", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "topic": "t", "indicator": "i"},
                         "exp_annotations": {"summary": "t/i: completeness residual 5% of F(x)"}}]},
                    {"eval_time": "25m", "alertname": "ChorusRecomputeSlowerThanHop", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "instance": "op:9464"},
                         "exp_annotations": {"summary": "operator op:9464 spends 100% of each hop recomputing"}}]},
                    {"eval_time": "25m", "alertname": "ChorusTargetDown", "exp_alerts": [
                        {"exp_labels": {"severity": "critical", "job": "chorus", "instance": "in:9464",
                                        "component": "ingest"},
                         "exp_annotations": {"summary": "chorus ingest at in:9464 is not serving /metrics"}}]},
                ],
            }
        ],
    }
    f = tmp_path / "rules_test.yml"
    f.write_text(yaml.safe_dump(tests, sort_keys=False))
    r = subprocess.run(["promtool", "test", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@promtool
def test_nan_stale_and_outage_alerts(tmp_path):
    """`promtool test rules` for the signals that used to go silent: a NaN residual (a NaN compared
    with a threshold is false, so ChorusCompletenessResidualHigh cannot fire: the operator's own
    chorus_attribution_healthy does), series gone stale (the operator removes a skipped pair's
    series), records rejected as poison, and a stage that cannot reach Kafka."""
    job = 'job="chorus", instance="op:9464"'

    def pair(topic):
        return f'topic="{topic}", indicator="i", {job}'

    nan20 = " ".join(["NaN"] * 20)
    tests = {
        "rule_files": [str(RULES_YML)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # "nan": the residual turns NaN at minute 10 and the operator marks the pair skipped
                {"series": f"chorus_attribution_macro_value{{{pair('nan')}}}", "values": "10x30"},
                {"series": f"chorus_attribution_completeness_residual{{{pair('nan')}}}", "values": f"0.001x10 {nan20}"},
                {"series": f"chorus_attribution_healthy{{{pair('nan')}}}", "values": "1x10 0x20"},
                # "stale": the pair's series are removed at minute 10 (stale markers), healthy 0
                {"series": f"chorus_attribution_macro_value{{{pair('stale')}}}", "values": "10x10 stale"},
                {"series": f"chorus_attribution_completeness_residual{{{pair('stale')}}}", "values": "0.5x10 stale"},
                {"series": f"chorus_attribution_healthy{{{pair('stale')}}}", "values": "1x10 0x20"},
                # "ok": healthy throughout
                {"series": f"chorus_attribution_macro_value{{{pair('ok')}}}", "values": "10x30"},
                {"series": f"chorus_attribution_completeness_residual{{{pair('ok')}}}", "values": "0.001x30"},
                {"series": f"chorus_attribution_healthy{{{pair('ok')}}}", "values": "1x30"},
                {"series": f'chorus_kafka_unavailable{{stage="operator", {job}}}', "values": "0x10 1x20"},
                {"series": f'chorus_kafka_unavailable{{stage="worker", job="chorus", instance="w:9464"}}',
                 "values": "0x30"},
                {"series": f'chorus_records_rejected_total{{topic="chorus.features", reason="type", {job}}}',
                 "values": "0x10 5x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "ChorusAttributionSkipped", "exp_alerts": []},
                {"eval_time": "9m", "alertname": "ChorusKafkaUnavailable", "exp_alerts": []},
                {"eval_time": "9m", "alertname": "ChorusRecordsRejected", "exp_alerts": []},
                # the blind spot this alert covers: the NaN pair never fires ResidualHigh; the stale
                # pair's residual (0.5 of 10 = 5 %) stops firing-to-be once its series is gone
                {"eval_time": "25m", "alertname": "ChorusCompletenessResidualHigh", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "ChorusAttributionSkipped", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "topic": t, "indicator": "i"},
                     "exp_annotations": {"summary": f"{t}/i: attribution skipped (non-finite or failed result); "
                                                    "see chorus_attribution_skipped_total"}}
                    for t in ("nan", "stale")]},
                {"eval_time": "25m", "alertname": "ChorusKafkaUnavailable", "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "stage": "operator", "instance": "op:9464"},
                     "exp_annotations": {"summary": "chorus operator at op:9464 cannot deliver to Kafka"}}]},
                {"eval_time": "15m", "alertname": "ChorusRecordsRejected", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "topic": "chorus.features", "reason": "type"},
                     "exp_annotations": {"summary": "chorus skipped invalid chorus.features records (type) in "
                                                    "the last 10 minutes"}}]},
                {"eval_time": "29m", "alertname": "ChorusRecordsRejected", "exp_alerts": []},  # none since
            ],
        }],
    }
    f = tmp_path / "rules_test.yml"
    f.write_text(yaml.safe_dump(tests, sort_keys=False))
    r = subprocess.run(["promtool", "test", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --- docker-compose.yml and the image ------------------------------------------------------------

def _compose_validator():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    return jsonschema.Draft201909Validator(schema)


def test_compose_validates_against_the_compose_spec():
    errors = sorted(_compose_validator().iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_schema_rejects_mistakes():
    """Control: the vendored schema really constrains services (so the check above means something)."""
    v = _compose_validator()
    bad = compose()
    bad["services"]["worker"]["depends_on"] = {"kafka": {"condition": "service_ready"}}
    assert not v.is_valid(bad)
    bad = compose()
    bad["services"]["worker"]["helthcheck"] = {}
    assert not v.is_valid(bad)


def test_compose_services_and_dependencies():
    c = compose()
    s = c["services"]
    assert s["kafka"]["image"].startswith("apache/kafka:")
    assert s["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, one node
    for name in ("kafka", "ingest", "worker", "operator", "prometheus", "grafana", "relay", "ingest-demo", "operator-gpu"):
        assert name in s, name
        assert "healthcheck" in s[name], f"{name}: no healthcheck"
    for name, svc in s.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in s, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in s[dep], f"{name} waits for {dep} to be healthy, which has no healthcheck"
    for name, svc in chorus_services(c).items():
        assert svc["environment"]["CHORUS_METRICS_HOST"] == "0.0.0.0", name
        if name != "relay":
            assert svc["depends_on"]["kafka"]["condition"] == "service_healthy", name
            assert svc["environment"]["CHORUS_KAFKA"] == "kafka://kafka:9092", name
    # scalable worker: no fixed container name, no host port
    assert "container_name" not in s["worker"] and "ports" not in s["worker"]
    # live relay by default; the demo profile ingests from the synthetic relay
    assert "profiles" not in s["ingest"] and "bsky.network" in s["ingest"]["environment"]["CHORUS_RELAY"]
    assert s["relay"]["profiles"] == ["demo"] and s["ingest-demo"]["profiles"] == ["demo"]
    assert "ws://relay:8765/xrpc" in s["ingest-demo"]["command"]
    assert s["ingest-demo"]["depends_on"]["relay"]["condition"] == "service_healthy"
    # optional GPU reservation
    assert "deploy" not in s["operator"]
    (dev,) = s["operator-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"] and s["operator-gpu"]["profiles"] == ["gpu"]


def test_compose_commands_exist_in_the_cli():
    """Every chorus service's command and flags are real `chorus` subcommands and options."""
    import typer.main

    from stream.cli import app

    cli = typer.main.get_command(app)
    for name, svc in chorus_services(compose()).items():
        sub, *args = svc["command"]
        assert sub in cli.commands, f"{name}: `chorus {sub}` does not exist"
        opts = {o for p in cli.commands[sub].params for o in p.opts}
        for a in args:
            if a.startswith("--"):
                assert a in opts, f"{name}: `chorus {sub}` has no option {a}"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a directory pattern covers its files."""
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes) or fnmatch.fnmatchcase(path, pat):
            ignored = not neg
    return ignored


def test_dockerfile_builds_from_the_context():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"pip install \.", text)
    assert re.search(r'^ENTRYPOINT \["chorus"\]', text, re.M)
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: missing"
        assert not _dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    for junk in (".venv", ".git", "tests", "stream/__pycache__"):
        assert _dockerignored(junk, patterns), f"{junk} would be sent to the Docker daemon"
    # the package the image installs carries its data files
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'include = ["stream*", "operators*"]' in pyproject and (ROOT / "stream" / "data").is_dir()

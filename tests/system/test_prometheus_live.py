"""A real Prometheus scrapes a running `chorus run`; every dashboard and alert query returns data.

Prometheus (Debian package `prometheus`; `make prometheus` installs it) runs as a subprocess on a
free loopback port with a temporary TSDB, the rule file of dashboards/rules.yml and a 1 s scrape of
`chorus run --profile demo` (embedded broker, synthetic relay). Once every metric the dashboards
need has arrived, each PromQL expression of the dashboards ($topic/$indicator replaced by label
values found in the data) and the signal side of each alerting rule is evaluated through
/api/v1/query and must return at least one series. Bounded: about 3 minutes at most.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from stream.local.broker import free_port

from tests.helpers.dashboards import (
    DASHBOARDS, PROMETHEUS_YML, RULES_YML, alert_rules, dashboard_exprs, load_dashboard,
    metric_names, signal_query, substitute, variable_queries,
)

pytestmark = [
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (run `make prometheus`)"),
    pytest.mark.timeout(300),
]

DATA_DEADLINE_S = 170  # from the start of `chorus run` until every needed series is there
RATE_INTERVAL = "30s"  # >= 3 demo hops (10 s) and 30 scrapes
# (topic, indicator) pairs with a top-culprits table that recomputed within RATE_INTERVAL.
READY_PAIRS = (f"increase(chorus_operator_recompute_seconds_count[{RATE_INTERVAL}]) > 0"
               " and on(topic, indicator) count by (topic, indicator) (chorus_attribution_top_share)")


def _get(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params, doseq=True)}" if params else base + path
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def query(base: str, expr: str) -> list[dict]:
    return _get(base, "/api/v1/query", query=expr)["result"]


def _stop(proc: subprocess.Popen, first=signal.SIGINT, grace: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(first)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(Prometheus base URL, log file of `chorus run`) once every needed series has arrived."""
    tmp = tmp_path_factory.mktemp("prom_live")
    metrics_port, prom_port = free_port(), free_port()
    chorus_log, prom_log = tmp / "chorus.log", tmp / "prometheus.log"

    env = dict(os.environ, CHORUS_METRICS_PORT=str(metrics_port), CHORUS_METRICS_HOST="127.0.0.1",
               CHORUS_PROFILE="demo", CHORUS_STATE_DIR=str(tmp / "state"), JAX_PLATFORMS="cpu")
    env.pop("CHORUS_KAFKA", None)  # the embedded broker
    chorus = subprocess.Popen(
        [sys.executable, "-m", "stream.cli", "run", "--profile", "demo", "--no-console",
         "--synthetic", "1000", "--duration", str(DATA_DEADLINE_S + 90)],
        env=env, stdout=chorus_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    started = time.monotonic()

    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    cfg["rule_files"] = [str(RULES_YML)]
    cfg["scrape_configs"] = [{"job_name": "chorus", "static_configs": [
        {"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"component": "run"}}]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
        stdout=prom_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{prom_port}"
    try:
        _wait_ready(base, prom, prom_log)
        _wait_for_data(base, chorus, chorus_log, started)
        yield base, chorus_log
    finally:
        _stop(chorus)
        _stop(prom, signal.SIGTERM, 10)


def _wait_ready(base: str, prom: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert prom.poll() is None, f"prometheus exited:\n{_tail(log)}"
        try:
            with urllib.request.urlopen(base + "/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prometheus not ready within 30 s:\n{_tail(log)}")


def _needed_samples() -> set[str]:
    """chorus sample names the dashboards and rules read, except those behind an `or on() vector(0)`
    fallback (they only exist after the event happens: an invalid frame, an alert)."""
    exprs = [e for d in DASHBOARDS for _, e in dashboard_exprs(load_dashboard(d))] + [r["expr"] for r in alert_rules()]
    return {n for e in exprs if "vector(0)" not in e for n in metric_names(e) if n.startswith("chorus_")}


def _wait_for_data(base: str, chorus: subprocess.Popen, log: Path, started: float) -> None:
    needed, have = _needed_samples(), set()
    while time.monotonic() - started < DATA_DEADLINE_S:
        assert chorus.poll() is None, f"`chorus run` exited with {chorus.returncode}:\n{_tail(log)}"
        try:
            have = {s["metric"]["__name__"] for s in query(base, 'count by (__name__) ({__name__=~"chorus_.+", job="chorus"})')}
            recomputed = query(base, READY_PAIRS)
            rules = _get(base, "/api/v1/rules")["groups"]
        except OSError:
            time.sleep(1)
            continue
        evaluated = all(not r["lastEvaluation"].startswith("0001") for g in rules for r in g["rules"])
        if needed <= have and recomputed and evaluated:
            return
        time.sleep(2)
    pytest.fail(f"no complete data within {DATA_DEADLINE_S} s; missing {sorted(needed - have)}\n"
                f"`chorus run` output:\n{_tail(log)}")


@pytest.fixture(scope="module")
def label_values(live):
    """Real $topic / $indicator values: a pair with a top-culprits table and recent recomputes."""
    base, _ = live
    (first, *_) = query(base, READY_PAIRS) or pytest.fail(f"no series for {READY_PAIRS}")
    return {"topic": first["metric"]["topic"], "indicator": first["metric"]["indicator"]}


def test_variable_queries_return_values(live):
    base, _ = live
    for d in DASHBOARDS:
        for name, q in variable_queries(load_dashboard(d)).items():
            metric = q[len("label_values("):].split(",")[0].split("{")[0]
            values = _get(base, f"/api/v1/label/{name}/values", **{"match[]": metric})
            assert values, f"${name}: {q} returns no value"


def test_every_dashboard_query_returns_series(live, label_values):
    base, _ = live
    empty = []
    for d in DASHBOARDS:
        for title, expr in dashboard_exprs(load_dashboard(d)):
            q = substitute(expr, label_values, rate_interval=RATE_INTERVAL, rng="2m")
            if not query(base, q):
                empty.append(f"{d.name} / {title}: {q}")
    assert not empty, "queries without data ($topic/$indicator = %s):\n%s" % (label_values, "\n".join(empty))


def test_every_alert_signal_returns_series_and_rules_are_healthy(live):
    base, _ = live
    empty = [f"{r['alert']}: {signal_query(r['expr'])}" for r in alert_rules() if not query(base, signal_query(r["expr"]))]
    assert not empty, "alert signals without data:\n" + "\n".join(empty)
    bad = [(r["name"], r.get("lastError")) for g in _get(base, "/api/v1/rules")["groups"] for r in g["rules"]
           if r["health"] != "ok"]
    assert not bad, bad
    loaded = {r["name"] for g in _get(base, "/api/v1/rules")["groups"] for r in g["rules"]}
    assert loaded == {r["alert"] for r in alert_rules()}


def test_live_values_are_consistent(live, label_values):
    """Cross-checks between series: shares of the bands sum to 1, top shares fall with rank, and
    the scrape target is up."""
    base, _ = live
    sel = 'topic="{topic}", indicator="{indicator}"'.format(**label_values)
    for metric in ("chorus_attribution_band_share", "chorus_attribution_panel_band_share"):
        (total,) = query(base, f"sum({metric}{{{sel}}})")
        assert abs(float(total["value"][1]) - 1) < 1e-3, (metric, total)
    top = sorted((int(s["metric"]["rank"]), float(s["value"][1])) for s in query(base, f"chorus_attribution_top_share{{{sel}}}"))
    assert [r for r, _ in top] == list(range(1, len(top) + 1)) and len(top) <= 10
    ordered = lambda key: all(key(a) >= key(b) for (_, a), (_, b) in zip(top, top[1:]))  # noqa: E731
    assert ordered(float) or ordered(abs), top  # ranked by share (or by its magnitude)
    assert [float(s["value"][1]) for s in query(base, 'up{job="chorus"}')] == [1.0]

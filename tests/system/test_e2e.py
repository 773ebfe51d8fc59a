"""`chorus run` end to end: the real embedded broker, synthetic relay, ingester, worker, operator.

Fast checks first (the run lock, a busy metrics port, the console view), then one full run of the
`chorus` command as a subprocess on a small synthetic population with the planted episode.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console as RichConsole

from stream.local.console import Snapshots, Status, render, snapshot_line
from stream.local.runner import RunLock, running_instance

ROOT = Path(__file__).resolve().parents[2]
CHORUS = [sys.executable, "-m", "stream.cli"]


def chorus(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CHORUS, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    env.update(CHORUS_STATE_DIR=str(state_dir), JAX_PLATFORMS="cpu", **extra)
    return env


# --- fast: lock, port, view ------------------------------------------------------------------

def test_second_run_is_refused_with_one_line(tmp_path):
    lock = RunLock(tmp_path).acquire()
    try:
        lock.write({"pid": 4242, "metrics": "http://127.0.0.1:1/metrics"})
        assert running_instance(tmp_path)["pid"] == 4242
        r = chorus("run", "--no-console", "--metrics-port", "0", "--duration", "1", env=run_env(tmp_path))
    finally:
        lock.release()
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "already running" in lines[0] and "4242" in lines[0], r.stderr
    assert running_instance(tmp_path) is None  # released: the next run may start


def test_busy_metrics_port_is_a_one_line_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = chorus("run", "--no-console", "--metrics-port", str(port), "--duration", "1",
                   env=run_env(tmp_path))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"metrics port 127.0.0.1:{port} is in use" in lines[0], r.stderr


def _snapshot(topic: str, indicator: str) -> dict:
    return {
        "v": 1, "topic": topic, "indicator": indicator, "window_end": 1_700_000_000, "value": 3.0,
        "baseline_value": 1.0, "completeness_residual": 2e-7, "n_agents": 1234,
        "bands": {"top0.1": 0.05, "0.1-1": 0.10, "1-10": 0.25, "10-50": 0.35, "bottom50": 0.25},
        "panel": {"bands": {"top0.1": 0.70, "0.1-1": 0.30}, "tvd": 0.85, "spearman": 0.4,
                  "rescale": 1.7, "rescale_residual": 0.6},
        "top": [{"did": "did:plc:abcdefghijklmnopqrstuvwx", "share": 0.031, "followers": 12}],
    }


def test_console_view_shows_bands_panel_residual_and_culprits():
    snaps = Snapshots()
    snaps.add(_snapshot("politics", "cascade_reach"))
    snaps.add(_snapshot("politics", "polarization"))
    term = RichConsole(file=io.StringIO(), width=160, record=True)
    term.print(render(snaps, Status(events_total=900, rate=123.4, lag_s=0.8, agents={"politics": 1234})))
    text = term.export_text()
    for needle in ("politics", "cascade_reach", "polarization", "bottom50", "70.0%", "25.0%",
                   "123.4 ev/s", "lag 0.8s", "1.0e-07", "did:plc:abcdefgh", "3.1%"):
        assert needle in text, needle
    line = snapshot_line(_snapshot("politics", "polarization"))
    assert "top0.1=5.0%|70.0%" in line and "residual=1.0e-07" in line and "tvd=0.850" in line


# --- the full pipeline -----------------------------------------------------------------------

N_ACCOUNTS, SEED, RATE = 2000, 3, 100.0   # ~8k activity events over ~80 s after a 10 s follow burst
WINDOW_S, HOP_S = 20, 5                   # a window about as long as the planted episode
RUN_LIMIT_S = 240                         # `chorus run --duration`: it stops by itself
TAIL_BANDS = ("10-50", "bottom50")        # follower rank >= 10%: where the participants live
# Alert rules for a 2,000-account population: a culprit's share is ~1/active agents, so the
# default 5% would be reached by nobody in particular; no cooldown so the episode's hops count.
ALERT_RULES = "cooldown_s: 0\nrules:\n  new_top_culprit:\n    min_share: 0.02\n"


# Counters of faults and recoveries: served (HELP) but with samples only once one happened, which a
# clean run may not see (a label set is created by the first fault it counts).
FAULT_ONLY = {"chorus_ingest_frames_invalid_total", "chorus_ingest_seq_resets_total",
              "chorus_ingest_replayed_frames_total", "chorus_ingest_event_time_clamped_total",
              "chorus_attribution_skipped_total", "chorus_records_rejected_total",
              "chorus_kafka_send_retries_total", "chorus_run_part_restarts_total"}


def design_metric_names() -> set[str]:
    """Every metric name DESIGN.md lists (histograms by their base name)."""
    import re

    import stream.metrics as chorus_metrics
    from prometheus_client.metrics import MetricWrapperBase

    names = {fam.name + ("_total" if fam.type == "counter" else "")
             for obj in vars(chorus_metrics).values() if isinstance(obj, MetricWrapperBase) for fam in obj.describe()}
    for p in (ROOT.parent / "shared" / "DESIGN.md", ROOT / "docs" / "DESIGN.md"):
        if p.is_file():
            section = p.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
            names |= set(re.findall(r"\bchorus_[a-z_]*[a-z]", section))
    return names


def served_samples(url: str) -> tuple[str, dict[str, int]]:
    """(/metrics text, sample count per metric name: histogram/counter suffixes folded)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(url, timeout=10).read().decode()
    counts: dict[str, int] = {}
    for fam in text_string_to_metric_families(text):
        base = fam.name + ("_total" if fam.type == "counter" else "")
        counts[base] = counts.get(base, 0) + sum(1 for s in fam.samples if not s.name.endswith("_created"))
    return text, counts


async def _collect(bootstrap: str, done, deadline: float, alive) -> tuple[list[dict], list[dict]]:
    """Read chorus.attributions and chorus.alerts from the start until ``done(snaps, alerts)``."""
    import asyncio
    import time

    from stream.kafka import make_consumer
    from stream.schemas import TOPIC_ALERTS, TOPIC_ATTRIBUTIONS, loads

    consumer = make_consumer(bootstrap, TOPIC_ATTRIBUTIONS, TOPIC_ALERTS)
    await consumer.start()
    snaps, alerts = [], []
    try:
        while not done(snaps, alerts):
            assert time.monotonic() < deadline, "timed out waiting for the planted episode"
            alive()
            batch = await consumer.getmany(timeout_ms=500)
            for tp, msgs in batch.items():
                (snaps if tp.topic == TOPIC_ATTRIBUTIONS else alerts).extend(loads(m.value) for m in msgs)
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
    return snaps, alerts


@pytest.mark.timeout(RUN_LIMIT_S + 60)
def test_chorus_run_end_to_end(tmp_path):
    """One `chorus run` (embedded broker, synthetic relay, ingester, worker, operator): the planted
    episode shows in chorus.attributions and chorus.alerts, every metric is served, a second run is
    refused and SIGINT stops every part."""
    import asyncio
    import signal
    import time

    import psutil

    from stream.config import bootstrap_servers
    from stream.local.runner import RelayPart

    state = tmp_path / "state"
    rules = tmp_path / "alerts.yaml"
    rules.write_text(ALERT_RULES)
    env = run_env(state, CHORUS_WINDOW_S=str(WINDOW_S), CHORUS_HOP_S=str(HOP_S),
                  CHORUS_ALERTS_FILE=str(rules))
    out = (tmp_path / "run.out").open("wb")
    proc = subprocess.Popen(
        [*CHORUS, "run", "--profile", "demo", "--no-console", "--metrics-port", "0",
         "--synthetic", str(N_ACCOUNTS), "--seed", str(SEED), "--rate", str(RATE),
         "--duration", str(RUN_LIMIT_S)],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()

    def alive():
        assert proc.poll() is None, f"`chorus run` exited early ({proc.returncode}):\n{tail()}"

    def tail() -> str:
        logs = [tmp_path / "run.out", *sorted((state / "logs").glob("*.log"))]
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())

    try:
        note = None
        while not (note and "synthetic" in note):
            alive()
            assert time.monotonic() - started < 120, f"`chorus run` did not start:\n{tail()}"
            time.sleep(0.5)
            note = running_instance(state)
        # Ground truth: the same population the run's relay serves (synth.Population.episode_truth).
        syn = note["synthetic"]
        pop = RelayPart(syn["accounts"], syn["seed"], syn["rate"]).make_population()
        truth = pop.episode_truth()
        t_act = pop.activity_start_us(syn["start_time_us"])
        ep_start, ep_end = (t_act + truth["start_us"]) / 1e6, (t_act + truth["end_us"]) / 1e6
        participants, topic = set(truth["participants"]), truth["topic"]

        def during(s):  # a snapshot whose window overlaps the episode by at least a hop
            return ep_start + HOP_S <= s["window_end"] <= ep_end + HOP_S

        def episode_alert(a):  # a participant became a top culprit of the episode topic
            return (a["topic"] == topic and a["rule"] == "new_top_culprit" and during(a)
                    and any(c["did"] in participants for c in a["evidence"]["culprits"]))

        def done(snaps, alerts):
            return (any(s["window_end"] > ep_end + HOP_S for s in snaps)
                    and any(episode_alert(a) for a in alerts))

        snaps, alerts = asyncio.run(_collect(bootstrap_servers(note["kafka"]), done,
                                             started + RUN_LIMIT_S - 20, alive))

        # Completeness: sum(phi) = F(x) - F(b) to 1e-4 relative, on every snapshot with a signal.
        assert snaps
        for s in snaps:
            delta = abs(s["value"] - s["baseline_value"])
            if delta > 1e-9:
                assert abs(s["completeness_residual"]) <= 1e-4 * delta, s

        # The plant, full scale vs panel: the participants (follower rank 1%-100%, posting with one
        # stance) carry most of the episode topic's polarization; the visibility panel (the 100
        # accounts with most followers, all above rank 5%) cannot see them at all.
        ep = [s for s in snaps if s["topic"] == topic and s["indicator"] == "polarization" and during(s)]
        assert ep, "no polarization snapshot of the episode topic during the episode"
        for s in ep[-2:]:
            m = s["band_mass"]  # polarization has both signs: the tail's share of the absolute mass
            full = sum(m["positive_mass"] * m["positive"][b] + m["negative_mass"] * m["negative"][b]
                       for b in TAIL_BANDS) / (m["positive_mass"] + m["negative_mass"])
            panel = sum(s["panel"]["bands"].get(b, 0.0) for b in TAIL_BANDS)
            assert full > 0.5 and abs(panel) < 1e-6 and s["panel"]["tvd"] >= 0.3, s
        # ... and it is the episode topic that they drive: participants fill its top-10 culprits
        # during the episode far more than any other topic's (same accounts, background activity).
        def participants_in_top(t: str) -> int:
            return sum(d["did"] in participants for s in snaps if s["topic"] == t
                       and s["indicator"] == "polarization" and during(s) for d in s["top"])
        counts = {t: participants_in_top(t) for t in {s["topic"] for s in snaps}}
        others = [c for t, c in counts.items() if t != topic]
        assert counts[topic] > max(others) and counts[topic] >= 2 * sum(others) / len(others), counts

        # Metrics: every name in DESIGN.md is served, with samples (invalid frames only if any).
        text, counts = served_samples(note["metrics"])
        names = sorted(design_metric_names())
        unserved = [n for n in names if f"# HELP {n.removesuffix('_total')}" not in text and f"# HELP {n}" not in text]
        assert not unserved, unserved
        empty = [n for n in names if counts.get(n, 0) == 0 and n not in FAULT_ONLY]
        assert not empty, f"metrics with no samples: {empty}"

        # A second run is refused while this one runs.
        r = chorus("run", "--no-console", "--metrics-port", "0", "--duration", "1", env=env)
        assert r.returncode != 0 and "already running" in r.stderr and r.stderr.count("\n") == 1, r.stderr

        # Ctrl-C: every part stops, in order, and the run exits 0.
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, tail()
        gone, alive_children = psutil.wait_procs(children, timeout=10)
        assert not alive_children, alive_children
        assert running_instance(state) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

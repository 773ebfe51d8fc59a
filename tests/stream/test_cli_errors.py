"""Start-up errors of `chorus run`, `operator`, `alerts` and `backfill` found by a new-user trial
(the backfill cases against a real embedded broker, which refuses idempotent producers):
each is one ``chorus: error: ...`` line on stderr (no traceback) with its exit status, and for
`chorus run` nothing is started first (no broker, no state written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.local.broker import free_port as closed_port  # a loopback port nothing listens on
from tests.helpers.cli import invoke

ROOT = Path(__file__).resolve().parents[2]


def one_error_line(stderr: str) -> str:
    """The ``chorus: error:`` line, asserting there is exactly one and no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("chorus: error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def test_operator_with_unreachable_kafka_is_one_line(tmp_path):
    port = closed_port()
    r = invoke(["operator", "--kafka", f"kafka://127.0.0.1:{port}", "--metrics-port", "0"],
               env={"CHORUS_STATE_DIR": str(tmp_path)})
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert line.startswith(f"chorus: error: cannot reach Kafka at kafka://127.0.0.1:{port}"), line


def test_alerts_with_an_unknown_rule_is_one_line_listing_the_rules(tmp_path):
    from operators.service.alerts import RULE_NAMES

    r = invoke(["alerts", "--from-beginning", "--rule", "new_top_culpritt",
                "--kafka", f"kafka://127.0.0.1:{closed_port()}"], env={"CHORUS_STATE_DIR": str(tmp_path)})
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "unknown rule 'new_top_culpritt'" in line
    assert all(name in line for name in RULE_NAMES), line


def test_run_refuses_a_bad_alerts_file_or_indicator_before_starting_anything(tmp_path):
    state = tmp_path / "state"
    bad_key = tmp_path / "alerts.yaml"
    bad_key.write_text("rules:\n  new_top_culpritt:\n    threshold: 1\n")
    bad_threshold = tmp_path / "alerts2.yaml"
    bad_threshold.write_text("rules:\n  band_shift:\n    min_shift: -3\n")
    cases = [
        ({"CHORUS_ALERTS_FILE": str(bad_key)}, "unknown alert rule(s): new_top_culpritt"),
        ({"CHORUS_ALERTS_FILE": str(bad_threshold)}, "must be a finite number >= 0"),
        ({"CHORUS_INDICATORS": '["cascade_reach","nope"]'}, "unknown indicator(s) nope; known: "),
        ({"CHORUS_INDICATORS": "[]"}, "no indicator configured"),
    ]
    for env, expected in cases:
        r = invoke(["run", "--no-console", "--duration", "5", "--metrics-port", "0"],
                   env={"CHORUS_STATE_DIR": str(state), **env})
        assert r.returncode == 2, (env, r.stderr)
        line = one_error_line(r.stderr)
        assert expected in line, (env, line)
        assert not state.exists(), "chorus run started something before refusing its settings"


def test_backfill_names_a_refused_idempotent_producer_and_uses_a_running_runs_broker(fresh_broker, tmp_path):
    graph = tmp_path / "g.csv"
    graph.write_text("follower,followed\n" + "".join(
        f"did:plc:{a * 24},did:plc:{b * 24}\n" for a, b in (("a", "b"), ("b", "c"))))
    env = {"CHORUS_STATE_DIR": str(tmp_path / "state"), "CHORUS_METRICS_PORT": "0"}
    # an explicit --kafka with idempotence on (the default): the line names the cause and the fix
    r = invoke(["backfill", "--no-progress", "--graph-file", str(graph), "--kafka", fresh_broker.url], env=env)
    assert r.returncode == 1, r.stderr
    line = one_error_line(r.stderr)
    assert "refused an idempotent producer" in line and "CHORUS_KAFKA_IDEMPOTENCE=false" in line, line
    # the documented default target: a running `chorus run` (its note in the state dir) on its
    # embedded broker; the backfill then produces without idempotence, as the run's own parts do
    from stream.local.runner import RunLock

    lock = RunLock(tmp_path / "state").acquire()
    try:
        lock.write({"pid": 1, "kafka": fresh_broker.url, "embedded": True})
        r = invoke(["backfill", "--no-progress", "--graph-file", str(graph)], env=env)
    finally:
        lock.release()
    assert r.returncode == 0, r.stderr
    assert "chorus backfill: 2 follow pairs" in r.stderr, r.stderr
    # the same broker named with --kafka (what `chorus run` prints): still the run's embedded one
    lock = RunLock(tmp_path / "state").acquire()
    try:
        lock.write({"pid": 1, "kafka": fresh_broker.url, "embedded": True})
        r = invoke(["backfill", "--no-progress", "--restart", "--graph-file", str(graph),
                    "--kafka", fresh_broker.url], env=env)
    finally:
        lock.release()
    assert r.returncode == 0, r.stderr
    assert "chorus backfill: 2 follow pairs" in r.stderr, r.stderr


def test_a_list_setting_that_is_not_json_is_one_line(tmp_path):
    """CHORUS_ALLOW_NETS / CHORUS_INDICATORS are JSON lists (README "Settings"); a bare value was a
    pydantic-settings traceback in every command."""
    cases = [(["alerts", "--limit", "1", "--kafka", f"kafka://127.0.0.1:{closed_port()}"],
              {"CHORUS_ALLOW_NETS": "10.0.0.0/8"}, "allow_nets (CHORUS_ALLOW_NETS): '10.0.0.0/8' is not valid JSON"),
             (["run", "--no-console", "--duration", "5", "--metrics-port", "0"],
              {"CHORUS_INDICATORS": "cascade_reach"}, "indicators (CHORUS_INDICATORS): 'cascade_reach' is not valid JSON")]
    for args, env, expected in cases:
        r = invoke(args, env={"CHORUS_STATE_DIR": str(tmp_path / "state"), **env})
        assert r.returncode == 2, (env, r.stderr)
        assert expected in one_error_line(r.stderr), (env, r.stderr)
    assert not (tmp_path / "state").exists()


def test_run_refuses_a_bad_topics_file_or_state_dir_before_starting_anything(tmp_path):
    state = tmp_path / "state"
    r = invoke(["run", "--no-console", "--duration", "5", "--metrics-port", "0"],
               env={"CHORUS_STATE_DIR": str(state), "CHORUS_TOPICS_FILE": str(tmp_path / "missing.json")})
    assert r.returncode == 2, r.stderr  # before: the worker exited 2 at every restart, the run went on
    assert "topics file not found" in one_error_line(r.stderr)
    assert not state.exists(), "chorus run started something before refusing its settings"
    a_file = tmp_path / "state-file"
    a_file.write_text("")
    r = invoke(["run", "--no-console", "--duration", "5", "--metrics-port", "0"],
               env={"CHORUS_STATE_DIR": str(a_file)})
    assert r.returncode == 2, r.stderr
    assert f"cannot use the state directory {a_file} (CHORUS_STATE_DIR)" in one_error_line(r.stderr)


def test_report_closes_its_consumer_when_kafka_is_unreachable(monkeypatch):
    """`chorus report --kafka` at a closed port: the error line, then aiokafka's "Unclosed
    AIOKafkaConsumer" warning, because a consumer whose start() failed was never stopped."""
    import asyncio

    import stream.kafka
    from stream.offline.report import fetch_snapshots
    from stream.process import is_kafka_error

    made = []
    real = stream.kafka.make_consumer
    monkeypatch.setattr(stream.kafka, "make_consumer", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    raised = False
    try:
        asyncio.run(fetch_snapshots(f"127.0.0.1:{closed_port()}", timeout_s=5))
    except Exception as exc:
        raised = is_kafka_error(exc)
    assert raised and len(made) == 1
    assert made[0]._closed, "the consumer that failed to start was left open"


def test_run_and_analyze_cap_the_synthetic_population_before_building_it(tmp_path):
    """`chorus run --synthetic 10000000` built the population in memory until the kernel's OOM
    killer stopped it (24 GiB); the relay's cap (stream.cli.RELAY_SYNTHETIC_MAX) applies to all three."""
    from stream.cli import RELAY_SYNTHETIC_MAX

    too_many = str(RELAY_SYNTHETIC_MAX + 1)
    for args in (["run", "--no-console", "--duration", "5", "--metrics-port", "0", "--synthetic", too_many],
                 ["analyze", "--synthetic", too_many, "-o", str(tmp_path / "s.jsonl")],
                 ["relay", "--synthetic", too_many]):
        r = invoke(args, env={"CHORUS_STATE_DIR": str(tmp_path / "state")})
        assert r.returncode == 2, (args, r.stderr)
        line = one_error_line(r.stderr)
        assert "--synthetic" in line and f"{RELAY_SYNTHETIC_MAX}" in line.replace(",", ""), line
    assert not (tmp_path / "state").exists() and not (tmp_path / "s.jsonl").exists()


def test_record_refuses_negative_flags_before_connecting(tmp_path):
    url = f"ws://127.0.0.1:{closed_port()}/xrpc"  # the flags are refused before any connection
    for flag, value in (("--limit", "-1"), ("--limit", "0"), ("--cursor", "-3"), ("--duration", "-1")):
        r = invoke(["record", url, str(tmp_path / "f.rec"), flag, value])
        assert r.returncode == 2, (flag, r.stderr)
        assert f"Invalid value for '{flag}'" in one_error_line(r.stderr), (flag, r.stderr)
    assert not (tmp_path / "f.rec").exists()


@pytest.mark.parametrize("command", [["operator", "--metrics-port", "0"], ["alerts"], ["report", "-o", "out"], ["worker"]])
def test_unreachable_kafka_prints_no_client_log_noise(command, tmp_path):
    """As a process (its real log handlers): the one error line and nothing from aiokafka's failed
    dials or JAX's search for accelerator plugins (a new user saw both before the error)."""
    import os
    import subprocess
    import sys

    port = closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    env["CHORUS_STATE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-m", "stream.cli", *command, "--kafka", f"kafka://127.0.0.1:{port}"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 1, r.stderr
    assert one_error_line(r.stderr).startswith(f"chorus: error: cannot reach Kafka at kafka://127.0.0.1:{port}")
    assert "Unable connect" not in r.stderr and "Unclosed" not in r.stderr, r.stderr
    assert "Unable to initialize backend" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_relay_with_a_missing_recording_is_one_line(tmp_path):
    r = invoke(["relay", "--recording", str(tmp_path / "nope.rec")])
    assert r.returncode != 0
    assert one_error_line(r.stderr) == f"chorus: error: cannot read {tmp_path / 'nope.rec'}: No such file or directory"


def test_run_duration_and_worker_idle_flush_are_range_checked(tmp_path):
    """`chorus run --duration 0` used to start every part and stop at once with rc 0; a negative
    `chorus worker --idle-flush` was accepted (new-user trial). Both: usage error, exit 2."""
    state = tmp_path / "state"
    r = invoke(["run", "--no-console", "--duration", "0"], env={"CHORUS_STATE_DIR": str(state)})
    assert r.returncode == 2 and "--duration must be > 0" in one_error_line(r.stderr), r.stderr
    assert not state.exists()
    r = invoke(["worker", "--idle-flush", "-3", "--kafka", "kafka://127.0.0.1:1"])
    assert r.returncode == 2 and "--idle-flush" in r.stderr, r.stderr


def test_analyze_refuses_the_same_file_for_snapshots_and_agents(tmp_path):
    """`-o X --agents X` would overwrite the snapshots with the per-agent rows (rc 0 before)."""
    out = tmp_path / "r.parquet"
    r = invoke(["analyze", "--synthetic", "50", "-o", str(out), "--agents", str(tmp_path / "." / "r.parquet"),
                "--no-progress"], env={"CHORUS_STATE_DIR": str(tmp_path / "state")})
    assert r.returncode == 2, r.stderr
    assert "same file" in one_error_line(r.stderr)
    assert not out.exists()

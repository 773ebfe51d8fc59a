"""Start-up errors of the `chorus` entry point (`chorus relay`, usage errors, settings): each is one line `chorus: error: ...`
and exit status 2, before any work starts (README "Contracts", CLI)."""

from __future__ import annotations

import pytest

from tests.helpers.cli import invoke


def one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chorus: error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


@pytest.mark.parametrize("args, names", [
    (["--port", "70000"], "--port"),
    (["--port", "-1"], "--port"),
    (["--synthetic", "100000000000"], "--synthetic"),
    (["--synthetic", "0"], "--synthetic"),
    (["--speed", "nan"], "--speed"),
    (["--speed", "0"], "--speed"),
    (["--rate", "inf"], "--rate"),
    (["--start-us", "-1"], "--start-us"),
])
def test_relay_refuses_out_of_range_flags(args, names):
    line = one_line_error(invoke(["relay", *args]))
    assert names in line


def test_relay_refuses_rate_and_speed_together():
    """--rate paces by count, --speed by the frames' own times: one pace at a time."""
    line = one_line_error(invoke(["relay", "--synthetic", "100", "--rate", "10", "--speed", "2"]))
    assert "--rate" in line and "--speed" in line and "not both" in line


@pytest.mark.parametrize("args, says", [
    (["run", "--bogus"], "No such option: --bogus"),
    (["relay", "--synthetic", "abc"], "'--synthetic'"),
    (["analyze", "--steps", "0"], "'--steps'"),
    (["run", "--duration", "nan"], "'--duration'"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_usage_errors_are_one_line(args, says):
    """Click usage errors: one line, not typer's boxed panel (README: bad flags give one line)."""
    line = one_line_error(invoke(args))
    assert says in line and "╭" not in line


def test_help_is_still_typers_own():
    r = invoke(["relay", "--help"])
    assert r.returncode == 0 and "--synthetic" in r.stdout and "chorus: error" not in r.stderr


def test_a_setting_without_a_flag_on_the_command_names_only_its_variable(tmp_path):
    env = {"CHORUS_STATE_DIR": str(tmp_path)}
    line = one_line_error(invoke(["run", "--duration", "1"], env={**env, "CHORUS_PARTITIONS_CHORUS_EVENTS": "0"}))
    assert "CHORUS_PARTITIONS_CHORUS_EVENTS" in line and "--partitions-chorus-events" not in line
    line = one_line_error(invoke(["run", "--duration", "1"], env={**env, "CHORUS_WINDOW_S": "5"}))
    assert "CHORUS_WINDOW_S" in line and "--window-s" not in line and "--hop-s" not in line
    line = one_line_error(invoke(["run", "--duration", "1"], env={**env, "CHORUS_METRICS_PORT": "abc"}))
    assert "flag --metrics-port or CHORUS_METRICS_PORT" in line

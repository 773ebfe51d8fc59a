"""Start-up errors of the `chorus` entry point: each bad flag is one line `chorus: error: ...`
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

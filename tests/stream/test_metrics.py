"""stream.metrics: ages of state that does not exist yet read NaN, never a false "fresh" 0."""

from __future__ import annotations

import subprocess
import sys


def test_checkpoint_and_snapshot_ages_are_nan_before_the_first_one():
    # a fresh interpreter: in this one other tests may have set the gauges already
    code = ("from prometheus_client import generate_latest\nimport stream.metrics\n"
            "print(generate_latest().decode())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    samples = dict(line.rsplit(" ", 1) for line in r.stdout.splitlines() if line and not line.startswith("#"))
    assert samples["chorus_operator_snapshot_age_seconds"] == "NaN"
    assert samples["chorus_worker_checkpoint_age_seconds"] == "NaN"


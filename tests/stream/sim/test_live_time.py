"""The synthetic relay's event time never runs ahead of the wall clock (new-user trial: `chorus relay
--rate 200` served commits ~50 min in the future, and `chorus analyze` of its recording skipped most
of them as time_ahead). Default placement: :func:`stream.sim.relay.live_start_us`."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stream.config import Settings
from stream.offline.analyze import analyze, recording_source
from stream.sim.relay import live_start_us
from stream.sim.synth import Population
from tests.helpers.cli import invoke
from tests.helpers.synth_truth import expected_events

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[3]
N, SEED = 300, 3


@pytest.mark.parametrize("graph_on_firehose", [False, True])
def test_frame_offsets_are_the_frames_times(graph_on_firehose):
    pop = Population(N, SEED, graph_on_firehose=graph_on_firehose)
    start = 1_700_000_000_000_000
    times = np.array([t for _, t, _ in pop.timed_frames(start_time_us=start)], dtype=np.int64)
    assert np.array_equal(pop.frame_offsets_us(), times - start)


@pytest.mark.parametrize("rate, speed", [(None, None), (2000.0, None), (0.01, None), (None, 1.0),
                                         (None, 4.0), (None, 0.5), (500.0, 3.0)])
def test_no_frame_is_served_before_its_time_and_the_bound_is_tight(rate, speed):
    off = Population(N, SEED).frame_offsets_us()
    now = 1_800_000_000_000_000
    start = live_start_us(off, now, rate, speed)
    i = np.arange(off.size)
    delay = np.zeros(off.size)  # the relay's pacing clock (Relay._produce_paced), us after it starts
    if rate:
        delay = np.maximum(delay, i / rate * 1e6)
    if speed:
        delay = np.maximum(delay, (off - off[0]) / speed)
    ahead_us = (start + off) - (now + delay)  # event time minus the earliest wall time it is served
    assert ahead_us.max() <= 0 and ahead_us.max() > -2  # never ahead, and not pushed back further
    if rate is None and speed is None:
        assert start + off[-1] == now  # unpaced: every frame is already published, the last one now


def _serve(args: list[str]) -> tuple[subprocess.Popen, str, int]:
    """`chorus relay ARGS` as a subprocess: (process, its base URI, last seq)."""
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "relay", *args, "--port", "0"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"at (ws://\S+/xrpc) \(last seq (\d+)\)", line)
        if m:
            return proc, m.group(1), int(m.group(2))
        assert line or proc.poll() is None, "chorus relay exited before serving"
    proc.kill()
    raise AssertionError("chorus relay did not start")


@pytest.mark.parametrize("pacing", [["--rate", "2000"], []], ids=["rate-2000", "unpaced"])
def test_a_recording_of_the_synthetic_relay_loses_nothing_to_time_ahead(pacing, tmp_path):
    proc, url, last = _serve(["--synthetic", str(N), "--seed", str(SEED), *pacing])
    try:
        rec = tmp_path / "relay.chorusrec"
        r = invoke(["record", url, str(rec), "--limit", str(last)])
        assert r.returncode == 0, r.stderr
    finally:
        proc.terminate()
        proc.wait(10)
    pop = Population(N, SEED)
    assert last == pop.expected()["frames"]
    res = analyze(recording_source(rec), Settings(window_s=600, hop_s=300), progress=False)
    assert "time_ahead" not in res.invalid, res.invalid
    # every event of every frame, kept: one per commit op (the oracle) and one per #account frame
    assert res.events == sum(1 for _ in expected_events(pop)) + pop.expected()["account"]
    assert res.hops > 0

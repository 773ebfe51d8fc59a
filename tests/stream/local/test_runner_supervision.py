"""`chorus run` keeps going when a part dies: the part is restarted with exponential backoff, the
restart is counted, and only a fatal part (the embedded broker) stops the run."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
from prometheus_client import REGISTRY

from stream.config import Settings
from stream.local.runner import ProcPart, RunOptions, Runner, TaskPart

pytestmark = pytest.mark.timeout(120)


class Flaky:
    """run() fails the first ``fails`` times (counted across instances), then runs until stop()."""

    starts: list[float] = []

    def __init__(self, fails: int):
        self.fails = fails
        self._stop = asyncio.Event()

    async def run(self) -> None:
        Flaky.starts.append(time.monotonic())
        if len(Flaky.starts) <= self.fails:
            raise RuntimeError("boom")
        await self._stop.wait()

    async def stop(self) -> None:
        self._stop.set()


def restarts(part):
    return REGISTRY.get_sample_value("chorus_run_part_restarts_total", {"part": part}) or 0.0


def test_a_dying_part_is_restarted_with_backoff_and_the_run_goes_on(tmp_path):
    Flaky.starts = []
    # a subprocess part that exits with code 3 the first time and then stays up
    marker = tmp_path / "ran-once"
    script = (f"import pathlib, sys, time; p = pathlib.Path({str(marker)!r})\n"
              "if not p.exists(): p.touch(); sys.exit(3)\n"
              "time.sleep(600)\n")
    runner = Runner(Settings(state_dir=tmp_path), RunOptions(restart_backoff_s=0.2, max_restart_backoff_s=5))
    flaky = TaskPart("operator", lambda: Flaky(fails=3))
    proc = ProcPart("worker", [sys.executable, "-c", script], {}, tmp_path / "worker.log")
    before = restarts("operator"), restarts("worker")

    async def main():
        for p in (flaky, proc):
            runner.parts.append(p)
            await p.start()
        try:
            await runner.wait(duration_s=6.0, poll_s=0.05)
        finally:
            await runner.stop()

    asyncio.run(main())
    assert runner.failed is None
    assert runner.restarts == {"operator": 3, "worker": 1}
    assert (restarts("operator") - before[0], restarts("worker") - before[1]) == (3, 1)
    gaps = [b - a for a, b in zip(Flaky.starts, Flaky.starts[1:])]
    assert len(gaps) == 3
    for gap, delay in zip(gaps, (0.2, 0.4, 0.8)):  # exponential backoff between the restarts
        assert delay <= gap < delay + 1.0


def test_a_dead_broker_stops_the_run(tmp_path):
    class DeadBroker:
        name = "broker"

        async def start(self): ...

        async def stop(self): ...

        def failure(self):
            return "embedded broker exited with code 1"

    runner = Runner(Settings(state_dir=tmp_path), RunOptions(restart_backoff_s=0.1))

    async def main():
        runner.parts.append(DeadBroker())
        await runner.wait(duration_s=5.0, poll_s=0.05)

    t0 = time.monotonic()
    asyncio.run(main())
    assert runner.failed == "embedded broker exited with code 1" and time.monotonic() - t0 < 2

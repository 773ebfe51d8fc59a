"""`chorus run --process ingester --process operator`: the ingester and the operator run as their
own processes, as docker-compose.yml runs them. The events on chorus.events are exactly the
synthetic population's (its own plan is the truth), the merged /metrics carries the children's
families, the operator process publishes attributions, and both children exit cleanly with the run."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream.config import Settings
from stream.kafka import make_consumer
from stream.local.runner import RunError, RunOptions, Runner
from stream.schemas import TOPIC_ATTRIBUTIONS
from tests.helpers.synth_truth import expected_events
from tests.stream.ingest.test_ingest import canon, consume_all, split

pytestmark = pytest.mark.timeout(180)


def _scrape(url: str) -> dict[str, float]:
    """{sample name: value summed over labels} of a /metrics endpoint."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(urllib.request.urlopen(url, timeout=5).read().decode()):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def test_ingester_and_operator_as_their_own_processes(tmp_path):
    start_us = int((time.time() - 120) * 1e6)  # event time in the past: nothing clamped
    settings = Settings(state_dir=tmp_path / "state", metrics_port=0, profile="demo", window_s=20, hop_s=5,
                        indicators=["volume"])
    runner = Runner(settings, RunOptions(synthetic=300, seed=3, rate=100.0, speed=4.0, start_time_us=start_us,
                                         console=False, processes=("ingester", "operator"),
                                         relay_retention=5000))

    async def main():
        await runner.start()
        procs = {}
        try:
            pop = runner.part("relay").population
            assert runner.part("relay").relay.retention == 5000
            for name in ("ingester", "operator"):
                procs[name] = runner.part(name).proc
                assert procs[name].pid is not None and procs[name].returncode is None
            expected = Counter(canon(e) for e in expected_events(pop, start_time_us=start_us))
            n_accounts = pop.expected()["account"]
            values = await consume_all(runner.bootstrap, sum(expected.values()) + n_accounts, timeout=90)
            consumer = make_consumer(runner.bootstrap, TOPIC_ATTRIBUTIONS)
            await consumer.start()
            try:  # the operator process publishes (the worker's features reach it)
                deadline = time.monotonic() + 90
                got = []
                while not got and time.monotonic() < deadline:
                    for p in runner.parts:
                        assert p.failure() is None, p.failure()
                    got = [m for ms in (await consumer.getmany(timeout_ms=500)).values() for m in ms]
                assert got, "no attribution from the operator process"
            finally:
                await consumer.stop()
            metrics = await asyncio.to_thread(_scrape, runner.metrics.url)
            produced = runner.part("relay").relay.produced
        finally:
            await runner.stop()
        return values, expected, n_accounts, procs, metrics, produced

    values, expected, n_accounts, procs, metrics, produced = asyncio.run(main())
    recs, accts = split(values)
    assert recs == expected  # every event once, nothing lost, nothing twice
    assert sum(accts.values()) == n_accounts
    # the children's families reach the run's one endpoint
    assert metrics["chorus_ingest_frames_total"] == produced
    assert metrics["chorus_ingest_skipped_frames_total"] == 0 and metrics["chorus_ingest_outdated_cursor_total"] == 0
    assert metrics["chorus_operator_agents"] > 0  # only the operator process sets it
    # both stopped with the run, cleanly (SIGTERM -> their own shutdown -> exit 0)
    assert {name: p.returncode for name, p in procs.items()} == {"ingester": 0, "operator": 0}
    log = (tmp_path / "state" / "logs" / "ingester.log").read_text()
    assert "ingester stopped at cursor" in log


def test_unknown_process_part_is_refused(tmp_path):
    with pytest.raises(RunError, match="cannot run worker as its own process"):
        Runner(Settings(state_dir=tmp_path), RunOptions(processes=("worker",)))

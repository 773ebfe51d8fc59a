"""A restore that fails (Kafka unreachable mid-replay, a broken read) is logged and retried while
the assignment holds: the worker never waits silently for a restore that died."""

from __future__ import annotations

import asyncio
import logging

import pytest

from stream.worker import faust_app
from tests.stream.worker.test_worker import EVENTS, EXPECTED, collect, final, matches, produce, stop, wait_assigned
from tests.stream.worker.test_worker_restore import settings, start

pytestmark = pytest.mark.timeout(240)


def test_a_failed_restore_is_logged_and_retried_until_the_state_is_back(fresh_broker, tmp_path, monkeypatch, caplog):
    real_replay, failing = faust_app.replay, {"left": 2}

    async def broken_replay(*args, **kw):
        if failing["left"]:
            failing["left"] -= 1
            raise ConnectionError("broker went away mid-replay")
        return await real_replay(*args, **kw)

    monkeypatch.setattr(faust_app, "replay", broken_replay)
    s = settings(fresh_broker, tmp_path, interval=0)

    async def main():
        await faust_app.ensure_worker_topics(s)
        await produce(fresh_broker, EVENTS[:6])
        w, task = start(s)
        await wait_assigned([w], [task])
        while not w.pipeline.ready:  # two failed restores (1 s, then 2 s of backoff), then one that works
            await asyncio.sleep(0.1)
        await produce(fresh_broker, EVENTS[6:])
        out = await collect(fresh_broker, EXPECTED)
        await stop([w], [task])
        return out

    with caplog.at_level(logging.ERROR):
        feats, _, _ = asyncio.run(main())
    assert failing["left"] == 0
    assert sum("restoring the window state failed (ConnectionError" in r.getMessage() for r in caplog.records) == 2
    assert matches(final(feats), EXPECTED), final(feats)

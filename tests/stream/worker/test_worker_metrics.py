"""chorus_window_agents never reads a false zero: absent while the worker's state is being rebuilt
(a replay after a start, restart or rebalance), the store's counts once it is."""

from __future__ import annotations

import json

from prometheus_client import REGISTRY

from stream.config import Settings
from stream.worker.faust_app import Pipeline
from tests.stream.worker.test_worker import EVENTS, HOP


def agents(topic):
    return REGISTRY.get_sample_value("chorus_window_agents", {"topic": topic})


def test_window_agents_absent_until_the_state_is_rebuilt():
    pipe = Pipeline(Settings(window_s=3 * HOP, hop_s=HOP), 4)
    pipe.forget_metrics()  # as a partition assignment does before its replay
    for e in EVENTS:
        pipe.on_event(json.dumps(e).encode(), owned={0, 1, 2, 3})
    pipe.update_metrics()
    assert [agents(t) for t in pipe.topics] == [None] * len(pipe.topics)  # replaying: unknown, not 0
    pipe.ready = True
    pipe.update_metrics()
    assert {t: agents(t) for t in pipe.topics} == {t: float(pipe.store.agents.get(t, 0)) for t in pipe.topics}
    assert agents("climate") == 2  # S posted, B reposted (tests/stream/worker/test_worker.py)
    pipe.forget_metrics()  # the next rebalance
    assert [agents(t) for t in pipe.topics] == [None] * len(pipe.topics)

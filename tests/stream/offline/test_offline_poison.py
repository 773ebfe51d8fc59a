"""Poison records on the topics the offline tools read (`chorus report --kafka`, `chorus alerts`):
skipped and counted with their reason; every valid record is still read."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid

import pytest
from prometheus_client import REGISTRY

from stream.kafka import ensure_topics, make_producer
from stream.offline import report as offline_report
from stream.offline.alerts_tail import follow
from stream.schemas import TOPIC_ALERTS, Alert, AttributionSnapshot

pytestmark = pytest.mark.timeout(120)

FAR = int(time.time()) + 30 * 365 * 86400


def snap(end, value=1.0):
    return AttributionSnapshot(topic="t", indicator="volume", window_end=end, value=value, baseline_value=0.0,
                       completeness_residual=0.0, n_agents=1, bands={"bottom50": 1.0}, panel={},
                       top=[{"did": "did:plc:a", "share": 1.0, "followers": 3}])


def alert(end):
    return Alert(id=f"a{end}", rule="new_top_culprit", topic="t", indicator="volume", window_end=end,
                 severity="warning", summary=f"culprit at {end}", evidence={})


def mutate(model, **kw):
    return json.dumps({**json.loads(model.to_bytes()), **kw}).encode()


def rejected(topic, reason):
    return REGISTRY.get_sample_value("chorus_records_rejected_total", {"topic": topic, "reason": reason}) or 0.0


async def publish(bootstrap, topic, values):
    await ensure_topics(bootstrap, {topic: 1})
    p = make_producer(bootstrap, idempotence=False)
    await p.start()
    try:
        for v in values:
            await p.send_and_wait(topic, v, key=b"k")
    finally:
        await p.stop()


POISON_SNAPS = [
    (b'{"v":1,"topic":"t","indicator":"volume","window_end":60,"value":NaN,"baseline_value":0,'
     b'"completeness_residual":0,"n_agents":1,"bands":{},"panel":{},"top":[]}', "non_finite"),
    (mutate(snap(60), window_end=FAR), "time_ahead"),
    (mutate(snap(60), n_agents=-1), "out_of_range"),
    (mutate(snap(60), top=[{"did": "did:plc:a", "share": "big"}]), "shape"),
    (b"not json", "json"),
]


def test_report_skips_and_counts_poison_snapshots(broker):
    topic = f"test-poison-attributions-{uuid.uuid4().hex[:8]}"
    good = [snap(60), snap(120, 2.0)]
    values = [good[0].to_bytes()] + [v for v, _ in POISON_SNAPS] + [good[1].to_bytes()]
    asyncio.run(publish(broker.bootstrap, topic, values))
    got = asyncio.run(offline_report.fetch_snapshots(broker.bootstrap, topic=topic))
    assert got == good
    assert {r: rejected(topic, r) for _, r in POISON_SNAPS} == {r: 1.0 for _, r in POISON_SNAPS}


def test_alerts_tail_skips_and_counts_poison_alerts(fresh_broker):
    before = {r: rejected(TOPIC_ALERTS, r) for r in ("time_ahead", "type", "json")}
    values = [mutate(alert(60), window_end=FAR), alert(60).to_bytes(), mutate(alert(90), severity="loud"),
              b"\xff", alert(120).to_bytes()]
    asyncio.run(publish(fresh_broker.bootstrap, TOPIC_ALERTS, values))
    out = io.StringIO()
    n = asyncio.run(asyncio.wait_for(follow(fresh_broker.bootstrap, from_beginning=True, as_json=True, limit=2,
                                            out=out), 60))
    assert n == 2 and [json.loads(line)["id"] for line in out.getvalue().splitlines()] == ["a60", "a120"]
    assert {r: rejected(TOPIC_ALERTS, r) - before[r] for r in before} == {"time_ahead": 1, "type": 1, "json": 1}

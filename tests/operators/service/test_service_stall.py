"""A broker frozen (SIGSTOP) for longer than the Kafka request timeout while the operator publishes
a hop: the operator keeps running, says it is waiting, and delivers every snapshot once the
broker is back; the next hop follows as usual."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import REGISTRY

from operators.service.service import OperatorService
from stream.config import Settings
from stream.kafka import ensure_topics
from stream.schemas import TOPIC_ATTRIBUTIONS, AttributionSnapshot
from tests.helpers.stall import Freezer
from tests.operators.service.test_service import HOP1, QUIET, check_hop1, collect, complete, edges, features, last, \
    produce

pytestmark = pytest.mark.timeout(240)

REQUEST_TIMEOUT_S = 2.0
FREEZE_S = 3 * REQUEST_TIMEOUT_S


def gauge(name, **labels):
    return REGISTRY.get_sample_value(name, labels)


def test_operator_rides_out_a_broker_stall_mid_publish(fresh_broker, caplog):
    bootstrap = fresh_broker.bootstrap
    s = Settings(kafka=fresh_broker.url, kafka_idempotence=False, indicators=["volume", "cascade_reach"],
                 hop_s=10, window_s=60, kafka_request_timeout_s=REQUEST_TIMEOUT_S)
    freezer = Freezer(fresh_broker, FREEZE_S)
    retries0 = gauge("chorus_kafka_send_retries_total", stage="operator") or 0.0
    seen_down = []

    class Frozen(OperatorService):
        def recompute(self, window_end=None):
            snaps = super().recompute(window_end)
            if snaps:
                freezer.freeze()  # the hop is computed; its publish meets a frozen broker
            return snaps

    async def watch():
        while True:
            seen_down.append(gauge("chorus_kafka_unavailable", stage="operator"))
            await asyncio.sleep(0.2)

    async def scenario():
        await ensure_topics(bootstrap)
        await produce(bootstrap, edges() + features(60, HOP1 + QUIET))
        svc = Frozen(s, steps=16, panel_k=2)
        task = asyncio.create_task(svc.run())
        watcher = asyncio.create_task(watch())
        try:
            hop1 = await collect(bootstrap, TOPIC_ATTRIBUTIONS, AttributionSnapshot, complete(60, 1, 7), timeout=120,
                                 task=task)
            assert freezer.frozen_s is not None and freezer.frozen_s >= FREEZE_S - 0.1
            await produce(bootstrap, features(120, HOP1[:2] + [("did:D", 1, [10, 0, 0, 0])], expired=["did:C"]))
            hop2 = await collect(bootstrap, TOPIC_ATTRIBUTIONS, AttributionSnapshot, complete(120, 1, 13), task=task)
            assert not task.done()
            await svc.stop()
            await asyncio.wait_for(task, 30)
        finally:
            watcher.cancel()
            freezer.close()
        return hop1, hop2

    with caplog.at_level(logging.WARNING, logger="chorus.kafka"):
        hop1, hop2 = asyncio.run(scenario())
    check_hop1([last(hop1, 60, "volume"), last(hop1, 60, "cascade_reach")])
    assert last(hop2, 120, "volume").value == pytest.approx(13)
    assert 1.0 in seen_down and seen_down[-1] == 0.0  # "cannot reach Kafka" was visible, then cleared
    assert (gauge("chorus_kafka_send_retries_total", stage="operator") or 0.0) > retries0
    waiting = [r.getMessage() for r in caplog.records if "cannot deliver to Kafka" in r.getMessage()]
    assert waiting and all("operator" in m for m in waiting)
    assert any("acknowledges again" in r.getMessage() for r in caplog.records)

"""A broker frozen (SIGSTOP) for longer than the Kafka request timeout while the worker publishes
its features: the worker keeps running, re-sends what was not acknowledged, and the features and
edges are exactly those of an undisturbed run."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import REGISTRY

from stream.config import Settings
from stream.schemas import TOPIC_FEATURES
from stream.worker.faust_app import Worker
from tests.helpers.stall import Freezer
from tests.stream.worker.test_worker import EVENTS, EXPECTED, HOP, check, collect, produce, stop, wait_assigned

pytestmark = pytest.mark.timeout(300)

REQUEST_TIMEOUT_S = 1.5
FREEZE_S = 6 * REQUEST_TIMEOUT_S


def test_worker_rides_out_a_broker_stall_mid_publish(fresh_broker, caplog):
    freezer = Freezer(fresh_broker, FREEZE_S)
    retries0 = REGISTRY.get_sample_value("chorus_kafka_send_retries_total", {"stage": "worker"}) or 0.0
    s = Settings(kafka=fresh_broker.url, kafka_idempotence=False, window_s=3 * HOP, hop_s=HOP,
                 kafka_request_timeout_s=REQUEST_TIMEOUT_S)

    async def main():
        w = Worker(s, idle_flush_s=1.0, rebalance_timeout_s=2.0)
        task = asyncio.create_task(w.run())
        try:
            await wait_assigned([w], [task])
            sender = w.pipeline.sender
            send = sender._send

            async def freezing_send(topic, *args):
                if topic == TOPIC_FEATURES:
                    freezer.freeze()  # the first features record meets a frozen broker
                return await send(topic, *args)

            sender._send = freezing_send
            await produce(fresh_broker, EVENTS)
            out = await collect(fresh_broker, EXPECTED, timeout=180)
            assert freezer.frozen_s is not None and freezer.frozen_s >= FREEZE_S - 0.1
            assert not task.done()
            return out
        finally:
            freezer.close()
            await stop([w], [task])

    with caplog.at_level(logging.WARNING, logger="chorus.kafka"):
        out = asyncio.run(main())
    retries = (REGISTRY.get_sample_value("chorus_kafka_send_retries_total", {"stage": "worker"}) or 0.0) - retries0
    check(*out, resent=retries > 0)
    # Whether the producer's own retries absorbed the stall or ReliableSender re-sent (aiokafka
    # keeps a batch whose leader is unreachable queued rather than failing it), nothing is left
    # waiting and "cannot reach Kafka" is cleared; a re-send is logged and counted.
    retries = (REGISTRY.get_sample_value("chorus_kafka_send_retries_total", {"stage": "worker"}) or 0.0) - retries0
    assert REGISTRY.get_sample_value("chorus_kafka_unavailable", {"stage": "worker"}) == 0.0
    logged = any("worker: cannot deliver to Kafka" in r.getMessage() for r in caplog.records)
    assert logged == (retries > 0)

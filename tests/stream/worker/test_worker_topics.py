"""A pre-made ops topic with another partition count than chorus's (it crashed the worker's first
publish with AssertionError('Unrecognized partition')): the worker says so in one line, routes its
ops over the partitions that exist, and computes exactly the same features."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream.config import Settings
from stream.topics import partitions
from stream.worker.faust_app import APP_ID
from tests.stream.worker.test_worker import EVENTS, EXPECTED, check, collect, produce, start_workers, stop

pytestmark = pytest.mark.timeout(180)

OPS = f"{APP_ID}-ops"


def test_premade_ops_topic_with_one_partition(fresh_broker, caplog):
    async def main():
        admin = AIOKafkaAdminClient(bootstrap_servers=fresh_broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(OPS, 1, 1)])
        finally:
            await admin.close()
        workers, tasks = await start_workers(fresh_broker, 1)
        try:
            assert workers[0].pipeline.partitions == 1
            await produce(fresh_broker, EVENTS)
            return await collect(fresh_broker, EXPECTED)
        finally:
            await stop(workers, tasks)

    with caplog.at_level(logging.WARNING, logger="chorus.kafka"):
        check(*asyncio.run(main()))
    lines = [r.getMessage() for r in caplog.records if r.name == "chorus.kafka"]
    creates = partitions(Settings(), OPS)  # the registry's count (the ops topic: as chorus.events)
    assert any(f"worker: topic {OPS} has 1 partition(s), chorus creates {creates}; chorus adapts to 1" in m
               for m in lines), lines

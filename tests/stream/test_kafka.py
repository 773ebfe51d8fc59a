"""stream.kafka: topics are created with their retention configs.

The embedded broker accepts CreateTopics with configs but does not serve DescribeConfigs, so the
broker-side check is that creation with configs succeeds and the topics work; the configs
themselves are checked on what ensure_topics sends.
"""

from __future__ import annotations

import asyncio

from stream.kafka import ensure_topics, make_consumer, topic_config
from stream.schemas import TOPIC_ALERTS, TOPIC_EVENTS, TOPIC_FEATURES, TOPIC_GRAPH

OPS = "chorus-worker-ops"


def test_retention_per_topic():
    def c(topic, window_s=600):
        return topic_config(topic, window_s)

    assert c(TOPIC_GRAPH) == c(TOPIC_GRAPH, None) == {"retention.ms": "-1"}  # follows: keep them all
    assert c(TOPIC_EVENTS) == c(OPS) == {"retention.ms": "1200000"}  # two 600 s windows
    assert c(TOPIC_FEATURES) == c(TOPIC_ALERTS) == {}  # the broker's default
    assert c(TOPIC_EVENTS, None) == c(OPS, None) == {}  # window unknown: the broker's default


def test_topics_with_configs_are_created_on_the_broker(fresh_broker):
    wanted = {TOPIC_EVENTS: 2, TOPIC_GRAPH: 3, TOPIC_FEATURES: 2, OPS: 2}

    async def go():
        await ensure_topics(fresh_broker.bootstrap, wanted, window_s=600)
        await ensure_topics(fresh_broker.bootstrap, wanted, window_s=600)  # idempotent
        consumer = make_consumer(fresh_broker.bootstrap)
        await consumer.start()
        try:
            return {t: consumer.partitions_for_topic(t) for t in wanted} if await consumer.topics() else {}
        finally:
            await consumer.stop()

    parts = asyncio.run(go())
    assert {t: len(p or ()) for t, p in parts.items()} == wanted

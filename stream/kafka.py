"""Kafka client factories shared by every component (aiokafka)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from stream.schemas import TOPIC_EVENTS, TOPIC_GRAPH, TOPIC_PARTITIONS

OPS_SUFFIX = "-ops"  # the worker's repartition topic is f"{app_id}-ops"


def make_producer(bootstrap: str, idempotence: bool = True, **kw) -> AIOKafkaProducer:
    """acks=all producer; idempotence off only where the broker lacks it (embedded)."""
    opts = dict(acks="all", enable_idempotence=idempotence, linger_ms=5, max_batch_size=256 * 1024)
    opts.update(kw)
    return AIOKafkaProducer(bootstrap_servers=bootstrap, **opts)


def make_consumer(bootstrap: str, *topics: str, group_id: str | None = None, **kw) -> AIOKafkaConsumer:
    opts = dict(auto_offset_reset="earliest", enable_auto_commit=group_id is not None)
    opts.update(kw)
    return AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=group_id, **opts)


def topic_config(topic: str, window_s: int | None = None) -> dict[str, str]:
    """The config chorus sets when it creates ``topic`` (existing topics are left alone).

    chorus.graph keeps every record (``retention.ms=-1``): follows are not windowed and the
    operator rebuilds the whole graph from it after a restart, so a broker-wide retention (the
    compose file's 48 h, Kafka's default 7 days) must not delete old follows. chorus.events and the
    worker's ops topic (``<app id>-ops``) hold 2 windows when the window is known (the worker
    replays chorus.events on every rebalance, so its retention bounds replay time). Others: {}.
    """
    if topic == TOPIC_GRAPH:
        return {"retention.ms": "-1"}
    if window_s and (topic == TOPIC_EVENTS or topic.endswith(OPS_SUFFIX)):
        return {"retention.ms": str(2 * int(window_s) * 1000)}
    return {}


async def ensure_topics(bootstrap: str, partitions: dict[str, int] | None = None,
                        window_s: int | None = None) -> None:
    """Create chorus topics that do not exist yet (replication factor 1), with
    :func:`topic_config`."""
    partitions = partitions or TOPIC_PARTITIONS
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(t, n, 1, topic_configs=topic_config(t, window_s))
               for t, n in partitions.items() if t not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()

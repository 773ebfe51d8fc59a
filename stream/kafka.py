"""Kafka client factories shared by every component (aiokafka)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from .schemas import TOPIC_PARTITIONS


def make_producer(bootstrap: str, idempotence: bool = True, **kw) -> AIOKafkaProducer:
    """acks=all producer; idempotence off only where the broker lacks it (embedded)."""
    opts = dict(acks="all", enable_idempotence=idempotence, linger_ms=5, max_batch_size=256 * 1024)
    opts.update(kw)
    return AIOKafkaProducer(bootstrap_servers=bootstrap, **opts)


def make_consumer(bootstrap: str, *topics: str, group_id: str | None = None, **kw) -> AIOKafkaConsumer:
    opts = dict(auto_offset_reset="earliest", enable_auto_commit=group_id is not None)
    opts.update(kw)
    return AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=group_id, **opts)


async def ensure_topics(bootstrap: str, partitions: dict[str, int] | None = None) -> None:
    """Create chorus topics that do not exist yet (replication factor 1 unless configured)."""
    partitions = partitions or TOPIC_PARTITIONS
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(t, n, 1) for t, n in partitions.items() if t not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()

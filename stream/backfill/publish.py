"""Follow edges -> ``chorus.graph``: one ``add`` per follow record, acknowledged before it counts.

Each value is keyed by its follow record's URI (the topic's key, :func:`stream.schemas.graph_key`)
and goes to the partition the producer's default partitioner (murmur2, as for the worker's
records) gives that key; the values of one repository are appended to one record batch per
partition (aiokafka ``create_batch``/``send_batch``) rather than sent one by one, and
:meth:`GraphPublisher.publish_repo` returns once Kafka acknowledged all of them. Values:
``{v, op: "add", src: followed, dst: follower, time_us, uri, rev}`` where ``rev`` is the
repository's checkpoint rev and ``time_us`` its TID time (stream.schemas.GraphEdge).
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from stream.protocol import FOLLOW
from stream.schemas import TOPIC_GRAPH, dumps, graph_value, tid_value


class GraphPublisher:
    def __init__(self, producer: AIOKafkaProducer, partitions: list[int], topic: str = TOPIC_GRAPH):
        self.producer, self.topic = producer, topic
        self.partitions = sorted(partitions)
        self._partitioner = DefaultPartitioner()

    @classmethod
    async def create(cls, producer: AIOKafkaProducer, topic: str = TOPIC_GRAPH) -> "GraphPublisher":
        parts = await producer.partitions_for(topic)
        return cls(producer, list(parts), topic)

    def partition(self, key: bytes) -> int:
        return self._partitioner(key, self.partitions, self.partitions)

    async def publish_repo(self, did: str, rev: str, follows: list[tuple[str, str]]) -> int:
        """Publish ``(rkey, subject DID)`` follows of repository ``did`` at ``rev``; returns how
        many, once acknowledged (raises what the producer raises)."""
        if not follows:
            return 0
        time_us = tid_value(rev) >> 10
        prefix = f"at://{did}/{FOLLOW}/"
        batches: dict[int, object] = {}
        futures = []
        for rkey, subject in follows:
            uri = prefix + rkey
            key = uri.encode()
            part = self.partition(key)
            value = dumps(graph_value("add", subject, did, time_us, uri, rev))
            batch = batches.get(part)
            if batch is None:
                batch = batches[part] = self.producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start another
                futures.append(await self.producer.send_batch(batch, self.topic, partition=part))
                batch = batches[part] = self.producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for part, batch in batches.items():
            futures.append(await self.producer.send_batch(batch, self.topic, partition=part))
        await asyncio.gather(*futures)
        return len(follows)

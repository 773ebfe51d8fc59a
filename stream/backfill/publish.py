"""Follow edges -> ``chorus.graph``: one ``add`` per follow record, acknowledged before it counts.

Each value is keyed by its follow record's URI (the topic's key, :func:`stream.schemas.graph_key`)
and sent with the producer's default partitioner (murmur2, as the worker's records); the
producer's accumulator batches them per partition across repositories (sending prebuilt batches
per repository instead contends for aiokafka's one-pending-batch-per-partition slot and times
out under concurrency). :meth:`GraphPublisher.publish_repo` returns once Kafka acknowledged every
value of the repository. Values: ``{v, op: "add", src: followed, dst: follower, time_us, uri,
rev}`` where ``rev`` is the repository's checkpoint rev and ``time_us`` its TID time
(stream.schemas.GraphEdge).
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer

from stream.protocol import FOLLOW
from stream.schemas import TOPIC_GRAPH, dumps, graph_value, tid_value


class GraphPublisher:
    def __init__(self, producer: AIOKafkaProducer, topic: str = TOPIC_GRAPH):
        self.producer, self.topic = producer, topic

    async def publish_repo(self, did: str, rev: str, follows: list[tuple[str, str]]) -> int:
        """Publish ``(rkey, subject DID)`` follows of repository ``did`` at ``rev``; returns how
        many, once acknowledged (raises what the producer raises)."""
        if not follows:
            return 0
        time_us = tid_value(rev) >> 10
        prefix = f"at://{did}/{FOLLOW}/"
        send = self.producer.send
        futures = []
        for rkey, subject in follows:
            uri = prefix + rkey
            futures.append(await send(self.topic, dumps(graph_value("add", subject, did, time_us, uri, rev)),
                                      key=uri.encode()))
        await asyncio.gather(*futures)
        return len(follows)

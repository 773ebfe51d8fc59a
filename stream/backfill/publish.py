"""Follow edges -> ``chorus.graph``: one ``add`` per follow record, acknowledged before it counts.

Each value is keyed by its follow record's URI (the topic's key, :func:`stream.schemas.graph_key`).
All values of one repository go to one partition, the one the producer's default partitioner
(murmur2) gives the follower's DID: one hash per repository instead of one per record (a
pure-Python murmur2 per record, inside ``send``, tripled the per-record cost). Which partition a
record lands in does not matter to its consumer, which reads every partition and orders the ops
of an edge by rev (operators/service/state.py). The producer's accumulator batches the values per
partition across repositories; :meth:`GraphPublisher.publish_repo` returns once Kafka
acknowledged every value of the repository. Values: ``{v, op: "add", src: followed, dst:
follower, time_us, uri, rev}`` where ``rev`` is the repository's checkpoint rev and ``time_us``
its TID time (stream.schemas.GraphEdge).
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from stream.protocol import FOLLOW
from stream.schemas import TOPIC_GRAPH, TOPIC_IDENTITIES, dumps, graph_value, tid_value


class GraphPublisher:
    def __init__(self, producer: AIOKafkaProducer, partitions: list[int], topic: str = TOPIC_GRAPH):
        self.producer, self.topic = producer, topic
        self.partitions = sorted(partitions)
        self._partitioner = DefaultPartitioner()

    @classmethod
    async def create(cls, producer: AIOKafkaProducer, topic: str = TOPIC_GRAPH) -> "GraphPublisher":
        return cls(producer, list(await producer.partitions_for(topic)), topic)

    def partition(self, did: str) -> int:
        """The partition of a repository's values: the default partitioner's for its DID."""
        return self._partitioner(did.encode(), self.partitions, self.partitions)

    async def publish_repo(self, did: str, rev: str, follows: list[tuple[str, str]],
                           handle: str | None = None) -> int:
        """Publish ``(rkey, subject DID)`` follows of repository ``did`` at ``rev`` (and, given
        one, its ``handle`` to chorus.identities); returns how many follows, once acknowledged
        (raises what the producer raises)."""
        time_us = tid_value(rev) >> 10
        prefix = f"at://{did}/{FOLLOW}/"
        part = self.partition(did)
        send = self.producer.send
        futures = []
        if handle is not None:
            futures.append(await send(TOPIC_IDENTITIES, dumps({"did": did, "handle": handle, "time_us": time_us}),
                                      key=did.encode()))
        for rkey, subject in follows:
            uri = prefix + rkey
            futures.append(await send(self.topic, dumps(graph_value("add", subject, did, time_us, uri, rev)),
                                      key=uri.encode(), partition=part))
        await asyncio.gather(*futures)
        return len(follows)

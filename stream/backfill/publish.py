"""Follow edges -> ``chorus.graph``: one ``add`` per follow record, acknowledged before it counts.

Each value is keyed by its follow record's URI (the topic's key, :func:`stream.schemas.graph_key`).
All values of one repository go to one partition, the one the producer's default partitioner
(murmur2) gives the follower's DID: one hash per repository instead of one per record. Which
partition a record lands in does not matter to its consumer, which reads every partition and
orders the ops of an edge by rev (operators/service/state.py). Values: ``{v, op: "add", src:
followed, dst: follower, time_us, uri, rev}`` where ``rev`` is the repository's checkpoint rev and
``time_us`` its TID time, no later than the fetch (stream.schemas.GraphEdge). A repository's handle, when its DID document
gave one, goes to ``chorus.identities`` (key DID, the default partitioner's partition, as
``chorus ingest`` sends it, so compaction sees one key in one place).

Batching (the publishing side's CPU per edge): records are appended straight into aiokafka
``BatchBuilder`` s, one being filled per (topic, partition) "lane", shared by every repository in
flight, and handed to the producer whole (``send_batch``); a lane has one batch on its way to Kafka
at a time, and the next fills while it is (so batches grow with the load, and an idle lane sends
at once). A repository's values are encoded from a per-repository template (its DID, rev and
time are the same in each; only the record key and the subject vary), byte for byte what
:func:`stream.schemas.dumps` of :func:`stream.schemas.graph_value` gives, falling back to those
when a string would need JSON escaping. :meth:`GraphPublisher.publish_repo` returns once Kafka
acknowledged every batch holding a value of the repository (a failed batch fails every
repository in it: none of them is counted done, so a resumed backfill fetches them again).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from stream import metrics
from stream.protocol import FOLLOW
from stream.schemas import SCHEMA_VERSION, TOPIC_GRAPH, TOPIC_IDENTITIES, dumps, graph_value, tid_value

_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\\x7f-\uffff]')  # JSON escapes (and anything not ASCII: the slow path)


def default_partition(key: bytes, partitions: list[int]) -> int:
    """The partition aiokafka's (and Java's) default partitioner gives ``key``: murmur2, positive,
    modulo the sorted partition list."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


@dataclass
class _Lane:
    """One (topic, partition): the batch being filled, its acknowledgement, and sealed batches
    waiting for their turn."""

    topic: str
    partition: int
    builder: object = None
    done: asyncio.Future | None = None
    sealed: deque = field(default_factory=deque)
    sender: asyncio.Task | None = None


class GraphPublisher:
    def __init__(self, producer: AIOKafkaProducer, partitions: list[int], topic: str = TOPIC_GRAPH,
                 identity_partitions: list[int] | None = None):
        self.producer, self.topic = producer, topic
        self.partitions = sorted(partitions)
        self.identity_partitions = sorted(identity_partitions or self.partitions)
        self._lanes: dict[tuple[str, int], _Lane] = {}

    @classmethod
    async def create(cls, producer: AIOKafkaProducer, topic: str = TOPIC_GRAPH) -> "GraphPublisher":
        return cls(producer, list(await producer.partitions_for(topic)), topic,
                   list(await producer.partitions_for(TOPIC_IDENTITIES)))

    def partition(self, did: str) -> int:
        """The partition of a repository's values: the default partitioner's for its DID."""
        return default_partition(did.encode(), self.partitions)

    async def publish_repo(self, did: str, rev: str, follows: list[tuple[str, str]],
                           handle: str | None = None, fetched_us: int | None = None) -> int:
        """Publish ``(rkey, subject DID)`` follows of repository ``did`` at ``rev`` (and, given
        one, its ``handle`` to chorus.identities); returns how many follows, once acknowledged
        (raises what the producer raises). ``time_us`` is the rev's TID time, but no later than
        ``fetched_us`` (when the repository was fetched, unix us; None: now): the PDS sets the rev,
        and a rev in the future must not date an edge in the future (clamped, counted in
        ``chorus_backfill_event_time_clamped_total``; the rev itself is published as given)."""
        time_us = tid_value(rev) >> 10
        limit_us = time.time_ns() // 1000 if fetched_us is None else int(fetched_us)
        if time_us > limit_us:
            time_us = limit_us
            metrics.BACKFILL_TIME_CLAMPED.inc()
        key = did.encode()
        waits = []
        if handle is not None:
            value = dumps({"did": did, "handle": handle, "time_us": time_us})
            waits += self._append(TOPIC_IDENTITIES, default_partition(key, self.identity_partitions), [(key, value)])
        if follows:
            waits += self._append(self.topic, default_partition(key, self.partitions),
                                  encode_follows(did, rev, time_us, follows))
        if waits:
            await asyncio.gather(*waits)
        return len(follows)

    def _append(self, topic: str, partition: int, records: list[tuple[bytes, bytes]]) -> list[asyncio.Future]:
        """Append ``(key, value)`` records to the lane's open batch (sealing full ones); the
        acknowledgements to wait for."""
        lane = self._lanes.get((topic, partition))
        if lane is None:
            lane = self._lanes[(topic, partition)] = _Lane(topic, partition)
        if lane.builder is None:
            self._open(lane)
        waits = [lane.done]
        builder = lane.builder
        for k, v in records:
            if builder.append(timestamp=None, key=k, value=v) is None:  # full: seal it, open the next
                lane.sealed.append((builder, lane.done))
                self._open(lane)
                builder = lane.builder
                waits.append(lane.done)
                if builder.append(timestamp=None, key=k, value=v) is None:
                    raise ValueError(f"a record of {len(v)} bytes does not fit in an empty batch")
        if lane.sender is None:
            lane.sender = asyncio.create_task(self._send(lane))
        return waits

    def _open(self, lane: _Lane) -> None:
        lane.builder = self.producer.create_batch()
        lane.done = asyncio.get_running_loop().create_future()

    async def _send(self, lane: _Lane) -> None:
        """Hand the lane's batches to the producer one at a time, each once the previous one is
        acknowledged; ends when the lane is empty."""
        try:
            while True:
                if not lane.sealed:
                    if lane.builder is None or lane.builder.record_count() == 0:
                        return
                    lane.sealed.append((lane.builder, lane.done))
                    lane.builder = lane.done = None
                builder, done = lane.sealed.popleft()
                builder.close()  # nothing else may add to it (producer.send would)
                try:
                    ack = await self.producer.send_batch(builder, lane.topic, partition=lane.partition)
                    await ack
                except asyncio.CancelledError:
                    done.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001 - the producer's errors go to the repositories
                    done.set_exception(exc)
                else:
                    done.set_result(None)
        finally:
            lane.sender = None

    async def aclose(self) -> None:
        """Stop the lanes' senders (what they hold is failed, not sent); for the end of a run."""
        tasks = [lane.sender for lane in self._lanes.values() if lane.sender is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self._lanes.values():
            for _, done in lane.sealed:
                done.cancel()
            if lane.done is not None:
                lane.done.cancel()
            lane.sealed.clear()
            lane.builder = lane.done = None


def encode_follows(did: str, rev: str, time_us: int, follows: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """(key, value) of each follow's ``add``: the record URI and
    ``dumps(graph_value("add", subject, did, time_us, uri, rev))``, from a template when no string
    needs escaping (checked once per repository), else through :func:`stream.schemas.dumps`."""
    prefix = f"at://{did}/{FOLLOW}/"
    if _NEEDS_ESCAPE.search("".join((did, rev, *(s for _, s in follows), *(r for r, _ in follows)))):
        out = []
        for rkey, subject in follows:
            uri = prefix + rkey
            out.append((uri.encode(), dumps(graph_value("add", subject, did, time_us, uri, rev))))
        return out
    head = f'{{"v":{SCHEMA_VERSION},"op":"add","src":"'
    mid = f'","dst":"{did}","time_us":{int(time_us)},"uri":"{prefix}'
    tail = f'","rev":"{rev}"}}'
    return [(f"{prefix}{rkey}".encode(), f"{head}{subject}{mid}{rkey}{tail}".encode()) for rkey, subject in follows]

"""The backfill's publisher: values byte for byte what stream.schemas encodes, partitions as the
default partitioner's, and against the embedded broker: every record of many concurrent
repositories exactly once (batches sealed when full and shared between repositories), handles on
chorus.identities, and a producer failure raised to the repository (never counted as published)."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from aiokafka.partitioner import DefaultPartitioner

from stream.backfill.publish import GraphPublisher, default_partition, encode_follows
from stream.kafka import ensure_topics, make_consumer, make_producer
from stream.schemas import TOPIC_GRAPH, TOPIC_IDENTITIES, TOPIC_PARTITIONS, dumps, graph_value, tid_value
from stream.sim.frames import tid

pytestmark = pytest.mark.timeout(120)
T0 = 1_735_689_600_000_000


def _did(i: int) -> str:
    return f"did:plc:{i:024d}"


def test_values_are_the_schema_encoding():
    rng = random.Random(3)
    did, rev = _did(7), tid(T0 + 5, 3)
    time_us = tid_value(rev) >> 10
    follows = [(tid(T0 + k, k), _did(rng.randrange(10**6))) for k in range(60)] + [("self.x~y:z", "did:web:a.b%3A80")]
    cases = [follows,
             [("k1", 'did:plc:a"b'), ("k2", "did:plc:\u00e9\u4e2d")],  # need escaping / not ASCII: the slow path
             [("k\\3", "did:plc:x\n")]]
    for fs in cases:
        got = encode_follows(did, rev, time_us, fs)
        want = [(f"at://{did}/app.bsky.graph.follow/{r}".encode(),
                 dumps(graph_value("add", s, did, time_us, f"at://{did}/app.bsky.graph.follow/{r}", rev))) for r, s in fs]
        assert got == want
        for _, v in got:
            e = json.loads(v)
            assert e["op"] == "add" and e["dst"] == did and e["rev"] == rev


def test_default_partition_is_the_producers():
    for n in (1, 4, 16):
        parts = list(range(n))
        for i in range(300):
            key = _did(i * 7919).encode()
            assert default_partition(key, parts) == DefaultPartitioner()(key, parts, parts)


def _read(bootstrap: str, topic: str, want: int) -> list:
    async def main():
        c = make_consumer(bootstrap, topic)
        await c.start()
        out = []
        try:
            async with asyncio.timeout(60):
                while len(out) < want:
                    for msgs in (await c.getmany(timeout_ms=300)).values():
                        out += msgs
            await asyncio.sleep(0.5)  # nothing more comes
            for msgs in (await c.getmany(timeout_ms=300)).values():
                out += msgs
        finally:
            await c.stop()
        return out
    return asyncio.run(main())


def test_many_repositories_at_once_every_record_once(fresh_broker):
    rng = random.Random(5)
    repos = {_did(i): [(tid(T0 + k, i & 1023), _did(rng.randrange(10**6))) for k in range(rng.randrange(0, 120))]
             for i in range(80)}
    rev = tid(T0 + 10**9, 1)

    async def main():
        await ensure_topics(fresh_broker.bootstrap, {t: TOPIC_PARTITIONS[t] for t in (TOPIC_GRAPH, TOPIC_IDENTITIES)})
        producer = make_producer(fresh_broker.bootstrap, False, max_batch_size=4096)  # ~20 records: batches fill
        await producer.start()
        try:
            pub = await GraphPublisher.create(producer)
            counts = await asyncio.gather(*(pub.publish_repo(d, rev, fs, handle=f"h{i}.example.com")
                                            for i, (d, fs) in enumerate(repos.items())))
            assert counts == [len(fs) for fs in repos.values()]
            await pub.aclose()
            return pub
        finally:
            await producer.stop()

    pub = asyncio.run(main())
    total = sum(len(fs) for fs in repos.values())
    msgs = _read(fresh_broker.bootstrap, TOPIC_GRAPH, total)
    assert len(msgs) == total
    got = sorted((json.loads(m.value)["dst"], m.key.decode(), json.loads(m.value)["src"]) for m in msgs)
    assert got == sorted((d, f"at://{d}/app.bsky.graph.follow/{r}", s) for d, fs in repos.items() for r, s in fs)
    for m in msgs:  # a repository's records in its follower's partition
        assert m.partition == pub.partition(json.loads(m.value)["dst"])
    ids = _read(fresh_broker.bootstrap, TOPIC_IDENTITIES, len(repos))
    assert sorted(m.key.decode() for m in ids) == sorted(repos)
    parts = sorted(range(TOPIC_PARTITIONS[TOPIC_IDENTITIES]))
    for m in ids:  # where `chorus ingest` (producer.send, default partitioner) puts the same key
        assert m.partition == DefaultPartitioner()(m.key, parts, parts)
        assert json.loads(m.value)["handle"].endswith(".example.com")


def test_a_producer_failure_reaches_the_repository(fresh_broker):
    async def main():
        await ensure_topics(fresh_broker.bootstrap, {t: TOPIC_PARTITIONS[t] for t in (TOPIC_GRAPH, TOPIC_IDENTITIES)})
        producer = make_producer(fresh_broker.bootstrap, False)
        await producer.start()
        pub = await GraphPublisher.create(producer)
        assert await pub.publish_repo(_did(1), tid(T0, 1), [("a", _did(2))]) == 1
        await producer.stop()
        with pytest.raises(Exception):  # noqa: B017 - what aiokafka raises for a closed producer
            await pub.publish_repo(_did(1), tid(T0, 2), [("b", _did(3))])
        await pub.aclose()

    asyncio.run(main())


def test_a_rev_from_the_future_does_not_date_edges_in_the_future(fresh_broker):
    """The rev is a TID the (untrusted) PDS sets: an edge's time_us is its time, but no later than
    the fetch; the rev itself is published as given (it orders the edge's ops)."""
    from stream import metrics

    fetched = 1_800_000_000_000_000
    future, past = tid(fetched + 10 * 365 * 86_400 * 10**6, 1), tid(fetched - 5 * 10**6, 2)
    before = metrics.BACKFILL_TIME_CLAMPED._value.get()

    async def main():
        await ensure_topics(fresh_broker.bootstrap, {t: TOPIC_PARTITIONS[t] for t in (TOPIC_GRAPH, TOPIC_IDENTITIES)})
        producer = make_producer(fresh_broker.bootstrap, False)
        await producer.start()
        try:
            pub = await GraphPublisher.create(producer)
            await pub.publish_repo(_did(1), future, [("a", _did(2))], handle="far.example.com", fetched_us=fetched)
            await pub.publish_repo(_did(3), past, [("b", _did(4))], fetched_us=fetched)
            await pub.aclose()
        finally:
            await producer.stop()

    asyncio.run(main())
    edges = {json.loads(m.value)["dst"]: json.loads(m.value) for m in _read(fresh_broker.bootstrap, TOPIC_GRAPH, 2)}
    assert edges[_did(1)]["time_us"] == fetched and edges[_did(1)]["rev"] == future
    assert edges[_did(3)]["time_us"] == tid_value(past) >> 10 == fetched - 5 * 10**6
    ident = json.loads(_read(fresh_broker.bootstrap, TOPIC_IDENTITIES, 1)[0].value)
    assert ident["time_us"] == fetched
    assert metrics.BACKFILL_TIME_CLAMPED._value.get() == before + 1

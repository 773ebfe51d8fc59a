"""Poison records on the operator's inputs: each is refused and counted with its reason, optionally
dead-lettered, and the hop computed from the rest is exactly the clean one (tests/operators/service/
test_service.py's closed forms)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from prometheus_client import REGISTRY

from operators.service.service import OperatorService
from stream.config import Settings
from stream.kafka import ensure_topics, make_consumer, make_producer
from stream.schemas import TOPIC_ATTRIBUTIONS, TOPIC_DEAD_LETTER, TOPIC_FEATURES, TOPIC_GRAPH, AttributionSnapshot
from tests.operators.service.test_service import HOP1, QUIET, check_hop1, collect, complete, edges, features, last

pytestmark = pytest.mark.timeout(240)

FAR = int(time.time()) + 30 * 365 * 86400  # decades ahead


def feat(**kw):
    base = {"v": 1, "did": "did:Z", "window_end": 60, "followers": 3, "topics": {"t": [1, 0, 0.5, 0]}}
    return json.dumps({**base, **kw}).encode()


# (topic, raw value, reason)
POISON = [
    (TOPIC_FEATURES, feat(followers=10**30), "out_of_range"),        # made the operator exit (OverflowError)
    (TOPIC_FEATURES, feat(did=12345), "type"),
    (TOPIC_FEATURES, feat(followers="7"), "type"),                   # strict: no numeric strings
    (TOPIC_FEATURES, feat(topics={"t": [-1, 0, 0, 0]}), "out_of_range"),  # a negative count
    (TOPIC_FEATURES, feat(topics={"t": [1, 0, 0]}), "shape"),
    (TOPIC_FEATURES, feat(window_end=FAR), "time_ahead"),
    (TOPIC_FEATURES, b'{"v":1,"did":"did:Z","window_end":60,"followers":3,"topics":{"t":[NaN,0,0,0]}}',
     "non_finite"),
    (TOPIC_FEATURES, b'{"v":1,"did":"did:Z","window_end":60,"followers":3,"topics":{"t":[1e400,0,0,0]}}',
     "non_finite"),
    (TOPIC_FEATURES, feat(v=2), "type"),
    (TOPIC_FEATURES, feat(extra=1), "unknown_field"),
    (TOPIC_FEATURES, b"\xff not json", "json"),
    (TOPIC_FEATURES, b"[1, 2]", "shape"),
    (TOPIC_GRAPH, json.dumps({"v": 1, "op": "add", "src": 5, "dst": "did:f0", "time_us": 1}).encode(), "type"),
    (TOPIC_GRAPH, json.dumps({"v": 1, "op": "flip", "src": "did:A", "dst": "did:Z", "time_us": 1}).encode(), "type"),
    (TOPIC_GRAPH, json.dumps({"v": 1, "op": "add", "src": "did:A", "time_us": 1}).encode(), "missing_field"),
    (TOPIC_GRAPH, json.dumps({"v": 1, "op": "add", "src": "did:A", "dst": "did:Z",
                              "time_us": FAR * 10**6}).encode(), "time_ahead"),
]


def rejected(topic, reason):
    return REGISTRY.get_sample_value("chorus_records_rejected_total", {"topic": topic, "reason": reason}) or 0.0


def counts():
    return {(t, r): rejected(t, r) for t, _, r in POISON}


def expected_counts(before):
    out = dict(before)
    for t, _, r in POISON:
        out[(t, r)] += 1
    return out


class Msg:
    def __init__(self, offset, value, key=b"k"):
        self.offset, self.value, self.key = offset, value, key


def test_poison_records_are_rejected_with_their_reason_and_the_hop_is_exact():
    """No Kafka: the service's own ingest path with the poison interleaved in the good input."""
    svc = OperatorService(Settings(indicators=["volume", "cascade_reach"], dead_letter=True), steps=16, panel_k=2)
    before = counts()
    good_f = [f.to_bytes() for f in features(60, HOP1 + QUIET)]
    good_e = [e.to_bytes() for e in edges()]
    for topic, good in ((TOPIC_GRAPH, good_e), (TOPIC_FEATURES, good_f)):
        bad = [raw for t, raw, _ in POISON if t == topic]
        mixed = [v for pair in zip(good, bad + [None] * len(good)) for v in pair if v is not None] + bad[len(good):]
        svc._ingest(topic, 0, [Msg(i, v) for i, v in enumerate(mixed)])
    assert counts() == expected_counts(before)
    assert "did:Z" not in svc.state.index  # nothing of a refused record reached the state
    check_hop1(svc.recompute())
    dead = svc.guard.take_dead_letters()
    assert sorted(dict(h)["chorus.reason"].decode() for _, _, h in dead) == sorted(r for _, _, r in POISON)
    assert {v for _, v, _ in dead} == {raw for _, raw, _ in POISON}


def test_operator_on_kafka_survives_poison_and_dead_letters_it(fresh_broker):
    bootstrap = fresh_broker.bootstrap
    s = Settings(kafka=fresh_broker.url, kafka_idempotence=False, indicators=["volume", "cascade_reach"],
                 hop_s=10, window_s=60, dead_letter=True)

    async def scenario():
        await ensure_topics(bootstrap)
        prod = make_producer(bootstrap, idempotence=False)
        await prod.start()
        try:
            for topic, raw, _ in POISON[:len(POISON) // 2]:
                await prod.send_and_wait(topic, raw, key=b"did:Z")
            for e in edges():
                await prod.send_and_wait(TOPIC_GRAPH, e.to_bytes(), key=e.dst.encode())
            for f in features(60, HOP1 + QUIET):
                await prod.send_and_wait(TOPIC_FEATURES, f.to_bytes(), key=f.did.encode())
            for topic, raw, _ in POISON[len(POISON) // 2:]:
                await prod.send_and_wait(topic, raw, key=b"did:Z")
        finally:
            await prod.stop()
        svc = OperatorService(s, steps=16, panel_k=2)
        task = asyncio.create_task(svc.run())
        snaps = await collect(bootstrap, TOPIC_ATTRIBUTIONS, AttributionSnapshot, complete(60, 1, 7), task=task)
        dead = []
        cons = make_consumer(bootstrap, TOPIC_DEAD_LETTER, group_id=None)
        await cons.start()
        try:
            async with asyncio.timeout(60):
                while len(dead) < len(POISON):
                    assert not task.done(), "the operator stopped"
                    for msgs in (await cons.getmany(timeout_ms=300)).values():
                        dead += msgs
        finally:
            await cons.stop()
        assert not task.done()
        await svc.stop()
        await asyncio.wait_for(task, 30)
        return snaps, dead, svc

    before = counts()
    snaps, dead, svc = asyncio.run(scenario())
    assert counts() == expected_counts(before)
    check_hop1([last(snaps, 60, "volume"), last(snaps, 60, "cascade_reach")])
    got = sorted((dict(m.headers)["chorus.topic"].decode(), dict(m.headers)["chorus.reason"].decode(), m.value)
                 for m in dead)
    assert got == sorted((t, r, raw) for t, raw, r in POISON)
    assert all(m.key == b"did:Z" for m in dead)

"""Poison records on the worker's inputs (chorus.events, live and replayed, and its ops topic): each
is refused and counted with its reason, and the features and edges are exactly the clean run's."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from prometheus_client import REGISTRY

from stream.kafka import make_producer
from stream.schemas import TOPIC_EVENTS
from stream.worker.faust_app import APP_ID
from tests.stream.worker.test_worker import EVENTS, EXPECTED, T, check, collect, ev, new_worker, start_workers, stop, \
    wait_assigned

pytestmark = pytest.mark.timeout(240)

FAR_US = (int(time.time()) + 30 * 365 * 86400) * 1_000_000
OPS = f"{APP_ID}-ops"


def raw(e):
    return json.dumps(e).encode()


# (raw chorus.events value, reason)
POISON_EVENTS = [
    (raw({**ev("post", "did:plc:x", "x1", 2, text="climate"), "did": 12345}), "type"),  # crash-looped the worker
    (raw(ev("post", "did:plc:x", "x2", 2, text="climate") | {"time_us": FAR_US}), "time_ahead"),
    (raw(ev("post", "did:plc:x", "x3", 2, text="climate") | {"time_us": str(T)}), "type"),
    (raw(ev("post", "did:plc:x", "x4", 2, text="climate") | {"kind": "bogus"}), "type"),
    (raw(ev("post", "did:plc:x", "x5", 2, text="climate") | {"reply_parent": "https://example.com/x"}), "shape"),
    (raw(ev("post", "did:plc:x", "x6", 2, text="climate") | {"seq": -1}), "out_of_range"),
    (raw({k: v for k, v in ev("like", "did:plc:x", "x7", 3).items()}), "shape"),  # a like without its subject
    (raw({k: v for k, v in ev("post", "did:plc:x", "x8", 2).items() if k != "uri"}), "missing_field"),
    (b"\x00\x01 not json", "json"),
    (b"[]", "shape"),
]
# (raw ops message on partition 0, reason)
POISON_OPS = [
    (b"{not json", "json"),
    (b'{"a": 1}', "shape"),
    (b'{"v": 2, "ops": [["eng", 5, 1]]}', "shape"),
    (b'{"v": 2, "ops": [["nope", "did:plc:x", 1]]}', "shape"),
    (b'[["tick", "", 1]]', "format"),  # a worker of an older version (format 1: a bare list)
]


def rejected(topic, reason):
    return REGISTRY.get_sample_value("chorus_records_rejected_total", {"topic": topic, "reason": reason}) or 0.0


def tally(pairs):
    out: dict[str, int] = {}
    for _, r in pairs:
        out[r] = out.get(r, 0) + 1
    return out


N_EVENTS = len(EVENTS) + len(POISON_EVENTS) + 1


async def produce_mixed(broker):
    # One record per produce request: the embedded broker's ListOffsets reports the end of a
    # partition written in multi-record batches short, and the replay reads up to that end.
    p = make_producer(broker.bootstrap, idempotence=False)
    await p.start()
    try:
        for i, e in enumerate(EVENTS):
            await p.send_and_wait(TOPIC_EVENTS, key=e["did"].encode(), value=raw(e))
            if i < len(POISON_EVENTS):
                await p.send_and_wait(TOPIC_EVENTS, key=b"did:plc:x", value=POISON_EVENTS[i][0])
        for value, _ in POISON_EVENTS[len(EVENTS):]:
            await p.send_and_wait(TOPIC_EVENTS, key=b"did:plc:x", value=value)
        await p.send_and_wait(TOPIC_EVENTS, key=b"did:plc:x", value=None)  # a tombstone is no event either
        for value, _ in POISON_OPS:
            await p.send_and_wait(OPS, key=b"0", value=value, partition=0)
    finally:
        await p.stop()


def test_worker_survives_poison_live_and_in_replay(fresh_broker):
    want_events = tally(POISON_EVENTS)
    want_events["json"] += 1  # the tombstone
    before = {r: rejected(TOPIC_EVENTS, r) for r in want_events}

    async def main():
        workers, tasks = await start_workers(fresh_broker, 1)
        try:
            await produce_mixed(fresh_broker)
            first = await collect(fresh_broker, EXPECTED)
            guard = workers[0].pipeline.guard
            live = {r: n for (t, r), n in guard.rejected.items() if t == TOPIC_EVENTS}
            ops = {r: n for (t, r), n in guard.rejected.items() if t == OPS}
            assert not tasks[0].done()
        finally:
            await stop(workers, tasks)
        # A fresh worker replays chorus.events from the start, poison included, and still rebuilds
        # exactly the same state (the crash loop of issue 18 happened here).
        w, t = new_worker(fresh_broker)
        try:
            await wait_assigned([w], [t])
            while not w.pipeline.ready:
                await asyncio.sleep(0.1)
            assert sum(w.pipeline.skip.values()) == N_EVENTS  # the replay read every record
            replayed = {r: n for (tp, r), n in w.pipeline.guard.rejected.items() if tp == TOPIC_EVENTS}
            assert not t.done()
        finally:
            await stop([w], [t])
        return first, live, ops, replayed

    first, live, ops, replayed = asyncio.run(main())
    check(*first)
    assert live == want_events
    assert ops == tally(POISON_OPS)
    assert replayed == want_events
    assert {r: rejected(TOPIC_EVENTS, r) - before[r] for r in want_events} == {r: 2 * n for r, n in want_events.items()}

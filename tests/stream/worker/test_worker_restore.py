"""The worker's state after a restart and during rebalances (issue 17): restored from a checkpoint
(a torn newest one skipped) with only what came after it replayed, nothing re-published; and a
restore never holds up the group: a worker joining during a long restore settles the group once."""

from __future__ import annotations

import asyncio
import json
import time
import zipfile

import pytest

from stream import metrics
from stream.config import Settings
from stream.kafka import make_consumer
from stream.schemas import TOPIC_EVENTS, TOPIC_GRAPH
from stream.worker import faust_app
from stream.worker.checkpoint import CheckpointDir
from stream.worker.faust_app import APP_ID, Worker, checkpoint_dir
from tests.stream.worker.test_worker import (EVENTS, ev, EXPECTED, EXPECTED_EDGES, HOP, SESSION_TIMEOUT_S, collect, final,
                                             matches, produce, stop, wait_assigned)

pytestmark = pytest.mark.timeout(240)


def settings(broker, tmp_path, interval=0.3):
    return Settings(kafka=broker.url, kafka_idempotence=False, window_s=3 * HOP, hop_s=HOP,
                    checkpoint_interval_s=interval, checkpoint_dir=tmp_path / "ck")


def start(s):
    w = Worker(s, idle_flush_s=1.0, rebalance_timeout_s=2.0, session_timeout_s=SESSION_TIMEOUT_S)
    return w, asyncio.create_task(w.run())


async def graph_records(broker):
    """Every chorus.graph record published so far, as (op, src, dst)."""
    c = make_consumer(broker.bootstrap, TOPIC_GRAPH)
    await c.start()
    out = []
    try:
        while batch := await c.getmany(timeout_ms=1500):
            for msgs in batch.values():
                out += [(e["op"], e.get("src", ""), e["dst"]) for e in map(json.loads, (m.value for m in msgs))]
    finally:
        await c.stop()
    return out


def quiet(meta):
    """Whether a checkpoint holds no output in flight (nothing unacknowledged or buffered). A restore
    from such a checkpoint re-sends nothing; one taken while an output was in flight re-sends it
    (at least once)."""
    buf = meta["buffered"]
    return not (meta["unacked"] or buf["records"] or buf["edges"] or any(buf["ops"].values()))


def freezable(monkeypatch) -> dict:
    """Checkpoint writes fail (OSError) while the returned ``{"on": ...}`` is True: a restore then
    finds the checkpoints written before."""
    frozen, real_write = {"on": False}, CheckpointDir.write

    def write(self, *args, **kw):
        if frozen["on"]:
            raise OSError("test: no more checkpoints")
        return real_write(self, *args, **kw)

    monkeypatch.setattr(CheckpointDir, "write", write)
    return frozen


def test_restart_restores_the_checkpoint_skips_a_torn_one_and_republishes_nothing(fresh_broker, tmp_path):
    s = settings(fresh_broker, tmp_path)
    ckdir = CheckpointDir(checkpoint_dir(s, APP_ID))

    def covering(n):
        """The two newest checkpoint files if both cover n chorus.events events and are quiet, else []."""
        newest = ckdir.files()[:2]  # the two newest checkpoints, both such
        try:
            metas = [(f, ckdir.read_meta(f)) for f in newest]
        except (OSError, zipfile.BadZipFile, KeyError, ValueError):  # pruned or being replaced
            return []
        ok = [f for f, m in metas if sum(m["offsets"]["events"].values()) == n and quiet(m)]
        return ok if len(ok) == 2 else []

    async def main():
        w, task = start(s)
        await wait_assigned([w], [task])
        await produce(fresh_broker, EVENTS[:7])  # through FOLLOW_C: both follows, no delete yet
        deadline = time.monotonic() + 60
        while len(covering(7)) < 2:
            assert time.monotonic() < deadline, "no two checkpoints after the first events"
            await asyncio.sleep(0.2)
        await stop([w], [task])  # the process ends; no checkpoint is written at exit
        newest, previous = covering(7) or ckdir.files()[:2]
        newest.write_bytes(newest.read_bytes()[:-100])  # torn: its end never reached the disk

        w2, task2 = start(s)
        await wait_assigned([w2], [task2])
        pipe = w2.pipeline
        assert pipe.restored_from == str(previous) and pipe.replayed == 0
        graph_before = await graph_records(fresh_broker)
        await produce(fresh_broker, EVENTS[7:])
        out = await collect(fresh_broker, EXPECTED)
        await stop([w2], [task2])
        return out, graph_before

    (feats, _, edges), graph_before = asyncio.run(main())
    assert matches(final(feats), EXPECTED), final(feats)
    # chorus.graph did not grow with the restart: each follow record went out once
    assert sorted(graph_before) == sorted(EXPECTED_EDGES[:2])
    assert sorted(edges) == sorted(EXPECTED_EDGES)


def test_a_worker_joining_during_a_long_restore_settles_the_group_once(fresh_broker, tmp_path, monkeypatch):
    """The first worker's restore takes longer than the session timeout (4 s): it runs after the
    assignment callback, so the group stays healthy; the second worker's join cancels it and
    the group settles at once (first worker: 2 assignments, second: 1), with exact results."""
    real_replay, slow = faust_app.replay, {"left": 1}

    async def slow_replay(*args, **kw):
        if slow["left"]:
            slow["left"] -= 1
            await asyncio.sleep(15)
        return await real_replay(*args, **kw)

    monkeypatch.setattr(faust_app, "replay", slow_replay)
    s = settings(fresh_broker, tmp_path, interval=0)

    async def main():
        # the topics as the worker creates them (registry partition counts), not as the broker
        # would auto-create chorus.events on the first produce (its own default count)
        await faust_app.ensure_worker_topics(s)
        await produce(fresh_broker, EVENTS[:6])
        w1, t1 = start(s)
        deadline = time.monotonic() + 60
        while not (w1.pipeline and w1.pipeline.assignments):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert not w1.pipeline.ready  # restoring (slowly)
        await asyncio.sleep(2.0)
        w2, t2 = start(s)
        t0 = time.monotonic()
        await wait_assigned([w1, w2], [t1, t2], timeout=60)
        settle_s = time.monotonic() - t0
        while not (w1.pipeline.ready and w2.pipeline.ready):
            await asyncio.sleep(0.1)
        await asyncio.sleep(2 * SESSION_TIMEOUT_S)  # longer than the session timeout: no further rebalance comes
        assignments = (w1.pipeline.assignments, w2.pipeline.assignments)
        await produce(fresh_broker, EVENTS[6:])
        out = await collect(fresh_broker, EXPECTED)
        await stop([w1, w2], [t1, t2])
        return out, settle_s, assignments

    (feats, _, edges), settle_s, assignments = asyncio.run(main())
    assert assignments == (2, 1), assignments
    assert settle_s < 15, settle_s  # not held up by the first worker's 15 s restore
    assert slow["left"] == 0
    assert matches(final(feats), EXPECTED), final(feats)
    assert set(edges) == set(EXPECTED_EDGES)


def test_a_second_worker_joining_restores_from_the_first_ones_checkpoint_as_does_the_first(
        fresh_broker, tmp_path, monkeypatch):
    """One worker checkpoints every partition; events come after its last checkpoint; a second
    worker joins (sharing the checkpoint directory). Both restore from that checkpoint, each
    keeping the state of the partitions it now holds, and replay only the events after it (not
    the input from its beginning); features and edges are exact, nothing re-published."""
    s = settings(fresh_broker, tmp_path)
    ckdir = CheckpointDir(checkpoint_dir(s, APP_ID))
    frozen = freezable(monkeypatch)

    def quiet_newest(n):
        try:
            newest = ckdir.files()[0]
            meta = ckdir.read_meta(newest)
        except (IndexError, OSError, zipfile.BadZipFile, KeyError, ValueError):
            return None
        return newest if sum(meta["offsets"]["events"].values()) == n and quiet(meta) else None

    async def main():
        w1, t1 = start(s)
        await wait_assigned([w1], [t1])
        await produce(fresh_broker, EVENTS[:7])
        deadline = time.monotonic() + 60
        while True:
            if quiet_newest(7):
                frozen["on"] = True
                ckpt = quiet_newest(7)  # (none written meanwhile, or retry)
                if ckpt:
                    break
                frozen["on"] = False
            assert time.monotonic() < deadline, "no quiet checkpoint of the first events"
            await asyncio.sleep(0.1)
        await produce(fresh_broker, EVENTS[7:9])  # after the checkpoint
        while sum(w1.pipeline.offsets["events"].values()) < 9:
            assert time.monotonic() < deadline, "the first worker did not read the events after the checkpoint"
            await asyncio.sleep(0.1)
        w2, t2 = start(s)
        await wait_assigned([w1, w2], [t1, t2], timeout=60)
        while not (w1.pipeline.ready and w2.pipeline.ready):
            assert time.monotonic() < deadline + 60, "restores did not finish"
            await asyncio.sleep(0.1)
        pipes = (w1.pipeline, w2.pipeline)
        restored = [p.restored_from for p in pipes]
        replayed = [p.replayed for p in pipes]
        held = [p.store.held_events() for p in pipes]
        graph_before = await graph_records(fresh_broker)
        await produce(fresh_broker, EVENTS[9:])
        out = await collect(fresh_broker, EXPECTED)
        await stop([w1, w2], [t1, t2])
        return out, ckpt, restored, replayed, held, graph_before

    (feats, _, edges), ckpt, restored, replayed, held, graph_before = asyncio.run(main())
    assert restored == [str(ckpt), str(ckpt)], (restored, ckpt)
    assert sum(replayed) == 2, replayed  # the two events after the checkpoint, each by its partition's holder
    assert sum(held) == 7 and all(held), held  # the registry (9 events, 2 follows not held) split between them
    assert matches(final(feats), EXPECTED), final(feats)
    assert sorted(graph_before) == sorted(EXPECTED_EDGES[:2])  # the follows went out once, before the join
    assert sorted(edges) == sorted(EXPECTED_EDGES)


FILLER = [ev("like", f"did:plc:f{i}", f"x{i}", 0.5 + i / 1000, subject_uri="at://did:plc:nobody/app.bsky.feed.post/x",
             subject_did="did:plc:nobody") for i in range(300)]  # likes of a post that never comes: no features


def test_a_worker_taking_over_a_leavers_partitions_restores_them_from_the_leavers_checkpoint(
        fresh_broker, tmp_path, monkeypatch):
    """Two workers share the checkpoint directory and both checkpoint 307 events; 2 more events come
    after the checkpoints; one worker leaves (stops). The survivor, now holding every partition,
    restores its own partitions from its checkpoint and the leaver's from the leaver's (merged),
    and replays only the 2 events after them (not the 309 retained); its features equal those of
    one uninterrupted worker (EXPECTED, test_worker.test_one_worker_exact_features_and_edges),
    the follows are not re-published."""
    s = settings(fresh_broker, tmp_path)
    ckdir = CheckpointDir(checkpoint_dir(s, APP_ID))
    frozen = freezable(monkeypatch)
    first = FILLER + EVENTS[:7]

    def newest_quiet(workers):
        """The newest checkpoint of each worker's assignment if together they cover `first`, quiet."""
        out = []
        for w in workers:
            mine = [f for f in ckdir.files() if CheckpointDir.tag_of(f) == w.pipeline.assignment_tag()]
            try:
                meta = ckdir.read_meta(mine[0])
            except (IndexError, OSError, zipfile.BadZipFile, KeyError, ValueError):
                return None
            if not quiet(meta):
                return None
            out.append((mine[0], sum(meta["offsets"]["events"].values())))
        return [f for f, _ in out] if sum(n for _, n in out) == len(first) else None

    async def main():
        await faust_app.ensure_worker_topics(s)
        w1, t1 = start(s)
        w2, t2 = start(s)
        await wait_assigned([w1, w2], [t1, t2])
        await produce(fresh_broker, first)
        deadline = time.monotonic() + 60
        while True:
            if newest_quiet([w1, w2]):
                frozen["on"] = True
                ckpts = newest_quiet([w1, w2])  # (none written meanwhile, or retry)
                if ckpts:
                    break
                frozen["on"] = False
            assert time.monotonic() < deadline, "no quiet checkpoints of the first events"
            await asyncio.sleep(0.1)
        held = [sum(ckdir.read_meta(f)["offsets"]["events"].values()) for f in ckpts]
        await produce(fresh_broker, EVENTS[7:9])  # after the checkpoints
        while sum(w.pipeline.offsets["events"].get(p, 0) for w in (w1, w2) for p in range(64)) < len(first) + 2:
            assert time.monotonic() < deadline, "the workers did not read the events after the checkpoints"
            await asyncio.sleep(0.1)
        await stop([w2], [t2])  # the leaver (no checkpoint is written at exit)
        await wait_assigned([w1], [t1], timeout=60)
        while not w1.pipeline.ready:
            assert time.monotonic() < deadline + 60, "the survivor's restore did not finish"
            await asyncio.sleep(0.1)
        pipe = w1.pipeline
        took = (sorted(pipe.restored_files), pipe.replayed, metrics.WORKER_REPLAYED_EVENTS._value.get())
        graph_before = await graph_records(fresh_broker)
        await produce(fresh_broker, EVENTS[9:])
        out = await collect(fresh_broker, EXPECTED)
        await stop([w1], [t1])
        return out, ckpts, held, took, graph_before

    (feats, _, edges), ckpts, held, (restored, replayed, gauge), graph_before = asyncio.run(main())
    assert all(held), held  # each worker's checkpoint holds some of the events
    assert restored == sorted(map(str, ckpts)), (restored, ckpts)  # its own and the leaver's
    assert replayed == 2 and gauge == 2, (replayed, gauge)  # of the 309 events retained
    assert matches(final(feats), EXPECTED), final(feats)
    assert sorted(graph_before) == sorted(EXPECTED_EDGES[:2])  # the follows went out once, before the takeover
    assert sorted(edges) == sorted(EXPECTED_EDGES)

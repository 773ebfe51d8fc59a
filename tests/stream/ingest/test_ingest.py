"""Ingester: decoding, ack tracking, cursor store, and relay -> ingester -> embedded broker end to end.

Truth for the end-to-end tests is the generator's own record of what it emitted
(``tests.helpers.synth_truth.expected_events`` / hand-built ops), never the ingester's output.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tests.helpers.synth_truth import expected_events
from stream.sim import frames as sim_frames
from stream.local.broker import free_port
from stream.config import Settings
from stream.ingest.cursor import CursorError, CursorStore
from stream.ingest.decode import decode_frame
from stream.ingest.reader import Backoff
from stream.ingest.service import Ingester, IngestError
from stream.kafka import make_consumer
from stream.ingest.publisher import AckTracker
from stream.sim.relay import FrameSource, Relay
from stream.schemas import TOPIC_EVENTS, Event
from stream.sim.synth import Population
from tests.helpers.cli import invoke

pytestmark = pytest.mark.timeout(90)

T0 = 1_735_689_600_000_000
DID = "did:plc:ingesttest0000000000000a"
OTHER = "did:plc:ingesttest0000000000000b"
BIG_SEQ = 2**40 + 7  # sequence numbers exceed 2^31


# --- helpers ---------------------------------------------------------------------------------------

def canon(ev: dict) -> str:
    """Order-free comparable form of an event value (``v`` and None fields dropped)."""
    return json.dumps({k: v for k, v in ev.items() if k != "v" and v is not None}, sort_keys=True)


def population_truth(pop: Population) -> Counter:
    """Expected record events of a population (account retractions: :func:`account_dids`)."""
    return Counter(canon(e) for e in expected_events(pop))


def account_dids(pop: Population) -> Counter:
    return Counter(pop.retractions()["deactivated"])


async def consume_all(bootstrap: str, expect: int, timeout: float = 30.0, quiet: float = 1.0) -> list[dict]:
    """Every value on chorus.events: until ``expect`` values arrived and ``quiet`` s pass with none."""
    consumer = make_consumer(bootstrap, TOPIC_EVENTS)
    await consumer.start()
    out: list[dict] = []
    try:
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                for m in msgs:
                    ev = Event.from_bytes(m.value)  # schema check of every value
                    assert m.key == ev.did.encode()
                    out.append(json.loads(m.value))
                    last = time.monotonic()
            if len(out) >= expect and time.monotonic() - last > quiet:
                break
    finally:
        await consumer.stop()
    return out


def split(values: list[dict]) -> tuple[Counter, Counter]:
    """(record events as canon strings, account events as DIDs)."""
    recs = Counter(canon(v) for v in values if v["kind"] != "account")
    accts = Counter(v["did"] for v in values if v["kind"] == "account" and v["active"] is False)
    return recs, accts


def settings(broker, tmp_path: Path) -> Settings:
    return Settings(kafka=broker.url, kafka_idempotence=False, state_dir=tmp_path / "state")


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def run_until(ing: Ingester, cursor: int, timeout: float = 30.0) -> asyncio.Task:
    """Start ``ing`` and wait until its acknowledged cursor reaches ``cursor``."""
    task = asyncio.create_task(ing.run())
    deadline = time.monotonic() + timeout
    while ing.cursor != cursor:
        if task.done():
            task.result()
        assert time.monotonic() < deadline, f"cursor {ing.cursor} never reached {cursor}"
        await asyncio.sleep(0.05)
    return task


def fast_backoff() -> Backoff:
    return Backoff(base_s=0.05, cap_s=0.5)


# --- decoding (no broker) ----------------------------------------------------------------------------

def test_decode_commit_ops_to_events():
    t = T0 + 123_456
    root = sim_frames.strong_ref(f"at://{OTHER}/{sim_frames.POST}/3root", "bafyroot")
    parent = sim_frames.strong_ref(f"at://{OTHER}/{sim_frames.POST}/3parent", "bafyparent")
    quoted = sim_frames.strong_ref(f"at://{OTHER}/{sim_frames.POST}/3quoted", "bafyq")
    media_quote = {"$type": sim_frames.POST, "text": "media quote", "createdAt": sim_frames.iso_time(t),
                   "embed": {"$type": "app.bsky.embed.recordWithMedia",
                             "record": {"record": quoted}, "media": {"$type": "app.bsky.embed.images", "images": []}}}
    ops = [
        sim_frames.Op("create", sim_frames.POST, "3post", sim_frames.post_record("héllo 🌍 world", t, ["en", "fr"], reply=(root, parent), quote=quoted)),
        sim_frames.Op("create", sim_frames.POST, "3media", media_quote),
        sim_frames.Op("create", sim_frames.LIKE, "3like", sim_frames.like_record(parent, t)),
        sim_frames.Op("create", sim_frames.REPOST, "3repost", sim_frames.repost_record(quoted, t)),
        sim_frames.Op("create", sim_frames.FOLLOW, "3follow", sim_frames.follow_record(OTHER, t)),
        sim_frames.Op("delete", sim_frames.LIKE, "3gone"),
        sim_frames.Op("update", sim_frames.POST, "3post", sim_frames.post_record("edited", t)),  # updates are ignored
        sim_frames.Op("create", "app.bsky.actor.profile", "self", {"$type": "app.bsky.actor.profile"}),  # other collection
    ]
    d = decode_frame(sim_frames.commit_frame(BIG_SEQ, DID, ops, t))
    assert (d.type, d.seq, d.time_us, d.invalid) == ("#commit", BIG_SEQ, t, [])
    base = {"v": 1, "did": DID, "seq": BIG_SEQ, "time_us": t}

    def uri(coll, rkey):
        return f"at://{DID}/{coll}/{rkey}"

    assert d.events == [
        {**base, "kind": "post", "rkey": "3post", "uri": uri(sim_frames.POST, "3post"), "text": "héllo 🌍 world",
         "langs": ["en", "fr"], "reply_parent": parent["uri"], "reply_root": root["uri"], "quote_uri": quoted["uri"]},
        {**base, "kind": "post", "rkey": "3media", "uri": uri(sim_frames.POST, "3media"), "text": "media quote",
         "quote_uri": quoted["uri"]},
        {**base, "kind": "like", "rkey": "3like", "uri": uri(sim_frames.LIKE, "3like"), "subject_uri": parent["uri"],
         "subject_did": OTHER},
        {**base, "kind": "repost", "rkey": "3repost", "uri": uri(sim_frames.REPOST, "3repost"), "subject_uri": quoted["uri"],
         "subject_did": OTHER},
        {**base, "kind": "follow", "rkey": "3follow", "uri": uri(sim_frames.FOLLOW, "3follow"), "subject_did": OTHER,
         "rev": sim_frames.tid(t, BIG_SEQ & 0x3FF)},  # follows carry the commit's rev (commit_frame's default)
        {**base, "kind": "delete", "rkey": "3gone", "uri": uri(sim_frames.LIKE, "3gone"), "collection": sim_frames.LIKE},
    ]
    for ev in d.events:
        Event.model_validate(ev)


def test_decode_other_frame_types():
    acct = decode_frame(sim_frames.account_frame(BIG_SEQ, DID, False, "deleted", time_us=T0))
    assert acct.type == "#account" and acct.seq == BIG_SEQ
    assert acct.events == [{"v": 1, "kind": "account", "did": DID, "rkey": "", "uri": f"at://{DID}",
                            "seq": BIG_SEQ, "time_us": T0, "active": False, "status": "deleted"}]
    Event.model_validate(acct.events[0])
    back = decode_frame(sim_frames.account_frame(5, DID, True, time_us=T0))
    assert back.events[0]["active"] is True and "status" not in back.events[0]
    ident = decode_frame(sim_frames.identity_frame(6, DID, "alice.test", time_us=T0))
    assert (ident.type, ident.seq, ident.events, ident.invalid) == ("#identity", 6, [], [])
    sync = decode_frame(sim_frames.sync_frame(7, DID, time_us=T0))
    assert (sync.type, sync.seq, sync.events) == ("#sync", 7, [])
    info = decode_frame(sim_frames.info_frame("OutdatedCursor", "too old"))
    assert (info.type, info.seq, info.info) == ("#info", None, ("OutdatedCursor", "too old"))
    err = decode_frame(sim_frames.error_frame("FutureCursor", "ahead"))
    assert (err.type, err.error) == ("error", ("FutureCursor", "ahead"))


BAD_REASONS = {
    "malformed_cbor": "cbor", "truncated": "truncated", "header_only": "header",
    "car_missing_block": "missing_block", "bad_car": "car", "wrong_record_type": "record_type",
    "wrong_record_shape": "record_shape", "invalid_did": "invalid_did", "oversize": "too_large",
    "utf8_text": "record_utf8", "deep_record": "record_depth", "large_record": "record_too_large",
    "cbor_record": "record_cbor", "bad_subject_uri": "at_uri", "handle_subject": "uri_handle",
}


def test_decode_bad_frames_counted_by_reason():
    bad = sim_frames.bad_frames(seq=9)
    assert set(BAD_REASONS) | {"unknown_type"} == set(bad)
    for name, reason in BAD_REASONS.items():
        d = decode_frame(bad[name])
        assert d.events == [] and d.invalid == [reason], name
    unknown = decode_frame(bad["unknown_type"])
    assert (unknown.type, unknown.events, unknown.invalid) == ("unknown", [], [])
    # op-level problems skip the op, keep the rest of the commit
    t = T0
    ops = [sim_frames.Op("create", sim_frames.FOLLOW, "3a", sim_frames.follow_record("not-a-did", t)),
           sim_frames.Op("create", sim_frames.LIKE, "3b", sim_frames.like_record(sim_frames.strong_ref("at://alice.test/app.bsky.feed.post/1", "c"), t)),
           sim_frames.Op("create", sim_frames.LIKE, "3c", sim_frames.like_record(sim_frames.strong_ref("https://x/y", "c"), t)),
           sim_frames.Op("create", sim_frames.POST, "bad/rkey", sim_frames.post_record("x", t)),
           sim_frames.Op("create", sim_frames.POST, "3ok", sim_frames.post_record("fine", t))]
    d = decode_frame(sim_frames.commit_frame(10, DID, ops, t))
    assert d.invalid == ["invalid_did", "uri_handle", "at_uri", "op_shape"]
    assert [e["rkey"] for e in d.events] == ["3ok"]
    assert decode_frame("text frame").invalid == ["header"]


def test_ack_tracker_commits_highest_contiguous_acked_seq():
    tr = AckTracker(cursor=100)
    a = tr.add(101, 1, 2)
    b = tr.add(102, 2, 0)  # no events: complete at once, but behind 101
    c = tr.add(2**33, 3, 1)
    assert tr.cursor == 100
    tr.ack(c)
    assert tr.cursor == 100  # 101 still has unacknowledged events
    tr.ack(a)
    assert tr.cursor == 100
    tr.ack(a)
    assert (tr.cursor, tr.cursor_time_us, tr.pending) == (2**33, 3, 0)
    del b


def test_cursor_store_roundtrip_per_relay_and_corruption(tmp_path):
    s1 = CursorStore(tmp_path, "ws://a/xrpc")
    s2 = CursorStore(tmp_path, "ws://b/xrpc")
    assert s1.load() is None
    s1.save(2**45)
    s1.save(2**45 + 1)
    s2.save(3)
    assert (s1.load(), s2.load()) == (2**45 + 1, 3)
    assert sorted(p.name.startswith("ingest-cursor-") for p in tmp_path.iterdir()) == [True, True]  # no temp files
    s1.path.write_text("{not json")
    with pytest.raises(CursorError, match="corrupt"):
        s1.load()


# --- end to end (real relay, real embedded broker) ------------------------------------------------------

def test_population_end_to_end_exact(fresh_broker, tmp_path):
    """Every generated post/like/repost/follow/delete arrives once with its content; #account
    deactivations arrive as retractions; bad frames are counted by reason and skipped."""
    pop = Population(100, seed=3)
    good = list(pop.timed_frames())
    last = good[-1][0]
    names = sorted(sim_frames.bad_frames())
    items = good + [(last + 1 + i, good[-1][1], sim_frames.bad_frames(seq=last + 1 + i, time_us=good[-1][1])[name])
                    for i, name in enumerate(names)]
    tail = sim_frames.commit_frame(last + 100, DID, [sim_frames.Op("create", sim_frames.POST, "3tail", sim_frames.post_record("tail", T0))], T0)
    items.append((last + 100, T0, tail))
    before = {r: metric("chorus_ingest_frames_invalid_total", reason=r) for r in BAD_REASONS.values()}
    unknown_before = metric("chorus_ingest_frames_total", type="unknown")

    async def main():
        async with Relay(FrameSource(lambda: iter(items), items[0][0], items[-1][0])) as relay:
            ing = Ingester(settings(fresh_broker, tmp_path), relay=relay.url, queue_size=64)
            task = await run_until(ing, last + 100)
            await ing.stop()
            await task
            return ing

    ing = asyncio.run(asyncio.wait_for(main(), 60))
    assert ing.reader.duplicates == 0
    assert CursorStore(tmp_path / "state", ing.relay).load() == last + 100
    expected = population_truth(pop)
    expected[canon({"kind": "post", "did": DID, "rkey": "3tail", "uri": f"at://{DID}/{sim_frames.POST}/3tail",
                    "seq": last + 100, "time_us": T0, "text": "tail"})] += 1
    n_acct = pop.expected()["account"]
    values = asyncio.run(consume_all(fresh_broker.bootstrap, sum(expected.values()) + n_acct))
    recs, accts = split(values)
    assert recs == expected  # exact: nothing missing, nothing extra, content identical
    assert accts == account_dids(pop) and sum(accts.values()) == n_acct
    e = pop.expected()
    kinds = Counter(v["kind"] for v in values)
    assert kinds["post"] == e["post"] + 1 and kinds["like"] == e["like"] and kinds["repost"] == e["repost"]
    assert kinds["follow"] == e["follow"] and kinds["delete"] == e["delete"]
    for reason in BAD_REASONS.values():
        assert metric("chorus_ingest_frames_invalid_total", reason=reason) == before[reason] + 1, reason
    assert metric("chorus_ingest_frames_total", type="unknown") == unknown_before + 1
    assert metric("chorus_ingest_cursor") == last + 100


def test_relay_drops_connection_reconnects_without_loss(fresh_broker, tmp_path):
    pop = Population(60, seed=5)
    frames = list(pop.timed_frames())
    last = frames[-1][0]

    async def main():
        relay = Relay(FrameSource(lambda: iter(frames), 1, last), drop_after=len(frames) // 3, max_drops=2)
        async with relay:
            ing = Ingester(settings(fresh_broker, tmp_path), relay=relay.url, backoff=fast_backoff())
            task = await run_until(ing, last)
            await ing.stop()
            await task
            return ing, relay.connections

    ing, conns = asyncio.run(asyncio.wait_for(main(), 60))
    assert sum(c.dropped for c in conns) == 2 and len(conns) >= 3
    assert ing.reader.connections == len(conns) and ing.reader.skipped == 0  # lost connections, no lost input
    # every reconnect resumed from an acknowledged cursor, not from scratch
    assert all(c.cursor is not None and c.cursor > 0 for c in conns[1:])
    expected = population_truth(pop)
    values = asyncio.run(consume_all(fresh_broker.bootstrap, sum(expected.values()) + pop.expected()["account"]))
    recs, accts = split(values)
    assert set(recs) == set(expected)  # nothing missing
    assert all(recs[k] >= n for k, n in expected.items())
    dupes = sum(recs.values()) - sum(expected.values())
    assert dupes == 0, f"{dupes} duplicates (replays are dropped by seq within one process)"


def test_outdated_cursor_counts_the_frames_skipped(fresh_broker, tmp_path):
    """A cursor older than the relay's retention: the relay answers OutdatedCursor and starts at its
    oldest retained frame; the frames in between are lost, and the ingester says how many."""
    frames = [(s, T0 + s, sim_frames.commit_frame(s, DID, [sim_frames.Op("create", sim_frames.POST, f"3p{s}", sim_frames.post_record(f"p{s}", T0 + s))],
                                         T0 + s)) for s in range(1, 41)]
    names = ("chorus_ingest_skipped_frames_total", "chorus_ingest_outdated_cursor_total", "chorus_ingest_reconnects_total")

    async def main():
        # retention 10 frames, trimmed frame by frame (chunk 1): seqs 31..40 retained once all are out
        async with Relay(FrameSource(lambda: iter(frames), 1, 40), rate=100_000, retention=10, chunk=1) as relay:
            while relay.produced < 40:
                await asyncio.sleep(0.01)
            assert relay.oldest_seq == 31
            before = [metric(n) for n in names]
            ing = Ingester(settings(fresh_broker, tmp_path), relay=relay.url, cursor=5, backoff=fast_backoff())
            task = await run_until(ing, 40)
            await ing.stop()
            await task
            return relay.connections, [metric(n) - b for n, b in zip(names, before)], ing.reader.skipped

    conns, deltas, skipped = asyncio.run(asyncio.wait_for(main(), 60))
    assert conns[0].cursor == 5 and conns[0].info == ["OutdatedCursor"] and conns[0].first_seq == 31
    lost = list(range(6, 31))  # after the cursor, before the oldest retained frame
    assert skipped == len(lost) == conns[0].skipped and deltas == [len(lost), 1, len(conns) - 1]
    values = asyncio.run(consume_all(fresh_broker.bootstrap, 10))
    assert sorted(v["text"] for v in values) == sorted(f"p{s}" for s in range(31, 41))


def test_future_cursor_restarts_live(fresh_broker, tmp_path):
    frames = [(s, T0 + s, sim_frames.commit_frame(s, DID, [sim_frames.Op("create", sim_frames.POST, f"3p{s}", sim_frames.post_record(f"p{s}", T0 + s))],
                                         T0 + s)) for s in range(1, 41)]

    async def main():
        async with Relay(FrameSource(lambda: iter(frames), 1, 40)) as relay:
            ing = Ingester(settings(fresh_broker, tmp_path), relay=relay.url, cursor=BIG_SEQ, backoff=fast_backoff())
            task = await run_until(ing, 40)
            await ing.stop()
            await task
            return relay.connections

    conns = asyncio.run(asyncio.wait_for(main(), 60))
    assert conns[0].cursor == BIG_SEQ and conns[0].error == "FutureCursor"
    assert conns[1].cursor is None  # restarted live
    values = asyncio.run(consume_all(fresh_broker.bootstrap, 40))
    assert sorted(v["text"] for v in values) == sorted(f"p{s}" for s in range(1, 41))


def test_kafka_stall_backpressure_falls_behind_without_loss(fresh_broker, tmp_path):
    """Broker frozen (SIGSTOP): the bounded queue fills, the reader stops reading, the lag grows;
    after SIGCONT everything arrives."""
    pop = Population(60, seed=7)
    frames = list(pop.timed_frames())
    last = frames[-1][0]
    proc = fresh_broker._proc

    async def main():
        async with Relay(FrameSource(lambda: iter(frames), 1, last), rate=2000) as relay:
            ing = Ingester(settings(fresh_broker, tmp_path), relay=relay.url, queue_size=32,
                           producer_options={"max_batch_size": 16 * 1024})
            task = asyncio.create_task(ing.run())
            while ing.cursor is None or ing.cursor < 50:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                peak = 0
                t_end = time.monotonic() + 2.5
                while time.monotonic() < t_end:
                    peak = max(peak, ing.queue.qsize())
                    await asyncio.sleep(0.01)
                stalled_at = ing.cursor
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            while ing.cursor != last:
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
            await ing.stop()
            await task
            return peak, stalled_at

    peak, stalled_at = asyncio.run(asyncio.wait_for(main(), 60))
    assert peak <= 32  # bounded: the reader waited instead of buffering without limit
    assert stalled_at < last  # it fell behind while Kafka was frozen
    expected = population_truth(pop)
    values = asyncio.run(consume_all(fresh_broker.bootstrap, sum(expected.values()) + pop.expected()["account"]))
    recs, _ = split(values)
    assert set(recs) == set(expected)


# --- the `chorus ingest` process -------------------------------------------------------------------------

class ThreadRelay:
    """A Relay on its own event loop in a thread (so a subprocess can connect while the test waits)."""

    def __init__(self, source, **kw):
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.relay = Relay(source, **kw)
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        assert self._ready.wait(15)

    def _main(self):
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self.relay.start())
        self._ready.set()
        self._loop.run_forever()

    def close(self):
        asyncio.run_coroutine_threadsafe(self.relay.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def chorus(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stream.cli", "ingest", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[3], **kw)


def test_sigkill_and_restart_loses_nothing(fresh_broker, tmp_path):
    pop = Population(250, seed=11, graph_on_firehose=True)  # a long stream that starts with follows
    frames = list(pop.timed_frames())
    last = frames[-1][0]
    relay = ThreadRelay(FrameSource(lambda: iter(frames), 1, last), rate=1500)
    port = free_port()
    env = {"CHORUS_KAFKA": fresh_broker.url, "CHORUS_KAFKA_IDEMPOTENCE": "false",
           "CHORUS_STATE_DIR": str(tmp_path / "state"), "CHORUS_METRICS_PORT": str(port)}
    store = CursorStore(tmp_path / "state", relay.relay.url)
    procs = []
    try:
        p1 = chorus("--relay", relay.relay.url, env=env)
        procs.append(p1)
        deadline = time.monotonic() + 40
        while (store.load() or 0) < last // 4:
            assert p1.poll() is None, p1.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "first ingester made no progress"
            time.sleep(0.05)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "chorus_ingest_cursor " in scraped and 'chorus_events_published_total{kind="follow"}' in scraped
        p1.send_signal(signal.SIGKILL)
        p1.wait(10)
        killed_at = store.load()
        assert killed_at < last, "killed too late to test anything"
        p2 = chorus("--relay", relay.relay.url, env=env)
        procs.append(p2)
        deadline = time.monotonic() + 60
        while store.load() != last:
            assert p2.poll() is None, p2.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"restarted ingester stuck at {store.load()}"
            time.sleep(0.1)
        conns = relay.relay.connections
        assert conns[-1].cursor is not None and conns[-1].cursor >= killed_at  # resumed, not restarted
        p2.send_signal(signal.SIGTERM)
        assert p2.wait(20) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        relay.close()
    expected = population_truth(pop)
    values = asyncio.run(consume_all(fresh_broker.bootstrap, sum(expected.values()) + pop.expected()["account"],
                                     timeout=40))
    recs, accts = split(values)
    missing = set(expected) - set(recs)
    assert not missing, f"{len(missing)} events missing after SIGKILL + restart"
    dupes = sum(recs.values()) - sum(expected.values())
    print(f"SIGKILL at cursor {killed_at}/{last}: {dupes} duplicate events (allowed)")
    assert dupes >= 0 and set(accts) == set(account_dids(pop))


def test_cli_unreachable_kafka_fails_in_one_line(tmp_path):
    closed = free_port()
    p = chorus("--kafka", f"kafka://127.0.0.1:{closed}", "--relay", "ws://127.0.0.1:1/xrpc",
               env={"CHORUS_STATE_DIR": str(tmp_path), "CHORUS_METRICS_PORT": str(free_port())})
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chorus: error: cannot reach Kafka"), lines


@pytest.mark.parametrize("args, message", [
    (["--relay", "http://x/xrpc"], "ws://"),
    (["--kafka", "http://x:1"], "kafka://"),
    (["--cursor", "-5"], "cursor"),
])
def test_cli_bad_flags_fail_in_one_line(tmp_path, args, message):
    """In-process (tests/helpers/cli.py); the real `chorus ingest` process is the test above's."""
    env = {"CHORUS_KAFKA": "kafka://127.0.0.1:1", "CHORUS_STATE_DIR": str(tmp_path)}
    p = invoke(["ingest", *args], env)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], (p.returncode, lines)


def test_cli_without_kafka_is_a_usage_error(tmp_path, monkeypatch):
    """No Kafka configured is a setting error: exit 2, as `chorus worker` and `chorus backfill`."""
    monkeypatch.delenv("CHORUS_KAFKA", raising=False)
    p = invoke(["ingest", "--relay", "ws://127.0.0.1:1/xrpc"], {"CHORUS_STATE_DIR": str(tmp_path)})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "no Kafka configured" in lines[0], (p.returncode, lines)


def test_ingester_rejects_bad_settings(tmp_path):
    with pytest.raises(IngestError, match="no Kafka"):
        Ingester(Settings(kafka=None, state_dir=tmp_path))
    CursorStore(tmp_path, "ws://r/xrpc").path.write_text("garbage")
    with pytest.raises(IngestError, match="corrupt"):
        Ingester(Settings(kafka="kafka://h:1", state_dir=tmp_path), relay="ws://r/xrpc")


def test_backoff_exponential_with_jitter_and_reset():
    b = Backoff(base_s=0.5, cap_s=4.0)
    delays = [b.next() for _ in range(6)]
    for n, d in enumerate(delays, start=1):
        ceiling = min(4.0, 0.5 * 2 ** (n - 1))
        assert 0.5 * ceiling <= d <= ceiling
    b.reset()
    assert b.next() <= 0.5


def test_consumer_too_slow_reconnects_from_acknowledged_cursor(fresh_broker, tmp_path):
    """A relay that sends ConsumerTooSlow and hangs up: the ingester dials again with the last
    acknowledged cursor and ends with every event exactly once."""
    import websockets
    from websockets.asyncio.server import serve

    frames = {s: sim_frames.commit_frame(s, DID, [sim_frames.Op("create", sim_frames.POST, f"3p{s}", sim_frames.post_record(f"p{s}", T0 + s))], T0 + s)
              for s in range(1, 31)}
    cursors: list[int | None] = []

    async def handler(ws):
        q = dict(p.split("=") for p in ws.request.path.partition("?")[2].split("&") if p)
        cursor = int(q["cursor"]) if "cursor" in q else None
        cursors.append(cursor)
        first = (cursor or 0) + 1
        try:
            if len(cursors) == 1:
                for s in range(first, 16):
                    await ws.send(frames[s])
                await ws.send(sim_frames.error_frame("ConsumerTooSlow", "you are too slow"))
                await ws.close()
                return
            for s in range(first, 31):
                await ws.send(frames[s])
            await ws.wait_closed()
        except websockets.ConnectionClosed:
            pass

    async def main():
        async with serve(handler, "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/xrpc"
            before = metric("chorus_ingest_frames_total", type="error")
            ing = Ingester(settings(fresh_broker, tmp_path), relay=url, backoff=fast_backoff())
            task = await run_until(ing, 30)
            await ing.stop()
            await task
            return before

    before = asyncio.run(asyncio.wait_for(main(), 60))
    assert cursors[0] is None and len(cursors) >= 2 and cursors[1] is not None and 1 <= cursors[1] <= 15
    assert metric("chorus_ingest_frames_total", type="error") == before + 1
    values = asyncio.run(consume_all(fresh_broker.bootstrap, 30))
    assert sorted(v["text"] for v in values) == sorted(f"p{s}" for s in range(1, 31))  # exactly once

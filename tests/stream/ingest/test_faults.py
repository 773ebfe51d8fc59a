"""Ingest under the faults real networks produce, one group per kind (issue 14).

1. a relay whose seq numbering goes back (reset / restore) -> detected, counted, followed;
2. one undecodable part of a commit -> only that op is lost (deletes never are);
3. a PDS-set time far in the future -> cannot move the event-time clock;
4. reference AT-URIs -> checked against the AT Protocol interop syntax vectors.

Expectations are built by hand (event dicts) or come from the vectors' files, never from the
decoder's own output. Reader tests use the real loopback relay and websockets without Kafka; the
issue's exact reset scenario also runs end to end into the embedded broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import libipld
import pytest
from prometheus_client import REGISTRY

from stream import protocol
from stream.config import Settings
from stream.ingest.cursor import CursorStore
from stream.ingest.decode import MAX_RECORD_DEPTH, decode_frame
from stream.ingest.normalize import FUTURE_TOLERANCE_US
from stream.ingest.reader import Backoff, FirehoseReader
from stream.ingest.service import Ingester
from stream.local.broker import free_port
from stream.sim import frames as sim_frames
from stream.sim.relay import FrameSource, Relay
from stream.worker.windows import WindowStore

pytestmark = pytest.mark.timeout(90)

T0 = 1_735_689_600_000_000
DID = "did:plc:faults00000000000000000a"
OTHER = "did:plc:faults00000000000000000b"
VECTORS = Path(__file__).parents[2] / "data" / "atproto-syntax"


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def post(seq: int, t: int | None = None, did: str = DID) -> tuple[int, int, bytes]:
    t = T0 + seq if t is None else t
    return seq, t, sim_frames.commit_frame(seq, did, [sim_frames.Op("create", sim_frames.POST, f"3p{seq}", sim_frames.post_record(f"p{seq}", t))], t)


def expected_post(seq: int, t: int | None = None) -> dict:
    t = T0 + seq if t is None else t
    return {"v": 1, "kind": "post", "did": DID, "rkey": f"3p{seq}", "uri": f"at://{DID}/{sim_frames.POST}/3p{seq}",
            "seq": seq, "time_us": t, "text": f"p{seq}"}


def source(items: list[tuple[int, int, bytes]]) -> FrameSource:
    return FrameSource(lambda: iter(items), items[0][0], max(s for s, _, _ in items))


async def read(relay: Relay, cursor: int | None, done, timeout: float = 20.0):
    """A FirehoseReader on ``relay`` dialing ``cursor`` first (then the last forwarded seq, as if
    Kafka acknowledged at once) until ``done(forwarded)``; returns (reader, forwarded frames)."""
    got = []

    async def sink(d):
        got.append(d)

    reader = FirehoseReader(relay.url, sink, lambda: got[-1].seq if got else cursor,
                            backoff=Backoff(base_s=0.05, cap_s=0.2))
    reader.last_seq = cursor
    task = asyncio.create_task(reader.run())
    deadline = time.monotonic() + timeout
    try:
        while not done(got):
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, f"forwarded {[d.seq for d in got]}"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # anything extra would show up now
    finally:
        await reader.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return reader, got


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


# --- 1. sequence resets ------------------------------------------------------------------------------

def test_seq_reset_from_stored_cursor_end_to_end(fresh_broker, tmp_path, caplog):
    """The issue's input: cursor file 4170910000, a relay whose frames are seq 1001..1005 and that
    sends no error frame. All 5 are published, the reset is logged and counted, and the stored
    cursor follows the new numbering."""
    from tests.stream.ingest.test_ingest import consume_all

    settings = Settings(kafka=fresh_broker.url, kafka_idempotence=False, state_dir=tmp_path / "state")
    items = [post(s) for s in range(1001, 1006)]
    resets, replays = metric("chorus_ingest_seq_resets_total"), metric("chorus_ingest_replayed_frames_total")

    async def main():
        async with Relay(source(items), future_cursor="ignore") as relay:
            CursorStore(settings.state_dir, relay.url).save(4_170_910_000)
            ing = Ingester(settings, relay=relay.url)
            task = asyncio.create_task(ing.run())
            deadline = time.monotonic() + 30
            while ing.cursor != 1005:
                assert not task.done() and time.monotonic() < deadline, ing.cursor
                await asyncio.sleep(0.05)
            await ing.stop()
            await task
            return relay.connections, CursorStore(settings.state_dir, relay.url).load()

    with caplog.at_level(logging.ERROR, logger="chorus.ingest"):
        conns, stored = run(main())
    assert conns[0].cursor == 4_170_910_000 and conns[0].error is None
    assert stored == 1005
    assert metric("chorus_ingest_seq_resets_total") == resets + 1
    assert metric("chorus_ingest_replayed_frames_total") == replays
    assert any("4170910000" in r.getMessage() and "1001" in r.getMessage() for r in caplog.records
               if r.levelno == logging.ERROR)
    values = asyncio.run(consume_all(fresh_broker.bootstrap, 5))
    assert sorted(values, key=lambda v: v["seq"]) == [expected_post(s) for s in range(1001, 1006)]


def test_restored_relay_below_cursor_is_followed_and_normal_resume_is_not_a_reset():
    """A relay restored from a backup (numbering 2,000 lower, no FutureCursor): followed once;
    dialing it again inside its numbering is an ordinary resume."""
    items = [post(s) for s in range(3001, 3011)]

    async def main():
        async with Relay(source(items), future_cursor="ignore") as relay:
            r1, got1 = await read(relay, 5000, lambda g: len(g) >= 10)
            r2, got2 = await read(relay, 3004, lambda g: len(g) >= 6)
            return r1, got1, r2, got2

    resets = metric("chorus_ingest_seq_resets_total")
    r1, got1, r2, got2 = run(main())
    assert [d.seq for d in got1] == list(range(3001, 3011)) and r1.resets == 1
    assert [d.seq for d in got2] == list(range(3005, 3011)) and r2.resets == 0
    assert metric("chorus_ingest_seq_resets_total") == resets + 1


def test_future_cursor_counts_as_a_reset():
    items = [post(s) for s in range(1, 21)]

    async def main():
        async with Relay(source(items)) as relay:  # answers FutureCursor, then serves from its start
            reader, got = await read(relay, 10**12, lambda g: len(g) >= 20)
            return reader, got, relay.connections

    reader, got, conns = run(main())
    assert conns[0].error == "FutureCursor" and conns[1].cursor is None
    assert reader.resets == 1 and [d.seq for d in got] == list(range(1, 21))


def test_replays_within_a_connection_are_dropped_and_counted():
    """A relay that resends frames inside one connection (seq 1..6, then 4..6 again, then 7, 8)."""
    base = [post(s) for s in range(1, 9)]
    items = base[:6] + base[3:6] + base[6:]
    replays = metric("chorus_ingest_replayed_frames_total")

    async def main():
        async with Relay(FrameSource(lambda: iter(items), 1, 8)) as relay:
            return await read(relay, None, lambda g: len(g) >= 8)

    reader, got = run(main())
    assert [d.seq for d in got] == list(range(1, 9))
    assert reader.duplicates == 3 and reader.resets == 0
    assert metric("chorus_ingest_replayed_frames_total") == replays + 3


# --- 2. one op, one fate ---------------------------------------------------------------------------

def _with_blocks(frame: bytes, blocks) -> bytes:
    header, body = sim_frames.split_frame(frame)
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body | {"blocks": blocks})


def _delete_event(seq: int, rkey: str = "3kdel", collection: str = sim_frames.LIKE) -> dict:
    return {"v": 1, "kind": "delete", "did": DID, "rkey": rkey, "uri": f"at://{DID}/{collection}/{rkey}",
            "seq": seq, "time_us": T0, "collection": collection}


CREATE = sim_frames.Op("create", sim_frames.POST, "3kpost", sim_frames.post_record("lost", T0))
DELETE = sim_frames.Op("delete", sim_frames.LIKE, "3kdel")


@pytest.mark.parametrize("blocks, reason", [
    (b"", "car"),  # an empty CAR
    (None, "car"),  # no CAR at all
    (b"\x05junk!", "car"),  # not a CAR
    (sim_frames.encode_car([sim_frames.cid_of(b"\xa0")], []), "missing_block"),  # header only: the root block is missing
])
@pytest.mark.parametrize("order", ["create_first", "delete_first"])
def test_delete_survives_any_car(blocks, reason, order):
    ops = [CREATE, DELETE] if order == "create_first" else [DELETE, CREATE]
    d = decode_frame(_with_blocks(sim_frames.commit_frame(7, DID, ops, T0), blocks))
    assert d.events == [_delete_event(7)]
    assert d.invalid == [reason]


def test_car_without_root_block_still_yields_its_records():
    rec = sim_frames.post_record("kept", T0)
    cid, data = sim_frames.encode_record(rec)
    car = sim_frames.encode_car([sim_frames.cid_of(b"commit block that is not there")], [(cid, data)])
    d = decode_frame(_with_blocks(sim_frames.commit_frame(8, DID, [sim_frames.Op("create", sim_frames.POST, "3kpost", rec), DELETE], T0), car))
    assert d.invalid == []
    assert d.events == [{"v": 1, "kind": "post", "did": DID, "rkey": "3kpost", "uri": f"at://{DID}/{sim_frames.POST}/3kpost",
                         "seq": 8, "time_us": T0, "text": "kept"}, _delete_event(8)]


def _post_block(text: str = "zz~~", **extra) -> bytes:
    return libipld.encode_dag_cbor(sim_frames.post_record(text, T0) | extra)


def _nest(levels: int):
    """``levels`` lists inside each other (in a record: nesting depth 1 + levels)."""
    v: object = 0
    for _ in range(levels):
        v = [v]
    return v


def test_each_bad_record_is_skipped_by_reason_and_the_rest_kept():
    good_post = sim_frames.post_record("fine", T0)
    like = sim_frames.like_record(sim_frames.strong_ref(f"at://{OTHER}/{sim_frames.POST}/3kliked", "bafyc"), T0)
    utf8 = _post_block(x=0).replace(b"\x64zz~~", b"\x64zz\xff\xfe")
    hugely_deep = _post_block(x=0).replace(b"\x61x\x00", b"\x61x" + b"\x81" * 50_000 + b"\x00")
    ops = [
        sim_frames.Op("create", sim_frames.POST, "3k1", good_post),
        sim_frames.Op("create", sim_frames.POST, "3k2", utf8),
        sim_frames.Op("create", sim_frames.POST, "3k3", sim_frames.post_record("deep", T0) | {"x": _nest(MAX_RECORD_DEPTH)}),
        sim_frames.Op("create", sim_frames.POST, "3k4", hugely_deep),
        sim_frames.Op("create", sim_frames.POST, "3k5", sim_frames.post_record("big", T0) | {"x": "y" * 270_000}),
        sim_frames.Op("create", sim_frames.POST, "3k6", sim_frames.post_record("t" * 100_001, T0)),
        sim_frames.Op("create", sim_frames.POST, "3k7", b"\xff\xff not dag-cbor"),
        DELETE,
        sim_frames.Op("create", sim_frames.LIKE, "3k8", like),
        sim_frames.Op("create", sim_frames.POST, "3k9", sim_frames.post_record("deep enough", T0) | {"x": _nest(MAX_RECORD_DEPTH - 1)}),
    ]
    d = decode_frame(sim_frames.commit_frame(9, DID, ops, T0))
    assert d.invalid == ["record_utf8", "record_depth", "record_depth", "record_too_large", "record_too_large",
                         "record_cbor"]
    base = {"v": 1, "did": DID, "seq": 9, "time_us": T0}
    assert d.events == [
        {**base, "kind": "post", "rkey": "3k1", "uri": f"at://{DID}/{sim_frames.POST}/3k1", "text": "fine"},
        _delete_event(9),
        {**base, "kind": "like", "rkey": "3k8", "uri": f"at://{DID}/{sim_frames.LIKE}/3k8",
         "subject_uri": f"at://{OTHER}/{sim_frames.POST}/3kliked", "subject_did": OTHER},
        {**base, "kind": "post", "rkey": "3k9", "uri": f"at://{DID}/{sim_frames.POST}/3k9", "text": "deep enough"},
    ]


def test_truncated_car_keeps_the_blocks_before_the_cut():
    a, b = sim_frames.post_record("first", T0), sim_frames.post_record("second " * 40, T0)
    frame = sim_frames.commit_frame(10, DID, [sim_frames.Op("create", sim_frames.POST, "3ka", a), sim_frames.Op("create", sim_frames.POST, "3kb", b), DELETE], T0)
    car = sim_frames.split_frame(frame)[1]["blocks"]
    d = decode_frame(_with_blocks(frame, car[:-20]))  # the last block (b's) is cut short
    assert [e["rkey"] for e in d.events] == ["3ka", "3kdel"] and d.invalid == ["car"]


# --- 3. untrusted timestamps -------------------------------------------------------------------------

H48_US = 48 * 3600 * 10**6


def test_future_commit_time_is_clamped_to_receive_time():
    now = T0 + 10**9
    future = decode_frame(post(1, now + H48_US)[2], received_us=now)
    assert [e["time_us"] for e in future.events] == [now + FUTURE_TOLERANCE_US] and future.clamped == 1
    within = decode_frame(post(2, now + FUTURE_TOLERANCE_US)[2], received_us=now)
    past = decode_frame(post(3, now - H48_US)[2], received_us=now)
    assert within.events[0]["time_us"] == now + FUTURE_TOLERANCE_US and within.clamped == 0
    assert past.events[0]["time_us"] == now - H48_US and past.clamped == 0  # replays are legitimately old
    acct = decode_frame(sim_frames.account_frame(4, DID, False, "deleted", time_us=now + H48_US), received_us=now)
    assert acct.events[0]["time_us"] == now + FUTURE_TOLERANCE_US and acct.clamped == 1


def test_one_future_commit_cannot_blind_the_window():
    """One commit 48 h ahead among on-time ones, then 10 on-time posts, through the worker's window
    store (default 6 h window): with receive-time clamping none is late; trusting the PDS's time
    (no receive time), all 10 would be dropped as late."""
    now = T0
    frames = [post(s, now + s * 10**6)[2] for s in range(1, 6)]
    frames.append(post(6, now + H48_US)[2])
    frames += [post(s, now + s * 10**6)[2] for s in range(7, 17)]

    def late(received: bool) -> int:
        store = WindowStore(6 * 3600, 60, lambda text: ((), 0))
        for i, raw in enumerate(frames):
            for ev in decode_frame(raw, received_us=now + i * 10**6 if received else None).events:
                store.process(ev)
        return store.stats["late"]

    assert late(received=True) == 0
    assert late(received=False) == 10  # the fault the clamp removes


def test_reader_clamps_with_its_receive_time_and_counts():
    wall = time.time_ns() // 1000
    items = [post(1, wall - 10**6), post(2, wall + H48_US), post(3, wall)]
    clamped = metric("chorus_ingest_event_time_clamped_total")

    async def main():
        async with Relay(source(items)) as relay:
            return await read(relay, None, lambda g: len(g) >= 3)

    before = time.time_ns() // 1000
    _, got = run(main())
    after = time.time_ns() // 1000
    t = [d.events[0]["time_us"] for d in got]
    assert t[0] == wall - 10**6 and t[2] == wall
    assert before + FUTURE_TOLERANCE_US <= t[1] <= after + FUTURE_TOLERANCE_US
    assert metric("chorus_ingest_event_time_clamped_total") == clamped + 1


# --- 4. reference URIs ------------------------------------------------------------------------------

def vectors(name: str) -> list[str]:
    """Lines of an interop vector file (comments and blank lines dropped, whitespace kept)."""
    return [line for line in (VECTORS / name).read_text().split("\n") if line and not line.startswith("#")]


def _like_of(uri: str, seq: int = 11) -> bytes:
    return sim_frames.commit_frame(seq, DID, [sim_frames.Op("create", sim_frames.LIKE, "3klike", sim_frames.like_record(sim_frames.strong_ref(uri, "bafyc"), T0))], T0)


def test_invalid_interop_at_uris_are_rejected_as_like_subjects():
    bad = vectors("aturi_syntax_invalid.txt")
    assert len(bad) == 72
    before = metric("chorus_ingest_frames_invalid_total", reason="at_uri")
    for uri in bad:
        d = decode_frame(_like_of(uri))
        assert d.events == [] and d.invalid == ["at_uri"], uri[:80]
    # the ones the issue named, by kind
    for uri in [f"at://{DID}/com.atproto.feed_post", f"at://{DID}/{sim_frames.POST}/..", f"at://{DID}/{sim_frames.POST}/%zz",
                f"at://{DID}/{sim_frames.POST}/3k#frag", f"at://{DID}/{sim_frames.POST}/3k/extra", f"at://{DID}/{sim_frames.POST}/" + "o" * 8000]:
        assert decode_frame(_like_of(uri)).invalid == ["at_uri"], uri[:80]
    assert metric("chorus_ingest_frames_invalid_total", reason="at_uri") == before  # decode only counts in the reader


def test_valid_interop_at_uris_are_accepted_as_like_subjects():
    good = vectors("aturi_syntax_valid.txt")
    assert len(good) == 23
    for uri in good:
        d = decode_frame(_like_of(uri))
        authority = uri[5:].split("/")[0]
        if authority.startswith("did:"):
            assert d.invalid == [] and len(d.events) == 1, uri[:80]
            assert (d.events[0]["subject_uri"], d.events[0]["subject_did"]) == (uri, authority)
        else:  # a handle: valid syntax, but chorus credits by DID and does not resolve handles
            assert d.events == [] and d.invalid == ["uri_handle"], uri


def test_reply_and_quote_references_follow_the_same_rule():
    ok = sim_frames.strong_ref(f"at://{OTHER}/{sim_frames.POST}/3kok", "bafyc")
    bad = sim_frames.strong_ref(f"at://{OTHER}/{sim_frames.POST}/..", "bafyc")
    ops = [sim_frames.Op("create", sim_frames.POST, "3k1", sim_frames.post_record("r", T0, reply=(ok, bad))),
           sim_frames.Op("create", sim_frames.POST, "3k2", sim_frames.post_record("q", T0, quote=bad)),
           sim_frames.Op("create", sim_frames.REPOST, "3k3", sim_frames.repost_record(bad, T0)),
           sim_frames.Op("create", sim_frames.POST, "3k4", sim_frames.post_record("fine", T0, reply=(ok, ok), quote=ok))]
    d = decode_frame(sim_frames.commit_frame(12, DID, ops, T0))
    assert d.invalid == ["at_uri"] * 3 and [e["rkey"] for e in d.events] == ["3k4"]


def test_op_paths_use_the_record_key_rules():
    for rkey in vectors("recordkey_syntax_valid.txt"):
        d = decode_frame(sim_frames.commit_frame(13, DID, [sim_frames.Op("delete", sim_frames.POST, rkey)], T0))
        assert [e["rkey"] for e in d.events] == [rkey]
    for rkey in vectors("recordkey_syntax_invalid.txt"):
        d = decode_frame(sim_frames.commit_frame(13, DID, [sim_frames.Op("delete", sim_frames.POST, rkey)], T0))
        assert d.events == [] and d.invalid == ["op_shape"], rkey[:40]


@pytest.mark.parametrize("kind, check", [
    ("aturi", protocol.is_at_uri), ("nsid", protocol.is_nsid), ("recordkey", protocol.is_record_key),
    ("did", protocol.is_did), ("handle", protocol.is_handle),
])
def test_protocol_syntax_matches_the_interop_vectors(kind, check):
    valid, invalid = vectors(f"{kind}_syntax_valid.txt"), vectors(f"{kind}_syntax_invalid.txt")
    assert valid and invalid
    assert [v for v in valid if not check(v)] == []
    assert [v[:80] for v in invalid if check(v)] == []


def test_protocol_accepts_dids_the_sdk_uri_regex_refuses():
    for did in ("did:web:localhost%3A8080", "did:method:a:b", "did:plc:a_b"):
        assert protocol.parse_at_uri(f"at://{did}/{sim_frames.POST}/3k") == (did, sim_frames.POST, "3k")
    assert not protocol.is_did("did:web:bad%zz")


# --- Kafka without idempotent producers -------------------------------------------------------------

def test_cli_says_idempotence_is_refused_and_how_to_turn_it_off(broker, tmp_path):
    env = {**os.environ, "CHORUS_KAFKA": broker.url, "CHORUS_STATE_DIR": str(tmp_path),
           "CHORUS_METRICS_PORT": str(free_port())}
    env.pop("CHORUS_KAFKA_IDEMPOTENCE", None)
    p = subprocess.run([sys.executable, "-m", "stream.cli", "ingest", "--relay", "ws://127.0.0.1:1/xrpc"],
                       env=env, capture_output=True, timeout=80, cwd=Path(__file__).parents[3])
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, lines
    assert lines[0].startswith("chorus: error: Kafka at ") and "idempotent" in lines[0]
    assert "CHORUS_KAFKA_IDEMPOTENCE=false" in lines[0]


def test_car_split_agrees_with_libipld_on_every_commit():
    """The per-op CAR reader (``car_sections``) against libipld's whole-CAR decoder as the
    independent reference, on every commit of a population and on CIDv0 / raw-codec blocks."""
    from stream.ingest.decode import car_sections
    from stream.sim.synth import Population

    cars = [sim_frames.split_frame(f)[1]["blocks"] for _, _, f in Population(60, seed=2).timed_frames()
            if sim_frames.split_frame(f)[0].get("t") == "#commit"]
    for car in cars:
        index, complete = car_sections(car)
        assert complete
        mine = {cid: libipld.decode_dag_cbor(car[a:b]) for cid, (a, b) in index.items()}
        assert mine == libipld.decode_car(car)[1]
    # libipld refuses other codecs outright; the split finds every block's exact bytes
    rec = libipld.encode_dag_cbor({"a": [1, {"b": "c"}]})
    raw_cid = bytes([0x01, 0x55, 0x12, 0x20]) + bytes(range(32))  # CIDv1, raw codec
    v0_cid = bytes([0x12, 0x20]) + bytes(range(32, 64))  # CIDv0
    blocks = [(sim_frames.cid_of(rec), rec), (raw_cid, b"raw bytes"), (v0_cid, b"\x00" * 300)]
    car = sim_frames.encode_car([sim_frames.cid_of(rec)], blocks)
    index, complete = car_sections(car)
    assert complete and {cid: car[a:b] for cid, (a, b) in index.items()} == dict(blocks)

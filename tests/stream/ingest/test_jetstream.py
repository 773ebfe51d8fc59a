"""Jetstream as a live source: message decoding, the relay's Jetstream mode, and
`chorus ingest --jetstream` end to end into the embedded broker with reconnects and no loss.

Expectations: hand-written Jetstream messages with hand-written events, and the synthetic
population's own record of what it emitted (``tests.helpers.synth_truth.expected_events``), never the decoder's output.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import websockets

from tests.helpers.synth_truth import expected_events
from stream.config import Settings
from stream.ingest.jetstream import REWIND_US, WANTED_COLLECTIONS, decode_message
from stream.ingest.reader import Backoff
from stream.ingest.service import Ingester, IngestError
from stream.sim import frames as sim_frames
from stream.sim.jetstream import jetstream_items
from stream.sim.relay import FrameSource, Relay
from stream.sim.synth import Population
from tests.helpers.cli import invoke
from tests.stream.ingest.test_ingest import account_dids, canon, consume_all

pytestmark = pytest.mark.timeout(120)

DID = "did:plc:jetstream0000000000000000"
OTHER = "did:plc:jetstream0000000000000001"
T = 1_725_911_162_329_308


def line(kind: str, body: dict, did: str = DID, t: int = T) -> str:
    return json.dumps({"did": did, "time_us": t, "kind": kind, kind: body})


def commit(op: str, collection: str, rkey: str, record: dict | None = None) -> dict:
    c = {"rev": "3l3qo2vutsw2b", "operation": op, "collection": collection, "rkey": rkey}
    if record is not None:
        c |= {"record": record, "cid": "bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcqi"}
    return c


def test_real_shaped_messages_decode_to_the_expected_events():
    """Messages shaped like Jetstream's documented examples (facets, an image embed with a blob
    link, a quote with media) map to the firehose's events, field for field."""
    subject = {"uri": f"at://{OTHER}/app.bsky.feed.post/3l3pte3p2e325", "cid": "bafyreigh"}
    post = {"$type": sim_frames.POST, "createdAt": "2024-09-09T19:46:02.102Z", "langs": ["en"],
            "text": "who's up for #atproto 🦋",
            "facets": [{"features": [{"$type": "app.bsky.richtext.facet#tag", "tag": "atproto"}],
                        "index": {"byteStart": 12, "byteEnd": 20}}],
            "reply": {"parent": subject, "root": subject},
            "embed": {"$type": "app.bsky.embed.recordWithMedia", "record": {"record": subject},
                      "media": {"$type": "app.bsky.embed.images", "images": [
                          {"alt": "", "image": {"$type": "blob", "ref": {"$link": "bafkreibj"},
                                                "mimeType": "image/jpeg", "size": 1000}}]}}}
    msgs = [
        line("commit", commit("create", sim_frames.POST, "3l3qo2vuowo2b", post)),
        line("commit", commit("create", sim_frames.LIKE, "3l3qo2vv2fy2b", {"$type": sim_frames.LIKE, "subject": subject,
                                                                   "createdAt": "2024-09-09T19:46:02Z"})),
        line("commit", commit("create", sim_frames.REPOST, "3l3qo2vvk4i2b", {"$type": sim_frames.REPOST, "subject": subject,
                                                                     "createdAt": "2024-09-09T19:46:02Z"})),
        line("commit", commit("create", sim_frames.FOLLOW, "3l3qo2vvvzk2b", {"$type": sim_frames.FOLLOW, "subject": OTHER,
                                                                     "createdAt": "2024-09-09T19:46:02Z"})),
        line("commit", commit("delete", sim_frames.LIKE, "3l3qo2vw2sm2b")),
        line("commit", commit("update", sim_frames.POST, "3l3qo2vuowo2b", post)),  # ignored
        line("commit", commit("create", "app.bsky.actor.profile", "self", {"$type": "app.bsky.actor.profile"})),
        line("identity", {"did": DID, "handle": "alice.bsky.social", "seq": 1409752997,
                          "time": "2024-09-05T06:11:04.870Z"}),
        line("account", {"active": False, "did": DID, "seq": 1409753013, "time": "2024-09-05T06:11:04.870Z",
                         "status": "deactivated"}),
    ]
    base = {"v": 1, "did": DID, "seq": T, "time_us": T}
    uri = lambda c, r: f"at://{DID}/{c}/{r}"  # noqa: E731
    expected = [
        [{**base, "kind": "post", "rkey": "3l3qo2vuowo2b", "uri": uri(sim_frames.POST, "3l3qo2vuowo2b"),
          "text": "who's up for #atproto 🦋", "langs": ["en"], "reply_parent": subject["uri"],
          "reply_root": subject["uri"], "quote_uri": subject["uri"]}],
        [{**base, "kind": "like", "rkey": "3l3qo2vv2fy2b", "uri": uri(sim_frames.LIKE, "3l3qo2vv2fy2b"),
          "subject_uri": subject["uri"], "subject_did": OTHER}],
        [{**base, "kind": "repost", "rkey": "3l3qo2vvk4i2b", "uri": uri(sim_frames.REPOST, "3l3qo2vvk4i2b"),
          "subject_uri": subject["uri"], "subject_did": OTHER}],
        [{**base, "kind": "follow", "rkey": "3l3qo2vvvzk2b", "uri": uri(sim_frames.FOLLOW, "3l3qo2vvvzk2b"),
          "subject_did": OTHER, "rev": "3l3qo2vutsw2b"}],  # follows carry the commit's rev
        [{**base, "kind": "delete", "rkey": "3l3qo2vw2sm2b", "uri": uri(sim_frames.LIKE, "3l3qo2vw2sm2b"),
          "collection": sim_frames.LIKE}],
        [], [], [],
        [{**base, "kind": "account", "rkey": "", "uri": f"at://{DID}", "active": False, "status": "deactivated"}],
    ]
    got = [decode_message(m) for m in msgs]
    assert [d.events for d in got] == expected
    assert [d.type for d in got] == ["#commit"] * 7 + ["#identity", "#account"]
    assert all(d.seq == T and d.invalid == [] for d in got)


def test_bad_messages_are_counted_by_reason():
    deep: object = "x"
    for _ in range(40):
        deep = [deep]
    cases = {
        "not json": "json",
        "[1, 2]": "json",
        json.dumps({"did": DID, "time_us": "soon", "kind": "commit", "commit": {}}): "frame_shape",
        line("commit", commit("create", sim_frames.POST, "3k", {"$type": sim_frames.POST, "text": "x"}), did="alice"): "invalid_did",
        '{"did": "%s", "time_us": %d, "kind": "commit", "commit": {"rev": "r", "operation": "create", '
        '"collection": "%s", "rkey": "3k", "record": {"$type": "%s", "text": "\\ud800"}}}'
        % (DID, T, sim_frames.POST, sim_frames.POST): "record_utf8",
        line("commit", commit("create", sim_frames.LIKE, "3k", {"$type": sim_frames.LIKE, "subject": {
            "uri": f"at://{OTHER}/{sim_frames.POST}/..", "cid": "c"}})): "at_uri",
        line("commit", commit("create", sim_frames.POST, "3k", {"$type": sim_frames.POST, "text": "d", "x": deep})): "record_depth",
        "[" * 100_000 + "]" * 100_000: "record_depth",
        line("commit", commit("create", sim_frames.POST, "3k", {"$type": sim_frames.POST, "text": "t" * 300_000})): "record_too_large",
        line("commit", commit("create", sim_frames.POST, "a/b", {"$type": sim_frames.POST, "text": "x"})): "op_shape",
        line("account", {"active": False, "status": "\ud800 no such status"}): "frame_shape",
    }
    for raw, reason in cases.items():
        d = decode_message(raw)
        assert d.events == [] and d.invalid == [reason], (raw[:80], d.invalid)


def test_future_time_is_clamped_like_the_firehose():
    d = decode_message(line("commit", commit("delete", sim_frames.LIKE, "3k"), t=T + 48 * 3600 * 10**6), received_us=T)
    assert d.seq == T + 48 * 3600 * 10**6  # the cursor stays Jetstream's
    assert d.events[0]["time_us"] == T + 60 * 10**6 and d.clamped == 1


# --- the relay in Jetstream mode ------------------------------------------------------------------------

def posts(n: int) -> list[tuple[int, int, bytes]]:
    out = []
    for s in range(1, n + 1):
        t = T + s * 1000
        coll = sim_frames.LIKE if s % 3 == 0 else sim_frames.POST
        rec = (sim_frames.like_record(sim_frames.strong_ref(f"at://{OTHER}/{sim_frames.POST}/3k", "c"), t) if coll == sim_frames.LIKE
               else sim_frames.post_record(f"p{s}", t))
        out.append((s, t, sim_frames.commit_frame(s, DID, [sim_frames.Op("create", coll, f"3k{s}", rec)], t)))
    return out


async def recv_all(url: str, quiet: float = 0.3) -> list[dict]:
    got = []
    async with websockets.connect(url) as ws:
        while True:
            try:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), quiet)))
            except asyncio.TimeoutError:
                return got


def test_relay_serves_jetstream_cursor_and_collection_rules():
    items = posts(12)

    async def main():
        async with Relay(FrameSource(lambda: iter(items), 1, 12), protocol="jetstream") as relay:
            assert relay.url.endswith("/subscribe")
            everything = await recv_all(relay.url)
            likes = await recv_all(f"{relay.url}?wantedCollections={sim_frames.LIKE}")
            t5 = everything[4]["time_us"]
            from5 = await recv_all(f"{relay.url}?cursor={t5}")  # inclusive
            old = await recv_all(f"{relay.url}?cursor=1")
            future = await recv_all(f"{relay.url}?cursor={T * 2}")
            with pytest.raises(websockets.InvalidStatus):
                await recv_all(relay.url.replace("/subscribe", "/xrpc/com.atproto.sync.subscribeRepos"))
            return everything, likes, from5, old, future

    everything, likes, from5, old, future = asyncio.run(asyncio.wait_for(main(), 30))
    assert [m["time_us"] for m in everything] == [T + s * 1000 for s in range(1, 13)]
    assert [m["commit"]["rkey"] for m in likes] == [f"3k{s}" for s in (3, 6, 9, 12)]
    assert [m["commit"]["rkey"] for m in from5] == [f"3k{s}" for s in range(5, 13)]
    assert old == everything and future == []
    assert everything[0]["commit"]["record"]["text"] == "p1" and everything[0]["kind"] == "commit"


def test_messages_of_one_commit_get_unique_increasing_times():
    t = T
    ops = [sim_frames.Op("create", sim_frames.FOLLOW, f"3f{i}", sim_frames.follow_record(OTHER, t)) for i in range(3)]
    frames = [(1, t, sim_frames.commit_frame(1, DID, ops, t)), (2, t + 1, sim_frames.commit_frame(2, DID, ops[:1], t + 1))]
    assert [i[0] for i in jetstream_items(frames)] == [t, t + 1, t + 2, t + 3]


# --- `chorus ingest --jetstream` end to end -----------------------------------------------------------

def strip_times(ev: dict) -> str:
    return canon({k: v for k, v in ev.items() if k not in ("seq", "time_us")})


def test_jetstream_ingest_end_to_end_with_reconnects_and_no_loss(fresh_broker, tmp_path):
    pop = Population(80, seed=9)
    frames = list(pop.timed_frames())
    messages = list(jetstream_items(frames))
    last = messages[-1][0]
    settings = Settings(kafka=fresh_broker.url, kafka_idempotence=False, state_dir=tmp_path / "state")

    async def main():
        relay = Relay(FrameSource(lambda: iter(frames), 1, frames[-1][0]), protocol="jetstream",
                      drop_after=len(messages) // 3, max_drops=2)
        async with relay:
            ing = Ingester(settings, jetstream=relay.url, backoff=Backoff(base_s=0.05, cap_s=0.5))
            task = asyncio.create_task(ing.run())
            deadline = time.monotonic() + 60
            while ing.cursor != last:
                assert not task.done() and time.monotonic() < deadline, (ing.cursor, last)
                await asyncio.sleep(0.05)
            await ing.stop()
            await task
            n_conn = len(relay.connections)
            again = Ingester(settings, jetstream=relay.url)  # restart: resumes from the stored cursor
            task = asyncio.create_task(again.run())
            while again.reader.duplicates == 0:
                assert not task.done() and time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            await again.stop()
            await task
            return ing, again, relay.connections, n_conn

    ing, again, conns, n_conn = asyncio.run(asyncio.wait_for(main(), 100))
    assert sum(c.dropped for c in conns) == 2 and n_conn >= 3
    assert all(c.cursor is not None for c in conns[1:n_conn])  # every reconnect resumed
    assert conns[n_conn].cursor == last - REWIND_US  # the restart dialed the stored cursor, rewound
    assert again.published == 0 and ing.reader.resets == 0 and again.reader.resets == 0

    truth = list(expected_events(pop))
    values = asyncio.run(consume_all(fresh_broker.bootstrap, len(truth) + pop.expected()["account"]))
    records = [v for v in values if v["kind"] != "account"]
    assert Counter(strip_times(v) for v in records) == Counter(strip_times(e) for e in truth)  # exact, once
    # times: Jetstream's time_us (the frame's, made unique) is both seq and event time
    frame_time = {(e["kind"], e["uri"]): e["time_us"] for e in truth}
    assert all(v["seq"] == v["time_us"] and 0 <= v["time_us"] - frame_time[v["kind"], v["uri"]] < 1000
               for v in records)
    accounts = Counter(v["did"] for v in values if v["kind"] == "account" and v["active"] is False)
    assert accounts == account_dids(pop)


def test_ingester_and_cli_refuse_bad_jetstream_urls(tmp_path):
    s = Settings(kafka="kafka://127.0.0.1:1", state_dir=tmp_path)
    with pytest.raises(IngestError, match="Jetstream URL must start with ws://"):
        Ingester(s, jetstream="https://host/subscribe")
    with pytest.raises(IngestError, match="without a query"):
        Ingester(s, jetstream="wss://host/subscribe?wantedCollections=x")
    with pytest.raises(IngestError, match="not both"):
        Ingester(s, relay="ws://a/xrpc", jetstream="ws://b/subscribe")
    env = {"CHORUS_KAFKA": "kafka://127.0.0.1:1", "CHORUS_STATE_DIR": str(tmp_path)}
    for args, message in [(["--relay", "ws://a/xrpc", "--jetstream", "ws://b/subscribe"], "not both"),
                          (["--jetstream", "http://b/subscribe"], "ws://")]:
        p = invoke(["ingest", *args], env)  # in-process (tests/helpers/cli.py)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], (p.returncode, lines)


def test_wanted_collections_are_what_chorus_reads():
    from stream.ingest.normalize import KINDS

    assert set(WANTED_COLLECTIONS) == set(KINDS)


def test_empty_jetstream_setting_means_the_relay(tmp_path):
    ing = Ingester(Settings(kafka="kafka://127.0.0.1:1", state_dir=tmp_path, jetstream=""), relay=None)
    assert not ing.jetstream and ing.relay == Settings().relay


def test_cli_relay_serves_jetstream(tmp_path):
    """`chorus relay --jetstream --synthetic N` prints its /subscribe URL and serves JSON messages."""
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "relay", "--jetstream", "--synthetic", "60"],
                            stderr=subprocess.PIPE, cwd=Path(__file__).parents[3], text=True)
    try:
        banner = proc.stderr.readline()
        url = banner.split(" at ")[1].split()[0]
        assert url.startswith("ws://127.0.0.1:") and url.endswith("/subscribe"), banner
        got = asyncio.run(asyncio.wait_for(recv_all(f"{url}?wantedCollections={sim_frames.FOLLOW}", quiet=1.0), 30))
        assert got and all(m["kind"] in ("commit", "account", "identity") for m in got)
        assert {m["commit"]["collection"] for m in got if m["kind"] == "commit"} == {sim_frames.FOLLOW}
    finally:
        proc.terminate()
        proc.wait(10)

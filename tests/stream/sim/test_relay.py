"""Loopback relay: cursor semantics, drops, pacing, concurrency, record -> relay round trip."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from atproto import AsyncFirehoseSubscribeReposClient, parse_subscribe_repos_message

from stream.sim.frames import POST, Op, commit_frame, post_record, split_frame, tid
from stream.sim.recording import read_recording, record, scan_recording, subscribe_url
from stream.sim.relay import FrameSource, Relay

pytestmark = pytest.mark.timeout(60)

T0 = 1_735_689_600_000_000
DID = "did:plc:relaytest00000000000000a"


def make_frames(n: int, first: int = 1) -> list[tuple[int, bytes]]:
    out = []
    for seq in range(first, first + n):
        t = T0 + seq * 1000
        out.append((seq, commit_frame(seq, DID, [Op("create", POST, tid(t), post_record(f"post {seq}", t))], t)))
    return out


async def collect(url: str, cursor: int | None = None, n: int | None = None, timeout: float = 5.0):
    """(frames as (header, body), closed_cleanly) until n frames, a close, or a quiet `timeout`."""
    got = []
    async with websockets.connect(subscribe_url(url, cursor), max_size=None) as ws:
        while n is None or len(got) < n:
            try:
                got.append(split_frame(await asyncio.wait_for(ws.recv(), timeout)))
            except asyncio.TimeoutError:
                break
            except websockets.ConnectionClosed:
                break
    return got


def seqs(frames):
    return [b["seq"] for h, b in frames if h.get("op") == 1 and "seq" in b]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 50))


def test_replay_from_start_and_cursor():
    async def main():
        async with Relay(FrameSource.from_frames(make_frames(50))) as relay:
            assert relay.url.startswith("ws://127.0.0.1:") and relay.url.endswith("/xrpc")
            everything = await collect(relay.url, n=50)
            assert seqs(everything) == list(range(1, 51))
            tail = await collect(relay.url, cursor=20, n=30)
            assert seqs(tail) == list(range(21, 51))
            assert seqs(await collect(relay.url, cursor=0, n=50)) == list(range(1, 51))
            assert await collect(relay.url, cursor=50, timeout=0.3) == []  # at the head: nothing yet
    run(main())


def test_future_cursor_error_then_close():
    async def main():
        async with Relay(FrameSource.from_frames(make_frames(10))) as relay:
            got = await collect(relay.url, cursor=11)
            assert len(got) == 1
            header, body = got[0]
            assert header == {"op": -1} and body["error"] == "FutureCursor"
            assert relay.connections[-1].error == "FutureCursor"
    run(main())


def test_outdated_cursor_info_then_oldest():
    async def main():
        async with Relay(FrameSource.from_frames(make_frames(60)), retention=10, chunk=5) as relay:
            assert seqs(await collect(relay.url, n=60)) == list(range(1, 61))
            oldest = relay.oldest_seq
            assert oldest > 2
            got = await collect(relay.url, cursor=1, timeout=0.5)
            assert got[0][0] == {"op": 1, "t": "#info"} and got[0][1]["name"] == "OutdatedCursor"
            assert seqs(got[1:]) == list(range(oldest, 61))
            # a cursor inside the retained range is an ordinary replay
            assert seqs(await collect(relay.url, cursor=58, timeout=0.5)) == [59, 60]
    run(main())


def test_drop_after_and_resume():
    async def main():
        async with Relay(FrameSource.from_frames(make_frames(30)), drop_after=7, max_drops=2) as relay:
            first = await collect(relay.url, timeout=2)
            assert seqs(first) == list(range(1, 8))
            second = await collect(relay.url, cursor=7, timeout=2)
            assert seqs(second) == list(range(8, 15))
            rest = await collect(relay.url, cursor=14, n=16)
            assert seqs(rest) == list(range(15, 31))
            assert [c.dropped for c in relay.connections] == [True, True, False]
            assert relay.connections[0].last_seq == 7
    run(main())


def test_concurrent_clients_and_pacing():
    async def main():
        async with Relay(FrameSource.from_frames(make_frames(40)), rate=400, track_seqs=True) as relay:
            a, b = await asyncio.gather(collect(relay.url, n=40), collect(relay.url, n=40))
            assert seqs(a) == seqs(b) == list(range(1, 41))
            assert all(c.seqs == list(range(1, 41)) for c in relay.connections)
            # paced: the head is what was published, so a cursor past it is in the future
            err = await collect(relay.url, cursor=41)
            assert err[0][1]["error"] == "FutureCursor"
    run(main())


def test_speed_paced_recording_order():
    async def main():
        async with Relay(FrameSource.from_frames(make_frames(20)), speed=50.0) as relay:
            assert seqs(await collect(relay.url, n=20)) == list(range(1, 21))
    run(main())


def test_sdk_client_consumes_relay():
    async def main():
        async with Relay(FrameSource.from_frames(make_frames(25))) as relay:
            client = AsyncFirehoseSubscribeReposClient({"cursor": 5}, base_uri=relay.url)
            got = []

            async def on_message(message):
                commit = parse_subscribe_repos_message(message)
                got.append(commit.seq)
                if len(got) == 20:
                    await client.stop()

            await asyncio.wait_for(client.start(on_message), 20)
            assert got == list(range(6, 26))
    run(main())


def test_record_then_relay_round_trip(tmp_path):
    frames = make_frames(40, first=2**31 + 5)  # seqs beyond 2^31

    async def main():
        path = tmp_path / "rec.bin"
        async with Relay(FrameSource.from_frames(frames)) as relay:
            n = await record(relay.url, path, cursor=2**31 + 9, limit=30)
        assert n == 30
        recorded = list(read_recording(path))
        assert [r.seq for r in recorded] == [s for s, _ in frames[5:35]]
        assert [r.data for r in recorded] == [f for _, f in frames[5:35]]
        info = scan_recording(path)
        assert (info.frames, info.first_seq, info.last_seq) == (30, 2**31 + 10, 2**31 + 39)
        async with Relay(path) as relay:
            got = await collect(relay.url, n=30)
            assert seqs(got) == [r.seq for r in recorded]
            assert (await collect(relay.url, cursor=0, timeout=1))[0][1]["name"] == "OutdatedCursor"
    run(main())


def test_wrong_path_is_404():
    async def main():
        async with Relay(FrameSource.from_frames(make_frames(3))) as relay:
            with pytest.raises(websockets.InvalidStatus):
                async with websockets.connect(f"ws://127.0.0.1:{relay.port}/xrpc/other"):
                    pass
    run(main())


def test_synthetic_population_through_relay_with_drops():
    """A reconnecting consumer (cursor = last seq seen) gets every synthetic frame exactly once."""
    from stream.sim.synth import Population

    pop = Population(200, seed=3, events_per_account=2)
    exp = pop.expected()

    async def main():
        async with Relay(pop, drop_after=400) as relay:
            got, cursor = [], None
            while len(got) < exp["frames"]:
                batch = seqs(await collect(relay.url, cursor=cursor, timeout=2))
                assert batch, "relay stopped sending"
                got += batch
                cursor = got[-1]
            assert got == list(range(1, exp["frames"] + 1))
            assert sum(c.dropped for c in relay.connections) == len(relay.connections) - (exp["frames"] % 400 != 0)
            # replay of the activity part (after the follow graph) through the SDK client
            types = set()
            client = AsyncFirehoseSubscribeReposClient({"cursor": exp["follow"]}, base_uri=relay.url)

            async def on_message(message):
                types.add(type(parse_subscribe_repos_message(message)).__name__)
                if message.body["seq"] == exp["frames"]:
                    await client.stop()

            relay.drop_after = None
            await asyncio.wait_for(client.start(on_message), 20)
            assert types == {"Commit", "Account", "Identity", "Sync"}
    run(main())


def test_malformed_frames_are_served_verbatim():
    from stream.sim.frames import bad_frames

    bad = [f for name, f in sorted(bad_frames().items()) if name != "oversize"]
    items = make_frames(1) + [(i + 2, f) for i, f in enumerate(bad)] + make_frames(1, first=len(bad) + 2)

    async def main():
        async with Relay(FrameSource.from_frames(items)) as relay:
            async with websockets.connect(subscribe_url(relay.url), max_size=None) as ws:
                got = [await asyncio.wait_for(ws.recv(), 5) for _ in items]
            assert got == [f for _, f in items]
    run(main())

"""Ingest benchmark: frames/s decoded on one core, events/s relay -> ingester -> embedded broker,
for the firehose (subscribeRepos) and for Jetstream (v1 JSON) carrying the same population.

``run(quick) -> str`` returns a Markdown section for BENCHMARKS.md. Standalone:
``python -m benchmarks.ingest_bench [--quick]``.

* Decode: every frame of a synthetic population (follow commits, then posts, replies, quotes,
  likes, reposts, deletes, #account/#identity/#sync), pre-encoded in memory, through
  ``stream.ingest.decode.decode_frame``; CPU time of this process (one core). For comparison, the same
  frames through the SDK's pydantic models (``parse_subscribe_repos_message`` + ``CAR.from_bytes``
  + record models), the path the decoder avoids for ``#commit``.
* End to end: the relay serves the population from a separate process (unpaced, as fast as the
  ingester reads); the ingester runs in this process against a fresh embedded broker; the clock
  runs from start until Kafka acknowledged the last frame's events. events/s = acknowledged events
  / wall seconds; "per CPU-second" divides by this process's CPU time instead (one core's worth).
* Jetstream: the same frames as the messages Jetstream would send for them
  (``stream.sim.jetstream``: one JSON message per op), decoded with
  ``stream.ingest.jetstream.decode_message``, and end to end with the relay in Jetstream mode and
  ``Ingester(jetstream=URL)``; reported next to the firehose and as a ratio to it, same process.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time

TARGET_DECODE = 10_000  # frames/s
TARGET_E2E = 5_000  # events/s


def _population(quick: bool):
    from stream.sim.synth import Population

    return Population(300 if quick else 1000, seed=1)


def bench_decode(frames: list[bytes], sdk_sample: int = 2000) -> dict:
    from atproto_client.models.utils import get_or_create
    from atproto_core.car import CAR
    from atproto_firehose import parse_subscribe_repos_message
    from atproto_subscription import Frame

    from stream.ingest.decode import decode_frame

    best = 0.0
    for _ in range(3):
        c0 = time.process_time()
        n_ev = sum(len(decode_frame(f).events) for f in frames)
        best = max(best, len(frames) / max(time.process_time() - c0, 1e-9))
    sample = frames[:sdk_sample]
    c0 = time.process_time()
    for f in sample:
        msg = parse_subscribe_repos_message(Frame.from_bytes(f))
        if getattr(msg, "ops", None):
            car = CAR.from_bytes(msg.blocks)
            for op in msg.ops:
                if op.cid is not None:
                    get_or_create(car.blocks.get(op.cid), strict=False)
    sdk = len(sample) / max(time.process_time() - c0, 1e-9)
    return {"frames": len(frames), "events": n_ev, "frames_per_s": best, "sdk_frames_per_s": sdk}


def bench_decode_jetstream(messages: list[str]) -> dict:
    from stream.ingest.jetstream import decode_message

    best = 0.0
    for _ in range(3):
        c0 = time.process_time()
        n_ev = sum(len(decode_message(m).events) for m in messages)
        best = max(best, len(messages) / max(time.process_time() - c0, 1e-9))
    return {"messages": len(messages), "events": n_ev, "messages_per_s": best}


def _serve_relay(frames: list[tuple[int, int, bytes]], conn, protocol: str = "firehose") -> None:
    """Child process: serve the frames on loopback, send the URL, run until the parent exits."""
    from stream.sim.relay import FrameSource, Relay

    async def main():
        async with Relay(FrameSource(lambda: iter(frames), frames[0][0], frames[-1][0]), protocol=protocol) as relay:
            conn.send(relay.url)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop

    asyncio.run(main())


async def _e2e(url: str, last_seq: int, bootstrap_url: str, state_dir: str, jetstream: bool) -> dict:
    from stream.config import Settings
    from stream.ingest.service import Ingester

    source = {"jetstream": url} if jetstream else {"relay": url}
    ing = Ingester(Settings(kafka=bootstrap_url, kafka_idempotence=False, state_dir=state_dir),
                   persist_cursor=False, **source)
    w0, c0 = time.perf_counter(), time.process_time()
    task = asyncio.create_task(ing.run())
    while ing.cursor != last_seq:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    await ing.stop()
    await task
    return {"events": ing.published, "wall_s": wall, "cpu_s": cpu, "events_per_s": ing.published / wall,
            "events_per_cpu_s": ing.published / cpu}


def bench_e2e(timed: list[tuple[int, int, bytes]], last: int, protocol: str = "firehose") -> dict:
    """``last``: the final position the ingester must acknowledge (seq, or Jetstream time_us)."""
    from stream.local.broker import EmbeddedBroker

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_relay, args=(timed, child, protocol), daemon=True)
    proc.start()
    try:
        if not parent.poll(120):
            raise RuntimeError("relay process did not start")
        url = parent.recv()
        from stream.process import install

        install()  # the ingester's loop in production (`chorus ingest`)
        with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as state:
            return asyncio.run(asyncio.wait_for(_e2e(url, last, broker.url, state, protocol == "jetstream"), 600))
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def run(quick: bool = False) -> str:
    from benchmarks import header
    from stream.sim.jetstream import jetstream_items

    pop = _population(quick)
    timed = list(pop.timed_frames())
    messages = [m for _, _, (_, m) in jetstream_items(timed)]
    last_us = next(reversed(list(jetstream_items(timed[-50:]))))[0]
    dec = bench_decode([f for _, _, f in timed])
    jdec = bench_decode_jetstream(messages)
    e2e = bench_e2e(timed, timed[-1][0])
    je2e = bench_e2e(timed, last_us, "jetstream")

    def ok(v, target):
        return "yes" if v >= target else "**no**"

    fire_ev_s = dec["frames_per_s"] * dec["events"] / dec["frames"]
    jet_ev_s = jdec["messages_per_s"] * jdec["events"] / jdec["messages"]
    return "\n".join([
        "## Ingest (firehose or Jetstream -> chorus.events)",
        "",
        header(),
        f"Synthetic population n={pop.n} (seed 1): {dec['frames']:,} frames, {dec['events']:,} events; as "
        f"Jetstream, {jdec['messages']:,} messages (one per op; #sync frames have none). "
        f"Python {platform.python_version()}, {platform.machine()}. Decode = CPU time of one process; "
        "end to end = relay in a separate process, ingester in this one, embedded Tansu broker (acks=all).",
        "",
        "| measure | firehose | Jetstream | Jetstream / firehose | target | met |",
        "|---|---:|---:|---:|---:|:-:|",
        f"| frames (messages)/s decoded, one core | {dec['frames_per_s']:,.0f} | {jdec['messages_per_s']:,.0f} | "
        f"{jdec['messages_per_s'] / dec['frames_per_s']:.2f} | {TARGET_DECODE:,} | "
        f"{ok(min(dec['frames_per_s'], jdec['messages_per_s']), TARGET_DECODE)} |",
        f"| events/s decoded, one core | {fire_ev_s:,.0f} | {jet_ev_s:,.0f} | {jet_ev_s / fire_ev_s:.2f} | | |",
        f"| frames/s decoded with the SDK's pydantic models (reference) | {dec['sdk_frames_per_s']:,.0f} | | | | |",
        f"| events/s end to end into the embedded broker (wall) | {e2e['events_per_s']:,.0f} | "
        f"{je2e['events_per_s']:,.0f} | {je2e['events_per_s'] / e2e['events_per_s']:.2f} | {TARGET_E2E:,} | "
        f"{ok(min(e2e['events_per_s'], je2e['events_per_s']), TARGET_E2E)} |",
        f"| events per CPU-second of the ingester process | {e2e['events_per_cpu_s']:,.0f} | "
        f"{je2e['events_per_cpu_s']:,.0f} | {je2e['events_per_cpu_s'] / e2e['events_per_cpu_s']:.2f} | | |",
        "",
        f"End to end: firehose {e2e['events']:,} events acknowledged in {e2e['wall_s']:.2f} s wall, "
        f"{e2e['cpu_s']:.2f} s CPU; Jetstream {je2e['events']:,} events in {je2e['wall_s']:.2f} s wall, "
        f"{je2e['cpu_s']:.2f} s CPU. Load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end "
        "(wall numbers suffer on a shared machine; the ratios are measured in one run).",
        "",
    ])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))

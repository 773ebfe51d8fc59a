"""Worker benchmark: events/s through the rolling-window store, and through the Faust worker.

``run(quick) -> str`` returns a Markdown section for BENCHMARKS.md. Standalone:
``python -m benchmarks.worker_bench [--quick]``.

* Store: a synthetic firehose mix (likes 55%, posts 15% of which half are topical, reposts 10%,
  follows 12%, deletes 5%, re-deliveries 3%; 100 events/s of event time, so the 10 min window
  slides and expires during the run) as JSON bytes through ``json.loads`` +
  ``WindowStore.process`` (both stages, one process), CPU time of this process, for the default
  (6 h / 60 s) and demo (10 min / 10 s) windows: the cost per event must not depend on them.
* Faust, live: one ``stream.worker.faust_app.Worker`` in this process on a fresh embedded broker; once it is
  assigned, another process produces the events to chorus.events; the clock runs from the first
  processed event until the store has ingested every event and applied every op. events/s =
  events / wall seconds; "per CPU-second" divides by this process's CPU time (Faust's consumer
  thread included). Live runs alternate chorus's app (``stream.worker.faust_lean.App``) with stock
  ``faust.App`` as the reference, three each. Catch-up: the same with the events produced before
  the worker starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import sys
import time

from benchmarks import header

TARGET = 5_000  # events/s on one core


def synthetic_events(n: int, seed: int = 0, users: int = 5000, rate: float = 100.0) -> list[bytes]:
    """``n`` chorus.events values at ``rate`` events/s of event time."""
    from stream.worker.lexicon import Lexicon

    rng = random.Random(seed)
    terms = [t for ts in Lexicon.load().topics.values() for t in ts]
    filler = "the a this that today really just some people think about what".split()
    dids = [f"did:plc:{i:020d}" for i in range(users)]
    posts: list[str] = []
    made: list[dict] = []
    out = []
    t0 = 1_700_000_000_000_000
    for i in range(n):
        t = t0 + int(i * 1e6 / rate)
        did = rng.choice(dids)
        r = rng.random()
        base = {"v": 1, "did": did, "rkey": f"r{i}", "seq": i, "time_us": t}
        if r < 0.15 or not posts:
            words = rng.sample(filler, 6) + ([rng.choice(terms)] if rng.random() < 0.5 else [])
            e = {**base, "kind": "post", "uri": f"at://{did}/app.bsky.feed.post/r{i}",
                 "text": " ".join(words) + " great news", "langs": ["en"]}
            if rng.random() < 0.2:
                e["reply_parent"] = e["reply_root"] = rng.choice(posts[-500:])
            posts.append(e["uri"])
        elif r < 0.70 or r < 0.80:
            kind = "like" if r < 0.70 else "repost"
            s = rng.choice(posts[-500:])
            e = {**base, "kind": kind, "uri": f"at://{did}/app.bsky.feed.{kind}/r{i}",
                 "subject_uri": s, "subject_did": s.split("/")[2]}
        elif r < 0.92:
            e = {**base, "kind": "follow", "uri": f"at://{did}/app.bsky.graph.follow/r{i}",
                 "subject_did": rng.choice(dids)}
        elif r < 0.97 and made:
            victim = made.pop(rng.randrange(len(made)))
            e = {**victim, "kind": "delete", "time_us": t, "seq": i,
                 "collection": victim["uri"].split("/")[3]}
        elif made:
            e = rng.choice(made)  # at-least-once re-delivery
        else:
            continue
        if e["kind"] != "delete" and e is not (made[-1] if made else None):
            made.append(e)
        out.append(json.dumps(e).encode())
    return out


def bench_store(values: list[bytes], window_s: int, hop_s: int) -> dict:
    from stream.worker.lexicon import Classifier
    from stream.worker.windows import WindowStore

    store = WindowStore(window_s, hop_s, Classifier())
    loads, process = json.loads, store.process
    c0 = time.process_time()
    records = 0
    for v in values:
        records += len(process(loads(v))[0])
    cpu = time.process_time() - c0
    return {"events": len(values), "cpu_s": cpu, "per_s": len(values) / cpu, "records": records,
            "users": len(store.users)}


def _produce(values: list[bytes], bootstrap: str) -> None:
    """Child process: send ``values`` to chorus.events as fast as Kafka takes them."""
    from stream.kafka import make_producer
    from stream.schemas import TOPIC_EVENTS

    async def main():
        p = make_producer(bootstrap, idempotence=False)
        await p.start()
        try:
            for v in values:
                await p.send(TOPIC_EVENTS, key=json.loads(v)["did"].encode(), value=v)
            await p.flush()
        finally:
            await p.stop()

    asyncio.run(main())


async def _faust(values: list[bytes], url: str, live: bool, app_class=None) -> dict:
    """One Worker in this process. ``live``: it starts on an empty topic and the events are
    produced by another process while it runs (steady state). Otherwise they are produced first
    and the worker starts after (catch-up: the replay on assignment reads them)."""
    import multiprocessing as mp

    from stream.worker.faust_app import Worker, ensure_worker_topics
    from stream.config import Settings

    s = Settings(kafka=url, kafka_idempotence=False, profile="demo")
    await ensure_worker_topics(s)
    bootstrap = url.split("://")[1]
    loop = asyncio.get_running_loop()
    producer = mp.get_context("spawn").Process(target=_produce, args=(values, bootstrap))
    if not live:
        producer.start()
        await loop.run_in_executor(None, producer.join)
    app_kw = {} if app_class is None else {"app_class": app_class}  # None: the worker's default
    w = Worker(s, idle_flush_s=5.0, rebalance_timeout_s=2.0, **app_kw)
    task = asyncio.create_task(w.run())
    n = len(values)

    def check():
        if task.done():
            task.result()

    if live:  # assigned and replayed (an empty topic) before anything is produced
        while w.pipeline is None or not w.pipeline.assigned or any(v >= 1 << 62 for v in w.pipeline.skip.values()) \
                or not w.pipeline.skip:
            await asyncio.sleep(0.01)
            check()
        producer.start()
    while w.pipeline is None or w.pipeline.store.stats["events"] == 0:
        await asyncio.sleep(0.002)
        check()
    t0, c0 = time.perf_counter(), time.process_time()
    pipe = w.pipeline
    stats = pipe.store.stats
    # Done: every event ingested and every op sent through the repartition topic applied.
    while stats["events"] + pipe.invalid < n or pipe.buffered or stats["ops"] < pipe.sent_ops:
        await asyncio.sleep(0.01)
        check()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    await w.stop()
    await asyncio.wait_for(task, 30)
    if producer.is_alive():
        producer.join(30)
    return {"events": n, "wall_s": wall, "cpu_s": cpu, "per_s": n / wall, "per_cpu_s": n / cpu,
            "ops": stats["ops"], "records": pipe.records}


def bench_faust(values: list[bytes], live: bool, app_class=None) -> dict:
    """One worker run on a fresh embedded broker; ``app_class``: the Faust app (default: chorus's)."""
    from stream.local.broker import EmbeddedBroker

    from stream.process import install

    install()  # the worker's loop in production (`chorus worker`)
    with EmbeddedBroker() as b:
        return asyncio.run(_faust(values, b.url, live, app_class))


def run(quick: bool = False) -> str:
    n = 20_000 if quick else 100_000
    values = synthetic_events(n)
    default = bench_store(values, 6 * 3600, 60)
    demo = bench_store(values, 600, 10)
    live = values[: n // 2 if quick else 50_000]
    import faust

    # chorus's app and stock faust.App (the reference), interleaved; the median run of each
    runs = {"lean": [], "stock": []}
    for _ in range(1 if quick else 3):
        runs["lean"].append(bench_faust(live, live=True))
        runs["stock"].append(bench_faust(live, live=True, app_class=faust.App))
    fa, st = (sorted(r, key=lambda x: x["per_cpu_s"])[len(r) // 2] for r in runs.values())
    spread = {k: ", ".join(f"{x['per_cpu_s']:,.0f}" for x in r) for k, r in runs.items()}
    cu = bench_faust(live, live=False)
    ok = lambda x: "yes" if x >= TARGET else "**no**"  # noqa: E731
    return "\n".join([
        "## Worker: rolling per-user features",
        "",
        header(),
        f"Target: one worker keeps up with >= {TARGET:,} events/s on one core. "
        f"{platform.processor() or platform.machine()}, Python {sys.version.split()[0]}"
        f"{' (quick run)' if quick else ''}; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs at the end (wall numbers suffer on a shared machine).",
        "",
        "| path | events | events/s | meets target |",
        "|---|---:|---:|---|",
        f"| store only, 6 h / 60 s window (CPU-s) | {default['events']:,} | {default['per_s']:,.0f} | "
        f"{ok(default['per_s'])} |",
        f"| store only, 10 min / 10 s window (CPU-s) | {demo['events']:,} | {demo['per_s']:,.0f} | "
        f"{ok(demo['per_s'])} |",
        f"| Faust worker, live (per CPU-s of the worker process: the one-core target) | {fa['events']:,} | "
        f"{fa['per_cpu_s']:,.0f} | {ok(fa['per_cpu_s'])} |",
        f"| the same worker on stock `faust.App` (reference, per CPU-s) | {st['events']:,} | "
        f"{st['per_cpu_s']:,.0f} | {ok(st['per_cpu_s'])} |",
        f"| Faust worker, live (wall; worker busy {fa['cpu_s'] / fa['wall_s']:.0%} of a core, so paced by "
        f"the producer when below 100%) | {fa['events']:,} | {fa['per_s']:,.0f} | |",
        f"| Faust worker: feature records emitted (live) | | {fa['records']:,} | |",
        f"| catch-up after a restart: replay of a backlog (wall) | {cu['events']:,} | {cu['per_s']:,.0f} | |",
        f"| catch-up (per CPU-s) | {cu['events']:,} | {cu['per_cpu_s']:,.0f} | |",
        "",
        f"Live runs alternate chorus's app (`stream/worker/faust_lean.py`) and stock `faust.App` on the same "
        f"input, {len(runs['lean'])} each; the table shows the median run of each (per CPU-s, chorus: "
        f"{spread['lean']}; stock: {spread['stock']}): **{fa['per_cpu_s'] / st['per_cpu_s']:.2f}x** "
        "stock Faust.",
        "",
        "Store: `json.loads` + `WindowStore.process` (dedupe, deletes, topic + VADER classification, "
        "both stages). Faust, live: the worker is assigned (empty topic), then another process "
        "produces the events as fast as Kafka takes them; the clock runs from the first event the "
        "worker ingests until every event is ingested and every op sent through the repartition "
        f"topic applied ({fa['ops']:,} ops; two agents, authors -> ops -> owners). Catch-up: the "
        "events are produced first, then the worker starts and rebuilds the window by replay "
        "(stream/worker/faust_app.py) while Faust re-delivers the replayed offsets, which it skips. Wall numbers "
        "share the 2 cores with the broker (and, live, the producer).",
        "",
    ])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))

"""The Faust worker: chorus.events -> rolling features (chorus.features) and follow edges (chorus.graph).

Two agents (concurrency 1 each, faust-streaming #606) share one :class:`stream.worker.windows.WindowStore`:

  ``authors``  consumes chorus.events (key = author DID): dedupe, deletes, classification
               (``WindowStore.ingest``); publishes follow edges to chorus.graph (key = follower);
               re-keys the resulting ops by their owner DID onto the repartition topic
               ``<app id>-ops``: one Kafka message per (flush, partition) holding a JSON list of
               ops (a flush every 1000 ops or 0.1 s), partition = CRC-32(owner DID) mod partitions.
  ``owners``   consumes ``<app id>-ops``: ``WindowStore.apply``; follow-ups go back to the ops topic.

So every DID's author state and feature state live on whichever worker holds that DID's partition,
and two workers sharing the partitions compute what one would. Time is event time, and the clock
moves on the owners' side only: when the ``authors`` agent sees an event of a new hop it appends a
``tick`` op (after the ops it already routed) to every ops partition, so every worker closes a hop
after applying the ops that preceded it, and all workers expire buckets together. A hop's records
go to chorus.features when the clock leaves it, or after ``idle_flush_s`` seconds without input
(then later changes go out with the next hop).

State lives in memory, not in Faust tables (a changelog write per event would cost more than the
whole pipeline). It is rebuilt by replay: chorus.events offsets are never committed, and on every
partition assignment (start, restart, another worker joining or leaving) each worker clears its
state and re-reads its chorus.events partitions from the earliest retained offset (:func:`replay`,
inside the assignment callback, before Faust resumes): merged by event time, with the ops for
partitions it owns applied at once, so the clock never runs ahead of a partition still replaying
(a clock racing ahead would drop posts as late and lose the engagement credited to them later).
One worker thus rebuilds exactly the state of an uninterrupted run; with several, ops for other
workers' partitions still take the ops topic. The ops are idempotent (keyed by record URI), so
re-sent ops are harmless. A replay re-emits records of past hops (older ``window_end``) before it
catches up; consumers keep the newest record per DID. It cannot know which DIDs its predecessor
published: the operator expires a DID whose latest record is a window old (operators/service.py).
Replay time grows with the topic's retention: keep chorus.events retention near the window (2x).

The app is :class:`stream.worker.faust_lean.App`: Faust with the per-message hand-off done inline and
no per-event Monitor statistics (1.5x the events per CPU-second of stock Faust, BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
from collections import deque
from typing import Any
from zlib import crc32

import faust

from stream.worker import faust_lean

from stream import metrics
from stream.config import Settings, bootstrap_servers
from stream.schemas import TOPIC_EVENTS, TOPIC_FEATURES, TOPIC_GRAPH, TOPIC_PARTITIONS, dumps
from stream.worker.lexicon import Classifier, Lexicon
from stream.worker.windows import BadEvent, WindowStore

log = logging.getLogger("chorus.worker")

RUN_MODE = "process"  # `chorus run` should start the worker as `python -m stream.cli worker`
APP_ID = "chorus-worker"
BATCH = 1000  # buffered ops or records that trigger a send
FLUSH_S = 0.1  # the flusher's period: buffered outputs wait at most this long


class Pipeline:
    """The per-worker state and the glue between the store and Kafka (no Faust inside).

    Ops are routed by CRC-32 of the owner DID modulo the partition count (fast, stable).
    """

    def __init__(self, settings: Settings, partitions: int):
        self.window = settings.window
        lexicon = Lexicon.load(settings.topics_file)
        self.topics = lexicon.names
        self.classifier = Classifier(lexicon)
        self.partitions = partitions
        self.invalid = 0
        self.records = 0  # feature records published
        self.assigned: set[tuple[str, int]] = set()  # (topic, partition) held by this worker
        self.skip: dict[int, int] = {}  # chorus.events partition -> first offset not replayed
        self.reset()

    def reset(self) -> None:
        """Forget all state (before replaying the input after a partition assignment)."""
        self.store = WindowStore(*self.window, self.classifier)
        self.last_input = time.monotonic()
        self.ticked: int | None = None
        self.out_records: list[dict] = []
        self.out_edges: list[tuple] = []
        self.out_ops: dict[int, list] = {}
        self.buffered = 0  # ops in out_ops
        self.sent_ops = 0  # ops handed to Kafka so far

    def _route(self, ops: list) -> None:
        out, n = self.out_ops, self.partitions
        for op in ops:
            p = crc32(op[1].encode()) % n
            batch = out.get(p)
            if batch is None:
                out[p] = [op]
            else:
                batch.append(op)
        self.buffered += len(ops)

    def _tick(self, time_us: int) -> None:
        """Entering a new hop: a tick to every ops partition, after the ops already routed."""
        b = time_us // self.store.hop_us
        if self.ticked is None or b > self.ticked:
            self.ticked = b
            t = b * self.store.hop_us
            for p in range(self.partitions):
                self.out_ops.setdefault(p, []).append(("tick", "", t))
            self.buffered += self.partitions

    def on_event(self, raw: bytes | dict, owned: set[int] | None = None) -> None:
        """One chorus.events value: state updated, outputs buffered until :meth:`drain`.

        ``owned`` (replay only): ops partitions this worker owns; the event moves the owners'
        clock first and ops for those partitions are applied here at once, in input order
        (:meth:`WindowStore.apply_local`, as in :meth:`WindowStore.process`), instead of a round
        trip through the ops topic.
        """
        self.last_input = time.monotonic()
        store = self.store
        try:
            ev = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
            if owned is not None:
                self.out_records += store.advance(int(ev["time_us"]))
            ops, edges = store.ingest(ev)
        except (BadEvent, ValueError, KeyError, TypeError) as exc:
            self.invalid += 1
            if self.invalid <= 10 or self.invalid % 10_000 == 0:
                log.warning("skipping invalid event (%d so far): %s", self.invalid, exc)
            return
        if edges:
            self.out_edges += edges
        if owned is not None:
            n = self.partitions
            ops = store.apply_local(ops, lambda did: crc32(did.encode()) % n in owned)
        self._route(ops)
        self._tick(ev["time_us"])

    def on_ops(self, raw: bytes) -> None:
        """One ops message (a JSON list of ops) from the repartition topic."""
        self.last_input = time.monotonic()
        store = self.store
        for op in json.loads(raw):
            self.out_records += store.advance(op[2])
            self._route(store.apply(op))

    def drain(self) -> tuple[list[dict], list[tuple], dict[int, list]]:
        """Buffered (feature records, graph edges, ops by partition); empties the buffers."""
        out = self.out_records, self.out_edges, self.out_ops
        self.out_records, self.out_edges, self.out_ops = [], [], {}
        self.sent_ops += self.buffered
        self.buffered = 0
        return out

    def on_idle(self, idle_s: float) -> None:
        if time.monotonic() - self.last_input >= idle_s:
            self.out_records += self.store.flush()

    def update_metrics(self) -> None:
        agents = self.store.agents
        for t in self.topics:
            metrics.WINDOW_AGENTS.labels(topic=t).set(agents.get(t, 0))


def build_app(settings: Settings, *, app_id: str = APP_ID, idle_flush_s: float | None = None,
              rebalance_timeout_s: float = 5.0,
              app_class: type[faust.App] = faust_lean.App) -> tuple[faust.App, Pipeline]:
    """The Faust app (not started) and its pipeline, configured from ``settings``.

    ``app_class``: :class:`stream.worker.faust_lean.App` (stock ``faust.App`` semantics with a leaner
    per-message path); ``faust.App`` itself is the benchmark's reference.

    ``idle_flush_s``: close the current hop after this many seconds without input (default: the
    hop). ``rebalance_timeout_s``: how long the group coordinator waits for members to rejoin;
    the embedded broker holds a first join for about this long, so keep it short.
    """
    if not settings.kafka:
        raise ValueError("the worker needs Kafka: set CHORUS_KAFKA or --kafka (kafka://host:port)")
    partitions = TOPIC_PARTITIONS[TOPIC_EVENTS]
    pipe = Pipeline(settings, partitions)
    idle_s = idle_flush_s if idle_flush_s is not None else float(settings.window[1])
    app = app_class(
        app_id,
        broker=f"kafka://{bootstrap_servers(settings.kafka)}",
        store="memory://",
        autodiscover=False,
        web_enabled=False,
        topic_partitions=partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        broker_rebalance_timeout=rebalance_timeout_s,
        broker_session_timeout=max(10.0, 2 * rebalance_timeout_s),
        broker_heartbeat_interval=1.0,
        producer_acks=-1,  # acks=all; faust's producer is not idempotent outside transactions
    )
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    # acks=False: input offsets are never committed, so every (re)start replays the retained input.
    events = app.topic(TOPIC_EVENTS, partitions=partitions, acks=False, **raw)
    ops_topic = app.topic(f"{app_id}-ops", partitions=partitions, internal=True, **raw)
    ops_name = ops_topic.get_topic_name()

    async def publish() -> None:
        records, edges, ops = pipe.drain()
        pipe.records += len(records)
        send = app.producer.send
        for p, batch in ops.items():
            await send(ops_name, b"%d" % p, json.dumps(batch).encode(), p, None, None)
        for op, src, dst, t in edges:
            value = dumps({"op": op, "src": src, "dst": dst, "time_us": t})
            await send(TOPIC_GRAPH, dst.encode(), value, None, None, None)
        for rec in records:
            await send(TOPIC_FEATURES, rec["did"].encode(), dumps(rec), None, None, None)
        if records:
            pipe.update_metrics()

    def due() -> bool:
        return pipe.buffered >= BATCH or len(pipe.out_records) >= BATCH

    # Per-event iteration (cheaper in Faust than stream.take); outputs go out in batches, when a
    # batch is full or from the flusher below.
    @app.agent(events, concurrency=1, name="authors")
    async def authors(stream):
        async for value in stream:
            msg = stream.current_event.message
            if msg.offset < pipe.skip.get(msg.partition, 0):
                continue  # replayed already (or being replayed)
            pipe.on_event(value)
            if due():
                await publish()

    @app.agent(ops_topic, concurrency=1, name="owners")
    async def owners(stream):
        async for value in stream:
            pipe.on_ops(value)
            if due():
                await publish()

    @app.timer(interval=FLUSH_S)
    async def flusher():
        pipe.on_idle(idle_s)
        if pipe.buffered or pipe.out_records or pipe.out_edges:
            await publish()

    @app.on_partitions_assigned.connect
    async def on_assigned(sender, assigned, **kwargs) -> None:  # noqa: ARG001
        # Rebuild by replay: drop every state and re-read the assigned input from its start (its
        # offsets are never committed), in event-time order, before Faust resumes (its partitions
        # stay paused during this callback); then Faust goes on from where the replay ended. Every
        # worker does this on every rebalance, so together they regenerate every op. Ops are
        # idempotent, so ops still in flight do no harm.
        # Faust re-reads them too (seeking it after the replay races its prefetch), and the
        # authors agent skips what the replay fed (``pipe.skip``: partition -> first new offset).
        pipe.assigned = {(tp.topic, tp.partition) for tp in assigned}
        pipe.reset()
        events_tps = sorted(tp.partition for tp in assigned if tp.topic == TOPIC_EVENTS)
        pipe.skip = dict.fromkeys(events_tps, 1 << 62)
        for tp in assigned:
            if tp.topic == TOPIC_EVENTS:
                await app.consumer.seek(tp, 0)
        owned = {tp.partition for tp in assigned if tp.topic == ops_name}
        t0 = time.monotonic()
        ends = await replay(bootstrap_servers(settings.kafka), events_tps, pipe, owned, publish, due)
        pipe.skip = ends
        log.info("assigned %d partitions; replayed %d events of %s in %.1fs", len(pipe.assigned),
                 sum(ends.values()), TOPIC_EVENTS, time.monotonic() - t0)

    pipe.update_metrics()  # serve chorus_window_agents{topic} from the start
    return app, pipe


async def replay(bootstrap: str, partitions: list[int], pipe: Pipeline, owned: set[int],
                 publish: Any, due: Any, fetch: int = 5000) -> dict[int, int]:
    """Feed ``partitions`` of chorus.events, from the start to their end offsets now, through
    ``pipe.on_event(value, owned)`` merged by event time (each partition's own order is kept: a
    k-way merge on the head events' ``time_us``). Returns {partition: end offset}.

    In time order the owners' clock never runs ahead of a partition that is still replaying, so a
    single worker rebuilds exactly the state of an uninterrupted run (with several workers, ops for
    other workers' partitions still take the ops topic).
    """
    from aiokafka import TopicPartition

    from stream.kafka import make_consumer

    if not partitions:
        return {}
    tps = [TopicPartition(TOPIC_EVENTS, p) for p in partitions]
    consumer = make_consumer(bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
        buffers: dict[int, deque] = {p: deque() for p in partitions}
        done = {p: False for p in partitions}

        async def refill(p: int) -> None:
            tp = TopicPartition(TOPIC_EVENTS, p)
            while not buffers[p] and not done[p]:
                if await consumer.position(tp) >= ends[p]:
                    done[p] = True
                    break
                for m in (await consumer.getmany(tp, timeout_ms=1000, max_records=fetch)).get(tp, []):
                    if m.offset >= ends[p]:
                        done[p] = True
                        break
                    try:
                        ev = json.loads(m.value)
                        buffers[p].append((int(ev["time_us"]), ev))
                    except (ValueError, KeyError, TypeError):
                        buffers[p].append((-1, m.value))  # on_event counts it as invalid

        heap = []
        for p in partitions:
            await refill(p)
            if buffers[p]:
                heap.append((buffers[p][0][0], p))
        heapq.heapify(heap)
        while heap:
            _, p = heapq.heappop(heap)
            pipe.on_event(buffers[p].popleft()[1], owned)
            if due():
                await publish()
            if not buffers[p]:
                await refill(p)
            if buffers[p]:
                heapq.heappush(heap, (buffers[p][0][0], p))
        return ends
    finally:
        await consumer.stop()


async def ensure_worker_topics(settings: Settings, app_id: str = APP_ID) -> None:
    """Create chorus.events/features/graph and the ops topic if missing."""
    from stream.kafka import ensure_topics

    n = TOPIC_PARTITIONS[TOPIC_EVENTS]
    wanted = {t: TOPIC_PARTITIONS[t] for t in (TOPIC_EVENTS, TOPIC_FEATURES, TOPIC_GRAPH)}
    await ensure_topics(bootstrap_servers(settings.kafka), {**wanted, f"{app_id}-ops": n},
                        window_s=settings.window[0])


class Worker:
    """One Faust worker inside an asyncio program: ``await w.run()`` until ``await w.stop()``.

    ``w.pipeline.assigned`` holds the (topic, partition) pairs it owns once the group settled.
    """

    def __init__(self, settings: Settings, **app_kw: Any):
        self.settings = settings
        self.app_kw = app_kw
        self.app: faust.App | None = None
        self.pipeline: Pipeline | None = None
        self._stop = asyncio.Event()

    async def run(self) -> None:
        await ensure_worker_topics(self.settings, self.app_kw.get("app_id", APP_ID))
        self.app, self.pipeline = build_app(self.settings, **self.app_kw)
        await self.app.start()
        try:
            await self._stop.wait()
        finally:
            await self.app.stop()

    async def stop(self) -> None:
        self._stop.set()


def run_worker(settings: Settings, serve_metrics: bool = True, **app_kw: Any) -> None:
    """Blocking entry point for ``chorus worker``: metrics endpoint + a Faust worker (signals)."""
    from mode import Worker as ModeWorker

    from stream.process import install

    install()
    try:
        asyncio.run(asyncio.wait_for(ensure_worker_topics(settings, app_kw.get("app_id", APP_ID)), 60))
    except Exception as exc:  # aiokafka raises its own error types
        raise ConnectionError(f"cannot reach Kafka at {settings.kafka}: {exc!r}") from None
    app, _ = build_app(settings, **app_kw)
    if serve_metrics:
        metrics.serve(settings.metrics_host, settings.metrics_port)
    ModeWorker(app, loglevel="WARNING", quiet=True).execute_from_commandline()

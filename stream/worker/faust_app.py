"""The Faust worker: chorus.events -> rolling features (chorus.features) and follow edges (chorus.graph).

Two agents (concurrency 1 each, faust-streaming #606) share one :class:`stream.worker.windows.WindowStore`:

  ``authors``  consumes chorus.events (key = author DID): dedupe, deletes, classification
               (``WindowStore.ingest``); passes follow edges through to chorus.graph (key = the
               follow record URI, :func:`stream.schemas.graph_key`);
               re-keys the resulting ops by their owner DID onto the repartition topic
               ``<app id>-ops``: one Kafka message per (flush, partition) holding the ops
               (:func:`encode_ops`; a flush every 1000 ops or 0.1 s), partition = CRC-32(owner
               DID) mod partitions.
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

from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError

from stream.worker import faust_lean

from stream import metrics
from stream.config import Settings, bootstrap_servers
from stream.guard import RecordGuard
from stream.kafka import ReliableSender
from stream import topics as topic_registry
from stream.schemas import TOPIC_DEAD_LETTER, TOPIC_EVENTS, TOPIC_FEATURES, TOPIC_GRAPH, Event, dumps, graph_key
from stream.worker.lexicon import Classifier, Lexicon
from stream.worker.windows import BadEvent, WindowStore

log = logging.getLogger("chorus.worker")

RUN_MODE = "process"  # `chorus run` should start the worker as `python -m stream.cli worker`
APP_ID = topic_registry.DEFAULT_APP_ID
BATCH = 1000  # buffered ops or records that trigger a send
FLUSH_S = 0.1  # the flusher's period: buffered outputs wait at most this long


OPS_FORMAT = 2  # 1: a bare JSON list of ops with record URIs (before record keys)


def encode_ops(ops: list) -> bytes:
    """One ops message: ``{"v": OPS_FORMAT, "ops": [...]}`` (ops as in WindowStore.apply)."""
    return json.dumps({"v": OPS_FORMAT, "ops": ops}, separators=(",", ":")).encode()


def decode_ops(raw: bytes) -> list:
    """The ops of a message from :func:`encode_ops`. Raises ValueError (not JSON), BadEvent
    (``format``: a bare list, what workers before format 2 sent; ``shape``: anything else)."""
    value = json.loads(raw)
    if isinstance(value, dict) and value.get("v") == OPS_FORMAT and isinstance(value.get("ops"), list):
        return value["ops"]
    if isinstance(value, list):
        raise OpsFormatError(f"an ops message of format 1 (a bare list); this worker reads format {OPS_FORMAT}")
    raise BadEvent("not an ops message")


class OpsFormatError(BadEvent):
    """An ops message of an older format."""


def edge_message(edge: tuple) -> tuple[bytes, bytes]:
    """(key, value) of the chorus.graph message for a store edge ``(op, src, dst, time_us, uri)``."""
    op, src, dst, t, uri = edge
    value = {k: v for k, v in (("op", op), ("src", src), ("dst", dst), ("time_us", t), ("uri", uri))
             if v not in ("", None)}
    return graph_key(value), dumps(value)


class Pipeline:
    """The per-worker state and the glue between the store and Kafka (no Faust inside).

    Ops are routed by CRC-32 of the owner DID modulo the partition count (fast, stable).
    """

    def __init__(self, settings: Settings, partitions: int, ops_topic: str = f"{APP_ID}-ops"):
        self.window = settings.window
        lexicon = Lexicon.load(settings.topics_file)
        self.topics = lexicon.names
        self.classifier = Classifier(lexicon)
        self.partitions = partitions
        self.ops_topic = ops_topic
        self.guard = RecordGuard.from_settings("worker", settings)
        self.invalid = 0  # input records rejected (self.guard.rejected says why)
        self.ready = False  # state rebuilt (replay done): chorus_window_agents means something
        self.sender: ReliableSender | None = None  # set by build_app
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

    def parse_event(self, raw: bytes | None, partition: int = -1, offset: int = -1) -> dict | None:
        """A chorus.events value validated (:class:`stream.schemas.Event`, :mod:`stream.guard`) as
        the dict the store takes, or None (rejected and counted)."""
        ev = self.guard.parse(Event, TOPIC_EVENTS, partition, offset, raw)
        if ev is None:
            self.invalid += 1
            return None
        return vars(ev)

    def on_event(self, raw: bytes | dict, owned: set[int] | None = None, partition: int = -1,
                 offset: int = -1) -> None:
        """One chorus.events value (bytes, or a dict from :meth:`parse_event`): state updated,
        outputs buffered until :meth:`drain`. A record that fails validation or processing is
        rejected (counted with its reason, :mod:`stream.guard`), never raised.

        ``owned`` (replay only): ops partitions this worker owns; the event moves the owners'
        clock first and ops for those partitions are applied here at once, in input order
        (:meth:`WindowStore.apply_local`, as in :meth:`WindowStore.process`), instead of a round
        trip through the ops topic.
        """
        self.last_input = time.monotonic()
        store = self.store
        ev = raw if isinstance(raw, dict) else self.parse_event(raw, partition, offset)
        if ev is None:
            return
        try:
            if owned is not None:
                self.out_records += store.advance(ev["time_us"])
            ops, edges = store.ingest(ev)
        except Exception as exc:  # noqa: BLE001 - one record must never stop the worker
            self.invalid += 1
            self.guard.reject(TOPIC_EVENTS, partition, offset, exc,
                              value=raw if isinstance(raw, bytes) else None,
                              reason="shape" if isinstance(exc, BadEvent) else None)
            return
        if edges:
            self.out_edges += edges
        if owned is not None:
            n = self.partitions
            ops = store.apply_local(ops, lambda did: crc32(did.encode()) % n in owned)
        self._route(ops)
        self._tick(ev["time_us"])

    def on_ops(self, raw: bytes, partition: int = -1, offset: int = -1) -> None:
        """One ops message (:func:`encode_ops`) from the repartition topic; an op that does not
        fit (``[code: str, owner: str, time_us: int, ...]``) or fails is rejected, not raised. A
        message of another format (a worker of an older version) is rejected as ``format``: the
        replay of chorus.events regenerates its ops."""
        self.last_input = time.monotonic()
        store = self.store
        try:
            ops = decode_ops(raw)
        except (ValueError, TypeError) as exc:
            reason = "format" if isinstance(exc, OpsFormatError) else "shape" if isinstance(exc, BadEvent) else "json"
            self.guard.reject(self.ops_topic, partition, offset, exc, value=raw, reason=reason)
            return
        for op in ops:
            try:
                if not (isinstance(op, list) and len(op) >= 3 and type(op[0]) is str and type(op[1]) is str
                        and type(op[2]) is int):
                    raise BadEvent(f"malformed op {str(op)[:80]}")
                self.out_records += store.advance(op[2])
                self._route(store.apply(op))
            except Exception as exc:  # noqa: BLE001 - one op must never stop the worker
                self.guard.reject(self.ops_topic, partition, offset, exc, value=raw,
                                  reason="shape" if isinstance(exc, BadEvent) else None)

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
        """Export ``chorus_window_agents{topic}``; only once the state is rebuilt (:attr:`ready`):
        while a replay runs the series are absent (unknown), never a false zero."""
        if not self.ready:
            return
        agents = self.store.agents
        for t in self.topics:
            metrics.WINDOW_AGENTS.labels(topic=t).set(agents.get(t, 0))

    def forget_metrics(self) -> None:
        """Remove ``chorus_window_agents`` (a rebalance starts: the state is being rebuilt)."""
        self.ready = False
        for t in self.topics:
            try:
                metrics.WINDOW_AGENTS.remove(t)
            except KeyError:
                pass


def build_app(settings: Settings, *, app_id: str = APP_ID, idle_flush_s: float | None = None,
              rebalance_timeout_s: float = 5.0, ops_partitions: int | None = None,
              app_class: type[faust.App] = faust_lean.App) -> tuple[faust.App, Pipeline]:
    """The Faust app (not started) and its pipeline, configured from ``settings``.

    ``app_class``: :class:`stream.worker.faust_lean.App` (stock ``faust.App`` semantics with a leaner
    per-message path); ``faust.App`` itself is the benchmark's reference.

    ``idle_flush_s``: close the current hop after this many seconds without input (default: the
    hop). ``rebalance_timeout_s``: how long the group coordinator waits for members to rejoin;
    the embedded broker holds a first join for about this long, so keep it short.
    ``ops_partitions``: the ops topic's actual partition count when it already exists with another
    count than the registry's (:func:`ensure_worker_topics`); ops are routed over that many.
    """
    if not settings.kafka:
        raise ValueError("the worker needs Kafka: set CHORUS_KAFKA or --kafka (kafka://host:port)")
    partitions = topic_registry.partitions(settings, TOPIC_EVENTS)
    n_ops = ops_partitions or topic_registry.partitions(settings, topic_registry.ops_topic(app_id))
    pipe = Pipeline(settings, n_ops, topic_registry.ops_topic(app_id))
    idle_s = idle_flush_s if idle_flush_s is not None else float(settings.window[1])
    session_s = max(10.0, 2 * rebalance_timeout_s)
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
        broker_session_timeout=session_s,
        broker_heartbeat_interval=1.0,
        # Faust requires request >= session timeout; sends are retried by ReliableSender anyway
        broker_request_timeout=max(settings.kafka_request_timeout_s, session_s),
        producer_request_timeout=settings.kafka_request_timeout_s,
        producer_acks=-1,  # acks=all; faust's producer is not idempotent outside transactions
    )
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    # acks=False: input offsets are never committed, so every (re)start replays the retained input.
    events = app.topic(TOPIC_EVENTS, partitions=partitions, acks=False, **raw)
    ops_topic = app.topic(topic_registry.ops_topic(app_id), partitions=n_ops, internal=True, **raw)
    ops_name = ops_topic.get_topic_name()

    async def send(topic, key, value, partition, headers):
        return await app.producer.send(topic, key, value, partition, None, headers)

    # One batch in flight, re-sent with backoff while Kafka is unreachable (nothing is dropped).
    sender = ReliableSender(send, "worker", retry_on=(KafkaError, ProducerSendError))
    pipe.sender = sender

    async def publish() -> None:
        records, edges, ops = pipe.drain()
        pipe.records += len(records)
        out: list = [(ops_name, b"%d" % p, encode_ops(batch), p, None) for p, batch in ops.items()]
        out += [(TOPIC_GRAPH, *edge_message(edge), None, None) for edge in edges]
        out += [(TOPIC_FEATURES, rec["did"].encode(), dumps(rec), None, None) for rec in records]
        out += [(TOPIC_DEAD_LETTER, k, v, None, h) for k, v, h in pipe.guard.take_dead_letters()]
        await sender.send(out)
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
            pipe.on_event(value, partition=msg.partition, offset=msg.offset)
            if due():
                await publish()

    @app.agent(ops_topic, concurrency=1, name="owners")
    async def owners(stream):
        async for value in stream:
            msg = stream.current_event.message
            pipe.on_ops(value, msg.partition, msg.offset)
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
        pipe.forget_metrics()
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
        pipe.ready = True
        pipe.update_metrics()
        log.info("assigned %d partitions; replayed %d events of %s in %.1fs", len(pipe.assigned),
                 sum(ends.values()), TOPIC_EVENTS, time.monotonic() - t0)

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

    from stream.kafka import ReadToEnd, make_consumer

    if not partitions:
        return {}
    tps = [TopicPartition(TOPIC_EVENTS, p) for p in partitions]
    consumer = make_consumer(bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        reader = await ReadToEnd.open(consumer, tps)
        ends = {tp.partition: off for tp, off in reader.ends.items()}
        buffers: dict[int, deque] = {p: deque() for p in partitions}

        async def refill(p: int) -> None:
            tp = TopicPartition(TOPIC_EVENTS, p)
            while not buffers[p] and tp in reader.pending:
                for m in (await reader.fetch(tp, timeout_ms=1000, max_records=fetch)).get(tp, []):
                    ev = pipe.parse_event(m.value, p, m.offset)  # None: rejected and counted
                    if ev is not None:
                        buffers[p].append((ev["time_us"], ev))

        heap = []
        for p in partitions:
            await refill(p)
            if buffers[p]:
                heap.append((buffers[p][0][0], p))
        heapq.heapify(heap)
        while heap:
            _, p = heapq.heappop(heap)
            pipe.on_event(buffers[p].popleft()[1], owned, p)
            if due():
                await publish()
            if not buffers[p]:
                await refill(p)
            if buffers[p]:
                heapq.heappush(heap, (buffers[p][0][0], p))
        return ends
    finally:
        await consumer.stop()


async def ensure_worker_topics(settings: Settings, app_id: str = APP_ID) -> int | None:
    """Create the worker's topics that are missing (:mod:`stream.topics`) and check the others
    (one log line per mismatch); returns the ops topic's partition count when it exists with a
    count other than the registry's (the worker then routes ops over that many), else None."""
    from stream.kafka import check_topics, ensure_topics

    bootstrap = bootstrap_servers(settings.kafka)
    specs = topic_registry.stage_topics("worker", settings, app_id)
    await ensure_topics(bootstrap, specs)
    found = await check_topics(bootstrap, specs, "worker")
    ops = topic_registry.ops_topic(app_id)
    n = found.partitions.get(ops)
    return n if n and n != topic_registry.partitions(settings, ops) else None


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
        n_ops = await ensure_worker_topics(self.settings, self.app_kw.get("app_id", APP_ID))
        self.app, self.pipeline = build_app(self.settings, ops_partitions=n_ops, **self.app_kw)
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

    from stream.process import install, kafka_error_line

    install(settings.uvloop)
    try:
        n_ops = asyncio.run(asyncio.wait_for(ensure_worker_topics(settings, app_kw.get("app_id", APP_ID)), 60))
    except Exception as exc:  # aiokafka raises its own error types
        raise ConnectionError(kafka_error_line(settings.kafka, exc, "create the worker's topics")) from None
    app, _ = build_app(settings, ops_partitions=n_ops, **app_kw)
    if serve_metrics:
        metrics.serve(settings.metrics_host, settings.metrics_port)
    ModeWorker(app, loglevel="WARNING", quiet=True).execute_from_commandline()

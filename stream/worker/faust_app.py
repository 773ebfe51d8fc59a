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
whole pipeline), and in checkpoint files (stream/worker/checkpoint.py). chorus.events offsets are
never committed: on every partition assignment (start, restart, another worker joining or
leaving) each worker clears its state and, in a task after the assignment callback, restores
each partition it now holds from the checkpoint, of whichever worker sharing the directory, that
is furthest along it (its own assignment's; one of more partitions, taken before another worker
joined; or the checkpoints of a worker that left, whose partitions this one took over): each cut
to the partitions taken from it (:meth:`WindowStore.retain`) and merged
(:meth:`WindowStore.absorb`). It re-reads what follows their offsets, and a partition none covers
(no checkpoint at all: every one) from the earliest retained offset (:func:`replay`): merged by event
time, with the ops for partitions it owns applied at once, so the clock never runs ahead of a partition still replaying
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
import base64
import heapq
from hashlib import blake2b
import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any
from zlib import crc32

import faust
from faust.types import TP

from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError

from stream.worker import faust_lean

from stream import metrics
from stream.config import Settings, bootstrap_servers
from stream.guard import RecordGuard
from stream.kafka import ReliableSender
from stream import topics as topic_registry
from stream.schemas import TOPIC_DEAD_LETTER, TOPIC_EVENTS, TOPIC_FEATURES, TOPIC_GRAPH, Event, dumps, graph_key, graph_value
from stream.worker.lexicon import Classifier, Lexicon
from stream.worker.checkpoint import CheckpointDir, CheckpointMismatch
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
    """(key, value) of the chorus.graph message for a store edge ``(op, src, dst, time_us, uri, rev)``."""
    value = graph_value(*edge)
    return graph_key(value), dumps(value)


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)


class Pipeline:
    """The per-worker state and the glue between the store and Kafka (no Faust inside).

    Ops are routed by CRC-32 of the owner DID modulo the partition count (fast, stable).
    """

    def __init__(self, settings: Settings, partitions: int, ops_topic: str = f"{APP_ID}-ops",
                 events_partitions: int | None = None):
        self.window = settings.window
        lexicon = Lexicon.load(settings.topics_file)
        self.topics = lexicon.names
        self.classifier = Classifier(lexicon)
        self.partitions = partitions
        self.events_partitions = events_partitions or partitions  # of chorus.events
        self.ops_topic = ops_topic
        self.guard = RecordGuard.from_settings("worker", settings)
        self.invalid = 0  # input records rejected (self.guard.rejected says why)
        self.ready = False  # state rebuilt (replay done): chorus_window_agents means something
        self.ready_fut: asyncio.Future | None = None  # resolved True when ready, False when revoked
        self.generation = 0  # assignments and revocations seen (a restore of an older one is abandoned)
        self.assignments = 0  # partition assignments received
        self.ops_skip: dict[int, int] = {}  # ops partition -> first offset not replayed
        self.restored_from: str | None = None  # checkpoint file of the last restore (giving the most partitions)
        self.restored_files: list[str] = []  # every checkpoint file the last restore merged
        self.replayed = 0  # events replayed by the last restore
        self.recovery_s: float | None = None
        self.checkpoint_time: float | None = None  # unix time of the last checkpoint written
        self.sender: ReliableSender | None = None  # set by build_app
        self.records = 0  # feature records published
        self.assigned: set[tuple[str, int]] = set()  # (topic, partition) held by this worker
        self.skip: dict[int, int] = {}  # chorus.events partition -> first offset not replayed
        self.reset()

    def reset(self) -> None:
        """Forget all state (before replaying the input after a partition assignment)."""
        self.offsets: dict[str, dict[int, int]] = {"events": {}, "ops": {}}  # next offset to read
        self._counted: dict[str, int] = {}  # store.stats already added to chorus_worker_events
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
        if offset >= 0:
            self.offsets["events"][partition] = offset + 1
        store = self.store
        ev = raw if isinstance(raw, dict) else self.parse_event(raw, partition, offset)
        if ev is None:
            return
        try:
            if owned is not None:
                self.out_records += store.advance(ev["time_us"])
            ops, edges = store.ingest(ev, partition)
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
        if offset >= 0:
            self.offsets["ops"][partition] = offset + 1
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

    # -- checkpoints -------------------------------------------------------------------------

    def snapshot(self, unacked: list) -> tuple[dict, dict]:
        """(arrays, meta) of a checkpoint of this instant: the store, the offsets it covers, and
        the outputs not yet acknowledged (``unacked``: messages handed to Kafka and not acked,
        (topic, key, value, partition, headers)) plus those still buffered. Synchronous (no await
        inside), so no message is processed halfway through it."""
        out = [[t, _b64(k), _b64(v), p] for t, k, v, p, _h in unacked]
        meta = {"window": list(self.window), "assigned": sorted(map(list, self.assigned)),
                "partitions": {"events": self.events_partitions, "ops": self.partitions},
                "offsets": {k: {str(p): o for p, o in v.items()} for k, v in self.offsets.items()},
                "ticked": self.ticked, "unacked": out,
                "buffered": {"records": self.out_records, "edges": self.out_edges,
                             "ops": {str(p): b for p, b in self.out_ops.items()}}}
        return self.store.to_arrays(), meta

    def assignment_tag(self) -> str:
        """A short name of the partitions held (checkpoint files of one assignment share it)."""
        return blake2b(json.dumps(sorted(map(list, self.assigned))).encode(), digest_size=5).hexdigest()

    def owns(self, did: str) -> bool:
        """Whether this worker holds the ops partition of ``did`` (its owner state lives here)."""
        return (self.ops_topic, crc32(did.encode()) % self.partitions) in self.assigned

    def load(self, meta: dict, arrays: dict) -> list:
        """Adopt one checkpoint (see :meth:`snapshot`) of this assignment or of more partitions
        than it: :meth:`load_merged` with the partitions held now taken from it."""
        have = {(str(t), int(p)) for t, p in meta["assigned"]}
        return self.load_merged([(meta, arrays, have & self.assigned)])

    def load_merged(self, parts: list[tuple[dict, dict, set]]) -> list:
        """Adopt checkpoints (see :meth:`snapshot`), each for the partitions given with it
        (``(meta, arrays, {(topic, partition)})``, disjoint, all held now): from each, the
        offsets, author state (:class:`WindowStore` registry of the chorus.events partitions
        taken) and owner state (of the DIDs whose ops partition is taken) of those partitions
        only (:meth:`WindowStore.retain`), merged into one store (:meth:`WindowStore.absorb`):
        a worker taking over another's partitions restores them from the other's checkpoint.
        Partitions none covers start empty (offset 0: replayed from the beginning). Returns the
        unacknowledged messages to re-send first (outputs are idempotent downstream; feature
        records only of the DIDs whose state came from the same checkpoint). Raises ValueError
        or KeyError for a store this chorus cannot read."""
        self.reset()
        n = self.partitions
        ticked = None
        resend: list = []
        for k, (meta, arrays, take) in enumerate(parts):
            events = {p for t, p in take if t == TOPIC_EVENTS}
            ops = {p for t, p in take if t == self.ops_topic}

            def owns(did: str, ops=ops) -> bool:
                return crc32(did.encode()) % n in ops

            store = WindowStore.from_arrays(arrays, self.classifier, window_s=self.window[0], hop_s=self.window[1])
            split = {(str(t), int(p)) for t, p in meta["assigned"]} != take
            if split:
                store.retain(events, owns)
            if k == 0:
                self.store = store
            else:
                self.store.absorb(store)
            for kind, held in (("events", events), ("ops", ops)):
                self.offsets[kind].update({int(p): o for p, o in meta["offsets"].get(kind, {}).items()
                                           if int(p) in held})
            if meta["ticked"] is not None:
                ticked = meta["ticked"] if ticked is None else max(ticked, meta["ticked"])
            buf = meta["buffered"]
            self.out_records += [r for r in buf["records"] if not split or owns(r["did"])]
            self.out_edges += [tuple(e) for e in buf["edges"]]
            for p, b in buf["ops"].items():
                self.out_ops.setdefault(int(p), []).extend(b)
            for t, key, v, p in meta["unacked"]:
                key = _unb64(key)
                if not (split and t == TOPIC_FEATURES and key is not None and not owns(key.decode(errors="replace"))):
                    resend.append((t, key, _unb64(v), p, None))
        self.ticked = ticked
        self.buffered = sum(map(len, self.out_ops.values()))
        return resend

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
        store = self.store
        agents = store.agents
        for t in self.topics:
            metrics.WINDOW_AGENTS.labels(topic=t).set(agents.get(t, 0))
        stats = store.stats
        counted = self._counted
        used = stats["events"] - stats["duplicate"] - stats["late"]
        for outcome, n in (("processed", used), ("duplicate", stats["duplicate"]), ("late", stats["late"])):
            if n > counted.get(outcome, 0):
                metrics.WORKER_EVENTS.labels(outcome=outcome).inc(n - counted.get(outcome, 0))
            counted[outcome] = max(n, counted.get(outcome, 0))
        metrics.WORKER_HELD_EVENTS.set(store.held_events())
        metrics.WORKER_STATE_BYTES.set(store.state_bytes())
        age = float("nan") if self.checkpoint_time is None else time.time() - self.checkpoint_time
        metrics.WORKER_CHECKPOINT_AGE.set(age)

    def set_ready(self, ready: bool) -> None:
        """Mark the state restored (agents go on) or not (agents wait; waiting ones let go)."""
        self.ready = ready
        fut = self.ready_fut
        if fut is not None and not fut.done():
            fut.set_result(ready)
        if not ready:
            try:
                self.ready_fut = asyncio.get_running_loop().create_future()
            except RuntimeError:  # no loop (tests driving the pipeline by hand)
                self.ready_fut = None

    def forget_metrics(self) -> None:
        """Remove ``chorus_window_agents`` (a rebalance starts: the state is being rebuilt)."""
        self.ready = False
        for t in self.topics:
            try:
                metrics.WINDOW_AGENTS.remove(t)
            except KeyError:
                pass


async def partition_bounds(bootstrap: str, tps: list) -> dict[tuple[str, int], tuple[int, int]]:
    """{(topic, partition): (first offset held, end offset)} of ``tps`` now."""
    from aiokafka import TopicPartition

    from stream.kafka import make_consumer

    if not tps:
        return {}
    consumer = make_consumer(bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        ktps = [TopicPartition(t, p) for t, p in tps]
        lo, hi = await consumer.beginning_offsets(ktps), await consumer.end_offsets(ktps)
        return {(tp.topic, tp.partition): (lo[tp], hi[tp]) for tp in ktps}
    finally:
        await consumer.stop()


def checkpoint_dir(settings: Settings, app_id: str = APP_ID) -> Path:
    """Where a worker keeps its checkpoints: ``CHORUS_CHECKPOINT_DIR`` or
    ``CHORUS_STATE_DIR/worker``, then ``/<app id>``."""
    return Path(settings.checkpoint_dir or Path(settings.state_dir) / "worker") / app_id


def build_app(settings: Settings, *, app_id: str = APP_ID, idle_flush_s: float | None = None,
              rebalance_timeout_s: float = 5.0, session_timeout_s: float | None = None,
              ops_partitions: int | None = None, app_class: type[faust.App] = faust_lean.App) -> tuple[faust.App, Pipeline]:
    """The Faust app (not started) and its pipeline, configured from ``settings``.

    ``app_class``: :class:`stream.worker.faust_lean.App` (stock ``faust.App`` semantics with a leaner
    per-message path); ``faust.App`` itself is the benchmark's reference.

    ``idle_flush_s``: close the current hop after this many seconds without input (default: the
    hop). ``rebalance_timeout_s``: how long the group coordinator waits for members to rejoin;
    the embedded broker holds a first join for about this long, so keep it short.
    ``session_timeout_s``: how long the coordinator waits for a heartbeat (one a second) before it
    drops a member (default: ``max(10, 2 * rebalance_timeout_s)``). The embedded broker (Tansu)
    also holds a new group's first join for half of it, rounded up to whole seconds (5 s at the
    default), so tests that start many workers pass a few seconds.
    ``ops_partitions``: the ops topic's actual partition count when it already exists with another
    count than the registry's (:func:`ensure_worker_topics`); ops are routed over that many.
    """
    if not settings.kafka:
        raise ValueError("the worker needs Kafka: set CHORUS_KAFKA or --kafka (kafka://host:port)")
    partitions = topic_registry.partitions(settings, TOPIC_EVENTS)
    n_ops = ops_partitions or topic_registry.partitions(settings, topic_registry.ops_topic(app_id))
    pipe = Pipeline(settings, n_ops, topic_registry.ops_topic(app_id), events_partitions=partitions)
    idle_s = idle_flush_s if idle_flush_s is not None else float(settings.window[1])
    session_s = session_timeout_s if session_timeout_s is not None else max(10.0, 2 * rebalance_timeout_s)
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
        metrics.WORKER_FEATURE_RECORDS.inc(len(records))
        out: list = [(ops_name, b"%d" % p, encode_ops(batch), p, None) for p, batch in ops.items()]
        out += [(TOPIC_GRAPH, *edge_message(edge), None, None) for edge in edges]
        out += [(TOPIC_FEATURES, rec["did"].encode(), dumps(rec), None, None) for rec in records]
        out += [(TOPIC_DEAD_LETTER, k, v, None, h) for k, v, h in pipe.guard.take_dead_letters()]
        await sender.send(out)
        if records:
            pipe.update_metrics()

    def due() -> bool:
        return pipe.buffered >= BATCH or len(pipe.out_records) >= BATCH

    # files of other assignments (other workers sharing the directory, earlier assignments) are
    # removed once older than the input's retention (2 windows): their offsets are gone by then
    ckdir = CheckpointDir(checkpoint_dir(settings, app_id), stale_s=2.0 * settings.window[0])
    state = {"task": None, "last_ckpt": time.monotonic(), "writing": False}

    async def gate(msg) -> bool:
        """Whether to process ``msg`` now: wait until the state of this assignment is restored;
        False when a rebalance came meanwhile (the next restore replays the message)."""
        while not pipe.ready:
            fut = pipe.ready_fut
            if not await asyncio.shield(fut):
                return False
        return True

    # Per-event iteration (cheaper in Faust than stream.take); outputs go out in batches, when a
    # batch is full or from the flusher below.
    @app.agent(events, concurrency=1, name="authors")
    async def authors(stream):
        async for value in stream:
            msg = stream.current_event.message
            if not await gate(msg) or msg.offset < pipe.skip.get(msg.partition, 0):
                continue  # replayed already (or being replayed)
            pipe.on_event(value, partition=msg.partition, offset=msg.offset)
            if due():
                await publish()

    @app.agent(ops_topic, concurrency=1, name="owners")
    async def owners(stream):
        async for value in stream:
            msg = stream.current_event.message
            if not await gate(msg) or msg.offset < pipe.ops_skip.get(msg.partition, 0):
                continue
            pipe.on_ops(value, msg.partition, msg.offset)
            if due():
                await publish()

    async def checkpoint() -> None:
        """Write a checkpoint of this instant (the snapshot is taken synchronously, the file is
        written in a thread)."""
        unacked = sender.unacked()
        if unacked is None or not pipe.ready or state["writing"]:
            return
        t0 = time.monotonic()
        arrays, meta = pipe.snapshot(unacked)
        meta["kafka"] = bootstrap_servers(settings.kafka)
        state["writing"], state["last_ckpt"] = True, time.monotonic()
        try:
            path = await asyncio.to_thread(ckdir.write, arrays, meta, pipe.assignment_tag())
        except OSError as exc:
            log.error("cannot write a checkpoint to %s: %s", ckdir.path, exc)
            return
        finally:
            state["writing"] = False
        pipe.checkpoint_time = time.time()
        metrics.WORKER_CHECKPOINT_SECONDS.observe(time.monotonic() - t0)
        log.info("checkpoint %s (%d held events)", path.name, pipe.store.held_events())

    @app.timer(interval=1.0)
    async def observe():
        """Consumer lag per assigned partition, state size, checkpoint age."""
        pipe.update_metrics()
        if not pipe.ready:
            return
        for topic, p in pipe.assigned:
            kind = "events" if topic == TOPIC_EVENTS else "ops"
            hw = app.consumer.highwater(TP(topic, p))
            if hw is not None:
                lag = max(0, hw - pipe.offsets[kind].get(p, 0))
                metrics.CONSUMER_LAG.labels(stage="worker", topic=topic, partition=str(p)).set(lag)

    @app.timer(interval=FLUSH_S)
    async def flusher():
        if not pipe.ready:
            return
        pipe.on_idle(idle_s)
        if pipe.buffered or pipe.out_records or pipe.out_edges:
            await publish()
        if settings.checkpoint_interval_s > 0 and time.monotonic() - state["last_ckpt"] >= settings.checkpoint_interval_s:
            await checkpoint()

    async def restore_retrying(assigned_tps: set, generation: int) -> None:
        """:func:`restore`, retried with backoff (1 s doubling to 30 s) while this assignment is
        current: a restore that raised (Kafka unreachable mid-replay, a broken read) would
        otherwise leave the agents waiting for it forever, silently."""
        delay_s = 1.0
        while generation == pipe.generation:
            try:
                await restore(assigned_tps, generation)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged in one line, retried
                log.error("restoring the window state failed (%s: %s); retrying in %.0f s",
                          type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", delay_s)
                metrics.WORKER_RECOVERY.labels(phase="replay").set(0)
                await asyncio.sleep(delay_s)
                delay_s = min(30.0, 2 * delay_s)
                pipe.reset()

    async def restore(assigned_tps: set, generation: int) -> None:
        """Rebuild the state of this assignment from the checkpoints in the (shared) directory,
        whichever worker wrote them: per partition held, the whole checkpoint of this cluster
        and window that is furthest along it (:meth:`CheckpointDir.covering`), each cut to the
        partitions taken from it and merged (:meth:`Pipeline.load_merged`): the same
        assignment, a larger one (another worker joined), or the checkpoints of several (a
        worker left and this one took over its partitions). Then replay only what came after
        each partition's checkpoint, and a partition none covers from its beginning."""
        t0 = time.monotonic()
        pipe.restored_from, pipe.restored_files = None, []
        events_tps = sorted(tp.partition for tp in assigned_tps if tp.topic == TOPIC_EVENTS)
        owned = {tp.partition for tp in assigned_tps if tp.topic == ops_name}

        bounds = await partition_bounds(bootstrap_servers(settings.kafka), [
            *(TP(TOPIC_EVENTS, p) for p in events_tps), *(TP(ops_name, p) for p in owned)])
        counts = {"events": pipe.events_partitions, "ops": pipe.partitions}

        def accept(meta: dict) -> None:
            if meta.get("kafka") != bootstrap_servers(settings.kafka):
                raise CheckpointMismatch(f"checkpoint of the Kafka cluster at {meta.get('kafka')}, not "
                                         f"{bootstrap_servers(settings.kafka)} (expected when the cluster "
                                         "changed, e.g. each `chorus run` starts a new embedded broker): "
                                         "rebuilding the state from the topics")
            for kind, topic in (("events", TOPIC_EVENTS), ("ops", ops_name)):
                for p, off in meta["offsets"].get(kind, {}).items():
                    lo = bounds.get((topic, int(p)), (0, 0))[0]
                    if off < lo:  # (the end is not checked: Tansu reports the last batch's start + 1)
                        raise CheckpointMismatch(
                            f"checkpoint offset {off} of {topic}[{p}] is before the first one the topic "
                            f"still holds ({lo}): retention deleted events it would need")
            if list(meta["window"]) != list(settings.window):
                raise CheckpointMismatch(f"checkpoint for a {meta['window'][0]} s / {meta['window'][1]} s "
                                         f"window; this worker runs {settings.window[0]} s / {settings.window[1]} s")
            if meta.get("partitions") != counts:
                raise CheckpointMismatch(f"checkpoint of other partition counts ({meta.get('partitions')}, "
                                         f"now {counts}): its state does not split by today's partitions")

        def progress(meta: dict, tp: tuple) -> int:
            return meta["offsets"].get("events" if tp[0] == TOPIC_EVENTS else "ops", {}).get(str(tp[1]), 0)

        found = (await asyncio.to_thread(ckdir.covering, set(pipe.assigned), accept, progress)
                 if settings.checkpoint_interval_s > 0 else [])
        resend: list = []
        start, ops = None, None
        if found:
            try:
                resend = pipe.load_merged([(meta, arrays, take) for _, meta, arrays, take in found])
            except (ValueError, KeyError) as exc:  # e.g. a store format this chorus cannot read
                log.error("not using checkpoints %s: %s", ", ".join(f[0].name for f in found), exc)
                found = []
                pipe.reset()
        if found:
            start = {p: pipe.offsets["events"].get(p, 0) for p in events_tps}
            ops = (ops_name, {p: pipe.offsets["ops"].get(p, 0) for p in owned})  # (none covers it: from 0)
            pipe.restored_files = [str(f[0]) for f in found]
            pipe.restored_from = pipe.restored_files[0]
            if resend:
                await sender.send(resend)
        metrics.WORKER_RECOVERY.labels(phase="replay").set(1)
        before = pipe.store.stats["events"]
        ends, ops_ends = await replay(bootstrap_servers(settings.kafka), events_tps, pipe, owned, publish, due,
                                      start=start, ops=ops)
        if generation != pipe.generation:
            return
        replayed = pipe.store.stats["events"] - before
        for p, end in ends.items():
            pipe.offsets["events"][p] = max(pipe.offsets["events"].get(p, 0), end)
        for p, end in ops_ends.items():
            pipe.offsets["ops"][p] = max(pipe.offsets["ops"].get(p, 0), end)
        pipe.skip, pipe.ops_skip = ends, ops_ends
        pipe.replayed = replayed
        pipe.recovery_s = time.monotonic() - t0
        pipe.set_ready(True)
        pipe.update_metrics()
        metrics.WORKER_RECOVERY.labels(phase="replay").set(0)
        metrics.WORKER_RECOVERY_SECONDS.set(pipe.recovery_s)
        metrics.WORKER_REPLAYED_EVENTS.set(replayed)
        how = "no checkpoint"
        if found:
            how = "restored " + ", ".join(
                f"{path.name} ({len(take)} of its {len(meta['assigned'])} partitions)" for path, meta, _, take in found)
            uncovered = len(pipe.assigned) - sum(len(f[3]) for f in found)
            if uncovered:
                how += f"; {uncovered} partitions in no checkpoint, replayed from their beginning"
        log.info("assigned %d partitions; %s; replayed %d events of %s in %.1fs", len(pipe.assigned), how,
                 replayed, TOPIC_EVENTS, pipe.recovery_s)
        state["last_ckpt"] = time.monotonic()

    @app.on_partitions_revoked.connect
    async def on_revoked(sender_, revoked, **kwargs) -> None:  # noqa: ARG001
        pipe.generation += 1
        pipe.set_ready(False)  # agents waiting on this assignment's restore let go of their message
        task = state["task"]
        if task is not None and not task.done():
            task.cancel()

    @app.on_partitions_assigned.connect
    async def on_assigned(sender_, assigned, **kwargs) -> None:  # noqa: ARG001
        # Nothing long here: the group must settle whatever the state size. Record the
        # assignment, point Faust's chorus.events positions at the checkpoints' offsets
        # (they are never committed), and restore in a task (restore()); the agents wait
        # for it (gate()) and skip what it fed (``pipe.skip`` / ``pipe.ops_skip``: partition ->
        # first offset not replayed). A rebalance during a restore cancels it; the next one starts
        # over from the checkpoint.
        pipe.generation += 1
        pipe.assignments += 1
        task = state["task"]
        if task is not None and not task.done():
            task.cancel()
        pipe.assigned = {(tp.topic, tp.partition) for tp in assigned}
        pipe.forget_metrics()
        pipe.set_ready(False)
        pipe.reset()
        events_tps = [tp for tp in assigned if tp.topic == TOPIC_EVENTS]
        pipe.skip = {tp.partition: 1 << 62 for tp in events_tps}
        pipe.ops_skip = {tp.partition: 1 << 62 for tp in assigned if tp.topic == ops_name}
        # (any checkpoint's offset is at most where the restore's replay will end, from where
        # the agents go on: the furthest one here, whichever worker wrote it, skips the most)
        offsets = (ckdir.furthest_offsets("events", bootstrap_servers(settings.kafka))
                   if settings.checkpoint_interval_s > 0 else {})
        for tp in events_tps:
            await app.consumer.seek(tp, offsets.get(tp.partition, 0))
        state["task"] = asyncio.ensure_future(restore_retrying(set(assigned), pipe.generation))

    return app, pipe


async def replay(bootstrap: str, partitions: list[int], pipe: Pipeline, owned: set[int],
                 publish: Any, due: Any, fetch: int = 5000, *, start: dict[int, int] | None = None,
                 ops: tuple[str, dict[int, int]] | None = None) -> tuple[dict[int, int], dict[int, int]]:
    """Feed ``partitions`` of chorus.events, from ``start`` (partition -> first offset; default:
    the beginning) to their end offsets now, through ``pipe.on_event(value, owned)`` merged by
    event time (each partition's own order is kept: a k-way merge on the head events' ``time_us``).
    ``ops = (ops topic, {partition: first offset})``: those ops partitions are merged in too (a
    message by its first op's time, through ``pipe.on_ops``): what a checkpoint had not applied
    yet. Returns ({events partition: end offset}, {ops partition: end offset}).

    In time order the owners' clock never runs ahead of a partition that is still replaying, so a
    single worker rebuilds exactly the state of an uninterrupted run (with several workers, ops for
    other workers' partitions still take the ops topic).
    """
    from aiokafka import TopicPartition

    from stream.kafka import ReadToEnd, make_consumer

    sources = [(TOPIC_EVENTS, p, (start or {}).get(p, 0)) for p in partitions]
    if ops is not None:
        sources += [(ops[0], p, o) for p, o in sorted(ops[1].items())]
    if not sources:
        return {}, {}
    tps = {(t, p): TopicPartition(t, p) for t, p, _ in sources}
    consumer = make_consumer(bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        reader = await ReadToEnd.open(consumer, tps.values(), {tps[(t, p)]: o for t, p, o in sources})
        buffers: dict[tuple, deque] = {k: deque() for k in tps}

        async def refill(k: tuple) -> None:
            tp = tps[k]
            while not buffers[k] and tp in reader.pending:
                for m in (await reader.fetch(tp, timeout_ms=1000, max_records=fetch)).get(tp, []):
                    if k[0] == TOPIC_EVENTS:
                        ev = pipe.parse_event(m.value, k[1], m.offset)  # None: rejected and counted
                        if ev is not None:
                            buffers[k].append((ev["time_us"], ev, m.offset))
                    else:
                        try:
                            first = decode_ops(m.value)[0][2]
                            first = first if type(first) is int else -1
                        except (ValueError, TypeError, IndexError, KeyError):
                            first = -1  # on_ops rejects and counts it
                        buffers[k].append((first, m.value, m.offset))

        heap = []
        for k in tps:
            await refill(k)
            if buffers[k]:
                heap.append((buffers[k][0][0], k))
        heapq.heapify(heap)
        while heap:
            _, k = heapq.heappop(heap)
            _, value, offset = buffers[k].popleft()
            if k[0] == TOPIC_EVENTS:
                pipe.on_event(value, owned, k[1], offset)
            else:
                pipe.on_ops(value, k[1], offset)
            if due():
                await publish()
            if not buffers[k]:
                await refill(k)
            if buffers[k]:
                heapq.heappush(heap, (buffers[k][0][0], k))
        ends: tuple[dict[int, int], dict[int, int]] = ({}, {})
        for (t, p), tp in tps.items():
            ends[0 if t == TOPIC_EVENTS else 1][p] = reader.ends[tp]
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

    from stream.process import exit_with_parent, install, kafka_error_line

    install(settings.uvloop)
    exit_with_parent()  # under `chorus run`: never outlive it
    try:
        n_ops = asyncio.run(asyncio.wait_for(ensure_worker_topics(settings, app_kw.get("app_id", APP_ID)), 60))
    except Exception as exc:  # aiokafka raises its own error types
        raise ConnectionError(kafka_error_line(settings.kafka, exc, "create the worker's topics")) from None
    app, _ = build_app(settings, ops_partitions=n_ops, **app_kw)
    if serve_metrics:
        metrics.serve(settings.metrics_host, settings.metrics_port)
    ModeWorker(app, loglevel="WARNING", quiet=True).execute_from_commandline()

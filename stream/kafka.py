"""Kafka client factories shared by every component (aiokafka), and delivery that rides out
broker outages (:class:`ReliableSender`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Awaitable, Callable, Iterable, Mapping

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, TopicAlreadyExistsError

from stream import metrics
from stream.config import PROFILES
from stream.topics import TopicSpec, describe_ms, ops_topic, registry

log = logging.getLogger("chorus.kafka")


@contextlib.contextmanager
def quiet_client_logs():
    """aiokafka logs every failed dial at ERROR; while a stage starts, the one-line error it
    raises when Kafka cannot be reached says it all, so its log is held to CRITICAL meanwhile."""
    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        kafka_log.setLevel(level)


def make_producer(bootstrap: str, idempotence: bool = True, **kw) -> AIOKafkaProducer:
    """acks=all producer; idempotence off only where the broker lacks it (embedded)."""
    opts = dict(acks="all", enable_idempotence=idempotence, linger_ms=5, max_batch_size=256 * 1024)
    opts.update(kw)
    return AIOKafkaProducer(bootstrap_servers=bootstrap, **opts)


def make_consumer(bootstrap: str, *topics: str, group_id: str | None = None, **kw) -> AIOKafkaConsumer:
    opts = dict(auto_offset_reset="earliest", enable_auto_commit=group_id is not None)
    opts.update(kw)
    return AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=group_id, **opts)


class ReadToEnd:
    """Reading partitions to their end: from where the consumer stands (the beginning, after
    :meth:`open`) up to the end offsets they had when :meth:`open` ran, so records published
    meanwhile are left for later. Used wherever chorus reads what a topic holds now: the worker's
    replay of ``chorus.events`` and `chorus report` on ``chorus.attributions``.

    ``await ReadToEnd.open(consumer, tps)`` (a started consumer with no subscription: it assigns
    ``tps`` and seeks to their beginning), then ``await fetch(...)`` until :attr:`pending` is empty.
    """

    def __init__(self, consumer: AIOKafkaConsumer, ends: Mapping[Any, int]):
        self.consumer = consumer
        self.ends = dict(ends)  # TopicPartition -> end offset at open()
        self.pending = {tp for tp, end in self.ends.items() if end > 0}

    @classmethod
    async def open(cls, consumer: AIOKafkaConsumer, tps: Iterable[Any],
                   start: Mapping[Any, int] | None = None) -> "ReadToEnd":
        """``start``: {TopicPartition: first offset to read} for some partitions (the others
        from their beginning)."""
        tps = list(tps)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        reader = cls(consumer, ends)
        for tp, offset in (start or {}).items():
            if offset > 0:
                consumer.seek(tp, offset)
                if offset >= ends[tp]:
                    reader.pending.discard(tp)
        return reader

    async def fetch(self, *tps: Any, timeout_ms: int = 500, max_records: int | None = None) -> dict[Any, list]:
        """One fetch from the pending partitions among ``tps`` (default: every pending one):
        {TopicPartition: records before its end offset}. A partition whose position reached its
        end leaves :attr:`pending` (and is not fetched)."""
        for tp in tps or list(self.pending):
            if tp in self.pending and await self.consumer.position(tp) >= self.ends[tp]:
                self.pending.discard(tp)
        wanted = [tp for tp in (tps or self.pending) if tp in self.pending]
        if not wanted:
            return {}
        batch = await self.consumer.getmany(*wanted, timeout_ms=timeout_ms, max_records=max_records)
        out = {}
        for tp, records in batch.items():
            end = self.ends[tp]
            kept = [r for r in records if r.offset < end]
            if len(kept) < len(records):
                self.pending.discard(tp)
            if kept:
                out[tp] = kept
        return out


def _specs(topics: Iterable[TopicSpec] | Mapping[str, int] | None, window_s: int | None) -> list[TopicSpec]:
    """TopicSpecs from specs, or from {name: partitions} (None: every topic) and a window."""
    if topics is not None and not isinstance(topics, Mapping):
        return list(topics)
    reg = registry(SimpleNamespace(window=(window_s or PROFILES["default"][0], 0)))
    if topics is None:
        return list(reg.values())
    out = []
    for name, n in topics.items():
        base = reg.get(name) or replace(reg[ops_topic()], name=name)  # another app id's ops topic
        out.append(replace(base, partitions=n))
    return out


def topic_config(topic: str, window_s: int | None = None) -> dict[str, str]:
    """The configs chorus sets when it creates ``topic`` (:mod:`stream.topics`)."""
    return _specs({topic: 1}, window_s)[0].configs()


async def ensure_topics(bootstrap: str, topics: Iterable[TopicSpec] | Mapping[str, int] | None = None,
                        window_s: int | None = None) -> None:
    """Create the topics that do not exist yet (replication factor 1) with their registry configs
    (:mod:`stream.topics`); existing topics are left as they are (see :func:`check_topics`).
    ``topics``: specs (:func:`stream.topics.stage_topics`), or {name: partitions} with the
    registry's configs for a ``window_s`` window (None: every topic; window: the default profile's)."""
    specs = _specs(topics, window_s)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    with quiet_client_logs():  # an unreachable Kafka: the caller's one line says it
        await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(s.name, s.partitions, 1, topic_configs=s.configs()) for s in specs if s.name not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


# Topic configs whose Kafka default is what chorus wants (a broker that reports only configs set
# explicitly, like the embedded one, leaves them out).
KAFKA_DEFAULTS = {"cleanup.policy": "delete"}


@dataclass
class TopicCheck:
    """What :func:`check_topics` found: ``partitions`` per existing topic, ``problems`` (one line
    each: what is wrong and the command that fixes it on a live cluster), ``notes`` (what could
    not be checked)."""

    partitions: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


async def check_topics(bootstrap: str, specs: Iterable[TopicSpec], stage: str = "chorus") -> TopicCheck:
    """Compare existing topics with the registry: partition count (metadata), and retention and
    cleanup policy where the broker serves DescribeConfigs (else a note says they were not
    checked). Logs each problem and note as one line; never raises for a mismatch."""
    specs = list(specs)
    out = TopicCheck()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        present = [s for s in specs if s.name in existing]  # (describing a missing one may create it)
        if not present:
            return out
        for t in await admin.describe_topics([s.name for s in present]):
            if not t.get("error_code"):
                out.partitions[t["topic"]] = len(t.get("partitions") or ())
        configs: dict[str, dict[str, str]] = {}
        try:
            resources = [ConfigResource(ConfigResourceType.TOPIC, s.name) for s in present]
            for response in await asyncio.wait_for(admin.describe_configs(resources), 30):
                for r in response.to_object()["resources"]:
                    if not r["error_code"]:
                        configs[r["resource_name"]] = {e["config_names"]: e["config_value"]
                                                       for e in r["config_entries"]}
        except Exception as exc:  # noqa: BLE001 - brokers without DescribeConfigs: degrade to a note
            out.notes.append(f"{stage}: the broker does not serve DescribeConfigs ({type(exc).__name__}); "
                             "retention and cleanup policy not checked (kafka-configs.sh --describe "
                             "--entity-type topics shows them)")
    finally:
        await admin.close()
    host = bootstrap.split(",")[0]
    for s in present:
        n = out.partitions.get(s.name)
        if n is not None and n != s.partitions:
            fix = (f"kafka-topics.sh --bootstrap-server {host} --alter --topic {s.name} --partitions {s.partitions}"
                   if n < s.partitions else f"recreate {s.name} with {s.partitions} partitions (Kafka cannot "
                   "reduce them)")
            out.problems.append(f"{stage}: topic {s.name} has {n} partition(s), chorus creates {s.partitions}; "
                                f"chorus adapts to {n}; to change it: {fix}")
        cfg = configs.get(s.name)
        if cfg is None:
            continue
        for key, want in s.configs().items():
            have = cfg.get(key, KAFKA_DEFAULTS.get(key))
            if have == want:
                continue
            what = (f"is {have}" + (f" ({describe_ms(int(have))})" if key == "retention.ms" and
                                     have.lstrip("-").isdigit() else "")) if have is not None else \
                "is not set (the broker default applies)"
            wanted = want + (f" ({describe_ms(int(want))}: {s.why})" if key == "retention.ms" else
                             f" ({s.why})")
            out.problems.append(f"{stage}: topic {s.name}: {key} {what}, chorus wants {wanted}; fix: "
                                f"kafka-configs.sh --bootstrap-server {host} --alter --entity-type topics "
                                f"--entity-name {s.name} --add-config {key}={want}")
    for line in out.problems:
        log.warning("%s", line)
    for line in out.notes:
        log.info("%s", line)
    return out


# (topic, key, value, partition or None, headers or None)
Message = tuple[str, "bytes | None", bytes, "int | None", "list[tuple[str, bytes]] | None"]


class ReliableSender:
    """Delivers messages to Kafka through a producer's ``send`` and rides out broker outages.

    ``send(topic, key, value, partition, headers)`` is a coroutine returning the delivery future
    (aiokafka's ``AIOKafkaProducer.send`` through :meth:`for_aiokafka`, or Faust's
    ``app.producer.send``). :meth:`send` waits for the previous batch's acknowledgements before
    sending the next (one batch in flight, so delivery is pipelined with processing but a stage
    can never run further ahead of Kafka than one batch): a message whose send or acknowledgement
    fails with one of ``retry_on`` (timeouts, a broker that is down or frozen) is re-sent, in
    order, with exponential backoff from ``backoff_s`` to ``max_backoff_s``, until Kafka takes it,
    so nothing is lost. Meanwhile ``chorus_kafka_unavailable{stage}`` is 1, each re-sent message
    counts in ``chorus_kafka_send_retries_total{stage}``, and one log line per attempt says how
    many messages wait and when the next attempt is. A message Kafka refuses for good (too large)
    is logged and counted in ``chorus_records_rejected_total{topic, reason="publish_rejected"}``.
    Calls are serialized (a lock), so several tasks of one stage may share a sender.
    """

    def __init__(self, send: Callable[..., Awaitable[Any]], stage: str, *,
                 retry_on: tuple[type[BaseException], ...] = (KafkaError,), backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0):
        self._send = send
        self.stage = stage
        self.retry_on = tuple(retry_on) + (asyncio.TimeoutError,)
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.retries = 0  # messages re-sent
        self.delivered = 0
        self._in_flight: list[tuple[Message, Any]] = []
        self._lock = asyncio.Lock()
        self._down_since: float | None = None
        self._attempt = 0
        metrics.KAFKA_UNAVAILABLE.labels(stage=stage).set(0)

    @classmethod
    def for_aiokafka(cls, producer: AIOKafkaProducer, stage: str, **kw: Any) -> "ReliableSender":
        async def send(topic, key, value, partition, headers):
            return await producer.send(topic, value, key=key, partition=partition, headers=headers)
        return cls(send, stage, **kw)

    async def send(self, messages: Iterable[Message]) -> None:
        """Wait until the previous batch is acknowledged, then send ``messages`` (not awaited)."""
        async with self._lock:
            await self._settle()
            self._in_flight = [(m, await self._send_one(m)) for m in messages]

    async def flush(self) -> None:
        """Wait until everything sent so far is acknowledged (retrying as needed)."""
        async with self._lock:
            await self._settle()

    def unacked(self) -> list[Message] | None:
        """Messages handed to Kafka and not known to be acknowledged (for a checkpoint to keep);
        None while a send is under way (the batch being sent is in neither place)."""
        if self._lock.locked():
            return None
        return [m for m, f in self._in_flight
                if f is None or not f.done() or f.cancelled() or f.exception() is not None]

    @property
    def waiting(self) -> int:
        """Messages sent but not yet known to be acknowledged."""
        return len(self._in_flight)

    async def _send_one(self, m: Message) -> Any:
        while True:
            try:
                return await self._send(*m)
            except MessageSizeTooLargeError as exc:
                return self._refused(m, exc)
            except self.retry_on as exc:
                await self._wait(exc, 1)
                self.retries += 1
                metrics.KAFKA_SEND_RETRIES.labels(stage=self.stage).inc()

    def _refused(self, m: Message, exc: BaseException) -> None:
        log.error("%s: Kafka refused a record for %s for good (%r); skipping it", self.stage, m[0], exc)
        metrics.RECORDS_REJECTED.labels(topic=m[0], reason="publish_rejected").inc()
        return None

    async def _settle(self) -> None:
        pending = self._in_flight
        while pending:
            failed: list[Message] = []
            error: BaseException | None = None
            for m, fut in pending:
                if fut is None:
                    continue
                try:
                    await fut
                    self.delivered += 1
                except MessageSizeTooLargeError as exc:
                    self._refused(m, exc)
                except self.retry_on as exc:
                    failed.append(m)
                    error = exc
            self._in_flight = [(m, None) for m in failed]
            if not failed:
                break
            await self._wait(error, len(failed))
            self.retries += len(failed)
            metrics.KAFKA_SEND_RETRIES.labels(stage=self.stage).inc(len(failed))
            pending = [(m, await self._send_one(m)) for m in failed]
        self._in_flight = []
        if self._down_since is not None:
            log.warning("%s: Kafka acknowledges again after %.0f s; every waiting record delivered",
                        self.stage, time.monotonic() - self._down_since)
            self._down_since, self._attempt = None, 0
            metrics.KAFKA_UNAVAILABLE.labels(stage=self.stage).set(0)

    async def _wait(self, exc: BaseException | None, waiting: int) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            metrics.KAFKA_UNAVAILABLE.labels(stage=self.stage).set(1)
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** self._attempt)
        self._attempt += 1
        log.warning("%s: cannot deliver to Kafka for %.0f s (%r); %d record(s) waiting, attempt %d in %.1f s",
                    self.stage, time.monotonic() - self._down_since, exc, waiting, self._attempt + 1, delay)
        await asyncio.sleep(delay)

"""Kafka client factories shared by every component (aiokafka), and delivery that rides out
broker outages (:class:`ReliableSender`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, TopicAlreadyExistsError

from stream import metrics

from stream.schemas import TOPIC_EVENTS, TOPIC_GRAPH, TOPIC_PARTITIONS

OPS_SUFFIX = "-ops"  # the worker's repartition topic is f"{app_id}-ops"


def make_producer(bootstrap: str, idempotence: bool = True, **kw) -> AIOKafkaProducer:
    """acks=all producer; idempotence off only where the broker lacks it (embedded)."""
    opts = dict(acks="all", enable_idempotence=idempotence, linger_ms=5, max_batch_size=256 * 1024)
    opts.update(kw)
    return AIOKafkaProducer(bootstrap_servers=bootstrap, **opts)


def make_consumer(bootstrap: str, *topics: str, group_id: str | None = None, **kw) -> AIOKafkaConsumer:
    opts = dict(auto_offset_reset="earliest", enable_auto_commit=group_id is not None)
    opts.update(kw)
    return AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=group_id, **opts)


def topic_config(topic: str, window_s: int | None = None) -> dict[str, str]:
    """The config chorus sets when it creates ``topic`` (existing topics are left alone).

    chorus.graph keeps every record (``retention.ms=-1``): follows are not windowed and the
    operator rebuilds the whole graph from it after a restart, so a broker-wide retention (the
    compose file's 48 h, Kafka's default 7 days) must not delete old follows. chorus.events and the
    worker's ops topic (``<app id>-ops``) hold 2 windows when the window is known (the worker
    replays chorus.events on every rebalance, so its retention bounds replay time). Others: {}.
    """
    if topic == TOPIC_GRAPH:
        return {"retention.ms": "-1"}
    if window_s and (topic == TOPIC_EVENTS or topic.endswith(OPS_SUFFIX)):
        return {"retention.ms": str(2 * int(window_s) * 1000)}
    return {}


async def ensure_topics(bootstrap: str, partitions: dict[str, int] | None = None,
                        window_s: int | None = None) -> None:
    """Create chorus topics that do not exist yet (replication factor 1), with
    :func:`topic_config`."""
    partitions = partitions or TOPIC_PARTITIONS
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(t, n, 1, topic_configs=topic_config(t, window_s))
               for t, n in partitions.items() if t not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


log = logging.getLogger("chorus.kafka")

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

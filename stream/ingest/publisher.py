"""Publisher: bounded frame queue -> Kafka ``chorus.events``, ack tracking and the cursor commit.

The firehose reader puts decoded frames (:class:`stream.ingest.decode.Decoded`, seq order) on a bounded
``asyncio.Queue``; :meth:`Publisher.run` takes them one by one, registers each with the
:class:`AckTracker` and sends its events (key = author DID, value = compact JSON). When Kafka is
slow, ``producer.send`` waits for buffer space, the queue fills and the reader stops reading the
socket: the ingester falls behind (``chorus_ingest_lag_seconds`` grows) instead of dropping events
or growing memory without bound.

Cursor rule (at-least-once): the committed cursor is the seq of the newest frame such that every
event of it *and of every frame received before it* was acknowledged by Kafka (acks=all).
Frames with no events (identity, sync, other collections, invalid ops) complete at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from stream.ingest.cursor import CursorStore
from stream.ingest.decode import Decoded
from stream.ingest.reader import lag_seconds
from stream.metrics import (EVENTS_PUBLISHED, INGEST_CURSOR, INGEST_FRAMES_INVALID, INGEST_LAG, KAFKA_SEND_RETRIES,
                            KAFKA_UNAVAILABLE)
from stream.schemas import TOPIC_EVENTS, TOPIC_IDENTITIES, dumps

log = logging.getLogger("chorus.ingest")

# Send failures that retrying cannot fix; every other failure is retried until it succeeds.
_PERMANENT = (MessageSizeTooLargeError,)


class AckTracker:
    """Frames in arrival order with their count of unacknowledged events.

    ``cursor`` = seq of the newest frame that, with all frames before it, is fully acknowledged;
    ``cursor_time_us`` its time. Entries are ``[seq, time_us, remaining]`` lists.
    """

    def __init__(self, cursor: int | None = None):
        self.cursor = cursor
        self.cursor_time_us: int | None = None
        self._pending: deque[list] = deque()

    def add(self, seq: int, time_us: int | None, n_events: int) -> list:
        entry = [seq, time_us, n_events]
        self._pending.append(entry)
        if n_events == 0:
            self._advance()
        return entry

    def ack(self, entry: list) -> None:
        entry[2] -= 1
        if entry[2] == 0 and self._pending and self._pending[0] is entry:
            self._advance()

    def _advance(self) -> None:
        p = self._pending
        while p and p[0][2] == 0:
            seq, t_us, _ = p.popleft()
            self.cursor = seq
            if t_us is not None:
                self.cursor_time_us = t_us

    @property
    def pending(self) -> int:
        """Frames received but not yet fully acknowledged."""
        return len(self._pending)


class Publisher:
    """Sends queued frames' events to ``topic`` and tracks their acknowledgements."""

    def __init__(self, producer: AIOKafkaProducer, queue: asyncio.Queue, tracker: AckTracker,
                 topic: str = TOPIC_EVENTS, retry_delay_s: float = 0.5):
        self.producer = producer
        self.queue = queue
        self.tracker = tracker
        self.topic = topic
        self.retry_delay_s = retry_delay_s
        self.published = 0  # events acknowledged
        self.retries = 0  # sends retried after a failure
        self._down = False  # a send failed and no ack came since (chorus_kafka_unavailable)
        KAFKA_UNAVAILABLE.labels(stage="ingest").set(0)
        self._kinds: dict[str, Any] = {}
        self._retry_tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Forever: take a frame, register it, send its events (waits when Kafka's buffer is full)."""
        while True:
            d: Decoded = await self.queue.get()
            entry = self.tracker.add(d.seq, d.time_us, len(d.events))
            for ev in d.events:
                await self._send(ev["did"].encode(), dumps(ev), ev["kind"], entry)
            if d.identity is not None:
                await self._identity(*d.identity, d.time_us)
            self.queue.task_done()

    async def _identity(self, did: str, handle: str | None, time_us: int | None) -> None:
        """An #identity frame's handle -> chorus.identities. Display only, so not part of the
        cursor's acknowledgements: a send that fails is logged and dropped (the next #identity of
        the account, or a backfill, sets it again)."""
        value = dumps({"did": did, "handle": handle, "time_us": time_us or 0})
        try:
            fut = await self.producer.send(TOPIC_IDENTITIES, value=value, key=did.encode())
        except KafkaError as exc:
            log.warning("handle of %s not published (%s)", did, exc)
            return
        fut.add_done_callback(lambda f: f.cancelled() or f.exception() is None
                              or log.warning("handle of %s not published (%r)", did, f.exception()))

    async def _send(self, key: bytes, value: bytes, kind: str, entry: list) -> None:
        while True:
            try:
                fut = await self.producer.send(self.topic, value=value, key=key)
            except _PERMANENT as exc:
                self._reject(exc, entry)
                return
            except KafkaError as exc:  # buffer-full timeout or broker trouble: wait and retry
                self._retrying()
                log.warning("Kafka send failed (%s); retrying", exc)
                await asyncio.sleep(self.retry_delay_s)
                continue
            fut.add_done_callback(lambda f: self._on_ack(f, key, value, kind, entry))
            return

    def _retrying(self) -> None:
        """A send failed and will be retried: counted, and "cannot reach Kafka" until an ack."""
        self.retries += 1
        KAFKA_SEND_RETRIES.labels(stage="ingest").inc()
        if not self._down:
            self._down = True
            KAFKA_UNAVAILABLE.labels(stage="ingest").set(1)

    def _reject(self, exc: BaseException, entry: list) -> None:
        """An event Kafka can never take (e.g. too large): count it and skip it, not stall."""
        log.error("Kafka rejected an event for good (%s); skipping it", exc)
        INGEST_FRAMES_INVALID.labels("publish_rejected").inc()
        self.tracker.ack(entry)

    def _on_ack(self, fut: asyncio.Future, key: bytes, value: bytes, kind: str, entry: list) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            if isinstance(exc, _PERMANENT):
                self._reject(exc, entry)
                return
            self._retrying()
            task = asyncio.get_running_loop().create_task(self._resend(key, value, kind, entry))
            self._retry_tasks.add(task)
            task.add_done_callback(self._retry_tasks.discard)
            return
        self.published += 1
        if self._down:
            self._down = False
            KAFKA_UNAVAILABLE.labels(stage="ingest").set(0)
        c = self._kinds.get(kind)
        if c is None:
            c = self._kinds[kind] = EVENTS_PUBLISHED.labels(kind)
        c.inc()
        self.tracker.ack(entry)

    async def _resend(self, key: bytes, value: bytes, kind: str, entry: list) -> None:
        await asyncio.sleep(self.retry_delay_s)
        await self._send(key, value, kind, entry)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued frame is sent and acknowledged; False on timeout."""
        async def _wait() -> None:
            await self.queue.join()
            await self.producer.flush()
            while self.tracker.pending or self._retry_tasks:
                await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(_wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


class CursorCommitter:
    """Persists the tracker's cursor (at most every ``interval_s`` s) and exports cursor and lag."""

    def __init__(self, tracker: AckTracker, store: CursorStore | None, interval_s: float = 0.5):
        self.tracker = tracker
        self.store = store
        self.interval_s = interval_s
        self.saved: int | None = tracker.cursor  # what the store already holds

    def commit(self) -> None:
        cursor = self.tracker.cursor
        if self.tracker.cursor_time_us is not None:  # before the first ack the lag is unknown, not 0
            INGEST_LAG.set(lag_seconds(self.tracker.cursor_time_us))
        if cursor is None or cursor == self.saved:
            return
        INGEST_CURSOR.set(cursor)
        if self.store is not None:
            self.store.save(cursor)
        self.saved = cursor

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.commit()

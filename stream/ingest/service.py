"""The ingester: firehose reader -> bounded queue -> Kafka publisher, with a durable cursor.

In-process use (``chorus run`` and tests)::

    ing = Ingester(settings, relay="ws://127.0.0.1:8765/xrpc")
    task = asyncio.create_task(ing.run())   # raises IngestError at start if Kafka is unreachable
    ...
    await ing.stop()                        # stop reading, publish what is queued, save the cursor
    await task

Source: a relay's subscribeRepos (``relay``, default ``Settings.relay``) or a Jetstream v1
``/subscribe`` URL (``jetstream``, or ``Settings.jetstream``; positions are then ``time_us``).

Start cursor: ``cursor`` argument (``--cursor``), else the stored cursor for this source URL
(:mod:`stream.ingest.cursor`), else live. Afterwards the cursor advances only over seqs whose events
Kafka acknowledged (:mod:`stream.ingest.publisher`), and every reconnect resumes from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from typing import Any

from aiokafka.errors import KafkaError

from stream.config import ConfigError, Settings, bootstrap_servers
from stream.ingest.cursor import CursorError, CursorStore
from stream.ingest.reader import Backoff, FirehoseReader
from stream.kafka import check_topics, ensure_topics, make_producer
from stream.metrics import INGEST_CURSOR
from stream.process import PRODUCER_START, kafka_start_error, run_service, setup_logging
from stream.ingest.publisher import AckTracker, CursorCommitter, Publisher
from stream.schemas import TOPIC_EVENTS
from stream.topics import stage_topics

log = logging.getLogger("chorus.ingest")


class IngestError(RuntimeError):
    """The ingester cannot start (bad settings, Kafka unreachable, unreadable cursor): one line.
    ``code``: the CLI's exit status (1: the world; :class:`IngestConfigError`: 2, a usage error)."""

    code = 1


class IngestConfigError(IngestError):
    """Bad settings or flags (a relay URL, the cursor, no Kafka configured, a corrupt cursor file):
    exit 2, as every command's usage errors (README)."""

    code = 2


class Ingester:
    """Relay -> ``chorus.events``. ``queue_size`` bounds the frames held between reader and Kafka."""

    def __init__(self, settings: Settings | None = None, *, relay: str | None = None, jetstream: str | None = None,
                 cursor: int | None = None, queue_size: int = 10_000, commit_interval_s: float = 0.5,
                 persist_cursor: bool = True, recv_timeout: float = 30.0,
                 backoff: Backoff | None = None, kafka_connect_timeout: float = 20.0,
                 producer_options: dict[str, Any] | None = None):
        self.settings = settings or Settings()
        jetstream = jetstream or (None if relay else self.settings.jetstream) or None  # "": unset
        if relay and jetstream:
            raise IngestConfigError("give a relay or a Jetstream URL, not both")
        self.jetstream = jetstream is not None
        self.relay = jetstream or relay or self.settings.relay
        what = "Jetstream" if self.jetstream else "relay"
        if not self.relay.startswith(("ws://", "wss://")):
            raise IngestConfigError(f"{what} URL must start with ws:// or wss:// (got {self.relay!r})")
        if self.jetstream and urllib.parse.urlsplit(self.relay).query:
            raise IngestConfigError(f"give the Jetstream URL without a query (chorus sets wantedCollections and "
                              f"cursor): {self.relay!r}")
        if cursor is not None and cursor < 0:
            raise IngestConfigError(f"cursor must be >= 0 (got {cursor})")
        if not self.settings.kafka:
            raise IngestConfigError("no Kafka configured: pass --kafka kafka://host:port or set CHORUS_KAFKA")
        try:
            self.bootstrap = bootstrap_servers(self.settings.kafka)
        except ConfigError as exc:
            raise IngestConfigError(str(exc)) from None
        self.store = CursorStore(self.settings.state_dir, self.relay) if persist_cursor else None
        try:
            stored = self.store.load() if self.store is not None else None
        except CursorError as exc:
            raise IngestConfigError(str(exc)) from None
        self.start_cursor = cursor if cursor is not None else stored
        self.tracker = AckTracker(self.start_cursor)
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=queue_size)
        self.reader = FirehoseReader(self.relay, self.queue.put, lambda: self.tracker.cursor,
                                     recv_timeout=recv_timeout, backoff=backoff, jetstream=self.jetstream)
        self.reader.last_seq = self.start_cursor  # frames at or below it were published before
        self.committer = CursorCommitter(self.tracker, self.store, commit_interval_s)
        if cursor is not None:
            self.committer.saved = None  # the override replaces the stored cursor at the first commit
        self._producer_options = producer_options or {}
        self._kafka_timeout = kafka_connect_timeout
        self.producer = None
        self.publisher: Publisher | None = None
        self._stop = asyncio.Event()

    @property
    def cursor(self) -> int | None:
        """The last seq Kafka acknowledged in full (what a restart would resume from)."""
        return self.tracker.cursor

    @property
    def published(self) -> int:
        return self.publisher.published if self.publisher else 0

    async def _start_kafka(self) -> None:
        producer = make_producer(self.bootstrap, self.settings.kafka_idempotence, **self._producer_options)
        kafka_log = logging.getLogger("aiokafka")  # it logs each failed dial; the IngestError says it all
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)
        step = "create the topics"
        try:
            await asyncio.wait_for(
                ensure_topics(self.bootstrap, stage_topics("ingest", self.settings)), self._kafka_timeout)
            await asyncio.wait_for(check_topics(self.bootstrap, stage_topics("ingest", self.settings), "ingest"),
                                   self._kafka_timeout)
            step = PRODUCER_START
            await asyncio.wait_for(producer.start(), self._kafka_timeout)
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise IngestError(kafka_start_error(self.bootstrap, step, exc, self.settings.kafka_idempotence)) from None
        finally:
            kafka_log.setLevel(level)
        self.producer = producer
        self.publisher = Publisher(producer, self.queue, self.tracker)

    async def run(self) -> None:
        """Ingest until :meth:`stop`. Raises IngestError if Kafka cannot be reached at start."""
        await self._start_kafka()
        if self.start_cursor is not None:
            INGEST_CURSOR.set(self.start_cursor)
        log.info("ingesting %s%s -> %s (%s), cursor %s", "Jetstream " if self.jetstream else "", self.relay, TOPIC_EVENTS, self.bootstrap,
                 "live" if self.start_cursor is None else self.start_cursor)
        tasks = [asyncio.create_task(c, name=n) for n, c in (
            ("publisher", self.publisher.run()), ("committer", self.committer.run()),
            ("reader", self.reader.run()))]
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in done if t is not stop and not t.cancelled() and t.exception()]
            if failed:
                raise failed[0].exception()
        finally:
            stop.cancel()
            await self._shutdown(tasks)

    async def _shutdown(self, tasks: list[asyncio.Task]) -> None:
        reader_task = tasks[2]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.reader.stop(), 2)
        reader_task.cancel()
        await asyncio.gather(reader_task, return_exceptions=True)
        if not await self.publisher.drain(timeout_s=10):
            log.warning("stopping with %d frames unacknowledged; they will be replayed next start",
                        self.tracker.pending + self.queue.qsize())
        for t in tasks[:2]:
            t.cancel()
        await asyncio.gather(*tasks[:2], return_exceptions=True)
        self.committer.commit()
        with contextlib.suppress(Exception):
            await self.producer.stop()
        log.info("ingester stopped at cursor %s (%d events published, %d replayed frames dropped)",
                 self.cursor, self.published, self.reader.duplicates)

    async def stop(self) -> None:
        """Ask :meth:`run` to stop: it drains the queue, saves the cursor and returns."""
        self._stop.set()


def main(settings: Settings, relay: str | None = None, cursor: int | None = None,
         jetstream: str | None = None) -> None:
    """Blocking entry point of ``chorus ingest``: metrics endpoint, SIGINT/SIGTERM stop gracefully.

    Raises IngestError (one line) when it cannot start.
    """
    from stream import metrics

    setup_logging()
    ingester = Ingester(settings, relay=relay, cursor=cursor, jetstream=jetstream)
    try:
        metrics.serve(settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        raise IngestError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: "
                          f"{exc.strerror or exc}") from None

    run_service(ingester.run, ingester.stop, use_uvloop=settings.uvloop)

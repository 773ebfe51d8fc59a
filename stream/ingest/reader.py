"""Firehose reader: the SDK's subscribeRepos websocket client with chorus's reconnect policy.

:class:`FirehoseReader` wraps ``AsyncFirehoseSubscribeReposClient``: every dial resumes from
``resume_cursor()`` (the last cursor Kafka acknowledged), exponential backoff with jitter,
``FutureCursor`` -> reconnect live with a warning, replayed frames (seq <= last seen) dropped.
Frames are decoded by :func:`stream.ingest.decode.decode_frame` and go to an async ``sink`` (the
bounded queue to the publisher), so the reader never waits on Kafka itself.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from atproto_firehose import AsyncFirehoseSubscribeReposClient
from atproto_subscription import SubscriptionError

from stream.ingest.decode import FRAME_TYPES, WS_MAX_BYTES, Decoded, decode_frame
from stream.metrics import INGEST_FRAMES, INGEST_FRAMES_INVALID

log = logging.getLogger("chorus.ingest")



class RelayError(SubscriptionError):
    """An error frame from the relay (e.g. ``FutureCursor``, ``ConsumerTooSlow``)."""

    def __init__(self, code: str, message: str | None):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class Backoff:
    """Exponential backoff with jitter: attempt n waits U(0.5, 1) * min(cap, base * 2**(n-1)) s."""

    def __init__(self, base: float = 0.5, cap: float = 30.0):
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        self.attempt += 1
        return random.uniform(0.5, 1.0) * min(self.cap, self.base * 2 ** (self.attempt - 1))

    def reset(self) -> None:
        self.attempt = 0


class _Client(AsyncFirehoseSubscribeReposClient):
    """The SDK client with chorus's frame decoding, size limit, resume cursor and backoff."""

    def __init__(self, reader: "FirehoseReader", base_uri: str, recv_timeout: float):
        super().__init__(params=None, base_uri=base_uri, recv_timeout=recv_timeout)
        self._reader = reader

    def _get_connect_kwargs(self) -> dict[str, Any]:
        return {**super()._get_connect_kwargs(), "max_size": WS_MAX_BYTES}

    async def _before_connect(self) -> None:
        cursor = self._reader.dial_cursor()
        self.update_params({} if cursor is None else {"cursor": cursor})
        log.info("connecting to %s", self._websocket_uri)
        self._reader.connections += 1

    def _decode_frame(self, raw_frame):
        decoded = decode_frame(raw_frame)
        if decoded.error is not None:
            self._reader.count(decoded)
            raise RelayError(*decoded.error)  # the SDK ends start() with it; the reader decides
        return decoded

    def _get_reconnection_delay(self) -> float:
        delay = self._reader.backoff.next()
        log.warning("firehose connection lost; reconnecting in %.2fs from cursor %s", delay,
                    self._reader.dial_cursor(peek=True))
        return delay

    def _track_reconnection(self, connected_at) -> None:
        if self._reader.progressed:  # the dropped connection delivered frames: start over
            self._reader.backoff.reset()
        self._reader.progressed = False
        self._reconnect_no = 1  # non-zero: the SDK sleeps _get_reconnection_delay() before dialing


class FirehoseReader:
    """Reads a relay into ``sink`` (an async callable taking a :class:`Decoded` with a seq).

    ``resume_cursor()`` gives the cursor to dial with (the last one Kafka acknowledged, or None for
    live). Frames whose seq is not above the last one passed to ``sink`` are replays after a
    reconnect and are dropped (counted in ``duplicates``).
    """

    def __init__(self, relay: str, sink: Callable[[Decoded], Awaitable[None]],
                 resume_cursor: Callable[[], int | None], recv_timeout: float = 30.0,
                 backoff: Backoff | None = None):
        self.relay = relay
        self.sink = sink
        self.resume_cursor = resume_cursor
        self.backoff = backoff or Backoff()
        self.last_seq: int | None = None
        self.progressed = False
        self.live_next = False
        self.connections = 0
        self.duplicates = 0
        self.frames = 0
        self._client = _Client(self, relay, recv_timeout)
        self._stopping = False
        self._frames = {t: INGEST_FRAMES.labels(t) for t in FRAME_TYPES}
        self._invalid: dict[str, Any] = {}

    def dial_cursor(self, peek: bool = False) -> int | None:
        """Cursor for the next dial: None (live) once after FutureCursor, else resume_cursor()."""
        if self.live_next:
            self.live_next = peek
            return None
        return self.resume_cursor()

    def count(self, d: Decoded) -> None:
        self.frames += 1
        self._frames[d.type].inc()
        for reason in d.invalid:
            c = self._invalid.get(reason)
            if c is None:
                c = self._invalid[reason] = INGEST_FRAMES_INVALID.labels(reason)
            c.inc()

    async def _on_frame(self, d: Decoded) -> None:
        self.count(d)
        self.progressed = True
        if d.info is not None:
            log.warning("relay info %s: %s", *d.info)
        if d.seq is None:
            return
        if self.last_seq is not None and d.seq <= self.last_seq:
            self.duplicates += 1
            return
        self.last_seq = d.seq
        await self.sink(d)

    async def run(self) -> None:
        """Read until :meth:`stop`; reconnects on every failure (never returns on its own)."""
        while not self._stopping:
            try:
                await self._client.start(self._on_frame)
                if not self._stopping:
                    log.warning("relay closed the connection; reconnecting")
            except RelayError as exc:
                if exc.code == "FutureCursor":
                    log.warning("relay says the cursor is in the future (%s); restarting live", exc)
                    self.live_next, self.last_seq = True, None
                    self._client._reconnect_no = 0  # dial again at once
                else:
                    log.warning("relay error %s; reconnecting from the last acknowledged cursor", exc)
            except SubscriptionError as exc:
                log.warning("firehose connection failed (%s); reconnecting", exc)

    async def stop(self) -> None:
        self._stopping = True
        await self._client.stop()


def lag_seconds(event_time_us: int | None) -> float:
    """Now minus an event time, seconds (0 when unknown)."""
    return 0.0 if event_time_us is None else max(0.0, time.time() - event_time_us / 1e6)

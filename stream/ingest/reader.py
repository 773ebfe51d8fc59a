"""Source reader: the SDK's websocket clients with chorus's reconnect policy, firehose or Jetstream.

:class:`FirehoseReader` wraps ``AsyncFirehoseSubscribeReposClient`` (or, for a Jetstream v1
``/subscribe`` URL, the SDK's generic ``AsyncWebsocketClient`` with
:func:`stream.ingest.jetstream.decode_message`; the seq is then Jetstream's ``time_us``): every dial resumes from
``resume_cursor()`` (the last cursor Kafka acknowledged), exponential backoff with jitter,
``FutureCursor`` -> reconnect live. Frames are decoded by :func:`stream.ingest.decode.decode_frame`
(with their receive time, which bounds event times) and go to an async ``sink`` (the bounded queue
to the publisher), so the reader never waits on Kafka itself.

Sequence rules (README "Delivery"):

- **Replay**: a frame whose seq is not above the last one forwarded is a replay (a reconnect
  resumes from the last *acknowledged* cursor, which can be behind what was already forwarded):
  dropped, counted in ``chorus_ingest_replayed_frames_total``.
- **Reset**: a connection dialed with cursor C whose first frame carries seq S < C cannot be a
  replay (a relay sends what follows the cursor it was given; Jetstream what is at or after it): the relay's numbering went back (a
  new relay behind the same URL, a restore from a backup). So does a ``FutureCursor`` answer. Either
  is logged as an error and counted in ``chorus_ingest_seq_resets_total``, and ingest continues from
  the new numbering (S and what follows; live after ``FutureCursor``); the stored cursor follows
  it from the next acknowledged frame.
- **Skip**: a connection dialed with cursor C that the relay answers with ``#info OutdatedCursor``
  (C is older than what it retains) starts at its oldest retained frame S: the seqs C+1 .. S-1
  are lost. Logged as an error and counted in ``chorus_ingest_skipped_frames_total`` (S - C - 1)
  and ``chorus_ingest_outdated_cursor_total``; every dial after the first counts in
  ``chorus_ingest_reconnects_total``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from atproto_firehose import AsyncFirehoseSubscribeReposClient
from atproto_subscription import SubscriptionError
from atproto_subscription.websocket import AsyncWebsocketClient

from stream.ingest.decode import FRAME_TYPES, WS_MAX_BYTES, Decoded, decode_frame
from stream.ingest.jetstream import REWIND_US, WANTED_COLLECTIONS, decode_message
from stream.metrics import (INGEST_FRAMES, INGEST_FRAMES_INVALID, INGEST_OUTDATED_CURSOR, INGEST_RECONNECTS,
                            INGEST_REPLAYED, INGEST_SEQ_RESETS, INGEST_SKIPPED, INGEST_TIME_CLAMPED)

log = logging.getLogger("chorus.ingest")



class RelayError(SubscriptionError):
    """An error frame from the relay (e.g. ``FutureCursor``, ``ConsumerTooSlow``)."""

    def __init__(self, code: str, message: str | None):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class Backoff:
    """Exponential backoff with jitter: attempt n waits U(0.5, 1) * min(cap_s, base_s * 2**(n-1)) s."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 30.0):
        self.base_s, self.cap_s, self.attempt = base_s, cap_s, 0

    def next(self) -> float:
        """The next wait, seconds."""
        self.attempt += 1
        return random.uniform(0.5, 1.0) * min(self.cap_s, self.base_s * 2 ** (self.attempt - 1))

    def reset(self) -> None:
        self.attempt = 0


class _Policy:
    """chorus's connection policy on top of an SDK websocket client (mixed in before it): size limit,
    resume cursor on every dial, backoff with reset after a connection that delivered frames."""

    _reader: "FirehoseReader"

    def _query(self, cursor: int | None) -> dict[str, Any]:
        raise NotImplementedError

    def _get_connect_kwargs(self) -> dict[str, Any]:
        return {**super()._get_connect_kwargs(), "max_size": WS_MAX_BYTES}

    async def _before_connect(self) -> None:
        cursor = self._reader.dial_cursor()
        self.update_params(self._query(cursor))
        log.info("connecting to %s", self._websocket_uri)
        self._reader.connected(cursor)

    def _get_reconnection_delay(self) -> float:
        delay = self._reader.backoff.next()
        log.warning("connection to %s lost; reconnecting in %.2fs from cursor %s", self._reader.relay, delay,
                    self._reader.dial_cursor(peek=True))
        return delay

    def _track_reconnection(self, connected_at) -> None:
        if self._reader.progressed:  # the dropped connection delivered frames: start over
            self._reader.backoff.reset()
        self._reader.progressed = False
        self._reconnect_no = 1  # non-zero: the SDK sleeps _get_reconnection_delay() before dialing


class _FirehoseClient(_Policy, AsyncFirehoseSubscribeReposClient):
    """The SDK's subscribeRepos client with chorus's decoding and policy."""

    def __init__(self, reader: "FirehoseReader", base_uri: str, recv_timeout: float):
        super().__init__(params=None, base_uri=base_uri, recv_timeout=recv_timeout)
        self._reader = reader

    def _query(self, cursor: int | None) -> dict[str, Any]:
        return {} if cursor is None else {"cursor": cursor}

    def _decode_frame(self, raw_frame):
        decoded = decode_frame(raw_frame, time.time_ns() // 1000)
        if decoded.error is not None:
            self._reader.count(decoded)
            raise RelayError(*decoded.error)  # the SDK ends start() with it; the reader decides
        return decoded


class _JetstreamClient(_Policy, AsyncWebsocketClient):
    """The SDK's reconnecting websocket client speaking Jetstream v1 (``/subscribe``, JSON text).

    The SDK's own Jetstream client (``atproto_jetstream``) speaks only the newer v2 protocol."""

    _error_class = SubscriptionError

    def __init__(self, reader: "FirehoseReader", url: str, recv_timeout: float):
        base, _, method = url.rstrip("/").rpartition("/")
        super().__init__(method, base, None, recv_timeout, max_message_size_bytes=WS_MAX_BYTES)
        self._reader = reader

    def _query(self, cursor: int | None) -> dict[str, Any]:
        query: dict[str, Any] = {"wantedCollections": list(WANTED_COLLECTIONS)}
        if cursor is not None:
            query["cursor"] = cursor
        return query

    def _decode_frame(self, raw_frame):
        return decode_message(raw_frame, time.time_ns() // 1000)

    def _handle_frame_decoding_error(self, exception: Exception) -> None:
        raise exception  # decode_message never raises: this is the sink failing


class FirehoseReader:
    """Reads a relay into ``sink`` (an async callable taking a :class:`Decoded` with a seq).

    ``resume_cursor()`` gives the cursor to dial with (the last one Kafka acknowledged, or None for
    live). Replays are dropped (counted in ``duplicates``) and resets followed (counted in
    ``resets``): see the module docstring. ``jetstream=True``: ``relay`` is a Jetstream
    ``/subscribe`` URL; positions are ``time_us``, and every dial rewinds the cursor by
    ``jetstream.REWIND_US`` (Jetstream's documented advice for gapless resumption; the replayed
    messages are dropped as replays).
    """

    def __init__(self, relay: str, sink: Callable[[Decoded], Awaitable[None]],
                 resume_cursor: Callable[[], int | None], recv_timeout: float = 30.0,
                 backoff: Backoff | None = None, jetstream: bool = False):
        self.relay = relay
        self.jetstream = jetstream
        self.sink = sink
        self.resume_cursor = resume_cursor
        self.backoff = backoff or Backoff()
        self.last_seq: int | None = None
        self.progressed = False
        self.live_next = False
        self.connections = 0
        self.duplicates = 0
        self.resets = 0
        self.frames = 0
        self.skipped = 0  # seqs jumped over after OutdatedCursor
        self.outdated = 0  # OutdatedCursor answers
        self._outdated = False  # the current connection was answered OutdatedCursor
        self.dialed: int | None = None  # cursor the current connection was dialed with
        self._first = False  # the current connection has not delivered a positioned frame yet
        self._client = (_JetstreamClient if jetstream else _FirehoseClient)(self, relay, recv_timeout)
        self._stopping = False
        self._frames = {t: INGEST_FRAMES.labels(t) for t in FRAME_TYPES}
        self._invalid: dict[str, Any] = {}

    def dial_cursor(self, peek: bool = False) -> int | None:
        """Cursor for the next dial: None (live) once after FutureCursor, else resume_cursor()."""
        if self.live_next:
            self.live_next = peek
            return None
        cursor = self.resume_cursor()
        if cursor is not None and self.jetstream:
            cursor = max(0, cursor - REWIND_US)
        return cursor

    def connected(self, cursor: int | None) -> None:
        """A new connection is being dialed with ``cursor``."""
        self.connections += 1
        if self.connections > 1:
            INGEST_RECONNECTS.inc()
        self.dialed, self._first, self._outdated = cursor, True, False

    def reset(self, why: str) -> None:
        """The source's numbering went back: count it, log it, forget the last seq forwarded."""
        self.resets += 1
        INGEST_SEQ_RESETS.inc()
        log.error("%s: %s's numbering went back (a new or restored source?); continuing from the new "
                  "numbering, the stored cursor follows it", why, self.relay)
        self.last_seq = None

    def count(self, d: Decoded) -> None:
        self.frames += 1
        self._frames[d.type].inc()
        if d.clamped:
            INGEST_TIME_CLAMPED.inc(d.clamped)
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
            if d.info[0] == "OutdatedCursor" and self._first:
                self._outdated = True
                self.outdated += 1
                INGEST_OUTDATED_CURSOR.inc()
        if d.seq is None:
            return
        if self._first:
            self._first = False
            if self.dialed is not None and d.seq < self.dialed:
                self.reset(f"first frame after dialing with cursor {self.dialed} has seq {d.seq}")
            elif self._outdated and self.dialed is not None and d.seq > self.dialed + 1:
                lost = d.seq - self.dialed - 1
                self.skipped += lost
                INGEST_SKIPPED.inc(lost)
                log.error("relay's retention passed cursor %d: resuming at seq %d, %d frames skipped",
                          self.dialed, d.seq, lost)
        if self.last_seq is not None and d.seq <= self.last_seq:
            self.duplicates += 1
            INGEST_REPLAYED.inc()
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
                    self.reset(f"relay says cursor {self.dialed} is in the future ({exc}); restarting live")
                    self.live_next = True
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

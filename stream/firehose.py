"""Firehose reader: ``com.atproto.sync.subscribeRepos`` frames -> normalized event dicts.

Two layers:

* :func:`decode_frame` (pure, never raises): raw websocket message -> :class:`Decoded` (frame type,
  seq, time, events, reasons it was invalid). Frame semantics (header/body split, message vs error
  frame) come from the atproto SDK's parser (``atproto_subscription.Frame.from_bytes``, libipld
  underneath). ``#commit`` bodies, the hot path, are then read as plain dicts and their CAR with
  ``libipld.decode_car``: building the SDK's pydantic models for every commit costs several times
  more than the whole decode (see benchmarks/ingest_bench.py), so they are used only for the rare
  ``#identity``/``#account``/``#sync``/``#info`` frames, where they validate the body.
* :class:`FirehoseReader`: the SDK's websocket client (``AsyncFirehoseSubscribeReposClient``)
  with chorus's reconnect policy: every dial resumes from ``resume_cursor()`` (the last cursor
  Kafka acknowledged), exponential backoff with jitter, ``FutureCursor`` -> reconnect live with a
  warning, replayed frames (seq <= last seen) dropped. Frames go to an async ``sink`` (the
  bounded queue to the publisher), so the reader never waits on Kafka itself.

Invalid-input reasons (``chorus_ingest_frames_invalid_total{reason}``): ``too_large`` (> 5 MB),
``truncated``, ``cbor`` (not DAG-CBOR), ``header`` (not a subscription frame), ``frame_shape``
(body fields missing or of the wrong type), ``invalid_did``, ``car`` (``blocks`` not a CAR file),
``missing_block`` (an op's record is not in the CAR), ``record_type``, ``record_shape``,
``op_shape``. Frame types (``chorus_ingest_frames_total{type}``): ``#commit``, ``#identity``,
``#account``, ``#sync``, ``#info``, ``error``, ``unknown`` (any other ``t``: skipped), ``invalid``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import libipld
from atproto_client.models.com.atproto.sync import subscribe_repos as lex
from atproto_client.models.utils import get_or_create
from atproto_firehose import AsyncFirehoseSubscribeReposClient
from atproto_subscription import ErrorFrame, Frame, FrameDecodingError, SubscriptionError

from . import normalize as nz
from .metrics import INGEST_FRAMES, INGEST_FRAMES_INVALID

log = logging.getLogger("chorus.ingest")

MAX_FRAME_BYTES = 5 * 1024 * 1024  # relays' (and the SDK's) frame limit; larger frames are skipped
# Hard websocket limit: frames between MAX_FRAME_BYTES and this are received, counted and skipped.
# Larger ones make the websocket library drop the connection (and the relay resend it forever).
WS_MAX_BYTES = 64 * 1024 * 1024

_SDK_MODELS = {"#identity": lex.Identity, "#account": lex.Account, "#sync": lex.Sync, "#info": lex.Info}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
FRAME_TYPES = ("#commit", *_SDK_MODELS, "error", "unknown", "invalid")


@dataclass(slots=True)
class Decoded:
    """One decoded frame. ``seq`` is None for frames without one (#info, errors, undecodable)."""

    type: str
    seq: int | None = None
    time_us: int | None = None
    events: list[dict] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # reasons, one per skipped frame or op
    error: tuple[str, str | None] | None = None  # error frame: (code, message)
    info: tuple[str, str | None] | None = None  # #info: (name, message)


def time_us(value: Any) -> int:
    """RFC 3339 timestamp -> microseconds since the epoch (naive = UTC); ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError("time is not a string")
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return (dt - _EPOCH) // _US


def _seq(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("seq")
    return value


def decode_frame(raw: bytes | str) -> Decoded:
    """Decode one websocket message. Never raises: bad input comes back with ``invalid`` reasons."""
    if isinstance(raw, str):  # text frames are not part of the protocol
        return Decoded("invalid", invalid=["header"])
    if len(raw) > MAX_FRAME_BYTES:
        return Decoded("invalid", invalid=["too_large"])
    try:
        frame = Frame.from_bytes(raw)
    except FrameDecodingError:
        return Decoded("invalid", invalid=["header"])
    except ValueError as exc:  # libipld
        msg = str(exc)
        truncated = "end of data" in msg or "remaining data" in msg or "EOF" in msg
        return Decoded("invalid", invalid=["truncated" if truncated else "cbor"])
    except RecursionError:
        return Decoded("invalid", invalid=["cbor"])
    except Exception:  # noqa: BLE001 - the SDK lets TypeError/AttributeError through on odd shapes
        return Decoded("invalid", invalid=["header"])
    if isinstance(frame, ErrorFrame):
        body = frame.body
        if not isinstance(body.error, str):
            return Decoded("error", invalid=["frame_shape"])
        return Decoded("error", error=(body.error, body.message if isinstance(body.message, str) else None))
    t, body = frame.type, frame.body
    if t == "#commit":
        return _decode_commit(body)
    model = _SDK_MODELS.get(t) if isinstance(t, str) else None
    if model is None:
        return Decoded("unknown")
    try:
        msg = get_or_create(body, model)
    except Exception:  # noqa: BLE001 - pydantic/SDK model errors
        return Decoded(t, invalid=["frame_shape"])
    if t == "#info":
        return Decoded(t, info=(msg.name, msg.message))
    try:
        seq, tus = _seq(msg.seq), time_us(msg.time)
    except ValueError:
        return Decoded(t, invalid=["frame_shape"])
    out = Decoded(t, seq=seq, time_us=tus)
    if not nz.is_did(msg.did):
        out.invalid.append("invalid_did")
    elif t == "#account":
        out.events.append(nz.account_event(msg.did, seq, tus, bool(msg.active), msg.status))
    return out


def _decode_commit(body: Any) -> Decoded:
    if not isinstance(body, dict):
        return Decoded("#commit", invalid=["frame_shape"])
    try:
        seq, tus = _seq(body.get("seq")), time_us(body.get("time"))
    except ValueError:
        return Decoded("#commit", invalid=["frame_shape"])
    out = Decoded("#commit", seq=seq, time_us=tus)
    did, ops = body.get("repo"), body.get("ops")
    if not nz.is_did(did):
        out.invalid.append("invalid_did")
        return out
    if not isinstance(ops, list):
        out.invalid.append("frame_shape")
        return out
    blocks: dict | None = None
    for op in ops:
        try:
            if not isinstance(op, dict):
                raise nz.InvalidOp("op_shape")
            collection, rkey = nz.split_path(op.get("path"))
            kind = nz.KINDS.get(collection)
            if kind is None:
                continue
            action = op.get("action")
            if action == "delete":
                out.events.append(nz.event("delete", did, collection, rkey, seq, tus, collection=collection))
            elif action == "create":
                if blocks is None:
                    raw_car = body.get("blocks")
                    try:
                        blocks = libipld.decode_car(raw_car)[1] if isinstance(raw_car, bytes) else None
                    except (ValueError, RecursionError, TypeError):
                        blocks = None
                    if blocks is None:
                        out.invalid.append("car")
                        return out
                record = blocks.get(op.get("cid")) if isinstance(op.get("cid"), bytes) else None
                if record is None:
                    raise nz.InvalidOp("missing_block")
                out.events.append(nz.event(kind, did, collection, rkey, seq, tus,
                                           **nz.record_fields(collection, record)))
        except nz.InvalidOp as exc:
            out.invalid.append(exc.reason)
    return out


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

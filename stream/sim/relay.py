"""A loopback ``com.atproto.sync.subscribeRepos`` relay serving a recording or the synthetic population.

Endpoint: ``ws://HOST:PORT/xrpc/com.atproto.sync.subscribeRepos`` (``Relay.url`` is the base URI
``ws://HOST:PORT/xrpc`` that ``FirehoseSubscribeReposClient(params, base_uri=url)`` takes).

The relay keeps one global log of frames, bounded to the last ``retention`` frames (older ones are
forgotten, like a real relay's backfill window). Frames enter the log from the source:

- paced (``rate`` frames/s, i.e. events/s since a synthetic commit carries one op unless
  ``follow_batch`` > 1; and/or ``speed`` x the frames' own time spacing, for recordings): a
  background task appends frames on that clock from ``start()``; the *head* is the newest one;
- unpaced (neither given): frames are produced on demand as fast as clients read them; the head
  is the source's last seq (every frame counts as already published).

Cursor semantics per connection (``?cursor=SEQ``): frames with seq > cursor are replayed then the
live stream follows; a cursor older than the oldest retained frame gets ``#info OutdatedCursor`` and
the stream starts at the oldest retained frame; a cursor ahead of the head gets a ``FutureCursor``
error frame and the connection is closed. Without a cursor the stream starts at the oldest retained
frame (a synthetic or recorded source is consumed from its start), or at the head when
``live_tail=True`` (the live relay's behaviour). A client that falls more than ``retention``
frames behind gets a ``ConsumerTooSlow`` error frame and is closed.

Jetstream mode (``protocol="jetstream"``): the same log served as Jetstream v1 messages
(:mod:`stream.sim.jetstream`) at ``ws://HOST:PORT/subscribe`` (``Relay.url``), with Jetstream's
cursor rules: ``?cursor=TIME_US`` replays from that time inclusive; a cursor older than the oldest
retained message starts there (no ``#info``); one ahead of the head tails live (no error);
``wantedCollections`` (repeatable) filters commit messages; no error frames (a client that falls
behind is disconnected).

With ``repos`` (a :class:`stream.sim.repos.SyntheticRepos`), the relay also serves the sync
HTTP endpoints and a PLC directory of :mod:`stream.sim.xrpc` at ``Relay.http_url`` (its own
port), as of its head seq: what a backfill reads (``sync`` passes the fault-injection options).

Test hooks: ``future_cursor="ignore"`` serves a cursor ahead of the head from the oldest retained
frame without an error (a relay whose numbering restarted and that does not check cursors);
``drop_after=K`` aborts each connection (no close handshake, like a network failure)
after it was sent K frames, for at most ``max_drops`` connections; ``Relay.connections`` reports
what every connection was sent.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request

from stream.sim.frames import error_frame, info_frame, parse_iso_time_us, split_frame
from stream.sim.recording import METHOD, read_recording, scan_recording

log = logging.getLogger(__name__)

PATH = f"/xrpc/{METHOD}"
JETSTREAM_PATH = "/subscribe"


@dataclass
class FrameSource:
    """Re-iterable source of ``(seq, time_us, frame)`` in increasing seq order.

    ``last_seq`` is the final seq when known (None = unknown / unbounded).
    """

    factory: Callable[[], Iterator[tuple[int, int, bytes]]]
    first_seq: int | None = None
    last_seq: int | None = None

    def __iter__(self) -> Iterator[tuple[int, int, bytes]]:
        return self.factory()

    @classmethod
    def from_frames(cls, frames: Iterable[tuple[int, bytes]]) -> "FrameSource":
        """From ``(seq, frame)`` pairs (time from the body's ``time`` field; 0 when the frame is
        malformed, so bad-input tests can serve broken frames verbatim)."""
        items = []
        for seq, data in frames:
            try:
                t = split_frame(data)[1].get("time")
                t_us = parse_iso_time_us(t) if isinstance(t, str) else 0
            except ValueError:
                t_us = 0
            items.append((int(seq), t_us, data))
        return cls(lambda: iter(items), items[0][0] if items else None, items[-1][0] if items else None)

    @classmethod
    def from_recording(cls, path: str | Path) -> "FrameSource":
        """From a recording file; frames without a seq (recorded #info/errors) are skipped."""
        info = scan_recording(path)
        return cls(lambda: ((r.seq, r.time_us, r.data) for r in read_recording(path) if r.seq >= 0),
                   info.first_seq, info.last_seq)

    @classmethod
    def from_population(cls, population, start_seq: int = 1, start_time_us: int | None = None) -> "FrameSource":
        """From a :class:`stream.sim.synth.Population` (frames generated lazily)."""
        return cls(lambda: population.timed_frames(start_seq=start_seq, start_time_us=start_time_us),
                   start_seq, start_seq + population.expected()["frames"] - 1)


def live_start_us(offsets_us, now_us: int, rate: float | None = None, speed: float | None = None) -> int:
    """The latest time for a synthetic timeline's start such that no frame's time is ahead of the
    wall clock when the relay serves it: frame i (``offsets_us[i]`` after the start, in order) is
    appended no earlier than ``now_us`` + its pacing delay d_i = max(i / rate, (offset_i -
    offset_0) / speed), 0 unpaced (:meth:`Relay._produce_paced`), so the start is
    ``now_us + min_i(d_i - offset_i)``: unpaced, the timeline ends at ``now_us`` (every frame is
    already published); at ``speed`` <= 1 it starts at ``now_us`` less the first offset; faster
    (a high ``rate``, ``speed`` > 1) it starts in the past and catches up with the wall clock no
    later than its last frame. Integer microseconds; ``now_us`` for an empty timeline."""
    import numpy as np

    off = np.asarray(offsets_us, dtype=np.float64)
    if off.size == 0:
        return int(now_us)
    delay = np.zeros(off.size)
    if rate:
        delay = np.maximum(delay, np.arange(off.size) / rate * 1e6)
    if speed:
        delay = np.maximum(delay, (off - off[0]) / speed)
    return int(now_us) + int(np.floor(np.min(delay - off)))


def as_source(source) -> FrameSource:
    if isinstance(source, FrameSource):
        return source
    if isinstance(source, (str, Path)):
        return FrameSource.from_recording(source)
    if hasattr(source, "timed_frames"):
        return FrameSource.from_population(source)
    return FrameSource.from_frames(source)


@dataclass
class ConnectionReport:
    """What one connection asked for and was sent."""

    id: int
    cursor: int | None
    frames: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    info: list[str] = field(default_factory=list)  # #info names sent
    error: str | None = None  # error frame sent, if any
    skipped: int = 0  # seqs after the cursor no longer retained (OutdatedCursor): lost to the client
    dropped: bool = False
    closed: bool = False
    seqs: list[int] | None = None  # every seq sent, when Relay(track_seqs=True)


class Relay:
    """subscribeRepos over websockets on loopback; see the module docstring for semantics."""

    def __init__(self, source, host: str = "127.0.0.1", port: int = 0, rate: float | None = None,
                 speed: float | None = None, retention: int = 100_000, live_tail: bool = False,
                 drop_after: int | None = None, max_drops: int | None = None,
                 track_seqs: bool = False, chunk: int = 256, future_cursor: str = "error",
                 protocol: str = "firehose", repos=None,
                 sync: dict | None = None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0 frames/s, got {rate}")
        if speed is not None and speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if retention < 1:
            raise ValueError(f"retention must be >= 1 frame, got {retention}")
        if future_cursor not in ("error", "ignore"):
            raise ValueError(f"future_cursor must be 'error' or 'ignore', got {future_cursor!r}")
        self.future_cursor = future_cursor
        if protocol not in ("firehose", "jetstream"):
            raise ValueError(f"protocol must be 'firehose' or 'jetstream', got {protocol!r}")
        self.jetstream = protocol == "jetstream"
        self.path = JETSTREAM_PATH if self.jetstream else PATH
        self.source = as_source(source)
        if self.jetstream:
            from stream.sim.jetstream import jetstream_source

            self.source = jetstream_source(self.source)
        self.host, self.port = host, port
        self.rate, self.speed = rate, speed
        self.retention, self.live_tail, self.chunk = retention, live_tail, chunk
        self.drop_after, self.max_drops, self.track_seqs = drop_after, max_drops, track_seqs
        self.connections: list[ConnectionReport] = []
        self._log: list[tuple[int, int, bytes]] = []  # (seq, time_us, frame), seq increasing
        self._base = 0  # global index of self._log[0]
        self._it: Iterator[tuple[int, int, bytes]] | None = None
        self._exhausted = False
        self._new = asyncio.Event()
        self._server = None
        self._producer: asyncio.Task | None = None
        self._drops = 0
        self._ids = itertools.count(1)
        self._stopping = False
        self.repos, self.sync_options = repos, dict(sync or {})
        self.sync = None  # the SyncServer, once started with repos

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def paced(self) -> bool:
        return self.rate is not None or self.speed is not None

    @property
    def url(self) -> str:
        """Base URI for the atproto SDK: ``ws://host:port/xrpc``; Jetstream: ``ws://host:port/subscribe``."""
        if self.jetstream:
            return f"ws://{self.host}:{self.port}{JETSTREAM_PATH}"
        return f"ws://{self.host}:{self.port}/xrpc"

    @property
    def endpoint(self) -> str:
        return f"{self.url}/{METHOD}"

    @property
    def http_url(self) -> str | None:
        """Base URL of the sync HTTP endpoints (None without ``repos``)."""
        return self.sync.url if self.sync is not None else None

    @property
    def plc_url(self) -> str | None:
        return self.sync.plc_url if self.sync is not None else None

    async def start(self) -> "Relay":
        self._it = iter(self.source)
        self._server = await serve(self._handle, self.host, self.port, process_request=self._check_path,
                                   compression=None, max_size=2**16, ping_interval=20, ping_timeout=60)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.repos is not None:
            from stream.sim.xrpc import SyncServer

            self.sync = await SyncServer(self.repos, lambda: self.head_seq, self.host,
                                         **self.sync_options).start()
        if self.paced:
            self._producer = asyncio.create_task(self._produce_paced())
        return self

    async def stop(self) -> None:
        self._stopping = True
        self._notify()
        if self._producer is not None:
            self._producer.cancel()
            await asyncio.gather(self._producer, return_exceptions=True)
            self._producer = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self.sync is not None:
            await self.sync.stop()
            self.sync = None

    async def __aenter__(self) -> "Relay":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        async with self:
            await asyncio.Future()

    # --- the log -------------------------------------------------------------------------------
    @property
    def produced(self) -> int:
        """Frames taken from the source so far (global index of the next one)."""
        return self._base + len(self._log)

    @property
    def head_seq(self) -> int | None:
        """Newest published seq (see module docstring); None before anything is published."""
        if not self.paced and self.source.last_seq is not None:
            return self.source.last_seq
        return self._log[-1][0] if self._log else None

    @property
    def oldest_seq(self) -> int | None:
        return self._log[0][0] if self._log else (self.source.first_seq if self._base == 0 else None)

    def _append(self, item: tuple[int, int, bytes]) -> None:
        self._log.append(item)
        excess = len(self._log) - self.retention
        if excess >= max(1, min(self.chunk, self.retention)):
            del self._log[:excess]
            self._base += excess

    def _notify(self) -> None:
        self._new.set()
        self._new = asyncio.Event()

    def _pull(self, n: int) -> int:
        """Take up to n frames from the source into the log; returns how many."""
        got = 0
        if self._exhausted:
            return 0
        for item in itertools.islice(self._it, n):
            self._append(item)
            got += 1
        if got < n:
            self._exhausted = True
        if got or self._exhausted:
            self._notify()
        return got

    async def _produce_paced(self) -> None:
        """Append frames on the rate/speed clock (frame i at t0 + max(i/rate, (time_i - time_0)/speed))."""
        t0 = time.monotonic()
        time0: int | None = None
        i = 0
        pending = next(self._it, None)
        while pending is not None:
            now = time.monotonic() - t0
            batch = 0
            while pending is not None and batch < self.chunk:
                if time0 is None:
                    time0 = pending[1]
                due = max(i / self.rate if self.rate else 0.0,
                          (pending[1] - time0) / 1e6 / self.speed if self.speed else 0.0)
                if due > now:
                    break
                self._append(pending)
                i += 1
                batch += 1
                pending = next(self._it, None)
            if batch:
                self._notify()
            if pending is None:
                break
            await asyncio.sleep(max(0.0, due - (time.monotonic() - t0)) if batch < self.chunk else 0)
        self._exhausted = True
        self._notify()

    async def _available(self, pos: int) -> bool:
        """Wait until the frame at global index ``pos`` exists; False when the source ended."""
        while pos >= self.produced:
            if self._exhausted or self._stopping:
                return False
            if self.paced:
                await self._new.wait()
            else:
                self._pull(self.chunk)
                await asyncio.sleep(0)
        return True

    async def _start_index(self, cursor: int | None) -> tuple[int, str | None, str | None]:
        """(global index to stream from, #info name or None, error name or None) for a cursor."""
        if cursor is None:
            return (self.produced if self.live_tail else self._base), None, None
        if self.jetstream:
            cursor -= 1  # inclusive: time_us >= cursor is time_us > cursor - 1
        head = self.head_seq
        if head is None:  # nothing published yet: only "before the first frame" is not in the future
            head = (self.source.first_seq or 1) - 1
        if cursor > head and (not self.jetstream or self.paced or self._exhausted):
            if self.jetstream:
                return self.produced, None, None  # Jetstream: a cursor from the future tails live
            return (self._base, None, None) if self.future_cursor == "ignore" else (0, None, "FutureCursor")
        oldest = self.oldest_seq
        if oldest is not None and cursor < oldest - 1:
            return self._base, None if self.jetstream else "OutdatedCursor", None
        # frames with seq > cursor: search the log, producing (unpaced) until we pass the cursor
        while True:
            idx = bisect.bisect_right(self._log, cursor, key=lambda e: e[0])
            if idx < len(self._log) or self.paced or self._exhausted:
                return self._base + idx, None, None
            self._pull(self.chunk)
            await asyncio.sleep(0)

    # --- connections ---------------------------------------------------------------------------
    def _check_path(self, connection: ServerConnection, request: Request):
        path = urllib.parse.urlsplit(request.path).path
        if path != self.path:
            return connection.respond(404, f"not found: {path} (this relay serves {self.path})\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        pairs = urllib.parse.parse_qsl(urllib.parse.urlsplit(ws.request.path).query)
        query = dict(pairs)
        wanted = {v for k, v in pairs if k == "wantedCollections"} or None
        report = ConnectionReport(next(self._ids), None, seqs=[] if self.track_seqs else None)
        self.connections.append(report)
        try:
            if "cursor" in query:
                try:
                    report.cursor = int(query["cursor"])
                except ValueError:
                    report.error = "InvalidRequest"
                    if not self.jetstream:
                        await ws.send(error_frame("InvalidRequest", f"cursor must be an integer: {query['cursor']!r}"))
                    await ws.close()
                    return
            pos, info, err = await self._start_index(report.cursor)
            if err:
                report.error = err
                await ws.send(error_frame(err, f"cursor {report.cursor} is ahead of the latest seq {self.head_seq}"))
                await ws.close()
                return
            if info:
                report.info.append(info)
                if report.cursor is not None and self.oldest_seq is not None:
                    report.skipped = max(0, self.oldest_seq - report.cursor - 1)
                await ws.send(info_frame(info, f"cursor {report.cursor} is older than the oldest retained seq "
                                               f"{self.oldest_seq}; streaming from there"))
            await self._stream(ws, report, pos, wanted if self.jetstream else None)
        except websockets.ConnectionClosed:
            pass
        finally:
            report.closed = True

    async def _stream(self, ws: ServerConnection, report: ConnectionReport, pos: int,
                      wanted: set[str] | None = None) -> None:
        while await self._available(pos):
            if pos < self._base:
                report.error = "ConsumerTooSlow"
                if not self.jetstream:
                    await ws.send(error_frame("ConsumerTooSlow", f"fell more than {self.retention} frames behind"))
                await ws.close()
                return
            end = self.produced
            while pos < end and pos >= self._base:
                seq, _, data = self._log[pos - self._base]
                pos += 1
                if self.jetstream:
                    collection, data = data
                    if wanted is not None and collection is not None and collection not in wanted:
                        continue
                await ws.send(data)
                report.frames += 1
                if report.first_seq is None:
                    report.first_seq = seq
                report.last_seq = seq
                if report.seqs is not None:
                    report.seqs.append(seq)
                if self.drop_after is not None and report.frames >= self.drop_after and \
                        (self.max_drops is None or self._drops < self.max_drops):
                    self._drops += 1
                    report.dropped = True
                    ws.transport.abort()
                    return
        await ws.wait_closed()  # source ended: stay connected and idle, like a quiet relay


async def run_relay(source, host: str = "127.0.0.1", port: int = 0, rate: float | None = None,
                    speed: float | None = None, on_ready: Callable[[Relay], None] | None = None,
                    protocol: str = "firehose", repos=None) -> None:
    """Serve until cancelled (the CLI's loop)."""
    relay = Relay(source, host=host, port=port, rate=rate, speed=speed, protocol=protocol, repos=repos)
    async with relay:
        if on_ready is not None:
            on_ready(relay)
        await asyncio.Future()

"""Recordings of raw subscribeRepos frames, and ``chorus record`` (save a relay's frames to a file).

File format (binary, little-endian):

- header: magic ``b"CHORUSR1"`` (8 bytes), ``uint32`` n, then n bytes of UTF-8 JSON metadata
  (``{"v": 1, "source": url, "created_us": ...}``; informational only);
- then one record per frame: ``int64 seq`` (-1 for frames without a seq: ``#info``, errors),
  ``int64 time_us`` (microseconds since the epoch the frame was received, or the event time for
  frames written from the synthetic population), ``uint32 length``, then ``length`` bytes: the
  frame exactly as it came over the websocket.

A record cut short at the end of the file (a recorder killed mid-write) is ignored on read.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, NamedTuple

from stream.sim.frames import split_frame

MAGIC = b"CHORUSR1"
_REC = struct.Struct("<qqI")
METHOD = "com.atproto.sync.subscribeRepos"


class RecordedFrame(NamedTuple):
    seq: int  # -1 when the frame has no seq
    time_us: int
    data: bytes


class RecordingError(ValueError):
    """The file is not a chorus recording."""


class RecordingWriter:
    """Append frames to a new recording file; use as a context manager."""

    def __init__(self, path: str | Path, source: str = "") -> None:
        self.path = Path(path)
        self._f: BinaryIO = open(self.path, "wb")
        meta = json.dumps({"v": 1, "source": source, "created_us": time.time_ns() // 1000}).encode()
        self._f.write(MAGIC + struct.pack("<I", len(meta)) + meta)
        self.count = 0

    def write(self, seq: int | None, data: bytes, time_us: int | None = None) -> None:
        t = time.time_ns() // 1000 if time_us is None else int(time_us)
        self._f.write(_REC.pack(-1 if seq is None else int(seq), t, len(data)))
        self._f.write(data)
        self.count += 1

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(path: str | Path) -> tuple[BinaryIO, dict]:
    f = open(path, "rb")
    head = f.read(12)
    if len(head) < 12 or head[:8] != MAGIC:
        f.close()
        raise RecordingError(f"{path}: not a chorus recording (bad magic)")
    (n,) = struct.unpack("<I", head[8:])
    try:
        meta = json.loads(f.read(n))
    except ValueError:
        f.close()
        raise RecordingError(f"{path}: corrupt recording header") from None
    return f, meta


def read_recording(path: str | Path) -> Iterator[RecordedFrame]:
    """Frames of a recording in file order."""
    f, _ = _open(path)
    with f:
        while True:
            head = f.read(_REC.size)
            if len(head) < _REC.size:
                return
            seq, t, n = _REC.unpack(head)
            data = f.read(n)
            if len(data) < n:
                return
            yield RecordedFrame(seq, t, data)


@dataclass
class RecordingInfo:
    metadata: dict
    frames: int
    first_seq: int | None
    last_seq: int | None


def scan_recording(path: str | Path) -> RecordingInfo:
    """Count frames and find the seq range without reading frame bodies (seeks over them)."""
    f, meta = _open(path)
    count, first, last = 0, None, None
    with f:
        pos = f.tell()
        size = f.seek(0, 2)
        while pos + _REC.size <= size:
            f.seek(pos)
            seq, _, n = _REC.unpack(f.read(_REC.size))
            pos += _REC.size + n
            if pos > size:
                break
            count += 1
            if seq >= 0:
                first = seq if first is None else first
                last = seq
    return RecordingInfo(meta, count, first, last)


def write_recording(path: str | Path, frames: Iterable[tuple[int, int, bytes]], source: str = "") -> int:
    """Write ``(seq, time_us, frame)`` items to a new recording; returns the frame count."""
    with RecordingWriter(path, source) as w:
        for seq, t, data in frames:
            w.write(seq, data, t)
        return w.count


def subscribe_url(url: str, cursor: int | None = None) -> str:
    """Full subscribeRepos URL from a base (``ws://host:port/xrpc``) or full URL, with ``cursor``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"relay URL must start with ws:// or wss://, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(METHOD):
        path = f"{path}/{METHOD}"
    query = urllib.parse.parse_qsl(parts.query)
    query = [(k, v) for k, v in query if k != "cursor"]
    if cursor is not None:
        query.append(("cursor", str(int(cursor))))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, urllib.parse.urlencode(query), ""))


async def record(url: str, path: str | Path, cursor: int | None = None, limit: int | None = None,
                 duration: float | None = None, stop: asyncio.Event | None = None) -> int:
    """Save raw frames from a relay to ``path`` until ``limit`` frames, ``duration`` seconds, the
    relay closes, or ``stop`` is set (a signal); only the seq is parsed (libipld). Returns the number
    of frames written; the file is flushed and closed on every way out.

    ``path`` is opened only once the first frame is in hand (or at a clean end with none), so a
    failed connection or an error frame before any data leaves an existing file untouched and
    creates none. Raises :class:`RecordingError` on an error frame (``{op: -1}``, e.g.
    ``FutureCursor``: the relay's own refusal, not data; subscribeRepos lexicon "Error" frames),
    OSError when the relay cannot be reached."""
    import websockets

    full = subscribe_url(url, cursor)
    deadline = None if duration is None else time.monotonic() + duration
    stopped = asyncio.ensure_future((stop or asyncio.Event()).wait())
    w: RecordingWriter | None = None
    try:
        async with websockets.connect(full, max_size=None, compression=None) as ws:
            while (limit is None or w is None or w.count < limit) and not stopped.done():
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    break
                recv = asyncio.ensure_future(ws.recv())
                await asyncio.wait({recv, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not recv.done():
                    recv.cancel()
                    break
                try:
                    data = recv.result()
                except websockets.ConnectionClosed:
                    break
                if isinstance(data, str):
                    continue
                try:
                    header, body = split_frame(data)
                    seq = body.get("seq") if isinstance(body.get("seq"), int) else None
                except ValueError:
                    header, seq = {}, None  # kept verbatim: a recording is what came over the wire
                if header.get("op") == -1:
                    raise RecordingError(f"relay sent an error frame: {body.get('error')}"
                                         + (f" ({body['message']})" if body.get("message") else "")
                                         + (f"; {w.count} frames before it are in {path}" if w else ""))
                if w is None:
                    w = RecordingWriter(path, source=full)
                w.write(seq, data)
        if w is None:
            w = RecordingWriter(path, source=full)  # a clean end with no frame: an empty recording
        return w.count
    finally:
        stopped.cancel()
        if w is not None:
            w.close()

"""Durable firehose cursor: one small JSON file per relay under ``Settings.state_dir``.

File: ``<state_dir>/ingest-cursor-<sha256(relay URL)[:16]>.json`` holding
``{"v": 1, "relay": URL, "seq": N, "saved_at": unix seconds}``. Seq spaces differ between relays,
so each relay URL has its own file. A save writes a temporary file in the same directory, fsyncs
it, ``os.replace``s it over the old one (atomic on POSIX) and fsyncs the directory: after a crash
the file holds either the previous or the new cursor, never a torn one. The ingester saves only
seqs that Kafka acknowledged in full, so resuming from the file loses nothing (it may replay).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path


class CursorError(RuntimeError):
    """The cursor file exists but cannot be read; the message is one line for the user."""


class CursorStore:
    def __init__(self, state_dir: Path | str, relay: str):
        self.relay = relay
        self.dir = Path(state_dir).expanduser()
        digest = hashlib.sha256(relay.encode()).hexdigest()[:16]
        self.path = self.dir / f"ingest-cursor-{digest}.json"

    def load(self) -> int | None:
        """The stored seq, or None when nothing was stored for this relay."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CursorError(f"cannot read cursor file {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
            seq = data["seq"]
            if type(seq) is not int or seq < 0 or data.get("relay") != self.relay:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise CursorError(f"cursor file {self.path} is corrupt; delete it or pass --cursor") from None
        return seq

    def save(self, seq: int) -> None:
        """Atomically replace the stored seq (durable once this returns)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"v": 1, "relay": self.relay, "seq": int(seq), "saved_at": time.time()})
        fd, tmp = tempfile.mkstemp(prefix=".cursor-", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

"""Worker checkpoints: the window state plus the input offsets it covers, in files.

A checkpoint is one uncompressed ``.npz`` file (a zip of ``.npy`` arrays, each member with its
CRC-32) holding the :class:`stream.worker.windows.WindowStore` arrays and a JSON member
``chorus_meta``: the checkpoint format (:data:`FORMAT`), the window and hop, the partitions
assigned when it was taken, the next offset to read of every ``chorus.events`` and ops partition
it covers, and the outputs not yet acknowledged by Kafka then (re-sent after a restore: every
output is idempotent downstream).

Writes are atomic: a temporary file, fsync, rename (``ckpt-<sequence>-<tag>.npz``; the tag names
the partition assignment, so workers sharing the directory never replace or prune each other's
files), then the oldest of the same tag beyond ``keep`` are removed, and files of other tags older
than ``stale_s`` (their offsets are past the input's retention). Reading takes the newest file that is whole: a file cut short (a
crash while writing, a full disk) or with a flipped bit fails the zip's structure or a member's
CRC and is skipped with a warning, and the previous checkpoint is used. A worker restores each
partition it holds from whichever file, of any tag, is furthest along it
(:meth:`CheckpointDir.covering`): after a takeover, the leaver's partitions come from the
leaver's files, which a write never removes before ``stale_s``. A checkpoint of another
format, or of another window, is never misread: it is skipped with a one-line error saying why
(:class:`CheckpointMismatch`), and the worker rebuilds that state by replaying its input.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("chorus.worker.checkpoint")

FORMAT = 1
META = "chorus_meta"


_BROKEN = (OSError, zipfile.BadZipFile, KeyError, ValueError, EOFError)  # a file cut short, a bad CRC, ...


class CheckpointMismatch(ValueError):
    """A whole checkpoint this worker must not use (another format, window, or assignment)."""


class CheckpointDir:
    """The checkpoints of one worker (one directory, e.g. ``CHORUS_STATE_DIR/worker/<app id>``)."""

    def __init__(self, path: Path | str, keep: int = 2, stale_s: float | None = None):
        self.path = Path(path)
        self.keep = max(1, keep)
        self.stale_s = stale_s

    def files(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if not self.path.is_dir():
            return []
        return sorted(self.path.glob("ckpt-*.npz"), reverse=True)

    @staticmethod
    def tag_of(path: Path) -> str:
        """The tag of a checkpoint file name ("" for files named before tags)."""
        parts = path.stem.split("-", 2)
        return parts[2] if len(parts) > 2 else ""

    def write(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], tag: str = "") -> Path:
        """Write one checkpoint atomically (blocking: run it in a thread); returns its path.
        ``tag``: letters and digits naming what it covers (the partition assignment)."""
        if not tag.isalnum() and tag:
            raise ValueError(f"checkpoint tag {tag!r} must be letters and digits")
        self.path.mkdir(parents=True, exist_ok=True)
        files = self.files()
        seq = int(files[0].stem.split("-")[1]) + 1 if files else 1
        final = self.path / (f"ckpt-{seq:012d}-{tag}.npz" if tag else f"ckpt-{seq:012d}.npz")
        tmp = final.with_suffix(".tmp")
        payload = {**arrays, META: np.frombuffer(json.dumps({**meta, "format": FORMAT}).encode(), np.uint8)}
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        try:
            dfd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        mine = [f for f in self.files() if self.tag_of(f) == tag]
        for old in mine[self.keep:]:
            old.unlink(missing_ok=True)
        if self.stale_s is not None:
            now = time.time()
            for old in self.files():
                try:
                    if self.tag_of(old) != tag and now - old.stat().st_mtime > self.stale_s:
                        old.unlink(missing_ok=True)
                except OSError:  # removed meanwhile by another worker
                    pass
        return final

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        """The meta member of one checkpoint (cheap: the arrays are not read or verified).
        Raises CheckpointMismatch for another format, OSError/zipfile.BadZipFile/KeyError/ValueError
        for a broken file."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z[META]))
        if meta.get("format") != FORMAT:
            raise CheckpointMismatch(f"checkpoint {path} has format {meta.get('format')!r}; this chorus "
                                     f"reads format {FORMAT}")
        return meta

    @staticmethod
    def read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(meta, arrays) of one checkpoint, every member read and its CRC checked."""
        meta = CheckpointDir.read_meta(path)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != META}
        return meta, arrays

    def latest(self, accept=None) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]] | None:
        """The newest whole checkpoint that ``accept(meta)`` takes (it raises CheckpointMismatch
        to refuse, with the reason), or None. Broken and refused files are logged (WARNING) and skipped."""
        for path in self.files():
            try:
                meta, arrays = self.read(path)
                if accept is not None:
                    accept(meta)
                return path, meta, arrays
            except CheckpointMismatch as exc:  # a changed setup (cluster, window), not a fault
                log.warning("not using %s", exc)
            except _BROKEN as exc:
                log.warning("checkpoint %s is broken (%s: %s); trying the previous one", path,
                            type(exc).__name__, exc)
        return None

    def covering(self, wanted: set[tuple[str, int]], accept: Callable[[dict], None] | None = None,
                 progress: Callable[[dict, tuple[str, int]], int] | None = None,
                 ) -> list[tuple[Path, dict[str, Any], dict[str, np.ndarray], set[tuple[str, int]]]]:
        """The checkpoints to restore the partitions ``wanted`` ((topic, partition) pairs: an
        assignment) from, whichever worker wrote them: for each pair, among the whole checkpoints
        that ``accept(meta)`` takes (it raises CheckpointMismatch to refuse, with the reason) and
        that held it (meta ``assigned``), the one furthest along it (``progress(meta, pair)``,
        e.g. its next offset there; default 0), the newest on a tie. Returns [(path, meta, arrays,
        the pairs taken from it)], the one giving the most pairs first, [] when none holds any;
        a pair no checkpoint holds is in none. Broken and refused files are logged (WARNING) and
        skipped; a file whose arrays prove broken is dropped and the choice made again."""
        cands: list[tuple[Path, dict[str, Any], set[tuple[str, int]]]] = []
        for path in self.files():
            try:
                meta = self.read_meta(path)
                if accept is not None:
                    accept(meta)
                held = {(str(t), int(p)) for t, p in meta.get("assigned", ())} & wanted
            except CheckpointMismatch as exc:
                log.warning("not using %s", exc)
                continue
            except _BROKEN + (TypeError,) as exc:
                log.warning("checkpoint %s is broken (%s: %s)", path, type(exc).__name__, exc)
                continue
            if held:
                cands.append((path, meta, held))
        while True:
            pick: dict[int, set[tuple[str, int]]] = {}
            for tp in wanted:
                best = max(((progress(meta, tp) if progress else 0, -i) for i, (_, meta, held) in enumerate(cands)
                            if tp in held), default=None)
                if best is not None:
                    pick.setdefault(-best[1], set()).add(tp)
            out = []
            for i, tps in sorted(pick.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                path = cands[i][0]
                try:
                    meta, arrays = self.read(path)
                except _BROKEN as exc:
                    log.warning("checkpoint %s is broken (%s: %s); choosing without it", path,
                                type(exc).__name__, exc)
                    del cands[i]
                    break
                out.append((path, meta, arrays, tps))
            else:
                return out

    def furthest_offsets(self, kind: str = "events", kafka: str | None = None) -> dict[int, int]:
        """{partition: the largest next offset any checkpoint here records} for ``kind``
        (``events`` or ``ops``), from the metas that read (not verified) and, with ``kafka``,
        were taken on that cluster (meta ``kafka``); for positioning a consumer: each is at
        most the partition's end offset now."""
        out: dict[int, int] = {}
        for path in self.files():
            try:
                meta = self.read_meta(path)
                if kafka is not None and meta.get("kafka") != kafka:
                    continue
                offsets = meta["offsets"].get(kind, {})
            except (CheckpointMismatch, *_BROKEN):
                continue
            for p, off in offsets.items():
                out[int(p)] = max(out.get(int(p), 0), int(off))
        return out

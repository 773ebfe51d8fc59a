"""The backfill's durable progress: ``CHORUS_STATE_DIR/backfill-<hash of the source>.json``.

Holds the listing cursor from which to resume (every page before it is finished), the DIDs
already finished in later pages, and the running counts (repos per status, edges, repos listed).
A repository counts as finished only after Kafka acknowledged all of its edges, so after a crash
(even SIGKILL) a restart redoes at most the repositories in flight and those finished since the
last save: their edges are published again, which is harmless because chorus.graph consumers
treat edges as a set (same edge, same rev: no change). Nothing is missing, nothing is doubled in
the graph (the topic may hold a record twice).

The file name is derived from a hash of the source only; nothing from the network ever names a
path. Writes are atomic (a temporary file in the same directory, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = 1


class CheckpointError(Exception):
    """The checkpoint file is unreadable or of another format (one line for the user)."""


@dataclass
class State:
    source: str
    cursor: str | None = None  # listing cursor of the first unfinished page
    done: list[str] = field(default_factory=list)  # finished DIDs in pages from ``cursor`` on
    counts: dict[str, int] = field(default_factory=dict)  # repos per status
    edges: int = 0
    listed: int = 0  # repos listed in the finished pages (the rest are counted again on resume)
    finished: bool = False  # the listing ended and every repo is finished
    format: int = FORMAT


def path_for(state_dir: Path, source: str) -> Path:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return Path(state_dir) / f"backfill-{digest}.json"


class Checkpoint:
    def __init__(self, state_dir: Path, source: str):
        self.path = path_for(state_dir, source)
        self.source = source

    def load(self) -> State:
        """The saved state, or a fresh one when there is none."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return State(self.source)
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise CheckpointError(f"{self.path} is of format {data.get('format')!r}, not {FORMAT}; "
                                      "remove it (or pass --restart) to start over")
            st = State(**data)
        except CheckpointError:
            raise
        except (ValueError, TypeError, AttributeError):
            raise CheckpointError(f"{self.path} is not a backfill checkpoint; remove it (or pass --restart)") from None
        if st.source != self.source:
            raise CheckpointError(f"{self.path} belongs to {st.source!r}, not {self.source!r}")
        return st

    def save(self, state: State) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(state), f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

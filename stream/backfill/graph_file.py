"""`chorus backfill --graph-file F`: follow pairs from a CSV or Parquet dump into chorus.graph.

Columns ``follower`` and ``followed`` (DIDs; other columns are ignored). CSV has a header line;
``.parquet`` / ``.pq`` files are read as Parquet, anything else as CSV. Every row becomes an
``add`` ``{src: followed, dst: follower}`` keyed by the follower, with ``time_us`` = the file's
modification time and no rev: the pair holds as of the dump, and a live follow or unfollow made
after it wins (its rev is newer; stream.schemas.GraphEdge). A dump names no follow records, so
an unfollow on the firehose (a remove naming only its record) cannot find a pair imported this
way: the pair stays until a backfill of that account replaces it. Rows are validated as they are read;
the first bad one stops the import with a one-line :class:`GraphFileError` naming its line (CSV,
counting the header as line 1) or row (Parquet); so does a file with no rows. Re-importing publishes the same adds again
(harmless: the graph is a set); progress is checkpointed by row so a killed import resumes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable, Iterator

from stream.protocol import is_did
from stream.schemas import TOPIC_GRAPH, dumps, graph_key, graph_value

COLUMNS = ("follower", "followed")
BATCH_ROWS = 65_536


class GraphFileError(Exception):
    """A graph file that cannot be imported (one line for the user)."""


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def read_pairs(path: Path, skip: int = 0, validate: bool = True) -> Iterator[tuple[int, list[str], list[str]]]:
    """(index of the first row, followers, followed) per batch, from row ``skip`` on; validates
    every row unless ``validate`` is False (the file was :func:`check_file` d) (raises
    GraphFileError: missing columns, unreadable, and with ``validate`` a bad row)."""
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise GraphFileError(f"graph file {path} does not exist")
    try:
        if _is_parquet(path):
            import pyarrow.parquet as pq

            f = pq.ParquetFile(path)
            names = f.schema_arrow.names
            _check_columns(path, names)
            batches = f.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS))
            where = lambda i: f"row {i + 1}"  # noqa: E731
        else:
            import pyarrow.csv as pcsv

            reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 22),
                                   convert_options=pcsv.ConvertOptions(
                                       column_types={c: pa.string() for c in COLUMNS}))
            _check_columns(path, reader.schema.names)
            batches = reader
            where = lambda i: f"line {i + 2}"  # noqa: E731 - the header is line 1
        row = 0
        for batch in batches:
            n = batch.num_rows
            if row + n <= skip:
                row += n
                continue
            cols = {name: batch.column(name).to_pylist() for name in COLUMNS}
            lo = max(0, skip - row)
            src, dst = cols["followed"][lo:], cols["follower"][lo:]
            if validate:
                _check_rows(path, row + lo, dst, src, where)
            yield row + lo, dst, src
            row += n
    except GraphFileError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise GraphFileError(f"cannot read graph file {path}: {str(exc).splitlines()[0]}") from None


def check_file(path: Path) -> int:
    """Validate the whole file (columns, every row) before anything is published; returns its row
    count. Raises GraphFileError naming the first bad line (CSV) or row (Parquet), or for a file
    with no rows (a header only: an empty import is a mistake, as a ``--dids`` file without DIDs)."""
    rows = sum(len(follower) for _, follower, _ in read_pairs(path))
    if rows == 0:
        raise no_pairs(path)
    return rows


def no_pairs(path: Path) -> GraphFileError:
    """The error for a graph file with columns but no rows."""
    return GraphFileError(f"graph file {path} has no follow pairs (columns follower, followed but no rows)")


def _check_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise GraphFileError(f"graph file {path} lacks column(s) {', '.join(missing)} "
                             f"(has: {', '.join(names[:10]) or 'none'}; needs follower, followed)")


def _check_rows(path: Path, first: int, follower: list, followed: list, where: Callable[[int], str]) -> None:
    for k, (a, b) in enumerate(zip(follower, followed)):
        for value, col in ((a, "follower"), (b, "followed")):
            if not is_did(value):
                raise GraphFileError(f"graph file {path} {where(first + k)}: {col} is not a DID: {str(value)[:80]!r}")
        if a == b:
            raise GraphFileError(f"graph file {path} {where(first + k)}: an account cannot follow itself ({a})")


async def import_file(producer, path: Path, skip: int = 0, time_us: int | None = None,
                      on_batch: Callable[[int, int], None] | None = None, validate: bool = True) -> int:
    """Publish every pair from row ``skip`` on; ``on_batch(rows done, batch rows)`` after each batch
    is acknowledged (``validate``: as :func:`read_pairs`). Returns the rows published."""
    path = Path(path)
    t = int(path.stat().st_mtime * 1_000_000) if time_us is None else int(time_us)
    total = 0
    batches = read_pairs(path, skip, validate)
    while True:
        item = await asyncio.to_thread(next, batches, None)  # pyarrow reads and validation off the loop
        if item is None:
            return total
        first, follower, followed = item
        futures = []
        for a, b in zip(follower, followed):
            value = graph_value("add", b, a, t)
            futures.append(await producer.send(TOPIC_GRAPH, dumps(value), key=graph_key(value)))
        await asyncio.gather(*futures)
        total += len(follower)
        if on_batch is not None:
            on_batch(first + len(follower), len(follower))

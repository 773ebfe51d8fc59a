"""``did:plc`` identities in bulk: a PLC directory's operation log, mirrored into the state directory.

Per-DID resolution costs every repository a second request and a DID document. A PLC directory
also serves its whole operation log, paged (did-method-plc; https://web.plc.directory/api/redoc):

    GET {plc}/export?count=N&after=CURSOR
    -> JSON lines {did, operation, cid, nullified, createdAt[, seq, type]}, oldest first, N <= 1000

The next page is ``after=`` the last line's ``seq`` (directories that number their log) or else
its ``createdAt`` (then operations sharing the timestamp at a page boundary can be skipped: their
DID then resolves from an older operation or, missing, with its own request; an account whose PDS
changed is re-fetched at its document's, :mod:`stream.backfill.service`); a page shorter than
``count`` is the end of the log (as of now). A DID's current
state is its latest operation that is not ``nullified``:

- ``plc_operation``: PDS = ``services.atproto_pds.endpoint`` (type ``AtprotoPersonalDataServer``),
  handle = the first ``at://`` entry of ``alsoKnownAs``;
- ``create`` (the legacy genesis operation): PDS = ``service``, handle = ``handle``;
- ``plc_tombstone``: the DID is deactivated.

:func:`sync_export` folds the log into an :class:`ExportMirror`, a SQLite table in the state
directory (one row per DID: its PDS base URL, handle, state; the export cursor is saved in the
same transaction as each page, so a killed run resumes the scan where it stopped, and a later run
only catches up on the operations since; a resumed read first checks that the log's first line is
still the one the mirror started from, else it starts over: another directory, or a synthetic one
restarted). Memory stays bounded (SQLite's page cache) whatever
the size of the directory; the disk holds about 100 bytes per DID (about 4 GiB for 40M DIDs).
A full-network backfill reads the whole log once (every DID's operations, tens of GB for
plc.directory) before its first repository; that is why the bulk path is used for a relay's whole
listing and not for a ``--dids`` subset (one request per listed DID is cheaper there).

Untrusted input, as with DID documents (:mod:`stream.backfill.identity`): every page is size-capped
(``max_page_bytes``), every line too (:data:`MAX_LINE_BYTES`); a line that is not a JSON object,
names no well-formed ``did:plc`` or holds no known operation is skipped and counted by reason
(:attr:`ExportStats.by_reason`, ``chorus_backfill_plc_ops_total{status}``); the PDS endpoint must
be a plain http(s) origin (:func:`~stream.backfill.identity.pds_base`; else the DID is stored as
having no PDS, so an older endpoint cannot survive), and the address check happens when the PDS is
fetched (:mod:`stream.backfill.fetch`), as for per-DID documents; the handle is syntax-checked.
A directory that cannot be read, sends an oversized or malformed page, more lines than asked, or
a cursor that does not move raises :class:`ExportError` (one line). The DID of a line is the
directory's word, exactly as a per-DID document's ``id`` is: neither path verifies the operations'
signatures or the genesis hash.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stream import metrics
from stream.backfill.fetch import Fetcher, FetchError
from stream.backfill.identity import _PLC, NO_PDS, OK, TOMBSTONE, pds_base, valid_handle

EXPORT_COUNT = 1000  # plc.directory's largest page
MAX_LINE_BYTES = 16 * 1024  # one operation (plc.directory refuses operations over a few KiB)
MAX_PAGE_BYTES = 8 * 1024 * 1024  # one page of 1,000 lines (real ones: ~0.5 MiB)
FORMAT = "1"


class ExportError(Exception):
    """The export cannot be read (one line for the user); ``reason`` as :class:`FetchError`'s, or
    ``not_supported`` (404/405/501), ``http_error``, ``bad_page``, ``stuck_cursor``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class ExportStats:
    pages: int = 0
    bytes: int = 0
    applied: int = 0  # operations folded into the mirror (the latest per DID wins)
    cpu_s: float = 0.0  # this process's CPU time spent reading the export (one thread: the event loop's)
    complete: bool = False  # read to the end of the log (else stopped: the mirror may be stale)
    by_reason: dict[str, int] = field(default_factory=dict)  # operations skipped: nullified, bad_*

    def skip(self, reason: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        metrics.BACKFILL_PLC_OPS.labels(reason).inc()


def mirror_path(state_dir: Path, plc_url: str) -> Path:
    """``state_dir/plc-export-<hash of the directory's URL>.sqlite`` (nothing from the network names it)."""
    return Path(state_dir) / f"plc-export-{hashlib.sha256(plc_url.rstrip('/').encode()).hexdigest()[:16]}.sqlite"


class ExportMirror:
    """did -> (state, PDS base URL, handle) as of the export cursor; a SQLite file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.executescript(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
            "CREATE TABLE IF NOT EXISTS ident(did TEXT PRIMARY KEY, state INTEGER NOT NULL, pds TEXT, "
            "handle TEXT) WITHOUT ROWID;"
            "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;")
        fmt = self._meta("format")
        if fmt is None:
            self._db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
        elif fmt != FORMAT:  # another layout: a cache, rebuilt from the directory
            self._db.executescript("DELETE FROM ident; DELETE FROM meta;")
            self._db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @property
    def cursor(self) -> str | None:
        """The ``after`` of the next page (None: from the start of the log)."""
        return self._meta("cursor")

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM ident").fetchone()[0]

    def apply(self, rows: list[tuple[str, int, str | None, str | None]], cursor: str) -> None:
        """Fold one page's rows (did, state, pds, handle; in log order, the later wins) and move the
        cursor past it, atomically."""
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany("INSERT OR REPLACE INTO ident VALUES (?, ?, ?, ?)", rows)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (cursor,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @property
    def first_cid(self) -> str | None:
        """The CID of the log's first line when this mirror read it (the log's identity)."""
        return self._meta("first_cid")

    def reset(self, first_cid: str | None) -> None:
        """Forget everything (another log at this URL): the next read starts from the beginning."""
        self._db.execute("BEGIN")
        self._db.execute("DELETE FROM ident")
        self._db.execute("DELETE FROM meta WHERE key IN ('cursor', 'first_cid')")
        if first_cid is not None:
            self._db.execute("INSERT INTO meta VALUES ('first_cid', ?)", (first_cid,))
        self._db.execute("COMMIT")

    def lookup(self, did: str) -> tuple[int, str | None, str | None] | None:
        """(state, pds, handle) of ``did``, or None when the log (so far) does not hold it."""
        return self._db.execute("SELECT state, pds, handle FROM ident WHERE did = ?", (did,)).fetchone()

    def close(self) -> None:
        self._db.close()


def parse_op(line: bytes) -> tuple[str, int, str | None, str | None] | str:
    """One export line -> (did, state, pds, handle), or the reason it is skipped: ``bad_line``
    (not a JSON object, or over :data:`MAX_LINE_BYTES`), ``bad_did``, ``bad_op``, ``nullified``."""
    if len(line) > MAX_LINE_BYTES:
        return "bad_line"
    try:
        entry = json.loads(line)
    except ValueError:
        return "bad_line"
    if not isinstance(entry, dict):
        return "bad_line"
    did = entry.get("did")
    if not isinstance(did, str) or not _PLC.fullmatch(did):
        return "bad_did"
    if entry.get("nullified") is not False:  # absent or not a boolean: not trusted to be current
        return "nullified" if entry.get("nullified") is True else "bad_op"
    op = entry.get("operation")
    kind = op.get("type") if isinstance(op, dict) else None
    if kind == "plc_tombstone":
        return did, TOMBSTONE, None, None
    if kind == "plc_operation":
        services, aka = op.get("services"), op.get("alsoKnownAs")
        svc = services.get("atproto_pds") if isinstance(services, dict) else None
        endpoint = svc.get("endpoint") if isinstance(svc, dict) and svc.get("type") == "AtprotoPersonalDataServer" \
            else None
        first = next((a for a in aka if isinstance(a, str) and a.startswith("at://")), None) \
            if isinstance(aka, list) else None
        handle = valid_handle(first[5:]) if first else None
    elif kind == "create":
        endpoint, handle = op.get("service"), valid_handle(op.get("handle"))
    else:
        return "bad_op"
    pds = pds_base(endpoint)
    return (did, OK, pds, handle) if pds is not None else (did, NO_PDS, None, handle)


def _entry(line: bytes) -> dict:
    try:
        entry = json.loads(line)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def _first_cid(body: bytes) -> str | None:
    """The ``cid`` of a page's first line (a string of at most 100 characters), else None."""
    cid = _entry(body.split(b"\n", 1)[0][:MAX_LINE_BYTES]).get("cid")
    return cid if isinstance(cid, str) and 0 < len(cid) <= 100 else None


def _cursor(line: bytes) -> str | None:
    """The ``after`` a line stands for: its ``seq`` (an integer) or else its ``createdAt``."""
    entry = _entry(line)
    seq, created = entry.get("seq"), entry.get("createdAt")
    if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
        return str(seq)
    if isinstance(created, str) and 0 < len(created) <= 64:
        return created
    return None


async def _page(fetcher: Fetcher, url: str, params: dict[str, str], max_bytes: int) -> bytes:
    """One page's body; raises ExportError."""
    try:
        resp = await fetcher.get(url, params, max_bytes=max_bytes, accept="application/jsonlines")
    except FetchError as exc:
        raise ExportError(exc.reason, str(exc)) from None
    if resp.status in (404, 405, 501):
        raise ExportError("not_supported", f"{url}: HTTP {resp.status} (the directory has no export)")
    if resp.status != 200:
        raise ExportError("http_error", f"{url}: HTTP {resp.status}")
    return resp.body


async def sync_export(fetcher: Fetcher, plc_url: str, mirror: ExportMirror, count: int = EXPORT_COUNT,
                      max_page_bytes: int = MAX_PAGE_BYTES,
                      on_page: Callable[[ExportStats], None] | None = None,
                      stopped: Callable[[], bool] = lambda: False) -> ExportStats:
    """Read ``{plc_url}/export`` from the mirror's cursor to the end of the log into ``mirror``.

    Returns the counts; raises :class:`ExportError` (the mirror keeps every page before the bad
    one). ``on_page`` is called after each page (progress); ``stopped`` before each request (True:
    return now, ``complete`` False; the mirror's cursor resumes the read).
    """
    base = plc_url.rstrip("/")
    stats = ExportStats()
    cpu0 = time.process_time()
    url = f"{base}/export"
    after = mirror.cursor
    if after is not None:  # resuming: is it still the same log? (a directory's log never rewinds)
        first = _first_cid(await _page(fetcher, url, {"count": "1"}, max_page_bytes))
        if first is None or first != mirror.first_cid:
            mirror.reset(first)
            after = None
    while not stopped():
        params = {"count": str(count)} | ({"after": after} if after is not None else {})
        body = await _page(fetcher, url, params, max_page_bytes)
        if after is None and mirror.first_cid is None:
            mirror.reset(_first_cid(body))
        lines = [ln for ln in body.split(b"\n") if ln.strip()]
        if len(lines) > count:
            raise ExportError("bad_page", f"{url}: {len(lines)} lines, {count} asked for")
        if not lines:
            stats.complete = True
            break
        rows = []
        for ln in lines:
            r = parse_op(ln)
            if isinstance(r, str):
                stats.skip(r)
            else:
                rows.append(r)
        nxt = _cursor(lines[-1])
        if nxt is None:
            raise ExportError("bad_page", f"{url}: the page's last line has neither seq nor createdAt")
        if nxt == after:
            raise ExportError("stuck_cursor", f"{url}: the cursor does not move past {after[:64]!r}")
        mirror.apply(rows, nxt)
        stats.cpu_s = time.process_time() - cpu0
        stats.pages += 1
        stats.bytes += len(body)
        stats.applied += len(rows)
        metrics.BACKFILL_PLC_OPS.labels("applied").inc(len(rows))
        after = nxt
        if on_page is not None:
            on_page(stats)
        if len(lines) < count:
            stats.complete = True
            break
    return stats

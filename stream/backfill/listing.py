"""Which repositories to backfill: ``com.atproto.sync.listRepos`` pages, or a file of DIDs.

Both yield :class:`Page` s in order, each with the cursor that fetches it again (``start``) and the
cursor of the next one (``next``, None after the last page), so a checkpoint can resume at the
first page that is not finished.

- :func:`list_repos`: ``GET {base}/xrpc/com.atproto.sync.listRepos?limit=&cursor=`` on a relay or
  a PDS; entries ``{did, head, rev, active?, status?}`` (lexicon com.atproto.sync.listRepos). An
  entry without a valid DID is counted in ``Page.invalid`` and skipped. A listing that cannot be
  fetched raises :class:`ListingError` (a one-line message).
- :func:`read_dids_file`: one DID per line (blank lines and ``#`` comments ignored); the whole file
  is checked first, a bad line raises :class:`ListingError` naming its line number. The cursor is
  the number of DIDs already listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from stream.backfill.fetch import Fetcher, FetchError
from stream.protocol import is_did

PAGE = 1000  # listRepos' maximum limit
MAX_LISTING_BYTES = 8 * 1024 * 1024
MAX_CURSOR = 1024


class ListingError(Exception):
    """The listing cannot be had; the message is one line for the user."""


@dataclass(frozen=True)
class Repo:
    did: str
    rev: str | None = None
    active: bool = True
    status: str | None = None  # why inactive (deactivated, takendown, suspended, deleted...)


@dataclass
class Page:
    start: str | None
    next: str | None
    repos: list[Repo] = field(default_factory=list)
    invalid: int = 0


async def list_repos(fetcher: Fetcher, base_url: str, cursor: str | None = None,
                     limit: int = PAGE) -> AsyncIterator[Page]:
    """Pages of ``listRepos`` from ``cursor`` (None: the beginning) until the listing ends."""
    url = f"{base_url.rstrip('/')}/xrpc/com.atproto.sync.listRepos"
    while True:
        params = {"limit": str(limit)}
        if cursor is not None:
            params["cursor"] = cursor
        try:
            resp = await fetcher.get(url, params=params, max_bytes=MAX_LISTING_BYTES, accept="application/json")
        except FetchError as exc:
            raise ListingError(f"cannot list repositories at {base_url}: {exc}") from None
        if resp.status != 200:
            raise ListingError(f"cannot list repositories at {base_url}: HTTP {resp.status}"
                               + (f" {resp.json_error()}" if resp.json_error() else ""))
        try:
            body = json.loads(resp.body)
            entries = body["repos"]
            nxt = body.get("cursor")
            if not isinstance(entries, list) or not (nxt is None or isinstance(nxt, str) and len(nxt) <= MAX_CURSOR):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ListingError(f"{base_url} answered listRepos with something that is not a listing") from None
        page = Page(cursor, nxt or None)
        for e in entries:
            did = e.get("did") if isinstance(e, dict) else None
            if not is_did(did):
                page.invalid += 1
                continue
            active = e.get("active", True) is not False
            status = e.get("status") if not active and isinstance(e.get("status"), str) else None
            rev = e.get("rev") if isinstance(e.get("rev"), str) else None
            page.repos.append(Repo(did, rev, active, status[:40] if status else ("inactive" if not active else None)))
        yield page
        if page.next is None or not entries or page.next == cursor:
            return
        cursor = page.next


def read_dids_file(path: Path) -> list[str]:
    """Every DID of a DIDs file, in order; raises ListingError on a bad line (with its number)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ListingError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ListingError(f"cannot read {path}: {exc.strerror or exc}") from None
    dids = []
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not is_did(s):
            raise ListingError(f"{path} line {n}: not a DID: {s[:80]!r}")
        dids.append(s)
    if not dids:
        raise ListingError(f"{path}: no DIDs in the file")
    return dids


async def dids_pages(dids: list[str], cursor: str | None = None, size: int = PAGE) -> AsyncIterator[Page]:
    """Pages of a DID list; the cursor is the index of the page's first DID."""
    start = int(cursor) if cursor and cursor.isdigit() else 0
    for i in range(start, len(dids), size):
        end = min(i + size, len(dids))
        yield Page(str(i), str(end) if end < len(dids) else None, [Repo(d) for d in dids[i:end]])

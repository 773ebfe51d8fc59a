"""AT Protocol rules chorus relies on, in one place: identifier syntax, collection NSIDs, times, limits.

Every module that reads or writes protocol data (``stream.ingest`` decoding and normalization, the
Jetstream reader, ``stream.sim`` frame encoders, offline readers) takes these rules from here.

Syntax (pure functions, never raise, ``False`` for anything that is not a ``str``):

- :func:`is_did`: https://atproto.com/specs/did (``did:method:id``, at most 2,048 chars, ``%``
  only as ``%XX`` hex escapes).
- :func:`is_handle`: https://atproto.com/specs/handle (a domain name of 2+ labels).
- :func:`is_tid`: https://atproto.com/specs/tid (13 base32-sortable chars; repo revisions).
- :func:`is_nsid`: https://atproto.com/specs/nsid (the SDK's ``atproto_core.nsid.validate_nsid``).
- :func:`is_record_key`: https://atproto.com/specs/record-key (1-512 chars of ``A-Za-z0-9._:~-``,
  not ``.`` or ``..``).
- :func:`parse_at_uri`: the restricted AT-URI syntax of https://atproto.com/specs/at-uri-scheme
  (``at://AUTHORITY[/COLLECTION[/RKEY]]``, authority a DID or handle, no query, no fragment, no
  trailing slash, under 8 KiB), each part checked with the functions above.

The character classes, lengths and the handle grammar are the atproto SDK's
(``atproto_client.models.string_formats``); the AT-URI is split here rather than matched with the
SDK's ``AT_URI_RE``, whose DID branch refuses valid DIDs (``did:web:host%3A8080``, ``did:x:a:b``).
All of it is checked against the AT Protocol interop vectors (tests/data/atproto-syntax).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, NamedTuple

from atproto_client.models import string_formats as _sf
from atproto_core.nsid import validate_nsid as _validate_nsid

# --- collections chorus reads (app.bsky lexicons) -------------------------------------------------
POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
REPOST = "app.bsky.feed.repost"
FOLLOW = "app.bsky.graph.follow"
EMBED_RECORD = "app.bsky.embed.record"
EMBED_RECORD_WITH_MEDIA = "app.bsky.embed.recordWithMedia"
COLLECTIONS = (POST, LIKE, REPOST, FOLLOW)

# --- limits ----------------------------------------------------------------------------------------
MAX_FRAME_BYTES = 5 * 1024 * 1024  # relays' (and the SDK client's) subscribeRepos frame limit
MAX_AT_URI_CHARS = _sf.MAX_AT_URI_LENGTH  # 8 KiB: an AT-URI must be shorter
MAX_DID_CHARS = _sf.MAX_DID_LENGTH

# --- syntax -----------------------------------------------------------------------------------------
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def is_did(value: Any) -> bool:
    """A syntactically valid DID (any method)."""
    return (isinstance(value, str) and len(value) <= MAX_DID_CHARS and _sf.DID_RE.fullmatch(value) is not None
            and ("%" not in value or _BAD_PERCENT.search(value) is None))


_TID = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")


def is_tid(value: Any) -> bool:
    """A TID (https://atproto.com/specs/tid): 13 base32-sortable characters, the top bit zero.
    Repo revisions (``rev``) are TIDs."""
    return isinstance(value, str) and _TID.fullmatch(value) is not None


def is_handle(value: Any) -> bool:
    """A syntactically valid handle (ASCII domain name, 2+ labels, TLD not starting with a digit)."""
    return (isinstance(value, str) and value.isascii() and not value.endswith("\n")  # the SDK's "$" lets one through
            and _sf.is_valid_handle(value))


@lru_cache(maxsize=4096)
def _nsid_ok(value: str) -> bool:
    return bool(_validate_nsid(value, soft_fail=True))


def is_nsid(value: Any) -> bool:
    """A syntactically valid NSID such as ``app.bsky.feed.post`` (results cached: collections repeat)."""
    return isinstance(value, str) and len(value) <= 317 and _nsid_ok(value)


def is_record_key(value: Any) -> bool:
    return (isinstance(value, str) and value not in _sf.INVALID_RECORD_KEYS
            and _sf.RKEY_RE.fullmatch(value) is not None)


class AtUri(NamedTuple):
    """A parsed AT-URI; ``collection`` and ``rkey`` are None when the URI stops before them."""

    authority: str
    collection: str | None
    rkey: str | None


class InvalidSyntax(ValueError):
    """A value that breaks an AT Protocol syntax rule; the message says which."""


def parse_at_uri(value: Any) -> AtUri:
    """``at://AUTHORITY[/COLLECTION[/RKEY]]`` -> :class:`AtUri`; raises :class:`InvalidSyntax`."""
    if not isinstance(value, str) or not value.startswith("at://"):
        raise InvalidSyntax("not an at:// URI")
    if len(value) >= MAX_AT_URI_CHARS:
        raise InvalidSyntax(f"AT-URI of {len(value)} chars (limit {MAX_AT_URI_CHARS - 1})")
    parts = value[5:].split("/")
    if len(parts) > 3:
        raise InvalidSyntax("AT-URI with more than collection and record key")
    authority = parts[0]
    if not (is_did(authority) or is_handle(authority)):
        raise InvalidSyntax("AT-URI authority is neither a DID nor a handle")
    collection = parts[1] if len(parts) > 1 else None
    if collection is not None and not is_nsid(collection):
        raise InvalidSyntax("AT-URI collection is not an NSID")
    rkey = parts[2] if len(parts) > 2 else None
    if rkey is not None and not is_record_key(rkey):
        raise InvalidSyntax("AT-URI record key is not a valid record key")
    return AtUri(authority, collection, rkey)


def is_at_uri(value: Any) -> bool:
    try:
        parse_at_uri(value)
    except InvalidSyntax:
        return False
    return True


# --- times -----------------------------------------------------------------------------------------
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


def datetime_us(value: Any) -> int:
    """RFC 3339 timestamp (``...Z`` or an offset; naive = UTC) -> microseconds since the epoch.

    Raises ValueError for anything else (not a string, not a timestamp)."""
    if not isinstance(value, str):
        raise ValueError("time is not a string")
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return (dt - _EPOCH) // _US

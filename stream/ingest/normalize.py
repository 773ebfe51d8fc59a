"""Repo record op -> normalized ``chorus.events`` value (a plain dict; schema: stream.schemas.Event).

Pure functions, no I/O. Only these collections become events; every other one is ignored:

==========================  ==========  ===============================================
collection                  kind        fields taken from the record
==========================  ==========  ===============================================
app.bsky.feed.post          post        text, langs, reply.parent.uri, reply.root.uri,
                                        embed record uri (app.bsky.embed.record or
                                        app.bsky.embed.recordWithMedia) -> quote_uri
app.bsky.feed.like          like        subject.uri -> subject_uri, its DID -> subject_did
app.bsky.feed.repost        repost      subject.uri -> subject_uri, its DID -> subject_did
app.bsky.graph.follow       follow      subject (a DID) -> subject_did
(any of the above, delete)  delete      collection (no record: deletes carry none)
==========================  ==========  ===============================================

``update`` ops are ignored (records of these kinds are immutable in practice; downstream dedupes
by URI anyway). A record that does not fit raises :class:`InvalidOp` with a short reason, which
the caller counts in ``chorus_ingest_frames_invalid_total{reason}``.

References (``subject.uri``, reply parent/root, quoted record) must be AT-URIs by the protocol's
syntax (:func:`stream.protocol.parse_at_uri`; reason ``at_uri``) whose authority is a DID (reason
``uri_handle`` for a handle: chorus credits accounts by DID and never resolves handles from a
record). Identifier syntax lives in :mod:`stream.protocol`; this module holds chorus's field rules.

Event time (:func:`event_time_us`): a commit's ``time`` is set by the PDS or relay, not by
anything chorus trusts, so the event time is ``min(claimed time, receive time + FUTURE_TOLERANCE_US)``
(1 minute). Past times are kept (a replay after a reconnect is legitimately old; the worker drops
what is older than its window). The clamped ones are counted by the caller.
"""

from __future__ import annotations

import re
from typing import Any

from stream.protocol import (EMBED_RECORD, EMBED_RECORD_WITH_MEDIA, FOLLOW, LIKE, POST, REPOST, InvalidSyntax,
                             is_did, is_record_key, parse_at_uri)

KINDS = {POST: "post", LIKE: "like", REPOST: "repost", FOLLOW: "follow"}

_STATUS = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # account status tokens
MAX_TEXT_CHARS = 100_000  # generous: the lexicon allows 3,000 bytes; beyond this a record is garbage
FUTURE_TOLERANCE_US = 60_000_000  # how far ahead of its receive time an event time may claim to be


class InvalidOp(ValueError):
    """An op or record that cannot be normalized; ``reason`` is the metric label."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def split_path(path: Any) -> tuple[str, str]:
    """``collection/rkey`` -> (collection, rkey); raises InvalidOp("op_shape")."""
    if not isinstance(path, str):
        raise InvalidOp("op_shape")
    collection, sep, rkey = path.partition("/")
    if not sep or not collection or not is_record_key(rkey):
        raise InvalidOp("op_shape")
    return collection, rkey


def uri_did(uri: Any) -> str:
    """The authority DID of an AT-URI; raises InvalidOp ``at_uri`` (bad syntax) or ``uri_handle``."""
    try:
        authority = parse_at_uri(uri).authority
    except InvalidSyntax:
        raise InvalidOp("at_uri") from None
    if not authority.startswith("did:"):
        raise InvalidOp("uri_handle")
    return authority


def _strong_ref_uri(ref: Any) -> str:
    """``{uri, cid}`` -> uri (validated as an AT-URI with a DID authority)."""
    if not isinstance(ref, dict):
        raise InvalidOp("record_shape")
    uri = ref.get("uri")
    uri_did(uri)
    return uri


def event_time_us(claimed_us: int, received_us: int | None) -> tuple[int, bool]:
    """(event time, clamped?): the claimed time, or ``received_us + FUTURE_TOLERANCE_US`` when it
    claims to be later than that (see the module docstring). ``received_us`` None: no clamp."""
    if received_us is None or claimed_us <= received_us + FUTURE_TOLERANCE_US:
        return claimed_us, False
    return received_us + FUTURE_TOLERANCE_US, True


def record_fields(collection: str, record: Any) -> dict[str, Any]:
    """Event fields specific to ``collection`` from a decoded record (see the module table)."""
    if not isinstance(record, dict):
        raise InvalidOp("record_shape")
    if record.get("$type") != collection:
        raise InvalidOp("record_type")
    if collection == POST:
        return _post_fields(record)
    if collection == FOLLOW:
        subject = record.get("subject")
        if not is_did(subject):
            raise InvalidOp("invalid_did")
        return {"subject_did": subject}
    # like, repost
    uri = _strong_ref_uri(record.get("subject"))
    return {"subject_uri": uri, "subject_did": uri_did(uri)}


def _post_fields(record: dict) -> dict[str, Any]:
    text = record.get("text")
    if not isinstance(text, str):
        raise InvalidOp("record_shape")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidOp("record_too_large")
    _check_utf8(text)
    out: dict[str, Any] = {"text": text}
    langs = record.get("langs")
    if langs is not None:
        if not isinstance(langs, list) or not all(isinstance(x, str) for x in langs):
            raise InvalidOp("record_shape")
        for x in langs:
            _check_utf8(x)
        out["langs"] = langs
    reply = record.get("reply")
    if reply is not None:
        if not isinstance(reply, dict):
            raise InvalidOp("record_shape")
        out["reply_parent"] = _strong_ref_uri(reply.get("parent"))
        out["reply_root"] = _strong_ref_uri(reply.get("root"))
    embed = record.get("embed")
    if isinstance(embed, dict):
        etype = embed.get("$type")
        if etype == EMBED_RECORD:
            out["quote_uri"] = _strong_ref_uri(embed.get("record"))
        elif etype == EMBED_RECORD_WITH_MEDIA:
            inner = embed.get("record")
            out["quote_uri"] = _strong_ref_uri(inner.get("record") if isinstance(inner, dict) else None)
    elif embed is not None:
        raise InvalidOp("record_shape")
    return out


def _check_utf8(text: str) -> None:
    """Strings from JSON can hold lone surrogates (``"\\ud800"``), which UTF-8 cannot carry."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidOp("record_utf8") from None


def event(kind: str, did: str, collection: str, rkey: str, seq: int, time_us: int, /, **fields: Any) -> dict:
    """A ``chorus.events`` value (no None fields, ``v`` first)."""
    ev = {"v": 1, "kind": kind, "did": did, "rkey": rkey, "uri": f"at://{did}/{collection}/{rkey}",
          "seq": seq, "time_us": time_us}
    ev.update(fields)
    return ev


def account_event(did: str, seq: int, time_us: int, active: bool, status: str | None) -> dict:
    """A ``kind="account"`` value: ``active=False`` retracts the account's activity downstream.

    ``uri`` is the repo URI ``at://DID`` and ``rkey`` is empty: account events are state (latest
    seq wins), not records, so consumers must not dedupe them by URI. ``status`` must be a short
    token (``deactivated``, ``takendown``, ...); anything else raises InvalidOp("frame_shape").
    """
    if status is not None and _STATUS.fullmatch(status) is None:
        raise InvalidOp("frame_shape")
    ev = {"v": 1, "kind": "account", "did": did, "rkey": "", "uri": f"at://{did}", "seq": seq,
          "time_us": time_us, "active": active}
    if status is not None:
        ev["status"] = status
    return ev

"""Jetstream (v1) messages -> ``chorus.events`` values: the one home of chorus's Jetstream rules.

Jetstream (github.com/bluesky-social/jetstream, the ``/subscribe`` endpoint) re-serves the
firehose as one JSON text message per event::

    {"did": DID, "time_us": N, "kind": "commit",
     "commit": {"rev", "operation": "create"|"update"|"delete", "collection", "rkey", "record"?, "cid"?}}
    {"did": DID, "time_us": N, "kind": "account", "account": {"active", "did", "seq", "time", "status"?}}
    {"did": DID, "time_us": N, "kind": "identity", "identity": {"did", "handle"?, "seq", "time"}}

``time_us`` is Jetstream's own receive time and its cursor (``?cursor=TIME_US``: replay from that
time, inclusive; absent or in the future: live tail). Query ``wantedCollections`` (repeatable)
filters commits; account and identity events always come.

Mapping (the firehose's field rules, :mod:`stream.ingest.normalize`): a create -> post / like /
repost / follow with :func:`~stream.ingest.normalize.record_fields`; a delete -> delete; an update
-> nothing; account -> an account event; identity and other kinds -> nothing. ``seq`` of every
event is the message's ``time_us`` (Jetstream carries no relay seq); its event time is that time
clamped like a firehose commit's (:func:`~stream.ingest.normalize.event_time_us`).

Used by the live reader (``chorus ingest --jetstream URL``) and by ``chorus analyze`` on a
JSON-lines dump. Invalid reasons are the firehose's, plus ``json`` (a message that is not a JSON
object); a record nested too deep for the JSON parser counts as ``record_depth``.
"""

from __future__ import annotations

import json
from typing import Any

from stream import protocol
from stream.ingest import normalize
from stream.ingest.decode import MAX_RECORD_BYTES, MAX_RECORD_DEPTH, Decoded, clamp_times, too_deep

WANTED_COLLECTIONS = protocol.COLLECTIONS  # what chorus asks Jetstream for (wantedCollections)
REWIND_US = 5_000_000  # dial (acknowledged time_us - this) on every (re)connect
_TYPES = {"commit": "#commit", "account": "#account", "identity": "#identity"}


def message_events(obj: Any) -> list[dict]:
    """One parsed Jetstream message -> chorus.events values (raises normalize.InvalidOp)."""
    if not isinstance(obj, dict):
        raise normalize.InvalidOp("json")
    did, t, kind = obj.get("did"), obj.get("time_us"), obj.get("kind")
    if type(t) is not int or t < 0:
        raise normalize.InvalidOp("frame_shape")
    if not protocol.is_did(did):
        raise normalize.InvalidOp("invalid_did")
    if kind == "account":
        acc = obj.get("account")
        if not isinstance(acc, dict) or not isinstance(acc.get("active"), bool):
            raise normalize.InvalidOp("frame_shape")
        status = acc.get("status")
        return [normalize.account_event(did, t, t, acc["active"], status if isinstance(status, str) else None)]
    if kind != "commit":
        return []  # identity (and anything newer): no event, as on the firehose
    c = obj.get("commit")
    if not isinstance(c, dict):
        raise normalize.InvalidOp("frame_shape")
    collection, rkey = normalize.split_path(f"{c.get('collection')}/{c.get('rkey')}")
    ev_kind = normalize.KINDS.get(collection)
    if ev_kind is None:
        return []
    op = c.get("operation")
    rev = c.get("rev")  # follows carry the commit's rev, as on the firehose (the graph's rev order)
    extra = {"rev": rev} if collection == protocol.FOLLOW and protocol.is_tid(rev) else {}
    if op == "delete":
        return [normalize.event("delete", did, collection, rkey, t, t, collection=collection, **extra)]
    if op == "create":
        record = c.get("record")
        if too_deep(record, MAX_RECORD_DEPTH):
            raise normalize.InvalidOp("record_depth")
        return [normalize.event(ev_kind, did, collection, rkey, t, t, **normalize.record_fields(collection, record),
                                **extra)]
    return []


def decode_message(raw: str | bytes, received_us: int | None = None) -> Decoded:
    """One websocket message -> :class:`~stream.ingest.decode.Decoded` (never raises).

    ``seq`` and ``time_us`` are the message's ``time_us`` (the cursor); with ``received_us`` the
    events' time is clamped as on the firehose. ``type`` uses the firehose labels (``#commit``,
    ``#account``, ``#identity``, ``unknown``, ``invalid``) so both sources share the metrics."""
    if len(raw) > MAX_RECORD_BYTES + 4096:
        return Decoded("invalid", invalid=["record_too_large"])
    try:
        obj = json.loads(raw)
    except RecursionError:
        return Decoded("invalid", invalid=["record_depth"])
    except UnicodeDecodeError:
        return Decoded("invalid", invalid=["record_utf8"])
    except ValueError:
        return Decoded("invalid", invalid=["json"])
    if not isinstance(obj, dict):
        return Decoded("invalid", invalid=["json"])
    t, kind = obj.get("time_us"), obj.get("kind")
    out = Decoded(_TYPES.get(kind, "unknown") if isinstance(kind, str) else "unknown",
                  seq=t if type(t) is int and t >= 0 else None)
    out.time_us = out.seq
    try:
        out.events = message_events(obj)
    except normalize.InvalidOp as exc:
        out.invalid.append(exc.reason)
        if exc.reason == "frame_shape":
            out.type = "invalid"
    return clamp_times(out, received_us)

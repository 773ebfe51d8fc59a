"""Firehose frames as Jetstream (v1) messages, for ``chorus relay --jetstream`` and the tests.

:func:`frame_messages` turns one subscribeRepos frame into the messages Jetstream would send for it
(the shapes in :mod:`stream.ingest.jetstream`): one ``commit`` message per op of a ``#commit``
(records as JSON: CID links as ``{"$link": CID}``, other bytes as ``{"$bytes": base64}``, the
DAG-JSON conventions Jetstream uses), ``account`` and ``identity`` messages for those frames, nothing
for ``#sync``, ``#info`` or frames that do not decode. :func:`jetstream_source` maps a whole
:class:`~stream.sim.relay.FrameSource`; each message gets a ``time_us`` that is the frame's time,
bumped by 1 us where needed so that every ``time_us`` is unique and increasing (Jetstream's cursor
addresses one event).
"""

from __future__ import annotations

import base64
import json
from typing import Any, Iterator

import libipld

from stream.ingest.decode import car_sections
from stream.sim.frames import split_frame


def json_value(value: Any) -> Any:
    """A decoded DAG-CBOR value as JSON-able DAG-JSON (bytes -> ``$link`` when a CID, else ``$bytes``)."""
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_value(v) for v in value]
    if isinstance(value, bytes):
        try:
            return {"$link": libipld.encode_cid(value)}
        except ValueError:
            return {"$bytes": base64.b64encode(value).decode()}
    return value


def frame_messages(frame: bytes) -> list[tuple[str | None, dict]]:
    """(collection or None, message without ``time_us``) for each Jetstream message of ``frame``."""
    try:
        header, body = split_frame(frame)
    except ValueError:
        return []
    t = header.get("t")
    if t == "#commit":
        return _commit_messages(body)
    did = body.get("did")
    if t == "#account":
        acc = {k: body[k] for k in ("active", "did", "seq", "time", "status") if k in body}
        return [(None, {"did": did, "time_us": 0, "kind": "account", "account": acc})]
    if t == "#identity":
        ident = {k: body[k] for k in ("did", "handle", "seq", "time") if k in body}
        return [(None, {"did": did, "time_us": 0, "kind": "identity", "identity": ident})]
    return []


def _commit_messages(body: dict) -> list[tuple[str | None, dict]]:
    raw = body.get("blocks")
    try:
        index = car_sections(raw)[0] if isinstance(raw, bytes) else {}
    except ValueError:
        index = {}
    out = []
    for op in body.get("ops") or []:
        if not isinstance(op, dict) or not isinstance(op.get("path"), str):
            continue
        collection, _, rkey = op["path"].partition("/")
        commit: dict[str, Any] = {"rev": body.get("rev"), "operation": op.get("action"),
                                  "collection": collection, "rkey": rkey}
        cid = op.get("cid")
        if op.get("action") in ("create", "update"):
            span = index.get(cid) if isinstance(cid, bytes) else None
            if span is None:
                continue  # Jetstream cannot serve a record it does not have
            try:
                record = libipld.decode_dag_cbor(raw[span[0]:span[1]])
            except (ValueError, RecursionError):
                continue
            commit["record"] = json_value(record)
            commit["cid"] = libipld.encode_cid(cid)
        out.append((collection, {"did": body.get("repo"), "time_us": 0, "kind": "commit", "commit": commit}))
    return out


def jetstream_items(frames) -> Iterator[tuple[int, int, tuple[str | None, str]]]:
    """``(time_us, time_us, (collection, JSON text))`` for every message of ``(seq, time_us, frame)``
    items, ``time_us`` unique and increasing (see the module docstring)."""
    prev = -1
    for _, t, frame in frames:
        for collection, msg in frame_messages(frame):
            prev = max(int(t), prev + 1)
            msg["time_us"] = prev
            yield prev, prev, (collection, json.dumps(msg, separators=(",", ":"), ensure_ascii=False))


def jetstream_source(source):
    """A :class:`~stream.sim.relay.FrameSource` of Jetstream messages from one of firehose frames."""
    from stream.sim.relay import FrameSource

    return FrameSource(lambda: jetstream_items(source), None, None)

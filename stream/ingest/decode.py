"""Decode one ``com.atproto.sync.subscribeRepos`` frame into normalized event dicts (pure, never raises).

:func:`decode_frame`: raw websocket message -> :class:`Decoded` (frame type, seq, time, events,
reasons it was invalid). Frame semantics (header/body split, message vs error frame) come from the
atproto SDK's parser (``atproto_subscription.Frame.from_bytes``, libipld underneath). ``#commit``
bodies, the hot path, are then read as plain dicts and their CAR with ``libipld.decode_car``:
building the SDK's pydantic models for every commit costs several times more than the whole decode
(see benchmarks/ingest_bench.py), so they are used only for the rare
``#identity``/``#account``/``#sync``/``#info`` frames, where they validate the body.

Invalid-input reasons (``chorus_ingest_frames_invalid_total{reason}``): ``too_large`` (> 5 MB),
``truncated``, ``cbor`` (not DAG-CBOR), ``header`` (not a subscription frame), ``frame_shape``
(body fields missing or of the wrong type), ``invalid_did``, ``car`` (``blocks`` not a CAR file),
``missing_block`` (an op's record is not in the CAR), ``record_type``, ``record_shape``,
``op_shape``. Frame types (``chorus_ingest_frames_total{type}``): ``#commit``, ``#identity``,
``#account``, ``#sync``, ``#info``, ``error``, ``unknown`` (any other ``t``: skipped), ``invalid``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import libipld
from atproto_client.models.com.atproto.sync import subscribe_repos as lex
from atproto_client.models.utils import get_or_create
from atproto_subscription import ErrorFrame, Frame, FrameDecodingError

from stream.ingest import normalize as nz


MAX_FRAME_BYTES = 5 * 1024 * 1024  # relays' (and the SDK's) frame limit; larger frames are skipped
# Hard websocket limit: frames between MAX_FRAME_BYTES and this are received, counted and skipped.
# Larger ones make the websocket library drop the connection (and the relay resend it forever).
WS_MAX_BYTES = 64 * 1024 * 1024

_SDK_MODELS = {"#identity": lex.Identity, "#account": lex.Account, "#sync": lex.Sync, "#info": lex.Info}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
FRAME_TYPES = ("#commit", *_SDK_MODELS, "error", "unknown", "invalid")


@dataclass(slots=True)
class Decoded:
    """One decoded frame. ``seq`` is None for frames without one (#info, errors, undecodable)."""

    type: str
    seq: int | None = None
    time_us: int | None = None
    events: list[dict] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # reasons, one per skipped frame or op
    error: tuple[str, str | None] | None = None  # error frame: (code, message)
    info: tuple[str, str | None] | None = None  # #info: (name, message)


def time_us(value: Any) -> int:
    """RFC 3339 timestamp -> microseconds since the epoch (naive = UTC); ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError("time is not a string")
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return (dt - _EPOCH) // _US


def _seq(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("seq")
    return value


def decode_frame(raw: bytes | str) -> Decoded:
    """Decode one websocket message. Never raises: bad input comes back with ``invalid`` reasons."""
    if isinstance(raw, str):  # text frames are not part of the protocol
        return Decoded("invalid", invalid=["header"])
    if len(raw) > MAX_FRAME_BYTES:
        return Decoded("invalid", invalid=["too_large"])
    try:
        frame = Frame.from_bytes(raw)
    except FrameDecodingError:
        return Decoded("invalid", invalid=["header"])
    except ValueError as exc:  # libipld
        msg = str(exc)
        truncated = "end of data" in msg or "remaining data" in msg or "EOF" in msg
        return Decoded("invalid", invalid=["truncated" if truncated else "cbor"])
    except RecursionError:
        return Decoded("invalid", invalid=["cbor"])
    except Exception:  # noqa: BLE001 - the SDK lets TypeError/AttributeError through on odd shapes
        return Decoded("invalid", invalid=["header"])
    if isinstance(frame, ErrorFrame):
        body = frame.body
        if not isinstance(body.error, str):
            return Decoded("error", invalid=["frame_shape"])
        return Decoded("error", error=(body.error, body.message if isinstance(body.message, str) else None))
    t, body = frame.type, frame.body
    if t == "#commit":
        return _decode_commit(body)
    model = _SDK_MODELS.get(t) if isinstance(t, str) else None
    if model is None:
        return Decoded("unknown")
    try:
        msg = get_or_create(body, model)
    except Exception:  # noqa: BLE001 - pydantic/SDK model errors
        return Decoded(t, invalid=["frame_shape"])
    if t == "#info":
        return Decoded(t, info=(msg.name, msg.message))
    try:
        seq, tus = _seq(msg.seq), time_us(msg.time)
    except ValueError:
        return Decoded(t, invalid=["frame_shape"])
    out = Decoded(t, seq=seq, time_us=tus)
    if not nz.is_did(msg.did):
        out.invalid.append("invalid_did")
    elif t == "#account":
        out.events.append(nz.account_event(msg.did, seq, tus, bool(msg.active), msg.status))
    return out


def _decode_commit(body: Any) -> Decoded:
    if not isinstance(body, dict):
        return Decoded("#commit", invalid=["frame_shape"])
    try:
        seq, tus = _seq(body.get("seq")), time_us(body.get("time"))
    except ValueError:
        return Decoded("#commit", invalid=["frame_shape"])
    out = Decoded("#commit", seq=seq, time_us=tus)
    did, ops = body.get("repo"), body.get("ops")
    if not nz.is_did(did):
        out.invalid.append("invalid_did")
        return out
    if not isinstance(ops, list):
        out.invalid.append("frame_shape")
        return out
    blocks: dict | None = None
    for op in ops:
        try:
            if not isinstance(op, dict):
                raise nz.InvalidOp("op_shape")
            collection, rkey = nz.split_path(op.get("path"))
            kind = nz.KINDS.get(collection)
            if kind is None:
                continue
            action = op.get("action")
            if action == "delete":
                out.events.append(nz.event("delete", did, collection, rkey, seq, tus, collection=collection))
            elif action == "create":
                if blocks is None:
                    raw_car = body.get("blocks")
                    try:
                        blocks = libipld.decode_car(raw_car)[1] if isinstance(raw_car, bytes) else None
                    except (ValueError, RecursionError, TypeError):
                        blocks = None
                    if blocks is None:
                        out.invalid.append("car")
                        return out
                record = blocks.get(op.get("cid")) if isinstance(op.get("cid"), bytes) else None
                if record is None:
                    raise nz.InvalidOp("missing_block")
                out.events.append(nz.event(kind, did, collection, rkey, seq, tus,
                                           **nz.record_fields(collection, record)))
        except nz.InvalidOp as exc:
            out.invalid.append(exc.reason)
    return out



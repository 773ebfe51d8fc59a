"""Decode one ``com.atproto.sync.subscribeRepos`` frame into normalized event dicts (pure, never raises).

:func:`decode_frame`: raw websocket message -> :class:`Decoded` (frame type, seq, time, events,
reasons it was invalid). Frame semantics (header/body split, message vs error frame) come from the
atproto SDK's parser (``atproto_subscription.Frame.from_bytes``, libipld underneath). ``#commit``
bodies, the hot path, are then read as plain dicts and their CAR with ``libipld.decode_car``:
building the SDK's pydantic models for every commit costs several times more than the whole decode
(see benchmarks/ingest_bench.py), so they are used only for the rare
``#identity``/``#account``/``#sync``/``#info`` frames, where they validate the body.

Each op of a commit stands alone: a delete needs no block and is emitted whatever else the commit
holds; a create whose record cannot be had is skipped and counted, and the other ops are kept.
The CAR in ``blocks`` is therefore split into its sections here (:func:`car_sections`: CAR v1 is a
varint-prefixed DAG-CBOR header then varint-prefixed ``CID || block`` sections) and only the
blocks that ops name are decoded, one by one, with libipld: ``libipld.decode_car`` decodes every
block at once and fails as a whole on one bad block (and takes 3x as long on real-shaped commits).

Invalid-input reasons (``chorus_ingest_frames_invalid_total{reason}``), per frame: ``too_large``
(> 5 MB), ``truncated``, ``cbor`` (not DAG-CBOR), ``header`` (not a subscription frame),
``frame_shape`` (body fields missing or of the wrong type), ``invalid_did``; per op: ``op_shape``,
``car`` (the op's block sits in a ``blocks`` that is not a readable CAR), ``missing_block`` (the
op's record is not in the CAR), ``record_cbor`` (its block is not DAG-CBOR), ``record_utf8`` (a
text string in it is not UTF-8), ``record_depth`` (nested deeper than ``MAX_RECORD_DEPTH``),
``record_too_large`` (block over ``MAX_RECORD_BYTES``, or text over
``normalize.MAX_TEXT_CHARS``), ``record_type``, ``record_shape``, ``invalid_did``, ``at_uri``,
``uri_handle`` (see :mod:`stream.ingest.normalize`). Frame types
(``chorus_ingest_frames_total{type}``): ``#commit``, ``#identity``, ``#account``, ``#sync``,
``#info``, ``error``, ``unknown`` (any other ``t``: skipped), ``invalid``.

Event times: with ``received_us`` (the ingester's receive time) each event's ``time_us`` is
clamped by :func:`stream.ingest.normalize.event_time_us`; ``Decoded.clamped`` counts how many were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import libipld
from atproto_client.models.com.atproto.sync import subscribe_repos as lex
from atproto_client.models.utils import get_or_create
from atproto_subscription import ErrorFrame, Frame, FrameDecodingError

from stream import protocol
from stream.ingest import normalize
from stream.protocol import MAX_FRAME_BYTES, datetime_us as time_us  # noqa: F401 - time_us: re-exported

MAX_RECORD_BYTES = 256 * 1024  # one record block; far above any record of the collections chorus reads
MAX_RECORD_DEPTH = 32  # nesting of maps and lists in one record (app.bsky records use under 10)
# Hard websocket limit: frames between MAX_FRAME_BYTES and this are received, counted and skipped.
# Larger ones make the websocket library drop the connection (and the relay resend it forever).
WS_MAX_BYTES = 64 * 1024 * 1024

_SDK_MODELS = {"#identity": lex.Identity, "#account": lex.Account, "#sync": lex.Sync, "#info": lex.Info}
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
    clamped: int = 0  # events whose claimed time was later than receive time + tolerance
    identity: tuple[str, str | None] | None = None  # #identity: (DID, handle or None) -> chorus.identities


def _seq(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("seq")
    return value


def decode_frame(raw: bytes | str, received_us: int | None = None) -> Decoded:
    """Decode one websocket message. Never raises: bad input comes back with ``invalid`` reasons.

    ``received_us``: when the ingester received it (us since the epoch); given, event times are
    clamped to it plus the tolerance (see the module docstring)."""
    return clamp_times(_decode(raw), received_us)


def clamp_times(d: Decoded, received_us: int | None) -> Decoded:
    """Clamp ``d``'s event times to ``received_us`` + tolerance (:func:`normalize.event_time_us`)."""
    if received_us is not None and d.time_us is not None and d.events:
        t, clamped = normalize.event_time_us(d.time_us, received_us)
        if clamped:
            for ev in d.events:
                ev["time_us"] = t
            d.clamped = len(d.events)
    return d


def _decode(raw: bytes | str) -> Decoded:
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
    if not protocol.is_did(msg.did):
        out.invalid.append("invalid_did")
    elif t == "#account":
        try:
            out.events.append(normalize.account_event(msg.did, seq, tus, bool(msg.active), msg.status))
        except normalize.InvalidOp as exc:
            out.invalid.append(exc.reason)
    elif t == "#identity":
        handle = getattr(msg, "handle", None)
        out.identity = (msg.did, handle.lower() if protocol.is_handle(handle) else None)
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
    if not protocol.is_did(did):
        out.invalid.append("invalid_did")
        return out
    if not isinstance(ops, list):
        out.invalid.append("frame_shape")
        return out
    car: _Car | None = None
    # the commit's repo revision, carried by follow events for the graph's rev ordering
    rev = body.get("rev")
    rev = rev if protocol.is_tid(rev) else None
    for op in ops:
        try:
            if not isinstance(op, dict):
                raise normalize.InvalidOp("op_shape")
            collection, rkey = normalize.split_path(op.get("path"))
            kind = normalize.KINDS.get(collection)
            if kind is None:
                continue
            action = op.get("action")
            extra = {"rev": rev} if rev is not None and collection == normalize.FOLLOW else {}
            if action == "delete":
                out.events.append(normalize.event("delete", did, collection, rkey, seq, tus, collection=collection,
                                           **extra))
            elif action == "create":
                if car is None:
                    car = _Car(body.get("blocks"))
                record = car.record(op.get("cid"))
                out.events.append(normalize.event(kind, did, collection, rkey, seq, tus,
                                           **normalize.record_fields(collection, record), **extra))
        except normalize.InvalidOp as exc:
            out.invalid.append(exc.reason)
    return out


def _uvarint(buf: bytes, i: int) -> tuple[int, int]:
    """(value, next index) of the unsigned LEB128 varint at ``buf[i]``; IndexError/ValueError if bad."""
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 9 bytes")


def car_sections(raw: bytes) -> tuple[dict[bytes, tuple[int, int]], bool]:
    """Split a CAR v1 file: ({raw CID: (start, end) of its block in ``raw``}, whether it read to the end).

    The header must be a DAG-CBOR map with ``version: 1`` (roots are not needed: a CAR whose root
    block is missing still yields its other blocks); raises ValueError otherwise. A section whose
    framing is broken ends the split (``complete`` False); the blocks before it are kept. CIDs are
    CIDv1 (version, codec, multihash code, digest length, digest: https://github.com/multiformats/cid)
    or CIDv0 (a bare 34-byte sha2-256 multihash). Block bytes are not decoded or hash-checked here.
    """
    try:
        n, i = _uvarint(raw, 0)
        header = libipld.decode_dag_cbor(raw[i:i + n])
    except (IndexError, ValueError, RecursionError) as exc:
        raise ValueError(f"unreadable CAR header: {exc}") from None
    if not isinstance(header, dict) or header.get("version") != 1 or i + n > len(raw):
        raise ValueError("not a CAR v1 header")
    i += n
    out: dict[bytes, tuple[int, int]] = {}
    end_all = len(raw)
    try:
        while i < end_all:
            size, i = _uvarint(raw, i)
            end = i + size
            if size == 0 or end > end_all:
                return out, False
            if raw[i] == 0x12 and raw[i + 1] == 0x20:  # CIDv0
                j = i + 34
            else:
                j = i
                for _ in range(3):  # version, codec, multihash code
                    _, j = _uvarint(raw, j)
                digest_len, j = _uvarint(raw, j)
                j += digest_len
            if j > end:
                return out, False
            out[raw[i:j]] = (j, end)
            i = end
    except (IndexError, ValueError):
        return out, False
    return out, True


class _Car:
    """The blocks of one commit, decoded on demand (each op's record fails or succeeds alone)."""

    __slots__ = ("raw", "index", "complete", "error")

    def __init__(self, raw: Any):
        self.raw = raw
        self.index: dict[bytes, tuple[int, int]] = {}
        self.complete = False
        self.error = not isinstance(raw, bytes)
        if not self.error:
            try:
                self.index, self.complete = car_sections(raw)
            except ValueError:
                self.error = True

    def record(self, cid: Any) -> Any:
        """The decoded block ``cid`` names; raises InvalidOp with the reason it cannot be had."""
        if self.error:
            raise normalize.InvalidOp("car")
        span = self.index.get(cid) if isinstance(cid, bytes) else None
        if span is None:
            raise normalize.InvalidOp("missing_block" if self.complete else "car")
        start, end = span
        if end - start > MAX_RECORD_BYTES:
            raise normalize.InvalidOp("record_too_large")
        try:
            record = libipld.decode_dag_cbor(self.raw[start:end])
        except RecursionError:
            raise normalize.InvalidOp("record_depth") from None
        except ValueError as exc:
            raise normalize.InvalidOp("record_utf8" if "UnicodeDecodeError" in str(exc) else "record_cbor") from None
        if too_deep(record, MAX_RECORD_DEPTH):
            raise normalize.InvalidOp("record_depth")
        return record


def too_deep(obj: Any, limit: int) -> bool:
    """Whether maps/lists nest more than ``limit`` levels (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            children = o.values()
        elif isinstance(o, list):
            children = o
        else:
            continue
        if d > limit:
            return True
        for c in children:
            if isinstance(c, (dict, list)):
                stack.append((c, d + 1))
    return False

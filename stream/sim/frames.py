"""Encode real ``com.atproto.sync.subscribeRepos`` frames (DAG-CBOR header + body, CAR v1 blocks).

A frame on the wire is two concatenated DAG-CBOR values: a header ``{op: 1, t: "#commit"}``
(``op: -1`` with no ``t`` for error frames) and a body. ``#commit`` bodies carry ``blocks``, a CAR
v1 file whose first root is the commit block's CID and which holds the commit block and one block
per created/updated record, keyed by CID (CIDv1, dag-cbor codec 0x71, sha2-256). Deleted records
have no block and a null ``cid``. DAG-CBOR encoding is libipld's (canonical key order); the
unmodified atproto SDK (``parse_subscribe_repos_message``, ``CAR.from_bytes``) decodes every frame
built here (tests/stream/test_frames.py).

Note: libipld encodes any ``bytes`` value that parses as a CID as a CID link (tag 42), so raw
CIDs are passed as bytes wherever the lexicon wants a link, and the fake commit signature starts
with a byte that is not a CID version.

Malformed inputs for the ingester's bad-input tests: :func:`bad_frames` (documented there).
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from functools import lru_cache
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import libipld

from stream.protocol import FOLLOW, LIKE, MAX_FRAME_BYTES, POST, REPOST  # noqa: F401 - re-exported
from stream.protocol import datetime_us as parse_iso_time_us  # noqa: F401 - re-exported

_S32 = "234567abcdefghijklmnopqrstuvwxyz"  # base32-sortable alphabet of TIDs
_TO_S32 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _S32)
_CID_PREFIX = bytes([0x01, 0x71, 0x12, 0x20])  # CIDv1, dag-cbor, sha2-256, 32-byte digest


# --- primitives ---------------------------------------------------------------------------------

def tid(time_us: int, clock_id: int = 0) -> str:
    """A TID (13 chars, base32-sortable): 53-bit microsecond timestamp << 10 | 10-bit clock id."""
    v = ((int(time_us) & ((1 << 53) - 1)) << 10) | (int(clock_id) & 0x3FF)
    # 13 chars x 5 bits = 65 bits; RFC 4648 base32 of v << 15 (80 bits), alphabet mapped to s32
    return base64.b32encode((v << 15).to_bytes(10, "big"))[:13].decode().translate(_TO_S32)


def tid_time_us(value: str) -> int:
    """Inverse of :func:`tid` for the timestamp part."""
    v = 0
    for ch in value:
        v = (v << 5) | _S32.index(ch)
    return v >> 10


def cid_of(block: bytes) -> bytes:
    """Raw CIDv1 bytes (dag-cbor, sha2-256) of an encoded DAG-CBOR block."""
    return _CID_PREFIX + hashlib.sha256(block).digest()


def cid_str(raw_cid: bytes) -> str:
    """Multibase (base32 ``b...``) string form of a raw CID, as used in strong refs."""
    return libipld.encode_cid(raw_cid)


def iso_time(time_us: int) -> str:
    """RFC 3339 UTC timestamp with microseconds, e.g. ``2025-01-01T00:00:00.000001Z``."""
    return f"{_iso_second(time_us // 1_000_000)}.{time_us % 1_000_000:06d}Z"


@lru_cache(maxsize=4096)
def _iso_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def now_us() -> int:
    return time.time_ns() // 1000


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_car(roots: list[bytes], blocks: list[tuple[bytes, bytes]]) -> bytes:
    """CAR v1: varint-prefixed header ``{roots, version: 1}`` then varint-prefixed ``cid || data``."""
    header = libipld.encode_dag_cbor({"version": 1, "roots": list(roots)})
    parts = [_varint(len(header)), header]
    for cid, data in blocks:
        parts.append(_varint(len(cid) + len(data)))
        parts.append(cid)
        parts.append(data)
    return b"".join(parts)


def _frame(t: str, body: dict) -> bytes:
    return libipld.encode_dag_cbor({"op": 1, "t": t}) + libipld.encode_dag_cbor(body)


def split_frame(data: bytes) -> tuple[dict, dict]:
    """(header, body) of a frame; raises ValueError on anything but two DAG-CBOR maps."""
    try:
        parts = libipld.decode_dag_cbor_multi(data)
    except Exception as exc:  # libipld raises its own error types
        raise ValueError(f"undecodable frame: {exc}") from None
    if len(parts) != 2 or not isinstance(parts[0], dict) or not isinstance(parts[1], dict):
        raise ValueError(f"frame must be two DAG-CBOR maps, got {len(parts)} part(s)")
    return parts[0], parts[1]


def frame_seq(data: bytes) -> int | None:
    """The body's ``seq`` (None for #info and error frames); raises ValueError if undecodable."""
    _, body = split_frame(data)
    seq = body.get("seq")
    return seq if isinstance(seq, int) else None


# --- records (app.bsky lexicons) ---------------------------------------------------------------

def strong_ref(uri: str, cid: str) -> dict:
    """com.atproto.repo.strongRef: ``{uri, cid}`` with the CID as a string."""
    return {"uri": uri, "cid": cid}


def post_record(text: str, created_us: int, langs: list[str] | None = None,
                reply: tuple[dict, dict] | None = None, quote: dict | None = None) -> dict:
    """app.bsky.feed.post; ``reply`` = (root ref, parent ref); ``quote`` = strong ref (embed.record)."""
    rec: dict[str, Any] = {"$type": POST, "text": text, "createdAt": iso_time(created_us)}
    if langs:
        rec["langs"] = list(langs)
    if reply is not None:
        rec["reply"] = {"root": reply[0], "parent": reply[1]}
    if quote is not None:
        rec["embed"] = {"$type": "app.bsky.embed.record", "record": quote}
    return rec


def like_record(subject: dict, created_us: int) -> dict:
    return {"$type": LIKE, "subject": subject, "createdAt": iso_time(created_us)}


def repost_record(subject: dict, created_us: int) -> dict:
    return {"$type": REPOST, "subject": subject, "createdAt": iso_time(created_us)}


def follow_record(subject_did: str, created_us: int) -> dict:
    return {"$type": FOLLOW, "subject": subject_did, "createdAt": iso_time(created_us)}


def encode_record(record: dict) -> tuple[bytes, bytes]:
    """(raw CID, DAG-CBOR bytes) of a record."""
    data = libipld.encode_dag_cbor(record)
    return cid_of(data), data


# --- frames --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    """One repo op. ``record`` is None for deletes, a dict (encoded here) or the block's bytes as
    they go into the CAR (for bad-input tests); ``prev`` optionally the previous record CID."""

    action: str  # create / update / delete
    collection: str
    rkey: str
    record: dict | bytes | None = None
    prev: bytes | None = None

    @property
    def path(self) -> str:
        return f"{self.collection}/{self.rkey}"


def _commit_block(did: str, rev: str, data: bytes | None = None) -> tuple[bytes, bytes]:
    """A repo v3 commit object. ``data`` is the MST root's CID (a stand-in when None); ``sig`` is a
    stand-in: nothing verifies it."""
    digest = hashlib.sha256(f"{did}/{rev}".encode()).digest()
    block = libipld.encode_dag_cbor({
        "did": did, "version": 3, "data": data or _CID_PREFIX + digest, "rev": rev, "prev": None,
        "sig": b"\x30" + digest + digest[:31],  # 64 bytes, never parsed as a CID
    })
    return cid_of(block), block


def commit_frame(seq: int, did: str, ops: list[Op], time_us: int, since: str | None = None,
                 rev: str | None = None, omit_blocks_for: frozenset[str] = frozenset()) -> bytes:
    """A ``#commit`` frame. ``rev`` defaults to ``tid(time_us)``; ``omit_blocks_for`` (paths) leaves
    those ops' record blocks out of the CAR (for bad-input tests)."""
    rev = rev or tid(time_us, seq & 0x3FF)
    commit_cid, commit_block = _commit_block(did, rev)
    blocks = [(commit_cid, commit_block)]
    wire_ops = []
    for op in ops:
        cid = None
        if op.record is not None:
            cid, data = (cid_of(op.record), op.record) if isinstance(op.record, bytes) else encode_record(op.record)
            if op.path not in omit_blocks_for:
                blocks.append((cid, data))
        wop: dict[str, Any] = {"action": op.action, "path": op.path, "cid": cid}
        if op.prev is not None:
            wop["prev"] = op.prev
        wire_ops.append(wop)
    body = {
        "seq": int(seq), "rebase": False, "tooBig": False, "repo": did, "commit": commit_cid,
        "rev": rev, "since": since, "blocks": encode_car([commit_cid], blocks), "ops": wire_ops,
        "blobs": [], "time": iso_time(time_us),
    }
    return _frame("#commit", body)


def identity_frame(seq: int, did: str, handle: str | None = None, time_us: int | None = None) -> bytes:
    body: dict[str, Any] = {"seq": int(seq), "did": did, "time": iso_time(now_us() if time_us is None else time_us)}
    if handle is not None:
        body["handle"] = handle
    return _frame("#identity", body)


def account_frame(seq: int, did: str, active: bool, status: str | None = None,
                  time_us: int | None = None) -> bytes:
    """``#account``: ``active=False`` with status deactivated/deleted/takendown/suspended/..."""
    body: dict[str, Any] = {"seq": int(seq), "did": did, "active": bool(active),
                            "time": iso_time(now_us() if time_us is None else time_us)}
    if status is not None:
        body["status"] = status
    return _frame("#account", body)


def sync_frame(seq: int, did: str, time_us: int | None = None, rev: str | None = None) -> bytes:
    """``#sync``: a CAR holding just the commit block (the repo's new state, contents not shown)."""
    t_us = now_us() if time_us is None else time_us
    rev = rev or tid(t_us, seq & 0x3FF)
    cid, block = _commit_block(did, rev)
    return _frame("#sync", {"seq": int(seq), "did": did, "rev": rev, "time": iso_time(t_us),
                            "blocks": encode_car([cid], [(cid, block)])})


def info_frame(name: str, message: str | None = None) -> bytes:
    """``#info`` (no seq), e.g. name ``OutdatedCursor``."""
    body: dict[str, Any] = {"name": name}
    if message is not None:
        body["message"] = message
    return _frame("#info", body)


def error_frame(error: str, message: str | None = None) -> bytes:
    """Error frame ``{op: -1}`` ``{error, message}``, e.g. ``FutureCursor``, ``ConsumerTooSlow``."""
    body: dict[str, Any] = {"error": error}
    if message is not None:
        body["message"] = message
    return libipld.encode_dag_cbor({"op": -1}) + libipld.encode_dag_cbor(body)


# --- repositories (com.atproto.sync.getRepo) ----------------------------------------------------

def mst_layer(key: bytes) -> int:
    """MST layer of a key: leading zero bits of SHA-256(key), in 2-bit steps (fanout 4; atproto
    repository spec, "Merkle Search Tree")."""
    zeros = 0
    for byte in hashlib.sha256(key).digest():
        if byte == 0:
            zeros += 8
            continue
        zeros += 8 - byte.bit_length()
        break
    return zeros // 2


def _mst_node(keys: list[tuple[bytes, bytes, int]], layer: int, out: list[tuple[bytes, bytes]]) -> bytes | None:
    """Encode the subtree of sorted ``(key, value CID, layer)`` at ``layer``; appends blocks to
    ``out`` and returns the node's CID (None for an empty range)."""
    if not keys:
        return None
    if layer < 0:  # unreachable for well-formed layers; guards against a bad caller
        raise ValueError("MST keys below layer 0")
    entries, gap, left, prev = [], [], None, b""
    pending: dict | None = None
    for key, cid, key_layer in keys:
        if key_layer < layer:
            gap.append((key, cid, key_layer))
            continue
        sub = _mst_node(gap, layer - 1, out)
        gap = []
        if pending is None:
            left = sub
        else:
            pending["t"] = sub
        p = len(os.path.commonprefix((prev, key)))
        pending = {"p": p, "k": key[p:], "v": cid, "t": None}
        entries.append(pending)
        prev = key
    sub = _mst_node(gap, layer - 1, out)
    if pending is None:
        left = sub
    else:
        pending["t"] = sub
    block = libipld.encode_dag_cbor({"l": left, "e": entries})
    cid = cid_of(block)
    out.append((cid, block))
    return cid


def repo_car(did: str, rev: str, records: list[tuple[str, dict]]) -> bytes:
    """A whole repository as ``com.atproto.sync.getRepo`` returns it: a CAR v1 whose root is the
    signed commit (stand-in signature), holding the commit, every MST node and every record block.

    ``records``: ``(path "collection/rkey", record)`` pairs with distinct paths. The MST follows the
    atproto repository spec (keys sorted bytewise, layer from :func:`mst_layer`, prefix-compressed
    entries ``{p, k, v, t}`` with a left pointer ``l``; the root sits at the highest key layer).
    """
    blocks: list[tuple[bytes, bytes]] = []
    keys = []
    for path, record in records:
        cid, data = encode_record(record)
        blocks.append((cid, data))
        key = path.encode()
        keys.append((key, cid, mst_layer(key)))
    keys.sort()
    nodes: list[tuple[bytes, bytes]] = []
    if keys:
        root = _mst_node(keys, max(k[2] for k in keys), nodes)
    else:  # an empty repository is one node with no entries
        empty = libipld.encode_dag_cbor({"l": None, "e": []})
        root = cid_of(empty)
        nodes.append((root, empty))
    commit_cid, commit = _commit_block(did, rev, root)
    return encode_car([commit_cid], [(commit_cid, commit), *nodes, *blocks])


# --- malformed inputs ------------------------------------------------------------------------------

_BAD_DID = "did:plc:bad0input0frames000000"  # syntactically valid DID used by the bad frames


def bad_frames(seq: int = 1, time_us: int = 1_735_689_600_000_000) -> dict[str, bytes]:
    """Malformed frames for the ingester's bad-input tests, keyed by what is wrong with them.

    - ``malformed_cbor``: bytes that are not DAG-CBOR.
    - ``truncated``: a valid #commit frame cut in half.
    - ``header_only``: a header with no body.
    - ``unknown_type``: a well-formed frame of type ``#bogus`` (to be counted and skipped).
    - ``car_missing_block``: a #commit whose CAR lacks the created post's block.
    - ``bad_car``: a #commit whose ``blocks`` is not a CAR file.
    - ``wrong_record_type``: a post path whose record is a like (``$type`` mismatch).
    - ``wrong_record_shape``: a post record without ``text`` and with a numeric ``createdAt``.
    - ``invalid_did``: a #commit whose ``repo`` is ``not-a-did``.
    - ``oversize``: a well-formed #commit over 5 MB (the frame size limit).
    - ``utf8_text``: a post whose ``text`` holds bytes that are not UTF-8.
    - ``deep_record``: a post with a field nested 100,000 lists deep.
    - ``large_record``: a post block of 300 KB (a well-formed frame under 5 MB).
    - ``cbor_record``: a post whose block is not DAG-CBOR.
    - ``bad_subject_uri``: a like whose subject URI has the record key ``%zz``.
    - ``handle_subject``: a like whose subject URI names a handle, not a DID.
    Each commit uses ``seq`` and the same author; none of them is a valid event.
    """
    did = _BAD_DID
    post = post_record("bad input", time_us)
    good = commit_frame(seq, did, [Op("create", POST, tid(time_us, 1), post)], time_us)
    rkey = tid(time_us, 2)
    like_as_post = like_record(strong_ref(f"at://{did}/{POST}/{rkey}", cid_str(encode_record(post)[0])), time_us)
    big = post_record("x" * (MAX_FRAME_BYTES + 1024), time_us)
    bad_car_body = split_frame(good)[1] | {"blocks": b"\x05not a car file"}
    marked = libipld.encode_dag_cbor(post_record("zz~~", time_us) | {"x": 0})
    utf8 = marked.replace(b"\x64zz~~", b"\x64zz\xff\xfe")
    deep = marked.replace(b"\x61x\x00", b"\x61x" + b"\x81" * 100_000 + b"\x00")

    def one(record: dict | bytes, collection: str = POST) -> bytes:
        return commit_frame(seq, did, [Op("create", collection, rkey, record)], time_us)

    return {
        "malformed_cbor": b"\xff\x00\x13garbage",
        "truncated": good[: len(good) // 2],
        "header_only": libipld.encode_dag_cbor({"op": 1, "t": "#commit"}),
        "unknown_type": _frame("#bogus", {"seq": int(seq), "time": iso_time(time_us)}),
        "car_missing_block": commit_frame(seq, did, [Op("create", POST, rkey, post)], time_us,
                                          omit_blocks_for=frozenset({f"{POST}/{rkey}"})),
        "bad_car": _frame("#commit", bad_car_body),
        "wrong_record_type": commit_frame(seq, did, [Op("create", POST, rkey, like_as_post)], time_us),
        "wrong_record_shape": commit_frame(seq, did, [Op("create", POST, rkey, {"$type": POST, "createdAt": 12})], time_us),
        "invalid_did": commit_frame(seq, "not-a-did", [Op("create", POST, rkey, post)], time_us),
        "oversize": commit_frame(seq, did, [Op("create", POST, rkey, big)], time_us),
        "utf8_text": one(utf8),
        "deep_record": one(deep),
        "large_record": one(post_record("large", time_us) | {"x": "y" * 300_000}),
        "cbor_record": one(b"\xff\x00 not cbor"),
        "bad_subject_uri": one(like_record(strong_ref(f"at://{did}/{POST}/%zz", "c"), time_us), LIKE),
        "handle_subject": one(like_record(strong_ref(f"at://alice.bsky.social/{POST}/{rkey}", "c"), time_us), LIKE),
    }

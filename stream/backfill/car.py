"""Read the follow records of one repository from its ``com.atproto.sync.getRepo`` CAR file.

The CAR is decoded by libipld (the atproto SDK's codec); what this module adds is the walk of the
repository's Merkle Search Tree (atproto repository spec): the CAR's first root is the signed
commit ``{did, version: 3, data, rev, prev, sig}``; ``data`` is the MST root; a node is
``{l, e: [{p, k, v, t}]}`` where entry keys are prefix-compressed (``key = previous key[:p] + k``),
``v`` is the record's CID, ``l`` the subtree of keys before the first entry and ``t`` the subtree of
keys between an entry and the next. Keys are ``collection/rkey``, sorted bytewise, so the walk
descends only into subtrees whose key range can hold ``app.bsky.graph.follow/...``.

Nothing here trusts the input: every block is checked for shape, the walk is bounded (depth,
nodes visited), and a record that is not a follow with a valid subject DID is counted and skipped.
Failures of the whole repository raise :class:`RepoError` with a ``reason`` (the metric label).
The commit's signature is not verified (chorus reads the graph, it does not mirror repositories).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import libipld

from stream.protocol import FOLLOW, is_did, is_tid

PREFIX = (FOLLOW + "/").encode()
PREFIX_END = (FOLLOW + "0").encode()  # "/" + 1: the first key after every follow key


_RKEY = re.compile(r"[A-Za-z0-9._:~-]{1,512}")


class RepoError(ValueError):
    """A repository that cannot be read; ``reason`` is the ``chorus_backfill_repos_total`` status."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class RepoFollows:
    """The follow records of one repository at revision ``rev`` (a TID).

    ``follows``: ``(rkey, subject DID)`` in key order; ``skipped``: follow-collection entries whose
    record was missing or malformed (each skipped, the rest kept).
    """

    did: str
    rev: str
    follows: list[tuple[str, str]] = field(default_factory=list)
    skipped: int = 0


def decode(data: bytes) -> tuple[dict, dict[bytes, object]]:
    """(header, blocks by raw CID) of a CAR file; raises RepoError ``bad_car`` / ``bad_block``."""
    try:
        return libipld.decode_car(data)
    except (ValueError, TypeError, RecursionError) as exc:
        msg = str(exc)
        truncated = "end of data" in msg or "header" in msg.lower()
        raise RepoError("bad_car" if truncated else "bad_block", f"undecodable CAR: {msg}") from None


def read_follows(data: bytes, did: str) -> RepoFollows:
    """The follow records of the repository ``did`` in a getRepo CAR file.

    Raises :class:`RepoError`: ``bad_car`` (not a CAR, truncated, no root), ``bad_block`` (a block
    that does not decode), ``bad_commit`` (the root is not a v3 commit of ``did`` with a TID rev),
    ``bad_mst`` (a missing or malformed tree node, keys out of order, too deep).
    """
    header, blocks = decode(data)
    roots = header.get("roots") if isinstance(header, dict) else None
    if not isinstance(roots, list) or not roots or not isinstance(roots[0], bytes):
        raise RepoError("bad_car", "CAR without a root")
    commit = blocks.get(roots[0])
    if not isinstance(commit, dict):
        raise RepoError("bad_commit", "the root block is missing or not a map")
    rev, data_cid = commit.get("rev"), commit.get("data")
    if commit.get("did") != did:
        raise RepoError("bad_commit", f"commit is for {str(commit.get('did'))[:80]!r}, not {did}")
    if commit.get("version") != 3 or not isinstance(rev, str) or not is_tid(rev) \
            or not isinstance(data_cid, bytes):
        raise RepoError("bad_commit", "the root is not a version 3 commit with a TID rev and an MST root")
    out = RepoFollows(did, rev)
    _walk(blocks, data_cid, out)
    return out


def _walk(blocks: dict, root: bytes, out: RepoFollows) -> None:
    """Walk the MST under ``root``, descending only into subtrees whose key range can hold follow
    keys; each node is visited at most once (a cycle or a shared subtree cannot loop)."""
    # (node CID, lower key bound, upper key bound) of subtrees still to visit
    stack: list[tuple[bytes, bytes, bytes]] = [(root, b"", b"\xff" * 8)]
    seen: set[bytes] = set()
    found: list[tuple[bytes, object]] = []
    lo_stop, hi_stop = PREFIX, PREFIX_END
    while stack:
        cid, lo, hi = stack.pop()
        if cid in seen:
            raise RepoError("bad_mst", "an MST node is reached twice (a cycle?)")
        seen.add(cid)
        node = blocks.get(cid)
        entries = node.get("e") if isinstance(node, dict) else None
        if not isinstance(entries, list):
            raise RepoError("bad_mst", "missing or malformed MST node")
        sub = node.get("l")
        key = b""
        prev_bound = lo
        for e in entries:
            try:
                key = key[:e["p"]] + e["k"]
                value, right = e["v"], e["t"]
            except (TypeError, KeyError):
                raise RepoError("bad_mst", "malformed MST entry") from None
            if sub is not None and key > lo_stop and prev_bound < hi_stop:
                stack.append((sub, prev_bound, key))
            if lo_stop <= key < hi_stop:
                found.append((key, value))
            sub, prev_bound = right, key
        if sub is not None and hi > lo_stop and prev_bound < hi_stop:
            stack.append((sub, prev_bound, hi))
    if len(seen) > len(blocks):
        raise RepoError("bad_mst", "more MST nodes than blocks")
    found.sort(key=lambda kv: kv[0])
    n = len(PREFIX)
    append = out.follows.append
    for key, value in found:
        record = blocks.get(value) if isinstance(value, bytes) else None
        subject = record.get("subject") if isinstance(record, dict) else None
        rkey = key[n:].decode("ascii", "replace")
        if record.get("$type") != FOLLOW if isinstance(record, dict) else True:
            out.skipped += 1
        elif not is_did(subject) or not _RKEY.fullmatch(rkey):
            out.skipped += 1
        else:
            append((rkey, subject))

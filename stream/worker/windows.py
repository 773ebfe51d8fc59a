"""Rolling per-user, per-topic features over an event-time sliding window (pure state, no I/O).

Time is event time: ``Event.time_us``, never the wall clock. With hop h and window w = n*h
(seconds), an event belongs to bucket ``b = time_us // (h * 1e6)``; hop boundaries are multiples
of h. The store's clock ``cur`` is the largest bucket seen; the window is buckets cur-n+1 .. cur,
i.e. event times [(cur-n+1)*h, (cur+1)*h), and ``window_end = (cur+1)*h`` (unix seconds). Events
older than the window are dropped as late.

Per user and topic the feature vector is ``[posts, engagement, stance_sum, reposts]``:
  posts       the user's posts in the topic,
  engagement  likes, reposts, replies and quotes of the user's topic posts (a post's topics come
              from the post -> topic table, which holds posts of the current window only),
  stance_sum  sum of the VADER compound scores of the user's posts in the topic,
  reposts     the user's reposts of topic posts (credited in the reposted post's topics).
Each contribution lands in the bucket of the event that made it.

Memory layout (about 80 bytes per held event, BENCHMARKS.md; independent of n and h):
  - account DIDs are interned to int ids (:class:`stream.worker.table.Interner`: one byte arena
    and a hash table; ids no longer referenced are recycled);
  - record URIs are kept as 63-bit BLAKE2b keys (:func:`stream.worker.table.key_of`) in compact
    int64 hash tables (:class:`stream.worker.table.HashTable`): the author's record registry
    (``records``: kind, bucket, subject), the owner's topic posts (``posts``), the engagement it
    was credited (``credits``) and its reposts of topic posts (``made``). Entries expire lazily:
    an entry whose bucket left the window reads as absent and is dropped when its table fills;
  - contributions are appended to per-bucket columnar arrays (id, topic mask, packed deltas)
    and summed into a dense (ids, topics, 4) totals array; when a bucket leaves the window its
    columns are subtracted in one vectorized pass. So the cost per event is O(topics of the post),
    independent of n, and per held event a few table slots plus 12 bytes.
Follow records are not kept: a follow passes through as a graph edge (``chorus.graph``), its
deletion as a removal by record URI; follower counts live with the graph (the operator).

Two stages make the state partitionable by DID (see stream/worker/faust_app.py):
  ``ingest(event)``  runs where the *author* lives: dedupe by record URI (a registry of the
                     author's records in the window), resolves deletes to what the record
                     created, classifies posts, and returns ops for owners and graph edges;
  ``apply(op)``      runs where the op's *owner* (``op[1]``) lives: updates features and the post
                     table; it may return follow-up ops (repost -> reposter).
``process(event)`` runs both stages locally (one process owning every DID).

Every op is idempotent (keyed by record URI), so a replay of the input may re-send ops safely.
Deletes retract what the deleted record created: a post's own posts/stance and the engagement it
gave as a reply/quote (engagement *received* from other people's records stays, but the post
leaves the post table so later engagement credits nothing); a like/repost its engagement credit
(and the reposter's repost credit); a follow its edge (downstream). An ``account`` event with
``active=False`` retracts every record of the account in the registry, clears its state and
removes the edges it follows with (a ``purge`` edge op). Engagement for a post not (yet) in the
table waits ``grace_hops`` hops (cross-partition reordering), then is dropped; so does engagement
of a post outside every topic. The other way round, a post that left the window stays findable
for ``grace_hops`` more hops: engagement that arrives after the clock expired the post, but whose
own bucket b still held it (post bucket > b - n), is credited as it would have been in time order.
Engagement is credited only to the owner of the post it names (a subject DID that does not own
the subject URI credits nothing).

Emission: ``advance(time_us)`` closes the hop ``cur`` when the clock enters a later bucket and
returns at most one record per changed user (changed since its last record; topics in name order), or an expiry record
(``expired=True``, no topics) for a user that left the window. ``flush()`` closes the current hop
early (idle input); a hop is closed once: later changes go out with the next hop, or, for a
user without a record for the closed hop yet, at the next ``flush()`` (still idle input).

Checkpoints: :meth:`WindowStore.to_arrays` / :meth:`WindowStore.from_arrays` (the whole state as
named numpy arrays, format :data:`STATE_FORMAT`); see stream/worker/checkpoint.py. Every registry
entry keeps the chorus.events partition its event came from, so a checkpoint of some partitions
splits: :meth:`WindowStore.retain` keeps the state of a subset of them (a rebalance that gives a
worker fewer partitions restores from a checkpoint that covers more).
"""

from __future__ import annotations

import json
from array import array
from collections import deque
from hashlib import blake2b
from typing import Any, Callable

import numba
import numpy as np

from stream.worker.lexicon import STANCE_SCALE
from stream.worker.table import HashTable, Interner, key_of

Op = tuple  # (code, owner DID, time_us, ...): see apply()
POSTS, ENG, STANCE, REPOSTS = range(4)
STATE_FORMAT = 3  # version of to_arrays(); 2 had no input partition per record, 1 was the dict-of-objects store

LIKE, REPOST, REPLY, QUOTE = range(4)  # engagement labels (ops carry the code)
LABELS = ("like", "repost", "reply", "quote")
_POST, _LIKE, _REPOST, _X = 1, 2, 3, 4  # record kinds in the registry (_X: deleted, a tombstone)
FOLLOW_PATH = "/app.bsky.graph.follow/"
MAX_TOPICS = 31
_M32 = 0xFFFFFFFF
_B31 = (1 << 31) - 1
_BASE_MARGIN = 1 << 20  # buckets kept below the first bucket seen (relative bucket >= 0)
_STANCE_OFF = 1 << 20
_S_OFF = 1 << 14  # packed stance delta offset in a contribution code
_PART_SHIFT = 34  # a registry entry's aux: author id (bits 0-31), flags (32, 33), input partition + 1 (34-53)
_PART_BITS = (1 << 20) - 1


class BadEvent(ValueError):
    """An event lacks a field its kind needs."""


def meta_owner(meta) -> int:
    """The owner id in a posts/credits/made ``meta`` column value."""
    return int(meta) & _M32


def did_of(uri: str) -> str:
    """The repository DID of an AT-URI ``at://DID/collection/rkey``."""
    if not isinstance(uri, str) or not uri.startswith("at://"):
        raise BadEvent(f"not an AT-URI: {uri!r}")
    return uri[5:].split("/", 1)[0]


# --- numba kernels over the dense totals -------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _add(tot, agents, uid, mask, p, e, s, r):
    """tot[uid, t] += (p, e, s, r) for every topic bit t of mask (``uid``: a totals row); agents[t]
    counts present users (posts, engagement or reposts non-zero)."""
    for t in range(tot.shape[1]):
        if (mask >> t) & 1:
            before = tot[uid, t, 0] != 0 or tot[uid, t, 1] != 0 or tot[uid, t, 3] != 0
            tot[uid, t, 0] += p
            tot[uid, t, 1] += e
            tot[uid, t, 2] += s
            tot[uid, t, 3] += r
            after = tot[uid, t, 0] != 0 or tot[uid, t, 1] != 0 or tot[uid, t, 3] != 0
            if before != after:
                agents[t] += 1 if after else -1


@numba.njit(cache=True, nogil=True)
def _subtract_rows(tot, agents, row_of, uids, masks, codes):
    """Subtract one bucket's contribution columns (rows with uid < 0 were purged); ``row_of``
    maps an id to its totals row."""
    for k in range(uids.shape[0]):
        uid = uids[k]
        if uid < 0:
            continue
        c = codes[k]
        p = (c & 3) - 1
        e = ((c >> 2) & 3) - 1
        r = ((c >> 4) & 3) - 1
        s = (c >> 6) - 16384
        _add(tot, agents, row_of[uid], masks[k], -p, -e, -s, -r)


class _Rows:
    """One bucket's contributions, columnar: owner id, topic mask, packed (p, e, r, s) deltas."""

    __slots__ = ("uid", "mask", "code")

    def __init__(self) -> None:
        self.uid, self.mask, self.code = array("i"), array("i"), array("i")

    @property
    def nbytes(self) -> int:
        return 12 * len(self.uid)


class WindowStore:
    """The rolling-window feature store. ``classify(text) -> (topics, stance_e4)`` for posts."""

    GC_MIN = 1 << 16  # recycle unreferenced ids once this many more are interned than were live

    def __init__(self, window_s: int, hop_s: int, classify: Callable[[str | None], tuple],
                 grace_hops: int = 2):
        if hop_s <= 0 or window_s <= 0 or window_s % hop_s:
            raise ValueError(f"window ({window_s}s) must be a positive multiple of hop ({hop_s}s)")
        self.window_s, self.hop_s = window_s, hop_s
        self.n = window_s // hop_s
        if self.n >= _BASE_MARGIN:
            raise ValueError(f"a window of {self.n} hops is too long (at most {_BASE_MARGIN - 1})")
        self.hop_us = hop_s * 1_000_000
        self.grace = min(max(grace_hops, 0), self.n)
        self.classify = classify
        self.cur: int | None = None  # clock: newest bucket
        self.closed: int | None = None  # newest hop already emitted
        self._base: int | None = None  # buckets are stored relative to this
        self._dk = Interner()  # DID <-> id
        self._gc_live = 0
        self.ids_recycled = 0
        self._topics: list[str] = []
        self._bit: dict[str, int] = {}
        self._tot = np.zeros((1024, 0, 4), np.int64)  # row -> topic -> [posts, eng, stance_e4, reposts]
        self._row_of = np.full(1024, -1, np.int32)  # id -> its totals row (-1: none yet)
        self._rows_free: list[int] = []
        self._rows_used = 0
        self._agents = np.zeros(MAX_TOPICS, np.int64)
        self._last = np.zeros(1024, np.int64)  # id -> digest of its last record; 0: none/expired
        self.records = HashTable(2, live=self._live_record)  # key -> meta, aux
        self.posts = HashTable(2, live=self._live_post)  # key -> owner|bucket, mask|stance
        self.credits = HashTable(2, live=self._live_owned)  # key -> owner|bucket, mask|label|actor
        self.made = HashTable(2, live=self._live_owned)  # key -> owner|bucket, mask
        self._quote: dict[int, tuple[int, int, int]] = {}  # post key -> (subject id, subject key, credit key)
        # engagement waiting for its post: key -> subject key, owner|label, time_us, actor id + 1
        self.pending = HashTable(4, live=self._live_pending)
        self._pending_s = HashTable(1, live=self._live_pending)  # subject key -> newest bucket waiting
        self._rows: dict[int, _Rows] = {}
        self._held: dict[int, int] = {}  # bucket -> registry entries made in it (held events)
        self.dirty: set[int] = set()
        self._emitted: set[int] = set()  # ids with a record for hop `closed`
        self.stats = {"events": 0, "duplicate": 0, "late": 0, "ops": 0}

    # -- time ------------------------------------------------------------------------------

    def bucket(self, time_us: int) -> int:
        return time_us // self.hop_us

    def window_end(self) -> int | None:
        """End of the current window, unix seconds (None before the first event)."""
        return None if self.cur is None else (self.cur + 1) * self.hop_s

    def _late(self, b: int) -> bool:
        return self.cur is not None and b <= self.cur - self.n

    def _rel(self, b: int) -> int:
        if self._base is None:
            self._base = b - _BASE_MARGIN
        return min(max(b - self._base, 0), _B31)

    def _lo_rel(self) -> int:
        """Relative bucket of the oldest bucket still in the window (entries below are dead)."""
        if self.cur is None or self._base is None:
            return -(1 << 62)
        return self.cur - self.n + 1 - self._base

    def _live_record(self, a: np.ndarray) -> np.ndarray:
        return ((a[:, 1] >> 3) & _B31) >= self._lo_rel()

    def _live_post(self, a: np.ndarray) -> np.ndarray:  # a post stays findable `grace` hops
        return (a[:, 1] >> 32) + self.grace >= self._lo_rel()

    def _live_owned(self, a: np.ndarray) -> np.ndarray:
        return (a[:, 1] >> 32) >= self._lo_rel()

    def advance(self, time_us: int) -> list[dict]:
        """Move the clock to ``time_us``; returns the records of the hop closed by the move."""
        c = time_us // self.hop_us
        if self.cur is None:  # ingest() may have filled the store before the first advance
            self._rel(c)
            self.cur = c
            return []
        if c <= self.cur:
            return []
        out = self._close() if self.closed != self.cur else []
        self._expire(c - self.n)
        self.cur = c
        return out

    def flush(self) -> list[dict]:
        """Close the current hop now (input idle). If it is already closed, emit the users that
        changed since and have no record for it yet (their change would otherwise wait for
        input to move the clock); the others stay dirty for the next hop."""
        if self.cur is None:
            return []
        if self.closed != self.cur:
            return self._close()
        late = self.dirty - self._emitted
        if not late:
            return []
        self.dirty -= late
        keep, self.dirty = self.dirty, late
        out = self._close()
        self.dirty = keep
        return out

    def _expire(self, limit: int) -> None:
        """Subtract every bucket <= limit (they left the window)."""
        for b in sorted(b for b in self._rows if b <= limit):
            rows = self._rows.pop(b)
            if len(rows.uid):
                uids = np.frombuffer(rows.uid, np.int32)
                _subtract_rows(self._tot, self._agents, self._row_of, uids, np.frombuffer(rows.mask, np.int32),
                               np.frombuffer(rows.code, np.int32))
                self.dirty.update(np.unique(uids[uids >= 0]).tolist())
        for b in [b for b in self._held if b <= limit]:
            del self._held[b]

    def _close(self) -> list[dict]:
        """Emit the changed users of hop ``cur`` (window_end = (cur+1)*hop)."""
        if self.closed != self.cur:
            self._emitted = set()
        self._emitted |= self.dirty
        self.closed = self.cur
        end = (self.cur + 1) * self.hop_s
        out = []
        tot, last, did_of_id, names, row_of = self._tot, self._last, self._dk.did, self._topics, self._row_of
        zero = np.zeros((tot.shape[1], 4), np.int64)
        for uid in self.dirty:
            did = did_of_id(uid)
            if did is None:
                continue
            r = row_of[uid]
            row = tot[r] if r >= 0 else zero
            present = np.flatnonzero(row[:, 0] | row[:, 1] | row[:, 3])
            if present.size:
                vals = row[present].tolist()
                digest = int.from_bytes(blake2b(row[present].tobytes() + present.tobytes(),
                                                digest_size=8).digest(), "little") >> 1 or 1
                if last[uid] != digest:
                    last[uid] = digest
                    topics = dict(sorted((names[t], [v[POSTS], v[ENG], v[STANCE] / STANCE_SCALE, v[REPOSTS]])
                                         for t, v in zip(present.tolist(), vals)))
                    out.append({"did": did, "window_end": end, "topics": topics})
            elif last[uid] != 0:
                last[uid] = 0
                out.append({"did": did, "window_end": end, "topics": {}, "expired": True})
        self.dirty.clear()
        if len(self._dk) > 2 * self._gc_live + self.GC_MIN:
            self.gc()
        return out

    # -- ids, topics, contributions ----------------------------------------------------------

    def _id(self, did: str) -> int:
        i = self._dk.id(did)
        if i >= self._last.size:
            self._grow_ids(2 * self._last.size)
        return i

    def _grow_ids(self, cap: int) -> None:
        last = np.zeros(cap, np.int64)
        last[: self._last.size] = self._last
        row_of = np.full(cap, -1, np.int32)
        row_of[: self._row_of.size] = self._row_of
        self._last, self._row_of = last, row_of

    def _trow(self, uid: int) -> int:
        """The totals row of id ``uid``, allocated on its first contribution."""
        r = int(self._row_of[uid])
        if r < 0:
            if self._rows_free:
                r = self._rows_free.pop()
            else:
                r = self._rows_used
                self._rows_used += 1
                if r >= self._tot.shape[0]:
                    tot = np.zeros((2 * self._tot.shape[0], self._tot.shape[1], 4), np.int64)
                    tot[: self._tot.shape[0]] = self._tot
                    self._tot = tot
            self._row_of[uid] = r
        return r

    def _mask(self, topics) -> int:
        m = 0
        for t in topics:
            bit = self._bit.get(t)
            if bit is None:
                if not isinstance(t, str):
                    raise BadEvent(f"topic {t!r} is not a string")
                bit = len(self._topics)
                if bit >= MAX_TOPICS:
                    raise ValueError(f"at most {MAX_TOPICS} topics")
                self._topics.append(t)
                self._bit[t] = bit
                tot = np.zeros((self._tot.shape[0], bit + 1, 4), np.int64)
                tot[:, :bit] = self._tot
                self._tot = tot
            m |= 1 << bit
        return m

    def _names(self, mask: int) -> list[str]:
        return [t for i, t in enumerate(self._topics) if (mask >> i) & 1]

    def _add(self, uid: int, b: int, mask: int, p: int, e: int, s: int, r: int) -> None:
        rows = self._rows.get(b)
        if rows is None:
            rows = self._rows[b] = _Rows()
        rows.uid.append(uid)
        rows.mask.append(mask)
        rows.code.append((p + 1) | (e + 1) << 2 | (r + 1) << 4 | (s + _S_OFF) << 6)
        row = self._trow(uid)  # may grow self._tot
        _add(self._tot, self._agents, row, mask, p, e, s, r)
        self.dirty.add(uid)

    @property
    def agents(self) -> dict[str, int]:
        """topic -> users present in the window (posts, engagement or reposts non-zero)."""
        return {t: int(self._agents[i]) for i, t in enumerate(self._topics)}

    # -- stage 1: the author's side --------------------------------------------------------

    def ingest(self, ev: dict[str, Any], partition: int = -1) -> tuple[list[Op], list[tuple]]:
        """One chorus.events value (a dict) -> (ops for owners, graph edges). ``partition``: the
        chorus.events partition it came from (-1: unknown), kept with its registry entry so that
        the author state splits by partition (:meth:`retain`).

        Edges are ``(op, src, dst, time_us, record uri, rev)``: ``("add", followed, follower, t,
        uri, rev)`` for a follow, ``("remove", None, follower, t, uri, rev)`` for a deleted follow
        record (the record URI identifies the edge), ``("purge", None, did, t, None, None)`` when an
        account is gone; ``rev`` is the commit's repo revision (the graph's order, see
        operators/service/state.py), None when the event has none.
        """
        self.stats["events"] += 1
        try:
            kind, did, uri, t = ev["kind"], ev["did"], ev["uri"], int(ev["time_us"])
        except (KeyError, TypeError, ValueError):
            raise BadEvent("event lacks kind/did/uri/time_us") from None
        if not isinstance(did, str) or not isinstance(uri, str):
            raise BadEvent("did and uri must be strings")
        b = t // self.hop_us
        part = (min(max(partition, -1), _PART_BITS - 1) + 1) << _PART_SHIFT
        if kind == "delete":
            if FOLLOW_PATH in uri:
                return [], [("remove", None, did, t, uri, ev.get("rev"))]
            return self._retract(did, key_of(uri), t, part)
        if kind == "account":
            if ev.get("active") is False:
                return self._retract_account(did, t)
            return [], []
        if kind == "follow":
            s_did = ev.get("subject_did")
            if not s_did or not isinstance(s_did, str):
                raise BadEvent("follow without subject_did")
            return [], [("add", s_did, did, t, uri, ev.get("rev"))]
        if self._late(b):
            self.stats["late"] += 1
            return [], []
        key = key_of(uri)
        i = self.records.slot(key)
        if i >= 0 and ((int(self.records.a[i, 1]) >> 3) & _B31) >= self._lo_rel():
            self.stats["duplicate"] += 1
            return [], []
        if kind == "post":
            topics, stance = self.classify(ev.get("text"))
            reply, quote = ev.get("reply_parent"), ev.get("quote_uri")
            r_did = did_of(reply) if reply else None
            q_did = did_of(quote) if quote and quote != reply else None
            rel = self._rel(b)
            aid = self._id(did)
            meta = _POST | rel << 3 | ((self._id(r_did) + 1) << 34 if r_did else 0)
            r_key = key_of(reply) if r_did else 0
            ops: list[Op] = [("post", did, t, key, list(topics), stance)] if topics else []
            if r_did:
                ops.append(("eng", r_did, t, r_key, key, REPLY, did))
            if q_did:
                q_key, qc_key = key_of(quote), key_of(uri + "#q")
                self._quote[key] = (self._id(q_did), q_key, qc_key)
                ops.append(("eng", q_did, t, q_key, qc_key, QUOTE, did))
            self.records.put(key, (meta, aid | bool(topics) << 32 | bool(q_did) << 33 | part))
        elif kind in ("like", "repost"):
            s_uri = ev.get("subject_uri")
            if not s_uri:
                raise BadEvent(f"{kind} without subject_uri")
            s_did = ev.get("subject_did") or did_of(s_uri)
            if not isinstance(s_did, str) or not isinstance(s_uri, str):
                raise BadEvent(f"{kind} subject must be strings")
            s_key = key_of(s_uri)
            rel = self._rel(b)
            code, label = (_LIKE, LIKE) if kind == "like" else (_REPOST, REPOST)
            self.records.put(key, (code | rel << 3 | (self._id(s_did) + 1) << 34, self._id(did) | part))
            ops = [("eng", s_did, t, s_key, key, label, did)]
        else:
            raise BadEvent(f"unknown event kind {kind!r}")
        self._held[b] = self._held.get(b, 0) + 1
        return ops, []

    def _retract(self, did: str, key: int, t: int, part: int = 0) -> tuple[list[Op], list[tuple]]:
        recs = self.records
        i = recs.slot(key)
        if i < 0:
            return [], []
        meta, aux = recs.a[i, 1:].tolist()
        if ((meta >> 3) & _B31) < self._lo_rel():  # expired
            return [], []
        kind = meta & 7
        if kind == _X:  # already deleted
            self.stats["duplicate"] += 1
            return [], []
        ops: list[Op] = []
        sid = (meta >> 34) - 1
        if kind == _POST:
            if (aux >> 32) & 1:
                ops.append(("unpost", did, t, key))
            if sid >= 0:
                ops.append(("uneng", self._dk.did(sid), t, 0, key))
            q = self._quote.pop(key, None) if (aux >> 33) & 1 else None
            if q is not None:
                ops.append(("uneng", self._dk.did(q[0]), t, q[1], q[2]))
        else:
            ops.append(("uneng", self._dk.did(sid), t, 0, key))
        # Tombstone for one window, so a re-delivered create is not counted again.
        b = t // self.hop_us
        if self.cur is not None:
            b = max(b, self.cur - self.n + 1)
        recs.put(key, (_X | self._rel(b) << 3, aux & _M32 | (part or aux & (_PART_BITS << _PART_SHIFT))))
        self._held[b] = self._held.get(b, 0) + 1
        return ops, []

    def _retract_account(self, did: str, t: int) -> tuple[list[Op], list[tuple]]:
        ops: list[Op] = []
        aid = self._dk.get(did)
        if aid is not None:
            a = self.records.a
            mine = (a[:, 0] != 0) & ((a[:, 2] & _M32) == aid) & self._live_record(a) & ((a[:, 1] & 7) != _X)
            for key in a[mine, 0].tolist():
                ops += self._retract(did, key, t)[0]
        ops.append(("purge", did, t))
        return ops, [("purge", None, did, t, None, None)]

    # -- stage 2: the owner's side ---------------------------------------------------------

    def _owned(self, table: HashTable, key: int, owner: str, live_rel: int) -> int:
        """Slot of ``key`` in ``table`` if owned by ``owner`` with bucket >= live_rel, else -1."""
        i = table.slot(key)
        if i < 0:
            return -1
        meta = int(table.a[i, 1])
        if (meta >> 32) < live_rel or self._dk.get(owner) != meta & _M32:
            return -1
        return i

    def apply(self, op: Op) -> list[Op]:
        """Apply one op at its owner (``op[1]``); returns follow-up ops for other owners.

        Record keys are :func:`stream.worker.table.key_of` of the record URI; labels 0..3 =
        like, repost, reply, quote (:data:`LABELS`).

        ("post", owner, t, key, topics, stance_e4)    a topic post by owner
        ("unpost", owner, t, key)                     its deletion
        ("eng", owner, t, subject_key, key, label, actor)  engagement with owner's post
        ("uneng", owner, t, 0, key)                   its retraction (the key alone identifies it)
        ("made", owner, t, key, topics) / ("unmade", owner, t, key)  owner's repost of a topic post
        ("tick", "", t)                               no-op: carries time to every partition
        ("purge", owner, t)                           owner's account is gone: clear its state
        """
        self.stats["ops"] += 1
        code, owner, t = op[0], op[1], op[2]
        b = t // self.hop_us
        if code == "post":
            if self._late(b):
                return []
            key, topics, stance = op[3], op[4], int(op[5])
            if self._owned(self.posts, key, owner, self._lo_rel()) >= 0:
                return []
            uid = self._id(owner)
            mask = self._mask(topics)
            stance = min(max(stance, -STANCE_SCALE), STANCE_SCALE)
            self.posts.put(key, (uid | self._rel(b) << 32, mask | (stance + _STANCE_OFF) << 32))
            self._add(uid, b, mask, 1, 0, stance, 0)
            out: list[Op] = []
            for k, et, label, actor in self._take_pending(key, uid):
                out += self._credit(uid, mask, k, et, label, actor)
            return out
        if code == "eng":
            s_key, key, label, actor = op[3], op[4], op[5], op[6]
            if self._late(b):
                return []
            lo = self._lo_rel()
            # in the table, or gone (left the window <= grace hops ago) but in this event's window
            i = self._owned(self.posts, s_key, owner, lo - self.grace)
            if i >= 0:
                pb = int(self.posts.a[i, 1]) >> 32
                if pb < lo and pb <= self._rel(b) - self.n:
                    i = -1
            if i < 0:  # wait grace hops for the post (it lives while bucket + grace > cur)
                if self.cur is None or b + self.grace > self.cur:
                    rel = self._rel(b)
                    actor_id = self._id(actor) if label == REPOST else -1
                    self.pending.put(key, (s_key, self._id(owner) | label << 32 | rel << 34, t, actor_id + 1))
                    j = self._pending_s.slot(s_key)
                    if j < 0 or int(self._pending_s.a[j, 1]) < rel:
                        self._pending_s.put(s_key, (rel,))
                return []
            mask = int(self.posts.a[i, 2]) & _M32
            return self._credit(meta_owner(self.posts.a[i, 1]), mask, key, t, label, actor)
        if code == "uneng":
            key = op[4]
            j = self.pending.slot(key)
            if j >= 0:
                self.pending.delete_slot(j)
                return []
            i = self._owned(self.credits, key, owner, self._lo_rel())
            if i < 0:
                return []
            meta, aux = self.credits.a[i, 1:].tolist()
            self.credits.delete_slot(i)
            self._add(meta & _M32, (meta >> 32) + self._base, aux & _M32, 0, -1, 0, 0)
            actor = (aux >> 34) - 1
            return [("unmade", self._dk.did(actor), t, key)] if (aux >> 32) & 3 == REPOST and actor >= 0 else []
        if code == "made":
            key, topics = op[3], op[4]
            if self._late(b):
                return []
            if self._owned(self.made, key, owner, self._lo_rel()) < 0:
                uid = self._id(owner)
                mask = self._mask(topics)
                self.made.put(key, (uid | self._rel(b) << 32, mask))
                self._add(uid, b, mask, 0, 0, 0, 1)
            return []
        if code == "unmade":
            i = self._owned(self.made, op[3], owner, self._lo_rel())
            if i >= 0:
                meta, mask = self.made.a[i, 1:].tolist()
                self.made.delete_slot(i)
                self._add(meta & _M32, (meta >> 32) + self._base, mask, 0, 0, 0, -1)
            return []
        if code == "unpost":
            i = self._owned(self.posts, op[3], owner, self._lo_rel())
            if i >= 0:
                meta, aux = self.posts.a[i, 1:].tolist()
                self.posts.delete_slot(i)
                stance = (aux >> 32) - _STANCE_OFF
                self._add(meta & _M32, (meta >> 32) + self._base, aux & _M32, -1, 0, -stance, 0)
            return []
        if code == "tick":  # time moved elsewhere (advance() already ran)
            return []
        if code == "purge":
            self._purge(owner)
            return []
        raise BadEvent(f"unknown op {code!r}")

    def _live_pending(self, a: np.ndarray) -> np.ndarray:
        rel = (a[:, 2] >> 34) if a.shape[1] == 5 else a[:, 1]
        return rel + self.grace > (self.cur - self._base if self.cur is not None else -(1 << 62))

    def _take_pending(self, s_key: int, uid: int) -> list[tuple]:
        """Remove and return the live engagement waiting for post ``s_key`` of owner ``uid``, as
        (key, time_us, label, actor DID), in time order."""
        j = self._pending_s.slot(s_key)
        if j < 0:
            return []
        self._pending_s.delete_slot(j)
        a = self.pending.a
        hit = (a[:, 0] != 0) & (a[:, 1] == s_key) & self._live_pending(a) & ((a[:, 2] & _M32) == uid)
        rows = a[hit].tolist()
        out = []
        for key, _, meta, t, actor in sorted(rows, key=lambda r: r[3]):
            self.pending.pop(key)
            out.append((key, t, (meta >> 32) & 3, self._dk.did(actor - 1) if actor else ""))
        return out

    def _credit(self, uid: int, mask: int, key: int, t: int, label: int, actor: str) -> list[Op]:
        """Credit one engagement (at its own time) in the subject post's topics."""
        b = t // self.hop_us
        if self._late(b):
            return []
        i = self.credits.slot(key)
        if i >= 0 and (int(self.credits.a[i, 1]) >> 32) >= self._lo_rel():
            return []
        actor_id = self._id(actor) if label == REPOST else -1
        self.credits.put(key, (uid | self._rel(b) << 32, mask | label << 32 | (actor_id + 1) << 34))
        self._add(uid, b, mask, 0, 1, 0, 0)
        return [("made", actor, t, key, self._names(mask))] if label == REPOST else []

    def _purge(self, owner: str) -> None:
        """Clear every contribution and table entry of ``owner`` (its account is gone)."""
        uid = self._dk.get(owner)
        if uid is None:
            return
        row = self._tot[self._trow(uid)]
        for t in np.flatnonzero(row[:, 0] | row[:, 1] | row[:, 3]).tolist():
            self._agents[t] -= 1
        row[:] = 0
        for rows in self._rows.values():  # its rows must not be subtracted again at expiry
            u = np.frombuffer(rows.uid, np.int32)
            u[u == uid] = -1
        for table in (self.posts, self.credits, self.made):
            a = table.a
            for key in a[(a[:, 0] != 0) & ((a[:, 1] & _M32) == uid), 0].tolist():
                table.pop(key)
        self.dirty.add(uid)

    # -- housekeeping ------------------------------------------------------------------------

    def gc(self) -> None:
        """Recycle the ids of DIDs no live state refers to (run when ids pile up)."""
        n = self._dk.size
        ref = np.zeros(n, bool)
        for rows in self._rows.values():  # ids with contributions in the window
            u = np.frombuffer(rows.uid, np.int32)
            ref[u[u >= 0]] = True
        has_row = self._row_of[:n] >= 0
        tot_live = np.zeros(n, bool)
        tot_live[has_row] = self._tot[self._row_of[:n][has_row]].any(axis=(1, 2))
        for i in np.flatnonzero(has_row & ~tot_live & ~ref).tolist():  # nothing to sum: recycle the row
            self._rows_free.append(int(self._row_of[i]))
            self._row_of[i] = -1
        ref |= tot_live | (self._last[:n] != 0)
        a = self.records.a
        live = (a[:, 0] != 0) & self._live_record(a)
        if self._quote:
            keys = set(a[live, 0].tolist())
            self._quote = {k: q for k, q in self._quote.items() if k in keys}
        sid = (a[live, 1] >> 34) - 1
        ref[sid[sid >= 0]] = True
        ref[a[live, 2] & _M32] = True
        for table in (self.posts, self.credits, self.made):
            a = table.a
            live = (a[:, 0] != 0) & table.live(a)
            ref[a[live, 1] & _M32] = True
            if table is self.credits:
                actor = (a[live, 2] >> 34) - 1
                ref[actor[actor >= 0]] = True
        for q in self._quote.values():
            ref[q[0]] = True
        a = self.pending.a
        live = (a[:, 0] != 0) & self._live_pending(a)
        ref[a[live, 2] & _M32] = True
        actor = a[live, 4] - 1
        ref[actor[actor >= 0]] = True
        if self.dirty:
            ref[list(self.dirty)] = True
        unused = np.flatnonzero(~ref & (self._dk._len[:n] >= 0))
        self._dk.free(unused.tolist())
        self.ids_recycled += unused.size
        self._gc_live = len(self._dk)

    def retain(self, partitions: set[int], owns: Callable[[str], bool]) -> None:
        """Drop the state this worker does not hold after a partition assignment: author state
        (the record registry, quotes, held counts) of records that came from a chorus.events
        partition not in ``partitions``, and owner state (post table, credits, reposts made,
        waiting engagement, totals, contributions, last records, changed users) of every DID
        for which ``owns(did)`` is False (its ops partition belongs to another worker). What is
        left is the state of a worker that held only those partitions all along (the clock is
        global). Registry entries without a partition (``ingest`` without one) are dropped."""
        a = self.records.a
        part = ((a[:, 2] >> _PART_SHIFT) & _PART_BITS) - 1
        self.records.keep(np.isin(part, np.fromiter(partitions, np.int64, len(partitions))))
        if self._quote:
            a = self.records.a
            kept = set(a[a[:, 0] != 0, 0].tolist())
            self._quote = {k: q for k, q in self._quote.items() if k in kept}
        a = self.records.a
        live = (a[:, 0] != 0) & self._live_record(a)
        held = np.unique(((a[live, 1] >> 3) & _B31) + self._base, return_counts=True) if self._base is not None else ((), ())
        self._held = {int(b): int(c) for b, c in zip(*held)}  # (recounted from the entries kept)

        n = self._dk.size
        mine = np.zeros(max(n, 1), bool)
        for i in range(n):
            did = self._dk.did(i)
            mine[i] = did is not None and owns(did)
        for table in (self.posts, self.credits, self.made):
            table.keep(mine[table.a[:, 1] & _M32])
        self.pending.keep(mine[self.pending.a[:, 2] & _M32])
        a = self.pending.a
        waiting = a[a[:, 0] != 0, 1]
        self._pending_s.keep(np.isin(self._pending_s.a[:, 0], waiting))
        rows = self._row_of[:n]
        gone = np.flatnonzero(~mine[:n] & (rows >= 0))
        self._tot[rows[gone]] = 0
        self._agents[:] = 0
        self._agents[: len(self._topics)] = np.count_nonzero(
            self._tot[:, :, 0] | self._tot[:, :, 1] | self._tot[:, :, 3], axis=0)
        for r in self._rows.values():
            u = np.frombuffer(r.uid, np.int32)
            u[(u >= 0) & ~mine[np.maximum(u, 0)]] = -1
        self._last[:n][~mine[:n]] = 0
        self.dirty = {i for i in self.dirty if mine[i]}
        self._emitted = {i for i in self._emitted if mine[i]}
        self.gc()

    def absorb(self, other: "WindowStore") -> None:
        """Add the state of ``other`` to this one: a worker taking over the partitions of another
        merges the checkpoints that hold them. Both stores must hold disjoint state, each cut by
        :meth:`retain` to its own partitions (author state of disjoint chorus.events partitions,
        owner state of disjoint DIDs); a record key in both keeps this store's entry. DIDs are
        re-interned, topic bits and buckets renumbered. The clock becomes the later of the two
        and the buckets that leave the window with it are expired, as if the earlier state's
        clock had moved on without input; the hop is closed only if both had closed it (else
        the next close emits every changed user). ``other`` is not to be used afterwards.
        Raises ValueError when the window, hop or grace differ."""
        if (other.window_s, other.hop_s, other.grace) != (self.window_s, self.hop_s, self.grace):
            raise ValueError(f"cannot merge the state of a {other.window_s} s / {other.hop_s} s window into "
                             f"a {self.window_s} s / {self.hop_s} s one")
        for k, v in other.stats.items():
            self.stats[k] = self.stats.get(k, 0) + v
        if other._base is None:  # nothing held
            return
        if self._base is None:
            self._base = other._base
        shift = other._base - self._base
        n = other._dk.size
        idmap = np.concatenate([self._dk.intern_from(other._dk), [-1]])  # (never empty)
        if self._dk.size > self._last.size:
            self._grow_ids(1 << (self._dk.size - 1).bit_length())
        bits = np.array([self._mask([t]).bit_length() - 1 for t in other._topics], np.int64)

        def ids(v: np.ndarray) -> np.ndarray:  # other's ids -> ours (-1 stays -1)
            return np.where(v >= 0, idmap[np.maximum(v, 0)], -1)

        def masks(m: np.ndarray) -> np.ndarray:
            out = np.zeros_like(m)
            for i, bit in enumerate(bits.tolist()):
                out |= ((m >> i) & 1) << bit
            return out

        def rel(r: np.ndarray) -> np.ndarray:
            return np.clip(r + shift, 0, _B31)

        def live(table: HashTable, a: np.ndarray) -> np.ndarray:
            return a[(a[:, 0] != 0) & table.live(a)]

        a = live(other.records, other.records.a)
        meta, aux = a[:, 1], a[:, 2]
        sid = (meta >> 34) - 1
        a[:, 1] = (meta & 7) | rel((meta >> 3) & _B31) << 3 | (ids(sid) + 1) << 34
        a[:, 2] = (aux & ~_M32) | ids(aux & _M32)
        self.records.extend(a)
        for table, mine in ((other.posts, self.posts), (other.credits, self.credits), (other.made, self.made)):
            a = live(table, table.a)
            a[:, 1] = ids(a[:, 1] & _M32) | rel(a[:, 1] >> 32) << 32
            hi = a[:, 2] & ~_M32
            if table is other.credits:  # mask | label << 32 | (actor id + 1) << 34
                hi = (hi & (3 << 32)) | (ids((a[:, 2] >> 34) - 1) + 1) << 34
            a[:, 2] = masks(a[:, 2] & _M32) | hi
            mine.extend(a)
        a = live(other.pending, other.pending.a)  # subject key, owner | label << 32 | rel << 34, time, actor + 1
        a[:, 2] = ids(a[:, 2] & _M32) | (a[:, 2] & (3 << 32)) | rel(a[:, 2] >> 34) << 34
        a[:, 4] = ids(a[:, 4] - 1) + 1
        self.pending.extend(a)
        a = live(other._pending_s, other._pending_s.a)
        a[:, 1] = rel(a[:, 1])
        self._pending_s.extend(a)
        for k, (q, qk, qc) in other._quote.items():
            if k not in self._quote and idmap[q] >= 0:
                self._quote[k] = (int(idmap[q]), qk, qc)

        rows = other._row_of[:n]
        has = np.flatnonzero(rows >= 0)
        has = has[other._tot[rows[has]].any(axis=(1, 2)) & (idmap[has] >= 0)]
        if has.size:
            mine_rows = np.array([self._trow(int(u)) for u in idmap[has].tolist()], np.int64)  # may grow _tot
            self._tot[mine_rows[:, None], bits[None, :]] += other._tot[rows[has]][:, : bits.size]
        self._agents[:] = 0
        self._agents[: len(self._topics)] = np.count_nonzero(
            self._tot[:, :, 0] | self._tot[:, :, 1] | self._tot[:, :, 3], axis=0)
        last = np.flatnonzero((other._last[:n] != 0) & (idmap[:n] >= 0))
        self._last[idmap[last]] = np.where(self._last[idmap[last]] != 0, self._last[idmap[last]],
                                           other._last[last])
        for b, r in other._rows.items():
            mine = self._rows.get(b)
            if mine is None:
                mine = self._rows[b] = _Rows()
            mine.uid.frombytes(ids(np.frombuffer(r.uid, np.int32).astype(np.int64)).astype(np.int32).tobytes())
            mine.mask.frombytes(masks(np.frombuffer(r.mask, np.int32).astype(np.int64)).astype(np.int32).tobytes())
            mine.code.frombytes(r.code.tobytes())
        for b, c in other._held.items():
            self._held[b] = self._held.get(b, 0) + c
        remap = lambda s: {int(idmap[i]) for i in s if i < n and idmap[i] >= 0}  # noqa: E731
        self.dirty |= remap(other.dirty)
        if self.cur is None:
            self.cur, self.closed, self._emitted = other.cur, other.closed, remap(other._emitted)
        elif other.cur is not None:
            cur = max(self.cur, other.cur)
            if all(s.cur == s.closed == cur for s in (self, other)):
                self._emitted |= remap(other._emitted)
            elif self.closed == cur:  # we closed it, the other did not: not closed
                self.closed = other.closed
            self.cur = cur
            self._expire(cur - self.n)
        self.gc()

    def held_events(self) -> int:
        """Registry entries (events and deletions) of the buckets in the window."""
        return sum(self._held.values())

    def state_bytes(self) -> int:
        """Bytes held by the state's arrays (tables, totals, columns); Python objects estimated."""
        arrays = (self._tot.nbytes + self._last.nbytes + self._row_of.nbytes + self.records.nbytes + self.posts.nbytes
                  + self.credits.nbytes + self.made.nbytes + sum(r.nbytes for r in self._rows.values()))
        objects = self._dk.nbytes + self.pending.nbytes + self._pending_s.nbytes + 200 * len(self._quote)
        return arrays + objects

    # -- both stages in one process -----------------------------------------------------------

    def process(self, ev: dict[str, Any]) -> tuple[list[dict], list[tuple]]:
        """advance + ingest + apply every resulting op here: (feature records, graph edges)."""
        records = self.advance(int(ev["time_us"]))
        ops, edges = self.ingest(ev)
        self.apply_local(ops)
        return records, edges

    def apply_local(self, ops: list[Op], local: Callable[[str], bool] | None = None) -> list[Op]:
        """Apply, in order, every op whose owner is ``local`` (default: every owner) and the
        follow-up ops they cause; returns the other ops, in order, for their owners."""
        remote: list[Op] = []
        queue = deque(ops)
        while queue:
            op = queue.popleft()
            if local is None or local(op[1]):
                queue.extend(self.apply(op))
            else:
                remote.append(op)
        return remote

    # -- views (tests, metrics) --------------------------------------------------------------

    @property
    def users(self) -> "_Users":
        """DID -> a read-only view of that user's state (``totals``, ``gone``); a DID is in it
        while any state refers to it."""
        return _Users(self)

    # -- checkpoints -------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The whole state as named numpy arrays (copies; format :data:`STATE_FORMAT`)."""
        rows_b = sorted(self._rows)
        rows = [self._rows[b] for b in rows_b]
        scalars = {"format": STATE_FORMAT, "window_s": self.window_s, "hop_s": self.hop_s,
                   "grace": self.grace, "cur": self.cur, "closed": self.closed, "base": self._base,
                   "gc_live": self._gc_live, "topics": self._topics, "stats": self.stats,
                   "dirty": sorted(self.dirty), "emitted": sorted(self._emitted),
                   "held": sorted(self._held.items()),
                   "quote": [[k, *q] for k, q in self._quote.items()]}
        n = self._dk.size
        return {
            "meta": np.frombuffer(json.dumps(scalars).encode(), np.uint8).copy(),
            **{f"ids_{k}": v for k, v in self._dk.to_arrays().items()},
            "tot": self._tot[: self._rows_used].copy(), "last": self._last[:n].copy(),
            "row_of": self._row_of[:n].copy(), "rows_free": np.array(self._rows_free, np.int32),
            "records": self.records.a.copy(), "posts": self.posts.a.copy(),
            "credits": self.credits.a.copy(), "made": self.made.a.copy(),
            "pending": self.pending.a.copy(), "pending_s": self._pending_s.a.copy(),
            "rows_bucket": np.array(rows_b, np.int64),
            "rows_len": np.array([len(r.uid) for r in rows], np.int64),
            "rows_uid": np.concatenate([np.frombuffer(r.uid, np.int32) for r in rows] or [np.empty(0, np.int32)]),
            "rows_mask": np.concatenate([np.frombuffer(r.mask, np.int32) for r in rows] or [np.empty(0, np.int32)]),
            "rows_code": np.concatenate([np.frombuffer(r.code, np.int32) for r in rows] or [np.empty(0, np.int32)]),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], classify: Callable, *,
                    window_s: int | None = None, hop_s: int | None = None) -> "WindowStore":
        """Rebuild a store from :meth:`to_arrays`. Raises ValueError when the format is not
        :data:`STATE_FORMAT` or the window/hop differ from ``window_s``/``hop_s`` (if given)."""
        meta = json.loads(bytes(arrays["meta"]))
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"window state format {meta.get('format')!r}, this chorus reads {STATE_FORMAT}")
        if (window_s, hop_s) != (None, None) and (meta["window_s"], meta["hop_s"]) != (window_s, hop_s):
            raise ValueError(f"window state is for a {meta['window_s']} s window / {meta['hop_s']} s hop, "
                             f"not {window_s} s / {hop_s} s")
        s = cls(meta["window_s"], meta["hop_s"], classify, meta["grace"])
        s.cur, s.closed, s._base, s._gc_live = meta["cur"], meta["closed"], meta["base"], meta["gc_live"]
        s._topics = list(meta["topics"])
        s._bit = {t: i for i, t in enumerate(s._topics)}
        s.stats = dict(meta["stats"])
        s._dk = Interner.from_arrays({k[4:]: v for k, v in arrays.items() if k.startswith("ids_")})
        n = s._dk.size
        cap = max(1024, 1 << max(n, 1).bit_length())
        s._last = np.zeros(cap, np.int64)
        s._last[:n] = arrays["last"]
        s._row_of = np.full(cap, -1, np.int32)
        s._row_of[:n] = arrays["row_of"]
        s._rows_used = int(arrays["tot"].shape[0])
        s._rows_free = arrays["rows_free"].tolist()
        s._tot = np.zeros((max(1024, 1 << max(s._rows_used, 1).bit_length()), len(s._topics), 4), np.int64)
        s._tot[: s._rows_used] = arrays["tot"]
        s._agents[: len(s._topics)] = np.count_nonzero(
            s._tot[:, :, 0] | s._tot[:, :, 1] | s._tot[:, :, 3], axis=0)
        for name in ("records", "posts", "credits", "made", "pending"):
            getattr(s, name).load(arrays[name])
        s._pending_s.load(arrays["pending_s"])
        off = 0
        for b, ln in zip(arrays["rows_bucket"].tolist(), arrays["rows_len"].tolist()):
            r = s._rows[b] = _Rows()
            r.uid.frombytes(arrays["rows_uid"][off: off + ln].tobytes())
            r.mask.frombytes(arrays["rows_mask"][off: off + ln].tobytes())
            r.code.frombytes(arrays["rows_code"][off: off + ln].tobytes())
            off += ln
        s.dirty = set(meta["dirty"])
        s._emitted = set(meta["emitted"])
        s._held = {b: c for b, c in meta["held"]}
        s._quote = {k: (a, b, c) for k, a, b, c in meta["quote"]}
        return s


class _UserView:
    def __init__(self, store: WindowStore, uid: int):
        self._s, self._uid = store, uid

    @property
    def totals(self) -> dict[str, list[int]]:
        """topic -> [posts, engagement, stance_e4, reposts] summed over the window (present topics)."""
        r = self._s._row_of[self._uid]
        row = self._s._tot[r] if r >= 0 else np.zeros((len(self._s._topics), 4), np.int64)
        return {self._s._topics[t]: row[t].tolist()
                for t in np.flatnonzero(row[:, 0] | row[:, 1] | row[:, 3]).tolist()}

    @property
    def gone(self) -> set[int]:
        """Keys of the user's topic posts that left the window and stay findable grace hops."""
        s, a = self._s, self._s.posts.a
        lo = s._lo_rel()
        pb = a[:, 1] >> 32
        mine = (a[:, 0] != 0) & ((a[:, 1] & _M32) == self._uid) & (pb < lo) & (pb + s.grace >= lo)
        return set(a[mine, 0].tolist())


class _Users:
    def __init__(self, store: WindowStore):
        self._s = store

    def _uid(self, did: str) -> int | None:
        s = self._s
        uid = s._dk.get(did)
        if uid is None:
            return None
        r = s._row_of[uid]
        if (r >= 0 and s._tot[r].any()) or s._last[uid] != 0 or uid in s.dirty:
            return uid
        for table in (s.posts, s.credits, s.made):
            a = table.a
            if ((a[:, 0] != 0) & ((a[:, 1] & _M32) == uid) & table.live(a)).any():
                return uid
        return None

    def __contains__(self, did: str) -> bool:
        return self._uid(did) is not None

    def __getitem__(self, did: str) -> _UserView:
        uid = self._uid(did)
        if uid is None:
            raise KeyError(did)
        return _UserView(self._s, uid)

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
Each contribution lands in the bucket of the event that made it. Every user keeps one small dict
per touched bucket plus running totals; a global ring maps bucket -> what to subtract when that
bucket leaves the window, so the cost per event is O(topics of the post), independent of n.

Two stages make the state partitionable by DID (see stream/app.py):
  ``ingest(event)``  runs where the *author* lives: dedupe by record URI (a registry of the
                     author's records in the window; follows are kept for good), resolves deletes
                     to what the record created, classifies posts, and returns ops for owners;
  ``apply(op)``      runs where the op's *owner* (``op[1]``) lives: updates features, the post
                     table, follower counts; it may return follow-up ops (repost -> reposter).
``process(event)`` runs both stages locally (one process owning every DID).

Every op is idempotent (keyed by record URI), so a replay of the input may re-send ops safely.
Deletes retract what the deleted record created: a post's own posts/stance and the engagement it
gave as a reply/quote (engagement *received* from other people's records stays, but the post
leaves the post table so later engagement credits nothing); a like/repost its engagement credit
(and the reposter's repost credit); a follow its edge and follower count. An ``account`` event
with ``active=False`` retracts every record of the account in the registry and clears its state.
Engagement for a post not (yet) in the table waits ``grace_hops`` hops (cross-partition
reordering), then is dropped; so does engagement of a post outside every topic. The other way
round, a post that left the window stays findable for ``grace_hops`` more hops (``_User.gone``):
engagement that arrives after the clock expired the post, but whose own bucket b still held it
(post bucket > b - n), is credited as it would have been in time order.

Emission: ``advance(time_us)`` closes the hop ``cur`` when the clock enters a later bucket and
returns at most one record per changed user (changed since its last record), or an expiry record
(``expired=True``, no topics) for a user that left the window. ``flush()`` closes the current hop
early (idle input); a hop is closed once, and later changes go out with the next hop.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from stream.worker.lexicon import STANCE_SCALE

Op = tuple  # (code, owner DID, time_us, ...): see apply()
POSTS, ENG, STANCE, REPOSTS = range(4)


class BadEvent(ValueError):
    """An event lacks a field its kind needs."""


def did_of(uri: str) -> str:
    """The repository DID of an AT-URI ``at://DID/collection/rkey``."""
    if not uri.startswith("at://"):
        raise BadEvent(f"not an AT-URI: {uri!r}")
    return uri[5:].split("/", 1)[0]


class _User:
    __slots__ = ("buckets", "totals", "posts", "credits", "made", "gone", "last")

    def __init__(self) -> None:
        self.buckets: dict[int, dict[str, list[int]]] = {}  # bucket -> topic -> vec
        self.totals: dict[str, list[int]] = {}  # topic -> vec summed over live buckets
        self.posts: dict[str, tuple] = {}  # topic post uri -> (bucket, topics, stance_e4)
        self.credits: dict[str, tuple] = {}  # engagement key -> (bucket, topics, label, actor)
        self.made: dict[str, tuple] = {}  # repost uri -> (bucket, topics)
        self.gone: dict[str, tuple] = {}  # topic post uri that left the window -> as in posts
        self.last: tuple | None = None  # (topics, followers) last emitted; None: none/expired

    def empty(self) -> bool:
        return not (self.buckets or self.posts or self.credits or self.made or self.gone)


class _Hop:
    """What leaves the window with one bucket."""

    __slots__ = ("owners", "records", "posts", "credits", "made", "pending", "gone")

    def __init__(self) -> None:
        self.owners: set[str] = set()
        self.records: list[tuple] = []
        self.posts: list[tuple] = []
        self.credits: list[tuple] = []
        self.made: list[tuple] = []
        self.pending: list[tuple] = []
        self.gone: list[tuple] = []  # (owner, post uri, post bucket): forget the expired post


class WindowStore:
    """The rolling-window feature store. ``classify(text) -> (topics, stance_e4)`` for posts."""

    def __init__(self, window_s: int, hop_s: int, classify: Callable[[str | None], tuple],
                 grace_hops: int = 2):
        if hop_s <= 0 or window_s <= 0 or window_s % hop_s:
            raise ValueError(f"window ({window_s}s) must be a positive multiple of hop ({hop_s}s)")
        self.window_s, self.hop_s = window_s, hop_s
        self.n = window_s // hop_s
        self.hop_us = hop_s * 1_000_000
        self.grace = min(max(grace_hops, 0), self.n)
        self.classify = classify
        self.cur: int | None = None  # clock: newest bucket
        self.closed: int | None = None  # newest hop already emitted
        self.users: dict[str, _User] = {}
        self.follows: dict[str, set[str]] = {}  # followed DID -> follow-record URIs
        self.records: dict[str, dict[str, tuple]] = {}  # author -> uri -> (kind, bucket, data)
        self.pending: dict[str, dict[str, tuple]] = {}  # subject uri -> key -> (owner, t, label, actor)
        self.agents: dict[str, int] = {}  # topic -> users present in the window
        self.dirty: set[str] = set()
        self.stats = {"events": 0, "duplicate": 0, "late": 0, "ops": 0}
        self._ring: dict[int, _Hop] = {}
        self._ring_lo = 0  # every ring index below this has been expired

    # -- time ------------------------------------------------------------------------------

    def bucket(self, time_us: int) -> int:
        return time_us // self.hop_us

    def window_end(self) -> int | None:
        """End of the current window, unix seconds (None before the first event)."""
        return None if self.cur is None else (self.cur + 1) * self.hop_s

    def _late(self, b: int) -> bool:
        return self.cur is not None and b <= self.cur - self.n

    def _hop(self, index: int) -> _Hop:
        h = self._ring.get(index)
        if h is None:
            h = self._ring[index] = _Hop()
        return h

    def advance(self, time_us: int) -> list[dict]:
        """Move the clock to ``time_us``; returns the records of the hop closed by the move."""
        c = time_us // self.hop_us
        if self.cur is None:  # ingest() may have filled the ring before the first advance
            self.cur = c
            self._ring_lo = min([c - self.n + 1, *self._ring])
            return []
        if c <= self.cur:
            return []
        out = self._close() if self.closed != self.cur else []
        self._expire(c - self.n)
        self.cur = c
        return out

    def flush(self) -> list[dict]:
        """Close the current hop now (input idle); a no-op if it is already closed."""
        if self.cur is None or self.closed == self.cur:
            return []
        return self._close()

    def _expire(self, limit: int) -> None:
        """Drop every ring index <= limit (their buckets left the window)."""
        if limit < self._ring_lo:
            return
        if limit - self._ring_lo < 4 * len(self._ring) + 64:
            indices = [i for i in range(self._ring_lo, limit + 1) if i in self._ring]
        else:
            indices = sorted(i for i in self._ring if i <= limit)
        self._ring_lo = limit + 1
        users, records, pending = self.users, self.records, self.pending
        for i in indices:
            h = self._ring.pop(i)
            for owner in h.owners:
                u = users.get(owner)
                vecs = u.buckets.pop(i, None) if u else None
                if vecs:
                    for topic, v in vecs.items():
                        self._total(u, owner, topic, -v[0], -v[1], -v[2], -v[3])
            for author, uri, b in h.records:
                recs = records.get(author)
                if recs and (rec := recs.get(uri)) and rec[1] == b:
                    del recs[uri]
                    if not recs:
                        del records[author]
            for attr, entries in (("posts", h.posts), ("credits", h.credits), ("made", h.made)):
                for owner, key, b in entries:
                    u = users.get(owner)
                    table = getattr(u, attr) if u else None
                    if table and (e := table.get(key)) and e[0] == b:
                        del table[key]
                        self.dirty.add(owner)  # may now be empty: let _close drop it
                        if attr == "posts" and b + self.grace > limit:  # keep it grace hops
                            u.gone[key] = e
                            self._hop(b + self.grace).gone.append((owner, key, b))
            for owner, key, b in h.gone:
                u = users.get(owner)
                if u and (e := u.gone.get(key)) and e[0] == b:
                    del u.gone[key]
                    self.dirty.add(owner)
            for s_uri, key, t in h.pending:
                p = pending.get(s_uri)
                if p and (e := p.get(key)) and e[1] == t:
                    del p[key]
                    if not p:
                        del pending[s_uri]

    def _close(self) -> list[dict]:
        """Emit the changed users of hop ``cur`` (window_end = (cur+1)*hop)."""
        self.closed = self.cur
        end = (self.cur + 1) * self.hop_s
        out = []
        users, follows = self.users, self.follows
        for did in self.dirty:
            u = users.get(did)
            if u is None:
                continue
            topics = {t: [v[POSTS], v[ENG], v[STANCE] / STANCE_SCALE, v[REPOSTS]]
                      for t, v in u.totals.items()}
            if topics:
                state = (topics, len(follows.get(did, ())))
                if u.last != state:
                    u.last = state
                    out.append({"did": did, "window_end": end, "followers": state[1], "topics": topics})
            else:
                if u.last is not None:
                    u.last = None
                    out.append({"did": did, "window_end": end, "followers": len(follows.get(did, ())),
                                "topics": {}, "expired": True})
                if u.empty():
                    del users[did]
        self.dirty.clear()
        return out

    # -- feature arithmetic ----------------------------------------------------------------

    def _user(self, did: str) -> _User:
        u = self.users.get(did)
        if u is None:
            u = self.users[did] = _User()
        return u

    def _add(self, u: _User, owner: str, b: int, topics, p: int, e: int, s: int, r: int) -> None:
        vecs = u.buckets.get(b)
        if vecs is None:
            vecs = u.buckets[b] = {}
            self._hop(b).owners.add(owner)
        for topic in topics:
            v = vecs.get(topic)
            if v is None:
                v = vecs[topic] = [0, 0, 0, 0]
            v[0] += p
            v[1] += e
            v[2] += s
            v[3] += r
            self._total(u, owner, topic, p, e, s, r)

    def _total(self, u: _User, owner: str, topic: str, p: int, e: int, s: int, r: int) -> None:
        tot = u.totals.get(topic)
        if tot is None:
            tot = u.totals[topic] = [0, 0, 0, 0]
            self.agents[topic] = self.agents.get(topic, 0) + 1
        tot[0] += p
        tot[1] += e
        tot[2] += s
        tot[3] += r
        if not (tot[0] or tot[1] or tot[3]):  # counts are >= 0; stance only comes with posts
            del u.totals[topic]
            self.agents[topic] -= 1
        self.dirty.add(owner)

    # -- stage 1: the author's side --------------------------------------------------------

    def ingest(self, ev: dict[str, Any]) -> tuple[list[Op], list[tuple]]:
        """One chorus.events value (a dict) -> (ops for owners, graph edges (op, src, dst, t))."""
        self.stats["events"] += 1
        try:
            kind, did, uri, t = ev["kind"], ev["did"], ev["uri"], int(ev["time_us"])
        except (KeyError, TypeError, ValueError):
            raise BadEvent("event lacks kind/did/uri/time_us") from None
        b = t // self.hop_us
        if kind == "delete":
            return self._retract(did, uri, t)
        if kind == "account":
            if ev.get("active") is False:
                return self._retract_account(did, t)
            return [], []
        if kind != "follow" and self._late(b):
            self.stats["late"] += 1
            return [], []
        recs = self.records.get(did)
        if recs is None:
            recs = self.records[did] = {}
        if uri in recs:
            self.stats["duplicate"] += 1
            return [], []
        if kind == "post":
            topics, stance = self.classify(ev.get("text"))
            subjects = []
            for s_uri, label in ((ev.get("reply_parent"), "reply"), (ev.get("quote_uri"), "quote")):
                if s_uri and all(s_uri != s[1] for s in subjects):
                    subjects.append((did_of(s_uri), s_uri, uri if label == "reply" else uri + "#q", label))
            recs[uri] = ("post", b, (tuple(subjects), bool(topics)))
            ops = [("post", did, t, uri, topics, stance)] if topics else []
            ops += [("eng", s_did, t, s_uri, key, label, did) for s_did, s_uri, key, label in subjects]
        elif kind in ("like", "repost"):
            s_uri = ev.get("subject_uri")
            if not s_uri:
                raise BadEvent(f"{kind} without subject_uri")
            s_did = ev.get("subject_did") or did_of(s_uri)
            recs[uri] = (kind, b, ((s_did, s_uri, uri, kind),))
            ops = [("eng", s_did, t, s_uri, uri, kind, did)]
        elif kind == "follow":
            s_did = ev.get("subject_did")
            if not s_did:
                raise BadEvent("follow without subject_did")
            recs[uri] = ("follow", None, s_did)  # the graph is not windowed: no expiry
            return [("follow", s_did, t, uri, 1)], [("add", s_did, did, t)]
        else:
            raise BadEvent(f"unknown event kind {kind!r}")
        self._hop(b).records.append((did, uri, b))
        return ops, []

    def _retract(self, did: str, uri: str, t: int) -> tuple[list[Op], list[tuple]]:
        recs = self.records.get(did)
        rec = recs.get(uri) if recs else None
        if rec is None or rec[0] == "x":  # unknown, expired or already deleted
            if rec is not None:
                self.stats["duplicate"] += 1
            return [], []
        kind, _, data = rec
        ops: list[Op] = []
        edges: list[tuple] = []
        if kind == "follow":
            ops.append(("follow", data, t, uri, -1))
            edges.append(("remove", data, did, t))
        elif kind == "post":
            subjects, has_topics = data
            if has_topics:
                ops.append(("unpost", did, t, uri))
            ops += [("uneng", s_did, t, s_uri, key) for s_did, s_uri, key, _ in subjects]
        else:
            s_did, s_uri, key, _ = data[0]
            ops.append(("uneng", s_did, t, s_uri, key))
        # Tombstone for one window, so a re-delivered create is not counted again.
        b = max(t // self.hop_us, self._ring_lo)
        recs[uri] = ("x", b, None)
        self._hop(b).records.append((did, uri, b))
        return ops, edges

    def _retract_account(self, did: str, t: int) -> tuple[list[Op], list[tuple]]:
        ops: list[Op] = []
        edges: list[tuple] = []
        for uri, rec in list(self.records.get(did, {}).items()):
            if rec[0] == "x":
                continue
            o, e = self._retract(did, uri, t)
            ops += o
            edges += e
        ops.append(("purge", did, t))
        return ops, edges

    # -- stage 2: the owner's side ---------------------------------------------------------

    def apply(self, op: Op) -> list[Op]:
        """Apply one op at its owner (``op[1]``); returns follow-up ops for other owners.

        ("post", owner, t, uri, topics, stance_e4)    a topic post by owner
        ("unpost", owner, t, uri)                     its deletion
        ("eng", owner, t, subject_uri, key, label, actor)  engagement with owner's post
        ("uneng", owner, t, subject_uri, key)         its retraction
        ("made", owner, t, key, topics) / ("unmade", owner, t, key)  owner's repost of a topic post
        ("follow", owner, t, follow_uri, +1 | -1)     owner gained / lost a follower
        ("tick", "", t)                               no-op: carries time to every partition
        ("purge", owner, t)                           owner's account is gone: clear its state
        """
        self.stats["ops"] += 1
        code, owner, t = op[0], op[1], op[2]
        b = t // self.hop_us
        if code == "post":
            if self._late(b):
                return []
            uri, topics, stance = op[3], tuple(op[4]), op[5]
            u = self._user(owner)
            if uri in u.posts:
                return []
            u.posts[uri] = (b, topics, stance)
            self._hop(b).posts.append((owner, uri, b))
            self._add(u, owner, b, topics, 1, 0, stance, 0)
            out: list[Op] = []
            for key, (_, et, label, actor) in self.pending.pop(uri, {}).items():
                out += self._credit(owner, u, (b, topics), key, et, label, actor)
            return out
        if code == "eng":
            s_uri, key, label, actor = op[3], op[4], op[5], op[6]
            if self._late(b):
                return []
            u = self.users.get(owner)
            post = u.posts.get(s_uri) if u else None
            if post is None and u is not None and (g := u.gone.get(s_uri)) and g[0] > b - self.n:
                post = g  # expired by a clock that ran ahead; in time order it was still here
            if post is None:
                index = b + self.grace - self.n
                if index >= self._ring_lo:
                    self.pending.setdefault(s_uri, {})[key] = (owner, t, label, actor)
                    self._hop(index).pending.append((s_uri, key, t))
                return []
            return self._credit(owner, u, post, key, t, label, actor)
        if code == "uneng":
            s_uri, key = op[3], op[4]
            p = self.pending.get(s_uri)
            if p and key in p:
                del p[key]
                if not p:
                    del self.pending[s_uri]
                return []
            u = self.users.get(owner)
            c = u.credits.pop(key, None) if u else None
            if c is None:
                return []
            cb, topics, label, actor = c
            self._add(u, owner, cb, topics, 0, -1, 0, 0)
            return [("unmade", actor, t, key)] if label == "repost" else []
        if code == "made":
            key, topics = op[3], tuple(op[4])
            if self._late(b):
                return []
            u = self._user(owner)
            if key not in u.made:
                u.made[key] = (b, topics)
                self._hop(b).made.append((owner, key, b))
                self._add(u, owner, b, topics, 0, 0, 0, 1)
            return []
        if code == "unmade":
            u = self.users.get(owner)
            m = u.made.pop(op[3], None) if u else None
            if m is not None:
                self._add(u, owner, m[0], m[1], 0, 0, 0, -1)
            return []
        if code == "unpost":
            u = self.users.get(owner)
            post = u.posts.pop(op[3], None) if u else None
            if post is not None:
                pb, topics, stance = post
                self._add(u, owner, pb, topics, -1, 0, -stance, 0)
            return []
        if code == "follow":  # idempotent: followers are a set of follow-record URIs
            fs = self.follows.get(owner)
            if op[4] > 0:
                if fs is None:
                    fs = self.follows[owner] = set()
                fs.add(op[3])
            elif fs:
                fs.discard(op[3])
                if not fs:
                    del self.follows[owner]
            if owner in self.users:
                self.dirty.add(owner)
            return []
        if code == "tick":  # time moved elsewhere (advance() already ran)
            return []
        if code == "purge":
            u = self.users.get(owner)
            if u is not None:
                for vecs in u.buckets.values():
                    for topic, v in vecs.items():
                        self._total(u, owner, topic, -v[0], -v[1], -v[2], -v[3])
                u.buckets.clear()
                u.posts.clear()
                u.credits.clear()
                u.made.clear()
                u.gone.clear()
                self.dirty.add(owner)
            return []
        raise BadEvent(f"unknown op {code!r}")

    def _credit(self, owner: str, u: _User, post: tuple, key: str, t: int, label: str,
                actor: str) -> list[Op]:
        """Credit one engagement (at its own time) in the subject post's topics."""
        b = t // self.hop_us
        if key in u.credits or self._late(b):
            return []
        topics = post[1]
        u.credits[key] = (b, topics, label, actor)
        self._hop(b).credits.append((owner, key, b))
        self._add(u, owner, b, topics, 0, 1, 0, 0)
        return [("made", actor, t, key, topics)] if label == "repost" else []

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

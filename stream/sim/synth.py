"""Seeded synthetic Bluesky population: accounts, follow graph, activity stream, a planted episode.

Everything is a deterministic function of ``(n, seed, parameters)``; arrays are built with numpy
(vectorized, so ``n`` = 1.67M is practical) and frames are encoded lazily, one at a time.

Accounts: DIDs ``did:plc:`` + 24 base32 chars. Follower counts follow Bluesky's shape via stratified
quantiles (so the fractions hold exactly up to rounding): 30% have 0, 22% have 1 (median 1),
43% log-skewed on [2, 94], 5% Pareto tail (alpha = TAIL_ALPHA) from 96 up, of which about 7.6%
exceed 1,000 (0.38% of all accounts), capped at ``min(n // 2, max(2000, n // 4))`` (so the >1,000 tail needs n > 2,000).

Follow graph: account j gets exactly ``followers[j]`` distinct followers (never itself); followers
are uniform over accounts, except that ``EPISODE["community"]`` (0.9) of an episode participant's
followers are other participants: the participants mostly follow each other, so the episode is a
cascade among themselves and their attributions interact (what the ``panel_disagreement`` alert
detects; with 0.3 their interactions were no stronger than a busy topic's, measured in
operators/data/alerts.yaml). These are ``app.bsky.graph.follow`` records authored by the follower,
made in ``follow_batch``-op commits during the first ``follow_span_s`` seconds (before the
activity span). As on the real network, a consumer that starts later never sees them on the
firehose: it backfills them from the repositories (:mod:`stream.sim.repos` serves them); with
``graph_on_firehose=True`` they are emitted first, as commits (for offline analysis without a
backfill). During the activity span (``live_follows``, on the firehose) accounts follow and
unfollow: LIVE_FOLLOW_SHARE x E new follows, LIVE_UNFOLLOW_SHARE x E pre-existing follows
deleted, LIVE_REFOLLOW_SHARE of the new ones deleted again later; deactivated accounts take no
part. :meth:`Population.final_follow_edges` is the graph at the end.

Activity (then, over ``duration_s`` seconds, Poisson arrivals): posts, replies, quotes, reposts
and likes (BACKGROUND_KINDS), authors weighted by a lognormal activity level times
``1 + log1p(followers)``, engagement targets weighted by ``(1 + followers_author) ** 0.7`` among
earlier posts. Posts are on one of the topics of ``stream/data/topics.json`` (text contains one of
its terms) or off-topic (OFF_TOPIC_SHARE, no lexicon term at all); replies and quotes take their
subject's topic. Each account has a stance (+1/-1) per topic; a post's sentiment word follows it
with probability 0.75, opposes it with 0.15, and is neutral otherwise (POSITIVE / NEGATIVE /
NEUTRAL words, scored by VADER downstream).

Planted episode (EPISODE, ground truth in :meth:`Population.episode_truth`): within
[start_frac, end_frac] of the activity span, ``participants_frac`` of all accounts (half from the
middle tier, follower rank from max(1%, PANEL_K) to 50%, half from the long tail, bottom 50%) each write
``posts`` on-topic posts, ``replies`` replies, ``reposts`` reposts and ``likes`` likes, all aimed at
episode posts (a cascade among themselves); the ``celebrities`` accounts with most followers
(top 0.1%) each write ``celebrity_posts`` posts on the topic. Episode text leans to
``stance`` (with probability ``stance_share``). The long tail and middle tier therefore carry most
of the topic's activity while the top-100 visibility panel only sees the celebrities.

Retractions: DELETE_SHARE (at least one each) of background posts and likes are deleted later (``#commit`` delete op,
no block); ``deactivations`` long-tail accounts send ``#account active=false status=deactivated``
at DEACTIVATE_FRAC of the span and are silent afterwards. Also ``identities`` ``#identity`` frames
and one ``#sync`` frame. Ground truth: :meth:`Population.expected`.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from typing import Any, Iterator

import numpy as np

from stream.sim import frames as frame_codec

DEFAULT_START_US = 1_735_689_600_000_000  # 2025-01-01T00:00:00Z
B32 = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz234567", dtype=np.uint8)

TAIL_ALPHA = 1.1
OFF_TOPIC_SHARE = 0.35
DELETE_SHARE = 0.002
DEACTIVATE_FRAC = 0.9
PANEL_K = 100  # the visibility panel's size: episode participants are never in the top PANEL_K
# kind codes in the timeline
POST, REPLY, QUOTE, LIKE, REPOST, DELETE, ACCOUNT, IDENTITY, SYNC, FOLLOW, UNFOLLOW = range(11)
KIND_NAMES = ("post", "reply", "quote", "like", "repost", "delete", "account", "identity", "sync",
              "live_follow", "unfollow")
# The follow graph during the activity span (shares of the pre-existing graph's edge count E):
LIVE_FOLLOW_SHARE = 0.02  # new follows (pairs not already in the graph)
LIVE_UNFOLLOW_SHARE = 0.01  # pre-existing follows deleted
LIVE_REFOLLOW_SHARE = 0.1  # share of the new follows deleted again later in the span
BACKGROUND_KINDS = {POST: 0.22, REPLY: 0.06, QUOTE: 0.02, LIKE: 0.55, REPOST: 0.15}

EPISODE: dict[str, Any] = {
    "topic": "climate",
    "start_frac": 0.40, "end_frac": 0.65,  # of the activity span
    "participants_frac": 0.03,  # of all accounts; half middle tier (rank 1%-50%), half long tail
    "middle_share": 0.5,
    "posts": 2, "replies": 1, "reposts": 3, "likes": 6,  # per participant, all within the episode
    "celebrities": 3, "celebrity_posts": 2,  # top-0.1% accounts that also post on the topic
    "community": 0.9,  # share of a participant's followers drawn from the other participants
    "stance": -1, "stance_share": 0.8,
}

POSITIVE = ("great", "wonderful", "hopeful", "amazing", "excellent", "encouraging", "brilliant", "good")
NEGATIVE = ("terrible", "awful", "horrible", "depressing", "disastrous", "bad", "scary", "dreadful")
NEUTRAL = ("ongoing", "new", "unusual", "notable", "developing", "busy")
TEMPLATES = (
    "the {term} news today is {sent}",
    "thinking about {term} again and it feels {sent}",
    "that {term} story is {sent}",
    "{sent} update on {term} this week",
    "so much {term} talk lately, all of it {sent}",
    "my take on {term}: {sent}",
)
REPLY_TEMPLATES = ("agreed, {term} is {sent}", "not sure, {term} looks {sent} to me", "{sent} point about {term}")
OFF_TOPIC = ("coffee", "my cat", "the garden", "my weekend", "a new book", "that movie", "dinner",
             "the sunset", "my commute", "the bakery", "my playlist", "this recipe")
LANGS = (("en",), ("en",), ("en",), ("en",), ("en",), ("en",), ("en",), ("en",), ("pt",), ("ja",))


def load_topics() -> dict[str, list[str]]:
    """The default lexicon (stream/data/topics.json): topic -> terms."""
    text = resources.files("stream").joinpath("data/topics.json").read_text()
    return json.loads(text)["topics"]


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort-based; numpy 2.4's np.unique is ~70x slower on large int arrays)."""
    s = np.sort(a)
    return s[np.r_[True, s[1:] != s[:-1]]] if len(s) else s


def _rng(seed: int, name: str) -> np.random.Generator:
    """An independent stream per component, so changing one part leaves the others unchanged."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def follower_counts(n: int, seed: int = 0) -> np.ndarray:
    """Bluesky-shaped follower counts (see module docstring), int64, shape (n,)."""
    rng = _rng(seed, "followers")
    u = (rng.permutation(n) + rng.random(n)) / n  # stratified: exact quantile fractions
    body = np.floor(2.0 * (95 / 2.0) ** (np.clip((u - 0.52) / 0.43, 0, 1) ** 1.5)).clip(2, 94)
    tail = np.floor(96.0 * np.clip(1.0 - (u - 0.95) / 0.05, 1e-12, 1.0) ** (-1.0 / TAIL_ALPHA))
    f = np.where(u < 0.30, 0, np.where(u < 0.52, 1, np.where(u < 0.95, body, tail)))
    cap = min(n // 2, max(2000, n // 4))  # <= n/2 keeps sampling distinct followers cheap
    return np.minimum(f, cap).astype(np.int64)


def make_dids(n: int, seed: int = 0) -> np.ndarray:
    """n distinct ``did:plc:`` DIDs as a bytes array (dtype S32)."""
    rng = _rng(seed, "dids")
    while True:
        chars = B32[rng.integers(0, 32, size=(n, 24))]
        body = chars.view("S24").ravel()
        if len(_unique(body)) == n:
            break
    out = np.empty(n, dtype="S32")
    out[:] = np.char.add(b"did:plc:", body)
    return out


@dataclass(frozen=True)
class _Timeline:
    """Activity frames in order; per-frame arrays indexed by timeline position."""

    t: np.ndarray  # int64 offset (us) from the start of the activity span, strictly increasing
    kind: np.ndarray  # int8 kind code
    author: np.ndarray  # int64 account index
    subject: np.ndarray  # int64 timeline index of the subject record (-1 none); deletes: the deleted record
    root: np.ndarray  # int64 timeline index of the reply root (-1 none)
    topic: np.ndarray  # int8 topic index, -1 off-topic / none
    sent: np.ndarray  # int8 +1 / -1 / 0
    word: np.ndarray  # int32 random draw for text choices
    episode: np.ndarray  # bool
    target: np.ndarray  # int64: FOLLOW the followed account; UNFOLLOW of a pre-existing follow its
    #                     index in follow_edges (its subject is then -1); -1 otherwise


class Population:
    """A synthetic Bluesky: see the module docstring for the model and EPISODE for the plant."""

    def __init__(self, n: int = 20_000, seed: int = 0, events_per_account: float = 4.0,
                 duration_s: float = 3600.0, follow_span_s: float = 60.0, follow_batch: int = 1,
                 episode: dict | None = None, deactivations: int = 2, identities: int = 2,
                 topics: dict[str, list[str]] | None = None, graph_on_firehose: bool = False,
                 live_follows: bool = True) -> None:
        if n < 50:
            raise ValueError(f"population needs at least 50 accounts, got {n}")
        if follow_batch < 1 or follow_batch > 200:
            raise ValueError(f"follow_batch must be in 1..200 (ops per commit), got {follow_batch}")
        self.n, self.seed = int(n), int(seed)
        self.events_per_account = float(events_per_account)
        self.duration_us = int(duration_s * 1e6)
        self.follow_span_us = int(follow_span_s * 1e6)
        self.follow_batch = int(follow_batch)
        self.episode_cfg = {**EPISODE, **(episode or {})}
        self.n_deactivations, self.n_identities = int(deactivations), int(identities)
        self.graph_on_firehose, self.live_follows = bool(graph_on_firehose), bool(live_follows)
        self.topics = topics or load_topics()
        self.topic_names = list(self.topics)
        if self.episode_cfg["topic"] not in self.topics:
            raise ValueError(f"episode topic {self.episode_cfg['topic']!r} is not in the lexicon")

    # --- accounts ------------------------------------------------------------------------------
    @cached_property
    def followers(self) -> np.ndarray:
        return follower_counts(self.n, self.seed)

    @cached_property
    def did_bytes(self) -> np.ndarray:
        return make_dids(self.n, self.seed)

    def did(self, i: int) -> str:
        return self.did_bytes[i].decode()

    @cached_property
    def dids(self) -> list[str]:
        return [d.decode() for d in self.did_bytes]

    @cached_property
    def rank(self) -> np.ndarray:
        """Follower rank (0 = most followers; ties broken by index), int64."""
        order = np.lexsort((np.arange(self.n), -self.followers))
        r = np.empty(self.n, dtype=np.int64)
        r[order] = np.arange(self.n)
        return r

    @cached_property
    def _roles(self) -> dict[str, np.ndarray]:
        """Episode participants (middle tier + long tail), celebrities, deactivated accounts."""
        cfg, n, rng = self.episode_cfg, self.n, _rng(self.seed, "roles")
        r = self.rank
        middle = np.flatnonzero((r >= max(n // 100, PANEL_K)) & (r < n // 2))
        tail = np.flatnonzero(r >= n // 2)
        k = max(4, int(round(cfg["participants_frac"] * n)))
        k_mid = min(len(middle), int(round(k * cfg["middle_share"])))
        k_tail = min(len(tail), k - k_mid)
        mid_sel = np.sort(rng.choice(middle, k_mid, replace=False))
        tail_sel = np.sort(rng.choice(tail, k_tail, replace=False))
        n_top = max(1, n // 1000)
        celebs = np.sort(np.argsort(r)[: min(cfg["celebrities"], n_top)])
        taken = np.zeros(n, bool)
        taken[mid_sel] = taken[tail_sel] = True
        free_tail = tail[~taken[tail]]
        deact = np.sort(rng.choice(free_tail, min(self.n_deactivations, len(free_tail)), replace=False))
        return {"middle": mid_sel, "long_tail": tail_sel, "celebrities": celebs,
                "participants": np.sort(np.concatenate([mid_sel, tail_sel])), "deactivated": deact}

    # --- follow graph ---------------------------------------------------------------------------
    @cached_property
    def follow_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(src, dst) int64 arrays: ``src`` is followed by ``dst`` (DESIGN's FollowGraph order),
        sorted by (dst, src); ``bincount(src) == followers`` exactly."""
        n, f = self.n, self.followers
        rng = _rng(self.seed, "graph")
        part = self._roles["participants"]
        in_part = np.zeros(n, bool)
        in_part[part] = True
        community = self.episode_cfg["community"] if len(part) > 1 else 0.0
        keys = np.empty(0, np.int64)
        need = f.copy()
        while need.sum() > 0:
            # draws per account so that the distinct ones likely cover the need (coupon collector)
            have = f - need
            draws = np.where(need > 0, np.ceil(1.1 * (n - 1) * np.log((n - 1 - have) / np.maximum(n - 1 - f, 1))) + 2, 0)
            src = np.repeat(np.arange(n, dtype=np.int64), draws.astype(np.int64))
            dst = rng.integers(0, n, len(src))
            pick = in_part[src] & (rng.random(len(src)) < community)
            dst[pick] = part[rng.integers(0, len(part), int(pick.sum()))]
            new = _unique(src[dst != src] * n + dst[dst != src])
            if len(keys):
                known = np.sort(keys)
                at = np.minimum(np.searchsorted(known, new), len(known) - 1)
                new = new[known[at] != new]
            # keep a uniformly random need[j] of account j's distinct new candidates
            s_new = new // n
            order = np.argsort((s_new << 40) | rng.integers(0, 1 << 40, len(new)))  # by account, random within
            new, s_new = new[order], s_new[order]
            pos = np.arange(len(new)) - np.searchsorted(s_new, s_new)
            keys = np.concatenate([keys, new[pos < need[s_new]]])
            need = f - np.bincount(keys // n, minlength=n)
        keys = np.sort((keys % n) * n + keys // n)  # (follower, followed) order
        return keys % n, keys // n

    @cached_property
    def _follow_commits(self) -> np.ndarray:
        """Start offsets (into follow_edges) of each follow commit: runs of one follower, <= batch."""
        _, dst = self.follow_edges
        if len(dst) == 0:
            return np.zeros(1, np.int64)
        new_author = np.r_[True, dst[1:] != dst[:-1]]
        run_start = np.maximum.accumulate(np.where(new_author, np.arange(len(dst)), 0))
        starts = np.flatnonzero(new_author | ((np.arange(len(dst)) - run_start) % self.follow_batch == 0))
        return np.r_[starts, len(dst)].astype(np.int64)

    # --- activity timeline --------------------------------------------------------------------------
    @cached_property
    def timeline(self) -> _Timeline:
        n, T, cfg = self.n, self.duration_us, self.episode_cfg
        rng = _rng(self.seed, "activity")
        roles = self._roles
        f = self.followers
        n_topics = len(self.topic_names)
        ep_topic = self.topic_names.index(cfg["topic"])

        # background events
        m = int(round(self.events_per_account * n))
        activity = np.exp(rng.normal(0, 1, n)) * (1 + np.log1p(f))
        author = rng.choice(n, m, p=activity / activity.sum())
        t = rng.uniform(0, T, m)
        kinds = np.array(list(BACKGROUND_KINDS), np.int8)
        kind = kinds[rng.choice(len(kinds), m, p=np.array(list(BACKGROUND_KINDS.values())))]
        t_deact = DEACTIVATE_FRAC * T
        silenced = np.zeros(n, bool)
        silenced[roles["deactivated"]] = True
        while True:  # deactivated accounts are silent after they deactivate
            late = silenced[author] & (t >= t_deact)
            if not late.any():
                break
            author[late] = (author[late] + 1 + rng.integers(0, n - 1, int(late.sum()))) % n
        topic = np.where(rng.random(m) < OFF_TOPIC_SHARE, -1, rng.integers(0, n_topics, m)).astype(np.int8)
        episode = np.zeros(m, bool)

        # planted episode
        t0, t1 = cfg["start_frac"] * T, cfg["end_frac"] * T
        ep_auth, ep_kind = [], []
        for code, key in ((POST, "posts"), (REPLY, "replies"), (REPOST, "reposts"), (LIKE, "likes")):
            ep_auth.append(np.repeat(roles["participants"], cfg[key]))
            ep_kind.append(np.full(len(roles["participants"]) * cfg[key], code, np.int8))
        ep_auth.append(np.repeat(roles["celebrities"], cfg["celebrity_posts"]))
        ep_kind.append(np.full(len(roles["celebrities"]) * cfg["celebrity_posts"], POST, np.int8))
        ep_auth, ep_kind = np.concatenate(ep_auth), np.concatenate(ep_kind)
        k = len(ep_auth)
        author = np.concatenate([author, ep_auth])
        kind = np.concatenate([kind, ep_kind])
        t = np.concatenate([t, rng.uniform(t0, t1, k)])
        topic = np.concatenate([topic, np.full(k, ep_topic, np.int8)])
        episode = np.concatenate([episode, np.ones(k, bool)])

        order = np.argsort(t, kind="stable")
        author, kind, t, topic, episode = author[order], kind[order], t[order], topic[order], episode[order]
        m = len(t)

        # events that need a subject but come before the first post of their pool become posts
        for cls, pool in ((~episode, np.ones(m, bool)), (episode, episode)):
            plain = np.flatnonzero(pool & (kind == POST))
            first = plain[0] if len(plain) else m
            kind[cls & (kind != POST) & (np.arange(m) < first)] = POST
        is_post = kind <= QUOTE

        # engagement subjects: earlier posts, weighted by popularity (background) or within the episode
        subject = np.full(m, -1, np.int64)
        weight = (1.0 + f[author]) ** 0.7
        for cls, pool, w in ((~episode, np.ones(m, bool), weight),
                             (episode, episode, np.where(np.isin(author, roles["celebrities"]), 3.0, 1.0))):
            cand = np.flatnonzero(pool & is_post)
            need = np.flatnonzero(cls & (kind != POST))
            if len(need) == 0:
                continue
            cw = np.cumsum(w[cand])
            before = np.searchsorted(cand, need)  # posts strictly earlier in the pool
            target = rng.random(len(need)) * cw[before - 1]
            subject[need] = cand[np.minimum(np.searchsorted(cw, target, side="right"), before - 1)]

        # replies and quotes take their subject's topic; reply roots by pointer jumping
        src = np.where((kind == REPLY) | (kind == QUOTE), subject, np.arange(m))
        while True:
            nxt = src[src]
            if np.array_equal(nxt, src):
                break
            src = nxt
        is_ep_post = episode & is_post
        topic = np.where(is_post & ~is_ep_post, topic[src], topic)
        topic[~is_post] = -1
        up = np.where(kind == REPLY, subject, np.arange(m))
        while True:
            nxt = up[up]
            if np.array_equal(nxt, up):
                break
            up = nxt
        root = np.where(kind == REPLY, up[np.maximum(subject, 0)], -1)

        # sentiment: per-account stance per topic; the episode leans to cfg["stance"]
        stance = np.where(_rng(self.seed, "stance").random((n, n_topics)) < 0.5, 1, -1).astype(np.int8)
        draw = rng.random(m)
        acc_stance = stance[author, np.maximum(topic, 0)]
        sent = np.where(draw < 0.75, acc_stance, np.where(draw < 0.90, -acc_stance, 0)).astype(np.int8)
        ep_sent = np.where(rng.random(m) < cfg["stance_share"], cfg["stance"], -cfg["stance"]).astype(np.int8)
        sent = np.where(is_ep_post, ep_sent, sent)
        sent[~is_post] = 0

        # deletes of background posts and likes, later in the span
        victims = []
        for code in (POST, LIKE):  # at least one of each when there is one
            pool = np.flatnonzero(~episode & (kind == code) & ~np.isin(author, roles["deactivated"]))
            k_del = min(len(pool), max(1, int(round(DELETE_SHARE * len(pool)))))
            victims.append(rng.choice(pool, k_del, replace=False))
        victims = np.sort(np.concatenate(victims)).astype(np.int64)
        t_del = t[victims] + (T - t[victims]) * rng.uniform(0.1, 1.0, len(victims))

        # control frames: #account (deactivations), #identity, #sync
        deact = roles["deactivated"]
        idn = _rng(self.seed, "identity").choice(n, self.n_identities, replace=False)
        ctl_t = np.concatenate([np.full(len(deact), t_deact), rng.uniform(0, T, len(idn)), [T * 0.5]])
        ctl_kind = np.concatenate([np.full(len(deact), ACCOUNT), np.full(len(idn), IDENTITY), [SYNC]]).astype(np.int8)
        ctl_author = np.concatenate([deact, idn, [int(roles["participants"][0])]]).astype(np.int64)

        # follows and unfollows during the span (their own random stream)
        lf = self._live_graph()
        nf, nu = len(lf["f_t"]), len(lf["u_t"])
        base_f = m + len(victims) + len(ctl_t)  # pre-merge index of the first FOLLOW
        ctl_t = np.concatenate([ctl_t, lf["f_t"], lf["u_t"]])
        ctl_kind = np.concatenate([ctl_kind, np.full(nf, FOLLOW, np.int8), np.full(nu, UNFOLLOW, np.int8)])
        ctl_author = np.concatenate([ctl_author, lf["f_a"], lf["u_a"]]).astype(np.int64)
        n_ctl = len(deact) + len(idn) + 1
        ctl_subject = np.concatenate([np.full(n_ctl + nf, -1), np.where(lf["u_ref"] >= 0, base_f + lf["u_ref"], -1)])
        ctl_target = np.concatenate([np.full(n_ctl, -1), lf["f_b"], np.where(lf["u_ref"] >= 0, -1, -lf["u_ref"] - 1)])

        # merge creates, deletes and control frames; remap subject/root indices
        all_t = np.concatenate([t, t_del, ctl_t])
        order = np.argsort(all_t, kind="stable")
        inv = np.empty(len(order), np.int64)
        inv[order] = np.arange(len(order))
        nd, nc = len(victims), len(ctl_t)
        subj = np.concatenate([subject, victims, ctl_subject])
        rt = np.concatenate([root, np.full(nd + nc, -1)])
        remap = lambda a: np.where(a >= 0, inv[np.maximum(a, 0)], -1)  # noqa: E731
        t_int = np.floor(all_t[order]).astype(np.int64)
        t_int = np.maximum.accumulate(t_int - np.arange(len(t_int))) + np.arange(len(t_int))  # strictly increasing
        return _Timeline(
            t=t_int,
            kind=np.concatenate([kind, np.full(nd, DELETE, np.int8), ctl_kind])[order],
            author=np.concatenate([author, author[victims], ctl_author])[order],
            subject=remap(subj[order]), root=remap(rt[order]),
            topic=np.concatenate([topic, np.full(nd + nc, -1, np.int8)])[order],
            sent=np.concatenate([sent, np.zeros(nd + nc, np.int8)])[order],
            word=_rng(self.seed, "words").integers(0, 2**31 - 1, len(order)).astype(np.int64),
            episode=np.concatenate([episode, np.zeros(nd + nc, bool)])[order],
            target=np.concatenate([np.full(m + nd, -1), ctl_target]).astype(np.int64)[order],
        )

    def _live_graph(self) -> dict[str, np.ndarray]:
        """Follows (``f_*``) and unfollows (``u_*``) during the span: times (us offsets, float),
        authors, followed accounts; ``u_ref`` >= 0 is the index of the unfollowed new follow,
        < 0 is ``-(i + 1)`` for pre-existing edge i."""
        empty = np.empty(0, np.int64)
        out = {"f_t": np.empty(0), "f_a": empty, "f_b": empty, "u_t": np.empty(0), "u_a": empty, "u_ref": empty}
        src, dst = self.follow_edges
        E, n, T = len(src), self.n, self.duration_us
        if not self.live_follows or E == 0:
            return out
        rng = _rng(self.seed, "live_follows")
        inactive = np.zeros(n, bool)
        inactive[self._roles["deactivated"]] = True
        eligible = np.flatnonzero(~inactive)
        # new follows: distinct (follower, followed) pairs not in the graph, never self
        k = max(1, int(round(LIVE_FOLLOW_SHARE * E)))
        a = eligible[rng.integers(0, len(eligible), 2 * k + 16)]
        b = rng.integers(0, n, len(a))
        key = a * n + b  # follow_edges is sorted by (dst, src): keys dst * n + src
        known = dst * n + src
        at = np.minimum(np.searchsorted(known, key), E - 1)
        ok = (a != b) & (known[at] != key)
        _, first = np.unique(key, return_index=True)
        keep = np.zeros(len(key), bool)
        keep[first] = True
        sel = np.flatnonzero(ok & keep)[:k]
        f_a, f_b = a[sel], b[sel]
        f_t = rng.uniform(0, T, len(sel))
        # unfollows of pre-existing follows (follower still active), then of some new follows
        pool = np.flatnonzero(~inactive[dst])
        j = np.sort(rng.choice(pool, min(len(pool), max(1, int(round(LIVE_UNFOLLOW_SHARE * E)))), replace=False))
        r = np.sort(rng.choice(len(sel), min(len(sel), max(1, int(round(LIVE_REFOLLOW_SHARE * len(sel))))),
                               replace=False))
        u_t = np.concatenate([rng.uniform(0, T, len(j)), f_t[r] + (T - f_t[r]) * rng.uniform(0.1, 1.0, len(r))])
        u_a = np.concatenate([dst[j], f_a[r]])
        u_ref = np.concatenate([-j - 1, r])
        return {"f_t": f_t, "f_a": f_a, "f_b": f_b, "u_t": u_t, "u_a": u_a, "u_ref": u_ref}

    # --- ground truth ---------------------------------------------------------------------------------
    def expected(self) -> dict[str, int]:
        """Exact counts of what is on the firehose: frames, commits, ops, and per kind. ``post``
        includes replies and quotes; ``follow`` counts follow records created on the firehose (the
        pre-existing graph only with ``graph_on_firehose``; ``live_follow`` those of the activity
        span); ``delete`` counts every delete op, split into ``delete_post`` / ``delete_like`` /
        ``unfollow``; ``graph_edges`` is the pre-existing graph's size."""
        tl = self.timeline
        c = np.bincount(tl.kind, minlength=len(KIND_NAMES))
        n_graph = len(self.follow_edges[0])
        n_follow = n_graph if self.graph_on_firehose else 0
        follow_commits = len(self._follow_commits) - 1 if n_follow else 0
        del_kind = tl.kind[tl.subject[tl.kind == DELETE]]
        out = {name: int(c[i]) for i, name in enumerate(KIND_NAMES)}
        out["post"] = int(c[POST] + c[REPLY] + c[QUOTE])
        out["follow"] = n_follow + int(c[FOLLOW])
        out["graph_edges"] = n_graph
        out["delete"] = int(c[DELETE] + c[UNFOLLOW])
        out["delete_post"] = int((del_kind == POST).sum())
        out["delete_like"] = int((del_kind == LIKE).sum())
        activity_commits = int(c[:DELETE + 1].sum() + c[FOLLOW] + c[UNFOLLOW])
        out["commits"] = follow_commits + activity_commits
        out["ops"] = n_follow + activity_commits
        out["frames"] = out["commits"] + int(c[ACCOUNT] + c[IDENTITY] + c[SYNC])
        return out

    def episode_truth(self) -> dict[str, Any]:
        """What was planted: topic, span (us offsets from the activity start), accounts, counts."""
        cfg, roles, tl = self.episode_cfg, self._roles, self.timeline
        ep = tl.episode
        names = lambda idx: [self.did(int(i)) for i in idx]  # noqa: E731
        counts = {KIND_NAMES[k]: int(((tl.kind == k) & ep).sum()) for k in (POST, REPLY, REPOST, LIKE)}
        celeb = np.isin(tl.author, roles["celebrities"]) & ep
        return {
            "topic": cfg["topic"],
            "start_us": int(cfg["start_frac"] * self.duration_us), "end_us": int(cfg["end_frac"] * self.duration_us),
            "participants": names(roles["participants"]), "middle": names(roles["middle"]),
            "long_tail": names(roles["long_tail"]), "celebrities": names(roles["celebrities"]),
            "counts": counts, "celebrity_posts": int(celeb.sum()),
            "stance": cfg["stance"],
        }

    def retractions(self, start_time_us: int | None = None) -> dict[str, list[str]]:
        """Deleted record URIs (posts, likes, follows; for frames started at ``start_time_us``) and
        deactivated DIDs."""
        tl = self.timeline
        base = self.activity_start_us(start_time_us)
        deleted = [self.uri(int(j), base) for j in tl.subject[tl.kind == DELETE]]
        ft = self._follow_commit_times(DEFAULT_START_US if start_time_us is None else int(start_time_us))
        deleted += [f"at://{self.did(int(tl.author[i]))}/{frame_codec.FOLLOW}/{self._follow_rkey(int(i), base, ft)}"
                    for i in np.flatnonzero(tl.kind == UNFOLLOW)]
        return {"deleted": deleted, "deactivated": [self.did(int(i)) for i in self._roles["deactivated"]]}

    def activity_start_us(self, start_time_us: int | None = None) -> int:
        """Absolute time of the activity span's start (after the follow phase)."""
        t0 = DEFAULT_START_US if start_time_us is None else int(start_time_us)
        return t0 + max(self.follow_span_us, len(self._follow_commits) - 1)

    # --- frames ----------------------------------------------------------------------------------------
    def _text(self, i: int) -> str:
        tl = self.timeline
        w, topic, sent = int(tl.word[i]), int(tl.topic[i]), int(tl.sent[i])
        words = POSITIVE if sent > 0 else NEGATIVE if sent < 0 else NEUTRAL
        word = words[w % len(words)]
        if topic < 0:
            return f"{OFF_TOPIC[(w >> 4) % len(OFF_TOPIC)]} today, {word}"
        terms = self.topics[self.topic_names[topic]]
        templates = REPLY_TEMPLATES if tl.kind[i] == REPLY else TEMPLATES
        return templates[(w >> 8) % len(templates)].format(term=terms[(w >> 12) % len(terms)], sent=word)

    def _items(self, start_time_us: int) -> Iterator[tuple[int, int, int, list[frame_codec.Op] | None]]:
        """(time_us, kind code, author index, ops) for every frame, in order; ops None for
        #account/#identity/#sync. Follow commits use kind code -1."""
        src, dst = self.follow_edges
        starts = self._follow_commits
        n_fc = len(starts) - 1 if len(src) else 0
        span = self.activity_start_us(start_time_us) - start_time_us
        ft = self._follow_commit_times(start_time_us)
        dids = self.did_bytes
        for c in range(n_fc if self.graph_on_firehose else 0):
            a, b, t = int(starts[c]), int(starts[c + 1]), int(ft[c])
            ops = [frame_codec.Op("create", frame_codec.FOLLOW, frame_codec.tid(t, j & 0x3FF), frame_codec.follow_record(dids[src[j]].decode(), t))
                   for j in range(a, b)]
            yield t, -1, int(dst[a]), ops
        tl = self.timeline
        base = start_time_us + span
        cids: dict[int, str] = {}  # subject index -> CID string, only for records still referenced
        refd = np.concatenate([tl.subject[(tl.kind != DELETE) & (tl.kind != UNFOLLOW) & (tl.subject >= 0)],
                               tl.root[tl.root >= 0]])
        refs_left = np.bincount(refd, minlength=len(tl.t)).astype(np.int64)
        for i in range(len(tl.t)):
            t, k, a = base + int(tl.t[i]), int(tl.kind[i]), int(tl.author[i])
            if k == FOLLOW:
                rec = frame_codec.follow_record(dids[int(tl.target[i])].decode(), t)
                yield t, k, a, [frame_codec.Op("create", frame_codec.FOLLOW, frame_codec.tid(t, i & 0x3FF), rec)]
                continue
            if k == UNFOLLOW:
                yield t, k, a, [frame_codec.Op("delete", frame_codec.FOLLOW, self._follow_rkey(i, base, ft))]
                continue
            if k >= ACCOUNT:
                yield t, k, a, None
                continue
            rkey = frame_codec.tid(t, i & 0x3FF)
            if k == DELETE:
                j = int(tl.subject[i])
                coll = frame_codec.POST if tl.kind[j] <= QUOTE else frame_codec.LIKE
                yield t, k, a, [frame_codec.Op("delete", coll, frame_codec.tid(base + int(tl.t[j]), j & 0x3FF))]
                continue

            def ref(j: int) -> dict:
                refs_left[j] -= 1
                cid = cids[j] if refs_left[j] > 0 else cids.pop(j)
                return frame_codec.strong_ref(self.uri(j, base), cid)

            j = int(tl.subject[i])
            if k == LIKE:
                rec = frame_codec.like_record(ref(j), t)
            elif k == REPOST:
                rec = frame_codec.repost_record(ref(j), t)
            else:
                langs = list(LANGS[(int(tl.word[i]) >> 20) % len(LANGS)])
                reply = (ref(int(tl.root[i])), ref(j)) if k == REPLY else None
                quote = ref(j) if k == QUOTE else None
                rec = frame_codec.post_record(self._text(i), t, langs, reply=reply, quote=quote)
            coll = frame_codec.POST if k <= QUOTE else frame_codec.LIKE if k == LIKE else frame_codec.REPOST
            if refs_left[i] > 0:
                cids[i] = frame_codec.cid_str(frame_codec.encode_record(rec)[0])
            yield t, k, a, [frame_codec.Op("create", coll, rkey, rec)]

    def _follow_commit_times(self, start_time_us: int) -> np.ndarray:
        """Times (us) of the pre-existing graph's follow commits (before the activity span)."""
        n_fc = len(self._follow_commits) - 1 if len(self.follow_edges[0]) else 0
        span = self.activity_start_us(start_time_us) - start_time_us
        return start_time_us + (np.arange(n_fc, dtype=np.int64) * span) // max(n_fc, 1)

    def pre_follow_rkey(self, j: int, ft: np.ndarray) -> str:
        """Record key of pre-existing follow edge j (``ft``: :meth:`_follow_commit_times`)."""
        c = int(np.searchsorted(self._follow_commits, j, side="right")) - 1
        return frame_codec.tid(int(ft[c]), j & 0x3FF)

    def _follow_rkey(self, i: int, base_us: int, ft: np.ndarray) -> str:
        """Record key of the follow that timeline entry i (an UNFOLLOW) deletes."""
        tl = self.timeline
        j = int(tl.subject[i])
        if j >= 0:
            return frame_codec.tid(base_us + int(tl.t[j]), j & 0x3FF)
        return self.pre_follow_rkey(int(tl.target[i]), ft)

    def final_follow_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """The follow graph at the end of the stream, as chorus should hold it: (src, dst) int64
        (``src`` followed by ``dst``), sorted by (dst, src). The pre-existing graph, minus the
        unfollows, plus the live follows not undone; follows by deactivated accounts are gone
        (a deactivation retracts the account's follows, as the worker does)."""
        src, dst = self.follow_edges
        tl = self.timeline
        n = self.n
        keys = set((dst * n + src).tolist())
        for i in np.flatnonzero((tl.kind == FOLLOW) | (tl.kind == UNFOLLOW)):
            a = int(tl.author[i])
            if tl.kind[i] == FOLLOW:
                keys.add(a * n + int(tl.target[i]))
            else:
                j = int(tl.subject[i])
                b = int(tl.target[j]) if j >= 0 else int(src[int(tl.target[i])])
                keys.discard(a * n + b)
        k = np.array(sorted(keys), np.int64)
        inactive = np.zeros(n, bool)
        inactive[self._roles["deactivated"]] = True
        k = k[~inactive[k // n]]
        return k % n, k // n

    def uri(self, i: int, base_us: int) -> str:
        """AT-URI of the record created by timeline entry i (``base_us`` = activity start time)."""
        tl = self.timeline
        k = int(tl.kind[i])
        coll = frame_codec.POST if k <= QUOTE else frame_codec.LIKE if k == LIKE else frame_codec.REPOST
        return f"at://{self.did(int(tl.author[i]))}/{coll}/{frame_codec.tid(base_us + int(tl.t[i]), i & 0x3FF)}"

    def frame_offsets_us(self) -> np.ndarray:
        """Times of the frames :meth:`timed_frames` yields, in its order, minus its ``start_time_us``
        (int64 microseconds, non-decreasing): where a relay places the timeline
        (:func:`stream.sim.relay.live_start_us`) without encoding a frame."""
        span = self.activity_start_us(0)
        follows = self._follow_commit_times(0) if self.graph_on_firehose else np.zeros(0, np.int64)
        return np.concatenate([follows, span + self.timeline.t.astype(np.int64)])

    def timed_frames(self, start_seq: int = 1, start_time_us: int | None = None) -> Iterator[tuple[int, int, bytes]]:
        """(seq, time_us, frame) for the whole population: follow graph first, then activity."""
        t0 = DEFAULT_START_US if start_time_us is None else int(start_time_us)
        for seq, (t, k, a, ops) in enumerate(self._items(t0), start=start_seq):
            did = self.did(a)
            if ops is not None:
                data = frame_codec.commit_frame(seq, did, ops, t)
            elif k == ACCOUNT:
                data = frame_codec.account_frame(seq, did, False, "deactivated", time_us=t)
            elif k == IDENTITY:
                data = frame_codec.identity_frame(seq, did, handle=f"user{a}.bsky.social", time_us=t)
            else:
                data = frame_codec.sync_frame(seq, did, time_us=t)
            yield seq, t, data

    def frames(self, start_seq: int = 1, start_time_us: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(seq, frame bytes), lazily encoded."""
        for seq, _, data in self.timed_frames(start_seq, start_time_us):
            yield seq, data


"""windows.WindowStore against hand-computed truth and a brute-force oracle (pure, no Kafka)."""

from __future__ import annotations

import random
import zlib

import pytest

from stream.worker.table import key_of
from stream.worker.windows import STATE_FORMAT, WindowStore

HOP, WIN = 60, 180  # n = 3 buckets
K = 28_333_334  # a bucket index; T0 = K * HOP is hop-aligned
T0 = K * HOP


def fake_classify(text):
    """Topics = the words 'climate'/'ai' present; stance from a 's=<x>' word (independent of VADER)."""
    words = (text or "").split()
    topics = tuple(t for t in ("climate", "ai") if t in words)
    stance = next((round(float(w[2:]) * 10_000) for w in words if w.startswith("s=")), 0)
    return (topics, stance) if topics else ((), 0)


def us(sec: float) -> int:
    return int((T0 + sec) * 1_000_000)


def uri(did, coll, rkey):
    return f"at://{did}/app.bsky.{coll}/{rkey}"


def post(did, rkey, sec, text, reply=None, quote=None):
    return {"kind": "post", "did": did, "rkey": rkey, "uri": uri(did, "feed.post", rkey), "seq": 0,
            "time_us": us(sec), "text": text, "reply_parent": reply, "reply_root": reply, "quote_uri": quote}


def like(did, rkey, sec, subject, kind="like"):
    return {"kind": kind, "did": did, "rkey": rkey, "uri": uri(did, f"feed.{kind}", rkey), "seq": 0,
            "time_us": us(sec), "subject_uri": subject, "subject_did": subject.split("/")[2]}


def follow(did, rkey, sec, subject_did):
    return {"kind": "follow", "did": did, "rkey": rkey, "uri": uri(did, "graph.follow", rkey), "seq": 0,
            "time_us": us(sec), "subject_did": subject_did}


def delete(ev, sec):
    return {"kind": "delete", "did": ev["did"], "rkey": ev["rkey"], "uri": ev["uri"], "seq": 0,
            "time_us": us(sec), "collection": ev["uri"].split("/")[3]}


def tick(sec):
    """An event with no effect (a like of an unknown post) that only moves the clock."""
    return like("did:tick", f"t{sec}", sec, "at://did:nobody/app.bsky.feed.post/x")


def store():
    return WindowStore(WIN, HOP, fake_classify)


def run(s, events, flush=True):
    recs, edges = [], []
    for ev in events:
        r, e = s.process(ev)
        recs += r
        edges += e
    if flush:
        recs += s.flush()
    return recs, edges


def last(recs):
    """did -> last record without window_end (the final state downstream holds)."""
    out = {}
    for r in recs:
        out[r["did"]] = {k: v for k, v in r.items() if k != "window_end"}
    return out


def end(k):
    return (K + k + 1) * HOP


def test_posts_stance_and_expiry_at_window_boundary():
    s = store()
    a = "did:a"
    p1, p2 = post(a, "1", 10, "climate s=0.5"), post(a, "2", 70, "climate ai s=-0.25")
    recs, _ = run(s, [p1, p2], flush=False)
    assert recs == [{"did": a, "window_end": end(0), "topics": {"climate": [1, 0, 0.5, 0]}}]
    # 179 s: bucket K+2, the post at 10 s (bucket K) is still inside [K*60, (K+3)*60).
    recs, _ = run(s, [tick(179)], flush=False)
    assert recs == [{"did": a, "window_end": end(1),
                     "topics": {"climate": [2, 0, 0.25, 0], "ai": [1, 0, -0.25, 0]}}]
    assert s.users[a].totals["climate"] == [2, 0, 2500, 0]
    recs, _ = run(s, [tick(180)], flush=False)  # bucket K+3: bucket K leaves the window
    assert recs == []  # hop K+2 had no change for a
    assert s.users[a].totals["climate"] == [1, 0, -2500, 0]
    recs, _ = run(s, [tick(240)], flush=False)  # closes K+3 (the expiry), expires K+1
    assert recs == [{"did": a, "window_end": end(3),
                     "topics": {"climate": [1, 0, -0.25, 0], "ai": [1, 0, -0.25, 0]}}]
    assert s.flush() == [{"did": a, "window_end": end(4), "topics": {}, "expired": True}]
    assert s.agents == {"climate": 0, "ai": 0} and set(s.users[a].gone) == {key_of(p1["uri"]), key_of(p2["uri"])}
    recs, _ = run(s, [tick(360)], flush=True)  # expired posts are kept grace (2) hops, then dropped
    assert recs == [] and a not in s.users


def test_engagement_credited_to_subject_author_in_subject_topics():
    s = store()
    S, A, B, C, D = "did:s", "did:a", "did:b", "did:c", "did:d"
    p = post(S, "p", 10, "climate s=0.5")
    q = post(S, "q", 11, "nothing topical")
    recs, _ = run(s, [
        p, q,
        like(A, "l1", 20, p["uri"]),
        like(B, "r1", 21, p["uri"], kind="repost"),
        post(C, "c1", 22, "hello", reply=p["uri"]),
        post(D, "d1", 23, "ai s=0.1", quote=p["uri"]),
        like(A, "l2", 24, q["uri"]),  # outside every topic: credits nothing
        like(B, "r2", 25, q["uri"], kind="repost"),
    ])
    assert last(recs) == {
        S: {"did": S, "topics": {"climate": [1, 4, 0.5, 0]}},
        B: {"did": B, "topics": {"climate": [0, 0, 0, 1]}},
        D: {"did": D, "topics": {"ai": [1, 0, 0.1, 0]}},
    }
    assert len(recs) == 3  # one record per changed user for the one closed hop


def test_duplicates_are_counted_once():
    s = store()
    S, A = "did:s", "did:a"
    p = post(S, "p", 10, "climate s=0.5")
    events = [p, like(A, "l", 20, p["uri"]), like(A, "r", 21, p["uri"], kind="repost"), follow(A, "f", 22, S)]
    recs, edges = run(s, events + events)
    assert last(recs) == {
        S: {"did": S, "topics": {"climate": [1, 2, 0.5, 0]}},
        A: {"did": A, "topics": {"climate": [0, 0, 0, 1]}},
    }
    # A follow passes through to chorus.graph each time (its consumers keep a set of records).
    assert edges == [("add", S, A, us(22), events[3]["uri"], None)] * 2
    assert s.stats["duplicate"] == 3


def test_deletes_retract_what_the_record_created():
    s = store()
    S, A, B, C, D, E = "did:s", "did:a", "did:b", "did:c", "did:d", "did:e"
    p = post(S, "p", 10, "climate s=0.5")
    lk, rp = like(A, "l", 20, p["uri"]), like(B, "r", 21, p["uri"], kind="repost")
    fo, rep = follow(C, "f", 22, S), post(D, "d", 23, "climate s=0.2", reply=p["uri"])
    recs, edges = run(s, [p, lk, rp, fo, rep])
    assert last(recs) == {
        S: {"did": S, "topics": {"climate": [1, 3, 0.5, 0]}},
        B: {"did": B, "topics": {"climate": [0, 0, 0, 1]}},
        D: {"did": D, "topics": {"climate": [1, 0, 0.2, 0]}},
    }
    recs, edges = run(s, [delete(lk, 70), delete(rp, 71), delete(fo, 72), delete(rep, 73)])
    assert last(recs) == {
        S: {"did": S, "topics": {"climate": [1, 0, 0.5, 0]}},
        B: {"did": B, "topics": {}, "expired": True},
        D: {"did": D, "topics": {}, "expired": True},
    }
    assert edges == [("remove", None, C, us(72), fo["uri"], None)]  # the record URI identifies the edge
    # Hop K+1 is closed: the post's deletion goes out with the next hop. A like after the delete
    # credits nothing, and a re-delivered deleted like is ignored.
    recs, _ = run(s, [delete(p, 80), like(E, "e", 85, p["uri"]), lk], flush=False)
    assert recs == []
    assert s.flush() == []  # K+1 already closed
    recs, _ = run(s, [tick(130)])
    assert recs == [{"did": S, "window_end": end(2), "topics": {}, "expired": True}]


def test_one_record_per_hop_and_only_when_changed():
    s = store()
    A, E, F = "did:a", "did:e", "did:f"
    p1 = post(A, "1", 10, "climate s=0.1")
    lk = like(E, "l", 70, p1["uri"])
    recs, _ = run(s, [p1, post(A, "2", 20, "climate s=0.2"), post(A, "3", 30, "climate s=0.3"),
                      lk, delete(lk, 75),  # hop K+1: like and unlike: no net change
                      follow(F, "f", 130, A),  # hop K+2: a follow is no feature change
                      like(F, "l2", 131, p1["uri"])])  # but a like is
    assert recs == [
        {"did": A, "window_end": end(0), "topics": {"climate": [3, 0, 0.6, 0]}},
        {"did": A, "window_end": end(2), "topics": {"climate": [3, 1, 0.6, 0]}},
    ]


def test_engagement_before_its_post_waits_grace_hops():
    s = store()  # grace 2 hops
    S, A, B = "did:s", "did:a", "did:b"
    p = post(S, "p", 25, "climate s=0.5")
    late_post = post(S, "q", 125, "climate")  # bucket K+2: the like at bucket K was dropped
    recs, _ = run(s, [like(A, "l", 20, p["uri"]), p, like(B, "m", 21, late_post["uri"]), late_post])
    assert last(recs)[S]["topics"] == {"climate": [2, 1, 0.5, 0]}


def test_account_deactivation_retracts_its_activity():
    s = store()
    S, A = "did:s", "did:a"
    p = post(S, "p", 10, "climate s=0.5")
    recs, edges = run(s, [p, like(A, "l", 11, p["uri"]), like(A, "r", 12, p["uri"], kind="repost"),
                          post(A, "x", 13, "ai s=0.3", reply=p["uri"]), follow(A, "f", 14, S)])
    assert last(recs)[S] == {"did": S, "topics": {"climate": [1, 3, 0.5, 0]}}
    gone = {"kind": "account", "did": A, "rkey": "", "uri": f"at://{A}", "seq": 0, "time_us": us(70),
            "active": False, "status": "deleted"}
    recs, edges = run(s, [gone])
    assert last(recs) == {
        S: {"did": S, "topics": {"climate": [1, 0, 0.5, 0]}},
        A: {"did": A, "topics": {}, "expired": True},
    }
    assert edges == [("purge", None, A, us(70), None, None)]  # every edge A follows with goes


# --- random streams: brute-force oracle, and the same result when the state is partitioned ----

def random_stream(seed: int, n_users=30, n_events=700, hops=9):
    rng = random.Random(seed)
    users = [f"did:u{i}" for i in range(n_users)]
    texts = ["climate s=0.5", "ai s=-0.3", "climate ai s=0.1", "plain words", "ai", "climate s=-0.9"]
    created, posts, events = [], [], []
    t = 0.0
    for i in range(n_events):
        t += rng.random() * hops * HOP / n_events * 2 * 0.98
        a = rng.choice(users)
        r = rng.random()
        mine = [e for e in created if e["did"] == a]
        if r < 0.3 or not posts:
            reply = rng.choice(posts)["uri"] if posts and rng.random() < 0.3 else None
            quote = rng.choice(posts)["uri"] if posts and rng.random() < 0.2 else None
            ev = post(a, f"p{i}", t, rng.choice(texts), reply=reply, quote=quote)
            posts.append(ev)
        elif r < 0.6:
            ev = like(a, f"l{i}", t, rng.choice(posts[-40:])["uri"])
        elif r < 0.72:
            ev = like(a, f"r{i}", t, rng.choice(posts[-40:])["uri"], kind="repost")
        elif r < 0.84:
            ev = follow(a, f"f{i}", t, rng.choice(users))
        elif r < 0.94 and mine:
            victim = rng.choice(mine)
            created.remove(victim)
            if victim in posts:
                posts.remove(victim)
            events.append(delete(victim, t))
            continue
        elif mine:
            events.append(rng.choice(mine))  # a re-delivery (same record, same time)
            continue
        else:
            continue
        created.append(ev)
        events.append(ev)
    return events


def oracle(events):
    """Final features by definition, recomputed from the whole log (events in time order)."""
    n = WIN // HOP
    b = lambda e: e["time_us"] // (HOP * 1_000_000)  # noqa: E731
    first, deleted = {}, {}
    for e in events:
        if e["kind"] == "delete":
            if e["uri"] in first and e["uri"] not in deleted:
                deleted[e["uri"]] = e
        elif e["uri"] not in first:
            first[e["uri"]] = e
    cur = max(b(e) for e in events)
    live = lambda e, at: e["uri"] not in deleted or deleted[e["uri"]]["time_us"] > at  # noqa: E731
    feats: dict = {}
    followers: dict = {}

    def add(did, topics, i, x):
        for tp in topics:
            v = feats.setdefault(did, {}).setdefault(tp, [0, 0, 0, 0])
            v[i] += x

    order = sorted(first.values(), key=lambda e: e["time_us"])
    for e in order:
        if e["kind"] == "follow":
            if e["uri"] not in deleted:
                followers[e["subject_did"]] = followers.get(e["subject_did"], 0) + 1
            continue
        if e["uri"] in deleted or b(e) <= cur - n:
            continue
        if e["kind"] == "post":
            topics, st = fake_classify(e["text"])
            add(e["did"], topics, 0, 1)
            add(e["did"], topics, 2, st)
            subjects = dict.fromkeys(u for u in (e["reply_parent"], e["quote_uri"]) if u)
        else:
            subjects = [e["subject_uri"]]
        for s_uri in subjects:
            p = first[s_uri]
            topics, _ = fake_classify(p["text"])
            # Credited if the subject was in the post table when this engagement arrived.
            if topics and b(p) > b(e) - n and live(p, e["time_us"]) and p["time_us"] <= e["time_us"]:
                add(p["did"], topics, 1, 1)
                if e["kind"] == "repost":
                    add(e["did"], topics, 3, 1)
    out = {}
    for did, tps in feats.items():
        tps = {t: [v[0], v[1], v[2] / 10_000, v[3]] for t, v in tps.items() if v[0] or v[1] or v[3]}
        if tps:
            out[did] = {"did": did, "followers": followers.get(did, 0), "topics": tps}
    return out


def followers_of(edges):
    """Follower counts by the chorus.graph contract: a set of follow records (key = record URI),
    removed by record URI; a purge removes every record whose follower is the account."""
    records = {}
    for op, src, dst, _t, uri, _rev in edges:
        if op == "add":
            records[uri] = (src, dst)
        elif op == "remove":
            records.pop(uri, None)
        else:
            records = {u: e for u, e in records.items() if e[1] != dst}
    out = {}
    for src, _ in records.values():
        out[src] = out.get(src, 0) + 1
    return out


def present(final):
    return {d: r for d, r in final.items() if not r.get("expired")}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_stream_matches_brute_force_oracle(seed):
    events = random_stream(seed)
    recs, edges = run(store(), events)
    got = present(last(recs))
    want = oracle(events)
    followers = followers_of(edges)
    assert got.keys() == want.keys()
    for did in want:
        assert followers.get(did, 0) == want[did]["followers"]
        assert got[did]["topics"].keys() == want[did]["topics"].keys()
        for t, v in want[did]["topics"].items():
            assert got[did]["topics"][t] == pytest.approx(v, abs=1e-9), (did, t)


def run_partitioned(parts, events, author, owner, partition=lambda did: -1):
    """Feed ``events`` to stores ``parts`` as workers would: each event to its author's store
    (``author(did)``; ``partition(did)``: its chorus.events partition), each op to its owner's
    (``owner(did)``); every store sees time move (the app broadcasts hop ticks). The records."""
    recs = []
    for ev in events:
        for p in parts:
            recs += p.advance(ev["time_us"])
        ops, _ = author(ev["did"]).ingest(ev, partition(ev["did"]))
        while ops:
            op = ops.pop(0)
            ops += owner(op[1]).apply(op)
    for p in parts:
        recs += p.flush()
    return recs


def test_partitioned_state_gives_the_same_records():
    """Three stores, each owning the DIDs that hash to it (authors for ingest, owners for ops)."""
    events = random_stream(7)
    one, _ = run(store(), events)
    parts = [store() for _ in range(3)]
    home = lambda did: parts[zlib.crc32(did.encode()) % 3]  # noqa: E731
    recs = run_partitioned(parts, events, home, home)
    assert sorted(map(repr, recs)) == sorted(map(repr, one))


def test_bad_window_is_rejected():
    with pytest.raises(ValueError, match="multiple of hop"):
        WindowStore(100, 30, fake_classify)


def test_engagement_after_its_post_expired_is_credited_as_in_time_order():
    """A clock that ran ahead (another partition's newer event) expires a post before a like
    whose own bucket still held it; the store credits it as time order would, and no more."""
    S, A, B = "did:s", "did:a", "did:b"
    p = post(S, "p", 5, "climate")  # bucket K
    in_time = like(A, "l", 175, p["uri"])  # bucket K+2: the post (bucket K) was in its window
    too_late = like(B, "m", 185, p["uri"])  # bucket K+3: the post had left its window
    ordered, _ = run(store(), [p, in_time, tick(185), too_late])
    reordered, _ = run(store(), [p, tick(185), in_time, too_late])
    assert last(reordered) == last(ordered)
    assert last(ordered)[S]["topics"] == {"climate": [0, 1, 0.0, 0]}
    s = WindowStore(WIN, HOP, fake_classify, grace_hops=0)  # no grace: the reordered like is lost
    assert S not in present(last(run(s, [p, tick(185), in_time, too_late])[0]))


# --- the compact layout: id recycling, table rebuilds, state round trip -------------------------

@pytest.mark.parametrize("seed", [4, 5])
def test_id_recycling_and_table_rebuilds_keep_the_oracle(seed, monkeypatch):
    """Recycle ids at every hop and rebuild the tables at every fill (tiny capacities)."""
    import stream.worker.table as table

    monkeypatch.setattr(table, "MIN_CAPACITY", 4)
    events = random_stream(seed, n_users=200, n_events=900)
    s = store()
    s.GC_MIN = -(1 << 40)  # recycle at every hop
    for name in ("records", "posts", "credits", "made"):
        getattr(s, name).rebuild(capacity=4)
    recs, edges = run(s, events)
    got, want = present(last(recs)), oracle(events)
    assert got.keys() == want.keys()
    for did in want:
        for t, v in want[did]["topics"].items():
            assert got[did]["topics"][t] == pytest.approx(v, abs=1e-9), (did, t)
    assert s.ids_recycled > 0


def test_state_round_trip_mid_stream_gives_the_same_records():
    events = random_stream(8)
    one, _ = run(store(), events)
    s = store()
    half = len(events) // 2
    recs, _ = run(s, events[:half], flush=False)
    arrays = {k: v.copy() for k, v in s.to_arrays().items()}
    s2 = WindowStore.from_arrays(arrays, fake_classify, window_s=WIN, hop_s=HOP)
    more, _ = run(s2, events[half:])
    assert sorted(map(repr, recs + more)) == sorted(map(repr, one))
    with pytest.raises(ValueError, match="window state is for a 180 s window"):
        WindowStore.from_arrays(arrays, fake_classify, window_s=2 * WIN, hop_s=HOP)
    import json

    import numpy as np

    meta = json.loads(bytes(arrays["meta"]))
    arrays["meta"] = np.frombuffer(json.dumps({**meta, "format": 1}).encode(), np.uint8)
    with pytest.raises(ValueError, match=f"format 1, this chorus reads {STATE_FORMAT}"):
        WindowStore.from_arrays(arrays, fake_classify)


@pytest.mark.parametrize("seed", [9, 10])
def test_a_state_split_by_partition_continues_as_the_uninterrupted_run(seed):
    """A rebalance from one worker to two: the first store's state at mid-stream (a checkpoint),
    split by retain() into the state of two workers (events partitions by one hash of the author,
    ops partitions by crc32 of the owner, as in the worker), continues with the events routed by
    partition and the ops by owner; the records, old and new, are those of one store all along."""
    events = random_stream(seed, n_users=60, n_events=900)
    one, _ = run(store(), events)
    n = 4
    part_of = lambda did: zlib.adler32(did.encode()) % n  # noqa: E731 - the events partition of an author
    ops_part = lambda did: zlib.crc32(did.encode()) % n  # noqa: E731
    s = store()
    half = len(events) // 2
    recs = []
    for ev in events[:half]:
        recs += s.advance(ev["time_us"])
        ops, _ = s.ingest(ev, part_of(ev["did"]))
        s.apply_local(ops)
    arrays = {k: v.copy() for k, v in s.to_arrays().items()}
    held = s.held_events()
    workers = [({0, 1}, {0, 3}), ({2, 3}, {1, 2})]  # (events partitions, ops partitions)
    parts = []
    for events_parts, ops_parts in workers:
        w = WindowStore.from_arrays({k: v.copy() for k, v in arrays.items()}, fake_classify)  # (adopts them)
        w.retain(events_parts, lambda did, o=ops_parts: ops_part(did) in o)
        parts.append(w)
    # each holds some of the registry (recounted from the entries kept: a record later deleted counts once)
    assert 0 < parts[0].held_events() < held and 0 < parts[1].held_events() < held
    assert parts[0].held_events() + parts[1].held_events() <= held
    author = lambda did: parts[0] if part_of(did) in workers[0][0] else parts[1]  # noqa: E731
    owner = lambda did: parts[0] if ops_part(did) in workers[0][1] else parts[1]  # noqa: E731
    recs += run_partitioned(parts, events[half:], author, owner, part_of)
    assert sorted(map(repr, recs)) == sorted(map(repr, one))


def test_engagement_names_the_owner_of_the_post_or_credits_nothing():
    """A like whose subject_did is not the subject URI's repository credits nobody."""
    S, X, A = "did:s", "did:x", "did:a"
    p = post(S, "p", 10, "climate")
    forged = {**like(A, "l", 20, p["uri"]), "subject_did": X}
    recs, _ = run(store(), [p, forged])
    assert last(recs) == {S: {"did": S, "topics": {"climate": [1, 0, 0.0, 0]}}}


def test_a_change_after_an_idle_flush_goes_out_at_the_next_flush_once():
    """Idle input closed the hop; a late change of a user without a record for it goes out at
    the next flush (same window end), a user that already has one waits for the next hop."""
    s = store()
    A, B = "did:a", "did:b"
    pa = post(A, "1", 10, "climate")
    recs, _ = run(s, [pa])
    assert [r["did"] for r in recs] == [A]
    pb = post(B, "2", 20, "ai")
    recs, _ = run(s, [pb, like(B, "l", 21, pa["uri"])], flush=False)
    assert recs == [] and s.flush() == [{"did": B, "window_end": end(0), "topics": {"ai": [1, 0, 0.0, 0]}}]
    assert s.flush() == []  # A changed too (the like) but already has a record for this hop
    recs, _ = run(s, [tick(70)])
    assert recs == [{"did": A, "window_end": end(1), "topics": {"climate": [1, 1, 0.0, 0]}}]


@pytest.mark.parametrize("seed,leaver_first", [(11, False), (12, True), (13, False)])
def test_checkpoints_of_two_workers_merge_into_the_uninterrupted_run(seed, leaver_first):
    """A takeover (issue 17): two workers, each with its chorus.events and ops partitions,
    checkpoint at different points of the stream, run on, and one leaves. The survivor merges
    its own checkpoint and the leaver's, each cut to the partitions it held (retain + absorb),
    then replays what follows each partition's checkpoint: the events (ops applied locally) and
    the ops topic's messages (re-applied: ops are idempotent). Its state equals one store's all
    along (totals, held events), and the records downstream keeps equal the uninterrupted run's."""
    events = random_stream(seed, n_users=60, n_events=900)
    o = store()
    one, _ = run(o, events)
    n = 4
    part_of = lambda did: zlib.adler32(did.encode()) % n  # noqa: E731 - the events partition of an author
    ops_part = lambda did: zlib.crc32(did.encode()) % n  # noqa: E731
    workers = [({0, 1}, {0, 3}), ({2, 3}, {1, 2})]  # (events partitions, ops partitions); 1 leaves
    ev_w = lambda did: 0 if part_of(did) in workers[0][0] else 1  # noqa: E731
    op_w = lambda did: 0 if ops_part(did) in workers[0][1] else 1  # noqa: E731
    N = len(events)
    ckpt_at = [N // 2, N // 3] if leaver_first else [N // 3, N // 2]  # event index of each checkpoint
    leave_at = 2 * N // 3
    parts, recs, topic, arrays = [store(), store()], [], [], [None, None]
    for i, ev in enumerate(events[:leave_at]):
        for w in (0, 1):
            if i == ckpt_at[w]:
                arrays[w] = {k: v.copy() for k, v in parts[w].to_arrays().items()}
        for p in parts:
            recs += p.advance(ev["time_us"])
        ops, _ = parts[ev_w(ev["did"])].ingest(ev, part_of(ev["did"]))
        while ops:
            op = ops.pop(0)
            topic.append((i, op))  # the ops topic: every op goes through it
            ops += parts[op_w(op[1])].apply(op)
    for p in parts:  # both took a hop's changes out before the leaver went
        recs += p.flush()
    clocks = [WindowStore.from_arrays(a, fake_classify).cur for a in arrays]
    assert clocks[0] != clocks[1]  # the merged states are of different times

    s = None
    for w in (0, 1):  # the survivor's restore
        part = WindowStore.from_arrays(arrays[w], fake_classify, window_s=WIN, hop_s=HOP)
        part.retain(workers[w][0], lambda did, o=workers[w][1]: ops_part(did) in o)
        if s is None:
            s = part
        else:
            s.absorb(part)
    ops_at: dict[int, list] = {}
    for i, op in topic:
        if i >= ckpt_at[op_w(op[1])]:
            ops_at.setdefault(i, []).append(op)
    for i in range(min(ckpt_at), N):  # merged by event time: events, then the ops messages of the same time
        ev = events[i]
        recs += s.advance(ev["time_us"])
        if i >= ckpt_at[ev_w(ev["did"])]:
            s.apply_local(s.ingest(ev, part_of(ev["did"]))[0])
        for op in ops_at.get(i, ()):
            s.apply(op)  # (its follow-ups are in the topic too)
    recs += s.flush()

    assert present(last(recs)) == present(last(one))
    dids = {e["did"] for e in events}
    assert {d: s.users[d].totals for d in dids if d in s.users} == {d: o.users[d].totals for d in dids if d in o.users}
    assert s.agents == {t: c for t, c in o.agents.items() if t in s.agents} and s.held_events() == o.held_events()


def test_absorb_refuses_another_window():
    with pytest.raises(ValueError, match="cannot merge the state of a 360 s / 60 s window"):
        store().absorb(WindowStore(2 * WIN, HOP, fake_classify))


@pytest.mark.parametrize("later_first", [False, True])
def test_absorb_moves_the_clock_to_the_later_state_and_expires_what_left_the_window(later_first):
    """A state of bucket K merged with one of bucket K+3: the merged clock is K+3, the K post
    left the window (its totals subtracted, a re-delivery of it is late), the topics of both
    (first seen in another order) keep their names, and the next close emits the open hop."""
    A, B = "did:a", "did:b"
    early, later = store(), store()
    run(early, [post(A, "1", 5, "climate s=0.5"), post(A, "2", 6, "ai")], flush=False)
    run(later, [post(B, "3", 3 * HOP + 5, "ai s=-0.3")], flush=False)
    s, other = (later, early) if later_first else (early, later)
    s.absorb(other)
    assert s.cur == K + 3 and s.window_end() == end(3)
    assert s.users[A].totals == {} and s.users[B].totals == {"ai": [1, 0, -3000, 0]}
    assert s.agents == {"climate": 0, "ai": 1} and s.held_events() == 1
    recs, _ = run(s, [post(A, "1", 5, "climate s=0.5")])
    assert s.stats["late"] == 1
    assert last(recs) == {B: {"did": B, "topics": {"ai": [1, 0, -0.3, 0]}}}


def test_bulk_interning_equals_one_by_one_with_free_ids_and_key_collisions(monkeypatch):
    """Interner.intern_from (absorb's re-interning) gives every string of the other interner the
    id that Interner.id would, reusing free ids, and a string whose key collides (forced here by
    10-bit keys) is salted one by one: afterwards every string reads back by its id and its id
    by its string."""
    import stream.worker.table as table

    def run_case():
        a, b = table.Interner(), table.Interner()
        for i in range(300):
            a.id(f"did:a{i}")
        a.free([a.get(f"did:a{i}") for i in range(0, 300, 3)])  # free ids to reuse
        shared = [f"did:a{i}" for i in range(1, 300, 3)]
        for s in shared + [f"did:b{i}" for i in range(500)]:
            b.id(s)
        b.free([b.get("did:b7"), b.get("did:b8")])
        idmap = a.intern_from(b)
        for i in range(b.size):
            s = b.did(i)
            if s is None:
                assert idmap[i] == -1
            else:
                assert a.did(int(idmap[i])) == s and a.get(s) == idmap[i] and a.id(s) == idmap[i]
        assert len(set(idmap[idmap >= 0].tolist())) == len(b)  # distinct strings, distinct ids
        assert all(a.get(f"did:a{i}") is None for i in range(0, 300, 3))  # freed stay freed
        assert a.did(int(a.id("did:new"))) == "did:new"

    run_case()
    real = table.key_of_bytes
    monkeypatch.setattr(table, "key_of_bytes", lambda b: real(b) & 1023 or 1)
    monkeypatch.setattr(table, "key_of", lambda text: table.key_of_bytes(text.encode()))
    run_case()

"""Synthetic population: determinism, Bluesky-shaped followers, graph, exact counts, planted episode."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import pytest
from atproto import CAR, parse_subscribe_repos_message
from atproto_subscription.frames import Frame
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from tests.helpers.synth_truth import expected_events
from stream.sim import frames as frame_codec
from stream.sim.synth import Population, follower_counts, load_topics

_WORD = re.compile(r"[a-z0-9]+")


def topics_in(text: str, topics: dict[str, list[str]]) -> set[str]:
    """Oracle: topics whose terms occur in ``text`` as whole words/phrases (the lexicon's
    documented rule, written independently of stream.worker.lexicon)."""
    toks = " " + " ".join(_WORD.findall(text.lower())) + " "
    return {name for name, terms in topics.items() if any(f" {term} " in toks for term in terms)}


pytestmark = pytest.mark.timeout(120)
START = 1_700_000_000_000_000


@pytest.fixture(scope="module")
def pop():
    return Population(1500, seed=7, events_per_account=3.0, graph_on_firehose=True)


@pytest.fixture(scope="module")
def decoded(pop):
    """Every frame decoded by the atproto SDK into (seq, type, message, CAR blocks or None)."""
    out = []
    for seq, data in pop.frames(start_seq=10, start_time_us=START):
        msg = parse_subscribe_repos_message(Frame.from_bytes(data))
        blocks = CAR.from_bytes(msg.blocks).blocks if hasattr(msg, "blocks") and hasattr(msg, "ops") else None
        out.append((seq, type(msg).__name__, msg, blocks))
    return out


def digest(p: Population, **kw) -> str:
    h = hashlib.sha256()
    for seq, data in p.frames(**kw):
        h.update(seq.to_bytes(8, "big") + data)
    return h.hexdigest()


def test_same_seed_same_bytes():
    a = digest(Population(300, seed=1, events_per_account=2), start_time_us=START)
    assert a == digest(Population(300, seed=1, events_per_account=2), start_time_us=START)
    assert a != digest(Population(300, seed=2, events_per_account=2), start_time_us=START)


def test_follower_counts_bluesky_shape():
    f = follower_counts(200_000, seed=0)
    assert np.median(f) == 1
    assert 0.045 <= (f > 95).mean() <= 0.055
    assert 0.001 < (f > 1000).mean() < 0.005
    assert f.min() == 0 and f.max() <= 200_000 // 4


def test_dids_distinct_and_well_formed(pop):
    assert len(set(pop.dids)) == pop.n
    assert all(len(d) == 32 and d.startswith("did:plc:") and set(d[8:]) <= set("abcdefghijklmnopqrstuvwxyz234567")
               for d in pop.dids)


def test_follow_graph_matches_follower_counts(pop, decoded):
    src, dst = pop.follow_edges
    assert (np.bincount(src, minlength=pop.n) == pop.followers).all()
    assert not (src == dst).any()
    assert len(np.unique(src * pop.n + dst)) == len(src)
    # the follow records on the wire say the same: repo = follower, subject = followed
    follows = Counter()
    for _, typ, msg, blocks in decoded:  # the follow graph comes first (graph_on_firehose)
        if typ != "Commit" or not msg.ops[0].path.startswith(frame_codec.FOLLOW):
            break
        for op in msg.ops:
            follows[blocks[op.cid]["subject"]] += 1
    assert sum(follows.values()) == len(src)
    assert all(follows.get(d, 0) == int(c) for d, c in zip(pop.dids, pop.followers))


def test_expected_counts_match_decoded_frames(pop, decoded):
    exp = pop.expected()
    seen = Counter()
    for _, typ, msg, blocks in decoded:
        seen[typ] += 1
        if typ != "Commit":
            continue
        for op in msg.ops:
            coll = op.path.split("/")[0]
            if op.action == "delete":
                seen["delete"] += 1
                seen["delete_" + coll.rsplit(".", 1)[1]] += 1
                continue
            rec = blocks[op.cid]
            assert rec["$type"] == coll
            kind = coll.rsplit(".", 1)[1]
            seen[kind] += 1
            if kind == "post":
                seen["reply"] += "reply" in rec
                seen["quote"] += "embed" in rec
    assert len(decoded) == exp["frames"]
    assert [s for s, *_ in decoded] == list(range(10, 10 + exp["frames"]))
    assert seen["Commit"] == exp["commits"]
    for kind in ("post", "reply", "quote", "like", "repost", "follow", "delete", "delete_post", "delete_like"):
        assert seen[kind] == exp[kind], kind
    assert (seen["Account"], seen["Identity"], seen["Sync"]) == (exp["account"], exp["identity"], exp["sync"])
    assert exp["delete"] > 0 and exp["account"] > 0 and exp["quote"] > 0 and exp["reply"] > 0


def test_events_match_wire_content(pop, decoded):
    """tests.helpers.synth_truth.expected_events is exactly what the frames carry (the ingester's expected output)."""
    wire = []
    for seq, typ, msg, blocks in decoded:
        if typ != "Commit":
            continue
        for op in msg.ops:
            coll, rkey = op.path.split("/")
            ev = {"did": msg.repo, "rkey": rkey, "uri": f"at://{msg.repo}/{op.path}", "seq": seq,
                  "time_us": frame_codec.parse_iso_time_us(msg.time)}
            if coll == frame_codec.FOLLOW:
                ev["rev"] = msg.rev
            if op.action == "delete":
                ev.update(kind="delete", collection=coll)
            else:
                rec = blocks[op.cid]
                if coll == frame_codec.FOLLOW:
                    ev.update(kind="follow", subject_did=rec["subject"])
                elif coll == frame_codec.POST:
                    ev.update(kind="post", text=rec["text"], langs=rec.get("langs"))
                    if "reply" in rec:
                        ev.update(reply_parent=rec["reply"]["parent"]["uri"], reply_root=rec["reply"]["root"]["uri"])
                    if "embed" in rec:
                        ev["quote_uri"] = rec["embed"]["record"]["uri"]
                else:
                    ev.update(kind=coll.rsplit(".", 1)[1], subject_uri=rec["subject"]["uri"],
                              subject_did=rec["subject"]["uri"].split("/")[2])
            wire.append(ev)
    assert list(expected_events(pop, start_seq=10, start_time_us=START)) == wire


def test_references_point_to_earlier_records_with_right_cids(pop, decoded):
    created = {}  # uri -> cid string
    for _, typ, msg, blocks in decoded:
        if typ != "Commit":
            continue
        for op in msg.ops:
            uri = f"at://{msg.repo}/{op.path}"
            if op.action == "delete":
                assert uri in created, "deletes refer to records created earlier"
                continue
            rec = blocks[op.cid]
            refs = []
            if "subject" in rec and isinstance(rec["subject"], dict):
                refs.append(rec["subject"])
            refs += list(rec.get("reply", {}).values())
            if "embed" in rec:
                refs.append(rec["embed"]["record"])
            for ref in refs:
                assert created[ref["uri"]] == ref["cid"]
            created[uri] = op.cid.encode()


def test_topics_and_sentiment_vocabulary(pop):
    topics = load_topics()
    texts = [e["text"] for e in expected_events(pop, start_time_us=START) if e["kind"] == "post"]
    found = [topics_in(t, topics) for t in texts]
    assert all(len(s) <= 1 for s in found), "a post is about at most one topic"
    off = sum(not s for s in found) / len(found)
    assert 0.2 < off < 0.5
    assert {name for s in found for name in s} == set(topics)
    vader = SentimentIntensityAnalyzer()
    signs = Counter(np.sign(vader.polarity_scores(t)["compound"]) for t in texts[:400])
    assert signs[1] > 50 and signs[-1] > 50 and signs[0] > 5


def test_planted_episode(pop):
    truth = pop.episode_truth()
    topics = load_topics()
    f = pop.followers
    idx = {d: i for i, d in enumerate(pop.dids)}
    order = np.argsort(-f, kind="stable")
    top = {pop.dids[i] for i in order[: max(1, pop.n // 1000)]}
    top1pct = {pop.dids[i] for i in order[: pop.n // 100]}
    panel = {pop.dids[i] for i in order[:100]}
    assert set(truth["celebrities"]) <= top and len(truth["celebrities"]) >= 1
    assert len(truth["participants"]) == len(truth["middle"]) + len(truth["long_tail"]) >= 40
    assert not set(truth["participants"]) & top1pct and not set(truth["participants"]) & panel
    median = np.median(f)
    assert all(f[idx[d]] <= median for d in truth["long_tail"])
    # during the episode, the topic's posts come mostly from participants; celebrities also post
    base = pop.activity_start_us(START)
    lo, hi = base + truth["start_us"], base + truth["end_us"]
    by = Counter()
    for e in expected_events(pop, start_time_us=START):
        if e["kind"] == "post" and lo <= e["time_us"] <= hi and truth["topic"] in topics_in(e["text"], topics):
            by["participant" if e["did"] in set(truth["participants"]) else
               "celebrity" if e["did"] in set(truth["celebrities"]) else "other"] += 1
    assert by["celebrity"] >= truth["celebrity_posts"] >= 1
    assert by["participant"] > 2 * (by["celebrity"] + by["other"])
    assert truth["counts"]["repost"] > 0 and truth["counts"]["like"] > 0


def test_retractions(pop):
    r = pop.retractions(START)
    events = list(expected_events(pop, start_time_us=START))
    deleted = [e["uri"] for e in events if e["kind"] == "delete"]
    assert sorted(deleted) == sorted(r["deleted"]) and deleted
    # deactivated accounts are silent after their #account frame
    times = {}
    for seq, t, data in pop.timed_frames(start_time_us=START):
        h, b = frame_codec.split_frame(data)
        if h["t"] == "#account":
            assert b["active"] is False and b["status"] == "deactivated"
            times[b["did"]] = t
    assert set(times) == set(r["deactivated"])
    assert not [e for e in events if e["did"] in times and e["time_us"] > times[e["did"]]]


def test_large_population_arrays_are_cheap():
    p = Population(1_670_000, seed=0)
    f = p.followers
    assert len(f) == 1_670_000 and np.median(f) == 1 and (f > 1000).mean() < 0.005
    assert len(p.did_bytes) == 1_670_000


def test_graph_not_on_the_firehose_by_default_and_changes_live():
    """By default the pre-existing graph is only in the repositories; the firehose carries the
    follows and unfollows of the activity span (each delete names a follow record that exists),
    and final_follow_edges() is the graph they make."""
    from stream.sim.repos import SyntheticRepos

    pop = Population(400, seed=4, events_per_account=2)
    n_frames = len(list(pop.frames(start_time_us=START)))
    both = Population(400, seed=4, events_per_account=2, graph_on_firehose=True)
    assert pop.expected()["frames"] == n_frames
    assert both.expected()["frames"] == n_frames + len(both._follow_commits) - 1
    exp = pop.expected()
    assert exp["live_follow"] > 0 and exp["unfollow"] > 0 and exp["follow"] == exp["live_follow"]
    # records before the firehose: exactly the pre-existing graph
    repos = SyntheticRepos(pop, 1, START)
    records = {pop.did(i): dict(repos.state(i, 0).follows) for i in range(pop.n)}
    src, dst = pop.follow_edges
    pre = {(pop.did(int(b)), pop.did(int(a))) for a, b in zip(src, dst)}
    assert {(d, s) for d, recs in records.items() for s in recs.values()} == pre
    for ev in expected_events(pop, start_time_us=START):
        if ev["kind"] == "follow":
            assert ev["rkey"] not in records[ev["did"]]
            records[ev["did"]][ev["rkey"]] = ev["subject_did"]
        elif ev.get("collection") == frame_codec.FOLLOW:
            assert records[ev["did"]].pop(ev["rkey"], None) is not None, "an unfollow deletes an existing follow"
    deact = set(pop.retractions()["deactivated"])
    edges = {(d, s) for d, recs in records.items() if d not in deact for s in recs.values()}
    fs, fd = pop.final_follow_edges()
    assert edges == {(pop.did(int(b)), pop.did(int(a))) for a, b in zip(fs, fd)}
    assert edges - pre and pre - edges  # some follows made, some undone
    # the repositories at the end hold the same follow records (what a late backfill reads)
    last = n_frames
    assert {pop.did(i): dict(repos.state(i, last).follows) for i in range(pop.n)} == records

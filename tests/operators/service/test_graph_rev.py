"""The follow graph's reconciliation rules (operators/service/state.py): per edge the newest rev
wins (an add on a tie), removes by record URI before or after their add, purges and the stale adds
after them, in-degree follower counts; the result does not depend on the order the ops arrive in."""

from __future__ import annotations

import itertools
import random

import numpy as np

from operators.service.state import OperatorState
from stream.schemas import GraphEdge, graph_value
from stream.sim.frames import tid

T = 1_735_689_600_000_000
FOLLOW = "app.bsky.graph.follow"


def op(kind, src, dst, sec, rkey="r1", rev=True):
    """An edge op at ``sec`` (its rev is tid(T + sec s)); src None: a remove by URI."""
    t = T + int(sec * 1e6)
    src, dst = (None if src is None else did(src)), did(dst)
    return GraphEdge(**graph_value(kind, src, dst, t, f"at://{dst}/{FOLLOW}/{rkey}", tid(t) if rev else None))


def did(name: str) -> str:
    return name if name.startswith("did:") else f"did:test:{name}"


def name(d: str) -> str:
    return d.removeprefix("did:test:")


def account_gone(dst, sec):
    return GraphEdge(**graph_value("purge", None, did(dst), T + int(sec * 1e6)))


def edges(st: OperatorState) -> set[tuple[str, str]]:
    src, dst = st.edges()
    return {(name(st.dids[s]), name(st.dids[d])) for s, d in zip(src.tolist(), dst.tolist())}


def apply_all(ops) -> OperatorState:
    st = OperatorState()
    for e in ops:
        st.apply_edge(e)
    return st


def test_live_op_not_newer_than_the_backfill_changes_nothing():
    backfill = op("add", "s", "f", 10)           # the repo's checkpoint at rev 10 holds the follow
    old_remove = op("remove", "s", "f", 5, rkey="old")  # an older record of the same edge, deleted before
    old_add = op("add", "s", "f", 3, rkey="old")
    for order in itertools.permutations([backfill, old_remove, old_add]):
        assert edges(apply_all(order)) == {("s", "f")}


def test_delete_of_a_backfilled_follow_by_uri_alone_in_any_order():
    """The worker never saw the create, so its remove has no src: resolved by the record URI,
    whether it arrives before or after the backfill's add."""
    add = op("add", "s", "f", 10)
    gone = op("remove", None, "f", 20)         # deleted live after the checkpoint
    stale = op("remove", None, "f", 5, rkey="r1")  # a remove older than the checkpoint's rev
    for order in itertools.permutations([add, gone]):
        st = apply_all(order)
        assert edges(st) == set() and st.followers[st.index[did("s")]] == 0
    st = apply_all([stale, add])
    assert edges(st) == {("s", "f")}


def test_follow_created_after_the_checkpoint_is_kept():
    backfill = op("add", "a", "f", 10, rkey="r1")
    live = op("add", "b", "f", 15, rkey="r2")  # not in the checkpoint: only on the firehose
    for order in itertools.permutations([backfill, live]):
        assert edges(apply_all(order)) == {("a", "f"), ("b", "f")}


def test_account_removal_drops_backfilled_follows_and_later_stale_adds():
    ops = [op("add", "a", "f", 10, "r1"), op("add", "b", "f", 11, "r2"), op("add", "a", "g", 12, "r3"),
           account_gone("f", 30)]
    late = op("add", "c", "f", 12, "r4")  # a backfill fetched before the deactivation, arriving after
    after = op("add", "d", "f", 40, "r5")  # a follow after reactivation
    for order in itertools.permutations(ops[:3] + [late]):
        st = apply_all([*order[:2], ops[3], *order[2:], after])
        assert edges(st) == {("a", "g"), ("d", "f")}
        assert st.followers[st.index[did("a")]] == 1 and st.followers[st.index[did("d")]] == 1


def test_tie_goes_to_the_add_and_ops_without_rev_order_by_time():
    a, r = op("add", "s", "f", 10), op("remove", "s", "f", 10)
    for order in ([a, r], [r, a]):
        assert edges(apply_all(order)) == {("s", "f")}
    assert edges(apply_all([op("add", "s", "f", 10, rev=False), op("remove", "s", "f", 11, rev=False)])) == set()


def test_random_histories_are_order_free_and_followers_are_in_degrees():
    """Random follow records (each created once, maybe deleted once later, its add also re-sent by
    a backfill at a later checkpoint rev while it exists): any arrival order gives the same graph,
    the one the records say, and in-degrees equal follower counts."""
    rng = random.Random(3)
    users = [f"did:u{i}" for i in range(12)]
    for trial in range(30):
        ops = []
        for k in range(80):
            f, s = rng.sample(users, 2)
            born = rng.uniform(0, 100)
            dies = born + rng.uniform(0, 100) if rng.random() < 0.4 else None
            rkey = f"r{k}"
            ops.append(op("add", s, f, born, rkey))
            checkpoint = rng.uniform(born, 200)  # a backfill while the record exists
            if dies is None or checkpoint < dies:
                ops.append(op("add", s, f, checkpoint, rkey))
            if dies is not None:
                ops.append(op("remove", s if rng.random() < 0.5 else None, f, dies, rkey))
        # the rule, computed directly: per edge the newest op (an add on a tie) decides
        subject = {e.uri: e.src for e in ops if e.op == "add"}
        newest: dict[tuple[str, str], tuple[str, bool]] = {}
        for e in ops:
            edge = (name(e.src or subject[e.uri]), name(e.dst))
            newest[edge] = max(newest.get(edge, ("", False)), (e.rev, e.op == "add"))
        truth = {edge for edge, (_, present) in newest.items() if present}
        for _ in range(4):
            shuffled = ops[:]
            rng.shuffle(shuffled)
            st = apply_all(shuffled)
            assert edges(st) == truth
            src, _ = st.edges()
            assert (np.bincount(src, minlength=st.n_rows) == st.followers[: st.n_rows]).all()

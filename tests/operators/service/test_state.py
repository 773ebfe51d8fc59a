"""OperatorState: registry, idempotent updates, padded capacity that doubles without retracing."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from operators import indicators
from operators.attribution import attribute, trace_count
from operators.graph import reach
from operators.service.state import MIN_CAPACITY, OperatorState
from stream.schemas import Features, GraphEdge


# The state's own logic, on records built without the schema's checks (short ids, a short vector):
# what a consumer accepts is tested with the schemas (tests/operators/service/test_service_poison.py).
def feat(did, end, topics=None, followers=0, expired=None):
    return Features.model_construct(did=did, window_end=end, followers=followers, topics=topics or {},
                                    expired=expired)


def edge(op, src, dst, t, uri=None):
    return GraphEdge.model_construct(op=op, src=src, dst=dst, time_us=t, uri=uri)


def test_latest_features_per_did_win_and_replace_every_topic():
    st = OperatorState()
    st.apply_features(feat("a", 60, {"x": [1, 2, 3, 4], "y": [5, 0, 0, 0]}, followers=7))
    assert st.take_changed() == {"x", "y"} and st.take_changed() == set()
    r = st.index["a"]
    assert st.followers[r] == 0 and st.window_end == 60  # followers come from the graph only
    st.apply_features(feat("a", 120, {"x": [1, 2, 3, 4]}, followers=8))   # y gone -> zero
    assert st.take_changed() == {"y"}
    np.testing.assert_array_equal(st.host_features("y")[r], 0)
    assert not st.apply_features(feat("a", 60, {"y": [9, 9, 9, 9]}))       # older: ignored
    np.testing.assert_array_equal(st.host_features("y")[r], 0)
    st.apply_features(feat("a", 180, expired=True))
    assert st.take_changed() == {"x"} and not st.host_features("x").any()
    with pytest.raises(ValueError, match="expected 4 values"):
        st.apply_features(feat("b", 180, {"x": [1, 2]}))


def test_edges_are_an_idempotent_set_and_the_graph_is_rebuilt_only_on_change():
    st = OperatorState()
    assert st.apply_edge(edge("add", "a", "b", 1)) and not st.apply_edge(edge("add", "a", "b", 1))
    st.apply_edge(edge("add", "a", "c", 2))
    st.apply_edge(edge("add", "c", "b", 3))
    assert st.apply_edge(edge("remove", "c", "b", 4)) and st.n_edges == 2
    assert not st.apply_edge(edge("add", "c", "b", 3))          # older than the remove: ignored
    g = st.graph()
    assert st.graph() is g and g.n == st.capacity and g.num_edges == st.edge_capacity == MIN_CAPACITY
    # a (row 0) is followed by b and c: R = 2 q_a exactly when only a is active
    q = np.zeros(st.capacity, np.float32)
    q[st.index["a"]] = 0.25
    assert float(reach(g, q)) == pytest.approx(0.5, rel=1e-6)
    st.apply_edge(edge("remove", "a", "b", 5))
    assert st.graph() is not g and float(reach(st.graph(), q)) == pytest.approx(0.25, rel=1e-6)


def test_followers_are_the_graph_in_degree_and_removes_by_record_resolve():
    st = OperatorState()
    follows = [("a", f"f{i}", f"at://f{i}/app.bsky.graph.follow/r{i}") for i in range(4)]
    follows += [("b", "f0", "at://f0/app.bsky.graph.follow/rb")]
    for i, (src, dst, uri) in enumerate(follows):
        assert st.apply_edge(edge("add", src, dst, i, uri))
    fol = lambda d: int(st.followers[st.index[d]])  # noqa: E731
    assert (fol("a"), fol("b"), fol("f0"), st.n_edges) == (4, 1, 0, 5)
    # a firehose delete names only the record: resolved to (a, f1)
    assert st.apply_edge(edge("remove", None, "f1", 10, follows[1][2]))
    assert (fol("a"), st.n_edges) == (3, 4)
    # a record of another follower: ignored and counted; an unknown record: its remove waits for
    # the record's add (a backfill published after the live delete), then applies
    assert not st.apply_edge(edge("remove", None, "f2", 11, follows[3][2]))
    assert not st.apply_edge(edge("remove", None, "f1", 11, "at://f1/app.bsky.graph.follow/zz"))
    assert st.edge_ops_ignored == 1 and fol("a") == 3
    assert not st.apply_edge(edge("add", "b", "f1", 5, "at://f1/app.bsky.graph.follow/zz"))
    assert fol("b") == 1 and st.n_edges == 4
    # f0's account is gone at t=20: both its edges go; a later re-follow (t=21) survives the purge
    st.apply_edge(edge("purge", None, "f0", 20))
    st.apply_edge(edge("add", "b", "f0", 21, "at://f0/app.bsky.graph.follow/rc"))
    src, dst = st.edges()
    got = sorted(zip((st.dids[i] for i in src), (st.dids[i] for i in dst)))
    assert got == [("a", "f2"), ("a", "f3"), ("b", "f0")]
    assert (fol("a"), fol("b")) == (2, 1)


def test_replaying_everything_twice_gives_the_same_state():
    msgs = [feat(f"d{i}", 60 * (1 + i % 3), {"x": [i, 1, 0.5, 0]}, followers=i) for i in range(50)]
    msgs += [feat("d3", 30, {"x": [99, 0, 0, 0]})]  # stale duplicate
    edges = [edge("add", f"d{i}", f"d{(i * 7) % 50}", i) for i in range(50)] + [edge("remove", "d1", "d7", 99)]
    once, twice = OperatorState(), OperatorState()
    for m in msgs + edges:
        (once.apply_features if isinstance(m, Features) else once.apply_edge)(m)
    for m in msgs + edges + msgs + edges:
        (twice.apply_features if isinstance(m, Features) else twice.apply_edge)(m)
    np.testing.assert_array_equal(once.host_features("x"), twice.host_features("x"))
    np.testing.assert_array_equal(once.followers, twice.followers)
    for a, b in zip(once.edges(), twice.edges()):
        np.testing.assert_array_equal(a, b)


def test_capacity_doubles_and_compiled_shapes_hold_within_a_capacity():
    st = OperatorState()
    traces = []

    @jax.jit
    def total(x):
        traces.append(x.shape)
        return x.sum()

    F = indicators.polarization(weight_col=0, stance_col=2)
    rng = np.random.default_rng(0)
    before = None
    for i in range(3 * MIN_CAPACITY // 2):
        st.apply_features(feat(f"did:{i}", 60, {"t": [1 + i % 5, 0, rng.normal(), 0]}))
        if i in (10, 500, MIN_CAPACITY - 3, MIN_CAPACITY - 2, MIN_CAPACITY + 10, 3 * MIN_CAPACITY // 2 - 1):
            view = st.features("t")
            host = st.host_features("t")
            np.testing.assert_array_equal(np.asarray(view.x), host)   # device copy == host
            assert view.x.shape == (st.capacity, 4) and st.n_rows + 1 <= st.capacity
            assert float(total(view.x)) == pytest.approx(float(host.sum()), rel=1e-5)
            res = attribute(F, view.x, indicators.default_baseline(F, view.x, view.active), steps=8)
            assert abs(float(res.delta)) <= 1e-3 * abs(float(res.value - res.baseline_value))
            if before is None:
                before = trace_count()
    assert st.capacity == 2 * MIN_CAPACITY
    # one compile per capacity (1024 rows until the 1023rd agent, then 2048), not one per hop
    assert [s[0] for s in traces] == [MIN_CAPACITY, 2 * MIN_CAPACITY]
    assert trace_count() - before <= 1  # 0 if another test compiled this shape already


def test_edge_set_compaction_keeps_semantics(monkeypatch):
    from operators.service.state import EdgeSet

    monkeypatch.setattr(EdgeSet, "MERGE_AT", 4)  # merge into the sorted arrays every 4 ops
    es, truth = EdgeSet(), {}
    rng = np.random.default_rng(3)
    for t in range(300):
        key, present = int(rng.integers(0, 40)), bool(rng.random() < 0.6)
        when = t - int(rng.integers(0, 5))  # some ops arrive late
        changed = es.apply(key, when, present)
        last = truth.get(key)
        if last is None or when >= last[0]:
            assert changed == (present != (last is not None and last[1]))
            truth[key] = (when, present)
        else:
            assert not changed
    expect = sorted(k for k, (_, p) in truth.items() if p)
    assert es.present().tolist() == expect and es.count == len(expect)
    es.add_many(np.array([100, 101]))
    assert es.count == len(expect) + 2 and es.present()[-2:].tolist() == [100, 101]


def test_out_edges_overlay_recent_ops_without_compacting(monkeypatch):
    """out_edges reads the sorted arrays with the recent ops laid over them (adds, removes, re-adds
    of keys the arrays hold and of new ones) and equals the truth, and it leaves the recent ops
    uncompacted (a compaction rewrites every array)."""
    from operators.service.state import EdgeSet

    monkeypatch.setattr(EdgeSet, "MERGE_AT", 10**9)  # never merge by size here
    rng = np.random.default_rng(5)
    es, truth = EdgeSet(), {}
    base = np.unique(rng.integers(0, 30, 400) << 32 | rng.integers(0, 50, 400))
    es.add_many(base)
    truth.update({int(k): True for k in base})
    for t in range(1, 500):  # ops on keys the arrays hold and on new keys
        key = int(rng.integers(0, 30)) << 32 | int(rng.integers(0, 50))
        present = bool(rng.random() < 0.5)
        es.apply(key, t, present)
        truth[key] = present
        if t % 100 == 0:
            for rows in (rng.choice(30, 7, replace=False), np.arange(30), np.array([], np.int64)):
                got = es.out_edges(rows)
                expect = sorted(k for k, p in truth.items() if p and (k >> 32) in set(rows.tolist()))
                assert got.tolist() == expect
            assert es._recent  # nothing was compacted
    assert es.present().tolist() == sorted(k for k, p in truth.items() if p)


def test_bulk_load_matches_streamed_updates():
    dids = [f"did:{i}" for i in range(30)]
    x = np.arange(120, dtype=np.float32).reshape(30, 4)
    src, dst = np.arange(29), np.arange(1, 30)
    bulk = OperatorState()
    bulk.load(dids, np.arange(30), {"t": x}, 60, src, dst)
    streamed = OperatorState()
    for i, d in enumerate(dids):
        streamed.apply_features(feat(d, 60, {"t": x[i].tolist()}, followers=i))
    for s, d in zip(src, dst):
        streamed.apply_edge(edge("add", dids[s], dids[d], 0))
    np.testing.assert_array_equal(bulk.host_features("t"), streamed.host_features("t"))
    for a, b in zip(bulk.edges(), streamed.edges()):
        np.testing.assert_array_equal(a, b)
    assert bulk.take_changed() == {"t"} and bulk.n_edges == 29


@pytest.mark.parametrize("small_edges", [None, 0], ids=["edge-list", "bucketed"])
def test_panel_subgraph_gives_exactly_the_full_graph_panel_attribution(small_edges):
    from tests.helpers.operators_data import heavy_features, random_graph, reach_reference

    rng = np.random.default_rng(11)
    n = 300
    src, dst = random_graph(rng, n, 2400)
    st = OperatorState() if small_edges is None else OperatorState(small_edges=small_edges)
    st.load([f"did:{i}" for i in range(n)], np.bincount(src, minlength=n), {}, 60, src, dst)
    panel = np.argsort(-st.followers[:n], kind="stable")[:20]
    sub = st.panel_graph(panel)
    assert st.panel_graph(panel[::-1]) is sub                          # cached (order-free)
    assert sub.n == st.graph().n == st.capacity
    x = np.zeros((st.capacity, 1), np.float32)
    x[:n, 0] = heavy_features(rng, n, 1)[:, 0]
    xp = np.zeros_like(x)
    xp[panel] = x[panel]                                               # others at the zero baseline
    full = attribute(indicators.cascade_reach(st.graph(), p=0.3), xp, np.zeros_like(x), steps=16)
    part = attribute(indicators.cascade_reach(sub, p=0.3), xp, np.zeros_like(x), steps=16)
    q = 0.3 * (1 - np.exp(-xp[:n, 0].astype(np.float64)))
    assert float(part.value) == pytest.approx(reach_reference(src, dst, n, q), rel=1e-5)
    assert float(part.value) == pytest.approx(float(full.value), rel=1e-6)
    np.testing.assert_allclose(np.asarray(part.phi), np.asarray(full.phi), rtol=1e-5, atol=1e-7)
    assert not np.asarray(part.phi)[np.setdiff1d(np.arange(st.capacity), panel)].any()
    st.apply_edge(edge("add", f"did:{panel[0]}", "did:299", 10**6))   # edge set changed: rebuilt
    assert st.panel_graph(panel) is not sub


def test_small_graph_subgraphs_share_one_compiled_program_across_topics_panels_and_hops():
    """Below SMALL_EDGES every topic's active subgraph and every panel is an edge list of one
    shared capacity: after the first attribution, other topics, panels and later hops with a
    changed graph compile nothing (the quadrature rule and node count do not enter the program
    either), and each answer is the exact one (closed form on the explicit graph)."""
    from operators.attribution import attribute, trace_count
    from tests.helpers.operators_data import heavy_features, random_graph, reach_reference

    rng = np.random.default_rng(5)
    n = 400
    src, dst = random_graph(rng, n, 3000)
    st = OperatorState()
    st.load([f"did:{i}" for i in range(n)], np.bincount(src, minlength=n), {}, 60, src[:1100], dst[:1100])
    assert st.small()
    x = np.zeros(st.capacity, np.float32)
    x[:n] = heavy_features(rng, n, 1)[:, 0]
    before = None
    for hop, (rule, steps) in enumerate([("gauss-kronrod-graded", 17), ("gauss-kronrod-graded", 9),
                                         ("gauss-legendre", 5), ("gauss-kronrod-graded", 33)]):
        if hop:
            for k in range(1100 + 300 * (hop - 1), 1100 + 300 * hop):  # grows every hop (within 2,048)
                st.apply_edge(edge("add", f"did:{src[k]}", f"did:{dst[k]}", 10**6 + k))
        active = rng.random(st.capacity) < 0.4
        active[n:] = False
        panel = np.argsort(-st.followers[:n], kind="stable")[:20]
        for g, members in ((st.active_graph(f"t{hop % 2}", active), active),
                           (st.panel_graph(panel[active[panel]], f"t{hop % 2}/panel"), None)):
            keep = active.copy() if members is not None else np.isin(np.arange(st.capacity), panel) & active
            xs = np.where(keep, x, 0.0).astype(np.float32)
            res = attribute(indicators.cascade_reach(g, p=0.3), xs, np.zeros_like(xs), steps=steps, rule=rule)
            if before is None:
                before = trace_count()
            s_all, d_all = (np.array(v) for v in st.edges())
            q = 0.3 * (1 - np.exp(-xs[:n].astype(np.float64)))
            assert float(res.value) == pytest.approx(reach_reference(s_all, d_all, n, q), rel=1e-5)
    assert st.n_edges == 2000
    assert trace_count() == before  # one program: topics, panels, rules, node counts, a growing graph

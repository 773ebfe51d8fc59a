"""Per-topic active subgraphs and incremental layouts: the same R and phi as the full graph.

Truth: the full follow graph built fresh from the current edge set (FollowGraph, itself checked
against brute force in test_graph.py), attributed with the same nodes; agreement to float32
rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from operators import attribute, indicators
from operators.graph import FollowGraph, GraphStack, reach
from operators.service.state import OperatorState
from stream.schemas import GraphEdge

from tests.helpers.operators_data import random_graph

RTOL = 2e-5  # float32 rounding of sums in a different order, relative to max |phi|


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() <= rtol * scale, np.abs(a - b).max() / scale


def _same_reach(g, truth, q, rel: float = 1e-5) -> None:
    """R and dR/dq of graph ``g`` equal those of ``truth`` at q (float32 rounding)."""
    vg = jax.jit(jax.value_and_grad(reach, argnums=1))
    (v1, g1), (v0, g0) = vg(g, jnp.asarray(q)), vg(truth, jnp.asarray(q))
    assert float(v1) == pytest.approx(float(v0), rel=rel)
    _close(g1, g0)


def _fresh(st: OperatorState) -> FollowGraph:
    src, dst = st.edges()
    return FollowGraph.padded(src, dst, st.n_rows, st.capacity, 1 << 14)


def test_graph_stack_equals_a_fresh_build_of_the_net_edge_set(rng):
    n, cap = 300, 512
    src, dst = random_graph(rng, n, 2500)
    keys = (src.astype(np.int64) << 32) | dst
    removed, added = keys[:400], keys[2000:]  # base holds keys[:2000]; 400 of them removed later
    layer = lambda k: FollowGraph.padded(k >> 32, k & 0xFFFFFFFF, n, cap, 4096)
    pad = lambda k: (np.append(k >> 32, [cap] * 7), np.append(k & 0xFFFFFFFF, [cap] * 7))  # dummy edges
    st = GraphStack(layer(keys[:2000]), (pad(added), pad(removed)), (1.0, -1.0))
    net = keys[400:]
    full = layer(net)
    q = np.zeros(cap, np.float32)
    q[:n] = 0.4 * rng.random(n)
    _same_reach(st, full, q)
    with pytest.raises(ValueError, match="one sign"):
        GraphStack(layer(net), (pad(added),), (2.0,))


def test_graph_stack_loops_over_the_real_chunks_of_a_long_padded_delta_list(rng):
    """A delta list of several DELTA_CHUNKs, in any order, padded far beyond its length (the
    reductions loop over its real chunks only), gives the net edge set's R and gradient; the
    padding node n is refused anywhere but in the padding edge n -> n."""
    from operators.graph import DELTA_CHUNK

    n, cap = 3000, 4096
    src, dst = random_graph(rng, n, 2 * DELTA_CHUNK + 30_000)
    keys = (src.astype(np.int64) << 32) | dst
    base, added = keys[:20_000], keys[20_000:]  # ~2.2 chunks added, 5,000 base edges removed
    removed = base[:5000]
    layer = lambda k: FollowGraph.padded(k >> 32, k & 0xFFFFFFFF, n, cap, 1 << 19)
    delta = np.concatenate([added, removed])
    sign = np.concatenate([np.ones(added.size), -np.ones(removed.size)]).astype(np.float32)
    pad_to = 8 * DELTA_CHUNK
    at = rng.choice(pad_to, delta.size, replace=False)  # real entries spread among the padding
    s_, d_ = np.full(pad_to, cap, np.int64), np.full(pad_to, cap, np.int64)
    s_[at], d_[at] = delta >> 32, delta & 0xFFFFFFFF
    w = np.ones(pad_to, np.float32)
    w[at] = sign
    st = GraphStack(layer(base), ((s_, d_),), (w,))
    assert int(st.delta_trips) == -(-delta.size // DELTA_CHUNK) < pad_to // DELTA_CHUNK
    full = layer(np.concatenate([base[5000:], added]))
    q = np.zeros(cap, np.float32)
    q[:n] = 0.3 * rng.random(n)
    _same_reach(st, full, q)
    with pytest.raises(ValueError, match="padding node"):
        GraphStack(layer(base), ((np.array([cap, 3]), np.array([5, cap])),), (1.0,))


def _topic_features(rng, n, cap, active):
    x = np.zeros((cap, 4), np.float32)
    posts = 1.0 + np.floor(rng.pareto(1.5, n))
    x[:n, 0] = np.where(active, posts, 0.0)
    x[:n, 2] = x[:n, 0] * rng.uniform(-1, 1, n)
    x[:n, 3] = np.where(active, np.floor(rng.pareto(2.0, n)), 0.0)
    return x


def test_active_subgraph_gives_the_full_graph_phi_across_hops(rng):
    """Agents become active and inactive, edges are added and removed (some to and from
    covered agents) over several hops; every hop the subgraph's phi, R(x) and R(0) equal those of
    a fresh full graph, and the base is built once (rebuilds switched off: only the layers move)."""
    n = 400
    src, dst = random_graph(rng, n, 6000)
    st = OperatorState(small_edges=0)  # the incremental subgraphs (a graph above SMALL_EDGES)
    dids = [f"did:plc:{i:04d}" for i in range(n)]
    st.load(dids, np.bincount(src, minlength=n), {}, 60, src[:5000], dst[:5000])
    cap = st.capacity
    pending = list(zip(src[5000:].tolist(), dst[5000:].tolist()))
    present = list(zip(src[:5000].tolist(), dst[:5000].tolist()))
    active = rng.random(n) < 0.3
    t = 1
    for hop in range(5):
        if hop:  # churn: 3% of agents flip, 100 edges added, 100 removed
            flip = rng.random(n) < 0.03
            active = active ^ flip
            for _ in range(100):
                s, d = pending.pop()
                st.apply_edge(GraphEdge(op="add", src=dids[s], dst=dids[d], time_us=t))
                present.append((s, d))
                t += 1
            for i in rng.choice(len(present), 100, replace=False):
                s, d = present[i]
                st.apply_edge(GraphEdge(op="remove", src=dids[s], dst=dids[d], time_us=t))
                t += 1
        x = _topic_features(rng, n, cap, active)
        x_in = jnp.asarray(x[:, 0] + x[:, 3])
        mask = np.zeros(cap, bool)
        mask[:n] = active
        g = st.active_graph("t", mask)
        st.subgraph("t").rebuild_delta = st.subgraph("t").rebuild_stale = 10.0  # never rebuild here
        sub, full = indicators.cascade_reach(g), indicators.cascade_reach(_fresh(st))
        a_sub = attribute(sub, x_in, steps=12, rule="gauss-legendre-graded")
        a_full = attribute(full, x_in, steps=12, rule="gauss-legendre-graded")
        _close(a_sub.phi, a_full.phi)
        assert float(a_sub.value) == pytest.approx(float(a_full.value), rel=1e-5)
        assert float(a_sub.baseline_value) == float(a_full.baseline_value) == 0.0
        assert np.all(np.asarray(a_sub.phi)[:n][~active] == 0.0)
    sg = st.subgraph("t")
    assert sg.builds == 1  # incremental: the base was never rebuilt
    assert (sg.sign > 0).any() and (sg.sign < 0).any()  # edges added and removed since the base


def test_subgraph_rebuilds_when_the_layers_grow_and_stays_exact(rng):
    n = 200
    src, dst = random_graph(rng, n, 3000)
    st = OperatorState(small_edges=0)
    dids = [f"did:plc:{i:04d}" for i in range(n)]
    st.load(dids, np.zeros(n), {}, 60, src[:1000], dst[:1000])
    mask = np.zeros(st.capacity, bool)
    mask[:n] = rng.random(n) < 0.5
    st.active_graph("t", mask)
    for k, (s, d) in enumerate(zip(src[1000:], dst[1000:])):  # 2,000 new edges: 2x the base
        st.apply_edge(GraphEdge(op="add", src=dids[s], dst=dids[d], time_us=k + 1))
    g = st.active_graph("t", mask)
    assert st.subgraph("t").builds == 2
    x = np.where(mask, 1.0 + rng.pareto(1.5, st.capacity), 0.0).astype(np.float32)
    _close(attribute(indicators.cascade_reach(g), x, steps=8).phi,
           attribute(indicators.cascade_reach(_fresh(st)), x, steps=8).phi)


def test_edge_set_out_edges_and_incremental_merge(rng):
    st = OperatorState()
    n = 50
    dids = [f"did:plc:{i:04d}" for i in range(n)]
    src, dst = random_graph(rng, n, 400)
    st.load(dids, np.zeros(n), {}, 60, src[:300], dst[:300])
    for k, (s, d) in enumerate(zip(src[300:], dst[300:])):
        st.apply_edge(GraphEdge(op="add", src=dids[s], dst=dids[d], time_us=k + 1))
    st.apply_edge(GraphEdge(op="remove", src=dids[src[0]], dst=dids[dst[0]], time_us=10_000))
    truth = set(zip(src[1:].tolist(), dst[1:].tolist()))
    rows = np.array([3, 7, 11, int(src[0])])
    got = st._edges.out_edges(rows)
    want = sorted((s << 32) | d for s, d in truth if s in set(rows.tolist()))
    assert got.tolist() == want
    st._edges.compact()
    assert np.all(np.diff(st._edges._keys) > 0)
    s, d = st.edges()
    assert set(zip(s.tolist(), d.tolist())) == truth


def test_reach_by_source_equals_reach_with_the_other_nodes_at_zero(rng):
    """R and its gradient with q given per source slot == reach() with q = 0 off the sources."""
    from operators.graph import reach_by_source

    n, cap = 500, 1024
    src, dst = random_graph(rng, n, 4000)
    keep = np.isin(src, rng.choice(n, 25, replace=False))  # a panel: 25 sources, their followers
    g = FollowGraph.padded(src[keep], dst[keep], n, cap, 1 << 12)
    used = g.t_nodes >= 0
    assert set(g.t_nodes[used].tolist()) == set(src[keep].tolist())
    q = np.zeros(cap, np.float32)
    q[g.t_nodes[used]] = 0.5 * rng.random(used.sum())
    q_t = np.where(used, q[np.maximum(g.t_nodes, 0)], 0.0).astype(np.float32)
    v0, g0 = jax.value_and_grad(reach, argnums=1)(g, jnp.asarray(q))
    v1, g1 = jax.value_and_grad(reach_by_source, argnums=1)(g, jnp.asarray(q_t))
    assert float(v1) == pytest.approx(float(v0), rel=1e-6)
    _close(np.asarray(g1)[used], np.asarray(g0)[g.t_nodes[used]])
    with pytest.raises(ValueError, match="one per source slot"):
        reach_by_source(g, jnp.asarray(q))
    with pytest.raises(ValueError, match="bucketed"):
        indicators.cascade_reach(FollowGraph(src, dst, n, layout="sorted"), by_source=True)


def test_service_panel_attribution_by_source_equals_the_full_rows(rng):
    """The service's panel and sample attributions of cascade reach on the members' rows only
    equal the same attributions over every row (the path used for small graphs)."""
    import dataclasses

    from operators.service.service import INDICATORS, OperatorService
    from stream.config import Settings

    n = 400
    src, dst = random_graph(rng, n, 5000)
    st = OperatorState(small_edges=0)
    dids = [f"did:plc:{i:04d}" for i in range(n)]
    active = rng.random(n) < 0.4
    x = np.zeros((n, 4), np.float32)
    x[:, 0] = np.where(active, 1.0 + np.floor(rng.pareto(1.5, n)), 0.0)
    st.load(dids, np.bincount(src, minlength=n).astype(float), {"t": x}, 60, src, dst)
    svc = OperatorService(Settings(indicators=["cascade_reach"]), steps=12, rule="gauss-legendre-graded",
                          panel_k=30, state=st)
    spec = INDICATORS["cascade_reach"]
    x_in, act = spec.inputs(st.features("t").x)
    F = indicators.cascade_reach(st.active_graph("t", np.asarray(act)))
    b = jnp.zeros_like(x_in)
    error = {"rule": "gauss-legendre-graded", "steps": 12}
    members = np.sort(rng.choice(n, 40, replace=False))
    fast = svc._members_phi(spec, F, x_in, b, members, act, None, error, "t/panel")
    full = svc._members_phi(dataclasses.replace(spec, panel_by_source=None), F, x_in, b, members, act, None,
                            error, "t/panel")
    assert np.count_nonzero(fast) > 5
    _close(fast, full)


def test_graph_stack_without_deltas_is_its_base_and_n_real_is_checked(rng):
    n, cap = 200, 256
    src, dst = random_graph(rng, n, 1500)
    base = FollowGraph.padded(src, dst, n, cap, 2048)
    _same_reach(GraphStack(base), base, np.where(np.arange(cap) < n, 0.4 * rng.random(cap), 0.0).astype(np.float32),
                rel=1e-6)
    for bad in (0, -3, cap + 1):
        with pytest.raises(ValueError, match="n_real"):
            GraphStack(base, n_real=bad)
    with pytest.raises(ValueError, match="must be >= 1"):
        FollowGraph.padded(src[:0], dst[:0], 0, cap, 16)

"""operators.graph: cascade reach value and custom VJP against independent truth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.graph import (CHUNK, LAYOUTS, MIN_CELLS, WIDTHS, FollowGraph, _log_survival, bucket_widths,
                             reach, reach_naive)


reach_jit = jax.jit(reach)
grad_jit = jax.jit(jax.grad(reach, 1))


def brute_reach(src, dst, n, q):
    """R = sum_j 1 - prod_{i->j}(1 - q_i), as a plain float64 loop over nodes and edges."""
    q = np.asarray(q, dtype=np.float64)
    total = 0.0
    for j in range(n):
        prod, has_in = 1.0, False
        for i, jj in zip(src, dst):
            if jj == j:
                prod *= 1.0 - q[i]
                has_in = True
        if has_in:
            total += 1.0 - prod
    return total


def random_graph(seed, n=12, e=40):
    rng = np.random.default_rng(seed)
    src, dst = rng.integers(0, n, e), rng.integers(0, n, e)
    q = rng.uniform(0.0, 0.6, n).astype(np.float32)
    return src, dst, n, q


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(4))
def test_value_matches_brute_force(seed, layout):
    src, dst, n, q = random_graph(seed)
    got = float(reach_jit(FollowGraph(src, dst, n, layout), q))
    assert got == pytest.approx(brute_reach(src, dst, n, q), rel=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_closed_forms(layout):
    # star: node 0 followed by k nodes -> R = k q0, dR/dq0 = k, others 0
    k = 5
    g = FollowGraph(np.zeros(k, int), np.arange(1, k + 1), k + 1, layout)
    q = jnp.array([0.3] + [0.7] * k, dtype=jnp.float32)
    assert float(reach_jit(g, q)) == pytest.approx(k * 0.3, rel=1e-6)
    assert float(reach(g, q)) == pytest.approx(k * 0.3, rel=1e-6)  # eager (no jit) path too
    np.testing.assert_allclose(grad_jit(g, q), [k] + [0.0] * k, rtol=1e-6)
    # fan-in: k sources all followed by node k -> R = 1 - prod(1 - q_i), dR/dq_i = prod_{l != i}(1 - q_l)
    g = FollowGraph(np.arange(k), np.full(k, k), k + 1, layout)
    qs = np.linspace(0.1, 0.5, k)
    q = jnp.asarray(np.append(qs, 0.9), dtype=jnp.float32)
    assert float(reach_jit(g, q)) == pytest.approx(1 - np.prod(1 - qs), rel=1e-6)
    want = [np.prod(np.delete(1 - qs, i)) for i in range(k)] + [0.0]
    np.testing.assert_allclose(grad_jit(g, q), want, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_graph_and_no_in_edges(layout):
    g = FollowGraph(np.array([], int), np.array([], int), 3, layout)
    q = jnp.full(3, 0.5, jnp.float32)
    assert float(reach_jit(g, q)) == 0.0
    np.testing.assert_array_equal(grad_jit(g, q), 0.0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(3))
def test_gradient_matches_naive_autodiff_and_finite_differences(seed, layout):
    src, dst, n, q = random_graph(seed)
    g = FollowGraph(src, dst, n, layout)
    custom = np.asarray(grad_jit(g, q))
    naive = np.asarray(jax.grad(lambda x: reach_naive(src, dst, n, x))(jnp.asarray(q)))
    np.testing.assert_allclose(custom, naive, rtol=1e-5, atol=1e-6)
    h = 1e-6  # central differences of the float64 brute force
    fd = np.array([(brute_reach(src, dst, n, q + h * e) - brute_reach(src, dst, n, q - h * e)) / (2 * h)
                   for e in np.eye(n)])
    np.testing.assert_allclose(custom, fd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nodes_nobody_follows_get_zero_gradient(layout):
    src, dst, n, q = random_graph(7, n=20, e=30)
    g = FollowGraph(src, dst, n, layout)
    grad = np.asarray(grad_jit(g, q))
    no_out = np.setdiff1d(np.arange(n), src)
    assert no_out.size > 0
    np.testing.assert_array_equal(grad[no_out], 0.0)
    assert np.all(grad[np.unique(src)] > 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_graph_same_value_and_gradient_zero_on_padding(layout):
    src, dst, n, q = random_graph(3)
    g = FollowGraph(src, dst, n)
    gp = FollowGraph.padded(src, dst, n, n_capacity=32, e_capacity=64, layout=layout)
    qp = np.full(32, 0.4, np.float32)  # non-zero q on padding nodes must be ignored
    qp[:n] = q
    assert float(reach_jit(gp, qp)) == pytest.approx(float(reach_jit(g, q)), rel=1e-6)
    grad, gradp = grad_jit(g, q), grad_jit(gp, qp)
    np.testing.assert_allclose(gradp[:n], grad, rtol=1e-6)
    np.testing.assert_array_equal(gradp[n:], 0.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jit_does_not_retrace_for_a_new_graph_of_the_same_padded_shape(layout):
    traces = []

    @jax.jit
    def value_and_grad(g, q):
        traces.append(1)
        return jax.value_and_grad(reach, 1)(g, q)

    results = []
    for seed, n in [(0, 12), (1, 10), (2, 15)]:
        src, dst, _, q = random_graph(seed, n=n, e=30 + seed)
        gp = FollowGraph.padded(src, dst, n, n_capacity=16, e_capacity=64, layout=layout)
        qp = np.zeros(16, np.float32)
        qp[:n] = q
        value, _ = value_and_grad(gp, qp)
        results.append((float(value), brute_reach(src, dst, n, q)))
    assert len(traces) == 1
    for got, want in results:
        assert got == pytest.approx(want, rel=1e-5)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="differ in length"):
        FollowGraph([0, 1], [1], 2)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        FollowGraph([0, 2], [1, 0], 2)
    with pytest.raises(ValueError, match="integer"):
        FollowGraph([0.5], [1.0], 2)
    with pytest.raises(ValueError, match="n_capacity"):
        FollowGraph.padded([0], [1], 2, n_capacity=2, e_capacity=4)
    with pytest.raises(ValueError, match="e_capacity"):
        FollowGraph.padded([0, 1], [1, 0], 2, n_capacity=4, e_capacity=1)
    with pytest.raises(ValueError, match="layout"):
        FollowGraph([0], [1], 2, layout="csr")
    with pytest.raises(ValueError, match="shape"):
        reach(FollowGraph([0], [1], 2), jnp.zeros(3))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.just(n),
    st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=12),
    st.lists(st.floats(0.0, 0.9), min_size=n, max_size=n))))
def test_property_value_and_gradient(case):
    n, edges, q = case
    layout = LAYOUTS[len(edges) % 2]
    src = np.array([e[0] for e in edges], int)
    dst = np.array([e[1] for e in edges], int)
    q = np.asarray(q, np.float32)
    g = FollowGraph(src, dst, n, layout)
    assert float(reach_jit(g, q)) == pytest.approx(brute_reach(src, dst, n, q), rel=1e-5, abs=1e-6)
    # gradient: dR/dq_i = sum_{j: i->j} prod_{l->j, other edges} (1 - q_l)  (product rule, brute force)
    want = np.zeros(n)
    for k, (i, j) in enumerate(edges):
        others = [1.0 - float(q[l]) for kk, (l, jj) in enumerate(edges) if jj == j and kk != k]
        want[i] += np.prod(others)
    np.testing.assert_allclose(grad_jit(g, q), want, rtol=1e-4, atol=1e-5)


def test_graph_is_a_pytree_with_static_n():
    g = FollowGraph([0, 1], [1, 2], 3)
    leaves, treedef = jax.tree_util.tree_flatten(g)
    g2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert g2.n == 3 and g2.num_edges == 2
    assert all(isinstance(a, (np.ndarray, np.generic, jax.Array)) for a in leaves)


def test_bucketed_layout_covers_heavy_tailed_degrees():
    # hubs followed by 600 and 300 nodes (split into chunks), one by 200, plus a chain
    n = 610
    src = np.concatenate([np.zeros(600, int), np.ones(300, int), np.full(200, 2), np.arange(3, 9)])
    dst = np.concatenate([np.arange(10, 610), np.arange(300, 600), np.arange(5, 205), np.arange(4, 10)])
    q = np.linspace(0.01, 0.5, n).astype(np.float32)
    g = FollowGraph(src, dst, n, "bucketed")
    chunks, owner, tables = g.bwd
    chunk_cap, big_cap, caps = g.capacities[1]
    assert (chunk_cap, big_cap) == (5, 2) and chunks.shape == (5, CHUNK)  # 3 + 2 chunks
    assert list(owner) == [0, 0, 0, 1, 1]
    assert bucket_widths(10**6)[-1] == CHUNK and [t.shape[1] for t in tables] == list(WIDTHS)
    assert all(t.shape[0] == c and c * t.shape[1] >= MIN_CELLS for t, c in zip(tables, caps))
    wide = FollowGraph(src, dst, n, capacities=(g.capacities[0], (8, 4, caps)))  # padded chunks
    assert list(wide.bwd[1]) == [0, 0, 0, 1, 1, 3, 3, 3]  # padding chunks: last wide slot, all fill
    assert np.all(np.asarray(wide.bwd[0])[5:] == g.capacities[0][1] + sum(g.capacities[0][2]))
    assert float(reach_jit(wide, q)) == pytest.approx(brute_reach(src, dst, n, q), rel=1e-5)
    assert float(reach_jit(g, q)) == pytest.approx(brute_reach(src, dst, n, q), rel=1e-5)
    want = np.asarray(jax.grad(lambda x: reach_naive(src, dst, n, x))(jnp.asarray(q)))
    np.testing.assert_allclose(grad_jit(g, q), want, rtol=1e-5)


def _s_slots(g, q):
    return np.asarray(jax.jit(_log_survival)(g, jnp.asarray(q)))


def test_bucketed_padding_contributes_exactly_zero():
    src, dst, n, q = random_graph(5, n=40, e=150)
    tight = FollowGraph(src, dst, n)
    f_spec, b_spec = tight.capacities
    grow = lambda s: (2 * s[0], 4 * s[1], tuple(8 * c for c in s[2]))  # much larger tables
    loose = FollowGraph(src, dst, n, capacities=(grow(f_spec), grow(b_spec)))
    assert all(a.size >= 2 * b.size for a, b in zip(jax.tree_util.tree_leaves(loose.fwd),
                                                   jax.tree_util.tree_leaves(tight.fwd)) if a.ndim == 2)
    s_t, s_l = _s_slots(tight, q), _s_slots(loose, q)
    # one non-zero S per node with an in-edge (q > 0), equal up to float rounding; padding slots exactly 0
    assert np.count_nonzero(s_t) == np.count_nonzero(s_l) == np.unique(dst).size
    np.testing.assert_allclose(np.sort(s_t[s_t != 0]), np.sort(s_l[s_l != 0]), rtol=1e-6)
    assert float(reach_jit(loose, q)) == pytest.approx(brute_reach(src, dst, n, q), rel=1e-6)
    np.testing.assert_allclose(grad_jit(loose, q), grad_jit(tight, q), rtol=1e-6)


def test_bucketed_no_retrace_within_capacity_retrace_after_a_class_doubles():
    traces = []

    @jax.jit
    def value_and_grad(g, q):
        traces.append(1)
        return jax.value_and_grad(reach, 1)(g, q)

    def check(g, src, dst, n, q):
        qp = np.zeros(g.n, np.float32)
        qp[:n] = q
        value, grad = value_and_grad(g, qp)
        assert float(value) == pytest.approx(brute_reach(src, dst, n, q), rel=1e-5)
        want = jax.grad(lambda x: reach_naive(src, dst, n, x))(jnp.asarray(q))
        np.testing.assert_allclose(np.asarray(grad)[:n], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(grad)[n:], 0.0)

    n_cap, e_cap = 2048, 2048
    src, dst, n, q = random_graph(0, n=300, e=1200)
    g1 = FollowGraph.padded(src, dst, n, n_cap, e_cap)
    check(g1, src, dst, n, q)
    src, dst, n, q = random_graph(1, n=280, e=1000)  # a changed graph of similar shape
    g2 = FollowGraph.padded(src, dst, n, n_cap, e_cap, capacities=g1.capacities)
    assert g2.capacities == g1.capacities
    check(g2, src, dst, n, q)
    assert len(traces) == 1
    # 600 followers following exactly one account each: S's width-1 class outgrows its 512 rows
    n = 700
    src3, dst3 = np.arange(600) % 50, np.arange(100, 700)
    q3 = np.random.default_rng(2).uniform(0.0, 0.6, n).astype(np.float32)
    g3 = FollowGraph.padded(src3, dst3, n, n_cap, e_cap, capacities=g2.capacities)
    width1 = WIDTHS.index(1)
    assert g3.capacities[0][2][width1] == 2 * g1.capacities[0][2][width1] == 1024
    check(g3, src3, dst3, n, q3)
    assert len(traces) == 2
    g4 = FollowGraph.padded(src, dst, 280, n_cap, e_cap, capacities=g3.capacities)  # capacities never shrink
    assert g4.capacities == g3.capacities
    check(g4, src, dst, 280, q)
    assert len(traces) == 2


def test_an_outgrown_table_grows_every_table_near_its_capacity_in_one_step():
    """When one class table outgrows its capacity (a recompile), every table of both indices more
    than 1 / HEADROOM full grows with it, and tables with room keep their capacity; the layout
    still computes R exactly (brute force)."""
    from operators.graph import HEADROOM, _plan

    deg = np.array([1] * 100 + [2] * 60 + [3] * 10)  # classes of width 1, 2, 3
    _, spec = _plan(deg)
    caps = list(spec[2])
    w1, w2, w3 = (WIDTHS.index(w) for w in (1, 2, 3))
    prev = (spec[0], spec[1], tuple(caps))
    full2 = int(caps[w2] / HEADROOM) + 1  # width-2 class over 1 / HEADROOM full, still fitting
    deg2 = np.array([1] * (caps[w1] + 1) + [2] * full2 + [3] * 10)  # width 1 outgrows
    _, grown = _plan(deg2, prev)
    assert grown[2][w1] >= 2 * caps[w1]  # the outgrown one doubles
    assert grown[2][w2] > caps[w2]  # the nearly full one grows with it
    assert grown[2][w3] == caps[w3]  # one with room keeps its size
    _, same = _plan(np.array([1] * 100 + [2] * full2 + [3] * 10), prev)  # nothing outgrown: no change
    assert same == prev
    # a grown graph (600 new followers of node 0) built on the old capacities is still exact
    src, dst, n, q = random_graph(3, n=300, e=1200)
    g1 = FollowGraph(src, dst, n)
    extra = np.arange(n, n + 600)
    g2 = FollowGraph(np.concatenate([src, np.zeros(600, np.int64)]), np.concatenate([dst, extra]), n + 600,
                     capacities=g1.capacities)
    assert g2.capacities[0] != g1.capacities[0]
    qq = np.concatenate([q, np.zeros(600, np.float32)])
    assert float(reach(g2, jnp.asarray(qq))) == pytest.approx(
        brute_reach(np.concatenate([src, np.zeros(600, np.int64)]), np.concatenate([dst, extra]), n + 600, qq),
        rel=1e-5)


def test_a_tight_graph_takes_the_elementwise_max_of_its_counts_and_the_old_capacities():
    """tight=True (the topics' active subgraphs): an outgrown table takes this graph's rounded
    count, not double, and one with room keeps the old capacity; R stays exact."""
    src, dst, n, q = random_graph(4, n=300, e=1200)
    g1 = FollowGraph(src, dst, n)
    src2, dst2 = np.concatenate([src, np.zeros(600, np.int64)]), np.concatenate([dst, np.arange(n, n + 600)])
    g2 = FollowGraph(src2, dst2, n + 600, capacities=g1.capacities, tight=True)
    w1 = WIDTHS.index(1)
    need = int(np.sum(np.bincount(dst2, minlength=n + 600) == 1))
    old = g1.capacities[0][2][w1]
    assert need > old and old < g2.capacities[0][2][w1] < 2 * old
    assert all(b >= a for a, b in zip(g1.capacities[0][2], g2.capacities[0][2]))
    qq = np.concatenate([q, np.zeros(600, np.float32)])
    assert float(reach(g2, jnp.asarray(qq))) == pytest.approx(brute_reach(src2, dst2, n + 600, qq), rel=1e-5)

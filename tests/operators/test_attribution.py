"""Aumann-Shapley attribution against axioms and closed forms (independent truth)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers.operators_data import heavy_features, random_graph, reach_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from operators import attribute, indicators, shapley
from operators.attribution import relative_residual, trace_count
from operators.graph import FollowGraph

SETTINGS = settings(max_examples=25, deadline=None)
evaluate = jax.jit(lambda F, z: F(z))  # F(z) outside attribute (an indicator is a pytree)


def all_indicators(g):
    return [
        indicators.volume(0),
        indicators.volume(3),
        indicators.polarization(0, 2),
        indicators.concentration(1),
        indicators.cascade_reach(g, p=0.05, column=0),
        indicators.cascade_reach(g, p=0.3, column=1),
    ]


# --- efficiency (completeness) --------------------------------------------------------------


def test_completeness_every_indicator_float32_steps32(graph, rng):
    g = graph[0]
    x = heavy_features(rng, g.n)
    for F in all_indicators(g):
        res = attribute(F, x, steps=32)
        assert res.phi.dtype == jnp.float32 and res.phi.shape == x.shape
        b = np.asarray(indicators.default_baseline(F, x))
        fx, fb = float(evaluate(F, x)), float(evaluate(F, b))
        gap = fx - fb
        assert abs(gap) > 1e-3, F
        assert float(res.value) == pytest.approx(fx, rel=1e-6)
        assert float(res.baseline_value) == pytest.approx(fb, rel=1e-6, abs=1e-7)
        assert abs(float(res.delta)) <= 1e-4 * abs(gap), (F, float(res.delta), gap)
        assert abs(np.sum(np.asarray(res.phi, np.float64)) - gap) <= 1e-4 * abs(gap)


def test_float64_under_x64(rng):
    x = heavy_features(rng, 30)
    with jax.enable_x64(True):
        res = attribute(indicators.polarization(0, 2), x, steps=32)
        assert res.phi.dtype == jnp.float64
        assert abs(float(res.delta)) <= 1e-12 * abs(float(res.value - res.baseline_value))


# --- closed forms ---------------------------------------------------------------------------


def test_euler_split_for_homogeneous_functions(rng):
    """F homogeneous of degree k, zero baseline: phi_i = x_i dF/dx_i / k (gradients by hand)."""
    x = rng.lognormal(0, 0.5, 12)
    a = rng.uniform(0.5, 2.0, 12)
    A = rng.uniform(0, 1, (12, 12))
    A = A + A.T
    cases = [
        (lambda z: jnp.dot(a, z) ** 3, 3, 3 * np.dot(a, x) ** 2 * a),
        (lambda z: z @ A @ z, 2, 2 * A @ x),
        (lambda z: jnp.sqrt(jnp.sum(z**2)), 1, x / np.linalg.norm(x)),
    ]
    for F, k, grad in cases:
        res = attribute(F, x, steps=32)
        np.testing.assert_allclose(res.phi, x * grad / k, rtol=2e-5)


def test_product_of_n_agents_gives_equal_shares(rng):
    x = rng.uniform(0.5, 2.0, 6)
    res = attribute(lambda z: jnp.prod(z), x, steps=8)
    np.testing.assert_allclose(res.phi, np.full(6, np.prod(x) / 6), rtol=1e-5)


def test_midpoint_rule_closed_form_on_cubic(rng):
    """F = sum x^3, zero baseline: midpoint phi_i = 3 x_i^3 (1/3 - 1/(12 n^2))."""
    x = rng.uniform(0.5, 2.0, 7)
    for n in (1, 4, 32):
        res = attribute(lambda z: jnp.sum(z**3), x, steps=n, rule="midpoint")
        np.testing.assert_allclose(res.phi, x**3 * (1 - 1 / (4 * n**2)), rtol=1e-5)


def _multilinear(rng, n):
    """F(z) = sum_T c_T prod_{i in T} z_i over subsets T with |T| <= 3, as (F, terms)."""
    terms = [(tuple(sorted(rng.choice(n, size=k, replace=False))), rng.normal()) for k in (1, 2, 3) for _ in range(4)]

    def F(z):
        return sum(c * jnp.prod(z[np.array(T)]) for T, c in terms)

    return F, terms


def test_multilinear_as_equals_closed_form_shapley(rng):
    """Zero baseline: each monomial c_T prod_T x splits equally among its |T| agents."""
    n = 6
    F, terms = _multilinear(rng, n)
    x = rng.uniform(-2, 2, n)
    truth = np.zeros(n)
    for T, c in terms:
        truth[list(T)] += c * np.prod(x[list(T)]) / len(T)
    np.testing.assert_allclose(attribute(F, x, steps=32).phi, truth, rtol=1e-4, atol=1e-5)


def test_multilinear_as_equals_exact_shapley_nonzero_baseline(rng):
    n = 7
    F, _ = _multilinear(rng, n)
    x, b = rng.uniform(-2, 2, n), rng.uniform(-1, 1, n)
    np.testing.assert_allclose(attribute(F, x, b, steps=32).phi, shapley.exact(F, x, b), rtol=1e-4, atol=1e-5)


# --- symmetry, null player, linearity ------------------------------------------------------


def test_symmetry_permutation_equivariance_and_twins(rng):
    x = heavy_features(rng, 25)
    x[3] = x[7]
    perm = rng.permutation(25)
    for F in (indicators.volume(1), indicators.polarization(0, 2), indicators.concentration(1)):
        phi = np.asarray(attribute(F, x).phi)
        np.testing.assert_array_equal(phi[3], phi[7])
        np.testing.assert_allclose(np.asarray(attribute(F, x[perm]).phi), phi[perm], rtol=1e-4, atol=1e-7)


def test_symmetry_cascade_twins():
    # 0 and 1 are both followed by 2 and 3; 4 follows 0 only, 5 follows 1 only
    g = FollowGraph([0, 0, 1, 1, 0, 1, 2], [2, 3, 2, 3, 4, 5, 3], 6)
    x = np.array([1.5, 1.5, 0.7, 2.0, 0.3, 0.9])
    phi = np.asarray(attribute(indicators.cascade_reach(g, p=0.4), x).phi)
    assert phi[0] == pytest.approx(phi[1], rel=1e-6) and phi[0] > 0


def test_null_players(graph, rng):
    g, src, dst, followers = graph
    x = heavy_features(rng, g.n)
    nobody_follows = np.flatnonzero(followers == 0)
    assert nobody_follows.size > 5
    phi = np.asarray(attribute(indicators.cascade_reach(g), x).phi)
    assert not phi[nobody_follows].any()  # exactly 0 though their features are not
    assert phi[followers > 0, 0].min() > 0
    x[4] = 0.0
    for F in (indicators.volume(0), indicators.cascade_reach(g, column=1)):  # zero baseline: zero-feature agent
        assert not np.asarray(attribute(F, x).phi)[4].any()
    for F in (indicators.polarization(0, 2), indicators.concentration(1)):  # mean baseline: agent at the mean
        b = np.asarray(indicators.default_baseline(F, x))
        x2 = x.copy()
        x2[9] = b[9]
        phi = np.asarray(attribute(F, x2, b).phi)
        assert not phi[9].any()
        assert not phi[:, 3].any()  # a column F never reads


def test_linearity(graph, rng):
    g = graph[0]
    x = heavy_features(rng, g.n)
    b = np.broadcast_to(x.mean(axis=0), x.shape) * 0.5
    F, G = indicators.cascade_reach(g, p=0.2, column=1), indicators.polarization(0, 2)
    both = attribute(lambda z: 2.0 * F(z) - 3.0 * G(z), x, b).phi
    np.testing.assert_allclose(both, 2.0 * attribute(F, x, b).phi - 3.0 * attribute(G, x, b).phi, rtol=1e-4, atol=1e-6)


def _quadratic_form(A, z):
    return z @ A @ z


@SETTINGS
@given(
    x=arrays(np.float64, st.integers(2, 8), elements=st.floats(0, 10)),
    seed=st.integers(0, 2**16),
)
def test_quadratic_form_property(x, seed):
    """For x^T A x with zero baseline: phi_i = x_i (A x)_i exactly and sum = F(x)."""
    A = np.random.default_rng(seed).uniform(-1, 1, (x.size, x.size))
    A = A + A.T
    F = jax.tree_util.Partial(_quadratic_form, jnp.asarray(A))  # A is a jit argument
    res = attribute(F, x, steps=2)  # degree-1 integrand: 2 nodes are exact
    scale = 1.0 + np.abs(A).sum() * (1 + x.max()) ** 2
    np.testing.assert_allclose(res.phi, x * (A @ x), atol=1e-5 * scale)
    assert abs(float(res.delta)) <= 1e-5 * scale


@SETTINGS
@given(
    x=arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 3)), elements=st.floats(-1e3, 1e3)),
    data=st.data(),
)
def test_volume_property(x, data):
    b = data.draw(arrays(np.float64, x.shape, elements=st.floats(-1e3, 1e3)))
    col = data.draw(st.integers(0, x.shape[1] - 1))
    phi = np.asarray(attribute(indicators.volume(col), x, b, steps=1).phi)
    expected = np.zeros_like(x)
    expected[:, col] = x[:, col] - b[:, col]
    np.testing.assert_allclose(phi, expected, rtol=1e-6, atol=1e-3)


# --- the graded rule (nodes toward the baseline) ------------------------------------------------


def test_graded_rule_converges_faster_on_cascade_reach(graph, rng):
    """cascade_reach on heavy-tailed posts has a boundary layer at a = 0: at 12 nodes the graded
    rule is >= 5x closer per agent to the converged integral (128 Gauss-Legendre nodes) than
    Gauss-Legendre, and it stays complete."""
    g = graph[0]
    x = heavy_features(rng, g.n) * np.array([20.0, 1, 1, 1])  # posts up to the thousands
    F = indicators.cascade_reach(g, p=0.05, column=0)
    ref = np.asarray(attribute(F, x, steps=128).phi[:, 0], np.float64)
    err = {r: np.abs(np.asarray(attribute(F, x, steps=12, rule=r).phi[:, 0]) - ref).max() / np.abs(ref).max()
           for r in ("gauss-legendre", "gauss-legendre-graded")}
    assert err["gauss-legendre-graded"] < 0.2 * err["gauss-legendre"], err
    res = attribute(F, x, steps=32, rule="gauss-legendre-graded")
    assert abs(float(res.delta)) <= 1e-4 * abs(float(res.value - res.baseline_value))


# --- node batches (several quadrature nodes per scan step) ------------------------------------


@pytest.mark.parametrize("node_batch", [2, 5, 16, 64])
def test_node_batch_same_attribution(graph, rng, node_batch):
    """Evaluating k nodes per pass (k a divisor of steps or not, or above it) is the same sum."""
    g = graph[0]
    x = heavy_features(rng, g.n)
    for F in (indicators.cascade_reach(g, p=0.05, column=0), indicators.polarization(0, 2)):
        one = attribute(F, x, steps=16)
        many = attribute(F, x, steps=16, node_batch=node_batch)
        scale = float(np.abs(np.asarray(one.phi)).max())
        np.testing.assert_allclose(np.asarray(many.phi), np.asarray(one.phi), rtol=0, atol=1e-5 * scale)
        assert float(many.value) == float(one.value)
        assert abs(float(many.delta)) <= 1e-4 * abs(float(one.value - one.baseline_value))


def test_node_batch_midpoint_closed_form(rng):
    """midpoint with 3 nodes in batches of 2 (one weight-0 filler): x^2 from 0 is x^2 exactly."""
    x = rng.uniform(0.5, 2.0, (5, 1))
    res = attribute(lambda z: jnp.sum(z**2), x, baseline=np.zeros_like(x), steps=3, rule="midpoint",
                    node_batch=2)
    np.testing.assert_allclose(np.asarray(res.phi), x**2, rtol=1e-6)


# --- compilation caching: F's arrays are jit arguments ---------------------------------------


def test_same_shapes_do_not_recompile(rng):
    F = indicators.polarization(0, 2)
    attribute(F, heavy_features(rng, 33))
    before = trace_count()
    attribute(indicators.polarization(0, 2), heavy_features(rng, 33))  # new but equal indicator object
    assert trace_count() == before
    attribute(F, heavy_features(rng, 34))
    assert trace_count() == before + 1


def test_changed_graph_same_shape_no_recompile_new_answer(rng):
    n, e = 60, 240
    x = heavy_features(rng, n)
    s1, d1 = random_graph(rng, n, e)
    s2, d2 = random_graph(rng, n, e)
    r1 = attribute(indicators.cascade_reach(FollowGraph(s1, d1, n), p=0.2), x)
    before = trace_count()
    r2 = attribute(indicators.cascade_reach(FollowGraph(s2, d2, n), p=0.2), x)
    assert trace_count() == before  # the graph is an argument, not a baked-in constant
    q = 0.2 * (1 - np.exp(-x[:, 0]))
    assert float(r2.value) == pytest.approx(reach_reference(s2, d2, n, q), rel=1e-5)
    assert float(r1.value) == pytest.approx(reach_reference(s1, d1, n, q), rel=1e-5)
    lonely = np.setdiff1d(np.arange(n), s2)  # nobody follows them in graph 2
    assert not np.asarray(r2.phi)[lonely].any()
    followed_in_1 = np.intersect1d(lonely, s1)
    assert followed_in_1.size and np.asarray(r1.phi)[followed_in_1, 0].min() > 0
    assert abs(float(r2.delta)) <= 1e-4 * float(r2.value)


# --- errors ---------------------------------------------------------------------------------


def test_errors():
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match="scalar"):
        attribute(lambda z: z.sum(axis=0), x)
    with pytest.raises(ValueError, match="floating"):
        attribute(lambda z: jnp.sum(z > 0), x)
    with pytest.raises(ValueError, match="finite"):
        attribute(indicators.volume(), np.array([[1.0, np.nan]] * 4))
    with pytest.raises(ValueError, match="finite"):
        attribute(indicators.volume(), x, np.full((4, 2), np.inf))
    with pytest.raises(ValueError, match="baseline shape"):
        attribute(indicators.volume(), x, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="steps"):
        attribute(indicators.volume(), x, steps=0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="node_batch"):
            attribute(indicators.volume(), x, node_batch=bad)
    with pytest.raises(ValueError, match="unknown quadrature rule"):
        attribute(indicators.volume(), x, rule="trapezoid")
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, d\)"):
        attribute(indicators.volume(), np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="callable"):
        attribute(3.0, x)

    class Unhashable:
        __hash__ = None

        def __call__(self, z):
            return z.sum()

    with pytest.raises(ValueError, match="hashable"):
        attribute(Unhashable(), x)


def test_relative_residual_is_against_the_change_floored_at_the_magnitude():
    assert relative_residual(1e-3, 3.0, 1.0) == pytest.approx(5e-4)  # |delta| / |F(x) - F(b)|
    assert relative_residual(-1e-3, 1.0, 3.0) == pytest.approx(5e-4)
    # F did not move: judged against a millionth of |F|, not against 0
    assert relative_residual(1.0, 1e6, 1e6) == pytest.approx(1.0)
    assert relative_residual(0.0, 0.0, 0.0) == 0.0 and relative_residual(1e-12, 0.0, 0.0) == pytest.approx(1.0)
    assert np.isnan(relative_residual(float("nan"), 1.0, 0.0))

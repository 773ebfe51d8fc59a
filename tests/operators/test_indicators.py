"""Indicators against independent numpy formulas; baselines, names, pytree behaviour, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers.operators_data import heavy_features, reach_reference

from operators import indicators


def test_volume_is_column_sum(rng):
    x = heavy_features(rng, 50)
    assert float(indicators.volume()(x)) == pytest.approx(x[:, 0].sum(), rel=1e-5)
    assert float(indicators.volume(column=3)(x)) == pytest.approx(x[:, 3].sum(), rel=1e-5)
    assert float(indicators.volume()(x[:, 1])) == pytest.approx(x[:, 1].sum(), rel=1e-5)  # 1-D x


def test_polarization_is_weighted_variance_of_mean_stance(rng):
    x = heavy_features(rng, 80)
    w, s = x[:, 0], x[:, 2]
    m = s / w
    ref = np.average((m - np.average(m, weights=w)) ** 2, weights=w)
    assert float(indicators.polarization(weight_col=0, stance_col=2)(x)) == pytest.approx(ref, rel=1e-4)


def test_polarization_zero_weight_agents_are_excluded_with_finite_gradient(rng):
    x = heavy_features(rng, 30)
    x[:5, 0] = 0.0
    x[:5, 2] = 0.0
    F = indicators.polarization(0, 2)
    w, m = x[5:, 0], x[5:, 2] / x[5:, 0]
    ref = np.average((m - np.average(m, weights=w)) ** 2, weights=w)
    assert float(F(x)) == pytest.approx(ref, rel=1e-4)
    assert np.isfinite(np.asarray(jax.grad(F)(jnp.asarray(x, jnp.float32)))).all()
    assert float(F(np.zeros((4, 3)))) == 0.0  # no weight at all: P = 0


def test_concentration_is_hhi(rng):
    x = heavy_features(rng, 60)
    shares = x[:, 1] / x[:, 1].sum()
    assert float(indicators.concentration()(x)) == pytest.approx(np.sum(shares**2), rel=1e-5)
    assert float(indicators.concentration()(np.zeros((5, 2)))) == 0.0
    assert float(indicators.concentration(0)(np.ones(8))) == pytest.approx(1 / 8)


def test_cascade_reach_matches_loop_over_followers(graph, rng):
    g, src, dst, _ = graph
    x = heavy_features(rng, g.n)
    for p, col in [(0.05, 0), (0.3, 1)]:
        q = p * (1 - np.exp(-x[:, col]))
        F = indicators.cascade_reach(g, p=p, column=col)
        assert float(F(x)) == pytest.approx(reach_reference(src, dst, g.n, q), rel=1e-5)


@pytest.mark.parametrize("F", [indicators.polarization(0, 2), indicators.concentration(1)])
def test_scale_invariant_indicators_and_their_mean_baseline(F, rng):
    x = heavy_features(rng, 40)
    assert F.scale_invariant
    assert float(F(7.5 * x)) == pytest.approx(float(F(x)), rel=1e-5)
    b = np.asarray(indicators.default_baseline(F, x))
    np.testing.assert_allclose(b, np.broadcast_to(x.mean(axis=0), x.shape), rtol=1e-6)
    expected = 0.0 if F.name == "polarization" else 1 / 40  # no spread / perfect equality
    assert float(F(b)) == pytest.approx(expected, abs=1e-6)


def test_default_baseline_zero_for_additive_indicators(graph):
    g = graph[0]
    x = np.ones((g.n, 2))
    for F in (indicators.volume(), indicators.cascade_reach(g), lambda z: jnp.sum(z**2)):
        assert not np.asarray(indicators.default_baseline(F, x)).any()


def test_default_baseline_mask_ignores_padding_rows(rng):
    x = np.zeros((6, 2))
    x[:4] = heavy_features(rng, 4, 2)
    mask = np.arange(6) < 4
    b = np.asarray(indicators.default_baseline(indicators.concentration(1), x, mask=mask))
    np.testing.assert_allclose(b[:4], np.broadcast_to(x[:4].mean(axis=0), (4, 2)), rtol=1e-6)
    np.testing.assert_array_equal(b[4:], x[4:])
    with pytest.raises(ValueError, match="mask shape"):
        indicators.default_baseline(indicators.concentration(1), x, mask=mask[:5])


def test_names(graph):
    assert indicators.name_of(indicators.volume()) == "volume"
    assert indicators.name_of(indicators.polarization()) == "polarization"
    assert indicators.name_of(indicators.concentration()) == "concentration"
    assert indicators.name_of(indicators.cascade_reach(graph[0])) == "cascade_reach"

    def my_indicator(z):
        return z.sum()

    assert indicators.name_of(my_indicator) == "my_indicator"
    assert indicators.name_of(jax.tree_util.Partial(my_indicator)) == "my_indicator"


def test_indicators_are_pytrees_with_array_leaves_only_for_the_graph(graph):
    g = graph[0]
    assert jax.tree_util.tree_leaves(indicators.volume(2)) == []
    leaves = jax.tree_util.tree_leaves(indicators.cascade_reach(g, p=0.1, column=1))
    assert leaves and all(isinstance(leaf, (np.ndarray, np.generic, jax.Array)) for leaf in leaves)
    F = indicators.cascade_reach(g)
    x = np.ones((g.n, 1))
    assert float(jax.jit(lambda F, x: F(x))(F, x)) == pytest.approx(float(F(x)), rel=1e-6)


def test_errors(graph):
    with pytest.raises(ValueError, match="column 5"):
        indicators.volume(5)(np.ones((3, 2)))
    with pytest.raises(ValueError, match="column 1"):
        indicators.concentration(1)(np.ones(3))
    with pytest.raises(ValueError, match="FollowGraph"):
        indicators.cascade_reach(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="p must lie"):
        indicators.cascade_reach(graph[0], p=1.5)

"""Exact and sampled Shapley against hand-computed games and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers.operators_data import heavy_features, random_graph

from operators import indicators, shapley
from operators.graph import FollowGraph


def test_glove_game():
    """Agent 0 holds a left glove, agents 1 and 2 right gloves: Shapley (2/3, 1/6, 1/6)."""
    phi = shapley.exact(lambda z: jnp.minimum(z[0], z[1] + z[2]), np.ones(3))
    np.testing.assert_allclose(phi, [2 / 3, 1 / 6, 1 / 6], atol=1e-6)


def test_weighted_majority_game():
    """Quota 3, weights (2, 1, 1): agent 0 is pivotal in 4 of 6 orders -> (2/3, 1/6, 1/6)."""
    w = np.array([2.0, 1.0, 1.0, 0.0])  # agent 3 is a dummy
    phi = shapley.exact(lambda z: jnp.where(jnp.dot(w, z) >= 3, 1.0, 0.0), np.ones(4))
    np.testing.assert_allclose(phi, [2 / 3, 1 / 6, 1 / 6, 0.0], atol=1e-6)


def test_additive_game_rows_are_players(rng):
    x, b = heavy_features(rng, 5, 3), heavy_features(rng, 5, 3)
    phi = shapley.exact(lambda z: jnp.sum(z * jnp.arange(1.0, 4.0)), x, b)
    np.testing.assert_allclose(phi, (x - b) @ np.arange(1.0, 4.0), rtol=1e-5)


def test_exact_efficiency_and_default_baseline(rng):
    x = heavy_features(rng, 8)
    F = indicators.concentration(1)  # scale-invariant: default baseline = population mean
    b = np.broadcast_to(x.mean(axis=0), x.shape)
    phi = shapley.exact(F, x)
    assert phi.sum() == pytest.approx(float(F(x)) - float(F(b)), rel=1e-4)


def _games(rng):
    n = 9
    src, dst = random_graph(rng, n, 30)
    g = FollowGraph(src, dst, n)
    c = rng.uniform(0.5, 1.5, n)
    return [
        (indicators.cascade_reach(g, p=0.6), heavy_features(rng, n, 1)),
        (jax.tree_util.Partial(_cubic, jnp.asarray(c)), rng.uniform(0, 2, n)),
        (indicators.polarization(0, 2), heavy_features(rng, n, 3)),
    ]


def _cubic(c, z):
    return jnp.dot(c, z) ** 3 - jnp.prod(z[:4])


def test_sampled_within_four_stderr_of_exact(rng):
    for F, x in _games(rng):
        truth = shapley.exact(F, x)
        phi, se = shapley.sampled(F, x, permutations=128, seed=1)
        assert phi.shape == se.shape == (x.shape[0],)
        assert se.max() > 1e-3 * np.abs(truth).max()  # a game where sampling has noise
        np.testing.assert_array_less(np.abs(phi - truth), 4 * se + 1e-5 * np.abs(truth).max())


def test_sampled_batching_does_not_change_the_estimate(rng):
    F, x = _games(rng)[0]
    a = shapley.sampled(F, x, permutations=8, seed=3)
    b = shapley.sampled(F, x, permutations=8, seed=3, batch_size=4)  # prefixes in 3 chunks
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-7)


def test_antithetic_pairs_are_exact_for_quadratic_games(rng):
    """v(S) quadratic: a permutation and its reverse average to the exact Shapley value."""
    A = rng.uniform(-1, 1, (6, 6))
    F = jax.tree_util.Partial(lambda A, z: z @ A @ z, jnp.asarray(A + A.T))
    x = rng.uniform(0, 2, 6)
    phi, se = shapley.sampled(F, x, permutations=4)
    np.testing.assert_allclose(phi, shapley.exact(F, x), rtol=1e-4, atol=1e-5)
    assert se.max() < 1e-4


def test_errors():
    with pytest.raises(ValueError, match="N <= 16"):
        shapley.exact(lambda z: z.sum(), np.ones(17))
    with pytest.raises(ValueError, match="even and >= 4"):
        shapley.sampled(lambda z: z.sum(), np.ones(3), permutations=5)
    with pytest.raises(ValueError, match="even and >= 4"):
        shapley.sampled(lambda z: z.sum(), np.ones(3), permutations=2)
    with pytest.raises(ValueError, match="finite"):
        shapley.sampled(lambda z: z.sum(), np.array([1.0, np.inf]), permutations=4)
    with pytest.raises(ValueError, match="scalar"):
        shapley.exact(lambda z: z, np.ones(3))

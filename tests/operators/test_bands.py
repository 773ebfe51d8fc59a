"""Follower bands, band shares and the visibility-panel comparison (attribution scaling bias)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers.operators_data import heavy_features, random_graph
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from operators import bands, indicators
from operators.graph import FollowGraph

SETTINGS = settings(max_examples=25, deadline=None)


def test_default_bands():
    assert bands.BAND_NAMES == ("top0.1", "0.1-1", "1-10", "10-50", "bottom50")


@pytest.mark.parametrize("n,sizes", [(1000, [1, 9, 90, 400, 500]), (100_000, [100, 900, 9000, 40000, 50000]), (100, [0, 1, 9, 40, 50])])
def test_band_sizes_with_distinct_counts(n, sizes, rng):
    f = rng.permutation(n)
    idx = bands.band_index(f)
    np.testing.assert_array_equal(np.bincount(idx, minlength=5), sizes)
    assert idx[np.argmax(f)] == (0 if n >= 1000 else 1)
    assert np.all(np.diff(idx[np.argsort(-f)]) >= 0)  # more followers never in a lower band


def test_ties_share_a_band_and_order_does_not_matter(rng):
    f = np.r_[np.zeros(600), np.ones(250), rng.integers(2, 10_000, 150)]
    names = bands.band_of(f)
    assert set(names[f == 0]) == {"bottom50"} and len(set(names[f == 1])) == 1
    perm = rng.permutation(f.size)
    np.testing.assert_array_equal(bands.band_of(f[perm]), names[perm])


def test_band_shares_by_hand():
    f = np.arange(10)[::-1]  # agent 0 has most followers; N = 10: bands 1-10 (1), 10-50 (4), bottom50 (5)
    phi = np.arange(1.0, 11.0)
    shares = bands.band_shares(phi, f)
    total = phi.sum()
    assert shares == pytest.approx(
        {"top0.1": 0.0, "0.1-1": 0.0, "1-10": 1 / total, "10-50": (2 + 3 + 4 + 5) / total, "bottom50": 40 / total}
    )
    assert bands.band_shares(np.stack([phi, phi], axis=1), f) == pytest.approx(shares)  # (N, d)
    assert bands.band_shares(np.zeros(10), f) == dict.fromkeys(bands.BAND_NAMES, 0.0)
    with pytest.raises(ValueError, match="phi must have shape"):
        bands.band_shares(phi[:9], f)


@SETTINGS
@given(
    phi=arrays(np.float64, 40, elements=st.floats(0.01, 100)),
    f=arrays(np.int64, 40, elements=st.integers(0, 50)),
    seed=st.integers(0, 1000),
)
def test_band_shares_property(phi, f, seed):
    shares = bands.band_shares(phi, f)
    assert list(shares) == list(bands.BAND_NAMES)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(s >= 0 for s in shares.values())
    perm = np.random.default_rng(seed).permutation(40)
    assert bands.band_shares(phi[perm], f[perm]) == pytest.approx(shares)


def test_panel_agents_ties_by_index():
    f = np.array([3, 9, 9, 1, 9])
    np.testing.assert_array_equal(bands.panel_agents(f, 3), [1, 2, 4])
    np.testing.assert_array_equal(bands.panel_agents(f, 99), [1, 2, 4, 0, 3])
    with pytest.raises(ValueError, match="k must be"):
        bands.panel_agents(f, 0)


def _features_and_followers(rng, n):
    x = heavy_features(rng, n, 2)
    followers = np.floor(rng.pareto(1.0, n) * 10).astype(int)
    return x, followers


def test_linear_indicator_reconciles_with_one_rescale(rng):
    x, f = _features_and_followers(rng, 300)
    res = bands.panel_comparison(indicators.volume(1), x, f, k=30)
    panel = bands.panel_agents(f, 30)
    np.testing.assert_array_equal(res.panel, panel)
    off = np.setdiff1d(np.arange(300), panel)
    assert not res.phi_panel[off].any()
    np.testing.assert_allclose(res.phi_panel[panel], x[panel, 1], rtol=1e-5)  # x_i - 0
    assert res.rescale == pytest.approx(1.0, rel=1e-5)
    assert res.rescale_residual < 1e-5
    assert res.spearman == pytest.approx(1.0)
    assert res.tvd == pytest.approx(0.5 * sum(abs(res.full_bands[b] - res.bands[b]) for b in bands.BAND_NAMES))
    assert res.tvd > 0.1  # the panel sees only the top bands


def test_quadratic_interaction_leaves_a_residual(rng):
    n, k = 200, 20
    x, f = _features_and_followers(rng, n)
    y = x[:, 1]
    A = rng.uniform(0, 1, (n, n))
    A = A + A.T
    F = jax.tree_util.Partial(lambda A, z: z[:, 1] @ A @ z[:, 1], jnp.asarray(A))
    res = bands.panel_comparison(F, x, f, k=k)
    P = bands.panel_agents(f, k)
    # closed forms (Euler split, zero baseline): full y_i (A y)_i, panel y_i (A_PP y_P)_i
    np.testing.assert_allclose(res.phi_full, y * (A @ y), rtol=1e-4)
    np.testing.assert_allclose(res.phi_panel[P], y[P] * (A[np.ix_(P, P)] @ y[P]), rtol=1e-4)
    fp, pp = res.phi_full[P], res.phi_panel[P]
    c = fp @ pp / (pp @ pp)
    assert res.rescale == pytest.approx(c, rel=1e-6)
    assert res.rescale_residual == pytest.approx(np.linalg.norm(fp - c * pp) / np.linalg.norm(fp), rel=1e-6)
    assert res.rescale_residual > 0.05


def test_cascade_reach_leaves_a_residual(rng):
    n = 100
    src, dst = random_graph(rng, n, 2000)  # dense: panel members share many followers
    followers = np.bincount(src, minlength=n)
    x = heavy_features(rng, n, 1)
    res = bands.panel_comparison(indicators.cascade_reach(FollowGraph(src, dst, n), p=0.5), x, followers, k=10)
    assert res.rescale_residual > 0.1
    assert not res.phi_panel[np.setdiff1d(np.arange(n), res.panel)].any()
    assert abs(sum(res.bands.values()) - 1.0) < 1e-9


def test_full_panel_is_the_full_attribution(rng):
    x, f = _features_and_followers(rng, 50)
    res = bands.panel_comparison(indicators.concentration(1), x, f, k=50)
    assert res.tvd < 1e-6 and res.rescale_residual < 1e-5
    assert res.rescale == pytest.approx(1.0, rel=1e-5)


def test_precomputed_phi_full_and_errors(rng):
    x, f = _features_and_followers(rng, 40)
    phi = np.ones(40)
    res = bands.panel_comparison(indicators.volume(0), x, f, k=5, phi_full=phi)
    np.testing.assert_array_equal(res.phi_full, phi)
    with pytest.raises(ValueError, match="followers has 39"):
        bands.panel_comparison(indicators.volume(0), x, f[:39])


def test_band_index_is_kept_by_content_not_by_array():
    """The band index is cached by the followers' content: an array changed in place (the
    operator updates follower counts in place) gets its new bands, equal to a fresh computation
    by rank (closed form: 0.1 % of 1,000 agents = the top agent alone in the first band)."""
    f = np.arange(1000, dtype=np.int64)
    first = bands.band_index(f)
    assert not first.flags.writeable
    assert first[999] == 0 and first[998] != 0          # the most followed agent, alone at the top
    f[0] = 10**6                                        # in place: agent 0 is now the most followed
    again = bands.band_index(f)
    assert again[0] == 0 and again[999] != 0
    np.testing.assert_array_equal(again, bands._band_index(f.copy(), bands.DEFAULT_BANDS))


def test_band_index_object_gives_the_same_results_as_counts(rng):
    """A BandIndex ranked once stands in for the follower counts everywhere (the service ranks
    once per hop): the same shares, masses, distributions and panel comparison; a BandIndex of
    other bands is refused, and the top-k panel (which needs the counts) says so."""
    n = 2000
    f = np.floor(rng.pareto(1.2, n) * 10).astype(np.int64)
    phi = rng.normal(size=n) * (rng.random(n) < 0.4)
    ranked = bands.BandIndex.of(f)
    np.testing.assert_array_equal(ranked.index, bands.band_index(f))
    assert bands.band_shares(phi, ranked) == bands.band_shares(phi, f)
    assert bands.band_mass(phi, ranked) == bands.band_mass(phi, f)
    np.testing.assert_array_equal(bands.band_distribution(phi, ranked), bands.band_distribution(phi, f))
    g = FollowGraph(*random_graph(rng, n, 6 * n), n)
    F, x = indicators.cascade_reach(g), jnp.asarray(rng.random(n) * 3, jnp.float32)
    members, _ = bands.visibility_sample(f, 60, seed=1)
    a = bands.panel_comparison(F, x, f, members=members, steps=8)
    b = bands.panel_comparison(F, x, ranked, members=members, steps=8)
    assert (a.bands, a.full_bands, a.bands_spanned) == (b.bands, b.full_bands, b.bands_spanned)
    assert a.rescale_residual == pytest.approx(b.rescale_residual)
    other = (("top", 0.0, 0.5), ("rest", 0.5, 1.0))
    with pytest.raises(ValueError, match="other bands"):
        bands.band_shares(phi, ranked, bands=other)
    with pytest.raises(ValueError, match="follower counts"):
        bands.panel_comparison(F, x, ranked, k=10, steps=8)
    with pytest.raises(ValueError, match="shape"):
        bands.band_shares(phi[:10], ranked)


@pytest.mark.parametrize("n,size,exponent", [(1000, 100, 1.0), (200, 150, 2.0), (50, 50, 1.0), (5000, 7, 0.5)])
def test_visibility_sample_inclusion_probabilities_by_bisection(n, size, exponent, rng):
    """pi_i = min(1, c w_i) with sum pi = size: the water-filling c equals the root found by
    plain bisection on sum_i min(1, c w_i) (an independent computation), capped agents included."""
    f = np.floor(rng.pareto(0.8, n) * 3)
    eligible = rng.random(n) < 0.9
    _, pi = bands.visibility_sample(f, size, exponent=exponent, eligible=eligible)
    w = np.where(eligible, (1.0 + f) ** exponent, 0.0)
    target = min(size, int(eligible.sum()))
    lo, hi = 0.0, 1.0
    while np.minimum(1.0, hi * w).sum() < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.minimum(1.0, mid * w).sum() < target else (lo, mid)
    np.testing.assert_allclose(pi, np.minimum(1.0, hi * w), rtol=1e-9, atol=1e-12)
    assert pi.sum() == pytest.approx(target)
    assert np.all(pi[~eligible] == 0)


@pytest.mark.parametrize("n,k", [(10, 3), (1000, 100), (50, 50), (7, 10), (5000, 1)])
def test_panel_agents_ties_by_lower_index(n, k, rng):
    """The top-k by followers (selected in O(N)) equals a stable sort's first k: ties at the k-th
    count go to the lower index, most followed first; with many ties and with all equal."""
    for f in (rng.integers(0, 5, n), np.floor(rng.pareto(1.0, n) * 3), np.zeros(n, np.int64)):
        np.testing.assert_array_equal(bands.panel_agents(f, k), np.argsort(-f, kind="stable")[: min(k, n)])


def test_band_index_by_counting_equals_the_sorted_ranking():
    """Integer follower counts are ranked by counting (O(N + max)); the bands equal those of the
    sort-based ranking of the same counts as floats, ties included."""
    from operators.bands import _band_index

    rng = np.random.default_rng(7)
    for n in (1, 7, 1000, 5000):
        f = np.floor(rng.pareto(1.2, n) * 5).astype(np.int64)  # heavy-tailed, many ties at 0
        got = _band_index(f, bands.DEFAULT_BANDS)
        want = _band_index(f.astype(np.float64), bands.DEFAULT_BANDS)
        np.testing.assert_array_equal(got, want)


def test_band_summary_is_shares_mass_and_distribution_from_one_pass(rng):
    """band_summary == (band_shares, band_mass, band_distribution) computed separately, and a
    panel comparison given that distribution equals one that computes it (mixed signs, ties)."""
    n = 3000
    f = rng.integers(0, 50, n) ** 2
    phi = np.where(rng.random(n) < 0.3, rng.standard_normal(n), 0.0)
    shares, mass, dist = bands.band_summary(phi, f)
    assert shares == bands.band_shares(phi, f)
    assert mass == bands.band_mass(phi, f)
    np.testing.assert_array_equal(dist, bands.band_distribution(phi, f))
    x = jnp.asarray(rng.random((n, 1)), jnp.float32)
    F = lambda z: jnp.sum(z ** 2)  # noqa: E731
    members = np.sort(rng.choice(n, 200, replace=False))
    panel_phi = np.where(np.isin(np.arange(n), members), phi, 0.0)
    args = dict(members=members, phi_full=phi, phi_panel=panel_phi)
    a = bands.panel_comparison(F, x, f, **args)
    b = bands.panel_comparison(F, x, f, full_distribution=dist, **args)
    assert (a.bands, a.full_bands, a.tvd, a.rescale) == (b.bands, b.full_bands, b.tvd, b.rescale)
    with pytest.raises(ValueError, match="full_distribution"):
        bands.panel_comparison(F, x, f, full_distribution=dist[:1], **args)

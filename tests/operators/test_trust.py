"""Attribution a user can trust per agent (issue 15): per-agent error estimates, non-finite inputs,
the inactive-agent baseline rule, bounded band shares with mixed signs, the scaling-bias panel.

Truth is independent of the code under test: a converged float64 integral (its own error
bound below 1e-8), closed forms, exact Shapley values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers.operators_data import random_graph

from operators import NonFiniteError, attribute, bands, indicators, shapley
from operators.graph import FollowGraph


# --- 1. per-agent error estimates -------------------------------------------------------------

@pytest.fixture(scope="module")
def heavy_cascade():
    """The issue's input: cascade_reach, N = 4,000, 10 edges per agent, x = 1 + Pareto(1.2),
    with its converged float64 attribution (Gauss-Kronrod graded, 65 nodes)."""
    rng = np.random.default_rng(15)
    n = 4000
    src, dst = random_graph(rng, n, 10 * n)
    x = 1.0 + rng.pareto(1.2, n)
    with jax.enable_x64(True):
        truth = attribute(indicators.cascade_reach(FollowGraph(src, dst, n)), x, steps=65, rule="gauss-kronrod-graded")
        phi = np.asarray(truth.phi)
        assert np.asarray(truth.error).max() < 1e-8 * np.abs(phi).max()  # converged (bound)
    return indicators.cascade_reach(FollowGraph(src, dst, n)), x, phi


def test_residual_small_but_agent_error_large_is_flagged(heavy_cascade):
    F, x, truth = heavy_cascade
    res = attribute(F, x, steps=32)  # the default Gauss-Legendre rule
    scale = np.abs(truth).max()
    err = np.abs(np.asarray(res.phi, np.float64) - truth)
    est = np.asarray(res.error, np.float64)
    gap = float(res.value - res.baseline_value)
    assert abs(float(res.delta)) < 1e-4 * gap  # the residual certifies the sum ...
    top = np.argmax(x)
    assert err[top] > 0.02 * abs(truth[top])  # ... not the most active agent (several % off)
    assert est[top] >= err[top]  # the estimate sees it
    assert np.all(est >= err - 1e-6 * scale)  # and bounds every agent's true error
    assert est.max() > 1e-3 * scale  # an alert at 1e-3 of max |phi| fires


@pytest.mark.parametrize("rule,steps", [("gauss-kronrod-graded", 33), ("gauss-kronrod", 33),
                                        ("gauss-kronrod-graded", 17), ("gauss-legendre-graded", 32)])
def test_error_estimate_bounds_the_true_error(heavy_cascade, rule, steps):
    F, x, truth = heavy_cascade
    res = attribute(F, x, steps=steps, rule=rule)
    scale = np.abs(truth).max()
    err = np.abs(np.asarray(res.phi, np.float64) - truth)
    est = np.asarray(res.error, np.float64)
    assert np.all(est >= err - 1e-6 * scale), (err / np.maximum(est, 1e-30)).max()
    if steps == 33 and rule == "gauss-kronrod-graded":
        assert est.max() < 1e-3 * scale and err.max() < 1e-6 * scale  # meets the tolerance


def test_errors_that_cancel_in_the_sum():
    # F = e^{8 x0} - e^{8 x1} at x = (1, 1): phi = +-(e^8 - 1) exactly, F(x) = F(b) = 0.
    F = lambda z: jnp.exp(8 * z[0]) - jnp.exp(8 * z[1])  # noqa: E731
    with jax.enable_x64(True):
        res = attribute(F, np.ones(2), steps=4, rule="midpoint")
        phi, est = np.asarray(res.phi), np.asarray(res.error)
    exact = np.e**8 - 1
    err = np.abs(phi - [exact, -exact])
    assert float(res.delta) == 0.0  # the errors cancel exactly in the sum
    assert err.min() > 0.05 * exact  # each agent is far off (midpoint, 4 nodes)
    assert np.all(est >= err)  # and the estimate says so, per agent


def test_error_is_zero_for_a_linear_indicator_and_has_the_shape_of_x(rng):
    x = rng.uniform(0, 5, (50, 3))
    res = attribute(indicators.volume(1), x, steps=5, rule="gauss-kronrod")
    assert res.error.shape == x.shape
    assert np.asarray(res.error).max() <= 1e-6 * np.abs(np.asarray(res.phi)).max()


def test_error_estimate_with_node_batch_is_the_same(heavy_cascade):
    F, x, _ = heavy_cascade
    one = attribute(F, x, steps=17, rule="gauss-kronrod-graded", node_batch=1)
    many = attribute(F, x, steps=17, rule="gauss-kronrod-graded", node_batch=4)
    np.testing.assert_allclose(many.error, one.error, rtol=1e-4, atol=1e-6 * float(np.abs(one.phi).max()))


# --- 2. non-finite results raise, naming what ---------------------------------------------------

def test_sqrt_at_zero_names_the_agent():
    with pytest.raises(NonFiniteError, match=r"phi is not finite for agent\(s\) \[0\]"):
        attribute(lambda z: jnp.sum(jnp.sqrt(z)), np.array([0.0, 1.0, 4.0]))
    # exact Shapley only evaluates F: finite, and the closed form sqrt(x_i) (additive F)
    np.testing.assert_allclose(shapley.exact(lambda z: jnp.sum(jnp.sqrt(z)), np.array([0.0, 1.0, 4.0])),
                               [0, 1, 2], atol=1e-6)


@pytest.mark.parametrize("fn", ["attribute", "exact", "sampled"])
def test_non_finite_value_and_baseline_value_are_named(fn):
    call = {"attribute": attribute, "exact": shapley.exact, "sampled": shapley.sampled}[fn]
    with pytest.raises(NonFiniteError, match=r"F\(b\)"):
        call(lambda z: jnp.log(jnp.sum(z)), np.array([1.0, 2.0]))  # log 0 at the zero baseline
    with pytest.raises(NonFiniteError, match=r"F\(x\)"):
        call(lambda z: 1.0 / (3.0 - jnp.sum(z)), np.array([1.0, 2.0]))
    with pytest.raises(NonFiniteError, match="x and baseline must be finite"):
        call(lambda z: jnp.sum(z), np.array([1.0, np.nan]))


def test_shapley_names_a_non_finite_coalition():
    F = lambda z: 1.0 / (1.0 + z[0] - z[1])  # noqa: E731  infinite on coalition {1} only
    for call in (shapley.exact, shapley.sampled):
        with pytest.raises(NonFiniteError, match=r"coalition|prefix"):
            call(F, np.array([1.0, 1.0]))


def test_band_shares_and_panel_refuse_non_finite_phi(rng):
    f = rng.integers(0, 100, 10)
    phi = np.arange(10.0)
    phi[[3, 7]] = np.nan
    with pytest.raises(NonFiniteError, match=r"\[3, 7\]"):
        bands.band_shares(phi, f)
    with pytest.raises(NonFiniteError, match=r"\[3, 7\]"):
        bands.panel_comparison(indicators.volume(0), np.ones(10), f, k=3, phi_full=phi)
    assert isinstance(NonFiniteError("x"), ValueError)


# --- 3. the inactive-agent baseline rule --------------------------------------------------------

def _posts_and_stance(rng, n, inactive_frac):
    w = rng.poisson(3, n) + 1.0
    w[rng.random(n) < inactive_frac] = 0.0
    return np.stack([w, w * np.clip(rng.normal(0.2, 0.6, n), -1, 1)], axis=1)


def test_polarization_gives_non_posters_nothing(rng):
    x = _posts_and_stance(rng, 100_000, 0.7)
    res = attribute(indicators.polarization(), x)
    phi = np.asarray(res.phi).sum(axis=1)
    assert not phi[x[:, 0] == 0].any()
    w, s = x[:, 0], x[:, 1]
    pos = w > 0
    mu = s.sum() / w.sum()
    P = np.sum(w[pos] * (s[pos] / w[pos] - mu) ** 2) / w.sum()  # closed form, float64
    assert float(res.value) == pytest.approx(P, rel=1e-5) and abs(float(res.baseline_value)) < 1e-12
    assert phi.sum() == pytest.approx(P, rel=1e-4)


@pytest.mark.parametrize("F", [indicators.polarization(), indicators.concentration(1), indicators.volume(0)])
def test_appending_inactive_agents_changes_no_attribution(rng, F):
    x = _posts_and_stance(rng, 2000, 0.0)
    x[:, 1] = np.abs(x[:, 1])  # concentration reads column 1 as engagement >= 0
    more = np.concatenate([x, np.zeros((2000, 2))])
    a, b = attribute(F, x), attribute(F, more)
    pa, pb = np.asarray(a.phi).sum(axis=1), np.asarray(b.phi).sum(axis=1)
    assert not pb[2000:].any()
    np.testing.assert_allclose(pb[:2000], pa, atol=1e-5 * np.abs(pa).max())
    assert float(b.value) == pytest.approx(float(a.value), rel=1e-6)


def test_baseline_matches_exact_shapley_for_small_games(rng):
    x = _posts_and_stance(rng, 8, 0.0)
    x[[2, 5]] = 0.0  # two non-posters
    sh = shapley.exact(indicators.polarization(), x)
    assert sh[2] == 0.0 and sh[5] == 0.0  # null players in the game too (same baseline rule)
    as_ = np.asarray(attribute(indicators.polarization(), x, steps=33, rule="gauss-kronrod").phi).sum(axis=1)
    assert as_[2] == 0.0 and as_[5] == 0.0
    assert as_.sum() == pytest.approx(sh.sum(), rel=1e-4)  # both = P(x) - P(b)


# --- 5. band shares with mixed signs ----------------------------------------------------------

def test_mixed_sign_band_shares_by_hand():
    f = np.arange(10)[::-1]  # N = 10: bands 1-10 (agent 0), 10-50 (1-4), bottom50 (5-9)
    phi = np.array([4.0, 3.0, -1.0, 0.0, 0.0, -2.0, -3.0, 0.0, 0.0, 0.0])  # sum 1, |phi| 13
    shares = bands.band_shares(phi, f)
    assert shares == pytest.approx({"top0.1": 0, "0.1-1": 0, "1-10": 4 / 13, "10-50": 2 / 13, "bottom50": -5 / 13})
    m = bands.band_mass(phi, f)
    assert (m.positive_mass, m.negative_mass) == (7.0, 6.0)
    assert m.positive == pytest.approx({"top0.1": 0, "0.1-1": 0, "1-10": 4 / 7, "10-50": 3 / 7, "bottom50": 0})
    assert m.negative == pytest.approx({"top0.1": 0, "0.1-1": 0, "1-10": 0, "10-50": 1 / 6, "bottom50": 5 / 6})
    d = bands.band_distribution(phi, f)
    assert d.sum() == pytest.approx(1.0) and d.shape == (2, 5)
    q = bands.band_distribution(np.abs(phi), f)  # the same mass, all positive
    assert bands.band_tvd(d, q) == pytest.approx(6 / 13)  # the negative mass moved sign
    assert np.isnan(bands.band_tvd(d, np.zeros_like(d)))


def test_band_shares_stay_bounded_when_the_total_cancels(rng):
    f = rng.integers(0, 1000, 500)
    phi = rng.normal(0, 1, 500)
    phi -= phi.mean()  # sum(phi) ~ 0: shares of the sum would explode
    shares = bands.band_shares(phi, f)
    assert all(-1 <= s <= 1 for s in shares.values())
    assert sum(abs(s) for s in shares.values()) <= 1 + 1e-12
    phi[-1] -= phi.sum()  # cancels exactly: shares are still defined
    assert any(abs(s) > 0.01 for s in bands.band_shares(phi, f).values())


def test_polarization_band_shares_bounded(rng):
    x = _posts_and_stance(rng, 5000, 0.3)
    phi = np.asarray(attribute(indicators.polarization(), x).phi).sum(axis=1)
    assert (phi < 0).any() and (phi > 0).any()
    f = rng.integers(0, 10_000, 5000)
    shares = bands.band_shares(phi, f)
    assert all(-1 <= s <= 1 for s in shares.values())
    m = bands.band_mass(phi, f)
    assert sum(m.positive.values()) == pytest.approx(1) and sum(m.negative.values()) == pytest.approx(1)


# --- 4. the panel measures the scaling bias ---------------------------------------------------

def _bluesky_followers(rng, n):
    return np.floor(rng.pareto(1.1, n) * 3).astype(int)


def test_volume_at_scale_is_reconciled_and_its_band_tvd_uninformative(rng):
    n = 100_000
    f = _bluesky_followers(rng, n)
    x = rng.poisson(2, n).astype(float)
    res = bands.panel_comparison(indicators.volume(0), x, f, k=100)
    assert res.rescale_residual < 1e-6 and res.rescale == pytest.approx(1.0, rel=1e-6)
    assert res.bands_spanned == 1 and not res.informative and np.isnan(res.tvd)


def test_additive_nonlinear_is_reconciled_exactly(rng):
    n = 300
    f = _bluesky_followers(rng, n)
    x = rng.uniform(0, 5, n)
    F = lambda z: jnp.sum(jnp.log1p(z))  # noqa: E731  nonlinear, no interactions
    res = bands.panel_comparison(F, x, f, k=30)
    assert res.rescale_residual < 1e-5 and res.rescale == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(res.phi_full, np.log1p(x), rtol=1e-5)  # closed form


def test_interactions_leave_a_residual(rng, graph):
    g, src, dst, followers = graph
    x = rng.uniform(0.5, 3, g.n)
    res = bands.panel_comparison(indicators.cascade_reach(g, p=0.5), x, followers, k=12)
    assert res.rescale_residual > 0.01  # shared followers: 1e3 times the additive case's float noise


def test_visibility_sample_spans_bands_and_favours_the_visible(rng):
    n = 20_000
    f = _bluesky_followers(rng, n)
    members, pi = bands.visibility_sample(f, 500, seed=3)
    assert pi.sum() == pytest.approx(500, rel=1e-6) and pi.max() <= 1
    order = np.argsort(f)
    assert np.all(np.diff(pi[order]) >= 0)  # inclusion probability rises with followers
    assert 400 < members.size < 600
    assert np.unique(bands.band_index(f)[members]).size >= 4  # spans bands
    x = rng.poisson(2, n).astype(float) + 1
    res = bands.panel_comparison(indicators.volume(0), x, f, members=members)
    assert res.informative and 0 < res.tvd < 1 and res.rescale_residual < 1e-6
    again, _ = bands.visibility_sample(f, 500, seed=3)
    np.testing.assert_array_equal(members, again)


def _sample_scaling(F, x, followers, size, seed):
    """scaling_bias of a visibility sample: the sample's own attribution (F on it alone) vs full."""
    members, pi = bands.visibility_sample(followers, size, seed=seed)
    res = bands.panel_comparison(F, x, followers, members=members, steps=65, rule="gauss-kronrod")
    return bands.scaling_bias(res.phi_full[members], res.phi_panel[members], pi[members]), members


@pytest.mark.parametrize("name", ["volume", "sum_log1p"])
def test_sample_scaling_residual_is_zero_without_interactions(rng, graph, name):
    """Additive F (linear or not): each agent's phi depends on its own x only, so the sample's own
    attribution equals the full one on its members: c* = 1, residual 0 (float tolerance)."""
    g, src, dst, followers = graph
    x = rng.uniform(0.5, 3, g.n)
    F = indicators.volume(0) if name == "volume" else (lambda z: jnp.sum(jnp.log1p(z)))
    (c, resid), members = _sample_scaling(F, x, followers, 40, seed=1)
    assert members.size > 20 and np.unique(bands.band_index(followers)[members]).size >= 3
    assert resid < 1e-6 and c == pytest.approx(1.0, rel=1e-6)
    # cascade reach on the same graph and sample: shared followers cross the sample boundary
    (c, resid), _ = _sample_scaling(indicators.cascade_reach(g, p=0.5), x, followers, 40, seed=1)
    assert resid > 1e3 * 1e-6 and c < 1  # the sample alone overstates its members' reach


def test_sample_scaling_residual_closed_form():
    """Agents A, B in the sample, C outside; A and C share a follower j, B's follower k follows B
    only. Cascade reach, zero baseline, straight path, q(y) = p (1 - e^-y):
    phi_A(full) = (1 - p) q(x_A) + p^2 x_A (1 - e^-(x_A + x_C)) / (x_A + x_C), phi_A(own) = q(x_A),
    phi_B = q(x_B) in both. Weights |own| / pi, pi = (0.5, 1)."""
    p, (xa, xb, xc) = 0.5, (2.0, 1.0, 3.0)
    g = FollowGraph(np.array([0, 2, 1]), np.array([3, 3, 4]), 5)  # A -> j, C -> j, B -> k
    x = np.array([xa, xb, xc, 0.0, 0.0])
    q = lambda y: p * (1 - np.exp(-y))  # noqa: E731
    fa = (1 - p) * q(xa) + p * p * xa * (1 - np.exp(-(xa + xc))) / (xa + xc)
    f, o, pi = np.array([fa, q(xb)]), np.array([q(xa), q(xb)]), np.array([0.5, 1.0])
    c_true = np.sum(f / pi) / np.sum(o / pi)
    r_true = np.sqrt(np.sum((f - c_true * o) ** 2 / (pi * o)) / np.sum(f * f / (pi * o)))
    res = bands.panel_comparison(indicators.cascade_reach(g, p=p), x, np.array([1, 1, 1, 0, 0]),
                                 members=[0, 1], steps=65, rule="gauss-kronrod")
    np.testing.assert_allclose(res.phi_full[:2], f, rtol=1e-5)
    np.testing.assert_allclose(res.phi_panel[:2], o, rtol=1e-5)
    c, resid = bands.scaling_bias(res.phi_full[:2], res.phi_panel[:2], pi)
    assert c == pytest.approx(c_true, rel=1e-5) and resid == pytest.approx(r_true, rel=1e-4)
    assert r_true > 0.05  # (0.077: the factors are f/o = 0.84 for A, 1 for B)
    # without C's activity nothing crosses the boundary: one rescale (1) reconciles
    res = bands.panel_comparison(indicators.cascade_reach(g, p=p), x * [1, 1, 0, 0, 0], np.array([1, 1, 1, 0, 0]),
                                 members=[0, 1], steps=65, rule="gauss-kronrod")
    assert bands.scaling_bias(res.phi_full[:2], res.phi_panel[:2], pi) == pytest.approx((1.0, 0.0), abs=1e-6)


def test_scaling_bias_input_checks():
    assert bands.scaling_bias([1.0], [1.0]) == (0.0, 0.0)  # one member: no spread
    assert bands.scaling_bias([1.0, 2.5, 5.0], [0.0, 2.0, 4.0]) == pytest.approx((1.25, 0.0))  # own = 0 left out
    with pytest.raises(ValueError, match="members"):
        bands.scaling_bias([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        bands.scaling_bias([1.0, 2.0], [1.0, 2.0], [0.0, 1.0])
    with pytest.raises(NonFiniteError):
        bands.scaling_bias([1.0, np.nan], [1.0, 2.0])

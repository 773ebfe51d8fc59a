"""Quadrature rules on [0, 1] against exact polynomial integrals."""

import numpy as np
import pytest

from operators.quadrature import RULES, nodes_weights


@pytest.mark.parametrize("steps", [1, 2, 5, 16, 32])
def test_gauss_legendre_exact_to_degree_2n_minus_1(steps):
    a, w = nodes_weights(steps, "gauss-legendre")
    assert a.shape == w.shape == (steps,)
    assert np.all((a > 0) & (a < 1)) and np.all(w > 0)
    for m in range(2 * steps):
        assert np.sum(w * a**m) == pytest.approx(1.0 / (m + 1), rel=1e-12, abs=1e-14)
    if steps <= 5:  # degree 2n is not exact (the error is below float64 resolution for large n)
        m = 2 * steps
        assert abs(np.sum(w * a**m) - 1.0 / (m + 1)) > 1e-9


@pytest.mark.parametrize("steps", [1, 4, 33])
def test_midpoint_closed_form(steps):
    a, w = nodes_weights(steps, "midpoint")
    np.testing.assert_allclose(a, (np.arange(steps) + 0.5) / steps)
    assert np.sum(w) == pytest.approx(1.0) and np.sum(w * a) == pytest.approx(0.5)
    # integral of a^2 by the midpoint rule: 1/3 - 1/(12 n^2)
    assert np.sum(w * a**2) == pytest.approx(1 / 3 - 1 / (12 * steps**2), rel=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 5, 16])
def test_graded_exact_to_degree_n_minus_1(steps):
    """a = t^2 turns a^m into 2 t^(2m+1): exact for m <= steps - 1, not for m = steps."""
    a, w = nodes_weights(steps, "gauss-legendre-graded")
    assert a.shape == w.shape == (steps,)
    assert np.all((a > 0) & (a < 1)) and np.all(w > 0)
    for m in range(steps):
        assert np.sum(w * a**m) == pytest.approx(1.0 / (m + 1), rel=1e-12, abs=1e-14)
    if steps <= 5:
        assert abs(np.sum(w * a**steps) - 1.0 / (steps + 1)) > 1e-9
    # graded toward 0: more nodes below a = 1/4 than Gauss-Legendre puts there
    assert np.sum(a < 0.25) >= np.sum(nodes_weights(steps)[0] < 0.25)


def test_graded_boundary_layer_integral():
    """integral_0^1 c e^{-c a} da = 1 - e^{-c} (c = 300: a layer of width 1/300 at a = 0):
    12 graded nodes are far closer than 12 Gauss-Legendre nodes."""
    c = 300.0
    exact = 1.0 - np.exp(-c)
    err = {r: abs(np.sum(w * c * np.exp(-c * a)) - exact) for r in ("gauss-legendre", "gauss-legendre-graded")
           for a, w in [nodes_weights(12, r)]}
    assert err["gauss-legendre-graded"] < 0.1 * err["gauss-legendre"], err


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "8"])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        nodes_weights(steps)


def test_unknown_rule():
    assert RULES == ("gauss-legendre", "midpoint", "gauss-legendre-graded")
    with pytest.raises(ValueError, match="unknown quadrature rule"):
        nodes_weights(8, "simpson")

"""Quadrature rules on [0, 1] against exact polynomial integrals."""

import numpy as np
import pytest

from operators.quadrature import RULES, embedded, interpolatory_weights, nodes_weights


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


@pytest.mark.parametrize("steps", [2, 3, 5, 16])
def test_graded_exact_to_degree(steps):
    """a = t^3 turns a^m into 3 t^(3m+2): exact for 3m + 2 <= 2 steps - 1, not beyond."""
    a, w = nodes_weights(steps, "gauss-legendre-graded")
    assert a.shape == w.shape == (steps,)
    assert np.all((a > 0) & (a < 1)) and np.all(w > 0)
    top = (2 * steps - 3) // 3
    for m in range(top + 1):
        assert np.sum(w * a**m) == pytest.approx(1.0 / (m + 1), rel=1e-12, abs=1e-14)
    if steps <= 5:  # (for more nodes the first degree beyond is still exact to rounding)
        assert abs(np.sum(w * a ** (top + 1)) - 1.0 / (top + 2)) > 1e-9
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
    assert RULES == ("gauss-legendre", "midpoint", "gauss-legendre-graded", "gauss-kronrod",
                     "gauss-kronrod-graded")
    with pytest.raises(ValueError, match="unknown quadrature rule"):
        nodes_weights(8, "simpson")


# QUADPACK qk15 (Piessens et al. 1983): K15 abscissae and weights on [-1, 1], non-negative half
QK15_X = [0.991455371120812639206854697526329, 0.949107912342758524526189684047851,
          0.864864423359769072789712788640926, 0.741531185599394439863864773280788,
          0.586087235467691130294144845693013, 0.405845151377397166906606412076961,
          0.207784955007898467600689403773245, 0.0]
QK15_W = [0.022935322010529224963732008058970, 0.063092092629978553290700663189204,
          0.104790010322250183839876322541518, 0.140653259715525918745189590510238,
          0.169004726639267902826583426598550, 0.190350578064785409913256402421014,
          0.204432940075298892414161999234649, 0.209482141084727828012999174891714]


def test_gauss_kronrod_15_matches_quadpack_table():
    a, w, g = embedded(15, "gauss-kronrod")
    np.testing.assert_allclose(2 * a[7:] - 1, QK15_X[::-1], atol=1e-14)
    np.testing.assert_allclose(2 * w[7:], QK15_W[::-1], atol=1e-14)
    # the embedded rule is the 7-point Gauss rule on the odd-indexed nodes
    tg, vg = np.polynomial.legendre.leggauss(7)
    np.testing.assert_allclose(2 * a[1::2] - 1, tg, atol=1e-14)
    np.testing.assert_allclose(2 * g[1::2], vg, atol=1e-14)
    assert not g[::2].any()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 24, 48])
def test_gauss_kronrod_exact_to_degree_3n_plus_1(n):
    a, w, g = embedded(2 * n + 1, "gauss-kronrod")
    assert np.all(np.diff(a) > 0) and np.all((a > 0) & (a < 1)) and np.all(w > 0)
    for m in range(3 * n + 2):
        assert np.sum(w * a**m) == pytest.approx(1 / (m + 1), rel=1e-13)
    for m in range(2 * n):
        assert np.sum(g * a**m) == pytest.approx(1 / (m + 1), rel=1e-13)


def test_gauss_kronrod_graded_is_the_rule_in_t():
    f = lambda a: np.exp(-30 * np.cbrt(a))  # noqa: E731  smooth in t = a^(1/3)
    exact = 6 / 30**3 * (1 - 481 * np.exp(-30))  # int_0^1 e^{-30 t} 3 t^2 dt
    a, w, g = embedded(17, "gauss-kronrod-graded")
    assert abs(w @ f(a) - exact) < 1e-7 * exact  # 2.0e-8 measured
    assert abs(w @ f(a) - exact) < abs(g @ f(a) - exact)  # the estimate |K - G| bounds K's error


@pytest.mark.parametrize("steps", [1, 2, 4, 99, 2.0])
def test_gauss_kronrod_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        nodes_weights(steps, "gauss-kronrod")


@pytest.mark.parametrize("rule", ["gauss-legendre", "gauss-legendre-graded", "midpoint"])
@pytest.mark.parametrize("steps", [2, 5, 16])
def test_embedded_rule_on_every_other_node(rule, steps):
    a, w, e = embedded(steps, rule)
    np.testing.assert_array_equal((a, w), nodes_weights(steps, rule))
    assert not e[1::2].any()
    if rule != "gauss-legendre-graded" or steps >= 5:  # graded: exact for 3t^2 once 3 nodes in t
        assert e.sum() == pytest.approx(1.0, rel=1e-12)
    # the embedded rule is coarser: its error on a smooth integrand is larger than the rule's
    f, exact = np.exp, np.e - 1
    assert abs(e @ f(a) - exact) > abs(w @ f(a) - exact)
    if rule == "gauss-legendre":  # interpolatory: exact to degree ceil(steps / 2) - 1
        for m in range((steps + 1) // 2):
            assert e @ a**m == pytest.approx(1 / (m + 1), rel=1e-12)


def test_one_node_has_no_embedded_rule():
    assert not embedded(1, "gauss-legendre")[2].any()


def test_interpolatory_weights_closed_form():
    np.testing.assert_allclose(interpolatory_weights([0.0, 0.5, 1.0]), [1 / 6, 2 / 3, 1 / 6])  # Simpson

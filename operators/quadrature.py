"""Quadrature rules on [0, 1] for the Aumann-Shapley path integral (pure numpy).

``nodes_weights(steps, rule)`` returns nodes ``a_k`` in (0, 1) and weights ``w_k`` (sum 1) with
``integral_0^1 f(a) da ~= sum_k w_k f(a_k)``; ``steps`` is always the number of nodes (the cost:
one gradient of F per node):

- ``"gauss-legendre"``: Legendre nodes t_k, weights v_k on [-1, 1] (numpy's ``leggauss``) mapped by
  a = (t + 1) / 2, w = v / 2; exact for polynomials of degree <= 2 * steps - 1.
- ``"midpoint"``: a_k = (k + 1/2) / steps, w_k = 1 / steps; exact for degree <= 1.
- ``"gauss-legendre-graded"``: Gauss-Legendre in t on the substitution a = t^3 (da = 3 t^2 dt):
  a_k = t_k^3, w_k = 3 t_k^2 v_k for the [0, 1] Gauss-Legendre (t_k, v_k); nodes graded toward
  a = 0, exact for polynomials in a of degree <= (2 steps - 3) / 3. For saturating indicators whose
  gradient changes fast near the baseline (cascade_reach: q = p (1 - e^{-a x}) saturates at
  a ~ 1 / x, so heavy-tailed x puts a boundary layer at a = 0) it needs far fewer nodes for the
  same per-agent accuracy. Why the cube (:data:`GRADE`): a layer of width 1/x in a is one of width
  x^(-1/3) in t. Measured on cascade_reach at 1.67M agents / 100M edges (max x 5,101), per-agent
  error against 64 nodes, relative to max |phi|: t^2 at 20 / 24 / 28 nodes 2.2e-3 / 1.1e-3 /
  4.0e-4; t^3 7.0e-4 / 1.2e-4 / 2.0e-5; t^4 4.4e-4 / 5.5e-5 / 1.3e-5 (so t^3 meets 1e-3 with 20
  nodes where t^2 gives 1.1e-3 at 24; t^4 gains little more and is exact to a lower degree).
- ``"gauss-kronrod"``: the Gauss-Kronrod rule K_{2n+1} (steps = 2n + 1, odd, >= 3): the n
  Gauss-Legendre nodes plus the n + 1 zeros of the Stieltjes polynomial E_{n+1} (Kronrod 1965),
  exact for degree <= 3n + 1 (n even) or 3n + 2 (n odd). ``"gauss-kronrod-graded"``: the same in t
  on a = t^3, as for the graded Gauss rule.

Error estimates (``embedded(steps, rule)``). Every rule comes with an *embedded* rule on a subset
of its own nodes, so the difference of the two costs no extra evaluation of F:

- Gauss-Kronrod: the embedded rule is the n-point Gauss rule (weights 0 on the Kronrod nodes);
  |K_{2n+1} - G_n| is QUADPACK's classic estimate (Piessens et al. 1983) of the error of G_n, an
  upper estimate of the (much smaller) error of K_{2n+1} once the integrand is resolved.
- Gauss-Legendre (plain or graded): the interpolatory rule on every other node (indices 0, 2, 4,
  ... in increasing a, so the node nearest the baseline is kept); exact for degree
  <= ceil(steps / 2) - 1 (in t for the graded rule). Its difference to the full rule estimates
  the error of the coarser rule: conservative for the full one.
- Midpoint: the rectangle rule (weights 1 / m) on every other node (m of them), error O(1/steps).
- One node: no embedded rule (weights 0), so the estimate is the whole integral (says "unknown").

What no embedded estimate can see: a feature of the integrand between all nodes of both rules
(a kink of F, or a boundary layer narrower than the first node's distance to a = 0) is invisible
to both; the estimate is then too small. Refining (more nodes) shows it.

Kronrod nodes are computed here (no table): E_{n+1} = P_{n+1} + sum_{j <= n} c_j P_j in the
Legendre basis with int P_n E P_k = 0 for k <= n (triple products by an exact Gauss rule), its
roots by numpy's ``legroots``, weights from the Legendre moment equations. Checked to 1e-14
against K_15 (QUADPACK's qk15 table) and for exactness up to n = 48.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.polynomial import legendre as _leg

__all__ = [
    "RULES",
    "nodes_weights",
    "embedded",
    "gauss_legendre",
    "gauss_legendre_graded",
    "gauss_kronrod",
    "midpoint",
    "interpolatory_weights",
]

RULES = ("gauss-legendre", "midpoint", "gauss-legendre-graded", "gauss-kronrod", "gauss-kronrod-graded")
MAX_KRONROD_STEPS = 97  # n = 48: the moment solve stays accurate to ~1e-15 up to here


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _frozen(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


@lru_cache(maxsize=64)
def gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1] (float64, read-only)."""
    t, v = _leg.leggauss(_check_steps(steps))
    return _frozen((t + 1.0) / 2.0, v / 2.0)


GRADE = 3  # graded rules: a = t^GRADE (see the module docstring for the measurement behind 3)


def _graded_weights(t: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weights in t mapped to a = t^GRADE: w * da/dt = w * GRADE t^(GRADE - 1)."""
    return GRADE * t ** (GRADE - 1) * w


def _graded(t: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A rule in t on [0, 1] mapped to a = t^GRADE."""
    return t**GRADE, _graded_weights(t, w)


@lru_cache(maxsize=64)
def gauss_legendre_graded(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre on a = t^3: nodes t_k^3, weights 3 t_k^2 v_k (float64, read-only)."""
    return _frozen(*_graded(*gauss_legendre(steps)))


@lru_cache(maxsize=64)
def midpoint(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Midpoint-rule nodes and weights on [0, 1] (float64, read-only)."""
    steps = _check_steps(steps)
    return _frozen((np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps))


def _check_kronrod_steps(steps) -> int:
    steps = _check_steps(steps)
    if steps < 3 or steps % 2 == 0 or steps > MAX_KRONROD_STEPS:
        raise ValueError(f"gauss-kronrod rules need an odd steps = 2n + 1 in [3, {MAX_KRONROD_STEPS}] "
                         f"(n Gauss nodes plus n + 1 Kronrod nodes), got {steps}")
    return steps


def _legendre_basis(t: np.ndarray, degree: int) -> np.ndarray:
    """P_j(t) for j = 0..degree, shape (degree + 1, len(t)), by the three-term recurrence."""
    out = np.empty((degree + 1, t.size))
    out[0] = 1.0
    if degree >= 1:
        out[1] = t
    for j in range(1, degree):
        out[j + 1] = ((2 * j + 1) * t * out[j] - j * out[j - 1]) / (j + 1)
    return out


@lru_cache(maxsize=64)
def _kronrod_pm1(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K_{2n+1} on [-1, 1]: increasing nodes, Kronrod weights, embedded Gauss weights (0 off G_n)."""
    tq, vq = _leg.leggauss((3 * n + 4) // 2 + 2)  # exact for the degree-(3n + 1) triple products
    P = _legendre_basis(tq, n + 1)
    T = np.einsum("m,jm,km->jk", vq * P[n], P, P[: n + 1])  # T[j, k] = int P_n P_j P_k
    c = np.linalg.lstsq(T[: n + 1].T, -T[n + 1], rcond=None)[0]  # parity-null parts -> 0
    stieltjes = np.concatenate([c, [1.0]])
    tg, vg = _leg.leggauss(n)
    tk = np.real(_leg.legroots(stieltjes))
    nodes = np.concatenate([tg, tk])
    order = np.argsort(nodes)
    nodes = nodes[order]
    moments = np.zeros(2 * n + 1)
    moments[0] = 2.0
    w = np.linalg.solve(_legendre_basis(nodes, 2 * n), moments)
    wg = np.concatenate([vg, np.zeros(n + 1)])[order]
    return nodes, w, wg


@lru_cache(maxsize=64)
def gauss_kronrod(steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gauss-Kronrod K_steps on [0, 1] (steps = 2n + 1): nodes, weights, embedded G_n weights."""
    n = (_check_kronrod_steps(steps) - 1) // 2
    t, w, wg = _kronrod_pm1(n)
    return _frozen((t + 1.0) / 2.0, w / 2.0, wg / 2.0)


def interpolatory_weights(nodes) -> np.ndarray:
    """Weights of the interpolatory rule on [0, 1] with these distinct nodes (exact for degree
    <= len(nodes) - 1): sum_k w_k P*_j(a_k) = int_0^1 P*_j, shifted Legendre P*_j(a) = P_j(2a - 1)."""
    a = np.asarray(nodes, dtype=np.float64)
    moments = np.zeros(a.size)
    moments[0] = 1.0
    return np.linalg.solve(_legendre_basis(2.0 * a - 1.0, a.size - 1), moments)


def _every_other(w_full: np.ndarray, weights_of_subset) -> np.ndarray:
    """Weights on nodes 0, 2, 4, ... (increasing order), 0 elsewhere; 0 everywhere for 1 node."""
    out = np.zeros_like(w_full)
    if w_full.size > 1:
        out[::2] = weights_of_subset
    return out


@lru_cache(maxsize=64)
def embedded(steps: int, rule: str = "gauss-legendre") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nodes, weights, embedded weights) of ``rule``: the embedded rule lives on the same nodes
    (see the module docstring); sum_k (w_k - e_k) f(a_k) is the error estimate. Read-only."""
    steps = _check_steps(steps)
    if rule == "gauss-kronrod":
        return gauss_kronrod(steps)
    if rule == "gauss-kronrod-graded":
        t, w, wg = gauss_kronrod(steps)
        a, wa = _graded(t, w)
        return _frozen(a, wa, _graded_weights(t, wg))
    a, w = nodes_weights(steps, rule)
    if rule == "midpoint":
        e = _every_other(w, 1.0 / ((steps + 1) // 2))
    elif rule == "gauss-legendre":
        e = _every_other(w, interpolatory_weights(a[::2]) if steps > 1 else None)
    else:  # gauss-legendre-graded: interpolatory in t, mapped like the rule itself
        t = gauss_legendre(steps)[0]
        e = _every_other(w, _graded_weights(t[::2], interpolatory_weights(t[::2])) if steps > 1 else None)
    return _frozen(np.array(a), np.array(w), e)


def nodes_weights(steps: int, rule: str = "gauss-legendre") -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ``rule`` (one of RULES) with ``steps`` points on [0, 1]."""
    steps = _check_steps(steps)
    if rule == "gauss-legendre":
        return gauss_legendre(steps)
    if rule == "midpoint":
        return midpoint(steps)
    if rule == "gauss-legendre-graded":
        return gauss_legendre_graded(steps)
    if rule in ("gauss-kronrod", "gauss-kronrod-graded"):
        return embedded(steps, rule)[:2]
    raise ValueError(f"unknown quadrature rule {rule!r}; expected one of {RULES}")

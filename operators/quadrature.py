"""Quadrature rules on [0, 1] for the Aumann-Shapley path integral (pure numpy).

``nodes_weights(steps, rule)`` returns nodes ``a_k`` in (0, 1) and weights ``w_k`` (sum 1) with
``integral_0^1 f(a) da ~= sum_k w_k f(a_k)``:

- ``"gauss-legendre"``: Legendre nodes t_k, weights v_k on [-1, 1] (numpy's ``leggauss``) mapped by
  a = (t + 1) / 2, w = v / 2; exact for polynomials of degree <= 2 * steps - 1.
- ``"midpoint"``: a_k = (k + 1/2) / steps, w_k = 1 / steps; exact for degree <= 1.
- ``"gauss-legendre-graded"``: Gauss-Legendre in t on the substitution a = t^2 (da = 2t dt):
  a_k = t_k^2, w_k = 2 t_k v_k for the [0, 1] Gauss-Legendre (t_k, v_k); nodes graded toward
  a = 0, exact for polynomials in a of degree <= steps - 1. For saturating indicators whose
  gradient changes fast near the baseline (cascade_reach: q = p (1 - e^{-a x}) saturates at
  a ~ 1 / x, so heavy-tailed x puts a boundary layer at a = 0) it needs far fewer nodes for the
  same per-agent accuracy (BENCHMARKS.md, operator section).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["RULES", "nodes_weights", "gauss_legendre", "gauss_legendre_graded", "midpoint"]

RULES = ("gauss-legendre", "midpoint", "gauss-legendre-graded")


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


@lru_cache(maxsize=64)
def gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1] (float64, read-only)."""
    t, v = np.polynomial.legendre.leggauss(_check_steps(steps))
    a, w = (t + 1.0) / 2.0, v / 2.0
    a.flags.writeable = w.flags.writeable = False
    return a, w


@lru_cache(maxsize=64)
def gauss_legendre_graded(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre on a = t^2: nodes t_k^2, weights 2 t_k v_k (float64, read-only)."""
    t, v = gauss_legendre(steps)
    a, w = t * t, 2.0 * t * v
    a.flags.writeable = w.flags.writeable = False
    return a, w


@lru_cache(maxsize=64)
def midpoint(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Midpoint-rule nodes and weights on [0, 1] (float64, read-only)."""
    steps = _check_steps(steps)
    a, w = (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    a.flags.writeable = w.flags.writeable = False
    return a, w


def nodes_weights(steps: int, rule: str = "gauss-legendre") -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ``rule`` (one of RULES) with ``steps`` points on [0, 1]."""
    steps = _check_steps(steps)
    if rule == "gauss-legendre":
        return gauss_legendre(steps)
    if rule == "midpoint":
        return midpoint(steps)
    if rule == "gauss-legendre-graded":
        return gauss_legendre_graded(steps)
    raise ValueError(f"unknown quadrature rule {rule!r}; expected one of {RULES}")

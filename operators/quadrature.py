"""Quadrature rules on [0, 1] for the Aumann-Shapley path integral (pure numpy).

``nodes_weights(steps, rule)`` returns nodes ``a_k`` in (0, 1) and weights ``w_k`` (sum 1) with
``integral_0^1 f(a) da ~= sum_k w_k f(a_k)``:

- ``"gauss-legendre"``: Legendre nodes t_k, weights v_k on [-1, 1] (numpy's ``leggauss``) mapped by
  a = (t + 1) / 2, w = v / 2; exact for polynomials of degree <= 2 * steps - 1.
- ``"midpoint"``: a_k = (k + 1/2) / steps, w_k = 1 / steps; exact for degree <= 1.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["RULES", "nodes_weights", "gauss_legendre", "midpoint"]

RULES = ("gauss-legendre", "midpoint")


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
    raise ValueError(f"unknown quadrature rule {rule!r}; expected one of {RULES}")

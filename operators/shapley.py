"""Shapley values with agents (rows of x) as players: exact (tiny games) and sampled (reference).

The game: v(S) = F(z_S), z_S = x on the rows in S and the baseline b elsewhere (b = the default
baseline of F when None, as in operators.attribute). Shapley value of agent i:

    phi_i = sum_{S not containing i} |S|! (N - |S| - 1)! / N! * (v(S + i) - v(S)).

``exact`` enumerates all 2^N coalitions (N <= 16). ``sampled`` averages marginal contributions
v(prefix + i) - v(prefix) over random permutations drawn in antithetic pairs (a permutation and
its reverse), evaluating F on batches of prefix inputs with ``vmap``. F is a black box here: it
is evaluated, never differentiated. Results are float64 numpy arrays of shape (N,).

Both raise :class:`operators.attribution.NonFiniteError` (a ValueError) when x or the baseline
holds NaN/inf, when F(x) (all agents) or F(b) (none) is not finite, when F is not finite on some
coalition (the first few are named), or when some agents' phi is not finite.
"""

from __future__ import annotations

from functools import partial
from math import factorial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from operators.attribution import (
    NonFiniteError,
    as_features,
    check_finite_phi,
    check_scalar,
    join_callable,
    resolve_baseline,
    split_callable,
)

__all__ = ["MAX_EXACT_PLAYERS", "exact", "sampled"]

MAX_EXACT_PLAYERS = 16
_BATCH_ELEMENTS = 1 << 22  # feature entries materialized per vectorized F evaluation


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
    """Broadcast a per-agent mask (N,) against x (N,) or (N, d)."""
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def _prepare(F: Callable, x, baseline):
    static, dyn = split_callable(F)
    x = as_features(x)
    b = resolve_baseline(F, x, baseline)
    if not bool(jnp.isfinite(x).all() & jnp.isfinite(b).all()):
        raise NonFiniteError("x and baseline must be finite (found NaN or inf)")
    return static, dyn, x, b


def _check_values(v: np.ndarray, bits: np.ndarray) -> None:
    """Raise NonFiniteError naming F(b) (empty coalition), F(x) (all) or other coalitions."""
    bad = ~np.isfinite(v)
    if not bad.any():
        return
    empty, full = ~bits.any(axis=1), bits.all(axis=1)
    if (bad & empty).any():
        raise NonFiniteError(f"F(b) (the baseline value) is not finite ({v[bad & empty][0]})")
    if (bad & full).any():
        raise NonFiniteError(f"F(x) is not finite ({v[bad & full][0]})")
    where = [sorted(int(i) for i in np.flatnonzero(row)) for row in bits[bad][:3]]
    raise NonFiniteError(f"F is not finite on {int(bad.sum())} coalition(s), e.g. agents {where}")


@partial(jax.jit, static_argnums=0)
def _coalition_values(static, dyn, x, b, members):
    """v(S) for each row of members (B, N) bool."""
    F = join_callable(static, dyn)
    check_scalar(F, x)
    return jax.vmap(lambda m: F(jnp.where(_rows(m, x), x, b)))(members)


def exact(F: Callable, x, baseline=None) -> np.ndarray:
    """Exact Shapley values of the agents (rows of x), N <= 16; float64 array (N,)."""
    static, dyn, x, b = _prepare(F, x, baseline)
    n = x.shape[0]
    if n > MAX_EXACT_PLAYERS:
        raise ValueError(f"exact Shapley needs N <= {MAX_EXACT_PLAYERS} agents, got {n}")
    coalitions = np.arange(1 << n)
    bits = (coalitions[:, None] >> np.arange(n)) & 1
    chunk = max(1, _BATCH_ELEMENTS // x.size)
    v = np.concatenate(
        [
            np.asarray(_coalition_values(static, dyn, x, b, jnp.asarray(bits[s : s + chunk], bool)))
            for s in range(0, len(bits), chunk)
        ]
    ).astype(np.float64)
    _check_values(v, bits.astype(bool))
    size = bits.sum(axis=1)
    weight = np.array([factorial(s) * factorial(n - s - 1) / factorial(n) for s in range(n)])
    phi = np.empty(n)
    for i in range(n):
        without = coalitions[bits[:, i] == 0]
        phi[i] = np.sum(weight[size[without]] * (v[without | (1 << i)] - v[without]))
    check_finite_phi(phi)
    return phi


@partial(jax.jit, static_argnums=(0, 5))
def _pair_marginals(static, dyn, x, b, ranks, prefix_batch):
    """Antithetic-pair mean marginal contributions, (B, N), for rank vectors ranks (B, N)."""
    F = join_callable(static, dyn)
    check_scalar(F, x)
    n = x.shape[0]
    prefixes = jnp.arange(n + 1)

    def marginals(r):  # r[i] = position of agent i in the permutation
        vals = jax.lax.map(
            lambda k: F(jnp.where(_rows(r < k, x), x, b)), prefixes, batch_size=prefix_batch
        )
        return (vals[1:] - vals[:-1])[r]

    return jax.vmap(lambda r: 0.5 * (marginals(r) + marginals(n - 1 - r)))(ranks)


def sampled(
    F: Callable,
    x,
    baseline=None,
    permutations: int = 256,
    seed: int = 0,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo Shapley values with antithetic permutations; returns (phi, stderr), each (N,).

    permutations: even, >= 4 (permutations / 2 antithetic pairs). stderr: per-agent standard
    error of the mean over the pairs (sample std with ddof=1 / sqrt(pairs)). batch_size: prefix
    inputs evaluated per vectorized F call (default: about 4M feature entries per call).
    Costs permutations * (N + 1) evaluations of F.
    """
    if isinstance(permutations, bool) or not isinstance(permutations, (int, np.integer)):
        raise ValueError(f"permutations must be an integer, got {permutations!r}")
    if permutations < 4 or permutations % 2:
        raise ValueError(f"permutations must be even and >= 4 (antithetic pairs), got {permutations}")
    static, dyn, x, b = _prepare(F, x, baseline)
    n, per_prefix = x.shape[0], max(1, x.size)
    ends = np.array([[False] * n, [True] * n])
    _check_values(np.asarray(_coalition_values(static, dyn, x, b, jnp.asarray(ends)), np.float64), ends)
    pairs = permutations // 2
    prefix_batch = int(batch_size) if batch_size else max(1, _BATCH_ELEMENTS // per_prefix)
    if prefix_batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prefix_batch = min(prefix_batch, n + 1)
    # whole permutations per vectorized call when they fit, one at a time otherwise
    chunk = max(1, min(pairs, prefix_batch // (2 * (n + 1))))
    rng = np.random.default_rng(seed)
    ranks = rng.permuted(np.tile(np.arange(n, dtype=np.int32), (pairs, 1)), axis=1)
    pad = (-pairs) % chunk
    ranks = np.concatenate([ranks, ranks[:pad]]) if pad else ranks
    est = np.concatenate(
        [
            np.asarray(_pair_marginals(static, dyn, x, b, jnp.asarray(ranks[s : s + chunk]), prefix_batch))
            for s in range(0, len(ranks), chunk)
        ]
    )[:pairs].astype(np.float64)
    phi = est.mean(axis=0)
    check_finite_phi(phi, hint=" (F is not finite on some permutation prefix)")
    return phi, est.std(axis=0, ddof=1) / np.sqrt(pairs)

"""Inputs for the operator tests: heavy-tailed features and follow graphs (numpy only)."""

from __future__ import annotations

import numpy as np


def heavy_features(rng: np.random.Generator, n: int, d: int = 4) -> np.ndarray:
    """Bluesky-like window features [posts, engagement, stance_sum, reposts], heavy-tailed."""
    posts = 1.0 + rng.pareto(1.5, n)
    engagement = rng.lognormal(0.0, 1.5, n)
    stance = posts * rng.uniform(-1.0, 1.0, n)
    reposts = rng.pareto(2.0, n)
    return np.stack([posts, engagement, stance, reposts], axis=1)[:, :d]


def random_graph(rng: np.random.Generator, n: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """e distinct edges src -> dst (dst follows src), src drawn with heavy-tailed popularity."""
    pop = rng.pareto(1.2, n) + 1e-3
    src = rng.choice(n, size=4 * e, p=pop / pop.sum())
    dst = rng.integers(0, n, size=4 * e)
    keep = src != dst
    pairs = np.unique(np.stack([src[keep], dst[keep]], axis=1), axis=0)
    pairs = pairs[rng.permutation(len(pairs))[:e]]
    return pairs[:, 0], pairs[:, 1]


def reach_reference(src, dst, n: int, q: np.ndarray) -> float:
    """sum_j 1 - prod_{i->j} (1 - q_i), by a plain loop over followers (float64)."""
    surv = np.ones(n)
    for i, j in zip(src, dst):
        surv[j] *= 1.0 - q[i]
    return float(np.sum(1.0 - surv))

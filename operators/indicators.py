"""Macro indicators F: R^{N x d} -> R over agents' features (pure JAX).

Each indicator is a small frozen dataclass registered as a JAX pytree: array fields (the follow
graph) are pytree leaves and travel through ``jax.jit`` as arguments; configuration (columns,
p) is static. Call it on x of shape (N, d) (or (N,) when it reads one column). ``.name`` names it;
``.scale_invariant`` says whether F(c x) = F(x), in which case the zero baseline is useless (F is
constant along the ray from 0) and :func:`default_baseline` puts every *active* agent (``.active(x)``:
one with a post, or with engagement) at the mean of the active agents and leaves inactive agents
where they are (baseline = x, exact null players). The library (``attribute(F, x)``) and the
operator service use this same rule, so adding agents with no activity changes nobody's
attribution.

What raises: calling an indicator on an x without the configured column raises ValueError;
``operators.attribute`` raises NonFiniteError when F or its gradient is not finite (none of these
indicators produces one on finite, non-negative input). Limits: at kinks and ties of F (none in
these indicators for positive input; a user's max/abs/sort) the straight-line attribution depends
on how F is written, and the quadrature error estimate cannot see a kink between its nodes.

Axioms of the attribution (operators.attribute) that hold *exactly* for every indicator:
linearity in F, symmetry (agents with equal features and baselines get equal phi when F is
permutation symmetric in them), null player (an agent with x_i = b_i, or one F does not depend
on, gets exactly 0). Efficiency, sum(phi) = F(x) - F(b), holds up to quadrature error unless the
docstring says exact.

Live feature columns (stream.schemas.FEATURE_COLUMNS): 0 posts, 1 engagement, 2 stance_sum,
3 reposts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from operators.graph import FollowGraph, reach, reach_by_source

__all__ = [
    "FollowGraph",
    "Volume",
    "Polarization",
    "Concentration",
    "CascadeReach",
    "volume",
    "polarization",
    "concentration",
    "cascade_reach",
    "default_baseline",
    "name_of",
]


def _column(x: jax.Array, column: int, who: str) -> jax.Array:
    """Column ``column`` of x (N, d); a 1-D x is its own column 0."""
    if x.ndim == 1:
        if column not in (0, -1):
            raise ValueError(f"{who}: column {column} does not exist in 1-D x (only column 0)")
        return x
    if x.ndim != 2 or not -x.shape[1] <= column < x.shape[1]:
        raise ValueError(f"{who}: column {column} does not exist in x of shape {x.shape}")
    return x[:, column]


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (with finite gradients there)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _indicator(*meta: str):
    """Register a frozen dataclass as a pytree: ``meta`` fields static, the rest leaves."""

    def wrap(cls):
        cls = dataclass(frozen=True, eq=False)(cls)
        data = [f.name for f in fields(cls) if f.name not in meta]
        return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(meta))

    return wrap


@_indicator("column")
class Volume:
    """V(x) = sum_i x_i[column] (topic volume: total posts by default).

    Default baseline: zeros (V(0) = 0). Linear, so Aumann-Shapley = exact Shapley =
    x_i[column] - b_i[column], and efficiency is exact for any steps; all axioms hold exactly.
    """

    column: int = 0
    name: ClassVar[str] = "volume"
    scale_invariant: ClassVar[bool] = False

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.sum(_column(x, self.column, self.name))


@_indicator("weight_col", "stance_col")
class Polarization:
    """Weighted stance variance P(x) = sum_i w_i (m_i - mu)^2 / W.

    w_i = x_i[weight_col] >= 0 (posts), s_i = x_i[stance_col] (stance sum), m_i = s_i / w_i the
    agent's mean stance, W = sum_i w_i, mu = sum_i s_i / W the post-weighted mean stance.
    Agents with w_i == 0 carry no stance mass and contribute 0 (no division by zero, finite
    gradients); P = 0 when W == 0. Smooth wherever every w_i > 0.

    Scale-invariant (P(c x) = P(x), c > 0): default baseline = every posting agent (w_i > 0,
    :meth:`active`) at the posting agents' mean (w_bar, s_bar), where P(b) = 0, and every agent
    with no post at its own x (it carries no stance mass, so it is a null player, phi = 0);
    then sum(phi) = P(x). Why: the population mean over everyone would move non-posters away
    from 0 along the path and give them attribution (30 % of P with 70 % non-posters), and
    adding non-posters would change the others' attributions; under this rule neither happens.
    Efficiency up to quadrature error; symmetry, linearity, null player exact.
    """

    weight_col: int = 0
    stance_col: int = 1
    name: ClassVar[str] = "polarization"
    scale_invariant: ClassVar[bool] = True

    def __call__(self, x: jax.Array) -> jax.Array:
        w = _column(x, self.weight_col, self.name)
        s = _column(x, self.stance_col, self.name)
        total = jnp.sum(w)
        mu = _safe_div(jnp.sum(s), total)
        pos = w > 0
        m = jnp.where(pos, s / jnp.where(pos, w, 1), mu)
        return _safe_div(jnp.sum(jnp.where(pos, w * (m - mu) ** 2, 0)), total)

    def active(self, x: jax.Array) -> jax.Array:
        """Agents with a post (w_i > 0), bool (N,): the ones the default baseline moves."""
        return _column(x, self.weight_col, self.name) > 0


@_indicator("column")
class Concentration:
    """Herfindahl-Hirschman index of shares H(x) = sum_i (y_i / Y)^2, y = x[:, column] >= 0.

    Y = sum_i y_i; H = 0 when Y == 0. Default column 1 = engagement (attention concentration).
    Scale-invariant (H(c x) = H(x)): default baseline = every agent with y_i > 0
    (:meth:`active`) at their mean, the others at their own x (null players), where H(b) = 1/M
    for M active agents (perfect equality among them); then sum(phi) = H(x) - 1/M. Efficiency up
    to quadrature error; symmetry, linearity, null player exact.
    """

    column: int = 1
    name: ClassVar[str] = "concentration"
    scale_invariant: ClassVar[bool] = True

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _column(x, self.column, self.name)
        total = jnp.sum(y)
        return _safe_div(jnp.sum(y * y), total * total)

    def active(self, x: jax.Array) -> jax.Array:
        """Agents with y_i > 0, bool (N,): the ones the default baseline moves."""
        return _column(x, self.column, self.name) > 0


@_indicator("p", "column", "by_source")
class CascadeReach:
    """Expected independent-cascade reach over the follow graph g (edge i -> j: j follows i):

        R(x) = sum_j 1 - prod_{i->j} (1 - q_i),   q_i = p (1 - exp(-x_i[column]))

    (operators.graph.reach, custom sorted VJP). x needs g.n rows. Default baseline: zeros
    (R(0) = 0). Efficiency up to quadrature error; symmetry, linearity exact; null player exact:
    an agent nobody follows (no out-edge) or with x_i = b_i gets exactly 0. Agents sharing
    followers interact, so R is not additive and AS differs from exact Shapley.

    ``by_source``: x has one row per source-table slot of the (bucketed) g instead of one per
    node (row k is node ``g.t_nodes[k]``'s; every other node at 0; :func:`operators.graph.
    reach_by_source`): the same R for a panel, at O(its edges) instead of O(all agents).
    """

    g: FollowGraph
    p: float = 0.05
    column: int = 0
    by_source: bool = False
    name: ClassVar[str] = "cascade_reach"
    scale_invariant: ClassVar[bool] = False

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _column(x, self.column, self.name)
        return (reach_by_source if self.by_source else reach)(self.g, -self.p * jnp.expm1(-y))


def volume(column: int = 0) -> Volume:
    """Topic volume: sum of feature ``column`` (see :class:`Volume`)."""
    return Volume(int(column))


def polarization(weight_col: int = 0, stance_col: int = 1) -> Polarization:
    """Weighted stance variance (see :class:`Polarization`); live service: stance_col=2."""
    return Polarization(int(weight_col), int(stance_col))


def concentration(column: int = 1) -> Concentration:
    """HHI of the shares of feature ``column`` (see :class:`Concentration`)."""
    return Concentration(int(column))


def cascade_reach(g: FollowGraph, p: float = 0.05, column: int = 0, by_source: bool = False) -> CascadeReach:
    """Expected cascade reach on follow graph g (see :class:`CascadeReach`; ``by_source``: x per
    source-table slot of a bucketed g, else ValueError).

    The graph's arrays are copied to the default device once, here, so repeated attributions
    do not re-transfer them."""
    from operators.graph import GraphStack
    from operators.sharded import ShardedGraph

    if not isinstance(g, (FollowGraph, GraphStack, ShardedGraph)):
        raise ValueError(f"cascade_reach: g must be a FollowGraph, GraphStack or ShardedGraph, got {type(g).__name__}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"cascade_reach: p must lie in [0, 1), got {p}")
    if by_source and not (isinstance(g, FollowGraph) and g.layout == "bucketed"):
        raise ValueError("cascade_reach: by_source needs a bucketed FollowGraph")
    if not isinstance(g, ShardedGraph):  # (a sharded graph is already placed on its devices)
        g = jax.device_put(g)
    return CascadeReach(g, p, int(column), bool(by_source))  # graph stays device-resident


def default_baseline(F: Callable, x, mask=None) -> jax.Array:
    """The baseline ``attribute`` uses when none is given (the operator service uses it too).

    Zeros, unless F is scale-invariant (``F.scale_invariant``): then every active agent
    (``F.active(x)`` when F defines it, else every agent; and ``mask``) at the mean of the
    active agents (column means), and every other agent at its own x, so it is an exact null
    player and appending inactive agents changes no one's attribution. ``mask`` (bool, (N,))
    marks real agents in a padded x (padding rows are never active). Raises ValueError when
    mask does not have one entry per agent.
    """
    x = jnp.asarray(x)
    if not getattr(F, "scale_invariant", False):
        return jnp.zeros_like(x)
    m = jnp.ones(x.shape[:1], bool) if mask is None else jnp.asarray(mask, dtype=bool)
    if m.shape != x.shape[:1]:
        raise ValueError(f"mask shape {m.shape} does not match the number of agents {x.shape[0]}")
    active = getattr(F, "active", None)
    if callable(active):
        m = m & active(x)
    mb = m.reshape(m.shape + (1,) * (x.ndim - 1))
    mean = jnp.sum(jnp.where(mb, x, 0), axis=0) / jnp.maximum(jnp.sum(m), 1)
    return jnp.where(mb, mean, x)


def name_of(F: Callable) -> str:
    """An indicator's name: ``F.name``, else the function's ``__name__``."""
    name = getattr(F, "name", None)
    if isinstance(name, str):
        return name
    func = getattr(F, "func", F)  # jax.tree_util.Partial / functools.partial
    return getattr(func, "__name__", type(F).__name__)

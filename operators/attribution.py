"""Straight-line Aumann-Shapley attribution (Integrated Gradients), pure JAX.

For a scalar indicator F: R^{N x d} -> R, features x and a baseline b of the same shape,

    phi_i = (x_i - b_i) * integral_0^1 dF/dx_i (b + a (x - b)) da
          ~= (x_i - b_i) * sum_k w_k dF/dx_i (b + a_k (x - b))

with ``steps`` quadrature nodes a_k, weights w_k on [0, 1] (operators.quadrature). phi has the
shape of x (per agent and feature); sum it over features for per-agent attribution. Efficiency
gives sum(phi) = F(x) - F(b) up to quadrature error: ``delta = phi.sum() - (value -
baseline_value)`` is the completeness residual. The residual certifies the *sum* only: per-agent
quadrature errors of opposite signs cancel in it (cascade_reach on 4,000 heavy-tailed agents, 32
Gauss-Legendre nodes: residual 7e-5 of F(x) - F(b), the most active agent's phi 6 % off). Each
result therefore carries ``error``, a per-entry estimate |(x_i - b_i) sum_k (w_k - e_k) dF/dx_i|
from the rule's embedded rule e on the same nodes (operators.quadrature.embedded; no extra
evaluation of F): the estimate of the per-agent error, conservative once the integrand is
resolved (it is the error estimate of the coarser rule).

Limits. The straight line is one path among many: at kinks and ties of F (max, abs, sorting, a
threshold), dF/dx is not unique and path attribution depends on how F is written, not only on
its values; a kink or boundary layer that falls between all nodes is invisible to the error
estimate as well. Non-finite results are never returned: :class:`NonFiniteError` names what is
not finite (F(x), F(b), which agents' phi; e.g. sqrt at 0 has an infinite gradient).

The node loop is a ``lax.fori_loop`` that carries one gradient accumulator, so memory is O(N d),
not O(steps N d); with ``node_batch = k`` each loop step evaluates k nodes at once (``jax.vmap``),
memory O(k N d), fewer and larger kernels (for accelerators). The whole computation is one
jit-compiled program, cached on (F's static part, shapes, dtypes). The number of passes is a
runtime value and the node arrays are padded to a bucket of PASS_BUCKET passes, so the rule and
the number of nodes do not enter the cache key: the service's quadrature ladder (3 to 65 nodes,
both rules) runs one compiled program per indicator and shape, not one per rung. F is passed *through* jit as
an argument: its array leaves (an indicator's graph, for instance) are runtime inputs, not
constants baked into the program, so a new graph of the same shape reuses the compiled program.
Array leaves are found with ``jax.tree_util``; every other leaf (and a plain Python function,
which is a single leaf) is static and must be hashable.

Dtype: float32, or float64 when ``jax_enable_x64`` is on.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from operators.quadrature import embedded

__all__ = [
    "Attribution",
    "NonFiniteError",
    "attribute",
    "relative_residual",
    "split_callable",
    "join_callable",
    "float_dtype",
    "trace_count",
    "check_finite_phi",
]

_TRACES = 0
ACCELERATOR_NODE_BATCH = 8  # node_batch default off CPU: fastest on one H100 (BENCHMARKS.md)
PASS_BUCKET = 128  # node arrays are padded to a multiple of this many passes: one program per bucket


class Attribution(NamedTuple):
    """Result of :func:`attribute` (a pytree of JAX arrays)."""

    phi: jax.Array  # shape of x: per agent (row) and feature (column)
    value: jax.Array  # F(x)
    baseline_value: jax.Array  # F(b)
    delta: jax.Array  # completeness residual: phi.sum() - (value - baseline_value)
    error: jax.Array  # shape of x: per-entry quadrature error estimate (embedded rule), >= 0


class NonFiniteError(ValueError):
    """An input or result is NaN or infinite; the message names which (x, baseline, F(x), F(b),
    the agents whose phi is not finite)."""


def _agents_list(bad: np.ndarray, limit: int = 10) -> str:
    idx = np.flatnonzero(bad)
    more = f" (first {limit} of {idx.size})" if idx.size > limit else ""
    return f"{[int(i) for i in idx[:limit]]}{more}"


def check_finite_phi(phi, what: str = "phi", hint: str = "") -> None:
    """Raise :class:`NonFiniteError` naming the agents (rows) whose ``phi`` is NaN or infinite."""
    p = np.asarray(phi)
    bad = ~np.isfinite(p)
    if bad.any():
        bad = bad.reshape(p.shape[0], -1).any(axis=1) if p.ndim else bad.reshape(1)
        raise NonFiniteError(f"{what} is not finite for agent(s) {_agents_list(bad)}{hint}")


def relative_residual(delta: float, value: float, baseline_value: float) -> float:
    """The completeness residual relative to the change it accounts for, dimensionless:

        |delta| / max(|F(x) - F(b)|, 1e-6 max(|F(x)|, |F(b)|), 1e-12)

    ``delta`` = sum(phi) - (F(x) - F(b)). The denominator is F's change, floored at a millionth
    of F's magnitude (and at 1e-12 absolute): when F barely moved, the residual is judged against
    what float32 can resolve of F itself, not against a vanishing difference that would make any
    rounding look like a failure. NaN when delta is NaN. Scalars (Python floats) in, float out;
    the one definition of the health check the alert rule, the console and the reports share.
    """
    scale = max(abs(value - baseline_value), 1e-6 * max(abs(value), abs(baseline_value)), 1e-12)
    return abs(delta) / scale


def float_dtype():
    """float64 when jax x64 is enabled, else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _is_array_leaf(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


class _Static(NamedTuple):
    treedef: Any
    mask: tuple  # True where the leaf is an array (dynamic)
    leaves: tuple  # static leaves, None at dynamic positions


def split_callable(F: Callable) -> tuple[_Static, tuple]:
    """Split a callable pytree into (hashable static part, tuple of array leaves) for jit."""
    if not callable(F):
        raise ValueError(f"F must be callable, got {type(F).__name__}")
    leaves, treedef = jax.tree_util.tree_flatten(F)
    mask = tuple(_is_array_leaf(leaf) for leaf in leaves)
    static = _Static(treedef, mask, tuple(None if m else leaf for m, leaf in zip(mask, leaves)))
    try:
        hash(static)
    except TypeError as e:
        raise ValueError(
            f"F must be hashable or a pytree whose non-array leaves are hashable ({e})"
        ) from None
    return static, tuple(leaf for m, leaf in zip(mask, leaves) if m)


def join_callable(static: _Static, dyn) -> Callable:
    """Inverse of :func:`split_callable`."""
    it = iter(dyn)
    leaves = [next(it) if m else leaf for m, leaf in zip(static.mask, static.leaves)]
    return jax.tree_util.tree_unflatten(static.treedef, leaves)


def check_scalar(F: Callable, z: jax.Array) -> jax.Array:
    """F(z), raising ValueError unless it is a real scalar."""
    v = F(z)
    shape, dtype = jnp.shape(v), jnp.result_type(v)
    if shape != ():
        raise ValueError(f"F must return a scalar, got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"F must return a real floating scalar, got dtype {dtype}")
    return v


def as_features(x, name: str = "x") -> jax.Array:
    """x as a float array of shape (N,) or (N, d), raising ValueError otherwise."""
    try:
        arr = jnp.asarray(x, dtype=float_dtype())
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array ({e})") from None
    if arr.ndim not in (1, 2) or arr.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N,) or (N, d) with N >= 1, got {arr.shape}")
    return arr


def resolve_baseline(F: Callable, x: jax.Array, baseline) -> jax.Array:
    """The baseline as an array shaped like x: ``indicators.default_baseline`` when None."""
    if baseline is None:
        from operators.indicators import default_baseline

        return jnp.asarray(default_baseline(F, x), dtype=x.dtype)
    b = jnp.asarray(baseline, dtype=x.dtype)
    if b.shape != x.shape:
        raise ValueError(f"baseline shape {b.shape} does not match x shape {x.shape}")
    return b


@partial(jax.jit, static_argnums=0)
def _attribute_core(static, dyn, x, b, alphas, weights, eweights, passes):
    """alphas, weights, eweights (embedded rule): (rows, node_batch), of which the first ``passes``
    rows (an int32 scalar, a runtime value) are the rule's; one loop step per pass, its nodes
    vmapped. The rows are padded to a fixed bucket (:data:`PASS_BUCKET`), so every rule of up to
    that many passes runs the same compiled program. Returns the Attribution and finiteness flags
    (inputs, F(x), F(b), phi)."""
    global _TRACES
    _TRACES += 1
    F = join_callable(static, dyn)
    value = check_scalar(F, x)
    grad = jax.grad(lambda z: F(z).astype(x.dtype))
    d = x - b
    shape = (alphas.shape[1],) + (1,) * x.ndim

    def one_pass(i, acc):
        a, w, e = alphas[i], weights[i], eweights[i]
        if alphas.shape[1] == 1:
            gk = grad(b + a[0] * d)
            return acc[0] + w[0] * gk, acc[1] + e[0] * gk
        a, w, e = (v.reshape(shape) for v in (a, w, e))
        gk = jax.vmap(grad)(b + a * d)
        return acc[0] + jnp.sum(w * gk, axis=0), acc[1] + jnp.sum(e * gk, axis=0)  # no dot: no TF32

    g, ge = jax.lax.fori_loop(0, passes, one_pass, (jnp.zeros_like(x), jnp.zeros_like(x)))
    phi = d * g
    baseline_value = F(b)
    flags = jnp.stack([jnp.isfinite(x).all() & jnp.isfinite(b).all(), jnp.isfinite(value),
                       jnp.isfinite(baseline_value), jnp.isfinite(phi).all()])
    res = Attribution(phi, value, baseline_value, phi.sum() - (value - baseline_value), jnp.abs(d * (g - ge)))
    return res, flags


@lru_cache(maxsize=64)
def _device_nodes(steps: int, rule: str, node_batch: int, dtype) -> tuple[jax.Array, ...]:
    """Nodes, weights and embedded weights as (rows, node_batch) arrays on the default device,
    and the number of passes (int32 scalar); cached: no host copy per call. A last, partial pass
    is filled with weight-0 copies of the last node; rows past the passes (up to a multiple of
    :data:`PASS_BUCKET`) are weight-0 padding the loop never reaches."""
    alphas, weights, eweights = embedded(steps, rule)
    passes = -(-steps // node_batch)
    rows = -(-passes // PASS_BUCKET) * PASS_BUCKET
    fill = rows * node_batch - steps
    alphas = np.concatenate([alphas, np.full(fill, alphas[-1])]).reshape(rows, node_batch)
    weights, eweights = (np.concatenate([w, np.zeros(fill)]).reshape(rows, node_batch)
                         for w in (weights, eweights))
    return (*(jnp.asarray(v, dtype=dtype) for v in (alphas, weights, eweights)), jnp.asarray(passes, jnp.int32))


def _check_node_batch(node_batch, steps: int) -> int:
    if node_batch is None:
        node_batch = 1 if jax.default_backend() == "cpu" else ACCELERATOR_NODE_BATCH
    if isinstance(node_batch, bool) or not isinstance(node_batch, (int, np.integer)) or node_batch < 1:
        raise ValueError(f"node_batch must be an integer >= 1, got {node_batch!r}")
    return min(int(node_batch), steps)


def attribute(
    F: Callable,
    x,
    baseline=None,
    steps: int = 32,
    rule: str = "gauss-legendre",
    node_batch: int | None = None,
) -> Attribution:
    """Aumann-Shapley attribution of F(x) - F(baseline) to the entries of x.

    F: scalar JAX-traceable function of an (N,) or (N, d) array: an ``operators.indicators``
    indicator (a pytree, its arrays passed as jit arguments) or any hashable callable.
    baseline: same shape as x; None = ``indicators.default_baseline(F, x)`` (zeros, or the
    population mean for scale-invariant indicators). steps: quadrature nodes (>= 1).
    rule: "gauss-legendre" (default), "midpoint" or "gauss-legendre-graded" (nodes graded toward
    the baseline: fewer nodes for saturating indicators such as cascade_reach; see
    operators.quadrature). node_batch: quadrature nodes evaluated together in one loop step
    (vmapped; capped at steps); memory O(node_batch N d). None = 1 on CPU (fastest there),
    ACCELERATOR_NODE_BATCH on a GPU/TPU backend (fewer, larger kernels).
    "gauss-kronrod" / "gauss-kronrod-graded": steps = 2n + 1 (odd), the Kronrod extension of the
    n-point Gauss rule: the most accurate result per node, with the classic embedded estimate.

    Returns :class:`Attribution`: ``phi`` (shape of x), ``value`` F(x), ``baseline_value`` F(b),
    ``delta`` the completeness residual (certifies the sum only), ``error`` the per-entry
    quadrature error estimate (shape of x; sum it over features for an agent's bound). Limits
    (see the module docstring): at kinks and ties of F the attribution depends on how F is
    written; a feature between all nodes escapes the error estimate.

    Raises ValueError for bad arguments (F not a scalar real function, shapes, steps, rule,
    node_batch) and :class:`NonFiniteError` (a ValueError) when x or the baseline holds NaN/inf,
    F(x) or F(b) is not finite, or phi is not finite for some agents (listed; e.g. a gradient
    that is infinite on the path, as sqrt's at 0).
    """
    embedded(steps, rule)  # validates steps and rule (clear errors) before the cached copy
    node_batch = _check_node_batch(node_batch, steps)
    static, dyn = split_callable(F)
    x = as_features(x)
    b = resolve_baseline(F, x, baseline)
    res, flags = _attribute_core(static, dyn, x, b, *_device_nodes(steps, rule, node_batch, x.dtype))
    flags = np.asarray(flags)
    if not flags.all():
        if not flags[0]:
            raise NonFiniteError("x and baseline must be finite (found NaN or inf)")
        for ok, what, v in ((flags[1], "F(x)", res.value), (flags[2], "F(b) (the baseline value)",
                                                              res.baseline_value)):
            if not ok:
                raise NonFiniteError(f"{what} is not finite ({float(v)})")
        check_finite_phi(res.phi, hint=" (the gradient of F is not finite on the path)")
    return res


def trace_count() -> int:
    """How many times the attribution program has been traced (compiled) in this process."""
    return _TRACES

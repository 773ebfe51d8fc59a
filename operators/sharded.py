"""The cascade kernel across several devices: nodes and edges partitioned (pure JAX, no I/O).

A graph larger than one device's memory (the whole network: ~40M accounts, billions of follows)
is split over a 1-D device mesh (axis ``"d"``, D devices). Node ids [0, n) are cut into D equal
blocks; device p holds the edges whose *follower* (dst) lies in block p, as a bucketed
:class:`operators.graph.FollowGraph` over all n nodes, and block p of every per-node array
(features, q, gradients). With ``jax.shard_map``:

- forward: q is all-gathered (n floats per device), each device computes S_j for its own
  followers j (every in-edge of j is local) and its part of R; R = psum over devices;
- backward (custom VJP of the local kernel): each device gathers exp(S) over its edges grouped
  by source, giving a partial dR/dq over all n sources; the transpose of the all-gather sums
  those partials and scatters them back to the node blocks (psum_scatter).

So per device: its share of the edges (about 9 bytes per edge: two int32 table cells plus the
padding slack) plus O(n) floats for the gathered q and the partial gradient. The maths is the
same as one device's: results agree to float32 rounding (sums in a different order).

All parts share one set of table capacities (the elementwise maximum over parts), so the stacked
index arrays have one shape and one compiled program serves every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from operators.graph import FollowGraph, LeafHolder, _as_index, _check_ids, _plan, _reach

__all__ = ["ShardedGraph", "node_mesh", "shard_rows", "AXIS"]

AXIS = "d"


def node_mesh(devices=None) -> Mesh:
    """A 1-D mesh (axis ``"d"``) over ``devices`` (default: every JAX device)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (AXIS,))


def shard_rows(x, mesh: Mesh) -> jax.Array:
    """x (n, ...) placed on ``mesh`` with rows (nodes) split into equal blocks; n % D == 0."""
    x = jnp.asarray(x)
    if x.shape[0] % mesh.size:
        raise ValueError(f"shard_rows: {x.shape[0]} rows do not split into {mesh.size} equal blocks")
    return jax.device_put(x, NamedSharding(mesh, P(AXIS)))


def _spec_max(a, b):
    if a is None:
        return b
    return (max(a[0], b[0]), max(a[1], b[1]), tuple(max(u, v) for u, v in zip(a[2], b[2])))


@jax.tree_util.register_pytree_node_class
class ShardedGraph(LeafHolder):
    """``ShardedGraph(src, dst, n, mesh, n_real=None)``: edges ``src -> dst`` (dst follows src) over
    node ids [0, n), partitioned over ``mesh`` (see the module docstring). ``n`` must be a multiple
    of the mesh size (the service's capacities are powers of two); ``n_real`` < n marks nodes
    >= n_real as padding (q treated as 0, zero gradient), like ``FollowGraph.padded``.

    A pytree: the stacked index arrays (leading axis = device, sharded) are leaves; n, the mesh
    and the capacities are static. Use it wherever a FollowGraph goes (``indicators.cascade_reach``,
    ``attribute``); put x on the mesh with :func:`shard_rows`. Raises ValueError on bad ids or n.
    """

    def __init__(self, src, dst, n: int, mesh: Mesh, n_real: int | None = None):
        src, dst = _as_index("src", src), _as_index("dst", dst)
        n, d = int(n), mesh.size
        if n < 1 or n % d:
            raise ValueError(f"ShardedGraph: n ({n}) must be a positive multiple of the {d} devices")
        _check_ids(src, dst, n, "ShardedGraph")
        block = n // d
        part = dst // block
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(d + 1))
        pieces = [(src[order[a:b]], dst[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]
        del order, part
        fcap = bcap = None
        for s, t in pieces:  # common capacities: the maximum over parts
            fcap = _spec_max(fcap, _plan(np.bincount(t, minlength=n))[1])
            bcap = _spec_max(bcap, _plan(np.bincount(s, minlength=n))[1])
        graphs = [FollowGraph(s, t, n, "bucketed", (fcap, bcap)) for s, t in pieces]
        sharding = NamedSharding(mesh, P(AXIS))
        leaves = [g.tree_flatten()[0][:2] + g.tree_flatten()[0][3:] for g in graphs]  # no n_real
        stacked = jax.tree_util.tree_map(lambda *a: jax.device_put(np.stack([np.asarray(v) for v in a]), sharding),
                                         *leaves)
        self._set((stacked, jnp.asarray(n if n_real is None else int(n_real), jnp.int32)),
                  (n, mesh, graphs[0].capacities, sum(int(s.size) for s, _ in pieces)))

    def _set(self, leaves, aux):
        self.parts, self.n_real = leaves
        self.n, self.mesh, self.capacities, self.num_edges = aux
        self.layout = "sharded"

    def tree_flatten(self):
        return (self.parts, self.n_real), (self.n, self.mesh, self.capacities, self.num_edges)

    def __repr__(self) -> str:
        return f"ShardedGraph(n={self.n}, edges={self.num_edges}, devices={self.mesh.size})"

    def nbytes(self) -> int:
        """Bytes of the index arrays over all devices (the per-edge memory: nbytes / num_edges)."""
        return sum(a.nbytes for a in jax.tree_util.tree_leaves(self.parts))

    def reach(self, q: jax.Array) -> jax.Array:
        """R(q) with q of shape (n,) (padding already zeroed by ``operators.graph.reach``)."""
        n, caps = self.n, self.capacities

        def local(parts, q_block):
            perm, pos, fwd, bwd = jax.tree_util.tree_map(lambda a: a[0], parts)
            g = FollowGraph.tree_unflatten((n, "bucketed", 0, caps), (perm, pos, jnp.int32(n), fwd, bwd))
            q_all = jax.lax.all_gather(q_block, AXIS, tiled=True)
            return jax.lax.psum(_reach(g, q_all), AXIS)

        return jax.shard_map(local, mesh=self.mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P())(self.parts, q)

"""Per-topic active subgraphs of the follow graph, kept up to date incrementally (pure numpy/JAX).

Cascade reach with the zero baseline only ever sees q_i = p (1 - exp(-a x_i)) on the path
b + a (x - b), a in [0, 1]: an agent with x_i = 0 has q_i = 0 at every node, so an edge i -> j
adds log1p(0) = 0 to S_j and nothing to any phi. The edges out of the agents active in a topic
(a superset: the *covered* agents) therefore give exactly R(x), R(0) and phi of the full graph,
at a fraction of its edges (30 % of the agents active -> about 30 % of the edges).

The subgraph is held as an :class:`operators.graph.GraphStack`: a base layout (all present edges
out of the covered agents when it was built) plus one small signed edge list, the edges added to
it since (+1) and removed from it (-1). At each update, from the global edge set's change log and the
topic's current active mask:

- an edge op (add/remove) whose source is covered goes into the added / removed layer (an add and
  a later remove of the same edge cancel);
- an agent that became active and is not covered becomes covered: its present out-edges join the
  added layer (after the log, so nothing is counted twice);
- an agent that became inactive stays covered (its edges add exactly 0).

The base is rebuilt (covered := active) only when the delta layers exceed ``rebuild_delta`` of the
base's edges, the edges out of covered-but-inactive agents exceed ``rebuild_stale`` of them, the
node capacity changed or the edge set was reloaded. Every base is built with at least the table
capacities of the bases built before it (``shared``, one per state: all topics' subgraphs and
rebuilds; a table that outgrows them takes the new count, not double: ``FollowGraph(tight=True)``,
so no topic pays for another's padding), and the signed edge list is padded to a capacity that
grows by doubling, from base edges / DELTA_SHARE (the kernel loops over its real entries only, so
a generous capacity costs memory, not time), so after the first builds (one program per distinct
set of capacities, at most one per topic) one compiled program serves every topic and hop.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from operators.graph import FollowGraph, GraphStack, pow2_at_least

__all__ = ["ActiveSubgraph", "MIN_EDGES", "DELTA_SHARE"]

MIN_EDGES = 1024  # smallest edge capacity of a layer
DELTA_SHARE = 8  # the delta list starts at a capacity of base edges / DELTA_SHARE (its padding costs nothing)


def _padded_edges(keys: np.ndarray, n: int, prev: int) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) of ``keys`` padded with dummy edges n -> n to a capacity >= prev (doubling)."""
    cap = pow2_at_least(max(keys.size, 1), max(prev, MIN_EDGES))
    src, dst = np.full(cap, n, np.int64), np.full(cap, n, np.int64)
    src[: keys.size], dst[: keys.size] = keys >> 32, keys & 0xFFFFFFFF
    return src, dst


class ActiveSubgraph:
    """One topic's subgraph (see the module docstring). ``update(...)`` returns the GraphStack.

    ``out_edges(rows) -> keys``: the present edges (src << 32 | dst, int64) out of ``rows``.
    """

    def __init__(self, out_edges: Callable[[np.ndarray], np.ndarray], rebuild_delta: float = 0.25,
                 rebuild_stale: float = 0.5, shared: dict | None = None):
        self.out_edges = out_edges
        self.shared = {} if shared is None else shared  # capacities shared by every base built
        self.rebuild_delta, self.rebuild_stale = rebuild_delta, rebuild_stale
        self.covered = np.zeros(0, bool)
        self.delta = np.empty(0, np.int64)   # edge keys added to / removed from the base, sorted
        self.sign = np.empty(0, np.int64)    # +1 added, -1 removed, per entry of ``delta``
        self.base_edges = 0
        self.log_pos = 0        # absolute position in the owner's edge-change log
        self.epoch = None       # the owner's (edge-set epoch, node capacity) at the last base build
        self.builds = 0         # base builds so far (tests, benchmarks)
        self._base: FollowGraph | None = None
        self._stack: GraphStack | None = None
        self._n_rows = -1
        self._dirty = True

    def update(self, active: np.ndarray, log_keys: np.ndarray, log_add: np.ndarray, log_end: int,
               n_rows: int, capacity: int, epoch) -> GraphStack:
        """The subgraph for the agents ``active`` (bool, (capacity,)) after the edge ops
        ``log_keys``/``log_add`` (the log entries from ``self.log_pos`` to ``log_end``)."""
        active = np.asarray(active, bool)
        if self.epoch != (epoch, capacity):
            self._rebuild(active, n_rows, capacity, epoch)
        else:
            cov = self.covered[log_keys >> 32]
            new = np.flatnonzero(active & ~self.covered)
            if cov.any() or new.size:
                self.covered[new] = True
                fresh = self.out_edges(new)
                keys = np.concatenate([self.delta, log_keys[cov], fresh])
                sign = np.concatenate([self.sign, np.where(log_add[cov], 1, -1), np.ones(fresh.size, np.int64)])
                uniq, inv = np.unique(keys, return_inverse=True)
                net = np.bincount(inv, sign, minlength=uniq.size).astype(np.int64)
                keep = net != 0
                self.delta, self.sign = uniq[keep], net[keep]
                self._dirty = True
            stale = self.covered & ~active
            big = self.rebuild_delta * max(self.base_edges, MIN_EDGES)
            if (self.delta.size > big
                    or (stale.any() and self.out_edges(np.flatnonzero(stale)).size
                        > self.rebuild_stale * max(self.base_edges, MIN_EDGES))):
                self._rebuild(active, n_rows, capacity, epoch)
        self.log_pos = log_end
        if self._dirty or self._stack is None or self._n_rows != n_rows:
            prev = self.shared.get("delta_edges", self.base_edges // DELTA_SHARE)
            delta = _padded_edges(self.delta, capacity, prev)  # sorted by source: so is the padding
            sign = np.ones(delta[0].size, np.float32)
            sign[: self.sign.size] = self.sign
            self.shared["delta_edges"] = delta[0].size
            self._stack = GraphStack(self._base, (delta,), (sign,), n_real=max(n_rows, 1))
            self._dirty, self._n_rows = False, n_rows
        return self._stack

    def _rebuild(self, active: np.ndarray, n_rows: int, capacity: int, epoch) -> None:
        self.covered = active.copy()
        keys = self.out_edges(np.flatnonzero(active))
        if self.shared.get("capacity") != capacity:
            self.shared.clear()
            self.shared["capacity"] = capacity
        caps, e_cap = self.shared.get("caps"), self.shared.get("edges", MIN_EDGES)
        self._base = FollowGraph.padded(keys >> 32, keys & 0xFFFFFFFF, max(n_rows, 1), capacity,
                                        pow2_at_least(max(keys.size, 1), e_cap), capacities=caps, tight=True)
        self.shared["caps"], self.shared["edges"] = self._base.capacities, self._base.num_edges
        self.base_edges = int(keys.size)
        self.delta, self.sign = np.empty(0, np.int64), np.empty(0, np.int64)
        self.epoch, self.builds, self._dirty = (epoch, capacity), self.builds + 1, True

    @property
    def num_edges(self) -> int:
        """Edges in the layers: base + added + removed (the work per kernel pass)."""
        return self.base_edges + int(self.delta.size)

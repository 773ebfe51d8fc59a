"""The operator's device-resident state: agents, per-topic features, followers and the follow graph.

Rows: every DID seen in ``chorus.features`` or ``chorus.graph`` gets a row index, assigned once
(rows are never reused, so a long-running service grows with the distinct DIDs it has seen).
All arrays have one padded *capacity* ``C`` (a power of two, ``C >= rows + 1``: the last row is the
follow graph's reserved dummy node) that grows by doubling, so the compiled JAX programs keep their
shapes between hops and retrace only when ``C`` (or the edge capacity) doubles.

Idempotent, order-tolerant updates, so replaying ``chorus.features``/``chorus.graph`` from the
beginning after a restart rebuilds exactly the same state:

- Features: the latest message per DID wins (a message with an older ``window_end`` than the one
  applied for that DID is ignored). A message replaces that DID's vector in every topic: topics it
  does not list become zero; ``expired`` zeroes them all.
- Graph edges: add/remove are set operations on ``(src, dst)``; per edge the op of the highest
  *order* wins, an add on a tie (:class:`EdgeSet`, compact numpy storage). The order of an op is
  its ``rev`` (the follower's repo revision, a TID, as its 64-bit integer) or, without one,
  ``time_us << 10 | 1023`` (:func:`op_order`). Every op on an edge comes from the follower's
  repository, whose revs only grow, so this is the AT Protocol's backfill rule: a live op whose
  rev is not newer than a backfilled checkpoint's (``chorus backfill``) is already in it and
  changes nothing, a newer one applies on top, whatever order the live and backfilled ops arrive
  in. (A repository can only misorder its own follows with false revs.)
- A remove may name only the follow record (``uri``, what a firehose delete carries): the record
  -> edge index (:class:`RecordIndex`) resolves it. A remove whose add has not arrived yet (a
  backfill published after the live delete) is kept there as a pending remove, which the add then
  applies, so a follow deleted while its repository was being backfilled does not survive. A
  ``purge`` (an account is gone) removes every edge the account follows with, unless a later op
  re-added it, and adds for that account arriving later that are not newer than the purge are
  ignored (a backfill read before the account went); purges are applied in one vectorized pass
  before the graph or the follower counts are next read.
- Followers: the in-degree of each row in the present edge set (``followers[src]`` counts the
  edges ``src -> *``), kept up to date with every change: the one source of follower counts for
  bands and panel. (The ``followers`` field of old ``chorus.features`` records is ignored.)

Features live on the host (the source of truth) and on the default JAX device; changed rows are
copied to the device in one scatter per topic and hop (padded to a power-of-two batch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from stream.schemas import FEATURE_COLUMNS, Features, GraphEdge, tid_value

from operators.graph import FollowGraph, GraphStack, pow2_at_least
from operators.subgraph import ActiveSubgraph

MIN_CAPACITY = 1024
D = len(FEATURE_COLUMNS)
# Up to this many present edges the per-topic and panel graphs are plain edge lists (the "sorted"
# layout) padded to one shared capacity (see OperatorState.active_graph): every topic, panel and
# sample then runs one compiled program, and a hop costs no compile while the graph grows within
# it. Above, the incremental bucketed subgraphs (operators.subgraph): faster per pass at scale
# (~4x at 16.7M edges), but their tables grow class by class as activity moves, each growth a
# compile. Measured on 2 cores, 15,000 accounts / 411,011 edges, 25 hops of a 6 h window: edge
# lists 1.5-5 s per hop (4 compiles in all), incremental 1-55 s per hop (55 compiles).
SMALL_EDGES = 1 << 20


def _pow2_at_least(n: int, floor: int = MIN_CAPACITY) -> int:
    return pow2_at_least(n, floor)


@jax.jit
def _any_row(h: np.ndarray) -> np.ndarray:
    """h.any(axis=1) for a narrow (C, D) array, column by column (numpy's row reduction of 4
    columns costs ~60 ms at 2M rows, this ~6 ms)."""
    out = h[:, 0] != 0
    for j in range(1, h.shape[1]):
        out |= h[:, j] != 0
    return out


def _scatter_rows(x: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """x with x[rows] = values; rows >= len(x) (batch padding) are dropped."""
    return x.at[rows].set(values, mode="drop")


def op_order(e: GraphEdge) -> int:
    """The order of a graph op (module docstring): its rev as a TID integer when it has a valid
    one, else ``time_us << 10 | 1023`` (after every rev of the same microsecond)."""
    if e.rev is not None and len(e.rev) == 13:
        try:
            v = tid_value(e.rev)
        except KeyError:
            v = -1
        if 0 <= v < 1 << 63:
            return v
    return (min(max(int(e.time_us), 0), (1 << 52) - 1) << 10) | 0x3FF


class EdgeSet:
    """Follow edges keyed ``src << 32 | dst`` with the order of the last op on each (removed edges
    stay as tombstones, so an older duplicate op cannot resurrect them; an add wins a tie).

    Recent ops live in a dict; :meth:`compact` merges them into sorted numpy arrays (about 17 bytes
    per edge), so millions of edges stay compact.
    """

    MERGE_AT = 1 << 20

    def __init__(self):
        self._keys = np.empty(0, np.int64)
        self._time = np.empty(0, np.int64)
        self._present = np.empty(0, bool)
        self._recent: dict[int, tuple[int, bool]] = {}
        self._recent_arrays: tuple[np.ndarray, ...] | None = None  # _recent as (keys, time, present)
        self.count = 0  # present edges

    def _lookup(self, key: int) -> tuple[int, bool] | None:
        hit = self._recent.get(key)
        if hit is None and self._keys.size:
            i = int(np.searchsorted(self._keys, key))
            if i < self._keys.size and self._keys[i] == key:
                hit = (int(self._time[i]), bool(self._present[i]))
        return hit

    def apply(self, key: int, order: int, present: bool) -> bool:
        """Apply one add (present=True) or remove at ``order``; returns whether the set changed."""
        prev = self._lookup(key)
        if prev is not None and (order < prev[0] or (order == prev[0] and prev[1] and not present)):
            return False
        self._recent[key] = (order, present)
        self._recent_arrays = None
        was = prev is not None and prev[1]
        if len(self._recent) >= self.MERGE_AT:
            self.compact()
        if present != was:
            self.count += 1 if present else -1
            return True
        return False

    def add_many(self, keys: np.ndarray, time_us: int = 0) -> None:
        """Bulk add distinct, new keys (initial loads and benchmarks)."""
        self.compact()
        keys = np.asarray(keys, np.int64)
        self._merge(keys, np.full(keys.size, time_us, np.int64), np.ones(keys.size, bool))
        self.count = int(self._present.sum())

    def _recent_view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The recent ops as arrays (keys, time, present), built once per batch of ops."""
        if self._recent_arrays is None:
            n, vals = len(self._recent), self._recent.values()
            self._recent_arrays = (np.fromiter(self._recent, np.int64, n),
                                   np.fromiter((t for t, _ in vals), np.int64, n),
                                   np.fromiter((p for _, p in vals), bool, n))
        return self._recent_arrays

    def compact(self) -> None:
        if self._recent:
            self._merge(*self._recent_view())
            self._recent.clear()
            self._recent_arrays = None

    def _merge(self, keys, time, present) -> None:
        """Merge distinct ``keys`` (any order) into the sorted arrays: existing keys are updated
        in place, new ones inserted (O(E) copies, no sort of the whole set)."""
        if not self._keys.size:  # first load: one in-place sort, no index array
            if np.all(time == time[:1]) and present.all():
                keys = np.sort(keys)
                self._keys, self._time, self._present = keys, time, present
                return
        order = np.argsort(keys, kind="stable")
        keys, time, present = keys[order], time[order], present[order]
        at = np.searchsorted(self._keys, keys)
        hit = at < self._keys.size
        hit[hit] = self._keys[at[hit]] == keys[hit]
        self._time[at[hit]], self._present[at[hit]] = time[hit], present[hit]
        new, at = ~hit, at[~hit]
        self._keys = np.insert(self._keys, at, keys[new])
        self._time = np.insert(self._time, at, time[new])
        self._present = np.insert(self._present, at, present[new])

    def purge(self, rows: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Remove the present edges ``* -> rows[i]`` whose last op is at or before ``times[i]``
        (sorted ``rows``); returns their keys."""
        self.compact()
        order = np.argsort(rows)
        rows, times = rows[order], times[order]
        dst = self._keys & 0xFFFFFFFF
        i = np.clip(np.searchsorted(rows, dst), 0, rows.size - 1)
        hit = self._present & (rows[i] == dst) & (self._time <= times[i])
        self._present[hit] = False
        self._time[hit] = times[i][hit]
        self.count -= int(hit.sum())
        return self._keys[hit]

    def present(self) -> np.ndarray:
        """Keys of the present edges, sorted."""
        self.compact()
        return self._keys[self._present]

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._time.nbytes + self._present.nbytes

    def out_edges(self, rows) -> np.ndarray:
        """Present edge keys with source in ``rows`` (row indices), sorted by (src, dst).

        Reads the sorted arrays and overlays the recent ops (a recent op on a key overrides the
        arrays' entry) without compacting: a compaction rewrites every array (O(E): ~1.6 s at 100M
        edges), which a hop asking for a few agents' edges must not pay for each batch of ops."""
        rows = np.unique(np.asarray(rows, np.int64))
        lo, hi = np.searchsorted(self._keys, rows << 32), np.searchsorted(self._keys, (rows + 1) << 32)
        lens = hi - lo
        idx = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        keys = self._keys[idx[self._present[idx]]]
        if not self._recent or not rows.size:
            return keys
        rk, _, rp = self._recent_view()  # once per batch of ops: a hop asks many times
        src = rk >> 32
        mine = np.isin(src, rows)
        if not mine.any():
            return keys
        rk, rp = rk[mine], rp[mine]
        at = np.searchsorted(keys, rk)  # keys is sorted: O(recent log E), not a pass over E
        hit = at < keys.size
        hit[hit] = keys[at[hit]] == rk[hit]
        keys = np.delete(keys, at[hit])  # the recent op decides for these keys
        add = np.sort(rk[rp])
        return np.insert(keys, np.searchsorted(keys, add), add)


class RecordIndex:
    """Follow record key (:func:`stream.worker.table.key_of` of the record URI) -> edge key (>= 0),
    or a pending remove's order as ``-order - 1`` (< 0) while the record's add has not arrived;
    16 bytes per record: recent entries in a dict, merged into sorted numpy arrays."""

    MERGE_AT = 1 << 20

    def __init__(self):
        self._keys = np.empty(0, np.int64)
        self._edges = np.empty(0, np.int64)
        self._recent: dict[int, int] = {}

    def __len__(self) -> int:
        self.compact()
        return int(self._keys.size)

    def get(self, rec: int) -> int | None:
        hit = self._recent.get(rec)
        if hit is None and self._keys.size:
            i = int(np.searchsorted(self._keys, rec))
            if i < self._keys.size and self._keys[i] == rec:
                hit = int(self._edges[i])
        return hit

    def put(self, rec: int, edge: int) -> None:
        self._recent[rec] = edge
        if len(self._recent) >= self.MERGE_AT:
            self.compact()

    def compact(self) -> None:
        if self._recent:
            keys = np.fromiter(self._recent, np.int64, len(self._recent))
            edges = np.fromiter(self._recent.values(), np.int64, len(self._recent))
            self._recent.clear()
            self.put_many(keys, edges)

    def put_many(self, keys: np.ndarray, edges: np.ndarray) -> None:
        keep = ~np.isin(self._keys, keys)
        k = np.concatenate([self._keys[keep], keys])
        order = np.argsort(k, kind="stable")
        self._keys, self._edges = k[order], np.concatenate([self._edges[keep], edges])[order]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        self.compact()
        return self._keys, self._edges

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._edges.nbytes


@dataclass(frozen=True)
class TopicView:
    """One topic's inputs at a hop: ``x`` (C, 4) on device, ``active`` (C,) host bool mask of agents
    with any non-zero feature, ``n_rows`` real rows (rows >= n_rows are padding)."""

    topic: str
    x: jax.Array
    active: np.ndarray
    n_rows: int

    @property
    def n_agents(self) -> int:
        return int(self.active.sum())


class OperatorState:
    """DID registry, per-topic feature matrices, follower counts and follow edges (see module doc)."""

    def __init__(self, capacity: int = MIN_CAPACITY, edge_capacity: int = MIN_CAPACITY,
                 small_edges: int = SMALL_EDGES):
        self.small_edges = int(small_edges)
        self._list_capacity = MIN_CAPACITY          # edge capacity of the small-graph edge lists
        self.capacity = _pow2_at_least(capacity)
        self.edge_capacity = _pow2_at_least(edge_capacity)
        self.index: dict[str, int] = {}
        self.dids: list[str] = []
        self.followers = np.zeros(self.capacity, np.int64)
        self._last_end = np.full(self.capacity, np.iinfo(np.int64).min, np.int64)
        self._host: dict[str, np.ndarray] = {}      # topic -> (C, D) float32
        self._device: dict[str, jax.Array] = {}     # topic -> (C, D) on the default device
        self._pending: dict[str, set[int]] = {}     # topic -> rows changed since the last upload
        self._edges = EdgeSet()
        self._records = RecordIndex()               # follow record key -> edge key
        self._purges: dict[int, int] = {}           # row -> order of a pending purge
        self._purged: dict[int, int] = {}           # row -> order of its latest purge (stale adds ignored)
        self.edge_ops_ignored = 0                   # removes naming a record of another follower
        self._graph: FollowGraph | None = None
        self._graph_dirty = True
        self._edges_version = 0                     # bumped whenever the edge set changes
        self._present: tuple[int, np.ndarray] | None = None  # (version, sorted present keys)
        self._panel_graphs: dict[str, tuple[tuple, FollowGraph]] = {}  # cache slot -> (key, graph)
        self._panel_shapes: dict = {}               # table sizes shared by every bucketed panel graph
        self._subgraphs: dict[str, ActiveSubgraph] = {}  # topic -> active subgraph (cascade reach)
        self._log_keys: list[int] = []              # edge changes since the oldest subgraph update
        self._log_add: list[bool] = []
        self._log_start = 0                         # absolute log position of _log_keys[0]
        self._edges_epoch = 0                       # bumped by a bulk load: subgraphs rebuild
        self._subgraph_shapes: dict = {}            # table capacities shared by every topic's subgraph
        self.window_end: int | None = None          # latest window_end seen in features
        self.changed_topics: set[str] = set()       # topics whose features changed since take_changed()

    # --- registry ---------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return len(self.dids)

    def row(self, did: str) -> int:
        """The row of ``did``, registering it (and doubling the capacity) when new."""
        r = self.index.get(did)
        if r is None:
            r = len(self.dids)
            self.index[did] = r
            self.dids.append(did)
            if r + 1 >= self.capacity:  # keep the last row free for the graph's dummy node
                self._grow(_pow2_at_least(r + 2, self.capacity))
        return r

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self.followers = np.concatenate([self.followers, np.zeros(extra, np.int64)])
        self._last_end = np.concatenate([self._last_end, np.full(extra, np.iinfo(np.int64).min, np.int64)])
        for t, h in self._host.items():
            self._host[t] = np.concatenate([h, np.zeros((extra, D), np.float32)])
        self._device.clear()  # re-uploaded whole at the new shape
        self.capacity = capacity
        self._graph_dirty = True

    def stale_rows(self, ended_by: int) -> np.ndarray:
        """Rows that still have features but whose latest record ended at ``window_end <=
        ended_by`` (unix seconds)."""
        ends = self._last_end[: self.n_rows]
        rows = np.flatnonzero((ends > np.iinfo(np.int64).min) & (ends <= ended_by))
        if rows.size:
            live = np.zeros(rows.size, bool)
            for t in self.topics:
                live |= self._host[t][rows].any(axis=1)
            rows = rows[live]
        return rows

    def last_end(self, row: int) -> int:
        """window_end of the latest record applied to ``row``."""
        return int(self._last_end[row])

    # --- updates ----------------------------------------------------------------------------
    def apply_features(self, f: Features) -> bool:
        """Apply one chorus.features value; returns False when ignored as older than the applied one."""
        r = self.row(f.did)
        if f.window_end < self._last_end[r]:
            return False
        self._last_end[r] = f.window_end
        if self.window_end is None or f.window_end > self.window_end:
            self.window_end = f.window_end
        topics = {} if f.expired else f.topics
        for t, vec in topics.items():
            if len(vec) != D:
                raise ValueError(f"features for {f.did} topic {t!r}: expected {D} values, got {len(vec)}")
            self._set(t, r, np.asarray(vec, np.float32))
        for t in self._host.keys() - topics.keys():
            self._set(t, r, None)
        return True

    def _set(self, topic: str, r: int, vec: np.ndarray | None) -> None:
        h = self._host.get(topic)
        if h is None:
            if vec is None:
                return
            h = self._host[topic] = np.zeros((self.capacity, D), np.float32)
        if vec is None:
            if not h[r].any():
                return
            h[r] = 0.0
        elif np.array_equal(h[r], vec):
            return
        else:
            h[r] = vec
        self._pending.setdefault(topic, set()).add(r)
        self.changed_topics.add(topic)

    def apply_edge(self, e: GraphEdge) -> bool:
        """Apply one chorus.graph value (idempotent, order-free: see the module docstring);
        returns whether the edge set changed (a purge returns True when it is queued; it is
        applied by :meth:`settle`)."""
        from stream.worker.table import key_of

        d, order = self.row(e.dst), op_order(e)
        if e.op == "purge":
            self._purges[d] = max(self._purges.get(d, order), order)
            self._purged[d] = max(self._purged.get(d, order), order)
            return True
        rec = key_of(e.uri) if e.uri else None
        if e.op == "add" and not e.src:
            self.edge_ops_ignored += 1
            return False
        changed = False
        if e.src:
            key = (self.row(e.src) << 32) | d
            if rec is not None and e.op == "add":
                pending = self._records.get(rec)
                self._records.put(rec, key)
                if pending is not None and pending < 0:  # the record's remove came first
                    changed = self._apply_key(key, -pending - 1, False)
        else:  # a remove that names only the record
            key = self._records.get(rec) if rec is not None else None
            if key is None or key < 0:  # its add has not arrived (yet): keep the newest remove
                self._records.put(rec, -max(order, -key - 1 if key is not None else order) - 1)
                return False
            if key & 0xFFFFFFFF != d:
                self.edge_ops_ignored += 1
                return False
        present = e.op == "add" and order > self._purged.get(d, -1)
        return self._apply_key(key, order, present) | changed

    def _apply_key(self, key: int, order: int, present: bool) -> bool:
        if not self._edges.apply(key, order, present):
            return False
        self.followers[key >> 32] += 1 if present else -1
        self._graph_dirty = True
        self._edges_version += 1
        if self._subgraphs:
            self._log_keys.append(key)
            self._log_add.append(present)
        return True

    @property
    def graph_nbytes(self) -> int:
        """Host bytes of the edge set and the record index (not the device graph)."""
        return self._edges.nbytes + self._records.nbytes

    def settle(self) -> None:
        """Apply the queued purges: every present edge out of a purged row whose last op is not
        newer than the purge (in :func:`op_order`) is removed (one pass over the edge set)."""
        if not self._purges:
            return
        rows = np.fromiter(self._purges, np.int64, len(self._purges))
        times = np.fromiter(self._purges.values(), np.int64, len(self._purges))
        self._purges.clear()
        removed = self._edges.purge(rows, times)
        if removed.size:
            np.subtract.at(self.followers, removed >> 32, 1)
            self._graph_dirty = True
            self._edges_version += 1
            if self._subgraphs:
                self._log_keys.extend(removed.tolist())
                self._log_add.extend([False] * removed.size)

    def load(self, dids: list[str], followers: np.ndarray, features: dict[str, np.ndarray],
             window_end: int, src: np.ndarray | None = None, dst: np.ndarray | None = None) -> None:
        """Bulk-load a fresh state (benchmarks, snapshots): rows in ``dids`` order, (N, 4) features
        per topic, distinct edges ``src -> dst`` as row indices."""
        if self.dids:
            raise ValueError("OperatorState.load needs an empty state")
        n = len(dids)
        self.index = {d: i for i, d in enumerate(dids)}
        if len(self.index) != n:
            raise ValueError("OperatorState.load: dids must be distinct")
        self.dids = list(dids)
        if n + 1 > self.capacity:
            self._grow(_pow2_at_least(n + 1, self.capacity))
        # with edges, followers are their in-degree (the graph is the one source of truth)
        self.followers[:n] = followers if src is None else np.bincount(np.asarray(src, np.int64), minlength=n)[:n]
        self._last_end[:n] = window_end
        for t, x in features.items():
            h = self._host[t] = np.zeros((self.capacity, D), np.float32)
            h[:n] = x
            self.changed_topics.add(t)
        self.window_end = window_end
        if src is not None:
            self._edges.add_many((np.asarray(src, np.int64) << 32) | np.asarray(dst, np.int64))
            self._graph_dirty = True
            self._edges_version += 1
            self._edges_epoch += 1

    # --- snapshots (restart without re-reading the input topics) ----------------------------
    SNAPSHOT_FORMAT = 2  # 2: edge orders are op_order values (revs), purges kept; 1 held time_us

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The whole state as named numpy arrays (copies): DIDs, followers, last window ends,
        host features per topic, the edge set and the record index (format SNAPSHOT_FORMAT)."""
        self.settle()
        self._edges.compact()
        n = self.n_rows
        encoded = [d.encode() for d in self.dids]
        rec_keys, rec_edges = self._records.arrays()
        meta = {"format": self.SNAPSHOT_FORMAT, "topics": self.topics, "window_end": self.window_end,
                "edge_ops_ignored": self.edge_ops_ignored}
        out = {
            "state_meta": np.frombuffer(json.dumps(meta).encode(), np.uint8).copy(),
            "did_bytes": np.frombuffer(b"".join(encoded), np.uint8).copy(),
            "did_len": np.fromiter(map(len, encoded), np.int32, n),
            "followers": self.followers[:n].copy(), "last_end": self._last_end[:n].copy(),
            "edge_keys": self._edges._keys.copy(), "edge_time": self._edges._time.copy(),
            "edge_present": self._edges._present.copy(),
            "record_keys": rec_keys.copy(), "record_edges": rec_edges.copy(),
            "purged_rows": np.fromiter(self._purged, np.int64, len(self._purged)),
            "purged_order": np.fromiter(self._purged.values(), np.int64, len(self._purged)),
        }
        for i, t in enumerate(self.topics):
            out[f"features_{i}"] = self._host[t][:n].copy()
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "OperatorState":
        """A state from :meth:`to_arrays`. Raises ValueError for another format."""
        meta = json.loads(bytes(a["state_meta"]))
        if meta.get("format") != cls.SNAPSHOT_FORMAT:
            raise ValueError(f"operator state format {meta.get('format')!r}, this chorus reads {cls.SNAPSHOT_FORMAT}")
        lens = a["did_len"].astype(np.int64)
        n = lens.size
        st = cls(capacity=n + 1)
        text = a["did_bytes"].tobytes()
        ends = np.cumsum(lens)
        starts = ends - lens
        st.dids = [text[i:j].decode() for i, j in zip(starts.tolist(), ends.tolist())]
        st.index = dict(zip(st.dids, range(n)))
        st.followers[:n] = a["followers"]
        st._last_end[:n] = a["last_end"]
        for i, t in enumerate(meta["topics"]):
            h = st._host[t] = np.zeros((st.capacity, D), np.float32)
            h[:n] = a[f"features_{i}"]
            st.changed_topics.add(t)
        st._edges._keys, st._edges._time = a["edge_keys"], a["edge_time"]
        st._edges._present = a["edge_present"].astype(bool)
        st._edges.count = int(st._edges._present.sum())
        st._records._keys, st._records._edges = a["record_keys"], a["record_edges"]
        st._purged = dict(zip(a["purged_rows"].tolist(), a["purged_order"].tolist()))
        st.window_end = meta["window_end"]
        st.edge_ops_ignored = meta["edge_ops_ignored"]
        st._graph_dirty = True
        st._edges_version += 1
        st._edges_epoch += 1
        return st

    def take_changed(self) -> set[str]:
        """Topics whose features changed since the last call (and clear the set)."""
        out, self.changed_topics = self.changed_topics, set()
        return out

    # --- views for the hop ------------------------------------------------------------------
    @property
    def topics(self) -> list[str]:
        return sorted(self._host)

    @property
    def n_edges(self) -> int:
        return self._edges.count

    def _present_keys(self) -> np.ndarray:
        """Present edge keys ``src << 32 | dst``, sorted (cached until the edge set changes)."""
        self.settle()
        if self._present is None or self._present[0] != self._edges_version:
            self._present = (self._edges_version, self._edges.present())
        return self._present[1]

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Present edges as (src rows, dst rows), sorted by (src, dst)."""
        keys = self._present_keys()
        return keys >> 32, keys & 0xFFFFFFFF

    def graph(self) -> FollowGraph:
        """The follow graph padded to (capacity, edge capacity); rebuilt only when edges changed.

        Bucketed layout; each rebuild keeps at least the previous graph's table capacities, so
        the compiled programs retrace only when a degree class outgrows its capacity (which then
        doubles) or the node capacity doubles.
        """
        if self._graph is None or self._graph_dirty:
            src, dst = self.edges()
            self.edge_capacity = _pow2_at_least(src.size, self.edge_capacity)
            prev = self._graph.capacities if self._graph is not None else None
            self._graph = FollowGraph.padded(src, dst, max(self.n_rows, 1), self.capacity, self.edge_capacity,
                                             capacities=prev)
            self._graph_dirty = False
        return self._graph

    def small(self) -> bool:
        """Whether the graph is small enough for edge-list subgraphs (``small_edges``, SMALL_EDGES)."""
        return self.n_edges <= self.small_edges

    def _edge_list(self, rows: np.ndarray) -> FollowGraph:
        """The present edges out of ``rows`` as a "sorted"-layout graph padded to (capacity, the
        shared edge-list capacity): a power of two at least the whole graph's edge count, which
        only grows, so every subgraph of the same node capacity has the same shapes."""
        sub = self._edges.out_edges(rows)
        return FollowGraph.padded(sub >> 32, sub & 0xFFFFFFFF, max(self.n_rows, 1), self.capacity,
                                  self._list_cap(), layout="sorted")

    def _list_cap(self) -> int:
        """The shared edge-list capacity: a power of two >= the present edges; it only grows."""
        self._list_capacity = _pow2_at_least(max(self.n_edges, 1), self._list_capacity)
        return self._list_capacity

    def panel_graph(self, rows, slot: str = ""):
        """The follow graph restricted to edges out of ``rows`` (a panel), padded like :meth:`graph`.

        For cascade reach with every agent outside ``rows`` at q = 0 (the panel attribution, zero
        baseline) this gives exactly the full graph's R and attribution: an edge i -> j with
        q_i = 0 adds log1p(0) = 0 to S_j. Cached per (rows, edge set, capacity) in cache ``slot``
        (one per topic when the rows differ by topic). A small graph (:meth:`small`): an edge
        list of the shared capacity (the same shapes as :meth:`active_graph`'s); else bucketed,
        built at least at the table sizes of every panel graph built before (all slots), so the
        panels and samples of every topic share one compiled program, which retraces only when
        a table outgrows its size (it then doubles).
        """
        rows = np.unique(np.asarray(rows, np.int64))
        small = self.small()
        key = (self._edges_version, self.capacity, rows.tobytes(), self._list_cap() if small else "bucketed")
        cached = self._panel_graphs.get(slot)
        if cached is not None and cached[0] == key:
            return cached[1]
        if small:
            g = self._edge_list(rows)
        else:  # at least the table sizes of every panel graph built before (all slots): one program
            shapes = self._panel_shapes if self._panel_shapes.get("capacity") == self.capacity else {}
            sub = self._edges.out_edges(rows)
            e_cap = _pow2_at_least(sub.size, shapes.get("edges", MIN_CAPACITY))
            g = FollowGraph.padded(sub >> 32, sub & 0xFFFFFFFF, max(self.n_rows, 1), self.capacity, e_cap,
                                   capacities=shapes.get("caps"))
            self._panel_shapes = {"capacity": self.capacity, "edges": g.num_edges, "caps": g.capacities}
        self._panel_graphs[slot] = (key, g)
        return g

    def active_graph(self, topic: str, active):
        """The follow graph restricted to edges out of (a superset of) the agents ``active`` (bool,
        (capacity,)) in ``topic``.

        For cascade reach with the zero baseline this gives exactly the full graph's R(x), R(0) and
        phi whenever every agent with x_i != 0 is active (module docstring of operators.subgraph).
        A small graph (:meth:`small`): the edges out of the active agents, collected afresh as an
        edge list of the shared capacity (a :class:`FollowGraph`, "sorted" layout). Else kept
        incrementally (:class:`operators.subgraph.ActiveSubgraph`, a :class:`GraphStack`).
        """
        if self.small():
            if self._subgraphs:  # the graph shrank below the threshold: the incremental ones go
                self._subgraphs.clear()
                self._log_keys, self._log_add, self._log_start = [], [], 0
            active = np.asarray(active, bool)
            return self._edge_list(np.flatnonzero(active[: self.n_rows]))
        sg = self._subgraphs.get(topic)
        if sg is None:
            sg = self._subgraphs[topic] = ActiveSubgraph(self._edges.out_edges, shared=self._subgraph_shapes)
            sg.log_pos = self._log_start + len(self._log_keys)
        a, b = sg.log_pos - self._log_start, len(self._log_keys)
        keys = np.fromiter(self._log_keys[a:b], np.int64, b - a)
        add = np.fromiter(self._log_add[a:b], bool, b - a)
        g = sg.update(np.asarray(active, bool), keys, add, self._log_start + b, self.n_rows, self.capacity,
                      self._edges_epoch)
        drop = min(s.log_pos for s in self._subgraphs.values()) - self._log_start
        if drop > 0:  # every subgraph has read these
            del self._log_keys[:drop], self._log_add[:drop]
            self._log_start += drop
        return g

    def subgraph(self, topic: str) -> ActiveSubgraph | None:
        """The topic's :class:`ActiveSubgraph` (statistics: edges, base builds), None before use."""
        return self._subgraphs.get(topic)

    def features(self, topic: str) -> TopicView:
        """Topic features on the device at (capacity, 4), after copying the changed rows."""
        h = self._host[topic]
        x = self._device.get(topic)
        pending = self._pending.pop(topic, set())
        if x is None or x.shape[0] != self.capacity:
            x = jnp.asarray(h)
        elif pending:
            rows = np.fromiter(pending, np.int64, len(pending))
            b = _pow2_at_least(rows.size, 16)
            idx = np.full(b, self.capacity, np.int32)
            idx[: rows.size] = rows
            vals = np.zeros((b, D), np.float32)
            vals[: rows.size] = h[rows]
            x = _scatter_rows(x, jnp.asarray(idx), jnp.asarray(vals))
        self._device[topic] = x
        return TopicView(topic, x, _any_row(h), self.n_rows)

    def host_features(self, topic: str) -> np.ndarray:
        """The host copy (C, 4) of a topic's features (read-only use)."""
        return self._host[topic]

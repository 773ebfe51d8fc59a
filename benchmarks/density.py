"""The operator at the real graph's density: one full hop at 1.67M agents / 100M follow edges.

``bench_density(...) -> dict`` and ``markdown(res) -> str`` (a table block for the operator
section); run alone: ``python -m benchmarks.operator_bench --density`` (prints the block).

Population: benchmarks.graphgen (60 edges per agent, heavy-tailed, duplicates and self-follows
dropped), 5 topics; in each topic an independent 30 % of the agents are active with posts
1 + floor(Pareto(1.5)), reposts floor(Pareto(2)), stance sum posts * U(-1, 1).

Measured in one process, on one OperatorState (the edge set loaded once):

- **reference** = the operator as it was (``OperatorService(active_only=False)``, steps 32
  Gauss-Legendre): every topic's cascade_reach on the full graph, polarization on every row;
  its hop includes the full FollowGraph build (the graph changed).
- **chorus** = the default service (``active_only=True``) at ``steps`` graded nodes: per topic the
  active subgraph, polarization on the active rows. First hop (base builds + compile), then a hop
  after 1 % of the edges changed (half added, half removed) and 1 % of the agents changed activity
  per topic: the incremental hop.
- per-agent accuracy of one topic's cascade_reach against a converged integral (64 graded nodes
  on the same subgraph): max_i |phi_i - ref_i| / max_i |ref_i|, for both configurations;
- one cascade_reach attribution (steps 16) three ways: naive JAX (plain autodiff through
  segment_sum over all edges), the full graph's bucketed kernel, the active subgraph.
"""

from __future__ import annotations

import gc
import statistics
import time

import jax
import numpy as np

from benchmarks.graphgen import follow_graph

N, PER_NODE, TOPICS, ACTIVE, CHURN = 1_670_000, 60.0, 5, 0.30, 0.01
LIVE_CHURN = 0.0005  # hops 3-5: ~50k follow ops each, about 2 minutes of the live firehose's follows
STEADY_HOPS = (3, 4, 5)  # the steady state: the median of these hops (this shared 2-core VM varies ~20 %)
STEPS, RULE = 20, "gauss-legendre-graded"  # a = t^3: 7e-4 per-agent error at 1.67M (operators.quadrature)
REF_STEPS, REF_RULE = 32, "gauss-legendre"  # the service's settings before this change
ACC_STEPS = 64
TARGET_HOP_S, TARGET_RATIO, TARGET_ACC = 20.0, 4.0, 1e-3


def _rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _topic(rng, n: int) -> np.ndarray:
    act = rng.random(n) < ACTIVE
    posts = np.where(act, 1.0 + np.floor(rng.pareto(1.5, n)), 0.0)
    reposts = np.where(act, np.floor(rng.pareto(2.0, n)), 0.0)
    return np.stack([posts, np.zeros(n), posts * rng.uniform(-1, 1, n), reposts], 1).astype(np.float32)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_density(n: int = N, per_node: float = PER_NODE, steps: int = STEPS, log=print) -> dict:
    from benchmarks.operator_bench import _naive_cascade, naive_attribute
    from operators import attribute, indicators
    from operators.service.service import OperatorService
    from operators.service.state import OperatorState
    from stream.config import Settings
    from stream.schemas import Features, GraphEdge

    res = {"n": n, "steps": steps, "rule": RULE, "ref_steps": REF_STEPS, "ref_rule": REF_RULE}
    t0 = time.perf_counter()
    src, dst, followers = follow_graph(n, per_node, seed=0, arrival_order=False)
    res["gen_s"] = time.perf_counter() - t0
    key = (src.astype(np.int64) << 32) | dst
    del src, dst
    key.sort()
    key = key[np.concatenate([[True], key[1:] != key[:-1]]) & ((key >> 32) != (key & 0xFFFFFFFF))]
    res["edges"] = int(key.size)
    log(f"  density: {n:,} agents, {key.size:,} edges, generated in {res['gen_s']:.1f} s")
    rng = np.random.default_rng(1)
    topics = {f"t{k}": _topic(rng, n) for k in range(TOPICS)}
    dids = [f"did:plc:{i:024d}" for i in range(n)]
    st = OperatorState()
    res["load_s"], _ = _timed(lambda: st.load(dids, followers, topics, 60, key >> 32, key & 0xFFFFFFFF))
    settings = Settings(indicators=["cascade_reach", "polarization"])
    ref = OperatorService(settings, steps=REF_STEPS, rule=REF_RULE, active_only=False, state=st)
    fast = OperatorService(settings, steps=steps, rule=RULE, state=st)

    # reference hop: the full graph build, then every topic x indicator
    log("  density: reference hop (full graph build + 5 topics x 2 indicators, 32 Gauss-Legendre nodes)")
    res["ref_build_s"], _ = _timed(st.graph)
    res["ref_hop_s"], _ = _timed(lambda: ref.recompute(window_end=60))
    g_full = st.graph()
    res["full_graph_bytes"] = sum(a.nbytes for a in jax.tree_util.tree_leaves(g_full))

    # one attribution, three ways (topic t0, steps 16)
    x4 = st.features("t0").x
    x = x4[:, 0] + x4[:, 3]
    active = np.asarray(x > 0)
    sub = indicators.cascade_reach(st.active_graph("t0", active))
    full = indicators.cascade_reach(g_full)
    fns = {"full": lambda: attribute(full, x, steps=16, rule=REF_RULE),
           "active": lambda: attribute(sub, x, steps=16, rule=REF_RULE)}
    one = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn())
        one[name] = statistics.median(_timed(lambda: jax.block_until_ready(fn()))[0] for _ in range(2))
    log("  density: naive reference (segment_sum over every edge)")
    edges = (jax.numpy.asarray((key >> 32).astype(np.int32)), jax.numpy.asarray((key & 0xFFFFFFFF).astype(np.int32)))
    xn = x[:, None]
    zeros = jax.numpy.zeros_like(xn)
    pad = x.shape[0]
    naive_fn = lambda: naive_attribute(_naive_cascade, edges, xn, zeros)  # noqa: E731
    jax.block_until_ready(naive_fn())
    one["naive"] = _timed(lambda: jax.block_until_ready(naive_fn()))[0]
    del edges
    res["one"], res["capacity"] = one, pad

    # accuracy (topic t0): converged integral on the active subgraph
    log("  density: accuracy against 64 graded nodes")
    ref_phi = np.asarray(attribute(sub, x, steps=ACC_STEPS, rule=RULE).phi, np.float64)
    scale = np.abs(ref_phi).max()
    for name, (s, r, F) in {"chorus": (steps, RULE, sub), "reference": (REF_STEPS, REF_RULE, full)}.items():
        phi = np.asarray(attribute(F, x, steps=s, rule=r).phi, np.float64)
        res[f"acc_{name}"] = float(np.abs(phi - ref_phi).max() / scale)
    del full, g_full, fns, ref_phi
    st._graph = None  # the reference's full graph is not needed any more, nor its panel graphs: their
    st._panel_graphs, st._panel_shapes = {}, {}  # table sizes (every member's edges) would pad chorus's
    gc.collect()

    log(f"  density: chorus first hop (5 active subgraphs built, {steps} graded nodes)")
    fast._graph_changed = True  # every topic (the reference's hop consumed the changed set)
    res["hop1_s"], snaps = _timed(lambda: fast.recompute(window_end=60))
    res["n_snapshots"] = len(snaps)
    res["max_rel_residual"] = max(abs(s.completeness_residual) / max(abs(s.value - s.baseline_value), 1e-30)
                                  for s in snaps)
    res["subgraph_edges"] = {t: st.subgraph(t).num_edges for t in topics}

    # churn: 1% of edges (half removed, half added), 1% of agents flip activity per topic (hop 2,
    # the case; it may compile programs for grown capacities, which double), then a live
    # hop's worth three times (hops 3-5: 0.05% each, ~2 min of the firehose's follows): the steady state
    from operators.attribution import trace_count

    for hop, churn in ((2, CHURN),) + tuple((h, LIVE_CHURN) for h in STEADY_HOPS):
        log(f"  density: churn {churn:.2%} of the edges and of each topic's activity, hop {hop}")
        t_apply = time.perf_counter()
        _churn(fast, rng, key, dids, followers, topics, n, t_us=10**15 * hop, window_end=60 * hop, churn=churn)
        res[f"apply{hop}_s"] = time.perf_counter() - t_apply
        traces = trace_count()
        res[f"hop{hop}_s"], snaps = _timed(lambda: fast.recompute(window_end=60 * hop))
        res[f"hop{hop}_compiles"] = trace_count() - traces
        res[f"hop{hop}_snapshots"] = len(snaps)
        key = st.edges()
        key = (key[0].astype(np.int64) << 32) | key[1]
    res["apply_s"] = res["apply2_s"]
    res["steady_s"] = statistics.median(res[f"hop{h}_s"] for h in STEADY_HOPS)
    res["steady_compiles"] = sum(res[f"hop{h}_compiles"] for h in STEADY_HOPS)
    res["builds"] = {t: st.subgraph(t).builds for t in topics}
    res["peak_rss_gb"] = _rss_gb()
    return res


def _churn(svc, rng, key: np.ndarray, dids: list[str], followers, topics: dict, n: int, t_us: int,
           window_end: int, churn: float = 0.01) -> None:
    """``churn`` of the edges ``key`` (src << 32 | dst) removed or added (half each) and of each
    topic's agents flipping activity, applied record by record as the operator's consumers do."""
    from stream.schemas import Features, GraphEdge

    m = int(churn * key.size)
    gone = key[rng.choice(key.size, m // 2, replace=False)]
    new_src, new_dst = rng.integers(0, n, m - m // 2), rng.integers(0, n, m - m // 2)
    for k in gone:
        t_us += 1
        svc.apply_edge(GraphEdge(op="remove", src=dids[k >> 32], dst=dids[k & 0xFFFFFFFF], time_us=t_us))
    for s, d in zip(new_src, new_dst):
        if s != d:
            t_us += 1
            svc.apply_edge(GraphEdge(op="add", src=dids[s], dst=dids[d], time_us=t_us))
    for t, xt in topics.items():
        rows = rng.choice(n, int(churn * n), replace=False)
        for r in rows:
            vec = {tt: (topics[tt][r] if tt != t else _flip(rng, xt[r])).tolist() for tt in topics}
            topics[t][r] = vec[t]
            svc.apply_features(Features(did=dids[r], window_end=window_end, followers=int(followers[r]),
                                        topics=vec))


def _flip(rng, v: np.ndarray) -> np.ndarray:
    """An active agent goes quiet; a quiet one starts posting."""
    if v[0] > 0 or v[3] > 0:
        return np.zeros(4, np.float32)
    posts = 1.0 + np.floor(rng.pareto(1.5))
    return np.array([posts, 0.0, posts * rng.uniform(-1, 1), 0.0], np.float32)


def markdown(r: dict) -> list[str]:
    one = r["one"]
    ratio2 = (r["ref_build_s"] + r["ref_hop_s"]) / r["hop2_s"]
    ratio3 = (r["ref_build_s"] + r["ref_hop_s"]) / r["steady_s"]
    runs = " / ".join(f"{r[f'hop{h}_s']:.1f}" for h in STEADY_HOPS)
    md = ["", f"### Density: one hop at {r['n']:,} agents / {r['edges']:,} follow edges",
          "",
          f"Graph generated in {r['gen_s']:.1f} s (benchmarks.graphgen), loaded into OperatorState in "
          f"{r['load_s']:.1f} s; {TOPICS} topics, {ACTIVE:.0%} of the agents active in each (independently). "
          "One hop = every topic x {cascade_reach, polarization} with the visibility panel, bands and top 10 "
          "(`OperatorService.recompute`). **reference** = the operator before this change "
          f"(`active_only=False`, {REF_STEPS} Gauss-Legendre nodes: full graph, every row); **chorus** = the "
          f"default (`active_only=True`, {r['steps']} `{r['rule']}` nodes: per-topic active subgraphs kept "
          "incrementally, graph-free indicators on the active rows). Hop 2 comes after 1% of the edges "
          "changed (half removed, half added) and 1% of each topic's agents changed activity (the issue's case; "
          "it also compiles the programs whose capacities grew, which double, so a running operator compiles "
          f"rarely), hops 3, 4 and 5 each after {LIVE_CHURN:.2%} more (~2 minutes of the live firehose's follows: "
          "the steady state of a running operator, reported as their median: the same hop varies by ~20 % "
          "between runs on this shared 2-core machine); the reference rebuilds the full layout for each, chorus updates "
          "the layers.", "",
          "| step | reference (s) | chorus (s) | ratio |", "|---|---:|---:|---:|",
          f"| layout build (full graph / {TOPICS} active subgraphs, in hop 1) | {r['ref_build_s']:.1f} | (in hop 1) | |",
          f"| hop 1 (fresh) | {r['ref_build_s'] + r['ref_hop_s']:.1f} (build {r['ref_build_s']:.1f} + hop "
          f"{r['ref_hop_s']:.1f}) | {r['hop1_s']:.1f} | {(r['ref_build_s'] + r['ref_hop_s']) / r['hop1_s']:.2f}x |",
          f"| hop 2, after 1% of edges changed ({r['hop2_compiles']} programs compiled in it) "
          f"| {r['ref_build_s'] + r['ref_hop_s']:.1f} (full rebuild + hop) | {r['hop2_s']:.1f} | {ratio2:.2f}x |",
          f"| **hops 3-5, each after {LIVE_CHURN:.2%} more changed** (median of {runs}; {r['steady_compiles']} compiled) "
          f"| {r['ref_build_s'] + r['ref_hop_s']:.1f} (full rebuild + hop) | **{r['steady_s']:.1f}** | **{ratio3:.2f}x** |",
          f"| hop compute only (no build), hops 3-5 | {r['ref_hop_s']:.1f} | {r['steady_s']:.1f} | {r['ref_hop_s'] / r['steady_s']:.2f}x |",
          "", f"Per-agent accuracy (topic t0, cascade_reach), max_i |phi_i - ref_i| / max_i |ref_i| against "
          f"{ACC_STEPS} graded nodes: chorus ({r['steps']} graded) **{r['acc_chorus']:.1e}**, reference "
          f"({REF_STEPS} Gauss-Legendre) {r['acc_reference']:.1e}. Max relative completeness residual over "
          f"chorus's hop-1 snapshots: {r['max_rel_residual']:.1e}.", "",
          "One cascade_reach attribution (topic t0, steps 16 Gauss-Legendre), same run:", "",
          "| implementation | edges | time (s) | speedup vs naive |", "|---|---:|---:|---:|",
          f"| naive JAX (jax.grad through segment_sum, every edge) | {r['edges']:,} | {one['naive']:.1f} | 1 (reference) |",
          f"| chorus kernel, full graph (bucketed) | {r['edges']:,} | {one['full']:.1f} | {one['naive'] / one['full']:.2f}x |",
          f"| chorus kernel, topic's active subgraph | {r['subgraph_edges']['t0']:,} | {one['active']:.1f} "
          f"| {one['naive'] / one['active']:.2f}x |",
          "", f"Active subgraph edges per topic: {', '.join(f'{v:,}' for v in r['subgraph_edges'].values())}; "
          f"base builds per topic after hop {STEADY_HOPS[-1]}: {sorted(set(r['builds'].values()))} (1 = never rebuilt). "
          f"Full graph index arrays: {r['full_graph_bytes'] / r['edges']:.1f} bytes per edge. "
          f"Applying the churn (records one by one): {r['apply_s']:.1f} s. Peak RSS of the process: "
          f"{r['peak_rss_gb']:.1f} GiB.", "",
          "| target | measured | status |", "|---|---|---|",
          *(f"| hop after 1% edge churn <= {TARGET_HOP_S:g} s (this CPU), {label} | {r[k]:.1f} s "
            f"| {'**PASS**' if r[k] <= TARGET_HOP_S else '**FAIL**'} |"
            for k, label in (("hop2_s", "hop 2 (1% churn, compiles included)"), ("steady_s", "hops 3-5 (live-rate churn, median)"))),
          *(f"| >= {TARGET_RATIO:g}x the reference in the same run, {label} | {v:.2f}x "
            f"| {'**PASS**' if v >= TARGET_RATIO else '**FAIL**'} |"
            for v, label in ((ratio2, "hop 2"), (ratio3, "hops 3-5"))),
          f"| per-agent error <= {TARGET_ACC:g} of max phi | {r['acc_chorus']:.1e} "
          f"| {'**PASS**' if r['acc_chorus'] <= TARGET_ACC else '**FAIL**'} |"]
    return md

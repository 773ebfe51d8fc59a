"""Operator benchmark: Aumann-Shapley recompute, the cascade kernel vs naive autodiff, sampled
Shapley vs Aumann-Shapley, peak memory. ``run(quick, sizes) -> str`` returns the Markdown section.

Standalone: ``python -m benchmarks.operator_bench [--quick] [--sizes 10000,100000]``;
``--peak-rss N`` is the fresh-subprocess probe used for the memory table (prints JSON).

Inputs: N agents with features x = (posts, stance sum) (60% active, posts 1 + Pareto(1.5),
stance sum = posts * U(-1, 1)) and a seeded heavy-tailed follow graph with E = 10 N edges
(benchmarks.graphgen). cascade_reach uses p = 0.05 on posts, polarization = weighted stance
variance (its default baseline: every agent at the mean). steps = 16 Gauss-Legendre nodes.

"chorus" = ``operators.attribute`` on ``operators.indicators`` (cascade kernel: operators.graph).
"naive" = the reference a user would write: plain ``jax.grad`` of the same formula (cascade:
``log1p(-q)[src]`` then an unsorted ``jax.ops.segment_sum`` by dst, edges in arrival order),
``lax.scan`` over the same nodes, jit-compiled, the graph passed as an argument. Both compute
phi, F(x) and F(b). Times: compile first, then the median of several runs (chorus and naive
interleaved, so load on a shared machine hits both alike), ``block_until_ready``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import header
from benchmarks.graphgen import follow_graph, follower_percentiles
from operators import attribute, indicators, shapley
from operators.attribution import ACCELERATOR_NODE_BATCH
from operators.graph import FollowGraph, pow2_at_least
from operators.quadrature import nodes_weights

SIZES = (10_000, 100_000, 1_670_000)
QUICK_SIZES = (10_000,)
TARGET_N = 1_670_000
STEPS = 16
P = 0.05
TARGET_SPEEDUP = 3.0
TARGET_GPU_S = 0.005
TARGET_SHAPLEY_RATIO = 1e4
TARGET_RSS_GB = 1.5
NB = ACCELERATOR_NODE_BATCH
REF_STEPS = 256  # the converged Aumann-Shapley integral the equal-accuracy search is measured against
RULES_COMPARED = ("gauss-legendre", "gauss-legendre-graded")
SHAPLEY = ((1_000, 16), (4_000, 8), (8_000, 8))  # (N, permutations per round)
# The ratio grows with N; the target is stated at N = 16,000 (issue 15), measured by its own,
# reduced section (benchmarks/shapley_scale_bench.py: a full calibrated run there takes > 20 min on CPU).
TARGET_SHAPLEY_N = 16_000
QUICK_SHAPLEY = ((300, 16), (1_000, 16))


def features(n: int, seed: int = 1) -> np.ndarray:
    """(n, 2) float32: posts (heavy-tailed, 40% zero) and stance sum in [-posts, posts]."""
    rng = np.random.default_rng(seed)
    posts = np.where(rng.random(n) < 0.6, 1.0 + np.floor(rng.pareto(1.5, n)), 0.0)
    return np.stack([posts, posts * rng.uniform(-1.0, 1.0, n)], axis=1).astype(np.float32)


# --- the naive reference -------------------------------------------------------------------

def _naive_cascade(args, z):
    """R = sum_j -expm1(S_j), S = segment_sum(log1p(-q)[src], dst): plain autodiff, unsorted."""
    src, dst = args
    q = -P * jnp.expm1(-z[:, 0])
    return -jnp.sum(jnp.expm1(jax.ops.segment_sum(jnp.log1p(-q)[src], dst, num_segments=z.shape[0])))


def _naive_polarization(args, z):
    return indicators.polarization(0, 1)(z)


def _naive_attribute_impl(f, args, x, b, alphas, weights):
    grad = jax.grad(lambda z: f(args, z))

    def body(acc, aw):
        return acc + aw[1] * grad(b + aw[0] * (x - b)), None

    acc, _ = jax.lax.scan(body, jnp.zeros_like(x), (alphas, weights))
    return (x - b) * acc, f(args, x), f(args, b)


_naive_jit = jax.jit(_naive_attribute_impl, static_argnums=0)


def naive_attribute(f, args, x, b, steps: int = STEPS):
    """(phi, F(x), F(b)) by plain autodiff, scan over Gauss-Legendre nodes (the reference)."""
    a, w = nodes_weights(steps, "gauss-legendre")
    return _naive_jit(f, args, x, b, jnp.asarray(a, x.dtype), jnp.asarray(w, x.dtype))


# --- timing helpers ---------------------------------------------------------------------------

def _timed(fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t, out


def _interleaved(fns: dict, repeats: int) -> dict:
    """Compile (first call) then ``repeats`` interleaved timed calls; {name: (compile_s, [s], out)}."""
    res = {}
    for name, fn in fns.items():
        first, out = _timed(fn)
        res[name] = (first, [], out)
    for _ in range(repeats):
        for name, fn in fns.items():
            res[name][1].append(_timed(fn)[0])
    return res


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**PASS**" if ok else "**FAIL**")


# --- sections ---------------------------------------------------------------------------------

def _capacity(n: int) -> int:
    """The live service's padded capacity for n rows (operators.service.state: power of two >= n + 1; the
    service's floor of 1,024 rows is below every benchmarked size)."""
    return pow2_at_least(n + 1)


def bench_recompute(n: int, repeats: int, log=print) -> dict:
    """Times at one size: cascade_reach (product layout, and `sorted` for reference) and
    polarization vs naive. Indicators and graphs are built before the timed region."""
    src, dst, followers = follow_graph(n, 10.0, seed=0)
    x = jnp.asarray(features(n))
    row = {"n": n, "edges": int(src.size), "shape": follower_percentiles(followers)}
    cap, e_cap = _capacity(n), pow2_at_least(src.size)
    t = time.perf_counter()
    g_live = FollowGraph.padded(src, dst, n, cap, e_cap)  # what OperatorState.graph() builds
    row["build_live_s"] = time.perf_counter() - t
    t = time.perf_counter()
    g_sorted = FollowGraph(src, dst, n, "sorted")
    row["build_sorted_s"] = time.perf_counter() - t
    row["capacity"] = cap
    x_live = jnp.zeros((cap, x.shape[1]), x.dtype).at[:n].set(x)  # the service's padded features
    F_live, F_sorted = indicators.cascade_reach(g_live, P), indicators.cascade_reach(g_sorted, P)
    edges = (jnp.asarray(src), jnp.asarray(dst))
    zeros = jnp.zeros_like(x)
    gpu = jax.default_backend() != "cpu"
    one = {"node_batch": 1}  # the CPU default; on accelerators the node_batch = NB rows are the default
    fns = {"cascade_live": lambda: attribute(F_live, x_live, steps=STEPS, **one),
           "cascade_sorted": lambda: attribute(F_sorted, x, steps=STEPS, **one),
           "cascade_naive": lambda: naive_attribute(_naive_cascade, edges, x, zeros)}
    if gpu:
        fns["cascade_live_nb"] = lambda: attribute(F_live, x_live, steps=STEPS, node_batch=NB)
        fns["cascade_sorted_nb"] = lambda: attribute(F_sorted, x, steps=STEPS, node_batch=NB)
    by_dst = np.argsort(dst, kind="stable")
    edges_sorted = (jnp.asarray(src[by_dst]), jnp.asarray(dst[by_dst]))
    del by_dst
    fns["cascade_naive_sorted"] = lambda: naive_attribute(_naive_cascade, edges_sorted, x, zeros)
    log(f"  N={n:,}: cascade_reach ({', '.join(fns)})")
    res = _interleaved(fns, repeats)
    ref_phi = np.asarray(res["cascade_naive"][2][0])
    for name, (first, times, out) in res.items():
        phi = np.asarray(out[0] if "naive" in name else out.phi)[:n]
        row[name] = {"compile_s": first, "median_s": statistics.median(times), "runs": len(times),
                     "max_rel_diff": float(np.abs(phi - ref_phi).max() / max(np.abs(ref_phi).max(), 1e-30))}
    del res, fns, edges, edges_sorted, F_live, F_sorted, g_live, g_sorted
    pol = indicators.polarization(0, 1)
    b = indicators.default_baseline(pol, x)
    fns = {"polarization_chorus": lambda: attribute(pol, x, steps=STEPS),
           "polarization_naive": lambda: naive_attribute(_naive_polarization, (), x, b)}
    log(f"  N={n:,}: polarization")
    res = _interleaved(fns, repeats)
    ref_phi = np.asarray(res["polarization_naive"][2][0])
    for name, (first, times, out) in res.items():
        phi = np.asarray(out[0] if name.endswith("naive") else out.phi)
        row[name] = {"compile_s": first, "median_s": statistics.median(times), "runs": len(times),
                     "max_rel_diff": float(np.abs(phi - ref_phi).max() / max(np.abs(ref_phi).max(), 1e-30))}
    return row


def _pool(parts: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, stderr) over every antithetic pair of several ``shapley.sampled`` runs.

    Exact: run k gave mean m_k and stderr e_k over p_k pairs, i.e. sample variance
    s_k^2 = p_k e_k^2; the pooled ddof=1 variance is
    (sum (p_k - 1) s_k^2 + sum p_k (m_k - m)^2) / (P - 1), stderr = sqrt(var / P).
    """
    p = np.array([k for _, _, k in parts], float)
    means = np.stack([m for m, _, _ in parts])
    var_k = np.stack([e * e for _, e, _ in parts]) * p[:, None]
    total = p.sum()
    mean = (p[:, None] * means).sum(axis=0) / total
    var = (((p - 1)[:, None] * var_k).sum(axis=0) + (p[:, None] * (means - mean) ** 2).sum(axis=0)) / (total - 1)
    return mean, np.sqrt(var / total)


def _equal_accuracy(F, x, ref: np.ndarray, tol: float = 0.01) -> dict:
    """Per rule, the fewest nodes whose per-agent error reaches sampled Shapley's criterion:
    max_i |phi_i - ref_i| <= tol * max_i |ref_i| (ref: a converged integral). {rule: (steps, err)}."""
    out = {}
    for rule in RULES_COMPARED:
        for steps in range(2, 33):
            phi = np.asarray(attribute(F, x, steps=steps, rule=rule).phi, np.float64)[:, 0]
            err = float(np.abs(phi - ref).max() / np.abs(ref).max())
            if err <= tol:
                out[rule] = (steps, err)
                break
    return out


def bench_shapley(n: int, round_perms: int, log=print, max_perms: int = 4096) -> dict:
    """Sampled Shapley (black-box F, batched prefixes) vs Aumann-Shapley on cascade_reach.

    Both use the same F (the default layout, built once). Sampled Shapley runs in rounds of
    ``round_perms`` permutations (each a fresh seed, pooled exactly) until its own standard error
    criterion holds: max_i stderr_i <= 0.01 * max_i |phi_i| (at least 2 rounds); the time is the
    measured wall time of all rounds, after a warm-up compile, with the fastest prefix batch size of
    a short calibration. Aumann-Shapley is timed at steps = 16 (Gauss-Legendre, the default) and
    at equal accuracy: the fewest nodes, over the rules compared, whose max per-agent error
    against a converged integral (REF_STEPS Gauss-Legendre nodes) is <= 1% of max |phi| -- the
    same bound sampled Shapley's standard error is run to, applied to the actual error.
    """
    from scipy.stats import spearmanr

    src, dst, _ = follow_graph(n, 10.0, seed=0)
    x = jnp.asarray(features(n)[:, :1])
    F = indicators.cascade_reach(FollowGraph(src, dst, n), P)  # the same F for both methods
    log(f"  N={n:,}: Aumann-Shapley")
    ref = np.asarray(attribute(F, x, steps=REF_STEPS).phi, np.float64)[:, 0]
    eq = _equal_accuracy(F, x, ref)
    if not eq:
        raise RuntimeError(f"N={n}: no quadrature rule reached 1% of max |phi| within 32 nodes")
    rule_eq = min(eq, key=lambda r: eq[r][0])
    fns = {"as16": lambda: attribute(F, x, steps=STEPS),
           "as_eq": lambda: attribute(F, x, steps=eq[rule_eq][0], rule=rule_eq)}
    res = _interleaved(fns, 20)
    t_as, t_eq = statistics.median(res["as16"][1]), statistics.median(res["as_eq"][1])
    per_perm = {}
    for bs in (64, 256, 1024):  # calibration: time per permutation by prefix batch size (warm)
        shapley.sampled(F, x, permutations=round_perms, seed=10_000, batch_size=bs)
        t0 = time.perf_counter()
        shapley.sampled(F, x, permutations=round_perms, seed=10_001, batch_size=bs)
        per_perm[bs] = (time.perf_counter() - t0) / round_perms
    batch = min(per_perm, key=per_perm.get)
    log(f"  N={n:,}: sampled Shapley, batch {batch}, rounds of {round_perms} permutations")
    parts, t0 = [], time.perf_counter()
    while True:
        phi_s, err = shapley.sampled(F, x, permutations=round_perms, seed=len(parts), batch_size=batch)
        parts.append((phi_s, err, round_perms // 2))
        phi_s, err = _pool(parts)
        perms = round_perms * len(parts)
        if len(parts) >= 2 and err.max() <= 0.01 * np.abs(phi_s).max() or perms >= max_perms:
            break
    t_s = time.perf_counter() - t0
    return {
        "n": n, "edges": int(src.size), "as_s": t_as, "permutations": perms, "batch": batch,
        "per_permutation_s": t_s / perms, "calibration": per_perm,
        "max_stderr": float(err.max()), "largest_phi": float(np.abs(phi_s).max()),
        "met": bool(err.max() <= 0.01 * np.abs(phi_s).max()), "sampled_s": t_s, "ratio": t_s / t_as,
        "ideal_ratio": perms * (n + 1) / (2 * STEPS + 2),
        "equal_accuracy": eq, "rule_eq": rule_eq, "steps_eq": eq[rule_eq][0], "as_eq_s": t_eq,
        "ratio_eq": t_s / t_eq, "ideal_ratio_eq": perms * (n + 1) / (2 * eq[rule_eq][0] + 2),
        "sampled_max_err": float(np.abs(phi_s - ref).max() / np.abs(ref).max()),
        "rel_l1": float(np.abs(phi_s - ref).sum() / np.abs(ref).sum()),
        "spearman": float(spearmanr(phi_s, ref).statistic),
        "noise_l1": float(err.sum() * math.sqrt(2 / math.pi) / np.abs(ref).sum()),
    }


def peak_rss(n: int, layout: str) -> dict:
    """Peak RSS of a fresh process: build a graph of n agents, attribute cascade_reach once."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.operator_bench", "--peak-rss", str(n),
                          "--layout", layout], capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"peak-RSS probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _vm_hwm() -> int:
    """Peak RSS of this process in bytes: VmHWM (per address space, so a parent's peak inherited
    through fork/exec is not counted, unlike ru_maxrss); ru_maxrss where /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss_probe(n: int, layout: str) -> dict:
    src, dst, _ = follow_graph(n, 10.0, seed=0)
    cap = _capacity(n)
    if layout == "bucketed":  # the live service's graph and padded features
        g = FollowGraph.padded(src, dst, n, cap, pow2_at_least(src.size))
    else:
        g, cap = FollowGraph(src, dst, n, layout), n
    del src, dst
    x = jnp.zeros((cap, 2), jnp.float32).at[:n].set(features(n))
    F = indicators.cascade_reach(g, P)
    t = time.perf_counter()
    jax.block_until_ready(attribute(F, x, steps=STEPS))
    first = time.perf_counter() - t
    jax.block_until_ready(attribute(F, x, steps=STEPS))
    rss = _vm_hwm()
    return {"n": n, "layout": layout, "peak_rss_bytes": rss, "first_call_s": first}


# --- report -----------------------------------------------------------------------------------

def run(quick: bool = False, sizes=None, log=print, density: bool | None = None) -> str:
    """Run everything and return the Markdown section (the density block unless quick)."""
    sizes = tuple(sizes) if sizes else (QUICK_SIZES if quick else SIZES)
    gpu = jax.default_backend() != "cpu"
    device = f"{jax.default_backend()} / {getattr(jax.devices()[0], 'device_kind', '?')}"
    rows = [bench_recompute(n, 3 if n >= 1_000_000 else 5, log) for n in sizes]
    shap = [bench_shapley(n, perms, log) for n, perms in (QUICK_SHAPLEY if quick else SHAPLEY)]
    rss_n = max(sizes)
    log(f"  peak RSS at N={rss_n:,} (fresh subprocess)")
    mem = [peak_rss(rss_n, "bucketed")]

    md = ["## Operator: Aumann-Shapley recompute and the cascade kernel", "", header(), ""]
    md += ["Follow graphs (benchmarks.graphgen, seed 0), realized follower counts "
           "(target shape: median 1, about 5% above 95, under 0.5% above 1,000):", "",
           "| N | edges | median | p95 | p99.5 | max | share > 95 | share > 1,000 | node capacity | build live (s) | build sorted (s) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["shape"]
        md.append(f"| {r['n']:,} | {r['edges']:,} | {s['median']:g} | {s['p95']:g} | {s['p99.5']:g} | {s['max']:,} "
                  f"| {s['share_above_95']:.2%} | {s['share_above_1000']:.3%} | {r['capacity']:,} "
                  f"| {r['build_live_s']:.2f} | {r['build_sorted_s']:.2f} |")
    md += ["", f"Full recompute (phi, F(x), F(b)), steps = {STEPS}, device `{device}`. Median of the timed "
           "runs after a compile run, implementations interleaved; speedup = naive / chorus in the same run. "
           "Indicators and graphs are built before the timed region. **live** = what the operator service "
           "runs: `FollowGraph.padded` (bucketed layout, class tables at capacities that only grow, by doubling) at the "
           "service's node capacity (power of two >= N + 1, features zero-padded), through "
           "`operators.attribute`. max rel diff = max |phi - phi_naive| / max |phi_naive| over the real agents.", "",
           "| N | indicator | implementation | median (ms) | runs | compile+first (s) | speedup vs naive | max rel diff |",
           "|---:|---|---|---:|---:|---:|---:|---:|"]
    labels = {"cascade_live": ("cascade_reach", "**chorus live**: bucketed, padded (default layout, operator service)"),
              "cascade_sorted": ("cascade_reach", "chorus, layout `sorted` (reference layout; info)"),
              "cascade_naive": ("cascade_reach", "naive (jax.grad through segment_sum), edges in arrival order"),
              "cascade_naive_sorted": ("cascade_reach", "naive, edges pre-sorted by dst (info)"),
              "polarization_chorus": ("polarization", "chorus"),
              "polarization_naive": ("polarization", "naive (same formula, plain scan)")}
    labels_nb = {"cascade_live_nb": ("cascade_reach", f"**chorus live**, node_batch = {NB} (the default off CPU)"),
                 "cascade_sorted_nb": ("cascade_reach", f"chorus, layout `sorted`, node_batch = {NB}")}
    if gpu:
        labels["cascade_live"] = ("cascade_reach", "chorus live, node_batch = 1 (one node per pass)")
        labels["cascade_sorted"] = ("cascade_reach", "chorus, layout `sorted`, node_batch = 1")
        labels = dict(list(labels.items())[:2] + list(labels_nb.items()) + list(labels.items())[2:])
    for r in rows:
        for key, (ind, impl) in labels.items():
            m = r[key]
            ref = r["cascade_naive" if ind == "cascade_reach" else "polarization_naive"]["median_s"]
            speed = "1 (reference)" if key.endswith("naive") else f"{ref / m['median_s']:.2f}x"
            if key == "cascade_live":
                speed += f" ({r['cascade_naive_sorted']['median_s'] / m['median_s']:.2f}x vs sorted-edge naive)"
            md.append(f"| {r['n']:,} | {ind} | {impl} | {_ms(m['median_s'])} | {m['runs']} | {m['compile_s']:.2f} "
                      f"| {speed} | {m['max_rel_diff']:.1e} |")
    md += ["", "Polarization has no graph and no custom kernel: its row shows what `attribute` costs "
           "over a bare scan.", "",
           "Sampled Shapley (`operators.shapley.sampled`, antithetic permutations, F a black box, prefixes "
           "evaluated in vmapped batches, jit compiled once and warm) vs Aumann-Shapley on cascade_reach, the "
           "same F (default layout) for both. Sampled Shapley is **run** (not extrapolated) in rounds of fresh "
           "permutations, pooled exactly, until its own criterion holds: max_i stderr_i <= 1% of max_i |phi_i|; "
           "its time is the wall time of all rounds, with the fastest prefix batch size of a calibration "
           "(64 / 256 / 1024 prefixes per vectorized call). The two methods estimate different values "
           "(Shapley over agents in or out vs the Aumann-Shapley path integral; equal for multilinear F, and "
           "cascade_reach is not multilinear in x): *max gap*, relative L1 and Spearman compare sampled Shapley "
           f"with the converged Aumann-Shapley ref ({REF_STEPS} Gauss-Legendre nodes), max gap = "
           "max_i |phi_i - ref_i| / max_i |ref_i|; *noise L1* is the part of the L1 gap expected from the "
           "sampled estimate's own noise (sum of E|error| / sum |ref|).", "",
           "| N | edges | permutations | batch | s / permutation | max stderr / max phi | max gap to AS | sampled (s) "
           "| rel L1 | noise L1 | Spearman |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in shap:
        md.append(f"| {s['n']:,} | {s['edges']:,} | {s['permutations']}{'' if s['met'] else ' (cap)'} "
                  f"| {s['batch']} | {s['per_permutation_s']:.3f} | {s['max_stderr'] / s['largest_phi']:.4f} "
                  f"| {s['sampled_max_err']:.4f} | {s['sampled_s']:,.2f} | {s['rel_l1']:.3f} "
                  f"| {s['noise_l1']:.3f} | {s['spearman']:.3f} |")
    md += ["", f"Aumann-Shapley time (median of 20 warm calls, interleaved), two ways: at steps = {STEPS} "
           "Gauss-Legendre (the default), and at **equal accuracy**: the fewest nodes, per quadrature rule, "
           "whose max per-agent error against ref is <= 1% of max |ref| -- the bound sampled Shapley's standard "
           "error is run to, here applied to the actual error -- timed with the rule that needs fewest "
           "(`gauss-legendre-graded`: Gauss-Legendre on a = t^3, operators.quadrature). *ideal* = permutations x "
           "(N + 1) F evaluations / (2 x nodes + 2 evaluation-equivalents of Aumann-Shapley: a forward and "
           "a backward pass per node, F(x), F(b)): the ratio if one F evaluation cost the same in both.", "",
           f"| N | AS, {STEPS} nodes (ms) | sampled / AS | ideal | nodes for 1%: Gauss-Legendre | nodes for 1%: graded "
           "| AS, equal accuracy (ms) | sampled / AS | ideal |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in shap:
        eq = s["equal_accuracy"]
        cell = {r: (f"{eq[r][0]} ({eq[r][1]:.1e})" if r in eq else "> 32") for r in RULES_COMPARED}
        md.append(f"| {s['n']:,} | {_ms(s['as_s'])} | {s['ratio']:.2e} | {s['ideal_ratio']:.2e} "
                  f"| {cell['gauss-legendre']} | {cell['gauss-legendre-graded']} | {_ms(s['as_eq_s'])} "
                  f"| {s['ratio_eq']:.2e} | {s['ideal_ratio_eq']:.2e} |")
    md += ["", f"Peak memory: fresh process (`python -m benchmarks.operator_bench --peak-rss {rss_n}`) that "
           "generates the graph, builds the live (padded bucketed) FollowGraph and runs cascade_reach "
           "attribution twice on the padded features; `VmHWM` of that process.", "",
           "| N | layout | peak RSS (GB) | compile+first (s) |", "|---:|---|---:|---:|"]
    for m in mem:
        md.append(f"| {m['n']:,} | {m['layout']} (live, padded) | {m['peak_rss_bytes'] / 1e9:.2f} | {m['first_call_s']:.1f} |")

    by_n = {r["n"]: r for r in rows}
    top = by_n.get(TARGET_N)
    shap4 = [s for s in shap if s["n"] == TARGET_SHAPLEY_N]
    mem_top = [m for m in mem if m["n"] == TARGET_N]
    if density if density is not None else not quick:
        from benchmarks.density import bench_density, markdown

        md += markdown(bench_density(log=log))
    md += ["", "Targets:", "", "| target | measured | status |", "|---|---|---|"]
    if top:
        naive = top["cascade_naive"]["median_s"]
        live = top["cascade_live_nb" if gpu else "cascade_live"]["median_s"]
        sp = naive / live
        md.append(f"| cascade_reach, {TARGET_N:,} agents, steps {STEPS}, live layout (padded bucketed): >= "
                  f"{TARGET_SPEEDUP:g}x faster than naive (same run) | {sp:.2f}x ({_ms(live)} ms vs {_ms(naive)} ms) "
                  f"| {_status(sp >= TARGET_SPEEDUP) if not gpu else 'n/a (GPU run)'} |")
        if gpu:
            best = top["cascade_live_nb"]["median_s"]  # what the operator service runs on a GPU
            md.append(f"| GPU ({device}): cascade_reach {TARGET_N:,}, steps {STEPS} <= {TARGET_GPU_S * 1e3:g} ms "
                      f"| {_ms(best)} ms (naive {_ms(naive)} ms) | {_status(best <= TARGET_GPU_S)} |")
    else:
        md.append(f"| cascade_reach speedup at {TARGET_N:,} agents | not run (sizes {', '.join(map(str, sizes))}) | n/a |")
    for s4 in shap4:
        md.append(f"| sampled / Aumann-Shapley time at N = {TARGET_SHAPLEY_N:,}, equal accuracy: >= {TARGET_SHAPLEY_RATIO:.0e} "
                  f"| {s4['ratio_eq']:.2e} ({s4['rule_eq']}, {s4['steps_eq']} nodes; ideal-cost bound "
                  f"{s4['ideal_ratio_eq']:.2e}); at {STEPS} Gauss-Legendre nodes {s4['ratio']:.2e} "
                  f"| {_status(s4['ratio_eq'] >= TARGET_SHAPLEY_RATIO)} |")
    if not shap4:
        md.append(f"| sampled / Aumann-Shapley time at N = {TARGET_SHAPLEY_N:,}, equal accuracy: >= "
                  f"{TARGET_SHAPLEY_RATIO:.0e} | section shapley_scale (`chorus bench shapley_scale`) | see there |")
    for s in shap:
        if s["n"] != TARGET_SHAPLEY_N:  # how the ratio scales with N (information, not a target)
            md.append(f"| (info) the same ratio at N = {s['n']:,} | {s['ratio_eq']:.2e} ({s['rule_eq']}, "
                      f"{s['steps_eq']} nodes); at {STEPS} Gauss-Legendre nodes {s['ratio']:.2e} | info |")
    for m in mem_top:
        gb = m["peak_rss_bytes"] / 1e9
        md.append(f"| peak RSS at {TARGET_N:,} agents, live layout <= {TARGET_RSS_GB:g} GB | {gb:.2f} GB "
                  f"| {_status(gb <= TARGET_RSS_GB)} |")
    if not mem_top:
        md.append(f"| peak RSS at {TARGET_N:,} agents | not run (largest size {rss_n:,}) | n/a |")
    return "\n".join(md) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",")])
    ap.add_argument("--density", action="store_true", help="only the density block (1.67M agents / 100M edges)")
    ap.add_argument("--density-n", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peak-rss", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="bucketed", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_rss:
        print(json.dumps(_peak_rss_probe(args.peak_rss, args.layout)))
        return
    if args.density:
        from benchmarks.density import N, bench_density, markdown

        r = bench_density(n=args.density_n or N, log=lambda m: print(m, file=sys.stderr, flush=True))
        print("\n".join(["## Operator at the real graph's density", "", header()] + markdown(r)))
        return
    print(run(args.quick, args.sizes))


if __name__ == "__main__":
    main()

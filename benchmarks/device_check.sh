#!/usr/bin/env bash
# What one lease of a GPU machine runs (the device tool): ONE run of at most ~8 minutes.
# First the density hop (1.67M agents / 100M edges, 5 topics x {cascade_reach, polarization}, the
# reference and the active-subgraph operator in one process: benchmarks/density.py) -> density_gpu.md,
# then a per-pass probe of the cascade kernel at 1.67M agents, then the pure operator tests on the GPU.
# MODE=all also runs the whole operator benchmark (longer: give it its own lease).
# Results under $OUT (default ./device-out): density_gpu.md (+ .log), probe.txt, pytest_gpu.txt,
# operator_gpu.md (MODE=all). Uses the machine's python3 (JAX with CUDA); the operator code needs
# only jax, numpy and scipy (+ pydantic for the service's record types).
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export CHORUS_BENCH_COMMAND="bash benchmarks/device_check.sh"
nvidia-smi -L 2>&1 | tee "$OUT/device.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/device.txt"
# the density hop runs the operator service (stream.config / metrics / schemas): say if they are missing
$PY -c "import pydantic, pydantic_settings, prometheus_client, scipy; print('service deps ok')" 2>&1 | tail -1 | tee -a "$OUT/device.txt"

start=$SECONDS
timeout "${DENSITY_TIMEOUT:-300}" $PY -m benchmarks.operator_bench --density \
    >"$OUT/density_gpu.md" 2>"$OUT/density_gpu.log"
echo "density hop: rc=$? in $((SECONDS - start)) s"

if [ "${MODE:-density}" = all ]; then
    start=$SECONDS
    timeout "${BENCH_TIMEOUT:-330}" $PY -m benchmarks.operator_bench --sizes "${SIZES:-10000,100000,1670000}" \
        >"$OUT/operator_gpu.md" 2>"$OUT/operator_gpu.log"
    echo "operator bench: rc=$? in $((SECONDS - start)) s"
fi

start=$SECONDS
timeout "${PROBE_TIMEOUT:-60}" $PY - "${PROBE_N:-1670000}" >"$OUT/probe.txt" 2>&1 <<'PYEOF'
"""Per-pass cost of cascade_reach (live layout): F alone, F and its gradient, and attribute at
steps 16 with 1..16 nodes per pass; median of 5 warm calls."""
import statistics, sys, time
import jax, jax.numpy as jnp
from benchmarks.graphgen import follow_graph
from benchmarks.operator_bench import P, _capacity, features
from operators import attribute, indicators
from operators.graph import FollowGraph, pow2_at_least

def timed(fn, reps=5):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); jax.block_until_ready(fn()); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3

n = int(sys.argv[1])
src, dst, _ = follow_graph(n, 10.0, seed=0)
cap = _capacity(n)
x = jnp.zeros((cap, 2), jnp.float32).at[:n].set(features(n))
for layout in ("bucketed", "sorted"):
    g = FollowGraph.padded(src, dst, n, cap, pow2_at_least(src.size), layout=layout)
    F = indicators.cascade_reach(g, P)
    fwd = jax.jit(lambda F, z: F(z))
    vg = jax.jit(lambda F, z: jax.value_and_grad(F)(z))
    print(f"{layout}: N={n:,} forward {timed(lambda: fwd(F, x)):.3f} ms, value_and_grad {timed(lambda: vg(F, x)):.3f} ms")
    for k in (1, 2, 4, 8, 16):
        print(f"{layout}: attribute steps 16, node_batch {k:2d}: {timed(lambda: attribute(F, x, steps=16, node_batch=k)):.3f} ms")
PYEOF
echo "probe: rc=$? in $((SECONDS - start)) s"

start=$SECONDS
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-90}" $PY -m pytest -q -p no:cacheprovider \
    --confcutdir=tests/operators tests/operators/test_graph.py tests/operators/test_attribution.py \
    tests/operators/test_subgraph.py \
    -k "closed_forms or padding or heavy_tailed or completeness or node_batch or null or linearity or stack or active" \
    >"$OUT/pytest_gpu.txt" 2>&1
echo "pytest (GPU): rc=$? in $((SECONDS - start)) s"

tail -n 40 "$OUT/density_gpu.md"; tail -n 5 "$OUT/density_gpu.log"; [ -f "$OUT/operator_gpu.md" ] && tail -n 45 "$OUT/operator_gpu.md"; cat "$OUT/probe.txt"; tail -n 5 "$OUT/pytest_gpu.txt"

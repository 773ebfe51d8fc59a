"""Sharded cascade kernel and attribution == one device's, on 4 forced host (CPU) devices.

The forced device count must be set before JAX starts, so the check runs in a fresh Python
process (this test process keeps its single device). Truth: the unsharded FollowGraph (checked
against brute force in test_graph.py), same inputs, same nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import numpy as np, jax, jax.numpy as jnp
from tests.helpers.operators_data import random_graph
from operators import attribute, indicators
from operators.graph import FollowGraph, reach
from operators.sharded import ShardedGraph, node_mesh, shard_rows

assert jax.device_count() == 4, jax.devices()
rng = np.random.default_rng(7)
n, cap = 700, 1024
src, dst = random_graph(rng, n, 5000)
mesh = node_mesh()
one = FollowGraph.padded(src, dst, n, cap, 8192)
many = ShardedGraph(src, dst, cap, mesh, n_real=n)
q = np.zeros(cap, np.float32); q[:n] = 0.5 * rng.random(n); q[n:] = 0.3  # padding must be ignored
vg = jax.jit(jax.value_and_grad(reach, argnums=1))
v1, g1 = vg(one, jnp.asarray(q))
v4, g4 = vg(many, shard_rows(q, mesh))
x = np.zeros(cap, np.float32); x[:n] = np.where(rng.random(n) < 0.4, 1 + rng.pareto(1.5, n), 0)
a1 = attribute(indicators.cascade_reach(one), x, steps=10, rule="gauss-legendre-graded")
a4 = attribute(indicators.cascade_reach(many), shard_rows(x, mesh), steps=10, rule="gauss-legendre-graded")
print(json.dumps({
    "v": [float(v1), float(v4)], "g": [np.asarray(g1).tolist(), np.asarray(g4).tolist()],
    "phi": [np.asarray(a1.phi).tolist(), np.asarray(a4.phi).tolist()],
    "value": [float(a1.value), float(a4.value)], "delta": [float(a1.delta), float(a4.delta)],
    "phi_devices": len(a4.phi.sharding.device_set), "graph_devices": len(many.parts[0].sharding.device_set),
    "bytes_per_edge": many.nbytes() / many.num_edges,
}))
"""


@pytest.fixture(scope="module")
def sharded_run():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sharded_reach_and_gradient_equal_one_device(sharded_run):
    v1, v4 = sharded_run["v"]
    assert v4 == pytest.approx(v1, rel=1e-5)
    g1, g4 = (np.array(g) for g in sharded_run["g"])
    assert np.abs(g4 - g1).max() <= 1e-5 * np.abs(g1).max()
    assert np.all(g4[700:] == 0.0)  # padding nodes: exactly zero gradient


def test_sharded_attribution_equals_one_device_and_stays_partitioned(sharded_run):
    p1, p4 = (np.array(p) for p in sharded_run["phi"])
    assert np.abs(p4 - p1).max() <= 1e-5 * np.abs(p1).max()
    assert sharded_run["value"][1] == pytest.approx(sharded_run["value"][0], rel=1e-5)
    assert sharded_run["phi_devices"] == sharded_run["graph_devices"] == 4
    assert sharded_run["bytes_per_edge"] >= 8.0  # two int32 cells per edge (plus padding, per-node maps)

"""A short soak (benchmarks/soak_bench.py): the whole pipeline with event time compressed so the
window fills and slides; every process's memory, both stages' consumer lag and every hop's
latency are recorded, and the pipeline keeps up (lag does not run away)."""

from __future__ import annotations

import asyncio
import math

import pytest

from benchmarks.soak_bench import _plot, _summary, soak

pytestmark = pytest.mark.timeout(300)


def test_short_soak_records_memory_lag_and_hop_latency(tmp_path):
    res = asyncio.run(soak(1.0, 40.0, window_s=600, hop_s=60, sample_s=3.0, state_dir=tmp_path / "state",
                           indicators=["volume"]))  # the cheapest indicator: this checks the soak, not JAX
    samples, hops = res["samples"], res["hops"]
    assert len(samples) >= 10
    late = [s for s in samples if s["t"] >= res["fill_s"]]
    for key in ("rss_main_mb", "rss_worker_mb", "rss_broker_mb", "rss_ingester_mb", "rss_operator_mb"):
        assert all(s[key] and s[key] > 10 for s in late), key  # every process measured
    # the ingester and the operator ran as their own processes, and nothing was lost on the way:
    # the relay's own count (what it could not serve) and the ingester's agree on zero
    assert res["processes"] == ("ingester", "operator")
    assert res["relay"]["skipped"] == 0 and res["relay"]["outdated"] == 0 and res["relay"]["frames"] > 1000
    assert all(s["skipped"] == 0 and s["outdated"] == 0 for s in late)
    assert any(s["lag_worker"] is not None for s in late) and any(s["lag_operator"] is not None for s in late)
    assert any(s["held"] for s in late)  # the worker holds the window
    # hops are published before and after the window filled (event time x30: a 60 s hop every 2 s
    # of wall time; the operator computes when caught up, or hop_s / 2 of wall time after input)
    after = [h for h in hops if h["t"] >= res["fill_s"]]
    assert len(hops) >= 2 and after and all(math.isfinite(h["latency_s"]) for h in hops)
    assert sorted(h["window_end"] for h in hops) == [h["window_end"] for h in hops]  # each hop once, in order
    summ = _summary(res)
    assert summ["latency"] is not None and summ["rss_worker_mb"] is not None
    _plot(res, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000

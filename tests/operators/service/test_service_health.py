"""Honest health signals from the operator: a result the maths could not give (NaN, infinity) is
not published, is counted, turns chorus_attribution_healthy to 0, and the pair's other series are
removed (never left frozen at their last good values); label sets stay bounded (rank, no DID)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY

from operators.service.service import OperatorService
from stream.config import Settings
from stream.metrics import BAND_SHARE, TOP_SHARE
from stream.schemas import Features, GraphEdge

GOOD = {"did:A": [2, 0, 0.5, 0], "did:B": [1, 0, -0.5, 0], "did:C": [4, 0, 0.0, 0]}
# followers (from the graph) A 2, B 1, C 0, distinct: the 2-agent panel spans two bands (a TVD)
FOLLOWS = [("did:A", "did:B"), ("did:A", "did:C"), ("did:B", "did:C")]


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels)


def series(name, **labels):
    """Every sample of ``name`` whose labels include ``labels``."""
    return [s for fam in REGISTRY.collect() for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def feed(svc, end, topics, scale=1):
    for i, (src, dst) in enumerate(FOLLOWS):
        svc.apply_edge(GraphEdge(op="add", src=src, dst=dst, time_us=i))
    for did, vec in GOOD.items():
        vec = [v * scale for v in vec]
        svc.apply_features(Features(did=did, window_end=end, topics={t: vec for t in topics}))


def test_a_non_finite_result_is_skipped_counted_and_its_series_removed():
    svc = OperatorService(Settings(indicators=["volume"]), steps=8, panel_k=2)
    u = dict(topic="health_u", indicator="volume")
    t = dict(topic="health_t", indicator="volume")
    skipped0 = sample("chorus_attribution_skipped_total", **u, reason="non_finite") or 0.0
    feed(svc, 60, ["health_t", "health_u"])
    assert {s.topic for s in svc.recompute()} == {"health_t", "health_u"}
    assert sample("chorus_attribution_healthy", **u) == 1 and sample("chorus_attribution_macro_value", **u) == 7
    assert len(series("chorus_attribution_top_share", **u)) == 3

    # hop 2: the state of one topic turns non-finite (whatever the cause, the operator's output guard
    # is what stands between it and the metrics/topic)
    feed(svc, 120, ["health_t", "health_u"], scale=2)
    svc.state._set("health_u", svc.state.index["did:A"], np.array([np.inf, 0, 0, 0], np.float32))
    snaps = svc.recompute()
    assert [s.topic for s in snaps] == ["health_t"]  # nothing published for the broken pair
    assert sample("chorus_attribution_healthy", **u) == 0 and sample("chorus_attribution_healthy", **t) == 1
    assert sample("chorus_attribution_skipped_total", **u, reason="non_finite") == skipped0 + 1
    for name in ("chorus_attribution_macro_value", "chorus_attribution_completeness_residual",
                 "chorus_attribution_band_share", "chorus_attribution_panel_band_share",
                 "chorus_attribution_panel_tvd", "chorus_attribution_top_share",
                 "chorus_attribution_top_agent_info"):
        assert series(name, **u) == [], name  # removed: stale in Prometheus, a gap on the dashboard
        assert series(name, **t), name        # the healthy pair keeps its series

    # hop 3: the state is sound again -> published, healthy, series back
    svc.state._set("health_u", svc.state.index["did:A"], np.array([4, 0, 1.0, 0], np.float32))
    snaps = svc.recompute()
    assert "health_u" in {s.topic for s in snaps}
    assert sample("chorus_attribution_healthy", **u) == 1 and sample("chorus_attribution_macro_value", **u) == 14


def test_metric_labels_are_bounded():
    """No per-DID label on value series; the DID is on an info series of at most 10 per pair."""
    assert TOP_SHARE._labelnames == ("topic", "indicator", "rank")
    assert BAND_SHARE._labelnames == ("topic", "indicator", "band")
    svc = OperatorService(Settings(indicators=["volume"]), steps=8, panel_k=2)
    lab = dict(topic="health_many", indicator="volume")
    seen = set()
    for hop in range(1, 6):  # 30 agents, a different top 10 each hop
        for i in range(30):
            posts = 1 + ((i + 7 * hop) % 30)
            svc.apply_features(Features(did=f"did:m{i}", window_end=60 * hop, followers=i,
                                        topics={"health_many": [posts, 0, 0.0, 0]}))
        (snap,) = svc.recompute()
        info = series("chorus_attribution_top_agent_info", **lab)
        assert len(info) == 10 and len(series("chorus_attribution_top_share", **lab)) == 10
        assert sorted((s.labels["rank"], s.labels["did"]) for s in info) == sorted(
            (str(r), e["did"]) for r, e in enumerate(snap.top, 1))
        seen |= {s.labels["did"] for s in info}
    assert len(seen) > 10  # DIDs came and went; only the current 10 are exported

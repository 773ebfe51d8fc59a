"""The panel_disagreement alert on the synthetic population (stream/sim/synth.py), end to end
through the operator service (``chorus analyze``'s pipeline): it fires for the planted episode's
topic while the episode runs, and for nothing else (other topics, before and after it, volume).

The planted episode's participants mostly follow each other (``EPISODE["community"]`` 0.9: a
cascade among themselves), so their attributions interact with each other's far more than other
agents' do. With ``community`` 0.3 they would differ no more than ordinary activity differences
between topics, and no threshold separates that (measurement in operators/data/alerts.yaml)."""

from __future__ import annotations

import pytest

from operators.service.alerts import AlertEngine
from stream.config import Settings
from stream.offline import analyze as offline_analyze
from stream.sim.synth import Population

pytestmark = pytest.mark.timeout(240)

WINDOW, HOP = 600, 300
N = 1000


@pytest.mark.parametrize("seed", [1, 2])
def test_alert_fires_for_the_episode_topic_only(seed):
    settings = Settings(indicators=["cascade_reach", "volume"], window_s=WINDOW, hop_s=HOP)
    res = offline_analyze.analyze(offline_analyze.synthetic_source(N, seed), settings,
                                  progress=False)
    pop = Population(n=N, seed=seed)
    truth = pop.episode_truth()  # the population's plan
    t0 = pop.activity_start_us() // 1_000_000
    start, end = t0 + truth["start_us"] // 1_000_000, t0 + truth["end_us"] // 1_000_000
    engine = AlertEngine()  # the default rules (operators/data/alerts.yaml's values)
    fired = [a for s in res.snapshots for a in engine.evaluate(s) if a.rule == "panel_disagreement"]
    assert fired, "no panel_disagreement alert"
    for a in fired:
        assert (a.topic, a.indicator) == (truth["topic"], "cascade_reach"), a.summary
        assert a.window_end > start and a.window_end - WINDOW < end  # its window overlaps the episode
        assert a.evidence["scaling_residual"] >= a.evidence["threshold"] > 0
    snaps = [s for s in res.snapshots if s.indicator == "volume"]
    assert snaps and all(s.panel["sample"]["scaling_residual"] == pytest.approx(0, abs=1e-6) for s in snaps)
    # the residual is a statistic of the episode, not of the topic: before it, climate is quiet
    before = [s.panel["sample"]["scaling_residual"] for s in res.snapshots
              if s.topic == truth["topic"] and s.indicator == "cascade_reach" and s.window_end <= start]
    assert before and max(before) < engine.rules["panel_disagreement"].threshold / 2

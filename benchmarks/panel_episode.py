"""Measure the panel_disagreement alert's statistic on the synthetic population (not a bench section).

    python -m benchmarks.panel_episode N SEEDS COMMUNITY     # e.g. 2000 1,2,3 0.9

Runs ``chorus analyze``'s pipeline (stream.offline.analyze: the worker's windows + the operator
service) over ``Population(n=N, seed, episode={"community": COMMUNITY})`` with a 10 min window and
5 min hop, for cascade_reach, polarization, volume and concentration; feeds the snapshots to the
default alert rules; prints which panel_disagreement alerts fired per seed and, per indicator and
group, the range of ``panel.sample.scaling_residual``. Groups: ``episode`` (the episode topic's
windows inside the episode), ``episode-edge`` (its windows overlapping the episode's start or
end), ``other-during`` (other topics, windows overlapping the episode), ``other`` (the rest).
The figures behind operators/data/alerts.yaml's panel_disagreement threshold came from this.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

INDICATORS = ["cascade_reach", "polarization", "volume", "concentration"]
WINDOW_S, HOP_S = 600, 300


def measure(n: int, seeds: list[int], community: float) -> str:
    from operators.service.alerts import AlertEngine
    from stream.config import Settings
    from stream.offline import analyze as offline
    from stream.sim.synth import Population

    episode = {"community": community}
    groups: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    lines = []
    for seed in seeds:
        t = time.perf_counter()
        res = offline.analyze(offline.synthetic_source(n, seed, episode=episode),
                              Settings(indicators=INDICATORS, window_s=WINDOW_S, hop_s=HOP_S), progress=False)
        pop = Population(n=n, seed=seed, episode=episode)
        truth = pop.episode_truth()
        t0 = pop.activity_start_us() // 1_000_000
        start, end = t0 + truth["start_us"] // 1_000_000, t0 + truth["end_us"] // 1_000_000
        engine = AlertEngine()
        fired = [(a.topic, a.indicator, a.window_end - t0) for s in res.snapshots for a in engine.evaluate(s)
                 if a.rule == "panel_disagreement"]
        for s in res.snapshots:
            inside = s.window_end - WINDOW_S >= start and s.window_end <= end
            overlaps = s.window_end > start and s.window_end - WINDOW_S < end
            mine = s.topic == truth["topic"]
            group = ("episode" if mine and inside else "episode-edge" if mine and overlaps
                     else "other-during" if overlaps else "other")
            groups[(s.indicator, group)].append((s.panel["sample"]["scaling_residual"], seed, s.topic,
                                                 s.window_end - t0, s.panel["sample"]["k"]))
        lines.append(f"n={n} seed={seed} community={community} ({time.perf_counter() - t:.0f} s): "
                     f"panel_disagreement fired {fired} (topic, indicator, window end - activity start)")
    for (ind, group), vals in sorted(groups.items()):
        lo, hi = min(vals), max(vals)
        lines.append(f"{ind:13s} {group:12s} {len(vals):3d} windows: {lo[0]:.4f} .. {hi[0]:.4f} "
                     f"(max: seed {hi[1]}, {hi[2]}, t = {hi[3]} s, {hi[4]} sampled)")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m benchmarks.panel_episode N SEEDS COMMUNITY")
    print(measure(int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], float(sys.argv[3])))

"""The operator service: closed-form hops, metrics, and end to end on a real embedded broker."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from prometheus_client import REGISTRY

from operators.service.service import OperatorService
from operators.service.state import OperatorState
from stream.config import Settings
from stream.kafka import ensure_topics, make_consumer, make_producer
from stream.schemas import (TOPIC_ALERTS, TOPIC_ATTRIBUTIONS, TOPIC_FEATURES, TOPIC_GRAPH, Alert, AttributionSnapshot,
                            Features, GraphEdge)

P = 0.05  # cascade_reach's p in the service


def q(x):  # activation probability of an agent with activity x (posts + reposts)
    return P * (1 - math.exp(-x))


# Hand-built population. A is followed by f0..f5, B by g0, g1 (disjoint follower sets), C by nobody.
# Feature columns: posts, engagement, stance_sum, reposts.
#   volume (posts):          phi = (A 2, B 1, C 4), exact.
#   cascade_reach:           R = 6 q(3) + 2 q(1) is additive here, so phi_A = 6 q(3), phi_B = 2 q(1), phi_C = 0.
# 11 agents with distinct follower counts: A 100, B 50, the 8 followers 2..9 (sent as features with
# no topic activity), C 1. Ranks by followers: A 0, B 1, followers 2..9, C 10; band upper ranks
# floor(hi * 11) = [0, 0, 1, 5, 11]: A -> "1-10", B -> "10-50", C -> "bottom50".
HOP1 = [("did:A", 100, [2, 5, 1.0, 1]), ("did:B", 50, [1, 1, -1.0, 0]), ("did:C", 1, [4, 0, 0.5, 0])]
EDGES = [("did:A", f"did:f{i}") for i in range(6)] + [("did:B", f"did:g{i}") for i in range(2)]
QUIET = [(dst, 2 + i, None) for i, (_, dst) in enumerate(EDGES)]
PHI_VOL = {"did:C": 4 / 7, "did:A": 2 / 7, "did:B": 1 / 7}
R = 6 * q(3) + 2 * q(1)


def features(end, rows, expired=()):
    out = [Features(did=d, window_end=end, followers=f, topics={"t": v} if v else {}) for d, f, v in rows]
    return out + [Features(did=d, window_end=end, followers=0, topics={}, expired=True) for d in expired]


def edges():
    return [GraphEdge(op="add", src=s, dst=d, time_us=i) for i, (s, d) in enumerate(EDGES)]


def by_indicator(snaps):
    return {s.indicator: s for s in snaps}


def check_hop1(snaps):
    s = by_indicator(snaps)
    vol, cas = s["volume"], s["cascade_reach"]
    assert vol.value == pytest.approx(7) and vol.baseline_value == 0 and vol.n_agents == 3
    assert [e["did"] for e in vol.top] == ["did:C", "did:A", "did:B"]
    assert {e["did"]: e["share"] for e in vol.top} == pytest.approx(PHI_VOL, rel=1e-6)
    assert vol.bands == pytest.approx({"top0.1": 0, "0.1-1": 0, "1-10": 2 / 7, "10-50": 1 / 7, "bottom50": 4 / 7})
    # panel k=2 = {A, B}: volume is linear, so the panel gets A 2, B 1 and c* = 1 reconciles exactly
    assert vol.panel["bands"] == pytest.approx({"top0.1": 0, "0.1-1": 0, "1-10": 2 / 3, "10-50": 1 / 3,
                                                "bottom50": 0})
    assert vol.panel["tvd"] == pytest.approx(4 / 7)
    assert vol.panel["spearman"] == pytest.approx(1) and vol.panel["rescale"] == pytest.approx(1)
    assert vol.panel["rescale_residual"] == pytest.approx(0, abs=1e-6)
    assert cas.value == pytest.approx(R, rel=1e-5) and cas.n_agents == 3
    assert abs(cas.completeness_residual) <= 1e-4 * R
    assert {e["did"]: e["share"] for e in cas.top if e["share"] > 0} == pytest.approx(
        {"did:A": 6 * q(3) / R, "did:B": 2 * q(1) / R}, rel=1e-4)
    assert {e["did"]: e["followers"] for e in cas.top} == {"did:A": 6, "did:B": 2}  # from the graph
    assert cas.bands["1-10"] == pytest.approx(6 * q(3) / R, rel=1e-4)
    assert cas.bands["10-50"] == pytest.approx(2 * q(1) / R, rel=1e-4)
    for snap in snaps:
        assert sum(snap.bands.values()) == pytest.approx(1) and sum(snap.panel["bands"].values()) == pytest.approx(1)


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels)


def test_recompute_closed_forms_metrics_and_stale_top_labels():
    svc = OperatorService(Settings(indicators=["volume", "cascade_reach", "polarization"]), steps=16, panel_k=2)
    for e in edges():
        svc.apply_edge(e)
    for f in features(60, HOP1 + QUIET):
        svc.apply_features(f)
    assert svc.hop_due(caught_up=True) and not svc.hop_due(caught_up=False)
    snaps = svc.recompute()
    assert {s.window_end for s in snaps} == {60} and not svc.hop_due(caught_up=True)
    check_hop1([s for s in snaps if s.indicator != "polarization"])
    pol = by_indicator(snaps)["polarization"]
    assert pol.baseline_value == pytest.approx(0, abs=1e-7) and pol.value > 0
    assert abs(pol.completeness_residual) <= 1e-4 * pol.value
    lab = dict(topic="t", indicator="volume")
    assert sample("chorus_attribution_macro_value", **lab) == pytest.approx(7)
    assert sample("chorus_attribution_band_share", **lab, band="bottom50") == pytest.approx(4 / 7)
    assert sample("chorus_attribution_panel_tvd", **lab) == pytest.approx(4 / 7)
    assert sample("chorus_attribution_top_share", **lab, rank="1") == pytest.approx(4 / 7)
    assert sample("chorus_attribution_top_agent_info", **lab, rank="1", did="did:C") == 1
    assert sample("chorus_attribution_healthy", **lab) == 1
    assert sample("chorus_operator_recompute_seconds_count", **lab) >= 1
    # next hop: C leaves the window -> its top label set disappears, A takes rank 1
    for f in features(120, HOP1[:2], expired=["did:C"]):
        svc.apply_features(f)
    vol = by_indicator(svc.recompute())["volume"]
    assert vol.window_end == 120 and vol.value == pytest.approx(3) and vol.n_agents == 2
    assert sample("chorus_attribution_top_agent_info", **lab, rank="1", did="did:C") is None
    assert sample("chorus_attribution_top_agent_info", **lab, rank="3", did="did:B") is None
    assert sample("chorus_attribution_top_share", **lab, rank="3") is None  # two agents left: no rank 3
    assert sample("chorus_attribution_top_share", **lab, rank="1") == pytest.approx(2 / 3)
    assert sample("chorus_attribution_top_agent_info", **lab, rank="1", did="did:A") == 1


def test_polarization_on_heavy_tailed_agents_is_complete():
    rng = np.random.default_rng(7)
    svc = OperatorService(Settings(indicators=["polarization"]))  # steps: up to 65 nodes
    for i in range(400):
        posts = float(1 + rng.pareto(1.5)) if i % 4 else 0.0
        svc.apply_features(Features(did=f"did:{i}", window_end=60, followers=int(rng.pareto(1.2) * 10),
                                    topics={"t": [posts, 1.0, posts * float(rng.uniform(-1, 1)), 0.0]}))
    (pol,) = svc.recompute()
    assert pol.n_agents == 300  # agents without posts carry no stance mass
    assert abs(pol.completeness_residual) <= 1e-4 * abs(pol.value - pol.baseline_value)
    # mixed signs: net shares of the absolute mass, sum = (P+ - P-) / (P+ + P-), each in [-1, 1]
    m = pol.band_mass
    assert sum(pol.bands.values()) == pytest.approx(
        (m["positive_mass"] - m["negative_mass"]) / (m["positive_mass"] + m["negative_mass"]), abs=1e-6)
    assert all(-1 <= v <= 1 for v in pol.bands.values()) and len(pol.top) == 10
    assert sum(m["positive"].values()) == pytest.approx(1) and sum(m["negative"].values()) == pytest.approx(1)
    # the per-agent error estimate met the tolerance with the cheapest rung that does
    assert pol.error["relative"] <= svc.tolerance == 1e-3
    assert pol.error["rule"] == "gauss-kronrod" and pol.error["steps"] in (3, 5, 9, 17, 33)
    assert all(e["error"] <= 1e-3 * max(abs(e["phi"]) for e in pol.top) for e in pol.top)


def test_service_and_library_agree_and_ignore_inactive_agents():
    """One baseline rule: the service's polarization equals attribute(F, x) on the real rows, and
    agents with no post (and padding) get exactly 0."""
    from operators import attribute, indicators

    rng = np.random.default_rng(8)
    svc = OperatorService(Settings(indicators=["polarization"]))
    rows = []
    for i in range(300):
        posts = float(rng.integers(1, 6)) if i % 3 else 0.0
        stance = posts * float(rng.uniform(-1, 1))
        rows.append((posts, stance))
        svc.apply_features(Features(did=f"did:{i}", window_end=60, followers=i,
                                    topics={"t": [posts, 0.0, stance, 0.0]} if posts else {}))
    (pol,) = svc.recompute()
    x = np.array(rows)
    lib = attribute(indicators.polarization(), x, steps=pol.error["steps"], rule=pol.error["rule"])
    phi = np.asarray(lib.phi).sum(axis=1)
    assert pol.value == pytest.approx(float(lib.value), rel=1e-5)
    by_did = {e["did"]: e["phi"] for e in pol.top}
    for did, v in by_did.items():
        assert v == pytest.approx(phi[int(did.split(":")[1])], rel=1e-4, abs=1e-7)
    assert not phi[x[:, 0] == 0].any()


def test_non_finite_snapshot_is_skipped_and_counted(monkeypatch):
    """An indicator whose F(b) is -inf (log at the zero baseline): the snapshot is skipped, the
    reason counted, the other indicators still published."""
    import jax.numpy as jnp

    from operators.service import service as service_module

    log_volume = service_module.IndicatorSpec("log_volume", service_module._posts,
                                              lambda st, settings: (lambda z: jnp.sum(jnp.log(z))), "posts")
    monkeypatch.setitem(service_module.INDICATORS, "log_volume", log_volume)
    svc = OperatorService(Settings(indicators=["log_volume", "volume"]))
    lab = dict(topic="t", indicator="log_volume", reason="non_finite")
    before = sample("chorus_attribution_skipped_total", **lab) or 0.0
    svc.apply_features(Features(did="did:a", window_end=60, followers=1, topics={"t": [2.0, 0.0, 0.0, 0.0]}))
    snaps = svc.recompute()
    assert [s.indicator for s in snaps] == ["volume"]
    assert sample("chorus_attribution_skipped_total", **lab) == before + 1



@pytest.mark.parametrize("small_edges", [None, 0], ids=["edge-lists", "incremental"])
def test_active_only_hops_equal_the_full_graph_reference_across_hops(small_edges):
    """The default service (cascade_reach on each topic's active subgraph, polarization on the
    active rows) publishes the same snapshots as the reference (full graph, all rows), hop after
    hop, while agents go quiet or start posting and follows are added and removed; with the
    small-graph edge lists (the default at this size) and with the incremental bucketed subgraphs
    (``small_edges=0``, what a large graph gets)."""
    rng = np.random.default_rng(11)
    n, topics = 300, ("a", "b")
    dids = [f"did:{i}" for i in range(n)]
    followers = (rng.pareto(1.2, n) * 10).astype(int)
    settings = Settings(indicators=["cascade_reach", "polarization"])
    state = OperatorState() if small_edges is None else OperatorState(small_edges=small_edges)
    fast = OperatorService(settings, steps=12, rule="gauss-legendre-graded", state=state)
    ref = OperatorService(settings, steps=12, rule="gauss-legendre-graded", active_only=False)
    pairs = {(int(s), int(d)) for s, d in zip(rng.integers(0, n, 4000), rng.integers(0, n, 4000)) if s != d}
    t = 0
    for hop in range(3):
        end = 60 * (hop + 1)
        for i in range(n):
            vec = {}
            for k, topic in enumerate(topics):
                if rng.random() < 0.35:
                    posts = float(1 + np.floor(rng.pareto(1.5)))
                    vec[topic] = [posts, 1.0, posts * float(rng.uniform(-1, 1)), float(rng.integers(0, 3))]
            f = Features(did=dids[i], window_end=end, followers=int(followers[i]), topics=vec)
            fast.apply_features(f)
            ref.apply_features(f)
        ops = [("add", p) for p in list(pairs)[: 600 if hop == 0 else 60]]
        if hop:
            ops += [("remove", p) for p in rng.permutation(sorted(pairs))[:60].tolist()]
        for op, (s, d) in ops:
            t += 1
            e = GraphEdge(op=op, src=dids[s], dst=dids[d], time_us=t)
            fast.apply_edge(e)
            ref.apply_edge(e)
        got = {(x.topic, x.indicator): x for x in fast.recompute()}
        want = {(x.topic, x.indicator): x for x in ref.recompute()}
        assert got.keys() == want.keys() and len(got) == 4
        for key, w in want.items():
            g = got[key]
            assert g.value == pytest.approx(w.value, rel=1e-5)
            assert g.baseline_value == pytest.approx(w.baseline_value, rel=1e-5, abs=1e-6)
            assert g.n_agents == w.n_agents
            for band in w.bands:
                assert g.bands[band] == pytest.approx(w.bands[band], abs=1e-5)
                assert g.panel["bands"][band] == pytest.approx(w.panel["bands"][band], abs=1e-5)
            assert g.panel["tvd"] == pytest.approx(w.panel["tvd"], abs=1e-5)
            assert [e["did"] for e in g.top[:5]] == [e["did"] for e in w.top[:5]]
    if small_edges is None:
        assert fast.state.small() and fast.state.subgraph("a") is None  # edge lists, no subgraph kept
    else:
        assert fast.state.subgraph("a").builds == 1  # the graph changed every hop; no full rebuild


def test_unknown_indicator_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown indicator.*nope"):
        OperatorService(Settings(indicators=["nope"]))
    with pytest.raises(ValueError, match="no indicator configured"):
        OperatorService(Settings(indicators=[]))


# --- end to end on a real broker ---------------------------------------------------------------

async def produce(bootstrap, values):
    prod = make_producer(bootstrap, idempotence=False)
    await prod.start()
    try:
        futs = []
        for v in values:
            topic, key = (TOPIC_FEATURES, v.did) if isinstance(v, Features) else (TOPIC_GRAPH, v.dst)
            futs.append(await prod.send(topic, v.to_bytes(), key=key.encode()))
        for f in futs:
            await f
    finally:
        await prod.stop()


async def collect(bootstrap, topic, model, until, timeout=60.0, task=None):
    """Read ``topic`` from the beginning until ``until(values)`` holds (fails if ``task`` died).
    ``until=None``: read for ``timeout`` seconds and return what came."""
    cons = make_consumer(bootstrap, topic, group_id=None, auto_offset_reset="earliest")
    await cons.start()
    got = []
    try:
        async with asyncio.timeout(timeout) as deadline:
            if until is None:
                until = lambda _: asyncio.get_running_loop().time() >= deadline.when() - 0.3  # noqa: E731
            while not until(got):
                if task is not None and task.done():
                    task.result()
                    raise AssertionError("the service stopped by itself")
                for msgs in (await cons.getmany(timeout_ms=200)).values():
                    got += [model.from_bytes(m.value) for m in msgs]
    finally:
        await cons.stop()
    return got


def complete(end, n, volume):
    """n snapshots of window ``end`` for volume with value ``volume`` (the whole hop) and cascade_reach."""
    def until(got):
        vol = sum(s.window_end == end and s.indicator == "volume" and abs(s.value - volume) < 1e-6 for s in got)
        return vol >= n and sum(s.window_end == end and s.indicator == "cascade_reach" for s in got) >= n
    return until


def last(snaps, end, indicator):
    return [s for s in snaps if s.window_end == end and s.indicator == indicator][-1]


@pytest.mark.timeout(240)
def test_end_to_end_hops_alerts_restart_and_cli(fresh_broker, tmp_path):
    bootstrap = fresh_broker.bootstrap
    rules = tmp_path / "alerts.yaml"
    rules.write_text("rules: {new_top_culprit: {min_share: 0.05}, panel_disagreement: {enabled: false}}\n")
    s = Settings(kafka=fresh_broker.url, kafka_idempotence=False, indicators=["volume", "cascade_reach"],
                 alerts_file=rules, hop_s=10, window_s=60)

    async def scenario():
        await ensure_topics(bootstrap)
        await produce(bootstrap, edges() + features(60, HOP1 + QUIET))
        svc = OperatorService(s, steps=16, panel_k=2)
        task = asyncio.create_task(svc.run())
        hop1 = await collect(bootstrap, TOPIC_ATTRIBUTIONS, AttributionSnapshot, complete(60, 1, 7), task=task)
        # hop 2: C leaves, D arrives with 10 posts -> D is a new top culprit for volume
        await produce(bootstrap, features(120, HOP1[:2] + [("did:D", 1, [10, 0, 0, 0])], expired=["did:C"]))
        hop2 = await collect(bootstrap, TOPIC_ATTRIBUTIONS, AttributionSnapshot, complete(120, 1, 13), task=task)
        alerts = await collect(bootstrap, TOPIC_ALERTS, Alert, lambda g: len(g) >= 1, task=task)
        await svc.stop()
        await asyncio.wait_for(task, 30)
        # restart: a fresh service replays both topics and reproduces the hop-2 snapshot
        n = len(await collect(bootstrap, TOPIC_ATTRIBUTIONS, AttributionSnapshot, None, timeout=1.5))
        again = OperatorService(s, steps=16, panel_k=2)
        task = asyncio.create_task(again.run())
        both = await collect(bootstrap, TOPIC_ATTRIBUTIONS, AttributionSnapshot,
                             lambda g: len(g) > n and complete(120, 1, 13)(g[n:]), task=task)
        both = both[:n], both[n:]
        await again.stop()
        await asyncio.wait_for(task, 30)
        return hop1, hop2, alerts, both

    hop1, hop2, alerts, both = asyncio.run(scenario())
    check_hop1([last(hop1, 60, "volume"), last(hop1, 60, "cascade_reach")])
    vol2 = last(hop2, 120, "volume")
    assert vol2.value == pytest.approx(13) and vol2.top[0]["did"] == "did:D"
    assert vol2.top[0]["share"] == pytest.approx(10 / 13)
    culprit = [a for a in alerts if a.rule == "new_top_culprit" and a.indicator == "volume"]
    assert len(culprit) == 1 and culprit[0].evidence["culprits"][0]["did"] == "did:D"
    assert culprit[0].window_end == 120 and culprit[0].evidence["threshold"] == 0.05
    before, after = both
    for ind in ("volume", "cascade_reach"):  # after the restart: the same snapshot as uninterrupted
        a, b = last(before, 120, ind), last(after, 120, ind)
        assert b.bands == pytest.approx(a.bands, abs=1e-6) and b.value == pytest.approx(a.value, rel=1e-6)
        assert [e["did"] for e in b.top] == [e["did"] for e in a.top]

    # `chorus alerts` prints the published alert (readable, then JSON lines), bounded by --limit
    base = [sys.executable, "-m", "stream.cli", "alerts", "--kafka", fresh_broker.url, "--from-beginning",
            "--rule", "new_top_culprit", "--limit", "1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(base, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "new_top_culprit" in out.stdout and "did:D" in out.stdout and "WARNING" in out.stdout
    out = subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.strip().splitlines()[0])
    assert Alert.model_validate(line).id == culprit[0].id


@pytest.mark.timeout(180)
def test_chorus_operator_command_serves_metrics_and_stops_on_sigterm(fresh_broker, port):
    from urllib.request import urlopen

    bootstrap = fresh_broker.bootstrap
    asyncio.run(ensure_topics(bootstrap))
    asyncio.run(produce(bootstrap, features(60, HOP1 + QUIET)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CHORUS_KAFKA_IDEMPOTENCE": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "operator", "--kafka", fresh_broker.url,
                             "--indicator", "volume", "--metrics-port", str(port), "--profile", "demo"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        got = asyncio.run(collect(bootstrap, TOPIC_ATTRIBUTIONS, AttributionSnapshot, lambda g: len(g) >= 1, timeout=90))
        assert got[0].indicator == "volume" and got[0].value == pytest.approx(7)
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'chorus_attribution_macro_value{indicator="volume",topic="t"} 7.0' in text
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "JAX device" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_did_whose_latest_record_is_a_window_old_is_expired():
    """Every contribution in a record stamped e lies before e, so at window end e + window the
    DID must have had a newer record; if its expiry was lost (a restarted worker cannot know what
    its predecessor published), the service expires it itself, and a newer record still wins."""
    svc = OperatorService(Settings(indicators=["volume"], window_s=120, hop_s=60), steps=8, panel_k=2)
    svc.apply_edge(GraphEdge(op="add", src="did:C", dst="did:z", time_us=0))
    for f in features(60, [("did:A", 3, [2, 0, 0.0, 0]), ("did:C", 1, [4, 0, 0.0, 0])]):
        svc.apply_features(f)
    assert svc.recompute()[0].value == pytest.approx(6)
    svc.apply_features(features(120, [("did:A", 3, [1, 0, 0.0, 0])])[0])
    assert svc.recompute()[0].value == pytest.approx(5)  # C (stamped 60) may still be in the window
    svc.apply_features(features(180, [("did:A", 3, [3, 0, 0.0, 0])])[0])
    (vol,) = svc.recompute()
    assert vol.value == pytest.approx(3) and vol.n_agents == 1  # C: 60 <= 180 - 120, expired
    assert svc.state.followers[svc.state.index["did:C"]] == 1  # followers kept for the bands
    svc.apply_features(features(180, [("did:C", 1, [1, 0, 0.0, 0])])[0])  # a late record of C
    assert svc.recompute()[0].value == pytest.approx(4)


def _heavy_polarization(svc, seed=7, n=400):
    rng = np.random.default_rng(seed)
    for i in range(n):
        posts = float(1 + rng.pareto(1.5)) if i % 4 else 0.0
        svc.apply_features(Features(did=f"did:{i}", window_end=60, followers=int(rng.pareto(1.2) * 10),
                                    topics={"t": [posts, 1.0, posts * float(rng.uniform(-1, 1)), 0.0]}))


def test_quadrature_ladder_meets_the_tolerance_at_least_cost_and_alerts_when_capped():
    settings = Settings(indicators=["polarization"])
    runs = {}
    for tol in (1e-1, 1e-5):
        svc = OperatorService(settings, tolerance=tol)
        _heavy_polarization(svc)
        (runs[tol],) = svc.recompute()
        e = runs[tol].error
        assert e["relative"] <= tol and e["tolerance"] == tol
        cheaper = [k for k in (3, 5, 9, 17, 33, 65) if k < e["steps"]]
        if cheaper and e["steps"] > 17:  # it climbed from the first rung (17): 17 did not meet it
            assert svc.last_quadrature[("t", "polarization")] == ("gauss-kronrod", e["steps"])
    assert runs[1e-5].error["steps"] > runs[1e-1].error["steps"]  # a tighter tolerance costs nodes
    assert runs[1e-1].value == pytest.approx(runs[1e-5].value, rel=1e-6)
    # capped at 5 nodes with a tolerance it cannot meet: published, and the alert says so
    svc = OperatorService(settings, steps=5, tolerance=1e-9)
    _heavy_polarization(svc)
    (snap,) = svc.recompute()
    assert snap.error["steps"] == 5 and snap.error["relative"] > 1e-9 and snap.error["agents_over"] > 0
    alerts = [a for a in svc.engine.evaluate(snap) if a.rule == "attribution_error"]
    assert alerts and alerts[0].evidence["steps"] == 5


def test_operator_settings_steps_panel_and_cascade_p():
    """The operator's parameters are settings (CHORUS_STEPS, CHORUS_PANEL_K, CHORUS_CASCADE_P,
    CHORUS_QUADRATURE_RULE); a keyword argument overrides one. Truth: R = 6 q(3) + 2 q(1) with
    q(x) = p (1 - e^-x) at the configured p."""
    s = Settings(indicators=["cascade_reach"], cascade_p=0.2, steps=9, panel_k=2, quadrature_rule="gauss-legendre")
    svc = OperatorService(s)
    assert (svc.steps, svc.panel_k, svc.rule) == (9, 2, "gauss-legendre")
    assert (OperatorService(s, steps=5).steps, OperatorService(Settings()).steps) == (5, 65)
    for e in edges():
        svc.apply_edge(e)
    for f in features(60, HOP1 + QUIET):
        svc.apply_features(f)
    (cas,) = svc.recompute()
    q2 = lambda x: 0.2 * (1 - math.exp(-x))  # noqa: E731
    assert cas.value == pytest.approx(6 * q2(3) + 2 * q2(1), rel=1e-5)
    assert cas.error["rule"] == "gauss-legendre" and cas.error["steps"] == 9

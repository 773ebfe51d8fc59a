"""`chorus run` serves one /metrics: families every stage exports (rejected records, Kafka
reachability) carry the samples of the in-process parts and of the worker subprocess together."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server

from stream.local.runner import OWNED_METRICS, SHARED_METRICS, ChildMetrics, CombinedCollector


def test_shared_families_merge_local_and_child_samples():
    child_reg, local_reg = CollectorRegistry(), CollectorRegistry()
    for reg, stage, topic in ((child_reg, "worker", "chorus.events"), (local_reg, "operator", "chorus.features")):
        Gauge("chorus_kafka_unavailable", "x", ["stage"], registry=reg).labels(stage=stage).set(1)
        Counter("chorus_records_rejected", "x", ["topic", "reason"], registry=reg).labels(topic, "type").inc(2)
    Gauge("chorus_window_agents", "x", ["topic"], registry=child_reg).labels(topic="t").set(5)
    Gauge("chorus_window_agents", "x", ["topic"], registry=local_reg).labels(topic="t").set(0)  # not the owner
    server, _ = start_http_server(0, addr="127.0.0.1", registry=child_reg)
    try:
        combined = CombinedCollector(local_reg)
        combined.children["worker"] = ChildMetrics(f"http://127.0.0.1:{server.server_port}/metrics",
                                                   OWNED_METRICS["worker"])
        out = CollectorRegistry(auto_describe=False)
        out.register(combined)
        text = generate_latest(out).decode()
    finally:
        server.shutdown()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert 'chorus_kafka_unavailable{stage="worker"} 1.0' in lines
    assert 'chorus_kafka_unavailable{stage="operator"} 1.0' in lines
    assert 'chorus_records_rejected_total{reason="type",topic="chorus.events"} 2.0' in lines
    assert 'chorus_records_rejected_total{reason="type",topic="chorus.features"} 2.0' in lines
    assert [ln for ln in lines if ln.startswith("chorus_window_agents")] == ['chorus_window_agents{topic="t"} 5.0']
    assert text.count("# TYPE chorus_kafka_unavailable gauge") == 1  # one family, not two


def test_a_shared_family_two_children_carry_is_one_family():
    """The worker and the operator as subprocesses both export chorus_consumer_lag{stage}: one
    family on the merged endpoint, with both stages' samples (the local registry has none of it)."""
    regs = {stage: CollectorRegistry() for stage in ("worker", "operator")}
    for stage, reg in regs.items():
        Gauge("chorus_consumer_lag", "x", ["stage", "partition"], registry=reg).labels(stage, "0").set(
            3 if stage == "worker" else 7)
    servers = {stage: start_http_server(0, addr="127.0.0.1", registry=reg)[0] for stage, reg in regs.items()}
    try:
        combined = CombinedCollector(CollectorRegistry())
        for stage, server in servers.items():
            combined.children[stage] = ChildMetrics(f"http://127.0.0.1:{server.server_port}/metrics",
                                                    OWNED_METRICS[stage] + SHARED_METRICS)
        out = CollectorRegistry(auto_describe=False)
        out.register(combined)
        text = generate_latest(out).decode()
    finally:
        for server in servers.values():
            server.shutdown()
    assert text.count("# TYPE chorus_consumer_lag gauge") == 1
    assert 'chorus_consumer_lag{partition="0",stage="worker"} 3.0' in text
    assert 'chorus_consumer_lag{partition="0",stage="operator"} 7.0' in text

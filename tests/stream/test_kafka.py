"""stream.kafka and stream.topics: every stage creates topics from one registry, and checks
existing ones at start (one line per mismatch with its fix, never a crash).

The embedded broker serves DescribeConfigs for the configs a topic was created with, so the
configs are checked on the broker itself."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import UnsupportedVersionError

from stream.config import Settings
from stream.kafka import ReadToEnd, check_topics, ensure_topics, make_consumer, make_producer, topic_config
from stream.schemas import TOPIC_ALERTS, TOPIC_ATTRIBUTIONS, TOPIC_DEAD_LETTER, TOPIC_EVENTS, TOPIC_FEATURES, \
    TOPIC_GRAPH, TOPIC_IDENTITIES
from stream.topics import registry, stage_topics

OPS = "chorus-worker-ops"
DEMO = Settings(profile="demo")  # 600 s window
N_EVENTS = registry(DEMO)[TOPIC_EVENTS].partitions  # the default partition count of chorus.events


def test_retention_per_topic():
    reg = registry(DEMO)
    ms = {name: s.retention_ms for name, s in reg.items()}
    assert ms == {TOPIC_EVENTS: 1_200_000, OPS: 1_200_000,  # two 600 s windows
                  TOPIC_FEATURES: 7 * 86_400_000,
                  TOPIC_GRAPH: -1,  # follows: keep them all
                  TOPIC_ATTRIBUTIONS: 7 * 86_400_000, TOPIC_ALERTS: 30 * 86_400_000,
                  TOPIC_DEAD_LETTER: 7 * 86_400_000, TOPIC_IDENTITIES: -1}
    # compaction would drop graph edges; identities keep the latest handle per DID
    assert {n: s.cleanup_policy for n, s in reg.items() if s.cleanup_policy != "delete"} == {TOPIC_IDENTITIES: "compact"}
    assert topic_config(TOPIC_EVENTS, 600) == topic_config(OPS, 600) == {"retention.ms": "1200000",
                                                                         "cleanup.policy": "delete"}
    assert topic_config(TOPIC_GRAPH) == {"retention.ms": "-1", "cleanup.policy": "delete"}
    # every stage takes its topics from the same registry
    for stage in ("ingest", "worker", "operator", "alerts", "backfill"):
        for s in stage_topics(stage, DEMO):
            assert s == reg[s.name]


async def describe(bootstrap, names):
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (resp,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
        return {r["resource_name"]: {e["config_names"]: e["config_value"] for e in r["config_entries"]}
                for r in resp.to_object()["resources"]}
    finally:
        await admin.close()


def test_topics_get_registry_settings_whoever_starts_first(fresh_broker):
    """The operator first (it used to create chorus.events with no retention), then the worker."""
    async def go():
        for stage in ("operator", "worker", "ingest"):
            await ensure_topics(fresh_broker.bootstrap, stage_topics(stage, DEMO))
            await ensure_topics(fresh_broker.bootstrap, stage_topics(stage, DEMO))  # idempotent
        consumer = make_consumer(fresh_broker.bootstrap)
        await consumer.start()
        try:
            await consumer.topics()
            parts = {t: len(consumer.partitions_for_topic(t) or ()) for t in registry(DEMO)}
        finally:
            await consumer.stop()
        configs = await describe(fresh_broker.bootstrap, list(registry(DEMO)))
        found = await check_topics(fresh_broker.bootstrap, stage_topics("run", DEMO))
        return parts, configs, found

    parts, configs, found = asyncio.run(go())
    reg = registry(DEMO)
    assert parts == {n: s.partitions for n, s in reg.items()}
    assert configs == {n: s.configs() for n, s in reg.items()}
    assert found.problems == [] and found.notes == []


def test_premade_topics_with_other_settings_are_reported_with_the_fix(fresh_broker, caplog):
    async def go():
        admin = AIOKafkaAdminClient(bootstrap_servers=fresh_broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(OPS, 1, 1),  # no configs: the broker default applies
                                       NewTopic(TOPIC_EVENTS, N_EVENTS, 1, topic_configs={"retention.ms": "172800000"}),
                                       NewTopic(TOPIC_GRAPH, 4, 1, topic_configs={"retention.ms": "-1",
                                                                                  "cleanup.policy": "compact"})])
        finally:
            await admin.close()
        return await check_topics(fresh_broker.bootstrap, stage_topics("worker", DEMO), "worker")

    with caplog.at_level(logging.WARNING, logger="chorus.kafka"):
        found = asyncio.run(go())
    host = fresh_broker.bootstrap
    assert found.partitions[OPS] == 1
    assert len(found.problems) == 4, found.problems
    lines = "\n".join(found.problems)
    assert (f"worker: topic {OPS} has 1 partition(s), chorus creates {N_EVENTS}; chorus adapts to 1; to change it: "
            f"kafka-topics.sh --bootstrap-server {host} --alter --topic {OPS} --partitions {N_EVENTS}") in lines
    assert (f"worker: topic {TOPIC_EVENTS}: retention.ms is 172800000 (2 d), chorus wants 1200000 (20 min: "
            "the worker replays it on every assignment); fix: kafka-configs.sh --bootstrap-server "
            f"{host} --alter --entity-type topics --entity-name {TOPIC_EVENTS} --add-config retention.ms=1200000"
            ) in lines
    assert f"topic {OPS}: retention.ms is not set (the broker default applies)" in lines
    assert f"topic {TOPIC_GRAPH}: cleanup.policy is compact, chorus wants delete" in lines
    assert [r.getMessage() for r in caplog.records if r.name == "chorus.kafka"] == found.problems


def test_a_broker_without_describe_configs_degrades_to_a_note(fresh_broker, monkeypatch):
    async def unsupported(self, *a, **kw):
        raise UnsupportedVersionError()

    monkeypatch.setattr(AIOKafkaAdminClient, "describe_configs", unsupported)
    specs = stage_topics("operator", DEMO)

    async def go():
        await ensure_topics(fresh_broker.bootstrap, specs)
        return await check_topics(fresh_broker.bootstrap, specs, "operator")

    found = asyncio.run(go())
    assert found.problems == [] and found.partitions == {s.name: s.partitions for s in specs}
    assert len(found.notes) == 1 and "retention and cleanup policy not checked" in found.notes[0]


@pytest.mark.parametrize("ms,text", [(-1, "forever"), (172_800_000, "2 d"), (1_200_000, "20 min"), (1500, "1500 ms")])
def test_describe_ms(ms, text):
    from stream.topics import describe_ms

    assert describe_ms(ms) == text


def test_read_to_end_stops_at_the_end_offsets_of_open(broker):
    """Records published after open() are not read; empty partitions are done at once."""
    from aiokafka import TopicPartition

    topic = f"test-read-to-end-{uuid.uuid4().hex[:8]}"

    async def go():
        await ensure_topics(broker.bootstrap, {topic: 3})
        producer = make_producer(broker.bootstrap, idempotence=False)
        await producer.start()
        consumer = make_consumer(broker.bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            for i in range(7):
                await producer.send_and_wait(topic, str(i).encode(), partition=i % 2)  # partition 2 stays empty
            tps = [TopicPartition(topic, p) for p in range(3)]
            reader = await ReadToEnd.open(consumer, tps)
            assert reader.ends == {tps[0]: 4, tps[1]: 3, tps[2]: 0}
            assert reader.pending == {tps[0], tps[1]}
            for i in range(7, 10):
                await producer.send_and_wait(topic, str(i).encode(), partition=i % 2)
            got = {0: [], 1: []}
            while reader.pending:
                for tp, records in (await reader.fetch(timeout_ms=200, max_records=2)).items():
                    got[tp.partition] += [int(r.value) for r in records]
            return got
        finally:
            await consumer.stop()
            await producer.stop()

    assert asyncio.run(go()) == {0: [0, 2, 4, 6], 1: [1, 3, 5]}

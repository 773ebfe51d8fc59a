"""The operator restarts from its snapshot (issue 17): the state it wrote (graph, followers,
features, offsets) is adopted, only records after the snapshot's offsets are read, and the next
hop equals the one an uninterrupted operator computes."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from operators.service.service import OperatorService
from operators.service.state import OperatorState
from stream.config import Settings
from stream.kafka import ensure_topics
from stream.schemas import TOPIC_ATTRIBUTIONS, AttributionSnapshot, GraphEdge
from tests.operators.service.test_service import HOP1, QUIET, check_hop1, collect, complete, edges, features, last, \
    produce

pytestmark = pytest.mark.timeout(240)


def same_state(a: OperatorState, b: OperatorState) -> None:
    n = a.n_rows
    assert a.dids == b.dids and a.topics == b.topics and a.n_edges == b.n_edges
    np.testing.assert_array_equal(a.followers[:n], b.followers[:n])
    for x, y in zip(a.edges(), b.edges()):
        np.testing.assert_array_equal(x, y)
    for t in a.topics:
        np.testing.assert_array_equal(a.host_features(t)[:n], b.host_features(t)[:n])


def test_state_round_trip_through_arrays():
    st = OperatorState()
    for e in edges():
        st.apply_edge(e)
    st.apply_edge(GraphEdge.model_construct(op="add", src="did:B", dst="did:h", time_us=9,
                                            uri="at://did:h/app.bsky.graph.follow/1"))
    for f in features(60, HOP1 + QUIET):
        st.apply_features(f)
    back = OperatorState.from_arrays({k: v.copy() for k, v in st.to_arrays().items()})
    same_state(st, back)
    # the record index came along: a record-only remove still resolves
    rm = GraphEdge.model_construct(op="remove", src=None, dst="did:h", time_us=10,
                                   uri="at://did:h/app.bsky.graph.follow/1")
    assert back.apply_edge(rm) and st.apply_edge(rm)
    same_state(st, back)


def test_operator_restarts_from_its_snapshot_and_reads_only_what_follows(fresh_broker, tmp_path):
    bootstrap = fresh_broker.bootstrap
    s = Settings(kafka=fresh_broker.url, kafka_idempotence=False, indicators=["volume", "cascade_reach"],
                 hop_s=10, window_s=60, state_dir=tmp_path, operator_snapshot_interval_s=0.01)

    async def scenario():
        await ensure_topics(bootstrap)
        await produce(bootstrap, edges() + features(60, HOP1 + QUIET))
        first = OperatorService(s, steps=16, panel_k=2)
        task = asyncio.create_task(first.run())
        hop1 = await collect(bootstrap, TOPIC_ATTRIBUTIONS, AttributionSnapshot, complete(60, 1, 7), timeout=120, task=task)
        deadline = time.monotonic() + 30
        while first.snapshot_time is None:
            assert time.monotonic() < deadline, "no snapshot written"
            await asyncio.sleep(0.1)
        await first.stop()
        await asyncio.wait_for(task, 30)

        second = OperatorService(s, steps=16, panel_k=2)
        ingested = []
        apply = second.apply_features
        second.apply_features = lambda f: (ingested.append(f.did), apply(f))[1]
        task = asyncio.create_task(second.run())
        more = features(120, HOP1[:2] + [("did:D", 1, [10, 0, 0, 0])], expired=["did:C"])
        await produce(bootstrap, more)
        hop2 = await collect(bootstrap, TOPIC_ATTRIBUTIONS, AttributionSnapshot, complete(120, 1, 13), task=task)
        await second.stop()
        await asyncio.wait_for(task, 30)
        return first, second, hop1, hop2, ingested, more

    first, second, hop1, hop2, ingested, more = asyncio.run(scenario())
    check_hop1([last(hop1, 60, "volume"), last(hop1, 60, "cascade_reach")])
    assert second.restored_from is not None
    assert sorted(ingested) == sorted(f.did for f in more)  # nothing before the snapshot was re-read
    assert last(hop2, 120, "volume").value == pytest.approx(13)
    # an uninterrupted operator fed the same records computes the same hop
    ref = OperatorService(Settings(indicators=["volume", "cascade_reach"], hop_s=10, window_s=60), steps=16, panel_k=2)
    for e in edges():
        ref.apply_edge(e)
    for f in features(60, HOP1 + QUIET) + more:
        ref.apply_features(f)
    want = {x.indicator: x for x in ref.recompute()}
    for ind in ("volume", "cascade_reach"):
        got = last(hop2, 120, ind)
        assert got.value == pytest.approx(want[ind].value, rel=1e-6)
        assert got.bands == pytest.approx(want[ind].bands, abs=1e-6)

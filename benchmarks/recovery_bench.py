"""Recovery benchmark: how long the worker and the operator take to get their state back.

``run(quick) -> str`` returns a Markdown section for BENCHMARKS.md. Standalone:
``python -m benchmarks.recovery_bench [--quick]``.

Worker (after SIGKILL, or a rebalance that keeps its partitions): recovery = read the newest
checkpoint (``CheckpointDir.read``: every array and its CRC) + ``WindowStore.from_arrays`` + replay
the events that came after it (at most one checkpoint interval plus the downtime, never the
retained history). Measured at two held-state sizes (the state_bench stream, 6 h / 60 s window);
the replay rate is ``Pipeline.on_event`` (JSON parse, validation, classification, both stages)
on the same stream. A takeover (another worker left) reads two workers' checkpoints and merges
them (``WindowStore.absorb``), measured on the same state cut in two. The end-to-end check that a
restart or takeover replays only what followed the checkpoints, whatever the history, is
tests/stream/worker/test_worker_restore.py.

Operator: a follow graph of the live network's shape (benchmarks/graphgen.py, 10 edges per
account) and 4 topics of features loaded into ``OperatorState``; the snapshot is written
(``OperatorService.write_snapshot``'s path: ``to_arrays`` + ``CheckpointDir.write``) and read
back (``read`` + ``from_arrays``). Reference, in the same process: rebuilding the graph the way
it was rebuilt before snapshots (every chorus.graph JSON record through ``GraphEdge.from_bytes``
and ``OperatorState.apply_edge``), on a sample, as a rate. Both are extrapolated linearly to 100 M
edges (the measured sizes are stated).
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import header

WINDOW_EVENTS = 43_200_000  # 6 h at 2,000 events/s
TARGET_S = 120
EDGES_TARGET = 100_000_000


PARTITIONS = 16  # chorus.events and ops partitions of the takeover measurement (the registry default)


def _part(did: str) -> int:
    from zlib import crc32

    return crc32(did.encode()) % PARTITIONS


def _worker_state(n: int):
    """A store after ``n`` firehose events, each registry entry with its chorus.events partition
    (the author's, as ``_part``), as the worker's ``WindowStore.process`` with partitions."""
    from benchmarks.state_bench import _classify, firehose
    from stream.worker.windows import WindowStore

    store = WindowStore(6 * 3600, 60, _classify)
    for ev in firehose(n):
        store.advance(ev["time_us"])
        store.apply_local(store.ingest(ev, _part(ev["did"]))[0])
    return store


def _takeover(arrays: dict, tmp: str) -> float:
    """Seconds a worker taking over from another needs to get the state back: the state cut into
    two workers' checkpoints (half of the partitions each: ``WindowStore.retain``), both read
    (every array, CRC-checked), rebuilt and merged (``WindowStore.absorb``), as
    ``Pipeline.load_merged`` does after ``CheckpointDir.covering``."""
    from benchmarks.state_bench import _classify
    from stream.worker.checkpoint import CheckpointDir
    from stream.worker.windows import WindowStore

    d = CheckpointDir(Path(tmp) / "takeover", keep=1)
    paths = []
    for k in range(2):
        mine = set(range(k * PARTITIONS // 2, (k + 1) * PARTITIONS // 2))
        half = WindowStore.from_arrays({a: v.copy() for a, v in arrays.items()}, _classify)
        half.retain(mine, lambda did, mine=mine: _part(did) in mine)
        paths.append(d.write(half.to_arrays(), {"k": k}, tag=f"w{k}"))
        del half
    gc.collect()
    t0 = time.perf_counter()
    merged = None
    for path in paths:
        _, arrays = d.read(path)
        part = WindowStore.from_arrays(arrays, _classify)
        if merged is None:
            merged = part
        else:
            merged.absorb(part)
    return time.perf_counter() - t0


def worker_load(n: int) -> dict:
    from benchmarks.state_bench import _classify
    from stream.worker.checkpoint import CheckpointDir
    from stream.worker.windows import WindowStore

    store = _worker_state(n)
    held = store.held_events()
    with tempfile.TemporaryDirectory() as tmp:
        d = CheckpointDir(tmp)
        t0 = time.perf_counter()
        path = d.write(store.to_arrays(), {"n": n})
        write_s = time.perf_counter() - t0
        size = path.stat().st_size
        del store
        gc.collect()
        t0 = time.perf_counter()
        _, _, arrays = d.latest()
        WindowStore.from_arrays(arrays, _classify)
        load_s = time.perf_counter() - t0
        takeover_s = _takeover(arrays, tmp)
    return {"events": n, "held": held, "bytes": size, "write_s": write_s, "load_s": load_s, "takeover_s": takeover_s}


def replay_rate(n: int) -> float:
    """Events/s of Pipeline.on_event (the replay path) on the state_bench stream."""
    import json

    from benchmarks.state_bench import firehose
    from stream.config import Settings
    from stream.worker.faust_app import Pipeline

    values = [json.dumps(e).encode() for e in firehose(n)]
    pipe = Pipeline(Settings(window_s=6 * 3600, hop_s=60), 4)
    t0 = time.process_time()
    for i, v in enumerate(values):
        pipe.on_event(v, {0, 1, 2, 3}, i % 4, i)
        if pipe.buffered > 10_000:
            pipe.drain()
    return n / (time.process_time() - t0)


def operator_load(n_edges: int) -> dict:
    from benchmarks.graphgen import follow_graph
    from operators.service.state import OperatorState
    from stream.worker.checkpoint import CheckpointDir

    n = n_edges // 10
    src, dst, followers = follow_graph(n, 10.0, seed=1)
    rng = np.random.default_rng(0)
    feats = {f"t{i}": rng.random((n, 4), dtype=np.float32) for i in range(4)}
    st = OperatorState()
    st.load([f"did:plc:{i:024x}" for i in range(n)], followers, feats, 60, src, dst)
    edges = st.n_edges
    with tempfile.TemporaryDirectory() as tmp:
        d = CheckpointDir(tmp)
        t0 = time.perf_counter()
        path = d.write(st.to_arrays(), {"offsets": {}})
        write_s = time.perf_counter() - t0
        size = path.stat().st_size
        del st, feats, src, dst
        gc.collect()
        t0 = time.perf_counter()
        _, _, arrays = d.latest()
        back = OperatorState.from_arrays(arrays)
        load_s = time.perf_counter() - t0
        assert back.n_edges == edges
    return {"edges": edges, "agents": n, "bytes": size, "write_s": write_s, "load_s": load_s}


def json_rebuild_rate(n_records: int) -> float:
    """Records/s of the pre-snapshot restart path: chorus.graph JSON -> GraphEdge -> apply_edge."""
    from benchmarks.graphgen import follow_graph
    from operators.service.state import OperatorState
    from stream.schemas import GraphEdge, dumps

    src, dst, _ = follow_graph(max(1000, n_records // 10), 10.0, seed=2)
    src, dst = src[:n_records], dst[:n_records]
    values = [dumps({"op": "add", "src": f"did:plc:{s:024x}", "dst": f"did:plc:{d:024x}", "time_us": i,
                     "uri": f"at://did:plc:{d:024x}/app.bsky.graph.follow/{i:013x}"})
              for i, (s, d) in enumerate(zip(src.tolist(), dst.tolist()))]
    st = OperatorState()
    t0 = time.perf_counter()
    for v in values:
        st.apply_edge(GraphEdge.from_bytes(v))
    return len(values) / (time.perf_counter() - t0)


def run(quick: bool = False) -> str:
    sizes = (100_000, 400_000) if quick else (500_000, 2_000_000)
    edge_sizes = (1_000_000, 4_000_000) if quick else (4_000_000, 16_000_000)
    worker = [worker_load(n) for n in sizes]
    rate = replay_rate(20_000 if quick else 100_000)
    ops = [operator_load(e) for e in edge_sizes]
    ref_rate = json_rebuild_rate(50_000 if quick else 200_000)

    big = worker[-1]
    load_per_event = big["load_s"] / big["held"]
    backlog = 60 * 2000  # one checkpoint interval (60 s) at 2,000 events/s
    full_load = load_per_event * WINDOW_EVENTS
    full_worker = full_load + backlog / rate
    ob = ops[-1]
    op_full = ob["load_s"] / ob["edges"] * EDGES_TARGET
    ok = lambda s: "yes" if s <= TARGET_S else "**no**"  # noqa: E731
    lines = [
        "## Recovery: worker checkpoint and operator snapshot",
        "",
        header(),
        f"Target: a worker holding a full 6 h window at 2,000 events/s ({WINDOW_EVENTS / 1e6:.1f} M events) and an "
        f"operator holding 100 M edges each back within {TARGET_S} s of a restart (issue 17). "
        f"{'(quick run) ' if quick else ''}Load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.",
        "",
        "Worker: read the checkpoint (all arrays, CRC-checked) and rebuild the store:",
        "",
        "| events held | checkpoint file | write | read + rebuild | per held event | takeover: two checkpoints merged |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for w in worker:
        lines.append(f"| {w['held']:,} | {w['bytes'] / 2**20:,.0f} MiB | {w['write_s']:.2f} s | {w['load_s']:.2f} s | "
                     f"{w['load_s'] / w['held'] * 1e6:.2f} us | {w['takeover_s']:.2f} s |")
    lines += [
        "",
        f"Replay after the checkpoint (`Pipeline.on_event`, JSON + validation + classification + both stages, "
        f"CPU): **{rate:,.0f} events/s**. A restart replays the events after the checkpoint only (one interval, "
        f"`CHORUS_CHECKPOINT_INTERVAL_S` = 60 s, plus the downtime), whatever the retained history.",
        "",
        f"Extrapolation to a full window: {load_per_event * 1e6:.2f} us x {WINDOW_EVENTS / 1e6:.1f} M = {full_load:.0f} s "
        f"to load + {backlog:,} events (60 s at 2,000/s) / {rate:,.0f} per s = {backlog / rate:.0f} s of replay: "
        f"**{full_worker:.0f} s** (target {TARGET_S} s: {ok(full_worker)}). Downtime adds its own backlog at "
        f"{2000 / rate:.2f} s of replay per second down.",
        "",
        f"Takeover (a worker leaves, another takes over its partitions from its checkpoint, sharing the directory): "
        f"the state cut into two workers' checkpoints of {PARTITIONS // 2} of {PARTITIONS} partitions each, both read, "
        f"rebuilt and merged (`WindowStore.absorb`: the second one's DIDs re-interned): "
        f"{big['takeover_s'] / big['held'] * 1e6:.2f} us per held event, so "
        f"**{big['takeover_s'] / big['held'] * WINDOW_EVENTS + backlog / rate:.0f} s** with the replay above for a full "
        f"window (target {TARGET_S} s: {ok(big['takeover_s'] / big['held'] * WINDOW_EVENTS + backlog / rate)}); "
        f"the group's session timeout (10 s) comes first.",
        "",
        "Operator: snapshot write and read + rebuild (`OperatorState.to_arrays` / `from_arrays`), 4 topics of features:",
        "",
        "| edges | agents | snapshot file | write | read + rebuild | extrapolated to 100 M edges |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for o in ops:
        lines.append(f"| {o['edges']:,} | {o['agents']:,} | {o['bytes'] / 2**20:,.0f} MiB | {o['write_s']:.1f} s | "
                     f"{o['load_s']:.1f} s | {o['load_s'] / o['edges'] * EDGES_TARGET:.0f} s |")
    lines += [
        "",
        f"At 100 M edges (extrapolated linearly from {ob['edges'] / 1e6:.0f} M): **{op_full:.0f} s** "
        f"(target {TARGET_S} s: {ok(op_full)}). Reference, the restart path before snapshots (every chorus.graph "
        f"record parsed and applied, measured on a sample): {ref_rate:,.0f} records/s, so 100 M edges take "
        f"{EDGES_TARGET / ref_rate / 60:,.0f} min: **{EDGES_TARGET / ref_rate / op_full:.0f}x** the snapshot.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))

"""Backfill benchmark: repositories/s and edges/s from a loopback relay, and the graph's memory.

``run(quick) -> str`` returns the BENCHMARKS.md section. Standalone: ``python -m
benchmarks.backfill_bench [--quick]``.

Throughput: N synthetic repositories of exactly 50 follow records each (real getRepo CAR files
built with stream/sim/frames.py, DID documents with the handle) are built and served, precomputed,
by an aiohttp server in a separate process (listRepos, getRepo, a PLC directory: per-DID documents
and the paged ``/export``), so the figures are the backfill's own. The backfill (``stream.backfill.service.Backfill``) runs in this process
against the embedded Tansu broker; measured: wall time, this process's CPU time (the backfill on
one core: its event loop is one thread), repos/s and edges/s, without DID resolution (``--pds``),
with one PLC request per DID (``--no-plc-export``) and from the PLC export (the relay default; the
export's reading, into a fresh mirror, is inside the measured time). In the same process, references: the CAR reading alone (``read_follows`` on the same
CARs) and HTTP GETs alone (the same fetcher, no Kafka).

Graph memory: an ``OperatorState`` fed M backfill-style adds (``apply_edge``: edge set, record URI
index, in-degree) and compacted; bytes per edge from the arrays' sizes, extrapolated linearly to
100M edges (the structures are flat arrays, so bytes/edge does not depend on M), plus the rate of
``apply_edge`` (the operator's cost to take in the backfill).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

FOLLOWS = 50
TARGET_REPOS_S = 1_000
TARGET_EDGES_S = 50_000
REPEATS = 3  # runs of each backfill mode, interleaved; the best is reported (the machine is shared)


def _did(i: int) -> str:
    return "did:plc:" + f"bench{i:019d}"[-24:].replace("0", "a").replace("1", "b").replace("8", "c").replace("9", "d")


def _build(n: int) -> tuple[list[str], dict[str, bytes]]:
    import random

    from stream.sim import frames as frame_codec

    rng = random.Random(1)
    dids = [_did(i) for i in range(n)]
    t0 = 1_735_689_600_000_000
    cars = {}
    for i, did in enumerate(dids):
        subjects = rng.sample(range(n), FOLLOWS + 1)
        records = [(f"{frame_codec.FOLLOW}/{frame_codec.tid(t0 + 1000 * k, k)}", frame_codec.follow_record(dids[s], t0))
                   for k, s in enumerate(x for x in subjects if x != i)][:FOLLOWS]
        records.append(("app.bsky.actor.profile/self", {"$type": "app.bsky.actor.profile", "displayName": did}))
        cars[did] = frame_codec.repo_car(did, frame_codec.tid(t0 + 10**9, i & 0x3FF), records)
    return dids, cars


def _serve(n: int, conn) -> None:
    """The loopback server (a separate process): prebuilt CARs, listRepos, PLC documents."""
    from aiohttp import web

    from stream.sim.repos import plc_export_entry

    dids, cars = _build(n)
    export_log: list[str] = []  # the PLC directory's log: one genesis operation per DID

    async def main():
        port = {}

        async def list_repos(request):
            start = int(request.query.get("cursor", 0))
            end = min(start + int(request.query.get("limit", 1000)), len(dids))
            body = {"repos": [{"did": d, "head": "bafy", "rev": "2222222222222", "active": True} for d in dids[start:end]]}
            if end < len(dids):
                body["cursor"] = str(end)
            return web.json_response(body)

        async def get_repo(request):
            return web.Response(body=cars[request.query["did"]], content_type="application/vnd.ipld.car")

        async def export(request):
            start, count = int(request.query.get("after", 0)), int(request.query.get("count", 10))
            page = export_log[start:start + count]
            return web.Response(text="\n".join(page) + ("\n" if page else ""), content_type="application/jsonlines")

        async def plc(request):
            did = request.match_info["did"]
            return web.json_response({"id": did, "alsoKnownAs": [f"at://{did[8:]}.bsky.social"],
                                      "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                                                   "serviceEndpoint": f"http://127.0.0.1:{port['p']}"}]})

        app = web.Application()
        app.router.add_get("/xrpc/com.atproto.sync.listRepos", list_repos)
        app.router.add_get("/xrpc/com.atproto.sync.getRepo", get_repo)
        app.router.add_get("/plc/export", export)
        app.router.add_get("/plc/{did}", plc)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port["p"] = site._server.sockets[0].getsockname()[1]
        export_log.extend(json.dumps(plc_export_entry(d, k + 1, f"http://127.0.0.1:{port['p']}", f"{d[8:]}.bsky.social"),
                                     separators=(",", ":")) for k, d in enumerate(dids))
        conn.send(f"http://127.0.0.1:{port['p']}")
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await runner.cleanup()

    asyncio.run(main())


def _backfill(url: str, bootstrap: str, resolve: bool, concurrency: int = 64, plc_export: bool = False) -> dict:
    from stream.backfill.fetch import Limits
    from stream.backfill.service import Backfill, Options

    state = Path(tempfile.mkdtemp(prefix="chorus-bench-backfill-"))
    try:
        opts = Options(relay=url if resolve else None, pds=None if resolve else url, plc=f"{url}/plc",
                       allow_nets=["127.0.0.0/8"], progress=False, plc_export=plc_export,
                       limits=Limits(concurrency=concurrency, per_host=concurrency))
        bf = Backfill(bootstrap, state, opts, idempotence=False)
        wall, cpu = time.perf_counter(), time.process_time()
        asyncio.run(bf.run())
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        mirror = sum(f.stat().st_size for f in state.glob("plc-export-*.sqlite*"))
    finally:
        shutil.rmtree(state, ignore_errors=True)
    repos, edges = bf.state.counts.get("done", 0), bf.state.edges
    assert bf.state.counts == {"done": repos} and repos == bf.listed, bf.state.counts  # every repository done
    ex = bf.export
    return {"export_pages": ex.pages if ex else 0, "export_ops_cpu_s": (ex.applied / ex.cpu_s) if ex else 0,
            "mirror_bytes_per_did": mirror / max(ex.applied, 1) if ex else 0, "repos": repos, "edges": edges, "wall_s": wall, "cpu_s": cpu, "repos_s": repos / wall,
            "edges_s": edges / wall, "repos_cpu_s": repos / cpu, "edges_cpu_s": edges / cpu}


def _read_only(cars: dict[str, bytes]) -> dict:
    from stream.backfill.car import read_follows

    cpu = time.process_time()
    edges = sum(len(read_follows(car, did).follows) for did, car in cars.items())
    cpu = time.process_time() - cpu
    return {"repos_cpu_s": len(cars) / cpu, "edges_cpu_s": edges / cpu}


def _fetch_only(url: str, dids: list[str]) -> dict:
    from stream.backfill.fetch import Fetcher, Limits, parse_networks

    async def main():
        async with Fetcher(Limits(concurrency=64, per_host=64), parse_networks(["127.0.0.0/8"])) as f:
            sem = asyncio.Semaphore(64)

            async def one(did):
                async with sem:
                    r = await f.get(f"{url}/xrpc/com.atproto.sync.getRepo", {"did": did})
                    assert r.status == 200

            await asyncio.gather(*(one(d) for d in dids))

    wall, cpu = time.perf_counter(), time.process_time()
    asyncio.run(main())
    return {"repos_s": len(dids) / (time.perf_counter() - wall), "repos_cpu_s": len(dids) / (time.process_time() - cpu)}


def _graph_memory(m: int) -> dict:
    """An OperatorState fed m backfill adds (50 per follower), compacted: bytes per edge."""
    import numpy as np

    from operators.service.state import OperatorState
    from stream.schemas import GraphEdge, graph_value
    from stream.sim.frames import tid

    st = OperatorState()
    n = max(m // FOLLOWS, 2)
    rng = np.random.default_rng(0)
    dids = [_did(i) for i in range(n)]
    rev = tid(1_735_689_600_000_000)
    t = time.process_time()
    k = 0
    for f in range(n):
        for s in rng.choice(n, FOLLOWS, replace=False):
            if s == f:
                continue
            st.apply_edge(GraphEdge.model_construct(op="add", src=dids[s], dst=dids[f], time_us=1, uri=f"at://{dids[f]}/app.bsky.graph.follow/{k}", rev=rev))
            k += 1
    cpu = time.process_time() - t
    st._edges.compact()
    st._records.compact()
    edges = st.n_edges
    graph = st.graph_nbytes
    per_edge = graph / edges
    rows = st.n_rows
    node = st.followers.nbytes / max(rows, 1)
    return {"edges": edges, "bytes_per_edge": per_edge, "apply_per_s": k / cpu, "rows": rows,
            "bytes_per_row": node, "at_100m_gb": (per_edge * 1e8) / 2**30}


def run(quick: bool = False) -> str:
    from benchmarks import header
    from stream.local.broker import EmbeddedBroker

    n = 1000 if quick else 5000
    reps = 1 if quick else REPEATS
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(n, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(600):
            raise RuntimeError("server process did not start")
        url = parent.recv()
        from stream.process import install

        install()  # uvloop, as `chorus` runs
        with EmbeddedBroker() as broker:
            runs: dict[str, list[dict]] = {"pds": [], "plc": [], "bulk": []}
            for _ in range(reps):  # interleaved: a burst of load on the shared machine hits every mode
                runs["pds"].append(_backfill(url, broker.bootstrap, resolve=False))
                runs["plc"].append(_backfill(url, broker.bootstrap, resolve=True))
                runs["bulk"].append(_backfill(url, broker.bootstrap, resolve=True, plc_export=True))
            pds, plc, bulk = (max(runs[k], key=lambda r: r["repos_cpu_s"]) for k in ("pds", "plc", "bulk"))
        dids, cars = _build(min(n, 2000))
        read = _read_only(cars)
        fetch = _fetch_only(url, dids)
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    mem = _graph_memory(200_000 if quick else 1_000_000)

    all_runs = "; ".join(name + " " + ", ".join(f"{r['repos_cpu_s']:,.0f}" for r in runs[k]) for k, name in
                         (("pds", "`--pds`"), ("bulk", "PLC export"), ("plc", "a PLC request per repo")))

    def ok(v, target):
        return "yes" if v >= target else "**no**"

    return "\n".join([
        "## Backfill (repositories -> chorus.graph)",
        "",
        header(),
        f"{n:,} synthetic repositories of {FOLLOWS} follow records each (+ a profile), real getRepo CAR files, "
        "served precomputed by an aiohttp server in another process on loopback; the backfill in this process "
        f"(concurrency 64, uvloop) into the embedded Tansu broker (acks=all; values encoded from a per-repository "
        "template and appended to one aiokafka batch per partition shared by the repositories in flight, handed "
        "over whole with send_batch). "
        f"Python {platform.python_version()}. `per CPU-s` = this process's CPU time: the backfill's rate on one "
        "core when it is not waiting on the server or the broker. "
        f"Each backfill mode ran {reps} time(s), interleaved; the table gives each mode's run with the most repos "
        "per CPU-s (other processes on the shared machine inflate a run's CPU time), all runs: "
        + all_runs + " repos per CPU-s.",
        "",
        "| measure | repos/s (wall) | edges/s (wall) | repos per CPU-s | edges per CPU-s | target (one core) | met |",
        "|---|---:|---:|---:|---:|---:|:-:|",
        f"| `--pds` (no DID resolution) | {pds['repos_s']:,.0f} | {pds['edges_s']:,.0f} | {pds['repos_cpu_s']:,.0f} | "
        f"{pds['edges_cpu_s']:,.0f} | {TARGET_REPOS_S:,} repos, {TARGET_EDGES_S:,} edges | "
        f"{ok(pds['repos_cpu_s'], TARGET_REPOS_S)} |",
        f"| `--relay` + PLC export (the default: the directory's log read once, {bulk['export_pages']:,} page(s) of 1,000) | "
        f"{bulk['repos_s']:,.0f} | {bulk['edges_s']:,.0f} | {bulk['repos_cpu_s']:,.0f} | {bulk['edges_cpu_s']:,.0f} | "
        f"{TARGET_REPOS_S:,} repos, {TARGET_EDGES_S:,} edges | {ok(bulk['repos_cpu_s'], TARGET_REPOS_S)} |",
        f"| `--relay --no-plc-export` (a PLC request per repo) | {plc['repos_s']:,.0f} | {plc['edges_s']:,.0f} | "
        f"{plc['repos_cpu_s']:,.0f} | {plc['edges_cpu_s']:,.0f} | | |",
        f"| reference: CAR reading only (`read_follows`) | | | {read['repos_cpu_s']:,.0f} | {read['edges_cpu_s']:,.0f} | | |",
        f"| reference: getRepo GETs only (the same fetcher, no parsing, no Kafka) | {fetch['repos_s']:,.0f} | | "
        f"{fetch['repos_cpu_s']:,.0f} | | | |",
        "",
        f"Ratios (same run, per CPU-s): PLC export / `--pds` = {bulk['repos_cpu_s'] / pds['repos_cpu_s']:.2f}, "
        f"a PLC request per repo / `--pds` = {plc['repos_cpu_s'] / pds['repos_cpu_s']:.2f}, PLC export / a PLC request "
        f"per repo = {bulk['repos_cpu_s'] / plc['repos_cpu_s']:.2f}; "
        f"CAR reading is {pds['repos_cpu_s'] / read['repos_cpu_s']:.0%} and the GETs alone "
        f"{pds['repos_cpu_s'] / fetch['repos_cpu_s']:.0%} of the whole per-repo CPU cost's inverse "
        "(i.e. the share of the per-repository CPU time they take); the rest, "
        f"{max(0.0, 1 - pds['repos_cpu_s'] / read['repos_cpu_s'] - pds['repos_cpu_s'] / fetch['repos_cpu_s']):.0%}, "
        "is publishing to Kafka (encoding, batches, the producer's requests and acknowledgements), the event loop "
        "and the backfill's bookkeeping. "
        + ("With DID resolution (the PLC export) the target is " + ("met" if bulk['repos_cpu_s'] >= TARGET_REPOS_S
           else "**missed**") + ": the export costs one request per 1,000 DIDs and a SQLite lookup per repository "
           "instead of a request and a DID document per repository (the export's reading, into a fresh mirror, is "
           "inside the measured time; on the real directory it is one pass over its whole log, docs/deploy.md). "
           f"The export alone: {bulk['export_ops_cpu_s']:,.0f} operations per CPU-s (GET, JSON, checks, SQLite), "
           f"the mirror {bulk['mirror_bytes_per_did']:.0f} bytes per DID on disk. ")
        + f"Load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end (wall figures suffer on a "
        "shared machine).",
        "",
        "**Graph memory in the operator.** "
        f"{mem['edges']:,} edges applied as backfill adds ({mem['apply_per_s']:,.0f} `apply_edge`/s on one core), "
        f"compacted: edge set (key, order, presence: 17 B) + record URI index (hash, edge: 16 B) = "
        f"{mem['bytes_per_edge']:.1f} bytes per edge, plus {mem['bytes_per_row']:.0f} bytes per account "
        f"(follower count). **Extrapolated** linearly (flat arrays) to 100M edges: "
        f"{mem['at_100m_gb']:.1f} GiB of host memory for the edge set and index, not measured at that size; the "
        "device-side FollowGraph and the per-topic features come on top (operator section).",
        "",
    ])


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(run(quick="--quick" in sys.argv))

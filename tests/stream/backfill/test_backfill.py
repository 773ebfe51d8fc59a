"""`chorus backfill` against the synthetic world (loopback sync endpoints, real CAR files, the
embedded broker): exact graphs, reconciliation with the live stream, resumption after SIGKILL,
hostile and faulty hosts, one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from operators.service.state import OperatorState
from tests.helpers.synth_truth import expected_events
from stream.backfill.fetch import Limits
from stream.backfill.service import Backfill, Options
from stream.kafka import make_consumer
from stream.schemas import TOPIC_GRAPH, TOPIC_IDENTITIES, GraphEdge, graph_key, graph_value
from stream.sim.relay import FrameSource, Relay
from stream.sim.repos import SyntheticRepos
from stream.sim.synth import Population
from stream.sim.xrpc import SyncServer
from stream.worker.windows import WindowStore
from tests.helpers.cli import invoke

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[3]
LOOPBACK = ["127.0.0.0/8"]
START = 1_735_689_600_000_000


def options(server: SyncServer, **kw) -> Options:
    kw.setdefault("limits", Limits(concurrency=8, per_host=8, backoff_base_s=0.05, backoff_cap_s=0.5))
    return Options(relay=server.url, plc=server.plc_url, allow_nets=LOOPBACK, progress=False, **kw)


def read_topic(bootstrap: str, topic: str, quiet_s: float = 1.5) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of ``topic`` (until ``quiet_s`` without new ones)."""
    async def main():
        c = make_consumer(bootstrap, topic)
        await c.start()
        out, last = [], time.monotonic()
        try:
            while time.monotonic() - last < quiet_s:
                for msgs in (await c.getmany(timeout_ms=300)).values():
                    out += [(m.key, m.value) for m in msgs]
                    last = time.monotonic() if msgs else last
        finally:
            await c.stop()
        return out
    return asyncio.run(main())


def read_graph(bootstrap: str, quiet_s: float = 1.5) -> list[GraphEdge]:
    """Every chorus.graph value, each checked against the schema and its key (the record URI)."""
    out = []
    for key, value in read_topic(bootstrap, TOPIC_GRAPH, quiet_s):
        assert key == graph_key(json.loads(value))
        out.append(GraphEdge.from_bytes(value))
    return out


def truth(pop: Population) -> set[tuple[str, str]]:
    src, dst = pop.final_follow_edges()
    return {(pop.did(int(s)), pop.did(int(d))) for s, d in zip(src, dst)}


def live_graph_ops(pop: Population) -> list[GraphEdge]:
    """The worker's chorus.graph output for the whole firehose (its own WindowStore logic)."""
    from stream.worker.lexicon import Classifier, Lexicon

    store = WindowStore(600, 10, Classifier(Lexicon.load(None)))
    out = []
    for ev in expected_events(pop, start_time_us=START):
        _, edges = store.process(ev)
        out += [GraphEdge(**graph_value(*e)) for e in edges]
    for did in pop.retractions()["deactivated"]:  # the #account frames' events
        _, edges = store.process({"kind": "account", "did": did, "rkey": "", "uri": f"at://{did}", "seq": 0,
                                  "time_us": pop.activity_start_us(START) + pop.duration_us, "active": False})
        out += [GraphEdge(**graph_value(*e)) for e in edges]
    return out


def operator_edges(ops) -> OperatorState:
    st = OperatorState()
    for e in ops:
        st.apply_edge(e)
    return st


def edge_set(st: OperatorState) -> set[tuple[str, str]]:
    s, d = st.edges()
    return {(st.dids[a], st.dids[b]) for a, b in zip(s.tolist(), d.tolist())}


# --- backfill + live stream = the true graph ------------------------------------------------------

def test_backfill_during_the_live_stream_gives_the_exact_graph(fresh_broker, tmp_path):
    """The repositories are read while the firehose moves on (each getRepo sees a later head), so
    follows are created and deleted before, during and after each repository's checkpoint. With
    the live stream's graph ops (the worker's) the operator's edge set is the population's true
    final graph exactly, in whatever order backfill and live ops arrive, and follower counts are
    exact."""
    pop = Population(300, seed=11, events_per_account=2)
    repos = SyntheticRepos(pop, 1, START)
    last = pop.expected()["frames"]
    heads: dict[str, int] = {}
    served = iter(np.linspace(1, last, pop.n + 10).astype(int).tolist())

    async def main():
        head = {"seq": 1}

        def at_head():  # every request sees a later point of the firehose
            head["seq"] = next(served, last)
            return head["seq"]

        server = await SyncServer(repos, at_head).start()
        orig = repos.state

        def state(i, h):
            heads[pop.did(i)] = h
            return orig(i, h)

        repos.state = state
        try:
            bf = Backfill(fresh_broker.bootstrap, tmp_path, options(server), idempotence=False)
            await bf.run()
        finally:
            await server.stop()
        return bf

    bf = asyncio.run(main())
    assert bf.state.finished and bf.state.counts.get("done", 0) + bf.state.counts.get("deactivated", 0) == pop.n
    backfilled = read_graph(fresh_broker.bootstrap)
    assert len(backfilled) == bf.state.edges and all(e.rev and e.uri for e in backfilled)
    # not vacuous: some repositories were read after some of their live follows/unfollows, and
    # before others
    tl = pop.timeline
    from stream.sim.synth import FOLLOW, UNFOLLOW
    changes = [(pop.did(int(tl.author[i])), repos.first_seq + i, int(tl.kind[i]))
               for i in np.flatnonzero((tl.kind == FOLLOW) | (tl.kind == UNFOLLOW))]
    before = {k for d, seq, k in changes if d in heads and seq <= heads[d]}
    after = {k for d, seq, k in changes if d in heads and seq > heads[d]}
    assert before == after == {FOLLOW, UNFOLLOW}

    # handles from the DID documents, next to their DIDs on chorus.identities
    handles = {json.loads(v)["did"]: json.loads(v)["handle"] for _, v in read_topic(fresh_broker.bootstrap, TOPIC_IDENTITIES)}
    assert handles == {pop.did(i): repos.handle(i) for i in range(pop.n) if pop.did(i) in heads}

    live = live_graph_ops(pop)
    want = truth(pop)
    for order in ("backfill first", "live first", "shuffled"):
        ops = backfilled + live if order == "backfill first" else live + backfilled
        if order == "shuffled":
            random.Random(5).shuffle(ops)
        st = operator_edges(ops)
        assert edge_set(st) == want, order
        counts = {d: int(st.followers[r]) for d, r in st.index.items()}
        src, _ = pop.final_follow_edges()
        exact = np.bincount(src, minlength=pop.n)
        assert all(counts.get(pop.did(i), 0) == exact[i] for i in range(pop.n)), order


# --- resumable ---------------------------------------------------------------------------------

def _cli(*args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stream.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    env.update(CHORUS_STATE_DIR=str(state), CHORUS_METRICS_PORT="0", CHORUS_KAFKA_IDEMPOTENCE="false")
    return env


class ThreadRelay:
    """The synthetic relay (with sync endpoints) on its own loop thread, for subprocess clients."""

    def __init__(self, pop: Population, **sync):
        import threading

        self.pop, self.sync = pop, sync
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Relay:
        self.thread.start()
        self.relay = Relay(FrameSource.from_population(self.pop, 1, START), repos=SyntheticRepos(self.pop, 1, START),
                           sync=self.sync)
        asyncio.run_coroutine_threadsafe(self.relay.start(), self.loop).result(30)
        return self.relay

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.relay.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_sigkill_mid_way_then_restart_gives_the_same_edge_set(fresh_broker, tmp_path):
    pop = Population(600, seed=12, events_per_account=1)
    state = tmp_path / "state"
    # a slow PDS (20 ms per getRepo, 2 at a time: ~6 s for all) so the kill lands mid-way: with the
    # PLC export the whole backfill of 600 repositories could end before the first checkpoint
    with ThreadRelay(pop, getrepo_delay_s=0.02) as relay:
        args = ["backfill", "--relay", relay.http_url, "--plc", relay.plc_url, "--allow-net", "127.0.0.0/8",
                "--kafka", fresh_broker.url, "--no-progress", "--concurrency", "2"]
        proc = _cli(*args, env=_env(state))
        ckpt = None
        deadline = time.monotonic() + 120
        while ckpt is None or ckpt.get("counts", {}).get("done", 0) < 60:  # some repos done, most not
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
            files = list(state.glob("backfill-*.json"))
            if files:
                try:
                    ckpt = json.loads(files[0].read_text())
                except ValueError:
                    pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        first = {(e.src, e.dst) for e in read_graph(fresh_broker.bootstrap, quiet_s=1.0)}
        assert 0 < len(first) < len(truth(pop))
        second = _cli(*args, env=_env(state))
        out, err = second.communicate(timeout=180)
        assert second.returncode == 0, err
        assert "coverage 100.0%" in err and err.strip().count("\n") == 0, err
    edges = read_graph(fresh_broker.bootstrap)
    assert {(e.src, e.dst) for e in edges} == truth(pop)  # nothing missing, nothing extra
    # a third run (in-process: tests/helpers/cli.py) finds the checkpoint complete and publishes nothing
    env = {k: v for k, v in _env(state).items() if k.startswith("CHORUS_")}
    third = invoke(args, env)
    assert third.returncode == 0 and len(read_graph(fresh_broker.bootstrap, quiet_s=1.0)) == len(edges), third.stderr


# --- faulty and hostile hosts ----------------------------------------------------------------------

def test_faulty_and_hostile_repositories_are_counted_and_skipped(fresh_broker, tmp_path):
    """An undecodable block, an oversized CAR, DID documents pointing at private and link-local
    addresses, an endless redirect, a missing and a taken-down repository: each counted by its
    reason, the rest complete; a 429 with Retry-After is waited for."""
    from prometheus_client import REGISTRY

    pop = Population(120, seed=13, events_per_account=1)
    deact = set(pop.retractions()["deactivated"])
    dids = [d for d in pop.dids if d not in deact]
    faults = {dids[0]: "bad_block", dids[1]: "oversize", dids[2]: "private_pds", dids[3]: "metadata_pds",
              dids[4]: "redirect_loop", dids[5]: "not_found", dids[6]: "takendown"}
    before = {k: REGISTRY.get_sample_value("chorus_backfill_repos_total", {"status": k}) or 0
              for k in ("bad_block", "too_large", "private_address", "done")}

    async def main():
        relay = Relay(FrameSource.from_population(pop, 1, START), repos=SyntheticRepos(pop, 1, START),
                      sync={"faults": faults, "throttle": 3, "retry_after_s": 1.0})
        async with relay:
            bf = Backfill(fresh_broker.bootstrap, tmp_path, options(relay.sync, max_car_bytes=1 << 20),
                          idempotence=False)
            await bf.run()
            return bf, relay.sync

    bf, server = asyncio.run(main())
    c = bf.state.counts
    assert c["bad_block"] == 1 and c["too_large"] == 1 and c["private_address"] == 2
    assert c["too_many_redirects"] == 1 and c["not_found"] == 1 and c["takendown"] == 1
    assert c["done"] == pop.n - len(deact) - len(faults) and c.get("deactivated", 0) == len(deact)
    # the throttled host was left alone for Retry-After before the next getRepo was served
    assert len(server.throttled_at) == 3
    assert min(server.served_at.values()) >= server.throttled_at[0] + 0.95
    for k, v in before.items():
        assert REGISTRY.get_sample_value("chorus_backfill_repos_total", {"status": k}) == v + c[k]
    # the rest complete: every follow of every good repository is in the graph
    bad = {d for d, f in faults.items()}
    want = {e for e in truth(pop) if e[1] not in bad}
    assert {(e.src, e.dst) for e in read_graph(fresh_broker.bootstrap)} == want
    assert 0 < bf.coverage < 1


# --- one-line errors ---------------------------------------------------------------------------------

def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chorus: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_input_gets_one_line_errors(broker, tmp_path):
    """The first case runs the real `chorus` subprocess (its stderr holds the one line and no log
    line); the others run the command in-process (tests/helpers/cli.py)."""
    from stream.local.broker import free_port

    env = _env(tmp_path / "state")
    base = ["backfill", "--kafka", broker.url, "--no-progress", "--retries", "0"]
    chorus_env = {k: v for k, v in env.items() if k.startswith("CHORUS_")}
    run = lambda *a: invoke([*base, *a], chorus_env)  # noqa: E731
    dead = f"http://127.0.0.1:{free_port()}"
    _one_line_error(subprocess.run([sys.executable, "-m", "stream.cli", *base, "--relay", dead, "--allow-net",
                                    "127.0.0.0/8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120),
                    "cannot list repositories", dead)
    _one_line_error(run("--relay", dead, "--allow-net", "127.0.0.0/8"), "cannot list repositories", dead)
    _one_line_error(run("--relay", dead), f"--relay {dead}", "non-public", "--allow-net")  # loopback not allowed
    pop = Population(60, seed=14, events_per_account=1)
    with ThreadRelay(pop) as relay:
        _one_line_error(run("--relay", relay.http_url, "--plc", dead, "--allow-net", "127.0.0.0/8"),
                        "cannot reach the PLC directory", dead)
    bad = tmp_path / "dids.txt"
    bad.write_text("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa\n# a comment\n\nnot-a-did\n")
    _one_line_error(run("--dids", str(bad)), "line 4", "not-a-did")
    csv = tmp_path / "graph.csv"
    csv.write_text("follower,subject\ndid:plc:a,did:plc:b\n")
    _one_line_error(run("--graph-file", str(csv)), "lacks column(s) followed")
    csv.write_text("follower,followed\ndid:plc:a,did:plc:b\ndid:plc:a,bob\n")
    _one_line_error(run("--graph-file", str(csv)), "line 3", "followed is not a DID", "bob")
    _one_line_error(run("--relay", "ftp://x"), "--relay must be an http(s) URL")


async def _partitions(bootstrap: str, topic: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (t,) = await admin.describe_topics([topic])
        return len(t["partitions"])
    finally:
        await admin.close()


def test_graph_file_csv_and_parquet(fresh_broker, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [(f"did:plc:f{i:022d}", f"did:plc:s{j:022d}") for i in range(40) for j in range(i % 5)]
    csv = tmp_path / "g.csv"
    csv.write_text("followed,follower,extra\n" + "".join(f"{b},{a},x\n" for a, b in pairs))
    pq.write_table(pa.table({"follower": [a for a, _ in pairs[:30]], "followed": [b for _, b in pairs[:30]]}),
                   tmp_path / "g.parquet")
    env = _env(tmp_path / "state")
    env["CHORUS_PARTITIONS_CHORUS_GRAPH"] = "3"  # the backfill creates its topics as the settings say
    # the CSV through the real `chorus` subprocess, the Parquet file in-process (tests/helpers/cli.py)
    args = ["backfill", "--kafka", fresh_broker.url, "--graph-file"]
    r = subprocess.run([sys.executable, "-m", "stream.cli", *args, str(csv)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = invoke([*args, str(tmp_path / "g.parquet")], {k: v for k, v in env.items() if k.startswith("CHORUS_")})
    assert r.returncode == 0, r.stderr
    edges = read_graph(fresh_broker.bootstrap)
    assert len(edges) == len(pairs) + 30
    assert asyncio.run(_partitions(fresh_broker.bootstrap, TOPIC_GRAPH)) == 3
    assert {(e.dst, e.src) for e in edges} == set(pairs) and all(e.op == "add" for e in edges)


def test_coverage_is_said_to_be_partial_until_the_listing_ends(fresh_broker, tmp_path, monkeypatch):
    """The listing is paged in as the work drains, so covered / listed-so-far overstates how complete
    the graph is until the listing ends (a new user saw 98 % with half the repositories unlisted):
    chorus_backfill_listing_complete is 0 from the start until the last page is listed, then 1, when
    the coverage's denominator is every repository; the console says "of listed so far" meanwhile."""
    from stream import metrics
    from stream.backfill import listing
    from stream.backfill import service as backfill_service
    from stream.local.console import Status, status_line

    pop = Population(60, seed=5, events_per_account=1)
    path = tmp_path / "dids.txt"
    path.write_text("\n".join(pop.dids) + "\n")
    listed_pages = []

    async def small_pages(dids, cursor=None):  # 6 pages of 10: the listing outlasts the first repositories
        async for page in listing.dids_pages(dids, cursor, size=10):
            listed_pages.append(len(page.repos))
            yield page

    monkeypatch.setattr(backfill_service, "dids_pages", small_pages)
    seen = []

    class Recorder:
        def set(self, v):
            seen.append((float(v), sum(listed_pages)))

    monkeypatch.setattr(metrics, "BACKFILL_LISTING_COMPLETE", Recorder())

    async def main():
        relay = Relay(FrameSource.from_population(pop, 1, START), repos=SyntheticRepos(pop, 1, START))
        async with relay:
            bf = Backfill(fresh_broker.bootstrap, tmp_path / "state",
                          Options(pds=relay.sync.url, dids_file=path, allow_nets=LOOPBACK, progress=False,
                                  limits=Limits(concurrency=2, per_host=2)), idempotence=False)
            await bf.run()
            return bf

    bf = asyncio.run(main())
    assert seen[0] == (0.0, 0) and seen[-1] == (1.0, pop.n) and [v for v, _ in seen].count(1.0) == 1
    assert bf.listing_complete and bf.listed == pop.n
    assert bf.coverage == pytest.approx(bf.covered / pop.n)
    assert "listed so far" in status_line(Status(coverage=0.98, listing_complete=False))
    assert "listed so far" not in status_line(Status(coverage=1.0, listing_complete=True))

"""`chorus analyze`: inputs (recording, Jetstream, synthetic), the planted episode, and equality with
the live pipeline's code path (the worker's Pipeline glue with its ops/JSON round trips, and the
operator service's Kafka-free API) on the same events."""

from __future__ import annotations

import json

import libipld
import pytest
from typer.testing import CliRunner

from operators.service.service import OperatorService
from stream.offline import analyze as offline_analyze
from stream.sim import frames as sim_frames
from stream.worker.faust_app import Pipeline, edge_message, encode_ops
from stream.cli import app
from stream.config import Settings
from stream.ingest.decode import time_us
from stream.sim.recording import write_recording
from stream.schemas import AttributionSnapshot, Features, GraphEdge, dumps
from stream.sim.synth import Population
from tests.helpers.cli import invoke

pytestmark = pytest.mark.timeout(240)

WINDOW, HOP = 600, 300
SMALL = dict(n=300, seed=3)


@pytest.fixture(scope="module")
def small_pop():
    return Population(**SMALL)


@pytest.fixture(scope="module")
def recording(small_pop, tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "small.chorusrec"
    write_recording(path, small_pop.timed_frames(), source="synthetic")
    return path


def jetstream_lines(pop: Population) -> list[str]:
    """The population's frames as Jetstream would serve them (JSON records, no relay seq)."""
    lines = []
    for _, _, data in pop.timed_frames():
        header, body = sim_frames.split_frame(data)
        t = time_us(body["time"])
        if header["t"] == "#commit":
            blocks = libipld.decode_car(body["blocks"])[1]
            for op in body["ops"]:
                coll, rkey = op["path"].split("/")
                commit = {"rev": body["rev"], "operation": op["action"], "collection": coll, "rkey": rkey}
                if op["action"] == "create":
                    commit.update(record=blocks[op["cid"]], cid=libipld.encode_cid(op["cid"]))
                lines.append(json.dumps({"did": body["repo"], "time_us": t, "kind": "commit", "commit": commit}))
        elif header["t"] == "#account":
            acc = {k: body[k] for k in ("active", "did", "seq", "time", "status") if k in body}
            lines.append(json.dumps({"did": body["did"], "time_us": t, "kind": "account", "account": acc}))
        elif header["t"] == "#identity":
            lines.append(json.dumps({"did": body["did"], "time_us": t, "kind": "identity",
                                     "identity": {"did": body["did"], "seq": body["seq"], "time": body["time"]}}))
    return lines


def events_of(source: offline_analyze.Source) -> list[dict]:
    return list(source.events(source, lambda k: None))


def test_jetstream_reader_gives_the_firehose_events(small_pop, recording, tmp_path):
    path = tmp_path / "jetstream.jsonl"
    lines = jetstream_lines(small_pop)
    bad = ['{"did": "nope", "time_us": 1, "kind": "commit", "commit": {}}', "not json", ""]
    path.write_text("\n".join(lines[:5] + bad + lines[5:]) + "\n")
    js = offline_analyze.open_source(path)
    assert js.name.startswith("jetstream")
    got = events_of(js)
    rec = offline_analyze.open_source(recording)
    assert rec.name.startswith("recording") and rec.total == small_pop.expected()["frames"]
    want = events_of(rec)
    exp = small_pop.expected()
    assert len(want) == exp["ops"] + exp["account"]
    strip = lambda evs: [{k: v for k, v in e.items() if k != "seq"} for e in evs]  # noqa: E731
    assert strip(got) == strip(want)  # Jetstream has no relay seq: seq = time_us there
    assert all(e["seq"] == e["time_us"] for e in got)
    assert js.invalid == {"invalid_did": 1, "json": 1} and rec.invalid == {}


def live_pipeline(events: list[dict], settings: Settings, steps: int) -> list[AttributionSnapshot]:
    """The live path without a broker: the worker's Pipeline (events and ops as JSON bytes, ops
    routed over 4 partitions and delivered at once), its outputs as Kafka values in its publish
    order (edges, then feature records), the service deciding hops with hop_due(caught_up=True)."""
    pipe = Pipeline(settings, partitions=4)
    svc = OperatorService(settings, steps=steps)
    snaps: list[AttributionSnapshot] = []

    def deliver() -> None:
        while True:
            records, edges, ops = pipe.drain()
            for edge in edges:  # the worker's publish(): edges, then records
                svc.apply_edge(GraphEdge.from_bytes(edge_message(edge)[1]))
            for rec in records:
                svc.apply_features(Features.from_bytes(dumps(rec)))
            if svc.hop_due(caught_up=True):
                snaps.extend(svc.recompute())
            if not ops:
                return
            for batch in ops.values():
                pipe.on_ops(encode_ops(batch))

    for ev in events:
        pipe.on_event(json.dumps(ev).encode())
        deliver()
    pipe.on_idle(0.0)  # input idle: the worker closes the last hop
    deliver()
    return snaps


def test_analyze_equals_the_live_pipeline(recording):
    settings = Settings(window_s=WINDOW, hop_s=HOP)
    source = offline_analyze.open_source(recording)
    res = offline_analyze.analyze(source, settings, steps=8, progress=False)
    live = live_pipeline(events_of(offline_analyze.open_source(recording)), settings, steps=8)
    assert res.hops >= 10 and len(res.snapshots) >= 40
    key = lambda s: (s.window_end, s.topic, s.indicator)  # noqa: E731
    assert [key(s) for s in res.snapshots] == [key(s) for s in live]
    for a, b in zip(res.snapshots, live):
        assert a.n_agents == b.n_agents
        assert a.value == pytest.approx(b.value, rel=1e-6, abs=1e-9)
        assert a.baseline_value == pytest.approx(b.baseline_value, rel=1e-6, abs=1e-9)
        assert a.bands == pytest.approx(b.bands, abs=1e-6)
        assert a.panel["bands"] == pytest.approx(b.panel["bands"], abs=1e-6)
        assert a.panel["tvd"] == pytest.approx(b.panel["tvd"], abs=1e-6)
        assert {e["did"]: e["share"] for e in a.top} == pytest.approx({e["did"]: e["share"] for e in b.top}, abs=1e-6)


def _tail_mass(s) -> float:
    """Share of the absolute attribution mass (positive and negative) in bands 10-50 and bottom50."""
    m = s.band_mass
    pos, neg = m["positive_mass"], m["negative_mass"]
    tail = sum(pos * m["positive"][b] + neg * m["negative"][b] for b in ("10-50", "bottom50"))
    return tail / (pos + neg)


def test_cli_synthetic_reproduces_the_planted_episode(tmp_path):
    """stream/sim/synth.py: during the episode the middle tier and long tail carry the topic while the
    top-100 panel sees only celebrities, so full-scale and panel band shares disagree (TVD) more
    than before the episode; the panel itself never credits the bottom bands."""
    out, agents = tmp_path / "snap.parquet", tmp_path / "agents.jsonl"
    r = CliRunner().invoke(app, ["analyze", "--synthetic", "1000", "--seed", "1", "--window", str(WINDOW),
                                 "--hop", str(HOP), "-o", str(out), "--agents", str(agents), "--no-progress"])
    assert r.exit_code == 0, r.output
    snaps = offline_analyze.read_snapshots(out)
    assert snaps == offline_analyze.read_snapshots(out)  # round trip is stable
    pop = Population(n=1000, seed=1)
    truth = pop.episode_truth()
    t0 = pop.activity_start_us() // 1_000_000
    ep_start, ep_end = t0 + truth["start_us"] // 1_000_000, t0 + truth["end_us"] // 1_000_000
    topic = truth["topic"]
    # The panel holds the most-followed accounts by the follow graph, active or not (followers
    # come from chorus.graph), so before the episode polarization's panel already misses most of
    # the stance mass (TVD 0.55-0.80 on this seed): its margin is smaller than cascade_reach's.
    for ind, margin in (("cascade_reach", 0.05), ("polarization", 0.03)):
        series = [s for s in snaps if s.topic == topic and s.indicator == ind]
        during = [s for s in series if s.window_end - WINDOW >= ep_start and s.window_end <= ep_end]
        before = [s for s in series if s.window_end <= ep_start]
        assert len(during) == 2 and len(before) >= 4
        for s in during:
            low = _tail_mass(s)  # share of |phi| in the two bottom bands (either sign)
            assert s.panel["bands"]["10-50"] == s.panel["bands"]["bottom50"] == 0
            # TVD on the (sign, band) distribution: at least the tail mass the panel cannot see;
            # exactly that when phi >= 0 (cascade reach)
            assert s.panel["tvd"] >= low - 1e-9 and low > 0.1
            if ind == "cascade_reach":
                assert s.panel["tvd"] == pytest.approx(low, abs=1e-9)
        assert min(s.panel["tvd"] for s in during) > max(s.panel["tvd"] for s in before) + margin
    polar = [s for s in snaps if s.topic == topic and s.indicator == "polarization"
             and s.window_end - WINDOW >= ep_start and s.window_end <= ep_end]
    assert min(_tail_mass(s) for s in polar) > 0.5  # most of it off the panel

    # per-agent file: the last window's phi, consistent with the snapshot's top list and bands
    rows = offline_analyze.read_agents(agents)
    last = max(s.window_end for s in snaps)
    assert rows and {r["window_end"] for r in rows} == {last}
    for s in snaps:
        if s.window_end != last:
            continue
        mine = [r for r in rows if r["topic"] == s.topic and r["indicator"] == s.indicator]
        total = sum(abs(r["phi"]) for r in mine)  # net shares of the absolute mass (operators.bands)
        bands = {b: sum(r["phi"] for r in mine if r["band"] == b) / total for b in s.bands}
        assert bands == pytest.approx(s.bands, abs=1e-6)
        best = sorted(mine, key=lambda r: -r["share"])[: len(s.top)]  # ties may order differently
        assert [r["share"] for r in best] == pytest.approx([e["share"] for e in s.top], abs=1e-9)
        by_did = {r["did"]: r for r in mine}
        for e in s.top:
            assert by_did[e["did"]]["share"] == pytest.approx(e["share"], abs=1e-9)
            assert by_did[e["did"]]["followers"] == e["followers"]


def test_snapshot_formats_round_trip(tmp_path):
    s = AttributionSnapshot(topic="t", indicator="volume", window_end=60, value=2.0, baseline_value=0.0,
                    completeness_residual=0.0, n_agents=2, bands={"top0.1": 1.0, "bottom50": 0.0},
                    panel={"k": 1, "bands": {"top0.1": 1.0, "bottom50": 0.0}, "tvd": 0.0, "spearman": None,
                           "rescale": 1.0, "rescale_residual": 0.0},
                    top=[{"did": "did:plc:a", "share": 1.0, "followers": 3}])
    for name in ("s.parquet", "s.jsonl"):
        offline_analyze.write_snapshots(tmp_path / name, [s, s], {"source": "test"})
        assert offline_analyze.read_snapshots(tmp_path / name) == [s, s]
    assert (tmp_path / "s.jsonl").read_text().splitlines()[0] == s.to_bytes().decode()
    with pytest.raises(offline_analyze.AnalyzeError, match="unknown file type"):
        offline_analyze.write_snapshots(tmp_path / "s.csv", [s])


def test_cli_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["analyze", "-o", str(tmp_path / "x.parquet")])
    assert r.exit_code == 2 and "one of them" in r.output
    r = runner.invoke(app, ["analyze", "--synthetic", "100", "-o", str(tmp_path / "x.txt")])
    assert r.exit_code == 2 and "unknown file type" in r.output
    r = runner.invoke(app, ["analyze", str(tmp_path / "missing"), "-o", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "cannot read input" in r.output
    # A file nothing can be read from (random bytes, a CSV) is an error, not an empty result.
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 16)
    r = runner.invoke(app, ["analyze", str(junk), "-o", str(tmp_path / "x.jsonl"), "--no-progress"])
    assert r.exit_code == 2 and "no event could be read" in r.output, r.output
    csv = tmp_path / "graph.csv"
    csv.write_text("follower,followed\ndid:plc:a,did:plc:b\n")
    r = runner.invoke(app, ["analyze", str(csv), "-o", str(tmp_path / "x.jsonl"), "--no-progress"])
    assert r.exit_code == 2 and "no event could be read" in r.output, r.output
    assert not (tmp_path / "x.jsonl").exists()


def test_events_dated_ahead_of_the_clock_are_skipped_as_time_ahead(small_pop, tmp_path):
    """One post dated 2100 (or 10^23 us) among good lines: skipped and counted as time_ahead (the
    live guard's rule), not allowed to move the window clock and cut the analysis short."""
    lines = jetstream_lines(small_pop)
    post = next(ln for ln in lines if '"app.bsky.feed.post"' in ln)
    future = [post.replace(f'"time_us": {json.loads(post)["time_us"]}', f'"time_us": {t}')
              for t in (4_102_444_800_000_000, 99999999999999999999999)]
    assert all(json.loads(f)["time_us"] > 4e15 for f in future)
    mid = len(lines) // 3
    clean, dirty = tmp_path / "clean.jsonl", tmp_path / "dirty.jsonl"
    clean.write_text("\n".join(lines) + "\n")
    dirty.write_text("\n".join(lines[:mid] + future + lines[mid:]) + "\n")
    settings = Settings(window_s=WINDOW, hop_s=HOP)
    want = offline_analyze.analyze(offline_analyze.open_source(clean), settings, steps=8, progress=False)
    got = offline_analyze.analyze(offline_analyze.open_source(dirty), settings, steps=8, progress=False)
    assert got.invalid.get("time_ahead") == 2 and "time_ahead" not in want.invalid
    assert want.hops >= 10 and got.hops == want.hops
    assert [s.window_end for s in got.snapshots] == [s.window_end for s in want.snapshots]


@pytest.mark.parametrize("window_end", [4_102_444_810, 10**17])
def test_report_refuses_a_snapshot_from_the_future_in_one_line(tmp_path, window_end):
    """A window_end beyond the clock (as an unguarded analyze once wrote): one line, exit 2, no
    OSError (Errno 75 from the date axis)."""
    from tests.helpers.cli import invoke

    s = AttributionSnapshot(topic="t", indicator="volume", window_end=window_end, value=2.0, baseline_value=0.0,
                            completeness_residual=0.0, n_agents=2, bands={"top0.1": 1.0, "bottom50": 0.0},
                            panel={"k": 1, "bands": {"top0.1": 1.0, "bottom50": 0.0}, "tvd": 0.0,
                                   "spearman": None, "rescale": 1.0, "rescale_residual": 0.0},
                            top=[{"did": "did:plc:a", "share": 1.0, "followers": 3}])
    good = s.model_copy(update={"window_end": 1_735_689_600})
    path = tmp_path / "s.jsonl"
    offline_analyze.write_snapshots(path, [good, s], {"source": "test"})
    r = invoke(["report", str(path), "-o", str(tmp_path / "out")], env={"CHORUS_STATE_DIR": str(tmp_path)})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("chorus: error: ") and f"window_end {window_end}" in lines[0] and "future" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_empty_input_is_an_error_not_zero_events(tmp_path):
    """New-user trial: a 0-byte file, or a recording with no frame (a `chorus record` stopped at
    once), said "0 events" and exit 0; like a garbage file it is one line and exit 2."""
    from stream.sim.recording import write_recording

    empty, no_frames = tmp_path / "empty.rec", tmp_path / "none.rec"
    empty.write_bytes(b"")
    write_recording(no_frames, [])
    for path, held in ((empty, "0 bytes"), (no_frames, "0 frames")):
        out = tmp_path / "x.jsonl"
        r = CliRunner().invoke(app, ["analyze", str(path), "-o", str(out), "--no-progress"])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert "no event could be read" in lines[0] and held in lines[0], r.output
        assert not out.exists()


def test_graph_file_gives_the_analysis_the_graph_that_existed_before(small_pop, recording, tmp_path):
    """`chorus analyze --graph-file`: the population's pre-existing follow graph as a CSV; after the
    recording the operator holds the population's final graph (pre-existing, minus unfollows and
    deactivations, plus live follows: its ground truth) except the pre-existing follows undone
    by a record delete -- a delete names only the record, and a graph file has no record keys
    (at most one per unfollow in the stream) -- where without the file it holds the live follows
    only."""
    src, dst = small_pop.follow_edges
    dids = small_pop.dids
    path = tmp_path / "graph.csv"
    path.write_text("follower,followed\n" + "".join(f"{dids[d]},{dids[s]}\n" for s, d in zip(src, dst)))
    settings = Settings(window_s=WINDOW, hop_s=HOP)

    def held(graph_file):
        az = offline_analyze.Analyzer(settings, steps=4)
        if graph_file is not None:
            assert az.load_graph(graph_file) == src.size
        for ev in events_of(offline_analyze.open_source(recording)):
            az.feed(ev)
        st = az.service.state
        rows_src, rows_dst = st.edges()
        return {(st.dids[a], st.dids[b]) for a, b in zip(rows_src.tolist(), rows_dst.tolist())}

    fs, fd = small_pop.final_follow_edges()
    truth = {(dids[a], dids[b]) for a, b in zip(fs.tolist(), fd.tolist())}
    from stream.sim.synth import UNFOLLOW

    pre = {(dids[a], dids[b]) for a, b in zip(src.tolist(), dst.tolist())}
    got = held(path)
    assert truth <= got and got - truth <= pre
    assert len(got - truth) <= int((small_pop.timeline.kind == UNFOLLOW).sum())
    without = held(None)
    assert without < truth and len(without) < len(truth) // 2
    # the CLI: a bad row is one line before anything runs
    bad = tmp_path / "bad.csv"
    bad.write_text("follower,followed\nnot-a-did,did:plc:x\n")
    r = invoke(["analyze", str(recording), "-o", str(tmp_path / "s.jsonl"), "--graph-file", str(bad), "--no-progress"])
    assert r.returncode == 2 and r.stderr.startswith("chorus: error: ") and "line 2" in r.stderr, r.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("follower,followed\n")
    r = invoke(["analyze", str(recording), "-o", str(tmp_path / "s.jsonl"), "--graph-file", str(empty), "--no-progress"])
    assert r.returncode == 2 and "has no follow pairs" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

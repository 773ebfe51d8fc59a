"""`chorus report`: every figure and the summary, valid PNGs, and the summary's numbers against the
snapshot (from a file written by `chorus analyze`, and from chorus.attributions on a real broker)."""

from __future__ import annotations

import asyncio
import re
import uuid

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stream.offline import analyze as offline_analyze
from stream.offline import report as offline_report
from stream.cli import app
from stream.display import utc_stamp
from stream.kafka import ensure_topics, make_producer

pytestmark = pytest.mark.timeout(240)

INDICATORS = ("cascade_reach", "polarization")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    d = tmp_path_factory.mktemp("analyzed")
    snap, agents = d / "snap.jsonl", d / "agents.parquet"
    r = CliRunner().invoke(app, ["analyze", "--synthetic", "300", "--seed", "3", "--window", "600", "--hop", "300",
                                 "--steps", "8", "-o", str(snap), "--agents", str(agents), "--no-progress"])
    assert r.exit_code == 0, r.output
    return snap, agents


def check_figures(out, summary_text):
    names = {f"{fig}_{ind}.png" for fig in offline_report.FIGURES for ind in INDICATORS}
    assert {p.name for p in out.glob("*.png")} == names
    for name in names:
        raw = (out / name).read_bytes()
        assert raw[:8] == PNG and 10_000 < len(raw) < 5_000_000
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            w, h = im.size
            assert 400 <= w <= 4000 and 300 <= h <= 4000
            assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas
        assert f"]({name})" in summary_text  # embedded in the summary


def table(text: str, header_start: str) -> list[list[str]]:
    """Rows (cells) of the first Markdown table after the header line starting with header_start,
    within the section that follows."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (\S+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def gini_pairs(phi) -> float:
    """Gini by mean absolute difference: sum_ij |x_i - x_j| / (2 n^2 mean) (independent of Lorenz)."""
    x = np.asarray(phi, float)
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size ** 2 * x.mean()))


def pct(cell: str) -> float:
    return float(cell.rstrip("%")) / 100


def test_report_from_snapshot_file(analyzed, tmp_path):
    snap, agents = analyzed
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["report", str(snap), "--agents", str(agents), "-o", str(out)])
    assert r.exit_code == 0, r.output
    text = (out / "summary.md").read_text()
    check_figures(out, text)

    snaps = offline_report.select(offline_analyze.read_snapshots(snap))
    last = max(s.window_end for s in snaps)
    focus = {}
    for s in snaps:  # newest snapshot per (topic, indicator): what the live subscribers keep
        focus[(s.topic, s.indicator)] = s
    rows = offline_analyze.read_agents(agents)
    assert f"Windows: {len({s.window_end for s in snaps})}," in text and f"{len(snaps)} snapshots" in text
    by_ind = sections(text)
    assert set(by_ind) == set(INDICATORS)
    for ind, body in by_ind.items():
        main = table(body, "| topic | window end | value")
        assert {row[0] for row in main} == {t for t, i in focus if i == ind}
        for row in main:
            s = focus[(row[0], ind)]
            assert row[1] == utc_stamp(s.window_end)
            assert float(row[2]) == pytest.approx(s.value, rel=1e-5)
            assert float(row[3]) == pytest.approx(s.baseline_value, rel=1e-5, abs=1e-9)
            assert float(row[4]) == pytest.approx(s.completeness_residual, rel=1e-2, abs=1e-12)
            assert int(row[5]) == s.n_agents
            for cell, key in ((row[6], "tvd"), (row[7], "spearman"), (row[9], "rescale_residual")):
                assert (cell == "n/a") if s.panel.get(key) is None else float(cell) == pytest.approx(s.panel[key], abs=5e-5)
            if s.top:
                assert row[11] == s.top[0]["did"] and pct(row[12]) == pytest.approx(s.top[0]["share"], abs=5e-5)
                assert int(row[13]) == s.top[0]["followers"]
            phi = [r["phi"] for r in rows if r["topic"] == row[0] and r["indicator"] == ind]
            if s.window_end == last and phi:  # exact Lorenz from the per-agent file
                assert float(row[10]) == pytest.approx(gini_pairs(phi), abs=5e-5)
        bands = table(body, "| topic | top0.1")
        for row in bands:
            s = focus[(row[0], ind)]
            for cell, band in zip(row[1:], s.bands):
                full, panel = cell.split(" / ")
                assert pct(full) == pytest.approx(s.bands[band], abs=5e-5)
                assert pct(panel) == pytest.approx(s.panel["bands"][band], abs=5e-5)
        for row in table(body, "| topic | peak TVD"):
            # a TVD is null where the band comparison says nothing (operators.bands): not a peak
            series = [s for s in snaps if s.topic == row[0] and s.indicator == ind and s.panel["tvd"] is not None]
            peak = max(series, key=lambda s: s.panel["tvd"])
            assert float(row[1]) == pytest.approx(peak.panel["tvd"], abs=5e-5) and row[2] == utc_stamp(peak.window_end)


def test_band_level_lorenz_without_agents(analyzed, tmp_path):
    snap, _ = analyzed
    rep = offline_report.build_report(offline_analyze.read_snapshots(snap), tmp_path)
    for (topic, ind), s in rep.focus.items():
        # equal attribution within each band, bands at their nominal population fractions
        fr = {"top0.1": 0.001, "0.1-1": 0.009, "1-10": 0.09, "10-50": 0.4, "bottom50": 0.5}
        per_capita = sorted(s.bands, key=lambda b: s.bands[b] / fr[b])
        xs = np.cumsum([0] + [fr[b] for b in per_capita])
        ys = np.cumsum([0] + [s.bands[b] for b in per_capita])
        area = np.trapezoid(ys, xs) if hasattr(np, "trapezoid") else np.trapz(ys, xs)
        assert rep.gini[(topic, ind)] == pytest.approx(1 - 2 * area, abs=1e-9)
    with pytest.raises(offline_report.ReportError, match="no snapshots"):
        offline_report.build_report([], tmp_path)


def test_report_from_kafka_time_range(analyzed, broker, tmp_path):
    snap, _ = analyzed
    snaps = offline_report.select(offline_analyze.read_snapshots(snap))
    ends = sorted({s.window_end for s in snaps})
    since, until = ends[2], ends[-3]
    topic = f"test-attributions-{uuid.uuid4().hex[:8]}"
    revised = snaps[-1].model_copy(update={"value": snaps[-1].value + 1.0})

    async def publish():
        await ensure_topics(broker.bootstrap, {topic: 1})
        producer = make_producer(broker.bootstrap, idempotence=False)
        await producer.start()
        try:
            for s in [*snaps, revised]:
                await producer.send_and_wait(topic, s.to_bytes(), key=s.topic.encode())
            await producer.send_and_wait(topic, b"not json", key=b"x")
        finally:
            await producer.stop()

    asyncio.run(publish())
    got = asyncio.run(offline_report.fetch_snapshots(broker.bootstrap, since, until, topic=topic))
    assert got == [s for s in snaps if since <= s.window_end <= until]
    latest = asyncio.run(offline_report.fetch_snapshots(broker.bootstrap, topic=topic))
    assert latest[-1] == revised and len(latest) == len(snaps)  # the revision replaced its snapshot

    out = tmp_path / "kreport"
    r = CliRunner().invoke(app, ["report", "--kafka", broker.url, "--topic", topic, "--since", str(since),
                                 "--until", utc_stamp(until).replace(" ", "T"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    text = (out / "summary.md").read_text()
    check_figures(out, text)
    assert f"window ends {utc_stamp(since)} to {utc_stamp(until)}" in text


def test_report_cli_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["report", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 2 and "file not found" in r.output
    (tmp_path / "empty.jsonl").write_text("")
    r = runner.invoke(app, ["report", str(tmp_path / "empty.jsonl"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no snapshots" in r.output
    r = runner.invoke(app, ["report", str(tmp_path / "empty.jsonl"), "--since", "yesterday"])
    assert r.exit_code == 2 and "--since" in r.output

"""`chorus report`: PNG figures and a Markdown summary from attribution snapshots.

Input: a snapshot file from ``chorus analyze`` (:func:`stream.offline.analyze.read_snapshots`) or the
``chorus.attributions`` topic read once from the beginning up to its end at start
(:func:`fetch_snapshots`, aiokafka, no consumer group), both filtered to ``since <= window_end <=
until`` (unix seconds). Revisions are collapsed: the last snapshot per (topic, indicator,
window_end) wins. A topic that did not change in a hop has no snapshot for it; its latest earlier
snapshot stands (the subscriber rule of the live service).

Figures (matplotlib, Agg), one set per indicator ``<ind>``, topics as panels or lines:

- ``bands_<ind>.png``        band shares of the full-scale attribution over time, per topic;
- ``panel_<ind>.png``        full-scale vs visibility-panel band shares at the focus window;
- ``lorenz_<ind>.png``       Lorenz curve of the attribution at the focus window, per topic;
- ``top_<ind>.png``          the top culprits (share of attribution, follower counts);
- ``scaling_<ind>.png``      attribution scaling bias over time: panel TVD, Spearman, rescale residual.

The focus window is the newest window end (or ``focus``); per topic, its latest snapshot at or
before it. Lorenz curve: with a per-agent file (``chorus analyze --agents``, which is written for
the last window) it is exact, over the agents with a non-zero attribution, sorted by phi; without
one it is the *band-level* curve over all agents: each band holds its nominal population fraction
(DEFAULT_BANDS: 0.1%, 0.9%, 9%, 40%, 50%) and its share of the attribution spread evenly over its
agents, so it is a lower bound on the true inequality (the top list is shown in ``top_<ind>``).
Gini = 1 - 2 x (area under the curve).

``summary.md`` embeds every figure and tabulates, per topic and indicator at the focus window:
value, baseline value, completeness residual, n_agents, full and panel band shares (%), TVD,
Spearman, rescale c* and its residual, Gini, the top culprit; and the peak panel TVD over time.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np

from stream.display import percent, utc_stamp, who
from stream.schemas import TOPIC_ATTRIBUTIONS, AttributionSnapshot

DPI = 110
FIGURES = ("bands", "panel", "lorenz", "top", "scaling")


class ReportError(ValueError):
    """Nothing to report, or bad report input (one-line message)."""


# --- input -------------------------------------------------------------------------------------

def select(snaps: Iterable[AttributionSnapshot], since: int | None = None, until: int | None = None) -> list[AttributionSnapshot]:
    """Snapshots in [since, until] (window_end, unix s), the last one per (topic, indicator,
    window_end), sorted by (window_end, topic, indicator)."""
    latest: dict[tuple, AttributionSnapshot] = {}
    for s in snaps:
        if (since is None or s.window_end >= since) and (until is None or s.window_end <= until):
            latest[(s.window_end, s.topic, s.indicator)] = s
    return [latest[k] for k in sorted(latest)]


async def fetch_snapshots(bootstrap: str, since: int | None = None, until: int | None = None,
                          topic: str = TOPIC_ATTRIBUTIONS, timeout_s: float = 30.0) -> list[AttributionSnapshot]:
    """Every snapshot on ``topic`` up to its end offsets at call time, filtered to [since, until].

    Publish timestamps trail window ends by about a hop, so with ``since`` the read starts at the
    offsets of ``since`` minus one hour (by message timestamp) rather than at the beginning.
    """
    from stream.config import Settings
    from stream.guard import RecordGuard
    from stream.kafka import ReadToEnd, make_consumer, quiet_client_logs

    guard = RecordGuard.from_settings("report", Settings())
    consumer = make_consumer(bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    out: list[AttributionSnapshot] = []
    try:
        with quiet_client_logs():  # an unreachable Kafka: the caller's one line says it
            await consumer.start()  # inside the try: a consumer that failed to start is closed too
        parts = consumer.partitions_for_topic(topic)
        if parts is None:
            await consumer.topics()  # metadata refresh
            parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            raise ReportError(f"topic {topic} does not exist on {bootstrap}")
        from aiokafka import TopicPartition

        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        reader = await ReadToEnd.open(consumer, tps)
        if since is not None:
            starts = await consumer.offsets_for_times({tp: max(0, (since - 3600) * 1000) for tp in tps})
            for tp, ot in starts.items():
                if ot is not None:
                    consumer.seek(tp, ot.offset)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while reader.pending:
            if loop.time() > deadline:
                raise ReportError(f"timed out reading {topic} from {bootstrap}")
            for tp, msgs in (await reader.fetch(timeout_ms=500, max_records=10000)).items():
                for m in msgs:
                    snap = guard.parse(AttributionSnapshot, tp.topic, tp.partition, m.offset, m.value, m.key)
                    if snap is not None:  # else rejected, counted and logged, like every consumer
                        out.append(snap)
    finally:
        await consumer.stop()
    return select(out, since, until)


# --- numbers -----------------------------------------------------------------------------------

def focus_snapshots(snaps: list[AttributionSnapshot], focus: int | None = None) -> dict[tuple[str, str], AttributionSnapshot]:
    """Per (topic, indicator): the latest snapshot with window_end <= focus (default: the newest)."""
    if focus is None and snaps:
        focus = max(s.window_end for s in snaps)
    out: dict[tuple[str, str], AttributionSnapshot] = {}
    for s in snaps:  # sorted by window_end
        if focus is None or s.window_end <= focus:
            out[(s.topic, s.indicator)] = s
    return out


def lorenz_from_phi(phi) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz points (population fraction, attribution fraction), phi sorted ascending."""
    p = np.sort(np.asarray(phi, np.float64))
    total = p.sum()
    x = np.linspace(0.0, 1.0, p.size + 1)
    y = np.concatenate([[0.0], np.cumsum(p) / total]) if total else x.copy()
    return x, y


def lorenz_from_bands(bands: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Band-level Lorenz points: bands with their nominal population fractions, equal within a band,
    sorted by attribution per capita (see the module docstring)."""
    from operators.bands import DEFAULT_BANDS

    pop = {name: hi - lo for name, lo, hi in DEFAULT_BANDS}
    names = sorted((n for n in bands if n in pop), key=lambda n: bands[n] / pop[n])
    x = np.concatenate([[0.0], np.cumsum([pop[n] for n in names])])
    y = np.concatenate([[0.0], np.cumsum([bands[n] for n in names])])
    return x, y


def gini(x: np.ndarray, y: np.ndarray) -> float:
    """1 - 2 * area under the Lorenz curve (trapezoids)."""
    return float(1.0 - 2.0 * np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


# --- figures -----------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _when(t: int) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc).replace(tzinfo=None)



def _grid(plt, n: int, width: float = 5.2, height: float = 3.4):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _time_axis(fig, ax) -> None:
    import matplotlib.dates as mdates

    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.set_xlabel("window end (UTC)")


def fig_bands(plt, series: dict[str, list[AttributionSnapshot]], indicator: str, path: Path) -> Path:
    topics = sorted(series)
    fig, axes = _grid(plt, len(topics))
    for ax, topic in zip(axes, topics):
        snaps = series[topic]
        t = [_when(s.window_end) for s in snaps]
        for band in snaps[0].bands:
            ax.plot(t, [100 * s.bands.get(band, 0.0) for s in snaps], marker=".", label=band)
        ax.set_title(f"{topic}")
        ax.set_ylabel("share of attribution (%)")
        _time_axis(fig, ax)
        ax.grid(alpha=0.3)
    axes[0].legend(title="follower band (top %)", fontsize=8)
    fig.suptitle(f"{indicator}: full-scale attribution by follower band over time")
    return _save(plt, fig, path)


def fig_panel(plt, focus: dict[str, AttributionSnapshot], indicator: str, path: Path) -> Path:
    topics = sorted(focus)
    fig, axes = _grid(plt, len(topics))
    for ax, topic in zip(axes, topics):
        s = focus[topic]
        bands = list(s.bands)
        pos = np.arange(len(bands))
        ax.bar(pos - 0.2, [100 * s.bands[b] for b in bands], 0.4, label="full scale (all agents)")
        ax.bar(pos + 0.2, [100 * s.panel.get("bands", {}).get(b, 0.0) for b in bands], 0.4,
               label=f"visibility panel (top {s.panel.get('k', '?')})")
        ax.set_xticks(pos, bands)
        ax.set_xlabel("follower band (top %)")
        ax.set_ylabel("share of attribution (%)")
        tvd = s.panel.get("tvd")
        ax.set_title(f"{topic} @ {utc_stamp(s.window_end)}" + (f"\nTVD {tvd:.3f}" if tvd is not None else ""))
        ax.axhline(0, color="black", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{indicator}: full-scale vs visibility-panel band shares")
    return _save(plt, fig, path)


def fig_lorenz(plt, curves: dict[str, tuple[np.ndarray, np.ndarray, str]], indicator: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    ax.plot([0, 100], [0, 100], color="grey", ls="--", lw=0.8, label="equality")
    for topic in sorted(curves):
        x, y, kind = curves[topic]
        ax.plot(100 * x, 100 * y, label=f"{topic} (Gini {gini(x, y):.3f}, {kind})")
    ax.set_xlabel("cumulative share of agents, least attribution first (%)")
    ax.set_ylabel("cumulative share of attribution (%)")
    ax.set_title(f"{indicator}: Lorenz curve of the attribution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def fig_top(plt, focus: dict[str, AttributionSnapshot], indicator: str, path: Path) -> Path:
    topics = sorted(focus)
    fig, axes = _grid(plt, len(topics), width=6.4, height=3.8)
    for ax, topic in zip(axes, topics):
        top = focus[topic].top
        labels = [f"{who(e, 22)} ({e.get('followers', 0):,} fol.)" for e in top][::-1]
        ax.barh(np.arange(len(top)), [100 * e["share"] for e in top][::-1], color="tab:red")
        ax.set_yticks(np.arange(len(top)), labels, fontsize=7)
        ax.set_xlabel("share of attribution (%)")
        ax.set_title(f"{topic} @ {utc_stamp(focus[topic].window_end)}")
        if not top:
            ax.text(0.5, 0.5, "no positive contributors", ha="center", transform=ax.transAxes)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{indicator}: top culprits (account, followers)")
    return _save(plt, fig, path)


def fig_scaling(plt, series: dict[str, list[AttributionSnapshot]], indicator: str, path: Path) -> Path:
    fig, axes = plt.subplots(3, 1, figsize=(8.5, 8.4), sharex=True)
    rows = (("tvd", "band-share TVD (0-1)"), ("spearman", "Spearman rank corr. (-1..1)"),
            ("rescale_residual", "rescale residual (relative)"))
    for ax, (key, label) in zip(axes, rows):
        for topic in sorted(series):
            snaps = series[topic]
            vals = [s.panel.get(key) for s in snaps]
            ax.plot([_when(s.window_end) for s in snaps], [np.nan if v is None else v for v in vals],
                    marker=".", label=topic)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _time_axis(fig, axes[-1])
    axes[0].legend(title="topic", fontsize=8)
    axes[0].set_title(f"{indicator}: attribution scaling bias, full scale vs visibility panel")
    return _save(plt, fig, path)


# --- the report --------------------------------------------------------------------------------

@dataclass
class Report:
    summary: Path
    figures: dict[str, Path]  # "<figure>_<indicator>" -> PNG path
    focus: dict[tuple[str, str], AttributionSnapshot]
    gini: dict[tuple[str, str], float] = field(default_factory=dict)


def _pct(v: float | None) -> str:
    return percent(v, digits=2, missing="n/a")


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "n/a" if v is None else format(v, fmt)


def build_report(snaps: list[AttributionSnapshot], out_dir: str | Path, *, agents: list[dict] | None = None,
                 focus: int | None = None, source: str = "") -> Report:
    """Write every figure and ``summary.md`` to ``out_dir`` from selected snapshots (see :func:`select`)."""
    if not snaps:
        raise ReportError("no snapshots to report (empty input or time range)")
    snaps = select(snaps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    at = focus_snapshots(snaps, focus)
    if not at:
        raise ReportError(f"no snapshot at or before the focus window {focus}")
    focus_end = focus if focus is not None else snaps[-1].window_end
    agents_end = agents[0].get("window_end") if agents else None  # the per-agent file's window
    phi: dict[tuple[str, str], list[float]] = {}
    for row in agents or ():
        phi.setdefault((row["topic"], row["indicator"]), []).append(float(row["phi"]))
    figures: dict[str, Path] = {}
    ginis: dict[tuple[str, str], float] = {}
    indicators = sorted({s.indicator for s in snaps})
    for ind in indicators:
        series: dict[str, list[AttributionSnapshot]] = {}
        for s in snaps:
            if s.indicator == ind:
                series.setdefault(s.topic, []).append(s)
        foc = {t: at[(t, ind)] for t in series if (t, ind) in at}
        curves = {}
        for topic, s in foc.items():
            key = (topic, ind)
            if key in phi and agents_end in (None, focus_end):
                x, y = lorenz_from_phi(phi[key])
                curves[topic] = (x, y, f"{len(phi[key])} agents with phi != 0")
            else:
                x, y = lorenz_from_bands(s.bands)
                curves[topic] = (x, y, "band level")
            ginis[key] = gini(x, y)
        figures[f"bands_{ind}"] = fig_bands(plt, series, ind, out / f"bands_{ind}.png")
        figures[f"panel_{ind}"] = fig_panel(plt, foc, ind, out / f"panel_{ind}.png")
        figures[f"lorenz_{ind}"] = fig_lorenz(plt, curves, ind, out / f"lorenz_{ind}.png")
        figures[f"top_{ind}"] = fig_top(plt, foc, ind, out / f"top_{ind}.png")
        figures[f"scaling_{ind}"] = fig_scaling(plt, series, ind, out / f"scaling_{ind}.png")
    summary = out / "summary.md"
    summary.write_text(_markdown(snaps, at, ginis, figures, indicators, source), encoding="utf-8")
    return Report(summary, figures, at, ginis)


def _markdown(snaps, at, ginis, figures, indicators, source) -> str:
    ends = sorted({s.window_end for s in snaps})
    lines = ["# chorus attribution report", ""]
    if source:
        lines.append(f"Source: {source}  ")
    lines += [f"Windows: {len(ends)}, window ends {utc_stamp(ends[0])} to {utc_stamp(ends[-1])}; "
              f"{len(snaps)} snapshots; topics {', '.join(sorted({s.topic for s in snaps}))}; "
              f"indicators {', '.join(indicators)}.", ""]
    for ind in indicators:
        rows = sorted((k, s) for k, s in at.items() if k[1] == ind)
        bands = list(rows[0][1].bands) if rows else []
        lines += [f"## {ind}", "", "### At the focus window", "",
                  "| topic | window end | value | baseline value | completeness residual | n_agents | TVD | "
                  "Spearman | rescale c* | rescale residual | Gini | top culprit | top share | top followers |",
                  "|---" * 14 + "|"]
        for (topic, _), s in rows:
            p = s.panel
            top = s.top[0] if s.top else None
            lines.append(
                f"| {topic} | {utc_stamp(s.window_end)} | {s.value + 0.0:.6g} | {s.baseline_value + 0.0:.6g} | "
                f"{s.completeness_residual:.3g} | {s.n_agents} | {_num(p.get('tvd'))} | {_num(p.get('spearman'))} | "
                f"{_num(p.get('rescale'), '.4g')} | {_num(p.get('rescale_residual'))} | {ginis[(topic, ind)]:.4f} | "
                f"{who(top, 64) if top else 'n/a'} | {_pct(top['share']) if top else 'n/a'} | "
                f"{top.get('followers', 'n/a') if top else 'n/a'} |")
        lines += ["", "Band shares, full scale / visibility panel:", "",
                  "| topic | " + " | ".join(bands) + " |", "|---" * (len(bands) + 1) + "|"]
        for (topic, _), s in rows:
            pb = s.panel.get("bands", {})
            lines.append(f"| {topic} | " + " | ".join(f"{_pct(s.bands[b])} / {_pct(pb.get(b))}" for b in bands) + " |")
        lines += ["", "Peak panel TVD over the period:", "", "| topic | peak TVD | at window end |", "|---|---|---|"]
        for topic in sorted({s.topic for s in snaps if s.indicator == ind}):
            withtvd = [s for s in snaps if s.indicator == ind and s.topic == topic and s.panel.get("tvd") is not None]
            if withtvd:
                peak = max(withtvd, key=lambda s: s.panel["tvd"])
                lines.append(f"| {topic} | {peak.panel['tvd']:.4f} | {utc_stamp(peak.window_end)} |")
        lines.append("")
        captions = {"bands": "Band shares over time", "panel": "Full scale vs visibility panel",
                    "lorenz": "Lorenz curve", "top": "Top culprits", "scaling": "Scaling bias over time"}
        for name in FIGURES:
            lines += [f"![{captions[name]} ({ind})]({figures[f'{name}_{ind}'].name})", ""]
    return "\n".join(lines)

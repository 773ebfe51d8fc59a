"""Soak: the whole pipeline for M minutes at R events/s, event time compressed so that a 6 h
window fills and slides; memory of every process, consumer lag and hop latency over time.

``chorus bench soak --minutes M --rate R``. ``run(quick, minutes, rate) -> str`` returns a
Markdown section (a table per minute and a PNG plot, ``benchmarks/soak.png``); :func:`soak` is
the measurement itself (the test suite runs a short one).

``chorus run``'s parts (``stream.local.runner.Runner``: embedded broker, synthetic relay, ingester,
worker subprocess, operator, metrics endpoint) with the default 6 h window and a 10 min hop; the
ingester and the operator run as their own processes by default (``processes``), as
docker-compose.yml runs them, so that the relay, the ingester and the operator do not share one
Python process (with them in one, the ingester falls behind the relay at 500 events/s and more). The
relay's event time runs ``speed`` = 6 h / (M / 3 min) times the wall clock, so the window is full
after the first third of the run and slides for the rest (it starts M * speed minutes in the past
and ends 2 minutes before now: event time ahead of the wall clock is clamped or refused); it serves R frames (events) per wall
second, a synthetic population of R * M * 60 / 4 accounts (4 events each, after its follow graph).
Every ``sample_s`` seconds: RSS of each process (this one: relay and backfill, plus the ingester
and the operator when they run here; the worker; the broker; the ingester and the operator when
they are processes), input lost at the ingester (reconnects, OutdatedCursor answers and the
frames they skipped: ``chorus_ingest_*``; the relay's own count of what it could not serve is
in the result's ``relay``), consumer lag per stage (``chorus_consumer_lag`` from the merged /metrics), the
worker's held events, and for each new window end published on ``chorus.attributions`` its hop
latency in wall time: publication time minus the wall time at which the relay's event time
passed the window's end.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks import header

WINDOW_S, HOP_S = 6 * 3600, 600
RELAY_RETENTION_S = 120  # seconds of frames (at the soak's rate) the synthetic relay retains


def _scrape(url: str) -> dict:
    """{(name, labels tuple): value} of the merged /metrics endpoint (empty if unreachable)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _rss_mb(pid: int | None) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20 if pid else None
    except psutil.Error:
        return None


async def soak(minutes: float, rate: float, *, window_s: int = WINDOW_S, hop_s: int = HOP_S,
               sample_s: float = 5.0, state_dir: Path | None = None,
               processes: tuple[str, ...] = ("ingester", "operator"), **settings_kw) -> dict:
    """Run the pipeline; returns {"samples": [...], "hops": [...], "relay": {...}, "speed", "accounts",
    "fill_s", "processes"}. ``processes``: the parts run as their own process
    (``RunOptions.processes``; () runs them in this one). ``settings_kw``: further Settings (e.g.
    ``indicators``)."""
    from stream.config import Settings
    from stream.kafka import make_consumer
    from stream.local.runner import RelayPart, Runner, RunOptions
    from stream.schemas import TOPIC_ATTRIBUTIONS, loads

    duration_s = minutes * 60
    fill_s = duration_s / 3
    speed = window_s / fill_s
    accounts = max(1000, int(rate * duration_s / 4))
    tmp = tempfile.TemporaryDirectory() if state_dir is None else None
    root = Path(tmp.name) if tmp else Path(state_dir)
    settings = Settings(state_dir=root, metrics_port=0, window_s=window_s, hop_s=hop_s,
                        operator_snapshot_interval_s=60.0, checkpoint_interval_s=60.0, **settings_kw)
    # Event time runs in the past and ends near now: the ingester clamps a time ahead of its wall
    # clock to +60 s and every consumer rejects input more than max_clock_skew_s ahead, so a
    # compressed clock that started now would leave the firehose clamped and the graph rejected.
    end_margin_s = 120.0
    start_us = int((time.time() - duration_s * speed - RelayPart.FOLLOW_SPAN_S - end_margin_s) * 1e6)
    # The relay keeps RELAY_RETENTION_S of frames (10,000 to 100,000): its log (~1 KB a frame) is
    # full long before the window is, so its growth does not pass for the pipeline's.
    retention = int(min(100_000, max(10_000, rate * RELAY_RETENTION_S)))
    runner = Runner(settings, RunOptions(synthetic=accounts, seed=1, rate=rate / speed, speed=speed, console=False,
                                         start_time_us=start_us, processes=tuple(processes),
                                         relay_retention=retention))
    await runner.start()
    samples, hops, seen = [], [], set()
    consumer = None
    try:
        relay = runner.part("relay")
        wall0 = relay.started_s  # the wall clock when the relay began at event time start_time_us
        consumer = make_consumer(runner.bootstrap, TOPIC_ATTRIBUTIONS)
        await consumer.start()
        t0 = time.monotonic()
        next_sample = t0
        while time.monotonic() - t0 < duration_s:
            for p in runner.parts:
                if p.failure():
                    raise RuntimeError(f"{p.name} failed: {p.failure()}")
            batch = await consumer.getmany(timeout_ms=500)
            now = time.time()
            for msgs in batch.values():
                for m in msgs:
                    end = loads(m.value)["window_end"]
                    if end not in seen:
                        seen.add(end)
                        due = wall0 + (end * 1e6 - relay.start_time_us) / 1e6 / speed
                        hops.append({"t": time.monotonic() - t0, "window_end": end, "latency_s": now - due})
            if time.monotonic() >= next_sample:
                next_sample += sample_s
                m = _scrape(runner.metrics.url)
                lag = {}
                for (name, labels), v in m.items():
                    if name == "chorus_consumer_lag":
                        stage = dict(labels)["stage"]
                        lag[stage] = lag.get(stage, 0) + v
                broker = runner.part("broker")
                pid = lambda name: getattr(getattr(runner.part(name), "proc", None), "pid", None)  # noqa: E731
                samples.append({
                    "t": time.monotonic() - t0,
                    "rss_main_mb": _rss_mb(os.getpid()),
                    "rss_worker_mb": _rss_mb(pid("worker")),
                    "rss_broker_mb": _rss_mb(getattr(getattr(broker.broker, "_proc", None), "pid", None)),
                    "rss_ingester_mb": _rss_mb(pid("ingester")),
                    "rss_operator_mb": _rss_mb(pid("operator")),
                    "lag_worker": lag.get("worker"), "lag_operator": lag.get("operator"),
                    "held": m.get(("chorus_worker_held_events", ()), None),
                    "agents": m.get(("chorus_operator_agents", ()), None),
                    "edges": m.get(("chorus_operator_edges", ()), None),
                    "reconnects": m.get(("chorus_ingest_reconnects_total", ()), None),
                    "outdated": m.get(("chorus_ingest_outdated_cursor_total", ()), None),
                    "skipped": m.get(("chorus_ingest_skipped_frames_total", ()), None),
                })
        conns = relay.relay.connections
        relay_report = {"connections": len(conns), "frames": relay.relay.produced,
                        "outdated": sum("OutdatedCursor" in c.info for c in conns),
                        "too_slow": sum(c.error == "ConsumerTooSlow" for c in conns),
                        "skipped": sum(c.skipped for c in conns)}
    finally:
        if consumer is not None:
            await consumer.stop()
        await runner.stop()
        if tmp:
            tmp.cleanup()
    relay_report["retention"] = retention
    return {"samples": samples, "hops": hops, "relay": relay_report, "speed": speed, "accounts": accounts,
            "fill_s": fill_s, "minutes": minutes, "rate": rate, "processes": tuple(processes)}


RSS_KEYS = (("rss_main_mb", "chorus run"), ("rss_worker_mb", "worker"), ("rss_broker_mb", "broker"),
            ("rss_ingester_mb", "ingester"), ("rss_operator_mb", "operator"))


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, h = res["samples"], res["hops"]
    fig, ax = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    t = [x["t"] / 60 for x in s]
    for key, label in RSS_KEYS:
        if any(x.get(key) for x in s):
            ax[0].plot(t, [x.get(key) or 0 for x in s], label=label)
    ax[0].set_ylabel("RSS (MiB)")
    ax[0].legend(loc="upper left")
    for key, label in (("lag_worker", "worker"), ("lag_operator", "operator")):
        ax[1].plot(t, [x[key] or 0 for x in s], label=label)
    ax[1].set_ylabel("consumer lag (records)")
    ax[1].legend(loc="upper left")
    ax[2].plot([x["t"] / 60 for x in h], [x["latency_s"] for x in h], "o-", ms=3)
    ax[2].set_ylabel("hop latency (s, wall)")
    ax[2].set_xlabel("minutes")
    for a in ax:
        a.axvline(res["fill_s"] / 60, color="grey", ls=":", lw=1)
    fig.suptitle(f"soak: {res['rate']:,.0f} events/s, event time x{res['speed']:.0f} (6 h window full at the dotted line)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _summary(res: dict) -> dict:
    s = [x for x in res["samples"] if x["t"] >= res["fill_s"]]
    out = {}
    for key, _ in RSS_KEYS:
        vals = [x[key] for x in s if x.get(key)]
        out[key] = (vals[0], vals[-1], (vals[-1] - vals[0]) / vals[0]) if len(vals) >= 2 else None
    third = max(1, len(s) // 3)
    for key in ("lag_worker", "lag_operator"):
        vals = [x[key] or 0 for x in s]
        out[key] = (sum(vals[third:2 * third]) / third, sum(vals[-third:]) / third) if len(vals) >= 3 else None
    lat = [x["latency_s"] for x in res["hops"] if x["t"] >= res["fill_s"]]
    out["latency"] = (sorted(lat)[len(lat) // 2], max(lat)) if lat else None
    last = res["samples"][-1] if res["samples"] else {}
    out["lost"] = {k: int(last.get(k) or 0) for k in ("reconnects", "outdated", "skipped")}
    return out


def run(quick: bool = False, minutes: float | None = None, rate: float | None = None) -> str:
    minutes = minutes or (2 if quick else 10)
    rate = rate or (100 if quick else 300)
    res = asyncio.run(soak(minutes, rate))
    png = Path(__file__).resolve().parent / "soak.png"
    _plot(res, png)
    summ = _summary(res)
    rss = [(key, label) for key, label in RSS_KEYS if any(x.get(key) for x in res["samples"])]
    where = (f"the ingester and the operator as their own processes ({', '.join(res['processes'])})"
             if res["processes"] else "the ingester and the operator in the `chorus run` process")
    lines = [
        "## Soak: the whole pipeline with a full, sliding 6 h window",
        "",
        header(),
        f"`chorus bench soak --minutes {minutes:g} --rate {rate:g}`: {rate:,.0f} events/s (wall) from a synthetic "
        f"population of {res['accounts']:,} accounts, event time x{res['speed']:.0f}, so the 6 h window (hop "
        f"{HOP_S // 60} min) is full after {res['fill_s'] / 60:.1f} min and slides for the rest. Load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end (a shared machine). Processes: the "
        f"relay and the backfill in the `chorus run` process, {where}, the worker, the embedded broker.",
        "",
        "![soak](benchmarks/soak.png)",
        "",
        "| minute | " + " | ".join(f"RSS {label} (MiB)" for _, label in rss) +
        " | lag worker | lag operator | held events | operator agents | operator edges | hops published | "
        "reconnects | OutdatedCursor | skipped frames |",
        "|---:|" + "---:|" * (len(rss) + 9),
    ]
    fmt = lambda v, f="{:,.0f}": "n/a" if v is None else f.format(v)  # noqa: E731
    for minute in range(int(minutes) + 1):
        pick = [x for x in res["samples"] if x["t"] <= minute * 60 + 1e-9]
        if not pick:
            continue
        x = pick[-1]
        n_hops = sum(1 for h in res["hops"] if h["t"] <= minute * 60)
        lines.append(f"| {minute} | " + " | ".join(fmt(x.get(key)) for key, _ in rss) + " | "
                     f"{fmt(x['lag_worker'])} | {fmt(x['lag_operator'])} | {fmt(x['held'])} | {fmt(x.get('agents'))} | "
                     f"{fmt(x.get('edges'))} | {n_hops} | "
                     f"{fmt(x.get('reconnects'))} | {fmt(x.get('outdated'))} | {fmt(x.get('skipped'))} |")
    lost, rel = summ["lost"], res["relay"]
    lines += ["", f"Input lost: the ingester reconnected {lost['reconnects']} times, was answered OutdatedCursor "
              f"{lost['outdated']} times and skipped {lost['skipped']:,} frames "
              f"({'none lost' if not lost['skipped'] and not rel['skipped'] else 'the run lost input'}); the relay's own "
              f"count: {rel['connections']} connections, {rel['too_slow']} ConsumerTooSlow, {rel['outdated']} "
              f"OutdatedCursor, {rel['skipped']:,} frames not served of {rel['frames']:,} produced (it retains "
              f"{rel['retention']:,} frames).",
              "", "After the window filled (from the first sample past the dotted line to the last):", ""]
    for key, label in rss:
        v = summ[key]
        lines.append(f"- RSS {label}: {fmt(v[0])} -> {fmt(v[1])} MiB ({v[2]:+.0%}; target < +10 %)" if v else
                     f"- RSS {label}: n/a")
    for key, label in (("lag_worker", "worker lag"), ("lag_operator", "operator lag")):
        v = summ[key]
        lines.append(f"- {label}, mean over the middle vs the last third: {fmt(v[0])} -> {fmt(v[1])} records" if v
                     else f"- {label}: n/a")
    lat = summ["latency"]
    lines.append(f"- hop latency (wall): median {lat[0]:.1f} s, max {lat[1]:.1f} s over "
                 f"{sum(1 for h in res['hops'] if h['t'] >= res['fill_s'])} hops" if lat else "- hop latency: n/a")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    print(run(quick="--quick" in args))

"""The live console view of `chorus run`: what the pipeline currently says, per topic.

Reads ``chorus.attributions`` (latest value per topic and indicator) and the metrics registry
(ingest rate = d/dt of ``chorus_events_published_total``, ``chorus_ingest_lag_seconds``,
``chorus_window_agents``). On a terminal it is a ``rich.live.Live`` view refreshed every second;
otherwise it prints plain lines: each new snapshot once, and a status line every ``plain_every`` s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.columns import Columns
from rich.console import Console as RichConsole
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from operators import attribution
from stream.display import percent, who
from stream.schemas import TOPIC_ATTRIBUTIONS, AttributionSnapshot

log = logging.getLogger("chorus.console")


@dataclass
class Status:
    """Pipeline health read from the metrics registry."""

    events_total: float = 0.0
    rate: float = 0.0          # events/s acknowledged by Kafka, over the last refresh
    lag_s: float | None = None
    cursor: float | None = None
    agents: dict[str, float] = field(default_factory=dict)
    coverage: float | None = None  # chorus_graph_coverage_ratio: how complete the follow graph is
    listing_complete: bool = True   # chorus_backfill_listing_complete (absent: no backfill, nothing to say)


def read_status(registry, previous: Status | None, dt: float) -> Status:
    """Collect the ingest/window figures from ``registry`` (a CollectorRegistry-like object)."""
    st = Status()
    for fam in registry.collect():
        if fam.name == "chorus_events_published":
            st.events_total = sum(s.value for s in fam.samples if s.name.endswith("_total"))
        elif fam.name == "chorus_ingest_lag_seconds" and fam.samples:
            st.lag_s = fam.samples[0].value
        elif fam.name == "chorus_ingest_cursor" and fam.samples:
            st.cursor = fam.samples[0].value
        elif fam.name == "chorus_graph_coverage_ratio" and fam.samples:
            st.coverage = fam.samples[0].value
        elif fam.name == "chorus_backfill_listing_complete" and fam.samples:
            st.listing_complete = fam.samples[0].value >= 1
        elif fam.name == "chorus_window_agents":
            st.agents = {s.labels.get("topic", "?"): s.value for s in fam.samples}
    if previous is not None and dt > 0:
        st.rate = max(0.0, (st.events_total - previous.events_total) / dt)
    return st


class Snapshots:
    """Latest ``chorus.attributions`` value per (topic, indicator)."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}
        self.fresh: list[dict[str, Any]] = []  # received since the last plain print

    def add(self, value: dict[str, Any]) -> None:
        self.latest[(value["topic"], value["indicator"])] = value
        self.fresh.append(value)

    def topics(self) -> list[str]:
        return sorted({t for t, _ in self.latest})

    def of(self, topic: str) -> list[dict[str, Any]]:
        return [v for (t, _), v in sorted(self.latest.items()) if t == topic]


def _pct(x: float | None) -> str:
    return percent(x, digits=1, width=5)


def relative_residual(v: dict[str, Any]) -> float:
    """A snapshot value's relative completeness residual (:func:`operators.attribution.relative_residual`)."""
    return attribution.relative_residual(v["completeness_residual"], v["value"], v["baseline_value"])


def status_line(st: Status) -> str:
    lag = "-" if st.lag_s is None else f"{st.lag_s:.1f}s"
    agents = sum(st.agents.values())
    graph = "" if st.coverage is None else f"  graph coverage {st.coverage:.1%}"
    if graph and not st.listing_complete:
        graph += " of listed so far (listing)"
    return (f"ingest {st.rate:7.1f} ev/s  events {st.events_total:.0f}  lag {lag}  window agents {agents:.0f}"
            + graph)


def _num(v) -> float:
    """A published number that may be null (e.g. an uninformative panel TVD) as a float (nan)."""
    return float("nan") if v is None else float(v)


def snapshot_line(v: dict[str, Any]) -> str:
    """One plain line per snapshot: band shares full | panel, residual, tvd, top culprit."""
    bands = " ".join(f"{b}={_pct(s).strip()}|{_pct(v['panel'].get('bands', {}).get(b)).strip()}"
                     for b, s in v["bands"].items())
    top = v["top"][0] if v.get("top") else None
    culprit = f" top={who(top, 64)}:{_pct(top['share']).strip()}" if top else ""
    return (f"[{v['window_end']}] {v['topic']}/{v['indicator']}: F={v['value']:.4g} "
            f"n={v['n_agents']} bands(full|panel) {bands} tvd={_num(v['panel'].get('tvd')):.3f} "
            f"residual={relative_residual(v):.1e}{culprit}")


def topic_panel(topic: str, values: list[dict[str, Any]], agents: float | None, top_n: int = 5) -> Panel:
    """A panel for one topic: band shares full vs panel per indicator, residuals, top culprits."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("band")
    for v in values:
        table.add_column(f"{v['indicator']}\nfull", justify="right")
        table.add_column("\npanel", justify="right", style="cyan")
    bands: list[str] = []
    for v in values:
        bands += [b for b in v["bands"] if b not in bands]
    for b in bands:
        row = [b]
        for v in values:
            row += [_pct(v["bands"].get(b)), _pct(v["panel"].get("bands", {}).get(b))]
        table.add_row(*row)
    table.add_row(*(["TVD"] + sum(([f"{_num(v['panel'].get('tvd')):.3f}", ""] for v in values), [])))
    table.add_row(*(["residual"] + sum(([f"{relative_residual(v):.1e}", ""] for v in values), [])))
    parts: list[Any] = [table]
    for v in values:
        top = v.get("top", [])[:top_n]
        if top:
            culprits = ", ".join(f"{who(t)} {_pct(t['share']).strip()}" for t in top)
            parts.append(Text(f"top {v['indicator']}: {culprits}", overflow="fold"))
    window_end = max(v["window_end"] for v in values)
    stamp = time.strftime("%H:%M:%S", time.localtime(window_end))
    n = f"{agents:.0f}" if agents is not None else str(max(v["n_agents"] for v in values))
    return Panel(Group(*parts), title=f"[bold]{topic}[/] · {n} agents · window end {stamp}", expand=False)


def render(snaps: Snapshots, st: Status) -> Group:
    """The whole live view."""
    head = Text(status_line(st), style="bold green")
    if not snaps.latest:
        return Group(head, Text("waiting for the first attribution snapshot (one hop)…", style="dim"))
    panels = [topic_panel(t, snaps.of(t), st.agents.get(t)) for t in snaps.topics()]
    return Group(head, Columns(panels))


class Console:
    """A `chorus run` part: consumes ``chorus.attributions`` and shows it (rich or plain lines)."""

    name = "console"

    def __init__(self, bootstrap: str, registry, settings=None, *, out: TextIO | None = None,
                 tty: bool | None = None, refresh: float = 1.0, plain_every: float | None = None):
        self.bootstrap = bootstrap
        self.registry = registry
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.refresh = refresh
        hop = settings.window[1] if settings is not None else 10
        self.plain_every = plain_every or max(float(hop), 5.0)
        self.snaps = Snapshots()
        self.status = Status()
        self._tasks: list[asyncio.Task] = []
        self._consumer = None

    async def start(self) -> None:
        from stream.kafka import make_consumer

        # No group and "latest": a view of what happens from now on, committing nothing.
        self._consumer = make_consumer(self.bootstrap, TOPIC_ATTRIBUTIONS, auto_offset_reset="latest")
        await self._consumer.start()
        self._tasks = [asyncio.create_task(self._consume(), name="chorus-console-consume"),
                       asyncio.create_task(self._show(), name="chorus-console-show")]

    async def _consume(self) -> None:
        from stream.config import Settings
        from stream.guard import RecordGuard

        guard = RecordGuard.from_settings("console", Settings())
        async for msg in self._consumer:
            snap = guard.parse(AttributionSnapshot, msg.topic, msg.partition, msg.offset, msg.value, msg.key)
            if snap is not None:  # else rejected, counted and logged
                self.snaps.add(snap.model_dump())

    async def _refresh_status(self, last: float) -> float:
        now = time.monotonic()
        try:
            self.status = await asyncio.to_thread(read_status, self.registry, self.status, now - last)
        except Exception as exc:  # noqa: BLE001 - a view must not take the run down
            log.debug("console: metrics read failed: %r", exc)
        return now

    async def _show(self) -> None:
        last = time.monotonic()
        if self.tty:
            term = RichConsole(file=self.out)
            with Live(render(self.snaps, self.status), console=term, refresh_per_second=2,
                      transient=False, redirect_stdout=False, redirect_stderr=False) as live:
                while True:
                    await asyncio.sleep(self.refresh)
                    last = await self._refresh_status(last)
                    live.update(render(self.snaps, self.status))
        else:
            while True:
                await asyncio.sleep(self.plain_every)
                last = await self._refresh_status(last)
                lines = [status_line(self.status)] + [snapshot_line(v) for v in self.snaps.fresh]
                self.snaps.fresh.clear()
                print("\n".join(lines), file=self.out, flush=True)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks = []
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    def failure(self) -> str | None:
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                return f"console failed: {t.exception()!r}"
        return None

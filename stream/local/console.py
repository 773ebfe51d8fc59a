"""The live console view of `chorus run`: what the pipeline currently says, per topic.

Reads ``chorus.attributions`` (latest value per topic and indicator), ``chorus.alerts`` (the latest
alerts) and the metrics registry
(ingest rate = d/dt of ``chorus_events_published_total``, ``chorus_ingest_lag_seconds``,
``chorus_window_agents``). On a terminal it is a ``rich.live.Live`` view refreshed every second,
laid out for the terminal's size (:func:`layout`: a standard 80x24 terminal shows every topic and
the latest alerts); otherwise it prints plain lines: each new snapshot and alert once, and a status
line every ``plain_every`` s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console as RichConsole
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from operators import attribution
from stream.display import percent, shorten, who
from stream.schemas import TOPIC_ALERTS, TOPIC_ATTRIBUTIONS, Alert, AttributionSnapshot

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
    """Latest ``chorus.attributions`` value per (topic, indicator), and the latest alerts."""

    MAX_ALERTS = 100

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}
        self.fresh: list[dict[str, Any]] = []  # received since the last plain print
        self.alerts: list[dict[str, Any]] = []  # ``chorus.alerts`` values, newest first, ids distinct
        self.fresh_alerts: list[dict[str, Any]] = []

    def add(self, value: dict[str, Any]) -> None:
        self.latest[(value["topic"], value["indicator"])] = value
        self.fresh.append(value)

    def add_alert(self, value: dict[str, Any]) -> None:
        """An alert (a chorus.alerts value); one redelivered with a known id is ignored."""
        if any(a["id"] == value["id"] for a in self.alerts):
            return
        self.alerts.insert(0, value)
        del self.alerts[self.MAX_ALERTS:]
        self.fresh_alerts.append(value)

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


def alert_line(a: dict[str, Any]) -> str:
    """One plain line per alert: ``alert [window_end] SEVERITY rule: summary``."""
    return f"alert [{a['window_end']}] {a['severity'].upper()} {a['rule']}: {a['summary']}"


INDICATOR_ABBREV = {"cascade_reach": "reach", "polarization": "polar", "volume": "vol",
                    "concentration": "conc"}
SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
BAND_ABBREV = {"bottom50": "bot50"}
WIDE = 120  # from this many columns on: full indicator names, shares with a decimal, the TVD


def _share_pair(full: float | None, panel: float | None, wide: bool) -> str:
    """A band's share, full scale | visibility panel, in percent (``-``: the panel has none)."""
    if wide:
        return f"{percent(full)}|{percent(panel)}"
    return f"{percent(full, digits=0).rstrip('%')}|{percent(panel, digits=0).rstrip('%')}"


def _culprit(top: dict[str, Any], wide: bool, width: int) -> str:
    """The top culprit in ``width`` characters: :func:`stream.display.who` when wide; else its handle,
    or its DID without the ``did:plc:`` every synthetic and most real DIDs share."""
    if wide:
        return who(top, max(width - 7, 8))
    return shorten(top.get("handle") or str(top.get("did", "?")).removeprefix("did:plc:"), max(width - 6, 4))


def _alert_time(window_end: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(window_end))


def layout(snaps: Snapshots, st: Status, width: int, height: int) -> Group:
    """The live view for a ``width`` x ``height`` terminal: every section in at most ``height - 1``
    lines (the last stays free for the cursor), no line wider than ``width``.

    Sections: the status line; one compact row per topic and indicator (band shares full|panel in
    percent, the relative completeness residual, the top culprit; a topic's agent count under its
    name); the latest alerts, newest first, in whatever lines are left (at least one). Whatever is
    too long is cut with an ellipsis; rows that do not fit at all are counted in a last row.
    """
    wide = width >= WIDE
    free = max(height - 1, 6)
    parts: list[Any] = [Text(status_line(st), style="bold green", no_wrap=True, overflow="ellipsis")]
    used = 1
    if not snaps.latest:
        parts.append(Text("waiting for the first attribution snapshot (one hop)…", style="dim",
                          no_wrap=True, overflow="ellipsis"))
        used += 1
    else:
        rows = [(t, v) for t in snaps.topics() for v in snaps.of(t)]
        bands: list[str] = []
        for _, v in rows:
            bands += [b for b in v["bands"] if b not in bands]
        window_end = max(v["window_end"] for _, v in rows)
        parts.append(Text(f"window end {_alert_time(window_end)} · band shares of |phi|, full|panel %"
                          + (" · culprit: top share" if wide else ""), style="dim", no_wrap=True,
                          overflow="ellipsis"))
        topic_w, ind_w, band_w = (14, 13, 12) if wide else (9, 5, 6)
        fixed = [topic_w, ind_w] + [band_w] * len(bands) + ([5] if wide else []) + [7]
        culprit_w = max(8, width - sum(fixed) - len(fixed))  # one space between columns
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 1, 0, 0),
                      expand=False)
        table.add_column("topic", no_wrap=True, overflow="ellipsis", width=topic_w)
        table.add_column("indicator" if wide else "ind", no_wrap=True, overflow="ellipsis", width=ind_w)
        for b in bands:
            table.add_column(shorten(b if wide else BAND_ABBREV.get(b, b), band_w), justify="right", no_wrap=True, overflow="ellipsis", width=band_w)
        if wide:
            table.add_column("TVD", justify="right", no_wrap=True, width=5)
        table.add_column("resid", justify="right", no_wrap=True, width=7)
        table.add_column("top culprit: share", no_wrap=True, overflow="ellipsis", width=culprit_w)
        budget = free - used - 1 - 1 - 2  # the title above, the header, the alerts' title and one alert
        shown = rows
        if len(shown) > budget:  # every topic first: one row each (its first indicator), then cut
            budget -= 1  # the line that says so
            firsts = [(t, snaps.of(t)[0]) for t in snaps.topics()]
            shown = firsts[:max(budget, 1)]
        previous = None
        for t, v in shown:
            if t != previous:
                label, previous = t, t
            else:  # a topic's second row: its agent count (the window's, else the snapshot's)
                n = st.agents.get(t)
                label = f"n={int(n) if n is not None else v['n_agents']}"
            ind = v["indicator"] if wide else INDICATOR_ABBREV.get(v["indicator"], v["indicator"])
            top = v["top"][0] if v.get("top") else None
            culprit = f"{percent(top['share']).strip()} {_culprit(top, wide, culprit_w)}" if top else "-"
            cells = [label, ind] + [_share_pair(v["bands"].get(b), v["panel"].get("bands", {}).get(b), wide)
                                    for b in bands]
            if wide:
                cells.append(f"{_num(v['panel'].get('tvd')):.3f}")
            cells += [f"{relative_residual(v):.1e}", culprit]
            table.add_row(*cells)
        parts.append(table)
        if len(shown) < len(rows):
            parts.append(Text(f"… {len(rows) - len(shown)} more rows (a taller terminal shows them)",
                              style="dim", no_wrap=True, overflow="ellipsis"))
        used += 2 + len(shown) + (len(shown) < len(rows))
    left = max(free - used - 1, 1)
    alerts = snaps.alerts[:left]
    parts.append(Text(f"alerts ({len(snaps.alerts)} seen, latest first)" if snaps.alerts
                      else "alerts: none since the view started", style="bold", no_wrap=True))
    if alerts:
        at = Table(box=None, pad_edge=False, show_edge=False, show_header=False, padding=(0, 1, 0, 0),
                   expand=False)
        fixed = [8, 8, 21] if wide else [8, 18]  # time, (severity), rule; narrow: the rule's colour says it
        for w in fixed:
            at.add_column(no_wrap=True, overflow="ellipsis", width=w)
        at.add_column(no_wrap=True, overflow="ellipsis", width=max(8, width - sum(fixed) - len(fixed)))
        for a in alerts:
            style = SEVERITY_STYLE.get(a["severity"])
            rule = Text(a["rule"], style=style)
            cells = [_alert_time(a["window_end"])] + ([Text(a["severity"], style=style)] if wide else [])
            at.add_row(*cells, rule, a["summary"])
        parts.append(at)
    return Group(*parts)


class View:
    """The live view as a renderable that fits whatever terminal draws it (:func:`layout` at the
    console's current width and height, so a resized terminal gets a new layout)."""

    def __init__(self, snaps: Snapshots, st: Status):
        self.snaps, self.status = snaps, st

    def __rich_console__(self, console, options):
        height = options.height or options.size.height or console.height
        yield layout(self.snaps, self.status, options.max_width, height)


def render(snaps: Snapshots, st: Status) -> View:
    """The whole live view (fits the terminal it is printed on)."""
    return View(snaps, st)


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
        self._consumer = make_consumer(self.bootstrap, TOPIC_ATTRIBUTIONS, TOPIC_ALERTS, auto_offset_reset="latest")
        await self._consumer.start()
        self._tasks = [asyncio.create_task(self._consume(), name="chorus-console-consume"),
                       asyncio.create_task(self._show(), name="chorus-console-show")]

    async def _consume(self) -> None:
        from stream.config import Settings
        from stream.guard import RecordGuard

        guard = RecordGuard.from_settings("console", Settings())
        async for msg in self._consumer:
            if msg.topic == TOPIC_ALERTS:
                alert = guard.parse(Alert, msg.topic, msg.partition, msg.offset, msg.value, msg.key)
                if alert is not None:
                    self.snaps.add_alert(alert.model_dump())
                continue
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
                lines = ([status_line(self.status)] + [snapshot_line(v) for v in self.snaps.fresh]
                         + [alert_line(a) for a in self.snaps.fresh_alerts])
                self.snaps.fresh.clear()
                self.snaps.fresh_alerts.clear()
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

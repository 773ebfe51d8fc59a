"""Offline analysis (`chorus analyze`): the live feature windows and operator over recorded input.

Inputs, all turned into ``chorus.events`` values (dicts) by the live ingest code:

- a recording from ``chorus record`` (:func:`stream.sim.recording.read_recording` -> raw frames ->
  :func:`stream.ingest.decode.decode_frame`);
- a Jetstream JSON-lines dump (:func:`stream.ingest.jetstream.message_events`, the live Jetstream
  reader's mapping: the firehose's field rules; ``seq`` = Jetstream's cursor ``time_us``; identity
  lines and unknown collections give no event; ``update`` ops are ignored);
- the synthetic population (:class:`stream.sim.synth.Population` frames -> ``decode_frame``).

Processing is the live pipeline without Kafka, in one process and in event-time order: every
event goes through :class:`stream.worker.windows.WindowStore` (``advance`` + ``process``, the worker's
code), follow edges go to :meth:`operators.service.service.OperatorService.apply_edge` as they happen, and
when the clock leaves a hop its feature records go to ``apply_features`` and
:meth:`~operators.service.service.OperatorService.recompute` runs for that hop's ``window_end`` (the
service's own compute: indicators, bands, panel, top 10). Order at a hop boundary is the live
worker's: the edges of the event that opens the next hop are published before the owners close
the hop, so they are in that hop's graph (live, later edges may also be, depending on timing). As live, a hop yields snapshots only for
topics whose features changed (every topic when the follow graph changed); consumers keep the
latest snapshot per (topic, indicator). At the end of the input the last, partial hop is closed
(the worker's idle flush).

Snapshot file (:func:`write_snapshots` / :func:`read_snapshots`), chosen by extension:

- ``.jsonl`` / ``.ndjson`` / ``.json``: one ``chorus.attributions`` value per line, exactly the
  Kafka message value;
- ``.parquet``: one row per (window_end, topic, indicator); scalar fields as columns, the nested
  ``bands``, ``panel``, ``top``, ``error`` and ``band_mass`` as JSON strings (``bands_json``,
  ``panel_json``, ``top_json``, ``error_json``, ``band_mass_json``; files without the last two
  read as empty),
  plus flat copies ``panel_tvd``, ``panel_spearman``, ``panel_rescale``, ``panel_rescale_residual``
  for convenience; the run's settings as JSON under the schema metadata key ``chorus``.

Per-agent file (``--agents``): for the last window, one row per (topic, indicator, agent with a
non-zero attribution): did, followers, band, phi (sum over the indicator's input columns, in the
indicator's units) and share = phi / sum(phi); same extensions.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from stream.config import Settings
from stream.ingest.decode import decode_frame
from stream.schemas import AttributionSnapshot, Features, GraphEdge, graph_value, time_bounds
from stream.worker.lexicon import Classifier, Lexicon
from stream.worker.windows import BadEvent, WindowStore

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


class AnalyzeError(ValueError):
    """Bad input or output for `chorus analyze` (one-line message)."""


# --- inputs ------------------------------------------------------------------------------------

@dataclass
class Source:
    """An event source: ``events`` yields chorus.events dicts; ``total``/``unit`` size the progress
    bar (``advance(n)`` is called with the units consumed); ``invalid`` counts skipped input."""

    name: str
    total: int | None
    unit: str
    events: Callable[["Source", Callable[[int], None]], Iterator[dict]]
    invalid: Counter = field(default_factory=Counter)


def _frame_events(frames: Iterable[bytes], src: Source, step: Callable[[int], None]) -> Iterator[dict]:
    for data in frames:
        d = decode_frame(data)
        for reason in d.invalid:
            src.invalid[reason] += 1
        yield from d.events
        step(1)


def recording_source(path: str | Path) -> Source:
    """A ``chorus record`` file (raises RecordingError when it is not one)."""
    from stream.sim.recording import read_recording, scan_recording

    info = scan_recording(path)
    return Source(f"recording {path}", info.frames, "frames",
                  lambda s, step: _frame_events((f.data for f in read_recording(path)), s, step))


def synthetic_source(n: int, seed: int = 0, **population: Any) -> Source:
    """The seeded synthetic population's frames (``population``: extra Population arguments)."""
    from stream.sim.synth import Population

    # offline there is no backfill: the graph comes first on the firehose, and stays as it is
    pop = Population(n=n, seed=seed, **{"graph_on_firehose": True, "live_follows": False, **population})
    return Source(f"synthetic n={n} seed={seed}", pop.expected()["frames"], "frames",
                  lambda s, step: _frame_events((d for _, _, d in pop.timed_frames()), s, step))


def jetstream_source(path: str | Path) -> Source:
    """A Jetstream JSON-lines dump (progress in bytes; lines through the live reader's decoder)."""
    from stream.ingest.jetstream import decode_message

    path = Path(path)

    def events(src: Source, step: Callable[[int], None]) -> Iterator[dict]:
        with open(path, "rb") as f:
            for line in f:
                step(len(line))
                if not line.strip():
                    continue
                d = decode_message(line)
                for reason in d.invalid:
                    src.invalid[reason] += 1
                yield from d.events

    return Source(f"jetstream {path}", path.stat().st_size, "bytes", events)


def open_source(path: str | Path) -> Source:
    """A recording (by its magic bytes) or else a Jetstream JSON-lines file."""
    from stream.sim.recording import MAGIC

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError as exc:
        raise AnalyzeError(f"cannot read input {path}: {exc.strerror or exc}") from None
    return recording_source(path) if head == MAGIC else jetstream_source(path)


# --- the pipeline ------------------------------------------------------------------------------

class Analyzer:
    """WindowStore + OperatorService in one process (see the module docstring).

    ``feed(event)`` returns the snapshots of a hop the event closed; ``finish()`` those of the last.
    ``steps``/``panel_k``: the settings' (``Settings.steps``, ``Settings.panel_k``) unless given.
    """

    def __init__(self, settings: Settings, *, steps: int | None = None, panel_k: int | None = None,
                 classifier: Callable | None = None):
        from operators.service.service import OperatorService

        self.settings = settings
        window_s, hop_s = settings.window
        self.store = WindowStore(window_s, hop_s, classifier or Classifier(Lexicon.load(settings.topics_file)))
        self.service = OperatorService(settings, steps=steps, panel_k=panel_k)
        self.hops = 0
        self.invalid_events = 0
        self.time_ahead = 0  # events dated beyond the live bound (skipped, see feed)

    def load_graph(self, path: Path) -> int:
        """Add the follow pairs of a graph file (CSV or Parquet with columns follower, followed, as
        ``chorus backfill --graph-file`` reads: :func:`stream.backfill.graph_file.read_pairs`) as the
        graph that exists before the input, dated time_us 1 so that every follow or unfollow of the
        input supersedes them; returns the pairs added. Raises GraphFileError (one line: missing
        columns, the first bad row, no rows); call it before feeding events."""
        from stream.backfill.graph_file import no_pairs, read_pairs

        n = 0
        for _, follower, followed in read_pairs(path):  # every row validated as it is read
            for dst, src in zip(follower, followed):
                self.service.apply_edge(GraphEdge(op="add", src=src, dst=dst, time_us=1))
            n += len(follower)
        if n == 0:
            raise no_pairs(path)
        return n

    def feed(self, ev: dict) -> list[AttributionSnapshot]:
        """Process one chorus.events dict. An event dated more than ``Settings.max_clock_skew_s``
        after the current wall clock is skipped and counted in ``time_ahead``, the live guard's
        rule (:func:`stream.schemas.time_bounds`): one such event would otherwise move the window
        clock to its date and close every hop up to it, cutting the analysis short."""
        store = self.store
        try:
            t = int(ev["time_us"])
        except (KeyError, TypeError, ValueError):
            self.invalid_events += 1
            return []
        if t / 1e6 > time_bounds(self.settings.max_clock_skew_s)["max_time_s"]:
            self.time_ahead += 1
            return []
        before = store.closed
        records = store.advance(t)
        edges: list[tuple] = []
        try:
            _, edges = store.process(ev)  # the clock is already at t: process emits no records
        except (BadEvent, ValueError, KeyError, TypeError):  # as the worker: skip, count
            self.invalid_events += 1
        # The worker publishes an event's edges before the owners close the hop it opens.
        for edge in edges:
            self.service.apply_edge(GraphEdge(**graph_value(*edge)))
        return self._hop(records) if store.closed != before else []

    def finish(self) -> list[AttributionSnapshot]:
        before = self.store.closed
        records = self.store.flush()
        return self._hop(records) if self.store.closed != before else []

    def _hop(self, records: list[dict]) -> list[AttributionSnapshot]:
        """Apply the closed hop's feature records, then the service's compute for its window end."""
        for rec in records:
            self.service.apply_features(Features(**rec))
        self.hops += 1
        return self.service.recompute(window_end=(self.store.closed + 1) * self.store.hop_s)

    def agent_attributions(self) -> list[dict]:
        """Per-agent attribution of the current (last) window, for every topic and indicator.

        The service's own per-agent attribution (``OperatorService.agent_phi``): the same phi its
        snapshot's bands and top list are built from.
        """
        from operators.bands import band_of

        svc = self.service
        st = svc.state
        n, end = st.n_rows, st.window_end
        if not n or end is None:
            return []
        followers = st.followers[:n]
        band = band_of(followers)
        rows = []
        for topic in st.topics:
            for spec in svc.specs:
                phi = svc.agent_phi(topic, spec)[:n]
                total = float(phi.sum())
                for r in np.flatnonzero(phi):
                    rows.append({"topic": topic, "indicator": spec.name, "window_end": int(end),
                                 "did": st.dids[r], "followers": int(followers[r]), "band": str(band[r]),
                                 "phi": float(phi[r]), "share": float(phi[r]) / total if total else 0.0})
        return rows


@dataclass
class AnalyzeResult:
    snapshots: list[AttributionSnapshot]
    agents: list[dict] | None
    events: int
    hops: int
    invalid: dict[str, int]


def analyze(source: Source, settings: Settings, *, steps: int | None = None, panel_k: int | None = None,
            agents: bool = False, progress: bool = True, graph_file: Path | None = None) -> AnalyzeResult:
    """Run the pipeline over ``source`` as fast as it goes (a rich progress bar when ``progress``);
    ``steps``/``panel_k``: the settings' unless given; ``graph_file``: the follow graph that exists
    before the input (:meth:`Analyzer.load_graph`; a recording carries only the follows made
    during it)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    az = Analyzer(settings, steps=steps, panel_k=panel_k)
    if graph_file is not None:
        az.load_graph(graph_file)
    snaps: list[AttributionSnapshot] = []
    n_events = 0
    columns = [TextColumn("[bold]analyze[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(source.name, total=source.total, status="")

        def step(k: int) -> None:
            bar.advance(task, k)

        for ev in source.events(source, step):
            n_events += 1
            out = az.feed(ev)
            if out:
                snaps += out
                bar.update(task, status=f"{az.hops} hops, {len(snaps)} snapshots, window end {out[-1].window_end}")
        snaps += az.finish()
        bar.update(task, status=f"{az.hops} hops, {len(snaps)} snapshots")
    invalid = dict(source.invalid)
    if az.invalid_events:
        invalid["event"] = az.invalid_events
    if az.time_ahead:
        invalid["time_ahead"] = az.time_ahead
    return AnalyzeResult(snaps, az.agent_attributions() if agents else None, n_events, az.hops, invalid)


# --- files -------------------------------------------------------------------------------------

def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise AnalyzeError(f"{path}: unknown file type {suffix or '(none)'!r}; use .parquet or .jsonl")


_NESTED = ("bands", "panel", "top", "error", "band_mass")
_PANEL_FLAT = ("tvd", "spearman", "rescale", "rescale_residual")


def _write_rows(path: Path, rows: list[dict], schema, meta: dict | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if _kind(path) == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    if meta is not None:
        table = table.replace_schema_metadata({"chorus": json.dumps(meta)})
    pq.write_table(table, path)


def write_snapshots(path: str | Path, snaps: Iterable[AttributionSnapshot], meta: dict | None = None) -> int:
    """Write snapshots (format by extension, see the module docstring); returns the row count."""
    import pyarrow as pa

    path = Path(path)
    values = [json.loads(s.to_bytes()) for s in snaps]
    if _kind(path) == "jsonl":
        _write_rows(path, values, None, None)
        return len(values)
    rows = []
    for v in values:
        row = {k: v[k] for k in ("v", "topic", "indicator", "window_end", "value", "baseline_value",
                                 "completeness_residual", "n_agents")}
        row.update({f"{k}_json": json.dumps(v.get(k), separators=(",", ":")) for k in _NESTED})
        row.update({f"panel_{k}": v["panel"].get(k) for k in _PANEL_FLAT})
        rows.append(row)
    schema = pa.schema([("v", pa.int8()), ("topic", pa.string()), ("indicator", pa.string()),
                        ("window_end", pa.int64()), ("value", pa.float64()), ("baseline_value", pa.float64()),
                        ("completeness_residual", pa.float64()), ("n_agents", pa.int64()),
                        *[(f"{k}_json", pa.string()) for k in _NESTED],
                        *[(f"panel_{k}", pa.float64()) for k in _PANEL_FLAT]])
    _write_rows(path, rows, schema, meta or {})
    return len(rows)


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise AnalyzeError(f"file not found: {path}")
    if _kind(path) == "jsonl":
        with open(path, encoding="utf-8") as f:
            try:
                return [json.loads(line) for line in f if line.strip()]
            except ValueError as exc:
                raise AnalyzeError(f"{path}: not JSON lines ({exc})") from None
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types on bad files
        raise AnalyzeError(f"{path}: not a Parquet file ({str(exc).splitlines()[0]})") from None


def read_snapshots(path: str | Path, max_skew_s: float | None = None, hop_s: float = 0.0) -> list[AttributionSnapshot]:
    """Snapshots from a file written by :func:`write_snapshots` (either format). With
    ``max_skew_s``, a window_end more than that plus ``hop_s`` seconds after the wall clock refuses
    the file (AnalyzeError), the live guard's rule (:func:`stream.schemas.time_bounds`)."""
    from pydantic import ValidationError

    path = Path(path)
    context = None if max_skew_s is None else time_bounds(max_skew_s, hop_s)
    out = []
    for row in _read_rows(path):
        if "bands_json" in row:
            row = {k: v for k, v in row.items() if not k.startswith("panel_") and not k.endswith("_json")} | {
                k: json.loads(row[f"{k}_json"]) for k in _NESTED if row.get(f"{k}_json") not in (None, "null")}
        try:
            out.append(AttributionSnapshot.model_validate(row, context=context))
        except ValidationError as exc:
            ahead = [e for e in exc.errors(include_url=False) if e["type"] == "time_bounds"]
            if ahead:
                raise AnalyzeError(f"{path}: {ahead[0]['msg']} (the wall clock plus CHORUS_MAX_CLOCK_SKEW_S): "
                                   "a snapshot from the future, refusing the file") from None
            raise AnalyzeError(f"{path}: not a chorus.attributions snapshot ({str(exc).splitlines()[0]})") from None
        except ValueError as exc:
            raise AnalyzeError(f"{path}: not a chorus.attributions snapshot ({str(exc).splitlines()[0]})") from None
    return out


def write_agents(path: str | Path, rows: list[dict]) -> int:
    """Write per-agent attributions (see the module docstring); returns the row count."""
    import pyarrow as pa

    schema = pa.schema([("topic", pa.string()), ("indicator", pa.string()), ("window_end", pa.int64()),
                        ("did", pa.string()), ("followers", pa.int64()), ("band", pa.string()),
                        ("phi", pa.float64()), ("share", pa.float64())])
    _write_rows(Path(path), rows, schema, None)
    return len(rows)


def read_agents(path: str | Path) -> list[dict]:
    """Per-agent rows from a file written by :func:`write_agents`."""
    rows = _read_rows(Path(path))
    if rows and not {"topic", "indicator", "did", "phi", "followers"} <= rows[0].keys():
        raise AnalyzeError(f"{path}: not a chorus per-agent attribution file")
    return rows

"""The operator service (`chorus operator`): Kafka in, attribution every hop, Kafka and metrics out.

Consumes ``chorus.features`` and ``chorus.graph`` into :class:`operators.service.state.OperatorState`
(device-resident, padded capacity), and at every hop, for each topic whose features changed (every
topic when the follow graph changed), computes each configured indicator (``Settings.indicators``)
with :func:`operators.attribute`, the band shares, the visibility-panel comparison and the top 10;
publishes :class:`stream.schemas.AttributionSnapshot` to ``chorus.attributions`` (key = topic), alerts to
``chorus.alerts`` and sets the ``chorus_attribution_*`` metrics. JAX's default device: the GPU when
JAX sees one, the CPU otherwise (logged at start).

Indicator inputs (feature columns: posts, engagement, stance_sum, reposts), see :data:`INDICATORS`:

- ``cascade_reach``: x_i = posts_i + reposts_i, what agent i pushes into its followers' timelines
  (engagement *received* is other agents' doing and shows up as their reposts); zero baseline.
- ``polarization``: weight = posts, stance = stance_sum (mean stance = stance_sum / posts); baseline
  = every posting agent at the topic's mean (agents with no post are padding-like null players).
- ``volume``: posts; zero baseline.  ``concentration``: engagement received; baseline = the mean
  over agents with engagement.
  The baselines are ``indicators.default_baseline`` (the library's rule): the same numbers as
  ``attribute(F, x)`` on the real rows, and agents with no activity change nobody's attribution.

Quadrature (per topic and indicator, ``rule=None``, the default): each indicator has a ladder of
Gauss-Kronrod rules (``IndicatorSpec.ladder``: node counts 3, 5, 9, 17, 33, 65; graded toward the
baseline for cascade_reach), capped at ``steps`` nodes. Each hop starts at the rung the previous
hop ended on and climbs until the largest per-agent error estimate (``Attribution.error`` summed
over the indicator's columns) is within ``tolerance`` (the ``attribution_error`` alert's, default
1e-3) of max |phi|: the cheapest rung that meets it. When a rung beats the tolerance by 100x the
next hop tries one rung lower. The snapshot's ``error`` says which rule and nodes were used and
how large the estimate is; if even the top rung misses the tolerance the snapshot is published
anyway and the ``attribution_error`` alert fires. A fixed ``rule`` (a reference) uses ``steps``
nodes of it and still publishes its error estimate.

Per-agent attribution phi_i is summed over the indicator's input columns. ``share_i = phi_i /
sum(phi)``; the top 10 are the agents with the largest positive share (largest contribution in the
direction F moved; agents with zero or opposite contribution are never listed), each with its phi
and its error estimate. Band shares are ``bands.band_shares`` (net shares of the absolute mass,
bounded with mixed signs), with ``band_mass`` (positive and negative mass per band) alongside.

Panel (``panel`` field): the top-``panel_k`` visibility panel's attribution against the full one on
the panel members: best single rescale, its relative residual (zero unless agents interact: the
attribution scaling bias), Spearman's rho; the band TVD only when the panel spans two or more
bands (else null). ``panel.sample``: the same for a visibility-biased sample of the topic's
*active* agents (``bands.visibility_sample`` over the agents with non-zero input, inclusion
probability proportional to 1 + followers, seed 0; expected size min(``panel_k``,
SAMPLE_FRACTION of the active agents), so it is a small study at every scale), which spans
bands, so its TVD is informative. Both carry ``scaling`` and ``scaling_residual``
(``bands.scaling_bias``: the mass-weighted best single rescale and its residual, Horvitz-Thompson
weighted by 1 / inclusion probability for the sample, unweighted for the top-k panel); the
sample's ``scaling_residual`` is what the ``panel_disagreement`` alert tests.

Bands are follower percentiles over every agent in state (each DID seen in features or
graph), so they are the same across topics and indicators. ``n_agents`` counts the agents the
indicator sees as active (non-zero input).

Hops (event time): the worker stamps every features message with its hop's ``window_end``;
snapshots carry the newest window end seen. When features with a newer window end arrive, the
hop is computed as soon as the service has caught up with both input topics (a poll returned
nothing and every partition is read to its high watermark), or hop_s / 2 of wall time after they
arrived, so a busy input cannot starve it. Input that changes state later within the same window
end (late features of that hop, follow-graph changes) triggers a *revision*: the same window end
recomputed, at most once per hop_s / 2 (subscribers keep the latest snapshot per topic,
indicator and window end). :meth:`OperatorService.recompute` does one hop's work synchronously
and is what tests call directly; :meth:`run` is the Kafka loop around it.

Restarts: the service commits no offsets. It reads both topics from the beginning with no consumer
group, and state updates are idempotent (latest features per DID; add/remove edges as a set), so
after catching up the state equals that of an uninterrupted run, and the next snapshot is the
same. A snapshot for a window end already published before the restart may be published again
with the same content (at-least-once; alert ids are deterministic so duplicates can be dropped).
Stale records: every contribution in a record stamped ``window_end = e`` lies in a bucket before e,
so by window end ``e + window_s`` each DID has a newer record (a change or its expiry). A DID whose
latest record ended at ``e <= window_end - window_s`` is therefore expired at that hop even if
its expiry never arrived (a restarted worker rebuilds its window by replay and cannot know which
DIDs its predecessor published). In an intact stream this changes nothing.

Alert state (previous hop, cooldowns) starts empty after a restart, so the first hop after it raises
no hop-to-hop alerts (new culprit, band shift).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stream import metrics
from stream import topics as topic_registry
from stream.config import Settings, bootstrap_servers
from stream.guard import RecordGuard, reason_of
from stream.schemas import (TOPIC_ATTRIBUTIONS, TOPIC_DEAD_LETTER, TOPIC_FEATURES, TOPIC_GRAPH, TOPIC_IDENTITIES,
                            AttributionSnapshot, Features, GraphEdge, Identity)

from operators import indicators
from operators.bands import (BandIndex, band_summary, panel_agents, panel_comparison, scaling_bias,
                              visibility_sample)
from operators.service.alert_sink import AlertPublisher, load_rules
from operators.service.alerts import AlertEngine
from operators.attribution import NonFiniteError, attribute
from operators.graph import pow2_at_least
from operators.service.state import OperatorState

log = logging.getLogger("chorus.operator")

TOP_K = 10
KRONROD_STEPS = (3, 5, 9, 17, 33, 65)  # the ladder's node counts (2n + 1)
START_STEPS = 17  # the first hop's rung
STEP_DOWN_MARGIN = 100.0  # an estimate this far below tolerance tries one rung lower next hop
SAMPLE_FACTOR = 1  # visibility sample size <= SAMPLE_FACTOR * panel_k (expected): the panel's budget
SAMPLE_FRACTION = 0.25  # ... and <= this share of the topic's active agents (a small study at test sizes too)


# --- indicator specs: inputs from the (C, 4) feature matrix, and the indicator itself -----------

@jax.jit
def _activity(x):  # posts + reposts
    return x[:, 0] + x[:, 3], (x[:, 0] + x[:, 3]) > 0


@jax.jit
def _posts_stance(x):
    return x[:, jnp.array([0, 2])], x[:, 0] > 0


@jax.jit
def _posts(x):
    return x[:, 0], x[:, 0] > 0


@jax.jit
def _engagement(x):
    return x[:, 1], x[:, 1] > 0


@dataclass(frozen=True)
class IndicatorSpec:
    """How the service feeds one indicator: ``inputs(x4) -> (x_in, active)`` on device, and
    ``make(state, settings) -> F`` (the indicator over x_in; ``settings``: its parameters, e.g.
    ``Settings.cascade_p``)."""

    name: str
    inputs: Callable
    make: Callable[[OperatorState, Settings], Callable]
    columns: str  # documentation: what x_in is
    # ``panel(state, rows, settings, cache slot) -> F'``: an indicator equal to F whenever only ``rows``
    # differ from the zero baseline (the panel attribution), cheaper to evaluate; None: F itself
    panel: Callable[[OperatorState, np.ndarray, Settings, str], Callable] | None = None
    # the quadrature ladder, cheapest first: (rule, steps)
    ladder: tuple[tuple[str, int], ...] = tuple(("gauss-kronrod", k) for k in KRONROD_STEPS)
    # ``panel_by_source(state, rows, settings, cache slot) -> (F', nodes) | None``: the same as ``panel``
    # with x given for ``nodes`` only (F'(x[nodes]), nodes[k] = -1: an unused row at the baseline), so
    # the panel attribution costs O(its edges), not O(all agents); None: not available (use ``panel``)
    panel_by_source: Callable[[OperatorState, np.ndarray, Settings, str], tuple | None] | None = None


def _cascade_by_source(g, s: Settings):
    """Cascade reach on a panel graph with x per source slot (bucketed graphs; an edge-list graph
    of a small state has no source table: None)."""
    if getattr(g, "t_nodes", None) is None:
        return None
    return indicators.cascade_reach(g, p=s.cascade_p, by_source=True), g.t_nodes


INDICATORS: dict[str, IndicatorSpec] = {
    "cascade_reach": IndicatorSpec("cascade_reach", _activity,
                                   lambda st, s: indicators.cascade_reach(st.graph(), p=s.cascade_p),
                                   "posts + reposts",
                                   lambda st, rows, s, slot="": indicators.cascade_reach(st.panel_graph(rows, slot),
                                                                                         p=s.cascade_p),
                                   tuple(("gauss-kronrod-graded", k) for k in KRONROD_STEPS),
                                   lambda st, rows, s, slot="": _cascade_by_source(st.panel_graph(rows, slot), s)),
    "polarization": IndicatorSpec("polarization", _posts_stance,
                                  lambda st, s: indicators.polarization(weight_col=0, stance_col=1),
                                  "weight = posts, stance = stance_sum"),
    "volume": IndicatorSpec("volume", _posts, lambda st, s: indicators.volume(), "posts"),
    "concentration": IndicatorSpec("concentration", _engagement,
                                   lambda st, s: indicators.concentration(column=0), "engagement"),
}


def top_agents(phi: np.ndarray, k: int = TOP_K) -> list[tuple[int, float]]:
    """Up to k rows with the largest positive share phi_i / sum(phi), as (row, share), best first."""
    total = float(phi.sum(dtype=np.float64))
    if phi.size == 0 or total == 0.0 or not np.isfinite(total):
        return []
    share = phi / total
    k = min(k, share.size)
    idx = np.argpartition(-share, k - 1)[:k]
    idx = idx[np.argsort(-share[idx], kind="stable")]
    return [(int(i), float(share[i])) for i in idx if share[i] > 0]


def check_indicators(names) -> None:
    """Raise ValueError (one line, the known names) if ``names`` is empty or any is not in
    :data:`INDICATORS` (no indicator would publish nothing, hop after hop, with no error)."""
    if not list(names):
        raise ValueError(f"no indicator configured (CHORUS_INDICATORS is empty); known: {', '.join(INDICATORS)}")
    unknown = [n for n in names if n not in INDICATORS]
    if unknown:
        raise ValueError(f"unknown indicator(s) {', '.join(unknown)}; known: {', '.join(INDICATORS)}")


class OperatorService:
    """``await OperatorService(settings).run()`` until ``await stop()``; or call
    :meth:`apply_features` / :meth:`apply_edge` / :meth:`recompute` directly (no Kafka).

    ``steps``, ``panel_k``, ``rule``: the settings' (``Settings.steps``, ``panel_k``,
    ``quadrature_rule``) unless given here. ``rule`` None picks each indicator's Gauss-Kronrod
    rung per hop (module docstring, "Quadrature"; ``steps`` caps the nodes, ``tolerance``
    overrides the attribution_error alert's); a rule name (operators.quadrature) uses it with
    ``steps`` nodes. ``active_only`` (default): per topic,
    cascade_reach runs on the follow graph restricted to edges out of the topic's active agents
    (``OperatorState.active_graph``: an edge list rebuilt per hop for a small graph, else kept
    incrementally; its panel on the active panel members' edges) and the graph-free indicators on the active rows only -- the same phi, R(x), R(b) as
    the full inputs (agents with zero input are exact null players that move nothing on the path;
    operators.subgraph). False: every indicator on the full graph and all rows (the reference).
    """

    def __init__(self, settings: Settings | None = None, *, steps: int | None = None, panel_k: int | None = None,
                 state: OperatorState | None = None, engine: AlertEngine | None = None,
                 rule: str | None = None, active_only: bool = True, tolerance: float | None = None):
        self.settings = settings or Settings()
        check_indicators(self.settings.indicators)
        self.specs = [INDICATORS[n] for n in self.settings.indicators]
        s = self.settings
        self.steps = s.steps if steps is None else steps
        self.panel_k = s.panel_k if panel_k is None else panel_k
        self.rule = s.quadrature_rule if rule is None else rule
        self.active_only = active_only
        self.state = state or OperatorState()
        self.engine = engine or AlertEngine(load_rules(self.settings.alerts_file))
        # per-agent error target, relative to max |phi|: the attribution_error alert's tolerance
        self.tolerance = float(tolerance if tolerance is not None else self.engine.rules["attribution_error"].threshold)
        self._rung: dict[tuple[str, str], int] = {}  # (topic, indicator) -> ladder index to start at
        self._members_checked = False  # _panel_cache validated against the counts in this hop
        self._panel_cache: tuple | None = None  # (key, (panel, bands, padded bands)), see _panel_members
        self.last_quadrature: dict[tuple[str, str], tuple[str, int]] = {}  # (topic, indicator) -> (rule, steps)
        self.hop_s = self.settings.window[1]
        self.last_end: int | None = None          # window_end of the last recompute
        self.window_s = self.settings.window[0]
        self._graph_changed = False
        self._uses_graph = any(spec.name == "cascade_reach" for spec in self.specs)
        self._pending_since: float | None = None   # wall time of the first change since the last recompute
        self._last_recompute = float("-inf")       # wall time of the last recompute
        self._series: dict[tuple[str, str], set[tuple]] = {}  # (topic, indicator) -> exported (gauge, labels)
        self._stopping = asyncio.Event()
        self.snapshots_published = 0
        self._offsets: dict[tuple[str, int], int] = {}  # input partition -> next offset to read
        self._last_snapshot = time.monotonic()
        self.snapshot_time: float | None = None  # unix time of the last snapshot written
        self.restored_from: str | None = None
        self.recovery_s: float | None = None
        self.guard = RecordGuard.from_settings("operator", self.settings)
        self.handles: dict[str, tuple[int, str | None]] = {}  # DID -> (time_us, handle), chorus.identities

    # --- state input (also used by the Kafka loop) ------------------------------------------
    def apply_features(self, f: Features) -> None:
        self.state.apply_features(f)
        if self.state.changed_topics:
            self._note_change()

    def apply_edge(self, e: GraphEdge) -> None:
        if self.state.apply_edge(e) and self._uses_graph:
            self._graph_changed = True
            self._note_change()

    def apply_identity(self, ident: Identity) -> None:
        """The latest handle of a DID (chorus.identities; newest ``time_us`` wins), shown next to
        the DID in top culprits; a handle of None forgets it."""
        prev = self.handles.get(ident.did)
        if prev is not None and ident.time_us < prev[0]:
            return
        self.handles[ident.did] = (ident.time_us, ident.handle)

    def _note_change(self) -> None:
        if self._pending_since is None:
            self._pending_since = time.monotonic()

    def hop_due(self, caught_up: bool) -> bool:
        """Whether to recompute now (see the module docstring, "Hops").

        A newer window end: as soon as the input is caught up, or hop_s / 2 after it arrived.
        Later changes within the same window end (late features, graph edges): a revision, at most
        one per hop_s / 2, when caught up (or hop_s after the change at the latest).
        """
        if self._pending_since is None or self.state.window_end is None:
            return False
        now, half = time.monotonic(), self.hop_s / 2
        waited = now - self._pending_since
        if self.last_end is None or self.state.window_end > self.last_end:
            return caught_up or waited >= half
        return (caught_up and now - self._last_recompute >= half) or waited >= self.hop_s

    # --- one hop ----------------------------------------------------------------------------
    def recompute(self, window_end: int | None = None) -> list[AttributionSnapshot]:
        """Attribution for every changed topic and configured indicator; sets the metrics.

        ``window_end`` defaults to the newest one seen in the features. Pure compute + metrics
        (no Kafka): the caller publishes the returned snapshots.
        """
        st = self.state
        end = window_end if window_end is not None else st.window_end
        if end is None:
            return []
        self._expire_stale(end)
        st.settle()
        self._members_checked = False  # the follower counts may have changed since the last hop
        changed = st.take_changed()
        if self._graph_changed:
            changed |= set(st.topics)
        self._graph_changed = False
        self._pending_since, self._last_recompute = None, time.monotonic()
        self.last_end = end if self.last_end is None else max(end, self.last_end)
        snaps = []
        try:
            for topic in sorted(changed):
                view = st.features(topic)
                for spec in self.specs:
                    t0 = time.perf_counter()
                    try:
                        snap = self._attribute(topic, spec, view.x, end)
                        _require_finite(snap)
                    except Exception as exc:  # noqa: BLE001 - skip this result, keep serving the others
                        self._skip(topic, spec.name, end, exc)
                        continue
                    metrics.RECOMPUTE_SECONDS.labels(topic=topic, indicator=spec.name).observe(time.perf_counter() - t0)
                    self._export(snap)
                    snaps.append(snap)
        finally:
            self._members_checked = False  # outside a hop the counts may change at any time
        return snaps

    def _skip(self, topic: str, indicator: str, end: int, exc: BaseException) -> None:
        """A result that cannot be published: counted by reason, ``chorus_attribution_healthy`` 0,
        and the pair's other series removed (a dashboard shows a gap, not the last good values)."""
        reason = ("non_finite" if isinstance(exc, (NonFinite, NonFiniteError)) or reason_of(exc) == "non_finite"
                  else "error")
        log.error("skipping %s/%s at %s (%s): %s", topic, indicator, end, reason, str(exc).splitlines()[0])
        metrics.ATTRIBUTION_SKIPPED.labels(topic=topic, indicator=indicator, reason=reason).inc()
        metrics.ATTRIBUTION_HEALTHY.labels(topic=topic, indicator=indicator).set(0)
        self._retire((topic, indicator), set())

    def _expire_stale(self, end: int) -> None:
        """Expire every DID with features whose latest record ended at e <= end - window (see
        "Stale records" in the module docstring). O(rows) numpy per call."""
        st = self.state
        for r in st.stale_rows(end - self.window_s):
            st.apply_features(Features(did=st.dids[r], window_end=st.last_end(r), topics={}, expired=True))

    def _attribute(self, topic: str, spec: IndicatorSpec, x4: jax.Array, end: int) -> AttributionSnapshot:
        st = self.state
        n = st.n_rows
        x, active = spec.inputs(x4)
        if not bool(jnp.isfinite(x).all()):
            raise NonFinite(f"non-finite {spec.columns} in the state")
        F, b, res, phi_full, compact, err_full, error = self._full(topic, spec, x, active)
        phi, followers = phi_full[:n], st.followers[:n]
        ranked = self._panel_members()[1]  # the real rows' bands, ranked once per follower state
        bands, mass, dist = band_summary(phi, ranked)  # one pass: shares, mass, and the panels' reference
        panel = self._panel(spec, F, x, b, phi_full, active, compact, error, topic, dist)
        top = [{"did": st.dids[r], "share": s, "followers": int(followers[r]), "phi": float(phi[r]),
                "error": float(err_full[r])} for r, s in top_agents(phi)]
        for e in top:  # the handle next to the DID, when one is known (chorus.identities)
            handle = self.handles.get(e["did"], (0, None))[1]
            if handle:
                e["handle"] = handle
        return AttributionSnapshot(
            topic=topic, indicator=spec.name, window_end=int(end), value=float(res.value),
            baseline_value=float(res.baseline_value), completeness_residual=float(res.delta),
            n_agents=int(jnp.sum(active)), bands=bands, panel=panel, top=top, error=error,
            band_mass={"positive": mass.positive, "negative": mass.negative,
                       "positive_mass": mass.positive_mass, "negative_mass": mass.negative_mass},
        )

    def ladder(self, spec: IndicatorSpec) -> tuple[tuple[str, int], ...]:
        """The (rule, steps) rungs this service may use for ``spec``: its ladder within ``steps``
        nodes (at least the cheapest rung), or the one fixed ``rule``."""
        if self.rule is not None:
            return ((self.rule, self.steps),)
        return tuple(r for r in spec.ladder if r[1] <= self.steps) or spec.ladder[:1]

    @staticmethod
    def _start(ladder) -> int:
        return max([i for i, (_, k) in enumerate(ladder) if k <= START_STEPS] or [0])

    def _converged(self, topic: str, spec: IndicatorSpec, F, x, b, n: int, quadrature=None):
        """Attribute on the cheapest rung whose per-agent error estimate (first ``n`` rows: the
        real agents) meets the tolerance, starting from the last hop's rung (module docstring,
        "Quadrature"). ``quadrature``: (rule, steps) to use as is (no search, no state change).
        Returns (Attribution, per-agent error (rows,), the snapshot's error dict)."""
        key = (topic, spec.name)
        if quadrature is not None:
            rule, steps = quadrature
            res = attribute(F, x, b, steps=steps, rule=rule)
            err = _per_agent(res.error)
            return res, err, {"rule": rule, "steps": steps}
        ladder = self.ladder(spec)
        i = min(self._rung.get(key, self._start(ladder)), len(ladder) - 1)
        while True:
            rule, steps = ladder[i]
            res = attribute(F, x, b, steps=steps, rule=rule)
            err = _per_agent(res.error)
            scale = float(np.abs(_per_agent(res.phi)[:n]).max()) if n else 0.0
            worst = float(err[:n].max()) if n else 0.0
            if worst <= self.tolerance * scale or i == len(ladder) - 1:
                break
            i += 1
        self._rung[key] = i - 1 if i > 0 and worst * STEP_DOWN_MARGIN <= self.tolerance * scale else i
        self.last_quadrature[key] = (rule, steps)
        return res, err, {"rule": rule, "steps": steps, "max": worst,
                          "relative": worst / scale if scale > 0 else 0.0, "tolerance": self.tolerance,
                          "agents_over": int(np.sum(err[:n] > self.tolerance * scale))}

    def _full(self, topic: str, spec: IndicatorSpec, x, active, quadrature=None):
        """(F, baseline, Attribution, per-agent phi (C,) float64, compact, per-agent error estimate
        (C,), the snapshot's error dict) for one topic and indicator. ``compact``: None, or (rows,
        F, x_c, b_c) when the attribution ran on the active rows only (graph-free indicators with
        ``active_only``)."""
        st = self.state
        compact = None
        if self.active_only and spec.panel is not None:  # graph indicator: the active subgraph
            F = indicators.cascade_reach(st.active_graph(topic, np.asarray(active)), p=self.settings.cascade_p)
        else:
            F = spec.make(st, self.settings)
        if self.active_only and spec.panel is None:
            rows = np.flatnonzero(np.asarray(active)[: st.n_rows])
            idx = np.full(pow2_at_least(rows.size + 1, 1024), st.capacity - 1, np.int64)  # last row: zeros
            idx[: rows.size] = rows
            idx = jnp.asarray(idx)
            x_c, a_c = x[idx], active[idx]
            b_c = indicators.default_baseline(F, x_c, a_c)
            res, err_c, error = self._converged(topic, spec, F, x_c, b_c, rows.size, quadrature)
            phi_full, err_full = np.zeros(st.capacity), np.zeros(st.capacity)
            phi_full[rows] = _per_agent(res.phi)[: rows.size]
            err_full[rows] = err_c[: rows.size]
            b = indicators.default_baseline(F, x, active)
            compact = (rows, idx, F, x_c, b_c)
        else:
            b = indicators.default_baseline(F, x, active)
            res, err_full, error = self._converged(topic, spec, F, x, b, st.n_rows, quadrature)
            phi_full = _per_agent(res.phi)
        return F, b, res, phi_full, compact, err_full, error

    def agent_phi(self, topic: str, spec: IndicatorSpec) -> np.ndarray:
        """Per-agent attribution (C,) of one topic and indicator, as the last hop computed it (the
        same rule and nodes)."""
        x, active = spec.inputs(self.state.features(topic).x)
        return self._full(topic, spec, x, active, self.last_quadrature.get((topic, spec.name)))[3]

    def _panel(self, spec: IndicatorSpec, F, x, b, phi_full: np.ndarray, active=None, compact=None,
               error=None, topic: str = "", full_distribution=None) -> dict:
        """Visibility-panel comparison (k, bands, tvd, spearman, rescale, rescale_residual,
        scaling, scaling_residual, bands_spanned) and the same for the visibility sample of the
        topic's active agents (``sample``).

        Runs on the padded arrays (no retrace); the panel and the sample are drawn among the real
        rows, which are ranked into bands among themselves (padding rows: last band, phi = 0, so
        shares and TVD are the real rows'). Members'
        attributions (:meth:`_members_phi`) use the full attribution's rule and nodes.
        """
        panel, _, ranked_pad = self._panel_members()
        sample, inclusion = self._sample(active)
        out = {}
        for name, members, pi in (("panel", panel, None), ("sample", sample, inclusion)):
            phi_panel = self._members_phi(spec, F, x, b, members, active, compact, error, f"{topic}/{name}")
            # bands ranked among the real rows; padding rows sit in the last band with phi = 0, so
            # the comparison's shares and TVD are those of the real rows
            pc = panel_comparison(F, x, ranked_pad, members=members, baseline=b, phi_full=phi_full,
                                  phi_panel=phi_panel, full_distribution=full_distribution)
            c, resid = scaling_bias(phi_full[members], pc.phi_panel[members], pi)
            out[name] = {"k": int(members.size), "bands": pc.bands,
                         "tvd": _finite(pc.tvd) if pc.informative else None, "spearman": _finite(pc.spearman),
                         "rescale": _finite(pc.rescale), "rescale_residual": _finite(pc.rescale_residual),
                         "scaling": _finite(c), "scaling_residual": _finite(resid),
                         "bands_spanned": pc.bands_spanned}
        return {**out["panel"], "sample": out["sample"]}

    def _panel_members(self) -> tuple[np.ndarray, BandIndex, BandIndex]:
        """(the top-``panel_k`` panel, the real rows' bands, the same padded to the capacity): the
        same for every topic and indicator of a hop, so kept until the follower counts, the rows or
        the capacity change (keyed by the counts' content; checked once per hop)."""
        st = self.state
        n = st.n_rows
        k = max(1, min(self.panel_k, n))
        if self._members_checked and self._panel_cache is not None:  # within one hop: nothing changed
            return self._panel_cache[1]
        key = (n, st.capacity, k, hashlib.blake2b(np.ascontiguousarray(st.followers[:n]), digest_size=16).digest())
        self._members_checked = True
        if self._panel_cache is None or self._panel_cache[0] != key:
            ranked = BandIndex.of(st.followers[:n])  # bands among the real agents
            self._panel_cache = (key, (panel_agents(st.followers[:n], k), ranked, ranked.padded(st.capacity)))
        return self._panel_cache[1]

    def _sample(self, active) -> tuple[np.ndarray, np.ndarray]:
        """(sorted member rows, their inclusion probabilities): the visibility-biased sample of the
        real agents with non-zero input (``active``, (C,) bool), expected size min(``SAMPLE_FACTOR``
        x ``panel_k``, ceil(``SAMPLE_FRACTION`` x #active)), seed 0. O(#active) per call."""
        n = self.state.n_rows
        rows = np.arange(n) if active is None else np.flatnonzero(np.asarray(active)[:n])
        if rows.size == 0:
            return rows, np.ones(0)
        size = max(1, min(SAMPLE_FACTOR * max(1, self.panel_k), int(np.ceil(SAMPLE_FRACTION * rows.size))))
        idx, pi = visibility_sample(self.state.followers[rows], size, seed=0)
        return rows[idx], pi[idx]

    def _members_phi(self, spec: IndicatorSpec, F, x, b, members: np.ndarray, active, compact,
                     error, slot: str = "") -> np.ndarray:
        """Per-agent attribution (C,) of F on ``members`` alone (the others at the baseline).
        ``slot``: the panel-graph cache slot (``OperatorState.panel_graph``) of these members.

        With ``spec.panel`` (cascade_reach: the follow graph restricted to edges out of the members
        -- with ``active_only``, out of the active ones -- exactly the same attribution) F is
        replaced by the cheaper equivalent; with ``compact`` it runs on the active rows only, as
        the full one did."""
        st = self.state
        rule, steps = error["rule"], error["steps"]
        in_set = np.zeros(st.capacity, bool)
        in_set[members] = True
        if compact is not None:
            rows, idx, F_c, x_c, b_c = compact
            mask = jnp.asarray(in_set)[idx].reshape((-1,) + (1,) * (x_c.ndim - 1))
            res = attribute(F_c, jnp.where(mask, x_c, b_c), b_c, steps=steps, rule=rule)
            phi = np.zeros(st.capacity)
            phi[rows] = _per_agent(res.phi)[: rows.size]
            return phi
        if spec.panel is not None:
            rows = members[np.asarray(active)[members]] if self.active_only else members
            slot = slot if self.active_only else ""
            by_source = spec.panel_by_source and spec.panel_by_source(st, rows, self.settings, slot)
            if by_source:  # the members' rows only: O(panel edges), not O(capacity) per node
                F_s, nodes = by_source
                used = nodes >= 0
                idx = jnp.asarray(np.where(used, nodes, st.capacity - 1))  # unused: a padding row (zeros)
                u = jnp.asarray(used).reshape((-1,) + (1,) * (x.ndim - 1))
                b_s = b[idx]
                res = attribute(F_s, jnp.where(u, x[idx], b_s), b_s, steps=steps, rule=rule)
                phi = np.zeros(st.capacity)
                phi[nodes[used]] = _per_agent(res.phi)[used]
                return phi
            F = spec.panel(st, rows, self.settings, slot)
        mask = jnp.asarray(in_set).reshape((-1,) + (1,) * (x.ndim - 1))
        return _per_agent(attribute(F, jnp.where(mask, x, b), b, steps=steps, rule=rule).phi)

    # --- metrics ----------------------------------------------------------------------------
    def _export(self, s: AttributionSnapshot) -> None:
        """Set the pair's series; series of the previous export not set now (a rank no longer
        filled, a DID that left the top 10, an undefined Spearman) are removed, never left frozen."""
        key = (s.topic, s.indicator)
        values: list[tuple[tuple, float]] = [((metrics.MACRO_VALUE, key), s.value),
                                             ((metrics.COMPLETENESS_RESIDUAL, key), s.completeness_residual)]
        values += [((metrics.BAND_SHARE, key + (band,)), share) for band, share in s.bands.items()]
        values += [((metrics.PANEL_BAND_SHARE, key + (band,)), share) for band, share in s.panel.get("bands", {}).items()]
        for gauge, name in ((metrics.PANEL_TVD, "tvd"), (metrics.PANEL_SPEARMAN, "spearman"),
                            (metrics.PANEL_RESCALE_RESIDUAL, "rescale_residual")):
            if s.panel.get(name) is not None:  # None: undefined (e.g. too few panel agents)
                values.append(((gauge, key), s.panel[name]))
        for gauge, name in ((metrics.SAMPLE_TVD, "tvd"), (metrics.SAMPLE_SCALING_RESIDUAL, "scaling_residual")):
            if (s.panel.get("sample") or {}).get(name) is not None:
                values.append(((gauge, key), s.panel["sample"][name]))
        if s.error:
            values += [((metrics.ERROR_ESTIMATE, key), s.error["relative"]), ((metrics.QUADRATURE_NODES, key), s.error["steps"])]
        for rank, e in enumerate(s.top, 1):
            values.append(((metrics.TOP_SHARE, key + (str(rank),)), e["share"]))
            values.append(((metrics.TOP_AGENT, key + (str(rank), e["did"])), 1.0))
        for (gauge, labels), v in values:
            gauge.labels(*labels).set(v)
        self._retire(key, {series for series, _ in values})
        metrics.ATTRIBUTION_HEALTHY.labels(*key).set(1)

    def _retire(self, key: tuple[str, str], keep: set[tuple]) -> None:
        """Remove the pair's exported series that are not in ``keep``; ``keep`` becomes the set."""
        for gauge, labels in self._series.get(key, set()) - keep:
            try:
                gauge.remove(*labels)
            except KeyError:
                pass
        self._series[key] = keep

    # --- Kafka loop -------------------------------------------------------------------------
    async def run(self) -> None:
        """Consume, recompute every hop, publish; returns after :meth:`stop`."""
        from stream.kafka import (ReliableSender, check_topics, ensure_topics, make_consumer, make_producer,
                                  quiet_client_logs)
        from stream.topics import stage_topics

        if not self.settings.kafka:
            raise ValueError("the operator needs Kafka: set CHORUS_KAFKA or pass --kafka kafka://host:port")
        bootstrap = bootstrap_servers(self.settings.kafka)
        # the panel's Spearman needs scipy.stats (imported lazily by operators.bands: ~1.4 s of CPU
        # and ~60 MiB); a long-running operator pays it at start, not as a step in its steady state
        import scipy.stats  # noqa: F401
        log.info("operator: JAX device %s; indicators %s; hop %ss", jax.devices()[0],
                 ", ".join(s.name for s in self.specs), self.hop_s)
        timeout_ms = int(self.settings.kafka_request_timeout_s * 1000)
        specs = stage_topics("operator", self.settings)
        with quiet_client_logs():  # an unreachable Kafka: the error raised from here says it in one line
            await ensure_topics(bootstrap, specs)
            found = await check_topics(bootstrap, specs, "operator")
            consumer = make_consumer(bootstrap, group_id=None,
                                     auto_offset_reset="earliest", max_partition_fetch_bytes=4 << 20,
                                     request_timeout_ms=timeout_ms)
            try:
                await consumer.start()
            except BaseException:
                await consumer.stop()
                raise
        try:
            await self._position(consumer, bootstrap, found)
            producer = make_producer(bootstrap, idempotence=self.settings.kafka_idempotence,
                                     request_timeout_ms=timeout_ms)
            try:
                with quiet_client_logs():
                    await producer.start()
            except BaseException:
                await producer.stop()
                raise
            try:
                self.sender = sender = ReliableSender.for_aiokafka(producer, "operator")
                alerts = AlertPublisher(sender, self.engine)
                while not self._stopping.is_set():
                    batch = await consumer.getmany(timeout_ms=200, max_records=20000)
                    for tp, msgs in batch.items():
                        self._ingest(tp.topic, tp.partition, msgs)
                        self._offsets[(tp.topic, tp.partition)] = msgs[-1].offset + 1
                    if self.hop_due(caught_up=not batch and await self._caught_up(consumer)):
                        t0 = time.monotonic()
                        snaps = await asyncio.to_thread(self.recompute)
                        await self._publish(sender, snaps)
                        fired = await alerts.evaluate_and_publish(snaps)
                        if snaps:  # one line per hop: what `chorus run --no-console` shows while it runs
                            log.info("hop window_end=%s: %d snapshots (%d topics), %d alerts, %d agents, "
                                     "%d edges, in %.1f s", self.last_end, len(snaps),
                                     len({s.topic for s in snaps}), len(fired), self.state.n_rows,
                                     self.state.n_edges, time.monotonic() - t0)
                        await self._observe(consumer)
                        await self._maybe_snapshot(bootstrap)
                    dead = self.guard.take_dead_letters()
                    if dead:
                        await sender.send([(TOPIC_DEAD_LETTER, k, v, None, h) for k, v, h in dead])
                await sender.flush()
            finally:
                await producer.stop()
        finally:
            await consumer.stop()

    # --- snapshots: restart from the state it had, read only what came after ---------------
    def snapshot_dir(self) -> Path:
        return Path(self.settings.state_dir) / "operator"

    async def _position(self, consumer, bootstrap: str, found) -> None:
        """Assign every partition of the input topics; with a usable snapshot (the newest whole
        one of this cluster whose offsets the topics still hold), adopt its state and seek to its
        offsets, else read from the beginning."""
        from aiokafka import TopicPartition

        from stream.worker.checkpoint import CheckpointDir, CheckpointMismatch

        tps = [TopicPartition(t, p) for t in (TOPIC_FEATURES, TOPIC_GRAPH, TOPIC_IDENTITIES)
               for p in range(found.partitions.get(t) or topic_registry.partitions(self.settings, t))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        if self.settings.operator_snapshot_interval_s <= 0:
            return
        first = await consumer.beginning_offsets(tps)
        t0 = time.monotonic()

        def accept(meta: dict) -> None:
            if meta.get("kafka") != bootstrap:
                raise CheckpointMismatch(f"operator snapshot of the Kafka cluster at {meta.get('kafka')}, not {bootstrap}")
            for key, off in meta["offsets"].items():
                topic, p = key.rsplit(":", 1)
                lo = first.get(TopicPartition(topic, int(p)), 0)
                if off < lo:
                    raise CheckpointMismatch(f"operator snapshot offset {off} of {key} is before the first one "
                                             f"the topic still holds ({lo})")

        found_snap = await asyncio.to_thread(CheckpointDir(self.snapshot_dir()).latest, accept)
        if found_snap is None:
            return
        path, meta, arrays = found_snap
        try:
            self.state = await asyncio.to_thread(OperatorState.from_arrays, arrays)
        except (ValueError, KeyError) as exc:
            log.error("not using operator snapshot %s: %s", path, exc)
            return
        for key, off in meta["offsets"].items():
            topic, p = key.rsplit(":", 1)
            tp = TopicPartition(topic, int(p))
            if tp in tps and topic != TOPIC_IDENTITIES:  # handles are not in snapshots: read whole
                consumer.seek(tp, off)
                self._offsets[(topic, int(p))] = off
        self.restored_from = str(path)
        self.recovery_s = time.monotonic() - t0
        self._last_snapshot = time.monotonic()
        self._note_change()
        log.info("operator: restored %s (%d agents, %d edges) in %.1fs", path.name, self.state.n_rows,
                 self.state.n_edges, self.recovery_s)

    def write_snapshot(self, bootstrap: str) -> Path:
        """Write a snapshot of the state and the offsets it covers (blocking)."""
        from stream.worker.checkpoint import CheckpointDir

        meta = {"kafka": bootstrap, "offsets": {f"{t}:{p}": o for (t, p), o in self._offsets.items()}}
        return CheckpointDir(self.snapshot_dir()).write(self.state.to_arrays(), meta)

    async def _maybe_snapshot(self, bootstrap: str) -> None:
        interval = self.settings.operator_snapshot_interval_s
        if interval <= 0 or time.monotonic() - self._last_snapshot < interval:
            return
        self._last_snapshot = time.monotonic()
        arrays = self.state.to_arrays()  # a consistent copy, taken between batches
        meta = {"kafka": bootstrap, "offsets": {f"{t}:{p}": o for (t, p), o in self._offsets.items()}}
        from stream.worker.checkpoint import CheckpointDir

        try:
            await asyncio.to_thread(CheckpointDir(self.snapshot_dir()).write, arrays, meta)
            self.snapshot_time = time.time()
        except OSError as exc:
            log.error("cannot write an operator snapshot to %s: %s", self.snapshot_dir(), exc)

    async def _observe(self, consumer) -> None:
        """Operator metrics: agents, edges, device memory, lag per input partition, snapshot age."""
        st = self.state
        metrics.OPERATOR_AGENTS.set(st.n_rows)
        metrics.OPERATOR_EDGES.set(st.n_edges)
        try:
            stats = jax.devices()[0].memory_stats() or {}
        except Exception:  # noqa: BLE001 - not every backend reports memory
            stats = {}
        metrics.OPERATOR_DEVICE_MEMORY.set(float(stats.get("bytes_in_use", 0)))
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is not None:
                lag = max(0, hw - await consumer.position(tp))
                metrics.CONSUMER_LAG.labels(stage="operator", topic=tp.topic, partition=str(tp.partition)).set(lag)
        metrics.OPERATOR_SNAPSHOT_AGE.set(float("nan") if self.snapshot_time is None else time.time() - self.snapshot_time)

    def _ingest(self, topic: str, partition: int, msgs) -> None:
        """Apply one fetched batch; a record that fails validation (:mod:`stream.guard`) or whose
        application raises is rejected and counted, never raised."""
        guard = self.guard
        model, apply = {TOPIC_FEATURES: (Features, self.apply_features),
                        TOPIC_IDENTITIES: (Identity, self.apply_identity)}.get(topic, (GraphEdge, self.apply_edge))
        for m in msgs:
            value = guard.parse(model, topic, partition, m.offset, m.value, m.key)
            if value is None:
                continue
            try:
                apply(value)
            except Exception as exc:  # noqa: BLE001 - one record must never stop the operator
                guard.reject(topic, partition, m.offset, exc, m.key, m.value)

    @staticmethod
    async def _caught_up(consumer) -> bool:
        """Every assigned partition (features and graph) read up to its high watermark."""
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is None or await consumer.position(tp) < hw:
                return False
        return True

    async def _publish(self, sender, snaps: list[AttributionSnapshot]) -> None:
        """Send the snapshots and wait until Kafka acknowledged them all (retrying through outages)."""
        await sender.send([(TOPIC_ATTRIBUTIONS, s.topic.encode(), s.to_bytes(), None, None) for s in snaps])
        await sender.flush()
        self.snapshots_published += len(snaps)
        now = time.time()
        for end in {s.window_end for s in snaps}:
            metrics.OPERATOR_HOP_LATENCY.observe(max(0.0, now - end))

    async def stop(self) -> None:
        self._stopping.set()


def _per_agent(phi) -> np.ndarray:
    """phi (C,) or (C, d) summed over features, float64."""
    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim == 1:
        return phi
    return phi.reshape(phi.shape[0], -1).sum(axis=1)  # numpy's row sum of (C, 1) is ~8 ms at 2M: skipped above


class NonFinite(ValueError):
    """A snapshot carries NaN or an infinity where a number is needed."""


def _require_finite(s: AttributionSnapshot) -> None:
    """Raise :class:`NonFinite` unless every number a snapshot publishes is finite (value, baseline,
    residual, shares, panel statistics; undefined panel statistics are None, not NaN)."""
    nums = [s.value, s.baseline_value, s.completeness_residual, *s.bands.values(), *(e["share"] for e in s.top)]
    nums += list(s.panel.get("bands", {}).values())
    nums += [v for k, v in s.panel.items() if k != "bands" and isinstance(v, (int, float))]
    if not np.all(np.isfinite(np.asarray(nums, np.float64))):
        raise NonFinite(f"non-finite result (value {s.value}, residual {s.completeness_residual})")


def _finite(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None

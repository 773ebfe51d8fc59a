"""Alert rules over attribution snapshots (pure: no I/O; the service publishes what this returns).

Rules, each evaluated per ``(topic, indicator)`` on every :class:`stream.schemas.AttributionSnapshot`:

- ``new_top_culprit``: an agent in this hop's top 10 that was not in the previous hop's top 10,
  with share >= ``min_share``. The first snapshot of a ``(topic, indicator)`` only sets the
  reference (nothing is "new" without a previous hop).
- ``band_shift``: some band's share moved by ``|s_t - s_{t-1}| >= min_shift`` between consecutive
  hops (shares are fractions of total attribution, so the shift is in share units, 0..1 per band).
- ``panel_disagreement``: the attribution scaling bias on the visibility sample of the topic's
  active agents: ``panel.sample.scaling_residual >= min_rescale_residual``, the mass- and
  Horvitz-Thompson-weighted residual of the best single rescale of the sample's own attribution
  (F on the sample alone) to the full-scale one on the same agents
  (:func:`operators.bands.scaling_bias`). Exactly 0 (silent) for any F without interactions
  between agents (volume, sum(log1p(x)), any sum of per-agent terms); positive when sampled
  agents interact with agents outside the sample unequally (a community sharing followers).
  ``by_indicator`` overrides the threshold per indicator; ``null`` turns the rule off for it
  (polarization by default: every agent interacts with every other through the common mean, so
  its residual is large in every topic and says nothing about an episode; measurement in
  ``operators/data/alerts.yaml``).
- ``completeness_residual``: relative completeness residual (:func:`relative_residual`)
  ``|sum(phi) - (F(x) - F(b))| / |F(x) - F(b)|`` (the denominator floored at 1e-6 |F|, see
  :func:`operators.attribution.relative_residual`) above ``tolerance``. It certifies the sum
  only: per-agent errors of opposite signs cancel in it.
- ``attribution_error``: the largest per-agent quadrature error estimate relative to max |phi|
  (``error.relative``) above ``tolerance``: some agent's phi is not known to that accuracy even
  at the operator's largest rule.

Dedup and cooldown, per key ``(rule, topic, indicator)``:

- cooldown: after an alert at window end ``t`` (event time, seconds) the key stays silent until
  ``window_end >= t + cooldown_s``.
- dedup: an alert is identified by a fingerprint of *what* it is about (the set of new culprits,
  the shifted bands with their direction, or the rule itself for level rules). An *episode* is a
  run of consecutive hops where the condition holds with the same fingerprint; each episode alerts
  at most once: at its first hop outside the cooldown. A snapshot with the window end of the
  latest one is a revision of that hop (compared again with the hop before; a replayed duplicate
  finds its episode already alerted); older window ends are ignored. Alert ids are deterministic (hash of rule, topic, indicator, window end,
  fingerprint), so a subscriber can dedupe redelivered alerts by ``id``.

Every alert carries its evidence: the numbers that triggered it and the threshold.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from operators import attribution
from stream.display import who
from stream.schemas import Alert, AttributionSnapshot

Severity = Literal["info", "warning", "critical"]
RULE_NAMES = ("new_top_culprit", "band_shift", "panel_disagreement", "completeness_residual", "attribution_error")
_SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Rule:
    """One rule's settings: ``threshold`` is X (share), Y (share shift), Z (TVD) or the relative
    residual tolerance, depending on the rule; ``cooldown_s`` in event-time seconds."""

    name: str
    threshold: float
    severity: Severity = "warning"
    cooldown_s: float = 600.0
    enabled: bool = True
    by_indicator: tuple[tuple[str, float | None], ...] = ()  # per-indicator threshold; None: off

    def threshold_for(self, indicator: str) -> float | None:
        """The threshold for ``indicator`` (``by_indicator``, else ``threshold``); None: rule off."""
        return dict(self.by_indicator).get(indicator, self.threshold)


PANEL_RESIDUAL_DEFAULT = 0.008  # see operators/data/alerts.yaml for the measurement behind it
PANEL_BY_INDICATOR_DEFAULT = (("polarization", None),)

# Threshold key each rule takes in the config file (a readable alias of ``threshold``).
THRESHOLD_KEYS = {
    "new_top_culprit": "min_share",
    "band_shift": "min_shift",
    "panel_disagreement": "min_rescale_residual",
    "completeness_residual": "tolerance",
    "attribution_error": "tolerance",
}

PER_INDICATOR = ("panel_disagreement",)  # rules that take a by_indicator section

DEFAULT_RULES: dict[str, Rule] = {
    "new_top_culprit": Rule("new_top_culprit", 0.05, "warning"),
    "band_shift": Rule("band_shift", 0.10, "warning"),
    "panel_disagreement": Rule("panel_disagreement", PANEL_RESIDUAL_DEFAULT, "info",
                               by_indicator=PANEL_BY_INDICATOR_DEFAULT),
    "completeness_residual": Rule("completeness_residual", 1e-3, "critical"),
    "attribution_error": Rule("attribution_error", 1e-3, "warning"),
}


class AlertConfigError(ValueError):
    """The alert rules config is malformed (one-line message)."""


def rules_from_dict(cfg: dict[str, Any] | None) -> dict[str, Rule]:
    """Validate a parsed rules config (see ``operators/data/alerts.yaml``) over the defaults.

    Shape: ``{cooldown_s: float?, rules: {name: {enabled?, severity?, cooldown_s?, <threshold key>?}}}``.
    """
    cfg = cfg or {}
    if not isinstance(cfg, dict):
        raise AlertConfigError("alerts config must be a mapping with a 'rules' section")
    unknown = set(cfg) - {"cooldown_s", "rules"}
    if unknown:
        raise AlertConfigError(f"unknown alerts config key(s): {', '.join(sorted(unknown))}")
    default_cooldown = _number(cfg.get("cooldown_s", 600.0), "cooldown_s", minimum=0.0)
    section = cfg.get("rules") or {}
    if not isinstance(section, dict):
        raise AlertConfigError("alerts config 'rules' must be a mapping of rule name -> settings")
    out: dict[str, Rule] = {}
    for name, base in DEFAULT_RULES.items():
        spec = section.get(name) or {}
        if not isinstance(spec, dict):
            raise AlertConfigError(f"alert rule {name!r} must be a mapping")
        tkey = THRESHOLD_KEYS[name]
        bad = set(spec) - {"enabled", "severity", "cooldown_s", tkey} - ({"by_indicator"} if name in PER_INDICATOR else set())
        if bad:
            raise AlertConfigError(f"alert rule {name!r}: unknown key(s) {', '.join(sorted(bad))} "
                                   f"(threshold key is {tkey!r})")
        severity = spec.get("severity", base.severity)
        if severity not in _SEVERITIES:
            raise AlertConfigError(f"alert rule {name!r}: severity must be one of {', '.join(_SEVERITIES)}")
        out[name] = replace(
            base,
            threshold=_number(spec.get(tkey, base.threshold), f"{name}.{tkey}", minimum=0.0),
            severity=severity,
            cooldown_s=_number(spec.get("cooldown_s", default_cooldown), f"{name}.cooldown_s", minimum=0.0),
            enabled=bool(spec.get("enabled", True)),
            by_indicator=_by_indicator(spec["by_indicator"], name) if "by_indicator" in spec else base.by_indicator,
        )
    unknown_rules = set(section) - set(DEFAULT_RULES)
    if unknown_rules:
        raise AlertConfigError(f"unknown alert rule(s): {', '.join(sorted(unknown_rules))} "
                               f"(known: {', '.join(RULE_NAMES)})")
    return out


def _by_indicator(v: Any, rule: str) -> tuple[tuple[str, float | None], ...]:
    """``{indicator: threshold or null}`` -> sorted pairs (null: the rule is off for it)."""
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise AlertConfigError(f"alert rule {rule!r}: by_indicator must map indicator names to a threshold or null")
    return tuple(sorted((k, None if t is None else _number(t, f"{rule}.by_indicator.{k}", minimum=0.0))
                        for k, t in v.items()))


def _number(v: Any, what: str, minimum: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < minimum:
        raise AlertConfigError(f"alerts config {what} must be a finite number >= {minimum:g} (got {v!r})")
    return float(v)


@dataclass
class _KeyState:
    last_fired_at: float | None = None  # window_end of the last alert
    fingerprint: str | None = None      # fingerprint of the condition true at the previous hop
    alerted: bool = False               # that condition (episode) has been alerted already


@dataclass
class AlertEngine:
    """Stateful evaluator: feed snapshots in hop order with :meth:`evaluate`, get new alerts."""

    rules: dict[str, Rule] = field(default_factory=lambda: dict(DEFAULT_RULES))
    _cur: dict[tuple[str, str], AttributionSnapshot] = field(default_factory=dict, repr=False)   # latest hop
    _prev: dict[tuple[str, str], AttributionSnapshot] = field(default_factory=dict, repr=False)  # hop before
    _keys: dict[tuple[str, str, str], _KeyState] = field(default_factory=dict, repr=False)

    def evaluate(self, snap: AttributionSnapshot) -> list[Alert]:
        """Alerts raised by ``snap`` (possibly none).

        A snapshot with the same window end as the latest one is a revision of that hop (late
        input): it replaces it and is compared with the hop before. Older window ends return [].
        """
        ti = (snap.topic, snap.indicator)
        cur = self._cur.get(ti)
        if cur is not None and snap.window_end < cur.window_end:
            return []
        if cur is not None and snap.window_end > cur.window_end:
            self._prev[ti] = cur
        self._cur[ti] = snap
        prev = self._prev.get(ti)
        alerts = []
        for name, rule in self.rules.items():
            if not rule.enabled:
                continue
            found = _CHECKS[name](rule, snap, prev)  # None or (fingerprint, summary, evidence)
            alert = self._gate(rule, snap, found)
            if alert is not None:
                alerts.append(alert)
        return alerts

    def _gate(self, rule: Rule, snap: AttributionSnapshot, found) -> Alert | None:
        st = self._keys.setdefault((rule.name, snap.topic, snap.indicator), _KeyState())
        if found is None:
            st.fingerprint, st.alerted = None, False
            return None
        fingerprint, summary, evidence = found
        if fingerprint != st.fingerprint:  # a new episode (or a changed one)
            st.fingerprint, st.alerted = fingerprint, False
        if st.alerted:
            return None
        if st.last_fired_at is not None and snap.window_end < st.last_fired_at + rule.cooldown_s:
            return None
        st.last_fired_at, st.alerted = snap.window_end, True
        evidence = {**evidence, "threshold": rule.threshold_for(snap.indicator)}
        return Alert(
            id=alert_id(rule.name, snap.topic, snap.indicator, snap.window_end, fingerprint),
            rule=rule.name, topic=snap.topic, indicator=snap.indicator, window_end=snap.window_end,
            severity=rule.severity, summary=f"{snap.topic}/{snap.indicator}: {summary}", evidence=evidence,
        )


def alert_id(rule: str, topic: str, indicator: str, window_end: int, fingerprint: str) -> str:
    """Deterministic 16-hex id of an alert (same input, same id: subscribers dedupe by it)."""
    raw = "\x1f".join((rule, topic, indicator, str(window_end), fingerprint)).encode()
    return hashlib.sha1(raw).hexdigest()[:16]


# --- the rules: each returns None (condition false) or (fingerprint, summary, evidence) -----------

def _new_top_culprit(rule: Rule, snap: AttributionSnapshot, prev: AttributionSnapshot | None):
    if prev is None:
        return None
    before = {e["did"] for e in prev.top}
    new = [dict(e, rank=r) for r, e in enumerate(snap.top, 1)
           if e["did"] not in before and float(e["share"]) >= rule.threshold]
    if not new:
        return None
    fp = ",".join(sorted(e["did"] for e in new))
    lead = new[0]
    more = f" (+{len(new) - 1} more)" if len(new) > 1 else ""
    summary = f"new top-10 culprit {who(lead, 64)} at rank {lead['rank']} with share {lead['share']:.3f}{more}"
    return fp, summary, {"culprits": new, "previous_top": [e["did"] for e in prev.top],
                         "previous_window_end": prev.window_end}


def _band_shift(rule: Rule, snap: AttributionSnapshot, prev: AttributionSnapshot | None):
    if prev is None:
        return None
    shifts = {}
    for band in sorted(set(snap.bands) | set(prev.bands)):
        a, b = float(prev.bands.get(band, 0.0)), float(snap.bands.get(band, 0.0))
        if abs(b - a) >= rule.threshold:
            shifts[band] = {"previous": a, "current": b, "shift": b - a}
    if not shifts:
        return None
    fp = ",".join(f"{band}{'+' if s['shift'] > 0 else '-'}" for band, s in shifts.items())
    band, s = max(shifts.items(), key=lambda kv: abs(kv[1]["shift"]))
    summary = f"band {band} share {s['previous']:.3f} -> {s['current']:.3f} ({s['shift']:+.3f})"
    return fp, summary, {"shifts": shifts, "previous_window_end": prev.window_end}


def _panel_disagreement(rule: Rule, snap: AttributionSnapshot, prev: AttributionSnapshot | None):
    threshold = rule.threshold_for(snap.indicator)
    sample = snap.panel.get("sample") or {}
    resid = sample.get("scaling_residual")
    if threshold is None or resid is None or not math.isfinite(float(resid)) or float(resid) < threshold:
        return None
    evidence = {"scaling_residual": float(resid), "scaling": sample.get("scaling"), "k": sample.get("k"),
                "full_bands": dict(snap.bands),
                "sample_bands": dict(sample.get("bands", {}))}
    for k in ("rescale", "rescale_residual", "spearman", "tvd", "bands_spanned"):
        if k in sample:
            evidence[f"sample_{k}"] = sample[k]
    if "rescale_residual" in snap.panel:
        evidence["panel_rescale_residual"] = snap.panel["rescale_residual"]
    return "level", (f"no single rescale reconciles a visibility sample's own attribution with full scale "
                     f"(scaling residual {float(resid):.3g}, rescale {float(sample.get('scaling') or 0):.3g}): "
                     f"sampled agents interact with the rest unequally"), evidence


def relative_residual(snap: AttributionSnapshot) -> float:
    """The snapshot's relative completeness residual (:func:`operators.attribution.relative_residual`)."""
    return attribution.relative_residual(snap.completeness_residual, snap.value, snap.baseline_value)


def _completeness_residual(rule: Rule, snap: AttributionSnapshot, prev: AttributionSnapshot | None):
    rel = relative_residual(snap)
    if not math.isnan(rel) and rel <= rule.threshold:
        return None
    return "level", f"completeness residual {rel:.2e} of F(x)-F(b) above tolerance", {
        "residual": snap.completeness_residual, "relative": rel, "value": snap.value,
        "baseline_value": snap.baseline_value, "n_agents": snap.n_agents}


def _attribution_error(rule: Rule, snap: AttributionSnapshot, prev: AttributionSnapshot | None):
    error = getattr(snap, "error", None) or {}
    rel = error.get("relative")
    if rel is None or (math.isfinite(float(rel)) and float(rel) <= rule.threshold):
        return None
    return "level", (f"per-agent error estimate {float(rel):.2e} of max |phi| above tolerance "
                     f"({error.get('rule')}, {error.get('steps')} nodes)"), dict(error)


_CHECKS = {
    "new_top_culprit": _new_top_culprit,
    "band_shift": _band_shift,
    "panel_disagreement": _panel_disagreement,
    "completeness_residual": _completeness_residual,
    "attribution_error": _attribution_error,
}

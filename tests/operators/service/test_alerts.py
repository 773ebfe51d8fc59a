"""Alert rules on hand-built snapshots: thresholds, evidence, cooldown, dedup, config."""

from __future__ import annotations

import pytest

from operators.service.alert_sink import load_rules
from operators.service.alerts import DEFAULT_RULES, AlertConfigError, AlertEngine, alert_id, rules_from_dict
from stream.schemas import Alert, AttributionSnapshot

BANDS = ("top0.1", "0.1-1", "1-10", "10-50", "bottom50")


def snap(end, top=(), bands=(0.2, 0.2, 0.2, 0.2, 0.2), panel_bands=None, tvd=None, value=1.0,
         base=0.0, delta=0.0, topic="t", indicator="polarization", residual=0.01, error=None) -> AttributionSnapshot:
    bands = dict(zip(BANDS, bands))
    pb = dict(zip(BANDS, panel_bands)) if panel_bands else dict(bands)
    if tvd is None:
        tvd = 0.5 * sum(abs(bands[b] - pb[b]) for b in BANDS)
    return AttributionSnapshot(topic=topic, indicator=indicator, window_end=end, value=value, baseline_value=base,
                       completeness_residual=delta, n_agents=100, bands=bands,
                       panel={"bands": pb, "tvd": tvd, "spearman": 0.5, "rescale": 1.0,
                              "rescale_residual": 0.5,  # the top-k panel's: not what the rule tests
                              "sample": {"k": 20, "bands": pb, "scaling": 0.9, "scaling_residual": residual}},
                       top=[{"did": d, "share": s, "followers": 1} for d, s in top], error=error or {})


def only(rule, cooldown=100.0, **threshold):
    rules = {name: dict(enabled=name == rule, cooldown_s=cooldown) for name in DEFAULT_RULES}
    rules[rule].update(threshold)
    return AlertEngine(rules_from_dict({"rules": rules}))


TOP_A = [("did:a", 0.4), ("did:b", 0.3)]


def test_new_top_culprit_needs_previous_hop_threshold_and_carries_evidence():
    eng = only("new_top_culprit", min_share=0.1)
    assert eng.evaluate(snap(0, TOP_A)) == []                      # first hop sets the reference
    assert eng.evaluate(snap(60, TOP_A)) == []                     # nobody new
    out = eng.evaluate(snap(120, TOP_A + [("did:small", 0.05), ("did:big", 0.2)]))
    assert len(out) == 1 and isinstance(out[0], Alert)
    a = out[0]
    assert a.rule == "new_top_culprit" and a.window_end == 120 and a.severity == "warning"
    assert [c["did"] for c in a.evidence["culprits"]] == ["did:big"]   # did:small is under X
    assert a.evidence["culprits"][0]["rank"] == 4 and a.evidence["threshold"] == 0.1
    assert a.evidence["previous_top"] == ["did:a", "did:b"] and "did:big" in a.summary
    assert a.id == alert_id("new_top_culprit", "t", "polarization", 120, "did:big")


def test_a_revised_hop_is_compared_with_the_hop_before():
    eng = only("new_top_culprit", min_share=0.1)
    eng.evaluate(snap(0, TOP_A))
    assert eng.evaluate(snap(60, TOP_A[:1])) == []                      # partial hop: nobody new
    out = eng.evaluate(snap(60, TOP_A + [("did:c", 0.2)]))               # late input, same hop
    assert [c["did"] for c in out[0].evidence["culprits"]] == ["did:c"]  # did:b was there at hop 0
    assert eng.evaluate(snap(60, TOP_A + [("did:c", 0.2)])) == []       # duplicate: already alerted


def test_band_shift_between_hops():
    eng = only("band_shift", min_shift=0.1)
    assert eng.evaluate(snap(0)) == []
    assert eng.evaluate(snap(60, bands=(0.25, 0.2, 0.2, 0.2, 0.15))) == []   # 0.05 < Y
    out = eng.evaluate(snap(120, bands=(0.45, 0.2, 0.2, 0.2, -0.05)))
    assert len(out) == 1
    shifts = out[0].evidence["shifts"]
    assert set(shifts) == {"top0.1", "bottom50"}
    assert shifts["top0.1"] == pytest.approx({"previous": 0.25, "current": 0.45, "shift": 0.2})


def test_panel_disagreement_dedups_while_ongoing_and_respects_cooldown():
    eng = only("panel_disagreement", cooldown=100.0, min_rescale_residual=0.1)
    far = dict(residual=0.4, indicator="cascade_reach")  # no single rescale reconciles the panel
    fired = [len(eng.evaluate(snap(t, **far))) for t in (0, 60, 120, 180, 240)]
    assert fired == [1, 0, 0, 0, 0]                      # ongoing condition: one alert
    assert eng.evaluate(snap(300, indicator="cascade_reach")) == []  # cleared
    assert len(eng.evaluate(snap(360, **far))) == 1      # back, and the cooldown (100 s) passed
    assert eng.evaluate(snap(420, indicator="cascade_reach")) == []  # cleared
    assert eng.evaluate(snap(440, **far)) == []          # new episode within the cooldown: silent
    assert len(eng.evaluate(snap(480, **far))) == 1      # same episode, cooldown over: alerts once
    assert eng.evaluate(snap(600, **far)) == []


def test_cooldown_per_key_and_independent_keys():
    eng = only("new_top_culprit", cooldown=300.0, min_share=0.1)
    for topic in ("t", "u"):
        eng.evaluate(snap(0, TOP_A, topic=topic))
    assert len(eng.evaluate(snap(60, TOP_A + [("did:c", 0.2)]))) == 1
    assert eng.evaluate(snap(120, TOP_A + [("did:d", 0.2)])) == []     # t in cooldown
    assert len(eng.evaluate(snap(120, TOP_A + [("did:d", 0.2)], topic="u"))) == 1  # other key
    assert len(eng.evaluate(snap(400, TOP_A + [("did:e", 0.2)]))) == 1  # cooldown over


def test_replayed_or_stale_snapshots_are_ignored():
    eng = only("panel_disagreement", cooldown=0.0, min_rescale_residual=0.1)
    far = dict(residual=0.4, indicator="cascade_reach")
    first = eng.evaluate(snap(60, **far))
    assert len(first) == 1
    assert eng.evaluate(snap(60, **far)) == [] and eng.evaluate(snap(0, **far)) == []
    # a fresh engine fed the same snapshot gives the same id (subscribers dedupe by id)
    assert only("panel_disagreement", cooldown=0.0, min_rescale_residual=0.1).evaluate(snap(60, **far))[0].id == first[0].id


def test_panel_disagreement_tests_the_samples_scaling_residual_per_indicator():
    """The rule reads panel.sample.scaling_residual (not the top-k panel's residual, not the band
    TVD: a top-k panel in one band has TVD ~ 1 for any F); polarization is off by default and
    ``by_indicator`` sets a threshold per indicator (null: off)."""
    eng = only("panel_disagreement", cooldown=0.0, min_rescale_residual=0.1)
    cas = dict(indicator="cascade_reach")
    assert eng.evaluate(snap(0, panel_bands=(1.0, 0, 0, 0, 0), residual=0.0, **cas)) == []
    out = eng.evaluate(snap(60, residual=0.25, **cas))
    assert len(out) == 1 and out[0].evidence["scaling_residual"] == 0.25 and out[0].evidence["threshold"] == 0.1
    assert out[0].evidence["panel_rescale_residual"] == 0.5 and out[0].evidence["scaling"] == 0.9
    assert eng.evaluate(snap(60, residual=0.9, indicator="polarization")) == []  # default: off
    rules = rules_from_dict({"rules": {"panel_disagreement": {
        "min_rescale_residual": 0.1, "by_indicator": {"polarization": 0.5, "cascade_reach": None}}}})
    assert rules["panel_disagreement"].threshold_for("volume") == 0.1
    eng = AlertEngine(rules)
    assert eng.evaluate(snap(0, residual=0.9, **cas)) == []
    assert eng.evaluate(snap(0, residual=0.4, indicator="polarization")) == []
    (a,) = eng.evaluate(snap(60, residual=0.6, indicator="polarization"))
    assert a.evidence["threshold"] == 0.5
    with pytest.raises(AlertConfigError, match="by_indicator"):
        rules_from_dict({"rules": {"panel_disagreement": {"by_indicator": {"polarization": "high"}}}})
    with pytest.raises(AlertConfigError, match="by_indicator"):
        rules_from_dict({"rules": {"band_shift": {"by_indicator": {}}}})


def test_attribution_error_tolerance():
    eng = only("attribution_error", tolerance=1e-3)
    ok = {"rule": "gauss-kronrod", "steps": 17, "max": 1e-5, "relative": 5e-4, "tolerance": 1e-3}
    assert eng.evaluate(snap(0, error=ok)) == [] and eng.evaluate(snap(30)) == []  # no estimate: silent
    out = eng.evaluate(snap(60, error={**ok, "steps": 65, "relative": 4e-3}))
    assert len(out) == 1 and out[0].evidence["relative"] == 4e-3 and "65 nodes" in out[0].summary
    fresh = only("attribution_error", tolerance=1e-3)
    assert fresh.evaluate(snap(90, error={**ok, "relative": float("nan")}))  # NaN is never fine


def test_completeness_residual_relative_tolerance():
    eng = only("completeness_residual", tolerance=1e-4)
    assert eng.evaluate(snap(0, value=2.0, base=1.0, delta=5e-5)) == []   # 5e-5 relative
    out = eng.evaluate(snap(60, value=2.0, base=1.0, delta=-3e-4))
    assert len(out) == 1 and out[0].severity == "critical"
    assert out[0].evidence["relative"] == pytest.approx(3e-4) and out[0].evidence["residual"] == -3e-4


def test_default_rules_file_matches_defaults_and_bad_configs_fail_clearly(tmp_path):
    rules = load_rules()
    assert set(rules) == set(DEFAULT_RULES)
    assert rules["completeness_residual"].cooldown_s == 3600 and rules["band_shift"].threshold == 0.10
    bad = tmp_path / "a.yaml"
    for text, words in [("rules: {nope: {}}", "unknown alert rule"),
                        ("rules: {band_shift: {min_share: 0.1}}", "min_shift"),
                        ("rules: {band_shift: {min_shift: -1}}", "finite number"),
                        ("rules: {band_shift: {severity: loud}}", "severity"),
                        ("rules: [1, 2", "not valid YAML")]:
        bad.write_text(text)
        with pytest.raises(AlertConfigError, match=words) as e:
            load_rules(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(AlertConfigError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")

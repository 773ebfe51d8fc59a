"""The live console view of `chorus run` fits a standard 80x24 terminal: every topic, the latest
alerts (a new-user trial saw one topic and no alerts)."""

from __future__ import annotations

import io

from rich.console import Console as RichConsole

from stream.local.console import Snapshots, Status, alert_line, render

TOPICS = ("climate", "elections", "ai", "sports", "economy")  # stream/data/topics.json


def _snapshot(topic: str, indicator: str, window_end: int = 1_700_000_000) -> dict:
    return {
        "v": 1, "topic": topic, "indicator": indicator, "window_end": window_end, "value": 3.0,
        "baseline_value": 1.0, "completeness_residual": 2e-7, "n_agents": 1234,
        "bands": {"top0.1": 0.05, "0.1-1": 0.10, "1-10": 0.25, "10-50": 0.35, "bottom50": 0.25},
        "panel": {"bands": {"top0.1": 0.70, "0.1-1": 0.30}, "tvd": 0.85, "spearman": 0.4,
                  "rescale": 1.7, "rescale_residual": 0.6},
        "top": [{"did": f"did:plc:{topic[:4]:x<24}", "handle": f"lead-{topic}.bsky.social",
                 "share": 0.031, "followers": 12}],
    }


def _alert(i: int, topic: str) -> dict:
    return {"v": 1, "id": f"a{i}", "rule": "new_top_culprit", "topic": topic, "indicator": "cascade_reach",
            "window_end": 1_700_000_000 + 10 * i, "severity": "warning",
            "summary": f"{topic}/cascade_reach: new top-10 culprit lead-{topic}.bsky.social (did:plc:xyz) "
                       f"at rank 1 with share 0.{i:03d} and a long tail of words that cannot fit in 80 columns",
            "evidence": {}}


def _state(alerts: int) -> tuple[Snapshots, Status]:
    snaps = Snapshots()
    for t in TOPICS:
        for ind in ("cascade_reach", "polarization"):
            snaps.add(_snapshot(t, ind))
    for i in range(alerts):
        snaps.add_alert(_alert(i, TOPICS[i % len(TOPICS)]))
    st = Status(events_total=123_456, rate=412.5, lag_s=0.8, agents={t: 1000 + k for k, t in enumerate(TOPICS)},
                coverage=0.98, listing_complete=False)
    return snaps, st


def _screen(snaps: Snapshots, st: Status, width: int = 80, height: int = 24) -> list[str]:
    term = RichConsole(file=io.StringIO(), width=width, height=height, record=True)
    term.print(render(snaps, st))
    return term.export_text().splitlines()


def test_80x24_shows_every_topic_and_the_latest_alerts():
    snaps, st = _state(alerts=30)
    lines = _screen(snaps, st)
    text = "\n".join(lines)
    assert len(lines) <= 23, text  # the last line stays free for the cursor
    assert max(len(line) for line in lines) <= 80, text
    for t in TOPICS:
        assert t in text, (t, text)
    for ind in ("reach", "polar"):  # one row per topic and indicator
        assert sum(1 for line in lines if line[10:15] == ind) == len(TOPICS), text
    assert "412.5 ev/s" in text and "5|70" in text and "1.0e-07" in text and "lead-climate" in text
    # the newest alert first, cut with an ellipsis (never wrapped onto a second line), older ones below
    alert_rows = [line for line in lines if "new_top_culprit" in line]
    assert alert_rows and alert_rows[0].rstrip().endswith("…"), text
    assert "economy/cascade_reach" in alert_rows[0] and "sports/" in alert_rows[1], text  # alerts 29, 28
    assert len(alert_rows) == 23 - lines.index(next(x for x in lines if x.startswith("alerts"))) - 1
    assert "30 seen" in text


def test_a_duplicate_alert_is_shown_once_and_no_alerts_says_so():
    snaps, st = _state(alerts=0)
    assert "alerts: none" in "\n".join(_screen(snaps, st))
    snaps.add_alert(_alert(1, "ai"))
    snaps.add_alert(_alert(1, "ai"))  # redelivered after an operator restart: same id
    assert len(snaps.alerts) == 1 and len(snaps.fresh_alerts) == 1
    assert alert_line(snaps.alerts[0]).startswith("alert [1700000010] WARNING new_top_culprit: ai/")


def test_rows_that_do_not_fit_are_counted_not_dropped_silently():
    snaps, st = _state(alerts=3)
    lines = _screen(snaps, st, height=12)
    text = "\n".join(lines)
    assert len(lines) <= 11, text
    assert "5 more rows" in text and "new_top_culprit" in text, text
    for t in TOPICS:  # every topic keeps a row (its first indicator)
        assert t in text, (t, text)


def test_a_wide_terminal_gets_full_names_and_decimals():
    snaps, st = _state(alerts=2)
    text = "\n".join(_screen(snaps, st, width=160, height=40))
    for needle in ("cascade_reach", "polarization", "bottom50", "5.0%|70.0%", "0.850", "lead-ai.bsky.social"):
        assert needle in text, needle

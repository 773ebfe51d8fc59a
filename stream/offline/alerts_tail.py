"""`chorus alerts`: subscribe to ``chorus.alerts`` and print readable lines or JSON lines.

From now (the end of the topic) by default, or from the beginning. No consumer group: every
subscriber sees every alert and commits nothing. Alerts carry deterministic ids, so duplicates
redelivered after an operator restart are printed once.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TextIO

from stream.config import Settings
from stream.display import utc_stamp
from stream.guard import RecordGuard
from stream.kafka import ensure_topics, make_consumer, quiet_client_logs
from stream.schemas import TOPIC_ALERTS, Alert


def format_alert(a: Alert) -> str:
    """One readable line: time, severity, rule, summary, then the evidence's scalar fields."""
    when = utc_stamp(a.window_end)
    scalars = " ".join(f"{k}={_fmt(v)}" for k, v in a.evidence.items() if isinstance(v, (int, float, str)))
    return f"{when} {a.severity.upper():8} {a.rule:22} {a.summary}" + (f"  [{scalars}]" if scalars else "")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


async def follow(bootstrap: str, *, from_beginning: bool = False, as_json: bool = False,
                 rule: str | None = None, limit: int | None = None, out: TextIO = sys.stdout,
                 stop: asyncio.Event | None = None) -> int:
    """Print alerts until ``stop`` is set or ``limit`` alerts were printed; returns the count.
    A record that is not a valid alert is skipped, counted and logged (:mod:`stream.guard`)."""
    guard = RecordGuard.from_settings("alerts", Settings())
    with quiet_client_logs():  # an unreachable Kafka: the caller's one line says it
        await ensure_topics(bootstrap, {TOPIC_ALERTS: 1})
        consumer = make_consumer(bootstrap, TOPIC_ALERTS, group_id=None,
                                 auto_offset_reset="earliest" if from_beginning else "latest")
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
    seen: set[str] = set()
    printed = 0
    try:
        while not (stop and stop.is_set()) and (limit is None or printed < limit):
            batch = await consumer.getmany(timeout_ms=500)
            for tp, msgs in batch.items():
                for m in msgs:
                    a = guard.parse(Alert, tp.topic, tp.partition, m.offset, m.value, m.key)
                    if a is None:
                        continue
                    if (rule and a.rule != rule) or a.id in seen:
                        continue
                    seen.add(a.id)
                    out.write((json.dumps(a.model_dump(), separators=(",", ":")) if as_json
                               else format_alert(a)) + "\n")
                    out.flush()
                    printed += 1
                    if limit is not None and printed >= limit:
                        return printed
    finally:
        await consumer.stop()
    return printed

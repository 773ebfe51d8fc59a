"""Refuse and count bad Kafka records instead of stopping a stage (poison records).

Every consumer of a chorus topic parses each record through a :class:`RecordGuard`: the value is
validated against its schema (:mod:`stream.schemas`, strict types, finite numbers in range,
timestamps not ahead of the wall clock by more than ``Settings.max_clock_skew_s``). A record that
fails, or whose processing raises, is skipped and counted in
``chorus_records_rejected_total{topic, reason}``, logged with its topic, partition and offset
(the first :data:`LOG_FIRST` per topic and reason, then every :data:`LOG_EVERY`-th), and, with
``Settings.dead_letter``, kept for the stage to publish unchanged to ``chorus.dead-letter`` with
headers saying where it came from and why (:meth:`RecordGuard.take_dead_letters`).

Reasons (a bounded label set): ``json`` (not JSON), ``shape`` (not an object, wrong length, a
pattern or a kind's required field), ``missing_field``, ``unknown_field``, ``type`` (wrong JSON
type or schema version), ``non_finite`` (NaN, infinity), ``out_of_range`` (negative counts,
values beyond :data:`stream.schemas.MAX_COUNT`), ``time_ahead`` (a timestamp beyond the bound)
and ``processing_error`` (the record parsed but the stage raised on it).
"""

from __future__ import annotations

import logging
import time
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from stream.metrics import RECORDS_REJECTED
from stream.schemas import TOPIC_DEAD_LETTER, time_bounds  # noqa: F401 (re-exported)

log = logging.getLogger("chorus.guard")

T = TypeVar("T", bound=BaseModel)

LOG_FIRST = 10
LOG_EVERY = 1000
MAX_DEAD_LETTERS = 10_000  # kept in memory between publishes; beyond: counted, logged, dropped
REASONS = ("json", "shape", "missing_field", "unknown_field", "type", "non_finite", "out_of_range",
           "time_ahead", "processing_error", "format")

_BY_ERROR = {
    "json_invalid": "json", "json_type": "json", "model_type": "shape", "model_attributes_type": "shape",
    "dict_type": "shape", "too_short": "shape", "too_long": "shape", "string_too_long": "shape",
    "string_too_short": "shape", "string_pattern_mismatch": "shape", "kind_fields": "shape",
    "top_entry": "shape", "missing": "missing_field", "extra_forbidden": "unknown_field",
    "finite_number": "non_finite", "greater_than": "out_of_range", "greater_than_equal": "out_of_range",
    "less_than": "out_of_range", "less_than_equal": "out_of_range", "negative_count": "out_of_range",
    "time_bounds": "time_ahead",
}


def reason_of(exc: BaseException) -> str:
    """The reason label for a rejected record (the first validation error decides)."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if errors:
            return _BY_ERROR.get(errors[0]["type"], "type")
        return "type"
    return "processing_error"


def _detail(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        e = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        where = ".".join(str(x) for x in e["loc"]) or "value"
        return f"{where}: {e['msg']}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class RecordGuard:
    """Parse, count and (optionally) dead-letter the records one stage consumes.

    ``stage`` names the stage in logs and dead-letter headers; ``max_skew_s`` and ``hop_s`` set the
    time bounds (:func:`stream.schemas.time_bounds`, refreshed once a second).
    """

    def __init__(self, stage: str, *, max_skew_s: float, hop_s: float = 0.0, dead_letter: bool = False):
        self.stage = stage
        self.max_skew_s, self.hop_s = max_skew_s, hop_s
        self.dead_letter = dead_letter
        self.rejected: dict[tuple[str, str], int] = {}  # (topic, reason) -> count
        self._dead: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []
        self._ctx: dict[str, float] = {}
        self._ctx_at = float("-inf")

    @classmethod
    def from_settings(cls, stage: str, settings: Any) -> "RecordGuard":
        return cls(stage, max_skew_s=settings.max_clock_skew_s, hop_s=settings.window[1],
                   dead_letter=settings.dead_letter)

    def context(self) -> dict[str, float]:
        now = time.monotonic()
        if now - self._ctx_at >= 1.0:
            self._ctx, self._ctx_at = time_bounds(self.max_skew_s, self.hop_s), now
        return self._ctx

    def parse(self, model: type[T], topic: str, partition: int, offset: int, value: bytes | None,
              key: bytes | None = None) -> T | None:
        """``model`` parsed from ``value``, or None after rejecting the record (see the module doc)."""
        try:
            if value is None:
                raise ValueError("null value")
            return model.from_bytes(value, self.context())
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            self.reject(topic, partition, offset, exc, key, value)
            return None

    def reject(self, topic: str, partition: int, offset: int, exc: BaseException,
               key: bytes | None = None, value: bytes | None = None, reason: str | None = None) -> str:
        """Count, log and keep (dead letter) one bad record; returns its reason (``reason``, one
        of :data:`REASONS`, or derived from ``exc``: :func:`reason_of`)."""
        if reason is None:
            reason = "json" if isinstance(exc, ValueError) and str(exc) == "null value" else reason_of(exc)
        detail = _detail(exc)
        n = self.rejected[(topic, reason)] = self.rejected.get((topic, reason), 0) + 1
        RECORDS_REJECTED.labels(topic=topic, reason=reason).inc()
        if n <= LOG_FIRST or n % LOG_EVERY == 0:
            log.warning("%s: rejected record %s[%s]@%s (%s, %d so far): %s", self.stage, topic, partition,
                        offset, reason, n, detail)
        if self.dead_letter:
            if len(self._dead) < MAX_DEAD_LETTERS:
                headers = [("chorus.topic", topic.encode()), ("chorus.partition", str(partition).encode()),
                           ("chorus.offset", str(offset).encode()), ("chorus.reason", reason.encode()),
                           ("chorus.stage", self.stage.encode()), ("chorus.error", detail[:500].encode())]
                self._dead.append((key, value if value is not None else b"", headers))
            elif n <= LOG_FIRST:
                log.error("%s: dead-letter buffer full (%d); not keeping %s@%s", self.stage,
                          MAX_DEAD_LETTERS, topic, offset)
        return reason

    def take_dead_letters(self) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
        """The rejected records kept for ``chorus.dead-letter`` since the last call: (key, value,
        headers). Empty unless ``dead_letter``."""
        out, self._dead = self._dead, []
        return out

    @property
    def total(self) -> int:
        return sum(self.rejected.values())

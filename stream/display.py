"""How chorus writes times, shares and DIDs for people: the console, `chorus report`, `chorus alerts`.

Pure string formatting, one rule each, so the same window end or share reads the same everywhere:

- :func:`utc_stamp`: a window end (unix seconds) as ``2025-01-01 00:00:00Z``.
- :func:`percent`: a share (fraction) as ``12.3%``; ``None`` as the caller's placeholder.
- :func:`shorten`: a long identifier (a DID) cut to ``n`` characters with a trailing ``…``.
- :func:`parse_time_s`: a command-line time (unix seconds or RFC 3339 / ISO 8601, naive = UTC)
  as unix seconds.
"""

from __future__ import annotations

from datetime import datetime, timezone

from stream.protocol import datetime_us


def utc_stamp(t_s: float) -> str:
    """Unix seconds -> ``YYYY-MM-DD HH:MM:SSZ`` (UTC)."""
    return datetime.fromtimestamp(t_s, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def percent(share: float | None, digits: int = 1, width: int = 0, missing: str = "-") -> str:
    """A fraction as a percentage with ``digits`` decimals, right-aligned to ``width`` characters
    before the ``%`` sign; ``missing`` for None."""
    return missing if share is None else f"{100 * share:{width}.{digits}f}%"


def shorten(text: str, n: int) -> str:
    """``text`` if it has at most ``n`` characters, else its first ``n - 1`` and ``…``."""
    return text if len(text) <= n else text[: n - 1] + "…"


def who(entry: dict, n: int = 18) -> str:
    """A culprit as a person can recognise it: ``handle (did:plc:abc…)`` when the entry has a
    handle (chorus.attributions top entries), else the DID shortened to ``n`` characters."""
    did = shorten(str(entry.get("did", "?")), n)
    handle = entry.get("handle")
    return f"{handle} ({did})" if handle else did


def parse_time_s(value: str) -> int:
    """Unix seconds (``1700000000``, ``1.7e9``) or an RFC 3339 / ISO 8601 time (``...Z``, an
    offset, or naive = UTC; :func:`stream.protocol.datetime_us`) -> whole unix seconds.
    Raises ValueError for anything else."""
    try:
        return int(float(value))
    except OverflowError:
        raise ValueError(f"time out of range: {value!r}") from None
    except ValueError:
        pass
    return datetime_us(value) // 1_000_000

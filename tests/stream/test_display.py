"""stream.display: the one place times, shares and DIDs are formatted for people."""

from __future__ import annotations

import pytest

from stream.display import parse_time_s, percent, shorten, utc_stamp


def test_utc_stamp_and_parse_time_round_trip():
    assert utc_stamp(0) == "1970-01-01 00:00:00Z"
    assert utc_stamp(1_700_000_000) == "2023-11-14 22:13:20Z"
    for text in ("1700000000", "1.7e9", "2023-11-14T22:13:20Z", "2023-11-14T22:13:20", "2023-11-14 22:13:20Z",
                 "2023-11-14T23:13:20+01:00"):
        assert parse_time_s(text) == 1_700_000_000, text
    for bad in ("yesterday", "", "inf"):
        with pytest.raises(ValueError):
            parse_time_s(bad)


def test_percent_and_shorten():
    assert percent(0.1234) == "12.3%" and percent(0.1234, digits=2) == "12.34%"
    assert percent(0.05, width=5) == "  5.0%" and percent(None) == "-" and percent(None, missing="n/a") == "n/a"
    did = "did:plc:abcdefghijklmnopqrstuvwx"
    assert shorten(did, 40) == did and shorten(did, 18) == "did:plc:abcdefghi…" and len(shorten(did, 18)) == 18

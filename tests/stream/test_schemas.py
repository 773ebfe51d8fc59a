"""stream.schemas: what a consumer refuses, and the line it says why."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from stream.schemas import Event, time_bounds


def test_a_timestamp_ahead_is_refused_with_how_far_in_whole_seconds():
    """The rejection line says how far ahead (it printed a literal "{ahead:.0f}")."""
    raw = (b'{"v":1,"kind":"like","did":"did:plc:a","rkey":"r","uri":"at://did:plc:a/app.bsky.feed.like/r",'
           b'"seq":1,"time_us":1000000000000000,"subject_uri":"at://did:plc:b/app.bsky.feed.post/p"}')
    with pytest.raises(ValidationError, match=r"time_us 1000000000000000 lies 1000 s ahead of the allowed bound"):
        Event.from_bytes(raw, time_bounds(600.0, now_s=999_998_400.0))

"""Kafka topic names and JSON value schemas (every value carries ``"v": 1``); see DESIGN.md.

The models are also what every consumer checks a record against before using it
(:mod:`stream.guard`): JSON values are validated in strict mode (no ``"12345"`` for an int, no
integer for a DID), numbers must be finite and in range (counts >= 0 and at most
:data:`MAX_COUNT`), and, when the caller passes a :func:`time_bounds` context, timestamps may not
lie further ahead of the wall clock than the allowed skew (a record from the future would move
event time past every real record). Timestamps in the past are allowed: the worker drops late
events and the operator expires stale records by itself.
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = 1

TOPIC_EVENTS = "chorus.events"
TOPIC_FEATURES = "chorus.features"
TOPIC_GRAPH = "chorus.graph"
TOPIC_ATTRIBUTIONS = "chorus.attributions"
TOPIC_ALERTS = "chorus.alerts"
TOPIC_DEAD_LETTER = "chorus.dead-letter"  # rejected records, with Settings.dead_letter (stream/guard.py)
TOPIC_IDENTITIES = "chorus.identities"  # the latest handle per DID (compacted)

# Default partition counts used when chorus creates its topics.
# chorus.events (and the worker's ops topic, which has as many) caps how many workers can share
# the window: 16 leaves room to grow from one worker; raise it with CHORUS_PARTITIONS_CHORUS_EVENTS.
TOPIC_PARTITIONS = {
    TOPIC_EVENTS: 16,
    TOPIC_FEATURES: 4,
    TOPIC_GRAPH: 4,
    TOPIC_ATTRIBUTIONS: 1,
    TOPIC_ALERTS: 1,
    TOPIC_DEAD_LETTER: 1,
    TOPIC_IDENTITIES: 4,
}

# Feature columns per topic in chorus.features, in this order.
FEATURE_COLUMNS = ("posts", "engagement", "stance_sum", "reposts")

# "account": an #account frame; active=False (status e.g. deleted/takendown) retracts the
# account's activity downstream. uri = "at://DID", rkey = "" (state, not a record).
EventKind = Literal["post", "like", "repost", "follow", "delete", "account"]


# Bounds of a valid record (see the module docstring).
MAX_COUNT = 10**9  # followers, posts, engagement, reposts (Bluesky: ~4e7 accounts)
MAX_DID = 2048
MAX_URI = 8192
MAX_TEXT = 100_000

Did = Annotated[str, Field(min_length=5, max_length=MAX_DID, pattern=r"^did:[!-~]+$")]
AtUri = Annotated[str, Field(max_length=MAX_URI, pattern=r"^at://")]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Bounded = Annotated[float, Field(ge=-MAX_COUNT, le=MAX_COUNT, allow_inf_nan=False)]
TimeUs = Annotated[int, Field(ge=0)]
Tid = Annotated[str, Field(pattern=r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")]  # a repo rev
UnixS = Annotated[int, Field(ge=0)]


def time_bounds(max_skew_s: float, hop_s: float = 0.0, now_s: float | None = None) -> dict[str, float]:
    """Validation context for :meth:`_Value.from_bytes`: the latest acceptable event time
    (``time_us``: now + ``max_skew_s``) and window end (``window_end``: one hop later, since a
    window ends after its newest event), unix seconds."""
    now_s = time.time() if now_s is None else now_s
    return {"max_time_s": now_s + max_skew_s, "max_window_end_s": now_s + max_skew_s + hop_s}


def _not_ahead(value: int, info: ValidationInfo, bound: str, scale: float) -> int:
    limit = (info.context or {}).get(bound)
    if limit is not None and value / scale > limit:
        # (pydantic fills {name} placeholders only, no format specs: the number is rounded here)
        raise PydanticCustomError("time_bounds", "{field} {value} lies {ahead} s ahead of the allowed bound",
                                  {"field": info.field_name, "value": value, "ahead": round(value / scale - limit)})
    return value


class _Value(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | str, context: dict[str, Any] | None = None):
        """Parse one JSON value. Raises ``pydantic.ValidationError`` (a ValueError) when it does
        not fit. With ``context`` (:func:`time_bounds`) the value is checked as a consumer does:
        strict types and timestamps not ahead of the bounds."""
        if context is None:
            return cls.model_validate_json(raw)
        return cls.model_validate_json(raw, strict=True, context=context)


class Event(_Value):
    """One normalized firehose record op (chorus.events, key = author DID)."""

    kind: EventKind
    did: Did
    rkey: Annotated[str, Field(max_length=512)]
    uri: AtUri
    seq: Annotated[int, Field(ge=0)]
    time_us: TimeUs
    collection: Annotated[str, Field(max_length=512)] | None = None  # for deletes: which record type
    text: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    langs: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=64)] | None = None
    reply_parent: AtUri | None = None
    reply_root: AtUri | None = None
    quote_uri: AtUri | None = None
    subject_uri: AtUri | None = None
    subject_did: Did | None = None
    active: bool | None = None  # kind="account" only
    status: Annotated[str, Field(max_length=512)] | None = None  # kind="account" only: why inactive
    rev: Tid | None = None  # follow creates and deletes: the commit's repo revision

    @field_validator("time_us")
    @classmethod
    def _time_not_ahead(cls, v: int, info: ValidationInfo) -> int:
        return _not_ahead(v, info, "max_time_s", 1e6)

    @model_validator(mode="after")
    def _kind_fields(self) -> "Event":
        if self.kind in ("like", "repost") and not self.subject_uri:
            raise PydanticCustomError("kind_fields", "a {kind} needs subject_uri", {"kind": self.kind})
        if self.kind == "follow" and not self.subject_did:
            raise PydanticCustomError("kind_fields", "a follow needs subject_did", {})
        return self


class Features(_Value):
    """A user's feature vector for the current window (chorus.features, key = DID).

    ``topics`` maps topic -> [posts, engagement, stance_sum, reposts]; an empty ``topics`` with
    ``expired=True`` means the user left the window.
    """

    did: Did
    window_end: UnixS
    # no longer sent (follower counts come from chorus.graph, held by the operator); ignored
    followers: Annotated[int, Field(ge=0, le=MAX_COUNT)] | None = None
    # [posts, engagement, stance_sum, reposts]: counts >= 0, every value finite
    topics: Annotated[dict[Annotated[str, Field(max_length=256)],
                           Annotated[list[Bounded], Field(min_length=4, max_length=4)]], Field(max_length=4096)]
    expired: bool | None = None

    @field_validator("topics")
    @classmethod
    def _counts_not_negative(cls, topics: dict[str, list[float]]) -> dict[str, list[float]]:
        for t, (posts, engagement, _, reposts) in topics.items():
            if posts < 0 or engagement < 0 or reposts < 0:
                raise PydanticCustomError("negative_count", "topic {topic}: negative count", {"topic": t})
        return topics

    @field_validator("window_end")
    @classmethod
    def _end_not_ahead(cls, v: int, info: ValidationInfo) -> int:
        return _not_ahead(v, info, "max_window_end_s", 1.0)


class GraphEdge(_Value):
    """A follow edge change (chorus.graph): ``src`` is followed by ``dst`` through the follow
    record ``uri`` (``at://dst/app.bsky.graph.follow/rkey``).

    Key = the record URI (it identifies the edge, so a compacted topic keeps the last op of every
    edge), or ``dst`` for a purge. ``add`` carries src, dst, uri; ``remove`` carries dst and uri
    (a firehose delete names only the record; src is then absent and resolved by the consumer
    from the record's add) or src and dst; ``purge`` (dst's account is gone) removes every edge
    dst follows with, as of ``time_us``. Records written before ``uri`` existed carry src and dst
    only (key = dst) and stay valid.
    ``rev`` is the repo revision (a TID) the op comes from: the live commit's, or the repository
    checkpoint's for ``chorus backfill``. Per edge the op with the newest rev wins (an add on a
    tie); without a rev, ``time_us`` orders it (operators/service/state.py).
    """

    op: Literal["add", "remove", "purge"]
    src: Did | None = None
    dst: Did
    time_us: TimeUs
    uri: AtUri | None = None
    rev: Tid | None = None

    @field_validator("time_us")
    @classmethod
    def _time_not_ahead(cls, v: int, info: ValidationInfo) -> int:
        return _not_ahead(v, info, "max_time_s", 1e6)

    @model_validator(mode="after")
    def _op_fields(self) -> "GraphEdge":
        if self.op == "add" and not self.src:
            raise PydanticCustomError("op_fields", "an add needs src", {})
        if self.op == "remove" and not (self.src or self.uri):
            raise PydanticCustomError("op_fields", "a remove needs src or uri", {})
        return self


_S32 = {c: i for i, c in enumerate("234567abcdefghijklmnopqrstuvwxyz")}


def tid_value(tid: str) -> int:
    """The integer a TID encodes (https://atproto.com/specs/tid: 13 base32-sortable characters,
    53-bit microseconds << 10 | 10-bit clock id); raises KeyError on a character outside the
    alphabet. Revs compare as these integers."""
    v = 0
    for ch in tid:
        v = (v << 5) | _S32[ch]
    return v


def graph_value(op: str, src: str | None, dst: str, time_us: int, uri: str | None = None,
                rev: str | None = None) -> dict[str, Any]:
    """A chorus.graph value (a :class:`GraphEdge` as a plain dict, None fields left out)."""
    value: dict[str, Any] = {"v": SCHEMA_VERSION, "op": op}
    if src is not None:
        value["src"] = src
    value["dst"], value["time_us"] = dst, time_us
    if uri is not None:
        value["uri"] = uri
    if rev is not None:
        value["rev"] = rev
    return value


def graph_key(edge: dict[str, Any]) -> bytes:
    """The chorus.graph key of an edge value: its record URI, else the follower DID."""
    return (edge.get("uri") or edge["dst"]).encode()


class Identity(_Value):
    """An account's handle (chorus.identities, key = DID, compacted: the latest per DID wins).

    Written by ``chorus backfill`` (the handle its DID document claims, ``alsoKnownAs``) and by
    ``chorus ingest`` (``#identity`` frames, which the relay sends after verifying the handle);
    ``handle`` None: the account has no valid handle now. Display only: never a label, never a key.
    """

    did: Did
    handle: Annotated[str, Field(min_length=3, max_length=253, pattern=r"^[A-Za-z0-9.-]+$")] | None = None
    time_us: TimeUs


class AttributionSnapshot(_Value):
    """One indicator's attribution for one topic at one hop (chorus.attributions, key = topic): a
    published snapshot. (The attribution itself, phi per agent, is
    :class:`operators.attribution.Attribution`.)"""

    model_config = ConfigDict(extra="allow")
    topic: str
    indicator: str
    window_end: UnixS
    value: Finite
    baseline_value: Finite
    completeness_residual: Finite
    n_agents: Annotated[int, Field(ge=0)]
    bands: dict[str, Finite]
    panel: dict[str, Any]
    top: list[dict[str, Any]]
    # quadrature and its per-agent error estimate: {rule, steps, max, relative, tolerance, agents_over}
    error: dict[str, Any] = Field(default_factory=dict)
    # positive and negative attribution mass per band: {positive, negative, positive_mass, negative_mass}
    band_mass: dict[str, Any] = Field(default_factory=dict)

    @field_validator("window_end")
    @classmethod
    def _end_not_ahead(cls, v: int, info: ValidationInfo) -> int:
        return _not_ahead(v, info, "max_window_end_s", 1.0)

    @field_validator("top")
    @classmethod
    def _top_entries(cls, top: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for e in top:
            share = e.get("share")
            if not isinstance(e.get("did"), str) or type(share) not in (int, float) or not math.isfinite(share):
                raise PydanticCustomError("top_entry", "a top entry needs a did and a finite share", {})
        return top


class Alert(_Value):
    """An alert (chorus.alerts, key = rule)."""

    id: str
    rule: str
    topic: str
    indicator: str
    window_end: UnixS
    severity: Literal["info", "warning", "critical"]
    summary: str
    evidence: dict[str, Any]

    @field_validator("window_end")
    @classmethod
    def _end_not_ahead(cls, v: int, info: ValidationInfo) -> int:
        return _not_ahead(v, info, "max_window_end_s", 1.0)


def dumps(value: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON for a plain dict value (adds ``v`` if absent)."""
    if "v" not in value:
        value = {"v": SCHEMA_VERSION, **value}
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def loads(raw: bytes | str) -> dict[str, Any]:
    """Parse a JSON value and check its schema version."""
    value = json.loads(raw)
    if not isinstance(value, dict) or value.get("v") != SCHEMA_VERSION:
        raise ValueError(f"unsupported schema version: {value.get('v') if isinstance(value, dict) else value!r}")
    return value

"""Kafka topic names and JSON value schemas (every value carries ``"v": 1``); see DESIGN.md."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1

TOPIC_EVENTS = "chorus.events"
TOPIC_FEATURES = "chorus.features"
TOPIC_GRAPH = "chorus.graph"
TOPIC_ATTRIBUTIONS = "chorus.attributions"
TOPIC_ALERTS = "chorus.alerts"

# Default partition counts used when chorus creates its topics.
TOPIC_PARTITIONS = {
    TOPIC_EVENTS: 4,
    TOPIC_FEATURES: 4,
    TOPIC_GRAPH: 4,
    TOPIC_ATTRIBUTIONS: 1,
    TOPIC_ALERTS: 1,
}

# Feature columns per topic in chorus.features, in this order.
FEATURE_COLUMNS = ("posts", "engagement", "stance_sum", "reposts")

# "account": an #account frame; active=False (status e.g. deleted/takendown) retracts the
# account's activity downstream. uri = "at://DID", rkey = "" (state, not a record).
EventKind = Literal["post", "like", "repost", "follow", "delete", "account"]


class _Value(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | str):
        return cls.model_validate_json(raw)


class Event(_Value):
    """One normalized firehose record op (chorus.events, key = author DID)."""

    kind: EventKind
    did: str
    rkey: str
    uri: str
    seq: int
    time_us: int
    collection: str | None = None  # for deletes: which record type was deleted
    text: str | None = None
    langs: list[str] | None = None
    reply_parent: str | None = None
    reply_root: str | None = None
    quote_uri: str | None = None
    subject_uri: str | None = None
    subject_did: str | None = None
    active: bool | None = None  # kind="account" only
    status: str | None = None  # kind="account" only: why inactive (deleted, takendown, ...)


class Features(_Value):
    """A user's feature vector for the current window (chorus.features, key = DID).

    ``topics`` maps topic -> [posts, engagement, stance_sum, reposts]; an empty ``topics`` with
    ``expired=True`` means the user left the window.
    """

    did: str
    window_end: int  # unix seconds
    followers: int
    topics: dict[str, list[float]]
    expired: bool | None = None


class GraphEdge(_Value):
    """A follow edge change (chorus.graph, key = follower DID): src is followed by dst."""

    op: Literal["add", "remove"]
    src: str
    dst: str
    time_us: int


class Attribution(_Value):
    """One indicator's attribution for one topic at one hop (chorus.attributions, key = topic)."""

    model_config = ConfigDict(extra="allow")
    topic: str
    indicator: str
    window_end: int
    value: float
    baseline_value: float
    completeness_residual: float
    n_agents: int
    bands: dict[str, float]
    panel: dict[str, Any]
    top: list[dict[str, Any]]


class Alert(_Value):
    """An alert (chorus.alerts, key = rule)."""

    id: str
    rule: str
    topic: str
    indicator: str
    window_end: int
    severity: Literal["info", "warning", "critical"]
    summary: str
    evidence: dict[str, Any]


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

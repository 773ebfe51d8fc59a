"""Settings: command-line flags, then ``CHORUS_*`` environment variables, then these defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LIVE_RELAY = "wss://bsky.network/xrpc"

# (window seconds, hop seconds) per profile.
PROFILES: dict[str, tuple[int, int]] = {
    "default": (6 * 3600, 60),
    "demo": (600, 10),
}


class ConfigError(ValueError):
    """A setting is missing or malformed; the message is one line meant for the user."""


class Settings(BaseSettings):
    """All chorus settings. Environment variables are ``CHORUS_<FIELD>`` (e.g. ``CHORUS_KAFKA``)."""

    # A variable set but empty (`CHORUS_STATE_DIR=`) is the same as an unset one: the default (not
    # Path(""), the current directory).
    model_config = SettingsConfigDict(env_prefix="CHORUS_", extra="ignore", env_ignore_empty=True,
                                      allow_inf_nan=False)  # nan/inf: "finite number", not a bound

    kafka: str | None = Field(
        default=None,
        description="Kafka bootstrap URL, kafka://host:port[,host:port]. Unset: `chorus run` "
        "starts the embedded broker.",
    )
    kafka_idempotence: bool = Field(
        default=True,
        description="Use the idempotent producer. The embedded broker does not support it.",
    )
    kafka_request_timeout_s: float = Field(
        default=40.0, gt=0,
        description="Kafka client request timeout, seconds (aiokafka's request_timeout_ms). A send "
        "not acknowledged in time is retried with backoff, never dropped.",
    )
    dead_letter: bool = Field(
        default=False,
        description="Publish every rejected input record, unchanged, to chorus.dead-letter "
        "(headers: source topic, partition, offset, reason, stage).",
    )
    max_clock_skew_s: float = Field(
        default=600.0, ge=0,
        description="Input timestamps (time_us, window_end minus one hop) further ahead of the wall "
        "clock than this are rejected as poison records.",
    )
    relay: str = LIVE_RELAY
    jetstream: str | None = Field(
        default=None,
        description="Jetstream v1 /subscribe URL for `chorus ingest` instead of the relay (unset: the relay).",
    )
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    profile: Literal["default", "demo"] = "default"
    window_s: int | None = Field(
        default=None, gt=0,
        description="Window length, seconds; unset: the profile's. Always set once Settings is built.",
    )
    hop_s: int | None = Field(
        default=None, gt=0,
        description="Hop (slide) length, seconds; unset: the profile's. Always set once Settings is built.",
    )
    state_dir: Path = Path.home() / ".local" / "state" / "chorus"
    partitions_chorus_events: int | None = Field(
        default=None, ge=1, le=4096,
        description="Partitions of chorus.events and the worker's ops topic when chorus creates them "
        "(unset: 16). They cap how many workers can share the window.",
    )
    partitions_chorus_features: int | None = Field(
        default=None, ge=1, le=4096, description="Partitions of chorus.features when chorus creates it (unset: 4).")
    partitions_chorus_graph: int | None = Field(
        default=None, ge=1, le=4096, description="Partitions of chorus.graph when chorus creates it (unset: 4).")
    checkpoint_interval_s: float = Field(
        default=60.0, ge=0,
        description="The worker writes a checkpoint of its window state this often (seconds of "
        "wall time; 0: never, every restart replays chorus.events from its beginning).",
    )
    checkpoint_dir: Path | None = Field(
        default=None,
        description="Where workers keep checkpoints (one subdirectory per app id); unset: "
        "CHORUS_STATE_DIR/worker. Workers that share partitions should share it (a volume).",
    )
    operator_snapshot_interval_s: float = Field(
        default=600.0, ge=0,
        description="The operator writes a snapshot of its state (graph, features, offsets) this "
        "often (seconds; 0: never, a restart reads its input topics from the beginning).",
    )
    topics_file: Path | None = None
    alerts_file: Path | None = None
    indicators: list[str] = ["cascade_reach", "polarization"]
    # --- the operator (operators.service; `chorus operator`, `chorus analyze`, `chorus run`) ---
    steps: int = Field(
        default=65, ge=1,
        description="Most quadrature nodes per attribution: the operator picks the cheapest Gauss-Kronrod "
        "rule (3..65 nodes) whose per-agent error estimate meets the attribution_error tolerance; with "
        "quadrature_rule set, that rule's node count.",
    )
    quadrature_rule: str | None = Field(
        default=None,
        description="A fixed quadrature rule (operators.quadrature, e.g. gauss-legendre) with `steps` "
        "nodes instead of the per-hop Gauss-Kronrod ladder (unset: the ladder).",
    )
    panel_k: int = Field(default=100, ge=1, description="Visibility panel size: the accounts with most followers.")
    cascade_p: float = Field(
        default=0.05, gt=0, lt=1,
        description="cascade_reach's p: an agent with activity x reaches each follower with probability "
        "p (1 - exp(-x)).",
    )
    uvloop: bool = Field(
        default=True,
        description="Run `chorus ingest` and `chorus worker` on uvloop where it is installed "
        "(stream.process); false: the standard asyncio loop.",
    )
    plc_url: str = Field(default="https://plc.directory", description="PLC directory for `chorus backfill`.")
    allow_nets: list[str] = Field(
        default_factory=list,
        description="Non-public networks `chorus backfill` may fetch from (e.g. [\"127.0.0.0/8\"]); "
        "default none: DID documents pointing at private addresses are refused.",
    )

    @field_validator("kafka")
    @classmethod
    def _check_kafka(cls, v: str | None) -> str | None:
        if v is not None and v.strip() == "":
            return None
        if v is not None:
            bootstrap_servers(v)  # raises ConfigError on a malformed URL
        return v

    @field_validator("quadrature_rule")
    @classmethod
    def _check_rule(cls, v: str | None) -> str | None:
        if v is None or v.strip() == "":
            return None
        from operators.quadrature import RULES

        if v not in RULES:
            raise ValueError(f"unknown quadrature rule {v!r}; known: {', '.join(RULES)}")
        return v

    @model_validator(mode="after")
    def _resolve_window(self) -> "Settings":
        """window_s and hop_s: the profile's where not given; the window a multiple of the hop."""
        w, h = PROFILES[self.profile]
        w, h = self.window_s or w, self.hop_s or h
        if h > w or w % h:
            raise ValueError(f"window ({w}s) must be a positive multiple of hop ({h}s)")
        self.window_s, self.hop_s = w, h
        return self

    @property
    def window(self) -> tuple[int, int]:
        """(window_s, hop_s), resolved and checked when the settings were built."""
        return self.window_s, self.hop_s


def relay_http_url(relay: str) -> str:
    """The HTTP base of a relay given by its subscribeRepos URI: ``wss://bsky.network/xrpc`` ->
    ``https://bsky.network`` (where ``com.atproto.sync.listRepos`` lives)."""
    url = relay.strip().rstrip("/")
    for ws, http in (("wss://", "https://"), ("ws://", "http://")):
        if url.startswith(ws):
            url = http + url[len(ws):]
    return url.removesuffix("/xrpc")


def bootstrap_servers(url: str) -> str:
    """``kafka://a:9092,b:9092`` (or a bare ``a:9092``) -> ``a:9092,b:9092`` for aiokafka."""
    rest = url.strip()
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        if scheme != "kafka":
            raise ConfigError(f"Kafka URL must start with kafka:// (got {url!r})")
    hosts = [h for h in rest.strip("/").split(",") if h]
    if not hosts:
        raise ConfigError(f"Kafka URL names no host (got {url!r})")
    for h in hosts:
        host, _, port = h.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"Kafka host must be host:port (got {h!r} in {url!r})")
    return ",".join(hosts)

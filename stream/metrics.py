"""Every Prometheus metric chorus exports (names fixed by DESIGN.md), and the HTTP endpoint.

All components register here so a single process (``chorus run``) serves one consistent set.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# --- ingest -------------------------------------------------------------------------------
INGEST_FRAMES = Counter("chorus_ingest_frames", "Firehose frames received, by frame type.", ["type"])
INGEST_FRAMES_INVALID = Counter(
    "chorus_ingest_frames_invalid", "Frames or ops skipped as invalid, by reason.", ["reason"]
)
INGEST_LAG = Gauge("chorus_ingest_lag_seconds", "Now minus the time of the last acknowledged event.")
INGEST_CURSOR = Gauge("chorus_ingest_cursor", "Last firehose seq acknowledged by Kafka.")
EVENTS_PUBLISHED = Counter("chorus_events_published", "Events acknowledged by Kafka, by kind.", ["kind"])
INGEST_SEQ_RESETS = Counter(
    "chorus_ingest_seq_resets",
    "Times the source's numbering went below the cursor chorus resumed from (seq or time_us); "
    "ingest continued from the new numbering.",
)
INGEST_REPLAYED = Counter(
    "chorus_ingest_replayed_frames", "Frames dropped as replays (position not above the last one forwarded)."
)
INGEST_RECONNECTS = Counter(
    "chorus_ingest_reconnects",
    "Times the ingester dialed the source again after a connection ended (lost, closed or refused).",
)
INGEST_OUTDATED_CURSOR = Counter(
    "chorus_ingest_outdated_cursor",
    "Reconnects the relay answered with #info OutdatedCursor: the cursor was older than its retention.",
)
INGEST_SKIPPED = Counter(
    "chorus_ingest_skipped_frames",
    "Seqs jumped over after an OutdatedCursor: first seq received minus the cursor dialed minus 1 "
    "(input lost; an upper bound where the relay's numbering has gaps).",
)
INGEST_TIME_CLAMPED = Counter(
    "chorus_ingest_event_time_clamped",
    "Events whose claimed time was later than receive time + tolerance; their event time was clamped.",
)

# --- windows ------------------------------------------------------------------------------
WINDOW_AGENTS = Gauge("chorus_window_agents", "Agents with activity in the current window.", ["topic"])

# --- worker state (issue 17) ----------------------------------------------------------------
WORKER_EVENTS = Counter(
    "chorus_worker_events",
    "chorus.events records the worker took, by outcome: processed (used), duplicate (a record "
    "already in the window, or a deletion of one already deleted), late (older than the window).",
    ["outcome"],
)
WORKER_FEATURE_RECORDS = Counter("chorus_worker_feature_records", "Records published to chorus.features.")
WORKER_HELD_EVENTS = Gauge("chorus_worker_held_events", "Events (and deletions) held in the worker's window.")
WORKER_STATE_BYTES = Gauge("chorus_worker_state_bytes", "Bytes of the worker's window state (WindowStore.state_bytes).")
WORKER_CHECKPOINT_AGE = Gauge(
    "chorus_worker_checkpoint_age_seconds", "Seconds since the worker's last checkpoint (NaN: none yet)."
)
WORKER_CHECKPOINT_SECONDS = Histogram(
    "chorus_worker_checkpoint_seconds", "Time to take and write one checkpoint.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
WORKER_RECOVERY = Gauge(
    "chorus_worker_recovering", "1 while the worker restores its state (checkpoint, then replay), else 0.", ["phase"]
)
WORKER_RECOVERY_SECONDS = Gauge("chorus_worker_recovery_seconds", "Duration of the last restore.")
WORKER_REPLAYED_EVENTS = Gauge(
    "chorus_worker_replayed_events",
    "chorus.events records the last restore replayed: those after the checkpoints it restored, and every "
    "retained one of a partition no checkpoint covered.",
)
CONSUMER_LAG = Gauge(
    "chorus_consumer_lag",
    "Records not yet processed per input partition (high watermark minus next offset), by stage.",
    ["stage", "topic", "partition"],
)

# --- operator state (issue 17) --------------------------------------------------------------
OPERATOR_AGENTS = Gauge("chorus_operator_agents", "Agents (DIDs) in the operator's state.")
OPERATOR_EDGES = Gauge("chorus_operator_edges", "Follow edges in the operator's graph.")
OPERATOR_HOP_LATENCY = Histogram(
    "chorus_operator_hop_latency_seconds",
    "Wall time from a window's end to the publication of its snapshots.",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
OPERATOR_DEVICE_MEMORY = Gauge("chorus_operator_device_memory_bytes", "Bytes in use on the JAX device (0 if unknown).")
OPERATOR_SNAPSHOT_AGE = Gauge(
    "chorus_operator_snapshot_age_seconds", "Seconds since the operator's last state snapshot (NaN: none yet)."
)
# NaN until the first checkpoint/snapshot is written: a gauge starts at 0, which would read as a
# checkpoint written just now (a false "fresh") before there is any.
WORKER_CHECKPOINT_AGE.set(float("nan"))
OPERATOR_SNAPSHOT_AGE.set(float("nan"))

# --- attribution (per topic, indicator) ---------------------------------------------------
_TI = ["topic", "indicator"]
MACRO_VALUE = Gauge("chorus_attribution_macro_value", "Macro indicator F(x) on the window.", _TI)
COMPLETENESS_RESIDUAL = Gauge(
    "chorus_attribution_completeness_residual",
    "sum(phi) - (F(x) - F(baseline)), in indicator units.",
    _TI,
)
BAND_SHARE = Gauge("chorus_attribution_band_share", "Full-scale attribution share per band.", _TI + ["band"])
PANEL_BAND_SHARE = Gauge(
    "chorus_attribution_panel_band_share", "Visibility-panel attribution share per band.", _TI + ["band"]
)
PANEL_TVD = Gauge("chorus_attribution_panel_tvd", "Total-variation distance full vs panel band shares.", _TI)
PANEL_SPEARMAN = Gauge(
    "chorus_attribution_panel_spearman", "Spearman rank correlation full vs panel on panel members.", _TI
)
PANEL_RESCALE_RESIDUAL = Gauge(
    "chorus_attribution_panel_rescale_residual",
    "Relative residual of the best single rescale c* of panel to full attribution.",
    _TI,
)
TOP_SHARE = Gauge(
    "chorus_attribution_top_share", "Attribution share of the agent at each rank 1..10.", _TI + ["rank"]
)
TOP_AGENT = Gauge(
    "chorus_attribution_top_agent_info",
    "1 for the DID now at each rank 1..10 (series of DIDs that left the top 10 are removed); join "
    "with chorus_attribution_top_share on (topic, indicator, rank).",
    _TI + ["rank", "did"],
)
ATTRIBUTION_HEALTHY = Gauge(
    "chorus_attribution_healthy",
    "1 when the latest recompute of (topic, indicator) gave a finite result that was published, 0 "
    "when it was skipped (its other chorus_attribution_* series are then removed).",
    _TI,
)
ATTRIBUTION_SKIPPED = Counter(
    "chorus_attribution_skipped",
    "Recomputes whose result was not published: non_finite (NaN or infinite value, residual or "
    "shares) or error (the computation raised).",
    _TI + ["reason"],
)
ERROR_ESTIMATE = Gauge(
    "chorus_attribution_error_estimate",
    "Largest per-agent quadrature error estimate, relative to max |phi| (embedded rule).",
    _TI,
)
QUADRATURE_NODES = Gauge(
    "chorus_attribution_quadrature_nodes", "Quadrature nodes of the last attribution (the rung chosen).", _TI
)
SAMPLE_TVD = Gauge(
    "chorus_attribution_sample_tvd",
    "Band total-variation distance full vs the visibility-biased sample's attribution.",
    _TI,
)
SAMPLE_SCALING_RESIDUAL = Gauge(
    "chorus_attribution_sample_scaling_residual",
    "Attribution scaling bias on the visibility sample of active agents: residual of the best single "
    "rescale of its own attribution to the full one, mass- and Horvitz-Thompson-weighted "
    "(operators.bands.scaling_bias; 0 without interactions between agents).",
    _TI,
)
RECOMPUTE_SECONDS = Histogram(
    "chorus_operator_recompute_seconds",
    "Wall time of one attribution recompute (one topic, one indicator).",
    _TI,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

# --- robustness (every stage) --------------------------------------------------------------
RECORDS_REJECTED = Counter(
    "chorus_records_rejected",
    "Consumed records skipped as invalid or unprocessable, by topic and reason (stream/guard.py).",
    ["topic", "reason"],
)
KAFKA_UNAVAILABLE = Gauge(
    "chorus_kafka_unavailable",
    "1 while a stage cannot deliver to Kafka and is retrying, 0 once deliveries succeed again.",
    ["stage"],
)
KAFKA_SEND_RETRIES = Counter(
    "chorus_kafka_send_retries", "Records re-sent after Kafka failed to acknowledge them, by stage.", ["stage"]
)

RUN_PART_RESTARTS = Counter(
    "chorus_run_part_restarts", "Parts `chorus run` restarted after they died, by part.", ["part"]
)

# --- backfill -----------------------------------------------------------------------------
BACKFILL_REPOS = Counter(
    "chorus_backfill_repos", "Repositories the backfill finished, by status (done, or why skipped).", ["status"]
)
BACKFILL_EDGES = Counter("chorus_backfill_edges", "Follow edges the backfill published (acknowledged).")
BACKFILL_TIME_CLAMPED = Counter(
    "chorus_backfill_event_time_clamped",
    "Repositories whose rev (a TID the PDS sets) was later than the time they were fetched; their edges' "
    "time_us was clamped to the fetch time.",
)
BACKFILL_PLC_OPS = Counter(
    "chorus_backfill_plc_ops",
    "PLC directory export operations the backfill read, by status (applied, or why skipped).", ["status"]
)
GRAPH_COVERAGE = Gauge(
    "chorus_graph_coverage_ratio",
    "Repositories backfilled (or known inactive) / repositories listed so far: how complete the graph "
    "is, once chorus_backfill_listing_complete is 1 (before, an upper bound).",
)
BACKFILL_LISTING_COMPLETE = Gauge(
    "chorus_backfill_listing_complete",
    "1 once the backfill's listing of repositories has ended (the coverage's denominator is final), 0 while "
    "it is still listing.",
)

# --- alerts -------------------------------------------------------------------------------
ALERTS_PUBLISHED = Counter("chorus_alerts_published", "Alerts published, by rule.", ["rule"])


def serve(host: str = "127.0.0.1", port: int = 9464, registry: CollectorRegistry = REGISTRY):
    """Start the /metrics HTTP endpoint in a daemon thread; returns (server, thread)."""
    return start_http_server(port, addr=host, registry=registry)

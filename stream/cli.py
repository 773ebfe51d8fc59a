"""The ``chorus`` command line (one entry point). Settings: flags, then CHORUS_* env, then defaults.

Each command is a thin shell: parse flags into :class:`stream.config.Settings`, then call the
module that does the work. Errors the user can fix print one line and exit non-zero.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer
import typer.core

from pydantic import ValidationError
from pydantic_settings import SettingsError

from stream.config import ConfigError, Settings
from stream.process import is_kafka_error, kafka_error_line, run_service, setup_logging



class _OneLineUsageErrors(typer.core.TyperGroup):
    """The ``chorus`` group: a click usage error (unknown flag or command, a value that does not
    parse or is out of range) prints ONE line ``chorus: error: <message>`` and exits 2 (README
    "Contracts", CLI), instead of typer's boxed usage panel; ``--help`` output is typer's own."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from typer._click import exceptions as click  # typer >= 0.24 vendors click (no public name)

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.NoArgsIsHelpError as exc:  # bare `chorus`: the help, as before
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            typer.echo(f"chorus: error: {exc.format_message()}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_OneLineUsageErrors, add_completion=False, no_args_is_help=True,
                  help=__doc__.splitlines()[0])

# Options shared by `chorus operator` and `chorus analyze` (the same operator settings).
INDICATOR_OPTION = typer.Option(None, help="Indicator (repeatable; default cascade_reach and polarization).")
# Their defaults are the settings' (stream.config.Settings: flag, then CHORUS_*, then the default).
STEPS_OPTION = typer.Option(None, min=1, help="Most quadrature nodes per attribution: the operator picks the "
                            "cheapest Gauss-Kronrod rule (3..65 nodes) whose per-agent error estimate meets the "
                            "attribution_error tolerance (default: CHORUS_STEPS, else 65).")
PANEL_K_OPTION = typer.Option(None, min=1, help="Visibility panel size, the accounts with most followers "
                              "(default: CHORUS_PANEL_K, else 100).")


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error to stderr and exit."""
    typer.echo(f"chorus: error: {message}", err=True)
    raise typer.Exit(code)


def command_has_flag(name: str) -> bool:
    """Whether the running command has a parameter called ``name`` (False outside a command)."""
    from typer._click.globals import get_current_context  # typer vendors click

    ctx = get_current_context(silent=True)
    return ctx is not None and any(p.name == name for p in ctx.command.params)


def setting_source(field: str) -> str:
    """Where setting ``field`` comes from for the running command: its flag and the environment
    variable, or only the variable when the command has no such flag."""
    env = f"CHORUS_{field.upper()}"
    return f"flag --{field.replace('_', '-')} or {env}" if command_has_flag(field) else env


def settings(**overrides) -> Settings:
    """Settings with flag overrides (None means: not given on the command line)."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if not field:  # a rule across settings (window and hop: no command has flags for them)
            fail(f"invalid settings: {msg}" if command_has_flag("window") else
                 f"invalid settings (CHORUS_WINDOW_S, CHORUS_HOP_S): {msg}")
        fail(f"invalid setting {field} ({setting_source(field)}): {msg}")
    except SettingsError as exc:  # a CHORUS_* list setting whose value is not JSON (pydantic-settings)
        m = re.search(r'field "(\w+)"', str(exc))
        field = m.group(1) if m else "?"
        raw = os.environ.get(f"CHORUS_{field.upper()}", "")
        fail(f"invalid setting {field} ({setting_source(field)}): {raw!r} is not valid JSON; "
             'write a list as a JSON array, e.g. ["a", "b"]')
    except ConfigError as exc:
        fail(str(exc))
    raise AssertionError("unreachable")


# `chorus relay/run/analyze --synthetic`: the population, its repositories and frames are built in
# memory up front, about 8 KiB per account (10^11 accounts asked for ~745 GiB; `chorus run
# --synthetic 10000000` was killed by the kernel's OOM killer at 24 GiB); 200,000 (~1.5 GiB) is ten
# times the default world.
RELAY_SYNTHETIC_MAX = 200_000
RELAY_SYNTHETIC_MIN = 50  # the synthetic population's smallest size (stream.sim.synth)


# --- commands: each owner fills in the body of its own command only --------------------------

@app.command()
def run(
    profile: str = typer.Option(None, help="default (6 h window / 60 s hop) or demo (10 min / 10 s)."),
    kafka: Optional[str] = typer.Option(None, help="kafka://host:port; unset starts the embedded broker."),
    synthetic: int = typer.Option(5000, min=RELAY_SYNTHETIC_MIN, max=RELAY_SYNTHETIC_MAX,
                                  help="Accounts in the synthetic population the local relay serves."),
    seed: int = typer.Option(0, help="Seed of the synthetic population."),
    rate: float = typer.Option(50.0, min=0.1, help="Mean synthetic activity, events per second."),
    speed: float = typer.Option(1.0, min=0.01, help="Event time per wall-clock second of the synthetic relay "
                                "(1: live; more replays the same events faster, lag then means nothing)."),
    duration: Optional[float] = typer.Option(None, min=0.0, help="Stop by itself after this many seconds."),
    metrics_port: Optional[int] = typer.Option(None, help="Metrics port (default 9464; 0 = any free port)."),
    no_console: bool = typer.Option(False, "--no-console", help="No live view: print plain log lines (stdout) instead."),
    process: Optional[list[str]] = typer.Option(None, "--process", help="Run this part as its own process "
                                                "(ingester, operator; repeatable), as docker compose does: "
                                                "needed from about 500 events/s."),
) -> None:
    """Everything in one process tree on the embedded default, with a live console view."""
    import asyncio

    from stream.local.runner import RunError, RunOptions
    from stream.local.runner import run as run_all

    from stream.local.runner import PROCESS_PARTS

    unknown = sorted(set(process or ()) - set(PROCESS_PARTS))
    if unknown:
        fail(f"--process {unknown[0]}: choose from {', '.join(PROCESS_PARTS)}")
    if duration is not None and duration <= 0:
        fail(f"--duration must be > 0 seconds (got {duration:g}); leave it out to run until Ctrl-C")
    s = settings(profile=profile, kafka=kafka, metrics_port=metrics_port)
    # The operator's settings before anything starts (broker, relay): a typo is one line, exit 2.
    from operators.service.alert_sink import load_rules
    from operators.service.alerts import AlertConfigError
    from operators.service.service import check_indicators

    from stream.worker.lexicon import Lexicon

    try:
        check_indicators(s.indicators)
        load_rules(s.alerts_file)
        Lexicon.load(s.topics_file)  # the worker's; a bad file would make it exit at every restart
    except (AlertConfigError, ValueError) as exc:  # ConfigError is a ValueError
        fail(str(exc).splitlines()[0])
    log_dir = Path(s.state_dir) / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        # Without the live view, the run's log lines (in-process parts) go to stdout as well as run.log.
        setup_logging(log_dir / "run.log", echo=sys.stdout if no_console else None)
    except OSError as exc:
        fail(f"cannot use the state directory {s.state_dir} (CHORUS_STATE_DIR): {exc.strerror or exc}")
    opts = RunOptions(synthetic=synthetic, seed=seed, rate=rate, speed=speed, console=not no_console,
                      log_dir=log_dir, processes=tuple(dict.fromkeys(process or ())))
    try:
        code = asyncio.run(run_all(s, opts, duration))
    except RunError as exc:
        fail(str(exc), code=1)
    except ImportError as exc:
        fail(f"a part of the pipeline is missing: {exc}", code=1)
    raise typer.Exit(code)


@app.command()
def ingest(
    relay: Optional[str] = typer.Option(None, help="subscribeRepos relay URL (default: the live relay)."),
    jetstream: Optional[str] = typer.Option(None, help="Read this Jetstream instead, e.g. "
                                            "wss://jetstream2.us-east.bsky.network/subscribe."),
    cursor: Optional[int] = typer.Option(None, help="Start from this seq (Jetstream: time_us) instead of the stored cursor."),
    kafka: Optional[str] = typer.Option(None, help="kafka://host:port (default: CHORUS_KAFKA)."),
) -> None:
    """Consume the firehose (or Jetstream) and publish normalized events to chorus.events."""
    from stream.config import bootstrap_servers
    from stream.ingest.service import IngestError, main

    if cursor is not None and cursor < 0:
        fail(f"--cursor must be >= 0 (got {cursor})")
    try:
        if kafka:
            bootstrap_servers(kafka)
    except ConfigError as exc:
        fail(str(exc))
    try:
        if relay and jetstream:
            fail("give --relay or --jetstream, not both")
        main(settings(relay=relay, kafka=kafka, jetstream=jetstream), relay=relay, cursor=cursor,
             jetstream=jetstream)
    except IngestError as exc:
        fail(str(exc), exc.code)


@app.command()
def worker(
    kafka: Optional[str] = typer.Option(None, help="kafka://host:port (default: CHORUS_KAFKA)."),
    profile: Optional[str] = typer.Option(None, help="default (6 h window / 60 s hop) or demo (10 min / 10 s)."),
    topics_file: Optional[Path] = typer.Option(None, help="Topic lexicon JSON (default: the shipped one)."),
    idle_flush: Optional[float] = typer.Option(None, min=0.0, help="Close the hop after this many idle seconds (default: the hop)."),
) -> None:
    """Faust worker: rolling per-user features and the follower graph."""
    s = settings(kafka=kafka, profile=profile, topics_file=topics_file)
    if not s.kafka:
        fail("the worker needs Kafka: set CHORUS_KAFKA or pass --kafka kafka://host:port")
    try:
        from stream.worker.lexicon import Lexicon

        Lexicon.load(s.topics_file)
    except ConfigError as exc:
        fail(str(exc))
    from stream.worker.faust_app import run_worker

    try:
        run_worker(s, idle_flush_s=idle_flush)
    except ConnectionError as exc:
        fail(str(exc), code=1)


@app.command()
def operator(
    kafka: Optional[str] = typer.Option(None, help="kafka://host:port"),
    indicator: Optional[list[str]] = INDICATOR_OPTION,
    alerts_file: Optional[Path] = typer.Option(None, help="Alert rules YAML (default: packaged rules)."),
    steps: Optional[int] = STEPS_OPTION,
    panel_k: Optional[int] = PANEL_K_OPTION,
    profile: Optional[str] = typer.Option(None, help="default (60 s hop) or demo (10 s hop)."),
    metrics_port: Optional[int] = typer.Option(None, help="Metrics port (default 9464)."),
) -> None:
    """Operator service: device-resident state, Aumann-Shapley every hop, metrics, alerts."""
    from operators.service.alerts import AlertConfigError
    from operators.service.service import OperatorService

    from stream.metrics import serve

    s = settings(kafka=kafka, indicators=indicator or None, alerts_file=alerts_file, profile=profile,
                 metrics_port=metrics_port, steps=steps, panel_k=panel_k)
    if not s.kafka:
        fail("the operator needs Kafka: pass --kafka kafka://host:port or set CHORUS_KAFKA")
    setup_logging()
    try:
        svc = OperatorService(s)
    except (ConfigError, AlertConfigError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    try:
        serve(s.metrics_host, s.metrics_port)
    except OSError as exc:
        fail(f"cannot serve metrics on {s.metrics_host}:{s.metrics_port}: {exc.strerror or exc}", code=1)

    # The standard loop: the operator's time goes to JAX, not to the event loop.
    try:
        run_service(svc.run, svc.stop, use_uvloop=False)
    except (OSError, ConnectionError) as exc:
        fail(kafka_error_line(s.kafka, exc, "start the operator"), code=1)
    except Exception as exc:
        if is_kafka_error(exc):
            fail(kafka_error_line(s.kafka, exc, "start the operator"), code=1)
        raise


@app.command()
def backfill(
    relay: Optional[str] = typer.Option(None, help="List repositories on this relay (https://HOST; default: the "
                                        "HTTP host of CHORUS_RELAY, https://bsky.network)."),
    pds: Optional[str] = typer.Option(None, help="List and fetch repositories on this PDS only (no DID resolution)."),
    dids: Optional[Path] = typer.Option(None, help="Backfill the DIDs in this file (one per line)."),
    graph_file: Optional[Path] = typer.Option(None, help="Import follow pairs (CSV or Parquet with columns "
                                              "follower, followed) instead of reading repositories."),
    plc: Optional[str] = typer.Option(None, help="PLC directory (default: CHORUS_PLC_URL, https://plc.directory)."),
    plc_export: Optional[bool] = typer.Option(None, "--plc-export/--no-plc-export", help="Resolve did:plc from the "
                                              "PLC directory's /export, read once into CHORUS_STATE_DIR (default: "
                                              "with a relay's listing, not with --dids); off: one request per DID."),
    kafka: Optional[str] = typer.Option(None, help="kafka://host:port (default: CHORUS_KAFKA, else the running "
                                        "`chorus run`)."),
    concurrency: int = typer.Option(32, min=1, max=1024, help="Repositories fetched at once, overall."),
    per_host: int = typer.Option(8, min=1, max=256, help="Requests at once per host (PDS, PLC)."),
    max_car_mb: float = typer.Option(128.0, min=0.001, help="Largest repository CAR accepted, MiB (larger: "
                                     "counted as too_large and skipped)."),
    timeout: float = typer.Option(180.0, min=1.0, help="Total seconds allowed per request (retries aside)."),
    retries: int = typer.Option(4, min=0, max=20, help="Retries per request (429/5xx/connection errors)."),
    allow_net: Optional[list[str]] = typer.Option(None, help="A non-public network that may be fetched from "
                                                  "(repeatable, e.g. 127.0.0.0/8; default: none)."),
    restart: bool = typer.Option(False, "--restart", help="Forget the checkpoint and start over."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar; one summary line."),
) -> None:
    """The existing follow graph from the repositories (or a dump) into chorus.graph; resumable."""
    import asyncio
    import logging
    import signal

    from stream.backfill.checkpoint import CheckpointError
    from stream.backfill.fetch import Limits, parse_networks, refused_addresses
    from stream.backfill.graph_file import GraphFileError, check_file
    from stream.backfill.listing import ListingError, read_dids_file
    from stream.backfill.service import Backfill, BackfillError, Options, run_graph_file
    from stream.config import bootstrap_servers, relay_http_url
    from stream.metrics import serve
    from stream.topics import stage_topics

    if sum(x is not None for x in (relay, pds, dids, graph_file)) > 1:
        fail("give at most one of --relay, --pds, --dids, --graph-file")
    if plc_export and (pds is not None or graph_file is not None):
        fail("--plc-export resolves DIDs: not with --pds or --graph-file (they resolve none)")
    s = settings(kafka=kafka, plc_url=plc, allow_nets=allow_net or None)
    # The inputs first (files, URLs, networks), before anything connects: a bad one is one line.
    try:
        nets = parse_networks(s.allow_nets)
    except ValueError as exc:
        fail(str(exc))
    default_relay = None if relay or pds or dids or graph_file else relay_http_url(s.relay)
    hosts: list[tuple[str, str]] = []  # (the flag that names it, URL) of what this run will fetch from
    if pds is not None:
        hosts = [("--pds", pds)]
    elif graph_file is None:
        hosts = [("--relay", relay)] if relay else [("--relay (CHORUS_RELAY)", default_relay)] if default_relay else []
        hosts.append(("--plc", s.plc_url))
    for flag, value in hosts:
        if not value.startswith(("http://", "https://")):
            fail(f"{flag} must be an http(s) URL, got {value!r}")
    try:
        if dids is not None:
            read_dids_file(dids)
        if graph_file is not None:
            check_file(graph_file)
    except (ListingError, GraphFileError) as exc:
        fail(str(exc))
    for flag, value in hosts:
        refused = refused_addresses(value, nets)
        if refused:
            fail(f"{flag} {value} resolves to a non-public address ({', '.join(refused[:3])}); "
                 f"allow it with --allow-net {refused[0]} (or CHORUS_ALLOW_NETS)")
    from stream.local.runner import running_instance

    url, idempotence = s.kafka, s.kafka_idempotence
    note = running_instance(s.state_dir) or {}
    if url is None:
        url = note.get("kafka")
    if url is None:
        fail("the backfill needs Kafka: pass --kafka kafka://host:port or set CHORUS_KAFKA (or start `chorus run`)")
    try:
        bootstrap = bootstrap_servers(url)
        # the run's embedded broker lacks idempotent producers (as its parts do), named or not
        if note.get("embedded") and note.get("kafka") and bootstrap_servers(note["kafka"]) == bootstrap:
            idempotence = False
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(OSError):  # metrics are optional here (another chorus may hold the port)
        serve(s.metrics_host, s.metrics_port)
    opts = Options(relay=relay or default_relay, pds=pds, dids_file=dids, plc_export=plc_export,
                   plc=s.plc_url, allow_nets=list(s.allow_nets), max_car_bytes=int(max_car_mb * 1024 * 1024),
                   limits=Limits(concurrency=concurrency, per_host=per_host, total_timeout_s=timeout,
                                 retries=retries),
                   restart=restart, progress=not no_progress, topics=stage_topics("backfill", s))

    async def main() -> str:
        if graph_file is not None:
            st = await run_graph_file(bootstrap, s.state_dir, graph_file, idempotence, restart, checked=True,
                                      topics=opts.topics)
            return f"{st.edges:,} follow pairs from {graph_file}"
        bf = Backfill(bootstrap, s.state_dir, opts, idempotence=idempotence)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, bf.stop)
        await bf.run()
        return bf.summary() + ("" if bf.state.finished else " (stopped; run again to resume)")

    try:
        line = asyncio.run(main())
    except (BackfillError, ListingError, CheckpointError, GraphFileError) as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    typer.echo(f"chorus backfill: {line}", err=True)


@app.command()
def relay(
    recording: Optional[Path] = typer.Option(None, help="Serve this recording (from `chorus record`)."),
    synthetic: Optional[int] = typer.Option(None, help="Serve a synthetic population of N accounts (default 20000)."),
    seed: int = typer.Option(0, help="Seed of the synthetic population."),
    host: str = typer.Option("127.0.0.1", help="Listen address."),
    port: int = typer.Option(0, help="Listen port (0 = any free port)."),
    rate: Optional[float] = typer.Option(None, help="Pace to this many frames (events) per second (not with --speed)."),
    speed: Optional[float] = typer.Option(None, help="Pace by frame time at this multiple of real time (not with --rate)."),
    start_us: Optional[int] = typer.Option(None, help="Synthetic: time of the first frame, us since epoch (default: "
                                           "as late as keeps every frame's time at or behind the wall clock "
                                           "when it is served)."),
    jetstream: bool = typer.Option(False, "--jetstream", help="Speak Jetstream v1 (JSON at /subscribe) "
                                   "instead of subscribeRepos."),
) -> None:
    """Serve a recording or a synthetic population as a subscribeRepos (or Jetstream) relay on loopback."""
    import asyncio
    import time

    from stream.sim.recording import RecordingError
    from stream.sim.relay import FrameSource, live_start_us, run_relay

    repos = None
    if recording is not None and synthetic is not None:
        fail("give either --recording or --synthetic, not both")
    import math

    for flag, value in (("--rate", rate), ("--speed", speed)):
        if value is not None and not (math.isfinite(value) and value > 0):
            fail(f"{flag} must be a finite number > 0 (got {value})")
    if rate is not None and speed is not None:
        fail("give --rate (frames per second) or --speed (a multiple of the frames' own time), not both")
    if not 0 <= port <= 65535:
        fail(f"--port must be 0..65535 (got {port})")
    if start_us is not None and start_us < 0:
        fail(f"--start-us must be >= 0 (got {start_us})")
    if synthetic is not None and not RELAY_SYNTHETIC_MIN <= synthetic <= RELAY_SYNTHETIC_MAX:
        fail(f"--synthetic must be {RELAY_SYNTHETIC_MIN}..{RELAY_SYNTHETIC_MAX:,} (got {synthetic}): the relay holds the whole "
             "population's repositories and frames in memory")
    try:
        if recording is not None:
            source = FrameSource.from_recording(recording)
            what = f"recording {recording}"
        else:
            from stream.sim.synth import Population

            from stream.sim.repos import SyntheticRepos

            population = Population(n=20_000 if synthetic is None else synthetic, seed=seed)
            # default: placed so that no frame's time is ahead of the wall clock when it is served
            start = start_us if start_us is not None else live_start_us(
                population.frame_offsets_us(), time.time_ns() // 1000, rate, speed)
            source = FrameSource.from_population(population, 1, start)
            repos = SyntheticRepos(population, 1, start)
            what = f"synthetic population n={population.n} seed={seed}"
    except OSError as exc:  # e.g. a recording that does not exist: its path and the reason, no errno
        fail(f"cannot read {exc.filename or recording}: {exc.strerror or exc}")
    except (RecordingError, ValueError) as exc:
        fail(str(exc))

    def ready(r) -> None:
        last = f"last seq {r.source.last_seq}" if not r.jetstream else "Jetstream v1, cursor = time_us"
        typer.echo(f"chorus relay: serving {what} at {r.url} ({last})", err=True)
        if r.http_url:
            typer.echo(f"chorus relay: listRepos/getRepo at {r.http_url}, PLC directory at {r.plc_url} "
                       f"(backfill: chorus backfill --relay {r.http_url} --plc {r.plc_url} "
                       "--allow-net 127.0.0.0/8)", err=True)

    try:
        asyncio.run(run_relay(source, host=host, port=port, rate=rate, speed=speed, on_ready=ready,
                              protocol="jetstream" if jetstream else "firehose", repos=repos))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc}")
    except KeyboardInterrupt:
        pass


@app.command()
def record(
    url: str = typer.Argument(..., help="Relay base URI (ws://host:port/xrpc) or full subscribeRepos URL."),
    file: Path = typer.Argument(..., help="Recording file to write."),
    cursor: Optional[int] = typer.Option(None, min=0, help="Start after this seq."),
    limit: Optional[int] = typer.Option(None, min=1, help="Stop after N frames."),
    duration: Optional[float] = typer.Option(None, min=0.0, help="Stop after S seconds."),
) -> None:
    """Save live frames with their seq to a file (Ctrl-C or SIGTERM: flush, close, summary, exit 0)."""
    import asyncio

    from stream.process import on_stop_signals
    from stream.sim.recording import record as record_frames, subscribe_url

    async def main() -> int:
        stop = asyncio.Event()
        on_stop_signals(stop.set)  # like `chorus run`: SIGINT and SIGTERM are a clean stop
        return await record_frames(url, file, cursor=cursor, limit=limit, duration=duration, stop=stop)

    from websockets.exceptions import InvalidHandshake, InvalidURI

    try:
        subscribe_url(url)
        n = asyncio.run(main())
    except ValueError as exc:
        fail(str(exc))
    except (OSError, InvalidHandshake, InvalidURI) as exc:  # a wrong path: HTTP 404 to the handshake
        fail(f"cannot record from {url} to {file}: {exc}")
    typer.echo(f"chorus record: wrote {n} frames to {file}", err=True)


@app.command()
def alerts(
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Replay every alert kept, then follow."),
    json_lines: bool = typer.Option(False, "--json", help="Print JSON lines instead of readable lines."),
    rule: Optional[str] = typer.Option(None, help="Only this rule (e.g. new_top_culprit)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Exit after printing this many alerts."),
    kafka: Optional[str] = typer.Option(None, help="kafka://host:port (default: CHORUS_KAFKA, else the "
                                        "running `chorus run`)."),
) -> None:
    """Subscribe to chorus.alerts and print readable lines or JSON lines."""
    import asyncio

    from stream.offline.alerts_tail import follow
    from stream.config import bootstrap_servers

    if rule is not None:
        from operators.service.alerts import RULE_NAMES

        if rule not in RULE_NAMES:
            fail(f"unknown rule {rule!r} for --rule (known: {', '.join(RULE_NAMES)})")
    s = settings(kafka=kafka)
    url = s.kafka
    if url is None:
        from stream.local.runner import running_instance

        url = (running_instance(s.state_dir) or {}).get("kafka")
    if url is None:
        fail("no Kafka to read from: pass --kafka kafka://host:port or set CHORUS_KAFKA "
             "(or start `chorus run`)")
    try:
        asyncio.run(follow(bootstrap_servers(url), from_beginning=from_beginning, as_json=json_lines,
                           rule=rule, limit=limit))
    except KeyboardInterrupt:
        pass
    except (OSError, ConnectionError) as exc:
        fail(kafka_error_line(url, exc, "read chorus.alerts"), code=1)
    except Exception as exc:
        if is_kafka_error(exc):
            fail(kafka_error_line(url, exc, "read chorus.alerts"), code=1)
        raise


@app.command()
def bench(
    sections: Optional[list[str]] = typer.Argument(None, help="all (default), operator, ingest, worker, service, ..."),
    output: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown file; each section is merged in place."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes only (for iteration)."),
    sizes: Optional[str] = typer.Option(None, help="Comma-separated agent counts for the operator recompute table."),
    minutes: Optional[float] = typer.Option(None, min=0.5, help="soak: how long to run, minutes."),
    rate: Optional[float] = typer.Option(None, min=1, help="soak: events per second (wall clock)."),
) -> None:
    """Run benchmarks and write BENCHMARKS.md."""
    try:  # the benchmarks package lives at the repository root, next to stream/
        from benchmarks import run_sections
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        try:
            from benchmarks import run_sections
        except ImportError as exc:
            fail(f"benchmarks package not importable ({exc}); run from a source checkout")
    try:
        size_list = [int(float(s)) for s in sizes.split(",") if s.strip()] if sizes else None
    except ValueError:
        fail(f"--sizes must be comma-separated integers, got {sizes!r}")
    try:
        failed = run_sections(sections or ["all"], output, quick=quick, echo=typer.echo, sizes=size_list,
                              minutes=minutes, rate=rate)
    except ValueError as exc:
        fail(str(exc))
    if failed:
        fail(f"benchmark section(s) failed: {', '.join(failed)}", code=1)
    typer.echo(f"wrote {output}")


@app.command()
def analyze(
    input: Optional[Path] = typer.Argument(None, help="A recording (`chorus record`) or a Jetstream JSON-lines dump."),
    out: Path = typer.Option(..., "--out", "-o", help="Snapshot file: .parquet or .jsonl (by extension)."),
    synthetic: Optional[int] = typer.Option(None, min=50, max=RELAY_SYNTHETIC_MAX,
                                            help="Analyze a synthetic population of N accounts instead."),
    seed: int = typer.Option(0, help="Seed of the synthetic population."),
    agents: Optional[Path] = typer.Option(None, help="Also write per-agent attributions of the last window "
                                          "(.parquet or .jsonl)."),
    profile: Optional[str] = typer.Option(None, help="default (6 h window / 60 s hop) or demo (10 min / 10 s)."),
    window: Optional[int] = typer.Option(None, help="Window length, seconds (overrides the profile)."),
    hop: Optional[int] = typer.Option(None, help="Hop length, seconds (overrides the profile)."),
    indicator: Optional[list[str]] = INDICATOR_OPTION,
    topics_file: Optional[Path] = typer.Option(None, help="Topic lexicon JSON (default: the shipped one)."),
    steps: Optional[int] = STEPS_OPTION,
    panel_k: Optional[int] = PANEL_K_OPTION,
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    graph_file: Optional[Path] = typer.Option(None, "--graph-file", help="Follow graph that exists before the "
                                              "input: CSV or Parquet with columns follower, followed (DIDs), "
                                              "as `chorus backfill --graph-file` reads."),
) -> None:
    """Offline attribution over a recording, a Jetstream dump or the synthetic population."""
    from stream.backfill.graph_file import GraphFileError
    from stream.offline import analyze as offline_analyze
    from stream.sim.recording import RecordingError
    from stream.worker.lexicon import Lexicon

    if (input is None) == (synthetic is None):
        fail("give an input file or --synthetic N (one of them)")
    if agents is not None and agents.resolve() == out.resolve():
        fail(f"--agents and --out name the same file ({out}): the per-agent rows would overwrite the snapshots")
    s = settings(profile=profile, window_s=window, hop_s=hop, indicators=indicator or None, topics_file=topics_file,
                 steps=steps, panel_k=panel_k)
    try:
        Lexicon.load(s.topics_file)
        for path in (out, agents):
            if path is not None:
                offline_analyze._kind(path)
        source = offline_analyze.synthetic_source(synthetic, seed) if synthetic is not None else offline_analyze.open_source(input)
    except (ConfigError, offline_analyze.AnalyzeError, RecordingError) as exc:
        fail(str(exc))
    except (OSError, ValueError) as exc:
        fail(f"cannot open input: {exc}")
    try:
        res = offline_analyze.analyze(source, s, agents=agents is not None,
                         progress=not no_progress, graph_file=graph_file)
    except GraphFileError as exc:  # read (and every row checked) before the first event
        fail(str(exc))
    except ValueError as exc:  # e.g. an unknown indicator
        fail(str(exc).splitlines()[0])
    if res.events == 0 and input is not None:  # nothing in the file could be read (or it is empty)
        bad = ", ".join(f"{k} {v}" for k, v in sorted(res.invalid.items()))
        held = f"skipped: {bad}" if bad else f"it holds {source.total or 0} {source.unit}"
        fail(f"no event could be read from {source.name} ({held}); "
             "expected a `chorus record` file or a Jetstream JSON-lines dump")
    meta = {"source": source.name, "window_s": s.window_s, "hop_s": s.hop_s, "steps": s.steps,
            "panel_k": s.panel_k, "indicators": s.indicators, "events": res.events, "hops": res.hops}
    try:
        n = offline_analyze.write_snapshots(out, res.snapshots, meta)
        if agents is not None:
            offline_analyze.write_agents(agents, res.agents or [])
    except OSError as exc:
        fail(f"cannot write output: {exc}", code=1)
    bad = ", ".join(f"{k} {v}" for k, v in sorted(res.invalid.items()))
    typer.echo(f"chorus analyze: {res.events} events, {res.hops} hops, {n} snapshots -> {out}"
               + (f"; per-agent rows {len(res.agents or [])} -> {agents}" if agents else "")
               + (f"; skipped: {bad}" if bad else ""), err=True)


@app.command()
def report(
    snapshots: Optional[Path] = typer.Argument(None, help="Snapshot file from `chorus analyze` (.parquet/.jsonl)."),
    out_dir: Path = typer.Option(Path("chorus-report"), "--out-dir", "-o", help="Directory for the PNGs and summary.md."),
    kafka: Optional[str] = typer.Option(None, help="Read chorus.attributions from this Kafka (kafka://host:port; "
                                        "default CHORUS_KAFKA) instead of a file."),
    since: Optional[str] = typer.Option(None, help="Earliest window end: unix seconds or ISO 8601 (UTC if naive)."),
    until: Optional[str] = typer.Option(None, help="Latest window end: unix seconds or ISO 8601 (UTC if naive)."),
    agents: Optional[Path] = typer.Option(None, help="Per-agent file from `chorus analyze --agents` (exact Lorenz curve)."),
    focus: Optional[str] = typer.Option(None, help="Focus window end for the snapshot figures (default: the newest)."),
    topic: str = typer.Option("chorus.attributions", help="Kafka topic to read (with --kafka)."),
) -> None:
    """Figures and a Markdown summary from a snapshot file or chorus.attributions."""
    import asyncio

    from stream.display import parse_time_s
    from stream.offline import analyze as offline_analyze
    from stream.offline import report as offline_report
    from stream.config import bootstrap_servers

    def when(value: Optional[str], flag: str) -> Optional[int]:
        if value is None:
            return None
        try:
            return parse_time_s(value)
        except ValueError:
            fail(f"{flag} must be unix seconds or an ISO 8601 time, got {value!r}")

    lo, hi, at = when(since, "--since"), when(until, "--until"), when(focus, "--focus")
    url = kafka or (settings().kafka if snapshots is None else None)
    if (snapshots is None) == (url is None):
        fail("give a snapshot file or --kafka kafka://host:port (one of them)")
    try:
        if snapshots is not None:
            s = settings()  # a window_end ahead of the clock refuses the file, as the live guard does
            read = offline_analyze.read_snapshots(snapshots, max_skew_s=s.max_clock_skew_s, hop_s=s.hop_s)
            snaps, source = offline_report.select(read, lo, hi), str(snapshots)
        else:
            bootstrap = bootstrap_servers(url)
            snaps, source = asyncio.run(offline_report.fetch_snapshots(bootstrap, lo, hi, topic=topic)), f"{topic} on {url}"
        rows = offline_analyze.read_agents(agents) if agents is not None else None
        rep = offline_report.build_report(snaps, out_dir, agents=rows, focus=at, source=source)
    except (ConfigError, offline_analyze.AnalyzeError, offline_report.ReportError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the report: {exc}", code=1)
    except Exception as exc:
        if is_kafka_error(exc):
            fail(kafka_error_line(url, exc, f"read {topic}"), code=1)
        raise
    typer.echo(f"chorus report: {len(rep.figures)} figures and {rep.summary}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

"""`chorus run`: every part of chorus in one process tree, started and stopped in order.

Start order: run lock -> metrics endpoint -> Kafka (embedded Tansu broker unless ``settings.kafka``)
-> topics -> synthetic relay -> operator -> worker -> ingester -> backfill -> console. Shutdown (Ctrl-C,
SIGTERM, ``duration_s`` elapsed, or the embedded broker dying) runs the same list in reverse, so
upstream parts stop before the ones they feed and the broker goes last.

A part that dies on its own (the worker, operator, ingester, console) is restarted in place with
exponential backoff (``RunOptions.restart_backoff_s`` doubling up to ``max_restart_backoff_s``;
the delay starts over once a part has run :data:`HEALTHY_S` seconds), counted in
``chorus_run_part_restarts_total{part}``; its state comes back from Kafka as after any restart.
Only the embedded broker is fatal: it keeps every topic in memory, so a new one would start empty.

The backfill reads the synthetic population's existing follow graph from the relay's repositories
(it is not on the firehose, as on the network) and ends by itself; the console shows its coverage.

One metrics endpoint serves every metric: parts running in this process register in
``prometheus_client.REGISTRY`` (``stream.metrics``); a part running as a subprocess serves its own
loopback endpoint and the families it owns are proxied from it (:class:`ChildMetrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol
from urllib.request import urlopen

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from stream.local.broker import EmbeddedBroker, free_port
from stream.process import PARENT_PID_ENV, kafka_error_line, on_stop_signals
from stream.config import Settings, bootstrap_servers

log = logging.getLogger("chorus.run")

# Metric families each part owns (name prefixes, without the `_total` suffix), used to take a
# subprocess part's families from its own endpoint.
# Families every stage exports (labelled by topic or stage, so the parts' samples never collide):
# a child's samples of these are merged with the local ones.
SHARED_METRICS = ("chorus_records_rejected", "chorus_kafka_", "chorus_consumer_lag")
OWNED_METRICS: dict[str, tuple[str, ...]] = {
    "ingester": ("chorus_ingest_", "chorus_events_published"),
    "worker": ("chorus_window_", "chorus_worker_") + SHARED_METRICS,
    "operator": ("chorus_attribution_", "chorus_operator_", "chorus_alerts_"),
}
# Parts `chorus run` can run as their own process (``RunOptions.processes``, ``--process``), as
# docker-compose.yml runs every stage; the worker is one already (``RunOptions.worker``).
PROCESS_PARTS = ("ingester", "operator")


FATAL_PARTS = ("broker", "metrics")  # a failure of these stops the run
HEALTHY_S = 60.0  # a part up this long has its restart backoff reset


class RunError(RuntimeError):
    """A condition the user can fix (one line), e.g. a second `chorus run` or a port in use."""


class Part(Protocol):
    """A running piece of the pipeline."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def failure(self) -> str | None:
        """None while healthy; a one-line reason once the part died on its own."""
        ...


# --- the run lock ---------------------------------------------------------------------------

class RunLock:
    """An exclusive ``flock`` on ``<state_dir>/run.lock`` holding a JSON note about the run.

    The kernel drops the lock when the process dies, so a crashed run never blocks the next one.
    """

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "run.lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = self.read() or {}
            pid = info.get("pid", "?")
            where = f", metrics {info['metrics']}" if info.get("metrics") else ""
            raise RunError(f"`chorus run` is already running (pid {pid}{where}; lock {self.path})") from None
        self._fd = fd
        self.write({"pid": os.getpid()})
        return self

    def write(self, info: dict[str, Any]) -> None:
        """Replace the note (pid, kafka URL, embedded: whether that is the run's own broker, metrics
        URL, relay URL) other commands can read."""
        if self._fd is None:
            return
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def running_instance(state_dir: Path) -> dict[str, Any] | None:
    """The note of the `chorus run` holding the lock under ``state_dir``, or None if none runs."""
    lock = RunLock(state_dir)
    try:
        fd = os.open(lock.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return lock.read()
    finally:
        os.close(fd)
    return None


# --- metrics: one endpoint for in-process and subprocess parts ------------------------------

class ChildMetrics:
    """A subprocess's /metrics endpoint and the metric family prefixes it owns."""

    def __init__(self, url: str, owns: Iterable[str]):
        self.url = url
        self.owns = tuple(owns)

    def owned(self, name: str) -> bool:
        return name.startswith(self.owns)

    def families(self, timeout_s: float = 2.0) -> list:
        try:
            with urlopen(self.url, timeout=timeout_s) as r:
                text = r.read().decode()
        except OSError:
            return []  # child starting or restarting: its families are briefly absent
        return [f for f in text_string_to_metric_families(text) if self.owned(f.name)]


class CombinedCollector(Collector):
    """Local registry families, with those owned by a child replaced by the child's own; the
    families in :data:`SHARED_METRICS` carry the samples of both."""

    def __init__(self, local: CollectorRegistry = REGISTRY):
        self.local = local
        self.children: dict[str, ChildMetrics] = {}

    def collect(self):
        children = list(self.children.values())
        shared = {}
        for fam in self.local.collect():
            if fam.name.startswith(SHARED_METRICS):
                shared[fam.name] = fam
            elif not any(c.owned(fam.name) for c in children):
                yield fam
        for c in children:
            for fam in c.families():
                if fam.name in shared:
                    shared[fam.name].samples.extend(fam.samples)
                elif fam.name.startswith(SHARED_METRICS):
                    shared[fam.name] = fam  # a second child may carry samples of it too
                else:
                    yield fam
        yield from shared.values()


class MetricsEndpoint:
    """HTTP /metrics on ``host:port`` (port 0 = ephemeral) serving a :class:`CombinedCollector`."""

    name = "metrics"

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.collector = CombinedCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def start(self) -> None:
        from stream.metrics import serve

        try:
            self._server, _ = serve(self.host, self.port, registry=self.registry)
        except OSError as exc:
            raise RunError(
                f"metrics port {self.host}:{self.port} is in use ({exc.strerror}); is another "
                "`chorus run` running? Choose another with --metrics-port"
            ) from None
        self.port = self._server.server_port

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()

    def failure(self) -> str | None:
        return None


# --- generic parts ---------------------------------------------------------------------------

class TaskPart:
    """An in-process part: ``factory()`` returns an object with ``async run()`` and ``async stop()``."""

    def __init__(self, name: str, factory: Callable[[], Any], stop_timeout: float = 20.0):
        self.name = name
        self.factory = factory
        self.stop_timeout = stop_timeout
        self.obj: Any = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.obj = self.factory()
        self.task = asyncio.create_task(self.obj.run(), name=f"chorus-{self.name}")

    async def stop(self) -> None:
        if self.task is None:
            return
        task, self.task = self.task, None
        if not task.done():
            try:
                await asyncio.wait_for(self.obj.stop(), self.stop_timeout)
            except Exception as exc:  # noqa: BLE001 - keep shutting the others down
                log.warning("%s: stop() failed: %r", self.name, exc)
            done, _ = await asyncio.wait({task}, timeout=self.stop_timeout)
            if not done:
                log.warning("%s did not stop within %.0fs; cancelling", self.name, self.stop_timeout)
                task.cancel()
        with contextlib.suppress(BaseException):
            await task

    def failure(self) -> str | None:
        if self.task is None or not self.task.done():
            return None
        if self.task.cancelled():
            return f"{self.name} was cancelled"
        exc = self.task.exception()
        return f"{self.name} failed: {exc!r}" if exc else f"{self.name} exited"


class ProcPart:
    """A part run as a subprocess (own session, so a terminal Ctrl-C reaches only the runner,
    which stops parts in order). Output goes to ``log_path``. A ``metrics_port`` makes the runner's
    endpoint proxy the families listed in :data:`OWNED_METRICS` for ``name``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 metrics_port: int | None = None, stop_timeout: float = 20.0):
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.metrics_port = metrics_port
        self.stop_timeout = stop_timeout
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout)
        except TimeoutError:
            log.warning("%s did not exit within %.0fs of SIGTERM; killing", self.name, self.stop_timeout)
            proc.kill()
            await proc.wait()

    def failure(self) -> str | None:
        if self.proc is None or self.proc.returncode is None:
            return None
        return f"{self.name} exited with code {self.proc.returncode} (log: {self.log_path})"


class BrokerPart:
    """The embedded Tansu broker (a subprocess managed by :class:`EmbeddedBroker`)."""

    name = "broker"

    def __init__(self, log_path: Path):
        self.broker = EmbeddedBroker(log_path=log_path)

    async def start(self) -> None:
        self.broker.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.broker.spawn()  # here, not in a worker thread: the broker dies with the thread that spawned it
        await asyncio.to_thread(self.broker.wait_ready)

    async def stop(self) -> None:
        await asyncio.to_thread(self.broker.stop)

    def failure(self) -> str | None:
        p = self.broker._proc
        if p is not None and p.poll() is not None:
            return f"embedded broker exited with code {p.returncode} (log: {self.broker.log_path})"
        return None


class RelayPart:
    """The synthetic relay: a seeded ``synth.Population`` served as subscribeRepos frames.

    Event time runs at ``speed`` x wall-clock speed from ``start_time_us`` (default: placed by
    :func:`stream.sim.relay.live_start_us` so that no frame is ahead of the wall clock when served:
    the first activity now at speed 1; faster, in the past, reaching now with the last frame); at
    speed 1 (the default) lag and windows mean what they mean live, faster replays the same
    events in less wall time. The activity span is ``events_per_account * n
    / rate`` seconds of event time (about ``rate`` events/s on average), after ``follow_span_s``
    seconds in which the pre-existing follow graph was made: that graph is in the repositories the
    relay serves (listRepos, getRepo, a PLC directory: :mod:`stream.sim.xrpc`), not on the
    firehose, so the backfill has these seconds before the first activity.
    """

    name = "relay"
    EVENTS_PER_ACCOUNT = 4.0
    FOLLOW_SPAN_S = 10.0

    def __init__(self, accounts: int, seed: int, rate: float, host: str = "127.0.0.1",
                 start_time_us: int | None = None, follow_span_s: float = FOLLOW_SPAN_S, speed: float = 1.0,
                 retention: int = 100_000):
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.accounts, self.seed, self.rate, self.host = accounts, seed, rate, host
        self.retention = retention  # frames the relay keeps for reconnecting clients
        self.start_time_us, self.follow_span_s, self.speed = start_time_us, follow_span_s, speed
        self.population: Any = None
        self.relay: Any = None
        self.started_s: float | None = None  # wall clock (unix s) when it began serving start_time_us

    def make_population(self):
        from stream.sim.synth import Population

        return Population(self.accounts, self.seed, events_per_account=self.EVENTS_PER_ACCOUNT,
                          duration_s=self.EVENTS_PER_ACCOUNT * self.accounts / self.rate,
                          follow_span_s=self.follow_span_s, follow_batch=100)

    async def start(self) -> None:
        from stream.sim.relay import FrameSource, Relay, live_start_us
        from stream.sim.repos import SyntheticRepos

        self.population = await asyncio.to_thread(self.make_population)
        if self.start_time_us is None:  # no frame's time ahead of the wall clock when it is served
            offsets = await asyncio.to_thread(self.population.frame_offsets_us)
            self.start_time_us = live_start_us(offsets, time.time_ns() // 1000, speed=self.speed)
        start = self.start_time_us
        source = FrameSource.from_population(self.population, start_time_us=start)
        repos = SyntheticRepos(self.population, 1, start)
        self.relay = Relay(source, self.host, 0, speed=self.speed, repos=repos, retention=self.retention)
        self.started_s = time.time()
        await self.relay.start()

    @property
    def url(self) -> str:
        return self.relay.url

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None

    def failure(self) -> str | None:
        return None


class BackfillPart:
    """`chorus backfill` against the synthetic relay's repositories (loopback allowed), in-process.

    It ends by itself: a finished backfill is healthy, a failed one is a failure. Its checkpoint
    lives in ``<state_dir>/run-backfill`` and is cleared at start (the relay lives and dies with
    the run).
    """

    name = "backfill"

    def __init__(self, bootstrap: str, state_dir: Path, relay_http: str, plc_url: str, idempotence: bool):
        from stream.backfill.service import Backfill, Options

        state = Path(state_dir) / "run-backfill"
        opts = Options(relay=relay_http, plc=plc_url, allow_nets=["127.0.0.0/8", "::1/128"], progress=False,
                       restart=True)
        self.backfill = Backfill(bootstrap, state, opts, idempotence=idempotence)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.backfill.run(), name="chorus-backfill")

    async def stop(self) -> None:
        if self.task is None:
            return
        task, self.task = self.task, None
        if not task.done():
            self.backfill.stop()
            done, _ = await asyncio.wait({task}, timeout=20)
            if not done:
                task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if task.done() and not task.cancelled() and task.exception() is None:
            log.info("backfill: %s", self.backfill.summary())

    def failure(self) -> str | None:
        if self.task is None or not self.task.done() or self.task.cancelled():
            return None
        exc = self.task.exception()
        return f"backfill failed: {exc}" if exc else None


# --- the runner -----------------------------------------------------------------------------

@dataclass
class RunOptions:
    """What `chorus run` starts besides the settings: the synthetic source and the view."""

    synthetic: int = 5000          # synthetic accounts
    seed: int = 0
    rate: float = 50.0             # mean synthetic activity, events per second of event time
    speed: float = 1.0             # event time per wall-clock time of the synthetic relay
    start_time_us: int | None = None  # event time of the first frame (None: now)
    console: bool = True
    worker: str = "auto"           # "process", "inline" or "auto" (what stream.worker.faust_app supports)
    restart_backoff_s: float = 1.0  # first delay before restarting a part that died
    max_restart_backoff_s: float = 60.0
    processes: tuple[str, ...] = ()  # parts of PROCESS_PARTS run as their own subprocess
    relay_retention: int = 100_000  # frames the synthetic relay keeps (its memory: ~1 KB each)
    log_dir: Path | None = None    # default: <state_dir>/logs
    extra_env: dict[str, str] = field(default_factory=dict)


class Runner:
    """Starts every part in order, watches them, and stops them in reverse order.

    ``await runner.start()``; ``await runner.wait(duration_s)`` returns on a signal, after ``duration_s``
    seconds or when a part dies; ``await runner.stop()``. ``await runner.restart("worker")`` stops and
    starts one part (tests use it to check that state survives restarts).
    """

    def __init__(self, settings: Settings, options: RunOptions | None = None):
        self.opts = options or RunOptions()
        unknown = sorted(set(self.opts.processes) - set(PROCESS_PARTS))
        if unknown:
            raise RunError(f"cannot run {', '.join(unknown)} as its own process (choose from "
                           f"{', '.join(PROCESS_PARTS)})")
        self.settings = settings
        settings.window  # validate window/hop now: raises ConfigError with a one-line message
        self.state_dir = Path(settings.state_dir)
        self.log_dir = self.opts.log_dir or self.state_dir / "logs"
        self.lock = RunLock(self.state_dir)
        self.metrics = MetricsEndpoint(settings.metrics_host, settings.metrics_port)
        self.parts: list[Part] = []
        self.kafka_url: str | None = settings.kafka
        self.relay_url: str | None = None
        self.failed: str | None = None
        self._embedded = settings.kafka is None
        self._stop = asyncio.Event()
        self._started = False
        self.restarts: dict[str, int] = {}             # part -> restarts so far
        self._backoff: dict[str, int] = {}             # part -> consecutive failures
        self._restart_at: dict[str, float] = {}        # part -> when its pending restart is due
        self._up_since: dict[str, float] = {}          # part -> when it was last (re)started

    # -- helpers ----------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        if self.kafka_url is None:
            raise RunError("Kafka is not started yet")
        return bootstrap_servers(self.kafka_url)

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)

    def child_settings(self) -> Settings:
        """Settings every part runs with (Kafka and relay filled in)."""
        update: dict[str, Any] = {"kafka": self.kafka_url}
        if self.relay_url:
            update["relay"] = self.relay_url
        if self._embedded:
            update["kafka_idempotence"] = False
        return self.settings.model_copy(update=update)

    def child_env(self, metrics_port: int) -> dict[str, str]:
        """Environment for a subprocess part: every setting as ``CHORUS_*``, its own metrics port."""
        env = dict(os.environ)
        s = self.child_settings()
        for key, value in s.model_dump(mode="json").items():
            if value is None:
                continue
            env[f"CHORUS_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        env["CHORUS_METRICS_HOST"] = "127.0.0.1"
        env["CHORUS_METRICS_PORT"] = str(metrics_port)
        env[PARENT_PID_ENV] = str(os.getpid())  # the part stops if `chorus run` dies (stream.process)
        env.update(self.opts.extra_env)
        return env

    async def _start_part(self, part: Part) -> None:
        log.info("starting %s", part.name)
        self.parts.append(part)
        await part.start()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything; on any failure, stop what was started and re-raise."""
        self.lock.acquire()
        self._started = True
        try:
            await self._start_part(self.metrics)
            if self._embedded:
                broker = BrokerPart(self.log_dir / "broker.log")
                await self._start_part(broker)
                self.kafka_url = broker.broker.url
            from stream.kafka import ensure_topics
            from stream.topics import stage_topics

            try:
                await asyncio.wait_for(ensure_topics(self.bootstrap, stage_topics("run", self.settings)), 60)
            except (OSError, TimeoutError, Exception) as exc:  # aiokafka raises its own errors
                raise RunError(kafka_error_line(self.kafka_url, exc, "create the topics")) from None
            relay = RelayPart(self.opts.synthetic, self.opts.seed, self.opts.rate,
                              start_time_us=self.opts.start_time_us, speed=self.opts.speed,
                              retention=self.opts.relay_retention)
            await self._start_part(relay)
            self.relay_url = relay.url
            await self._start_part(self._operator_part())
            await self._start_part(self._worker_part())
            await self._start_part(self._ingester_part())
            await self._start_part(BackfillPart(self.bootstrap, self.state_dir, relay.relay.http_url,
                                                relay.relay.plc_url, idempotence=not self._embedded
                                                and self.settings.kafka_idempotence))
            if self.opts.console:
                from stream.local.console import Console

                await self._start_part(Console(self.bootstrap, self.metrics.registry, self.settings))
            self.lock.write({"pid": os.getpid(), "kafka": self.kafka_url, "embedded": self._embedded,
                             "metrics": self.metrics.url,
                             "relay": self.relay_url, "started": time.time(),
                             "synthetic": {"accounts": relay.accounts, "seed": relay.seed,
                                           "rate": relay.rate, "speed": relay.speed,
                                           "start_time_us": relay.start_time_us}})
        except BaseException:
            await self.stop()
            raise

    def _proc_part(self, name: str, command: list[str], env: dict[str, str] | None = None) -> ProcPart:
        """``chorus <command>`` as a subprocess part whose metrics the run's endpoint proxies."""
        port = free_port()
        child_env = self.child_env(port)
        child_env.update(env or {})
        part = ProcPart(name, [sys.executable, "-m", "stream.cli", *command], child_env,
                        self.log_dir / f"{name}.log", metrics_port=port)
        self.metrics.collector.children[name] = ChildMetrics(
            f"http://127.0.0.1:{port}/metrics", OWNED_METRICS[name] + SHARED_METRICS)
        return part

    def _operator_part(self) -> Part:
        if "operator" in self.opts.processes:
            return self._proc_part("operator", ["operator"])
        from operators.service.service import OperatorService

        s = self.child_settings()
        return TaskPart("operator", lambda: OperatorService(s))

    def _ingester_part(self) -> Part:
        if "ingester" in self.opts.processes:
            # Its own state directory, emptied now: the synthetic relay lives and dies with this
            # run, so no cursor carries over from an earlier run; within the run a restarted
            # ingester resumes from the cursor it stored there.
            state = self.state_dir / "run-ingest"
            shutil.rmtree(state, ignore_errors=True)
            return self._proc_part("ingester", ["ingest", "--relay", self.relay_url],
                                   {"CHORUS_STATE_DIR": str(state)})
        from stream.ingest.service import Ingester

        s = self.child_settings()
        # The synthetic relay lives and dies with this run: no cursor is stored across runs.
        return TaskPart("ingester", lambda: Ingester(s, relay=self.relay_url, persist_cursor=False))

    def _worker_part(self) -> Part:
        mode = self.opts.worker
        if mode == "auto":
            from stream.worker import faust_app as worker_app

            mode = getattr(worker_app, "RUN_MODE", "process")
        if mode == "inline":
            from stream.worker.faust_app import Worker

            s = self.child_settings()
            return TaskPart("worker", lambda: Worker(s))
        return self._proc_part("worker", ["worker"])

    async def restart(self, name: str) -> None:
        """Stop and start one part in place (state must come back from Kafka)."""
        part = self.part(name)
        log.info("restarting %s", name)
        await part.stop()
        await part.start()  # a TaskPart builds a fresh object from its factory

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self, duration_s: float | None = None, poll_s: float = 0.5) -> None:
        """Return on request_stop() (signals), after ``duration_s`` seconds, or when a fatal part
        (:data:`FATAL_PARTS`) dies; any other part that dies is restarted with backoff."""
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while not self._stop.is_set():
            for p in list(self.parts):
                if not await self._supervise(p):
                    return
            if deadline is not None and time.monotonic() >= deadline:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), poll_s)

    def _schedule_restart(self, name: str) -> tuple[float, int]:
        """Set the part's next restart time; returns (delay seconds, consecutive failures)."""
        n = self._backoff[name] = self._backoff.get(name, 0) + 1
        delay = min(self.opts.max_restart_backoff_s, self.opts.restart_backoff_s * 2 ** (n - 1))
        self._restart_at[name] = time.monotonic() + delay
        return delay, n

    async def _supervise(self, part: Part) -> bool:
        """Check one part: schedule or carry out its restart; False when the run must stop."""
        now = time.monotonic()
        due = self._restart_at.get(part.name)
        if due is None:
            reason = part.failure()
            if not reason:
                if now - self._up_since.get(part.name, now) >= HEALTHY_S:
                    self._backoff.pop(part.name, None)
                return True
            if part.name in FATAL_PARTS:
                self.failed = reason
                log.error("%s; stopping the run", reason)
                return False
            delay, n = self._schedule_restart(part.name)
            log.error("%s; restarting it in %.1f s (failure %d in a row)", reason, delay, n)
            return True
        if now < due:
            return True
        del self._restart_at[part.name]
        try:
            await part.stop()
            await part.start()
        except Exception as exc:  # noqa: BLE001 - retried with a longer backoff
            delay, _ = self._schedule_restart(part.name)
            log.error("restarting %s failed (%r); next try in %.1f s", part.name, exc, delay)
            return True
        self.restarts[part.name] = self.restarts.get(part.name, 0) + 1
        self._up_since[part.name] = time.monotonic()
        from stream.metrics import RUN_PART_RESTARTS

        RUN_PART_RESTARTS.labels(part=part.name).inc()
        log.warning("restarted %s (restart %d)", part.name, self.restarts[part.name])
        return True

    async def stop(self) -> None:
        """Stop every started part in reverse start order, then release the lock."""
        while self.parts:
            part = self.parts.pop()
            log.info("stopping %s", part.name)
            try:
                await part.stop()
            except Exception as exc:  # noqa: BLE001 - keep going: the rest must stop too
                log.warning("stopping %s failed: %r", part.name, exc)
        if self._started:
            self.lock.release()
            self._started = False


async def run(settings: Settings, options: RunOptions, duration_s: float | None = None,
              announce: Callable[[str], None] = print) -> int:
    """`chorus run`: start, print where things are, wait for Ctrl-C/SIGTERM/duration, stop.

    Returns the process exit code (0 clean, 1 a part died).
    """
    runner = Runner(settings, options)
    remove_handlers = on_stop_signals(runner.request_stop)
    try:
        await runner.start()
        w, h = settings.window
        announce(f"chorus run: kafka {runner.kafka_url}  relay {runner.relay_url}  "
                 f"metrics {runner.metrics.url}  window {w}s / hop {h}s  (Ctrl-C stops)")
        await runner.wait(duration_s)
    finally:
        await runner.stop()
        remove_handlers()
    if runner.failed:
        announce(f"chorus run: stopped because {runner.failed}")
        return 1
    announce("chorus run: stopped")
    return 0


__all__ = ["Runner", "RunOptions", "RunLock", "RunError", "run", "running_instance",
           "ChildMetrics", "CombinedCollector", "MetricsEndpoint", "TaskPart", "ProcPart",
           "OWNED_METRICS", "PROCESS_PARTS"]

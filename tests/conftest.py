"""Shared fixtures: a real embedded Kafka-protocol broker (Tansu) on loopback.

JAX runs on the CPU and keeps its compiled programs in a persistent cache
(``.pytest_cache/jax-compilation-cache`` under the repository root unless
``JAX_COMPILATION_CACHE_DIR`` is set): the tests and the ``chorus`` subprocesses they start
(which inherit the environment) compile each attribution program once per shape, not once per
process, and a second ``make check`` reuses the first one's. The cache holds XLA executables
keyed by the program, the JAX version and the backend: a cached program is the one XLA would
have built, so results do not change.

Rust library backtraces are off (``RUST_LIB_BACKTRACE=0``, unless set): with ``RUST_BACKTRACE=1``
in the environment (this machine sets it), ``libipld.decode_car`` (the atproto SDK's
``CAR.from_bytes``, the tests' independent CAR reader) captures a backtrace for the error that ends
every CAR it reads; with JAX's shared libraries loaded each capture walks their unwind tables:
10,000 CARs took 0.65 s of CPU instead of 0.013 s, 24 s of a fixture's 29 s in a full run. Panics
keep their backtraces (``RUST_BACKTRACE``). chorus's own decoder does not call ``decode_car``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("RUST_LIB_BACKTRACE", "0")

from stream.local.broker import EmbeddedBroker, free_port  # noqa: E402


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One embedded broker for the session; tests use unique topic/group names or fresh topics."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture
def fresh_broker(tmp_path):
    """A broker of the test's own, for tests whose code under test uses the contract topic names
    (``chorus.events`` ...) and reads them from the beginning, or that freeze the broker. Starting
    one costs about 0.1 s (Tansu, memory storage), so sharing the session broker would save
    nothing measurable and would need a topic-name override in production code."""
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as b:
        yield b


@pytest.fixture(autouse=True)
def _chorus_state_dir(tmp_path, monkeypatch):
    """Every test's default CHORUS_STATE_DIR is its own (cursor files, worker checkpoints, operator
    snapshots): never the user's, never another test's."""
    monkeypatch.setenv("CHORUS_STATE_DIR", str(tmp_path / "chorus-state"))


@pytest.fixture
def port():
    return free_port()

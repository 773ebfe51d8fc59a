"""Shared fixtures: a real embedded Kafka-protocol broker (Tansu) on loopback."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from stream.local.broker import EmbeddedBroker, free_port  # noqa: E402


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One embedded broker for the session; tests use unique topic/group names or fresh topics."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture
def fresh_broker(tmp_path):
    """A broker of the test's own (for restart/ordering tests that need empty topics)."""
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as b:
        yield b


@pytest.fixture
def port():
    return free_port()

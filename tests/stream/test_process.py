"""stream.process: every stage's process entry (event loop, stop signals, one-line Kafka errors)."""

from __future__ import annotations

import asyncio
import os
import signal

from aiokafka.errors import KafkaConnectionError

from stream.process import is_kafka_error, kafka_error_line, run_service


def test_run_service_stops_cleanly_on_sigterm():
    stopped = asyncio.Event()
    calls = []

    async def main() -> str:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stopped.wait(), 10)
        return "clean"

    async def stop() -> None:  # a coroutine, as the services' stop() are
        calls.append("stop")
        stopped.set()

    assert run_service(main, stop, use_uvloop=False) == "clean" and calls == ["stop"]


def test_kafka_errors_are_one_line():
    exc = KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1, <AddressFamily.AF_INET: 2>)]\nmore")
    assert is_kafka_error(exc) and not is_kafka_error(ValueError("x"))
    line = kafka_error_line("kafka://127.0.0.1:1", exc, "read chorus.alerts")
    assert line.startswith("cannot reach Kafka at kafka://127.0.0.1:1 (could not read chorus.alerts): ")
    assert "\n" not in line and "Unable to bootstrap" in line
    assert kafka_error_line("kafka://h:1", TimeoutError()) == "cannot reach Kafka at kafka://h:1: TimeoutError"

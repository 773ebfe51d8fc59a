"""stream.process: every stage's process entry (event loop, stop signals, one-line Kafka errors, and
parts of `chorus run` that do not outlive it)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

from aiokafka.errors import KafkaConnectionError

from stream.process import PARENT_PID_ENV, exit_with_parent, is_kafka_error, kafka_error_line, run_service


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


# The middle process starts the child with CHORUS_PARENT_PID = its own pid, prints the child's pid,
# and waits; the child arms the watch and sleeps "forever".
MIDDLE = textwrap.dedent(f"""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", {textwrap.dedent('''
        import time
        from stream.process import exit_with_parent
        assert exit_with_parent(poll_s=0.05, grace_s=5.0)
        print("armed", flush=True)
        time.sleep(600)
    ''')!r}], env={{**os.environ, "{PARENT_PID_ENV}": str(os.getpid())}}, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "armed"
    print(child.pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) counts as gone
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_child_stops_when_parent_is_killed():
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], stdout=subprocess.PIPE, text=True,
                              cwd=os.getcwd())
    try:
        child = int(middle.stdout.readline())
        assert _alive(child)
        middle.send_signal(signal.SIGKILL)
        middle.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its killed parent"
    finally:
        middle.kill()


def test_no_watch_without_the_variable_or_for_another_parent(monkeypatch):
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    assert exit_with_parent() is False
    monkeypatch.setenv(PARENT_PID_ENV, "not a pid")
    assert exit_with_parent() is False
    monkeypatch.setenv(PARENT_PID_ENV, str(os.getppid() + 1))  # not our parent: nothing to watch
    assert exit_with_parent() is False


def test_run_logs_go_to_the_file_and_with_echo_to_stdout_too(tmp_path):
    """`chorus run --no-console` (echo=sys.stdout): each log line in run.log and on stdout, not on
    stderr (which keeps the one-line errors); without echo, the file only."""
    code = textwrap.dedent("""
        import logging, sys
        from stream.process import setup_logging
        setup_logging(sys.argv[1], echo=sys.stdout if sys.argv[2] == "1" else None)
        logging.getLogger("chorus.operator").info("hop %d published", 7)
        logging.getLogger("chorus.operator").debug("not at INFO")
    """)
    for echo in ("1", "0"):
        log = tmp_path / f"run-{echo}.log"
        r = subprocess.run([sys.executable, "-c", code, str(log), echo], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = log.read_text().splitlines()
        assert len(lines) == 1 and lines[0].endswith(" INFO chorus.operator: hop 7 published"), lines
        assert r.stdout.splitlines() == (lines if echo == "1" else []), r.stdout
        assert r.stderr == ""

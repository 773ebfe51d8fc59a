"""The embedded broker dies with its owner: a SIGKILLed `chorus run` (or any process that started
an :class:`EmbeddedBroker`) cannot stop it in order, so the kernel must (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

OWNER = """
import sys, time
from stream.local.broker import EmbeddedBroker
b = EmbeddedBroker().start()
print(b._proc.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_broker_dies_when_its_owner_is_sigkilled():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                             cwd=os.getcwd())
    try:
        broker_pid = int(owner.stdout.readline())
        broker = psutil.Process(broker_pid)
        assert broker.is_running() and broker.ppid() == owner.pid
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if not broker.is_running() or broker.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.05)
        alive = broker.is_running() and broker.status() != psutil.STATUS_ZOMBIE
        if alive:
            broker.kill()
        assert not alive, "the embedded broker outlived its SIGKILLed owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()

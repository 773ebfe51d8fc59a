"""Freeze the embedded broker (SIGSTOP its process) for a while: a broker that stops answering
mid-request, the failure behind Kafka request timeouts."""

from __future__ import annotations

import os
import signal
import threading
import time


class Freezer:
    """``freeze()`` stops the broker process now and resumes it ``seconds`` later (a timer
    thread); ``frozen_s`` records how long it was stopped. Idempotent: only the first call acts."""

    def __init__(self, broker, seconds: float):
        self.pid = broker._proc.pid
        self.seconds = seconds
        self.started: float | None = None
        self.frozen_s: float | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def freeze(self) -> None:
        with self._lock:
            if self.started is not None:
                return
            self.started = time.monotonic()
            os.kill(self.pid, signal.SIGSTOP)
            self._timer = threading.Timer(self.seconds, self.thaw)
            self._timer.daemon = True
            self._timer.start()

    def thaw(self) -> None:
        with self._lock:
            if self.started is not None and self.frozen_s is None:
                os.kill(self.pid, signal.SIGCONT)
                self.frozen_s = time.monotonic() - self.started

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.thaw()

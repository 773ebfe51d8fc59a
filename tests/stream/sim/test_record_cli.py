"""`chorus record` against a real `chorus relay --synthetic` subprocess (new-user trial): a signal
(SIGTERM from docker stop/systemd/timeout, or Ctrl-C) flushes every frame and prints the summary;
a failure before any frame leaves no file behind; a relay error frame (FutureCursor) is an error,
not data."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from stream.sim.recording import scan_recording
from tests.helpers.cli import invoke
from tests.stream.sim.test_live_time import ROOT, _serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def relay():
    proc, url, last = _serve(["--synthetic", "500"])
    yield url, last
    proc.terminate()
    proc.wait(10)


def _settled(path, quiet_s: float = 1.5, timeout_s: float = 60.0) -> None:
    """Wait until ``path`` exists and its size has not changed for ``quiet_s`` (the relay is done)."""
    size, since, deadline = -1, time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.exists() else -1
        if now != size:
            size, since = now, time.monotonic()
        elif size > 0 and time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never settled")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_flushes_every_served_frame_and_prints_the_summary(relay, sig, tmp_path):
    url, last = relay
    rec = tmp_path / "sig.rec"
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "record", url, str(rec), "--cursor", "0"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        _settled(rec)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    info = scan_recording(rec)
    assert (info.frames, info.first_seq, info.last_seq) == (last, 1, last)
    assert f"chorus record: wrote {last} frames to {rec}" in err


def test_a_refused_connection_creates_no_file_and_keeps_an_existing_one(tmp_path):
    rec = tmp_path / "refused.rec"
    r = invoke(["record", "ws://127.0.0.1:1/xrpc", str(rec), "--duration", "2"])
    assert r.returncode != 0 and "chorus: error:" in r.stderr, r.stderr
    assert not rec.exists()
    rec.write_bytes(b"precious")
    r = invoke(["record", "ws://127.0.0.1:1/xrpc", str(rec), "--duration", "2"])
    assert r.returncode != 0 and rec.read_bytes() == b"precious"


def test_a_future_cursor_is_an_error_not_a_frame(relay, tmp_path):
    url, last = relay
    rec = tmp_path / "future.rec"
    r = invoke(["record", url, str(rec), "--cursor", str(last + 10**6), "--duration", "3"])
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chorus: error:") and "FutureCursor" in lines[0], r.stderr
    assert not rec.exists()


def test_a_wrong_path_on_a_live_relay_is_one_line_not_a_traceback(relay, tmp_path):
    """The relay answers the handshake with HTTP 404 for a path it does not serve (second trial:
    a traceback of websockets' InvalidStatus, exit 1)."""
    url, _ = relay
    rec = tmp_path / "wrong.rec"
    r = invoke(["record", url + "x", str(rec), "--duration", "2"])
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chorus: error: cannot record from") and "404" in lines[0], r.stderr
    assert not rec.exists()

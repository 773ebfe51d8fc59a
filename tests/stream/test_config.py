"""stream.config: every setting has one default, window and hop are resolved and checked when
Settings is built, and a bad value is a one-line `chorus: error`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from stream import process
from stream.cli import app
from stream.config import PROFILES, Settings


def test_window_and_hop_resolved_from_the_profile_when_built(monkeypatch):
    for name in ("CHORUS_PROFILE", "CHORUS_WINDOW_S", "CHORUS_HOP_S"):
        monkeypatch.delenv(name, raising=False)
    assert (Settings().window_s, Settings().hop_s) == PROFILES["default"] == (21_600, 60)
    assert Settings(profile="demo").window == (600, 10)
    assert Settings(profile="demo", hop_s=5).window == (600, 5)
    monkeypatch.setenv("CHORUS_HOP_S", "30")
    assert Settings(profile="demo").window == (600, 30)
    for window_s, hop_s in ((7, 5), (5, 10)):
        with pytest.raises(ValidationError, match="positive multiple of hop"):
            Settings(window_s=window_s, hop_s=hop_s)
    monkeypatch.setenv("CHORUS_HOP_S", "7")
    with pytest.raises(ValidationError, match=r"window \(21600s\) must be a positive multiple of hop \(7s\)"):
        Settings()


def test_bad_window_is_a_one_line_error(tmp_path):
    r = CliRunner().invoke(app, ["analyze", "--synthetic", "100", "--window", "7", "--hop", "5",
                                 "-o", str(tmp_path / "x.jsonl")])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and lines == ["chorus: error: invalid settings: window (7s) must be a positive "
                                          "multiple of hop (5s)"], r.output


def test_event_loop_setting(monkeypatch):
    assert Settings().uvloop is True
    monkeypatch.setenv("CHORUS_UVLOOP", "0")
    assert Settings().uvloop is False
    assert process.install(Settings().uvloop) == "asyncio"


def test_operator_settings_have_one_default_and_are_checked(monkeypatch):
    s = Settings()
    assert (s.steps, s.panel_k, s.cascade_p, s.quadrature_rule) == (65, 100, 0.05, None)
    monkeypatch.setenv("CHORUS_STEPS", "17")
    monkeypatch.setenv("CHORUS_QUADRATURE_RULE", "gauss-kronrod")
    assert (Settings().steps, Settings().quadrature_rule) == (17, "gauss-kronrod")
    for bad in ({"cascade_p": 1.0}, {"cascade_p": 0}, {"steps": 0}, {"panel_k": 0}, {"quadrature_rule": "simpson"}):
        with pytest.raises(ValidationError):
            Settings(**bad)
    r = CliRunner().invoke(app, ["analyze", "--synthetic", "100", "--steps", "0", "-o", "x.jsonl"])
    assert r.exit_code == 2


def test_an_empty_variable_is_the_same_as_an_unset_one(monkeypatch):
    """`CHORUS_STATE_DIR=` (set but empty) meant the current directory (a new-user trial found run
    locks and checkpoints landing wherever chorus was started): empty is unset, the default."""
    names = ("CHORUS_STATE_DIR", "CHORUS_CHECKPOINT_DIR", "CHORUS_TOPICS_FILE", "CHORUS_ALERTS_FILE",
             "CHORUS_KAFKA", "CHORUS_KAFKA_IDEMPOTENCE", "CHORUS_INDICATORS", "CHORUS_METRICS_PORT")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    default = Settings()
    assert default.state_dir.is_absolute() and default.state_dir.parts[-3:] == (".local", "state", "chorus")
    for name in names:
        monkeypatch.setenv(name, "")
    empty = Settings()
    for field in ("state_dir", "checkpoint_dir", "topics_file", "alerts_file", "kafka", "kafka_idempotence",
                  "indicators", "metrics_port"):
        assert getattr(empty, field) == getattr(default, field), field
    # a flag given as an empty string is not an environment variable: still what was given
    assert Settings(state_dir="/tmp/x").state_dir.as_posix() == "/tmp/x"


def test_nan_and_inf_settings_are_named_as_not_finite(monkeypatch):
    """A float setting of nan or inf is "not a finite number", not a misleading bound (before:
    CHORUS_CASCADE_P=nan said "Input should be less than 1")."""
    for value in ("nan", "inf", "-inf"):
        monkeypatch.setenv("CHORUS_CASCADE_P", value)
        with pytest.raises(ValidationError, match="finite number"):
            Settings()


def test_relay_population_range_names_the_real_minimum():
    from tests.helpers.cli import invoke

    for n in ("1", "0"):
        r = invoke(["relay", "--synthetic", n])
        assert r.returncode == 2 and "--synthetic must be 50..200,000" in r.stderr, r.stderr

"""`chorus ARGS` run in this process: typer's ``CliRunner`` on ``stream.cli:app``, the object the
``chorus`` console script runs (pyproject ``[project.scripts]``). Starting a ``chorus`` subprocess
costs seconds (Python, typer, pydantic, the command's imports) where a refused flag or file takes
milliseconds, so tests that check many start-up errors run them here, and each command keeps one
real subprocess for its entry point (what a separate process adds: its log handlers on the real
stderr, signal handling, the exit status as the shell sees it).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence

from typer.testing import CliRunner

from stream.cli import app


def invoke(args: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``chorus *args`` in-process with ``env`` as its only ``CHORUS_*`` variables (the
    caller's others are unset for the call); stdout and stderr separately, as text. An exception
    that the command does not turn into an exit status is raised here (a bug, not a result)."""
    overrides: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CHORUS_")}
    overrides.update(env or {})
    r = CliRunner().invoke(app, list(args), env=overrides)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(["chorus", *args], r.exit_code, r.stdout, r.stderr)

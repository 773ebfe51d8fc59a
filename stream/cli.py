"""The ``chorus`` command line (one entry point). Settings: flags, then CHORUS_* env, then defaults.

Each command is a thin shell: parse flags into :class:`stream.config.Settings`, then call the
module that does the work. Errors the user can fix print one line and exit non-zero.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .config import ConfigError, Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error to stderr and exit."""
    typer.echo(f"chorus: error: {message}", err=True)
    raise typer.Exit(code)


def settings(**overrides) -> Settings:
    """Settings with flag overrides (None means: not given on the command line)."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except (ConfigError, ValueError) as exc:
        fail(str(exc).splitlines()[0] if not isinstance(exc, ConfigError) else str(exc))
        raise  # unreachable


# --- commands: each owner fills in the body of its own command only --------------------------

@app.command()
def run(
    profile: str = typer.Option(None, help="default (6 h window / 60 s hop) or demo (10 min / 10 s)."),
    kafka: Optional[str] = typer.Option(None, help="kafka://host:port; unset starts the embedded broker."),
) -> None:
    """Everything in one process tree on the embedded default, with a live console view."""
    fail("`chorus run` is not implemented yet")


@app.command()
def ingest(
    relay: Optional[str] = typer.Option(None, help="subscribeRepos relay URL (default: the live relay)."),
    cursor: Optional[int] = typer.Option(None, help="Start from this seq instead of the stored cursor."),
    kafka: Optional[str] = typer.Option(None, help="kafka://host:port (default: CHORUS_KAFKA)."),
) -> None:
    """Consume the firehose and publish normalized events to chorus.events."""
    fail("`chorus ingest` is not implemented yet")


@app.command()
def worker(kafka: Optional[str] = typer.Option(None, help="kafka://host:port")) -> None:
    """Faust worker: rolling per-user features and the follower graph."""
    fail("`chorus worker` is not implemented yet")


@app.command()
def operator(kafka: Optional[str] = typer.Option(None, help="kafka://host:port")) -> None:
    """Operator service: device-resident state, Aumann-Shapley every hop, metrics, alerts."""
    fail("`chorus operator` is not implemented yet")


@app.command()
def relay() -> None:
    """Serve a recording or a synthetic population as a subscribeRepos relay on loopback."""
    fail("`chorus relay` is not implemented yet")


@app.command()
def record() -> None:
    """Save live frames with their seq to a file."""
    fail("`chorus record` is not implemented yet")


@app.command()
def alerts() -> None:
    """Subscribe to chorus.alerts and print readable lines or JSON lines."""
    fail("`chorus alerts` is not implemented yet")


@app.command()
def bench() -> None:
    """Run benchmarks and write BENCHMARKS.md."""
    fail("`chorus bench` is not implemented yet")


@app.command()
def analyze() -> None:
    """Offline attribution over a recording, a Jetstream dump or the synthetic population."""
    fail("`chorus analyze` is not implemented yet")


@app.command()
def report() -> None:
    """Figures and a Markdown summary from a snapshot file or chorus.attributions."""
    fail("`chorus report` is not implemented yet")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

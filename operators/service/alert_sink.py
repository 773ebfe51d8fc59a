"""Alert I/O: load the rules file and publish alerts to ``chorus.alerts`` (key = rule).

The rule logic itself is pure and lives in :mod:`operators.service.alerts`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from stream.metrics import ALERTS_PUBLISHED
from stream.schemas import TOPIC_ALERTS, Alert

from operators.service.alerts import AlertConfigError, AlertEngine, Rule, rules_from_dict

DEFAULT_RULES_FILE = "alerts.yaml"


def load_rules(path: Path | str | None = None) -> dict[str, Rule]:
    """Rules from a YAML file (``Settings.alerts_file``), or the packaged defaults when None."""
    if path is None:
        text = resources.files("operators").joinpath("data", DEFAULT_RULES_FILE).read_text()
        where = "packaged alerts.yaml"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise AlertConfigError(f"cannot read alerts file {path}: {exc.strerror or exc}") from None
        where = str(path)
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AlertConfigError(f"alerts file {where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return rules_from_dict(cfg)
    except AlertConfigError as exc:
        raise AlertConfigError(f"{where}: {exc}") from None


class AlertPublisher:
    """Evaluates snapshots with an :class:`AlertEngine` and sends the alerts through a
    :class:`stream.kafka.ReliableSender` (which rides out broker outages); counts
    ``chorus_alerts_published_total{rule}`` once Kafka acknowledged."""

    def __init__(self, sender, engine: AlertEngine, topic: str = TOPIC_ALERTS):
        self.sender, self.engine, self.topic = sender, engine, topic

    async def publish(self, alerts: list[Alert]) -> None:
        await self.sender.send([(self.topic, a.rule.encode(), a.to_bytes(), None, None) for a in alerts])
        await self.sender.flush()
        for a in alerts:
            ALERTS_PUBLISHED.labels(rule=a.rule).inc()

    async def evaluate_and_publish(self, snapshots) -> list[Alert]:
        alerts = [a for s in snapshots for a in self.engine.evaluate(s)]
        await self.publish(alerts)
        return alerts

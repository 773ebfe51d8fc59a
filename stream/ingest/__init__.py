"""Ingest stage (`chorus ingest`): relay firehose -> ``chorus.events``, at least once.

- ``decode``: one subscribeRepos frame -> :class:`~stream.ingest.decode.Decoded` (pure, never raises).
- ``normalize``: one repo record op -> one ``chorus.events`` value (field rules, validation).
- ``reader``: the SDK's websocket client with chorus's reconnect, backoff and resume cursor.
- ``publisher``: bounded queue -> Kafka, ack tracking, the cursor commit.
- ``cursor``: the durable firehose cursor file.
- ``service``: wires reader, queue and publisher into the `chorus ingest` process.
"""

"""chorus stream side: ingest, events, Faust windows, relay, synthetic population, CLI."""

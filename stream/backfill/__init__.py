"""Backfill stage (`chorus backfill`): the follow graph that already exists -> ``chorus.graph``.

- ``listing``: which repositories: ``com.atproto.sync.listRepos`` pages (relay or PDS), a DIDs file.
- ``identity``: DID -> PDS endpoint and handle (PLC directory, did:web), untrusted documents.
- ``fetch``: HTTP GET for untrusted hosts (address vetting, size caps, redirects, 429/Retry-After,
  per-host concurrency, retries with backoff).
- ``car``: a getRepo CAR file -> its follow records (libipld decoding, MST walk).
- ``publish``: follow records -> ``add`` values on chorus.graph, acknowledged per repository.
- ``checkpoint``: the durable progress under ``CHORUS_STATE_DIR`` (resume after a kill).
- ``graph_file``: `--graph-file`: follow pairs from CSV/Parquet.
- ``service``: the run: listing -> workers -> publish, counts, metrics, progress bar.

Reconciliation with the live stream is by rev, in the graph's consumer (operators/service/state.py).
"""

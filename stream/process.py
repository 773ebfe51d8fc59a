"""The asyncio event loop for chorus processes: uvloop where it is installed.

The ingester and the Faust worker spend most of their CPU in the event loop (one Kafka message
per event); uvloop runs the same asyncio code on libuv. Measured on the 2-core CI VM, worker
benchmark (stock faust.App), 50k events, live: median 5,956 vs 4,940 events per CPU-second; ingest benchmark,
end to end: 7,099-7,175 vs 4,383-7,357 events/s (3 runs each, interleaved). Set
``CHORUS_UVLOOP=0`` (``Settings.uvloop``) to keep the default asyncio loop.
"""

from __future__ import annotations

import asyncio


def install(use_uvloop: bool = True) -> str:
    """Make uvloop the loop of every later ``asyncio.run``/``new_event_loop`` when ``use_uvloop``
    (``Settings.uvloop``) and it is installed; returns the loop's name ("uvloop" or "asyncio")."""
    if not use_uvloop:
        return "asyncio"
    try:
        import uvloop
    except ImportError:  # not installed (e.g. Windows): the standard loop works the same
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"

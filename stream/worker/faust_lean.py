"""A Faust app with a lean per-message path: the same agents, streams and semantics, less overhead.

Measured on the worker (benchmarks/worker_bench.py), about 70% of a message's CPU time in stock
faust-streaming 0.15 is Faust's own, most of it in two places that this module replaces:

* The fetch loop (``Consumer._drain_messages``) hands every message to the stream callback through
  ``Service.wait_first(callback(message), suspend_flow.wait())``: four tasks or futures and an
  ``asyncio.wait`` per message, so that a delivery blocked by flow control can be abandoned when a
  rebalance suspends the flow. :class:`LeanConsumer` first runs the callback inline, one step
  (:func:`step`): delivering into a stream's queue normally completes without suspending, and
  then nothing more is needed. Only a delivery that does suspend (flow control, a full stream
  buffer, a full producer buffer) is finished as before, in a task raced against
  ``suspend_flow``; a delivery attempted while the flow is suspended takes Faust's own path.
* The Monitor sensor keeps per-event statistics for Faust's web views (a lookup of the stream's
  and task's names, several counters, timings) on every message in and out. chorus serves no
  Faust web views and keeps its own metrics; :class:`LeanMonitor` keeps only what Faust itself
  reads back from it: the time each partition's stream last took an event (the consumer's
  "stream stopped processing" check) and the committed offsets.

The fetch loop is a private method of Faust, so :data:`REVIEWED_DRAIN_SHA256` records the hash of
the Faust source this override was checked against; tests/stream/test_faust_lean.py fails when an
upgrade changes it.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Any, Coroutine

import faust
from faust.sensors import Monitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as aiokafka_driver

__all__ = ["App", "LeanConsumer", "LeanMonitor", "LeanTransport", "step", "finish", "REVIEWED_DRAIN_SHA256"]

# sha256 of inspect.getsource(faust.transport.consumer.Consumer._drain_messages), faust-streaming 0.15.3
REVIEWED_DRAIN_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"


def step(coro: Coroutine) -> tuple[bool, Any]:
    """Run ``coro`` until it returns or suspends: ``(True, result)`` or ``(False, what it yielded)``.

    What a suspended asyncio coroutine yields is the future it waits on (or None for a bare
    yield, as in ``asyncio.sleep(0)``); :func:`finish` takes it from there. Exceptions propagate.
    """
    try:
        return False, coro.send(None)
    except StopIteration as stop:
        return True, stop.value


async def finish(coro: Coroutine, blocker: Any) -> Any:
    """Drive ``coro``, suspended on ``blocker`` (from :func:`step`), to its end, as a Task would.

    Waits for ``blocker`` without consuming its outcome, then resumes ``coro``, which reads the
    result or exception itself; cancelling this coroutine throws CancelledError into ``coro`` at
    its await (so its ``finally`` blocks run), exactly as cancelling a Task running it would.
    """
    try:
        while True:
            try:
                if blocker is None:
                    await asyncio.sleep(0)
                else:
                    blocker._asyncio_future_blocking = False
                    await asyncio.wait((blocker,))
            except asyncio.CancelledError as exc:
                blocker = coro.throw(exc)
                continue
            blocker = coro.send(None)
    except StopIteration as stop:
        return stop.value


class LeanConsumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer with the fetch loop's per-message hand-off done inline (see module)."""

    async def _deliver(self, message: Any) -> None:
        """``callback(message)``: inline when it does not suspend, else as Faust does."""
        delivery = self.callback(message)
        if not self.suspend_flow.is_set():
            done, blocker = step(delivery)
            if done:
                return
            delivery = finish(delivery, blocker)
        await self.wait_first(delivery, self.suspend_flow.wait())

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - as Faust's
        # Faust's loop (faust/transport/consumer.py, REVIEWED_DRAIN_SHA256) with one change: the
        # wait_first per message is self._deliver. Gap tracking, periodic commits and yielding to
        # the loop every 100 messages are kept as they are.
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        flag_fetching = CONSUMER_FETCHING
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        deliver = self._deliver
        since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_fetching)
                ait = getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        since_yield += 1
                        if since_yield > 100:
                            await asyncio.sleep(0)
                            since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            await deliver(message)
                            set_read_offset(tp, offset)
                    unset_flag(flag_fetching)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_fetching)


class LeanTransport(aiokafka_driver.Transport):
    """Faust's aiokafka transport whose consumer is :class:`LeanConsumer`."""

    Consumer = LeanConsumer


class LeanMonitor(Monitor):
    """The Monitor sensor without per-event statistics (see module).

    Kept: ``stream_inbound_time[tp]`` (read by the consumer's stalled-stream check) and, from
    Monitor unchanged, commits, sends, rebalances and the rest of the non-per-event hooks.
    """

    def on_message_in(self, tp, offset, message) -> None:  # noqa: ANN001
        return None

    def on_stream_event_in(self, tp, offset, stream, event) -> None:  # noqa: ANN001
        self.stream_inbound_time[tp] = monotonic()
        return None

    def on_stream_event_out(self, tp, offset, stream, event, state=None) -> None:  # noqa: ANN001
        return None

    def on_message_out(self, tp, offset, message) -> None:  # noqa: ANN001
        return None


class App(faust.App):
    """``faust.App`` with :class:`LeanTransport` for consuming and :class:`LeanMonitor` as monitor.

    Takes the same arguments as ``faust.App``; only ``broker="kafka://..."`` URLs (the aiokafka
    driver) are supported.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("Monitor", LeanMonitor)
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> LeanTransport:
        url = self.conf.broker_consumer[0]
        if url.scheme not in ("kafka", "aiokafka"):
            raise ValueError(f"the worker supports kafka:// brokers only, got {url}")
        return LeanTransport(self.conf.broker_consumer, self)

"""stream/worker/faust_lean.py: the inline first step and its fallback behave as a Task running the
coroutine would (results, exceptions, cancellation), and the Faust loop it replaces is the one
reviewed. The lean app itself runs in every worker test (tests/stream/test_worker.py)."""

import asyncio
import hashlib
import inspect

import pytest
from faust.transport.consumer import Consumer

from stream.worker.faust_lean import REVIEWED_DRAIN_SHA256, finish, step


async def no_wait(x):
    return x * 2


async def waits_for(fut, log):
    try:
        v = await fut
        await asyncio.sleep(0)  # a bare yield after the future
        return v + 1
    except ValueError as exc:
        return f"caught {exc}"
    finally:
        log.append("finally")


def start_waiting(log):
    """waits_for(fut) stepped inline until it suspends on fut, then handed to finish()."""
    fut = asyncio.get_running_loop().create_future()
    coro = waits_for(fut, log)
    done, blocker = step(coro)
    assert not done and blocker is fut
    return fut, asyncio.ensure_future(finish(coro, blocker))


def test_step_completes_a_coroutine_that_does_not_suspend():
    async def main():
        return step(no_wait(21))

    assert asyncio.run(main()) == (True, 42)


def test_finish_resumes_a_suspended_coroutine_with_the_result():
    async def main():
        log = []
        fut, task = start_waiting(log)
        await asyncio.sleep(0.01)
        assert not task.done()
        fut.set_result(41)
        return await task, log

    assert asyncio.run(main()) == (42, ["finally"])


def test_finish_delivers_the_awaited_exception_into_the_coroutine():
    async def main():
        log = []
        fut, task = start_waiting(log)
        fut.set_exception(ValueError("boom"))
        return await task, log

    assert asyncio.run(main()) == ("caught boom", ["finally"])


def test_cancelling_finish_cancels_the_coroutine_like_a_task():
    async def main():
        log = []
        _, task = start_waiting(log)
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return log

    assert asyncio.run(main()) == ["finally"]


def test_step_propagates_an_exception_raised_before_suspending():
    async def bad():
        raise KeyError("x")

    async def main():
        with pytest.raises(KeyError):
            step(bad())

    asyncio.run(main())


def test_the_replaced_faust_fetch_loop_is_the_reviewed_one():
    src = inspect.getsource(Consumer._drain_messages)
    assert hashlib.sha256(src.encode()).hexdigest() == REVIEWED_DRAIN_SHA256, (
        "faust's Consumer._drain_messages changed: review LeanConsumer._drain_messages against it "
        "and update REVIEWED_DRAIN_SHA256"
    )

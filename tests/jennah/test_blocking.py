"""``jennah.blocking``: calls run in the lane's threads, in the caller's context, and a
cancelled caller waits for a call that has started (unless the lane abandons it)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from jennah.blocking import Lane, blocking

REQUEST = contextvars.ContextVar("REQUEST", default="none")


def test_the_call_runs_in_a_lane_thread_with_the_callers_context() -> None:
    def work(suffix: str) -> tuple[str, str]:
        seen = REQUEST.get()
        REQUEST.set("changed in the thread")  # must not leak back
        return f"{seen}{suffix}", threading.current_thread().name

    async def main() -> tuple[tuple[str, str], str]:
        REQUEST.set("req-1")
        got = await blocking(work, suffix="!")
        return got, REQUEST.get()

    (seen, thread), after = asyncio.run(main())
    assert seen == "req-1!"
    assert thread.startswith("jennah-io")
    assert after == "req-1"


def test_an_error_of_the_call_reaches_the_caller() -> None:
    def fail() -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        asyncio.run(blocking(fail))


async def _wait_set(event: threading.Event) -> None:
    deadline = time.monotonic() + 10
    while not event.is_set():
        assert time.monotonic() < deadline, "the call never started"
        await asyncio.sleep(0.001)


def _cancel_during_call(lane: Lane) -> tuple[list[str], list[str]]:
    """Cancel a caller of ``lane`` while its call runs; what the caller saw when the
    cancellation reached it (``at_cancel``), and the order of events."""
    started, release, ended = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def work() -> str:
        started.set()
        release.wait(10)
        order.append("call finished")
        ended.set()
        return "done"

    async def caller(at_cancel: list[str]) -> None:
        try:
            await lane.run(work)
        except asyncio.CancelledError:
            at_cancel.extend(order)
            order.append("caller cancelled")
            raise

    async def main() -> list[str]:
        at_cancel: list[str] = []
        task = asyncio.get_running_loop().create_task(caller(at_cancel))
        await _wait_set(started)
        task.cancel()
        await asyncio.sleep(0.05)
        order.append(f"task done before the call: {task.done()}")
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        # An abandoned call ends on its own.
        assert await asyncio.get_running_loop().run_in_executor(None, ended.wait, 10)
        return at_cancel

    at_cancel = asyncio.run(main())
    return at_cancel, order


def test_a_cancelled_caller_waits_for_the_started_call() -> None:
    lane = Lane("test-wait", 1)
    try:
        at_cancel, order = _cancel_during_call(lane)
    finally:
        lane.shutdown()
    assert at_cancel == ["task done before the call: False", "call finished"]
    assert order[-1] == "caller cancelled"


def test_a_lane_that_abandons_cancels_the_caller_at_once() -> None:
    lane = Lane("test-abandon", 1, abandon_on_cancel=True)
    try:
        at_cancel, order = _cancel_during_call(lane)
    finally:
        lane.shutdown()
    assert at_cancel == []
    assert order == ["caller cancelled", "task done before the call: True", "call finished"]


def test_shutdown_waits_for_handed_calls_then_refuses_more() -> None:
    lane = Lane("test-shutdown", 1)
    finished: list[int] = []

    def slow(n: int) -> None:
        time.sleep(0.02)
        finished.append(n)

    async def main() -> None:
        calls = [asyncio.ensure_future(lane.run(slow, n)) for n in range(3)]
        await asyncio.sleep(0)  # handed to the pool
        await asyncio.get_running_loop().run_in_executor(None, lane.shutdown)
        assert finished == [0, 1, 2]
        await asyncio.gather(*calls)
        with pytest.raises(RuntimeError):
            await lane.run(slow, 3)

    asyncio.run(main())

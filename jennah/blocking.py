"""The one way Jennah runs blocking work off the event loop.

A :class:`Lane` is a named pool of threads. :meth:`Lane.run` runs a blocking call in it
with these rules, the same everywhere:

* The call runs in a copy of the caller's context, so trace spans and log fields
  (contextvars) follow it into the thread.
* **Cancelling the caller never abandons a call that has started**: the cancellation waits
  for the call to finish, then goes on. A store write can therefore never land after the
  code that cancelled it has moved on (a lease renewal after the hand-over, an fsync after
  the log was closed).

  One exception, chosen per lane (``abandon_on_cancel=True``): the caller of such a lane
  is cancelled at once and the started call finishes on its own, its result dropped (one
  not started yet is dropped, as with a plain executor). Only for a lane whose owner does
  its own bookkeeping of what it handed over; the group committer's thread is the one
  such lane (``worker/commit.py``: its callers never wait on the lane, and a batch it
  started is never undone, so a cancelled batch task need not wait on a slow store). Such
  an owner also stops its threads with :meth:`Lane.shutdown`; the shared lanes below are
  never shut down.

Lanes rather than ``anyio.to_thread`` or ``asyncio.to_thread``: the profile of SubmitJob
(docs/benchmarks.md) showed anyio's per-call bookkeeping (capacity limiter, run-vars,
cancel scopes) as the largest cost of ours on the event loop, and a plain executor hop
costs about half of it, which matters next to a 0.2 ms fsync. Separate lanes keep one
kind of work from queueing behind another: fsyncs never wait for a slow store call.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class Lane:
    """A named pool of ``threads`` threads for blocking calls (module docstring)."""

    def __init__(self, name: str, threads: int, *, abandon_on_cancel: bool = False) -> None:
        self.name = name
        self.threads = threads
        self.abandon_on_cancel = abandon_on_cancel
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``fn(*args, **kwargs)`` in one of this lane's threads."""
        call = partial(contextvars.copy_context().run, fn, *args, **kwargs)
        fut = asyncio.get_running_loop().run_in_executor(self._pool, call)
        if self.abandon_on_cancel:
            return await fut
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait({fut})
            raise

    def shutdown(self) -> None:
        """Wait for the calls already handed to this lane, then stop its threads. Only
        for a lane owned by one object (module docstring); later calls raise."""
        self._pool.shutdown(wait=True)


# Store and provider calls, file work of the WAL, and anything else that blocks.
IO = Lane("jennah-io", 32)
# fsyncs of the worker's write-ahead log (group commit: one in flight per log).
FSYNC = Lane("jennah-fsync", 16)


# ``await blocking(fn, *args)``: run ``fn`` in the IO lane (the usual case). The lane's
# bound method itself, not a wrapper around it, so a call costs no extra coroutine
# (SubmitJob's hot path makes several).
blocking = IO.run

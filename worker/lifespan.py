"""How a worker starts and stops: the one place that states the order (docs/design.md §5).

**Start**: migrate the store; start the execution log (it recovers and resumes delivering
what an earlier run left); start the lease loops (renew, claim), the poller and the
membership heartbeat; register the stop-signal hook.

**Stop** comes in two phases, because peers are waiting for our leases while the server
still finishes the calls it has:

1. On the stop signal (SIGTERM), *before* the server drains its in-flight calls
   (:meth:`Lifespan.on_stop_signal`):

   a. stop taking jobs (a submit would get a lease after the hand-over);
   b. stop renewing and claiming (a renewal would re-extend a released lease; a claim
      could take our own jobs back);
   c. hand the leases over: release every lease, then nudge the live peers
      (:class:`HandOver`).

2. The server drains its in-flight calls, then the app's lifespan ends
   (:meth:`Lifespan.stop`):

   a. stop taking jobs (if no signal came first);
   b. stop every background loop (poller, lease loops, heartbeat, an early hand-over
      still running) and wait for them;
   c. hand the leases over again: jobs stored by calls that were still finishing;
   d. flush the execution log (WAL) to the store, bounded by ``SHUTDOWN_GRACE_SECONDS``;
   e. wait (bounded) for detached submits;
   f. close the execution log, the group committer, the provider and the store.

The hand-over goes before the flush because peers wait for it; the flush after it is safe:
the store places our late events by their dedup keys and byte ranges, so they can neither
collide with the new owner's nor go in twice, and the WAL keeps whatever is not delivered
for the next start. Each phase's duration is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from database.base import JobStore
from jennah.blocking import blocking
from jennah.errors import JennahError
from jennah.lifecycle import on_stop_signal
from providers.base import BatchProvider
from worker.commit import GroupCommitter
from worker.events import ExecutionLog
from worker.leases import LeaseKeeper
from worker.nudge import nudge_peers

log = logging.getLogger("jennah.worker")
# The hand-over line keeps the logger it always had (log queries select on it).
handover_log = logging.getLogger("jennah.worker.leases")

Loop = Callable[[], Coroutine[Any, Any, None]]


class HandOver:
    """Release every lease, then nudge the live peers so they claim at once (step c of
    both stop phases)."""

    def __init__(
        self,
        release: Callable[[], Awaitable[int]],
        store: JobStore,
        *,
        worker_id: str,
        self_url: str,
        token: str,
        max_age_seconds: float,
    ) -> None:
        """``release`` lets every lease of this worker expire now (``LeaseKeeper
        .release_all``); peers are the workers that heartbeated within
        ``max_age_seconds``, other than this one."""
        self._release = release
        self._store = store
        self._worker_id = worker_id
        self._self_url = self_url
        self._token = token
        self._max_age_seconds = max_age_seconds

    async def run(self) -> tuple[int, int]:
        """Release, find the peers, nudge them; return ``(released, peers_nudged)``."""
        t0 = time.monotonic()
        released = await self._release()
        if not released:
            return 0, 0
        t1 = time.monotonic()
        peers: list[str] = []
        with contextlib.suppress(JennahError):
            workers = await blocking(self._store.list_workers, self._max_age_seconds)
            peers = [w.endpoint for w in workers
                     if w.worker_id != self._worker_id and w.endpoint != self._self_url]
        t2 = time.monotonic()
        nudged = await nudge_peers(peers, self._token)
        t3 = time.monotonic()
        # A job stored by a call that was still finishing during the first pass would
        # keep its lease for a whole TTL: one more pass hands it over too.
        late = await self._release()
        if late:
            await nudge_peers(peers, self._token)
        handover_log.info("hand-over: released %d in %.3f s, found %d peers in %.3f s, "
                          "nudged %d in %.3f s, %d late", released, t1 - t0, len(peers),
                          t2 - t1, nudged, t3 - t2, late)  # fmt: skip
        return released + late, nudged


class Lifespan:
    """Starts a worker's background work and stops it, in the order of the module
    docstring."""

    def __init__(
        self,
        *,
        store: JobStore,
        provider: BatchProvider,
        committer: GroupCommitter,
        events: ExecutionLog,
        leases: LeaseKeeper,
        loops: Sequence[Loop],
        hand_over: HandOver,
        stop_accepting: Callable[[], None],
        drain_detached: Callable[[float], Awaitable[bool]],
        grace_seconds: float,
    ) -> None:
        """``loops`` are the background loops besides the lease loops (the poller, the
        heartbeat); ``stop_accepting`` and ``drain_detached`` are ``JobService``'s."""
        self._store = store
        self._provider = provider
        self._committer = committer
        self._events = events
        self._leases = leases
        self._loops = loops
        self._hand_over = hand_over
        self._stop_accepting = stop_accepting
        self._drain_detached = drain_detached
        self._grace = grace_seconds
        self._lease_tasks: list[asyncio.Task[None]] = []  # renew + claim
        self._tasks: list[asyncio.Task[None]] = []  # everything stop() cancels

    async def start(self) -> None:
        """Start (module docstring): store, execution log, loops, stop-signal hook."""
        await blocking(self._store.migrate)
        await self._events.start()
        self._lease_tasks = [asyncio.create_task(self._leases.run_renewals()),
                             asyncio.create_task(self._leases.run_claims())]  # fmt: skip
        self._tasks = [*self._lease_tasks, *(asyncio.create_task(loop()) for loop in self._loops)]
        loop = asyncio.get_running_loop()

        def on_signal() -> None:  # in the signal handler: only schedule
            loop.call_soon_threadsafe(self.on_stop_signal)

        on_stop_signal(on_signal)

    def on_stop_signal(self) -> None:
        """Phase 1, in the event loop soon after the signal: runs as a task, which
        :meth:`stop` cancels if it is still running then."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._hand_over_early()))

    async def _hand_over_early(self) -> None:
        self._stop_accepting()
        for task in self._lease_tasks:
            task.cancel()
        try:
            released, nudged = await self._hand_over.run()
            log.info("stop signal: released %d leases and nudged %d peers before the drain",
                     released, nudged)
        except JennahError as exc:
            log.warning("stop signal: early hand-over failed (stop retries it): %s", exc)

    async def stop(self) -> None:
        """Phase 2, when the app's lifespan ends."""
        t0 = time.monotonic()
        self._stop_accepting()
        log.info("shutdown: stopping background loops")
        tasks = self._tasks
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        t1 = time.monotonic()
        try:
            released, nudged = await self._hand_over.run()
            t2 = time.monotonic()
            flushed = await self._events.flush(self._grace)
            log.info("shutdown: loops stopped in %.3f s, released %d leases and nudged %d "
                     "peers in %.3f s, events %s in %.3f s", t1 - t0, released, nudged,
                     t2 - t1, "flushed" if flushed else "NOT flushed",
                     time.monotonic() - t2)  # fmt: skip
        except JennahError as exc:
            log.warning("shutdown: could not release or flush: %s", exc)
        await self._drain_detached(self._grace)
        await self._events.close()
        await self._committer.close()
        self._provider.close()
        self._store.close()

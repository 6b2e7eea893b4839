"""LeaseKeeper: renew this worker's leases, claim expired ones, release them on shutdown.

docs/design.md §5. Renewal runs every TTL/3, so a lease survives two missed renewals. Claims run
every ``claim_interval``: a claimed job keeps its resource path, and the poller resubmits
it under the same deterministic provider id only if it never reached the provider.

A released lease expires at once, so peers may claim it; :meth:`LeaseKeeper.wake` makes
this worker's claim loop run before its next tick (a peer's nudge, ``worker/nudge.py``).
The shutdown hand-over (release, then nudge the peers) is ``worker/lifespan.py``.

The keeper is given the store and the worker id, not the ``JobService``: leases are rows of
the store, fenced by ``(owner, lease_version)``. The loops take their ``sleep`` and the
store takes its clock by injection, so the lease tests drive time instead of waiting for
it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from database.base import JobStore
from jennah.blocking import blocking
from jennah.errors import JennahError, NotFound
from jennah.models import EventKind, Job

log = logging.getLogger("jennah.worker.leases")

CLAIM_BATCH = 100

Sleep = Callable[[float], Awaitable[None]]


class LeaseKeeper:
    """Keeps the leases of one worker."""

    def __init__(
        self,
        store: JobStore,
        worker_id: str,
        ttl: float,
        claim_interval: float,
        *,
        on_events: Callable[[EventKind, int], None] | None = None,
        on_claimed: Callable[[set[str]], None] | None = None,
        may_claim: Callable[[], bool] = lambda: True,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """``on_events`` is told how many LEASE_CLAIMED events a claim stored (metrics);
        ``on_claimed`` which tenants got them (it wakes this worker's watchers). Claims
        wait until ``may_claim`` says yes (the worker's own v1 events are delivered)."""
        self._store = store
        self._worker_id = worker_id
        self.ttl = ttl
        self.claim_interval = claim_interval
        self._on_events = on_events
        self._on_claimed = on_claimed
        self._may_claim = may_claim
        self._sleep = sleep
        self._wake: asyncio.Event | None = None
        self._held: dict[str, Job] = {}  # as of the last renewal
        self.held = 0
        self.claimed_total = 0
        self.lost_total = 0
        self.nudges_received = 0

    # --- one step of each loop (the tests call these directly) ------------------------

    async def renew_once(self) -> set[str]:
        """Renew every lease this worker holds; report the ones it lost.

        A lease is lost when the renewal is refused, or when a job held at the last
        renewal no longer lists as ours although it is still active (a peer claimed it
        while we were stalled). Jobs that ended or were deleted simply drop out."""
        store = self._store
        owned = await blocking(store.list_owned_jobs, self._worker_id)
        renewed = await blocking(store.renew_leases, [(j.job_id, j.lease) for j in owned],
                                 self.ttl)  # fmt: skip
        lost = [j for j in owned if j.job_id not in renewed]
        listed = {j.job_id for j in owned}
        for job_id, before in self._held.items():
            if job_id in listed:
                continue
            try:
                now = await blocking(store.get_job, before.tenant_id, job_id)
            except NotFound:
                continue
            if not now.status.terminal and now.lease != before.lease:
                lost.append(before)
        self._held = {j.job_id: j for j in owned if j.job_id in renewed}
        self.held = len(self._held)
        for job in lost:
            await self._lost(job)
        return renewed

    async def _lost(self, job: Job) -> None:
        # A log line and a metric, not a stream event: a stale owner cannot write one.
        self.lost_total += 1
        log.warning("lease on %s lost (held at version %d)", job.job_id, job.lease_version)

    async def claim_once(self) -> list[Job]:
        """Claim expired leases; the store writes each job's LEASE_CLAIMED event."""
        claimed = await blocking(
            self._store.claim_expired, self._worker_id, self.ttl, CLAIM_BATCH
        )
        if claimed:
            log.info("claimed %d jobs", len(claimed))
            self.claimed_total += len(claimed)
            if self._on_events is not None:
                self._on_events(EventKind.LEASE_CLAIMED, len(claimed))
            if self._on_claimed is not None:
                self._on_claimed({j.tenant_id for j in claimed})
        return claimed

    async def claim_all(self) -> int:
        """Claim until a batch comes back short; return how many were claimed."""
        if not self._may_claim():
            return 0
        total = 0
        while True:
            batch = len(await self.claim_once())
            total += batch
            if batch < CLAIM_BATCH:
                return total

    async def release_all(self) -> int:
        """Let every lease this worker holds expire now (fenced); return how many."""
        owned = await blocking(self._store.list_owned_jobs, self._worker_id)
        released = await blocking(
            self._store.release_leases, [(j.job_id, j.lease) for j in owned]
        )
        self.held = 0
        self._held = {}
        return released

    # --- waking -----------------------------------------------------------------------

    def wake(self) -> None:
        """Run the claim loop now instead of at its next tick (a peer released leases)."""
        self.nudges_received += 1
        log.info("nudged: claiming now")
        if self._wake is not None:
            self._wake.set()

    async def _wait_for_tick(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        sleeper = asyncio.ensure_future(self._sleep(self.claim_interval))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (sleeper, waker):
                fut.cancel()
            self._wake.clear()

    # --- the loops --------------------------------------------------------------------

    async def run_renewals(self) -> None:
        while True:
            await self._sleep(self.ttl / 3)
            try:
                await self.renew_once()
            except JennahError as exc:
                log.warning("lease renewal failed: %s", exc)

    async def run_claims(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        while True:
            try:
                await self.claim_all()
            except JennahError as exc:
                log.warning("lease claim failed: %s", exc)
            await self._wait_for_tick()

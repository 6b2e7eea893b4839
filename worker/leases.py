"""LeaseKeeper: renew this worker's leases, claim expired ones, release them on shutdown.

DESIGN §5. Renewal runs every TTL/3, so a lease survives two missed renewals. Claims run
every ``claim_interval``: a claimed job keeps its resource path, and the poller resubmits
it under the same deterministic provider id only if it never reached the provider.
"""

from __future__ import annotations

import logging

import anyio

from jennah.errors import JennahError
from jennah.models import EventKind, Job
from worker.jobs import JobService, blocking

log = logging.getLogger("jennah.worker.leases")

CLAIM_BATCH = 100


class LeaseKeeper:
    """Keeps the leases of one worker."""

    def __init__(self, jobs: JobService, ttl: float, claim_interval: float) -> None:
        self.jobs = jobs
        self.ttl = ttl
        self.claim_interval = claim_interval
        self.held = 0
        self.claimed_total = 0

    async def renew_once(self) -> set[str]:
        owned = await blocking(self.jobs.store.list_owned_jobs, self.jobs.worker_id)
        leases = [(j.job_id, j.lease) for j in owned]
        renewed = await blocking(self.jobs.store.renew_leases, leases, self.ttl)
        self.held = len(renewed)
        for job in owned:
            if job.job_id not in renewed:
                await self._lost(job)
        return renewed

    async def _lost(self, job: Job) -> None:
        log.warning("lease on %s lost", job.job_id)
        await self.jobs.events.emit(job, EventKind.LEASE_LOST, job.status, "lease not renewed")
        await self.jobs.events.job_finished(job)

    async def claim_once(self) -> list[Job]:
        claimed = await blocking(
            self.jobs.store.claim_expired, self.jobs.worker_id, self.ttl, CLAIM_BATCH
        )
        if claimed:
            await self.jobs.events.adopt([j.job_id for j in claimed])
        for job in claimed:
            self.claimed_total += 1
            await self.jobs.events.emit(
                job, EventKind.LEASE_CLAIMED, job.status,
                f"claimed at lease version {job.lease_version}",
            )
        return claimed

    async def release_all(self) -> int:
        owned = await blocking(self.jobs.store.list_owned_jobs, self.jobs.worker_id)
        return await blocking(self.jobs.store.release_leases, [(j.job_id, j.lease) for j in owned])

    async def run_renewals(self) -> None:
        while True:
            await anyio.sleep(self.ttl / 3)
            try:
                await self.renew_once()
            except JennahError as exc:
                log.warning("lease renewal failed: %s", exc)

    async def run_claims(self) -> None:
        while True:
            try:
                while len(await self.claim_once()) == CLAIM_BATCH:
                    pass
            except JennahError as exc:
                log.warning("lease claim failed: %s", exc)
            await anyio.sleep(self.claim_interval)

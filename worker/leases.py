"""LeaseKeeper: renew this worker's leases, claim expired ones, release them on shutdown.

docs/design.md §5. Renewal runs every TTL/3, so a lease survives two missed renewals. Claims run
every ``claim_interval``: a claimed job keeps its resource path, and the poller resubmits
it under the same deterministic provider id only if it never reached the provider.

**Takeover on shutdown.** A worker that stops gracefully releases its leases (they
expire at once) and then *nudges* its peers: it posts to ``/internal/claim`` on every
worker that heartbeated recently (membership in the store). The nudge only wakes the
peer's claim loop early; it carries no data and grants nothing, so a lost or forged nudge
costs one extra claim query at most. Without nudges, released leases are still claimed
at the peers' next claim tick.

The loops take their ``sleep`` and the store takes its clock by injection, so the lease
tests drive time instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from pyqwest import Client

from jennah.asgi import Receive, Scope, Send, send_text
from jennah.errors import JennahError, NotFound
from jennah.models import EventKind, Job
from jennah.rpc import WORKER_TOKEN_HEADER
from worker.jobs import JobService, blocking

log = logging.getLogger("jennah.worker.leases")

CLAIM_BATCH = 100
NUDGE_PATH = "/internal/claim"
NUDGE_TIMEOUT_SECONDS = 0.5

Sleep = Callable[[float], Awaitable[None]]


class LeaseKeeper:
    """Keeps the leases of one worker."""

    def __init__(
        self,
        jobs: JobService,
        ttl: float,
        claim_interval: float,
        *,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.jobs = jobs
        self.ttl = ttl
        self.claim_interval = claim_interval
        self._sleep = sleep
        self._wake: asyncio.Event | None = None
        self._held: dict[str, Job] = {}  # as of the last renewal
        self.held = 0
        self.claimed_total = 0
        self.lost_total = 0
        self.nudges_received = 0
        # Told which tenants got LEASE_CLAIMED events (wakes this worker's watchers).
        self.on_claimed: Callable[[set[str]], None] | None = None
        # Claims wait until this says yes (the worker's own v1 events are delivered).
        self.may_claim: Callable[[], bool] = lambda: True

    # --- one step of each loop (the tests call these directly) ------------------------

    async def renew_once(self) -> set[str]:
        """Renew every lease this worker holds; report the ones it lost.

        A lease is lost when the renewal is refused, or when a job held at the last
        renewal no longer lists as ours although it is still active (a peer claimed it
        while we were stalled). Jobs that ended or were deleted simply drop out."""
        store = self.jobs.store
        owned = await blocking(store.list_owned_jobs, self.jobs.worker_id)
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
            self.jobs.store.claim_expired, self.jobs.worker_id, self.ttl, CLAIM_BATCH
        )
        if claimed:
            log.info("claimed %d jobs", len(claimed))
            self.claimed_total += len(claimed)
            self.jobs.count(EventKind.LEASE_CLAIMED, len(claimed))
            if self.on_claimed is not None:
                self.on_claimed({j.tenant_id for j in claimed})
        return claimed

    async def claim_all(self) -> int:
        """Claim until a batch comes back short; return how many were claimed."""
        if not self.may_claim():
            return 0
        total = 0
        while True:
            batch = len(await self.claim_once())
            total += batch
            if batch < CLAIM_BATCH:
                return total

    async def release_all(self) -> int:
        owned = await blocking(self.jobs.store.list_owned_jobs, self.jobs.worker_id)
        released = await blocking(
            self.jobs.store.release_leases, [(j.job_id, j.lease) for j in owned]
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


async def nudge_peers(
    peers: Sequence[str], token: str, *, client: Client | None = None,
    timeout: float = NUDGE_TIMEOUT_SECONDS,
) -> int:
    """POST ``/internal/claim`` to each peer concurrently; return how many answered 204."""
    client = client or Client()
    headers = {WORKER_TOKEN_HEADER: token} if token else {}

    async def one(url: str) -> bool:
        try:
            async with asyncio.timeout(timeout):
                resp = await client.post(f"{url}{NUDGE_PATH}", headers, b"")
        except Exception as exc:  # a peer that is down or slow simply claims at its tick
            log.debug("nudge of %s failed: %s", url, exc)
            return False
        return resp.status == 204

    return sum(await asyncio.gather(*(one(url) for url in peers)))


def nudge_handler(keeper: LeaseKeeper, *, dev_mode: bool, token: str) -> Callable[
    [Scope, Receive, Send], Awaitable[None]
]:
    """The ASGI endpoint for ``POST /internal/claim``: the worker token is required
    (constant-time compare) unless in dev mode; it only wakes the claim loop."""
    expected = token.encode()

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST":
            await send_text(send, 405, "method not allowed\n")
            return
        presented = b""
        for name, value in scope.get("headers", []):
            if name.decode("latin-1").lower() == WORKER_TOKEN_HEADER.lower():
                presented = value
        trusted = bool(expected) and hmac.compare_digest(presented, expected)
        if not (trusted or dev_mode):
            await send_text(send, 401, "missing or invalid worker token\n")
            return
        keeper.wake()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return handle


async def release_and_nudge(
    keeper: LeaseKeeper, *, token: str, max_age_seconds: float, self_url: str
) -> tuple[int, int]:
    """Graceful hand-over: release every lease, then nudge the live peers.
    Return ``(released, peers_nudged)``."""
    t0 = time.monotonic()
    released = await keeper.release_all()
    if not released:
        return 0, 0
    t1 = time.monotonic()
    peers: list[str] = []
    with contextlib.suppress(JennahError):
        workers = await blocking(keeper.jobs.store.list_workers, max_age_seconds)
        peers = [w.endpoint for w in workers
                 if w.worker_id != keeper.jobs.worker_id and w.endpoint != self_url]
    t2 = time.monotonic()
    nudged = await nudge_peers(peers, token)
    t3 = time.monotonic()
    # A job stored by a call that was still finishing during the first pass would keep
    # its lease for a whole TTL: one more pass hands it over too.
    late = await keeper.release_all()
    if late:
        await nudge_peers(peers, token)
    log.info("hand-over: released %d in %.3f s, found %d peers in %.3f s, nudged %d in "
             "%.3f s, %d late", released, t1 - t0, len(peers), t2 - t1, nudged, t3 - t2,
             late)  # fmt: skip
    return released + late, nudged

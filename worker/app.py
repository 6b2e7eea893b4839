"""Assemble a worker: store + group committer + provider + execution-event WAL +
JobService, served as an ASGI app.

Background work (poller, lease renewal and claims, membership heartbeat) starts in the
app's lifespan and stops on shutdown, after which the worker's leases are released so a
peer takes over at once (docs/design.md §5) and the WAL is flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry

from database import create_store
from database.base import JobStore
from jennah.asgi import ASGIApp, Receive, Scope, Send, compose
from jennah.errors import JennahError
from jennah.rpc import ErrorMapper, safe_codecs
from jennah.serve import on_stop_signal
from jennah.settings import WorkerSettings
from jennah.tracing import TracingInterceptor
from jennah.v1.deployment_connect import DeploymentServiceASGIApplication
from providers import create_provider
from providers.base import BatchProvider
from worker.admission import Admission, store_active_counter, store_pressure
from worker.auth import CallerAuth
from worker.commit import GroupCommitter
from worker.events import ExecutionLog
from worker.jobs import JobService, blocking, utcnow
from worker.leases import NUDGE_PATH, LeaseKeeper, nudge_handler, release_and_nudge
from worker.metrics import instrument
from worker.notify import Notifier
from worker.poller import Poller
from worker.service import WorkerService
from worker.store_events import StoreExecutionLog
from worker.wal import WalExecutionLog

log = logging.getLogger("jennah.worker")
# Peers that heartbeated within this many claim intervals are nudged on shutdown.
MEMBERSHIP_MAX_AGE_BEATS = 3


@dataclass
class WorkerRuntime:
    settings: WorkerSettings
    store: JobStore
    provider: BatchProvider
    committer: GroupCommitter
    notifier: Notifier
    events: ExecutionLog
    jobs: JobService
    leases: LeaseKeeper
    poller: Poller
    lease_tasks: list[asyncio.Task[None]] = field(default_factory=list)  # renew + claim


def build_runtime(
    settings: WorkerSettings,
    *,
    store: JobStore | None = None,
    provider: BatchProvider | None = None,
    events: ExecutionLog | None = None,
    clock: Callable[[], datetime] = utcnow,
    registry: CollectorRegistry | None = None,
) -> WorkerRuntime:
    store = store or create_store(settings.store)
    provider = provider or create_provider(settings.provider)
    notifier = Notifier()
    committer = GroupCommitter(store, notify=notifier.notify)
    if events is None and store.name == "memory":
        events = StoreExecutionLog(committer)  # a local WAL would protect nothing
    events = events or WalExecutionLog(
        settings.wal_dir, settings.archive_dir, settings.worker_id, committer,
        clock=clock, retention_days=settings.wal_retention_days, registry=registry,
        close_timeout=max(1.0, settings.shutdown_grace_seconds / 2),
        segment_bytes=settings.wal_segment_bytes,
        max_pending_bytes=settings.wal_max_pending_bytes,
    )  # fmt: skip
    admission = Admission(settings.admission, provider=settings.provider.kind,
                          provider_rate=provider.capabilities.submit_rate,
                          counter=store_active_counter(store), pressure=store_pressure(store))
    jobs = JobService(
        store, provider, committer=committer,
        worker_id=settings.worker_id, lease_ttl=settings.lease_ttl_seconds, clock=clock,
        admission=admission, service_accounts=settings.tenant_service_accounts,
    )  # fmt: skip
    leases = LeaseKeeper(jobs, settings.lease_ttl_seconds, settings.claim_interval_seconds)
    leases.on_claimed = notifier.notify
    leases.may_claim = lambda: events.ready  # the v1 upgrade's events go in first
    interval = min(settings.poll_interval_seconds, provider.capabilities.poll_interval_seconds)
    return WorkerRuntime(settings, store, provider, committer, notifier, events, jobs, leases,
                         Poller(jobs, events, interval))  # fmt: skip


async def _heartbeat(rt: WorkerRuntime) -> None:
    while True:
        try:
            await blocking(
                rt.store.heartbeat_worker, rt.settings.worker_id, rt.settings.advertise_url
            )
            # The provider's submit rate is per account: share it among the live workers.
            live = await blocking(rt.store.list_workers, 3 * rt.settings.claim_interval_seconds)
            rt.jobs.admission.set_worker_count(len(live))
        except JennahError as exc:
            log.warning("membership heartbeat failed: %s", exc)
        await asyncio.sleep(rt.settings.claim_interval_seconds)


async def start(rt: WorkerRuntime) -> list[asyncio.Task[None]]:
    await blocking(rt.store.migrate)
    await rt.events.start()
    rt.lease_tasks = [asyncio.create_task(rt.leases.run_renewals()),
                      asyncio.create_task(rt.leases.run_claims())]  # fmt: skip
    others: list[Callable[[], Coroutine[Any, Any, None]]] = [rt.poller.run,
                                                              lambda: _heartbeat(rt)]
    return [*rt.lease_tasks, *(asyncio.create_task(loop()) for loop in others)]


async def hand_over_early(rt: WorkerRuntime) -> None:
    """On SIGTERM, before the server drains: refuse new jobs, stop claiming and renewing
    (a renewal would re-extend a released lease; a claim could take our own jobs back),
    release every lease and nudge the peers. The drain and ``stop`` follow as usual;
    ``stop`` releases again whatever in-flight calls stored meanwhile."""
    rt.jobs.draining = True
    for task in rt.lease_tasks:
        task.cancel()
    try:
        released, nudged = await release_and_nudge(
            rt.leases, token=rt.settings.worker_token, self_url=rt.settings.advertise_url,
            max_age_seconds=MEMBERSHIP_MAX_AGE_BEATS * rt.settings.claim_interval_seconds,
        )
        log.info("stop signal: released %d leases and nudged %d peers before the drain",
                 released, nudged)
    except JennahError as exc:
        log.warning("stop signal: early hand-over failed (stop retries it): %s", exc)


async def stop(rt: WorkerRuntime, tasks: list[asyncio.Task[None]]) -> None:
    """Stop the loops, hand the leases over (release + nudge), then flush the WAL.

    The hand-over goes first because peers wait for it; the flush after it is safe: the
    store places our late events by their dedup keys and byte ranges, so they can
    neither collide with the new owner's nor go in twice, and the WAL keeps whatever is
    not delivered for the next start. Each phase's duration is logged."""
    t0 = time.monotonic()
    rt.jobs.draining = True
    log.info("shutdown: stopping background loops")
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    t1 = time.monotonic()
    try:
        released, nudged = await release_and_nudge(
            rt.leases, token=rt.settings.worker_token, self_url=rt.settings.advertise_url,
            max_age_seconds=MEMBERSHIP_MAX_AGE_BEATS * rt.settings.claim_interval_seconds,
        )
        t2 = time.monotonic()
        flushed = await rt.events.flush(rt.settings.shutdown_grace_seconds)
        log.info("shutdown: loops stopped in %.3f s, released %d leases and nudged %d peers "
                 "in %.3f s, events %s in %.3f s", t1 - t0, released, nudged, t2 - t1,
                 "flushed" if flushed else "NOT flushed", time.monotonic() - t2)  # fmt: skip
    except JennahError as exc:
        log.warning("shutdown: could not release or flush: %s", exc)
    await rt.jobs.drain(rt.settings.shutdown_grace_seconds)
    await rt.events.close()
    await rt.committer.close()
    rt.provider.close()
    rt.store.close()


def create_app(
    settings: WorkerSettings,
    runtime: WorkerRuntime | None = None,
    registry: CollectorRegistry | None = None,
) -> ASGIApp:
    rt = runtime or build_runtime(settings, registry=registry)
    # RPC, job, lease, poll and provider metrics; provider calls traced (worker/metrics.py).
    rpc_metrics = instrument(rt.jobs, rt.leases, rt.poller, worker_id=settings.worker_id,
                             store=rt.store.name, registry=registry)
    service = WorkerService(rt.jobs, CallerAuth(dev_mode=settings.dev_mode,
                                                worker_token=settings.worker_token),
                            rt.notifier)  # fmt: skip

    async def lifecycle() -> AsyncGenerator[WorkerService]:
        tasks = await start(rt)
        loop = asyncio.get_running_loop()

        def begin_hand_over() -> None:  # in the event loop, soon after the signal
            tasks.append(loop.create_task(hand_over_early(rt)))

        def on_signal() -> None:  # in the signal handler: only schedule
            loop.call_soon_threadsafe(begin_hand_over)

        on_stop_signal(on_signal)
        try:
            yield service
        finally:
            await stop(rt, tasks)

    rpc = DeploymentServiceASGIApplication(
        lifecycle(), interceptors=[TracingInterceptor("worker"), rpc_metrics, ErrorMapper()],
        read_max_bytes=settings.read_max_bytes, codecs=safe_codecs(),
    )

    async def ready() -> tuple[bool, str]:
        try:
            await blocking(rt.store.ping)
        except JennahError as exc:
            return False, f"store: {exc}"
        wal_ok, wal = await rt.events.health()
        if not wal_ok:  # it still serves reads; new output waits (docs/design.md §6)
            return False, wal
        return True, f"store {rt.store.name} ok; {wal}"

    def info() -> dict[str, Any]:
        return {
            "worker_id": settings.worker_id,
            "store": rt.store.name,
            "provider": rt.provider.name,
            "leases_held": rt.leases.held,
            "leases_claimed_total": rt.leases.claimed_total,
            "leases_lost_total": rt.leases.lost_total + rt.jobs.leases_lost,
            "nudges_received": rt.leases.nudges_received,
            "poll_cycles": rt.poller.cycles,
        }

    served = compose(rpc, ready=ready, registry=registry, info=info)
    nudge = nudge_handler(rt.leases, dev_mode=settings.dev_mode, token=settings.worker_token)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == NUDGE_PATH:
            await nudge(scope, receive, send)
        else:
            await served(scope, receive, send)

    return app

"""Assemble a worker: store + provider + event log + JobService, served as an ASGI app.

Background work (poller, lease renewal and claims, membership heartbeat) starts in the
app's lifespan and stops on shutdown, after which the event log is flushed and the
worker's leases are released so a peer takes over at once (DESIGN §5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry

from database import create_store
from database.base import JobStore
from jennah.asgi import ASGIApp, compose
from jennah.errors import JennahError
from jennah.rpc import ErrorMapper
from jennah.settings import WorkerSettings
from jennah.v1.deployment_connect import DeploymentServiceASGIApplication
from providers import create_provider
from providers.base import BatchProvider
from worker.auth import CallerAuth
from worker.events import EventLog
from worker.jobs import JobService, blocking, utcnow
from worker.leases import LeaseKeeper
from worker.poller import Poller
from worker.service import WorkerService
from worker.wal import StoreSink, WalEventLog

log = logging.getLogger("jennah.worker")


@dataclass
class WorkerRuntime:
    settings: WorkerSettings
    store: JobStore
    provider: BatchProvider
    events: EventLog
    jobs: JobService
    leases: LeaseKeeper
    poller: Poller


def build_runtime(
    settings: WorkerSettings,
    *,
    store: JobStore | None = None,
    provider: BatchProvider | None = None,
    events: EventLog | None = None,
    clock: Callable[[], datetime] = utcnow,
    registry: CollectorRegistry | None = None,
) -> WorkerRuntime:
    store = store or create_store(settings.store)
    provider = provider or create_provider(settings.provider)
    events = events or WalEventLog(
        settings.wal_dir, settings.archive_dir, settings.worker_id, StoreSink(store),
        clock=clock, retention_days=settings.wal_retention_days, registry=registry,
        close_timeout=max(1.0, settings.shutdown_grace_seconds / 2),
    )
    jobs = JobService(
        store, provider, events,
        worker_id=settings.worker_id, lease_ttl=settings.lease_ttl_seconds, clock=clock,
    )
    leases = LeaseKeeper(jobs, settings.lease_ttl_seconds, settings.claim_interval_seconds)
    interval = min(settings.poll_interval_seconds, provider.capabilities.poll_interval_seconds)
    return WorkerRuntime(settings, store, provider, events, jobs, leases, Poller(jobs, interval))


async def _heartbeat(rt: WorkerRuntime) -> None:
    while True:
        try:
            await blocking(
                rt.store.heartbeat_worker, rt.settings.worker_id, rt.settings.advertise_url
            )
        except JennahError as exc:
            log.warning("membership heartbeat failed: %s", exc)
        await asyncio.sleep(rt.settings.claim_interval_seconds)


async def start(rt: WorkerRuntime) -> list[asyncio.Task[None]]:
    await blocking(rt.store.migrate)
    await rt.events.start()
    loops: list[Callable[[], Coroutine[Any, Any, None]]] = [
        rt.poller.run, rt.leases.run_renewals, rt.leases.run_claims, lambda: _heartbeat(rt),
    ]
    return [asyncio.create_task(loop()) for loop in loops]


async def stop(rt: WorkerRuntime, tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    try:
        await rt.events.flush(rt.settings.shutdown_grace_seconds)
        released = await rt.leases.release_all()
        log.info("released %d leases", released)
    except JennahError as exc:
        log.warning("shutdown: could not flush or release: %s", exc)
    await rt.events.close()
    rt.provider.close()
    rt.store.close()


def create_app(
    settings: WorkerSettings,
    runtime: WorkerRuntime | None = None,
    registry: CollectorRegistry | None = None,
) -> ASGIApp:
    rt = runtime or build_runtime(settings, registry=registry)
    service = WorkerService(rt.jobs, CallerAuth(dev_mode=settings.dev_mode,
                                                worker_token=settings.worker_token))

    async def lifecycle() -> AsyncGenerator[WorkerService]:
        tasks = await start(rt)
        try:
            yield service
        finally:
            await stop(rt, tasks)

    rpc = DeploymentServiceASGIApplication(
        lifecycle(), interceptors=[ErrorMapper()], read_max_bytes=settings.read_max_bytes
    )

    async def ready() -> tuple[bool, str]:
        try:
            await blocking(rt.store.ping)
        except JennahError as exc:
            return False, f"store: {exc}"
        return True, f"store {rt.store.name} ok"

    def info() -> dict[str, Any]:
        return {
            "worker_id": settings.worker_id,
            "store": rt.store.name,
            "provider": rt.provider.name,
            "leases_held": rt.leases.held,
            "poll_cycles": rt.poller.cycles,
        }

    return compose(rpc, ready=ready, registry=registry, info=info)

"""Assemble a worker: store + group committer + provider + execution-event WAL +
JobService, served as an ASGI app.

:func:`build_runtime` is the one place where the worker's parts are made and connected.
Each part is built after what it needs and given it in its constructor; nothing is
installed into a part afterwards. So the metrics pieces (``worker/metrics.py``: the
instrumented provider, the event-counting hook) and the output reader come before
``JobService``, and the lease keeper, the poller and the shutdown get the store, the
worker id, the clock and the ``JobService`` operations they use, not the service itself.

When the worker starts and stops, and in which order, is ``worker/lifespan.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry

from database import create_store
from database.base import JobStore
from jennah.asgi import ASGIApp, Receive, Scope, Send, compose
from jennah.blocking import blocking
from jennah.errors import JennahError
from jennah.rpc import ErrorMapper, safe_codecs
from jennah.settings import WorkerSettings
from jennah.tracing import TracingInterceptor
from jennah.v1.deployment_connect import DeploymentServiceASGIApplication
from providers import create_provider
from providers.base import BatchProvider
from worker.admission import Admission, store_active_counter, store_pressure
from worker.auth import CallerAuth
from worker.commit import GroupCommitter
from worker.events import ExecutionLog
from worker.jobs import JobService, utcnow
from worker.leases import LeaseKeeper
from worker.lifespan import HandOver, Lifespan
from worker.metrics import WorkerMetrics, worker_metrics
from worker.notify import Notifier
from worker.nudge import NUDGE_PATH, nudge_handler
from worker.output import OutputReader
from worker.poller import Poller
from worker.service import WorkerService
from worker.sse import with_sse
from worker.store_events import StoreExecutionLog
from worker.wal import WalExecutionLog
from worker.watch import EventWatch

log = logging.getLogger("jennah.worker")
# Peers that heartbeated within this many claim intervals are nudged on shutdown.
MEMBERSHIP_MAX_AGE_BEATS = 3


@dataclass
class WorkerRuntime:
    settings: WorkerSettings
    store: JobStore
    provider: BatchProvider  # instrumented (worker/metrics.py)
    committer: GroupCommitter
    notifier: Notifier
    events: ExecutionLog
    jobs: JobService
    leases: LeaseKeeper
    poller: Poller
    metrics: WorkerMetrics
    lifespan: Lifespan


def build_runtime(
    settings: WorkerSettings,
    *,
    store: JobStore | None = None,
    provider: BatchProvider | None = None,
    events: ExecutionLog | None = None,
    clock: Callable[[], datetime] = utcnow,
    registry: CollectorRegistry | None = None,
) -> WorkerRuntime:
    """Build and connect every part of a worker (nothing runs until its lifespan starts)."""
    store = store or create_store(settings.store)
    metrics = worker_metrics(registry)
    # RPC, job, lease, poll and provider metrics; provider calls traced (worker/metrics.py).
    provider = metrics.instrument_provider(provider or create_provider(settings.provider))
    count = metrics.count_events
    notifier = Notifier()
    committer = GroupCommitter(store, notify=notifier.notify, on_stored=count)
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
    worker_id = settings.worker_id
    output = OutputReader(store, provider, events, worker_id=worker_id, clock=clock)
    jobs = JobService(
        store, provider, committer=committer,
        worker_id=worker_id, lease_ttl=settings.lease_ttl_seconds, clock=clock,
        admission=admission, service_accounts=settings.tenant_service_accounts,
        on_events=count, before_end=output.settle,
    )  # fmt: skip
    leases = LeaseKeeper(
        store, worker_id, settings.lease_ttl_seconds, settings.claim_interval_seconds,
        on_events=count, on_claimed=notifier.notify,
        may_claim=lambda: events.ready,  # the v1 upgrade's events go in first
    )  # fmt: skip
    interval = min(settings.poll_interval_seconds, provider.capabilities.poll_interval_seconds)
    poller = Poller(store, provider, events, output, jobs, worker_id=worker_id, clock=clock,
                    interval=interval, on_cycle=metrics.observe_cycle)  # fmt: skip
    metrics.add_worker(worker_id, store=store.name, provider=provider.name, jobs=jobs,
                       leases=leases, poller=poller)  # fmt: skip
    hand_over = HandOver(
        leases.release_all, store, worker_id=worker_id, self_url=settings.advertise_url,
        token=settings.worker_token,
        max_age_seconds=MEMBERSHIP_MAX_AGE_BEATS * settings.claim_interval_seconds,
    )  # fmt: skip

    lifespan = Lifespan(
        store=store, provider=provider, committer=committer, events=events, leases=leases,
        loops=[poller.run, partial(_heartbeat, store, admission, settings)],
        hand_over=hand_over,
        stop_accepting=jobs.stop_accepting, drain_detached=jobs.drain,
        grace_seconds=settings.shutdown_grace_seconds,
    )  # fmt: skip
    return WorkerRuntime(settings, store, provider, committer, notifier, events, jobs, leases,
                         poller, metrics, lifespan)  # fmt: skip


async def _heartbeat(store: JobStore, admission: Admission, settings: WorkerSettings) -> None:
    """Membership: record this worker as live, and learn how many workers are."""
    while True:
        try:
            await blocking(store.heartbeat_worker, settings.worker_id, settings.advertise_url)
            # The provider's submit rate is per account: share it among the live workers.
            live = await blocking(store.list_workers, 3 * settings.claim_interval_seconds)
            admission.set_worker_count(len(live))
        except JennahError as exc:
            log.warning("membership heartbeat failed: %s", exc)
        await asyncio.sleep(settings.claim_interval_seconds)


def create_app(
    settings: WorkerSettings,
    runtime: WorkerRuntime | None = None,
    registry: CollectorRegistry | None = None,
) -> ASGIApp:
    rt = runtime or build_runtime(settings, registry=registry)
    auth = CallerAuth(dev_mode=settings.dev_mode, worker_token=settings.worker_token)
    service = WorkerService(rt.jobs, auth, EventWatch(rt.jobs, rt.notifier))

    async def lifecycle() -> AsyncGenerator[WorkerService]:
        await rt.lifespan.start()
        try:
            yield service
        finally:
            await rt.lifespan.stop()

    rpc = DeploymentServiceASGIApplication(
        lifecycle(),
        interceptors=[TracingInterceptor("worker"), rt.metrics.rpc_interceptor(), ErrorMapper()],
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

    # SSE (GET /v1/...) beside the Connect paths, behind compose's header checks.
    served = compose(with_sse(rpc, rt.jobs, rt.notifier, auth), ready=ready, registry=registry,
                     info=info)
    nudge = nudge_handler(rt.leases.wake, auth)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == NUDGE_PATH:
            await nudge(scope, receive, send)
        else:
            await served(scope, receive, send)

    return app

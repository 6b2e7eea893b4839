"""A worker's server-sent event streams (docs/sse.md; the routes, the wire format and the
stream loop are ``jennah/sse.py``).

Authenticated like the worker's RPCs (:class:`worker.auth.CallerAuth`: the gateway's
token, or anyone in dev mode, with ``X-Tenant-Id``), so that a worker can be watched
directly in development; behind a gateway, clients use the gateway's streams.

* **Job events** are the worker's own per-job feed (:meth:`worker.watch.EventWatch.job`):
  woken by this worker's commits, polling for other workers' events.
* **Notifications** are listed from the store when this worker commits events for the
  tenant (a terminal transition commits its notification with its event, so that is the
  moment one appears), and at least every ``NOTIFY_POLL_SECONDS`` for the jobs other
  workers own. A burst of commits (output lines) costs one listing per
  ``NOTIFY_COALESCE_SECONDS``, not one per commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from jennah.asgi import ASGIApp
from jennah.sse import NOTIFICATIONS_LIMIT, SseRequest, SseRoutes
from jennah.v1 import deployment_pb2 as pb
from worker import convert
from worker.auth import CallerAuth
from worker.jobs import JobService
from worker.notify import Notifier
from worker.watch import EventWatch

NOTIFY_POLL_SECONDS = 1.0
NOTIFY_COALESCE_SECONDS = 0.2


class WorkerFeeds:
    """:class:`jennah.sse.Feeds` from this worker's store and wake-ups."""

    def __init__(self, jobs: JobService, notifier: Notifier, auth: CallerAuth) -> None:
        self.jobs = jobs
        self.notifier = notifier
        self.auth = auth
        self.watch = EventWatch(jobs, notifier)

    def identify(self, request: SseRequest) -> str:
        return self.auth.identify(request.headers)[0]

    async def job_events(
        self, tenant: str, job_id: str, after_seq: int
    ) -> AsyncGenerator[pb.JobEvent] | None:
        job = await self.jobs.get(tenant, job_id)  # NotFound for unknown or foreign jobs
        if job.status.terminal and not await self.jobs.list_events(
                tenant, job_id, after_seq, 1):
            return None
        return self._events(tenant, job_id, after_seq)

    async def _events(
        self, tenant: str, job_id: str, after_seq: int
    ) -> AsyncGenerator[pb.JobEvent]:
        async for event in self.watch.job(tenant, job_id, after_seq):
            yield convert.event_to_pb(event)

    async def newest_notifications(self, tenant: str) -> Sequence[pb.Notification]:
        notes, _ = await self.jobs.list_notifications(tenant, NOTIFICATIONS_LIMIT, False)
        return [convert.notification_to_pb(n) for n in notes]

    async def notifications_changed(self, tenant: str) -> None:
        if await self.notifier.wait(tenant, NOTIFY_POLL_SECONDS):
            await asyncio.sleep(NOTIFY_COALESCE_SECONDS)


def with_sse(app: ASGIApp, jobs: JobService, notifier: Notifier, auth: CallerAuth) -> ASGIApp:
    """``app`` with the SSE paths in front of it (``GET /v1/jobs/{job_id}/events``,
    ``GET /v1/notifications``)."""
    return SseRoutes(app, WorkerFeeds(jobs, notifier, auth))

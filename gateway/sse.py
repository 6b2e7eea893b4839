"""The gateway's server-sent event streams (docs/sse.md; the routes, the wire format and
the stream loop are ``jennah/sse.py``).

A stream is authenticated like an RPC (:class:`gateway.auth.TenantAuth`: API key, proxy
identity, or ``X-Tenant-Id`` in dev mode) and re-checked every second, so a revoked key
ends it. It is routed like an RPC: the :class:`gateway.forward.Forwarder` picks the
tenant's worker and fails over along the ring.

* **Job events** come from the worker's ``WatchJobEvents``, after a ``GetJob`` that turns
  an unknown or foreign job into a 404 before the stream starts. The Forwarder fails a
  stream over only before its first message; after that, the seq of the last event sent
  is a cursor, so when the worker goes away mid-stream (``unavailable``, or a stream that
  ends without the terminal event) the watch is opened again after that seq, on whichever
  worker the Forwarder picks, up to ``RESUME_ATTEMPTS`` times in a row without an event
  in between. The client sees one gapless stream.
* **Notifications** come from ``ListNotifications`` every ``NOTIFY_POLL_SECONDS``: a
  gateway hears nothing of a worker's commits, and a tenant-wide watch would carry every
  output line of the tenant to find the few terminal events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from gateway.auth import TenantAuth
from gateway.forward import Forwarder
from jennah.asgi import ASGIApp
from jennah.sse import (
    NOTIFICATIONS_LIMIT,
    TERMINAL_KINDS,
    TERMINAL_STATUSES,
    SseRequest,
    SseRoutes,
)
from jennah.v1 import deployment_pb2 as pb

log = logging.getLogger("jennah.gateway.sse")

NOTIFY_POLL_SECONDS = 1.0
RESUME_ATTEMPTS = 3
RESUME_BACKOFF_SECONDS = 0.5


class GatewayFeeds:
    """:class:`jennah.sse.Feeds` from the tenant's workers."""

    def __init__(
        self, auth: TenantAuth, forwarder: Forwarder, *,
        poll_seconds: float = NOTIFY_POLL_SECONDS,
    ) -> None:
        self.auth = auth
        self.forwarder = forwarder
        self.poll_seconds = poll_seconds

    def identify(self, request: SseRequest) -> str:
        return self.auth.identify(request.headers, request.peer)[0]

    async def job_events(
        self, tenant: str, job_id: str, after_seq: int
    ) -> AsyncGenerator[pb.JobEvent] | None:
        got = await self.forwarder.unary(
            tenant, None, lambda c, h, t: c.get_job(
                pb.GetJobRequest(job_id=job_id), headers=h, timeout_ms=t))
        if got.job.status in TERMINAL_STATUSES:
            rest = await self.forwarder.unary(
                tenant, None, lambda c, h, t: c.list_job_events(
                    pb.ListJobEventsRequest(job_id=job_id, after_seq=after_seq, page_size=1),
                    headers=h, timeout_ms=t))
            if not rest.events:
                return None
        return self._watch(tenant, job_id, after_seq)

    async def _watch(
        self, tenant: str, job_id: str, after_seq: int
    ) -> AsyncGenerator[pb.JobEvent]:
        after, retries = after_seq, 0
        while True:
            stream = self._upstream(tenant, pb.WatchJobEventsRequest(job_id=job_id,
                                                                     after_seq=after))
            try:
                async for event in stream:
                    after, retries = event.seq, 0
                    yield event
                    if event.kind in TERMINAL_KINDS:
                        return
                reason = "the worker's stream ended before the job did"
            except ConnectError as err:
                if err.code != Code.UNAVAILABLE:
                    raise
                reason = err.message
            finally:
                await stream.aclose()
            if retries >= RESUME_ATTEMPTS:
                raise ConnectError(Code.UNAVAILABLE, f"lost the job's event stream: {reason}")
            retries += 1
            log.warning("job %s event stream interrupted (%s); resuming after seq %d",
                        job_id, reason, after)
            await asyncio.sleep(RESUME_BACKOFF_SECONDS * retries)

    def _upstream(
        self, tenant: str, request: pb.WatchJobEventsRequest
    ) -> AsyncGenerator[pb.JobEvent]:
        return self.forwarder.stream(
            tenant, None, lambda c, h, t: c.watch_job_events(request, headers=h, timeout_ms=t))

    async def newest_notifications(self, tenant: str) -> Sequence[pb.Notification]:
        listed = await self.forwarder.unary(
            tenant, None, lambda c, h, t: c.list_notifications(
                pb.ListNotificationsRequest(limit=NOTIFICATIONS_LIMIT), headers=h,
                timeout_ms=t))
        return list(listed.notifications)

    async def notifications_changed(self, tenant: str) -> None:
        await asyncio.sleep(self.poll_seconds)


def with_sse(app: ASGIApp, auth: TenantAuth, forwarder: Forwarder) -> ASGIApp:
    """``app`` with the SSE paths in front of it (``GET /v1/jobs/{job_id}/events``,
    ``GET /v1/notifications``)."""
    return SseRoutes(app, GatewayFeeds(auth, forwarder))

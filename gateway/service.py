"""The gateway's ``DeploymentService``: authenticate, then forward (docs/design.md §1, §2).

Thin on purpose. ``GetCurrentTenant`` is the one RPC the gateway answers itself, since
the gateway is what authenticated the caller. Everything else goes to the tenant's
worker through :class:`gateway.forward.Forwarder`.

SubmitJob without a ``request_id`` gets one here (``gw-<uuid4>``), *before* the first
attempt: if a worker stores the job and then dies before answering, the retry on the
next worker carries the same key, and the shared store returns the job it already has
instead of creating a second one (docs/design.md §4).

A stream outlives the moment its credentials were checked, so ``WatchJobEvents`` checks
them again at least every ``STREAM_RECHECK_SECONDS``, whether events flow or not: a
revoked key, an unmapped identity or a key moved to another tenant ends the stream with
``unauthenticated`` (the key file is re-read within a second, so within about two
seconds of ``jennah keys revoke``). Nothing is sent after a failed check.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from connectrpc.request import RequestContext

from gateway.auth import TenantAuth
from gateway.forward import Forwarder
from jennah.errors import Unauthenticated
from jennah.v1 import deployment_pb2 as pb

Ctx = RequestContext[Any, Any]

STREAM_RECHECK_SECONDS = 1.0


def gateway_request_id() -> str:
    return f"gw-{uuid.uuid4()}"


class GatewayService:
    """Implements ``jennah.v1.DeploymentService`` by forwarding to the workers."""

    def __init__(self, auth: TenantAuth, forwarder: Forwarder) -> None:
        self.auth = auth
        self.forwarder = forwarder

    def _tenant(self, ctx: Ctx) -> str:
        return self.auth.identify(ctx.request_headers, ctx.client_address)[0]

    async def submit_job(self, request: pb.SubmitJobRequest, ctx: Ctx) -> pb.SubmitJobResponse:
        tenant = self._tenant(ctx)
        if not request.request_id:
            request.request_id = gateway_request_id()
        return await self.forwarder.unary(
            tenant, ctx.timeout_ms,
            lambda c, h, t: c.submit_job(request, headers=h, timeout_ms=t),
        )

    async def get_job(self, request: pb.GetJobRequest, ctx: Ctx) -> pb.GetJobResponse:
        return await self.forwarder.unary(
            self._tenant(ctx), ctx.timeout_ms,
            lambda c, h, t: c.get_job(request, headers=h, timeout_ms=t),
        )

    async def list_jobs(self, request: pb.ListJobsRequest, ctx: Ctx) -> pb.ListJobsResponse:
        return await self.forwarder.unary(
            self._tenant(ctx), ctx.timeout_ms,
            lambda c, h, t: c.list_jobs(request, headers=h, timeout_ms=t),
        )

    async def cancel_job(self, request: pb.CancelJobRequest, ctx: Ctx) -> pb.CancelJobResponse:
        return await self.forwarder.unary(
            self._tenant(ctx), ctx.timeout_ms,
            lambda c, h, t: c.cancel_job(request, headers=h, timeout_ms=t),
        )

    async def delete_job(self, request: pb.DeleteJobRequest, ctx: Ctx) -> pb.DeleteJobResponse:
        return await self.forwarder.unary(
            self._tenant(ctx), ctx.timeout_ms,
            lambda c, h, t: c.delete_job(request, headers=h, timeout_ms=t),
        )

    async def get_current_tenant(
        self, request: pb.GetCurrentTenantRequest, ctx: Ctx
    ) -> pb.GetCurrentTenantResponse:
        tenant, method = self.auth.identify(ctx.request_headers, ctx.client_address)
        return pb.GetCurrentTenantResponse(tenant_id=tenant, auth_method=method)

    async def list_job_events(
        self, request: pb.ListJobEventsRequest, ctx: Ctx
    ) -> pb.ListJobEventsResponse:
        return await self.forwarder.unary(
            self._tenant(ctx), ctx.timeout_ms,
            lambda c, h, t: c.list_job_events(request, headers=h, timeout_ms=t),
        )

    async def list_tasks(self, request: pb.ListTasksRequest, ctx: Ctx) -> pb.ListTasksResponse:
        return await self.forwarder.unary(
            self._tenant(ctx), ctx.timeout_ms,
            lambda c, h, t: c.list_tasks(request, headers=h, timeout_ms=t),
        )

    async def list_notifications(
        self, request: pb.ListNotificationsRequest, ctx: Ctx
    ) -> pb.ListNotificationsResponse:
        return await self.forwarder.unary(
            self._tenant(ctx), ctx.timeout_ms,
            lambda c, h, t: c.list_notifications(request, headers=h, timeout_ms=t),
        )

    async def ack_notification(
        self, request: pb.AckNotificationRequest, ctx: Ctx
    ) -> pb.AckNotificationResponse:
        return await self.forwarder.unary(
            self._tenant(ctx), ctx.timeout_ms,
            lambda c, h, t: c.ack_notification(request, headers=h, timeout_ms=t),
        )

    async def watch_job_events(
        self, request: pb.WatchJobEventsRequest, ctx: Ctx
    ) -> AsyncIterator[pb.JobEvent]:
        tenant = self._tenant(ctx)
        stream = self.forwarder.stream(
            tenant, ctx.timeout_ms,
            lambda c, h, t: c.watch_job_events(request, headers=h, timeout_ms=t),
        )
        async for event in self._rechecked(stream, tenant, ctx):
            yield event

    def _recheck(self, tenant: str, ctx: Ctx) -> None:
        """Raise ``Unauthenticated`` unless the call's credentials still name ``tenant``."""
        if self._tenant(ctx) != tenant:
            raise Unauthenticated("the credentials of this stream now belong to another tenant")

    async def _rechecked(
        self, stream: AsyncGenerator[pb.JobEvent], tenant: str, ctx: Ctx
    ) -> AsyncIterator[pb.JobEvent]:
        """``stream``'s events, with the credentials checked again before an event is sent
        if a check is due, and every ``STREAM_RECHECK_SECONDS`` while none arrives.

        One task of its own drives ``stream`` from start to close (the forwarder's client
        keeps per-task state), handing events over one at a time; ending this generator
        cancels and awaits that task, which closes the upstream call."""
        handoff: asyncio.Queue[tuple[pb.JobEvent | None, BaseException | None]] = (
            asyncio.Queue(maxsize=1))

        async def pump() -> None:
            try:
                async with contextlib.aclosing(stream):
                    async for event in stream:
                        await handoff.put((event, None))
            except Exception as exc:
                await handoff.put((None, exc))
            else:
                await handoff.put((None, None))

        pumping = asyncio.create_task(pump())
        getter: asyncio.Future[tuple[pb.JobEvent | None, BaseException | None]] | None = None
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                # One get() outlives a timeout rather than being cancelled by it, so no
                # event taken from the queue is ever dropped.
                getter = getter or asyncio.ensure_future(handoff.get())
                due = checked + STREAM_RECHECK_SECONDS - loop.time()
                await asyncio.wait({getter}, timeout=max(due, 0.0))
                if loop.time() - checked >= STREAM_RECHECK_SECONDS:
                    self._recheck(tenant, ctx)
                    checked = loop.time()
                if not getter.done():
                    continue
                event, error = getter.result()
                getter = None
                if error is not None:
                    raise error
                if event is None:
                    return
                yield event
        finally:
            for task in (getter, pumping):
                if task is not None:
                    task.cancel()
            await asyncio.wait({pumping})

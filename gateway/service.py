"""The gateway's ``DeploymentService``: authenticate, then forward (docs/design.md §1, §2).

Thin on purpose. ``GetCurrentTenant`` is the one RPC the gateway answers itself, since
the gateway is what authenticated the caller. Everything else goes to the tenant's
worker through :class:`gateway.forward.Forwarder`.

SubmitJob without a ``request_id`` gets one here (``gw-<uuid4>``), *before* the first
attempt: if a worker stores the job and then dies before answering, the retry on the
next worker carries the same key, and the shared store returns the job it already has
instead of creating a second one (docs/design.md §4).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.request import RequestContext

from gateway.auth import TenantAuth
from gateway.forward import Forwarder
from jennah.v1 import deployment_pb2 as pb

Ctx = RequestContext[Any, Any]


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

    async def watch_job_events(
        self, request: pb.WatchJobEventsRequest, ctx: Ctx
    ) -> AsyncIterator[pb.JobEvent]:
        tenant = self._tenant(ctx)
        stream = self.forwarder.stream(
            tenant, ctx.timeout_ms,
            lambda c, h, t: c.watch_job_events(request, headers=h, timeout_ms=t),
        )
        async with contextlib.aclosing(stream):
            async for event in stream:
                yield event

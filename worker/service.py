"""Thin Connect handlers: parse the request, call JobService, build the response."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from connectrpc.request import RequestContext

from jennah.errors import InvalidArgument
from jennah.models import EventKind, JobFilter, JobStatus
from jennah.v1 import deployment_pb2 as pb
from worker import convert
from worker.auth import CallerAuth
from worker.jobs import JobService
from worker.validation import validate_labels

Ctx = RequestContext[Any, Any]

EVENTS_DEFAULT_PAGE = 500
EVENTS_MAX_PAGE = 1000
WATCH_POLL_SECONDS = 0.25
FINAL_EVENT_KINDS = frozenset({EventKind.COMPLETED, EventKind.FAILED, EventKind.CANCELLED})
FINAL_EVENT_GRACE_SECONDS = 5.0


class WorkerService:
    """Implements ``jennah.v1.DeploymentService`` on one worker."""

    def __init__(self, jobs: JobService, auth: CallerAuth) -> None:
        self.jobs = jobs
        self.auth = auth

    def _tenant(self, ctx: Ctx) -> str:
        return self.auth.identify(ctx.request_headers)[0]

    async def submit_job(self, request: pb.SubmitJobRequest, ctx: Ctx) -> pb.SubmitJobResponse:
        tenant = self._tenant(ctx)
        spec, request_id = convert.spec_from_request(request)
        job = await self.jobs.submit(tenant, spec, request_id)
        return pb.SubmitJobResponse(
            job_id=job.job_id,
            status=convert.status_to_pb(job.status),
            worker_id=job.owner_worker_id or self.jobs.worker_id,
        )

    async def get_job(self, request: pb.GetJobRequest, ctx: Ctx) -> pb.GetJobResponse:
        job = await self.jobs.get(self._tenant(ctx), request.job_id)
        return pb.GetJobResponse(job=convert.job_to_pb(job))

    async def list_jobs(self, request: pb.ListJobsRequest, ctx: Ctx) -> pb.ListJobsResponse:
        tenant = self._tenant(ctx)
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        flt = JobFilter(
            status=convert.status_from_pb(request.status),
            labels=validate_labels(dict(request.labels), "labels filter"),
            name_prefix=request.name_prefix,
        )
        page = await self.jobs.list_jobs(tenant, flt, request.page_size, request.page_token)
        return pb.ListJobsResponse(
            jobs=[convert.job_to_pb(j) for j in page.jobs], next_page_token=page.next_page_token
        )

    async def cancel_job(self, request: pb.CancelJobRequest, ctx: Ctx) -> pb.CancelJobResponse:
        job = await self.jobs.cancel(self._tenant(ctx), request.job_id)
        return pb.CancelJobResponse(job=convert.job_to_pb(job))

    async def delete_job(self, request: pb.DeleteJobRequest, ctx: Ctx) -> pb.DeleteJobResponse:
        await self.jobs.delete(self._tenant(ctx), request.job_id)
        return pb.DeleteJobResponse(job_id=request.job_id)

    async def get_current_tenant(
        self, request: pb.GetCurrentTenantRequest, ctx: Ctx
    ) -> pb.GetCurrentTenantResponse:
        tenant, method = self.auth.identify(ctx.request_headers)
        return pb.GetCurrentTenantResponse(tenant_id=tenant, auth_method=method)

    async def list_job_events(
        self, request: pb.ListJobEventsRequest, ctx: Ctx
    ) -> pb.ListJobEventsResponse:
        tenant = self._tenant(ctx)
        if request.after_seq < 0 or request.page_size < 0:
            raise InvalidArgument("after_seq and page_size must not be negative")
        await self.jobs.get(tenant, request.job_id)  # not_found for unknown/foreign jobs
        limit = min(request.page_size or EVENTS_DEFAULT_PAGE, EVENTS_MAX_PAGE)
        events = await self.jobs.list_events(tenant, request.job_id, request.after_seq, limit)
        return pb.ListJobEventsResponse(events=[convert.event_to_pb(e) for e in events])

    async def watch_job_events(
        self, request: pb.WatchJobEventsRequest, ctx: Ctx
    ) -> AsyncIterator[pb.JobEvent]:
        tenant = self._tenant(ctx)
        if request.after_seq < 0:
            raise InvalidArgument("after_seq must not be negative")
        if not request.job_id:
            async for ev in self._watch_tenant(tenant, request.follow):
                yield ev
            return
        after = request.after_seq
        # The job row turns terminal before the owner's event log has delivered the
        # final event to the store, so a terminal job ends the stream only once its final
        # event was sent, or after a grace (an event from before this stream's after_seq,
        # or one the WAL is still retrying, must not hold the stream open forever).
        final_seen = False
        terminal_since: float | None = None
        while True:
            job = await self.jobs.get(tenant, request.job_id)
            events = await self.jobs.list_events(tenant, job.job_id, after, EVENTS_MAX_PAGE)
            for event in events:
                after = event.seq
                final_seen = final_seen or event.kind in FINAL_EVENT_KINDS
                yield convert.event_to_pb(event)
            if job.status.terminal and terminal_since is None:
                terminal_since = time.monotonic()
                # The client may have asked to start after the final event already.
                final_seen = final_seen or await self._has_final_event(tenant, job.job_id)
            if not events and terminal_since is not None and not request.follow and (
                final_seen or time.monotonic() - terminal_since > FINAL_EVENT_GRACE_SECONDS
            ):
                return
            if not events:
                await anyio.sleep(WATCH_POLL_SECONDS)

    async def _has_final_event(self, tenant: str, job_id: str) -> bool:
        after = 0
        while True:
            page = await self.jobs.list_events(tenant, job_id, after, EVENTS_MAX_PAGE)
            if any(e.kind in FINAL_EVENT_KINDS for e in page):
                return True
            if len(page) < EVENTS_MAX_PAGE:
                return False
            after = page[-1].seq

    async def _watch_tenant(self, tenant: str, follow: bool) -> AsyncIterator[pb.JobEvent]:
        # Tenant-wide: every event of every job, deduplicated by per-job seq. Without
        # ``follow`` the stream ends once no job of the tenant is active.
        seen: dict[str, int] = {}
        while True:
            events = await self.jobs.list_events(tenant, None, 0, 100_000)
            fresh = [e for e in events if e.seq > seen.get(e.job_id, 0)]
            for ev in fresh:
                seen[ev.job_id] = max(seen.get(ev.job_id, 0), ev.seq)
                yield convert.event_to_pb(ev)
            if not fresh and not follow:
                page = await self.jobs.list_jobs(tenant, JobFilter(), 500, "")
                if all(j.status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
                       for j in page.jobs):
                    return
            await anyio.sleep(WATCH_POLL_SECONDS)

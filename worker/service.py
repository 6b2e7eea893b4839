"""Thin Connect handlers: parse the request, call JobService (or the event feeds of
``worker/watch.py``), build the response. No domain rule lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from connectrpc.request import RequestContext

from jennah.errors import InvalidArgument
from jennah.models import JobFilter
from jennah.v1 import deployment_pb2 as pb
from worker import convert
from worker.auth import CallerAuth
from worker.jobs import JobService
from worker.validation import validate_labels
from worker.watch import EventWatch

Ctx = RequestContext[Any, Any]

EVENTS_DEFAULT_PAGE = 500
EVENTS_MAX_PAGE = 1000
TASKS_DEFAULT_PAGE = 100
TASKS_MAX_PAGE = 1000
NOTIFICATIONS_DEFAULT = 20
NOTIFICATIONS_MAX = 100


class WorkerService:
    """Implements ``jennah.v1.DeploymentService`` on one worker."""

    def __init__(self, jobs: JobService, auth: CallerAuth, watch: EventWatch) -> None:
        self.jobs = jobs
        self.auth = auth
        self.watch = watch

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

    async def list_tasks(self, request: pb.ListTasksRequest, ctx: Ctx) -> pb.ListTasksResponse:
        tenant = self._tenant(ctx)
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        size = min(request.page_size or TASKS_DEFAULT_PAGE, TASKS_MAX_PAGE)
        tasks, token = await self.jobs.list_tasks(
            tenant, request.job_id, convert.task_status_from_pb(request.status), size,
            request.page_token,
        )
        return pb.ListTasksResponse(tasks=[convert.task_to_pb(t) for t in tasks],
                                    next_page_token=token)

    async def list_notifications(
        self, request: pb.ListNotificationsRequest, ctx: Ctx
    ) -> pb.ListNotificationsResponse:
        tenant = self._tenant(ctx)
        if request.limit < 0:
            raise InvalidArgument("limit must not be negative")
        limit = min(request.limit or NOTIFICATIONS_DEFAULT, NOTIFICATIONS_MAX)
        notes, unread = await self.jobs.list_notifications(tenant, limit, request.unread_only)
        return pb.ListNotificationsResponse(
            notifications=[convert.notification_to_pb(n) for n in notes], unread_count=unread)

    async def ack_notification(
        self, request: pb.AckNotificationRequest, ctx: Ctx
    ) -> pb.AckNotificationResponse:
        await self.jobs.ack_notification(self._tenant(ctx), request.notification_id)
        return pb.AckNotificationResponse(success=True)

    async def watch_job_events(
        self, request: pb.WatchJobEventsRequest, ctx: Ctx
    ) -> AsyncIterator[pb.JobEvent]:
        events = self.watch.events(
            self._tenant(ctx), job_id=request.job_id, after_seq=request.after_seq,
            after_position=request.after_position, follow=request.follow,
        )
        async for event in events:
            yield convert.event_to_pb(event)

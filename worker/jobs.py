"""JobService: the worker's domain rules (DESIGN §3, §4). RPC handlers stay thin and call in.

The store and provider are blocking; every call to them goes through a worker thread so
the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import ParamSpec, TypeVar

from database.base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, JobStore
from jennah.errors import Conflict, FailedPrecondition, LeaseLost, ProviderError, ShuttingDown
from jennah.models import (
    EventKind,
    FailureClass,
    Job,
    JobEvent,
    JobFilter,
    JobPatch,
    JobSpec,
    JobStatus,
    Page,
)
from jennah.rpc import DRAINING_MESSAGE
from providers.base import BatchProvider, ProviderStatus, ProviderTask, provider_job_id
from worker.admission import Admission
from worker.events import EventLog

log = logging.getLogger("jennah.worker.jobs")

IO_THREADS = 32
P = ParamSpec("P")
R = TypeVar("R")

_EVENT_FOR_STATUS = {
    JobStatus.SCHEDULED: EventKind.SCHEDULED,
    JobStatus.RUNNING: EventKind.RUNNING,
    JobStatus.COMPLETED: EventKind.COMPLETED,
    JobStatus.FAILED: EventKind.FAILED,
    JobStatus.CANCELLED: EventKind.CANCELLED,
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return str(uuid.uuid4())


# Store and provider calls run here. A plain executor rather than anyio.to_thread: the
# profile of SubmitJob (docs/benchmarks.md) showed anyio's per-call bookkeeping (capacity
# limiter, run-vars, cancel scopes) as the largest cost of ours on the event loop.
_IO_POOL = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="jennah-io")


async def blocking(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run a blocking store/provider call in a worker thread.

    Cancelling the caller does not abandon the call: a store write that has started is
    waited for before the cancellation goes on (as anyio's shielded default did), so no
    write can land after the code that cancelled it has moved on (e.g. a lease renewal
    after the hand-over)."""
    # Like asyncio.to_thread, run in a copy of our context: trace spans and log fields
    # (contextvars) must follow the call into the thread.
    call = partial(contextvars.copy_context().run, fn, *args, **kwargs)
    fut = asyncio.get_running_loop().run_in_executor(_IO_POOL, call)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait({fut})
        raise


class JobService:
    """Submits, reads, cancels and drives jobs for one worker."""

    def __init__(
        self,
        store: JobStore,
        provider: BatchProvider,
        events: EventLog,
        *,
        worker_id: str,
        lease_ttl: float,
        clock: Callable[[], datetime] = utcnow,
        new_id: Callable[[], str] = new_job_id,
        admission: Admission | None = None,
    ) -> None:
        self.store = store
        self.provider = provider
        self.events = events
        self.worker_id = worker_id
        self.lease_ttl = lease_ttl
        self.clock = clock
        self.new_id = new_id
        self.admission = admission or Admission.unlimited()
        # Set when shutdown begins: new jobs would get leases after the hand-over.
        self.draining = False
        self._finishing: set[asyncio.Task[None]] = set()

    def _finished(self, job: Job) -> None:
        """Hand a finished job's log to the event log in the background: delivering its
        last events and archiving the log must not hold up the poll cycle (one wait per
        completed job made a cycle with many completions take seconds)."""
        task = asyncio.get_running_loop().create_task(self.events.job_finished(job))
        self._finishing.add(task)
        task.add_done_callback(self._finish_done)

    def _finish_done(self, task: asyncio.Task[None]) -> None:
        self._finishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("finishing the event log of a job failed: %s", task.exception())

    async def drain(self, timeout: float) -> bool:
        """Wait (bounded) for the background job_finished calls; True if none is left."""
        if self._finishing:
            await asyncio.wait(set(self._finishing), timeout=timeout)
        return not self._finishing

    # --- tenant-facing -----------------------------------------------------------------

    async def submit(self, tenant_id: str, spec: JobSpec, request_id: str) -> Job:
        """DESIGN §4: record (idempotent on request_id), then submit to the provider.

        Admission control (``worker/admission.py``) comes first: a refused submit raises
        ``ResourceExhausted`` before anything is stored or sent to the provider.
        """
        if self.draining:
            raise ShuttingDown(DRAINING_MESSAGE)
        ticket = await self.admission.admit(tenant_id, request_id)
        job = Job(
            job_id=self.new_id(),
            tenant_id=tenant_id,
            spec=spec,
            request_id=request_id,
            provider=self.provider.name,
            owner_worker_id=self.worker_id,
        )
        try:
            stored, created = await blocking(self.store.create_job, job, self.lease_ttl)
        except BaseException:
            ticket.abandon()
            raise
        ticket.stored(created)
        if not created:
            return stored
        await self.events.emit(stored, EventKind.SUBMITTED, JobStatus.PENDING, "job submitted")
        try:
            return await self.start_execution(stored)
        except LeaseLost:
            return await self.get(tenant_id, stored.job_id)

    async def get(self, tenant_id: str, job_id: str) -> Job:
        return await blocking(self.store.get_job, tenant_id, job_id)

    async def list_jobs(self, tenant_id: str, flt: JobFilter, page_size: int, token: str) -> Page:
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        return await blocking(self.store.list_jobs, tenant_id, flt, size, token)

    async def cancel(self, tenant_id: str, job_id: str) -> Job:
        """Mark the job for cancellation and stop it at the provider. The owner records
        CANCELLED (at once when that is us, else at its next poll)."""
        job = await self.get(tenant_id, job_id)
        if job.status.terminal:
            raise FailedPrecondition(f"job {job_id} is already {job.status.value}")
        job = await blocking(self.store.request_cancel, tenant_id, job_id)
        if job.owner_worker_id == self.worker_id:
            job = await self.finish_cancel(job)
        elif job.cloud_resource_path:
            await blocking(self.provider.cancel, job.cloud_resource_path)
        return job

    async def delete(self, tenant_id: str, job_id: str) -> None:
        """Remove the job; an active job is stopped at its provider first."""
        job = await self.get(tenant_id, job_id)
        if not job.status.terminal and job.cloud_resource_path:
            await blocking(self.provider.cancel, job.cloud_resource_path)
        await blocking(self.store.delete_job, tenant_id, job_id)

    async def list_events(
        self, tenant_id: str, job_id: str | None, after_seq: int, limit: int
    ) -> list[JobEvent]:
        return await blocking(self.store.list_events, tenant_id, job_id, after_seq, limit)

    # --- owner operations (fenced) -----------------------------------------------------

    async def _update(self, job: Job, patch: JobPatch, reason: str) -> Job:
        try:
            return await blocking(self.store.update_job, job.job_id, job.lease, patch, reason)
        except LeaseLost:
            await self.events.emit(job, EventKind.LEASE_LOST, job.status, "lease lost")
            self._finished(job)
            raise

    async def start_execution(self, job: Job) -> Job:
        """Submit the job's current attempt under its deterministic provider id (steps 4-5).

        Safe to repeat after a crash: the provider adopts an execution it already has.
        A retryable provider failure leaves the job as it is, to be tried at the next poll.
        """
        task = ProviderTask(
            provider_job_id=provider_job_id(job.job_id, job.attempt),
            job_id=job.job_id,
            tenant_id=job.tenant_id,
            attempt=job.attempt,
            spec=job.spec,
        )
        try:
            path = await blocking(self.provider.submit, task)
        except ProviderError as exc:
            if exc.retryable:
                log.warning("submit of %s deferred: %s", job.job_id, exc)
                return job
            return await self._finish(
                job, JobStatus.FAILED, f"provider rejected the job: {exc}",
                failure_class=FailureClass.USER_ERROR,
            )
        now = self.clock()
        patch = JobPatch(
            status=JobStatus.SCHEDULED if job.status is JobStatus.PENDING else None,
            provider_job_id=task.provider_job_id,
            cloud_resource_path=path,
            scheduled_at=now if job.scheduled_at is None else None,
        )
        try:
            updated = await self._update(job, patch, "submitted to provider")
        except Conflict:
            # Cancelled while we were submitting: do not leave the execution running.
            await blocking(self.provider.cancel, path)
            return await self.get(job.tenant_id, job.job_id)
        if patch.status is not None:
            await self.events.emit(updated, EventKind.SCHEDULED, updated.status, path)
        return updated

    async def finish_cancel(self, job: Job) -> Job:
        if job.cloud_resource_path:
            await blocking(self.provider.cancel, job.cloud_resource_path)
        try:
            return await self._finish(job, JobStatus.CANCELLED, "cancelled by request")
        except Conflict:
            return await self.get(job.tenant_id, job.job_id)

    async def _finish(
        self,
        job: Job,
        status: JobStatus,
        message: str,
        *,
        failure_class: FailureClass | None = None,
        exit_code: int | None = None,
        started_at: datetime | None = None,
        completed_at: datetime | None = None,
    ) -> Job:
        patch = JobPatch(
            status=status,
            error_message=message if status is not JobStatus.COMPLETED else None,
            failure_class=failure_class,
            exit_code=exit_code,
            started_at=started_at if job.started_at is None else None,
            completed_at=completed_at or self.clock(),
        )
        updated = await self._update(job, patch, message)
        await self.events.emit(updated, _EVENT_FOR_STATUS[status], status, message)
        self._finished(updated)
        return updated

    async def apply_status(self, job: Job, st: ProviderStatus) -> Job:
        """Move ``job`` forward to what the provider reports; never backwards (DESIGN §3)."""
        new = st.state
        if new is None or not job.status.can_move_to(new):
            return job
        if new is JobStatus.FAILED and self._should_retry(job, st.failure_class):
            return await self.retry(job, st)
        if new.terminal:
            message = st.message or f"job {new.value.lower()}"
            return await self._finish(
                job,
                new,
                message,
                failure_class=st.failure_class if new is JobStatus.FAILED else None,
                exit_code=st.exit_code,
                started_at=st.started_at or st.completed_at or self.clock(),
                completed_at=st.completed_at,
            )
        now = self.clock()
        patch = JobPatch(
            status=new,
            scheduled_at=now if job.scheduled_at is None else None,
            started_at=(st.started_at or now) if new is JobStatus.RUNNING else None,
        )
        updated = await self._update(job, patch, st.message or f"provider: {st.raw_state}")
        await self.events.emit(updated, _EVENT_FOR_STATUS[new], new, st.raw_state)
        return updated

    @staticmethod
    def _should_retry(job: Job, fc: FailureClass | None) -> bool:
        return fc is not None and fc.retryable and job.attempt < job.spec.max_retries

    async def retry(self, job: Job, st: ProviderStatus) -> Job:
        """Start the next attempt under a new deterministic provider id."""
        updated = await self._update(
            job,
            JobPatch(attempt=job.attempt + 1, clear_resource=True),
            f"retry after {st.failure_class.value if st.failure_class else 'failure'}",
        )
        await self.events.emit(
            updated, EventKind.RETRY, updated.status,
            f"attempt {updated.attempt} after: {st.message or st.raw_state}",
        )
        return await self.start_execution(updated)

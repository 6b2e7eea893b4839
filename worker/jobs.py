"""JobService: the worker's domain rules (docs/design.md §3, §4, §6). RPC handlers stay thin and
call in.

Every job write goes through the worker's group committer (``worker/commit.py``), so the
writes of concurrent calls share transactions; the store writes each transition's
lifecycle event in that same transaction (this module never writes events itself).
Store calls, which block, run in the IO lane (``jennah.blocking``); provider calls go
through ``worker.provider_calls.call_provider``.

Its collaborators are given to the constructor and never replaced afterwards: the
worker's assembly (``worker/app.py``) builds the instrumented provider, the event-counting
hook and the output reader first and passes them in.

**A submit always finishes.** Once the job row is committed, SubmitJob answers with the
job: a provider error after that point leaves the job PENDING for the poller (or FAILED
with its reason), and is never returned as an RPC error. The server-side steps run in a
task of their own, so a client that gives up (deadline, disconnect) does not cut them
short; the client retries with its ``request_id`` and gets the job.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from database.base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, JobStore
from jennah.blocking import blocking
from jennah.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    JennahError,
    LeaseLost,
    ProviderError,
    ShuttingDown,
    echoed,
)
from jennah.models import (
    EVENT_FOR_STATUS,
    MAX_TASK_COUNT,
    EventKind,
    FailureClass,
    Job,
    JobEvent,
    JobFilter,
    JobPatch,
    JobSpec,
    JobStatus,
    Notification,
    Page,
    TaskState,
    TaskStatus,
)
from jennah.tasks import cancel_remaining, job_tasks, normalize
from providers.base import (
    BatchProvider,
    ProviderStatus,
    ProviderTask,
    check_spec,
    provider_job_id,
    submit_calls,
)
from worker.admission import Admission, Ticket
from worker.commit import GroupCommitter
from worker.provider_calls import call_provider

log = logging.getLogger("jennah.worker.jobs")

R = TypeVar("R")


def utcnow() -> datetime:
    return datetime.now(UTC)


# Job ids are random UUIDs (version 4) from a generator seeded once from the OS: they
# must be unique, not secret (every lookup is keyed by tenant too), and uuid4() costs a
# getrandom(2) system call per job, 2 % of a submit's CPU.
_IDS = random.Random(os.urandom(32))


def new_job_id() -> str:
    return str(uuid.UUID(int=_IDS.getrandbits(128), version=4))


def encode_task_token(index: int) -> str:
    """ListTasks' page token: the index the next page starts at."""
    return base64.urlsafe_b64encode(f"task:{index}".encode()).decode().rstrip("=")


def decode_task_token(token: str) -> int:
    """The index a page token starts at (0 for none); ``InvalidArgument`` otherwise."""
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        kind, _, number = text.partition(":")
        index = int(number)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token is not a ListTasks page token") from None
    if kind != "task" or not 0 <= index <= MAX_TASK_COUNT:
        raise InvalidArgument("page_token is not a ListTasks page token")
    return index


class JobService:
    """Submits, reads, cancels and drives jobs for one worker."""

    def __init__(
        self,
        store: JobStore,
        provider: BatchProvider,
        *,
        worker_id: str,
        lease_ttl: float,
        committer: GroupCommitter | None = None,
        clock: Callable[[], datetime] = utcnow,
        new_id: Callable[[], str] = new_job_id,
        admission: Admission | None = None,
        service_accounts: Mapping[str, frozenset[str]] | None = None,
        on_events: Callable[[EventKind, int], None] | None = None,
        before_end: Callable[[Job], Awaitable[bool]] | None = None,
    ) -> None:
        """``on_events`` is told of each lifecycle event this worker's writes store
        (metrics). ``before_end`` runs before a cancel is recorded: it reads the
        execution's last output and waits until all its events are in the store, and
        answers False if that cannot be done now (``worker.output.OutputReader.settle``,
        which owns the output offsets)."""
        self._store = store
        # Which cloud service accounts each tenant may run as (TENANT_SERVICE_ACCOUNTS).
        self._service_accounts = service_accounts or {}
        self._provider = provider
        self._committer = committer or GroupCommitter(store)
        self.worker_id = worker_id
        self._lease_ttl = lease_ttl
        self._clock = clock
        self._new_id = new_id
        self._admission = admission or Admission.unlimited()
        self._on_events = on_events
        self._before_end = before_end
        # Set when shutdown begins: new jobs would get leases after the hand-over.
        self._draining = False
        self.leases_lost = 0
        # Server-side work that outlives its call (a submit whose client gave up).
        self._detached: set[asyncio.Task[Any]] = set()

    @property
    def draining(self) -> bool:
        """True once :meth:`stop_accepting` was called: submits are refused."""
        return self._draining

    def stop_accepting(self) -> None:
        """Refuse every submit from now on (shutdown: a new job would get a lease after
        the hand-over)."""
        self._draining = True

    async def drain(self, timeout: float) -> bool:
        """Wait (bounded) for detached server-side work; True if none is left."""
        if self._detached:
            await asyncio.wait(set(self._detached), timeout=timeout)
        return not self._detached

    async def _finish_even_if_cancelled(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run ``coro`` in its own task: cancelling the caller does not cancel it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)
        return await asyncio.shield(task)

    # --- tenant-facing -----------------------------------------------------------------

    async def submit(self, tenant_id: str, spec: JobSpec, request_id: str) -> Job:
        """docs/design.md §4: record (idempotent on request_id), then submit to the provider.

        Admission control (``worker/admission.py``) comes first: a refused submit raises
        ``ResourceExhausted`` before anything is stored or sent to the provider.
        """
        if self._draining:
            raise ShuttingDown("worker is shutting down; retry on another worker")
        self._check_service_account(tenant_id, spec)
        check_spec(self._provider.name, self._provider.capabilities, spec)
        calls = submit_calls(self._provider.capabilities, spec.task_count)
        ticket = await self._admission.admit(tenant_id, request_id, tasks=spec.task_count,
                                             calls=calls)
        job = Job(
            job_id=self._new_id(),
            tenant_id=tenant_id,
            spec=spec,
            request_id=request_id,
            provider=self._provider.name,
            owner_worker_id=self.worker_id,
        )
        return await self._finish_even_if_cancelled(self._submit(job, ticket))

    def _check_service_account(self, tenant_id: str, spec: JobSpec) -> None:
        """A job runs as a tenant-named service account only if that tenant may use it:
        otherwise any tenant could act as anything the worker's own identity can
        impersonate (docs/design.md §8)."""
        account = spec.service_account
        if account and account not in self._service_accounts.get(tenant_id, frozenset()):
            raise InvalidArgument(
                f"service_account {echoed(account)!r} is not allowed for this tenant "
                "(the operator lists each tenant's accounts in TENANT_SERVICE_ACCOUNTS)")

    async def _submit(self, job: Job, ticket: Ticket) -> Job:
        try:
            stored, created = await self._committer.create(job, self._lease_ttl)
        except BaseException:
            ticket.abandon()
            raise
        ticket.stored(created)
        if not created:
            return stored
        self._count(EventKind.SUBMITTED)
        try:
            return await self.start_execution(stored)
        except JennahError as exc:
            # The job is recorded: it is the answer. The poller submits it again (same
            # provider id) or records what went wrong.
            log.warning("job %s stored; submitting it failed for now: %s", stored.job_id, exc)
            return stored

    async def get(self, tenant_id: str, job_id: str) -> Job:
        return await blocking(self._store.get_job, tenant_id, job_id)

    async def list_jobs(self, tenant_id: str, flt: JobFilter, page_size: int, token: str) -> Page:
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        return await blocking(self._store.list_jobs, tenant_id, flt, size, token)

    async def cancel(self, tenant_id: str, job_id: str) -> Job:
        """Mark the job for cancellation and stop it at the provider. The owner records
        CANCELLED (at once when that is us, else at its next poll)."""
        job = await self.get(tenant_id, job_id)
        if job.status.terminal:
            raise FailedPrecondition(f"job {job_id} is already {job.status.value}")
        job = await blocking(self._store.request_cancel, tenant_id, job_id)
        if job.owner_worker_id == self.worker_id:
            job = await self.finish_cancel(job)
        elif job.cloud_resource_path:
            await call_provider(self._provider, self._provider.cancel, job.cloud_resource_path)
        return job

    async def delete(self, tenant_id: str, job_id: str) -> None:
        """Remove the job; an active job is stopped at its provider first."""
        job = await self.get(tenant_id, job_id)
        if not job.status.terminal and job.cloud_resource_path:
            await call_provider(self._provider, self._provider.cancel, job.cloud_resource_path)
        await blocking(self._store.delete_job, tenant_id, job_id)

    async def list_events(
        self, tenant_id: str, job_id: str, after_seq: int, limit: int
    ) -> list[JobEvent]:
        return await blocking(self._store.list_events, tenant_id, job_id, after_seq, limit)

    async def list_tenant_events(
        self, tenant_id: str, after_position: int, limit: int
    ) -> list[JobEvent]:
        return await blocking(self._store.list_tenant_events, tenant_id, after_position, limit)

    async def list_tasks(
        self, tenant_id: str, job_id: str, status: TaskStatus | None, page_size: int,
        page_token: str,
    ) -> tuple[list[TaskState], str]:
        """One page of the job's tasks by index (only those in ``status``, if given), and
        the token of the next page (empty on the last)."""
        start = decode_task_token(page_token)
        job = await self.get(tenant_id, job_id)
        tasks = [t for t in job_tasks(job)[start:] if status is None or t.status is status]
        page = tasks[:page_size]
        more = len(tasks) > page_size
        return page, encode_task_token(page[-1].index + 1) if more else ""

    async def list_notifications(
        self, tenant_id: str, limit: int, unread_only: bool
    ) -> tuple[list[Notification], int]:
        return await blocking(self._store.list_notifications, tenant_id, limit, unread_only)

    async def ack_notification(self, tenant_id: str, notification_id: str) -> None:
        await blocking(self._store.ack_notification, tenant_id, notification_id)

    async def has_active_jobs(self, tenant_id: str) -> bool:
        return await blocking(self._store.has_active_jobs, tenant_id)

    # --- owner operations (fenced) -----------------------------------------------------

    def _count(self, kind: EventKind, n: int = 1) -> None:
        """Report ``n`` stored events of ``kind`` (metrics)."""
        if self._on_events is not None:
            self._on_events(kind, n)

    async def _update(self, job: Job, patch: JobPatch, reason: str) -> Job:
        try:
            updated = await self._committer.update(job, job.lease, patch, reason)
        except Conflict:
            if patch.status is None or not patch.status.terminal:
                raise
            # Another path of this worker ended the job meanwhile, as this patch would
            # have: that end stands, and its event was counted when it was written.
            current = await self.get(job.tenant_id, job.job_id)
            if current.status is not patch.status:
                raise
            return current
        except LeaseLost:
            # Not a stream event: a stale owner cannot write one (docs/design.md §6).
            self.leases_lost += 1
            log.warning("lease on job %s lost (held at version %d): leaving it",
                        job.job_id, job.lease_version)
            raise
        if patch.retry:
            self._count(EventKind.RETRY)
        elif updated.status is not job.status:
            if updated.status.terminal and job.status.rank < JobStatus.RUNNING.rank and (
                    patch.started_at is not None):
                self._count(EventKind.RUNNING)  # recorded on the way (_common.apply_patch)
            self._count(EVENT_FOR_STATUS[updated.status])
        return updated

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
            path = await call_provider(self._provider, self._provider.submit, task)
        except ProviderError as exc:
            if exc.retryable:
                log.warning("submit of %s deferred: %s", job.job_id, exc)
                return job
            return await self._finish(
                job, JobStatus.FAILED, f"provider rejected the job: {exc}",
                failure_class=FailureClass.USER_ERROR,
            )
        now = self._clock()
        patch = JobPatch(
            status=JobStatus.SCHEDULED if job.status is JobStatus.PENDING else None,
            provider_job_id=task.provider_job_id,
            cloud_resource_path=path,
            scheduled_at=now if job.scheduled_at is None else None,
        )
        try:
            return await self._update(job, patch, f"submitted to {self._provider.name} as "
                                                  f"{task.provider_job_id}")  # fmt: skip
        except Conflict:
            # Cancelled while we were submitting: do not leave the execution running.
            await call_provider(self._provider, self._provider.cancel, path)
            return await self.get(job.tenant_id, job.job_id)

    async def finish_cancel(self, job: Job) -> Job:
        """Stop the execution and record CANCELLED, once what it printed is in the store
        (``before_end``); if that cannot be done now, the job stays marked and the poller
        finishes the cancel at its next cycle. Every unfinished task of a job of several
        tasks is recorded CANCELLED with it."""
        if job.cloud_resource_path:
            await call_provider(self._provider, self._provider.cancel, job.cloud_resource_path)
            if self._before_end is not None and not await self._before_end(job):
                return job
        tasks = None
        if job.spec.is_array:
            tasks = cancel_remaining(job.spec.task_count, job.tasks, self._clock())
        try:
            return await self._finish(job, JobStatus.CANCELLED, "cancelled by request",
                                      tasks=tasks)
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
        tasks: tuple[TaskState, ...] | None = None,
    ) -> Job:
        patch = JobPatch(
            status=status,
            error_message=message if status is not JobStatus.COMPLETED else None,
            failure_class=failure_class,
            exit_code=exit_code,
            started_at=started_at if job.started_at is None else None,
            completed_at=completed_at or self._clock(),
            tasks=tasks,
        )
        return await self._update(job, patch, message)

    @staticmethod
    def tasks_changed(job: Job, st: ProviderStatus) -> tuple[TaskState, ...] | None:
        """The task states the provider reports for a job of several tasks, when they
        differ from the stored ones (None otherwise): what a patch should carry."""
        if not job.spec.is_array or st.tasks is None:
            return None
        tasks = normalize(st.tasks)
        return None if tasks == job.tasks else tasks

    async def mark_running(self, job: Job, st: ProviderStatus) -> Job:
        """Record RUNNING for the current attempt (before any of its output goes in)."""
        if not job.status.can_move_to(JobStatus.RUNNING):
            return job
        now = self._clock()
        patch = JobPatch(status=JobStatus.RUNNING,
                         scheduled_at=now if job.scheduled_at is None else None,
                         started_at=st.started_at or now,
                         tasks=self.tasks_changed(job, st))  # fmt: skip
        return await self._update(job, patch, f"provider: {st.raw_state}")

    async def apply_status(self, job: Job, st: ProviderStatus) -> Job:
        """Move ``job`` forward to what the provider reports; never backwards (docs/design.md §3).

        A terminal state for an execution that ran, seen before any poll saw it running,
        is recorded as RUNNING then the terminal state, in one transaction. New task
        states of a job of several tasks go in the same write as its transition, or in a
        write of their own when its status does not change."""
        new = st.state
        tasks = self.tasks_changed(job, st)
        if new is None or not job.status.can_move_to(new):
            if tasks is not None and not job.status.terminal:
                return await self._update(job, JobPatch(tasks=tasks), "tasks")
            return job
        if new is JobStatus.FAILED and self._should_retry(job, st.failure_class):
            return await self.retry(job, st)
        if new.terminal:
            message = st.message or f"job {new.value.lower()}"
            ran = st.started_at is not None or (new is not JobStatus.CANCELLED
                                                and st.exit_code is not None)  # fmt: skip
            return await self._finish(
                job,
                new,
                message,
                failure_class=st.failure_class if new is JobStatus.FAILED else None,
                exit_code=st.exit_code,
                started_at=(st.started_at or st.completed_at or self._clock()) if ran else None,
                completed_at=st.completed_at,
                tasks=tasks,
            )
        if new is JobStatus.RUNNING:
            return await self.mark_running(job, st)
        now = self._clock()
        patch = JobPatch(status=new, scheduled_at=now if job.scheduled_at is None else None,
                         tasks=tasks)  # fmt: skip
        return await self._update(job, patch, st.message or f"provider: {st.raw_state}")

    @staticmethod
    def _should_retry(job: Job, fc: FailureClass | None) -> bool:
        """A plain job is run again as a new execution; the tasks of a job of several
        tasks are retried by the provider itself, each on its own (docs/design.md §16),
        so the job is never resubmitted whole."""
        return (fc is not None and fc.retryable and not job.spec.is_array
                and job.attempt < job.spec.max_retries)

    async def retry(self, job: Job, st: ProviderStatus) -> Job:
        """Start the next attempt (back to PENDING, RETRY event) under a new provider id."""
        why = st.failure_class.value if st.failure_class else "failure"
        updated = await self._update(
            job, JobPatch(attempt=job.attempt + 1, retry=True),
            f"attempt {job.attempt + 1} after {why}: {st.message or st.raw_state}",
        )
        return await self.start_execution(updated)

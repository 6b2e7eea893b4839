"""The poller drives every job this worker owns to a terminal state.

Each cycle reads the worker's owned active jobs from the store (the store, not memory, is
the truth: a lease lost to a peer simply drops out of the list), then:

* a job marked ``cancel_requested`` is cancelled at the provider and recorded CANCELLED;
* a job without a resource path (a crash between recording and submitting, a deferred
  submit, a retry, or a job just claimed from a dead peer) is submitted again under the
  same deterministic provider id, which the provider dedupes;
* every other job's status is fetched in provider-sized batches and applied, forward only.

**Order within a job** (docs/design.md §6), one job's steps always in this order:

1. a provider state change that maps to no new status is a STATUS_DETAIL (execution
   event, through the WAL); so is a task of a job of several tasks that failed, or that
   the provider retried (docs/design.md §16), before the new task states are stored;
2. if the execution has started (the provider says running, or finished after running),
   RUNNING is recorded first, before any output of the attempt;
3. new output is read from where the store (or this worker's WAL) has it, appended to the
   WAL, and only then are the offsets advanced: an append that fails (a full disk) leaves
   them, and the same bytes are read again next cycle (``worker/output.py``);
4. a terminal state is recorded only once every execution event of the job is in the
   store (``ExecutionLog.flush_job``), so the terminal event is the last of the stream;
   if the store is slow, the job simply waits for the next cycle.

The poller is given what it uses and nothing more: the store (to list its owned jobs),
the provider, the execution log, the output reader, the clock, the worker id, and the
four ``JobService`` operations it drives jobs with (:class:`JobDriver`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Protocol

import anyio

from database.base import JobStore
from jennah.blocking import blocking
from jennah.errors import JennahError, LeaseLost
from jennah.models import EventKind, Job, JobEvent, JobStatus, TaskStatus
from jennah.tasks import failure_message
from providers.base import BatchProvider, ProviderStatus
from worker.events import ExecutionLog
from worker.output import FLUSH_TIMEOUT_SECONDS, OutputReader
from worker.provider_calls import call_provider
from worker.wal.format import WalError

log = logging.getLogger("jennah.worker.poller")

# Jobs a cycle works on at once (their store writes and WAL appends overlap and share
# commits).
APPLY_CONCURRENCY = 16


class JobDriver(Protocol):
    """The owner operations of ``JobService`` the poller moves jobs forward with (each a
    fenced write; ``LeaseLost`` when the job is no longer ours)."""

    async def finish_cancel(self, job: Job) -> Job: ...

    async def start_execution(self, job: Job) -> Job: ...

    async def mark_running(self, job: Job, st: ProviderStatus) -> Job: ...

    async def apply_status(self, job: Job, st: ProviderStatus) -> Job: ...


class Poller:
    """Polls owned jobs every ``interval`` seconds."""

    def __init__(
        self,
        store: JobStore,
        provider: BatchProvider,
        events: ExecutionLog,
        output: OutputReader,
        jobs: JobDriver,
        *,
        worker_id: str,
        clock: Callable[[], datetime],
        interval: float,
        on_cycle: Callable[[float, bool], None] | None = None,
    ) -> None:
        """``on_cycle(seconds, ok)`` is told of each cycle (metrics)."""
        self._store = store
        self._provider = provider
        self._events = events
        self._output = output
        self._jobs = jobs
        self._worker_id = worker_id
        self._clock = clock
        self.interval = interval
        self._on_cycle = on_cycle
        self.last_cycle_seconds = 0.0
        self.cycles = 0
        # Active owned jobs by status at the last cycle, for the worker's metrics
        # (worker/metrics.py).
        self.owned_by_status: dict[str, int] = {}
        # The provider's last raw state per job, to report changes that map to no new status
        # (GCP QUEUED -> SCHEDULED are both SCHEDULED) as STATUS_DETAIL events.
        self._raw: dict[str, tuple[int, str]] = {}

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            ok = False
            try:
                await self.cycle()
                ok = True
            except JennahError as exc:  # store or provider down: try again next cycle
                log.warning("poll cycle failed: %s", exc)
            except Exception:
                log.exception("poll cycle crashed")
            self.last_cycle_seconds = time.monotonic() - started
            self.cycles += 1
            if self._on_cycle is not None:
                self._on_cycle(self.last_cycle_seconds, ok)
            await anyio.sleep(max(0.0, self.interval - self.last_cycle_seconds))

    async def cycle(self) -> None:
        if not self._events.ready:  # the v1 upgrade delivers its events first
            return
        owned = await blocking(self._store.list_owned_jobs, self._worker_id)
        self.owned_by_status = dict(Counter(j.status.value for j in owned))
        mine = {j.job_id for j in owned}
        self._output.keep_only(mine)  # the others finished, were deleted or taken over
        for job_id in [j for j in self._raw if j not in mine]:
            del self._raw[job_id]
        self._output.resync(self._events.take_resync())  # re-read from the store's offsets
        to_poll = [j for j in owned if j.cloud_resource_path and not j.cancel_requested]

        async def act(job: Job) -> None:
            if job.cancel_requested:
                await self._jobs.finish_cancel(job)
            elif not job.cloud_resource_path:
                await self._jobs.start_execution(job)

        await self._each([j for j in owned if j.cancel_requested or not j.cloud_resource_path],
                         act)  # fmt: skip
        batch = max(1, self._provider.capabilities.max_status_batch)
        for i in range(0, len(to_poll), batch):
            await self._poll_batch(to_poll[i : i + batch])

    @staticmethod
    async def _each(jobs: Sequence[Job], fn: Callable[[Job], Awaitable[None]]) -> None:
        """Run ``fn`` for every job, up to APPLY_CONCURRENCY at a time.

        Each job's own steps stay in order (one ``fn`` call); different jobs overlap, so
        their store writes share group commits and their WAL appends share fsyncs. A lost
        lease skips that job; any other error is raised once every job has been tried (the
        cycle then counts as failed)."""
        if not jobs:
            return
        gate = asyncio.Semaphore(APPLY_CONCURRENCY)
        errors: list[BaseException] = []

        async def one(job: Job) -> None:
            async with gate:
                try:
                    await fn(job)
                except LeaseLost:
                    pass
                except Exception as exc:
                    errors.append(exc)

        await asyncio.gather(*(one(j) for j in jobs))
        if errors:
            raise errors[0]

    async def _poll_batch(self, jobs: Sequence[Job]) -> None:
        paths = [j.cloud_resource_path for j in jobs]
        statuses = await call_provider(self._provider, self._provider.status, paths)

        async def apply(job: Job) -> None:
            st = statuses.get(job.cloud_resource_path)
            if st is not None:
                await self.advance(job, st)

        await self._each(jobs, apply)

    async def advance(self, job: Job, st: ProviderStatus) -> None:
        """One job's steps for one provider status, in the order of the module docstring."""
        await self._status_detail(job, st)
        if not await self._task_details(job, st):
            return  # the task states wait until their events are durable
        new = st.state
        if new is None:
            return
        ran = new is JobStatus.RUNNING or (new.terminal and st.started_at is not None)
        outputs = self._provider.capabilities.supports_output
        if ran and outputs and job.status.can_move_to(JobStatus.RUNNING):
            job = await self._jobs.mark_running(job, st)
        if outputs and job.status is JobStatus.RUNNING:
            try:
                drained = await self._output.read(job, final=new.terminal, tasks=st.tasks)
            except WalError as exc:
                log.warning("output of %s not read this cycle: %s", job.job_id, exc)
                return  # offsets kept: read again next cycle; never end before the output
            if new.terminal and not drained:
                return  # more output than one cycle reads: the end comes after all of it
        flushed = not (new.terminal and job.status.can_move_to(new)) or (
            await self._events.flush_job(job.job_id, FLUSH_TIMEOUT_SECONDS))
        if flushed:  # else the job's events are still on their way: end it next cycle
            await self._jobs.apply_status(job, st)

    async def _task_details(self, job: Job, st: ProviderStatus) -> bool:
        """A STATUS_DETAIL for each task that failed, or was retried by the provider,
        since the stored task states (deduplicated by task, its attempt and what
        happened, so a repeat after a crash or a takeover stores nothing new). False when
        they could not be made durable (nothing else of the job moves this cycle)."""
        if (not job.spec.is_array or st.tasks is None or job.status.terminal
                or st.tasks == job.tasks):  # nothing moved since the stored states
            return True
        before = {t.index: t for t in job.tasks}
        events = []
        for t in st.tasks:
            old = before.get(t.index)
            if t.status is TaskStatus.FAILED and (old is None or (old.status, old.attempt)
                                                  != (t.status, t.attempt)):  # fmt: skip
                why = f" ({t.failure_class.value})" if t.failure_class else ""
                text, what = failure_message(t) + why, "failed"
            elif t.attempt > (old.attempt if old else 0):
                text, what = f"task {t.index} retried by the provider: attempt {t.attempt}", \
                    "retry"
            else:
                continue
            events.append(JobEvent(
                job_id=job.job_id, tenant_id=job.tenant_id, seq=0,
                kind=EventKind.STATUS_DETAIL, status=job.status, message=text,
                created_at=self._clock(), worker_id=self._worker_id, attempt=job.attempt,
                task_index=t.index,
                dedup_key=f"task:{job.attempt}:{t.index}:{t.attempt}:{what}",
            ))
        if events:
            try:
                await self._events.append(events)  # durable before the task states are stored
            except WalError as exc:
                log.warning("task events of %s not recorded this cycle: %s", job.job_id, exc)
                return False
        return True

    async def _status_detail(self, job: Job, st: ProviderStatus) -> None:
        previous = self._raw.get(job.job_id)
        self._raw[job.job_id] = (job.attempt, st.raw_state)
        if previous is None or previous[0] != job.attempt or previous[1] == st.raw_state:
            return
        if st.state is not None and job.status.can_move_to(st.state):
            return  # a transition will report it
        if job.status.terminal:
            return
        detail = f"provider state {previous[1]} -> {st.raw_state}"
        if st.message:
            detail += f": {st.message}"
        event = JobEvent(
            job_id=job.job_id, tenant_id=job.tenant_id, seq=0, kind=EventKind.STATUS_DETAIL,
            status=job.status, message=detail, created_at=self._clock(),
            worker_id=self._worker_id, attempt=job.attempt,
            dedup_key=f"detail:{job.attempt}:{previous[1]}->{st.raw_state}",
        )  # fmt: skip
        try:
            await self._events.append([event])
        except WalError as exc:
            log.warning("status detail of %s not recorded: %s", job.job_id, exc)

"""OutputReader: what a job printed, read from the provider into the execution log.

docs/design.md §6.4, step 3. Output is read from where the store has it (plus, for this
worker, what is still on its way in the WAL), appended to the execution log, and only
then are the offsets advanced: an append that fails (a full disk) leaves them, and the
same bytes are read again next time. A read takes at most ``OUTPUT_BUDGET_BYTES`` per job;
a running job counts as caught up once a read returns less than 64 KiB.

One reader per worker, shared by the two places that read output: the poller, at each
cycle, and ``JobService`` before it records a cancel (:meth:`OutputReader.settle`), so
both read on from the same offsets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable, Sequence
from datetime import datetime
from typing import Any

from database._common import output_dedup_key
from database.base import JobStore, OutputOffsets
from jennah.blocking import blocking
from jennah.models import EventKind, Job, JobEvent, JobStatus, TaskState, TaskStatus
from providers.base import BatchProvider
from worker.events import ExecutionLog
from worker.provider_calls import call_provider
from worker.wal.format import WalError

log = logging.getLogger("jennah.worker.output")

# Output read per job per call, at most (a job printing faster catches up next time).
OUTPUT_BUDGET_BYTES = 32 << 20
# Output events of a job of several tasks appended (made durable) together, at most.
APPEND_BATCH_EVENTS = 512
# A read of a running job returning less than this has caught up with it.
CAUGHT_UP_BYTES = 64 * 1024
# How long an end waits for the job's events to reach the store, per attempt.
FLUSH_TIMEOUT_SECONDS = 2.0
STREAMS = ("stdout", "stderr")


class OutputReader:
    """Reads the output of this worker's jobs into its execution log, keeping where each
    job's output was read up to."""

    def __init__(
        self,
        store: JobStore,
        provider: BatchProvider,
        events: ExecutionLog,
        *,
        worker_id: str,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._provider = provider
        self._events = events
        self._worker_id = worker_id
        self._clock = clock
        # Where to read each job's output next: durable here (WAL) or in the store.
        self._offsets: dict[str, OutputOffsets] = {}
        # The tasks of each job of several tasks whose output was read to its end.
        self._done: dict[str, set[int]] = {}

    def keep_only(self, job_ids: Container[str]) -> None:
        """Forget the offsets of every other job (finished, deleted or taken over)."""
        for job_id in [j for j in self._offsets if j not in job_ids]:
            del self._offsets[job_id]
        for job_id in [j for j in self._done if j not in job_ids]:
            del self._done[job_id]

    def resync(self, job_ids: Iterable[str]) -> None:
        """Read these jobs on from the store's offsets next time (the store refused
        their output as out of order)."""
        for job_id in job_ids:
            self._offsets.pop(job_id, None)
            self._done.pop(job_id, None)

    async def settle(self, job: Job) -> bool:
        """Before an end the provider did not report (a cancel): read the execution's
        last output and wait for the job's events to reach the store. False if that
        cannot be done now (nothing is recorded then; the next cycle tries again)."""
        if self._provider.capabilities.supports_output and job.status is JobStatus.RUNNING:
            try:
                if not await self.read(job, final=True):
                    return False
            except WalError as exc:
                log.warning("output of %s not read before its cancel: %s", job.job_id, exc)
                return False
        return await self._events.flush_job(job.job_id, FLUSH_TIMEOUT_SECONDS)

    async def _offsets_of(self, job: Job) -> OutputOffsets:
        offsets = self._offsets.get(job.job_id)
        if offsets is None:
            offsets = await blocking(self._store.output_offsets, job.job_id)
            for key, end in self._events.pending_ends(job.job_id).items():
                offsets[key] = max(offsets.get(key, 0), end)
            self._offsets[job.job_id] = offsets
        return offsets

    async def read(
        self, job: Job, *, final: bool, tasks: Sequence[TaskState] | None = None
    ) -> bool:
        """Read what the job printed since the offsets, append it durably, advance.
        Return True when everything there was to read is read (False: the budget ran
        out first). ``WalError`` when the append failed (the offsets stay).

        A job of several tasks is read task by task: each task that has started
        (``tasks``, the provider's latest states; the stored ones when not given) has
        its own streams, read until it has finished and nothing more comes. Their
        output is appended ``APPEND_BATCH_EVENTS`` events at a time, one durable append
        (one fsync) for many tasks: a job of 10,000 short tasks must not cost 10,000
        fsyncs in a row."""
        read = getattr(self._provider, "read_output", None)
        if read is None:
            return True
        staged = _Staged(await self._offsets_of(job))
        if not job.spec.is_array:
            left = await self._read_task(job, read, staged, None, final, OUTPUT_BUDGET_BYTES)
            return left >= 0
        done = self._done.setdefault(job.job_id, set())
        budget = OUTPUT_BUDGET_BYTES
        for task in job.tasks if tasks is None else tasks:
            if task.status is TaskStatus.PENDING or task.index in done:
                continue
            ended = final or task.status.terminal
            budget = await self._read_task(job, read, staged, task.index, ended, budget)
            if budget < 0:
                break
            if ended:
                staged.finished.append(task.index)  # read to its end: never again
            if len(staged.events) >= APPEND_BATCH_EVENTS:
                await self._flush(staged, done)
        await self._flush(staged, done)
        return budget >= 0

    async def _flush(self, staged: _Staged, done: set[int] | None = None) -> None:
        """Append the staged events durably; only then advance the offsets (and mark
        the tasks read to their end)."""
        if staged.events:
            await self._events.append(staged.events)  # durable, or raises: offsets stay
        staged.offsets.update(staged.ends)
        if done is not None:
            done.update(staged.finished)
        staged.events, staged.ends, staged.finished = [], {}, []

    async def _read_task(
        self, job: Job, read: Callable[..., Any], staged: _Staged,
        task_index: int | None, final: bool, budget: int,
    ) -> int:
        """Read one task's streams (``task_index`` None: a plain job's, appended at each
        chunk) into ``staged``; return the budget left, or -1 when it ran out before
        the end."""
        keys = [(job.attempt, task_index or 0, stream) for stream in STREAMS]
        while budget > 0:
            start = tuple(staged.at(k) for k in keys)
            if task_index is None:
                chunk = await call_provider(self._provider, read, job.cloud_resource_path,
                                            start)  # fmt: skip
            else:
                chunk = await call_provider(self._provider, read, job.cloud_resource_path,
                                            start, task_index=task_index)  # fmt: skip
            texts = (chunk.stdout, chunk.stderr)
            events = [
                JobEvent(
                    job_id=job.job_id, tenant_id=job.tenant_id, seq=0, kind=EventKind.OUTPUT,
                    status=JobStatus.RUNNING, message=stream, output=text,
                    created_at=self._clock(), worker_id=self._worker_id,
                    attempt=job.attempt, offset=begin, end=end, task_index=task_index,
                    dedup_key=output_dedup_key(job.attempt, task_index or 0, stream, begin),
                )
                for stream, text, begin, end in zip(STREAMS, texts, start, chunk.offsets,
                                                    strict=True)
                if end > begin
            ]
            if not events:
                return budget
            staged.events.extend(events)
            staged.ends.update(zip(keys, chunk.offsets, strict=True))
            if task_index is None:
                await self._flush(staged)
            got = sum(e.end - e.offset for e in events)
            budget -= got
            if not final and got < CAUGHT_UP_BYTES:
                return max(budget, 0)  # caught up with a running task
        return -1


class _Staged:
    """Output read but not yet durable: its events, the offsets they advance to, and the
    tasks read to their end with them."""

    def __init__(self, offsets: OutputOffsets) -> None:
        self.offsets = offsets
        self.events: list[JobEvent] = []
        self.ends: OutputOffsets = {}
        self.finished: list[int] = []

    def at(self, key: tuple[int, int, str]) -> int:
        return self.ends.get(key, self.offsets.get(key, 0))

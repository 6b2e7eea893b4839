"""The tasks of a job (docs/design.md §16): their counts, the job state they add up to,
and their stored form.

A job of ``task_count`` tasks keeps a *sparse* tuple of :class:`TaskState`, ordered by
index: a task with no entry is PENDING with nothing else known. Providers report task
states in the same form (``ProviderStatus.tasks``), and the worker stores them whole
with the job (``JobPatch.tasks``) when they change.

**Stored form.** One value per job row (a ``tasks`` column or attribute): a zstd frame of
compact JSON, one array per known task, ``[index, status, exit_code, attempt,
started_ms, completed_ms, error_message, failure_class]`` (times in epoch milliseconds,
absent values null). 10,000 finished tasks take about 40 KB, well inside DynamoDB's
400 KB item and Spanner's 10 MiB cell; a job of one task stores nothing (NULL).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import zstandard

from jennah.models import (
    FailureClass,
    Job,
    JobStatus,
    TaskCounts,
    TaskState,
    TaskStatus,
)

# How a job of one task reads as a task (ListTasks, task counts).
_TASK_FOR_JOB = {
    JobStatus.PENDING: TaskStatus.PENDING,
    JobStatus.SCHEDULED: TaskStatus.PENDING,
    JobStatus.RUNNING: TaskStatus.RUNNING,
    JobStatus.COMPLETED: TaskStatus.SUCCEEDED,
    JobStatus.FAILED: TaskStatus.FAILED,
    JobStatus.CANCELLED: TaskStatus.CANCELLED,
}


def task_status_of_job(status: JobStatus) -> TaskStatus:
    """The state of the one task of a plain job in ``status``."""
    return _TASK_FOR_JOB[status]


def job_tasks(job: Job) -> tuple[TaskState, ...]:
    """Every task of ``job``, dense and by index. A plain job's one task is the job
    itself (its status, exit code, attempt and times)."""
    if not job.spec.is_array:
        status = task_status_of_job(job.status)
        return (TaskState(
            index=0, status=status, exit_code=job.exit_code, attempt=job.attempt,
            started_at=job.started_at,
            completed_at=job.completed_at if status.terminal else None,
            error_message=job.error_message if status is not TaskStatus.SUCCEEDED else "",
            failure_class=job.failure_class,
        ),)
    by_index = {t.index: t for t in job.tasks}
    tasks = tuple(by_index.get(i) or TaskState(i, TaskStatus.PENDING)
                  for i in range(job.spec.task_count))
    if job.status.terminal:  # a task that never finished never will: it was stopped
        tasks = tuple(t if t.status.terminal else replace(t, status=TaskStatus.CANCELLED)
                      for t in tasks)
    return tasks


def job_task_counts(job: Job) -> TaskCounts:
    """How many of the job's tasks are in each state (a plain job: its one task; a
    finished job's unfinished tasks count as cancelled)."""
    if not job.spec.is_array:
        return count(1, (TaskState(0, task_status_of_job(job.status)),))
    n = count(job.spec.task_count, job.tasks)
    if job.status.terminal:
        n = replace(n, pending=0, running=0, cancelled=n.cancelled + n.pending + n.running)
    return n


def count(task_count: int, tasks: Iterable[TaskState]) -> TaskCounts:
    """How many of ``task_count`` tasks are in each state (those not in ``tasks`` are
    PENDING)."""
    n = {s: 0 for s in TaskStatus}
    known = 0
    for t in tasks:
        n[t.status] += 1
        known += 1
    return TaskCounts(
        pending=n[TaskStatus.PENDING] + max(0, task_count - known),
        running=n[TaskStatus.RUNNING],
        succeeded=n[TaskStatus.SUCCEEDED],
        failed=n[TaskStatus.FAILED],
        cancelled=n[TaskStatus.CANCELLED],
    )


def first_failure(tasks: Iterable[TaskState]) -> TaskState | None:
    """The task that failed first (earliest ``completed_at``, then lowest index)."""
    failed = [t for t in tasks if t.status is TaskStatus.FAILED]
    if not failed:
        return None
    far = datetime.max.replace(tzinfo=UTC)
    return min(failed, key=lambda t: (t.completed_at or far, t.index))


def failure_message(task: TaskState) -> str:
    """``task 3 failed: exit code 2`` (or the task's own error when it has no exit code)."""
    if task.exit_code is not None:
        return f"task {task.index} failed: exit code {task.exit_code}"
    return f"task {task.index} failed: {task.error_message or 'no exit code'}"


def cancel_remaining(
    task_count: int, tasks: Sequence[TaskState], at: datetime
) -> tuple[TaskState, ...]:
    """``tasks`` with every task not yet finished (known or not) CANCELLED at ``at``."""
    by_index = {t.index: t for t in tasks}
    out = []
    for i in range(task_count):
        t = by_index.get(i)
        if t is None:
            out.append(TaskState(i, TaskStatus.CANCELLED, completed_at=at))
        elif not t.status.terminal:
            out.append(replace(t, status=TaskStatus.CANCELLED, completed_at=at))
        else:
            out.append(t)
    return tuple(out)


def normalize(tasks: Iterable[TaskState]) -> tuple[TaskState, ...]:
    """Sorted by index, one per index (the last wins), PENDING entries with nothing
    known dropped, times cut to the millisecond: the canonical (and stored) form, so
    that what a provider reports compares equal to what the store gives back."""
    by_index = {t.index: t for t in tasks}
    return tuple(
        replace(t, started_at=_at(_ms(t.started_at)), completed_at=_at(_ms(t.completed_at)))
        for i in sorted(by_index)
        if (t := by_index[i]) != TaskState(i, TaskStatus.PENDING)
    )


# --- stored form ---------------------------------------------------------------------------

_CODE = {s: s.value[0] for s in TaskStatus}  # P R S F C
_STATUS = {v: k for k, v in _CODE.items()}
_COMPRESS = zstandard.ZstdCompressor(level=3)
_DECOMPRESS = zstandard.ZstdDecompressor()


def _ms(at: datetime | None) -> int | None:
    return None if at is None else round(at.timestamp() * 1000)


def _at(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def encode(tasks: Sequence[TaskState]) -> bytes | None:
    """The stored form of ``tasks`` (None for none)."""
    if not tasks:
        return None
    rows = [
        [t.index, _CODE[t.status], t.exit_code, t.attempt, _ms(t.started_at),
         _ms(t.completed_at), t.error_message or None,
         t.failure_class.value if t.failure_class else None]
        for t in tasks
    ]
    return _COMPRESS.compress(json.dumps(rows, separators=(",", ":")).encode())


def decode(data: bytes | None) -> tuple[TaskState, ...]:
    """The tasks of a stored value (``encode``); empty for None or empty."""
    if not data:
        return ()
    rows = json.loads(_DECOMPRESS.decompress(bytes(data)))
    return tuple(
        TaskState(index=i, status=_STATUS[s], exit_code=code, attempt=attempt,
                  started_at=_at(started), completed_at=_at(completed),
                  error_message=error or "",
                  failure_class=FailureClass(fc) if fc else None)
        for i, s, code, attempt, started, completed, error, fc in rows
    )

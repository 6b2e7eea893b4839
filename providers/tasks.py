"""The state of a job of several tasks, from its tasks (docs/design.md §16), the same for
every provider. ``raw_state`` is the provider's own word for the whole job (the job's
STATUS_DETAIL events report its changes); task progress shows in the task counts.

* SCHEDULED while no task has started;
* RUNNING once any task runs (or has finished) and some task is still to run or running;
* when every task has finished: COMPLETED if all succeeded; else FAILED if any failed
  for good, with the exit code, failure class and message of the first that failed
  (``task 3 failed: exit code 2``); else CANCELLED.

A failed task does not stop the others: as on AWS Batch and Google Batch, the job ends
when every task has, so the tasks that were going to succeed still do.
"""

from __future__ import annotations

from collections.abc import Sequence

from jennah.models import JobStatus, TaskState
from jennah.tasks import count, failure_message, first_failure, normalize
from providers.base import ProviderStatus


def status_from_tasks(
    task_count: int, tasks: Sequence[TaskState], *, raw_state: str = ""
) -> ProviderStatus:
    """The ProviderStatus of a job of ``task_count`` tasks whose known tasks are
    ``tasks`` (sparse; the rest are PENDING)."""
    tasks = normalize(tasks)
    n = count(task_count, tasks)
    started = [t.started_at for t in tasks if t.started_at is not None]
    first_start = min(started) if started else None
    finished = n.succeeded + n.failed + n.cancelled
    if finished < task_count:
        state = JobStatus.RUNNING if (n.running or finished) else JobStatus.SCHEDULED
        return ProviderStatus(state=state, raw_state=raw_state or state.value,
                              started_at=first_start, tasks=tasks)  # fmt: skip
    ends = [t.completed_at for t in tasks if t.completed_at is not None]
    last_end = max(ends) if ends else None
    failed = first_failure(tasks)
    raw = raw_state or ("COMPLETED" if n.succeeded == task_count
                        else "FAILED" if failed else "CANCELLED")
    if n.succeeded == task_count:
        return ProviderStatus(state=JobStatus.COMPLETED, raw_state=raw, exit_code=0,
                              started_at=first_start, completed_at=last_end, tasks=tasks)
    if failed is not None:
        return ProviderStatus(
            state=JobStatus.FAILED, raw_state=raw, exit_code=failed.exit_code,
            failure_class=failed.failure_class, message=failure_message(failed),
            started_at=first_start, completed_at=last_end, tasks=tasks,
        )
    return ProviderStatus(state=JobStatus.CANCELLED, raw_state=raw, started_at=first_start,
                          completed_at=last_end, tasks=tasks,
                          message=f"{n.cancelled} of {task_count} tasks cancelled")

"""In-memory providers: ``FakeProvider`` for tests, ``DryProvider`` for benchmarks.

``FakeProvider`` is a stateful batch service in a dict. It passes the same contract suite
as the real providers (``tests/providers/provider_contract.py``): a job moves one step per
``advance()`` (QUEUED → SCHEDULED → RUNNING → terminal), and its outcome comes from tiny
shell conventions in ``spec.commands``, so that the contract's tasks mean the same here as
on a real machine:

* a command containing ``sleep`` stays RUNNING until cancelled (or ``set_state``);
* ``[ "$JENNAH_TASK_INDEX" != I ] || exit N``: task I ends FAILED with exit code N, the
  other tasks COMPLETED;
* otherwise ``exit N`` with N ≠ 0 ends FAILED with exit code N (``user_error``);
* anything else ends COMPLETED with exit code 0.

The tasks of a job of several tasks (``spec.task_count`` > 1) start once the job runs, at
most ``spec.parallelism`` at a time; each ``advance()`` ends the running tasks that have a
planned exit (``planned_exit(commands, task_index)``), then starts pending ones in the
freed places. The job's state follows its tasks (``providers.tasks.status_from_tasks``);
``cancel`` stops every task. The fake does not retry tasks (its commands cannot fail for
a retryable reason).

``DryProvider`` (``BATCH_PROVIDER=dry``, docs/design.md §11) accepts and completes every job at
once, starting nothing, so load tests measure Jennah rather than the jobs. A job of N
tasks completes with N succeeded tasks.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from jennah.errors import ProviderError
from jennah.models import MAX_TASK_COUNT, FailureClass, JobStatus, TaskState, TaskStatus
from jennah.settings import ProviderSettings
from jennah.tasks import cancel_remaining, normalize
from providers.base import Capabilities, ProviderStatus, ProviderTask
from providers.tasks import status_from_tasks

Clock = Callable[[], datetime]

# The fake's raw states and what they mean (checked row by row by its tests).
FAKE_STATES: dict[str, JobStatus] = {
    "QUEUED": JobStatus.SCHEDULED,
    "SCHEDULED": JobStatus.SCHEDULED,
    "RUNNING": JobStatus.RUNNING,
    "SUCCEEDED": JobStatus.COMPLETED,
    "FAILED": JobStatus.FAILED,
    "CANCELLED": JobStatus.CANCELLED,
}
_NEXT = {"QUEUED": "SCHEDULED", "SCHEDULED": "RUNNING"}
_RAW_FOR = {JobStatus.PENDING: "QUEUED", JobStatus.COMPLETED: "SUCCEEDED",
            **{s: s.value for s in (JobStatus.SCHEDULED, JobStatus.RUNNING, JobStatus.FAILED,
                                    JobStatus.CANCELLED)}}
# What a forced terminal job state makes of its unfinished tasks (``set_state``).
_TASK_END_FOR = {JobStatus.COMPLETED: TaskStatus.SUCCEEDED, JobStatus.FAILED: TaskStatus.FAILED,
                 JobStatus.CANCELLED: TaskStatus.CANCELLED}


def utcnow() -> datetime:
    return datetime.now(UTC)


# ``[ "$JENNAH_TASK_INDEX" != 1 ] || exit 4``: task 1 exits 4, the others 0.
_TASK_EXIT = re.compile(r'\[ "\$JENNAH_TASK_INDEX" != (\d+) \] \|\| exit (\d+)')


def planned_exit(commands: Sequence[str], task_index: int = 0) -> int | None:
    """The exit code the fake gives ``commands`` (as task ``task_index``); None for a job
    that runs until stopped."""
    text = " ".join(commands)
    if re.search(r"\bsleep\b", text):
        return None
    conditional = _TASK_EXIT.search(text)
    if conditional:
        return int(conditional.group(2)) if task_index == int(conditional.group(1)) else 0
    match = re.search(r"\bexit\s+(\d+)", text)
    return int(match.group(1)) if match else 0


def _start_tasks(tasks: list[TaskState], parallelism: int, now: datetime) -> None:
    """Start pending tasks, lowest index first, while fewer than ``parallelism`` run (0:
    no limit)."""
    free = (parallelism or len(tasks)) - sum(t.status is TaskStatus.RUNNING for t in tasks)
    for i, t in enumerate(tasks):
        if free <= 0:
            return
        if t.status is TaskStatus.PENDING:
            tasks[i] = replace(t, status=TaskStatus.RUNNING, started_at=now)
            free -= 1


@dataclass
class _FakeJob:
    task: ProviderTask
    raw: str = "QUEUED"
    exit_code: int | None = None
    failure_class: FailureClass | None = None
    message: str = ""
    started_at: datetime | None = None
    completed_at: datetime | None = None
    # A job of several tasks: each task's state, by index (None for a plain job).
    tasks: list[TaskState] | None = None
    # Its end was set by ``cancel`` or ``set_state``, not reached by its tasks: the job's
    # own fields are its status.
    forced: bool = False

    def status(self) -> ProviderStatus:
        own = ProviderStatus(
            state=FAKE_STATES.get(self.raw), raw_state=self.raw, exit_code=self.exit_code,
            failure_class=self.failure_class, message=self.message,
            started_at=self.started_at, completed_at=self.completed_at,
        )
        if self.tasks is None:
            return own
        if self.forced:
            return replace(own, tasks=normalize(self.tasks))
        if self.raw in _NEXT:  # no task has started
            return status_from_tasks(len(self.tasks), (), raw_state=self.raw)
        return status_from_tasks(len(self.tasks), self.tasks)


class FakeProvider:
    """A thread-safe in-memory batch service, stepped by ``advance()``."""

    name = "fake"

    def __init__(
        self,
        clock: Clock = utcnow,
        *,
        step_on_status: bool = False,
        capabilities: Capabilities | None = None,
    ) -> None:
        self.clock = clock
        # Without a test to call advance(), each status() call steps the polled jobs.
        self.step_on_status = step_on_status
        self.capabilities = capabilities or Capabilities(
            max_status_batch=100, poll_interval_seconds=0.05, blocking=False,
            accelerator_type=True, accelerator_count=True)
        self.submissions: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._jobs: dict[str, _FakeJob] = {}
        self._faults: list[tuple[ProviderError, Collection[str] | None]] = []
        self._lock = threading.RLock()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> FakeProvider:
        return cls(step_on_status=True)

    @staticmethod
    def path_for(provider_job_id: str) -> str:
        return f"fake://jobs/{provider_job_id}"

    def fail_next(
        self, n: int, error: ProviderError, *, methods: Collection[str] | None = None
    ) -> None:
        """Raise ``error`` from the next ``n`` calls (of ``methods`` only, if given)."""
        with self._lock:
            self._faults.extend([(error, methods)] * n)

    def _enter(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        for i, (error, methods) in enumerate(self._faults):
            if methods is None or method in methods:
                del self._faults[i]
                raise error

    def submit(self, task: ProviderTask) -> str:
        path = self.path_for(task.provider_job_id)
        with self._lock:
            self._enter("submit")
            if path not in self._jobs:  # "already exists" is adopted, never run again
                count = task.spec.task_count
                tasks = [TaskState(i, TaskStatus.PENDING) for i in range(count)]
                self._jobs[path] = _FakeJob(task, tasks=tasks if task.spec.is_array else None)
                self.submissions[task.provider_job_id] = (
                    self.submissions.get(task.provider_job_id, 0) + 1
                )
            return path

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        with self._lock:
            self._enter("status")
            result: dict[str, ProviderStatus] = {}
            for path in resource_paths:
                job = self._jobs.get(path)
                if job is None:
                    result[path] = ProviderStatus(None, "UNKNOWN", message="unknown job")
                    continue
                if self.step_on_status:
                    self._step(job)
                result[path] = job.status()
            return result

    def cancel(self, resource_path: str) -> None:
        with self._lock:
            self._enter("cancel")
            job = self._jobs.get(resource_path)
            if job is not None and not FAKE_STATES[job.raw].terminal:
                job.raw, job.message, job.completed_at = "CANCELLED", "cancelled", self.clock()
                if job.tasks is not None:
                    job.forced = True
                    job.tasks = list(cancel_remaining(len(job.tasks), job.tasks,
                                                      job.completed_at))

    def close(self) -> None:
        return None

    # --- test controls ---------------------------------------------------------------

    def advance(self, steps: int = 1) -> None:
        """Let time pass: every active job moves ``steps`` steps along its life."""
        with self._lock:
            for _ in range(steps):
                for job in self._jobs.values():
                    self._step(job)

    def _step(self, job: _FakeJob) -> None:
        if job.raw in _NEXT:
            job.raw = _NEXT[job.raw]
            if job.raw == "RUNNING":
                job.started_at = self.clock()
                if job.tasks is not None:
                    _start_tasks(job.tasks, job.task.spec.parallelism, job.started_at)
            return
        if job.raw != "RUNNING":
            return
        if job.tasks is not None:
            self._step_tasks(job, job.tasks)
            return
        code = planned_exit(job.task.spec.commands)
        if code is None:
            return
        job.exit_code, job.completed_at = code, self.clock()
        if code == 0:
            job.raw, job.message = "SUCCEEDED", "exited with code 0"
        else:
            job.raw, job.message = "FAILED", f"exited with code {code}"
            job.failure_class = FailureClass.USER_ERROR

    def _step_tasks(self, job: _FakeJob, tasks: list[TaskState]) -> None:
        """End the running tasks that have a planned exit, start pending ones in their
        places; once every task has ended, so has the job."""
        now = self.clock()
        for i, t in enumerate(tasks):
            if t.status is TaskStatus.RUNNING:
                code = planned_exit(job.task.spec.commands, i)
                if code is not None:
                    tasks[i] = replace(
                        t, status=TaskStatus.SUCCEEDED if code == 0 else TaskStatus.FAILED,
                        exit_code=code, completed_at=now,
                        error_message=f"exited with code {code}" if code else "",
                        failure_class=FailureClass.USER_ERROR if code else None)
        _start_tasks(tasks, job.task.spec.parallelism, now)
        if all(t.status.terminal for t in tasks):
            st = status_from_tasks(len(tasks), tasks)
            job.raw = _RAW_FOR[st.state] if st.state is not None else job.raw
            job.exit_code, job.failure_class = st.exit_code, st.failure_class
            job.message, job.completed_at = st.message, now

    def set_state(
        self,
        resource_path: str,
        state: JobStatus,
        *,
        exit_code: int | None = None,
        failure_class: FailureClass | None = None,
        message: str = "",
    ) -> None:
        """Force a job into ``state`` (for scenarios the commands cannot express, such as
        a preemption); timestamps are filled in as the real services would."""
        with self._lock:
            job = self._jobs[resource_path]
            now = self.clock()
            job.raw, job.exit_code, job.failure_class = _RAW_FOR[state], exit_code, failure_class
            job.message = message or state.value.lower()
            if (state is JobStatus.RUNNING or state.terminal) and job.started_at is None:
                job.started_at = now
            job.completed_at = now if state.terminal else None
            if job.tasks is not None and state.terminal:  # every task still going ends so
                job.forced = True
                job.tasks = [t if t.status.terminal else replace(
                    t, status=_TASK_END_FOR[state], exit_code=exit_code, completed_at=now,
                    failure_class=failure_class, error_message=job.message,
                    started_at=t.started_at or now) for t in job.tasks]

    def tasks(self) -> list[ProviderTask]:
        with self._lock:
            return [j.task for j in self._jobs.values()]



class DryProvider:
    """Completes every job the moment it is submitted; runs nothing.

    Any ``dry://`` path is a job that completed: a path is proof of a submit, perhaps by
    another worker's DryProvider (jobs move between workers on failover). Timestamps of
    recent submits are remembered (bounded), others are reported as "now". A job of N
    tasks has the path ``dry://<provider job id>?tasks=N``, so that any worker knows its
    tasks from the path alone; its status carries N succeeded tasks, whose tuple is made
    once per (N, time) and kept (bounded), so polling a 10,000-task job stays cheap.
    """

    name = "dry"
    # It runs nothing, so it "honours" every setting: benchmarks and API tests use it. No
    # submit rate (worker/admission.py): benchmarks must measure our stack, not a limiter.
    capabilities = Capabilities(max_status_batch=10_000,
                                poll_interval_seconds=0.05, blocking=False,
                                accelerator_type=True, accelerator_count=True)
    PREFIX = "dry://"
    TASKS = "?tasks="
    # Statuses of jobs of several tasks kept, by (task count, time).
    KEEP_TASK_STATUSES = 64

    def __init__(self, clock: Clock = utcnow, remember: int = 100_000) -> None:
        self.clock = clock
        self._remember = remember
        self._times: OrderedDict[str, datetime] = OrderedDict()
        self._task_statuses: OrderedDict[tuple[int, datetime], ProviderStatus] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> DryProvider:
        return cls()

    def submit(self, task: ProviderTask) -> str:
        path = self.PREFIX + task.provider_job_id
        if task.spec.is_array:
            path += f"{self.TASKS}{task.spec.task_count}"
        with self._lock:
            if path not in self._times:
                self._times[path] = self.clock()
                if len(self._times) > self._remember:
                    self._times.popitem(last=False)
        return path

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        done = ProviderStatus(JobStatus.COMPLETED, "SUCCEEDED", exit_code=0,
                              message="completed (dry run)")
        result: dict[str, ProviderStatus] = {}
        with self._lock:
            for path in resource_paths:
                task_count = self._task_count(path)
                if task_count is None:
                    result[path] = ProviderStatus(None, "UNKNOWN", message="unknown job")
                    continue
                at = self._times.get(path) or self.clock()
                result[path] = (replace(done, started_at=at, completed_at=at)
                                if task_count == 1 else self._tasks_done(done, task_count, at))
        return result

    def _task_count(self, path: str) -> int | None:
        """The task count a path of ours names (1 for a plain job); None for another."""
        if not path.startswith(self.PREFIX):
            return None
        name, sep, count = path[len(self.PREFIX) :].partition(self.TASKS)
        if not name:
            return None
        if not sep:
            return 1
        return int(count) if count.isdigit() and 1 < int(count) <= MAX_TASK_COUNT else None

    def _tasks_done(self, done: ProviderStatus, task_count: int, at: datetime) -> ProviderStatus:
        """``done`` with ``task_count`` succeeded tasks at ``at``, in their stored form
        (times to the millisecond, as ``jennah.tasks.normalize`` cuts them)."""
        at = datetime.fromtimestamp(round(at.timestamp() * 1000) / 1000, UTC)
        key = (task_count, at)
        st = self._task_statuses.get(key)
        if st is None:
            tasks = tuple(TaskState(i, TaskStatus.SUCCEEDED, exit_code=0, started_at=at,
                                    completed_at=at) for i in range(task_count))
            st = replace(done, started_at=at, completed_at=at, tasks=tasks)
            self._task_statuses[key] = st
            if len(self._task_statuses) > self.KEEP_TASK_STATUSES:
                self._task_statuses.popitem(last=False)
        return st

    def cancel(self, resource_path: str) -> None:
        return None  # every dry job is already finished

    def close(self) -> None:
        return None

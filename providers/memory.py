"""In-memory providers: ``FakeProvider`` for tests, ``DryProvider`` for benchmarks.

``FakeProvider`` is a stateful batch service in a dict. It passes the same contract suite
as the real providers (``tests/providers/provider_contract.py``): a job moves one step per
``advance()`` (QUEUED → SCHEDULED → RUNNING → terminal), and its outcome comes from tiny
shell conventions in ``spec.commands``, so that the contract's tasks mean the same here as
on a real machine:

* a command containing ``sleep`` stays RUNNING until cancelled (or ``set_state``);
* otherwise ``exit N`` with N ≠ 0 ends FAILED with exit code N (``user_error``);
* anything else ends COMPLETED with exit code 0.

``DryProvider`` (``BATCH_PROVIDER=dry``, docs/design.md §11) accepts and completes every job at
once, starting nothing, so load tests measure Jennah rather than the jobs.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from jennah.errors import ProviderError
from jennah.models import FailureClass, JobStatus
from jennah.settings import ProviderSettings
from providers.base import Capabilities, ProviderStatus, ProviderTask

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


def utcnow() -> datetime:
    return datetime.now(UTC)


def planned_exit(commands: Sequence[str]) -> int | None:
    """The exit code the fake gives ``commands``; None for a job that runs until stopped."""
    text = " ".join(commands)
    if re.search(r"\bsleep\b", text):
        return None
    match = re.search(r"\bexit\s+(\d+)", text)
    return int(match.group(1)) if match else 0


@dataclass
class _FakeJob:
    task: ProviderTask
    raw: str = "QUEUED"
    exit_code: int | None = None
    failure_class: FailureClass | None = None
    message: str = ""
    started_at: datetime | None = None
    completed_at: datetime | None = None

    def status(self) -> ProviderStatus:
        return ProviderStatus(
            state=FAKE_STATES.get(self.raw), raw_state=self.raw, exit_code=self.exit_code,
            failure_class=self.failure_class, message=self.message,
            started_at=self.started_at, completed_at=self.completed_at,
        )


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
                self._jobs[path] = _FakeJob(task)
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
            return
        if job.raw != "RUNNING":
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

    def tasks(self) -> list[ProviderTask]:
        with self._lock:
            return [j.task for j in self._jobs.values()]



class DryProvider:
    """Completes every job the moment it is submitted; runs nothing.

    Any ``dry://`` path is a job that completed: a path is proof of a submit, perhaps by
    another worker's DryProvider (jobs move between workers on failover). Timestamps of
    recent submits are remembered (bounded), others are reported as "now".
    """

    name = "dry"
    # It runs nothing, so it "honours" every setting: benchmarks and API tests use it. No
    # submit rate (worker/admission.py): benchmarks must measure our stack, not a limiter.
    capabilities = Capabilities(max_status_batch=10_000,
                                poll_interval_seconds=0.05, blocking=False,
                                accelerator_type=True, accelerator_count=True)
    PREFIX = "dry://"

    def __init__(self, clock: Clock = utcnow, remember: int = 100_000) -> None:
        self.clock = clock
        self._remember = remember
        self._times: OrderedDict[str, datetime] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> DryProvider:
        return cls()

    def submit(self, task: ProviderTask) -> str:
        path = self.PREFIX + task.provider_job_id
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
                if not path.startswith(self.PREFIX) or len(path) == len(self.PREFIX):
                    result[path] = ProviderStatus(None, "UNKNOWN", message="unknown job")
                    continue
                at = self._times.get(path) or self.clock()
                result[path] = replace(done, started_at=at, completed_at=at)
        return result

    def cancel(self, resource_path: str) -> None:
        return None  # every dry job is already finished

    def close(self) -> None:
        return None

"""A stateful, in-process fake of Google Cloud Batch at the gRPC wire level.

The official client (``BatchServiceClient`` on a plain ``grpc.insecure_channel``) talks to
it unchanged: requests arrive as serialized ``google.cloud.batch.v1`` messages, are parsed
with the library's own types, and answered with serialized ``Job`` and longrunning
``Operation`` messages (docs/design.md §9).

What it models:

* ``CreateJob`` checks the request fields Jennah promises (``problems_with``); a bad
  request is refused with INVALID_ARGUMENT, as the real service would. A second create of
  the same job id is ALREADY_EXISTS; a repeated ``request_id`` returns the job it made.
* Jobs move QUEUED → SCHEDULED → RUNNING → SUCCEEDED/FAILED, one step per ``advance()``;
  ``set_state`` forces any job state, such as a preemption with exit code 50001.
* **Tasks.** Every job is a task group (``group0``) of tasks: ``task_count``, or one per
  entry of ``task_environments`` (whose count then wins, as the reference says). Each
  task's container sees the task spec's environment, its own ``task_environments``
  entry, and ``BATCH_TASK_INDEX``/``BATCH_TASK_COUNT``. It runs ``entrypoint`` with
  ``commands`` appended (``Runnable.Container`` reference), or ``commands`` alone; a
  ``/bin/sh -c SCRIPT NAME ARGS…`` whose script only exports ``NAME="${OTHER:-default}"``
  values before ``exec "$@"`` runs ARGS with those values, as a POSIX shell would
  (``tests.fakes.aws_batch.container_view``, shared with the AWS fake). When the job
  starts running, and at each step after, pending tasks start (PENDING → ASSIGNED →
  RUNNING) while fewer than ``parallelism`` (default ``min(task_count, 5000)``) run; a
  running task ends at the next step as its program says *with the variables it sees*
  (``providers.memory.planned_exit(program, $JENNAH_TASK_INDEX)``: ``exit N``, task I's
  conditional exit, ``sleep`` until cancelled), so a task not told its index behaves as
  the shell would. A task that prints (``echo "…$VAR…"``) writes that line to the Cloud
  Logging fake when it starts, labelled ``job_uid`` and ``task_id``
  (``<uid>-group0-<index>``). A failed task is retried per ``max_retry_count`` and the
  lifecycle policy (RETRY_TASK: on a listed exit code only; FAIL_TASK: on any other; no
  policy: on any non-zero code); ``end_task`` ends a running task with any exit code
  (a preemption). The job ends when every task has: SUCCEEDED, or FAILED naming the first
  task that failed. Each change updates ``status.task_groups["group0"].counts``.
  ``ListTasks`` pages (at most 1,000) and takes the filter ``State=<STATE>``.
* The job limits of "Quotas and limits": at most 100,000 tasks per group and a job
  definition of at most 1 MB (its JSON); a ``parallelism`` over 5,000 running tasks is
  refused here (the reference only says the default is bounded by it), as are a
  ``max_retry_count`` outside 0 to 10, more than one lifecycle policy ("Currently we
  only support one lifecycle policy") and more than 200 ``task_environments`` ("supports
  up to 200 entries", the ``TaskGroup`` reference of google-cloud-batch 0.11.0; later
  ones are silent, so the fake holds the provider to the documented bound).
* ``CancelJob`` is a real long-running operation: the job goes CANCELLATION_IN_PROGRESS
  and the operation is done (and the job CANCELLED, every unfinished task UNEXECUTED:
  Batch only documents that "the task executions were stopped") at the client's
  ``cancel_polls``-th ``GetOperation`` poll. ``fail_cancels(n)`` makes the next ``n``
  cancel operations end in an error, the job back in the state it had; ``advance()``
  moves pending operations on as a poll would. Cancelling a finished job, or one already
  being cancelled, is FAILED_PRECONDITION.
* Labels as Batch documents them ("Organize resources using labels", and the ``Job.labels``
  reference): at most 63 custom labels, keys starting ``goog-`` or ``google-`` reserved,
  and Batch's predefined keys (``batch-job-id``, ``batch-job-uid``, ``batch-node``) cannot
  be set. Accelerators need a type and a positive count; network interfaces take the
  documented URL forms.
* ``ListJobs`` pages and understands the filter Jennah sends (``status.state="X"``).
* ``throttle(n)`` answers the next ``n`` calls with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc  # type: ignore[import-untyped]
from google.cloud import batch_v1
from google.longrunning import operations_pb2  # type: ignore[import-untyped]
from google.protobuf import any_pb2, json_format, timestamp_pb2
from google.rpc import status_pb2  # type: ignore[import-untyped]

from providers.memory import planned_exit
from tests.fakes.aws_batch import container_view
from tests.fakes.gcp_logging import FakeCloudLogging

State = batch_v1.JobStatus.State
TaskState = batch_v1.TaskStatus.State
Action = batch_v1.LifecyclePolicy.Action
SERVICE = "google.cloud.batch.v1.BatchService"
OPERATIONS = "google.longrunning.Operations"
JOB_ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TERMINAL = {State.SUCCEEDED, State.FAILED, State.CANCELLED}
MAX_JOB_LABELS = 63
RESERVED_LABEL_PREFIXES = ("goog-", "google-")
PREDEFINED_LABELS = frozenset({"batch-job-id", "batch-job-uid", "batch-node"})
_COMPUTE = r"(https://www\.googleapis\.com/compute/v1/)?(projects/[a-z][-a-z0-9]*/)?"
NETWORK = re.compile(_COMPUTE + r"global/networks/[a-z]([-a-z0-9]*[a-z0-9])?$")
SUBNETWORK = re.compile(_COMPUTE + r"regions/[a-z0-9-]+/subnetworks/[a-z]([-a-z0-9]*[a-z0-9])?$")
_NEXT = {State.QUEUED: State.SCHEDULED, State.SCHEDULED: State.RUNNING}
_FILTER = re.compile(r'^status\.state="([A-Z_]+)"$')
_TASK_FILTER = re.compile(r"^State=([A-Z_]+)$")
_ECHO = re.compile(r'\becho\s+"([^"]*)"')
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
GROUP = "group0"
MAX_TASKS_PER_GROUP = 100_000
MAX_PARALLEL_TASKS = 5_000
MAX_TASK_ENVIRONMENTS = 200
MAX_JOB_DEFINITION = 1_000_000  # bytes of the job's JSON
FINAL_TASK_STATES = {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.UNEXECUTED}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def problems_with(req: batch_v1.CreateJobRequest, parent: str) -> list[str]:
    """Every rule a create request breaks (empty when it is acceptable)."""
    out: list[str] = []
    if req.parent != parent:
        out.append(f"parent {req.parent!r} is not {parent!r}")
    if not JOB_ID.match(req.job_id):
        out.append(f"job_id {req.job_id!r} breaks the job id rules")
    try:
        uuid.UUID(req.request_id)
    except ValueError:
        out.append(f"request_id {req.request_id!r} is not a UUID")
    job = req.job
    if len(job.task_groups) != 1:
        out.append("exactly one task group is supported")
        return out
    group = job.task_groups[0]
    out.extend(_group_problems(group))
    spec = group.task_spec
    if len(spec.runnables) != 1 or not spec.runnables[0].container.image_uri:
        out.append("one container runnable with an image_uri is required")
    if spec.compute_resource.cpu_milli <= 0 or spec.compute_resource.memory_mib <= 0:
        out.append("compute_resource needs cpu_milli and memory_mib")
    for name in spec.environment.variables:
        if not ENV_NAME.match(name):
            out.append(f"environment variable name {name!r} is invalid")
    if "max_run_duration" in spec and spec.max_run_duration.total_seconds() <= 0:
        out.append("max_run_duration must be positive")
    policies = job.allocation_policy.instances
    if len(policies) != 1 or policies[0].policy.provisioning_model == 0:
        out.append("one instance policy with a provisioning model is required")
    elif "boot_disk" in policies[0].policy and policies[0].policy.boot_disk.size_gb < 10:
        out.append("boot disk must be at least 10 GB")
    account = job.allocation_policy.service_account
    if "service_account" in job.allocation_policy and "@" not in account.email:
        out.append(f"service account {account.email!r} is not an email")
    for key, value in job.labels.items():
        if not LABEL_KEY.match(key) or not LABEL_VALUE.match(value):
            out.append(f"label {key}={value} breaks the label rules")
        if key.startswith(RESERVED_LABEL_PREFIXES) or key in PREDEFINED_LABELS:
            out.append(f"label key {key} is reserved")
    if len(job.labels) > MAX_JOB_LABELS:
        out.append(f"{len(job.labels)} labels: at most {MAX_JOB_LABELS} custom labels")
    if len(policies) == 1:
        for acc in policies[0].policy.accelerators:
            if not acc.type_ or acc.count <= 0:
                out.append("an accelerator needs a type and a positive count")
    for nic in job.allocation_policy.network.network_interfaces:
        if nic.network and not NETWORK.match(nic.network):
            out.append(f"network {nic.network!r} is not a network URL")
        if nic.subnetwork and not SUBNETWORK.match(nic.subnetwork):
            out.append(f"subnetwork {nic.subnetwork!r} is not a subnetwork URL")
    size = len(json_format.MessageToJson(batch_v1.Job.pb(job), indent=None))
    if size > MAX_JOB_DEFINITION:
        out.append(f"the job definition is {size} bytes, over 1 MB")
    return out


def _group_problems(group: batch_v1.TaskGroup) -> list[str]:
    out = []
    count = len(group.task_environments) or group.task_count or 1
    if not 1 <= count <= MAX_TASKS_PER_GROUP:
        out.append(f"task_count {count}: at most {MAX_TASKS_PER_GROUP} tasks per task group")
    if not 0 <= group.parallelism <= MAX_PARALLEL_TASKS:
        out.append(f"parallelism {group.parallelism}: at most {MAX_PARALLEL_TASKS}")
    if len(group.task_environments) > MAX_TASK_ENVIRONMENTS:
        out.append(f"task_environments: {len(group.task_environments)} entries, at most "
                   f"{MAX_TASK_ENVIRONMENTS}")
    for env in group.task_environments:
        out.extend(f"environment variable name {name!r} is invalid"
                   for name in env.variables if not ENV_NAME.match(name))
    spec = group.task_spec
    if not 0 <= spec.max_retry_count <= 10:
        out.append(f"max_retry_count {spec.max_retry_count} is not in [0, 10]")
    if len(spec.lifecycle_policies) > 1:
        out.append("only one lifecycle policy is supported")
    for policy in spec.lifecycle_policies:
        if policy.action == Action.ACTION_UNSPECIFIED or not policy.action_condition.exit_codes:
            out.append("a lifecycle policy needs an action and exit codes")
    return out


@dataclass
class _Task:
    """One task of a job, as the service keeps it."""

    index: int
    env: dict[str, str]  # what its container sees
    state: int = TaskState.PENDING
    events: list[batch_v1.StatusEvent] = field(default_factory=list)
    retries: int = 0

    def proto(self, group: str) -> batch_v1.Task:
        return batch_v1.Task(name=f"{group}/tasks/{self.index}", status=batch_v1.TaskStatus(
            state=TaskState(self.state), status_events=self.events))


@dataclass
class _Op:
    job_name: str
    before: int  # the job's state before the cancel
    fails: bool = False
    polls: int = 0


@dataclass
class FakeGcpBatch:
    """The service's state and test controls (thread-safe)."""

    project: str = "proj-test"
    region: str = "us-central1"
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    # Where the tasks' printed lines go (Batch's Cloud Logging), if anywhere.
    logs: FakeCloudLogging | None = None
    jobs: dict[str, batch_v1.Job] = field(default_factory=dict)
    tasks: dict[str, list[_Task]] = field(default_factory=dict)  # by job name
    list_task_requests: list[batch_v1.ListTasksRequest] = field(default_factory=list)
    # False: refuse every ListTasks filter.
    accept_task_filters: bool = True
    create_requests: list[batch_v1.CreateJobRequest] = field(default_factory=list)
    # Creates that made a job, per job id: the "executions" of the contract.
    created: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    list_requests: list[batch_v1.ListJobsRequest] = field(default_factory=list)
    # False: refuse every list filter, as a service without filter support would.
    accept_filters: bool = True
    # The GetOperation poll at which a cancel operation is done.
    cancel_polls: int = 1
    _failing_cancels: int = 0
    _cancel_error: grpc.StatusCode = grpc.StatusCode.INTERNAL
    _request_ids: dict[str, str] = field(default_factory=dict)
    _ops: dict[str, _Op] = field(default_factory=dict)
    _throttle: list[Collection[str] | None] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    # --- test controls ------------------------------------------------------------------

    def throttle(self, n: int, methods: Collection[str] | None = None) -> None:
        """Answer the next ``n`` calls (of ``methods`` only, if given) RESOURCE_EXHAUSTED."""
        with self._lock:
            self._throttle.extend([methods] * n)

    def fail_cancels(self, n: int, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        """End the next ``n`` cancel operations in error ``code`` (the job back as it was)."""
        with self._lock:
            self._failing_cancels = max(0, self._failing_cancels + n)
            self._cancel_error = code

    def forget_request_ids(self) -> None:
        """Drop the request-id memory (the real service keeps it for a limited time), so
        that a repeated create meets ALREADY_EXISTS instead."""
        with self._lock:
            self._request_ids.clear()

    def advance(self, steps: int = 1) -> None:
        """Step every job; a pending cancel operation moves on as if polled (GCP finishes
        it whether or not anyone watches)."""
        with self._lock:
            for _ in range(steps):
                for job in self.jobs.values():
                    self._step(job)
                for name, op in list(self._ops.items()):
                    target = self.jobs.get(op.job_name)
                    if target is not None and (
                            target.status.state == State.CANCELLATION_IN_PROGRESS):
                        self._finish_op(name, op)

    def set_state(self, name: str, state: int, *, exit_code: int | None = None,
                  description: str = "") -> None:
        with self._lock:
            self._move(self.jobs[name], state, exit_code, description)

    def end_task(self, name: str, index: int, exit_code: int, description: str = "") -> None:
        """End running task ``index`` of job ``name`` with ``exit_code`` (50001: its Spot
        VM was preempted), retried or not as the job's task spec says."""
        with self._lock:
            job, task = self.jobs[name], self.tasks[name][index]
            assert task.state == TaskState.RUNNING, TaskState(task.state).name
            self._end_task(job, task, exit_code, description)
            self._schedule(job)

    def add_job(self, job_id: str, state: int) -> str:
        """Put a job straight into the store (for benchmarks of large fleets)."""
        with self._lock:
            job = batch_v1.Job(name=f"{self.parent}/jobs/{job_id}", uid=uuid.uuid4().hex)
            job.status.state = State(state)
            self.jobs[job.name] = job
            return job.name

    # --- state machine ------------------------------------------------------------------

    def _move(self, job: batch_v1.Job, state: int, exit_code: int | None = None,
              description: str = "") -> None:
        old = job.status.state
        now = self.clock()
        text = f"Job state is set from {State(old).name} to {State(state).name} for job {job.name}."
        event = batch_v1.StatusEvent(type_="STATUS_CHANGED", event_time=_ts(now),
                                     description=description or text)
        if exit_code is not None:
            event.task_execution = batch_v1.TaskExecution(exit_code=exit_code)
        job.status.status_events.append(event)
        job.status.state = State(state)
        job.update_time = _ts(now)

    def _step(self, job: batch_v1.Job) -> None:
        state = job.status.state
        if state in _NEXT:
            self._move(job, _NEXT[state])
            if job.status.state == State.RUNNING:
                self._schedule(job)
        elif state == State.RUNNING and job.name in self.tasks:
            for task in self.tasks[job.name]:
                if task.state == TaskState.RUNNING:
                    program, env = _program(job, task)
                    seen = env.get("JENNAH_TASK_INDEX", "")
                    code = planned_exit(program, int(seen) if seen.isdigit() else -1)
                    if code is not None:
                        self._end_task(job, task, code)
            self._schedule(job)

    def _task_move(self, job: batch_v1.Job, task: _Task, state: int,
                   exit_code: int | None = None, description: str = "") -> None:
        old, task.state = TaskState(task.state).name, state
        text = (description or f"Task state is updated from {old} to {TaskState(state).name} "
                f"on zones/{self.region}-a/instances/{task.index}"
                + (f" with exit code {exit_code}." if exit_code else "."))
        event = batch_v1.StatusEvent(type_="STATUS_CHANGED", event_time=_ts(self.clock()),
                                     description=text, task_state=TaskState(state))
        if exit_code:
            event.task_execution = batch_v1.TaskExecution(exit_code=exit_code)
        task.events.append(event)
        self._count(job)

    def _count(self, job: batch_v1.Job) -> None:
        counts = Counter(TaskState(t.state).name for t in self.tasks[job.name])
        job.status.task_groups[GROUP] = batch_v1.JobStatus.TaskGroupStatus(counts=counts)

    def _end_task(self, job: batch_v1.Job, task: _Task, code: int, description: str = "") -> None:
        if code == 0:
            self._task_move(job, task, TaskState.SUCCEEDED)
            return
        self._task_move(job, task, TaskState.FAILED, code, description)
        spec = job.task_groups[0].task_spec
        if task.retries < spec.max_retry_count and _retried(spec, code):
            task.retries += 1
            self._task_move(job, task, TaskState.PENDING)

    def _schedule(self, job: batch_v1.Job) -> None:
        """Start pending tasks while fewer than ``parallelism`` run; end the job when
        every task has ended."""
        tasks = self.tasks.get(job.name, []) if job.status.state == State.RUNNING else []
        group = job.task_groups[0]
        limit = group.parallelism or min(len(tasks), MAX_PARALLEL_TASKS)
        busy = sum(t.state in (TaskState.ASSIGNED, TaskState.RUNNING) for t in tasks)
        for task in tasks:
            if busy >= limit:
                break
            if task.state == TaskState.PENDING:
                self._task_move(job, task, TaskState.ASSIGNED)
                self._task_move(job, task, TaskState.RUNNING)
                self._print(job, task)
                busy += 1
        if tasks and all(t.state in FINAL_TASK_STATES for t in tasks):
            failed = [t for t in tasks if t.state == TaskState.FAILED]
            if not failed:
                self._move(job, State.SUCCEEDED, 0)
                return
            first = min(failed, key=lambda t: (t.events[-1].event_time, t.index))
            last = first.events[-1]
            self._move(job, State.FAILED, last.task_execution.exit_code,
                       f"Job state is set from RUNNING to FAILED for job {job.name}. Job "
                       f"failed due to task failure. Specifically, task with index "
                       f"{first.index} failed due to the following task event: "
                       f'"{last.description}"')

    def _print(self, job: batch_v1.Job, task: _Task) -> None:
        """What the task's ``echo "…"`` prints, to Cloud Logging as Batch's agent would."""
        program, env = _program(job, task)
        if self.logs is None or (m := _ECHO.search(" ".join(program))) is None:
            return
        text = _VAR.sub(lambda v: env.get(v.group(1), ""), m.group(1))
        self.logs.write(job.uid, text, task_id=f"{job.uid}-{GROUP}-{task.index}")

    # --- RPCs -----------------------------------------------------------------------------

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        for i, methods in enumerate(self._throttle):
            if methods is None or method in methods:
                del self._throttle[i]
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Quota exceeded for quota "
                             "metric 'Requests' (rate limit): try again later")

    def create_job(self, req: batch_v1.CreateJobRequest) -> batch_v1.Job:
        with self._lock:
            self._enter("CreateJob")
            self.create_requests.append(req)
            problems = problems_with(req, self.parent)
            if problems:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
            name = f"{req.parent}/jobs/{req.job_id}"
            if self._request_ids.get(req.request_id) == name:
                return self.jobs[name]
            if name in self.jobs:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"job {name} already exists")
            job = batch_v1.Job(req.job)
            job.name, job.uid = name, f"{req.job_id}-{uuid.uuid4().hex[:12]}"
            job.create_time = _ts(self.clock())
            job.status.state = State(State.QUEUED)
            group = job.task_groups[0]
            group.name = f"{name}/taskGroups/{GROUP}"
            group.task_count = len(group.task_environments) or group.task_count or 1
            shared = dict(group.task_spec.environment.variables)
            self.tasks[name] = [
                _Task(i, {**shared, **(dict(group.task_environments[i].variables)
                                       if group.task_environments else {}),
                          "BATCH_TASK_INDEX": str(i), "BATCH_TASK_COUNT": str(group.task_count)})
                for i in range(group.task_count)]
            self._count(job)
            self.jobs[name] = job
            self.created[req.job_id] += 1
            self._request_ids[req.request_id] = name
            return job

    def get_job(self, req: batch_v1.GetJobRequest) -> batch_v1.Job:
        with self._lock:
            self._enter("GetJob")
            return self._job(req.name)

    def list_jobs(self, req: batch_v1.ListJobsRequest) -> batch_v1.ListJobsResponse:
        with self._lock:
            self._enter("ListJobs")
            self.list_requests.append(req)
            match = _FILTER.match(req.filter)
            if req.filter and (match is None or not self.accept_filters):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad filter {req.filter!r}")
            wanted = getattr(State, match.group(1)) if match else None
            names = sorted(n for n, j in self.jobs.items() if n.startswith(req.parent + "/")
                           and (wanted is None or j.status.state == wanted))
            start = int(req.page_token or 0)
            size = min(req.page_size or 100, 1000)
            page = names[start:start + size]
            token = str(start + size) if start + size < len(names) else ""
            return batch_v1.ListJobsResponse(jobs=[self.jobs[n] for n in page],
                                             next_page_token=token)

    def list_tasks(self, req: batch_v1.ListTasksRequest) -> batch_v1.ListTasksResponse:
        with self._lock:
            self._enter("ListTasks")
            self.list_task_requests.append(req)
            job_name, _, group = req.parent.rpartition("/taskGroups/")
            if group != GROUP or job_name not in self.tasks:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"TaskGroup {req.parent} not found")
            match = _TASK_FILTER.match(req.filter)
            if req.filter and (match is None or not self.accept_task_filters
                               or match.group(1) not in TaskState.__members__):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad filter {req.filter!r}")
            wanted = getattr(TaskState, match.group(1)) if match else None
            tasks = [t for t in self.tasks[job_name] if wanted is None or t.state == wanted]
            start = int(req.page_token or 0)
            size = min(req.page_size or 100, 1000)
            token = str(start + size) if start + size < len(tasks) else ""
            return batch_v1.ListTasksResponse(
                tasks=[t.proto(req.parent) for t in tasks[start:start + size]],
                next_page_token=token)

    def cancel_job(self, req: batch_v1.CancelJobRequest) -> operations_pb2.Operation:
        with self._lock:
            self._enter("CancelJob")
            job = self._job(req.name)
            if job.status.state in TERMINAL:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"job {req.name} is {State(job.status.state).name}")
            if job.status.state == State.CANCELLATION_IN_PROGRESS:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"job {req.name} is already being cancelled")
            before = int(job.status.state)
            self._move(job, State.CANCELLATION_IN_PROGRESS)
            op_name = f"{self.parent}/operations/{uuid.uuid4().hex}"
            fails = self._failing_cancels > 0
            self._failing_cancels -= fails
            self._ops[op_name] = _Op(req.name, before, fails)
            return operations_pb2.Operation(name=op_name, done=False)

    def get_operation(self, req: operations_pb2.GetOperationRequest) -> operations_pb2.Operation:
        with self._lock:
            self._enter("GetOperation")
            op = self._ops.get(req.name)
            if op is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"no operation {req.name}")
            return self._finish_op(req.name, op)

    def _finish_op(self, name: str, op: _Op) -> operations_pb2.Operation:
        with self._lock:
            req = operations_pb2.GetOperationRequest(name=name)
            op.polls += 1
            if op.polls < self.cancel_polls:
                return operations_pb2.Operation(name=req.name, done=False)
            job = self.jobs.get(op.job_name)
            in_progress = job is not None and job.status.state == State.CANCELLATION_IN_PROGRESS
            if op.fails:
                if job is not None and in_progress:
                    self._move(job, op.before, description="Job cancellation failed.")
                return operations_pb2.Operation(name=req.name, done=True, error=status_pb2.Status(
                    code=self._cancel_error.value[0], message="cancellation failed"))
            if job is not None and in_progress:
                self._move(job, State.CANCELLED)
                for task in self.tasks.get(job.name, []):
                    if task.state not in FINAL_TASK_STATES:
                        self._task_move(job, task, TaskState.UNEXECUTED)
            return operations_pb2.Operation(name=req.name, done=True,
                                            response=_pack(batch_v1.CancelJobResponse()))

    def _job(self, name: str) -> batch_v1.Job:
        job = self.jobs.get(name)
        if job is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Job {name} not found")
        return job

    # --- wiring -----------------------------------------------------------------------------

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(fn: Callable[[Any], Any], req_type: Any, resp_ser: Callable[[Any], bytes]
                  ) -> grpc.RpcMethodHandler:
            def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return fn(request)
                except _Abort as exc:
                    context.abort(exc.code, str(exc))
            return grpc.unary_unary_rpc_method_handler(
                behaviour, request_deserializer=req_type, response_serializer=resp_ser)

        job_ser = batch_v1.Job.serialize
        op_ser = operations_pb2.Operation.SerializeToString
        batch = grpc.method_handlers_generic_handler(SERVICE, {
            "CreateJob": unary(self.create_job, batch_v1.CreateJobRequest.deserialize, job_ser),
            "GetJob": unary(self.get_job, batch_v1.GetJobRequest.deserialize, job_ser),
            "ListJobs": unary(self.list_jobs, batch_v1.ListJobsRequest.deserialize,
                              batch_v1.ListJobsResponse.serialize),
            "CancelJob": unary(self.cancel_job, batch_v1.CancelJobRequest.deserialize, op_ser),
            "ListTasks": unary(self.list_tasks, batch_v1.ListTasksRequest.deserialize,
                               batch_v1.ListTasksResponse.serialize),
        })
        ops = grpc.method_handlers_generic_handler(OPERATIONS, {
            "GetOperation": unary(self.get_operation,
                                  operations_pb2.GetOperationRequest.FromString, op_ser),
        })
        return [batch, ops]


@contextmanager
def serve(fake: FakeGcpBatch, workers: int = 8) -> Iterator[str]:
    """Serve ``fake`` on 127.0.0.1 (a free port); yield its ``host:port``."""
    server = grpc.server(ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers(fake.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(5)


def client_for(address: str) -> tuple[batch_v1.BatchServiceClient, grpc.Channel]:
    """The official client on a plain channel to ``address`` (no credentials needed), with
    the message size limits the client's own channel has (none)."""
    from google.cloud.batch_v1.services.batch_service.transports import (
        BatchServiceGrpcTransport,
    )

    channel = grpc.insecure_channel(address, options=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    client = batch_v1.BatchServiceClient(transport=BatchServiceGrpcTransport(channel=channel))
    return client, channel


def _program(job: batch_v1.Job, task: _Task) -> tuple[list[str], dict[str, str]]:
    """What task ``task``'s container runs, and the variables that program sees: the
    ``entrypoint``, if set (the fake's images, like busybox, have none of their own),
    then ``commands``; through a variable-exporting ``sh -c`` wrapper, if that is it."""
    container = job.task_groups[0].task_spec.runnables[0].container
    entrypoint = [container.entrypoint] if container.entrypoint else []
    return container_view([*entrypoint, *container.commands], task.env)


def _retried(spec: batch_v1.TaskSpec, code: int) -> bool:
    """Whether a task that failed with ``code`` is retried (retries left aside)."""
    if not spec.lifecycle_policies:
        return True  # the default policy: retry any non-zero exit code
    policy = spec.lifecycle_policies[0]
    listed = code in policy.action_condition.exit_codes
    return listed if policy.action == Action.RETRY_TASK else not listed


def _ts(at: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(type(message).pb(message))
    return packed

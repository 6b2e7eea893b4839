"""Google Cloud Batch (``google-cloud-batch``): one Batch job per Jennah execution.

**Resource path**: the job's full name, ``projects/P/locations/R/jobs/<provider job id>``.

**Exactly once** (docs/design.md §4, §11): the Batch job id is the deterministic provider job id
(lowercase, starts with a letter, at most 63 characters), and ``request_id`` is a UUID5
of the Jennah job id and attempt, never the tenant's own ``request_id``. A create that
finds the job already there (ALREADY_EXISTS) adopts it.

**Status**: for a few paths, one ``get_job`` each (in a small thread pool). For many,
one paged ``list_jobs`` per active state (``status.state="RUNNING"`` …) covers every
active job of the region; only the paths not seen there (just finished, or unknown) are
fetched one by one. If the service refuses the filter, the provider falls back to
``get_job`` for good.

**Jobs of several tasks** (docs/design.md §16): one task group (``task_group``). Up to
200 tasks (``GCP_MAX_TASK_ENVIRONMENTS``: "task_environments supports up to 200 entries",
Google's ``TaskGroup`` reference for google-cloud-batch 0.11.0), one ``task_environments``
entry per task gives it ``JENNAH_TASK_INDEX``. Beyond, so that no job relies on more
entries than that reference promised, the group has ``task_count`` and the container runs
the job's commands through ``/bin/sh`` (its entrypoint, replacing the image's
ENTRYPOINT), whose script exports ``JENNAH_TASK_INDEX`` from Batch's ``BATCH_TASK_INDEX``
(``task_container``): the image needs a POSIX shell at ``/bin/sh``, and such a job needs
commands (without, the image's own CMD could not be wrapped: refused at SubmitJob,
``commands_required_over``). Batch retries a task on the retryable exit codes only
(``RETRIED_EXIT_CODES``). ``status`` reads the tasks with ``ListTasks`` only when the
job's task counts (``status.task_groups``) changed since the last listing, lists only the
states that can have changed (RUNNING, and a final state whose count moved), and paces
itself: after a listing of *n* pages the next waits ``n x task_page_seconds`` (2 s),
unless the job ended. A 10,000-task job thus costs at most 30 ``ListTasks`` calls a
minute, against Batch's 15,000 reads a minute per region. GCP's job state says when and
how the job ended (``array_status``); the tasks give the details.

**Cancel**: ``cancel_job``, wait for its long-running operation, then read the job back:
``cancel`` returns only once GCP reports the job ended (CANCELLED, or it had already
finished); a cancel GCP failed, or one still in progress, raises ``ProviderUnavailable``,
so the worker keeps the job marked and cancels again next cycle. Until GCP confirms,
``CANCELLATION_IN_PROGRESS`` and ``DELETION_IN_PROGRESS`` are *not* terminal: they report
the state before them (RUNNING if the job started, else SCHEDULED) with a message, which
the poller records as a STATUS_DETAIL.

**Output**: ``read_output`` reads a task's log lines from Cloud Logging, from one listing
per job shared by its tasks (``providers/gcp_output.py``: offsets, ingestion delay, cost).
So that the last lines are read, ``status`` reports a job (or a task) that ran and has
ended as still RUNNING (``raw_state`` the real one, with a message) until
``log_settle_seconds`` after its end.

**Limits** (``capabilities``, checked at SubmitJob; docs/providers.md gives the sources):
63 custom labels per job, of which this adapter uses 3 (``jennah-*``); keys starting with
``goog-`` or ``google-`` and Batch's predefined ``batch-*`` keys are reserved.
Accelerators need a type (``check``). At most 10,000 tasks a job (ours; Batch takes
100,000 per task group).

**Submit rate** (``Capabilities.submit_rate``, spent by ``worker/admission.py`` and shared
by the live workers): 100 a second. Batch allows 6,000 job changes a minute per project
and region, and a create is a change.

Vendor errors never leave this module: ``google.api_core`` exceptions become
``ProviderUnavailable`` (429, RESOURCE_EXHAUSTED, 5xx: retried here first, see
``providers/retry.py``) or ``ProviderRejected``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.api_core.future import polling
from google.cloud import batch_v1
from google.protobuf import duration_pb2

from jennah.errors import (
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    SettingsError,
)
from jennah.models import MAX_TASK_COUNT, FailureClass, JobSpec, JobStatus, TaskState, TaskStatus
from jennah.settings import Env, ProviderSettings
from jennah.tasks import cancel_remaining, normalize
from providers.base import Capabilities, OutputChunk, ProviderStatus, ProviderTask
from providers.gcp_output import (
    ALL,
    READ_SCOPE,
    HttpSession,
    OutputReader,
    ReadRation,
    RestLogReader,
    remember,
    to_nanos,
)
from providers.resources import (
    JOB_ID_LABEL,
    job_environment,
    job_labels,
    resolve,
    task_index_command,
    task_index_script,
)
from providers.retry import RetryPolicy
from providers.tasks import status_from_tasks

T = TypeVar("T")
log = logging.getLogger(__name__)
State = batch_v1.JobStatus.State
TaskGcpState = batch_v1.TaskStatus.State

# docs/design.md §3: GCP job state → Jennah status (checked row by row by the tests).
GCP_STATES: Mapping[str, JobStatus] = {
    "QUEUED": JobStatus.SCHEDULED,
    "SCHEDULED": JobStatus.SCHEDULED,
    "RUNNING": JobStatus.RUNNING,
    "SUCCEEDED": JobStatus.COMPLETED,
    "FAILED": JobStatus.FAILED,
    "CANCELLED": JobStatus.CANCELLED,
}
# Not terminal until GCP confirms: the job keeps the state it had (RUNNING if it started,
# else SCHEDULED), with this message.
IN_PROGRESS_STATES: Mapping[str, str] = {
    "CANCELLATION_IN_PROGRESS": "cancellation in progress, not yet confirmed by GCP",
    "DELETION_IN_PROGRESS": "deletion in progress, not yet confirmed by GCP",
}
# Batch: at most 63 custom labels per job ("Organize resources using labels"); the
# adapter adds its own three (providers/resources.py job_labels).
GCP_MAX_JOB_LABELS = 63
ADAPTER_LABELS = frozenset({JOB_ID_LABEL, "jennah-tenant-id", "jennah-attempt"})
RESERVED_LABEL_PREFIXES = ("goog-", "google-")
# Batch's predefined labels (overriding one is an error), and the adapter's own keys
# (they would silently replace the tenant's).
RESERVED_LABEL_KEYS = frozenset({"batch-job-id", "batch-job-uid", "batch-node"}) | ADAPTER_LABELS
# Google's reserved exit codes (https://cloud.google.com/batch/docs/troubleshooting);
# any other 500xx is treated as infrastructure too.
GCP_EXIT_CODES: Mapping[int, FailureClass] = {
    50001: FailureClass.PREEMPTED,       # the Spot VM was preempted
    50002: FailureClass.INFRASTRUCTURE,  # the VM stopped reporting (timeout)
    50003: FailureClass.INFRASTRUCTURE,  # the VM rebooted during execution
    50004: FailureClass.INFRASTRUCTURE,  # the VM and task are unresponsive
    50005: FailureClass.TIMEOUT,         # the task exceeded max_run_duration
    50006: FailureClass.INFRASTRUCTURE,  # the VM was recreated during execution
}
# Batch's job limits ("Quotas and limits", https://cloud.google.com/batch/quotas): 100,000
# tasks per task group, 5,000 tasks of a job running at once. Jennah's own limit
# (MAX_TASK_COUNT, 10,000) is the lower, so it is the one declared.
GCP_MAX_TASKS_PER_GROUP = 100_000
GCP_MAX_PARALLEL_TASKS = 5_000
GCP_MAX_TASK_COUNT = min(MAX_TASK_COUNT, GCP_MAX_TASKS_PER_GROUP)
# TaskSpec.max_retry_count: "The valid value range is [0, 10]" (Batch API reference).
GCP_MAX_RETRY_COUNT = 10
# "task_environments supports up to 200 entries": Google's Python reference of TaskGroup
# for google-cloud-batch 0.11.0. Later references no longer say so, and no project was
# there to check, so a job of more tasks does not rely on more: it sets task_count, and
# its container reads its index from Batch's own BATCH_TASK_INDEX (``task_container``).
GCP_MAX_TASK_ENVIRONMENTS = 200
# The wrapper's script (providers/resources.py) for those jobs: BATCH_TASK_INDEX, which
# Batch sets in every task ("Tasks get a BATCH_TASK_INDEX and BATCH_TASK_COUNT
# environment variable", TaskGroup reference), becomes JENNAH_TASK_INDEX.
TASK_INDEX_SCRIPT = task_index_script("BATCH_TASK_INDEX")
# The id Batch gives a job's first (and only) task group, when the job does not say.
TASK_GROUP_ID = "group0"
# Batch task state → Jennah task status (checked row by row by the tests). ASSIGNED (on
# a VM, not started) is still pending; UNEXECUTED ("not executed when the Job finishes")
# never ran: cancelled.
GCP_TASK_STATES: Mapping[str, TaskStatus] = {
    "STATE_UNSPECIFIED": TaskStatus.PENDING,
    "PENDING": TaskStatus.PENDING,
    "ASSIGNED": TaskStatus.PENDING,
    "RUNNING": TaskStatus.RUNNING,
    "SUCCEEDED": TaskStatus.SUCCEEDED,
    "FAILED": TaskStatus.FAILED,
    "UNEXECUTED": TaskStatus.CANCELLED,
}
# Task states a task does not leave once there (with no retry left, for FAILED): a
# status poll lists each only when its count changed (``GcpBatchProvider._list_tasks``).
FINAL_TASK_STATES = ("SUCCEEDED", "FAILED", "UNEXECUTED")
ENDED_JOB_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
# States listed in one call each when polling many jobs; a job absent from all of them is
# finished (or unknown) and is fetched on its own. Latest first, so that a job moving
# while we list is seen at most late, never early.
ACTIVE_STATES = ("RUNNING", "SCHEDULED", "QUEUED")
JOB_ID_RULE = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
JOB_NAME_RULE = re.compile(r"^projects/[^/]+/locations/[^/]+/jobs/[a-z][a-z0-9-]*$")
_EXIT_IN_TEXT = re.compile(r"exit code (-?\d+)")
_TO_STATE = re.compile(r"\bto ([A-Z_]+)\b")
_REQUEST_NS = uuid.UUID("6f1d5d3e-4c1b-5b0e-9a57-3d1c1e0a6a11")


def request_uuid(job_id: str, attempt: int) -> str:
    """The create ``request_id``: stable across retries and workers for one execution."""
    return str(uuid.uuid5(_REQUEST_NS, f"{job_id}/{attempt}"))


def failure_class(exit_code: int | None, detail: str) -> FailureClass:
    """Why a FAILED job failed (docs/design.md §3, §11)."""
    if exit_code is None or exit_code == 0:
        return FailureClass.QUOTA if "quota" in detail.lower() else FailureClass.INFRASTRUCTURE
    if exit_code in GCP_EXIT_CODES:
        return GCP_EXIT_CODES[exit_code]
    if 50000 <= exit_code <= 50999:
        return FailureClass.INFRASTRUCTURE
    return FailureClass.USER_ERROR


# The exit codes a task of several is retried on (up to ``spec.max_retries``, by Batch
# itself): Batch's reserved codes of the retryable classes (preempted, infrastructure)
# and 50000, its code for a task that failed for a reason of Batch's own (the
# ``TaskExecution.exit_code`` reference). Any other code, the task's own, fails it.
RETRIED_EXIT_CODES = tuple(c for c in (50000, *GCP_EXIT_CODES) if failure_class(c, "").retryable)


def translate(exc: Exception, what: str) -> ProviderError:
    """A ``google.api_core`` error as one of ours."""
    text = f"GCP Batch {what}: {type(exc).__name__}: {getattr(exc, 'message', exc)}"
    if isinstance(exc, gexc.TooManyRequests | gexc.RetryError | FutureTimeout):
        return ProviderUnavailable(text)  # 429 and RESOURCE_EXHAUSTED (a subclass)
    if isinstance(exc, gexc.ServerError) and not isinstance(exc, gexc.MethodNotImplemented):
        return ProviderUnavailable(text)
    return ProviderRejected(text)


@dataclass(frozen=True)
class Network:
    """Where the job's VMs attach (settings ``GCP_NETWORK``, ``GCP_SUBNETWORK``,
    ``GCP_NO_EXTERNAL_IP``); empty: the project's default network, with external IPs."""

    network: str = ""
    subnetwork: str = ""
    no_external_ip: bool = False

    def policy(self) -> batch_v1.AllocationPolicy.NetworkPolicy | None:
        if not (self.network or self.subnetwork or self.no_external_ip):
            return None
        nic = batch_v1.AllocationPolicy.NetworkInterface(
            network=self.network, subnetwork=self.subnetwork,
            no_external_ip_address=self.no_external_ip)
        return batch_v1.AllocationPolicy.NetworkPolicy(network_interfaces=[nic])


def build_job(task: ProviderTask, network: Network | None = None) -> batch_v1.Job:
    """The Batch job for one execution: every field Jennah promises (docs/providers.md)."""
    spec, res = task.spec, resolve(task.spec)
    container = task_container(spec)
    env = {**job_environment(task), "JENNAH_TASK_COUNT": str(max(1, spec.task_count))}
    if not spec.is_array:
        env["JENNAH_TASK_INDEX"] = "0"
    task_spec = batch_v1.TaskSpec(
        runnables=[batch_v1.Runnable(container=container)],
        compute_resource=batch_v1.ComputeResource(cpu_milli=res.cpu_millis,
                                                  memory_mib=res.memory_mib),
        environment=batch_v1.Environment(variables=env),
    )
    if res.max_run_duration_seconds:
        task_spec.max_run_duration = duration_pb2.Duration(seconds=res.max_run_duration_seconds)
    model = batch_v1.AllocationPolicy.ProvisioningModel
    policy = batch_v1.AllocationPolicy.InstancePolicy(
        provisioning_model=model.SPOT if spec.use_spot_vms else model.STANDARD,
        machine_type=spec.machine_type,
    )
    if spec.boot_disk_size_gb:
        policy.boot_disk = batch_v1.AllocationPolicy.Disk(size_gb=spec.boot_disk_size_gb)
    if spec.accelerator_type:
        policy.accelerators = [batch_v1.AllocationPolicy.Accelerator(
            type_=spec.accelerator_type, count=spec.accelerator_count or 1)]
    allocation = batch_v1.AllocationPolicy(
        instances=[batch_v1.AllocationPolicy.InstancePolicyOrTemplate(
            policy=policy, install_gpu_drivers=bool(spec.accelerator_type))])
    nets = (network or Network()).policy()
    if nets is not None:
        allocation.network = nets
    if spec.service_account:
        allocation.service_account = batch_v1.ServiceAccount(email=spec.service_account)
    return batch_v1.Job(
        task_groups=[task_group(spec, task_spec)],
        allocation_policy=allocation,
        labels=job_labels(task),
        logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
    )


def indexed_by_shell(spec: JobSpec) -> bool:
    """Whether the job's tasks learn their index from the shell wrapper (more tasks than
    ``GCP_MAX_TASK_ENVIRONMENTS``), not from ``task_environments``."""
    return spec.task_count > GCP_MAX_TASK_ENVIRONMENTS


def task_container(spec: JobSpec) -> batch_v1.Runnable.Container:
    """The job's container: its image and commands, as given. For a job of more than
    ``GCP_MAX_TASK_ENVIRONMENTS`` tasks, ``/bin/sh`` becomes the entrypoint (replacing the
    image's ENTRYPOINT: Batch appends ``commands`` to it) and runs ``TASK_INDEX_SCRIPT``,
    which exports ``JENNAH_TASK_INDEX`` and then ``exec``s the job's commands, unchanged.
    Such a job without commands (the image's own CMD) cannot be wrapped: refused
    (``check_spec`` refuses it at SubmitJob; this guards any other caller)."""
    if not indexed_by_shell(spec):
        return batch_v1.Runnable.Container(image_uri=spec.image_uri,
                                           commands=list(spec.commands))
    if not spec.commands:
        raise ProviderRejected(
            f"commands: a GCP job of more than {GCP_MAX_TASK_ENVIRONMENTS} tasks needs them "
            "(/bin/sh runs them to give each task its JENNAH_TASK_INDEX)")
    shell, *arguments = task_index_command(TASK_INDEX_SCRIPT, spec.commands)
    return batch_v1.Runnable.Container(image_uri=spec.image_uri, entrypoint=shell,
                                       commands=arguments)


def task_group(spec: JobSpec, task_spec: batch_v1.TaskSpec) -> batch_v1.TaskGroup:
    """The job's one task group. A plain job is one task (retried by Jennah, as a new
    execution: ``max_retry_count`` 0). A job of several tasks gives each its
    ``JENNAH_TASK_INDEX`` (``JENNAH_TASK_COUNT`` is in the shared ``task_spec``): up to
    ``GCP_MAX_TASK_ENVIRONMENTS`` tasks, in one environment per task in
    ``task_environments``, Batch taking the count from their number (as its reference
    asks, ``task_count`` is then left unset); beyond, ``task_count`` is set and the
    container's shell wrapper (``task_container``) exports it from Batch's
    ``BATCH_TASK_INDEX``. ``parallelism`` is capped at Batch's 5,000 running tasks a job:
    the bound the tenant asked for still holds. Each task is retried by Batch, up to
    ``max_retries``, on ``RETRIED_EXIT_CODES`` only (one RETRY_TASK lifecycle policy: "we
    will retry failed tasks if we notice any exit code match and fail tasks if no match is
    found"); a task's own non-zero exit fails it at once."""
    if not spec.is_array:
        return batch_v1.TaskGroup(task_spec=task_spec, task_count=1)
    if spec.max_retries:
        task_spec.max_retry_count = min(spec.max_retries, GCP_MAX_RETRY_COUNT)
        task_spec.lifecycle_policies = [batch_v1.LifecyclePolicy(
            action=batch_v1.LifecyclePolicy.Action.RETRY_TASK,
            action_condition=batch_v1.LifecyclePolicy.ActionCondition(
                exit_codes=list(RETRIED_EXIT_CODES)))]
    group = batch_v1.TaskGroup(task_spec=task_spec)
    if indexed_by_shell(spec):
        group.task_count = spec.task_count
    else:
        per_task = batch_v1.TaskGroup.pb(group).task_environments  # raw: proto-plus is slow
        for i in range(spec.task_count):
            per_task.add().variables["JENNAH_TASK_INDEX"] = str(i)
    if spec.parallelism:
        group.parallelism = min(spec.parallelism, GCP_MAX_PARALLEL_TASKS)
    return group


def job_status(job: batch_v1.Job) -> ProviderStatus:
    """Map one Batch job (its state and status events) to a ``ProviderStatus``."""
    raw = State(job.status.state).name
    events = list(job.status.status_events)
    if raw in IN_PROGRESS_STATES:
        started = _first_event(events, ("RUNNING",))
        return ProviderStatus(state=JobStatus.RUNNING if started else JobStatus.SCHEDULED,
                              raw_state=raw, message=IN_PROGRESS_STATES[raw],
                              started_at=started)
    state = GCP_STATES.get(raw)
    exit_code: int | None = None
    for event in events:
        if "task_execution" in event:
            exit_code = event.task_execution.exit_code
        elif (m := _EXIT_IN_TEXT.search(event.description)) is not None:
            exit_code = int(m.group(1))
    if state is JobStatus.COMPLETED and exit_code is None:
        exit_code = 0
    started = _first_event(events, ("RUNNING",))
    completed = None
    if state is not None and state.terminal:
        completed = _first_event(events, ("SUCCEEDED", "FAILED", "CANCELLED"))
        if completed is None and "update_time" in job:
            completed = job.update_time
        if started is None and completed is not None and raw in ("SUCCEEDED", "FAILED"):
            run = job.status.run_duration
            started = completed - (run if isinstance(run, timedelta) else timedelta())
    message = events[-1].description if events else raw.lower()
    fc = failure_class(exit_code, message) if state is JobStatus.FAILED else None
    return ProviderStatus(state=state, raw_state=raw, exit_code=exit_code, failure_class=fc,
                          message=message, started_at=started, completed_at=completed)


def task_state(task: batch_v1.Task) -> TaskState:
    """One Batch task (``ListTasks``) as a ``TaskState``: its state, and from its status
    events when it started (first RUNNING) and ended, its exit code, and its retries
    (``attempt``: the failed runs before the current one). Read from the raw protobuf:
    proto-plus would cost ten times as much CPU, for 10,000 tasks a listing."""
    pb = batch_v1.Task.pb(task)
    raw = TaskGcpState(pb.status.state).name
    status = GCP_TASK_STATES.get(raw, TaskStatus.PENDING)
    events = [(e, _task_event_state(e)) for e in pb.status.status_events]
    failed = [e for e, s in events if s == "FAILED"]
    started = next((_when(e) for e, s in events if s == "RUNNING" and e.HasField("event_time")),
                   None)
    ends = [_when(e) for e, s in events if s == raw and e.HasField("event_time")]
    completed = ends[-1] if ends and status.terminal else None
    exit_code: int | None = 0 if status is TaskStatus.SUCCEEDED else None
    message, fc = "", None
    if status is TaskStatus.FAILED:
        last = failed[-1] if failed else None
        if last is not None and last.HasField("task_execution"):
            exit_code = int(last.task_execution.exit_code)
        elif last is not None and (m := _EXIT_IN_TEXT.search(last.description)):
            exit_code = int(m.group(1))
        message = str(last.description) if last is not None else "failed"
        fc = failure_class(exit_code, message)
    return TaskState(
        index=int(pb.name.rsplit("/", 1)[-1]), status=status, exit_code=exit_code,
        attempt=max(0, len(failed) - (status is TaskStatus.FAILED)), started_at=started,
        completed_at=completed, error_message=message, failure_class=fc)


def _task_event_state(event: Any) -> str:
    """The task state a task-level status event (raw protobuf) moved to ("" if none)."""
    if event.task_state:
        return str(TaskGcpState(event.task_state).name)
    m = _TO_STATE.search(event.description)
    return m.group(1) if m else ""


def _when(event: Any) -> datetime:
    when: datetime = event.event_time.ToDatetime(tzinfo=UTC)
    return when


def array_status(base: ProviderStatus, task_count: int, tasks: Sequence[TaskState],
                 now: datetime) -> ProviderStatus:
    """A job of several tasks: ``base`` (``job_status``, GCP's word for the whole job) with
    the tasks. GCP's job state says whether and how the job ended: a job cancelled with a
    task failed is CANCELLED, and a job that failed before any task failed (no VM, quota)
    is FAILED with the job's own reason. Otherwise the state and, for a failed job, the
    exit code, class and message of the first task that failed come from the tasks
    (``providers.tasks.status_from_tasks``). A task of an ended job that never finished
    was stopped: CANCELLED."""
    state = base.state
    if state is not None and state.terminal:
        tasks = cancel_remaining(task_count, tasks, base.completed_at or now)
    st = status_from_tasks(task_count, tasks, raw_state=base.raw_state)
    started = st.started_at or base.started_at
    if state is None or not state.terminal:
        running = state is JobStatus.RUNNING or st.state is not JobStatus.SCHEDULED
        return replace(base, state=JobStatus.RUNNING if state is not None and running else state,
                       started_at=started, tasks=st.tasks)
    completed = base.completed_at or st.completed_at
    if state is JobStatus.FAILED and st.state is JobStatus.FAILED:
        return replace(st, started_at=started, completed_at=completed)
    return replace(base, started_at=started, completed_at=completed, tasks=st.tasks)


def _first_event(events: Sequence[batch_v1.StatusEvent], states: Sequence[str]
                 ) -> datetime | None:
    for event in events:
        if any(f"to {s}" in event.description for s in states) and "event_time" in event:
            when: datetime = event.event_time
            return when
    return None


@dataclass(frozen=True)
class _Seen:
    """What ``read_output`` needs of a job, remembered from the last status read."""

    uid: str
    ended: datetime | None  # when it ended, if it ended after running
    group: str = TASK_GROUP_ID  # its task group's id (its tasks' log label)


@dataclass(frozen=True)
class _TaskView:
    """What the provider knows of a job's tasks, from its last ``ListTasks``."""

    signature: tuple[object, ...]  # the job's state and task counts then
    tasks: Mapping[int, tuple[str, TaskState]]  # by index: Batch's state, and ours
    next_refresh: datetime  # not listed again before (unless the job ended)


def _group_of(job: batch_v1.Job) -> tuple[str, str, int]:
    """The job's task group: its name, its id and its number of tasks."""
    group = job.task_groups[0] if job.task_groups else batch_v1.TaskGroup()
    name = group.name or f"{job.name}/taskGroups/{TASK_GROUP_ID}"
    count = group.task_count or len(group.task_environments) or 1
    return name, name.rsplit("/", 1)[-1], count


# Account-wide submits per second: Batch takes 6,000 job-changing requests a minute
# per project and region.
SUBMIT_RATE = 6000 / 60


@dataclass(frozen=True)
class GcpSettings:
    """``BATCH_PROVIDER=gcp``'s variables (docs/providers.md, GCP Batch)."""

    project_id: str
    region: str
    network: Network = Network()
    log_settle_seconds: float = 30.0
    log_reads_per_minute: float = 50.0

    @classmethod
    def from_env(cls, e: Env) -> GcpSettings:
        e.require(("BATCH_PROJECT_ID", "BATCH_REGION"), "BATCH_PROVIDER=gcp")
        network = Network(e.text("GCP_NETWORK"), e.text("GCP_SUBNETWORK"),
                          e.flag("GCP_NO_EXTERNAL_IP"))
        if network.no_external_ip and not (network.network or network.subnetwork):
            e.problems.append("GCP_NO_EXTERNAL_IP needs GCP_SUBNETWORK or GCP_NETWORK "
                              "(a subnetwork with Private Google Access or Cloud NAT)")
        return cls(
            project_id=e.text("BATCH_PROJECT_ID"), region=e.region(), network=network,
            log_settle_seconds=e.number("GCP_LOG_SETTLE_SECONDS", 30.0, float),
            log_reads_per_minute=e.number("GCP_LOG_READS_PER_MINUTE", 50.0, float, 1),
        )


class GcpBatchProvider:
    """Google Cloud Batch, through an injected ``BatchServiceClient`` (and, for output, a
    Cloud Logging reader)."""

    name = "gcp"
    settings_class = GcpSettings

    def __init__(
        self,
        client: batch_v1.BatchServiceClient,
        *,
        project: str,
        region: str,
        retry: RetryPolicy | None = None,
        list_threshold: int = 50,
        page_size: int = 500,
        status_concurrency: int = 8,
        call_timeout: float = 30.0,
        cancel_timeout: float = 60.0,
        lro_poll_seconds: float = 0.5,
        network: Network | None = None,
        logs: RestLogReader | None = None,
        log_settle_seconds: float = 30.0,
        log_reads_per_minute: float = 50.0,
        task_page_size: int = 1000,
        task_page_seconds: float = 2.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.client = client
        self.parent = f"projects/{project}/locations/{region}"
        self.retry = retry or RetryPolicy()
        self.list_threshold = list_threshold
        self.page_size = page_size
        self.call_timeout = call_timeout
        self.cancel_timeout = cancel_timeout
        self.network = network or Network()
        self.log_settle = timedelta(seconds=log_settle_seconds)
        self.clock = clock
        self._output = OutputReader(logs) if logs is not None else None
        self._ration = ReadRation(log_reads_per_minute, clock=lambda: self.clock().timestamp(),
                                  sleep=sleep or time.sleep)
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self.task_page_size = task_page_size
        self.task_page_seconds = task_page_seconds
        self._task_views: OrderedDict[str, _TaskView] = OrderedDict()
        self._views_lock = threading.Lock()
        self._task_filter_works = True
        self.capabilities = Capabilities(
            max_status_batch=10_000, poll_interval_seconds=10.0,
            submit_rate=SUBMIT_RATE,
            supports_output=logs is not None,
            max_labels=GCP_MAX_JOB_LABELS - len(ADAPTER_LABELS),
            reserved_label_prefixes=RESERVED_LABEL_PREFIXES,
            reserved_label_keys=RESERVED_LABEL_KEYS,
            machine_type=True, spot=True, accelerator_type=True, accelerator_count=True,
            accelerator_type_required=True, max_task_count=GCP_MAX_TASK_COUNT, parallelism=True,
            commands_required_over=GCP_MAX_TASK_ENVIRONMENTS)
        self._polling = gretry.Retry(predicate=polling.POLLING_PREDICATE, initial=lro_poll_seconds,
                                     maximum=max(lro_poll_seconds, 5.0), multiplier=1.5,
                                     timeout=cancel_timeout)
        self._list_works = True
        self._pool = ThreadPoolExecutor(max_workers=status_concurrency,
                                        thread_name_prefix="gcp-status")
        self._closed = threading.Event()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> GcpBatchProvider:
        s = settings.read(GcpSettings.from_env)
        import google.auth
        import google.auth.exceptions
        from google.auth.transport.requests import AuthorizedSession

        try:
            client = batch_v1.BatchServiceClient()  # credentials: ADC
            credentials, _ = google.auth.default(scopes=[READ_SCOPE])  # type: ignore[no-untyped-call]
        except google.auth.exceptions.GoogleAuthError as exc:
            raise SettingsError(f"BATCH_PROVIDER=gcp: no Google credentials ({exc})") from exc
        session: HttpSession = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
        return cls(client, project=s.project_id, region=s.region, network=s.network,
                   logs=RestLogReader(session, project=s.project_id),
                   log_settle_seconds=s.log_settle_seconds,
                   log_reads_per_minute=s.log_reads_per_minute)

    @contextmanager
    def _vendor(self, what: str) -> Iterator[None]:
        try:
            yield
        except (gexc.GoogleAPIError, FutureTimeout) as exc:
            raise translate(exc, what) from exc

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            with self._vendor(what):
                return fn()
        return self.retry.call(f"gcp {what}", once)

    # --- submit -----------------------------------------------------------------------

    def submit(self, task: ProviderTask) -> str:
        if not JOB_ID_RULE.match(task.provider_job_id):
            raise ProviderRejected(f"{task.provider_job_id!r} is not a valid GCP Batch job id")
        if task.spec.accelerator_count and not task.spec.accelerator_type:
            # SubmitJob refuses it first (check_spec); this guards any other caller.
            raise ProviderRejected("accelerator.type: the gcp provider needs it with "
                                   "accelerator.count")
        request = batch_v1.CreateJobRequest(
            parent=self.parent, job_id=task.provider_job_id,
            job=build_job(task, self.network),
            request_id=request_uuid(task.job_id, task.attempt))
        name = f"{self.parent}/jobs/{task.provider_job_id}"

        def create() -> str:
            try:
                with self._vendor("create_job"):
                    created = self.client.create_job(request=request, retry=None,
                                                     timeout=self.call_timeout)
                    return str(created.name)
            except ProviderRejected as exc:
                if not isinstance(exc.__cause__, gexc.AlreadyExists):
                    raise
            with self._vendor("get_job"):  # adopt the job that is already there
                return str(self.client.get_job(name=name, retry=None,
                                               timeout=self.call_timeout).name)

        return self.retry.call("gcp submit", create)

    # --- status -----------------------------------------------------------------------

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        paths = list(dict.fromkeys(resource_paths))
        result: dict[str, ProviderStatus] = {}
        wanted = [p for p in paths if JOB_NAME_RULE.match(p)]
        for p in paths:
            if p not in wanted:
                result[p] = ProviderStatus(None, "UNKNOWN", message="not a GCP Batch job name")
        if len(wanted) >= self.list_threshold and self._list_works:
            result.update(self._listed(wanted))
        missing = [p for p in wanted if p not in result]
        result.update(self._get_each(missing))
        return result

    def _listed(self, paths: Sequence[str]) -> dict[str, ProviderStatus]:
        wanted = set(paths)
        found: dict[str, batch_v1.Job] = {}
        try:
            for state in ACTIVE_STATES:
                request = batch_v1.ListJobsRequest(parent=self.parent, page_size=self.page_size,
                                                   filter=f'status.state="{state}"')
                for job in self._pages(request):
                    if job.name in wanted:
                        found.setdefault(job.name, job)
        except ProviderRejected as exc:
            log.warning("GCP Batch refused the list filter, polling job by job: %s", exc)
            self._list_works = False
            return {}
        mapped = {}
        for name, job in found.items():
            try:
                mapped[name] = self._map(job)
            except ProviderError as exc:  # its tasks unread: fetched on its own, like the rest
                log.info("GCP Batch job %s not mapped from the listing: %s", name, exc)
        return mapped

    def _pages(self, request: batch_v1.ListJobsRequest) -> Iterator[batch_v1.Job]:
        while True:
            page = self._call("list_jobs", lambda: self.client.list_jobs(
                request=request, retry=None, timeout=self.call_timeout))
            yield from page.jobs
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def _get_each(self, paths: Sequence[str]) -> dict[str, ProviderStatus]:
        def one(path: str) -> ProviderStatus | ProviderError:
            try:
                return self._map(self._call("get_job", lambda: self.client.get_job(
                    name=path, retry=None, timeout=self.call_timeout)))
            except ProviderRejected as exc:  # NotFound: from get_job or, gone since, list_tasks
                if isinstance(exc.__cause__, gexc.NotFound):
                    return ProviderStatus(None, "UNKNOWN", message="no such job")
                return exc
            except ProviderError as exc:
                return exc

        outcomes = dict(zip(paths, self._pool.map(one, paths), strict=True))
        errors = [o for o in outcomes.values() if isinstance(o, ProviderError)]
        if errors and len(errors) == len(outcomes):
            raise errors[0]
        return {p: o if isinstance(o, ProviderStatus)
                else ProviderStatus(None, "UNKNOWN", message=f"status unavailable: {o}")
                for p, o in outcomes.items()}

    def _map(self, job: batch_v1.Job) -> ProviderStatus:
        """``job_status`` (with its tasks, for a job of several), remembering the job for
        ``read_output``, and holding back the end of a job, or of a task, that ran until
        its last output can have reached Cloud Logging."""
        st, now = job_status(job), self.clock()
        group_name, group_id, count = _group_of(job)
        if count > 1:
            st = array_status(st, count, self._tasks(job, group_name, group_id), now)
            if self._output is not None and st.tasks:
                st = replace(st, tasks=normalize(self._held(t, now) for t in st.tasks))
        ran_and_ended = st.state is not None and st.state.terminal and st.started_at is not None
        ended = st.completed_at if ran_and_ended else None
        remember(self._seen, str(job.name), _Seen(str(job.uid), ended, group_id))
        if ended is None or self._output is None or now >= ended + self.log_settle:
            return st
        return ProviderStatus(
            JobStatus.RUNNING, st.raw_state, started_at=st.started_at, tasks=st.tasks,
            message=f"{st.raw_state}; reading its last output from Cloud Logging for "
                    f"{self.log_settle.total_seconds():g}s before recording the end")

    def _held(self, task: TaskState, now: datetime) -> TaskState:
        """A task that ran and ended less than ``log_settle`` ago, as still RUNNING: the
        worker reads a task's output to its end once it sees the task ended."""
        if (task.status.terminal and task.started_at is not None
                and task.completed_at is not None and now < task.completed_at + self.log_settle):
            return TaskState(task.index, TaskStatus.RUNNING, attempt=task.attempt,
                             started_at=task.started_at)
        return task

    # --- the tasks of a job of several ---------------------------------------------------

    def _tasks(self, job: batch_v1.Job, group_name: str, group_id: str
               ) -> tuple[TaskState, ...]:
        """The job's tasks, listed again only when its task counts (or its state) changed,
        and then at most once per ``task_page_seconds`` x the pages the last listing took,
        unless the job has ended (its final tasks are always read)."""
        raw = State(job.status.state).name
        group = job.status.task_groups.get(group_id)
        counts = {k: int(v) for k, v in group.counts.items()} if group is not None else {}
        now = self.clock()
        signature: tuple[object, ...] = (raw, tuple(sorted(counts.items())) if counts else now)
        with self._views_lock:
            view = self._task_views.get(job.name)
        if view is None or (view.signature != signature and (
                now >= view.next_refresh or raw in ENDED_JOB_STATES)):
            tasks, calls = self._list_tasks(group_name, view.tasks if view else {}, counts)
            view = _TaskView(signature, tasks, now + timedelta(
                seconds=calls * self.task_page_seconds))
            with self._views_lock:
                remember(self._task_views, str(job.name), view)
        return tuple(t for _, t in view.tasks.values())

    def _list_tasks(self, parent: str, held: Mapping[int, tuple[str, TaskState]],
                    counts: Mapping[str, int]) -> tuple[dict[int, tuple[str, TaskState]], int]:
        """The tasks after one refresh, and the ``ListTasks`` calls it took.

        Only the tasks that can have moved are listed: RUNNING ones (at most the job's
        parallelism), and those of each final state whose count differs from what is
        held. A task not listed is PENDING (or ASSIGNED, or being retried), unless held in
        a final state not listed. If the service refuses the state filter, every task is
        listed, from then on."""
        states = ["RUNNING", *(s for s in FINAL_TASK_STATES if counts.get(s, 0)
                               != sum(1 for raw, _ in held.values() if raw == s))]
        listed: dict[int, tuple[str, TaskState]] = {}
        calls = 0
        if self._task_filter_works:
            try:
                for state in states:
                    calls += self._task_pages(parent, f"State={state}", listed)
            except ProviderRejected as exc:
                if not isinstance(exc.__cause__, gexc.InvalidArgument):
                    raise
                log.warning("GCP Batch refused the task filter, listing every task: %s", exc)
                self._task_filter_works = False
        if not self._task_filter_works:
            listed.clear()
            return listed, calls + self._task_pages(parent, "", listed)
        kept = {i: v for i, v in held.items() if v[0] not in states and i not in listed}
        return {**kept, **listed}, calls

    def _task_pages(self, parent: str, filter_: str,
                    into: dict[int, tuple[str, TaskState]]) -> int:
        """Add the tasks ``filter_`` lists to ``into``; return the pages it took."""
        request = batch_v1.ListTasksRequest(parent=parent, filter=filter_,
                                            page_size=self.task_page_size)
        pages = 0
        while True:
            page = self._call("list_tasks", lambda: self.client.list_tasks(
                request=request, retry=None, timeout=self.call_timeout))
            pages += 1
            for task in page.tasks:
                ts = task_state(task)
                into[ts.index] = (TaskGcpState(task.status.state).name, ts)
            if not page.next_page_token:
                return pages
            request.page_token = page.next_page_token

    def _task_end(self, path: str, index: int) -> datetime | None:
        """When task ``index`` of job ``path`` ended, if it ran and ended (last listing)."""
        with self._views_lock:
            view = self._task_views.get(path)
        held = view.tasks.get(index) if view is not None else None
        if held is None or not held[1].status.terminal or held[1].started_at is None:
            return None
        return held[1].completed_at

    # --- output -----------------------------------------------------------------------

    def read_output(self, resource_path: str, offsets: tuple[int, int],
                    task_index: int = 0) -> OutputChunk:
        """Task ``task_index``'s log lines after ``offsets`` (``providers/gcp_output.py``):
        from the job's listing, shared by its tasks; at most 1 MiB of text per call. A
        running task's new lines come when its job's turn to be listed comes (Cloud
        Logging's read quota is rationed among the jobs); a task (or job) that ended
        ``log_settle`` ago is read to its end, waiting for quota."""
        reader = self._output
        if reader is None or not JOB_NAME_RULE.match(resource_path) or task_index < 0:
            return OutputChunk(offsets=offsets)
        seen = self._seen.get(resource_path) or self._look_up(resource_path)
        if seen is None:
            return OutputChunk(offsets=offsets)
        now = self.clock()
        cutoff: int | None = to_nanos(now - self.log_settle)
        need: int | None = None  # a final read: every entry up to this time must be met
        task_end = self._task_end(resource_path, task_index)
        if seen.ended is not None and now >= seen.ended + self.log_settle:
            cutoff, need = None, ALL
        elif task_end is not None and now >= task_end + self.log_settle:
            need = to_nanos(task_end)
        task_id = f"{seen.uid}-{seen.group}-{task_index}"
        try:
            page = self._call("entries.list", lambda: reader.read(
                seen.uid, task_id, offsets, cutoff=cutoff, need=need,
                turn=lambda: self._ration.turn(resource_path),
                wait=lambda: self._ration.wait(resource_path)))
        except ProviderUnavailable as exc:
            if need is not None:
                raise  # the end waits for this read: the poller tries again next cycle
            log.info("output of %s not read this cycle: %s", resource_path, exc)
            return OutputChunk(offsets=offsets)
        return OutputChunk(page.stdout, page.stderr, page.offsets)

    def _look_up(self, path: str) -> _Seen | None:
        try:
            self._map(self._call("get_job", lambda: self.client.get_job(
                name=path, retry=None, timeout=self.call_timeout)))
        except ProviderRejected as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                return None
            raise
        return self._seen.get(path)

    # --- cancel -----------------------------------------------------------------------

    def cancel(self, resource_path: str) -> None:
        if not JOB_NAME_RULE.match(resource_path):
            return

        def once() -> None:
            try:
                with self._vendor("cancel_job"):
                    op = self.client.cancel_job(name=resource_path, retry=None,
                                                timeout=self.call_timeout)
                    try:
                        op.result(timeout=self.cancel_timeout,  # type: ignore[no-untyped-call]
                                  polling=self._polling)
                    except gexc.GoogleAPICallError as exc:  # the operation itself failed
                        raise ProviderUnavailable(
                            f"GCP Batch failed to cancel {resource_path}: "
                            f"{type(exc).__name__}: {exc.message}") from exc
            except ProviderRejected as exc:
                # Unknown, finished or being cancelled already: the read below decides.
                if not isinstance(exc.__cause__, gexc.NotFound | gexc.FailedPrecondition):
                    raise

        self.retry.call("gcp cancel", once)
        self._confirm_ended(resource_path)

    def _confirm_ended(self, path: str) -> None:
        """Return only if GCP reports the job ended (or unknown); else raise
        ``ProviderUnavailable``, so that the worker asks again next cycle."""
        try:
            job = self._call("get_job", lambda: self.client.get_job(
                name=path, retry=None, timeout=self.call_timeout))
        except ProviderRejected as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                return
            raise
        self._map(job)
        raw = State(job.status.state).name
        if raw in ("CANCELLED", "SUCCEEDED", "FAILED"):
            return
        why = IN_PROGRESS_STATES.get(raw, "the cancel failed or was not applied")
        raise ProviderUnavailable(f"GCP Batch has not cancelled {path} yet: it is {raw} ({why})")

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._pool.shutdown(wait=True)
        self.client.transport.close()  # type: ignore[no-untyped-call]

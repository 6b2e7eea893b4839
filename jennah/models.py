"""Domain types shared by the worker, the stores and the providers.

These are plain dataclasses, independent of protobuf: ``worker/convert.py`` maps them to
and from the wire messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from jennah.errors import InvalidArgument

# A tenant id: what the gateway maps a credential to and every store row is keyed by.
TENANT_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def validate_tenant(tenant_id: str) -> str:
    """``tenant_id`` if it is a well-formed tenant id, else ``InvalidArgument``."""
    if not TENANT_RE.fullmatch(tenant_id):
        raise InvalidArgument(
            f"tenant id {tenant_id[:70]!r} is invalid: expected [a-z0-9][a-z0-9-]{{0,62}}"
        )
    return tenant_id


class JobStatus(StrEnum):
    """The job state machine (docs/design.md §3). Values are the stored spelling."""

    PENDING = "PENDING"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def rank(self) -> int:
        """Order along the state machine; every terminal state has the highest rank."""
        return _RANK[self]

    def can_move_to(self, new: JobStatus) -> bool:
        """True when ``new`` is strictly forward: terminal states never change, and a
        poll that reports an older or equal state never moves a job backwards."""
        return not self.terminal and new.rank > self.rank


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({JobStatus.PENDING, JobStatus.SCHEDULED, JobStatus.RUNNING})
_RANK = {
    JobStatus.PENDING: 0,
    JobStatus.SCHEDULED: 1,
    JobStatus.RUNNING: 2,
    JobStatus.COMPLETED: 3,
    JobStatus.FAILED: 3,
    JobStatus.CANCELLED: 3,
}


class FailureClass(StrEnum):
    """Why a job failed (docs/design.md §3). Only PREEMPTED and INFRASTRUCTURE are retried."""

    USER_ERROR = "user_error"
    PREEMPTED = "preempted"
    INFRASTRUCTURE = "infrastructure"
    QUOTA = "quota"
    TIMEOUT = "timeout"

    @property
    def retryable(self) -> bool:
        return self in (FailureClass.PREEMPTED, FailureClass.INFRASTRUCTURE)


class EventKind(StrEnum):
    """Kinds of job events; the stored spelling is the name.

    *Lifecycle* kinds are written by the store in the transaction of the transition (or
    claim) they report; *execution* kinds (OUTPUT, STATUS_DETAIL) are what an owner observes
    while an execution runs, delivered through its WAL. ``LEASE_LOST`` is never stored (a
    stale owner cannot write); it stays in the enum because the wire enum has it.
    """

    SUBMITTED = "SUBMITTED"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    STATUS_DETAIL = "STATUS_DETAIL"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    LEASE_CLAIMED = "LEASE_CLAIMED"
    LEASE_LOST = "LEASE_LOST"
    RETRY = "RETRY"
    OUTPUT = "OUTPUT"


TERMINAL_KINDS = frozenset({EventKind.COMPLETED, EventKind.FAILED, EventKind.CANCELLED})
# The event of each transition, by the status it enters (a retry re-enters PENDING).
EVENT_FOR_STATUS: Mapping[JobStatus, EventKind] = {
    JobStatus.PENDING: EventKind.SUBMITTED,
    JobStatus.SCHEDULED: EventKind.SCHEDULED,
    JobStatus.RUNNING: EventKind.RUNNING,
    JobStatus.COMPLETED: EventKind.COMPLETED,
    JobStatus.FAILED: EventKind.FAILED,
    JobStatus.CANCELLED: EventKind.CANCELLED,
}


class TaskStatus(StrEnum):
    """The state of one task of a job (docs/design.md §16). Values are the stored spelling."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)


# The most tasks one job may have (AWS Batch's array limit; GCP's and ours).
MAX_TASK_COUNT = 10_000


@dataclass(frozen=True)
class TaskState:
    """What is known of one task of a job. A job keeps these sparsely: a task without
    one is PENDING with nothing else known. ``attempt`` counts the provider's retries of
    the task (0 for its first run)."""

    index: int
    status: TaskStatus
    exit_code: int | None = None
    attempt: int = 0
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error_message: str = ""
    failure_class: FailureClass | None = None


@dataclass(frozen=True)
class TaskCounts:
    """How many of a job's tasks are in each state; they add up to the task count."""

    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


RESOURCE_PROFILES: Mapping[str, tuple[int, int]] = {
    # name: (cpu_millis, memory_mib)
    "small": (1000, 2048),
    "medium": (2000, 4096),
    "large": (4000, 8192),
    "xlarge": (8000, 16384),
}


@dataclass(frozen=True)
class ResourceOverride:
    cpu_millis: int = 0
    memory_mib: int = 0
    max_run_duration_seconds: int = 0


@dataclass(frozen=True)
class JobSpec:
    """What the tenant asked to run. Stored whole (env values included) so that any
    worker can resubmit the job after a takeover; responses never carry env values."""

    image_uri: str
    commands: tuple[str, ...] = ()
    # repr=False: a logged or traceback-printed spec (or Job) never shows secret values.
    env_vars: Mapping[str, str] = field(default_factory=dict, repr=False)
    name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    resource_profile: str = "small"
    resource_override: ResourceOverride = field(default_factory=ResourceOverride)
    machine_type: str = ""
    boot_disk_size_gb: int = 0
    use_spot_vms: bool = False
    service_account: str = ""
    max_retries: int = 0
    # GPUs per task: a provider's accelerator type (GCP) and how many (0: none).
    accelerator_type: str = ""
    accelerator_count: int = 0
    # Tasks running the image and command (1: a plain job) and how many at a time (0:
    # no limit beyond the provider's).
    task_count: int = 1
    parallelism: int = 0

    @property
    def is_array(self) -> bool:
        """True for a job of several tasks."""
        return self.task_count > 1

    def to_dict(self) -> dict[str, object]:
        # Written out rather than dataclasses.asdict, whose recursive deep copy was a
        # quarter of the store's CPU per submit (docs/performance.md).
        ro = self.resource_override
        return {
            "image_uri": self.image_uri,
            "commands": list(self.commands),
            "env_vars": dict(self.env_vars),
            "name": self.name,
            "labels": dict(self.labels),
            "resource_profile": self.resource_profile,
            "resource_override": {"cpu_millis": ro.cpu_millis, "memory_mib": ro.memory_mib,
                                  "max_run_duration_seconds": ro.max_run_duration_seconds},
            "machine_type": self.machine_type,
            "boot_disk_size_gb": self.boot_disk_size_gb,
            "use_spot_vms": self.use_spot_vms,
            "service_account": self.service_account,
            "max_retries": self.max_retries,
            "accelerator_type": self.accelerator_type,
            "accelerator_count": self.accelerator_count,
            "task_count": self.task_count,
            "parallelism": self.parallelism,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> JobSpec:
        ro = d.get("resource_override") or {}
        assert isinstance(ro, Mapping)
        data = dict(d)
        data["commands"] = tuple(d.get("commands") or ())  # type: ignore[call-overload,arg-type]
        data["resource_override"] = ResourceOverride(**ro)
        return cls(**data)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Lease:
    """The fencing token of an owner: every owner write is conditional on both fields."""

    worker_id: str
    version: int


@dataclass
class Job:
    """A stored job row."""

    job_id: str
    tenant_id: str
    spec: JobSpec
    status: JobStatus = JobStatus.PENDING
    request_id: str = ""
    provider: str = ""
    # The attempt number (0 for the first execution); also reported as retry_count.
    attempt: int = 0
    provider_job_id: str = ""
    cloud_resource_path: str = ""
    error_message: str = ""
    failure_class: FailureClass | None = None
    exit_code: int | None = None
    cancel_requested: bool = False
    owner_worker_id: str = ""
    lease_version: int = 0
    lease_expires_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    # Of a job of several tasks: what is known of each task, sparse and by index
    # (``jennah.tasks``); empty for a plain job.
    tasks: tuple[TaskState, ...] = ()

    @property
    def lease(self) -> Lease:
        return Lease(self.owner_worker_id, self.lease_version)


@dataclass(frozen=True)
class JobPatch:
    """Fields an owner may change in a fenced update; ``None`` leaves a field as is.

    ``clear_resource`` empties provider_job_id and cloud_resource_path. ``retry`` starts
    attempt ``attempt`` (which must be the next one): the job re-enters PENDING with its
    resource cleared and the attempt's times reset, and the store records a RETRY event.
    A move to a terminal state from below RUNNING with ``started_at`` set (the provider
    says the execution ran) is recorded as two transitions, RUNNING then the terminal
    one, in one transaction.
    """

    status: JobStatus | None = None
    attempt: int | None = None
    provider_job_id: str | None = None
    cloud_resource_path: str | None = None
    error_message: str | None = None
    failure_class: FailureClass | None = None
    exit_code: int | None = None
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    clear_resource: bool = False
    retry: bool = False
    # The job's task states, replacing the stored ones (sparse, by index).
    tasks: tuple[TaskState, ...] | None = None


@dataclass(frozen=True)
class Transition:
    """One stored state change of a job."""

    job_id: str
    from_status: JobStatus | None
    to_status: JobStatus
    at: datetime
    reason: str
    worker_id: str


@dataclass(frozen=True)
class JobEvent:
    """One event of a job.

    The store numbers every event it inserts: ``seq`` starts at 1 and is gapless within a
    job, ``position`` increases strictly in commit order within a tenant. An execution
    event handed to the store carries ``seq = position = 0`` and a ``dedup_key`` built
    from what was observed; the store inserts it only if the key is new for the job.

    OUTPUT events carry the stream name in ``message`` and their text in ``output``;
    ``offset`` and ``end`` are the byte range of that text in the stream of ``attempt``
    (in transit only: the store keeps the delivered end per stream, not per event).
    """

    job_id: str
    tenant_id: str
    seq: int
    kind: EventKind
    status: JobStatus | None
    message: str
    created_at: datetime
    worker_id: str
    output: str = ""
    position: int = 0
    attempt: int = 0
    dedup_key: str = ""
    offset: int = -1
    end: int = -1
    # The task an OUTPUT (or task STATUS_DETAIL) event of a job of several tasks is of.
    task_index: int | None = None


class Placed(StrEnum):
    """What the store did with one execution event (``append_execution_events``)."""

    STORED = "stored"
    # Already stored (same dedup key, or output the store already has).
    DUPLICATE = "duplicate"
    # Cannot go in here: output not contiguous with what the store has (a gap, or an
    # overlap cut differently), or output of an attempt that has not shown RUNNING. The
    # producer drops it and re-reads from the store's offsets.
    OUT_OF_ORDER = "out_of_order"
    # The job is gone, terminal, or on another attempt: the event is stale.
    STALE = "stale"


@dataclass(frozen=True)
class Notification:
    """A job reached a terminal state: one per job, written by the store in the
    transaction of that transition (docs/design.md §17)."""

    notification_id: str
    tenant_id: str
    job_id: str
    job_name: str
    final_status: JobStatus
    occurred_at: datetime
    error_message: str = ""
    is_read: bool = False


@dataclass(frozen=True)
class JobFilter:
    """ListJobs filters: all given conditions must hold."""

    status: JobStatus | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    name_prefix: str = ""


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    next_page_token: str


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's membership row (heartbeat into the store)."""

    worker_id: str
    endpoint: str
    heartbeat_at: datetime

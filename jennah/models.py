"""Domain types shared by the worker, the stores and the providers.

These are plain dataclasses, independent of protobuf: ``worker/convert.py`` maps them to
and from the wire messages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class JobStatus(StrEnum):
    """The job state machine (DESIGN §3). Values are the stored spelling."""

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
    """Why a job failed (DESIGN §3). Only PREEMPTED and INFRASTRUCTURE are retried."""

    USER_ERROR = "user_error"
    PREEMPTED = "preempted"
    INFRASTRUCTURE = "infrastructure"
    QUOTA = "quota"
    TIMEOUT = "timeout"

    @property
    def retryable(self) -> bool:
        return self in (FailureClass.PREEMPTED, FailureClass.INFRASTRUCTURE)


class EventKind(StrEnum):
    """Kinds of job events; the stored spelling is the name."""

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

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["commands"] = list(self.commands)
        d["env_vars"] = dict(self.env_vars)
        d["labels"] = dict(self.labels)
        return d

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
    preferred_worker_id: str = ""
    lease_version: int = 0
    lease_expires_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None

    @property
    def lease(self) -> Lease:
        return Lease(self.owner_worker_id, self.lease_version)


@dataclass(frozen=True)
class JobPatch:
    """Fields an owner may change in a fenced update; ``None`` leaves a field as is.

    ``clear_resource`` empties provider_job_id and cloud_resource_path (for a retry).
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
    """One event of a job. ``seq`` starts at 1 and increases strictly within a job."""

    job_id: str
    tenant_id: str
    seq: int
    kind: EventKind
    status: JobStatus | None
    message: str
    created_at: datetime
    worker_id: str
    output: str = ""


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

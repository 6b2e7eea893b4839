"""Mapping between domain types (``jennah.models``) and the wire messages (``jennah.v1``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from jennah.errors import InvalidArgument
from jennah.models import (
    EventKind,
    FailureClass,
    Job,
    JobEvent,
    JobSpec,
    JobStatus,
    Notification,
    ResourceOverride,
    TaskState,
    TaskStatus,
)
from jennah.tasks import job_task_counts
from jennah.v1 import deployment_pb2 as pb
from worker.validation import validate_request_id, validate_spec


# Enum values are passed to message constructors by their full names, which protobuf
# accepts and which keeps the types precise for mypy.
def status_to_pb(status: JobStatus | None) -> str:
    return f"JOB_STATUS_{status.value if status else 'UNSPECIFIED'}"


def status_from_pb(value: int) -> JobStatus | None:
    """``None`` for UNSPECIFIED; ``InvalidArgument`` for a number we do not know."""
    name = _enum_name(pb.JobStatus, "JobStatus", value)
    return None if name is None else JobStatus(name.removeprefix("JOB_STATUS_"))


def task_status_from_pb(value: int) -> TaskStatus | None:
    """``None`` for UNSPECIFIED; ``InvalidArgument`` for a number we do not know."""
    name = _enum_name(pb.TaskStatus, "TaskStatus", value)
    return None if name is None else TaskStatus(name.removeprefix("TASK_STATUS_"))


def _enum_name(enum: Any, what: str, value: int) -> str | None:
    """The name of ``value`` in a wire enum (None for its 0, UNSPECIFIED)."""
    if value == 0:
        return None
    try:
        return str(enum.Name(value))
    except ValueError:
        raise InvalidArgument(f"status {value} is not a known {what}") from None


def failure_to_pb(fc: FailureClass | None) -> str:
    return f"FAILURE_CLASS_{fc.name if fc else 'UNSPECIFIED'}"


def kind_to_pb(kind: EventKind) -> str:
    return f"EVENT_KIND_{kind.value}"


def ts(dt: datetime | None) -> Timestamp | None:
    if dt is None:
        return None
    t = Timestamp()
    t.FromDatetime(dt.astimezone(UTC))
    return t


def spec_from_request(req: pb.SubmitJobRequest) -> tuple[JobSpec, str]:
    """Validate a SubmitJobRequest into a ``JobSpec`` and its ``request_id``."""
    o = req.resource_override
    spec = validate_spec(
        image_uri=req.image_uri,
        commands=list(req.commands),
        env_vars=dict(req.env_vars),
        name=req.name,
        labels=dict(req.labels),
        resource_profile=req.resource_profile,
        override=ResourceOverride(o.cpu_millis, o.memory_mib, o.max_run_duration_seconds),
        machine_type=req.machine_type,
        boot_disk_size_gb=req.boot_disk_size_gb,
        use_spot_vms=req.use_spot_vms,
        service_account=req.service_account,
        max_retries=req.max_retries,
        accelerator_type=req.accelerator.type,
        accelerator_count=req.accelerator.count,
        task_count=req.task_count,
        parallelism=req.parallelism,
    )
    return spec, validate_request_id(req.request_id)


def job_to_pb(job: Job) -> pb.Job:
    """The wire form of a job. Env var values are write-only: only names are sent."""
    s = job.spec
    msg = pb.Job(
        job_id=job.job_id,
        tenant_id=job.tenant_id,
        name=s.name,
        status=status_to_pb(job.status),
        image_uri=s.image_uri,
        commands=list(s.commands),
        env_var_names=sorted(s.env_vars),
        labels=dict(s.labels),
        resource_profile=s.resource_profile,
        resource_override=pb.ResourceOverride(
            cpu_millis=s.resource_override.cpu_millis,
            memory_mib=s.resource_override.memory_mib,
            max_run_duration_seconds=s.resource_override.max_run_duration_seconds,
        ),
        machine_type=s.machine_type,
        boot_disk_size_gb=s.boot_disk_size_gb,
        use_spot_vms=s.use_spot_vms,
        service_account=s.service_account,
        max_retries=s.max_retries,
        accelerator=pb.Accelerator(type=s.accelerator_type, count=s.accelerator_count)
        if s.accelerator_count else None,
        retry_count=job.attempt,
        request_id=job.request_id,
        error_message=job.error_message,
        failure_class=failure_to_pb(job.failure_class),
        provider=job.provider,
        cloud_resource_path=job.cloud_resource_path,
        owner_worker_id=job.owner_worker_id,
        lease_version=job.lease_version,
        cancel_requested=job.cancel_requested,
        created_at=ts(job.created_at),
        updated_at=ts(job.updated_at),
        scheduled_at=ts(job.scheduled_at),
        started_at=ts(job.started_at),
        completed_at=ts(job.completed_at),
        lease_expires_at=ts(job.lease_expires_at),
        task_count=s.task_count,
        parallelism=s.parallelism,
    )
    counts = job_task_counts(job)
    msg.task_counts.pending = counts.pending
    msg.task_counts.running = counts.running
    msg.task_counts.succeeded = counts.succeeded
    msg.task_counts.failed = counts.failed
    msg.task_counts.cancelled = counts.cancelled
    if job.exit_code is not None:
        msg.exit_code = job.exit_code
    return msg


def task_to_pb(task: TaskState) -> pb.Task:
    msg = pb.Task(
        index=task.index,
        status=f"TASK_STATUS_{task.status.value}",
        attempt=task.attempt,
        started_at=ts(task.started_at),
        completed_at=ts(task.completed_at),
        error_message=task.error_message,
        failure_class=failure_to_pb(task.failure_class),
    )
    if task.exit_code is not None:
        msg.exit_code = task.exit_code
    return msg


def notification_to_pb(n: Notification) -> pb.Notification:
    return pb.Notification(
        id=n.notification_id,
        job_id=n.job_id,
        job_name=n.job_name,
        final_status=status_to_pb(n.final_status),
        occurred_at=ts(n.occurred_at),
        error_message=n.error_message,
        is_read=n.is_read,
    )


def event_to_pb(ev: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(
        job_id=ev.job_id,
        seq=ev.seq,
        kind=kind_to_pb(ev.kind),
        status=status_to_pb(ev.status),
        message=ev.message,
        output=ev.output,
        created_at=ts(ev.created_at),
        worker_id=ev.worker_id,
        position=ev.position,
        attempt=ev.attempt,
        task_index=ev.task_index,
    )

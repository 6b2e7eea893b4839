"""Rules and mappings shared by every store, so the backends differ only in their I/O.

The column lists below are the single source of truth for what the SQL stores write and
read; ``tests/test_schema_drift.py`` compares them with the migrated schemas. Rows cross
this module as plain dicts holding Python values (``datetime``, ``dict`` for the spec,
``str`` for enums); each backend converts those to its own column types.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from jennah.errors import Conflict, InvalidArgument, LeaseLost
from jennah.models import (
    ACTIVE_STATUSES,
    EventKind,
    FailureClass,
    Job,
    JobEvent,
    JobFilter,
    JobPatch,
    JobSpec,
    JobStatus,
    Lease,
    Transition,
    WorkerInfo,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

JOB_COLUMNS: tuple[str, ...] = (
    "job_id", "tenant_id", "spec", "status", "request_id", "provider", "attempt",
    "provider_job_id", "cloud_resource_path", "error_message", "failure_class", "exit_code",
    "cancel_requested", "owner_worker_id", "preferred_worker_id", "lease_version",
    "lease_expires_at", "last_heartbeat_at", "created_at", "updated_at", "scheduled_at",
    "started_at", "completed_at",
)  # fmt: skip
TRANSITION_COLUMNS: tuple[str, ...] = (
    "job_id", "idx", "from_status", "to_status", "at", "reason", "worker_id",
)  # fmt: skip
EVENT_COLUMNS: tuple[str, ...] = (
    "job_id", "seq", "tenant_id", "kind", "status", "message", "output", "created_at",
    "worker_id",
)  # fmt: skip
WORKER_COLUMNS: tuple[str, ...] = ("worker_id", "endpoint", "heartbeat_at")
TENANT_COLUMNS: tuple[str, ...] = ("tenant_id", "created_at")
MIGRATION_COLUMNS: tuple[str, ...] = ("name", "applied_at")

# Every table a SQL store uses, with the columns its code writes and reads.
TABLE_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "tenants": TENANT_COLUMNS,
    "jobs": JOB_COLUMNS,
    "job_transitions": TRANSITION_COLUMNS,
    "job_events": EVENT_COLUMNS,
    "workers": WORKER_COLUMNS,
    "schema_migrations": MIGRATION_COLUMNS,
}
JOB_TIME_COLUMNS = frozenset(
    {"lease_expires_at", "last_heartbeat_at", "created_at", "updated_at", "scheduled_at",
     "started_at", "completed_at"}
)  # fmt: skip
# Column names that hold a timestamp in any table (SQLite stores them as integers).
TIME_COLUMNS = JOB_TIME_COLUMNS | {"at", "heartbeat_at", "applied_at"}
ACTIVE = tuple(sorted(s.value for s in ACTIVE_STATUSES))

Row = dict[str, Any]


def utc(dt: datetime) -> datetime:
    """``dt`` as an aware UTC datetime (a naive value is taken to be UTC already)."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def to_micros(dt: datetime) -> int:
    return (utc(dt) - EPOCH) // timedelta(microseconds=1)


def from_micros(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- page tokens ----------------------------------------------------------------------


def encode_page_token(created_at: datetime, job_id: str) -> str:
    """An opaque, urlsafe token for the position after ``(created_at, job_id)``."""
    raw = json.dumps([to_micros(created_at), job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, str]:
    """The ``(created_at, job_id)`` a token encodes; ``InvalidArgument`` if undecodable."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token is not valid") from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or type(value[0]) is not int
        or not isinstance(value[1], str)
    ):
        raise InvalidArgument("page_token is not valid")
    try:
        return from_micros(value[0]), value[1]
    except OverflowError:
        raise InvalidArgument("page_token is not valid") from None


def page_token_after(jobs: list[Job]) -> str:
    last = jobs[-1]
    assert last.created_at is not None
    return encode_page_token(last.created_at, last.job_id)


def matches(job: Job, flt: JobFilter) -> bool:
    """The filter rule, for stores that filter in Python (memory)."""
    if flt.status is not None and job.status != flt.status:
        return False
    if flt.name_prefix and not job.spec.name.startswith(flt.name_prefix):
        return False
    return all(job.spec.labels.get(k) == v for k, v in flt.labels.items())


# --- rows <-> domain -------------------------------------------------------------------


def job_to_row(job: Job) -> Row:
    row: Row = {c: getattr(job, c) for c in JOB_COLUMNS}
    row["spec"] = job.spec.to_dict()
    row["status"] = job.status.value
    row["failure_class"] = job.failure_class.value if job.failure_class else None
    return row


def job_from_row(row: Mapping[str, Any]) -> Job:
    values = {c: row[c] for c in JOB_COLUMNS}
    spec = values["spec"]
    values["spec"] = JobSpec.from_dict(json.loads(spec) if isinstance(spec, str) else spec)
    values["status"] = JobStatus(values["status"])
    fc = values["failure_class"]
    values["failure_class"] = FailureClass(fc) if fc else None
    values["cancel_requested"] = bool(values["cancel_requested"])
    for c in JOB_TIME_COLUMNS:
        if values[c] is not None:
            values[c] = utc(values[c])
    return Job(**values)


def transition_from_row(row: Mapping[str, Any]) -> Transition:
    return Transition(
        job_id=row["job_id"],
        from_status=JobStatus(row["from_status"]) if row["from_status"] else None,
        to_status=JobStatus(row["to_status"]),
        at=utc(row["at"]),
        reason=row["reason"],
        worker_id=row["worker_id"],
    )


def event_to_row(event: JobEvent) -> Row:
    row: Row = {c: getattr(event, c) for c in EVENT_COLUMNS}
    row["kind"] = event.kind.value
    row["status"] = event.status.value if event.status else None
    row["created_at"] = utc(event.created_at)
    return row


def event_from_row(row: Mapping[str, Any]) -> JobEvent:
    return JobEvent(
        job_id=row["job_id"],
        tenant_id=row["tenant_id"],
        seq=int(row["seq"]),
        kind=EventKind(row["kind"]),
        status=JobStatus(row["status"]) if row["status"] else None,
        message=row["message"],
        output=row["output"],
        created_at=utc(row["created_at"]),
        worker_id=row["worker_id"],
    )


def worker_from_row(row: Mapping[str, Any]) -> WorkerInfo:
    return WorkerInfo(row["worker_id"], row["endpoint"], utc(row["heartbeat_at"]))


# --- the rules of a fenced update -------------------------------------------------------


def new_job(job: Job, now: datetime, ttl: float) -> Job:
    """What ``create_job`` stores: PENDING, version 1, a fresh lease, stamped times."""
    created = utc(job.created_at) if job.created_at else now
    return dataclasses.replace(
        job,
        status=JobStatus.PENDING,
        lease_version=1,
        lease_expires_at=now + timedelta(seconds=ttl),
        created_at=created,
        updated_at=utc(job.updated_at) if job.updated_at else now,
    )


def check_lease(job: Job | None, lease: Lease) -> Job:
    """The job if ``lease`` still holds it; ``LeaseLost`` otherwise (also when gone)."""
    if job is None:
        raise LeaseLost("job no longer exists")
    if job.owner_worker_id != lease.worker_id or job.lease_version != lease.version:
        raise LeaseLost(
            f"job {job.job_id} is held by {job.owner_worker_id!r} at version "
            f"{job.lease_version}, not {lease.worker_id!r} at {lease.version}"
        )
    return job


def apply_patch(
    job: Job, lease: Lease, patch: JobPatch, now: datetime, reason: str
) -> tuple[Job, Transition | None]:
    """The job after ``patch`` and the transition to record; ``Conflict`` for a
    backwards move. The store stamps only ``updated_at``: status times come from the
    patch, set by the caller."""
    transition = None
    changes: dict[str, Any] = {"updated_at": now}
    if patch.status is not None and patch.status != job.status:
        if not job.status.can_move_to(patch.status):
            raise Conflict(f"job {job.job_id}: {job.status.value} -> {patch.status.value}")
        changes["status"] = patch.status
        transition = Transition(job.job_id, job.status, patch.status, now, reason, lease.worker_id)
    if patch.clear_resource:
        changes["provider_job_id"] = ""
        changes["cloud_resource_path"] = ""
    for name in ("attempt", "provider_job_id", "cloud_resource_path", "error_message",
                 "failure_class", "exit_code"):  # fmt: skip
        value = getattr(patch, name)
        if value is not None:
            changes[name] = value
    for name in ("scheduled_at", "started_at", "completed_at"):
        value = getattr(patch, name)
        if value is not None:
            changes[name] = utc(value)
    return dataclasses.replace(job, **changes), transition

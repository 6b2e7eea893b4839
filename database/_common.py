"""Rules and mappings shared by every store, so the backends differ only in their I/O.

The column lists below are the single source of truth for what the SQL stores write and
read; ``tests/database/test_schema_drift.py`` compares them with the migrated schemas. Rows cross
this module as plain dicts holding Python values (``datetime``, ``dict`` for the spec,
``str`` for enums); each backend converts those to its own column types.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from jennah import tasks as task_states
from jennah.errors import (
    Conflict,
    InvalidArgument,
    LeaseLost,
    NotFound,
    StoreBusy,
    StoreError,
    StoreUnavailable,
    echoed,
)
from jennah.models import (
    ACTIVE_STATUSES,
    EVENT_FOR_STATUS,
    EventKind,
    FailureClass,
    Job,
    JobEvent,
    JobFilter,
    JobPatch,
    JobSpec,
    JobStatus,
    Lease,
    Notification,
    Placed,
    Transition,
    WorkerInfo,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

JOB_COLUMNS: tuple[str, ...] = (
    "job_id", "tenant_id", "spec", "status", "request_id", "provider", "attempt",
    "provider_job_id", "cloud_resource_path", "error_message", "failure_class", "exit_code",
    "cancel_requested", "owner_worker_id", "lease_version",
    "lease_expires_at", "last_heartbeat_at", "created_at", "updated_at", "scheduled_at",
    "started_at", "completed_at", "tasks",
)  # fmt: skip
TRANSITION_COLUMNS: tuple[str, ...] = (
    "job_id", "idx", "from_status", "to_status", "at", "reason", "worker_id",
)  # fmt: skip
EVENT_COLUMNS: tuple[str, ...] = (
    "job_id", "seq", "tenant_id", "kind", "status", "message", "output", "created_at",
    "worker_id", "position", "attempt", "dedup_key", "task_index",
)  # fmt: skip
# JobEvent fields that exist only in transit (an OUTPUT event's byte range).
EVENT_TRANSIT_FIELDS = frozenset({"offset", "end"})
WORKER_COLUMNS: tuple[str, ...] = ("worker_id", "endpoint", "heartbeat_at")
# event_position: the last position handed out to the tenant's events.
TENANT_COLUMNS: tuple[str, ...] = ("tenant_id", "created_at", "event_position")
# How far each output stream of each execution has been delivered (bytes).
OUTPUT_COLUMNS: tuple[str, ...] = ("job_id", "attempt", "task_index", "stream", "delivered_end")
MIGRATION_COLUMNS: tuple[str, ...] = ("name", "applied_at")
# One per job that reached a terminal state (``terminal_notification``).
NOTIFICATION_COLUMNS: tuple[str, ...] = (
    "notification_id", "tenant_id", "job_id", "job_name", "final_status", "occurred_at",
    "error_message", "is_read",
)  # fmt: skip

# Every table a SQL store uses, with the columns its code writes and reads. ``jobs`` has
# columns beyond the Job fields: ``event_seq``, the last seq given to its events,
# ``transition_seq``, the last idx given to its transitions, and the legacy column below.
# Stored by earlier releases and never used: no longer read or written (its DEFAULT ''
# fills it), kept while workers of an earlier release may still write it during a rolling
# upgrade; a later migration drops it.
LEGACY_JOB_COLUMNS: tuple[str, ...] = ("preferred_worker_id",)
TABLE_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "tenants": TENANT_COLUMNS,
    "jobs": (*JOB_COLUMNS, "event_seq", "transition_seq", *LEGACY_JOB_COLUMNS),
    "job_transitions": TRANSITION_COLUMNS,
    "job_events": EVENT_COLUMNS,
    "job_output": OUTPUT_COLUMNS,
    "workers": WORKER_COLUMNS,
    "notifications": NOTIFICATION_COLUMNS,
    "schema_migrations": MIGRATION_COLUMNS,
}
JOB_TIME_COLUMNS = frozenset(
    {"lease_expires_at", "last_heartbeat_at", "created_at", "updated_at", "scheduled_at",
     "started_at", "completed_at"}
)  # fmt: skip
# Column names that hold a timestamp in any table (SQLite stores them as integers).
TIME_COLUMNS = JOB_TIME_COLUMNS | {"at", "heartbeat_at", "applied_at", "occurred_at"}
ACTIVE = tuple(sorted(s.value for s in ACTIVE_STATUSES))

Row = dict[str, Any]
# (attempt, task_index, stream) of one output stream of one execution.
OutputKey = tuple[int, int, str]


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


# A job id is a UUID (36 characters); a token holds one and a timestamp.
MAX_JOB_ID_CHARS = 128
MAX_PAGE_TOKEN_CHARS = 512


def encode_page_token(created_at: datetime, job_id: str) -> str:
    """An opaque, urlsafe token for the position after ``(created_at, job_id)``."""
    raw = json.dumps([to_micros(created_at), job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, str]:
    """The ``(created_at, job_id)`` a token encodes. The token comes from a client, so
    every way it can be wrong (bad base64, bad UTF-8, JSON nested thousands deep, a NUL
    byte or an overlong id) is ``InvalidArgument``, never a store error."""
    bad = InvalidArgument("page_token is not valid")
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise bad from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or type(value[0]) is not int
        or not isinstance(value[1], str)
        or "\x00" in value[1]
        or len(value[1]) > MAX_JOB_ID_CHARS
    ):
        raise bad
    try:
        return from_micros(value[0]), value[1]
    except (OverflowError, ValueError, OSError):
        raise bad from None


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


def job_to_row(job: Job, with_spec: bool = True) -> Row:
    """The row of ``job``; without ``with_spec`` the spec is left out (updates never
    write it: it is immutable). ``tasks`` is the stored form of ``jennah.tasks.encode``
    (None for a job without task states: a plain job pays nothing for it)."""
    row: Row = {c: getattr(job, c) for c in JOB_COLUMNS}
    row["spec"] = job.spec.to_dict() if with_spec else None
    row["status"] = job.status.value
    row["failure_class"] = job.failure_class.value if job.failure_class else None
    row["tasks"] = task_states.encode(job.tasks) if job.tasks else None
    return row


def column_value(column: str, value: Any) -> Any:
    """One Job attribute as ``job_to_row`` stores it (enums by value, tasks encoded)."""
    if column == "tasks":
        return task_states.encode(value) if value else None
    if column in ("status", "failure_class") and value is not None:
        return value.value
    return value


def job_from_row(row: Mapping[str, Any]) -> Job:
    values = {c: row[c] for c in JOB_COLUMNS}
    spec = values["spec"]
    values["spec"] = JobSpec.from_dict(json.loads(spec) if isinstance(spec, str) else spec)
    values["status"] = JobStatus(values["status"])
    fc = values["failure_class"]
    values["failure_class"] = FailureClass(fc) if fc else None
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["tasks"] = task_states.decode(values["tasks"]) if values["tasks"] else ()
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
        position=int(row["position"] or 0),
        attempt=int(row["attempt"] or 0),
        dedup_key=row["dedup_key"] or "",
        task_index=None if row["task_index"] is None else int(row["task_index"]),
    )


def worker_from_row(row: Mapping[str, Any]) -> WorkerInfo:
    return WorkerInfo(row["worker_id"], row["endpoint"], utc(row["heartbeat_at"]))


def notification_to_row(n: Notification) -> Row:
    row: Row = {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}
    row["final_status"] = n.final_status.value
    return row


def notification_from_row(row: Mapping[str, Any]) -> Notification:
    return Notification(
        notification_id=row["notification_id"],
        tenant_id=row["tenant_id"],
        job_id=row["job_id"],
        job_name=row["job_name"],
        final_status=JobStatus(row["final_status"]),
        occurred_at=utc(row["occurred_at"]),
        error_message=row["error_message"] or "",
        is_read=bool(row["is_read"]),
    )


# --- the rules of a fenced update -------------------------------------------------------


def evolve(job: Job, **changes: Any) -> Job:
    """A copy of ``job`` with ``changes``: ``dataclasses.replace`` without its re-run of
    ``__init__`` (six of them per submit were a tenth of the store's CPU)."""
    out = copy.copy(job)
    for name, value in changes.items():
        setattr(out, name, value)
    return out


def new_job(job: Job, now: datetime, ttl: float) -> Job:
    """What ``create_job`` stores: PENDING, version 1, a fresh lease, stamped times."""
    created = utc(job.created_at) if job.created_at else now
    return evolve(
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


def lifecycle_event(
    job: Job, kind: EventKind, message: str, now: datetime, worker_id: str,
    status: JobStatus | None = None,
) -> JobEvent:
    """A lifecycle event of ``job`` (as it is after the change; ``status`` when that is
    not the job's), not yet numbered."""
    return JobEvent(job_id=job.job_id, tenant_id=job.tenant_id, seq=0, kind=kind,
                    status=status or job.status, message=message, created_at=now,
                    worker_id=worker_id, attempt=job.attempt)  # fmt: skip


def created(job: Job, now: datetime) -> tuple[Transition, JobEvent]:
    """The first transition (None -> PENDING) and the SUBMITTED event of a new job."""
    return (Transition(job.job_id, None, job.status, now, "created", job.owner_worker_id),
            lifecycle_event(job, EventKind.SUBMITTED, "job submitted", now,
                            job.owner_worker_id))  # fmt: skip


def claimed_event(job: Job, previous_owner: str, now: datetime) -> JobEvent:
    """LEASE_CLAIMED for ``job`` just claimed (its owner is the claimer)."""
    return lifecycle_event(
        job, EventKind.LEASE_CLAIMED,
        f"claimed from {previous_owner or 'nobody'} at lease version {job.lease_version}",
        now, job.owner_worker_id,
    )  # fmt: skip


def apply_patch(
    job: Job, lease: Lease, patch: JobPatch, now: datetime, reason: str
) -> tuple[Job, list[Transition], list[JobEvent]]:
    """The job after ``patch``, the transitions to record and their lifecycle events
    (one per transition, not yet numbered); ``Conflict`` for a backwards move. The store
    stamps only ``updated_at``: status times come from the patch, set by the caller.
    Task states in the patch replace the job's whole, in their canonical form
    (``jennah.tasks.normalize``), so that the job returned equals the job read back."""
    if patch.retry:
        return _retry(job, lease, patch, now, reason)
    if patch.status is not None and patch.status is job.status and job.status.terminal:
        # A second end (a cancel racing the poller's own look at the provider): the first
        # stands, with its times and message, and nothing is recorded twice.
        raise Conflict(f"job {job.job_id} has already ended as {job.status.value}")
    steps: list[JobStatus] = []
    if patch.status is not None and patch.status != job.status:
        if not job.status.can_move_to(patch.status):
            raise Conflict(f"job {job.job_id}: {job.status.value} -> {patch.status.value}")
        ran = patch.started_at is not None and patch.status.terminal
        if ran and job.status.rank < JobStatus.RUNNING.rank:
            steps.append(JobStatus.RUNNING)  # it ran, though no poll saw it running
        steps.append(patch.status)
    changes: dict[str, Any] = {"updated_at": now}
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
    if patch.tasks is not None:
        changes["tasks"] = task_states.normalize(patch.tasks)
    updated = evolve(job, **changes)
    transitions: list[Transition] = []
    events: list[JobEvent] = []
    before = job.status
    for status in steps:
        message = reason if status == steps[-1] else "started (seen by the provider)"
        transitions.append(Transition(job.job_id, before, status, now, message, lease.worker_id))
        events.append(lifecycle_event(updated, EVENT_FOR_STATUS[status], message, now,
                                      lease.worker_id, status))  # fmt: skip
        before = status
    if steps:
        updated.status = steps[-1]
    return updated, transitions, events


def _retry(
    job: Job, lease: Lease, patch: JobPatch, now: datetime, reason: str
) -> tuple[Job, list[Transition], list[JobEvent]]:
    """The next attempt: back to PENDING, resource cleared, one transition, RETRY."""
    if job.status.terminal:
        raise Conflict(f"job {job.job_id} is {job.status.value}: no retry")
    if patch.attempt != job.attempt + 1:
        raise Conflict(f"job {job.job_id}: retry must start attempt {job.attempt + 1}")
    # The times are the current attempt's: a retry starts them afresh (scheduled_at and
    # started_at are set again as the new attempt enters those states).
    updated = evolve(
        job, status=JobStatus.PENDING, attempt=job.attempt + 1, provider_job_id="",
        cloud_resource_path="", updated_at=now, scheduled_at=None, started_at=None,
    )  # fmt: skip
    if patch.tasks is not None:
        updated.tasks = task_states.normalize(patch.tasks)
    t = Transition(job.job_id, job.status, JobStatus.PENDING, now, reason, lease.worker_id)
    return updated, [t], [lifecycle_event(updated, EventKind.RETRY, reason, now,
                                          lease.worker_id)]  # fmt: skip


# --- notifications ------------------------------------------------------------------------

# A notification's id is derived from its job's id: a job has at most one, so every
# store's primary key enforces "one per job" once more, and deleting a job finds its
# notification by key, with no index on job_id.
_NOTIFICATION_NAMESPACE = uuid.UUID("5c1e0a57-3f0d-4b8e-9d43-2a8f6b1c7e90")


def notification_id(job_id: str) -> str:
    return str(uuid.uuid5(_NOTIFICATION_NAMESPACE, job_id))


def notification_not_found(notification_id: str) -> NotFound:
    """An unknown notification id, or another tenant's (told apart by nothing)."""
    return NotFound(f"notification {echoed(notification_id)} not found")


def terminal_notification(before: Job, after: Job, now: datetime) -> Notification | None:
    """The notification for an update from ``before`` to ``after`` at ``now``: one when
    the job moved into a terminal state, None otherwise (a terminal job never moves
    again, so a job gets at most one). A completed job's notification carries no error
    message (a message left by an earlier attempt is not the outcome)."""
    if before.status.terminal or not after.status.terminal:
        return None
    return Notification(
        notification_id=notification_id(after.job_id), tenant_id=after.tenant_id,
        job_id=after.job_id, job_name=after.spec.name, final_status=after.status,
        occurred_at=now,
        error_message="" if after.status is JobStatus.COMPLETED else after.error_message,
    )  # fmt: skip


# --- group commit -----------------------------------------------------------------------


def together_or_one_by_one(
    run: Callable[[Sequence[Any]], list[Any]], ops: Sequence[Any]
) -> list[Any]:
    """``run(ops)`` (one transaction); if that transaction fails as a whole for another
    reason than the store being down or busy, each op runs in a transaction of its own,
    with its error in its slot, so that one op cannot fail the others. (Running a batch
    refused for a busy store one op at a time would only queue it again, once per op.)"""
    try:
        return run(ops)
    except (StoreUnavailable, StoreBusy):
        raise
    except StoreError:
        if len(ops) == 1:
            raise
    results: list[Any] = []
    for op in ops:
        try:
            results += run([op])
        except (StoreUnavailable, StoreBusy):
            raise
        except StoreError as exc:
            results.append(exc)
    return results


# --- execution events -------------------------------------------------------------------


def output_key(event: JobEvent) -> OutputKey:
    """The output stream an OUTPUT event belongs to: each task of each attempt has its
    own streams, placed independently (a plain job's one task is task 0)."""
    return (event.attempt, event.task_index or 0, event.message)


def place(
    job: Job | None,
    event: JobEvent,
    cursors: dict[OutputKey, int],
    seen_keys: set[str],
    *,
    legacy: bool = False,
) -> Placed:
    """Where an execution event goes (docs/design.md §6 order rules), given the job row, the
    delivered output ends and the dedup keys the job already has. On STORED the caller
    inserts it; ``cursors`` and ``seen_keys`` are updated here.

    ``legacy`` is the v1 upgrade: events of any kind, appended at the end of the stream
    as they were in the v1 log; only their dedup key decides.
    """
    if job is None or job.tenant_id != event.tenant_id:
        return Placed.STALE
    if legacy:
        if event.dedup_key in seen_keys:
            return Placed.DUPLICATE
        if event.kind is EventKind.OUTPUT:
            key = output_key(event)
            cursors[key] = cursors.get(key, 0) + len(event.output.encode())
        seen_keys.add(event.dedup_key)
        return Placed.STORED
    if job.status.terminal or event.attempt != job.attempt:
        return Placed.STALE
    # Output is placed by its byte range (a resend with the same start but cut longer
    # overlaps what is stored: OUT_OF_ORDER, not a duplicate); other events by their key.
    if event.kind is not EventKind.OUTPUT and event.dedup_key in seen_keys:
        return Placed.DUPLICATE
    if event.kind is EventKind.OUTPUT:
        if job.status is not JobStatus.RUNNING:
            return Placed.OUT_OF_ORDER  # RUNNING of this attempt comes first
        key = output_key(event)
        have = cursors.get(key, 0)
        if event.end <= have:
            return Placed.DUPLICATE
        if event.offset != have:
            return Placed.OUT_OF_ORDER  # a gap, or an overlap cut differently
        cursors[key] = event.end
    if event.dedup_key:
        seen_keys.add(event.dedup_key)
    return Placed.STORED


def output_dedup_key(attempt: int, task_index: int, stream: str, offset: int) -> str:
    return f"out:{attempt}:{task_index}:{stream}:{offset}"


# --- the v1 upgrade -----------------------------------------------------------------------


def renumber_v1(events: list[JobEvent]) -> tuple[list[JobEvent], dict[OutputKey, int]]:
    """One job's v1 events (v1 ``seq`` order) as v2 events: ``seq`` 1..n gapless, the
    ``attempt`` counted from RETRY events, dedup key ``v1:<old seq>`` (so that a v1 log
    delivering the same event later is recognised), and the delivered output ends that
    their OUTPUT text implies. Positions are left for the caller to assign."""
    out: list[JobEvent] = []
    cursors: dict[OutputKey, int] = {}
    attempt = 0
    for n, ev in enumerate(sorted(events, key=lambda e: e.seq), start=1):
        if ev.kind is EventKind.RETRY:
            attempt += 1
        new = dataclasses.replace(ev, seq=n, attempt=attempt, dedup_key=f"v1:{ev.seq}")
        if ev.kind is EventKind.OUTPUT:
            key = output_key(new)
            cursors[key] = cursors.get(key, 0) + len(ev.output.encode())
        out.append(new)
    return out, cursors

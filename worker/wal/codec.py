"""Record payloads: execution events to ``jennah.v1.WalEvent`` protobufs and back.

An event record's kind byte is the ``EventKind`` protobuf number. A v2 payload is a
``WalEvent``: the event as observed (seq and position 0), its tenant, dedup key and, for
output, its byte range. The v1 per-execution logs (read only by the upgrade) held a bare
``jennah.v1.JobEvent`` per record, after a META record (a ``jennah.v1.Job`` carrying the
job's identity); ``event_from_payload`` and ``meta_from_payload`` decode those.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import DecodeError

from jennah.models import EventKind, JobEvent, JobStatus
from jennah.v1 import deployment_pb2 as pb
from jennah.v1 import wal_pb2
from worker.wal.format import KIND_CHECKPOINT, KIND_META, WalError


class PayloadError(WalError):
    """A record passed its CRC but its payload does not decode (a foreign writer)."""


@dataclass(frozen=True)
class Meta:
    job_id: str
    tenant_id: str
    attempt: int
    worker_id: str
    lease_version: int


def kind_byte(kind: EventKind) -> int:
    return int(pb.EventKind.Value(f"EVENT_KIND_{kind.value}"))


_KINDS = {kind_byte(k): k for k in EventKind}


def kind_name(value: int) -> str:
    """A record kind for humans (``wal inspect``)."""
    if value == KIND_META:
        return "META"
    if value == KIND_CHECKPOINT:
        return "CHECKPOINT"
    kind = _KINDS.get(value)
    return kind.value if kind else f"UNKNOWN({value})"


def unix_ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _event_msg(ev: JobEvent) -> pb.JobEvent:
    msg = pb.JobEvent(
        job_id=ev.job_id,
        seq=ev.seq,
        kind=pb.EventKind.Value(f"EVENT_KIND_{ev.kind.value}"),
        status=pb.JobStatus.Value(f"JOB_STATUS_{ev.status.value}")
        if ev.status is not None
        else pb.JOB_STATUS_UNSPECIFIED,
        message=ev.message,
        output=ev.output,
        worker_id=ev.worker_id,
        attempt=ev.attempt,
    )
    msg.created_at.FromDatetime(ev.created_at.astimezone(UTC))
    return msg


def event_payload(ev: JobEvent) -> bytes:
    """A v1 payload: the bare ``JobEvent`` (tests and tools build v1 logs with it)."""
    data: bytes = _event_msg(ev).SerializeToString()
    return data


def wal_payload(ev: JobEvent) -> bytes:
    """The v2 payload of an execution event."""
    msg = wal_pb2.WalEvent(event=_event_msg(ev), tenant_id=ev.tenant_id,
                           dedup_key=ev.dedup_key, offset=ev.offset, end=ev.end)  # fmt: skip
    data: bytes = msg.SerializeToString()
    return data


def wal_event(payload: bytes) -> JobEvent:
    """The execution event in a v2 record; ``PayloadError`` if it does not decode."""
    try:
        msg = wal_pb2.WalEvent.FromString(payload)
    except DecodeError as e:
        raise PayloadError(f"undecodable event payload: {e}") from e
    ev = _event(msg.event, msg.tenant_id)
    return JobEvent(
        job_id=ev.job_id, tenant_id=ev.tenant_id, seq=0, kind=ev.kind, status=ev.status,
        message=ev.message, created_at=ev.created_at, worker_id=ev.worker_id,
        output=ev.output, attempt=ev.attempt, dedup_key=msg.dedup_key, offset=msg.offset,
        end=msg.end,
    )  # fmt: skip


def event_from_payload(payload: bytes, tenant_id: str) -> JobEvent:
    """The event in a v1 record; ``PayloadError`` if it does not decode."""
    try:
        msg = pb.JobEvent.FromString(payload)
    except DecodeError as e:
        raise PayloadError(f"undecodable event payload: {e}") from e
    return _event(msg, tenant_id)


def _event(msg: pb.JobEvent, tenant_id: str) -> JobEvent:
    try:
        kind = _KINDS[msg.kind]
        status = (
            None
            if msg.status == pb.JOB_STATUS_UNSPECIFIED
            else JobStatus(pb.JobStatus.Name(msg.status).removeprefix("JOB_STATUS_"))
        )
    except (KeyError, ValueError) as e:
        raise PayloadError(f"undecodable event payload: {e}") from e
    return JobEvent(
        job_id=msg.job_id,
        tenant_id=tenant_id,
        seq=msg.seq,
        kind=kind,
        status=status,
        message=msg.message,
        created_at=msg.created_at.ToDatetime(tzinfo=UTC),
        worker_id=msg.worker_id,
        output=msg.output,
        attempt=msg.attempt,
    )


def meta_payload(meta: Meta) -> bytes:
    msg = pb.Job(
        job_id=meta.job_id,
        tenant_id=meta.tenant_id,
        retry_count=meta.attempt,
        owner_worker_id=meta.worker_id,
        lease_version=meta.lease_version,
    )
    data: bytes = msg.SerializeToString()
    return data


def meta_from_payload(payload: bytes) -> Meta:
    try:
        msg = pb.Job.FromString(payload)
    except DecodeError as e:
        raise PayloadError(f"undecodable META payload: {e}") from e
    return Meta(msg.job_id, msg.tenant_id, msg.retry_count, msg.owner_worker_id, msg.lease_version)

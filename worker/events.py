"""The event log port, and the sequence-number scheme every implementation follows.

Every job event is made durable by ``EventLog.emit`` before the caller goes on.

**Sequence numbers.** ``seq`` must increase strictly within a job, across owners, without
the new owner of a job having to know what the old owner's log still holds. Each owner
therefore numbers its events inside a block keyed by its lease version::

    seq = (lease_version - 1) * SEQ_BLOCK + n        n = 1, 2, 3, ...

A job's first owner (lease version 1) emits 1, 2, 3, ...; whoever claims it next (version
2, 3, ...) starts at the next block, so it can never collide with an event the old
owner's log still has to deliver, and the store's idempotent ``(job_id, seq)`` key never
drops a real event as a duplicate.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from jennah.models import EventKind, Job, JobEvent, JobStatus

SEQ_BLOCK = 1 << 32


def first_seq(lease_version: int) -> int:
    """The first sequence number an owner at ``lease_version`` may use."""
    return (max(lease_version, 1) - 1) * SEQ_BLOCK + 1


class EventLog(Protocol):
    """Durable, ordered job events: WAL first, then delivery to the store's event table."""

    async def start(self) -> None:
        """Resume delivery of anything left undelivered by an earlier run."""
        ...

    async def adopt(
        self, job_ids: Collection[str], from_worker: str | None = None
    ) -> list[str]:
        """Take over undelivered events of ``job_ids`` (just claimed) that another worker
        left behind on a shared disk; return the logs adopted."""
        ...

    async def emit(
        self,
        job: Job,
        kind: EventKind,
        status: JobStatus | None,
        message: str = "",
        output: str = "",
    ) -> JobEvent:
        """Assign the next ``seq`` for ``job`` (under ``job.lease_version``), make the event
        durable and return it. Delivery to the store may happen later (at least once)."""
        ...

    async def job_finished(self, job: Job) -> None:
        """The job is terminal (or no longer ours): flush its events, then archive."""
        ...

    async def flush(self, timeout: float) -> bool:
        """Wait until every event emitted so far is delivered; False on timeout."""
        ...

    async def close(self) -> None:
        """Flush what can be flushed and stop background work."""
        ...

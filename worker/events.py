"""The execution-event port: what an owner observes while an execution runs.

docs/design.md §6 splits events in two. *Lifecycle* events are written by the store in the
transaction of the transition they report (``worker/jobs.py`` never writes them
itself). *Execution* events (OUTPUT, STATUS_DETAIL) are observations: they go through an
``ExecutionLog``, which makes them durable locally (the worker's WAL) and delivers them
to the store, where their dedup keys make delivery exactly once.

The poller relies on three promises:

* ``append`` returns only once the events are durable; if it raises, nothing of them is
  acknowledged, and the poller keeps its output offsets and reads the same bytes again.
* Output the store refuses as out of order (another producer cut it differently, or a
  WAL was lost) is dropped, and the job is reported by ``take_resync``: the poller then
  reloads the job's offsets from the store and reads on from there.
* ``flush_job`` waits until every event of the job is in the store, so the poller can
  record the terminal transition after all of the job's output (the terminal event is
  last).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from database.base import OutputOffsets
from jennah.models import JobEvent


class ExecutionLog(Protocol):
    """Durable, exactly-once delivery of execution events to the store."""

    @property
    def ready(self) -> bool:
        """False until start-up work the poller must wait for is done (the upgrade of
        v1 logs: their events go in before any new ones)."""
        ...

    async def start(self) -> None:
        """Recover and resume delivery of anything left undelivered by an earlier run."""
        ...

    async def append(self, events: Sequence[JobEvent]) -> None:
        """Make ``events`` (not numbered; with dedup keys) durable and queue them for
        delivery; ``WalError`` when they could not be made durable."""
        ...

    def pending_ends(self, job_id: str) -> OutputOffsets:
        """For each output stream of the job: the end of the output durable here but not
        yet in the store (empty when everything was delivered)."""
        ...

    def take_resync(self) -> set[str]:
        """Jobs whose output the store refused as out of order since the last call."""
        ...

    async def flush_job(self, job_id: str, timeout: float) -> bool:
        """True once every event of the job appended so far is in the store."""
        ...

    async def flush(self, timeout: float) -> bool:
        """True once every event appended so far is in the store."""
        ...

    async def health(self) -> tuple[bool, str]:
        """``(False, why)`` while appends fail (a full disk); for ``/ready``."""
        ...

    async def close(self) -> None:
        """Flush what can be flushed (bounded) and stop background work."""
        ...

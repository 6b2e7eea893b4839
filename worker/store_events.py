"""An ``ExecutionLog`` that writes each event straight to the store (no WAL).

For the domain tests and ``DB_PROVIDER=memory``, where a local WAL would protect nothing:
``append`` returns once the store has placed the events, so they are durable exactly when
the store is.
"""

from __future__ import annotations

from collections.abc import Sequence

from database.base import OutputOffsets
from jennah.models import JobEvent, Placed
from worker.commit import GroupCommitter


class StoreExecutionLog:
    """Execution events through the group committer, synchronously."""

    def __init__(self, committer: GroupCommitter) -> None:
        self._committer = committer
        self._resync: set[str] = set()

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def append(self, events: Sequence[JobEvent]) -> None:
        placed = await self._committer.append(events)
        self._resync |= {ev.job_id for p, ev in placed if p is Placed.OUT_OF_ORDER}

    def pending_ends(self, job_id: str) -> OutputOffsets:
        return {}

    def take_resync(self) -> set[str]:
        out, self._resync = self._resync, set()
        return out

    async def flush_job(self, job_id: str, timeout: float) -> bool:
        # Output refused as out of order must be read again (take_resync) before the end.
        return job_id not in self._resync

    async def flush(self, timeout: float) -> bool:
        return True

    async def health(self) -> tuple[bool, str]:
        return True, "events go straight to the store"

    async def close(self) -> None:
        return None

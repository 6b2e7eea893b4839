"""An ``EventLog`` that writes each event straight to the store's event table.

It is the fallback used where no WAL directory is configured (tests of the domain, and
``DB_PROVIDER=memory``); production workers use ``worker.wal`` so that an event is durable
on local disk even while the store is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from datetime import datetime

import anyio.to_thread

from database.base import JobStore
from jennah.models import EventKind, Job, JobEvent, JobStatus
from worker.events import SEQ_BLOCK, first_seq


class StoreEventLog:
    """Events numbered per ``worker.events`` and appended synchronously to the store."""

    def __init__(self, store: JobStore, worker_id: str, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._worker_id = worker_id
        self._clock = clock
        # (job_id, lease_version) -> last seq used.
        self._last: dict[tuple[str, int], int] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        return None

    async def adopt(
        self, job_ids: Collection[str], from_worker: str | None = None
    ) -> list[str]:
        return []  # nothing is ever left undelivered: each emit writes to the store

    async def _next_seq(self, job: Job) -> int:
        key = (job.job_id, job.lease_version)
        if key not in self._last:
            start = first_seq(job.lease_version)
            existing = await anyio.to_thread.run_sync(
                self._store.list_events, job.tenant_id, job.job_id, start - 1, SEQ_BLOCK
            )
            in_block = [e.seq for e in existing if e.seq < start + SEQ_BLOCK]
            self._last[key] = max(in_block, default=start - 1)
        self._last[key] += 1
        return self._last[key]

    async def emit(
        self,
        job: Job,
        kind: EventKind,
        status: JobStatus | None,
        message: str = "",
        output: str = "",
    ) -> JobEvent:
        async with self._lock:
            event = JobEvent(
                job_id=job.job_id,
                tenant_id=job.tenant_id,
                seq=await self._next_seq(job),
                kind=kind,
                status=status,
                message=message,
                output=output,
                created_at=self._clock(),
                worker_id=self._worker_id,
            )
            await anyio.to_thread.run_sync(self._store.append_events, [event])
        return event

    async def job_finished(self, job: Job) -> None:
        for key in [k for k in self._last if k[0] == job.job_id]:
            del self._last[key]

    async def flush(self, timeout: float) -> bool:
        return True

    async def close(self) -> None:
        self._last.clear()

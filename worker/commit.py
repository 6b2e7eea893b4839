"""Store group commit for one worker: the writes waiting at the same moment share a commit.

Every job write of the worker (creates, fenced updates, execution events from the WAL
sender) is queued here by an asyncio task and awaited. One writer thread takes whatever
is queued, up to ``max_batch`` ops, and runs it as one ``JobStore.write_batch`` (one
transaction, one fsync); meanwhile the next batch fills. So 32 concurrent submits cost a
few commits, not 32, and the event loop hands work to a thread once per batch instead of
once per call.

A caller that is cancelled (its client went away, its deadline passed) stops waiting,
but its write still runs: a write is never half done because a call was cancelled.

The writer thread is a lane of its own (``jennah.blocking``), one per committer, made with
``abandon_on_cancel``: callers never wait on the lane itself but on their own futures, and
if the draining task is cancelled (the loop shuts down) it stops at once while a batch
already started finishes in the thread, as with a plain executor.

After each batch, ``notify`` is told which tenants got new events, so this worker's
watchers wake at once (docs/design.md §6 "Watching").
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from database.base import AppendEvents, CreateJob, JobStore, UpdateJob, WriteOp, WriteResult
from jennah.blocking import Lane
from jennah.errors import JennahError
from jennah.models import EventKind, Job, JobEvent, JobPatch, Lease, Placed

log = logging.getLogger("jennah.worker.commit")

MAX_BATCH = 256


@dataclass
class _Waiting:
    op: WriteOp
    future: asyncio.Future[WriteResult]
    context: contextvars.Context


class GroupCommitter:
    """Queues store writes and runs them in shared transactions, one batch at a time."""

    def __init__(
        self,
        store: JobStore,
        *,
        notify: Callable[[set[str]], None] | None = None,
        on_stored: Callable[[EventKind, int], None] | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.store = store
        self._notify = notify
        self._max_batch = max_batch
        self._queue: list[_Waiting] = []
        self._running: asyncio.Task[None] | None = None
        self._lane = Lane("jennah-commit", 1, abandon_on_cancel=True)
        self.batches = 0
        self.ops = 0
        # Told of the execution events each batch stored, by kind (metrics).
        self.on_stored = on_stored

    async def create(self, job: Job, lease_ttl: float) -> tuple[Job, bool]:
        return cast(tuple[Job, bool], await self.run(CreateJob(job, lease_ttl)))

    async def update(self, job: Job, lease: Lease, patch: JobPatch, reason: str) -> Job:
        """A fenced update of ``job`` (the caller's copy: see ``UpdateJob.expected``)."""
        return cast(Job, await self.run(UpdateJob(job.job_id, lease, patch, reason, job)))

    async def append(
        self, events: Sequence[JobEvent], legacy: bool = False
    ) -> list[tuple[Placed, JobEvent]]:
        result = cast(list[tuple[Placed, JobEvent]],
                      await self.run(AppendEvents(tuple(events), legacy)))  # fmt: skip
        if self.on_stored is not None:
            for kind in {ev.kind for placed, ev in result if placed is Placed.STORED}:
                self.on_stored(kind, sum(ev.kind is kind for p, ev in result
                                         if p is Placed.STORED))  # fmt: skip
        return result

    async def deliver(
        self, events: Sequence[JobEvent], legacy: bool = False
    ) -> list[tuple[Placed, JobEvent]]:
        """``EventSink.deliver`` (``worker.wal.sender``): the WAL sender's batches join the
        same commits as everything else."""
        return await self.append(events, legacy)

    async def run(self, op: WriteOp) -> WriteResult:
        """Queue ``op`` for the next batch and return its result (or raise its error)."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(op, loop.create_future(), contextvars.copy_context())
        self._queue.append(waiting)
        if self._running is None:
            self._running = loop.create_task(self._drain())
        # No shield: a cancelled caller cancels its future, and _drain, which skips done
        # futures, still runs the op (the write is never left half done or undone).
        result = await waiting.future
        if isinstance(result, JennahError):
            raise result
        return result

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, self._queue = (self._queue[: self._max_batch],
                                      self._queue[self._max_batch :])  # fmt: skip
                ops = [w.op for w in batch]
                try:
                    # The first op's context: its trace span and log fields cover the batch.
                    results = await self._lane.run(
                        batch[0].context.run, self.store.write_batch, ops)
                except Exception as exc:  # the transaction failed: every op with it
                    for w in batch:
                        if not w.future.done():
                            w.future.set_exception(exc)
                    continue
                self.batches += 1
                self.ops += len(ops)
                for w, result in zip(batch, results, strict=True):
                    if not w.future.done():
                        w.future.set_result(result)
                self._tell(ops, results)
        finally:
            self._running = None
            if self._queue:  # cancelled with work left (shutdown): do not strand it
                self._running = loop.create_task(self._drain())

    def _tell(self, ops: Sequence[WriteOp], results: Sequence[WriteResult]) -> None:
        if self._notify is None:
            return
        tenants: set[str] = set()
        for op, result in zip(ops, results, strict=True):
            if isinstance(result, JennahError):
                continue
            if isinstance(op, CreateJob):
                tenants.add(op.job.tenant_id)
            elif isinstance(op, UpdateJob):
                tenants.add(cast(Job, result).tenant_id)
            else:
                tenants.update(ev.tenant_id for placed, ev in
                               cast(list[tuple[Placed, JobEvent]], result)
                               if placed is Placed.STORED)  # fmt: skip
        if tenants:
            self._notify(tenants)

    async def close(self) -> None:
        """Wait for the writes already queued, then stop the writer thread."""
        while self._running is not None:
            await asyncio.wait({self._running})
        self._lane.shutdown()

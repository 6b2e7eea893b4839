"""The poller drives every job this worker owns to a terminal state.

Each cycle reads the worker's owned active jobs from the store (the store, not memory, is
the truth: a lease lost to a peer simply drops out of the list), then:

* a job marked ``cancel_requested`` is cancelled at the provider and recorded CANCELLED;
* a job without a resource path (a crash between recording and submitting, a deferred
  submit, or a job just claimed from a dead peer) is submitted again under the same
  deterministic provider id, which the provider dedupes;
* every other job's status is fetched in provider-sized batches and applied, forward only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import anyio

from jennah.errors import JennahError, LeaseLost
from jennah.models import EventKind, Job
from providers.base import ProviderStatus
from worker.jobs import JobService, blocking

log = logging.getLogger("jennah.worker.poller")

# Jobs a cycle works on at once (their store writes and event fsyncs overlap).
APPLY_CONCURRENCY = 16


class Poller:
    """Polls owned jobs every ``interval`` seconds."""

    def __init__(self, jobs: JobService, interval: float) -> None:
        self.jobs = jobs
        self.interval = interval
        self.last_cycle_seconds = 0.0
        self.cycles = 0
        # Active owned jobs by status at the last cycle, and a per-cycle hook
        # (seconds, ok), both for the worker's metrics (worker/metrics.py).
        self.owned_by_status: dict[str, int] = {}
        self.on_cycle: Callable[[float, bool], None] | None = None
        # Output offsets per provider job (stdout, stderr), for providers that stream output.
        self._offsets: dict[str, tuple[int, int]] = {}
        # The provider's last raw state per job, to report changes that map to no new status
        # (GCP QUEUED -> SCHEDULED are both SCHEDULED) as STATUS_DETAIL events.
        self._raw: dict[str, str] = {}

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            ok = False
            try:
                await self.cycle()
                ok = True
            except JennahError as exc:  # store or provider down: try again next cycle
                log.warning("poll cycle failed: %s", exc)
            except Exception:
                log.exception("poll cycle crashed")
            self.last_cycle_seconds = time.monotonic() - started
            self.cycles += 1
            if self.on_cycle is not None:
                self.on_cycle(self.last_cycle_seconds, ok)
            await anyio.sleep(max(0.0, self.interval - self.last_cycle_seconds))

    async def cycle(self) -> None:
        owned = await blocking(self.jobs.store.list_owned_jobs, self.jobs.worker_id)
        self.owned_by_status = dict(Counter(j.status.value for j in owned))
        to_poll = [j for j in owned if j.cloud_resource_path and not j.cancel_requested]

        async def act(job: Job) -> None:
            if job.cancel_requested:
                await self.jobs.finish_cancel(job)
            elif not job.cloud_resource_path:
                await self.jobs.start_execution(job)

        await self._each([j for j in owned if j.cancel_requested or not j.cloud_resource_path],
                         act)  # fmt: skip
        batch = max(1, self.jobs.provider.capabilities.max_status_batch)
        for i in range(0, len(to_poll), batch):
            await self._poll_batch(to_poll[i : i + batch])

    @staticmethod
    async def _each(jobs: Sequence[Job], fn: Callable[[Job], Awaitable[None]]) -> None:
        """Run ``fn`` for every job, up to APPLY_CONCURRENCY at a time.

        Each job's own steps stay in order (one ``fn`` call); different jobs overlap, so
        their store writes and event-log fsyncs (one log file per job) proceed together
        instead of one job after another: recording completions one at a time could not
        keep up with 200 submits/s (bench.faults). A lost lease skips that job; any other
        error is raised once every job has been tried (the cycle then counts as failed)."""
        if not jobs:
            return
        gate = asyncio.Semaphore(APPLY_CONCURRENCY)
        errors: list[BaseException] = []

        async def one(job: Job) -> None:
            async with gate:
                try:
                    await fn(job)
                except LeaseLost:
                    pass
                except Exception as exc:
                    errors.append(exc)

        await asyncio.gather(*(one(j) for j in jobs))
        if errors:
            raise errors[0]

    async def _poll_batch(self, jobs: Sequence[Job]) -> None:
        paths = [j.cloud_resource_path for j in jobs]
        statuses = await blocking(self.jobs.provider.status, paths)

        async def apply(job: Job) -> None:
            st = statuses.get(job.cloud_resource_path)
            if st is None:
                return
            if self.jobs.provider.capabilities.supports_output:
                await self._emit_output(job, final=bool(st.state and st.state.terminal))
            await self._status_detail(job, st)
            await self.jobs.apply_status(job, st)
            if st.state is not None and st.state.terminal:
                self._offsets.pop(job.cloud_resource_path, None)
                self._raw.pop(job.cloud_resource_path, None)

        await self._each(jobs, apply)

    async def _status_detail(self, job: Job, st: ProviderStatus) -> None:
        path = job.cloud_resource_path
        previous = self._raw.get(path)
        self._raw[path] = st.raw_state
        moves = st.state is not None and job.status.can_move_to(st.state)
        if previous is not None and st.raw_state != previous and not moves:
            detail = f"provider state {previous} -> {st.raw_state}"
            if st.message:
                detail += f": {st.message}"
            await self.jobs.events.emit(job, EventKind.STATUS_DETAIL, job.status, detail)

    async def _emit_output(self, job: Job, *, final: bool) -> None:
        read = getattr(self.jobs.provider, "read_output", None)
        if read is None:
            return
        path = job.cloud_resource_path
        while True:
            chunk = await blocking(read, path, self._offsets.get(path, (0, 0)))
            self._offsets[path] = chunk.offsets
            if not (chunk.stdout or chunk.stderr):
                return
            for stream, text in (("stdout", chunk.stdout), ("stderr", chunk.stderr)):
                if text:
                    await self.jobs.events.emit(job, EventKind.OUTPUT, job.status, stream, text)
            if not final:
                return

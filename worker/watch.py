"""Event feeds: which events a watcher receives, and when its feed ends (docs/design.md §6
"Watching"). Domain rules only; the WatchJobEvents handler (``worker/service.py``)
converts what a feed yields and sends it.

* **One job** follows ``seq``: each wake reads the events after the last one sent. The
  feed ends after the job's terminal event, which the store writes in the terminal
  transition's own transaction, so "the job is terminal" and "its last event is stored"
  are the same fact. It also ends when the job is deleted (``NotFound``).
* **A tenant** follows ``position``: each wake reads the tenant's events after the cursor
  (an index range, ``(tenant_id, position)``), so an idle watcher costs one empty range
  read per wake whatever the tenant's history. Without ``follow`` it ends once the tenant
  has no active job (checked when the cursor is drained); with it, it never ends.

A watcher wakes when this worker commits events for its tenant (``Notifier``) and
otherwise every ``WATCH_POLL_SECONDS``, which bounds how late it sees another worker's
events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from jennah.errors import InvalidArgument
from jennah.models import TERMINAL_KINDS, JobEvent
from worker.jobs import JobService
from worker.notify import Notifier

WATCH_POLL_SECONDS = 0.2
WATCH_PAGE = 1000


class EventWatch:
    """The event feeds of one worker: read through ``JobService``, woken by ``Notifier``."""

    def __init__(self, jobs: JobService, notifier: Notifier) -> None:
        self._jobs = jobs
        self._notifier = notifier

    def events(
        self, tenant: str, *, job_id: str, after_seq: int, after_position: int, follow: bool
    ) -> AsyncIterator[JobEvent]:
        """The feed a watch asks for: one job's after ``after_seq`` when ``job_id`` is
        given, else the tenant's after ``after_position``. ``InvalidArgument`` at once for
        a negative cursor or the other feed's cursor."""
        if after_seq < 0 or after_position < 0:
            raise InvalidArgument("after_seq and after_position must not be negative")
        if job_id:
            if after_position:
                raise InvalidArgument("after_position is for tenant-wide watches (no job_id)")
            return self.job(tenant, job_id, after_seq)
        if after_seq:
            raise InvalidArgument("a tenant-wide watch resumes from after_position")
        return self.tenant(tenant, after_position, follow)

    async def job(self, tenant: str, job_id: str, after_seq: int) -> AsyncIterator[JobEvent]:
        """The job's events after ``after_seq``, live, ending with its terminal event.
        ``NotFound`` (before the first event) for an unknown or foreign job."""
        jobs = self._jobs
        after = after_seq
        while True:
            events = await jobs.list_events(tenant, job_id, after, WATCH_PAGE)
            for event in events:
                after = event.seq
                yield event
                if event.kind in TERMINAL_KINDS:
                    return
            if len(events) == WATCH_PAGE:
                continue
            job = await jobs.get(tenant, job_id)  # NotFound once deleted: the feed ends
            if job.status.terminal:
                # The terminal event committed with the status; the client asked to start
                # after it (or it arrived in the read above): nothing more will come.
                rest = await jobs.list_events(tenant, job_id, after, WATCH_PAGE)
                for event in rest:
                    yield event
                return
            await self._notifier.wait(tenant, WATCH_POLL_SECONDS)

    async def tenant(
        self, tenant: str, after_position: int, follow: bool
    ) -> AsyncIterator[JobEvent]:
        """The tenant's events after ``after_position``, live; without ``follow`` the feed
        ends once no job of the tenant is active and every event was sent."""
        jobs = self._jobs
        after = after_position
        while True:
            events = await jobs.list_tenant_events(tenant, after, WATCH_PAGE)
            for event in events:
                after = event.position
                yield event
            if len(events) == WATCH_PAGE:
                continue
            if not follow and not await jobs.has_active_jobs(tenant):
                # A job may have ended between the read and this check: send its last
                # events.
                for event in await jobs.list_tenant_events(tenant, after, WATCH_PAGE):
                    after = event.position
                    yield event
                return
            await self._notifier.wait(tenant, WATCH_POLL_SECONDS)

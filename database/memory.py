"""An in-memory job store: the fake that passes the same contract suite as the real ones.

One lock guards everything, so each method is atomic. Jobs are copied in and out, so a
caller can never change stored state by mutating a returned object.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import cast

from database import _common as c
from database.base import (
    AppendEvents,
    CreateJob,
    OutputOffsets,
    UpdateJob,
    WriteOp,
    WriteResult,
    unwrap,
)
from jennah.errors import Conflict, JennahError, NotFound
from jennah.models import (
    Job,
    JobEvent,
    JobFilter,
    JobPatch,
    Lease,
    Notification,
    Page,
    Placed,
    Transition,
    WorkerInfo,
)
from jennah.settings import StoreSettings


class MemoryStore:
    """Jobs, transitions, events, notifications and workers in dicts, behind one lock."""

    name = "memory"

    def __init__(self, clock: Callable[[], datetime] = c.now_utc) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._transitions: dict[str, list[Transition]] = {}
        self._events: dict[str, list[JobEvent]] = {}  # per job, in seq order
        self._tenant_events: dict[str, list[JobEvent]] = {}  # per tenant, in position order
        self._keys: dict[str, set[str]] = {}  # dedup keys per job
        self._cursors: dict[str, OutputOffsets] = {}
        self._positions: dict[str, int] = {}  # last position per tenant
        self._workers: dict[str, WorkerInfo] = {}
        self._tenants: dict[str, datetime] = {}
        self._notes: dict[str, dict[str, Notification]] = {}  # tenant -> id -> note

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> MemoryStore:
        return cls()

    def _now(self) -> datetime:
        return c.utc(self._clock())

    def migrate(self) -> list[str]:
        return []

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None

    # --- tenant-facing -----------------------------------------------------------------

    def _tenant_job(self, tenant_id: str, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None or job.tenant_id != tenant_id:
            raise NotFound.job(job_id)
        return job

    def write_batch(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        results: list[WriteResult] = []
        with self._lock:
            for op in ops:
                try:
                    if isinstance(op, CreateJob):
                        results.append(self._create(op.job, op.lease_ttl))
                    elif isinstance(op, UpdateJob):
                        results.append(self._update(op.job_id, op.lease, op.patch, op.reason))
                    else:
                        results.append(self._append(op.events, op.legacy))
                except JennahError as exc:
                    results.append(exc)
        return results

    def _add_events(self, events: Sequence[JobEvent]) -> list[JobEvent]:
        """Number ``events`` (seq per job, position per tenant) and keep them."""
        out = []
        for ev in events:
            per_job = self._events.setdefault(ev.job_id, [])
            position = self._positions.get(ev.tenant_id, 0) + 1
            self._positions[ev.tenant_id] = position
            stored = dataclasses.replace(ev, seq=len(per_job) + 1, position=position,
                                         created_at=c.utc(ev.created_at))  # fmt: skip
            per_job.append(stored)
            self._tenant_events.setdefault(ev.tenant_id, []).append(stored)
            if ev.dedup_key:
                self._keys.setdefault(ev.job_id, set()).add(ev.dedup_key)
            out.append(stored)
        return out

    def create_job(self, job: Job, lease_ttl: float) -> tuple[Job, bool]:
        return cast(tuple[Job, bool], unwrap(self.write_batch([CreateJob(job, lease_ttl)])[0]))

    def _create(self, job: Job, lease_ttl: float) -> tuple[Job, bool]:
        if job.request_id:
            for existing in self._jobs.values():
                if (existing.tenant_id, existing.request_id) == (job.tenant_id, job.request_id):
                    return dataclasses.replace(existing), False
        if job.job_id in self._jobs:
            raise Conflict(f"job {job.job_id} already exists")
        now = self._now()
        stored = c.new_job(copy.deepcopy(job), now, lease_ttl)
        self._tenants.setdefault(job.tenant_id, now)
        self._jobs[job.job_id] = stored
        first, submitted = c.created(stored, now)
        self._transitions[job.job_id] = [first]
        self._add_events([submitted])
        return dataclasses.replace(stored), True

    def get_job(self, tenant_id: str, job_id: str) -> Job:
        with self._lock:
            return dataclasses.replace(self._tenant_job(tenant_id, job_id))

    def list_jobs(self, tenant_id: str, flt: JobFilter, page_size: int, page_token: str) -> Page:
        after = c.decode_page_token(page_token) if page_token else None
        with self._lock:
            jobs = [
                j for j in self._jobs.values() if j.tenant_id == tenant_id and c.matches(j, flt)
            ]
        jobs.sort(key=lambda j: (j.created_at or c.EPOCH, j.job_id), reverse=True)
        if after is not None:
            jobs = [j for j in jobs if (j.created_at or c.EPOCH, j.job_id) < after]
        page = [dataclasses.replace(j) for j in jobs[:page_size]]
        token = c.page_token_after(page) if len(jobs) > page_size else ""
        return Page(page, token)

    def request_cancel(self, tenant_id: str, job_id: str) -> Job:
        with self._lock:
            job = self._tenant_job(tenant_id, job_id)
            job.cancel_requested = True
            job.updated_at = self._now()
            return dataclasses.replace(job)

    def delete_job(self, tenant_id: str, job_id: str) -> None:
        with self._lock:
            self._tenant_job(tenant_id, job_id)
            del self._jobs[job_id]
            self._transitions.pop(job_id, None)
            self._events.pop(job_id, None)
            self._keys.pop(job_id, None)
            self._cursors.pop(job_id, None)
            events = self._tenant_events.get(tenant_id, [])
            self._tenant_events[tenant_id] = [e for e in events if e.job_id != job_id]
            self._notes.get(tenant_id, {}).pop(c.notification_id(job_id), None)

    def list_transitions(self, tenant_id: str, job_id: str) -> list[Transition]:
        with self._lock:
            self._tenant_job(tenant_id, job_id)
            return list(self._transitions.get(job_id, []))

    def list_events(
        self, tenant_id: str, job_id: str, after_seq: int, limit: int
    ) -> list[JobEvent]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.tenant_id != tenant_id:
                return []
            return self._events.get(job_id, [])[max(after_seq, 0) : max(after_seq, 0) + limit]

    def list_tenant_events(
        self, tenant_id: str, after_position: int, limit: int
    ) -> list[JobEvent]:
        with self._lock:
            events = self._tenant_events.get(tenant_id, [])
            lo, hi = 0, len(events)  # binary search: positions are sorted
            while lo < hi:
                mid = (lo + hi) // 2
                if events[mid].position <= after_position:
                    lo = mid + 1
                else:
                    hi = mid
            return events[lo : lo + limit]

    def has_active_jobs(self, tenant_id: str) -> bool:
        with self._lock:
            return any(j.tenant_id == tenant_id and not j.status.terminal
                       for j in self._jobs.values())  # fmt: skip

    def output_offsets(self, job_id: str) -> OutputOffsets:
        with self._lock:
            return dict(self._cursors.get(job_id, {}))

    def append_execution_events(
        self, events: Sequence[JobEvent], legacy: bool = False
    ) -> list[tuple[Placed, JobEvent]]:
        result = unwrap(self.write_batch([AppendEvents(tuple(events), legacy)])[0])
        return cast(list[tuple[Placed, JobEvent]], result)

    def list_notifications(
        self, tenant_id: str, limit: int, unread_only: bool
    ) -> tuple[list[Notification], int]:
        with self._lock:
            notes = list(self._notes.get(tenant_id, {}).values())
        unread = sum(not n.is_read for n in notes)
        if unread_only:
            notes = [n for n in notes if not n.is_read]
        notes.sort(key=lambda n: (n.occurred_at, n.notification_id), reverse=True)
        return notes[: max(limit, 0)], unread

    def ack_notification(self, tenant_id: str, notification_id: str) -> None:
        with self._lock:
            notes = self._notes.get(tenant_id, {})
            if notification_id not in notes:
                raise c.notification_not_found(notification_id)
            notes[notification_id] = dataclasses.replace(notes[notification_id], is_read=True)

    def _append(self, events: Sequence[JobEvent], legacy: bool) -> list[tuple[Placed, JobEvent]]:
        out = []
        for ev in events:
            job = self._jobs.get(ev.job_id)
            cursors = self._cursors.setdefault(ev.job_id, {}) if job else {}
            placed = c.place(job, ev, cursors, self._keys.setdefault(ev.job_id, set()),
                             legacy=legacy)  # fmt: skip
            if placed is Placed.STORED:
                ev = self._add_events([ev])[0]
            out.append((placed, ev))
        return out

    # --- owner-facing, fenced ----------------------------------------------------------

    def update_job(self, job_id: str, lease: Lease, patch: JobPatch, reason: str = "") -> Job:
        op = UpdateJob(job_id, lease, patch, reason)
        return cast(Job, unwrap(self.write_batch([op])[0]))

    def _update(self, job_id: str, lease: Lease, patch: JobPatch, reason: str) -> Job:
        job = c.check_lease(self._jobs.get(job_id), lease)
        now = self._now()
        updated, transitions, events = c.apply_patch(job, lease, patch, now, reason)
        self._jobs[job_id] = updated
        self._transitions.setdefault(job_id, []).extend(transitions)
        self._add_events(events)
        note = c.terminal_notification(job, updated, now)
        if note is not None:
            self._notes.setdefault(job.tenant_id, {})[note.notification_id] = note
        return dataclasses.replace(updated)

    def _held(self, job_id: str, lease: Lease) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.lease != lease:
            return None
        return job

    def renew_leases(self, leases: Sequence[tuple[str, Lease]], ttl: float) -> set[str]:
        with self._lock:
            now = self._now()
            renewed = set()
            for job_id, lease in leases:
                job = self._held(job_id, lease)
                if job is not None:
                    job.lease_expires_at = now + timedelta(seconds=ttl)
                    job.last_heartbeat_at = now
                    renewed.add(job_id)
            return renewed

    def claim_expired(self, worker_id: str, ttl: float, limit: int) -> list[Job]:
        with self._lock:
            now = self._now()
            expired = [
                j
                for j in self._jobs.values()
                if not j.status.terminal and (j.lease_expires_at or c.EPOCH) <= now
            ]
            expired.sort(key=lambda j: (j.lease_expires_at or c.EPOCH, j.job_id))
            claimed = []
            for job in expired[: max(limit, 0)]:
                previous = job.owner_worker_id
                job.owner_worker_id = worker_id
                job.lease_version += 1
                job.lease_expires_at = now + timedelta(seconds=ttl)
                job.last_heartbeat_at = now
                job.updated_at = now
                self._add_events([c.claimed_event(job, previous, now)])
                claimed.append(dataclasses.replace(job))
            return claimed

    def release_leases(self, leases: Sequence[tuple[str, Lease]]) -> int:
        with self._lock:
            released = 0
            for job_id, lease in leases:
                job = self._held(job_id, lease)
                if job is not None:
                    job.lease_expires_at = c.EPOCH
                    released += 1
            return released

    def list_owned_jobs(self, worker_id: str) -> list[Job]:
        with self._lock:
            owned = [
                dataclasses.replace(j)
                for j in self._jobs.values()
                if j.owner_worker_id == worker_id and not j.status.terminal
            ]
        owned.sort(key=lambda j: (j.created_at or c.EPOCH, j.job_id))
        return owned

    # --- membership --------------------------------------------------------------------

    def heartbeat_worker(self, worker_id: str, endpoint: str) -> None:
        with self._lock:
            self._workers[worker_id] = WorkerInfo(worker_id, endpoint, self._now())

    def list_workers(self, max_age_seconds: float) -> list[WorkerInfo]:
        with self._lock:
            oldest = self._now() - timedelta(seconds=max_age_seconds)
            live = [w for w in self._workers.values() if w.heartbeat_at >= oldest]
        return sorted(live, key=lambda w: w.worker_id)

"""The job store port: one Protocol, implemented once per database.

Every store passes the same contract suite (``tests/database/store_contract.py``). Rules that
every implementation must keep:

* **Tenant isolation.** Every tenant-facing method is keyed by ``tenant_id``; another
  tenant's job is ``NotFound``, exactly like a job that does not exist.
* **Fencing.** Every write an owner makes about a job (:meth:`JobStore.update_job`,
  :meth:`JobStore.renew_leases`, :meth:`JobStore.release_leases`) is conditional on
  ``(owner_worker_id, lease_version)``; a mismatch raises ``LeaseLost`` (or reports the
  job as not renewed) and changes nothing.
* **Forward only.** A status change must satisfy ``JobStatus.can_move_to``; otherwise the
  update raises ``Conflict`` and changes nothing. Each status change writes a transition
  row in the same transaction. A retry (``JobPatch.retry``) re-enters PENDING at the next
  attempt.
* **Events are numbered by the store.** Every lifecycle event (SUBMITTED, SCHEDULED,
  RUNNING, COMPLETED, FAILED, CANCELLED, RETRY, LEASE_CLAIMED) is written in the
  transaction of the transition or claim it reports: one event per transition, none
  without its transition. ``seq`` comes from a per-job counter (1-based, gapless) and
  ``position`` from a per-tenant counter in the same transaction, so positions increase
  in commit order and a watcher holding a position never misses a later commit.
* **Execution events** (OUTPUT, STATUS_DETAIL) are placed by ``_common.place``: stored
  once per dedup key, output only contiguous with what the store has and only once the
  attempt is RUNNING, nothing after the terminal event.
* **Atomic.** Nothing half-written is ever visible: a job, its first transition and its
  SUBMITTED event are inserted together; an update, its transitions and their events
  commit together.
* **Group commit.** ``write_batch`` runs many writes in one transaction (one commit, one
  fsync); a write that fails its own checks fails alone, with its error in its slot.
* **Errors.** Driver errors are translated inside the store: a lost connection or a
  server that is down becomes ``StoreUnavailable``.
* **Clock.** Lease expiry uses the database clock where there is one (PostgreSQL
  ``now()``, Spanner ``CURRENT_TIMESTAMP()``); the embedded stores use an injected clock.
* **Tasks.** A job's task states (``Job.tasks``) are stored with the job row, in the form
  of ``jennah.tasks.encode``, and replaced whole by a patch that carries them
  (``JobPatch.tasks``), in the same fenced write as the rest of the patch.
* **Notifications.** The transition of a job into a terminal state writes one
  notification for its tenant in the same transaction (none for a job that is already
  terminal, so never two). Deleting a job deletes its notifications.
* **Time values** are timezone-aware UTC ``datetime`` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from jennah.errors import JennahError
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

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
# (attempt, task_index, stream) -> bytes of that output stream the store has.
OutputOffsets = dict[tuple[int, int, str], int]


# --- writes that can share one transaction (``JobStore.write_batch``) --------------------


@dataclass(frozen=True)
class CreateJob:
    job: Job
    lease_ttl: float


@dataclass(frozen=True)
class UpdateJob:
    """A fenced update. ``expected`` (optional) is the caller's copy of the job: a store
    may apply the patch to it without reading the row first, with a write conditional
    on the row still being that copy (its ``updated_at``, lease and status), and falls
    back to reading the row when it is not. Lease renewals do not count as changes."""

    job_id: str
    lease: Lease
    patch: JobPatch
    reason: str = ""
    expected: Job | None = None


@dataclass(frozen=True)
class AppendEvents:
    events: tuple[JobEvent, ...]
    legacy: bool = False


WriteOp = CreateJob | UpdateJob | AppendEvents
# One slot per op: CreateJob -> (Job, bool); UpdateJob -> Job; AppendEvents ->
# list[tuple[Placed, JobEvent]]; or the JennahError that op failed with.
WriteResult = object


def unwrap(result: WriteResult) -> object:
    """The op's value, or raise the error in its slot."""
    if isinstance(result, JennahError):
        raise result
    return result


class JobStore(Protocol):
    """Durable storage for jobs, their transitions, their events and worker membership."""

    name: str

    def migrate(self) -> list[str]:
        """Apply pending schema migrations in order; return the names applied now."""
        ...

    def ping(self) -> None:
        """Return when the store answers a trivial query; raise ``StoreUnavailable``."""
        ...

    def close(self) -> None:
        """Release connections. Idempotent."""
        ...

    # --- tenant-facing -----------------------------------------------------------------

    def write_batch(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """Run ``ops`` in order in as few transactions as the store allows (SQL: one),
        and return one slot per op. A ``JennahError`` an op raises from its own checks
        (``LeaseLost``, ``Conflict``...) is returned in its slot and the others go on;
        a failure of the transaction itself (the store is down) is raised."""
        ...

    def create_job(self, job: Job, lease_ttl: float) -> tuple[Job, bool]:
        """Insert ``job`` as PENDING, owned by ``job.owner_worker_id`` with
        ``lease_version = 1`` and a lease expiring ``lease_ttl`` seconds from now, plus its
        first transition (None → PENDING) and its SUBMITTED event (seq 1), atomically.

        If ``job.request_id`` is not empty and the tenant already has a job with that
        request id, write nothing and return ``(existing_job, False)``; otherwise return
        ``(stored_job, True)``. Concurrent creates with one request id yield one job.
        """
        ...

    def get_job(self, tenant_id: str, job_id: str) -> Job:
        """The tenant's job, or ``NotFound``."""
        ...

    def list_jobs(
        self, tenant_id: str, flt: JobFilter, page_size: int, page_token: str
    ) -> Page:
        """The tenant's jobs, newest first (``created_at`` then ``job_id`` descending).

        ``page_size`` is already clamped by the caller to 1..MAX_PAGE_SIZE. The token is
        opaque; an undecodable token raises ``InvalidArgument``. ``next_page_token`` is
        empty on the last page.
        """
        ...

    def request_cancel(self, tenant_id: str, job_id: str) -> Job:
        """Mark the tenant's job ``cancel_requested`` (unfenced: any worker may ask; the
        owner acts on it). Return the job after the change, or ``NotFound``."""
        ...

    def delete_job(self, tenant_id: str, job_id: str) -> None:
        """Remove the job, its transitions and its events, or raise ``NotFound``."""
        ...

    def list_transitions(self, tenant_id: str, job_id: str) -> list[Transition]:
        """The job's transitions in the order they happened, or ``NotFound``."""
        ...

    def list_events(
        self, tenant_id: str, job_id: str, after_seq: int, limit: int
    ) -> list[JobEvent]:
        """The job's events with ``seq > after_seq``, ascending; unknown or foreign jobs
        yield an empty list."""
        ...

    def list_tenant_events(
        self, tenant_id: str, after_position: int, limit: int
    ) -> list[JobEvent]:
        """The tenant's events with ``position > after_position``, ascending."""
        ...

    def has_active_jobs(self, tenant_id: str) -> bool:
        """True if the tenant has a non-terminal job (an index lookup, not a scan)."""
        ...

    def output_offsets(self, job_id: str) -> OutputOffsets:
        """How many bytes of each output stream of the job the store has."""
        ...

    def append_execution_events(
        self, events: Sequence[JobEvent], legacy: bool = False
    ) -> list[tuple[Placed, JobEvent]]:
        """Place each execution event (``_common.place``) and insert the STORED ones,
        numbered; return ``(placed, event)`` per input event, in input order (the event
        as stored when STORED). ``legacy`` imports v1 WAL events (any kind)."""
        ...

    def list_notifications(
        self, tenant_id: str, limit: int, unread_only: bool
    ) -> tuple[list[Notification], int]:
        """The tenant's newest ``limit`` notifications (``occurred_at`` then id
        descending), only the unread ones if ``unread_only``, and how many of all the
        tenant's notifications are unread."""
        ...

    def ack_notification(self, tenant_id: str, notification_id: str) -> None:
        """Mark the tenant's notification read (again: no change); ``NotFound`` for an
        unknown id or another tenant's."""
        ...

    # --- owner-facing, fenced ----------------------------------------------------------

    def update_job(self, job_id: str, lease: Lease, patch: JobPatch, reason: str = "") -> Job:
        """Apply ``patch`` if the job is still owned under ``lease``; else ``LeaseLost``.

        A status in the patch that differs from the stored one must be a forward move
        (``Conflict`` otherwise) and writes a transition row and its event, with
        ``reason`` (``_common.apply_patch``).
        """
        ...

    def renew_leases(self, leases: Sequence[tuple[str, Lease]], ttl: float) -> set[str]:
        """Extend each ``(job_id, lease)`` still held to now + ``ttl`` and set
        ``last_heartbeat_at``; return the job ids renewed. The others are lost."""
        ...

    def claim_expired(self, worker_id: str, ttl: float, limit: int) -> list[Job]:
        """Take up to ``limit`` active jobs whose lease expired: set the owner to
        ``worker_id``, bump ``lease_version``, extend the lease and write a LEASE_CLAIMED
        event naming the previous owner. Concurrent claimers never win the same job at
        the same version. Return the claimed jobs."""
        ...

    def release_leases(self, leases: Sequence[tuple[str, Lease]]) -> int:
        """Expire the given leases now (graceful shutdown) so a peer claims them at once.
        Fenced; return how many were released."""
        ...

    def list_owned_jobs(self, worker_id: str) -> list[Job]:
        """Active (non-terminal) jobs owned by ``worker_id``, oldest first."""
        ...

    # --- membership --------------------------------------------------------------------

    def heartbeat_worker(self, worker_id: str, endpoint: str) -> None:
        """Upsert the worker's membership row with the current time."""
        ...

    def list_workers(self, max_age_seconds: float) -> list[WorkerInfo]:
        """Workers whose last heartbeat is at most ``max_age_seconds`` old."""
        ...

"""The job store port: one Protocol, implemented once per database.

Every store passes the same contract suite (``tests/store_contract.py``). Rules that
every implementation must keep:

* **Tenant isolation.** Every tenant-facing method is keyed by ``tenant_id``; another
  tenant's job is ``NotFound``, exactly like a job that does not exist.
* **Fencing.** Every write an owner makes about a job (:meth:`JobStore.update_job`,
  :meth:`JobStore.renew_leases`, :meth:`JobStore.release_leases`) is conditional on
  ``(owner_worker_id, lease_version)``; a mismatch raises ``LeaseLost`` (or reports the
  job as not renewed) and changes nothing.
* **Forward only.** A status change must satisfy ``JobStatus.can_move_to``; otherwise the
  update raises ``Conflict`` and changes nothing. Each status change writes a transition
  row in the same transaction.
* **Atomic.** Nothing half-written is ever visible: a job and its first transition are
  inserted together, an update and its transition row commit together.
* **Errors.** Driver errors are translated inside the store: a lost connection or a
  server that is down becomes ``StoreUnavailable``.
* **Clock.** Lease expiry uses the database clock where there is one (PostgreSQL
  ``now()``, Spanner ``CURRENT_TIMESTAMP()``); the embedded stores use an injected clock.
* **Time values** are timezone-aware UTC ``datetime`` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from jennah.models import Job, JobEvent, JobFilter, JobPatch, Lease, Page, Transition, WorkerInfo

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50


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

    def create_job(self, job: Job, lease_ttl: float) -> tuple[Job, bool]:
        """Insert ``job`` as PENDING, owned by ``job.owner_worker_id`` with
        ``lease_version = 1`` and a lease expiring ``lease_ttl`` seconds from now, plus its
        first transition (None → PENDING), atomically.

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
        self, tenant_id: str, job_id: str | None, after_seq: int, limit: int
    ) -> list[JobEvent]:
        """Events with ``seq > after_seq``. For one job: ascending ``seq``. For the whole
        tenant (``job_id is None``; ``after_seq`` is then ignored): ascending
        ``created_at``, ``job_id``, ``seq``. Unknown jobs yield an empty list."""
        ...

    def append_events(self, events: Sequence[JobEvent]) -> None:
        """Store events idempotently on ``(job_id, seq)``: a repeated event is ignored.
        Events of a job that no longer exists are dropped."""
        ...

    # --- owner-facing, fenced ----------------------------------------------------------

    def update_job(self, job_id: str, lease: Lease, patch: JobPatch, reason: str = "") -> Job:
        """Apply ``patch`` if the job is still owned under ``lease``; else ``LeaseLost``.

        A status in the patch that differs from the stored one must be a forward move
        (``Conflict`` otherwise) and writes a transition row with ``reason``.
        """
        ...

    def renew_leases(self, leases: Sequence[tuple[str, Lease]], ttl: float) -> set[str]:
        """Extend each ``(job_id, lease)`` still held to now + ``ttl`` and set
        ``last_heartbeat_at``; return the job ids renewed. The others are lost."""
        ...

    def claim_expired(self, worker_id: str, ttl: float, limit: int) -> list[Job]:
        """Take up to ``limit`` active jobs whose lease expired: set the owner to
        ``worker_id``, bump ``lease_version`` and extend the lease. Concurrent claimers
        never win the same job at the same version. Return the claimed jobs."""
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

"""The job store written once in SQL that both SQLite and PostgreSQL run.

A backend supplies a transaction (:class:`Tx`: rows in and out as plain Python values,
``?`` placeholders, and the transaction's ``now``) plus a few dialect snippets; all the
rules (fencing, forward-only status, idempotent creates and events) live here and in
``_common``. Keeping one copy of the queries is what keeps the two stores identical.

Concurrency: writes run in a transaction that holds the database write lock (SQLite
``BEGIN IMMEDIATE``) or row locks (PostgreSQL ``FOR UPDATE``, ``SKIP LOCKED`` in claims).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timedelta
from typing import Any, Protocol

from database import _common as c
from database.migrate import Migration, MigrationSession, dialect_migrations, run_migrations
from jennah.errors import Conflict, NotFound
from jennah.models import Job, JobEvent, JobFilter, JobPatch, Lease, Page, Transition, WorkerInfo

_JOB_COLS = ", ".join(c.JOB_COLUMNS)
_SELECT_JOB = f"SELECT {_JOB_COLS} FROM jobs"
_IMMUTABLE = {"job_id", "tenant_id", "spec", "request_id", "created_at"}
_UPDATE_COLS = [col for col in c.JOB_COLUMNS if col not in _IMMUTABLE]
_UPDATE_JOB = (
    "UPDATE jobs SET "
    + ", ".join(f"{col} = ?" for col in _UPDATE_COLS)
    + f" WHERE job_id = ? RETURNING {_JOB_COLS}"
)
_INSERT_JOB = (
    f"INSERT INTO jobs ({_JOB_COLS}) VALUES ({', '.join('?' for _ in c.JOB_COLUMNS)}) "
    f"ON CONFLICT (tenant_id, request_id) WHERE request_id <> '' DO NOTHING RETURNING {_JOB_COLS}"
)
_INSERT_TRANSITION = (
    f"INSERT INTO job_transitions ({', '.join(c.TRANSITION_COLUMNS)}) VALUES "
    "(?, (SELECT COALESCE(MAX(idx), -1) + 1 FROM job_transitions WHERE job_id = ?), "
    "?, ?, ?, ?, ?)"
)
_EVENT_COLS = ", ".join(c.EVENT_COLUMNS)
_FENCE_CHUNK = 200  # leases per fenced statement (3 parameters each)
_ACTIVE_IN = "status IN (" + ", ".join(f"'{s}'" for s in c.ACTIVE) + ")"


class Tx(Protocol):
    """One open transaction, with values converted to and from the backend's types."""

    def now(self) -> datetime:
        """The store clock for this transaction (PostgreSQL: ``now()``)."""
        ...

    def rows(self, sql: str, *params: Any) -> list[c.Row]:
        ...

    def run(self, sql: str, *params: Any) -> int:
        """Execute; return the number of rows changed."""
        ...


class SqlStore(ABC):
    """The JobStore methods over :meth:`_tx`; subclasses add connections and dialect."""

    name: str
    # Conditions with two parameters (label key, value) and one parameter (prefix).
    label_sql: str
    name_prefix_sql: str
    # Row locking clauses appended to SELECTs inside write transactions.
    for_update: str = ""
    skip_locked: str = ""
    key_share: str = ""

    # Schema: the dialect's folder under database/schema/, the DDL of the bookkeeping
    # table, and how to cut a migration file into statements the driver can run.
    dialect: str
    migrations_table_ddl: str
    migration_lock_sql: str = ""

    @abstractmethod
    def _tx(self, write: bool = True) -> AbstractContextManager[Tx]:
        """A transaction that commits on normal exit and rolls back on an exception."""

    @abstractmethod
    def _split(self, script: str) -> list[str]:
        """The statements of a migration file, in order."""

    def migrate(self, migrations: Sequence[Migration] | None = None) -> list[str]:
        """Apply pending migrations (default: this dialect's schema files)."""
        pending = dialect_migrations(self.dialect) if migrations is None else migrations
        return run_migrations(pending, self._migration_session)

    @contextmanager
    def _migration_session(self) -> Iterator[MigrationSession]:
        with self._tx() as tx:
            if self.migration_lock_sql:
                tx.rows(self.migration_lock_sql)
            yield TxMigrationSession(tx, self.migrations_table_ddl, self._split)

    def ping(self) -> None:
        with self._tx(write=False) as tx:
            tx.rows("SELECT 1 AS one")

    # --- tenant-facing -----------------------------------------------------------------

    def create_job(self, job: Job, lease_ttl: float) -> tuple[Job, bool]:
        with self._tx() as tx:
            if job.request_id:
                existing = self._by_request_id(tx, job.tenant_id, job.request_id)
                if existing is not None:
                    return existing, False
            now = tx.now()
            stored = c.new_job(job, now, lease_ttl)
            tx.run(
                "INSERT INTO tenants (tenant_id, created_at) VALUES (?, ?) "
                "ON CONFLICT (tenant_id) DO NOTHING",
                job.tenant_id,
                now,
            )
            row = c.job_to_row(stored)
            inserted = tx.rows(_INSERT_JOB, *(row[col] for col in c.JOB_COLUMNS))
            if not inserted:  # a concurrent create with the same request id won
                existing = self._by_request_id(tx, job.tenant_id, job.request_id)
                if existing is None:
                    raise Conflict(f"request_id {job.request_id!r} raced and vanished")
                return existing, False
            self._record(tx, Transition(job.job_id, None, stored.status, now, "created",
                                        job.owner_worker_id))  # fmt: skip
            return c.job_from_row(inserted[0]), True

    def _by_request_id(self, tx: Tx, tenant_id: str, request_id: str) -> Job | None:
        rows = tx.rows(f"{_SELECT_JOB} WHERE tenant_id = ? AND request_id = ?",
                       tenant_id, request_id)  # fmt: skip
        return c.job_from_row(rows[0]) if rows else None

    def _record(self, tx: Tx, t: Transition) -> None:
        from_status = t.from_status.value if t.from_status else None
        tx.run(_INSERT_TRANSITION, t.job_id, t.job_id, from_status, t.to_status.value, t.at,
               t.reason, t.worker_id)  # fmt: skip

    def get_job(self, tenant_id: str, job_id: str) -> Job:
        with self._tx(write=False) as tx:
            return self._tenant_job(tx, tenant_id, job_id)

    def _tenant_job(self, tx: Tx, tenant_id: str, job_id: str) -> Job:
        rows = tx.rows(f"{_SELECT_JOB} WHERE tenant_id = ? AND job_id = ?", tenant_id, job_id)
        if not rows:
            raise NotFound(f"job {job_id} not found")
        return c.job_from_row(rows[0])

    def list_jobs(self, tenant_id: str, flt: JobFilter, page_size: int, page_token: str) -> Page:
        where: list[str] = ["tenant_id = ?"]
        params: list[Any] = [tenant_id]
        if page_token:
            created_at, job_id = c.decode_page_token(page_token)
            where.append("(created_at, job_id) < (?, ?)")
            params += [created_at, job_id]
        if flt.status is not None:
            where.append("status = ?")
            params.append(flt.status.value)
        if flt.name_prefix:
            where.append(self.name_prefix_sql)
            params.append(flt.name_prefix)
        for key, value in sorted(flt.labels.items()):
            where.append(self.label_sql)
            params += [key, value]
        sql = (f"{_SELECT_JOB} WHERE {' AND '.join(where)} "
               "ORDER BY created_at DESC, job_id DESC LIMIT ?")  # fmt: skip
        with self._tx(write=False) as tx:
            rows = tx.rows(sql, *params, page_size + 1)
        jobs = [c.job_from_row(r) for r in rows[:page_size]]
        return Page(jobs, c.page_token_after(jobs) if len(rows) > page_size else "")

    def request_cancel(self, tenant_id: str, job_id: str) -> Job:
        with self._tx() as tx:
            rows = tx.rows(
                "UPDATE jobs SET cancel_requested = ?, updated_at = ? "
                f"WHERE tenant_id = ? AND job_id = ? RETURNING {_JOB_COLS}",
                True, tx.now(), tenant_id, job_id,
            )  # fmt: skip
            if not rows:
                raise NotFound(f"job {job_id} not found")
            return c.job_from_row(rows[0])

    def delete_job(self, tenant_id: str, job_id: str) -> None:
        with self._tx() as tx:
            self._tenant_job(tx, tenant_id, job_id)
            tx.run("DELETE FROM job_events WHERE job_id = ?", job_id)
            tx.run("DELETE FROM job_transitions WHERE job_id = ?", job_id)
            tx.run("DELETE FROM jobs WHERE job_id = ? AND tenant_id = ?", job_id, tenant_id)

    def list_transitions(self, tenant_id: str, job_id: str) -> list[Transition]:
        with self._tx(write=False) as tx:
            self._tenant_job(tx, tenant_id, job_id)
            rows = tx.rows(
                f"SELECT {', '.join(c.TRANSITION_COLUMNS)} FROM job_transitions "
                "WHERE job_id = ? ORDER BY idx",
                job_id,
            )
        return [c.transition_from_row(r) for r in rows]

    def list_events(
        self, tenant_id: str, job_id: str | None, after_seq: int, limit: int
    ) -> list[JobEvent]:
        select = f"SELECT {_EVENT_COLS} FROM job_events WHERE tenant_id = ?"
        with self._tx(write=False) as tx:
            if job_id is None:
                rows = tx.rows(f"{select} ORDER BY created_at, job_id, seq LIMIT ?",
                               tenant_id, limit)  # fmt: skip
            else:
                rows = tx.rows(f"{select} AND job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                               tenant_id, job_id, after_seq, limit)  # fmt: skip
        return [c.event_from_row(r) for r in rows]

    def append_events(self, events: Sequence[JobEvent]) -> None:
        if not events:
            return
        # Only events of a job that exists (for that tenant) are kept; the job row is
        # locked so that a concurrent delete cannot leave orphans behind.
        sql = (
            f"INSERT INTO job_events ({_EVENT_COLS}) "
            f"SELECT {', '.join('?' for _ in c.EVENT_COLUMNS)} FROM jobs "
            f"WHERE job_id = ? AND tenant_id = ?{self.key_share} "
            "ON CONFLICT (job_id, seq) DO NOTHING"
        )
        with self._tx() as tx:
            for event in sorted(events, key=lambda e: (e.job_id, e.seq)):
                row = c.event_to_row(event)
                tx.run(sql, *(row[col] for col in c.EVENT_COLUMNS), event.job_id,
                       event.tenant_id)  # fmt: skip

    # --- owner-facing, fenced ----------------------------------------------------------

    def update_job(self, job_id: str, lease: Lease, patch: JobPatch, reason: str = "") -> Job:
        with self._tx() as tx:
            rows = tx.rows(f"{_SELECT_JOB} WHERE job_id = ?{self.for_update}", job_id)
            job = c.check_lease(c.job_from_row(rows[0]) if rows else None, lease)
            updated, transition = c.apply_patch(job, lease, patch, tx.now(), reason)
            row = c.job_to_row(updated)
            written = tx.rows(_UPDATE_JOB, *(row[col] for col in _UPDATE_COLS), job_id)
            if transition is not None:
                self._record(tx, transition)
            return c.job_from_row(written[0])

    def _fenced(self, leases: Sequence[tuple[str, Lease]], sql: str, *values: Any) -> set[str]:
        """Run ``sql`` (an UPDATE ... SET) on every job still held under its lease, in
        one statement per chunk: a round trip per lease made a hand-over of a few dozen
        jobs take hundreds of milliseconds on a busy worker (a GIL hand-off each time)."""
        done: set[str] = set()
        with self._tx() as tx:
            now = tx.now()
            args = [v(now) if callable(v) else v for v in values]
            ordered = sorted(leases, key=lambda x: x[0])
            for i in range(0, len(ordered), _FENCE_CHUNK):
                chunk = ordered[i : i + _FENCE_CHUNK]
                rows = ", ".join(["(?, ?, ?)"] * len(chunk))
                params = [p for job_id, lease in chunk
                          for p in (job_id, lease.worker_id, lease.version)]  # fmt: skip
                done.update(r["job_id"] for r in tx.rows(
                    f"{sql} WHERE (job_id, owner_worker_id, lease_version) IN (VALUES {rows}) "
                    "RETURNING job_id", *args, *params))  # fmt: skip
        return done

    def renew_leases(self, leases: Sequence[tuple[str, Lease]], ttl: float) -> set[str]:
        return self._fenced(
            leases,
            "UPDATE jobs SET lease_expires_at = ?, last_heartbeat_at = ?",
            lambda now: now + timedelta(seconds=ttl),
            lambda now: now,
        )

    def release_leases(self, leases: Sequence[tuple[str, Lease]]) -> int:
        return len(self._fenced(leases, "UPDATE jobs SET lease_expires_at = ?", c.EPOCH))

    def claim_expired(self, worker_id: str, ttl: float, limit: int) -> list[Job]:
        if limit <= 0:
            return []
        with self._tx() as tx:
            now = tx.now()
            # One statement: pick (skipping rows other claimers hold) and take over.
            rows = tx.rows(
                "UPDATE jobs SET owner_worker_id = ?, lease_version = lease_version + 1, "
                "lease_expires_at = ?, last_heartbeat_at = ?, updated_at = ? "
                f"WHERE job_id IN (SELECT job_id FROM jobs WHERE {_ACTIVE_IN} "
                "AND lease_expires_at <= ? ORDER BY lease_expires_at, job_id "
                f"LIMIT ?{self.skip_locked}) RETURNING {_JOB_COLS}",
                worker_id, now + timedelta(seconds=ttl), now, now, now, limit,
            )  # fmt: skip
            claimed = sorted((c.job_from_row(row) for row in rows),
                             key=lambda j: (j.created_at or now, j.job_id))  # fmt: skip
        return claimed

    def list_owned_jobs(self, worker_id: str) -> list[Job]:
        with self._tx(write=False) as tx:
            rows = tx.rows(f"{_SELECT_JOB} WHERE owner_worker_id = ? AND {_ACTIVE_IN} "
                           "ORDER BY created_at, job_id", worker_id)  # fmt: skip
        return [c.job_from_row(r) for r in rows]

    # --- membership --------------------------------------------------------------------

    def heartbeat_worker(self, worker_id: str, endpoint: str) -> None:
        with self._tx() as tx:
            tx.run(
                f"INSERT INTO workers ({', '.join(c.WORKER_COLUMNS)}) VALUES (?, ?, ?) "
                "ON CONFLICT (worker_id) DO UPDATE SET endpoint = excluded.endpoint, "
                "heartbeat_at = excluded.heartbeat_at",
                worker_id, endpoint, tx.now(),
            )  # fmt: skip

    def list_workers(self, max_age_seconds: float) -> list[WorkerInfo]:
        with self._tx(write=False) as tx:
            oldest = tx.now() - timedelta(seconds=max_age_seconds)
            rows = tx.rows(f"SELECT {', '.join(c.WORKER_COLUMNS)} FROM workers "
                           "WHERE heartbeat_at >= ? ORDER BY worker_id", oldest)  # fmt: skip
        return [c.worker_from_row(r) for r in rows]


class TxMigrationSession:
    """A migration step inside one store transaction (see ``database.migrate``)."""

    def __init__(self, tx: Tx, table_ddl: str, split: Callable[[str], list[str]]) -> None:
        self._tx = tx
        self._table_ddl = table_ddl
        self._split = split

    def ensure_table(self) -> None:
        self._tx.run(self._table_ddl)

    def applied(self) -> set[str]:
        return {r["name"] for r in self._tx.rows("SELECT name FROM schema_migrations")}

    def apply(self, migration: Migration) -> None:
        for statement in self._split(migration.sql):
            self._tx.run(statement)
        self._tx.run("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                     migration.name, self._tx.now())  # fmt: skip

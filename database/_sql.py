"""The job store written once in SQL that both SQLite and PostgreSQL run.

A backend supplies a transaction (:class:`Tx`: rows in and out as plain Python values,
``?`` placeholders, and the transaction's ``now``) plus a few dialect snippets; all the
rules (fencing, forward-only status, idempotent creates and events) live here and in
``_common``. Keeping one copy of the queries is what keeps the two stores identical.

Concurrency: writes run in a transaction that holds the database write lock (SQLite
``BEGIN IMMEDIATE``) or row locks (PostgreSQL ``FOR UPDATE``, ``SKIP LOCKED`` in claims).

**Group commit.** ``write_batch`` runs many creates, updates and event appends in one
transaction. Each op reads and checks before it writes, so an op that fails its checks
(``LeaseLost``, ``Conflict``) has written nothing and fails alone, without a savepoint
per op (two more round trips each on PostgreSQL). If the transaction itself fails (a
driver error), each op is run again in a transaction of its own, so one bad op cannot
fail the others; only a store that is down fails them all.

**Numbering.** An op takes the next ``seq`` values from its job row (``event_seq``, the
row is locked by the op's update). Positions are handed out once, at the end of the
transaction, tenant by tenant in sorted order, from ``tenants.event_position``: the
tenant rows are locked last and in one order, so concurrent batches of two workers
cannot deadlock on them, and each position is allocated under a lock held until commit,
so positions increase in commit order.

**Notifications** of the jobs an op moved into a terminal state are queued like the
transitions and inserted at the end of the op's transaction; their primary key (the id
derived from the job id) makes a second one for a job impossible, whatever the path.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

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
from database.migrate import Migration, MigrationSession, dialect_migrations, run_migrations
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

_JOB_COLS = ", ".join(c.JOB_COLUMNS)
_SELECT_JOB = f"SELECT {_JOB_COLS} FROM jobs"
_IMMUTABLE = {"job_id", "tenant_id", "spec", "request_id", "created_at"}
_UPDATE_COLS = [col for col in c.JOB_COLUMNS if col not in _IMMUTABLE]
# Updates and inserts return only what the caller cannot know: the store returns the Job
# it computed, not a re-read row (decoding the spec JSON again was a third of a submit).
# An update sets only the columns its patch changed, so it can never undo a concurrent
# lease renewal (which touches nothing else).
# One statement is the whole idempotency check: a request id already used makes the
# insert do nothing, and only then is the existing job read.
_INSERT_JOB = (
    f"INSERT INTO jobs ({_JOB_COLS}, event_seq, transition_seq) "
    f"VALUES ({', '.join('?' for _ in c.JOB_COLUMNS)}, 1, 0) "
    f"ON CONFLICT (tenant_id, request_id) WHERE request_id <> '' DO NOTHING RETURNING job_id"
)
_INSERT_TRANSITION = (
    f"INSERT INTO job_transitions ({', '.join(c.TRANSITION_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in c.TRANSITION_COLUMNS)})"
)
_EVENT_COLS = ", ".join(c.EVENT_COLUMNS)
_INSERT_EVENT = (f"INSERT INTO job_events ({_EVENT_COLS}) "
                 f"VALUES ({', '.join('?' for _ in c.EVENT_COLUMNS)})")  # fmt: skip
_OUTPUT_COLS = ", ".join(c.OUTPUT_COLUMNS)
_NOTE_COLS = ", ".join(c.NOTIFICATION_COLUMNS)
_INSERT_NOTE = (f"INSERT INTO notifications ({_NOTE_COLS}) "
                f"VALUES ({', '.join('?' for _ in c.NOTIFICATION_COLUMNS)})")  # fmt: skip
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

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """Execute once per parameter row."""
        ...


class _Pending:
    """Events numbered within a transaction, waiting for their tenant positions, and
    transition and notification rows, written together at the end of the transaction."""

    def __init__(self) -> None:
        self.events: list[tuple[JobEvent, int]] = []  # (event, its seq)
        self.transitions: list[list[Any]] = []
        self.notes: list[list[Any]] = []

    def notify(self, note: Notification | None) -> None:
        if note is not None:
            row = c.notification_to_row(note)
            self.notes.append([row[col] for col in c.NOTIFICATION_COLUMNS])

    def record(self, transitions: Sequence[Transition], last_idx: int) -> None:
        """Queue ``transitions`` with the idx values ending at ``last_idx``."""
        first = last_idx - len(transitions) + 1
        for i, t in enumerate(transitions):
            self.transitions.append([t.job_id, first + i,
                                     t.from_status.value if t.from_status else None,
                                     t.to_status.value, t.at, t.reason, t.worker_id])

    def add(self, events: Sequence[JobEvent], last_seq: int) -> list[int]:
        """Give ``events`` the seqs ending at ``last_seq``; queue them; return the seqs."""
        first = last_seq - len(events) + 1
        seqs = list(range(first, last_seq + 1))
        self.events += zip(events, seqs, strict=True)
        return seqs


class SqlStore(ABC):
    """The JobStore methods over :meth:`_tx`; subclasses add connections and dialect."""

    name: str
    # Conditions with two parameters (label key, value) and one parameter (prefix).
    label_sql: str
    name_prefix_sql: str
    # Row locking clauses appended to SELECTs inside write transactions.
    for_update: str = ""
    skip_locked: str = ""

    # Schema: the dialect's folder under database/schema/, the DDL of the bookkeeping
    # table, and how to cut a migration file into statements the driver can run.
    dialect: str
    migrations_table_ddl: str
    migration_lock_sql: str = ""
    # Tenants known to have their row (see _ensure_tenant); set per instance.
    _tenants_seen: set[str]

    def __init__(self) -> None:
        self._tenants_seen = set()

    @abstractmethod
    def _tx(self, write: bool = True) -> AbstractContextManager[Tx]:
        """A transaction that commits on normal exit and rolls back on an exception."""

    @abstractmethod
    def _split(self, script: str) -> list[str]:
        """The statements of a migration file, in order."""

    def migrate(self, migrations: Sequence[Migration] | None = None) -> list[str]:
        """Apply pending migrations (default: this dialect's schema files), then number
        any events a v1 store left without positions (``_common.renumber_v1``)."""
        pending = dialect_migrations(self.dialect) if migrations is None else migrations
        applied = run_migrations(pending, self._migration_session)
        if migrations is None:
            with self._tx() as tx:
                self._upgrade_v1(tx)
        return applied

    @contextmanager
    def _migration_session(self) -> Iterator[MigrationSession]:
        with self._tx() as tx:
            if self.migration_lock_sql:
                tx.rows(self.migration_lock_sql)
            yield TxMigrationSession(tx, self.migrations_table_ddl, self._split)

    def ping(self) -> None:
        with self._tx(write=False) as tx:
            tx.rows("SELECT 1 AS one")

    # --- group commit ------------------------------------------------------------------

    def write_batch(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        return c.together_or_one_by_one(self._batch, ops)

    def _lock_jobs(self, tx: Tx, job_ids: set[str]) -> None:
        """Lock the job rows a transaction will write, in job id order, before it writes
        any: every writer of several job rows (batches, renewals, releases) takes them in
        the same order, so two of them can never wait for each other (PostgreSQL; SQLite
        has one writer at a time anyway)."""
        if not self.for_update or not job_ids:
            return
        ordered = sorted(job_ids)
        for i in range(0, len(ordered), _FENCE_CHUNK):
            chunk = ordered[i : i + _FENCE_CHUNK]
            tx.rows(f"SELECT job_id FROM jobs WHERE job_id IN ({', '.join('?' for _ in chunk)}) "
                    f"ORDER BY job_id{self.for_update}", *chunk)  # fmt: skip

    def _batch(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        results: list[WriteResult] = []
        with self._tx() as tx:
            touched = {op.job_id for op in ops if isinstance(op, UpdateJob)}
            touched |= {ev.job_id for op in ops if isinstance(op, AppendEvents)
                        for ev in op.events}  # fmt: skip
            self._lock_jobs(tx, touched)
            pending = _Pending()
            for op in ops:
                try:
                    results.append(self._op(tx, pending, op))
                except JennahError as exc:  # raised by the op's checks, before any write
                    results.append(exc)
            positions = self._insert_events(tx, pending.events)
            if pending.transitions:
                tx.many(_INSERT_TRANSITION, pending.transitions)
            if pending.notes:
                tx.many(_INSERT_NOTE, pending.notes)
        for op, result in zip(ops, results, strict=True):
            if isinstance(op, AppendEvents) and isinstance(result, list):
                result[:] = [(p, dataclasses.replace(ev, position=positions[(ev.job_id, ev.seq)]))
                             if p is Placed.STORED else (p, ev) for p, ev in result]  # fmt: skip

        return results

    def _op(self, tx: Tx, pending: _Pending, op: WriteOp) -> WriteResult:
        if isinstance(op, CreateJob):
            return self._create(tx, pending, op.job, op.lease_ttl)
        if isinstance(op, UpdateJob):
            return self._update(tx, pending, op)
        return self._append(tx, pending, op.events, op.legacy)

    def _insert_events(
        self, tx: Tx, events: list[tuple[JobEvent, int]]
    ) -> dict[tuple[str, int], int]:
        """Give every queued event its tenant position (tenants in sorted order, see the
        module docstring) and insert them all; return each one's position by
        ``(job_id, seq)``."""
        positions: dict[tuple[str, int], int] = {}
        if not events:
            return positions
        by_tenant: dict[str, list[tuple[JobEvent, int]]] = defaultdict(list)
        for ev, seq in events:
            by_tenant[ev.tenant_id].append((ev, seq))
        rows: list[list[Any]] = []
        for tenant in sorted(by_tenant):
            evs = by_tenant[tenant]
            last = tx.rows(
                "INSERT INTO tenants (tenant_id, created_at, event_position) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant_id) DO UPDATE SET "
                "event_position = tenants.event_position + excluded.event_position "
                "RETURNING event_position", tenant, tx.now(), len(evs),
            )[0]["event_position"]  # fmt: skip
            first = int(last) - len(evs) + 1
            for i, (ev, seq) in enumerate(evs):
                positions[(ev.job_id, seq)] = first + i
                row = c.event_to_row(ev)
                row["seq"], row["position"] = seq, first + i
                rows.append([row[col] for col in c.EVENT_COLUMNS])
        tx.many(_INSERT_EVENT, rows)
        return positions

    # --- tenant-facing -----------------------------------------------------------------

    def create_job(self, job: Job, lease_ttl: float) -> tuple[Job, bool]:
        return cast(tuple[Job, bool], unwrap(self.write_batch([CreateJob(job, lease_ttl)])[0]))

    def _create(self, tx: Tx, pending: _Pending, job: Job, ttl: float) -> tuple[Job, bool]:
        now = tx.now()
        stored = c.new_job(job, now, ttl)
        self._ensure_tenant(tx, job.tenant_id, now)
        row = c.job_to_row(stored)
        inserted = tx.rows(_INSERT_JOB, *(row[col] for col in c.JOB_COLUMNS))
        if not inserted:  # the request id is taken: that job is the answer
            existing = self._by_request_id(tx, job.tenant_id, job.request_id)
            if existing is None:
                raise Conflict(f"job {job.job_id} already exists")
            return existing, False
        first, submitted = c.created(stored, now)
        pending.record([first], 0)
        pending.add([submitted], 1)
        return stored, True

    def _ensure_tenant(self, tx: Tx, tenant_id: str, now: datetime) -> None:
        """The tenant row the job's foreign key needs. A plain read first, which never
        waits: a tenant row is locked by every event commit of that tenant, and an
        ``INSERT ... ON CONFLICT`` may wait for such a lock. Tenants are never deleted, so
        one seen once is remembered."""
        if tenant_id in self._tenants_seen:
            return
        if not tx.rows("SELECT 1 AS one FROM tenants WHERE tenant_id = ?", tenant_id):
            tx.run("INSERT INTO tenants (tenant_id, created_at, event_position) VALUES (?, ?, 0) "
                   "ON CONFLICT (tenant_id) DO NOTHING", tenant_id, now)  # fmt: skip
        if len(self._tenants_seen) < 100_000:
            self._tenants_seen.add(tenant_id)

    def _by_request_id(self, tx: Tx, tenant_id: str, request_id: str) -> Job | None:
        if not request_id:
            return None
        rows = tx.rows(f"{_SELECT_JOB} WHERE tenant_id = ? AND request_id = ?",
                       tenant_id, request_id)  # fmt: skip
        return c.job_from_row(rows[0]) if rows else None

    def get_job(self, tenant_id: str, job_id: str) -> Job:
        with self._tx(write=False) as tx:
            return self._tenant_job(tx, tenant_id, job_id)

    def _tenant_job(self, tx: Tx, tenant_id: str, job_id: str) -> Job:
        rows = tx.rows(f"{_SELECT_JOB} WHERE tenant_id = ? AND job_id = ?", tenant_id, job_id)
        if not rows:
            raise NotFound.job(job_id)
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
                raise NotFound.job(job_id)
            return c.job_from_row(rows[0])

    def delete_job(self, tenant_id: str, job_id: str) -> None:
        with self._tx() as tx:
            rows = tx.rows(f"SELECT job_id FROM jobs WHERE tenant_id = ? AND job_id = ?"
                           f"{self.for_update}", tenant_id, job_id)  # fmt: skip
            if not rows:
                raise NotFound.job(job_id)
            for table in ("job_events", "job_transitions", "job_output"):
                tx.run(f"DELETE FROM {table} WHERE job_id = ?", job_id)
            tx.run("DELETE FROM notifications WHERE notification_id = ? AND tenant_id = ?",
                   c.notification_id(job_id), tenant_id)  # fmt: skip
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
        self, tenant_id: str, job_id: str, after_seq: int, limit: int
    ) -> list[JobEvent]:
        with self._tx(write=False) as tx:
            rows = tx.rows(f"SELECT {_EVENT_COLS} FROM job_events WHERE job_id = ? "
                           "AND tenant_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                           job_id, tenant_id, after_seq, limit)  # fmt: skip
        return [c.event_from_row(r) for r in rows]

    def list_tenant_events(
        self, tenant_id: str, after_position: int, limit: int
    ) -> list[JobEvent]:
        with self._tx(write=False) as tx:
            rows = tx.rows(f"SELECT {_EVENT_COLS} FROM job_events WHERE tenant_id = ? "
                           "AND position > ? ORDER BY position LIMIT ?",
                           tenant_id, after_position, limit)  # fmt: skip
        return [c.event_from_row(r) for r in rows]

    def has_active_jobs(self, tenant_id: str) -> bool:
        with self._tx(write=False) as tx:
            return bool(tx.rows(f"SELECT 1 AS one FROM jobs WHERE tenant_id = ? AND {_ACTIVE_IN} "
                                "LIMIT 1", tenant_id))  # fmt: skip

    def output_offsets(self, job_id: str) -> OutputOffsets:
        with self._tx(write=False) as tx:
            return self._cursors(tx, job_id)

    # Both reads are index range scans of the tenant's rows (``notifications_tenant``,
    # and ``notifications_unread`` for the unread ones and their count); ``is_read`` is
    # compared with a literal, as a bound parameter would hide from the planner which
    # part of the index to read.
    def list_notifications(
        self, tenant_id: str, limit: int, unread_only: bool
    ) -> tuple[list[Notification], int]:
        unread = " AND is_read = FALSE" if unread_only else ""
        with self._tx(write=False) as tx:
            rows = tx.rows(f"SELECT {_NOTE_COLS} FROM notifications WHERE tenant_id = ?{unread} "
                           "ORDER BY occurred_at DESC, notification_id DESC LIMIT ?",
                           tenant_id, max(limit, 0))  # fmt: skip
            count = tx.rows("SELECT count(*) AS n FROM notifications WHERE tenant_id = ? "
                            "AND is_read = FALSE", tenant_id)[0]["n"]  # fmt: skip
        return [c.notification_from_row(r) for r in rows], int(count)

    def ack_notification(self, tenant_id: str, notification_id: str) -> None:
        with self._tx() as tx:
            if not tx.run("UPDATE notifications SET is_read = TRUE WHERE tenant_id = ? "
                          "AND notification_id = ?", tenant_id, notification_id):  # fmt: skip
                raise c.notification_not_found(notification_id)

    @staticmethod
    def _cursors(tx: Tx, job_id: str) -> OutputOffsets:
        rows = tx.rows(f"SELECT {_OUTPUT_COLS} FROM job_output WHERE job_id = ?", job_id)
        return {(r["attempt"], r["task_index"], r["stream"]): r["delivered_end"] for r in rows}

    def append_execution_events(
        self, events: Sequence[JobEvent], legacy: bool = False
    ) -> list[tuple[Placed, JobEvent]]:
        result = unwrap(self.write_batch([AppendEvents(tuple(events), legacy)])[0])
        return cast(list[tuple[Placed, JobEvent]], result)

    def _append(
        self, tx: Tx, pending: _Pending, events: Sequence[JobEvent], legacy: bool
    ) -> list[tuple[Placed, JobEvent]]:
        out: list[tuple[Placed, JobEvent] | None] = [None] * len(events)
        by_job: dict[str, list[int]] = defaultdict(list)
        for i, ev in enumerate(events):
            by_job[ev.job_id].append(i)
        for job_id in sorted(by_job):  # one lock order for every writer
            idxs = by_job[job_id]
            rows = tx.rows(f"{_SELECT_JOB} WHERE job_id = ?{self.for_update}", job_id)
            job = c.job_from_row(rows[0]) if rows else None
            cursors = self._cursors(tx, job_id) if job else {}
            keys = sorted({events[i].dedup_key for i in idxs if events[i].dedup_key})
            seen: set[str] = set()
            if job and keys:
                marks = ", ".join("?" for _ in keys)
                seen = {r["dedup_key"] for r in tx.rows(
                    f"SELECT dedup_key FROM job_events WHERE job_id = ? AND dedup_key IN ({marks})",
                    job_id, *keys)}  # fmt: skip
            before = dict(cursors)
            stored: list[int] = []
            for i in idxs:
                placed = c.place(job, events[i], cursors, seen, legacy=legacy)
                out[i] = (placed, events[i])
                if placed is Placed.STORED:
                    stored.append(i)
            if not stored:
                continue
            last = tx.rows("UPDATE jobs SET event_seq = event_seq + ? WHERE job_id = ? "
                           "RETURNING event_seq", len(stored), job_id)[0]["event_seq"]  # fmt: skip
            seqs = pending.add([events[i] for i in stored], int(last))
            for i, seq in zip(stored, seqs, strict=True):
                out[i] = (Placed.STORED, dataclasses.replace(events[i], seq=seq))
            self._save_cursors(tx, job_id, before, cursors)
        return [o for o in out if o is not None]

    @staticmethod
    def _save_cursors(
        tx: Tx, job_id: str, before: OutputOffsets, after: OutputOffsets
    ) -> None:
        for (attempt, task, stream), end in after.items():
            if before.get((attempt, task, stream)) != end:
                tx.run(f"INSERT INTO job_output ({_OUTPUT_COLS}) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (job_id, attempt, task_index, stream) DO UPDATE SET "
                       "delivered_end = excluded.delivered_end",
                       job_id, attempt, task, stream, end)  # fmt: skip

    # --- owner-facing, fenced ----------------------------------------------------------

    def update_job(self, job_id: str, lease: Lease, patch: JobPatch, reason: str = "") -> Job:
        op = UpdateJob(job_id, lease, patch, reason)
        return cast(Job, unwrap(self.write_batch([op])[0]))

    def _update(
        self, tx: Tx, pending: _Pending, op: UpdateJob
    ) -> Job:
        now = tx.now()
        if op.expected is not None and op.expected.lease == op.lease:
            done = self._write_update(tx, pending, op.expected, op, now, optimistic=True)
            if done is not None:
                return done
        rows = tx.rows(f"{_SELECT_JOB} WHERE job_id = ?{self.for_update}", op.job_id)
        job = c.check_lease(c.job_from_row(rows[0]) if rows else None, op.lease)
        done = self._write_update(tx, pending, job, op, now, optimistic=False)
        assert done is not None
        return done

    def _write_update(
        self, tx: Tx, pending: _Pending, job: Job, op: UpdateJob, now: datetime,
        optimistic: bool,
    ) -> Job | None:
        """Apply ``op`` to ``job`` and write it. ``optimistic``: ``job`` is the caller's
        copy, not read here; the write then holds only if the row is still that copy
        (None otherwise, and nothing is written)."""
        updated, transitions, events = c.apply_patch(job, op.lease, op.patch, now, op.reason)
        changed = [col for col in _UPDATE_COLS if getattr(updated, col) != getattr(job, col)]
        sets = "".join(f"{col} = ?, " for col in changed)
        params: list[Any] = [c.column_value(col, getattr(updated, col)) for col in changed]
        params += [len(events), len(transitions), op.job_id]
        where = "job_id = ?"
        if optimistic:
            where += (" AND owner_worker_id = ? AND lease_version = ? AND status = ? "
                      "AND attempt = ? AND updated_at = ?")  # fmt: skip
            params += [job.owner_worker_id, job.lease_version, job.status.value, job.attempt,
                       job.updated_at]  # fmt: skip
        written = tx.rows(f"UPDATE jobs SET {sets}event_seq = event_seq + ?, "
                          f"transition_seq = transition_seq + ? WHERE {where} "
                          "RETURNING event_seq, transition_seq", *params)  # fmt: skip
        if not written:
            return None  # changed meanwhile (or gone): the caller reads it and decides
        if transitions:
            pending.record(transitions, int(written[0]["transition_seq"]))
        if events:
            pending.add(events, int(written[0]["event_seq"]))
        pending.notify(c.terminal_notification(job, updated, now))
        return updated

    def _fenced(self, leases: Sequence[tuple[str, Lease]], sql: str, *values: Any) -> set[str]:
        """Run ``sql`` (an UPDATE ... SET) on every job still held under its lease, in
        one statement per chunk: a round trip per lease made a hand-over of a few dozen
        jobs take hundreds of milliseconds on a busy worker (a GIL hand-off each time)."""
        done: set[str] = set()
        with self._tx() as tx:
            self._lock_jobs(tx, {job_id for job_id, _ in leases})
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
            # Pick (skipping rows other claimers hold: they stay locked until commit),
            # remembering who held each job (for its LEASE_CLAIMED event), then take over.
            picked = {r["job_id"]: r["owner_worker_id"] for r in tx.rows(
                f"SELECT job_id, owner_worker_id FROM jobs WHERE {_ACTIVE_IN} "
                "AND lease_expires_at <= ? ORDER BY lease_expires_at, job_id "
                f"LIMIT ?{self.skip_locked}", now, limit)}  # fmt: skip
            if not picked:
                return []
            rows = tx.rows(
                "UPDATE jobs SET owner_worker_id = ?, lease_version = lease_version + 1, "
                "lease_expires_at = ?, last_heartbeat_at = ?, updated_at = ?, "
                f"event_seq = event_seq + 1 WHERE job_id IN ({', '.join('?' for _ in picked)}) "
                f"RETURNING {_JOB_COLS}, event_seq",
                worker_id, now + timedelta(seconds=ttl), now, now, *picked,
            )  # fmt: skip
            pending = _Pending()
            claimed: list[Job] = []
            for row in sorted(rows, key=lambda r: (r["created_at"], r["job_id"])):
                job = c.job_from_row(row)
                pending.add([c.claimed_event(job, picked[job.job_id], now)],
                            int(row["event_seq"]))
                claimed.append(job)
            self._insert_events(tx, pending.events)
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


    # --- the v1 upgrade -----------------------------------------------------------------

    def _upgrade_v1(self, tx: Tx) -> int:
        """Number the events a v1 store left (no position): per job ``seq`` 1..n in v1
        order, positions per tenant in v1's tenant order (time, job, seq), counters and
        output offsets set to match. Idempotent; returns how many events it numbered."""
        rows = tx.rows(f"SELECT {_EVENT_COLS} FROM job_events WHERE position IS NULL "
                       "ORDER BY tenant_id, created_at, job_id, seq")  # fmt: skip
        if not rows:
            return 0
        by_job: dict[str, list[JobEvent]] = defaultdict(list)
        for r in rows:
            by_job[r["job_id"]].append(c.event_from_row(r))
        renumbered: dict[tuple[str, int], JobEvent] = {}
        for job_id, old in by_job.items():
            new, cursors = c.renumber_v1(old)
            for o, n in zip(sorted(old, key=lambda e: e.seq), new, strict=True):
                renumbered[(job_id, o.seq)] = n
            tx.run("UPDATE jobs SET event_seq = ? WHERE job_id = ?", len(new), job_id)
            self._save_cursors(tx, job_id, {}, cursors)
            tx.run("DELETE FROM job_events WHERE job_id = ?", job_id)
        # Positions: the v1 tenant-wide order, which the rows are already sorted in.
        queue = [renumbered[(r["job_id"], int(r["seq"]))] for r in rows]
        self._insert_events(tx, [(ev, ev.seq) for ev in queue])
        return len(queue)


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

"""The Cloud Spanner job store (google-cloud-spanner), schema in ``schema/spanner/``.

Jobs are interleaved in their Tenants row, transitions and events in their job. Every
write runs in a read-write transaction (``run_in_transaction``): it reads what it decides
on, so Spanner's serializable locking makes the decision and the write one atomic step;
a conflicting transaction is aborted and retried by the client, and then sees the new
state. That is what makes claims exclusive and fenced writes safe.

**Clock.** Lease times come from the database clock: each transaction first reads
``CURRENT_TIMESTAMP()`` and uses that value for every time it writes or compares, and
membership heartbeats are stamped the same way. Worker clocks play no part.

**Numbering.** Every event is numbered in the read-write transaction that inserts it:
``seq`` from its job's ``Jobs.event_seq`` (1-based, gapless), ``position`` from its
tenant's ``Tenants.event_position``. Both counters are read and written in that
transaction, so Spanner's locks serialize the writers of a job, and of a tenant: a
transaction that takes positions commits after every transaction whose positions it
read, which is what lets a watcher holding position P read ``position > P`` and never
miss a later commit. (Commit timestamps would avoid the tenant counter's contention,
but they are not an INT64 position a client can hold.) Positions are handed out at the
end of the transaction, tenant by tenant, once every op has passed its checks.

**Group commit.** ``write_batch`` runs its ops in one read-write transaction. Spanner
buffers mutations until commit, reads do not see them, and there are no savepoints; so
each op first reads and checks (``LeaseLost``, ``Conflict``), then records its writes in
a :class:`_Write`, where the later ops of the batch read them (a job created or updated
earlier, seqs handed out, dedup keys, output ends), and the mutations are buffered once
at the end. An op that fails its checks has recorded nothing and fails alone. What the
ops will need (the clock, their jobs, request ids, transition counts, output ends, dedup
keys, tenant counters) is read up front in one statement, so a batch of any size costs
one read and one commit on the usual path. Those reads take exclusive locks
(``LOCK_SCANNED_RANGES=exclusive``): the transaction writes what it reads, and two
writers of one tenant then queue on its counter instead of both holding a shared lock
until one is aborted at commit. The transaction function is re-run whole when Spanner
aborts it, and everything it decides lives in that run's :class:`_Write`.

**Tasks and notifications.** A job's task states are a BYTES column of its row (the
client takes and gives BYTES base64-encoded; ``_job_row`` and ``_job`` convert). The
notification of a job that an update moved into a terminal state is inserted by that
update's transaction (``_Write.flush``); notifications are interleaved in their tenant,
not their job, since an ack names only the notification.

**Migrations.** ``migrate()`` applies each ``*.sql`` file once with ``update_ddl`` and
records it in ``SchemaMigrations``. DDL cannot share a transaction with that row, so a
migrator that loses a race waits for the winner's record instead of failing. After the
files, :meth:`SpannerStore._upgrade_v1` numbers the events a v1 store left (DDL cannot
hold DML).

**Client workarounds** (google-cloud-spanner 3.71; each is applied in
:func:`_configure` / :meth:`SpannerStore._transact` and explained there):

* *Fail fast.* The generated client retries ``UNAVAILABLE`` for 30 s on most RPCs and for
  an hour on ``Commit``. A store that is down must surface as ``StoreUnavailable`` within
  seconds (the worker and gateway decide what to do then), so every RPC of the handle
  gets a retry budget of ``_UNAVAILABLE_BUDGET`` seconds and a per-call deadline.
* *Closing.* Multiplexed sessions (the library's default, one session for all
  transactions) are kept, but ``Database.close()`` joins a maintenance thread that sleeps
  ten minutes between checks, so it would block shutdown for up to ten minutes. The
  handle shortens that sleep to ``_SESSION_POLL`` seconds. (Turning multiplexed sessions
  off with ``GOOGLE_CLOUD_SPANNER_MULTIPLEXED_SESSIONS=false`` also avoids the thread, but
  is process-wide and falls back to a session pool that checks each pooled session with
  an extra ``GetSession`` RPC before every use; the emulator handles multiplexed sessions,
  concurrent read-write transactions included.)
* *Transactions.* ``Database.run_in_transaction`` leaves a thread-local "transaction
  running" flag set when getting the session fails (server down), and every later
  transaction on that thread then fails with "nested transactions". The store checks a
  session out itself and calls ``Session.run_in_transaction``.
* *Aborted transactions.* Without a retry delay from the server (Cloud Spanner sends one,
  the emulator does not) the client waits ``2**attempt`` seconds before running an
  aborted transaction again; the store passes a delay of a few milliseconds instead. (The
  emulator runs one read-write transaction at a time and aborts the others, so on it
  every concurrent writer is aborted often.)
* *Metrics.* The client's built-in metrics (a process-wide exporter to Cloud Monitoring)
  are disabled; Jennah exports its own.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import logging
import math
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

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
from database.migrate import Migration, dialect_migrations
from jennah.backoff import Backoff
from jennah.errors import Conflict, JennahError, NotFound, StoreError, StoreUnavailable
from jennah.models import (
    EventKind,
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
from jennah.settings import Env, StoreSettings

T = TypeVar("T")
_log = logging.getLogger(__name__)

_EXTRA = ("job_name", "label_pairs")
_COLS = (*c.JOB_COLUMNS, *_EXTRA)
# An update writes the key and what can change (the spec and its copies never do).
_UPDATE_COLS = (*(col for col in _COLS if col not in
                  {"spec", "request_id", "created_at", *_EXTRA}), "event_seq")  # fmt: skip
_SELECT = "SELECT " + ", ".join(c.JOB_COLUMNS) + " FROM Jobs"
# Write paths read the job with its event counter (last column).
_JOB_READ = ", ".join((*c.JOB_COLUMNS, "event_seq"))
_EVENT_COLS = ", ".join(c.EVENT_COLUMNS)  # POSITION is not reserved in GoogleSQL
_OUTPUT_ROW = ("tenant_id", *c.OUTPUT_COLUMNS)
_NOTE_COLS = ", ".join(c.NOTIFICATION_COLUMNS)
# The emulator rejects a query on a NULL_FILTERED index unless told that the query
# filters the NULLs out (these do); Cloud Spanner ignores the hint.
_NULLS_FILTERED = "@{spanner_emulator.disable_query_null_filtered_index_check=true} "
_ACTIVE = list(c.ACTIVE)
_TIMEOUT = 30.0  # seconds of retrying aborted transactions
# Seconds to wait before running an aborted transaction again when the server does not
# say (Cloud Spanner does, in RetryInfo; the emulator does not, and the client then
# waits 2**attempt seconds: seconds-long stalls for any contended tenant or job).
# (Drawn once per transaction: the client's own loop sleeps it, not a backoff of ours.)
_ABORT_DELAY = (0.002, 0.02)
# A transaction the emulator reported as "not found"/"invalid" instead of aborted is run
# again after a full-jitter backoff of this base and cap, until _TIMEOUT.
_LOST_TX_BASE = 0.001
_LOST_TX_CAP = 0.05
_MIGRATION_POLL = 0.2  # seconds between looks for a concurrent migrator's record
# Seams for the tests: every wait of the retry and poll loops here goes through _sleep,
# and every random choice of one through _random.
_sleep: Callable[[float], None] = time.sleep
_random: Callable[[], float] = random.random
_RPC_TIMEOUT = 10.0  # deadline of one RPC (a server that accepts but never answers)
_UNAVAILABLE_BUDGET = 1.5  # seconds of retrying UNAVAILABLE: a store that is down fails fast
_SESSION_POLL = timedelta(seconds=0.1)  # see _configure
_INSERT_RETRIES = 5  # runs of a batch that lost an insert race (see write_batch)
# The v1 upgrade: events renumbered per transaction (a commit holds at most 80,000
# mutations; an event row is about 15 with its indexes), and its record in
# SchemaMigrations once nothing is left to number.
_UPGRADE_CHUNK = 2000
_V1_DONE = "0002_events_v2.sql:v1-events-numbered"


def _abort_delay() -> float:
    """A delay in ``_ABORT_DELAY`` (uniform), for one transaction."""
    low, high = _ABORT_DELAY
    return low + (high - low) * _random()


def _retry() -> Any:
    from google.api_core import exceptions as gexc
    from google.api_core import retry

    return retry.Retry(
        predicate=retry.if_exception_type(gexc.ServiceUnavailable, gexc.ResourceExhausted),
        initial=0.02, maximum=0.5, multiplier=2.0, timeout=_UNAVAILABLE_BUDGET,
    )  # fmt: skip


def _configure(database: Any) -> None:
    """Bound the client's retries and make ``close()`` prompt (see the module docstring).

    Both reach into the client: the generated transport keeps one wrapped callable per
    RPC (``_wrapped_methods``, holding the default ``_retry`` and ``_timeout``) and
    offers no public way to change those defaults for the calls the library makes
    itself (sessions, begin, commit, rollback); the sessions manager reads its polling
    interval from an attribute. Nothing here opens a connection.
    """
    transport = database.spanner_api.transport
    for wrapped in transport._wrapped_methods.values():
        if getattr(wrapped, "_retry", None) is not None:
            wrapped._retry = _retry()
        if hasattr(wrapped, "_timeout"):
            wrapped._timeout = _RPC_TIMEOUT
    database.sessions_manager._MAINTENANCE_THREAD_POLLING_INTERVAL = _SESSION_POLL


def _plain(value: Any) -> Any:
    """Spanner's DatetimeWithNanoseconds as a plain aware datetime (µs precision)."""
    if isinstance(value, datetime):
        return datetime(value.year, value.month, value.day, value.hour, value.minute,
                        value.second, value.microsecond, tzinfo=UTC)  # fmt: skip
    return value


def _label_pair(key: str, value: str) -> str:
    return json.dumps([key, value], separators=(",", ":"))


def _job_row(job: Job) -> dict[str, Any]:
    row = c.job_to_row(job)
    row["spec"] = json.dumps(row["spec"], separators=(",", ":"))
    if row["tasks"] is not None:  # the client takes BYTES values base64-encoded
        row["tasks"] = base64.b64encode(row["tasks"])
    row["request_id"] = row["request_id"] or None
    row["job_name"] = job.spec.name
    row["label_pairs"] = sorted(_label_pair(k, v) for k, v in job.spec.labels.items())
    return row


def _job_values(job: Job) -> list[Any]:
    row = _job_row(job)
    return [row[col] for col in _COLS]


def _job(values: Sequence[Any]) -> Job:
    row = {col: _plain(v) for col, v in zip(c.JOB_COLUMNS, values, strict=True)}
    row["request_id"] = row["request_id"] or ""
    if row["tasks"] is not None:  # and gives them back base64-encoded
        row["tasks"] = base64.b64decode(row["tasks"])
    return c.job_from_row(row)


def _job_and_seq(values: Sequence[Any]) -> tuple[Job, int]:
    """A row of ``_JOB_READ``: the job and its ``event_seq``."""
    return _job(values[:-1]), int(values[-1])


def _event(values: Sequence[Any]) -> JobEvent:
    return c.event_from_row(dict(zip(c.EVENT_COLUMNS, map(_plain, values), strict=True)))


def _event_values(event: JobEvent) -> list[Any]:
    row = c.event_to_row(event)
    row["dedup_key"] = row["dedup_key"] or None  # NULL: not in the unique dedup index
    return [row[col] for col in c.EVENT_COLUMNS]


# Reads of write transactions. Each is a SELECT with parameter names of its own, so any
# of them can share one statement (``_Write.read``). Job ids are unique across tenants
# (JobsByJobId), so "tenant IN (...) AND job IN (...)" reads exactly the rows of those
# jobs, for any mix of tenants, by key.
_Q_JOBS = f"SELECT {_JOB_READ} FROM Jobs@{{FORCE_INDEX=JobsByJobId}} WHERE job_id IN UNNEST(@ids)"
_Q_REQUESTS = (
    f"SELECT {_JOB_READ} FROM Jobs@{{FORCE_INDEX=JobsByRequestId}} "
    "WHERE tenant_id IN UNNEST(@req_tenants) AND request_id IN UNNEST(@req_ids)"
)
_Q_LAST_IDX = ("SELECT job_id, MAX(idx) FROM JobTransitions WHERE tenant_id IN (SELECT "
               "tenant_id FROM Jobs@{FORCE_INDEX=JobsByJobId} WHERE job_id IN UNNEST(@moving)) "
               "AND job_id IN UNNEST(@moving) GROUP BY job_id")  # fmt: skip
_Q_OUTPUT = ("SELECT job_id, attempt, task_index, stream, delivered_end FROM JobOutput "
             "WHERE tenant_id IN UNNEST(@out_tenants) AND job_id IN UNNEST(@out_jobs)")  # fmt: skip
_Q_KEYS = ("SELECT job_id, dedup_key FROM JobEvents@{FORCE_INDEX=JobEventsByDedupKey} "
           "WHERE tenant_id IN UNNEST(@key_tenants) AND job_id IN UNNEST(@key_jobs) "
           "AND dedup_key IN UNNEST(@keys)")  # fmt: skip
_Q_TENANTS = "SELECT tenant_id, event_position FROM Tenants WHERE tenant_id IN UNNEST(@tenants)"
_Q_MOVING_TENANTS = ("SELECT tenant_id, event_position FROM Tenants WHERE tenant_id IN "
                     "(SELECT tenant_id FROM Jobs@{FORCE_INDEX=JobsByJobId} "
                     "WHERE job_id IN UNNEST(@moving_jobs))")  # fmt: skip
_Q_EXPIRED = (f"SELECT {_JOB_READ} FROM Jobs@{{FORCE_INDEX=JobsByStatusLease}} "
              "WHERE status IN UNNEST(@active) AND lease_expires_at <= CURRENT_TIMESTAMP() "
              "ORDER BY lease_expires_at, job_id LIMIT @limit")  # fmt: skip
# Reads of write transactions take exclusive locks (see "Group commit" above).
_WRITE_HINTS = ("@{LOCK_SCANNED_RANGES=exclusive, "
                "spanner_emulator.disable_query_null_filtered_index_check=true} ")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Part:
    """One read of a write transaction: a SELECT, its parameters, and what to do with
    its rows (fill the :class:`_Write`'s caches)."""

    sql: str
    params: dict[str, Any]
    take: Callable[[list[list[Any]]], None]


class _Write:
    """The state of one read-write transaction of writes (see "Group commit" in the
    module docstring): what it read, what its ops decided, and, in :meth:`flush`, the
    mutations that carry it out. Reads fill caches and never overwrite what an op
    recorded; an op records its changes only after its checks passed, so a failed op
    leaves nothing behind."""

    def __init__(self, store: SpannerStore, tx: Any) -> None:
        self._store = store
        self._tx = tx
        self.now = c.EPOCH  # the database clock, set by the first read
        # job_id -> (job, event_seq) as this transaction now has it; None: no such job.
        self.jobs: dict[str, tuple[Job, int] | None] = {}
        self.inserted: set[str] = set()  # jobs created here
        self.changed: set[str] = set()  # stored jobs updated here
        self.by_request: dict[tuple[str, str], str | None] = {}  # (tenant, request id) -> job
        self.next_idx: dict[str, int] = {}  # the job's next transition index
        self.transitions: list[tuple[str, int, Transition]] = []  # (tenant, idx, transition)
        self.cursors: dict[str, OutputOffsets] = {}  # output ends, as this transaction has them
        self.stored_cursors: dict[str, OutputOffsets] = {}  # as read
        self.keys: dict[str, set[str]] = {}  # dedup keys each job is known to have
        self.looked_up: dict[str, set[str]] = {}  # dedup keys already looked up, per job
        self.positions: dict[str, int | None] = {}  # tenant counters read; None: no row
        self.events: list[JobEvent] = []  # numbered (seq), positions come in flush()
        self.notes: list[Notification] = []  # of the jobs that moved into a terminal state

    # --- reads -------------------------------------------------------------------------

    def read(self, *parts: _Part | None, clock: bool = False) -> None:
        """Run ``parts`` (and read the database clock) in one statement, one round trip:
        each part is an ``ARRAY(SELECT AS STRUCT ...)`` column of its single row."""
        todo = [p for p in parts if p is not None]
        if not todo and not clock:
            return
        cols = ["CURRENT_TIMESTAMP()"] if clock else []
        cols += [f"ARRAY({p.sql.replace('SELECT ', 'SELECT AS STRUCT ', 1)})" for p in todo]
        params = {k: v for p in todo for k, v in p.params.items()}
        [row] = self._store._rows(self._tx, f"{_WRITE_HINTS}SELECT {', '.join(cols)}",
                                  **params)  # fmt: skip
        if clock:
            self.now, row = _plain(row[0]), row[1:]
        for part, rows in zip(todo, row, strict=True):  # in order: jobs before the rest
            part.take([list(r) for r in rows])

    def _may_exist(self, job_id: str) -> bool:
        """Not known to be missing (not read yet, or read and found)."""
        return self.jobs.get(job_id, ()) is not None

    def _real(self, job_id: str) -> Job | None:
        """The job if it exists and was not created here (what is stored is known)."""
        row = self.jobs.get(job_id)
        return row[0] if row is not None and job_id not in self.inserted else None

    def jobs_part(self, job_ids: Iterable[str]) -> _Part | None:
        missing = sorted({j for j in job_ids if j not in self.jobs})
        if not missing:
            return None

        def take(rows: list[list[Any]]) -> None:
            for r in rows:
                job, seq = _job_and_seq(r)
                if self.jobs.get(job.job_id) is None:
                    self.jobs[job.job_id] = (job, seq)
            for job_id in missing:
                self.jobs.setdefault(job_id, None)

        return _Part(_Q_JOBS, {"ids": missing}, take)

    def requests_part(self, pairs: Iterable[tuple[str, str]]) -> _Part | None:
        missing = sorted({p for p in pairs if p[1] and p not in self.by_request})
        if not missing:
            return None

        def take(rows: list[list[Any]]) -> None:
            for r in rows:
                job, seq = _job_and_seq(r)
                self.by_request[(job.tenant_id, job.request_id)] = job.job_id
                if self.jobs.get(job.job_id) is None:
                    self.jobs[job.job_id] = (job, seq)
            for pair in missing:
                self.by_request.setdefault(pair, None)

        return _Part(_Q_REQUESTS, {"req_tenants": sorted({t for t, _ in missing}),
                                   "req_ids": sorted({r for _, r in missing})}, take)  # fmt: skip

    def last_idx_part(self, job_ids: Iterable[str]) -> _Part | None:
        wanted = sorted({j for j in job_ids if j not in self.next_idx
                         and j not in self.inserted and self._may_exist(j)})  # fmt: skip
        if not wanted:
            return None

        def take(rows: list[list[Any]]) -> None:
            last = {r[0]: int(r[1]) for r in rows}
            for job_id in wanted:
                if self._real(job_id) is not None:
                    self.next_idx.setdefault(job_id, last.get(job_id, -1) + 1)

        return _Part(_Q_LAST_IDX, {"moving": wanted}, take)

    def moving_tenants_part(self, job_ids: Iterable[str]) -> _Part | None:
        """The counters of the tenants of jobs an update will move (their tenants are
        not known before the jobs are read: a subquery finds them)."""
        wanted = sorted(set(job_ids))
        if not wanted:
            return None

        def take(rows: list[list[Any]]) -> None:
            for tenant, position in rows:
                self.positions.setdefault(tenant, int(position))

        return _Part(_Q_MOVING_TENANTS, {"moving_jobs": wanted}, take)

    def tenants_part(self, tenants: Iterable[str]) -> _Part | None:
        missing = sorted({t for t in tenants if t not in self.positions})
        if not missing:
            return None

        def take(rows: list[list[Any]]) -> None:
            for tenant, position in rows:
                self.positions.setdefault(tenant, int(position))
            for tenant in missing:
                self.positions.setdefault(tenant, None)

        return _Part(_Q_TENANTS, {"tenants": missing}, take)

    def output_part(self, wanted: dict[str, str]) -> _Part | None:
        """Output ends of the jobs ``wanted`` (job -> its tenant as the caller knows it:
        a job whose real tenant differs gets nothing read, and nothing marked known)."""
        wanted = {j: t for j, t in wanted.items() if j not in self.cursors
                  and j not in self.inserted and self._may_exist(j)}  # fmt: skip
        if not wanted:
            return None

        def take(rows: list[list[Any]]) -> None:
            fresh = set()
            for job_id, tenant in wanted.items():
                job = self._real(job_id)
                if job is not None and job.tenant_id == tenant and job_id not in self.cursors:
                    self.cursors[job_id], self.stored_cursors[job_id] = {}, {}
                    fresh.add(job_id)
            for job_id, attempt, task, stream, end in rows:
                if job_id in fresh:
                    key = (int(attempt), int(task), stream)
                    self.cursors[job_id][key] = self.stored_cursors[job_id][key] = int(end)

        return _Part(_Q_OUTPUT, {"out_tenants": sorted(set(wanted.values())),
                                 "out_jobs": sorted(wanted)}, take)  # fmt: skip

    def keys_part(self, wanted: dict[tuple[str, str], set[str]]) -> _Part | None:
        """Which of the dedup keys ``(job, tenant) -> keys`` the jobs have (tenants as in
        :meth:`output_part`)."""
        need = {(j, t): keys - self.looked_up.get(j, set()) for (j, t), keys in wanted.items()
                if j not in self.inserted and self._may_exist(j)}  # fmt: skip
        need = {jt: keys for jt, keys in need.items() if keys}
        if not need:
            return None

        def take(rows: list[list[Any]]) -> None:
            for (job_id, tenant), keys in need.items():
                job = self._real(job_id)
                if job is not None and job.tenant_id == tenant:
                    self.looked_up.setdefault(job_id, set()).update(keys)
            for job_id, key in rows:
                job = self._real(job_id)
                if job is not None and (job_id, job.tenant_id) in need:
                    self.keys.setdefault(job_id, set()).add(key)

        return _Part(_Q_KEYS, {"key_tenants": sorted({t for _, t in need}),
                               "key_jobs": sorted({j for j, _ in need}),
                               "keys": sorted(set().union(*need.values()))}, take)  # fmt: skip

    def prefetch(self, ops: Sequence[WriteOp]) -> None:
        """Read the clock and what ``ops`` will need, in one statement."""
        ids: set[str] = set()
        requests: set[tuple[str, str]] = set()
        moving: set[str] = set()
        tenants: set[str] = set()
        outputs: dict[str, str] = {}
        keys: dict[tuple[str, str], set[str]] = defaultdict(set)
        for op in ops:
            if isinstance(op, CreateJob):
                ids.add(op.job.job_id)
                tenants.add(op.job.tenant_id)
                if op.job.request_id:
                    requests.add((op.job.tenant_id, op.job.request_id))
            elif isinstance(op, UpdateJob):
                ids.add(op.job_id)
                if op.patch.status is not None or op.patch.retry:
                    moving.add(op.job_id)
            else:
                for ev in op.events:
                    ids.add(ev.job_id)
                    tenants.add(ev.tenant_id)
                    if ev.kind is EventKind.OUTPUT:
                        outputs[ev.job_id] = ev.tenant_id
                    if ev.dedup_key:
                        keys[(ev.job_id, ev.tenant_id)].add(ev.dedup_key)
        self.read(self.requests_part(requests), self.jobs_part(ids),
                  self.last_idx_part(moving), self.output_part(outputs),
                  self.keys_part(keys), self.tenants_part(tenants),
                  self.moving_tenants_part(moving), clock=True)  # fmt: skip

    # --- what ops decide -------------------------------------------------------------

    def put(self, job: Job, event_seq: int) -> None:
        self.jobs[job.job_id] = (job, event_seq)
        if job.job_id not in self.inserted:
            self.changed.add(job.job_id)

    def add_events(self, job_id: str, events: Sequence[JobEvent]) -> list[JobEvent]:
        """Number ``events`` of the job (its next seqs) and queue them for insertion."""
        row = self.jobs[job_id]
        assert row is not None
        job, last = row
        numbered = [dataclasses.replace(ev, seq=last + i) for i, ev in enumerate(events, 1)]
        self.put(job, last + len(numbered))
        self.events += numbered
        self.keys.setdefault(job_id, set()).update(e.dedup_key for e in numbered if e.dedup_key)
        return numbered

    def create(self, job: Job, ttl: float) -> tuple[Job, bool]:
        if job.request_id:
            self.read(self.requests_part([(job.tenant_id, job.request_id)]))
            existing = self.by_request[(job.tenant_id, job.request_id)]
            if existing is not None:
                row = self.jobs[existing]
                assert row is not None
                return dataclasses.replace(row[0]), False
        self.read(self.jobs_part([job.job_id]))
        if self.jobs[job.job_id] is not None:
            raise Conflict(f"job {job.job_id} already exists")
        stored = c.new_job(job, self.now, ttl)
        first, submitted = c.created(stored, self.now)
        self.inserted.add(job.job_id)
        self.put(stored, 0)
        if job.request_id:
            self.by_request[(job.tenant_id, job.request_id)] = job.job_id
        self.transitions.append((job.tenant_id, 0, first))
        self.next_idx[job.job_id] = 1
        self.cursors[job.job_id], self.stored_cursors[job.job_id] = {}, {}
        self.add_events(job.job_id, [submitted])
        return dataclasses.replace(stored), True

    def update(self, job_id: str, lease: Lease, patch: JobPatch, reason: str) -> Job:
        self.read(self.jobs_part([job_id]))
        row = self.jobs[job_id]
        job = c.check_lease(row[0] if row else None, lease)
        updated, transitions, events = c.apply_patch(job, lease, patch, self.now, reason)
        if transitions:
            self.read(self.last_idx_part([job_id]))
        # Checked: from here on the op records its writes.
        assert row is not None
        self.put(updated, row[1])
        for t in transitions:
            self.transitions.append((job.tenant_id, self.next_idx[job_id], t))
            self.next_idx[job_id] += 1
        if events:
            self.add_events(job_id, events)
        note = c.terminal_notification(job, updated, self.now)
        if note is not None:
            self.notes.append(note)
        return dataclasses.replace(updated)

    def append(self, events: Sequence[JobEvent], legacy: bool) -> list[tuple[Placed, JobEvent]]:
        by_job: dict[str, list[int]] = defaultdict(list)
        for i, ev in enumerate(events):
            by_job[ev.job_id].append(i)
        self.read(self.jobs_part(by_job))
        live = {j: row[0].tenant_id for j in by_job if (row := self.jobs[j]) is not None}
        self.read(
            self.output_part({j: t for j, t in live.items()
                              if any(events[i].kind is EventKind.OUTPUT for i in by_job[j])}),
            self.keys_part({(j, t): {events[i].dedup_key for i in by_job[j] if events[i].dedup_key}
                            for j, t in live.items()}),
        )  # fmt: skip
        out: list[tuple[Placed, JobEvent]] = [(Placed.STALE, ev) for ev in events]
        for job_id, idxs in by_job.items():
            row = self.jobs[job_id]
            cursors = dict(self.cursors.get(job_id, {}))
            seen = set(self.keys.get(job_id, ()))
            stored: list[int] = []
            for i in idxs:
                placed = c.place(row[0] if row else None, events[i], cursors, seen,
                                 legacy=legacy)  # fmt: skip
                out[i] = (placed, events[i])
                if placed is Placed.STORED:
                    stored.append(i)
            if stored:
                self.cursors[job_id] = cursors
                numbered = self.add_events(job_id, [events[i] for i in stored])
                for i, ev in zip(stored, numbered, strict=True):
                    out[i] = (Placed.STORED, ev)
        return out

    # --- the end of the transaction ------------------------------------------------------

    def flush(self) -> dict[tuple[str, int], int]:
        """Give the queued events their positions and buffer every mutation; return the
        position of each event by ``(job_id, seq)``."""
        tx = self._tx
        by_tenant: dict[str, list[JobEvent]] = defaultdict(list)
        for ev in self.events:
            by_tenant[ev.tenant_id].append(ev)
        tenants = set(by_tenant)
        tenants |= {row[0].tenant_id for j in self.inserted if (row := self.jobs[j])}
        self.read(self.tenants_part(tenants))
        positions: dict[tuple[str, int], int] = {}
        event_rows: list[list[Any]] = []
        new_tenants, moved = [], []
        for tenant in sorted(tenants):
            have = self.positions[tenant]
            last = have or 0
            for ev in by_tenant[tenant]:
                last += 1
                positions[(ev.job_id, ev.seq)] = last
                event_rows.append(_event_values(dataclasses.replace(ev, position=last)))
            if have is None:
                new_tenants.append((tenant, self.now, last))
            elif by_tenant[tenant]:
                moved.append((tenant, last))
        if new_tenants:
            tx.insert("Tenants", ("tenant_id", "created_at", "event_position"), new_tenants)
        if moved:
            tx.update("Tenants", ("tenant_id", "event_position"), moved)
        inserted = [row for j in sorted(self.inserted) if (row := self.jobs[j]) is not None]
        if inserted:
            tx.insert("Jobs", (*_COLS, "event_seq"),
                      [[*_job_values(job), seq] for job, seq in inserted])  # fmt: skip
        updates = []
        for job_id in sorted(self.changed):
            row = self.jobs[job_id]
            assert row is not None
            values = {**_job_row(row[0]), "event_seq": row[1]}
            updates.append([values[col] for col in _UPDATE_COLS])
        if updates:
            tx.update("Jobs", _UPDATE_COLS, updates)
        if self.transitions:
            tx.insert("JobTransitions", (*c.TRANSITION_COLUMNS, "tenant_id"), [
                (t.job_id, idx, t.from_status.value if t.from_status else None,
                 t.to_status.value, t.at, t.reason, t.worker_id, tenant)
                for tenant, idx, t in self.transitions])  # fmt: skip
        if event_rows:
            tx.insert("JobEvents", c.EVENT_COLUMNS, event_rows)
        if self.notes:
            rows = [c.notification_to_row(n) for n in self.notes]
            tx.insert("Notifications", c.NOTIFICATION_COLUMNS,
                      [[r[col] for col in c.NOTIFICATION_COLUMNS] for r in rows])  # fmt: skip
        output = []
        for job_id, cursors in sorted(self.cursors.items()):
            row = self.jobs.get(job_id)
            before = self.stored_cursors.get(job_id, {})
            if row is not None:
                output += [(row[0].tenant_id, job_id, attempt, task, stream, end)
                           for (attempt, task, stream), end in sorted(cursors.items())
                           if before.get((attempt, task, stream)) != end]  # fmt: skip
        if output:
            tx.insert_or_update("JobOutput", _OUTPUT_ROW, output)
        return positions


def _upgrade_steps(plan: Sequence[Sequence[Any]]) -> list[tuple[str, list[tuple[str, int]]]]:
    """Transactions of the v1 upgrade from ``(tenant, job, unnumbered events, first
    event time)`` rows: per tenant, jobs in the order of their first event, whole jobs
    together up to ``_UPGRADE_CHUNK`` events, a longer job alone, in slices of its
    oldest events. Each step is ``(tenant, [(job, how many events to number)])``."""
    by_tenant: dict[str, list[tuple[datetime, str, int]]] = defaultdict(list)
    for tenant, job_id, count, first in plan:
        by_tenant[tenant].append((_plain(first), job_id, int(count)))
    steps: list[tuple[str, list[tuple[str, int]]]] = []
    for tenant in sorted(by_tenant):
        chunk: list[tuple[str, int]] = []
        size = 0
        for _, job_id, count in sorted(by_tenant[tenant]):
            if chunk and size + count > _UPGRADE_CHUNK:
                steps.append((tenant, chunk))
                chunk, size = [], 0
            if count > _UPGRADE_CHUNK:
                steps += [(tenant, [(job_id, _UPGRADE_CHUNK)])] * math.ceil(count / _UPGRADE_CHUNK)
                continue
            chunk.append((job_id, count))
            size += count
        if chunk:
            steps.append((tenant, chunk))
    return steps


@dataclasses.dataclass(frozen=True)
class SpannerSettings:
    """``DB_PROVIDER=spanner``'s variables."""

    project: str  # DB_PROJECT_ID
    instance: str  # DB_INSTANCE
    database: str  # DB_DATABASE
    emulator_host: str = ""  # SPANNER_EMULATOR_HOST

    @classmethod
    def from_env(cls, e: Env) -> SpannerSettings:
        e.require(("DB_PROJECT_ID", "DB_INSTANCE", "DB_DATABASE"), "DB_PROVIDER=spanner")
        return cls(e.text("DB_PROJECT_ID"), e.text("DB_INSTANCE"), e.text("DB_DATABASE"),
                   e.text("SPANNER_EMULATOR_HOST"))


class SpannerStore:
    """Jobs in Cloud Spanner; leases on the database clock, claims in RW transactions."""

    name = "spanner"
    settings_class = SpannerSettings

    def __init__(self, database: Any, client: Any = None) -> None:
        _configure(database)
        self._db = database
        self._client = client
        self._closed = False

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> SpannerStore:
        s = settings.read(SpannerSettings.from_env)  # before the SDK is imported
        from google.cloud import spanner

        if s.emulator_host:
            from google.auth import credentials

            anonymous: Any = credentials.AnonymousCredentials  # untyped in google-auth
            client: Any = spanner.Client(
                project=s.project, credentials=anonymous(),
                client_options={"api_endpoint": s.emulator_host},
                disable_builtin_metrics=True,
            )  # fmt: skip
        else:
            client = spanner.Client(project=s.project, disable_builtin_metrics=True)
        instance = client.instance(s.instance)
        return cls(instance.database(s.database), client)

    # --- plumbing ----------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        from google.api_core import exceptions as gexc

        try:
            yield
        except (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.RetryError,
                gexc.Aborted, gexc.InternalServerError, gexc.Unknown) as exc:  # fmt: skip
            raise StoreUnavailable(f"spanner: {exc}") from exc
        except gexc.GoogleAPIError as exc:
            raise StoreError(f"spanner: {exc}") from exc

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(tx, now, *args)`` in a read-write transaction, retried when aborted;
        ``now`` is the database clock, read first."""

        def body(tx: Any) -> T:
            now = _plain(self._rows(tx, "SELECT CURRENT_TIMESTAMP()")[0][0])
            return fn(tx, now, *args)

        return self._transact(body)

    def _transact(self, body: Callable[[Any], T]) -> T:
        """``body(tx)`` in a read-write transaction, run again whole when aborted."""
        from google.api_core import exceptions as gexc
        from google.cloud.spanner_v1.database_sessions_manager import TransactionType

        sessions = self._db.sessions_manager
        with self._errors():
            deadline = time.monotonic() + _TIMEOUT
            for attempt in itertools.count():
                try:
                    # Not Database.run_in_transaction: see the module docstring.
                    session = sessions.get_session(TransactionType.READ_WRITE)
                    try:
                        result: T = session.run_in_transaction(
                            body, timeout_secs=_TIMEOUT,
                            default_retry_delay=_abort_delay())  # fmt: skip
                    finally:
                        sessions.put_session(session)
                    return result
                except (gexc.NotFound, gexc.FailedPrecondition) as exc:
                    # The emulator sometimes reports a transaction it aborted for a
                    # concurrent one as "not found" / "invalid" instead of ABORTED.
                    if "ransaction" not in str(exc) or time.monotonic() > deadline:
                        raise
                    _sleep(Backoff(_LOST_TX_BASE, _LOST_TX_CAP, _random).delay(attempt))
            raise AssertionError("unreachable")

    def _read(self, sql: str, **params: Any) -> list[list[Any]]:
        with self._errors(), self._db.snapshot() as snap:
            return self._rows(snap, sql, **params)

    @staticmethod
    def _rows(reader: Any, sql: str, **params: Any) -> list[list[Any]]:
        from google.cloud.spanner_v1 import param_types

        # Arrays need a declared element type; scalars are inferred from their values.
        array: Any = param_types.Array
        types = {
            k: array(param_types.INT64 if v and isinstance(v[0], int)
                                 else param_types.STRING)
            for k, v in params.items() if isinstance(v, list)
        }  # fmt: skip
        result = reader.execute_sql(sql, params=params or None, param_types=types or None,
                                    retry=_retry(), timeout=_RPC_TIMEOUT)  # fmt: skip
        return [list(r) for r in result]

    def _tenant_job(self, reader: Any, tenant_id: str, job_id: str) -> Job:
        rows = self._rows(reader, f"{_SELECT} WHERE tenant_id = @t AND job_id = @j",
                          t=tenant_id, j=job_id)  # fmt: skip
        if not rows:
            raise NotFound.job(job_id)
        return _job(rows[0])

    # --- schema ------------------------------------------------------------------------

    def _applied(self) -> set[str] | None:
        tables = self._read(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = '' AND table_name = 'SchemaMigrations'")  # fmt: skip
        if not tables:
            return None
        return {r[0] for r in self._read("SELECT name FROM SchemaMigrations")}

    def migrate(self, migrations: Sequence[Migration] | None = None) -> list[str]:
        """Apply pending migrations (default: the ``spanner`` schema files), then number
        any events a v1 store left without positions (:meth:`_upgrade_v1`)."""
        from google.api_core import exceptions as gexc

        pending = dialect_migrations("spanner") if migrations is None else migrations
        done: list[str] = []
        for migration in sorted(pending, key=lambda m: m.name):
            if migration.name in (self._applied() or set()):
                continue
            # Spanner DDL takes neither comments nor ";": strip both (our files keep
            # "--" and ";" out of string literals).
            sql = re.sub(r"--[^\n]*", "", migration.sql)
            statements = [s.strip() for s in sql.split(";") if s.strip()]
            try:
                self._db.update_ddl(statements).result(timeout=300)
            except (gexc.FailedPrecondition, gexc.AlreadyExists):
                # "Duplicate name": a concurrent migrator is applying this file.
                self._wait_recorded(migration.name)
                continue
            except gexc.GoogleAPIError as exc:
                raise StoreError(f"spanner migration {migration.name}: {exc}") from exc
            if self._run(self._record_migration, migration.name):
                done.append(migration.name)
        if migrations is None:
            self._upgrade_v1()
        return done

    def _record_migration(self, tx: Any, now: datetime, name: str) -> bool:
        """Record ``name`` as applied; False if a concurrent migrator recorded it first
        (DDL that is idempotent, such as relaxing NOT NULL, succeeds for both)."""
        if self._rows(tx, "SELECT name FROM SchemaMigrations WHERE name = @name", name=name):
            return False
        tx.insert("SchemaMigrations", ("name", "applied_at"), [(name, now)])
        return True

    def _wait_recorded(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while name not in (self._applied() or set()):
            if time.monotonic() > deadline:
                raise StoreError(f"spanner migration {name} failed and nobody recorded it")
            _sleep(_MIGRATION_POLL)

    # --- the v1 upgrade -----------------------------------------------------------------

    def _upgrade_v1(self) -> int:
        """Number the events a v1 store left (no position) as ``SqlStore._upgrade_v1``
        does: per job ``seq`` 1..n in v1 order (``_common.renumber_v1``: attempts from
        RETRY events, dedup keys ``v1:<old seq>``), positions per tenant in v1's order
        (time, job, seq), and ``event_seq`` and the output ends to match. Returns how
        many events it numbered.

        Unlike the SQL stores it cannot do it in one transaction (a commit holds at most
        80,000 mutations): :func:`_upgrade_steps` cuts the work into transactions of whole
        jobs, a long job into slices of its oldest events. Each transaction reads again
        what is still unnumbered, so a crash, a second run or a concurrent migrator is
        harmless. Positions follow v1's order within a transaction and the order of the
        jobs' first events across transactions. Once nothing is left, a row in
        SchemaMigrations records it and later start-ups skip the scan (v1 rows have no
        index to be found by)."""
        if self._read("SELECT name FROM SchemaMigrations WHERE name = @n", n=_V1_DONE):
            return 0
        total = 0
        before: list[tuple[str, str, int]] = []
        while plan := self._read(
            "SELECT tenant_id, job_id, COUNT(*), MIN(created_at) FROM JobEvents "
            "WHERE position IS NULL GROUP BY tenant_id, job_id"
        ):
            left = sorted((t, j, int(n)) for t, j, n, _ in plan)
            if left == before:  # a whole pass (ours or a concurrent migrator's) did nothing
                raise StoreError(f"spanner: v1 events the upgrade cannot number: {left[:5]}")
            before = left
            total += sum(self._run(self._renumber_v1, tenant, jobs)
                         for tenant, jobs in _upgrade_steps(plan))  # fmt: skip
        self._run(lambda tx, now: tx.insert_or_update(
            "SchemaMigrations", ("name", "applied_at"), [(_V1_DONE, now)]))
        if total:
            _log.info("spanner: numbered %d events written by v1", total)
        return total

    def _renumber_v1(
        self, tx: Any, now: datetime, tenant_id: str, jobs: list[tuple[str, int]]
    ) -> int:
        """One transaction of the upgrade: number the oldest ``n`` unnumbered events of
        each ``(job, n)`` of the tenant."""
        from google.cloud import spanner_v1

        keyset: Any = spanner_v1.KeySet
        rows = self._rows(tx, f"SELECT {_EVENT_COLS} FROM JobEvents WHERE tenant_id = @t "
                              "AND job_id IN UNNEST(@j)", t=tenant_id,
                          j=[job_id for job_id, _ in jobs])  # fmt: skip
        by_job: dict[str, list[JobEvent]] = defaultdict(list)
        for r in rows:
            ev = _event(r)
            by_job[ev.job_id].append(ev)
        queue: list[tuple[tuple[datetime, str, int], JobEvent]] = []
        gone: list[list[Any]] = []
        counters: list[tuple[str, str, int]] = []
        output: list[tuple[str, str, int, int, str, int]] = []
        for job_id, take in jobs:
            events = by_job.get(job_id, [])
            todo = sorted((e for e in events if not e.position), key=lambda e: e.seq)[:take]
            if not todo:
                continue  # done meanwhile (a concurrent migrator, an earlier run)
            # The job's earlier slices, back to their v1 numbers: numbering all of them
            # again gives the slice its seqs, attempts and output ends.
            done = [e for e in events if e.position]
            if not all(e.dedup_key.startswith("v1:") for e in done):
                raise StoreError(f"spanner: job {job_id} has v1 events after v2 ones")
            before = [dataclasses.replace(e, seq=int(e.dedup_key[3:])) for e in done]
            if before and max(e.seq for e in before) > todo[0].seq:
                raise StoreError(f"spanner: job {job_id} was numbered out of v1 order")
            new, cursors = c.renumber_v1(before + todo)
            fresh = new[len(before):]
            for old, ev in zip(todo, fresh, strict=True):
                queue.append(((old.created_at, job_id, old.seq), ev))
            reused = {ev.seq for ev in fresh}
            gone += [[tenant_id, job_id, old.seq] for old in todo if old.seq not in reused]
            counters.append((tenant_id, job_id, len(new)))
            output += [(tenant_id, job_id, attempt, task, stream, end)
                       for (attempt, task, stream), end in sorted(cursors.items())]  # fmt: skip
        if not queue:
            return 0
        last = int(self._rows(tx, "SELECT event_position FROM Tenants WHERE tenant_id = @t",
                              t=tenant_id)[0][0])  # fmt: skip
        values = []
        for _, ev in sorted(queue, key=lambda q: q[0]):
            last += 1
            values.append(_event_values(dataclasses.replace(ev, position=last)))
        if gone:
            tx.delete("JobEvents", keyset(keys=gone))
        tx.replace("JobEvents", c.EVENT_COLUMNS, values)  # new seqs may be old keys
        tx.update("Jobs", ("tenant_id", "job_id", "event_seq"), counters)
        if output:
            tx.insert_or_update("JobOutput", _OUTPUT_ROW, output)
        tx.update("Tenants", ("tenant_id", "event_position"), [(tenant_id, last)])
        return len(values)

    def ping(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        """Stop the session maintenance thread, delete the session, close the channels.

        Never raises: a store that is already down is closed all the same."""
        from google.api_core import exceptions as gexc

        if self._closed:
            return
        self._closed = True
        try:
            self._db.close()  # deletes the multiplexed session (bounded retries)
        except gexc.GoogleAPIError as exc:
            _log.debug("spanner: closing the session failed: %s", exc)
        # The library never closes its gRPC channels; close the ones it opened.
        apis = [self._db.spanner_api, getattr(self._client, "_database_admin_api", None),
                getattr(self._client, "_instance_admin_api", None)]  # fmt: skip
        for api in apis:
            if api is not None:
                api.transport.close()

    # --- group commit ------------------------------------------------------------------

    def write_batch(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """One transaction for all ``ops`` (see "Group commit" in the module docstring).
        If that transaction fails as a whole for a reason other than the store being
        down, each op gets a transaction of its own, so that one op cannot fail the
        others."""
        if not ops:
            return []
        return c.together_or_one_by_one(self._commit, ops)

    def _commit(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        from google.api_core.exceptions import AlreadyExists

        for _ in range(_INSERT_RETRIES):
            try:
                return self._transact(lambda tx: self._batch(tx, ops))
            except StoreError as exc:
                # A concurrent transaction inserted a row this one inserts too (a job
                # with the same request id, the tenant's first row): run again to read it.
                if isinstance(exc, StoreUnavailable) or not isinstance(exc.__cause__,
                                                                       AlreadyExists):  # fmt: skip
                    raise
        raise StoreUnavailable("spanner: the write kept losing insert races")

    def _batch(self, tx: Any, ops: Sequence[WriteOp]) -> list[WriteResult]:
        write = _Write(self, tx)
        write.prefetch(ops)  # and the clock
        results: list[WriteResult] = []
        for op in ops:
            try:
                if isinstance(op, CreateJob):
                    results.append(write.create(op.job, op.lease_ttl))
                elif isinstance(op, UpdateJob):
                    results.append(write.update(op.job_id, op.lease, op.patch, op.reason))
                else:
                    results.append(write.append(op.events, op.legacy))
            except JennahError as exc:  # the op's own checks, before it recorded anything
                results.append(exc)
        positions = write.flush()
        for op, result in zip(ops, results, strict=True):
            if isinstance(op, AppendEvents) and isinstance(result, list):
                result[:] = [(p, dataclasses.replace(ev, position=positions[(ev.job_id, ev.seq)]))
                             if p is Placed.STORED else (p, ev) for p, ev in result]  # fmt: skip
        return results

    # --- tenant-facing -----------------------------------------------------------------

    def create_job(self, job: Job, lease_ttl: float) -> tuple[Job, bool]:
        return cast(tuple[Job, bool], unwrap(self.write_batch([CreateJob(job, lease_ttl)])[0]))

    def get_job(self, tenant_id: str, job_id: str) -> Job:
        with self._errors(), self._db.snapshot() as snap:
            return self._tenant_job(snap, tenant_id, job_id)

    def list_jobs(self, tenant_id: str, flt: JobFilter, page_size: int, page_token: str) -> Page:
        where, params = ["tenant_id = @t"], {"t": tenant_id, "n": page_size + 1}
        if page_token:
            created_at, after_id = c.decode_page_token(page_token)
            where.append("(created_at < @ac OR (created_at = @ac AND job_id < @aj))")
            params.update(ac=created_at, aj=after_id)
        if flt.status is not None:
            where.append("status = @s")
            params["s"] = flt.status.value
        if flt.name_prefix:
            where.append("STARTS_WITH(job_name, @p)")
            params["p"] = flt.name_prefix
        for i, (k, v) in enumerate(sorted(flt.labels.items())):
            where.append(f"@l{i} IN UNNEST(label_pairs)")
            params[f"l{i}"] = _label_pair(k, v)
        rows = self._read(f"{_SELECT} WHERE {' AND '.join(where)} "
                          "ORDER BY created_at DESC, job_id DESC LIMIT @n", **params)  # fmt: skip
        jobs = [_job(r) for r in rows[:page_size]]
        return Page(jobs, c.page_token_after(jobs) if len(rows) > page_size else "")

    def request_cancel(self, tenant_id: str, job_id: str) -> Job:
        def tx_fn(tx: Any, now: datetime) -> Job:
            job = self._tenant_job(tx, tenant_id, job_id)
            tx.update("Jobs", ("tenant_id", "job_id", "cancel_requested", "updated_at"),
                      [(tenant_id, job_id, True, now)])  # fmt: skip
            job.cancel_requested, job.updated_at = True, now
            return job

        return self._run(tx_fn)

    def delete_job(self, tenant_id: str, job_id: str) -> None:
        from google.cloud import spanner_v1

        keyset: Any = spanner_v1.KeySet

        def tx_fn(tx: Any, now: datetime) -> None:
            self._tenant_job(tx, tenant_id, job_id)
            # Cascades to its transitions, events and output ends (interleaved); its
            # notification is the tenant's, found by its key.
            tx.delete("Jobs", keyset(keys=[[tenant_id, job_id]]))
            tx.delete("Notifications", keyset(keys=[[tenant_id, c.notification_id(job_id)]]))

        self._run(tx_fn)

    def list_transitions(self, tenant_id: str, job_id: str) -> list[Transition]:
        cols = ", ".join(f"`{col}`" for col in c.TRANSITION_COLUMNS)  # `at` is reserved
        with self._errors(), self._db.snapshot(multi_use=True) as snap:
            self._tenant_job(snap, tenant_id, job_id)
            rows = self._rows(snap, f"SELECT {cols} FROM JobTransitions WHERE tenant_id = @t "
                              "AND job_id = @j ORDER BY idx", t=tenant_id, j=job_id)  # fmt: skip
        return [c.transition_from_row(dict(zip(c.TRANSITION_COLUMNS, map(_plain, r), strict=True)))
                for r in rows]  # fmt: skip

    def list_events(
        self, tenant_id: str, job_id: str, after_seq: int, limit: int
    ) -> list[JobEvent]:
        rows = self._read(f"SELECT {_EVENT_COLS} FROM JobEvents WHERE tenant_id = @t "
                          "AND job_id = @j AND seq > @a ORDER BY seq LIMIT @n",
                          t=tenant_id, j=job_id, a=after_seq, n=max(limit, 0))  # fmt: skip
        return [_event(r) for r in rows]

    def list_tenant_events(
        self, tenant_id: str, after_position: int, limit: int
    ) -> list[JobEvent]:
        rows = self._read(
            f"{_NULLS_FILTERED}SELECT {_EVENT_COLS} "
            "FROM JobEvents@{FORCE_INDEX=JobEventsByPosition} WHERE tenant_id = @t "
            "AND position IS NOT NULL AND position > @p ORDER BY position LIMIT @n",
            t=tenant_id, p=after_position, n=max(limit, 0),
        )  # fmt: skip
        return [_event(r) for r in rows]

    def has_active_jobs(self, tenant_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM Jobs@{FORCE_INDEX=JobsByTenantStatus} "
                               "WHERE tenant_id = @t AND status IN UNNEST(@a) LIMIT 1",
                               t=tenant_id, a=_ACTIVE))  # fmt: skip

    def output_offsets(self, job_id: str) -> OutputOffsets:
        # The job's tenant (the key prefix) from JobsByJobId, then its JobOutput rows.
        rows = self._read(
            "SELECT attempt, task_index, stream, delivered_end FROM JobOutput "
            "WHERE tenant_id = (SELECT tenant_id FROM Jobs@{FORCE_INDEX=JobsByJobId} "
            "WHERE job_id = @j) AND job_id = @j", j=job_id)  # fmt: skip
        return {(int(a), int(t), s): int(end) for a, t, s, end in rows}

    def append_execution_events(
        self, events: Sequence[JobEvent], legacy: bool = False
    ) -> list[tuple[Placed, JobEvent]]:
        result = unwrap(self.write_batch([AppendEvents(tuple(events), legacy)])[0])
        return cast(list[tuple[Placed, JobEvent]], result)

    def list_notifications(
        self, tenant_id: str, limit: int, unread_only: bool
    ) -> tuple[list[Notification], int]:
        """Both reads in one snapshot, each a range of one index of the tenant's rows."""
        where, index = ("AND is_read = FALSE ", "NotificationsUnread") if unread_only else (
            "", "NotificationsByTime")  # fmt: skip
        with self._errors(), self._db.snapshot(multi_use=True) as snap:
            rows = self._rows(snap, f"SELECT {_NOTE_COLS} FROM Notifications@{{FORCE_INDEX="
                              f"{index}}} WHERE tenant_id = @t {where}ORDER BY occurred_at "
                              "DESC, notification_id DESC LIMIT @n",
                              t=tenant_id, n=max(limit, 0))  # fmt: skip
            [[unread]] = self._rows(snap, "SELECT COUNT(*) FROM Notifications@{FORCE_INDEX="
                                    "NotificationsUnread} WHERE tenant_id = @t AND "
                                    "is_read = FALSE", t=tenant_id)  # fmt: skip
        notes = [c.notification_from_row(dict(zip(c.NOTIFICATION_COLUMNS, map(_plain, r),
                                                  strict=True))) for r in rows]  # fmt: skip
        return notes, int(unread)

    def ack_notification(self, tenant_id: str, notification_id: str) -> None:
        def body(tx: Any) -> None:
            if not self._rows(tx, "SELECT 1 FROM Notifications WHERE tenant_id = @t AND "
                                  "notification_id = @i", t=tenant_id, i=notification_id):
                raise c.notification_not_found(notification_id)
            tx.update("Notifications", ("tenant_id", "notification_id", "is_read"),
                      [(tenant_id, notification_id, True)])  # fmt: skip

        self._transact(body)

    # --- owner-facing, fenced ----------------------------------------------------------

    def update_job(self, job_id: str, lease: Lease, patch: JobPatch, reason: str = "") -> Job:
        op = UpdateJob(job_id, lease, patch, reason)
        return cast(Job, unwrap(self.write_batch([op])[0]))

    def _fenced(self, leases: Sequence[tuple[str, Lease]], values: Callable[[datetime], dict[
            str, Any]]) -> set[str]:  # fmt: skip
        wanted = dict(leases)
        if not wanted:
            return set()

        def tx_fn(tx: Any, now: datetime) -> set[str]:
            rows = self._rows(
                tx, "SELECT tenant_id, job_id, owner_worker_id, lease_version "
                    "FROM Jobs@{FORCE_INDEX=JobsByJobId} WHERE job_id IN UNNEST(@ids)",
                ids=sorted(wanted))  # fmt: skip
            held = [(t, j) for t, j, owner, version in rows
                    if Lease(owner, int(version)) == wanted[j]]  # fmt: skip
            if held:
                sets = values(now)
                tx.update("Jobs", ("tenant_id", "job_id", *sets),
                          [(t, j, *sets.values()) for t, j in held])  # fmt: skip
            return {j for _, j in held}

        return self._run(tx_fn)

    def renew_leases(self, leases: Sequence[tuple[str, Lease]], ttl: float) -> set[str]:
        return self._fenced(leases, lambda now: {
            "lease_expires_at": now + timedelta(seconds=ttl), "last_heartbeat_at": now})

    def release_leases(self, leases: Sequence[tuple[str, Lease]]) -> int:
        return len(self._fenced(leases, lambda now: {"lease_expires_at": c.EPOCH}))

    def claim_expired(self, worker_id: str, ttl: float, limit: int) -> list[Job]:
        if limit <= 0:
            return []

        def body(tx: Any) -> list[Job]:
            write = _Write(self, tx)
            rows: list[list[Any]] = []
            # The clock and the expired jobs in one read; exclusive locks on the scanned
            # range make concurrent claimers queue instead of aborting each other.
            write.read(_Part(_Q_EXPIRED, {"active": _ACTIVE, "limit": limit}, rows.extend),
                       clock=True)  # fmt: skip
            now = write.now
            claimed = []
            for row in rows:
                job, event_seq = _job_and_seq(row)
                taken = dataclasses.replace(
                    job, owner_worker_id=worker_id, lease_version=job.lease_version + 1,
                    lease_expires_at=now + timedelta(seconds=ttl), last_heartbeat_at=now,
                    updated_at=now,
                )  # fmt: skip
                write.put(taken, event_seq)
                write.add_events(job.job_id, [c.claimed_event(taken, job.owner_worker_id, now)])
                claimed.append(dataclasses.replace(taken))
            write.flush()
            return claimed

        return self._transact(body)

    def list_owned_jobs(self, worker_id: str) -> list[Job]:
        rows = self._read(f"{_SELECT} WHERE owner_worker_id = @w AND status IN UNNEST(@a) "
                          "ORDER BY created_at, job_id", w=worker_id, a=_ACTIVE)  # fmt: skip
        return [_job(r) for r in rows]

    # --- membership --------------------------------------------------------------------

    def heartbeat_worker(self, worker_id: str, endpoint: str) -> None:
        # A transaction, not a blind batch write: the heartbeat time is the database
        # clock's CURRENT_TIMESTAMP(), read inside it like every other stamped time.
        self._run(lambda tx, now: tx.insert_or_update(
            "Workers", c.WORKER_COLUMNS, [(worker_id, endpoint, now)]))

    def list_workers(self, max_age_seconds: float) -> list[WorkerInfo]:
        rows = self._read(
            f"SELECT {', '.join(c.WORKER_COLUMNS)} FROM Workers WHERE heartbeat_at >= "
            "TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @us MICROSECOND) ORDER BY worker_id",
            us=int(max_age_seconds * 1_000_000))  # fmt: skip
        return [c.worker_from_row(dict(zip(c.WORKER_COLUMNS, map(_plain, r), strict=True)))
                for r in rows]  # fmt: skip

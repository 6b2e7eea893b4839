"""The Cloud Spanner job store (google-cloud-spanner), schema in ``schema/spanner/``.

Jobs are interleaved in their Tenants row, transitions and events in their job. Every
write runs in a read-write transaction (``run_in_transaction``): it reads what it decides
on, so Spanner's serializable locking makes the decision and the write one atomic step;
a conflicting transaction is aborted and retried by the client, and then sees the new
state. That is what makes claims exclusive and fenced writes safe.

**Clock.** Lease times come from the database clock: each transaction first reads
``CURRENT_TIMESTAMP()`` and uses that value for every time it writes or compares, and
membership heartbeats are stamped the same way. Worker clocks play no part.

**Migrations.** ``migrate()`` applies each ``*.sql`` file once with ``update_ddl`` and
records it in ``SchemaMigrations``. DDL cannot share a transaction with that row, so a
migrator that loses a race waits for the winner's record instead of failing.

**Client workarounds** (google-cloud-spanner 3.71; each is applied in
:func:`_configure` / :meth:`SpannerStore._run` and explained there):

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
* *Metrics.* The client's built-in metrics (a process-wide exporter to Cloud Monitoring)
  are disabled; Jennah exports its own.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from database import _common as c
from database.migrate import dialect_migrations
from jennah.errors import Conflict, NotFound, StoreError, StoreUnavailable
from jennah.models import Job, JobEvent, JobFilter, JobPatch, Lease, Page, Transition, WorkerInfo
from jennah.settings import StoreSettings

T = TypeVar("T")
_log = logging.getLogger(__name__)

_EXTRA = ("job_name", "label_pairs")
_COLS = (*c.JOB_COLUMNS, *_EXTRA)
_SELECT = "SELECT " + ", ".join(c.JOB_COLUMNS) + " FROM Jobs"
_BY_ID = "SELECT " + ", ".join(c.JOB_COLUMNS) + " FROM Jobs@{FORCE_INDEX=JobsByJobId}"
_ACTIVE = list(c.ACTIVE)
_TIMEOUT = 30.0  # seconds of retrying aborted transactions
_RPC_TIMEOUT = 10.0  # deadline of one RPC (a server that accepts but never answers)
_UNAVAILABLE_BUDGET = 1.5  # seconds of retrying UNAVAILABLE: a store that is down fails fast
_SESSION_POLL = timedelta(seconds=0.1)  # see _configure


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


def _job_values(job: Job) -> list[Any]:
    row = c.job_to_row(job)
    row["spec"] = json.dumps(row["spec"], separators=(",", ":"))
    row["request_id"] = row["request_id"] or None
    row["job_name"] = job.spec.name
    row["label_pairs"] = sorted(_label_pair(k, v) for k, v in job.spec.labels.items())
    return [row[col] for col in _COLS]


def _job(values: Sequence[Any]) -> Job:
    row = {col: _plain(v) for col, v in zip(c.JOB_COLUMNS, values, strict=True)}
    row["request_id"] = row["request_id"] or ""
    return c.job_from_row(row)


class SpannerStore:
    """Jobs in Cloud Spanner; leases on the database clock, claims in RW transactions."""

    name = "spanner"

    def __init__(self, database: Any, client: Any = None) -> None:
        _configure(database)
        self._db = database
        self._client = client
        self._closed = False

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> SpannerStore:
        from google.cloud import spanner

        if settings.spanner_emulator_host:
            from google.auth import credentials

            anonymous: Any = credentials.AnonymousCredentials  # untyped in google-auth
            client: Any = spanner.Client(
                project=settings.spanner_project, credentials=anonymous(),
                client_options={"api_endpoint": settings.spanner_emulator_host},
                disable_builtin_metrics=True,
            )  # fmt: skip
        else:
            client = spanner.Client(project=settings.spanner_project,
                                    disable_builtin_metrics=True)  # fmt: skip
        instance = client.instance(settings.spanner_instance)
        return cls(instance.database(settings.spanner_database), client)

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
        """``fn(tx, now, *args)`` in a read-write transaction, retried when aborted."""

        from google.api_core import exceptions as gexc
        from google.cloud.spanner_v1.database_sessions_manager import TransactionType

        def body(tx: Any) -> T:
            now = _plain(self._rows(tx, "SELECT CURRENT_TIMESTAMP()")[0][0])
            return fn(tx, now, *args)

        sessions = self._db.sessions_manager
        with self._errors():
            deadline = time.monotonic() + _TIMEOUT
            for attempt in itertools.count():
                try:
                    # Not Database.run_in_transaction: see the module docstring.
                    session = sessions.get_session(TransactionType.READ_WRITE)
                    try:
                        result: T = session.run_in_transaction(body, timeout_secs=_TIMEOUT)
                    finally:
                        sessions.put_session(session)
                    return result
                except (gexc.NotFound, gexc.FailedPrecondition) as exc:
                    # The emulator sometimes reports a transaction it aborted for a
                    # concurrent one as "not found" / "invalid" instead of ABORTED.
                    if "ransaction" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(min(0.001 * 2**attempt, 0.05) * random.random())
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

    def _by_id(self, tx: Any, job_id: str) -> Job | None:
        rows = self._rows(tx, f"{_BY_ID} WHERE job_id = @j", j=job_id)
        return _job(rows[0]) if rows else None

    def _tenant_job(self, reader: Any, tenant_id: str, job_id: str) -> Job:
        rows = self._rows(reader, f"{_SELECT} WHERE tenant_id = @t AND job_id = @j",
                          t=tenant_id, j=job_id)  # fmt: skip
        if not rows:
            raise NotFound(f"job {job_id} not found")
        return _job(rows[0])

    # --- schema ------------------------------------------------------------------------

    def _applied(self) -> set[str] | None:
        tables = self._read(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = '' AND table_name = 'SchemaMigrations'")  # fmt: skip
        if not tables:
            return None
        return {r[0] for r in self._read("SELECT name FROM SchemaMigrations")}

    def migrate(self) -> list[str]:
        from google.api_core import exceptions as gexc

        done: list[str] = []
        for migration in dialect_migrations("spanner"):
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
            self._run(lambda tx, now, name=migration.name: tx.insert_or_update(
                "SchemaMigrations", ("name", "applied_at"), [(name, now)]))
            done.append(migration.name)
        return done

    def _wait_recorded(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while name not in (self._applied() or set()):
            if time.monotonic() > deadline:
                raise StoreError(f"spanner migration {name} failed and nobody recorded it")
            time.sleep(0.2)

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

    # --- tenant-facing -----------------------------------------------------------------

    def create_job(self, job: Job, lease_ttl: float) -> tuple[Job, bool]:
        from google.api_core.exceptions import AlreadyExists

        for _ in range(5):
            try:
                return self._run(self._create, job, lease_ttl)
            except StoreError as exc:
                # A concurrent create won the unique request id (or the tenant row):
                # run again to return its job.
                if not isinstance(exc.__cause__, AlreadyExists):
                    raise
                if not job.request_id and self._read(f"{_BY_ID} WHERE job_id = @j", j=job.job_id):
                    raise Conflict(f"job {job.job_id} already exists") from None
        raise StoreUnavailable("create_job kept conflicting")

    def _create(self, tx: Any, now: datetime, job: Job, ttl: float) -> tuple[Job, bool]:
        if job.request_id:
            rows = self._rows(tx, f"{_SELECT} WHERE tenant_id = @t AND request_id = @r",
                              t=job.tenant_id, r=job.request_id)  # fmt: skip
            if rows:
                return _job(rows[0]), False
        if self._by_id(tx, job.job_id) is not None:
            raise Conflict(f"job {job.job_id} already exists")
        if not self._rows(tx, "SELECT 1 FROM Tenants WHERE tenant_id = @t", t=job.tenant_id):
            tx.insert("Tenants", ("tenant_id", "created_at"), [(job.tenant_id, now)])
        stored = c.new_job(job, now, ttl)
        tx.insert("Jobs", _COLS, [_job_values(stored)])
        self._record(tx, job.tenant_id, 0,
                     Transition(job.job_id, None, stored.status, now, "created",
                                job.owner_worker_id))  # fmt: skip
        return stored, True

    @staticmethod
    def _record(tx: Any, tenant_id: str, idx: int, t: Transition) -> None:
        tx.insert(
            "JobTransitions", (*c.TRANSITION_COLUMNS, "tenant_id"),
            [(t.job_id, idx, t.from_status.value if t.from_status else None, t.to_status.value,
              t.at, t.reason, t.worker_id, tenant_id)],
        )  # fmt: skip

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
            tx.delete("Jobs", keyset(keys=[[tenant_id, job_id]]))  # cascades

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
        self, tenant_id: str, job_id: str | None, after_seq: int, limit: int
    ) -> list[JobEvent]:
        select = f"SELECT {', '.join(c.EVENT_COLUMNS)} FROM JobEvents WHERE tenant_id = @t"
        if job_id is None:
            rows = self._read(f"{select} ORDER BY created_at, job_id, seq LIMIT @n",
                              t=tenant_id, n=max(limit, 0))  # fmt: skip
        else:
            rows = self._read(f"{select} AND job_id = @j AND seq > @a ORDER BY seq LIMIT @n",
                              t=tenant_id, j=job_id, a=after_seq, n=max(limit, 0))  # fmt: skip
        return [c.event_from_row(dict(zip(c.EVENT_COLUMNS, map(_plain, r), strict=True)))
                for r in rows]  # fmt: skip

    def append_events(self, events: Sequence[JobEvent]) -> None:
        by_job: dict[tuple[str, str], dict[int, JobEvent]] = {}
        for ev in events:
            by_job.setdefault((ev.tenant_id, ev.job_id), {}).setdefault(ev.seq, ev)
        if by_job:
            self._run(self._append, by_job)

    def _append(self, tx: Any, now: datetime, by_job: dict[tuple[str, str], dict[int, JobEvent]]
                ) -> None:  # fmt: skip
        # Reading the job and its existing seqs locks them: a concurrent delete either
        # happens before (events dropped) or waits (and then cascades to them).
        for (tenant_id, job_id), per_seq in by_job.items():
            if not self._rows(tx, "SELECT 1 FROM Jobs WHERE tenant_id = @t AND job_id = @j",
                              t=tenant_id, j=job_id):  # fmt: skip
                continue
            seen = {int(r[0]) for r in self._rows(
                tx, "SELECT seq FROM JobEvents WHERE tenant_id = @t AND job_id = @j "
                    "AND seq IN UNNEST(@s)", t=tenant_id, j=job_id, s=list(per_seq))}  # fmt: skip
            new = [c.event_to_row(e) for s, e in sorted(per_seq.items()) if s not in seen]
            if new:
                tx.insert("JobEvents", c.EVENT_COLUMNS, [[r[k] for k in c.EVENT_COLUMNS]
                                                         for r in new])  # fmt: skip

    # --- owner-facing, fenced ----------------------------------------------------------

    def update_job(self, job_id: str, lease: Lease, patch: JobPatch, reason: str = "") -> Job:
        def tx_fn(tx: Any, now: datetime) -> Job:
            job = c.check_lease(self._by_id(tx, job_id), lease)
            updated, transition = c.apply_patch(job, lease, patch, now, reason)
            tx.update("Jobs", _COLS, [_job_values(updated)])
            if transition is not None:
                rows = self._rows(tx, "SELECT COALESCE(MAX(idx), -1) + 1 FROM JobTransitions "
                                      "WHERE tenant_id = @t AND job_id = @j",
                                  t=job.tenant_id, j=job_id)  # fmt: skip
                self._record(tx, job.tenant_id, int(rows[0][0]), transition)
            return updated

        return self._run(tx_fn)

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

        def tx_fn(tx: Any, now: datetime) -> list[Job]:
            rows = self._rows(
                tx, f"{_SELECT}@{{FORCE_INDEX=JobsByStatusLease}} WHERE status IN UNNEST(@a) "
                    "AND lease_expires_at <= @now ORDER BY lease_expires_at, job_id LIMIT @n",
                a=_ACTIVE, now=now, n=limit)  # fmt: skip
            claimed = []
            for row in rows:
                job = _job(row)
                job.owner_worker_id, job.lease_version = worker_id, job.lease_version + 1
                job.lease_expires_at = now + timedelta(seconds=ttl)
                job.last_heartbeat_at = job.updated_at = now
                claimed.append(job)
            if claimed:
                tx.update("Jobs", _COLS, [_job_values(j) for j in claimed])
            return claimed

        return self._run(tx_fn)

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

"""The PostgreSQL job store (psycopg 3 with a connection pool).

Times come from the database clock: each transaction reads ``now()`` once (the
transaction's start time, constant inside it), so every worker agrees on lease expiry
whatever its own clock says. Claims lock candidate rows with ``FOR UPDATE SKIP LOCKED``,
so concurrent claimers split the expired jobs instead of queueing on them; fenced
updates lock their row with ``FOR UPDATE``. Driver errors are translated here:
connection problems become ``StoreUnavailable``, unique violations ``Conflict``, and a
pool timeout either of the two below.

**Busy is not down** (docs/design.md §11). A call that waited the whole pool timeout for a
connection gets

* ``StoreBusy`` (``resource_exhausted`` with a retry hint) when the server is up and
  every connection is in use: some connection is checked out by a transaction of this
  store right now, or one was handed out while we waited (the pool checks a connection
  with a round trip before handing it out, so either means the server answers);
* ``StoreUnavailable`` otherwise: no connection could be had at all, the server is down
  (a dead server's connections fail at once, so none stays checked out). For
  ``DOWN_HOLD_SECONDS`` after that, every call fails at once (the circuit breaker).

A server that hangs without closing its sockets (a network partition) keeps its
connections checked out, so it reads as busy; the clients' retries after the hint are
the right answer to that too.

**An outage is not saturation, nor is its recovery.** For the pool timeout plus
``DOWN_HOLD_SECONDS`` after the server last failed us (a connection error, or a timeout
classified as down), nothing is reported busy: the callers queued behind a dead server,
and the slow hand-outs while the pool reconnects after a restart, would otherwise read as
a saturated pool and answer ``resource_exhausted`` during an outage
(``bench.faults`` outage scenario: 40 such answers before this rule, none after).

**Seeing it coming.** :meth:`PostgresStore.busy_for` tells admission control
(``worker/admission.py``) that the pool is saturated, so that a new SubmitJob is refused
at once with a retry hint instead of joining a queue that cannot be served in time. It
is saturated while connections are checked out and ``QUEUE_PER_CONNECTION`` callers per
pooled connection wait behind them (the bound on this process's queued store work, from
``DATABASE_POOL_SIZE``), and for ``BUSY_HOLD_SECONDS`` after a caller waited a quarter of
the pool timeout or more for its connection (a healthy pool hands one out in
milliseconds) or timed out while the server was busy. Only new jobs are refused that
way; work already accepted (updates, lease renewals, reads) still queues for its
connection. The bookkeeping costs a transaction two counters under a lock and three
clock reads; ``busy_for`` reads it without a lock.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, cast

import psycopg
import psycopg_pool.base
import psycopg_pool.pool
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from database import _common as c
from database._sql import SqlStore, Tx
from jennah.errors import Conflict, StoreBusy, StoreError, StoreUnavailable
from jennah.settings import Env, StoreSettings

TABLE_COLUMNS = c.TABLE_COLUMNS
RECONNECT_DELAY_CAP = 1.0


class _CappedBackoff(psycopg_pool.base.AttemptWithBackoff):
    """psycopg_pool retries a lost server after 1, 2, 4, 8 ... s, so after a 10 s outage
    the pool could stay empty for 8 s more with the server back. Capped at
    RECONNECT_DELAY_CAP, the store recovers about a second after the server returns.
    (psycopg_pool has no setting for this; the pool module's name for the class is
    replaced below, so this depends on psycopg_pool 3.x internals, checked by
    tests/database/test_store_outage.py, which times the recovery.)"""

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_DELAY_CAP)


psycopg_pool.pool.AttemptWithBackoff = _CappedBackoff  # type: ignore[misc,attr-defined]
# pg_advisory_xact_lock key serializing migrate() across processes ("jennahmg").
MIGRATION_LOCK_KEY = 0x6A656E6E61686D67
DOWN_HOLD_SECONDS = 1.0
# Saturation (see the module docstring): callers waiting per pooled connection before new
# jobs are refused, how long a sign of saturation counts, and the retry hint given.
QUEUE_PER_CONNECTION = 4
BUSY_HOLD_SECONDS = 1.0
BUSY_RETRY_SECONDS = 1.0


def _to_db(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict | list):
        return Jsonb(value)
    return value


def _sql(sql: str) -> str:
    """The shared queries use ``?`` placeholders; psycopg wants ``%s`` (and ``%%``)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgTx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._now: datetime | None = None

    def now(self) -> datetime:
        if self._now is None:
            row = self._conn.execute("SELECT now()").fetchone()
            assert row is not None
            self._now = c.utc(row[0])
        return self._now

    def _execute(self, sql: str, params: tuple[Any, ...]) -> psycopg.Cursor[dict[str, Any]]:
        cur = self._conn.cursor(row_factory=dict_row)
        if params:
            return cur.execute(_sql(sql), [_to_db(p) for p in params])
        # Without parameters psycopg may run a multi-statement script (migrations).
        return cur.execute(cast(Any, sql))

    def rows(self, sql: str, *params: Any) -> list[c.Row]:
        with self._execute(sql, params) as cur:
            return cur.fetchall()

    def run(self, sql: str, *params: Any) -> int:
        with self._execute(sql, params) as cur:
            return cur.rowcount

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(_sql(sql), [[_to_db(p) for p in row] for row in params])


@dataclass(frozen=True)
class PostgresSettings:
    """``DB_PROVIDER=postgres``'s variables."""

    url: str = field(repr=False)  # DATABASE_URL; it may carry a password
    # DATABASE_POOL_SIZE: the most connections one process opens; it also sets how much
    # store work a worker queues before SubmitJob refuses (module docstring).
    pool_size: int = 10

    @classmethod
    def from_env(cls, e: Env) -> PostgresSettings:
        e.require(("DATABASE_URL",), "DB_PROVIDER=postgres")
        return cls(e.text("DATABASE_URL"),
                   e.number("DATABASE_POOL_SIZE", cls.pool_size, int, minimum=1))


class PostgresStore(SqlStore):
    """A job store in PostgreSQL; any number of workers share it."""

    name = "postgres"
    settings_class = PostgresSettings
    dialect = "postgres"
    label_sql = "jobs.spec->'labels'->>(?::text) = ?"
    name_prefix_sql = "starts_with(jobs.spec->>'name', ?)"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    migrations_table_ddl = (
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
    )
    migration_lock_sql = f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY}) AS locked"

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 2.0,
        connect_timeout: int = 2,
    ) -> None:
        super().__init__()
        self.max_size = max_size
        self.timeout = timeout
        self._pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            kwargs={"autocommit": True, "connect_timeout": connect_timeout},
            check=ConnectionPool.check_connection,
            name="jennah-store",
        )
        # Fail fast: with the server down, a call waits at most ``timeout`` for a
        # connection and then raises StoreUnavailable, so SubmitJob answers `unavailable`
        # in about 2 s instead of hanging; the pool keeps reconnecting in the background
        # and the store recovers by itself when the server returns. 2 s is far above the
        # wait for a free connection under load (queries take about a millisecond).
        self._down_until = 0.0  # see _tx: fail fast while the server is known to be down
        # When the server last failed us (a connection error, or a pool timeout with no
        # answer): for a while after, waits and queues are an outage or its recovery (the
        # pool reconnecting), not saturation, and nothing is reported busy.
        self._down_at = -1e9
        # Saturation bookkeeping (module docstring): transactions waiting for or holding
        # a connection, those holding one, when the server last answered one (handed out
        # or committed), and until when the pool counts as saturated.
        self._lock = threading.Lock()
        self._in_flight = 0
        self._held = 0
        self._answered_at = 0.0
        self._busy_until = 0.0
        self._queue_bound = QUEUE_PER_CONNECTION * max_size
        self._slow_wait = timeout / 4
        # Opening does not wait: a server that is down shows up as StoreUnavailable on
        # the first call (after ``timeout``), not as a crash at construction.
        self._pool.open(wait=False)

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> PostgresStore:
        s = settings.read(PostgresSettings.from_env)
        return cls(s.url, max_size=s.pool_size)

    def busy_for(self) -> float:
        """Seconds a new job should wait because the pool is saturated now; 0 when it is
        not (see the module docstring). Lock-free: called on every SubmitJob."""
        now = time.monotonic()
        if self._recently_down(now):
            return 0.0
        if self._held and self._in_flight - self._held >= self._queue_bound:
            return BUSY_RETRY_SECONDS
        if now < self._busy_until:
            return BUSY_RETRY_SECONDS
        return 0.0

    def _recently_down(self, now: float) -> bool:
        return now - self._down_at < self.timeout + DOWN_HOLD_SECONDS

    def ping(self) -> None:
        """Return while the server answers; a saturated pool is an answering server (a busy
        worker stays ready: only a store that is down makes ``/ready`` 503)."""
        if self.busy_for():
            return  # no need to queue behind the work that saturates it
        with contextlib.suppress(StoreBusy):
            super().ping()

    @contextlib.contextmanager
    def _tx(self, write: bool = True) -> Iterator[Tx]:
        # Circuit breaker: once a call waited the whole pool timeout for a connection with
        # the server down, for DOWN_HOLD_SECONDS every call fails at once instead of
        # queueing for another timeout each. Under load those waits stacked up in the
        # worker's threads and refusals took 4-7 s (bench.faults).
        start = time.monotonic()
        if start < self._down_until:
            raise StoreUnavailable("postgres: no connection could be had just now; failing fast")
        with self._lock:
            self._in_flight += 1
        try:
            with self._pool.connection() as conn:
                self._handed_out(start)
                try:
                    with conn.transaction():
                        yield _PgTx(conn)
                    self._answered_at = time.monotonic()  # before _held drops: _timed_out
                finally:
                    with self._lock:
                        self._held -= 1
        except PoolTimeout as exc:
            raise self._timed_out(start, exc) from exc
        except psycopg.errors.UniqueViolation as exc:
            raise Conflict(f"postgres: {exc}") from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._down_at = time.monotonic()
            raise StoreUnavailable(f"postgres: {exc}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"postgres: {exc}") from exc
        finally:
            with self._lock:
                self._in_flight -= 1

    def _handed_out(self, start: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._held += 1
        self._answered_at = now  # the pool checked the connection with a round trip
        if now - start >= self._slow_wait and not self._recently_down(now):
            self._busy_until = now + BUSY_HOLD_SECONDS

    def _timed_out(self, start: float, exc: PoolTimeout) -> StoreError:
        """A pool timeout: busy if a connection is checked out or the server answered
        while we waited, else down. (A transaction that ends records its answer before it
        stops counting as held, so one ending just as we time out is seen either way.)"""
        now = time.monotonic()
        if (self._held or self._answered_at >= start) and not self._recently_down(now):
            self._busy_until = now + BUSY_HOLD_SECONDS
            return StoreBusy(f"postgres is busy: all {self.max_size} pooled connections "
                             f"stayed in use for {self.timeout:g} s", BUSY_RETRY_SECONDS)
        self._down_until = now + DOWN_HOLD_SECONDS
        self._down_at = now
        return StoreUnavailable(f"postgres: {exc}")

    def _split(self, script: str) -> list[str]:
        return [script]

    def close(self) -> None:
        self._pool.close()

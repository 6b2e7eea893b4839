"""The PostgreSQL job store (psycopg 3 with a connection pool).

Times come from the database clock: each transaction reads ``now()`` once (the
transaction's start time, constant inside it), so every worker agrees on lease expiry
whatever its own clock says. Claims lock candidate rows with ``FOR UPDATE SKIP LOCKED``,
so concurrent claimers split the expired jobs instead of queueing on them; fenced
updates lock their row with ``FOR UPDATE``. Driver errors are translated here:
connection problems and pool timeouts become ``StoreUnavailable``, unique violations
``Conflict``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
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
from jennah.errors import Conflict, StoreError, StoreUnavailable
from jennah.settings import StoreSettings

TABLE_COLUMNS = c.TABLE_COLUMNS
RECONNECT_DELAY_CAP = 1.0


class _CappedBackoff(psycopg_pool.base.AttemptWithBackoff):
    """psycopg_pool retries a lost server after 1, 2, 4, 8 ... s, so after a 10 s outage
    the pool could stay empty for 8 s more with the server back. Capped at
    RECONNECT_DELAY_CAP, the store recovers about a second after the server returns.
    (psycopg_pool has no setting for this; the pool module's name for the class is
    replaced below, so this depends on psycopg_pool 3.x internals, checked by
    tests/test_store_outage.py, which times the recovery.)"""

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_DELAY_CAP)


psycopg_pool.pool.AttemptWithBackoff = _CappedBackoff  # type: ignore[misc,attr-defined]
# pg_advisory_xact_lock key serializing migrate() across processes ("jennahmg").
MIGRATION_LOCK_KEY = 0x6A656E6E61686D67
DOWN_HOLD_SECONDS = 1.0


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


class PostgresStore(SqlStore):
    """A job store in PostgreSQL; any number of workers share it."""

    name = "postgres"
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
        # Fail fast (issue 4): with the server down, a call waits at most ``timeout`` for a
        # connection and then raises StoreUnavailable, so SubmitJob answers `unavailable`
        # in about 2 s instead of hanging; the pool keeps reconnecting in the background
        # and the store recovers by itself when the server returns. 2 s is far above the
        # wait for a free connection under load (queries take about a millisecond).
        self._down_until = 0.0  # see _tx: fail fast while the server is known to be down
        # Opening does not wait: a server that is down shows up as StoreUnavailable on
        # the first call (after ``timeout``), not as a crash at construction.
        self._pool.open(wait=False)

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> PostgresStore:
        return cls(settings.database_url)

    @contextlib.contextmanager
    def _tx(self, write: bool = True) -> Iterator[Tx]:
        # Circuit breaker: once a call waited the whole pool timeout for a connection, the
        # server is down (or hopelessly overloaded); for DOWN_HOLD_SECONDS every call fails
        # at once instead of queueing for another timeout each. Under load those waits
        # stacked up in the worker's threads and refusals took 4-7 s (bench.faults).
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("postgres: no connection could be had just now; failing fast")
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield _PgTx(conn)
        except PoolTimeout as exc:
            self._down_until = time.monotonic() + DOWN_HOLD_SECONDS
            raise StoreUnavailable(f"postgres: {exc}") from exc
        except psycopg.errors.UniqueViolation as exc:
            raise Conflict(f"postgres: {exc}") from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise StoreUnavailable(f"postgres: {exc}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"postgres: {exc}") from exc

    def _split(self, script: str) -> list[str]:
        return [script]

    def close(self) -> None:
        self._pool.close()

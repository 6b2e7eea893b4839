"""The SQLite job store: the embedded default, safe for several worker processes on one file.

WAL journal mode lets readers run beside the one writer; every write transaction starts
with ``BEGIN IMMEDIATE``, which takes the file's write lock up front (waiting up to
``busy_timeout``), so a claim or a create is serialized across processes and never fails
half way on a lock upgrade. Each thread gets its own connection. Timestamps are stored
as integer microseconds since the epoch (UTC), which sort and compare exactly; the clock
is injected, and is the wall clock by default, shared by every process on the host.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from database import _common as c
from database._sql import SqlStore, Tx
from jennah.errors import Conflict, StoreError, StoreUnavailable
from jennah.settings import Env, StoreSettings

TABLE_COLUMNS = c.TABLE_COLUMNS
# Seconds between tries of switching a new file to WAL mode while another process holds
# it: a fixed short poll, not a backoff (the hold is a moment; busy_timeout bounds it).
_WAL_SWITCH_POLL = 0.01
# Seam for the tests: the wait of that poll goes through _sleep.
_sleep: Callable[[float], None] = time.sleep


_PLAIN = (str, int, float, type(None))


def _to_db(value: Any) -> Any:
    if type(value) in _PLAIN:  # most values: no conversion (bool is not int's type)
        return value
    if isinstance(value, datetime):
        return c.to_micros(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return value


def _db_params(params: Sequence[Any]) -> list[Any]:
    # The plain-type test inline: a call per value was 20 % of a write's Python time.
    return [p if type(p) in _PLAIN else _to_db(p) for p in params]


def _from_db(row: sqlite3.Row) -> c.Row:
    out = dict(zip(row.keys(), row, strict=True))
    for key in c.TIME_COLUMNS.intersection(out):
        if isinstance(out[key], int):
            out[key] = c.from_micros(out[key])
    return out


def split_statements(script: str) -> list[str]:
    """Cut a script at the semicolons that end a complete statement (not those inside
    strings or trigger bodies): ``executescript`` would commit, we need one transaction."""
    statements, start = [], 0
    for i, ch in enumerate(script):
        if ch == ";" and sqlite3.complete_statement(script[start : i + 1]):
            statements.append(script[start : i + 1].strip())
            start = i + 1
    rest = "\n".join(
        line for line in script[start:].splitlines() if not line.strip().startswith("--")
    )
    if rest.strip():
        raise ValueError(f"incomplete SQL statement at the end of the script: {rest.strip()!r}")
    return statements


class _SQLiteTx:
    def __init__(self, conn: sqlite3.Connection, now: datetime) -> None:
        self._conn = conn
        self._now = now

    def now(self) -> datetime:
        return self._now

    def rows(self, sql: str, *params: Any) -> list[c.Row]:
        cur = self._conn.execute(sql, _db_params(params))
        return [_from_db(r) for r in cur.fetchall()]

    def run(self, sql: str, *params: Any) -> int:
        return self._conn.execute(sql, _db_params(params)).rowcount

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, [_db_params(row) for row in params])


@dataclass(frozen=True)
class SQLiteSettings:
    """``DB_PROVIDER=sqlite``'s variable: ``DB_PATH`` (default ``$JENNAH_HOME/jennah.db``)."""

    path: Path

    @classmethod
    def from_env(cls, e: Env) -> SQLiteSettings:
        return cls(e.path("DB_PATH", e.home / "jennah.db"))


class SQLiteStore(SqlStore):
    """A job store in one SQLite file (WAL mode, one connection per thread)."""

    name = "sqlite"
    settings_class = SQLiteSettings
    dialect = "sqlite"
    label_sql = (
        "EXISTS (SELECT 1 FROM json_each(jobs.spec, '$.labels') AS l "
        "WHERE l.key = ? AND l.value = ?)"
    )
    name_prefix_sql = "instr(json_extract(jobs.spec, '$.name'), ?) = 1"
    migrations_table_ddl = (
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(name TEXT PRIMARY KEY, applied_at INTEGER NOT NULL)"
    )

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Callable[[], datetime] = c.now_utc,
        busy_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._conns: dict[int, sqlite3.Connection] = {}
        self._conns_lock = threading.Lock()
        # Writers of this process queue on a lock instead of in SQLite's busy handler,
        # which sleeps in steps of up to 100 ms: under load that sleeping, not the disk,
        # was the cost (200 submits/s before, see docs/benchmarks.md). Other processes
        # sharing the file still wait through busy_timeout.
        self._write_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> SQLiteStore:
        path = settings.read(SQLiteSettings.from_env).path
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path)

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            # Switching to WAL needs a moment of exclusive access; another process may
            # be doing the same. Once set, the mode is stored in the file.
            deadline = time.monotonic() + self._busy_timeout
            while True:
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    _sleep(_WAL_SWITCH_POLL)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreUnavailable("the sqlite store is closed")
        conn = self._open()
        ident = threading.get_ident()
        with self._conns_lock:
            alive = {t.ident for t in threading.enumerate()}
            for key in [k for k in self._conns if k not in alive or k == ident]:
                self._conns.pop(key).close()  # connections of threads that ended
            self._conns[ident] = conn
        self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _tx(self, write: bool = True) -> Iterator[Tx]:
        with self._write_lock if write else contextlib.nullcontext(), \
                self._tx_unlocked(write) as tx:
            yield tx

    @contextlib.contextmanager
    def _tx_unlocked(self, write: bool) -> Iterator[Tx]:
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield _SQLiteTx(conn, c.utc(self._clock()))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"sqlite: {exc}") from exc
        except sqlite3.OperationalError as exc:  # locked, I/O error, cannot open
            raise StoreUnavailable(f"sqlite {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    def _split(self, script: str) -> list[str]:
        return split_statements(script)

    def close(self) -> None:
        with self._conns_lock:
            self._closed = True
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

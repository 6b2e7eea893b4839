"""The migration runner: name order, one transaction per file, idempotence, concurrency."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from database.migrate import Migration, dialect_migrations, load_migrations, run_migrations
from database.postgres import PostgresStore
from database.sqlite import SQLiteStore, split_statements
from jennah.errors import StoreError

REPO = Path(__file__).resolve().parents[2]
Store = SQLiteStore | PostgresStore

FILES = {  # deliberately listed out of order; 0002 and 0010 depend on earlier files
    "0010_fill.sql": "INSERT INTO a (x, y) VALUES (1, 'one; still one');\n",
    "0001_create.sql": "-- first\nCREATE TABLE a (x INTEGER PRIMARY KEY);\n",
    "0002_alter.sql": "ALTER TABLE a ADD COLUMN y TEXT;\n",
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def open_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], Store]]:
    """A factory of handles on one fresh, empty database of each SQL dialect."""
    if request.param == "sqlite":
        path = tmp_path / "m.db"
        factory: Callable[[], Store] = lambda: SQLiteStore(path)  # noqa: E731
    else:
        url = request.getfixturevalue("postgres_db_url")
        factory = lambda: PostgresStore(url, max_size=2)  # noqa: E731
    opened: list[Store] = []

    def open_one() -> Store:
        opened.append(factory())
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def _recorded(store: Store) -> list[tuple[str, datetime]]:
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            rows = conn.execute("SELECT name, applied_at FROM schema_migrations ORDER BY name")
            out = [(n, datetime.fromtimestamp(us / 1e6, UTC)) for n, us in rows.fetchall()]
        conn.close()
        return out
    with store._pool.connection() as pg:
        return [(n, at) for n, at in pg.execute(
            "SELECT name, applied_at FROM schema_migrations ORDER BY name").fetchall()]


def _select_a(store: Store) -> list[tuple[int, str]]:
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            rows = conn.execute("SELECT x, y FROM a").fetchall()
        conn.close()
        return rows
    with store._pool.connection() as pg:
        return [(x, y) for x, y in pg.execute("SELECT x, y FROM a").fetchall()]


def _write(directory: Path, files: dict[str, str]) -> list[Migration]:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return load_migrations(directory)


def test_files_are_loaded_and_applied_in_name_order(
    open_store: Callable[[], Store], tmp_path: Path
) -> None:
    migrations = _write(tmp_path / "mig", FILES)
    assert [m.name for m in migrations] == sorted(FILES)
    store = open_store()
    before = datetime.now(UTC)
    assert store.migrate(list(reversed(migrations))) == sorted(FILES)
    assert _select_a(store) == [(1, "one; still one")]
    recorded = _recorded(store)
    assert [name for name, _ in recorded] == sorted(FILES)
    assert all(at >= before.replace(microsecond=0) for _, at in recorded)
    assert store.migrate(migrations) == []
    assert _select_a(store) == [(1, "one; still one")]


def test_a_failing_file_rolls_back_whole_and_is_not_recorded(
    open_store: Callable[[], Store], tmp_path: Path
) -> None:
    files = {"0001_create.sql": FILES["0001_create.sql"],
             "0002_bad.sql": "CREATE TABLE b (z INTEGER);\nINSERT INTO missing VALUES (1);\n"}
    store = open_store()
    with pytest.raises(StoreError):
        store.migrate(_write(tmp_path / "bad", files))
    assert [n for n, _ in _recorded(store)] == ["0001_create.sql"]
    fixed = {**files, "0002_bad.sql": "CREATE TABLE b (z INTEGER);\n"}
    assert store.migrate(_write(tmp_path / "bad", fixed)) == ["0002_bad.sql"]


def test_the_real_schema_applies_once(open_store: Callable[[], Store]) -> None:
    store = open_store()
    names = [m.name for m in dialect_migrations(store.dialect)]
    assert names and store.migrate() == names
    assert store.migrate() == []
    assert [n for n, _ in _recorded(store)] == names
    store.ping()


def test_concurrent_migrate_from_threads_applies_each_file_once(
    open_store: Callable[[], Store], tmp_path: Path
) -> None:
    migrations = dialect_migrations(open_store().dialect) + _write(tmp_path / "m", FILES)
    stores = [open_store() for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run(store: Store) -> None:
        try:
            barrier.wait(10)
            results.append(store.migrate(migrations))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    applied = sorted(name for r in results for name in r)
    assert applied == sorted(m.name for m in migrations)
    assert [n for n, _ in _recorded(stores[0])] == applied
    assert _select_a(stores[0]) == [(1, "one; still one")]


def test_concurrent_migrate_from_two_processes_on_one_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    start_at = time.time() + 1.0
    code = textwrap.dedent(f"""
        import json, time
        from database.sqlite import SQLiteStore
        store = SQLiteStore({str(path)!r})
        time.sleep(max(0.0, {start_at} - time.time()))
        print(json.dumps(store.migrate()))
        store.close()
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outputs.append(json.loads(out))
    names = [m.name for m in dialect_migrations("sqlite")]
    assert sorted(n for o in outputs for n in o) == names
    store = SQLiteStore(path)
    try:
        assert [n for n, _ in _recorded(store)] == names
        assert store.migrate() == []
    finally:
        store.close()


def test_duplicate_names_are_refused() -> None:
    twice = [Migration("0001_a.sql", "SELECT 1;"), Migration("0001_a.sql", "SELECT 2;")]
    with pytest.raises(ValueError, match="duplicate"):
        run_migrations(twice, lambda: pytest.fail("must not open a transaction"))


def test_sqlite_statement_splitting() -> None:
    script = textwrap.dedent("""
        -- comment; with a semicolon
        CREATE TABLE t (v TEXT DEFAULT 'a;b');
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN
            UPDATE t SET v = 'x;y' WHERE rowid = new.rowid;
        END;
        INSERT INTO t (v) VALUES ('c'); -- trailing comment
    """)
    statements = split_statements(script)
    assert len(statements) == 3
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        split_statements("CREATE TABLE t (v TEXT);\nINSERT INTO t VALUES ('x')")


@pytest.mark.postgres
def test_postgres_records_with_database_time(postgres_db_url: str) -> None:
    store = PostgresStore(postgres_db_url)
    try:
        store.migrate()
        with psycopg.connect(postgres_db_url) as conn:
            row = conn.execute("SELECT now() - max(applied_at) FROM schema_migrations").fetchone()
        assert row is not None and row[0].total_seconds() < 60
    finally:
        store.close()

"""The store contract run against the in-memory, SQLite and PostgreSQL stores."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from database import STORES, create_store
from database.base import JobStore
from database.memory import MemoryStore
from database.postgres import PostgresStore
from database.sqlite import SQLiteStore
from jennah.errors import SettingsError, StoreUnavailable
from jennah.models import Lease
from jennah.settings import StoreSettings, load_store_settings, load_worker_settings
from tests.database.store_contract import StoreContract, contract_runs, make_job

REPO = Path(__file__).resolve().parents[2]


class TestMemoryStore(StoreContract):
    kind = "memory"

    @pytest.fixture
    def store(self) -> Iterator[JobStore]:
        store = MemoryStore()
        store.migrate()
        yield store
        store.close()


class TestSQLiteStore(StoreContract):
    kind = "sqlite"

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[JobStore]:
        store = SQLiteStore(tmp_path / "jobs.db")
        store.migrate()
        yield store
        store.close()

    @pytest.fixture
    def open_handle(self, tmp_path: Path) -> Iterator[Callable[[], JobStore]]:
        """Separate store objects on the same file, like separate worker processes."""
        handles: list[SQLiteStore] = []

        def open_one() -> JobStore:
            handles.append(SQLiteStore(tmp_path / "jobs.db"))
            return handles[-1]

        yield open_one
        for h in handles:
            h.close()


@pytest.mark.postgres
class TestPostgresStore(StoreContract):
    kind = "postgres"

    @pytest.fixture
    def store(self, postgres_db_url: str) -> Iterator[JobStore]:
        store = PostgresStore(postgres_db_url)
        store.migrate()
        yield store
        store.close()

    @pytest.fixture
    def open_handle(self, postgres_db_url: str) -> Iterator[Callable[[], JobStore]]:
        handles: list[PostgresStore] = []

        def open_one() -> JobStore:
            handles.append(PostgresStore(postgres_db_url, max_size=2))
            return handles[-1]

        yield open_one
        for h in handles:
            h.close()


# --- backend-specific behaviour the contract cannot express ---------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_embedded_stores_use_the_injected_clock(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    store: JobStore = (
        MemoryStore(clock=clock)
        if kind == "memory"
        else SQLiteStore(tmp_path / "c.db", clock=clock)
    )
    try:
        store.migrate()
        job, _ = store.create_job(make_job(), 30)
        expires = clock.now + timedelta(seconds=30)
        assert (job.created_at, job.lease_expires_at) == (clock.now, expires)
        clock.now += timedelta(seconds=29)
        assert store.claim_expired("w2", 30, 10) == []
        clock.now += timedelta(seconds=1)
        [claimed] = store.claim_expired("w2", 30, 10)
        assert claimed.lease == Lease("w2", 2) and claimed.last_heartbeat_at == clock.now
        store.heartbeat_worker("w2", "http://127.0.0.1:9")
        clock.now += timedelta(seconds=11)
        assert store.list_workers(10) == []
    finally:
        store.close()


def test_sqlite_claims_from_several_processes_win_each_job_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    store = SQLiteStore(path)
    store.migrate()
    jobs = [store.create_job(make_job(), 0)[0] for _ in range(30)]
    store.close()
    start_at = time.time() + 1.0
    code = textwrap.dedent(f"""
        import json, sys, time
        from database.sqlite import SQLiteStore
        store = SQLiteStore({str(path)!r})
        store.ping()
        time.sleep(max(0.0, {start_at} - time.time()))
        won = []
        while batch := store.claim_expired(sys.argv[1], 60, 2):
            won += [j.job_id for j in batch]
        print(json.dumps(won))
        store.close()
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, f"p{i}"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]  # fmt: skip
    wins: list[str] = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        wins += json.loads(out)
    assert sorted(wins) == sorted(j.job_id for j in jobs)


def test_sqlite_lock_timeout_and_bad_path_are_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        SQLiteStore(tmp_path / "missing-dir" / "x.db").ping()
    store = SQLiteStore(tmp_path / "l.db", busy_timeout=0.1)
    store.migrate()
    blocker = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable):
            store.create_job(make_job(), 30)
        blocker.execute("ROLLBACK")
        assert store.create_job(make_job(), 30)[1]
    finally:
        blocker.close()
        store.close()
    with pytest.raises(StoreUnavailable):
        store.ping()


def test_postgres_down_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        store = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/x", timeout=0.5)
        try:
            with pytest.raises(StoreUnavailable):
                store.ping()
            with pytest.raises(StoreUnavailable):
                store.get_job("t", "j")
        finally:
            store.close()


@pytest.mark.postgres
def test_postgres_recovers_from_killed_connections(postgres_db_url: str) -> None:
    store = PostgresStore(postgres_db_url, max_size=2)
    try:
        store.migrate()
        store.ping()
        with psycopg.connect(postgres_db_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        store.ping()  # the pool checks connections on checkout and replaces dead ones
        assert store.create_job(make_job(), 30)[1]
    finally:
        store.close()


def test_from_settings(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "jobs.db"
    store = create_store(StoreSettings(kind="sqlite", env={"DB_PATH": str(path)}))
    try:
        assert isinstance(store, SQLiteStore) and path.parent.is_dir()
        assert store.migrate() == ["0001_init.sql", "0002_events_v2.sql",
                                 "0003_tasks_notifications.sql"]
    finally:
        store.close()
    assert isinstance(create_store(StoreSettings(kind="memory")), MemoryStore)


@pytest.mark.postgres
def test_postgres_from_settings(postgres_db_url: str) -> None:
    store = create_store(StoreSettings(kind="postgres", env={"DATABASE_URL": postgres_db_url}))
    try:
        assert isinstance(store, PostgresStore)
        assert store.migrate() == ["0001_init.sql", "0002_events_v2.sql",
                                 "0003_tasks_notifications.sql"]
        store.ping()
    finally:
        store.close()


# --- the registry and each store's own settings -------------------------------------------


def test_every_registered_store_runs_the_contract() -> None:
    runs = contract_runs()
    missing = sorted(set(STORES) - set(runs))
    assert not missing, f"registered stores without a contract run: {missing}"
    assert set(runs) <= set(STORES)


@pytest.mark.parametrize(("store", "missing"), [
    ("postgres", ["DATABASE_URL"]),
    ("spanner", ["DB_PROJECT_ID", "DB_INSTANCE", "DB_DATABASE"]),
    ("dynamodb", ["BATCH_REGION or AWS_REGION"]),
])
def test_missing_store_settings_are_named_in_one_line(store: str, missing: list[str]) -> None:
    env = {"DB_PROVIDER": store, "JENNAH_DEV_MODE": "1", "WORKER_LEASE_TTL_SECONDS": "soon"}
    with pytest.raises(SettingsError) as at_start:  # with the registry: one line for all
        load_worker_settings(env, stores=STORES)
    with pytest.raises(SettingsError) as when_built:  # without: when the store is built
        create_store(load_store_settings(env))
    for text in (str(at_start.value), str(when_built.value)):
        assert "\n" not in text
        for name in missing:
            assert f"{name} (required by DB_PROVIDER={store})" in text, text
        assert text.count("(required by") == len(missing), text
    assert "WORKER_LEASE_TTL_SECONDS" in str(at_start.value)


def test_an_unknown_store_is_named_with_the_known_ones() -> None:
    env = {"DB_PROVIDER": "Mongo"}
    with pytest.raises(SettingsError, match=r"DB_PROVIDER='mongo' \(expected one of sqlite, "
                                            r"postgres, dynamodb, spanner, memory\)"):
        load_store_settings(env, stores=STORES)
    with pytest.raises(SettingsError, match=r"DB_PROVIDER='mongo' \(expected one of sqlite"):
        create_store(load_store_settings(env))


def test_each_store_reads_its_own_variables(tmp_path: Path) -> None:
    from database.dynamodb import DynamoDBSettings
    from database.postgres import PostgresSettings
    from database.sqlite import SQLiteSettings

    env = {"JENNAH_HOME": str(tmp_path), "DATABASE_URL": "postgresql://u:pw@h/db",
           "DATABASE_POOL_SIZE": "3", "AWS_REGION": "eu-west-1", "BATCH_REGION": "us-east-2"}
    settings = load_store_settings(env)
    assert settings.read(SQLiteSettings.from_env).path == tmp_path / "jennah.db"
    postgres = settings.read(PostgresSettings.from_env)
    assert (postgres.url, postgres.pool_size) == ("postgresql://u:pw@h/db", 3)
    assert "pw" not in repr(postgres) and "pw" not in repr(settings)
    dynamo = settings.read(DynamoDBSettings.from_env)
    assert (dynamo.region, dynamo.table_prefix) == ("us-east-2", "jennah")  # BATCH_REGION wins
    with pytest.raises(SettingsError, match=r"invalid job store settings: .*DATABASE_POOL_SIZE"):
        StoreSettings("postgres", {**env, "DATABASE_POOL_SIZE": "0"}).read(
            PostgresSettings.from_env)

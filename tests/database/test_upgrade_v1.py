"""The upgrade from v1 (event pipeline v2, deliverable 6): a store and WAL directories
written by the v1 code (``tests/fixtures/upgrade_v1/``, made by its ``make_fixture.py``)
go through ``jennah db migrate`` and then start v2 workers. Every event v1 emitted,
delivered or still in its per-execution logs, must end in the store exactly once, in its
order, at the head of a valid v2 stream; the v1 logs are archived; doing it all again
changes nothing. On SQLite (the fixture itself) and on PostgreSQL (the same rows loaded
into a schema-0001 database).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from database import create_store
from database._common import TIME_COLUMNS, from_micros
from database.base import JobStore
from database.migrate import dialect_migrations
from database.postgres import PostgresStore
from jennah.settings import StoreSettings
from tests.helpers import free_port, start_jennah, stop, wait_http, wait_until
from tests.invariants import check_jobs

pytestmark = pytest.mark.e2e

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "upgrade_v1" / "data"
EXPECTED: dict[str, list[dict[str, str]]] = json.loads((FIXTURE / "expected.json").read_text())
TENANT_OF = {"00000000-0000-4000-8000-000000000003": "beta"}


def tenant(job_id: str) -> str:
    return TENANT_OF.get(job_id, "acme")


def jennah(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "jennah", *args],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    return proc.stdout


def migrate_cli(env: dict[str, str]) -> str:
    return jennah(env, "db", "migrate")


def upgrade(home: Path, store_env: dict[str, str]) -> None:
    """The runbook's procedure, with every v1 worker stopped: migrate the store, deliver
    every v1 log on this host, then start v2 workers."""
    out = migrate_cli(store_env)
    since_v1 = [m.name for m in dialect_migrations(store_env["DB_PROVIDER"])][1:]
    assert f"applied {len(since_v1)} migration(s)" in out
    assert all(name in out for name in since_v1) and "0002_events_v2.sql" in since_v1
    out = jennah({**store_env, "WAL_DIR": str(home / "wal"),
                  "ARCHIVE_DIR": str(home / "archive")}, "wal", "import-v1")  # fmt: skip
    # 4 logs; 5 undelivered events (job 2: 3, job 3: 1, job 4: 1), none stored before.
    assert "4 imported (5 events stored, 0 already there), 4 archived" in out, out


def run_workers(home: Path, store_env: dict[str, str]) -> None:
    """Start v2 workers w1 and w2 on the upgraded WAL directories, wait until every job
    is terminal (dry provider: the active ones finish at once), stop them."""
    procs = []
    try:
        for name in ("w1", "w2"):
            port = free_port()
            env = {"JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(home), "WORKER_ID": name,
                   "WORKER_PORT": str(port), "BATCH_PROVIDER": "dry",
                   "WAL_DIR": str(home / "wal"), "ARCHIVE_DIR": str(home / "archive"),
                   "WORKER_LEASE_TTL_SECONDS": "2", "WORKER_CLAIM_INTERVAL_SECONDS": "0.5",
                   "WORKER_POLL_INTERVAL_SECONDS": "0.2", **store_env}  # fmt: skip
            procs.append(start_jennah("worker", env, home / f"{name}.log"))
            wait_http(f"http://127.0.0.1:{port}/ready", timeout=30, proc=procs[-1])
        store = create_store(settings(store_env))
        try:
            wait_until(lambda: all(store.get_job(tenant(j), j).status.terminal
                                   for j in EXPECTED), timeout=30, interval=0.2)  # fmt: skip
        finally:
            store.close()
    finally:
        for p in procs:
            stop(p, timeout=10)


def settings(store_env: dict[str, str]) -> StoreSettings:
    return StoreSettings(kind=store_env["DB_PROVIDER"], env=store_env)


def snapshot(store: JobStore) -> dict[str, list[tuple[int, int, str, str, str]]]:
    return {j: [(e.seq, e.position, e.kind.value, e.message, e.output)
                for e in store.list_events(tenant(j), j, 0, 1000)] for j in EXPECTED}


def active_jobs(store_env: dict[str, str]) -> set[str]:
    """The jobs v1 left unfinished."""
    store = create_store(settings(store_env))
    try:
        return {j for j in EXPECTED if not store.get_job(tenant(j), j).status.terminal}
    finally:
        store.close()


def check(home: Path, store_env: dict[str, str], active: set[str]) -> None:
    # The v1 logs were delivered and archived: no <job>.<attempt>.wal is left.
    left = [p.name for p in (home / "wal").rglob("*.wal") if p.name.count(".") == 2]
    assert left == [], left
    archived = sorted(p.name for p in (home / "archive").rglob("*.wal.zst"))
    assert len([a for a in archived if a.count(".") == 3]) == 5, archived  # 4 logs + 1 old
    store = create_store(settings(store_env))
    try:
        for job_id, v1_events in EXPECTED.items():
            got = store.list_events(tenant(job_id), job_id, 0, 1000)
            head = [(e.kind.value, e.message, e.output) for e in got[: len(v1_events)]]
            assert head == [(e["kind"], e["message"], e["output"]) for e in v1_events], job_id
        problems = check_jobs(store, [(tenant(j), j) for j in EXPECTED])
        assert problems == [], "\n".join(problems)
        # The upgraded store notifies of the jobs finished since (none for those v1
        # finished: notifications did not exist then).
        notified = {n.job_id for t in set(TENANT_OF.values()) | {"acme"}
                    for n in store.list_notifications(t, 100, False)[0]}  # fmt: skip
        assert active and notified == active
        before = snapshot(store)
    finally:
        store.close()
    # Again: migrate and start once more; nothing changes.
    assert "applied 0 migration(s)" in migrate_cli(store_env)
    run_workers(home, store_env)
    store = create_store(settings(store_env))
    try:
        assert snapshot(store) == before
    finally:
        store.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE / "wal", tmp_path / "wal")
    shutil.copytree(FIXTURE / "archive", tmp_path / "archive")
    return tmp_path


def test_a_v1_sqlite_store_and_wal_upgrade_without_losing_an_event(home: Path) -> None:
    db = home / "jennah.db"
    shutil.copyfile(FIXTURE / "jennah.db", db)
    store_env = {"DB_PROVIDER": "sqlite", "DB_PATH": str(db)}
    upgrade(home, store_env)
    active = active_jobs(store_env)
    store = create_store(settings(store_env))
    try:  # the delivered v1 events, renumbered: gapless, with positions and offsets
        events = store.list_events("beta", "00000000-0000-4000-8000-000000000003", 0, 100)
        assert [(e.seq, e.kind.value, e.dedup_key) for e in events] == [
            (1, "SUBMITTED", "v1:1"), (2, "SCHEDULED", "v1:2"),
            (3, "LEASE_CLAIMED", "v1:4294967297"), (4, "RUNNING", "v1:4294967298"),
            (5, "OUTPUT", "v1:4294967299"), (6, "OUTPUT", "v1:4294967300")]
        assert store.output_offsets("00000000-0000-4000-8000-000000000003") == {
            (0, 0, "stdout"): len("three a\nthree b\n")}
    finally:
        store.close()
    run_workers(home, store_env)
    check(home, store_env, active)


def _load_v1_rows_into_postgres(url: str) -> None:
    """The fixture's rows in a PostgreSQL database at schema 0001, as v1 left them."""
    store = PostgresStore(url)
    try:
        store.migrate([m for m in dialect_migrations("postgres") if m.name == "0001_init.sql"])
    finally:
        store.close()
    src = sqlite3.connect(FIXTURE / "jennah.db")
    src.row_factory = sqlite3.Row
    with psycopg.connect(url, autocommit=False) as dst:
        for table in ("tenants", "jobs", "job_transitions", "job_events", "workers"):
            rows = src.execute(f"SELECT * FROM {table}").fetchall()
            for row in rows:
                values: dict[str, Any] = dict(row)
                for col in TIME_COLUMNS.intersection(values):
                    if isinstance(values[col], int):
                        values[col] = from_micros(values[col])
                if table == "jobs":
                    values["spec"] = Jsonb(json.loads(values["spec"]))
                    values["cancel_requested"] = bool(values["cancel_requested"])
                cols = ", ".join(values)
                marks = ", ".join("%s" for _ in values)
                dst.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})",  # type: ignore[arg-type]
                            list(values.values()))
        dst.commit()
    src.close()


@pytest.mark.postgres
def test_a_v1_postgres_store_and_wal_upgrade_without_losing_an_event(
    home: Path, postgres_db_url: str
) -> None:
    _load_v1_rows_into_postgres(postgres_db_url)
    store_env = {"DB_PROVIDER": "postgres", "DATABASE_URL": postgres_db_url}
    upgrade(home, store_env)
    active = active_jobs(store_env)
    run_workers(home, store_env)
    check(home, store_env, active)


@pytest.fixture(autouse=True)
def _fixture_is_v1() -> Iterator[None]:
    """Guard: the fixture must stay as v1 wrote it (schema 0001 only)."""
    conn = sqlite3.connect(f"file:{FIXTURE / 'jennah.db'}?mode=ro", uri=True)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations")]
    finally:
        conn.close()
    assert names == ["0001_init.sql"]
    yield


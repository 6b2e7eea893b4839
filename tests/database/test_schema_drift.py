"""The migrated schemas match what the store code writes and reads, and the domain types.

The SQL stores build every query from the column lists in ``database._common`` (exposed
as ``TABLE_COLUMNS`` by each store module); these tests compare those lists with the
tables a real migration creates, and with the dataclasses the rows map to.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from database import _common, postgres, sqlite
from database.migrate import SCHEMA_DIR
from database.postgres import PostgresStore
from database.sqlite import SQLiteStore
from jennah.models import FailureClass, Job, JobEvent, JobPatch, JobStatus, Transition, WorkerInfo
from tests.database.store_contract import make_job

T0 = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def _fill_every_job_column(store: SQLiteStore | PostgresStore) -> Job:
    job, _ = store.create_job(make_job(request_id="r"), 30)
    store.request_cancel(job.tenant_id, job.job_id)
    store.renew_leases([(job.job_id, job.lease)], 30)
    patch = JobPatch(
        status=JobStatus.FAILED, attempt=1, provider_job_id="p", cloud_resource_path="r",
        error_message="e", failure_class=FailureClass.QUOTA, exit_code=2, scheduled_at=T0,
        started_at=T0, completed_at=T0,
    )  # fmt: skip
    return store.update_job(job.job_id, job.lease, patch)


def test_domain_types_match_the_column_lists() -> None:
    def names(cls: Any) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    assert names(Job) == set(_common.JOB_COLUMNS)
    assert names(JobEvent) - _common.EVENT_TRANSIT_FIELDS == set(_common.EVENT_COLUMNS)
    assert names(Transition) | {"idx"} == set(_common.TRANSITION_COLUMNS)
    assert names(WorkerInfo) == set(_common.WORKER_COLUMNS)
    assert sqlite.TABLE_COLUMNS is postgres.TABLE_COLUMNS is _common.TABLE_COLUMNS


def test_both_dialects_have_the_same_migration_files() -> None:
    def files(dialect: str) -> list[str]:
        return sorted(p.name for p in (SCHEMA_DIR / dialect).glob("*.sql"))

    assert files("sqlite") == files("postgres")
    assert files("sqlite")


def _assert_same(actual: Mapping[str, set[str]]) -> None:
    expected = {t: set(cols) for t, cols in _common.TABLE_COLUMNS.items()}
    assert actual == expected


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "drift.db")
    store.migrate()
    yield store
    store.close()


def test_sqlite_schema_matches_the_code(sqlite_store: SQLiteStore) -> None:
    job = _fill_every_job_column(sqlite_store)
    with sqlite3.connect(sqlite_store.path) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        info = {t: conn.execute(f"PRAGMA table_info({t})").fetchall() for t in tables}
        cur = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job.job_id,))
        row = dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))
    conn.close()
    _assert_same({t: {col[1] for col in cols} for t, cols in info.items()})
    for table, cols in info.items():
        for col in cols:
            if col[1] in _common.TIME_COLUMNS:
                assert col[2] == "INTEGER", (table, col[1])
    assert {k for k, v in row.items() if v is None} == set()


@pytest.mark.postgres
def test_postgres_schema_matches_the_code(postgres_db_url: str) -> None:
    store = PostgresStore(postgres_db_url)
    try:
        store.migrate()
        job = _fill_every_job_column(store)
    finally:
        store.close()
    with psycopg.connect(postgres_db_url) as conn:
        cols = conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public'"
        ).fetchall()
        cur = conn.execute("SELECT * FROM jobs WHERE job_id = %s", (job.job_id,))
        names = [d.name for d in cur.description or []]
        row = dict(zip(names, cur.fetchone() or (), strict=True))
    actual: dict[str, set[str]] = {}
    for table, column, data_type in cols:
        actual.setdefault(table, set()).add(column)
        if column in _common.TIME_COLUMNS:
            assert data_type == "timestamp with time zone", (table, column)
    _assert_same(actual)
    assert {k for k, v in row.items() if v is None} == set()

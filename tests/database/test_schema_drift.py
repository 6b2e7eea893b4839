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
from jennah.models import (
    FailureClass,
    Job,
    JobEvent,
    JobPatch,
    JobStatus,
    Notification,
    TaskState,
    TaskStatus,
    Transition,
    WorkerInfo,
)
from tests.database.store_contract import make_job

T0 = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def _fill_every_job_column(store: SQLiteStore | PostgresStore) -> Job:
    """A job with every column set (and so a notification), and a plain job whose task
    states are NULL."""
    store.create_job(make_job(request_id="plain"), 30)
    job, _ = store.create_job(make_job(request_id="r", task_count=2), 30)
    store.request_cancel(job.tenant_id, job.job_id)
    store.renew_leases([(job.job_id, job.lease)], 30)
    patch = JobPatch(
        status=JobStatus.FAILED, attempt=1, provider_job_id="p", cloud_resource_path="r",
        error_message="e", failure_class=FailureClass.QUOTA, exit_code=2, scheduled_at=T0,
        started_at=T0, completed_at=T0, tasks=(TaskState(1, TaskStatus.FAILED, exit_code=2),),
    )  # fmt: skip
    return store.update_job(job.job_id, job.lease, patch)


def test_domain_types_match_the_column_lists() -> None:
    def names(cls: Any) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    assert names(Job) == set(_common.JOB_COLUMNS)
    assert names(JobEvent) - _common.EVENT_TRANSIT_FIELDS == set(_common.EVENT_COLUMNS)
    assert names(Transition) | {"idx"} == set(_common.TRANSITION_COLUMNS)
    assert names(WorkerInfo) == set(_common.WORKER_COLUMNS)
    assert names(Notification) == set(_common.NOTIFICATION_COLUMNS)
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
        plain = conn.execute("SELECT tasks FROM jobs WHERE request_id = 'plain'").fetchall()
        notes = conn.execute("SELECT * FROM notifications").fetchall()
    conn.close()
    _assert_same({t: {col[1] for col in cols} for t, cols in info.items()})
    for table, cols in info.items():
        for col in cols:
            if col[1] in _common.TIME_COLUMNS:
                assert col[2] == "INTEGER", (table, col[1])
    assert {k for k, v in row.items() if v is None} == set()
    assert plain == [(None,)] and len(notes) == 1 and None not in notes[0]


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
        plain = conn.execute("SELECT tasks FROM jobs WHERE request_id = 'plain'").fetchall()
        notes = conn.execute("SELECT * FROM notifications").fetchall()
    actual: dict[str, set[str]] = {}
    for table, column, data_type in cols:
        actual.setdefault(table, set()).add(column)
        if column in _common.TIME_COLUMNS:
            assert data_type == "timestamp with time zone", (table, column)
    _assert_same(actual)
    assert {k for k, v in row.items() if v is None} == set()
    assert plain == [(None,)] and len(notes) == 1 and None not in notes[0]


# The tenant-facing notification reads, with "?" placeholders, as the stores run them,
# and whether they read only unread ones: each must be a range of one index of the
# tenant's rows (of its unread rows only, where it asks for those), already in order.
NOTIFICATION_READS = [
    ("SELECT * FROM notifications WHERE tenant_id = ? "
     "ORDER BY occurred_at DESC, notification_id DESC LIMIT 20", False),
    ("SELECT * FROM notifications WHERE tenant_id = ? AND is_read = FALSE "
     "ORDER BY occurred_at DESC, notification_id DESC LIMIT 20", True),
    ("SELECT count(*) FROM notifications WHERE tenant_id = ? AND is_read = FALSE", True),
]  # fmt: skip


def test_sqlite_notification_reads_use_an_index(sqlite_store: SQLiteStore) -> None:
    with sqlite3.connect(sqlite_store.path) as conn:
        plans = [(" ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {q}", ("t",))),
                  unread) for q, unread in NOTIFICATION_READS]  # fmt: skip
    conn.close()
    for plan, unread in plans:
        assert "INDEX notifications_" in plan, plan
        assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
        key = "(tenant_id=? AND is_read=?)" if unread else "(tenant_id=?)"
        assert plan.endswith(key), plan


@pytest.mark.postgres
def test_postgres_notification_reads_use_an_index(postgres_db_url: str) -> None:
    store = PostgresStore(postgres_db_url)
    try:
        store.migrate()
    finally:
        store.close()
    with psycopg.connect(postgres_db_url) as conn:
        # The table is empty, so the planner would scan or sort it anyway: forbid what
        # it can do without (the plan keeps a scan or a sort only if no index serves).
        for method in ("seqscan", "bitmapscan", "sort"):
            conn.execute(f"SET enable_{method} = off")
        for q, unread in NOTIFICATION_READS:
            rows = conn.execute(f"EXPLAIN {q.replace('?', '%s')}", ("t",)).fetchall()
            plan = " ".join(r[0] for r in rows)
            assert "Index" in plan and "notifications_" in plan, plan
            assert "Seq Scan" not in plan and "Sort" not in plan, plan
            assert ("is_read = false" in plan) is unread, plan

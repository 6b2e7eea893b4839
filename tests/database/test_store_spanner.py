"""The store contract, and Spanner specifics, against the Cloud Spanner emulator.

Each test gets a database of its own in the session's emulator (creating one and
applying the schema takes a fraction of a second). The whole module runs in about 25 s.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.cloud.spanner_v1 import KeySet

from database import _common, spanner
from database.base import JobStore
from database.migrate import dialect_migrations
from database.spanner import _V1_DONE as V1_DONE
from database.spanner import SpannerStore
from jennah.errors import StoreUnavailable
from jennah.models import EventKind, Job, JobEvent, JobPatch, JobStatus, Placed
from jennah.settings import StoreSettings
from tests.database.store_contract import (
    ReopenableContract,
    assert_fails_fast,
    make_job,
    run_threads,
)
from tests.fixtures.spanner import (
    SpannerEmulator,
    drop_database,
    new_database,
    running_emulator,
)
from tests.helpers import free_port

FILES = ["0001_init.sql", "0002_events_v2.sql", "0003_legacy_preferred_worker.sql",
         "0004_tasks_notifications.sql"]


def settings(emulator: SpannerEmulator, database: str) -> StoreSettings:
    return StoreSettings(kind="spanner", env={
        "DB_PROJECT_ID": emulator.project, "DB_INSTANCE": emulator.instance,
        "DB_DATABASE": database, "SPANNER_EMULATOR_HOST": emulator.host,
    })  # fmt: skip


@pytest.fixture
def spanner_db(spanner_emulator: SpannerEmulator) -> Iterator[str]:
    name = new_database(spanner_emulator)
    yield name
    drop_database(spanner_emulator, name)


@pytest.fixture
def open_spanner(
    spanner_emulator: SpannerEmulator, spanner_db: str
) -> Iterator[Callable[[], SpannerStore]]:
    handles: list[SpannerStore] = []

    def open_one() -> SpannerStore:
        handles.append(SpannerStore.from_settings(settings(spanner_emulator, spanner_db)))
        return handles[-1]

    yield open_one
    for h in handles:
        h.close()


class TestSpannerStore(ReopenableContract):
    kind = "spanner"

    @pytest.fixture
    def opener(self, open_spanner: Callable[[], SpannerStore]) -> Callable[[], JobStore]:
        return open_spanner


def test_schema_interleaves_jobs_in_tenants(open_spanner: Callable[[], SpannerStore]) -> None:
    store = open_spanner()
    assert store.migrate() == FILES
    with store._db.snapshot() as snap:
        rows = snap.execute_sql(
            "SELECT table_name, parent_table_name, on_delete_action "
            "FROM information_schema.tables WHERE table_schema = ''")
        tables = {r[0]: (r[1], r[2]) for r in rows}
    assert tables["Jobs"] == ("Tenants", "CASCADE")
    assert tables["JobTransitions"] == ("Jobs", "CASCADE")
    assert tables["JobEvents"] == ("Jobs", "CASCADE")
    assert tables["JobOutput"] == ("Jobs", "CASCADE")
    assert tables["Notifications"] == ("Tenants", "CASCADE")
    assert {"Tenants", "Workers", "SchemaMigrations"} <= set(tables)
    with store._db.snapshot() as snap:
        names = [r[0] for r in snap.execute_sql("SELECT name FROM SchemaMigrations ORDER BY name")]
    assert names == sorted([*FILES, V1_DONE])


def test_concurrent_migrators_apply_the_schema_once(
    open_spanner: Callable[[], SpannerStore],
) -> None:
    handles = [open_spanner() for _ in range(3)]
    results = run_threads(3, lambda i: handles[i].migrate())
    # Each file once, though not necessarily both by the same migrator.
    assert sorted(name for names in results for name in names) == FILES
    job, created = handles[0].create_job(make_job(), 30)
    assert created and handles[1].get_job(job.tenant_id, job.job_id) == job


def test_a_store_that_goes_down_fails_fast(spanner_emulator: SpannerEmulator) -> None:
    """A private emulator (the shared one keeps running) is stopped under the store."""
    with running_emulator("down-test", "down-instance") as private:
        store = SpannerStore.from_settings(settings(private, new_database(private)))
        store.migrate()
        store.ping()
    try:
        assert_fails_fast(store)
    finally:
        store.close()


def test_a_store_that_was_never_up_fails_fast() -> None:
    """No session exists yet, so the session is created against nothing listening."""
    nowhere = SpannerEmulator(f"127.0.0.1:{free_port()}", "nowhere", "no-instance")
    store = SpannerStore.from_settings(settings(nowhere, "nodb"))
    try:
        for call in (store.ping, lambda: store.create_job(make_job(), 30)):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - start < 5
    finally:
        store.close()


def test_close_is_prompt_and_idempotent(open_spanner: Callable[[], SpannerStore]) -> None:
    """The client's session maintenance thread would hold close() for minutes."""
    store = open_spanner()
    store.migrate()
    job, _ = store.create_job(make_job(), 30)
    assert store.get_job(job.tenant_id, job.job_id) == job
    start = time.monotonic()
    store.close()
    store.close()
    assert time.monotonic() - start < 2


# --- the v1 upgrade -------------------------------------------------------------------

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
LEASE_1 = 1 << 32  # v1 numbered events in blocks of 2**32 per lease version
V2_JOB_COLUMNS = {"tasks"}
V1_EVENT_COLUMNS = ("tenant_id", "job_id", "seq", "kind", "status", "message", "output",
                    "created_at", "worker_id")  # fmt: skip


def _v1_database(store: SpannerStore) -> None:
    """What the v1 code left: schema 0001 only, events numbered by lease blocks, with
    neither positions nor counters. Job A ran, was preempted and retried (attempt 1);
    job B and tenant-b's job C are pending. In tenant-a, A's and B's events interleave
    in time, and two of them share a timestamp (job id breaks the tie)."""
    [init] = [m for m in dialect_migrations("spanner") if m.name == "0001_init.sql"]
    assert store.migrate([init]) == ["0001_init.sql"]

    def job(job_id: str, tenant: str, **changes: Any) -> Job:
        base = dataclasses.replace(make_job(tenant), job_id=job_id)
        return dataclasses.replace(_common.new_job(base, T0, 60), **changes)

    jobs = [job("job-a", "tenant-a", status=JobStatus.RUNNING, attempt=1),
            job("job-b", "tenant-a"), job("job-c", "tenant-b")]  # fmt: skip

    def ev(job_id: str, seq: int, second: int, kind: EventKind, message: str = "",
           output: str = "") -> tuple[Any, ...]:  # fmt: skip
        tenant = "tenant-b" if job_id == "job-c" else "tenant-a"
        return (tenant, job_id, seq, kind.value, JobStatus.RUNNING.value, message, output,
                T0 + timedelta(seconds=second), "w1")  # fmt: skip

    events = [
        ev("job-a", 1, 0, EventKind.SUBMITTED, "job submitted"),
        ev("job-a", 2, 1, EventKind.OUTPUT, "stdout", "hello\n"),
        ev("job-b", 1, 2, EventKind.SUBMITTED, "job submitted"),
        ev("job-a", LEASE_1 + 1, 3, EventKind.OUTPUT, "stdout", "wörld\n"),
        ev("job-b", LEASE_1 + 1, 3, EventKind.STATUS_DETAIL, "queued"),
        ev("job-a", LEASE_1 + 2, 4, EventKind.RETRY, "preempted"),
        ev("job-a", LEASE_1 + 3, 5, EventKind.OUTPUT, "stdout", "again\n"),
        ev("job-c", 1, 1, EventKind.SUBMITTED, "job submitted"),
    ]

    def write(tx: Any, now: datetime) -> None:
        tx.insert("Tenants", ("tenant_id", "created_at"), [("tenant-a", T0), ("tenant-b", T0)])
        # v1 also wrote the column that is now legacy (NOT NULL until 0003), and not the
        # columns added since.
        cols = [col for col in spanner._COLS if col not in V2_JOB_COLUMNS]
        tx.insert("Jobs", (*cols, *_common.LEGACY_JOB_COLUMNS),
                  [(*(spanner._job_row(j)[col] for col in cols), "") for j in jobs])
        tx.insert("JobEvents", V1_EVENT_COLUMNS, events)

    store._run(write)


def _counters(store: SpannerStore) -> tuple[dict[str, int], dict[str, int]]:
    with store._db.snapshot(multi_use=True) as snap:
        jobs = {r[0]: r[1] for r in snap.execute_sql("SELECT job_id, event_seq FROM Jobs")}
        tenants = {r[0]: r[1] for r in snap.execute_sql(
            "SELECT tenant_id, event_position FROM Tenants")}  # fmt: skip
    return jobs, tenants


def _assert_upgraded(store: SpannerStore) -> list[JobEvent]:
    """The state every upgrade must end in, whatever its transactions; returns tenant-a's
    events in position order."""
    a = store.list_events("tenant-a", "job-a", 0, 100)
    assert [(e.seq, e.kind, e.attempt, e.dedup_key) for e in a] == [
        (1, EventKind.SUBMITTED, 0, "v1:1"),
        (2, EventKind.OUTPUT, 0, "v1:2"),
        (3, EventKind.OUTPUT, 0, f"v1:{LEASE_1 + 1}"),
        (4, EventKind.RETRY, 1, f"v1:{LEASE_1 + 2}"),
        (5, EventKind.OUTPUT, 1, f"v1:{LEASE_1 + 3}"),
    ]
    assert [e.output for e in a if e.kind is EventKind.OUTPUT] == ["hello\n", "wörld\n", "again\n"]
    b = store.list_events("tenant-a", "job-b", 0, 100)
    assert [(e.seq, e.kind) for e in b] == [(1, EventKind.SUBMITTED), (2, EventKind.STATUS_DETAIL)]
    [c_event] = store.list_events("tenant-b", "job-c", 0, 100)
    assert (c_event.seq, c_event.position) == (1, 1)
    assert store.output_offsets("job-a") == {(0, 0, "stdout"): 6 + 7, (1, 0, "stdout"): 6}
    assert store.output_offsets("job-b") == {}
    every = store.list_tenant_events("tenant-a", 0, 100)
    assert [e.position for e in every] == list(range(1, 8))
    for events in (a, b):  # a job's events in seq order along the tenant's positions
        assert [e.position for e in events] == sorted(e.position for e in events)
    jobs, tenants = _counters(store)
    assert jobs == {"job-a": 5, "job-b": 2, "job-c": 1}
    assert tenants == {"tenant-a": 7, "tenant-b": 1}
    return every


def _assert_v2_writes_follow(store: SpannerStore) -> None:
    """New events continue both counters; a v1 event delivered again (a v1 WAL replayed
    through the legacy import) is recognised by its dedup key."""
    job_b = store.get_job("tenant-a", "job-b")
    [(placed, stored)] = store.append_execution_events([JobEvent(
        job_id="job-b", tenant_id="tenant-a", seq=0, kind=EventKind.STATUS_DETAIL,
        status=JobStatus.PENDING, message="later", created_at=T0, worker_id="w1",
        dedup_key="d-new")])  # fmt: skip
    assert (placed, stored.seq, stored.position) == (Placed.STORED, 3, 8)
    replay = dataclasses.replace(store.list_events("tenant-a", "job-a", 1, 1)[0], seq=0,
                                 position=0)  # fmt: skip
    assert [p for p, _ in store.append_execution_events([replay], legacy=True)] == [
        Placed.DUPLICATE]
    moved = store.update_job("job-b", job_b.lease, JobPatch(status=JobStatus.SCHEDULED))
    assert [e.seq for e in store.list_events("tenant-a", "job-b", 0, 10)] == [1, 2, 3, 4]
    assert moved.status is JobStatus.SCHEDULED


def test_migrate_numbers_the_events_v1_left(open_spanner: Callable[[], SpannerStore]) -> None:
    store = open_spanner()
    _v1_database(store)
    assert store.migrate() == FILES[1:]
    every = _assert_upgraded(store)
    # One transaction: v1's tenant order exactly (time, then job id, then seq).
    assert [(e.job_id, e.seq) for e in every] == [
        ("job-a", 1), ("job-a", 2), ("job-b", 1), ("job-a", 3), ("job-b", 2), ("job-a", 4),
        ("job-a", 5)]  # fmt: skip
    before = store.list_tenant_events("tenant-a", 0, 100)
    assert store.migrate() == []
    assert store._upgrade_v1() == 0  # recorded: no scan
    keyset: Any = KeySet  # untyped
    with store._db.batch() as batch:  # not recorded: the scan finds nothing left
        batch.delete("SchemaMigrations", keyset(keys=[[V1_DONE]]))
    assert store._upgrade_v1() == 0
    assert store.list_tenant_events("tenant-a", 0, 100) == before
    _assert_v2_writes_follow(store)


def test_v1_upgrade_in_slices_resumes_after_a_crash(
    open_spanner: Callable[[], SpannerStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Transactions of two events: job A (five events) goes in three slices. The
    migrator dies after two transactions; the next migrate() finishes the work."""
    store = open_spanner()
    _v1_database(store)
    monkeypatch.setattr(spanner, "_UPGRADE_CHUNK", 2)
    real = SpannerStore._renumber_v1
    calls: list[int] = []

    def dies_after_two(self: SpannerStore, *args: Any) -> int:
        if len(calls) == 2:
            raise RuntimeError("migrator killed")
        calls.append(real(self, *args))
        return calls[-1]

    monkeypatch.setattr(SpannerStore, "_renumber_v1", dies_after_two)
    with pytest.raises(RuntimeError):
        store.migrate()
    assert calls == [2, 2]
    # Two slices of A are numbered, its last event still has its v1 seq.
    assert [(e.seq, bool(e.position)) for e in store.list_events("tenant-a", "job-a", 0, 9)] == [
        (1, True), (2, True), (3, True), (4, True), (LEASE_1 + 3, False)]
    monkeypatch.setattr(SpannerStore, "_renumber_v1", real)
    assert store.migrate() == []  # the DDL was recorded; the numbering goes on
    every = _assert_upgraded(store)
    # Across transactions positions follow the time of each job's first event still
    # unnumbered when the migrator planned: A's slices, then (planned again) B before
    # A's last event.
    assert [(e.job_id, e.seq) for e in every] == [
        ("job-a", 1), ("job-a", 2), ("job-a", 3), ("job-a", 4), ("job-b", 1), ("job-b", 2),
        ("job-a", 5)]  # fmt: skip
    _assert_v2_writes_follow(store)


def test_concurrent_migrators_number_the_v1_events_once(
    open_spanner: Callable[[], SpannerStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_spanner()
    _v1_database(store)
    monkeypatch.setattr(spanner, "_UPGRADE_CHUNK", 2)
    handles = [open_spanner() for _ in range(3)]
    results = run_threads(3, lambda i: handles[i].migrate())
    assert sorted(name for names in results for name in names) == FILES[1:]
    _assert_upgraded(store)
    _assert_v2_writes_follow(store)

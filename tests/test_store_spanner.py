"""The store contract, and Spanner specifics, against the Cloud Spanner emulator.

Each test gets a database of its own in the session's emulator (creating one and
applying the schema takes a fraction of a second). The whole module runs in about 35 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from database.base import JobStore
from database.spanner import SpannerStore
from jennah.errors import StoreUnavailable
from jennah.settings import StoreSettings
from tests.fixtures.spanner import (
    SpannerEmulator,
    drop_database,
    new_database,
    running_emulator,
)
from tests.helpers import free_port
from tests.store_contract import ReopenableContract, assert_fails_fast, make_job, run_threads


def settings(emulator: SpannerEmulator, database: str) -> StoreSettings:
    return StoreSettings(
        kind="spanner", spanner_project=emulator.project, spanner_instance=emulator.instance,
        spanner_database=database, spanner_emulator_host=emulator.host,
    )  # fmt: skip


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
    @pytest.fixture
    def opener(self, open_spanner: Callable[[], SpannerStore]) -> Callable[[], JobStore]:
        return open_spanner


def test_schema_interleaves_jobs_in_tenants(open_spanner: Callable[[], SpannerStore]) -> None:
    store = open_spanner()
    assert store.migrate() == ["0001_init.sql"]
    with store._db.snapshot() as snap:
        rows = snap.execute_sql(
            "SELECT table_name, parent_table_name, on_delete_action "
            "FROM information_schema.tables WHERE table_schema = ''")
        tables = {r[0]: (r[1], r[2]) for r in rows}
    assert tables["Jobs"] == ("Tenants", "CASCADE")
    assert tables["JobTransitions"] == ("Jobs", "CASCADE")
    assert tables["JobEvents"] == ("Jobs", "CASCADE")
    assert {"Tenants", "Workers", "SchemaMigrations"} <= set(tables)
    with store._db.snapshot() as snap:
        assert [r[0] for r in snap.execute_sql("SELECT name FROM SchemaMigrations")] == [
            "0001_init.sql"
        ]


def test_concurrent_migrators_apply_the_schema_once(
    open_spanner: Callable[[], SpannerStore],
) -> None:
    handles = [open_spanner() for _ in range(3)]
    results = run_threads(3, lambda i: handles[i].migrate())
    assert sorted(results) == [[], [], ["0001_init.sql"]]
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

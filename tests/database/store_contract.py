"""The job store contract (``database/base.py``), written once, run against every store.

A backend's test module (``tests/database/test_store_*.py``) subclasses :class:`StoreContract`
as a ``Test…`` class, sets ``kind`` to the store's name in ``database.STORES`` and
provides two fixtures:

* ``store``: a fresh, empty, migrated store (a new file, database, schema or prefix);
* ``open_handle`` (optional): a factory of further handles on the *same* storage, as
  separate worker processes would hold them; the default reuses ``store``.

Every registered store must have such a run: :func:`contract_runs` finds them, and
``tests/database/test_store_contract.py`` fails for a registered name without one. Nothing here
knows about SQL or any backend: only the ``JobStore`` methods are used.
Times are wall-clock based (short TTLs plus a short wait), so stores that use their
database's clock pass too; ``short_ttl`` and ``expiry_wait`` may be tuned by a subclass.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import ClassVar, TypeVar, cast

import pytest

from database import STORES
from database.base import AppendEvents, CreateJob, JobStore, UpdateJob
from jennah.errors import Conflict, InvalidArgument, LeaseLost, NotFound, StoreUnavailable
from jennah.models import (
    EVENT_FOR_STATUS,
    EventKind,
    FailureClass,
    Job,
    JobEvent,
    JobFilter,
    JobPatch,
    JobSpec,
    JobStatus,
    Lease,
    Placed,
    ResourceOverride,
    TaskState,
    TaskStatus,
)
from jennah.registry import load
from jennah.tasks import normalize
from tests.helpers import RegisteredContract

T = TypeVar("T")
LONG_TTL = 60.0
BASE = datetime(2030, 1, 1, tzinfo=UTC)


def make_job(
    tenant: str = "tenant-a",
    *,
    owner: str = "w1",
    request_id: str = "",
    name: str = "",
    labels: dict[str, str] | None = None,
    created_at: datetime | None = None,
    task_count: int = 1,
) -> Job:
    spec = JobSpec(
        image_uri="docker.io/library/busybox:1.36",
        commands=("sh", "-c", "echo hi"),
        env_vars={"TOKEN": "s3cret"},
        name=name,
        labels=labels or {},
        task_count=task_count,
    )
    return Job(
        job_id=f"j-{uuid.uuid4().hex[:12]}",
        tenant_id=tenant,
        spec=spec,
        request_id=request_id,
        provider="local",
        owner_worker_id=owner,
        created_at=created_at,
    )


def run_threads(n: int, fn: Callable[[int], T], timeout: float = 30.0) -> list[T]:
    """Run ``fn(0..n-1)`` in ``n`` threads started together; re-raise the first error."""
    barrier = threading.Barrier(n)
    results: list[T | None] = [None] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait(timeout)
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "threads did not finish in time"
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def output(job: Job, offset: int, text: str, *, attempt: int = 0,
           stream: str = "stdout", task: int | None = None) -> JobEvent:
    """An OUTPUT event of ``text`` at byte ``offset`` of ``stream`` (of task ``task``, for
    a job of several tasks), as a producer sends it."""
    end = offset + len(text.encode())
    return JobEvent(
        job_id=job.job_id, tenant_id=job.tenant_id, seq=0, kind=EventKind.OUTPUT,
        status=JobStatus.RUNNING, message=stream, output=text, created_at=BASE,
        worker_id="w1", attempt=attempt, offset=offset, end=end,
        dedup_key=f"out:{attempt}:{task or 0}:{stream}:{offset}", task_index=task,
    )  # fmt: skip


def detail(job: Job, key: str, *, attempt: int = 0) -> JobEvent:
    """A STATUS_DETAIL event with dedup key ``key``."""
    return JobEvent(
        job_id=job.job_id, tenant_id=job.tenant_id, seq=0, kind=EventKind.STATUS_DETAIL,
        status=job.status, message=f"detail {key}", created_at=BASE, worker_id="w1",
        attempt=attempt, dedup_key=key,
    )  # fmt: skip


def many_tasks(n: int) -> tuple[TaskState, ...]:
    """What a provider may report of ``n`` tasks: every state and field, times with
    microseconds (stored to the millisecond), in reverse order, with bare PENDING entries
    (the canonical form drops them)."""
    at = BASE + timedelta(microseconds=123_456)
    states = []
    for i in reversed(range(n)):
        status = list(TaskStatus)[i % 5]
        ran = status is not TaskStatus.PENDING
        states.append(TaskState(
            index=i, status=status, attempt=i % 3,
            exit_code=(i % 7 if status is TaskStatus.FAILED else 0) if status.terminal else None,
            started_at=at + timedelta(seconds=i) if ran else None,
            completed_at=at + timedelta(seconds=2 * i) if status.terminal else None,
            error_message=f"task {i} failed: exit code {i % 7}" if status is TaskStatus.FAILED
            else "",
            failure_class=FailureClass.USER_ERROR if status is TaskStatus.FAILED else None,
        ))  # fmt: skip
    return tuple(states)


def kinds(store: JobStore, job: Job) -> list[tuple[int, EventKind]]:
    """``(seq, kind)`` of every stored event of ``job``, in seq order."""
    return [(e.seq, e.kind) for e in store.list_events(job.tenant_id, job.job_id, 0, 10_000)]


def assert_utc(*values: datetime | None) -> None:
    for v in values:
        assert v is not None and v.tzinfo is not None and v.utcoffset() == timedelta(0), v


class StoreContract(RegisteredContract):
    """Subclass with ``kind`` (the store's name in ``database.STORES``) and a ``store``
    fixture (fresh, empty, migrated)."""

    registry = STORES
    registry_name = "database.STORES"
    short_ttl: ClassVar[float] = 0.05
    expiry_wait: ClassVar[float] = 0.2

    @pytest.fixture
    def store(self) -> Iterator[JobStore]:
        raise NotImplementedError("a subclass provides a fresh, empty, migrated store")

    @pytest.fixture
    def open_handle(self, store: JobStore) -> Iterator[Callable[[], JobStore]]:
        yield lambda: store

    def test_it_is_the_registered_store(self, store: JobStore) -> None:
        assert isinstance(store, load(STORES, self.kind, "DB_PROVIDER"))
        assert store.name == self.kind

    # --- helpers -----------------------------------------------------------------------

    def _create(self, store: JobStore, job: Job, ttl: float = LONG_TTL) -> Job:
        stored, created = store.create_job(job, ttl)
        assert created
        return stored

    def _expired(self, store: JobStore, n: int, owner: str = "w1") -> list[Job]:
        jobs = [self._create(store, make_job(owner=owner), self.short_ttl) for _ in range(n)]
        time.sleep(self.expiry_wait)
        return jobs

    def _list_all(self, store: JobStore, tenant: str, flt: JobFilter, size: int) -> list[list[Job]]:
        pages, token = [], ""
        for _ in range(100):
            page = store.list_jobs(tenant, flt, size, token)
            pages.append(page.jobs)
            token = page.next_page_token
            if not token:
                return pages
        raise AssertionError("paging never ended")

    # --- basics ------------------------------------------------------------------------

    def test_ping_and_migrate_again(self, store: JobStore) -> None:
        store.ping()
        assert store.migrate() == []

    def test_create_and_get_round_trip(self, store: JobStore) -> None:
        spec = JobSpec(
            image_uri="gcr.io/p/img@sha256:" + "a" * 64,
            commands=("python", "-c", "print('é ; \" x')"),
            env_vars={"A": "1", "B": "two words"},
            name="nightly-etl",
            labels={"env": "prod", "team": "data"},
            resource_profile="large",
            resource_override=ResourceOverride(1500, 3072, 600),
            machine_type="e2-standard-4",
            boot_disk_size_gb=50,
            use_spot_vms=True,
            service_account="sa@p.iam",
            max_retries=3,
        )
        job = dataclasses.replace(
            make_job(request_id="req-1"), spec=spec,
            provider_job_id="pj-1", cloud_resource_path="projects/p/jobs/x",
        )  # fmt: skip
        before = datetime.now(UTC)
        stored, created = store.create_job(job, 30.0)
        after = datetime.now(UTC)
        assert created
        assert stored.status is JobStatus.PENDING
        assert stored.lease_version == 1
        assert stored.owner_worker_id == "w1"
        assert stored.lease_expires_at is not None
        slack = timedelta(seconds=2)
        assert before + timedelta(seconds=30) - slack <= stored.lease_expires_at
        assert stored.lease_expires_at <= after + timedelta(seconds=30) + slack
        assert_utc(stored.created_at, stored.updated_at, stored.lease_expires_at)
        assert stored.created_at is not None
        assert before - slack <= stored.created_at <= after + slack
        got = store.get_job(job.tenant_id, job.job_id)
        assert got == stored
        assert got.spec == spec
        for name in ("request_id", "provider", "provider_job_id",
                     "cloud_resource_path"):  # fmt: skip
            assert getattr(got, name) == getattr(job, name)
        assert (got.failure_class, got.exit_code, got.cancel_requested) == (None, None, False)
        assert got.scheduled_at is None and got.started_at is None and got.completed_at is None

    def test_create_forces_pending_and_keeps_given_created_at(self, store: JobStore) -> None:
        job = dataclasses.replace(make_job(created_at=BASE), status=JobStatus.RUNNING,
                                  lease_version=7)  # fmt: skip
        stored = self._create(store, job)
        assert (stored.status, stored.lease_version, stored.created_at) == (
            JobStatus.PENDING, 1, BASE,
        )  # fmt: skip
        [t] = store.list_transitions(job.tenant_id, job.job_id)
        assert (t.from_status, t.to_status, t.worker_id) == (None, JobStatus.PENDING, "w1")

    def test_get_unknown_job_is_not_found(self, store: JobStore) -> None:
        with pytest.raises(NotFound):
            store.get_job("tenant-a", "nope")

    def test_request_id_is_idempotent(self, store: JobStore) -> None:
        first = self._create(store, make_job(request_id="r1"))
        again, created = store.create_job(make_job(request_id="r1"), LONG_TTL)
        assert not created and again == first
        other_tenant, created = store.create_job(make_job("tenant-b", request_id="r1"), 1)
        assert created and other_tenant.job_id != first.job_id
        plain = [self._create(store, make_job(request_id="")) for _ in range(2)]
        assert plain[0].job_id != plain[1].job_id
        assert len(store.list_jobs("tenant-a", JobFilter(), 50, "").jobs) == 3

    def test_concurrent_creates_with_one_request_id_make_one_job(
        self, store: JobStore, open_handle: Callable[[], JobStore]
    ) -> None:
        handles = [open_handle() for _ in range(8)]
        results = run_threads(8, lambda i: handles[i].create_job(make_job(request_id="rx"), 30))
        assert sum(created for _, created in results) == 1
        assert len({job.job_id for job, _ in results}) == 1
        assert len(store.list_jobs("tenant-a", JobFilter(), 50, "").jobs) == 1
        assert len(store.list_transitions("tenant-a", results[0][0].job_id)) == 1

    # --- tenant isolation ----------------------------------------------------------------

    def test_tenant_isolation(self, store: JobStore) -> None:
        job = self._create(store, make_job("tenant-a"))
        b = "tenant-b"
        self._create(store, make_job(b))
        with pytest.raises(NotFound):
            store.get_job(b, job.job_id)
        with pytest.raises(NotFound):
            store.request_cancel(b, job.job_id)
        with pytest.raises(NotFound):
            store.delete_job(b, job.job_id)
        with pytest.raises(NotFound):
            store.list_transitions(b, job.job_id)
        assert store.list_events(b, job.job_id, 0, 100) == []
        assert {e.tenant_id for e in store.list_tenant_events(b, 0, 100)} == {b}
        assert [j.tenant_id for j in store.list_jobs(b, JobFilter(), 50, "").jobs] == [b]
        forged = store.append_execution_events([dataclasses.replace(detail(job, "f"),
                                                                    tenant_id=b)])  # fmt: skip
        assert [p for p, _ in forged] == [Placed.STALE]
        assert [e.seq for e in store.list_events("tenant-a", job.job_id, 0, 100)] == [1]
        got = store.get_job("tenant-a", job.job_id)
        assert got == job and not got.cancel_requested

    # --- listing -----------------------------------------------------------------------

    def test_paging_newest_first_without_gaps(self, store: JobStore) -> None:
        jobs = [self._create(store, make_job(created_at=BASE + timedelta(seconds=i)))
                for i in range(23)]  # fmt: skip
        self._create(store, make_job("tenant-b"))
        pages = self._list_all(store, "tenant-a", JobFilter(), 10)
        assert [len(p) for p in pages] == [10, 10, 3]
        listed = [j.job_id for p in pages for j in p]
        assert listed == [j.job_id for j in reversed(jobs)]

    def test_paging_through_equal_created_at_orders_by_job_id(self, store: JobStore) -> None:
        jobs = [self._create(store, make_job(created_at=BASE)) for _ in range(7)]
        pages = self._list_all(store, "tenant-a", JobFilter(), 3)
        assert [len(p) for p in pages] == [3, 3, 1]
        listed = [j.job_id for p in pages for j in p]
        assert listed == sorted((j.job_id for j in jobs), reverse=True)

    def test_exact_page_ends_with_empty_token(self, store: JobStore) -> None:
        for i in range(4):
            self._create(store, make_job(created_at=BASE + timedelta(seconds=i)))
        first = store.list_jobs("tenant-a", JobFilter(), 4, "")
        assert len(first.jobs) == 4 and first.next_page_token == ""
        assert store.list_jobs("tenant-b", JobFilter(), 4, "").jobs == []

    @pytest.mark.parametrize("token", ["!!!", "abc", "bm90IGpzb24", "WzEsMiwzXQ", "e30"])
    def test_bad_page_token_is_invalid_argument(self, store: JobStore, token: str) -> None:
        with pytest.raises(InvalidArgument):
            store.list_jobs("tenant-a", JobFilter(), 10, token)

    def test_filters_combine_with_paging(self, store: JobStore) -> None:
        matching = []
        for i in range(15):
            labels = {"env": "prod" if i % 3 else "dev", "team": "data"}
            job = make_job(name=f"{'etl' if i % 2 else 'web'}-{i}", labels=labels,
                           created_at=BASE + timedelta(seconds=i))  # fmt: skip
            self._create(store, job)
            if i % 3 and i % 2:
                matching.append(job.job_id)
        flt = JobFilter(labels={"env": "prod", "team": "data"}, name_prefix="etl")
        pages = self._list_all(store, "tenant-a", flt, 2)
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [j.job_id for p in pages for j in p] == list(reversed(matching))
        assert store.list_jobs("tenant-a", JobFilter(labels={"env": "qa"}), 10, "").jobs == []
        assert len(store.list_jobs("tenant-a", JobFilter(name_prefix="web-1"), 50, "").jobs) == 3

    def test_status_filter(self, store: JobStore) -> None:
        jobs = [self._create(store, make_job(created_at=BASE + timedelta(seconds=i)))
                for i in range(6)]  # fmt: skip
        for job in jobs[::2]:
            store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.SCHEDULED))
        flt = JobFilter(status=JobStatus.SCHEDULED)
        pages = self._list_all(store, "tenant-a", flt, 2)
        assert [len(p) for p in pages] == [2, 1]
        assert [j.job_id for p in pages for j in p] == [jobs[4].job_id, jobs[2].job_id,
                                                         jobs[0].job_id]  # fmt: skip
        pending = store.list_jobs("tenant-a", JobFilter(status=JobStatus.PENDING), 10, "")
        assert {j.job_id for j in pending.jobs} == {j.job_id for j in jobs[1::2]}

    # --- transitions and updates ---------------------------------------------------------

    def test_forward_transitions_are_recorded(self, store: JobStore) -> None:
        job = self._create(store, make_job())
        t0 = BASE + timedelta(hours=1)
        steps = [
            (JobPatch(status=JobStatus.SCHEDULED, scheduled_at=t0, provider_job_id="p-1",
                      cloud_resource_path="res/1"), "submitted"),
            (JobPatch(status=JobStatus.RUNNING, started_at=t0 + timedelta(seconds=5)), "poll"),
            (JobPatch(status=JobStatus.FAILED, completed_at=t0 + timedelta(seconds=9),
                      failure_class=FailureClass.USER_ERROR, exit_code=0,
                      error_message="boom"), "exit"),
        ]  # fmt: skip
        for patch, reason in steps:
            job = store.update_job(job.job_id, job.lease, patch, reason)
        got = store.get_job("tenant-a", job.job_id)
        assert got == job
        assert got.status is JobStatus.FAILED
        assert (got.scheduled_at, got.started_at) == (t0, t0 + timedelta(seconds=5))
        assert got.completed_at == t0 + timedelta(seconds=9)
        assert (got.failure_class, got.exit_code, got.error_message) == (
            FailureClass.USER_ERROR, 0, "boom",
        )  # fmt: skip
        assert (got.provider_job_id, got.cloud_resource_path) == ("p-1", "res/1")
        ts = store.list_transitions("tenant-a", job.job_id)
        assert [(t.from_status, t.to_status, t.reason, t.worker_id) for t in ts] == [
            (None, JobStatus.PENDING, "created", "w1"),
            (JobStatus.PENDING, JobStatus.SCHEDULED, "submitted", "w1"),
            (JobStatus.SCHEDULED, JobStatus.RUNNING, "poll", "w1"),
            (JobStatus.RUNNING, JobStatus.FAILED, "exit", "w1"),
        ]
        assert_utc(*(t.at for t in ts))
        assert [t.at for t in ts] == sorted(t.at for t in ts)

    def test_store_stamps_only_updated_at(self, store: JobStore) -> None:
        job = self._create(store, make_job(created_at=BASE))
        time.sleep(0.01)
        updated = store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.RUNNING))
        assert updated.started_at is None and updated.scheduled_at is None
        assert updated.completed_at is None
        assert updated.created_at == BASE
        assert job.updated_at is not None and updated.updated_at is not None
        assert updated.updated_at > job.updated_at
        assert_utc(updated.updated_at)

    def test_same_status_and_clear_resource_write_no_transition(self, store: JobStore) -> None:
        job = self._create(store, make_job())
        job = store.update_job(job.job_id, job.lease,
                               JobPatch(provider_job_id="p", cloud_resource_path="r"))  # fmt: skip
        job = store.update_job(job.job_id, job.lease, JobPatch(
            status=JobStatus.PENDING, clear_resource=True, attempt=1, error_message="retry"))
        assert (job.provider_job_id, job.cloud_resource_path) == ("", "")
        assert (job.attempt, job.error_message, job.status) == (1, "retry", JobStatus.PENDING)
        assert len(store.list_transitions("tenant-a", job.job_id)) == 1

    def test_backward_and_terminal_moves_conflict_and_change_nothing(
        self, store: JobStore
    ) -> None:
        job = self._create(store, make_job())
        job = store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.RUNNING))
        for status in (JobStatus.SCHEDULED, JobStatus.PENDING):
            with pytest.raises(Conflict):
                store.update_job(job.job_id, job.lease,
                                 JobPatch(status=status, error_message="x"))  # fmt: skip
        assert store.get_job("tenant-a", job.job_id) == job
        job = store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.COMPLETED))
        transitions = store.list_transitions("tenant-a", job.job_id)
        for status in (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.RUNNING):
            with pytest.raises(Conflict):
                store.update_job(job.job_id, job.lease, JobPatch(status=status, exit_code=3))
        assert store.get_job("tenant-a", job.job_id) == job
        assert store.list_transitions("tenant-a", job.job_id) == transitions

    def test_an_update_from_a_stale_copy_keeps_what_changed_meanwhile(
        self, store: JobStore
    ) -> None:
        """``UpdateJob.expected`` is only a hint: a renewal, a cancel request or another
        update made since the caller's copy is neither undone nor ignored."""
        job = self._create(store, make_job())
        store.renew_leases([(job.job_id, job.lease)], LONG_TTL * 2)
        renewed = store.get_job("tenant-a", job.job_id).lease_expires_at
        (got,) = store.write_batch([UpdateJob(job.job_id, job.lease,
                                              JobPatch(status=JobStatus.SCHEDULED), "s", job)])
        assert isinstance(got, Job) and got.status is JobStatus.SCHEDULED
        assert store.get_job("tenant-a", job.job_id).lease_expires_at == renewed
        store.request_cancel("tenant-a", job.job_id)  # after the caller's copy
        (got,) = store.write_batch([UpdateJob(job.job_id, job.lease,
                                              JobPatch(status=JobStatus.RUNNING), "r", job)])
        assert isinstance(got, Job) and got.cancel_requested and got.status is JobStatus.RUNNING
        now = store.get_job("tenant-a", job.job_id)
        assert now.cancel_requested and now.status is JobStatus.RUNNING
        # A copy that is behind on the status: the move is judged on the stored row.
        (stale,) = store.write_batch([UpdateJob(job.job_id, job.lease, JobPatch(
            status=JobStatus.SCHEDULED), "back", job)])
        assert isinstance(stale, Conflict)
        assert [k for _, k in kinds(store, job)] == [
            EventKind.SUBMITTED, EventKind.SCHEDULED, EventKind.RUNNING]

    def test_fenced_update_with_wrong_lease_is_lost(self, store: JobStore) -> None:
        job = self._create(store, make_job())
        patch = JobPatch(status=JobStatus.SCHEDULED, error_message="x")
        for lease in (Lease("w1", 2), Lease("w2", 1), Lease("w1", 0)):
            with pytest.raises(LeaseLost):
                store.update_job(job.job_id, lease, patch)
        with pytest.raises(LeaseLost):
            store.update_job("no-such-job", job.lease, patch)
        assert store.get_job("tenant-a", job.job_id) == job
        assert len(store.list_transitions("tenant-a", job.job_id)) == 1

    # --- events --------------------------------------------------------------------------

    def _running(self, store: JobStore, job: Job) -> Job:
        return store.update_job(job.job_id, job.lease,
                                JobPatch(status=JobStatus.RUNNING, started_at=BASE), "runs")

    def test_every_transition_writes_its_event_in_order(self, store: JobStore) -> None:
        job = self._create(store, make_job())
        assert kinds(store, job) == [(1, EventKind.SUBMITTED)]
        for status in (JobStatus.SCHEDULED, JobStatus.RUNNING, JobStatus.COMPLETED):
            job = store.update_job(job.job_id, job.lease, JobPatch(status=status), f"to {status}")
        job = store.update_job(job.job_id, job.lease, JobPatch(error_message="x"))  # no event
        got = store.list_events("tenant-a", job.job_id, 0, 100)
        assert [(e.seq, e.kind, e.status, e.message) for e in got] == [
            (1, EventKind.SUBMITTED, JobStatus.PENDING, "job submitted"),
            (2, EventKind.SCHEDULED, JobStatus.SCHEDULED, "to SCHEDULED"),
            (3, EventKind.RUNNING, JobStatus.RUNNING, "to RUNNING"),
            (4, EventKind.COMPLETED, JobStatus.COMPLETED, "to COMPLETED"),
        ]
        assert len(store.list_transitions("tenant-a", job.job_id)) == 4
        assert [e.position for e in got] == sorted({e.position for e in got})
        assert all(e.worker_id == "w1" and e.attempt == 0 for e in got)
        assert_utc(*(e.created_at for e in got))
        assert [e.seq for e in store.list_events("tenant-a", job.job_id, 2, 100)] == [3, 4]
        assert [e.seq for e in store.list_events("tenant-a", job.job_id, 0, 2)] == [1, 2]
        assert store.list_events("tenant-b", job.job_id, 0, 10) == []
        assert store.list_events("tenant-a", "unknown", 0, 10) == []

    def test_a_terminal_state_seen_before_running_records_running_first(
        self, store: JobStore
    ) -> None:
        job = self._create(store, make_job())
        job = store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.SCHEDULED))
        done = store.update_job(job.job_id, job.lease, JobPatch(
            status=JobStatus.COMPLETED, started_at=BASE, completed_at=BASE, exit_code=0), "exit")
        assert done.started_at == BASE
        assert [k for _, k in kinds(store, job)] == [
            EventKind.SUBMITTED, EventKind.SCHEDULED, EventKind.RUNNING, EventKind.COMPLETED]
        steps = [(t.from_status, t.to_status) for t in store.list_transitions("tenant-a",
                                                                                job.job_id)]
        assert steps[-2:] == [(JobStatus.SCHEDULED, JobStatus.RUNNING),
                              (JobStatus.RUNNING, JobStatus.COMPLETED)]  # fmt: skip
        # Without a start time (never ran: rejected, cancelled while queued) no RUNNING.
        other = self._create(store, make_job())
        store.update_job(other.job_id, other.lease, JobPatch(status=JobStatus.FAILED), "no")
        assert [k for _, k in kinds(store, other)] == [EventKind.SUBMITTED, EventKind.FAILED]

    def test_retry_reenters_pending_with_one_retry_event(self, store: JobStore) -> None:
        job = self._running(store, self._create(store, make_job()))
        job = store.update_job(job.job_id, job.lease, JobPatch(
            provider_job_id="p", cloud_resource_path="r"))
        retried = store.update_job(job.job_id, job.lease,
                                   JobPatch(attempt=1, retry=True), "preempted")  # fmt: skip
        assert (retried.status, retried.attempt, retried.cloud_resource_path) == (
            JobStatus.PENDING, 1, "")
        events = store.list_events("tenant-a", job.job_id, 0, 100)
        assert [(e.kind, e.status, e.attempt) for e in events][-1] == (
            EventKind.RETRY, JobStatus.PENDING, 1)
        assert store.list_transitions("tenant-a", job.job_id)[-1].to_status is JobStatus.PENDING
        with pytest.raises(Conflict):  # attempts go one at a time
            store.update_job(job.job_id, retried.lease, JobPatch(attempt=3, retry=True))
        again = self._running(store, retried)
        assert [e.kind for e in store.list_events("tenant-a", job.job_id, 0, 100)][-1] == (
            EventKind.RUNNING)
        assert again.status is JobStatus.RUNNING and again.attempt == 1

    def test_status_details_are_stored_once_per_dedup_key(self, store: JobStore) -> None:
        job = self._create(store, make_job())
        first = store.append_execution_events([detail(job, "d1"), detail(job, "d1")])
        assert [p for p, _ in first] == [Placed.STORED, Placed.DUPLICATE]
        assert first[0][1].seq == 2 and first[0][1].position > 0
        again = store.append_execution_events([detail(job, "d1"), detail(job, "d2")])
        assert [p for p, _ in again] == [Placed.DUPLICATE, Placed.STORED]
        assert kinds(store, job) == [(1, EventKind.SUBMITTED), (2, EventKind.STATUS_DETAIL),
                                     (3, EventKind.STATUS_DETAIL)]  # fmt: skip
        assert [p for p, _ in store.append_execution_events(
            [detail(job, "old", attempt=1), detail(make_job(), "ghost")])] == [
            Placed.STALE, Placed.STALE]  # fmt: skip

    def test_output_goes_in_once_in_order_and_only_while_running(self, store: JobStore) -> None:
        job = self._create(store, make_job())

        def put(*events: JobEvent) -> list[Placed]:
            return [p for p, _ in store.append_execution_events(events)]

        assert put(output(job, 0, "a\n")) == [Placed.OUT_OF_ORDER]  # before RUNNING
        job = self._running(store, job)
        assert put(output(job, 0, "a\n"), output(job, 2, "bé\n")) == [Placed.STORED] * 2
        assert put(output(job, 0, "a\n")) == [Placed.DUPLICATE]  # resent
        assert put(output(job, 2, "bé\ncc\n")) == [Placed.OUT_OF_ORDER]  # cut differently
        assert put(output(job, 9, "gap\n")) == [Placed.OUT_OF_ORDER]
        assert put(output(job, 0, "e\n", stream="stderr")) == [Placed.STORED]
        assert put(output(job, 0, "old\n", attempt=1)) == [Placed.STALE]
        assert store.output_offsets(job.job_id) == {(0, 0, "stdout"): 6, (0, 0, "stderr"): 2}
        job = store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.COMPLETED))
        assert put(output(job, 6, "late\n")) == [Placed.STALE]  # nothing after the end
        got = store.list_events("tenant-a", job.job_id, 0, 100)
        assert [(e.kind, e.output) for e in got if e.kind is EventKind.OUTPUT] == [
            (EventKind.OUTPUT, "a\n"), (EventKind.OUTPUT, "bé\n"), (EventKind.OUTPUT, "e\n")]
        assert [e.seq for e in got] == list(range(1, len(got) + 1))
        assert got[-1].kind is EventKind.COMPLETED

    def test_tenant_events_follow_positions_in_commit_order(self, store: JobStore) -> None:
        a = self._create(store, make_job())
        b = self._create(store, make_job())
        other = self._create(store, make_job("tenant-b"))
        store.append_execution_events([detail(b, "x"), detail(a, "y"), detail(other, "z")])
        store.update_job(a.job_id, a.lease, JobPatch(status=JobStatus.SCHEDULED))
        got = store.list_tenant_events("tenant-a", 0, 100)
        pairs = [(e.job_id, e.kind) for e in got]
        assert pairs[:2] == [(a.job_id, EventKind.SUBMITTED), (b.job_id, EventKind.SUBMITTED)]
        assert sorted(pairs[2:4]) == sorted([(a.job_id, EventKind.STATUS_DETAIL),
                                             (b.job_id, EventKind.STATUS_DETAIL)])  # fmt: skip
        assert pairs[4:] == [(a.job_id, EventKind.SCHEDULED)]
        positions = [e.position for e in got]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        after = store.list_tenant_events("tenant-a", positions[2], 100)
        assert [e.position for e in after] == positions[3:]
        assert [e.position for e in store.list_tenant_events("tenant-a", 0, 2)] == positions[:2]
        assert [e.job_id for e in store.list_tenant_events("tenant-b", 0, 10)] == [
            other.job_id, other.job_id]
        assert store.list_tenant_events("tenant-c", 0, 10) == []

    def test_write_batch_fails_a_bad_op_alone(self, store: JobStore) -> None:
        job = self._create(store, make_job())
        new = make_job(request_id="batch-1")
        results = store.write_batch([
            UpdateJob(job.job_id, Lease("w9", 7), JobPatch(status=JobStatus.RUNNING)),
            CreateJob(new, LONG_TTL),
            UpdateJob(job.job_id, job.lease, JobPatch(status=JobStatus.SCHEDULED), "ok"),
            UpdateJob(job.job_id, job.lease, JobPatch(status=JobStatus.PENDING), "backwards"),
            CreateJob(dataclasses.replace(new, job_id="another"), LONG_TTL),
            AppendEvents((detail(job, "k"),)),
        ])  # fmt: skip
        assert isinstance(results[0], LeaseLost)
        stored, created = cast(tuple[Job, bool], results[1])
        assert created and stored.job_id == new.job_id
        assert isinstance(results[2], Job) and results[2].status is JobStatus.SCHEDULED
        assert isinstance(results[3], Conflict)
        assert results[4] == (stored, False)  # same request id, same batch
        assert [p for p, _ in cast(list[tuple[Placed, JobEvent]], results[5])] == [Placed.STORED]
        assert [k for _, k in kinds(store, job)] == [
            EventKind.SUBMITTED, EventKind.SCHEDULED, EventKind.STATUS_DETAIL]
        assert [k for _, k in kinds(store, stored)] == [EventKind.SUBMITTED]

    def test_concurrent_writers_get_gapless_seq_and_unique_positions(
        self, store: JobStore, open_handle: Callable[[], JobStore]
    ) -> None:
        job = self._running(store, self._create(store, make_job()))
        sibling = self._create(store, make_job())
        n_threads, per_thread = 8, 6

        def writer(i: int) -> int:
            handle = open_handle()
            for k in range(per_thread):
                if k % 3 == 2:  # a fenced no-status update with a failing sibling op
                    handle.write_batch([
                        UpdateJob(job.job_id, job.lease, JobPatch(error_message=f"{i}.{k}")),
                        AppendEvents((detail(sibling, f"s{i}.{k}"),)),
                    ])  # fmt: skip
                handle.append_execution_events([detail(job, f"d{i}.{k}"),
                                                detail(job, f"d{i}.{k}")])  # fmt: skip
            return i

        run_threads(n_threads, writer)
        done = store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.COMPLETED))
        got = store.list_events("tenant-a", job.job_id, 0, 10_000)
        assert [e.seq for e in got] == list(range(1, len(got) + 1))
        assert len(got) == 2 + n_threads * per_thread + 1  # SUBMITTED, RUNNING, ..., end
        assert len({e.dedup_key for e in got if e.dedup_key}) == n_threads * per_thread
        assert got[-1].kind is EventKind.COMPLETED and done.status is JobStatus.COMPLETED
        every = store.list_tenant_events("tenant-a", 0, 10_000)
        positions = [e.position for e in every]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        assert {(e.job_id, e.seq) for e in every} >= {(e.job_id, e.seq) for e in got}

    def test_has_active_jobs(self, store: JobStore) -> None:
        assert not store.has_active_jobs("tenant-a")
        job = self._create(store, make_job())
        assert store.has_active_jobs("tenant-a") and not store.has_active_jobs("tenant-b")
        store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.CANCELLED))
        assert not store.has_active_jobs("tenant-a")

    def test_delete_removes_job_transitions_events_and_offsets(self, store: JobStore) -> None:
        job = self._running(store, self._create(store, make_job()))
        keep = self._create(store, make_job())
        store.append_execution_events([output(job, 0, "x\n")])
        store.delete_job("tenant-a", job.job_id)
        with pytest.raises(NotFound):
            store.get_job("tenant-a", job.job_id)
        with pytest.raises(NotFound):
            store.list_transitions("tenant-a", job.job_id)
        with pytest.raises(NotFound):
            store.delete_job("tenant-a", job.job_id)
        assert store.list_events("tenant-a", job.job_id, 0, 10) == []
        assert store.output_offsets(job.job_id) == {}
        assert {e.job_id for e in store.list_tenant_events("tenant-a", 0, 10)} == {keep.job_id}
        placed = store.append_execution_events([output(job, 2, "y\n")])
        assert [p for p, _ in placed] == [Placed.STALE]
        assert store.list_owned_jobs("w1") == [keep]

    def test_request_cancel_is_unfenced(self, store: JobStore) -> None:
        job = self._create(store, make_job(owner="someone-else"))
        marked = store.request_cancel("tenant-a", job.job_id)
        assert marked.cancel_requested and marked.lease == job.lease
        assert marked.status is JobStatus.PENDING
        assert store.get_job("tenant-a", job.job_id) == marked
        with pytest.raises(NotFound):
            store.request_cancel("tenant-a", "missing")

    # --- leases --------------------------------------------------------------------------

    def test_live_leases_are_not_claimed(self, store: JobStore) -> None:
        self._create(store, make_job())
        assert store.claim_expired("w2", LONG_TTL, 10) == []

    def test_claim_expired_takes_over_with_new_version(self, store: JobStore) -> None:
        jobs = self._expired(store, 3)
        done = self._create(store, make_job(), self.short_ttl)
        store.update_job(done.job_id, done.lease, JobPatch(status=JobStatus.CANCELLED))
        time.sleep(self.expiry_wait)
        first = store.claim_expired("w2", LONG_TTL, 2)
        rest = store.claim_expired("w2", LONG_TTL, 10)
        assert len(first) == 2 and len(rest) == 1
        claimed = {j.job_id: j for j in first + rest}
        assert set(claimed) == {j.job_id for j in jobs}
        for job in claimed.values():
            assert job.lease == Lease("w2", 2)
            assert job.lease_expires_at is not None
            assert job.lease_expires_at > datetime.now(UTC) + timedelta(seconds=LONG_TTL / 2)
            assert_utc(job.lease_expires_at, job.last_heartbeat_at)
            assert store.get_job("tenant-a", job.job_id) == job
            events = store.list_events("tenant-a", job.job_id, 0, 10)
            assert [(e.seq, e.kind, e.worker_id) for e in events] == [
                (1, EventKind.SUBMITTED, "w1"), (2, EventKind.LEASE_CLAIMED, "w2")]
            assert "claimed from w1" in events[1].message
        assert store.claim_expired("w3", LONG_TTL, 10) == []

    def test_concurrent_claims_win_each_job_once(
        self, store: JobStore, open_handle: Callable[[], JobStore]
    ) -> None:
        jobs = self._expired(store, 20)
        handles = [open_handle() for _ in range(8)]

        def claim_all(i: int) -> list[str]:
            won: list[str] = []
            while batch := handles[i].claim_expired(f"c{i}", LONG_TTL, 3):
                won += [j.job_id for j in batch]
                assert all(j.lease == Lease(f"c{i}", 2) for j in batch)
            return won

        wins = [job_id for won in run_threads(8, claim_all) for job_id in won]
        assert sorted(wins) == sorted(j.job_id for j in jobs)
        for job in jobs:
            assert store.get_job("tenant-a", job.job_id).lease_version == 2

    def test_stale_owner_loses_after_takeover(self, store: JobStore) -> None:
        [job] = self._expired(store, 1)
        [taken] = store.claim_expired("w2", LONG_TTL, 5)
        with pytest.raises(LeaseLost):
            store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.RUNNING))
        assert store.renew_leases([(job.job_id, job.lease)], LONG_TTL) == set()
        assert store.release_leases([(job.job_id, job.lease)]) == 0
        assert store.get_job("tenant-a", job.job_id) == taken
        moved = store.update_job(job.job_id, taken.lease, JobPatch(status=JobStatus.RUNNING))
        assert moved.status is JobStatus.RUNNING
        assert store.list_transitions("tenant-a", job.job_id)[-1].worker_id == "w2"

    def test_renew_returns_only_held_leases(self, store: JobStore) -> None:
        kept = self._create(store, make_job(), 5.0)
        lost = self._create(store, make_job(), 5.0)
        assert store.release_leases([(lost.job_id, lost.lease)]) == 1
        assert len(store.claim_expired("w2", LONG_TTL, 10)) == 1
        renewed = store.renew_leases(
            [(kept.job_id, kept.lease), (lost.job_id, lost.lease), ("gone", Lease("w1", 1))],
            LONG_TTL,
        )
        assert renewed == {kept.job_id}
        got = store.get_job("tenant-a", kept.job_id)
        assert got.lease_expires_at is not None and kept.lease_expires_at is not None
        assert got.lease_expires_at > kept.lease_expires_at + timedelta(seconds=30)
        assert got.last_heartbeat_at is not None and got.lease == kept.lease
        assert store.renew_leases([], LONG_TTL) == set()

    def test_release_makes_jobs_claimable_at_once(self, store: JobStore) -> None:
        a = self._create(store, make_job())
        b = self._create(store, make_job())
        assert store.release_leases([(a.job_id, a.lease), (b.job_id, Lease("w1", 9))]) == 1
        [claimed] = store.claim_expired("w2", LONG_TTL, 10)
        assert claimed.job_id == a.job_id and claimed.lease == Lease("w2", 2)
        assert store.get_job("tenant-a", b.job_id) == b
        assert store.release_leases([]) == 0

    def test_list_owned_jobs_excludes_terminal_and_others(self, store: JobStore) -> None:
        mine = [self._create(store, make_job(created_at=BASE + timedelta(seconds=i)))
                for i in range(3)]  # fmt: skip
        self._create(store, make_job(owner="w2"))
        self._create(store, make_job("tenant-b", created_at=BASE - timedelta(days=1)))
        finished = mine[1]
        store.update_job(finished.job_id, finished.lease, JobPatch(status=JobStatus.COMPLETED))
        owned = store.list_owned_jobs("w1")
        assert [j.job_id for j in owned][-2:] == [mine[0].job_id, mine[2].job_id]
        assert len(owned) == 3 and owned[0].tenant_id == "tenant-b"
        assert store.list_owned_jobs("nobody") == []

    # --- array jobs: task states and output by task ----------------------------------------

    def _array(self, store: JobStore, task_count: int = 4) -> Job:
        """A RUNNING job of ``task_count`` tasks."""
        return self._running(store, self._create(store, make_job(task_count=task_count)))

    def test_task_states_are_stored_with_the_job(self, store: JobStore) -> None:
        job = self._create(store, make_job(task_count=10_000))
        assert job.tasks == () and store.get_job("tenant-a", job.job_id).tasks == ()
        reported = many_tasks(10_000)
        want = normalize(reported)
        assert len(want) > 9_000 and want != reported  # normalizing does something here
        job = store.update_job(job.job_id, job.lease, JobPatch(
            status=JobStatus.RUNNING, started_at=BASE, tasks=reported), "runs")  # fmt: skip
        assert job.tasks == want
        assert store.get_job("tenant-a", job.job_id) == job
        assert store.list_jobs("tenant-a", JobFilter(), 10, "").jobs == [job]
        assert store.list_owned_jobs("w1") == [job]
        # A patch without task states keeps them; one with them replaces them whole.
        job = store.update_job(job.job_id, job.lease, JobPatch(error_message="x"))
        assert store.get_job("tenant-a", job.job_id).tasks == want
        few = (TaskState(7, TaskStatus.SUCCEEDED, exit_code=0, started_at=BASE,
                         completed_at=BASE),)  # fmt: skip
        job = store.update_job(job.job_id, job.lease, JobPatch(tasks=few))
        assert job.tasks == few and store.get_job("tenant-a", job.job_id).tasks == few
        assert store.release_leases([(job.job_id, job.lease)]) == 1
        [claimed] = store.claim_expired("w2", LONG_TTL, 10)
        assert claimed.tasks == few
        cleared = store.update_job(job.job_id, claimed.lease, JobPatch(tasks=()))
        assert cleared.tasks == () and store.get_job("tenant-a", job.job_id) == cleared

    def test_a_patch_of_task_states_only_is_fenced_and_moves_nothing(
        self, store: JobStore
    ) -> None:
        job = self._array(store)
        events, transitions = kinds(store, job), store.list_transitions("tenant-a", job.job_id)
        tasks = (TaskState(0, TaskStatus.RUNNING, started_at=BASE),)
        for lease in (Lease("w1", 2), Lease("w2", 1)):
            with pytest.raises(LeaseLost):
                store.update_job(job.job_id, lease, JobPatch(tasks=tasks))
            (lost,) = store.write_batch([UpdateJob(job.job_id, lease, JobPatch(tasks=tasks),
                                                   "", job)])  # fmt: skip
            assert isinstance(lost, LeaseLost)
        assert store.get_job("tenant-a", job.job_id) == job
        time.sleep(0.01)
        moved = store.update_job(job.job_id, job.lease, JobPatch(tasks=tasks))
        assert moved.tasks == tasks and moved.status is JobStatus.RUNNING
        assert moved.updated_at is not None and job.updated_at is not None
        assert moved.updated_at > job.updated_at
        more = (*tasks, TaskState(1, TaskStatus.SUCCEEDED, exit_code=0, completed_at=BASE))
        (fast,) = store.write_batch([UpdateJob(job.job_id, job.lease, JobPatch(tasks=more),
                                               "", moved)])  # fmt: skip
        assert isinstance(fast, Job) and fast.tasks == more
        assert store.get_job("tenant-a", job.job_id) == fast
        assert kinds(store, job) == events
        assert store.list_transitions("tenant-a", job.job_id) == transitions
        assert store.list_notifications("tenant-a", 10, False) == ([], 0)

    def test_task_states_and_a_terminal_move_commit_together(self, store: JobStore) -> None:
        failed = self._array(store, 3)
        final = (TaskState(0, TaskStatus.SUCCEEDED, exit_code=0, completed_at=BASE),
                 TaskState(1, TaskStatus.FAILED, exit_code=2, completed_at=BASE,
                           failure_class=FailureClass.USER_ERROR),
                 TaskState(2, TaskStatus.CANCELLED, completed_at=BASE))  # fmt: skip
        failed = store.update_job(failed.job_id, failed.lease, JobPatch(
            status=JobStatus.FAILED, completed_at=BASE, exit_code=2, tasks=final,
            failure_class=FailureClass.USER_ERROR, error_message="task 1 failed: exit code 2",
        ), "task 1 failed")  # fmt: skip
        assert store.get_job("tenant-a", failed.job_id) == failed
        assert failed.tasks == final and failed.status is JobStatus.FAILED
        assert kinds(store, failed)[-1][1] is EventKind.FAILED
        # The same through a batch's fast path (the caller's copy of the job).
        done = self._array(store, 2)
        ok = tuple(TaskState(i, TaskStatus.SUCCEEDED, exit_code=0) for i in range(2))
        (got,) = store.write_batch([UpdateJob(done.job_id, done.lease, JobPatch(
            status=JobStatus.COMPLETED, completed_at=BASE, exit_code=0, tasks=ok,
            error_message="attempt 0 was preempted"), "all done", done)])  # fmt: skip
        assert isinstance(got, Job) and got.tasks == ok and got.status is JobStatus.COMPLETED
        assert store.get_job("tenant-a", done.job_id) == got
        notes, unread = store.list_notifications("tenant-a", 10, False)
        assert unread == 2
        assert sorted((n.job_id, n.final_status, n.error_message) for n in notes) == sorted([
            (failed.job_id, JobStatus.FAILED, "task 1 failed: exit code 2"),
            (done.job_id, JobStatus.COMPLETED, "")])  # fmt: skip

    def test_events_keep_their_task_index(self, store: JobStore) -> None:
        job = self._array(store)
        tagged = dataclasses.replace(detail(job, "t2-failed"), task_index=2)
        placed = store.append_execution_events([output(job, 0, "three\n", task=3), tagged])
        assert [(p, e.task_index) for p, e in placed] == [(Placed.STORED, 3), (Placed.STORED, 2)]
        got = store.list_events("tenant-a", job.job_id, 0, 100)
        assert [(e.kind, e.task_index) for e in got] == [
            (EventKind.SUBMITTED, None), (EventKind.RUNNING, None), (EventKind.OUTPUT, 3),
            (EventKind.STATUS_DETAIL, 2)]  # fmt: skip
        assert [e.task_index for e in store.list_tenant_events("tenant-a", 0, 100)] == [
            None, None, 3, 2]

    def test_output_of_each_task_is_placed_on_its_own(self, store: JobStore) -> None:
        job = self._array(store, 3)

        def put(*events: JobEvent) -> list[Placed]:
            return [p for p, _ in store.append_execution_events(events)]

        assert put(output(job, 0, "a0\n", task=0), output(job, 0, "b1\n", task=1)) == [
            Placed.STORED] * 2  # the same offset of two tasks: two streams
        assert put(output(job, 3, "c0\n", task=0)) == [Placed.STORED]
        assert put(output(job, 6, "gap\n", task=1)) == [Placed.OUT_OF_ORDER]  # task 1 is at 3
        assert put(output(job, 3, "d1\n", task=1), output(job, 0, "a0\n", task=0)) == [
            Placed.STORED, Placed.DUPLICATE]
        assert put(output(job, 0, "e2\n", task=2, stream="stderr")) == [Placed.STORED]
        assert store.output_offsets(job.job_id) == {
            (0, 0, "stdout"): 6, (0, 1, "stdout"): 6, (0, 2, "stderr"): 3}
        got = [e for e in store.list_events("tenant-a", job.job_id, 0, 100)
               if e.kind is EventKind.OUTPUT]  # fmt: skip
        text = {t: "".join(e.output for e in got if e.task_index == t) for t in range(3)}
        assert text == {0: "a0\nc0\n", 1: "b1\nd1\n", 2: "e2\n"}

    # --- notifications ---------------------------------------------------------------------

    def _finish(self, store: JobStore, status: JobStatus, tenant: str = "tenant-a",
                name: str = "") -> Job:  # fmt: skip
        job = self._create(store, make_job(tenant, name=name))
        return store.update_job(job.job_id, job.lease, JobPatch(
            status=status, error_message=f"{status.value.lower()} at the end"), "end")

    def test_a_job_reaching_a_terminal_state_notifies_once(self, store: JobStore) -> None:
        job = self._create(store, make_job(name="nightly"))
        for status in (JobStatus.SCHEDULED, JobStatus.RUNNING):
            job = store.update_job(job.job_id, job.lease, JobPatch(status=status))
        job = store.update_job(job.job_id, job.lease, JobPatch(attempt=1, retry=True))
        assert store.list_notifications("tenant-a", 10, False) == ([], 0)
        job = store.update_job(job.job_id, job.lease, JobPatch(
            status=JobStatus.FAILED, error_message="exit code 3"), "failed")  # fmt: skip
        [note], unread = store.list_notifications("tenant-a", 10, False)
        assert unread == 1
        assert uuid.UUID(note.notification_id)
        assert (note.tenant_id, note.job_id, note.job_name, note.final_status,
                note.error_message, note.is_read) == (
            "tenant-a", job.job_id, "nightly", JobStatus.FAILED, "exit code 3", False)
        assert note.occurred_at == store.list_transitions("tenant-a", job.job_id)[-1].at
        assert_utc(note.occurred_at)
        # Nothing moves a terminal job again, and an update without a move adds nothing.
        store.update_job(job.job_id, job.lease, JobPatch(error_message="later"))
        with pytest.raises(Conflict):
            store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.COMPLETED))
        assert store.list_notifications("tenant-a", 10, False) == ([note], 1)

    def test_racing_terminal_updates_notify_once(
        self, store: JobStore, open_handle: Callable[[], JobStore]
    ) -> None:
        jobs = [self._running(store, self._create(store, make_job())) for _ in range(3)]
        # Three different ends: a move to the state the job is in already is no move.
        ends = [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED]
        handles = [open_handle() for _ in ends]

        def finish(i: int) -> list[object]:
            out: list[object] = []
            for job in jobs:
                patch = JobPatch(status=ends[i], error_message=f"writer {i}")
                if i % 2:  # the batch's fast path, from the copy of the job both writers had
                    out += handles[i].write_batch([UpdateJob(job.job_id, job.lease, patch,
                                                             "end", job)])  # fmt: skip
                else:
                    try:
                        out.append(handles[i].update_job(job.job_id, job.lease, patch, "end"))
                    except Conflict as exc:
                        out.append(exc)
            return out

        results = run_threads(len(ends), finish)
        notes, unread = store.list_notifications("tenant-a", 100, False)
        assert unread == len(jobs) == len(notes)
        for k, job in enumerate(jobs):
            per_job = [r[k] for r in results]
            [won] = [r for r in per_job if isinstance(r, Job)]
            assert sum(isinstance(r, Conflict) for r in per_job) == len(ends) - 1
            [note] = [n for n in notes if n.job_id == job.job_id]
            message = "" if won.status is JobStatus.COMPLETED else won.error_message
            assert (note.final_status, note.error_message) == (won.status, message)
            terminal = {EVENT_FOR_STATUS[s] for s in ends}
            assert [k for _, k in kinds(store, job) if k in terminal] == [
                EVENT_FOR_STATUS[won.status]]

    def test_notifications_newest_first_with_limit_unread_and_ack(self, store: JobStore) -> None:
        ends = [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.COMPLETED]
        jobs = []
        for status in ends:
            jobs.append(self._finish(store, status))
            time.sleep(0.002)  # distinct times on every store clock
        self._finish(store, JobStatus.FAILED, "tenant-b")
        notes, unread = store.list_notifications("tenant-a", 10, False)
        assert [n.job_id for n in notes] == [j.job_id for j in reversed(jobs)]
        assert [n.final_status for n in notes] == list(reversed(ends))
        assert unread == 4 and not any(n.is_read for n in notes)
        times = [n.occurred_at for n in notes]
        assert times == sorted(times, reverse=True) and len(set(times)) == 4
        assert store.list_notifications("tenant-a", 2, False) == (notes[:2], 4)
        store.ack_notification("tenant-a", notes[1].notification_id)
        store.ack_notification("tenant-a", notes[1].notification_id)  # again: no change
        after, unread = store.list_notifications("tenant-a", 10, False)
        assert unread == 3
        assert after == [dataclasses.replace(n, is_read=i == 1) for i, n in enumerate(notes)]
        assert store.list_notifications("tenant-a", 10, True) == (
            [notes[0], notes[2], notes[3]], 3)
        assert store.list_notifications("tenant-a", 2, True) == ([notes[0], notes[2]], 3)
        for n in notes:
            store.ack_notification("tenant-a", n.notification_id)
        assert store.list_notifications("tenant-a", 10, True) == ([], 0)
        assert [n.is_read for n in store.list_notifications("tenant-a", 10, False)[0]] == [
            True] * 4
        assert store.list_notifications("tenant-b", 10, False)[1] == 1  # not touched

    def test_notifications_are_the_tenants_own(self, store: JobStore) -> None:
        mine = self._finish(store, JobStatus.COMPLETED)
        [note], _ = store.list_notifications("tenant-a", 10, False)
        assert note.job_id == mine.job_id
        assert store.list_notifications("tenant-b", 10, False) == ([], 0)
        assert store.list_notifications("tenant-b", 10, True) == ([], 0)
        for tenant, notification_id in (("tenant-b", note.notification_id),
                                        ("tenant-a", str(uuid.uuid4())), ("tenant-a", ""),
                                        ("tenant-a", "x" * 2000)):  # fmt: skip
            with pytest.raises(NotFound):
                store.ack_notification(tenant, notification_id)
        assert store.list_notifications("tenant-a", 10, False) == ([note], 1)

    def test_delete_removes_the_jobs_notification(self, store: JobStore) -> None:
        gone = self._finish(store, JobStatus.FAILED)
        kept = self._finish(store, JobStatus.COMPLETED)
        [note] = [n for n in store.list_notifications("tenant-a", 10, False)[0]
                  if n.job_id == gone.job_id]  # fmt: skip
        store.delete_job("tenant-a", gone.job_id)
        notes, unread = store.list_notifications("tenant-a", 10, False)
        assert [n.job_id for n in notes] == [kept.job_id] and unread == 1
        with pytest.raises(NotFound):
            store.ack_notification("tenant-a", note.notification_id)

    def test_a_failed_update_notifies_nobody(self, store: JobStore) -> None:
        job = self._running(store, self._create(store, make_job()))
        end = JobPatch(status=JobStatus.COMPLETED)
        with pytest.raises(LeaseLost):
            store.update_job(job.job_id, Lease("w2", 1), end)
        results = store.write_batch([
            UpdateJob(job.job_id, Lease("w1", 9), end, "stale lease", job),
            UpdateJob(job.job_id, job.lease, JobPatch(attempt=5, retry=True), "bad retry"),
            UpdateJob(job.job_id, job.lease, JobPatch(status=JobStatus.PENDING), "backwards"),
        ])  # fmt: skip
        assert [type(r) for r in results] == [LeaseLost, Conflict, Conflict]
        # Taken over: the old owner's copy and lease fail on the batch's fast path too.
        assert store.release_leases([(job.job_id, job.lease)]) == 1
        [taken] = store.claim_expired("w2", LONG_TTL, 10)
        (lost,) = store.write_batch([UpdateJob(job.job_id, job.lease, end, "old owner", job)])
        assert isinstance(lost, LeaseLost)
        assert store.list_notifications("tenant-a", 10, False) == ([], 0)
        assert store.get_job("tenant-a", job.job_id) == taken
        done = store.update_job(job.job_id, taken.lease, JobPatch(status=JobStatus.CANCELLED))
        (again,) = store.write_batch([UpdateJob(job.job_id, taken.lease, end, "late", taken)])
        assert isinstance(again, Conflict)
        notes, unread = store.list_notifications("tenant-a", 10, False)
        assert [(n.job_id, n.final_status) for n in notes] == [(done.job_id,
                                                                JobStatus.CANCELLED)]
        assert unread == 1

    def test_a_terminal_update_from_a_stale_copy_notifies_once(self, store: JobStore) -> None:
        """The batch's fast path misses (the row changed since the copy) and the update
        is made from the row read again: one notification, of that update."""
        job = self._running(store, self._create(store, make_job()))
        store.update_job(job.job_id, job.lease, JobPatch(error_message="meanwhile"))
        (done,) = store.write_batch([UpdateJob(job.job_id, job.lease, JobPatch(
            status=JobStatus.FAILED), "end", job)])  # fmt: skip
        assert isinstance(done, Job) and done.status is JobStatus.FAILED
        [note], unread = store.list_notifications("tenant-a", 10, False)
        assert (note.job_id, note.final_status, note.error_message, unread) == (
            job.job_id, JobStatus.FAILED, "meanwhile", 1)

    # --- membership ----------------------------------------------------------------------

    def test_heartbeat_and_list_workers(self, store: JobStore) -> None:
        store.heartbeat_worker("w1", "http://127.0.0.1:1")
        store.heartbeat_worker("w2", "http://127.0.0.1:2")
        store.heartbeat_worker("w1", "http://127.0.0.1:3")
        workers = store.list_workers(60)
        assert [(w.worker_id, w.endpoint) for w in workers] == [
            ("w1", "http://127.0.0.1:3"), ("w2", "http://127.0.0.1:2"),
        ]  # fmt: skip
        assert_utc(*(w.heartbeat_at for w in workers))
        time.sleep(2 * self.expiry_wait)
        store.heartbeat_worker("w2", "http://127.0.0.1:2")
        assert [w.worker_id for w in store.list_workers(self.expiry_wait)] == ["w2"]



class ReopenableContract(StoreContract):
    """The contract for a store whose test module provides ``opener``: a factory of
    handles on one fresh storage (a table prefix, a database), as separate workers hold."""

    @pytest.fixture
    def opener(self) -> Callable[[], JobStore]:
        raise NotImplementedError("a subclass provides a factory of handles")

    @pytest.fixture
    def store(self, opener: Callable[[], JobStore]) -> Iterator[JobStore]:
        store = opener()
        store.migrate()
        yield store

    @pytest.fixture
    def open_handle(
        self, store: JobStore, opener: Callable[[], JobStore]
    ) -> Iterator[Callable[[], JobStore]]:
        yield opener


def assert_fails_fast(store: JobStore, within: float = 5.0) -> None:
    """Every kind of call on a store whose server is down raises ``StoreUnavailable``
    within ``within`` seconds (a store that is down makes SubmitJob fail fast)."""
    for call in (
        store.ping,
        lambda: store.create_job(make_job(), 30),
        lambda: store.list_jobs("tenant-a", JobFilter(), 10, ""),
        lambda: store.claim_expired("w2", 30, 10),
        lambda: store.heartbeat_worker("w1", "http://127.0.0.1:1"),
    ):
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            call()
        assert time.monotonic() - start < within


def contract_runs() -> dict[str, list[type[RegisteredContract]]]:
    """The contract's ``Test…`` subclasses in ``tests/database/test_store_*.py``, by ``kind``."""
    return StoreContract.runs(__package__ or "", "test_store_*.py")

"""The store contract, and DynamoDB specifics, against a real moto server over HTTP.

Each test gets tables under a fresh prefix in the session's moto server (so tests never
see each other's items). The contract runs with ``skew_seconds=0``: moto has no clock
skew to allow for, and the contract's short TTLs would otherwise never expire in time.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import boto3
import pytest

from database import dynamodb
from database._common import to_micros
from database.base import CreateJob, JobStore, UpdateJob
from database.dynamodb import DynamoDBStore
from jennah.errors import InvalidArgument, NotFound, StoreError, StoreUnavailable
from jennah.models import (
    EventKind,
    Job,
    JobEvent,
    JobPatch,
    JobSpec,
    JobStatus,
    Placed,
    Transition,
)
from jennah.settings import StoreSettings
from tests.database.store_contract import (
    ReopenableContract,
    assert_fails_fast,
    detail,
    make_job,
    run_threads,
)
from tests.fixtures.moto import MOTO_CREDENTIALS
from tests.helpers import free_port


def settings(endpoint: str, prefix: str) -> StoreSettings:
    return StoreSettings(kind="dynamodb", env={
        "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "DYNAMODB_TABLE_PREFIX": prefix,
    })  # fmt: skip


def open_store(endpoint: str, prefix: str, skew: float = 0.0) -> DynamoDBStore:
    session = boto3.session.Session(region_name="us-east-1", **MOTO_CREDENTIALS)
    return DynamoDBStore.from_settings(settings(endpoint, prefix), session=session,
                                       skew_seconds=skew)  # fmt: skip


@pytest.fixture
def open_dynamo(moto_endpoint: str) -> Iterator[Callable[[], DynamoDBStore]]:
    prefix = "t" + uuid.uuid4().hex[:12]
    handles: list[DynamoDBStore] = []

    def open_one() -> DynamoDBStore:
        handles.append(open_store(moto_endpoint, prefix))
        return handles[-1]

    yield open_one
    for h in handles:
        h.close()


class TestDynamoDBStore(ReopenableContract):
    kind = "dynamodb"

    @pytest.fixture
    def opener(self, open_dynamo: Callable[[], DynamoDBStore]) -> Callable[[], JobStore]:
        return open_dynamo


def test_migrate_creates_the_table_once(open_dynamo: Callable[[], DynamoDBStore]) -> None:
    handles = [open_dynamo() for _ in range(3)]
    results = run_threads(3, lambda i: handles[i].migrate())
    assert sorted(len(r) for r in results) == [0, 0, 1]
    job, created = handles[0].create_job(make_job(), 30)
    assert created and handles[1].get_job(job.tenant_id, job.job_id) == job
    assert handles[2].migrate() == []


def test_a_store_that_is_down_fails_fast() -> None:
    assert_fails_fast(open_store(f"http://127.0.0.1:{free_port()}", "down"))


# --- the upgrade from v1 ----------------------------------------------------------------------

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
V1_TYPES = {
    "pk": "S", "sk": "S", "tenant_id": "S", "created_key": "S", "active_shard": "S",
    "lease_expires_at": "N", "active_owner": "S", "event_tenant": "S", "event_key": "S",
    "member": "S", "heartbeat_at": "N",
}  # fmt: skip
V1_INDEXES = [
    ("by_tenant", "tenant_id", "created_key"), ("active", "active_shard", "lease_expires_at"),
    ("by_owner", "active_owner", "created_key"), ("events_by_tenant", "event_tenant", "event_key"),
    ("workers", "member", "heartbeat_at"),
]  # fmt: skip


def v1_job(job_id: str, tenant: str, status: JobStatus, created: datetime) -> Job:
    spec = JobSpec(image_uri="busybox", commands=("sh", "-c", "echo hi"), name=job_id)
    return Job(job_id=job_id, tenant_id=tenant, spec=spec, status=status, provider="local",
               owner_worker_id="w1", lease_version=2, lease_expires_at=T0 + timedelta(hours=1),
               created_at=created, updated_at=created)  # fmt: skip


def v1_event(job: Job, seq: int, kind: EventKind, minute: int, output: str = "") -> JobEvent:
    return JobEvent(job_id=job.job_id, tenant_id=job.tenant_id, seq=seq, kind=kind,
                    status=None if kind is EventKind.OUTPUT else job.status,
                    message="stdout" if kind is EventKind.OUTPUT else kind.value.lower(),
                    output=output, created_at=T0 + timedelta(minutes=minute),
                    worker_id="w1")  # fmt: skip


def write_v1_table(store: DynamoDBStore, jobs: list[Job], events: list[JobEvent]) -> None:
    """A table as the v1 code left it: the v1 indexes, jobs without ``event_seq`` or
    ``active_tenant``, events numbered by v1 lease blocks, without positions."""
    client = store._client
    client.create_table(
        TableName=store.table, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                   {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": k, "AttributeType": t}
                              for k, t in V1_TYPES.items()],
        GlobalSecondaryIndexes=[{"IndexName": n, "Projection": {"ProjectionType": "ALL"},
                                 "KeySchema": [{"AttributeName": h, "KeyType": "HASH"},
                                               {"AttributeName": r, "KeyType": "RANGE"}]}
                                for n, h, r in V1_INDEXES],
    )  # fmt: skip
    for job in jobs:
        item = dynamodb._job_item(job)
        item.pop("active_tenant", None)
        item["tr_count"] = {"N": "1"}
        client.put_item(TableName=store.table, Item=item)
        first = Transition(job.job_id, None, JobStatus.PENDING, T0, "created", "w1")
        client.put_item(TableName=store.table, Item=dynamodb._transition_item(first, 0))
    for ev in events:
        item = {"pk": {"S": f"JOB#{ev.job_id}"}, "sk": {"S": f"EV#{ev.seq:020d}"},
                "job_id": {"S": ev.job_id}, "seq": {"N": str(ev.seq)},
                "tenant_id": {"S": ev.tenant_id}, "kind": {"S": ev.kind.value},
                "message": {"S": ev.message}, "output": {"S": ev.output},
                "created_at": {"N": str(to_micros(ev.created_at))},
                "worker_id": {"S": ev.worker_id}, "event_tenant": {"S": ev.tenant_id},
                "event_key": {"S": f"{to_micros(ev.created_at):020d}#{ev.job_id}#{ev.seq:020d}"}}
        if ev.status is not None:
            item["status"] = {"S": ev.status.value}
        client.put_item(TableName=store.table, Item=item)


BLOCK = 1 << 32  # v1 numbered events in blocks per lease version


def v1_fixture() -> tuple[list[Job], list[JobEvent]]:
    """Tenant a: a running job on its second attempt (events from two lease blocks, output
    of both attempts) interleaved in time with a completed one; tenant b: a cancelled job."""
    a = v1_job("a-running", "tenant-a", JobStatus.RUNNING, T0)
    b = v1_job("b-done", "tenant-a", JobStatus.COMPLETED, T0 + timedelta(seconds=1))
    other = v1_job("c-other", "tenant-b", JobStatus.CANCELLED, T0)
    events = [
        v1_event(a, 1, EventKind.SUBMITTED, 0),
        v1_event(a, 2, EventKind.RUNNING, 1),
        v1_event(b, 1, EventKind.SUBMITTED, 2),
        v1_event(a, BLOCK + 1, EventKind.OUTPUT, 3, "hello\n"),
        v1_event(a, BLOCK + 2, EventKind.RETRY, 4),
        v1_event(a, BLOCK + 3, EventKind.OUTPUT, 5, "é\n"),
        v1_event(b, 2, EventKind.COMPLETED, 6),
        v1_event(other, 1, EventKind.SUBMITTED, 0),
        v1_event(other, 2 * BLOCK + 1, EventKind.CANCELLED, 1),
    ]
    return [a, b, other], events


def check_upgraded(store: DynamoDBStore) -> None:
    got = store.list_events("tenant-a", "a-running", 0, 100)
    assert [(e.seq, e.kind, e.attempt, e.dedup_key) for e in got] == [
        (1, EventKind.SUBMITTED, 0, "v1:1"), (2, EventKind.RUNNING, 0, "v1:2"),
        (3, EventKind.OUTPUT, 0, f"v1:{BLOCK + 1}"), (4, EventKind.RETRY, 1, f"v1:{BLOCK + 2}"),
        (5, EventKind.OUTPUT, 1, f"v1:{BLOCK + 3}")]  # fmt: skip
    assert [e.output for e in got if e.kind is EventKind.OUTPUT] == ["hello\n", "é\n"]
    assert store.output_offsets("a-running") == {(0, 0, "stdout"): 6, (1, 0, "stdout"): 3}
    assert [e.seq for e in store.list_events("tenant-a", "b-done", 0, 100)] == [1, 2]
    # Positions follow v1's tenant order (time, job, seq).
    tenant = store.list_tenant_events("tenant-a", 0, 100)
    assert [(e.job_id, e.seq, e.position) for e in tenant] == [
        ("a-running", 1, 1), ("a-running", 2, 2), ("b-done", 1, 3), ("a-running", 3, 4),
        ("a-running", 4, 5), ("a-running", 5, 6), ("b-done", 2, 7)]  # fmt: skip
    assert [(e.seq, e.position) for e in store.list_tenant_events("tenant-b", 0, 10)] == [
        (1, 1), (2, 2)]
    raw = store._client
    for job_id, n in (("a-running", 5), ("b-done", 2), ("c-other", 2)):
        item = raw.get_item(TableName=store.table, Key=dynamodb._job_key(job_id))["Item"]
        assert item["event_seq"] == {"N": str(n)}
    assert store.has_active_jobs("tenant-a") and not store.has_active_jobs("tenant-b")
    leftovers = raw.scan(TableName=store.table, FilterExpression="attribute_exists(event_tenant) "
                         "OR (begins_with(sk, :ev) AND attribute_not_exists(#p))",
                         ExpressionAttributeNames={"#p": "position"},
                         ExpressionAttributeValues={":ev": {"S": "EV#"}})["Items"]  # fmt: skip
    assert leftovers == []


def test_migrate_upgrades_a_v1_table(open_dynamo: Callable[[], DynamoDBStore]) -> None:
    store = open_dynamo()
    jobs, events = v1_fixture()
    write_v1_table(store, jobs, events)
    assert store.migrate() == [f"dynamodb:{store.table}:active_by_tenant"]
    check_upgraded(store)
    assert store.migrate() == []
    check_upgraded(store)
    # v2 writes carry on from the renumbered state.
    a = store.get_job("tenant-a", "a-running")
    assert a.attempt == 0  # v1 kept the attempt in its own way; the job row is untouched
    a = store.update_job(a.job_id, a.lease, JobPatch(attempt=1))
    [(placed, ev)] = store.append_execution_events([detail(a, "d", attempt=1)])
    assert (placed, ev.seq, ev.position) == (Placed.STORED, 6, 8)
    # A v1 log delivering an event the store already has is recognised by its key.
    again = dataclasses.replace(events[1], seq=0, dedup_key="v1:2")
    assert [p for p, _ in store.append_execution_events([again], legacy=True)] == [
        Placed.DUPLICATE]


def test_concurrent_migrations_of_a_v1_table_number_each_event_once(
    open_dynamo: Callable[[], DynamoDBStore],
) -> None:
    handles = [open_dynamo() for _ in range(3)]
    jobs, events = v1_fixture()
    write_v1_table(handles[0], jobs, events)
    results = run_threads(3, lambda i: handles[i].migrate())
    assert sorted(len(r) for r in results) == [0, 0, 1]
    check_upgraded(handles[0])


def test_an_upgrade_cut_short_is_finished_by_the_next_migrate(
    open_dynamo: Callable[[], DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_dynamo()
    jobs, events = v1_fixture()
    write_v1_table(store, jobs, events)
    monkeypatch.setattr(dynamodb, "_TX_MAX", 8)  # one event per transaction
    commits = 0
    real = DynamoDBStore._commit_alone

    def crash_after_three(self: DynamoDBStore, unit: Any) -> bool:
        nonlocal commits
        if commits == 3:
            raise StoreUnavailable("crash")
        commits += 1
        return real(self, unit)

    monkeypatch.setattr(DynamoDBStore, "_commit_alone", crash_after_three)
    with pytest.raises(StoreUnavailable):
        store.migrate()
    monkeypatch.setattr(DynamoDBStore, "_commit_alone", real)
    # The crashed process held the lock: a lock that has expired is taken over.
    store._client.put_item(TableName=store.table, Item={
        **dynamodb._LOCK_KEY, "token": {"S": "dead"},
        "expires_at": {"N": str(to_micros(datetime.now(UTC) - timedelta(seconds=1)))}})
    later = open_dynamo()
    assert later.migrate() == []
    check_upgraded(later)


def test_a_tenant_commits_events_from_several_writers_in_position_order(
    open_dynamo: Callable[[], DynamoDBStore],
) -> None:
    """Writers of one tenant on separate jobs (no job contention, only the tenant
    counter): positions are gapless, unique, and each job's events keep seq order."""
    store = open_dynamo()
    store.migrate()
    jobs = [store.create_job(make_job(), 60)[0] for _ in range(4)]

    def writer(i: int) -> int:
        handle = open_dynamo()
        for k in range(5):
            handle.append_execution_events([detail(jobs[i], f"k{k}")])
        return i

    run_threads(4, writer)
    every = store.list_tenant_events("tenant-a", 0, 1000)
    assert [e.position for e in every] == list(range(1, 4 + 4 * 5 + 1))
    for job in jobs:
        seqs = [e.seq for e in every if e.job_id == job.job_id]
        assert seqs == list(range(1, 7))


def test_write_batch_packs_independent_ops_into_one_transaction(
    open_dynamo: Callable[[], DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_dynamo()
    store.migrate()
    calls: list[int] = []
    real = store._client.transact_write_items

    def counting(**kwargs: Any) -> Any:
        calls.append(len(kwargs["TransactItems"]))
        return real(**kwargs)

    monkeypatch.setattr(store._client, "transact_write_items", counting)
    created = store.write_batch([CreateJob(make_job(), 60) for _ in range(10)])
    jobs = [cast(tuple[Job, bool], r)[0] for r in created]
    # 10 x (job, transition, event, tenant copy) + the tenant counter
    assert calls == [41]
    ops = [UpdateJob(j.job_id, j.lease, JobPatch(status=JobStatus.SCHEDULED)) for j in jobs]
    ops.append(UpdateJob(jobs[0].job_id, jobs[0].lease, JobPatch(status=JobStatus.RUNNING)))
    calls.clear()
    updated = [cast(Job, r) for r in store.write_batch(ops)]
    assert [j.status for j in updated] == [JobStatus.SCHEDULED] * 10 + [JobStatus.RUNNING]
    assert len(calls) == 2  # the second update of a job waits for the first one's commit
    positions = [e.position for e in store.list_tenant_events("tenant-a", 0, 100)]
    assert positions == list(range(1, 22))


def test_transaction_conflicts_are_retried_with_backoff_then_reported(
    open_dynamo: Callable[[], DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ClientError

    store = open_dynamo()
    tries: list[dict[str, Any]] = []
    slept: list[float] = []

    def conflicting(**kwargs: Any) -> Any:
        tries.append(kwargs)
        raise ClientError({"Error": {"Code": "TransactionConflictException",
                                     "Message": "in another transaction"}}, "UpdateItem")

    monkeypatch.setattr(store._client, "update_item", conflicting)
    monkeypatch.setattr(dynamodb, "_sleep", slept.append)
    monkeypatch.setattr(dynamodb, "_random", lambda: 1.0)
    with pytest.raises(StoreError, match="TransactionConflictException"):
        store._call("update_item", TableName=store.table, Key={})
    assert len(tries) == 6
    # random() = 1: the backoff's ceilings, from 20 ms doubling (the cap is never reached).
    assert slept == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.32])


def test_an_op_the_service_refuses_fails_alone(open_dynamo: Callable[[], DynamoDBStore]) -> None:
    store = open_dynamo()
    store.migrate()
    huge = make_job()
    huge = dataclasses.replace(huge, spec=dataclasses.replace(huge.spec,
                                                              env_vars={"X": "x" * 500_000}))
    ok = make_job()
    results = store.write_batch([CreateJob(huge, 60), CreateJob(ok, 60)])
    assert isinstance(results[0], InvalidArgument)
    assert results[1][1] is True  # type: ignore[index]
    with pytest.raises(NotFound):
        store.get_job("tenant-a", huge.job_id)


def test_a_reserved_tenant_counter_makes_other_writers_wait(
    open_dynamo: Callable[[], DynamoDBStore],
) -> None:
    """A writer that keeps losing a tenant counter reserves it: others wait until it has
    committed (fairness), and their positions come after its own."""
    a, b = open_dynamo(), open_dynamo()
    a.migrate()
    ja, jb = (a.create_job(make_job(), 60)[0] for _ in range(2))
    race = dynamodb._Race()
    assert a._reserve({"tenant-a"}, race)
    written: list[tuple[Placed, JobEvent]] = []
    waiter = threading.Thread(target=lambda: written.extend(
        b.append_execution_events([detail(jb, "b")])))  # fmt: skip
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # blocked by the reservation
    out: list[tuple[Placed, JobEvent] | None] = [None]
    a._run_race([dynamodb._Append(a, ja.job_id, [(0, detail(ja, "a"))], False, out)], race)
    waiter.join(10)
    assert out[0] is not None and written
    assert (out[0][1].position, written[0][1].position) == (3, 4)
    assert not race.reserved  # the commit removed the reservation


def test_a_reservation_of_a_writer_that_died_expires(
    open_dynamo: Callable[[], DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dynamodb, "_RESERVE_SECONDS", 0.3)
    store = open_dynamo()
    store.migrate()
    job = store.create_job(make_job(), 60)[0]
    start = time.monotonic()  # before the reservation: on a loaded machine writing it
    assert store._reserve({"tenant-a"}, dynamodb._Race())  # may take most of its 0.3 s
    [(placed, ev)] = store.append_execution_events([detail(job, "x")])  # never committed
    assert (placed, ev.position) == (Placed.STORED, 2)
    assert 0.3 <= time.monotonic() - start < 5  # it waited the reservation out


def test_a_terminal_update_and_its_notification_are_one_transaction(
    open_dynamo: Callable[[], DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notification's items go in the transaction of the move into a terminal state;
    a delete cut short before its sweep reached them is finished by the next delete."""
    store = open_dynamo()
    store.migrate()
    job, _ = store.create_job(make_job(), 60)
    calls: list[list[str]] = []
    real = store._client.transact_write_items

    def recording(**kwargs: Any) -> Any:
        actions = [next(iter(a.values())) for a in kwargs["TransactItems"]]
        calls.append([(a.get("Key") or a["Item"])["sk"]["S"].split("#")[0] for a in actions])
        return real(**kwargs)

    monkeypatch.setattr(store._client, "transact_write_items", recording)
    store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.FAILED), "failed")
    [call] = calls
    assert sorted(call) == sorted(["JOB", "TR", "N", "U", "ID", "EV", "00000000000000000002",
                                   "TENANT"])  # with the event's tenant copy and counter
    assert store.list_notifications("tenant-a", 10, True)[1] == 1

    real_delete = store._delete_notification

    def cut_short(tenant_id: str, notification_id: str) -> None:
        raise StoreUnavailable("the worker died here")

    monkeypatch.setattr(store, "_delete_notification", cut_short)
    with pytest.raises(StoreUnavailable):
        store.delete_job("tenant-a", job.job_id)
    assert store.list_notifications("tenant-a", 10, False)[1] == 1  # left behind
    monkeypatch.setattr(store, "_delete_notification", real_delete)
    with pytest.raises(NotFound):
        store.delete_job("tenant-a", job.job_id)
    assert store.list_notifications("tenant-a", 10, False) == ([], 0)
    left = store._client.query(TableName=store.table, KeyConditionExpression="pk = :pk",
                               ExpressionAttributeValues={":pk": {"S": "NOTE#tenant-a"}})
    assert left["Items"] == []

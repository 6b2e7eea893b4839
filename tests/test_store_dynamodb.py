"""The store contract, and DynamoDB specifics, against a real moto server over HTTP.

Each test gets tables under a fresh prefix in the session's moto server (so tests never
see each other's items). The contract runs with ``skew_seconds=0``: moto has no clock
skew to allow for, and the contract's short TTLs would otherwise never expire in time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import boto3
import pytest

from database.base import JobStore
from database.dynamodb import DynamoDBStore
from jennah.settings import StoreSettings
from tests.fixtures.moto import MOTO_CREDENTIALS
from tests.helpers import free_port
from tests.store_contract import ReopenableContract, assert_fails_fast, make_job, run_threads


def settings(endpoint: str, prefix: str) -> StoreSettings:
    return StoreSettings(kind="dynamodb", region="us-east-1", aws_endpoint_url=endpoint,
                         dynamodb_table_prefix=prefix)  # fmt: skip


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

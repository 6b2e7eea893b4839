"""AWS Batch provider: the provider contract and intermediate states against the stateful
REST fake (``tests/fakes/aws_batch.py``); request shapes and idempotency also against a
real moto server process (``use_docker: false``, docs/design.md §9)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from database.memory import MemoryStore
from jennah.errors import (
    InvalidArgument,
    ProviderQuotaExceeded,
    ProviderRejected,
    ProviderUnavailable,
    SettingsError,
)
from jennah.models import (
    EventKind,
    FailureClass,
    JobFilter,
    JobSpec,
    JobStatus,
    ResourceOverride,
    TaskStatus,
)
from jennah.settings import ProviderSettings, load_worker_settings
from providers import PROVIDERS
from providers.aws import (
    ARRAY_REFRESH_SECONDS,
    AWS_FAILED_RULES,
    AWS_STATES,
    BASE_TAG,
    CANCEL_REASON,
    LOG_EVENTS_PER_PAGE,
    LOG_PAGES_PER_READ,
    TASK_INDEX_SCRIPT,
    AwsBatchProvider,
    AwsSettings,
    image_definition_name,
    make_client,
    share_identifier,
    submit_request,
    task_command,
    task_retry_strategy,
    translate,
)
from providers.base import ProviderTask, check_spec
from providers.base import provider_job_id as make_pid
from providers.memory import planned_exit
from providers.resources import job_labels
from providers.retry import RetryPolicy
from tests.fakes import serve_http
from tests.fakes.aws_batch import (
    ACCOUNT,
    DEFINITION,
    FAIR_QUEUE,
    QUEUE,
    REGION,
    SPOT_QUEUE,
    FakeAwsBatch,
    base_definition,
    container_view,
    printed,
    retry_action,
    retry_problems,
    task_index_of,
)
from tests.fixtures.moto import MOTO_CREDENTIALS, moto_post
from tests.helpers import free_port, owner
from tests.providers.provider_contract import (
    ECHO_TASK,
    EXIT_0,
    EXIT_3,
    IMAGE,
    SLEEP_60,
    TASK_1_FAILS,
    ProviderContract,
    make_task,
    wait_for_state,
)
from worker.jobs import JobService


@dataclass
class Sleeps:
    seen: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.seen.append(seconds)


@dataclass
class AwsHarness:
    provider: AwsBatchProvider
    fake: FakeAwsBatch
    sleeps: Sleeps
    url: str
    supports_long_running: bool = True

    def advance(self) -> None:
        self.fake.advance()

    def executions(self, provider_job_id: str) -> int:
        return self.fake.executions(provider_job_id)

    def unknown_path(self) -> str:
        return f"arn:aws:batch:{REGION}:{ACCOUNT}:job/{uuid.uuid4()}"

    def another_provider(self, **kwargs: Any) -> AwsBatchProvider:
        return aws_provider(self.url, **kwargs)


def aws_provider(url: str, **kwargs: Any) -> AwsBatchProvider:
    """A provider on the fake at ``url``: Batch and CloudWatch Logs clients, a spot queue."""
    options: dict[str, Any] = {"job_queue": QUEUE, "job_definition": DEFINITION,
                               "spot_job_queue": SPOT_QUEUE,
                               "logs_client": make_client(REGION, url, "logs",
                                                          **MOTO_CREDENTIALS), **kwargs}
    return AwsBatchProvider(make_client(REGION, url, **MOTO_CREDENTIALS), **options)


@pytest.fixture
def aws() -> Iterator[AwsHarness]:
    fake = FakeAwsBatch()
    with serve_http(fake.handle) as url:
        sleeps = Sleeps()
        provider = aws_provider(url, retry=RetryPolicy(attempts=4, sleep=sleeps))
        yield AwsHarness(provider, fake, sleeps, url)
        provider.close()


class TestAwsContract(ProviderContract):
    kind = "aws"
    state_timeout = 5.0

    @pytest.fixture
    def harness(self, aws: AwsHarness) -> AwsHarness:
        return aws


# --- the mapping tables, row by row ------------------------------------------------------


def test_state_table_is_design_section_3() -> None:
    assert dict(AWS_STATES) == {
        "SUBMITTED": JobStatus.SCHEDULED, "PENDING": JobStatus.SCHEDULED,
        "RUNNABLE": JobStatus.SCHEDULED, "STARTING": JobStatus.RUNNING,
        "RUNNING": JobStatus.RUNNING, "SUCCEEDED": JobStatus.COMPLETED,
        "FAILED": JobStatus.FAILED,
    }


@pytest.mark.parametrize("raw", [*AWS_STATES, "SOMETHING_NEW"])
def test_every_state_row_over_the_wire(aws: AwsHarness, raw: str) -> None:
    path = aws.provider.submit(make_task(SLEEP_60))
    aws.fake.set_state(path, raw, exit_code={"SUCCEEDED": 0, "FAILED": 9}.get(raw))
    st = aws.provider.status([path])[path]
    assert (st.raw_state, st.state) == (raw, AWS_STATES.get(raw))
    if raw in ("SUCCEEDED", "FAILED"):
        assert st.completed_at is not None and st.started_at is not None
    if raw == "FAILED":
        assert (st.exit_code, st.failure_class) == (9, FailureClass.USER_ERROR)


FAILED_ROWS = [
    (CANCEL_REASON, 137, JobStatus.CANCELLED, None),
    (CANCEL_REASON, None, JobStatus.CANCELLED, None),
    ("Host EC2 (instance i-0abc123) terminated.", None, JobStatus.FAILED,
     FailureClass.PREEMPTED),
    ("Job attempt duration exceeded timeout", 137, JobStatus.FAILED, FailureClass.TIMEOUT),
    ("CannotPullContainerError: pull access denied", None, JobStatus.FAILED,
     FailureClass.USER_ERROR),
    ("Essential container in task exited", 3, JobStatus.FAILED, FailureClass.USER_ERROR),
    ("ResourceInitializationError: unable to pull secrets", None, JobStatus.FAILED,
     FailureClass.INFRASTRUCTURE),
]


def test_every_failed_rule_has_a_row() -> None:
    for pattern, _state, _fc in AWS_FAILED_RULES:
        assert any(pattern.search(reason) for reason, *_ in FAILED_ROWS), pattern.pattern


@pytest.mark.parametrize(("reason", "exit_code", "state", "failure_class"), FAILED_ROWS)
def test_failed_rows_over_the_wire(
    aws: AwsHarness, reason: str, exit_code: int | None, state: JobStatus,
    failure_class: FailureClass | None,
) -> None:
    path = aws.provider.submit(make_task(SLEEP_60))
    aws.fake.set_state(path, "FAILED", reason=reason, exit_code=exit_code)
    st = aws.provider.status([path])[path]
    assert (st.state, st.exit_code, st.failure_class) == (state, exit_code, failure_class)
    assert st.message == reason


# --- the submit request ----------------------------------------------------------------------


def full_task(max_run: int = 3600, *, spot: bool = False, gpus: int = 0,
              tenant: str = "tenant-a") -> ProviderTask:
    job_id = str(uuid.uuid4())
    spec = JobSpec(
        image_uri="123.dkr.ecr.us-east-1.amazonaws.com/app:1", commands=("python", "app.py"),
        env_vars={"MODE": "fast"}, labels={"team": "data"}, resource_profile="medium",
        resource_override=ResourceOverride(cpu_millis=1500, max_run_duration_seconds=max_run),
        use_spot_vms=spot, accelerator_count=gpus)
    return ProviderTask(make_pid(job_id, 2), job_id, tenant, 2, spec)


def test_submit_request_carries_every_promised_field(aws: AwsHarness) -> None:
    task = full_task(spot=True, gpus=2)
    path = aws.provider.submit(task)
    [body] = aws.fake.submits
    assert path.startswith(f"arn:aws:batch:{REGION}:{ACCOUNT}:job/")
    [definition] = aws.fake.registered  # AWS cannot override the image: a copy per image
    assert definition["jobDefinitionName"] == image_definition_name(DEFINITION, task.spec.image_uri)
    assert definition["containerProperties"] == {**base_definition()["containerProperties"],
                                                 "image": task.spec.image_uri}
    assert definition["platformCapabilities"] == ["EC2"]
    assert definition["tags"][BASE_TAG] == base_definition()["jobDefinitionArn"]
    assert (body["jobName"], body["jobQueue"], body["jobDefinition"]) == (
        task.provider_job_id, SPOT_QUEUE,
        f"arn:aws:batch:{REGION}:{ACCOUNT}:job-definition/{definition['jobDefinitionName']}:1")
    overrides = body["containerOverrides"]
    assert overrides["command"] == ["python", "app.py"]
    assert {e["name"]: e["value"] for e in overrides["environment"]} == {
        "MODE": "fast", "JENNAH_JOB_ID": task.job_id, "JENNAH_ATTEMPT": "2",
        "JENNAH_TENANT_ID": "tenant-a", "JENNAH_PROVIDER_JOB_ID": task.provider_job_id,
        "JENNAH_TASK_INDEX": "0", "JENNAH_TASK_COUNT": "1"}  # a plain job: task 0 of 1
    # medium is 2000m/4096MiB; the override's 1500m wins.
    assert overrides["resourceRequirements"] == [{"type": "VCPU", "value": "1.5"},
                                                 {"type": "MEMORY", "value": "4096"},
                                                 {"type": "GPU", "value": "2"}]
    assert body["tags"] == {"team": "data", "jennah-job-id": task.job_id,
                            "jennah-tenant-id": "tenant-a", "jennah-attempt": "2"}
    assert body["timeout"] == {"attemptDurationSeconds": 3600}
    assert body["retryStrategy"] == {"attempts": 1}
    assert "shareIdentifier" not in body and "schedulingPriorityOverride" not in body


def test_one_definition_per_image_found_again_by_other_workers(aws: AwsHarness) -> None:
    same_image = [full_task(), full_task()]
    for task in same_image:
        aws.provider.submit(task)
    assert len(aws.fake.registered) == 1
    other = aws.another_provider()
    try:
        other.submit(full_task())
    finally:
        other.close()
    assert len(aws.fake.registered) == 1  # found by name and image, not registered again
    assert len({b["jobDefinition"] for b in aws.fake.submits}) == 1
    base = ProviderTask("j-base-0", "base", "tenant-a", 0, JobSpec(image_uri="busybox"))
    aws.provider.submit(base)  # the base definition's own image: used as it is
    assert aws.fake.submits[-1]["jobDefinition"] == DEFINITION


def test_short_run_limits_are_raised_to_the_aws_minimum(aws: AwsHarness) -> None:
    aws.provider.submit(full_task(max_run=30))
    assert aws.fake.submits[0]["timeout"] == {"attemptDurationSeconds": 60}
    aws.provider.submit(make_task(EXIT_0))
    assert "timeout" not in aws.fake.submits[1]


def test_a_second_worker_finds_the_job_by_name_and_tag(aws: AwsHarness) -> None:
    task = make_task(EXIT_0)
    first = aws.provider.submit(task)
    other = aws.another_provider()
    try:
        lists = aws.fake.calls["listjobs"]
        assert other.submit(task) == first
        assert aws.fake.calls["listjobs"] == lists + 1
    finally:
        other.close()
    assert aws.fake.executions(task.provider_job_id) == 1


def test_a_same_named_job_without_our_tag_is_not_adopted(aws: AwsHarness) -> None:
    task = make_task(EXIT_0)
    stranger = aws.fake.add_job(task.provider_job_id, "RUNNING")
    path = aws.provider.submit(task)
    assert path != stranger and aws.fake.executions(task.provider_job_id) == 2


def _raw_submit(aws: AwsHarness, **change: Any) -> dict[str, Any]:
    """SubmitJob straight to the fake (no provider checks), from a valid request."""
    request = submit_request(make_task(EXIT_0), QUEUE, DEFINITION)
    for key, value in change.items():
        if value is None:
            request.pop(key, None)
        else:
            request[key] = value
    client = make_client(REGION, aws.url, **MOTO_CREDENTIALS)
    try:
        return dict(client.submit_job(**request))
    finally:
        client.close()


@pytest.mark.parametrize(("change", "message"), [
    ({"tags": {f"k{i}": "v" for i in range(51)}}, "less than or equal to 50"),
    ({"tags": {"AWS:owner": "me"}}, "reserved for AWS use"),
    ({"tags": {"owner": "aws:me"}}, "reserved for AWS use"),
    ({"tags": {"k" * 129: "v"}}, "key 1-128"),
    ({"jobQueue": FAIR_QUEUE}, "shareIdentifier is required"),
    ({"jobQueue": FAIR_QUEUE, "shareIdentifier": "team-a"}, "alphanumeric"),
    ({"jobQueue": FAIR_QUEUE, "shareIdentifier": "teamA", "schedulingPriorityOverride": 10000},
     "0-9999"),
    ({"shareIdentifier": "teamA"}, "fair share scheduling policy"),
    ({"schedulingPriorityOverride": 1}, "fair share scheduling policy"),
    ({"containerOverrides": {"resourceRequirements": [{"type": "GPU", "value": "1.5"}]}},
     "not valid for GPU"),
    ({"jobDefinition": f"{DEFINITION}:7"}, "does not exist"),
    ({"arrayProperties": {"size": 1}}, "between 2 and 10000"),
    ({"arrayProperties": {"size": 10_001}}, "between 2 and 10000"),
    ({"retryStrategy": {"attempts": 11}}, "attempts must be 1-10"),
    ({"retryStrategy": {"attempts": 2, "evaluateOnExit": [
        {"onExitCode": "1", "action": "EXIT"}] * 6}}, "at most 5"),
    ({"retryStrategy": {"attempts": 2, "evaluateOnExit": [
        {"onStatusReason": "Host EC2 (instance*", "action": "RETRY"}]}}, "not a valid pattern"),
    ({"retryStrategy": {"evaluateOnExit": [{"onExitCode": "1", "action": "EXIT"}]}},
     "needs attempts"),
])
def test_the_fake_refuses_what_aws_refuses(aws: AwsHarness, change: dict[str, Any],
                                           message: str) -> None:
    with pytest.raises(ClientError, match=message):
        _raw_submit(aws, **change)
    assert aws.fake.submits == []


def test_the_fake_accepts_fifty_tags_and_a_share_on_a_fair_queue(aws: AwsHarness) -> None:
    _raw_submit(aws, tags={f"k{i}": "v" for i in range(50)})
    _raw_submit(aws, jobQueue=FAIR_QUEUE, shareIdentifier="teamA",
                schedulingPriorityOverride=9999)
    assert len(aws.fake.submits) == 2


# --- what SubmitJob may ask (capabilities, check_spec) ----------------------------------------


def test_tag_limit_counts_our_own_tags(aws: AwsHarness) -> None:
    caps = aws.provider.capabilities
    assert caps.max_labels == 50 - len(job_labels(make_task(EXIT_0)))
    most = make_task(EXIT_0, labels={f"k{i}": "v" for i in range(caps.max_labels)})
    aws.provider.submit(most)  # 47 + our 3: exactly AWS's 50
    assert len(aws.fake.submits[0]["tags"]) == 50
    one_more = make_task(EXIT_0, labels={f"k{i}": "v" for i in range(caps.max_labels + 1)})
    with pytest.raises(InvalidArgument, match="takes at most 47"):
        check_spec(aws.provider.name, caps, one_more.spec)
    with pytest.raises(ProviderRejected, match="takes at most 47"):
        aws.provider.submit(one_more)  # a job stored before: refused before any call
    assert len(aws.fake.submits) == 1


@pytest.mark.parametrize("change", [
    {"labels": {f"k{i}": "v" for i in range(48)}},
    {"labels": {"aWs:owner": "me"}},
    {"labels": {"jennah-job-id": "mine"}},
    {"machine_type": "m5.large"},
    {"accelerator_type": "nvidia-tesla-t4", "accelerator_count": 1},
])
def test_job_service_refuses_what_aws_would_and_stores_nothing(
        aws: AwsHarness, change: dict[str, Any]) -> None:
    store = MemoryStore()
    jobs = JobService(store, aws.provider, worker_id="w1", lease_ttl=30)
    spec = dataclasses.replace(JobSpec(image_uri=IMAGE, commands=tuple(EXIT_0)), **change)
    with pytest.raises(InvalidArgument, match="aws provider"):
        asyncio.run(jobs.submit("acme", spec, "r1"))
    assert store.list_jobs("acme", JobFilter(), 10, "").jobs == []
    assert aws.fake.submits == [] and aws.fake.calls == Counter()


def test_spot_needs_a_spot_queue_and_uses_it(aws: AwsHarness) -> None:
    plain = aws_provider(aws.url, spot_job_queue="")
    try:
        assert not plain.capabilities.spot
        with pytest.raises(ProviderRejected, match="use_spot_vms"):
            plain.submit(full_task(spot=True))
    finally:
        plain.close()
    assert aws.provider.capabilities.spot and aws.provider.capabilities.accelerator_count
    assert not aws.provider.capabilities.machine_type
    task = full_task(spot=True)
    path = aws.provider.submit(task)
    assert aws.fake.submits[0]["jobQueue"] == SPOT_QUEUE
    other = aws.another_provider()
    try:
        assert other.submit(task) == path  # the look-up searches the spot queue
    finally:
        other.close()
    assert aws.fake.executions(task.provider_job_id) == 1


def test_fair_share_queue_gets_the_tenants_share_and_priority(aws: AwsHarness) -> None:
    fair = aws_provider(aws.url, job_queue=FAIR_QUEUE, share_identifiers={"tenant-a": "teamA"},
                        scheduling_priorities={"tenant-a": 7, "*": 1})
    try:
        fair.submit(full_task())
        fair.submit(full_task(tenant="beta-corp"))
        fair.submit(full_task(tenant="gamma"))
    finally:
        fair.close()
    shares = [(b["shareIdentifier"], b["schedulingPriorityOverride"]) for b in aws.fake.submits]
    assert shares == [("teamA", 7), ("betacorp", 1), ("gamma", 1)]
    assert aws.fake.calls["describejobqueues"] == 1  # cached
    assert share_identifier("acme", {"*": "shared"}) == "shared"


# --- job definitions: a cache with a lifetime, and cleanup ------------------------------------


@dataclass
class Clock:
    t: float = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_a_new_base_revision_is_used_once_the_cache_expires(aws: AwsHarness) -> None:
    clock = Clock()
    p = aws_provider(aws.url, definition_ttl=60, clock=clock)
    try:
        p.submit(full_task())
        revision2 = {**base_definition(), "revision": 2,
                     "jobDefinitionArn": base_definition()["jobDefinitionArn"][:-1] + "2",
                     "containerProperties": {"image": "busybox", "resourceRequirements": [
                         {"type": "VCPU", "value": "2"}, {"type": "MEMORY", "value": "2048"}]}}
        aws.fake.definitions.append(revision2)
        clock.t += 30
        p.submit(full_task())
        assert len(aws.fake.registered) == 1  # still cached
        clock.t += 31
        p.submit(full_task())
    finally:
        p.close()
    first, second = aws.fake.registered
    assert first["tags"][BASE_TAG] == base_definition()["jobDefinitionArn"]
    assert second["tags"][BASE_TAG] == revision2["jobDefinitionArn"]
    assert second["containerProperties"]["resourceRequirements"][1]["value"] == "2048"
    assert aws.fake.submits[-1]["jobDefinition"].endswith(f"{second['jobDefinitionName']}:2")


def test_cleanup_deregisters_old_copies_and_a_cached_one_is_replaced(aws: AwsHarness) -> None:
    now = Clock()
    aws.provider.definitions.now = now
    old_image = full_task()
    new_image = ProviderTask("j-new-0", "new", "tenant-a", 0,
                             JobSpec(image_uri="ghcr.io/acme/new:2", commands=("true",)))
    aws.provider.submit(old_image)
    now.t += 3 * 86400
    aws.provider.submit(new_image)
    old_arn, new_arn = (s["jobDefinition"] for s in aws.fake.submits)
    other = aws.another_provider()
    try:
        assert other.definitions.for_image(old_image.spec.image_uri) == old_arn  # cached
        now.t += 86400
        assert aws.provider.cleanup_definitions(older_than_days=2) == [old_arn]
        assert aws.fake.deregistered == [old_arn]  # the base and the recent copy stay
        other.submit(full_task())  # refused (INACTIVE), resolved again: a fresh copy
    finally:
        other.close()
    assert aws.fake.submits[-1]["jobDefinition"] not in (old_arn, new_arn, DEFINITION)
    assert len(aws.fake.registered) == 3 and aws.fake.calls["submitjob"] == 4


# --- output: CloudWatch Logs ------------------------------------------------------------------


def running_job(aws: AwsHarness) -> str:
    path = aws.provider.submit(make_task(SLEEP_60))
    aws.fake.set_state(path, "RUNNING")
    return path


def read_all(provider: AwsBatchProvider, path: str,
             offsets: tuple[int, int]) -> tuple[str, tuple[int, int], int]:
    """Read as the worker's poller does with ``final``: until a read returns nothing.
    Returns the text, the offsets and how many reads it took."""
    text, reads = "", 0
    while True:
        chunk = provider.read_output(path, offsets)
        reads += 1
        assert chunk.stderr == "" and chunk.offsets[1] == offsets[1] == 0
        if chunk.offsets == offsets:
            assert chunk.stdout == ""
            return text, offsets, reads
        text, offsets = text + chunk.stdout, chunk.offsets
        assert chunk.stdout.endswith("\n")  # whole lines


def test_output_in_order_exactly_once_across_polls_and_a_new_worker(aws: AwsHarness) -> None:
    queued = aws.provider.submit(make_task(SLEEP_60))
    calls = sum(aws.fake.calls.values())
    assert aws.provider.read_output(queued, (0, 0)).offsets == (0, 0)  # no stream yet
    assert aws.fake.calls["GetLogEvents"] == 0 and sum(aws.fake.calls.values()) == calls + 1
    path = running_job(aws)
    assert read_all(aws.provider, path, (0, 0))[:2] == ("", (0, 0))  # an empty stream
    aws.fake.log(path, "one", "two")
    text, offsets, _ = read_all(aws.provider, path, (0, 0))
    assert (text, offsets) == ("one\ntwo\n", (2, 0))
    aws.fake.log(path, "three", "ünïcode ✓", "")
    aws.fake.empty_pages = 2  # AWS may answer empty pages before later events
    chunk = aws.provider.read_output(path, offsets)
    assert (chunk.stdout, chunk.offsets) == ("three\nünïcode ✓\n\n", (5, 0))
    aws.fake.log(path, "four")
    new_worker = aws.another_provider()  # no token cached: seeks from the stored offsets
    try:
        text, end, _ = read_all(new_worker, path, chunk.offsets)
        assert (text, end) == ("four\n", (6, 0))
        aws.fake.set_state(path, "SUCCEEDED", exit_code=0)
        assert read_all(new_worker, path, end)[:2] == ("", end)  # nothing after the end
        assert read_all(new_worker, path, (2, 0))[0] == "three\nünïcode ✓\n\nfour\n"
    finally:
        new_worker.close()
    assert aws.fake.log_events(path) == ["one", "two", "three", "ünïcode ✓", "", "four"]


def _output_events(store: MemoryStore, job_id: str) -> list[tuple[str, str, int]]:
    return [(e.message, e.output, e.offset) for e in store.list_events("acme", job_id, 0, 1000)
            if e.kind is EventKind.OUTPUT]


def test_the_poller_streams_output_once_in_order_across_workers(aws: AwsHarness) -> None:
    """The worker's own loop against the fake: several polls, a new owner (another
    provider, no token cached) starting from the stored offsets, nothing after the end."""
    store = MemoryStore()
    w1 = owner(store, aws.provider, "w1")
    second = aws.another_provider()
    w2 = owner(store, second, "w2")

    async def go() -> None:
        job = await w1.jobs.submit("acme", JobSpec(image_uri=IMAGE, commands=SLEEP_60), "r")
        arn = job.cloud_resource_path
        p1 = w1.poller
        aws.fake.advance(4)  # RUNNING: the stream exists
        aws.fake.log(arn, "one", "two")
        await p1.cycle()
        aws.fake.log(arn, "three")
        await p1.cycle()
        await p1.cycle()  # nothing new
        assert _output_events(store, job.job_id) == [
            ("stdout", "one\ntwo\n", 0), ("stdout", "three\n", 2)]
        store.release_leases([(job.job_id, store.get_job("acme", job.job_id).lease)])
        assert [j.job_id for j in store.claim_expired("w2", 30, 10)] == [job.job_id]
        aws.fake.log(arn, "four")
        aws.fake.set_state(arn, "SUCCEEDED", exit_code=0)
        p2 = w2.poller
        await p2.cycle()
        assert store.get_job("acme", job.job_id).status is JobStatus.COMPLETED
        aws.fake.log(arn, "late")  # after the end: never read
        await p2.cycle()
        assert _output_events(store, job.job_id) == [
            ("stdout", "one\ntwo\n", 0), ("stdout", "three\n", 2), ("stdout", "four\n", 3)]
        events = store.list_events("acme", job.job_id, 0, 1000)
        assert events[-1].kind is EventKind.COMPLETED and events[-1].worker_id == "w2"

    try:
        asyncio.run(go())
    finally:
        second.close()


def test_output_reads_are_bounded_and_page_through_a_long_stream(aws: AwsHarness) -> None:
    path = running_job(aws)
    aws.fake.log(path, *(f"line {i}" for i in range(25_000)))
    before = aws.fake.calls["GetLogEvents"]
    sizes = []
    offsets = (0, 0)
    for _ in range(3):
        chunk = aws.provider.read_output(path, offsets)
        sizes.append(chunk.offsets[0] - offsets[0])
        assert chunk.stdout.splitlines()[0] == f"line {offsets[0]}"
        offsets = chunk.offsets
    assert sizes == [LOG_EVENTS_PER_PAGE, LOG_EVENTS_PER_PAGE, 5_000]
    assert aws.fake.calls["GetLogEvents"] - before == 3  # one page per read
    big = running_job(aws)  # AWS also caps a page at 1 MB
    aws.fake.log(big, *("x" * 9_000 for _ in range(300)))
    first = aws.provider.read_output(big, (0, 0))
    assert 0 < first.offsets[0] < 300 and len(first.stdout.encode()) <= 1_048_576
    aws.fake.empty_pages = 10  # more empty pages than one read may spend: nothing yet
    before = aws.fake.calls["GetLogEvents"]
    assert aws.provider.read_output(big, first.offsets).offsets == first.offsets
    assert aws.fake.calls["GetLogEvents"] - before == LOG_PAGES_PER_READ


def test_output_follows_the_definitions_log_group(aws: AwsHarness) -> None:
    aws.fake.definitions[0]["containerProperties"]["logConfiguration"] = {
        "logDriver": "awslogs", "options": {"awslogs-group": "/jennah/jobs"}}
    path = running_job(aws)
    aws.fake.log(path, "hello")
    assert aws.provider.read_output(path, (0, 0)).stdout == "hello\n"
    assert [g for g, _s in aws.fake.streams] == ["/jennah/jobs"]
    aws.fake.definitions[0]["containerProperties"]["logConfiguration"] = {"logDriver": "splunk"}
    elsewhere = running_job(aws)  # not in CloudWatch: nothing to read, and no error
    assert aws.provider.read_output(elsewhere, (0, 0)).offsets == (0, 0)


def test_throttled_log_reads_are_retried(aws: AwsHarness) -> None:
    path = running_job(aws)
    aws.fake.log(path, "a")
    aws.fake.throttle(2, methods={"GetLogEvents"})
    assert aws.provider.read_output(path, (0, 0)).stdout == "a\n"
    aws.fake.throttle(4, methods={"GetLogEvents"})
    with pytest.raises(ProviderUnavailable, match="ThrottlingException"):
        aws.provider.read_output(path, (1, 0))


# --- status, throttling, cancel ----------------------------------------------------------------


def test_status_describes_in_batches_of_100(aws: AwsHarness) -> None:
    paths = [aws.fake.add_job(f"j-bulk-{i}", "RUNNABLE") for i in range(250)]
    result = aws.provider.status([*paths, "not-an-arn"])
    assert aws.fake.describe_sizes == [100, 100, 50]
    assert {r.state for p, r in result.items() if p != "not-an-arn"} == {JobStatus.SCHEDULED}
    assert result["not-an-arn"].state is None


def test_throttled_calls_are_retried_then_succeed(aws: AwsHarness) -> None:
    aws.fake.throttle(2, methods={"submitjob"})
    path = aws.provider.submit(make_task(EXIT_0))
    assert aws.fake.calls["submitjob"] == 3 and len(aws.sleeps.seen) == 2
    assert len(aws.fake.submits) == 1
    aws.fake.throttle(3, methods={"describejobs"})
    assert aws.provider.status([path])[path].state is JobStatus.SCHEDULED
    assert len(aws.sleeps.seen) == 5


def test_a_retried_submit_looks_up_again_before_submitting(aws: AwsHarness) -> None:
    task = make_task(EXIT_0)
    aws.fake.throttle(1, methods={"listjobs"})
    aws.provider.submit(task)
    assert aws.fake.calls["listjobs"] == 2 and aws.fake.executions(task.provider_job_id) == 1


def test_throttling_beyond_the_budget_surfaces_as_unavailable(aws: AwsHarness) -> None:
    aws.fake.throttle(4)
    with pytest.raises(ProviderUnavailable, match="TooManyRequestsException") as info:
        aws.provider.submit(make_task(EXIT_0))
    assert info.value.retryable and aws.fake.submits == []


def test_cancel_terminates_and_reads_back_as_cancelled(aws: AwsHarness) -> None:
    queued = aws.provider.submit(make_task(SLEEP_60))
    aws.provider.cancel(queued)  # not started yet: FAILED at once, with our reason
    assert aws.provider.status([queued])[queued].state is JobStatus.CANCELLED
    aws.provider.cancel(aws.unknown_path())  # an unknown id: nothing to stop
    aws.fake.throttle(4, methods={"terminatejob"})
    with pytest.raises(ProviderUnavailable):
        aws.provider.cancel(queued)


def test_an_unreachable_endpoint_is_unavailable_not_a_botocore_error() -> None:
    client = make_client(REGION, f"http://127.0.0.1:{free_port()}", **MOTO_CREDENTIALS)
    provider = AwsBatchProvider(client, job_queue=QUEUE, job_definition=DEFINITION,
                                retry=RetryPolicy(attempts=2, sleep=lambda _s: None))
    try:
        with pytest.raises(ProviderUnavailable, match="EndpointConnectionError"):
            provider.status([f"arn:aws:batch:{REGION}:{ACCOUNT}:job/x"])
    finally:
        provider.close()


@pytest.mark.parametrize(("code", "status", "expected"), [
    ("ThrottlingException", 400, ProviderUnavailable),
    ("TooManyRequestsException", 429, ProviderUnavailable),
    ("ServerException", 500, ProviderUnavailable),
    ("Whatever", 503, ProviderUnavailable),
    ("LimitExceededException", 400, ProviderQuotaExceeded),
    ("AccessDeniedException", 403, ProviderRejected),
    ("ClientException", 400, ProviderRejected),
])
def test_error_translation(code: str, status: int, expected: type[Exception]) -> None:
    exc = ClientError({"Error": {"Code": code, "Message": "m"},
                       "ResponseMetadata": {"HTTPStatusCode": status}}, "SubmitJob")
    assert type(translate(exc, "submit")) is expected


# --- jobs of several tasks: one array job ------------------------------------------------------


def array_task(commands: Sequence[str], task_count: int, **spec: Any) -> ProviderTask:
    task = make_task(commands)
    return dataclasses.replace(task, spec=dataclasses.replace(
        task.spec, task_count=task_count, **spec))


def child(path: str, index: int) -> str:
    return f"{path}:{index}"


def test_an_array_job_is_one_submit_with_the_index_wired_in(aws: AwsHarness) -> None:
    task = array_task(TASK_1_FAILS, 3, max_retries=2, env_vars={"MODE": "x"},
                      resource_override=ResourceOverride(max_run_duration_seconds=600))
    path = aws.provider.submit(task)
    [body] = aws.fake.submits
    assert body["arrayProperties"] == {"size": 3}
    overrides = body["containerOverrides"]
    assert overrides["command"] == [
        "/bin/sh", "-c", TASK_INDEX_SCRIPT, "jennah-task", *TASK_1_FAILS]
    env = {e["name"]: e["value"] for e in overrides["environment"]}
    assert env["JENNAH_TASK_COUNT"] == "3" and env["MODE"] == "x"
    assert "JENNAH_TASK_INDEX" not in env  # the wrapper sets it, per child
    assert body["retryStrategy"] == {"attempts": 3, "evaluateOnExit": [
        {"onStatusReason": "Host EC2*", "action": "RETRY"},
        {"onExitCode": "*", "action": "EXIT"},
        {"onStatusReason": "Job attempt duration exceeded timeout*", "action": "EXIT"},
        {"onStatusReason": "CannotPullContainerError*", "action": "EXIT"},
        {"onStatusReason": f"{CANCEL_REASON}*", "action": "EXIT"}]}
    assert body["timeout"] == {"attemptDurationSeconds": 600}  # each child's
    assert [c.job_id for c in aws.fake.job(path).children] == [
        child(path.rsplit("/", 1)[1], i) for i in range(3)]
    assert aws.provider.submit(task) == path and aws.fake.executions(task.provider_job_id) == 1
    plain = make_task(EXIT_0)
    aws.provider.submit(plain)
    body = aws.fake.submits[-1]
    assert "arrayProperties" not in body and body["retryStrategy"] == {"attempts": 1}
    assert body["containerOverrides"]["command"] == list(EXIT_0)  # not wrapped
    assert {"JENNAH_TASK_INDEX": "0", "JENNAH_TASK_COUNT": "1"}.items() <= {
        e["name"]: e["value"] for e in body["containerOverrides"]["environment"]}.items()


@pytest.mark.parametrize(("max_retries", "attempts"), [(0, 1), (1, 2), (9, 10), (10, 10)])
def test_task_retries_are_aws_attempts_within_its_limit(max_retries: int, attempts: int) -> None:
    spec = JobSpec(image_uri=IMAGE, commands=EXIT_0, task_count=2, max_retries=max_retries)
    assert task_retry_strategy(spec)["attempts"] == attempts
    assert ("evaluateOnExit" in task_retry_strategy(spec)) == (max_retries > 0)
    plain = dataclasses.replace(spec, task_count=1)
    assert task_retry_strategy(plain) == {"attempts": 1}  # Jennah retries a plain job


@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_wrapper_gives_each_task_its_index_in_a_real_shell(index: int) -> None:
    """The wrapped command in /bin/sh, as a child's container runs it: the index, the
    count, and the job's own exit code; the fake's reading of it agrees."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JENNAH_TASK_COUNT": "3",
           "AWS_BATCH_JOB_ARRAY_INDEX": str(index)}
    echo = subprocess.run(task_command(ECHO_TASK), env=env, capture_output=True, text=True,
                          timeout=10, check=True)
    assert echo.stdout == f"task {index} of 3\n"
    program, seen = container_view(task_command(ECHO_TASK), env)
    assert printed(program, seen) == [echo.stdout.strip()]
    failing = subprocess.run(task_command(TASK_1_FAILS), env=env, timeout=10, check=False)
    assert failing.returncode == (4 if index == 1 else 0)
    program, seen = container_view(task_command(TASK_1_FAILS), env)
    assert planned_exit(program, task_index_of(seen)) == failing.returncode
    alone = subprocess.run(task_command(ECHO_TASK), env={"PATH": env["PATH"]},
                           capture_output=True, text=True, timeout=10, check=True)
    assert alone.stdout == "task 0 of \n"  # no AWS index (never in an array): task 0


def test_an_array_without_commands_runs_the_definitions_command(aws: AwsHarness) -> None:
    with pytest.raises(ProviderRejected, match="needs a command"):
        aws.provider.submit(array_task((), 2))
    assert aws.fake.submits == []
    aws.fake.definitions[0]["containerProperties"]["command"] = list(ECHO_TASK)
    fresh = aws.another_provider()  # the definition is cached: a worker that reads it now
    try:
        task = array_task((), 2)
        task = dataclasses.replace(task, spec=dataclasses.replace(task.spec, image_uri="busybox"))
        fresh.submit(task)
    finally:
        fresh.close()
    assert aws.fake.submits[0]["containerOverrides"]["command"] == task_command(ECHO_TASK)


def test_parallelism_and_the_array_size_limits(aws: AwsHarness) -> None:
    caps = aws.provider.capabilities
    assert (caps.parallelism, caps.max_task_count, caps.tasks_per_call) == (False, 10_000, None)
    check_spec("aws", caps, array_task(EXIT_0, 4, parallelism=4).spec)  # no limit asked
    with pytest.raises(InvalidArgument, match="cannot limit how many tasks run"):
        check_spec("aws", caps, array_task(EXIT_0, 4, parallelism=2).spec)
    with pytest.raises(InvalidArgument, match="takes at most 10000"):
        check_spec("aws", caps, array_task(EXIT_0, 10_001).spec)
    with pytest.raises(ProviderRejected, match="takes at most 10000"):
        aws.provider.submit(array_task(EXIT_0, 10_001))  # stored before: refused unsent
    assert aws.fake.submits == []
    big = array_task(EXIT_0, 10_000)
    path = aws.provider.submit(big)
    assert aws.fake.submits[0]["arrayProperties"] == {"size": 10_000}
    assert len(aws.fake.job(path).children) == 10_000
    st = aws.provider.status([path])[path]
    assert (st.state, st.tasks) == (JobStatus.SCHEDULED, ())


@pytest.mark.parametrize("change", [
    {"task_count": 4, "parallelism": 2}, {"task_count": 10_001}])
def test_job_service_refuses_what_an_array_cannot_do(aws: AwsHarness,
                                                     change: dict[str, Any]) -> None:
    store = MemoryStore()
    jobs = JobService(store, aws.provider, worker_id="w1", lease_ttl=30)
    spec = dataclasses.replace(JobSpec(image_uri=IMAGE, commands=tuple(EXIT_0)), **change)
    with pytest.raises(InvalidArgument, match="aws provider"):
        asyncio.run(jobs.submit("acme", spec, "r1"))
    assert store.list_jobs("acme", JobFilter(), 10, "").jobs == []
    assert aws.fake.calls == Counter()


@pytest.mark.parametrize(("reason", "exit_code", "state", "failure_class"), FAILED_ROWS)
def test_task_retry_rules_retry_exactly_the_retryable_classes(
    reason: str, exit_code: int | None, state: JobStatus, failure_class: FailureClass | None,
) -> None:
    """AWS's evaluateOnExit (as the fake applies it) decides each failed attempt as the
    failure mapping reads it: retried only when its class is retryable."""
    strategy = task_retry_strategy(JobSpec(image_uri=IMAGE, task_count=2, max_retries=3))
    retried = retry_action(strategy, exit_code, reason) == "RETRY"
    assert retried == bool(failure_class and failure_class.retryable), (reason, exit_code)
    assert not retry_problems(strategy)  # a strategy AWS takes


def test_a_preempted_task_is_retried_by_aws_and_reports_its_attempts(aws: AwsHarness) -> None:
    path = aws.provider.submit(array_task(TASK_1_FAILS, 3, max_retries=1))
    aws.fake.advance(4)  # every child RUNNING
    assert aws.provider.status([path])[path].state is JobStatus.RUNNING
    aws.fake.preempt(child(path, 0))
    st = aws.provider.status([path])[path]
    assert st.state is JobStatus.RUNNING and st.tasks is not None
    by_index = {t.index: t for t in st.tasks}
    assert (by_index[0].status, by_index[0].attempt) == (TaskStatus.PENDING, 1)
    assert by_index[1].status is TaskStatus.RUNNING
    st = wait_for_state(aws, path, {JobStatus.COMPLETED, JobStatus.FAILED}, 5)
    assert st.tasks is not None
    assert [(t.status, t.exit_code, t.attempt, t.failure_class) for t in st.tasks] == [
        (TaskStatus.SUCCEEDED, 0, 1, None),  # ran again after the reclaim
        (TaskStatus.FAILED, 4, 0, FailureClass.USER_ERROR),  # a user error: not retried
        (TaskStatus.SUCCEEDED, 0, 0, None)]
    assert (st.state, st.exit_code, st.message) == (
        JobStatus.FAILED, 4, "task 1 failed: exit code 4")
    assert [len(aws.fake.job(child(path, i)).attempts) for i in range(3)] == [2, 1, 1]


def test_a_task_reclaimed_past_its_retries_fails_as_preempted(aws: AwsHarness) -> None:
    path = aws.provider.submit(array_task(SLEEP_60, 2, max_retries=1))
    aws.fake.advance(4)
    for _ in range(2):  # the first attempt, then the retry
        aws.fake.preempt(child(path, 1))
        aws.fake.advance(4)
    aws.provider.cancel(path)
    aws.fake.advance()
    st = aws.provider.status([path])[path]
    assert st.tasks is not None
    first, second = st.tasks
    assert (first.status, first.attempt) == (TaskStatus.CANCELLED, 0)  # not retried
    assert (second.status, second.attempt, second.failure_class) == (
        TaskStatus.FAILED, 1, FailureClass.PREEMPTED)
    assert second.exit_code is None and second.error_message.startswith("Host EC2")
    assert [len(aws.fake.job(child(path, i)).attempts) for i in range(2)] == [1, 2]


def test_cancel_terminates_the_parent_and_every_child(aws: AwsHarness) -> None:
    path = aws.provider.submit(array_task(SLEEP_60, 3, max_retries=2))
    aws.fake.advance(4)
    aws.fake.job(child(path, 2)).status = "RUNNABLE"  # one child not started yet
    aws.provider.cancel(path)
    assert aws.fake.calls["terminatejob"] == 1
    aws.fake.advance()
    children = aws.fake.job(path).children
    assert {(c.status, c.status_reason, len(c.attempts)) for c in children[:2]} == {
        ("FAILED", CANCEL_REASON, 1)}  # killed, and the retry strategy does not retry it
    assert (children[2].status, children[2].attempts) == ("FAILED", [])
    assert aws.fake.job(path).status == "FAILED"
    st = aws.provider.status([path])[path]
    assert st.state is JobStatus.CANCELLED and st.tasks is not None
    assert {t.status for t in st.tasks} == {TaskStatus.CANCELLED} and len(st.tasks) == 3


def calls(aws: AwsHarness, *actions: str) -> dict[str, int]:
    return {a: aws.fake.calls[a] for a in actions}


def test_status_reads_the_children_only_when_the_summary_changed(aws: AwsHarness) -> None:
    clock = Clock()
    p = aws.another_provider(clock=clock)
    try:
        path = p.submit(array_task(EXIT_0, 2_500))
        aws.fake.calls.clear()
        assert p.status([path])[path].state is JobStatus.SCHEDULED
        assert calls(aws, "describejobs", "listjobs") == {"describejobs": 1, "listjobs": 0}
        aws.fake.advance(4)  # all 2,500 RUNNING
        aws.fake.calls.clear()
        aws.fake.describe_sizes.clear()
        st = p.status([path])[path]
        assert st.state is JobStatus.RUNNING and st.tasks is not None and len(st.tasks) == 2_500
        # the parent; 3 pages of 1,000 RUNNING children; each child described once
        assert calls(aws, "describejobs", "listjobs") == {"describejobs": 26, "listjobs": 3}
        assert aws.fake.describe_sizes == [1, *[100] * 25]
        aws.fake.calls.clear()
        assert p.status([path])[path] == st  # nothing changed: nothing read but the parent
        assert calls(aws, "describejobs", "listjobs") == {"describejobs": 1, "listjobs": 0}
        clock.t += ARRAY_REFRESH_SECONDS  # still running: looked at again, in case
        p.status([path])
        assert calls(aws, "describejobs", "listjobs") == {"describejobs": 2, "listjobs": 3}
        aws.fake.advance()  # all SUCCEEDED: those seen running are described, no listing
        aws.fake.calls.clear()
        st = p.status([path])[path]
        assert st.state is JobStatus.COMPLETED and st.tasks is not None
        assert calls(aws, "describejobs", "listjobs") == {"describejobs": 26, "listjobs": 0}
    finally:
        p.close()
    fresh = aws.another_provider()  # a new owner: lists the finished ones, once
    try:
        aws.fake.calls.clear()
        assert fresh.status([path])[path] == st
        assert calls(aws, "describejobs", "listjobs") == {"describejobs": 26, "listjobs": 3}
    finally:
        fresh.close()


def test_children_that_finish_unseen_are_found_by_listing(aws: AwsHarness) -> None:
    path = aws.provider.submit(array_task(TASK_1_FAILS, 3))
    assert aws.provider.status([path])[path].state is JobStatus.SCHEDULED
    aws.fake.advance(6)  # ran and ended between two polls
    aws.fake.calls.clear()
    st = aws.provider.status([path])[path]
    assert (st.state, st.exit_code) == (JobStatus.FAILED, 4)
    assert aws.fake.calls["listjobs"] == 2  # SUCCEEDED and FAILED, never seen running


def test_a_child_that_cannot_be_read_leaves_the_array_unknown(aws: AwsHarness) -> None:
    path = aws.provider.submit(array_task(EXIT_0, 2))
    plain = aws.provider.submit(make_task(EXIT_0))
    aws.fake.advance(4)
    aws.fake.throttle(5, methods={"listjobs"})
    result = aws.provider.status([path, plain])
    assert result[path].state is None and "TooManyRequests" in result[path].message
    assert result[plain].state is JobStatus.RUNNING
    assert aws.provider.status([path])[path].state is JobStatus.RUNNING  # read next time


def test_each_task_reads_its_own_stream_and_a_retry_continues_it(aws: AwsHarness) -> None:
    path = aws.provider.submit(array_task(ECHO_TASK, 2, max_retries=1))
    aws.fake.advance(4)
    assert aws.provider.status([path])[path].state is JobStatus.RUNNING
    assert aws.provider.read_output(path, (0, 0), task_index=1).stdout == "task 1 of 2\n"
    aws.fake.log(child(path, 0), "more")
    first = aws.provider.read_output(path, (0, 0), task_index=0)
    assert (first.stdout, first.offsets) == ("task 0 of 2\nmore\n", (2, 0))
    aws.fake.preempt(child(path, 0))
    aws.provider.status([path])
    aws.fake.advance(3)  # RUNNABLE → STARTING → RUNNING again: a new stream
    aws.provider.status([path])  # renews the child's streams
    again = aws.provider.read_output(path, first.offsets, task_index=0)
    assert (again.stdout, again.offsets) == ("task 0 of 2\n", (3, 0))
    assert aws.provider.read_output(path, again.offsets, task_index=0).offsets == (3, 0)
    other = aws.another_provider()  # no cache: seeks past the first attempt's 2 events
    try:
        chunk = other.read_output(path, (2, 0), task_index=0)
        assert (chunk.stdout, chunk.offsets) == ("task 0 of 2\n", (3, 0))
        assert other.read_output(path, (1, 0), task_index=0).stdout == "more\n"
        assert other.read_output(path, (0, 0), task_index=5).offsets == (0, 0)  # no such task
    finally:
        other.close()


# --- against a real moto server ------------------------------------------------------------------


@pytest.fixture
def moto_batch(moto_reset: str) -> Iterator[tuple[AwsBatchProvider, Any]]:
    url = moto_reset
    moto_post(url, "/moto-api/config", json.dumps({"batch": {"use_docker": False}}).encode())
    kw: dict[str, Any] = {"region_name": REGION, "endpoint_url": url, **MOTO_CREDENTIALS}
    import boto3

    iam = boto3.client("iam", **kw)
    role = iam.create_role(RoleName="jennah-batch-service", AssumeRolePolicyDocument="{}")
    raw = boto3.client("batch", **kw)
    ce = raw.create_compute_environment(
        computeEnvironmentName="jennah-ce", type="UNMANAGED", state="ENABLED",
        serviceRole=role["Role"]["Arn"])
    raw.create_job_queue(jobQueueName=QUEUE, state="ENABLED", priority=1,
                         computeEnvironmentOrder=[{"order": 1, "computeEnvironment":
                                                   ce["computeEnvironmentArn"]}])
    raw.register_job_definition(jobDefinitionName=DEFINITION, type="container",
                                containerProperties={"image": "busybox", "vcpus": 1,
                                                     "memory": 512})
    provider = AwsBatchProvider(make_client(REGION, url, **MOTO_CREDENTIALS), job_queue=QUEUE,
                                job_definition=DEFINITION)
    yield provider, raw
    provider.close()
    raw.close()
    iam.close()


def test_moto_accepts_our_request_and_reports_it_back(
    moto_batch: tuple[AwsBatchProvider, Any]
) -> None:
    provider, raw = moto_batch
    task = full_task()
    path = provider.submit(task)
    [job] = raw.describe_jobs(jobs=[path])["jobs"]
    assert job["jobName"] == task.provider_job_id
    assert job["jobQueue"].endswith(f"job-queue/{QUEUE}")
    [definition] = raw.describe_job_definitions(jobDefinitions=[job["jobDefinition"]])[
        "jobDefinitions"]
    assert definition["jobDefinitionName"] == image_definition_name(DEFINITION,
                                                                    task.spec.image_uri)
    assert definition["containerProperties"]["image"] == task.spec.image_uri
    assert job["container"]["command"] == ["python", "app.py"]
    env = {e["name"]: e["value"] for e in job["container"]["environment"]}
    assert env["MODE"] == "fast" and env["JENNAH_JOB_ID"] == task.job_id
    assert job["tags"]["jennah-job-id"] == task.job_id and job["tags"]["team"] == "data"
    st = provider.status([path])[path]  # moto's jobs succeed at once
    assert (st.state, st.exit_code) == (JobStatus.COMPLETED, 0)
    assert st.started_at is not None and st.completed_at is not None


def test_moto_resubmit_from_another_worker_adopts(
    moto_batch: tuple[AwsBatchProvider, Any], moto_endpoint: str
) -> None:
    provider, raw = moto_batch
    task = make_task(EXIT_3)
    first = provider.submit(task)
    other = AwsBatchProvider(make_client(REGION, moto_endpoint, **MOTO_CREDENTIALS),
                             job_queue=QUEUE, job_definition=DEFINITION)
    try:
        assert other.submit(task) == first
        assert other.submit(make_task(EXIT_0)) != first
    finally:
        other.close()
    listed = raw.list_jobs(jobQueue=QUEUE, filters=[{"name": "JOB_NAME",
                                                     "values": [task.provider_job_id]}])
    assert [j["jobArn"] for j in listed["jobSummaryList"]] == [first]


def test_moto_takes_an_array_job_and_reports_its_children(
    moto_batch: tuple[AwsBatchProvider, Any]
) -> None:
    """moto models arrays in part (children ``<id>:<i>``, ``statusSummary``, ListJobs by
    ``arrayJobId`` without paging); it takes our retry strategy without applying it, and
    sets no ``AWS_BATCH_JOB_ARRAY_INDEX``, so outcomes per task are the fake's to test."""
    provider, raw = moto_batch
    task = array_task(EXIT_0, 3, max_retries=2)
    path = provider.submit(task)
    assert provider.submit(task) == path  # its children share the name, untagged
    [parent] = raw.describe_jobs(jobs=[path])["jobs"]
    assert parent["arrayProperties"]["size"] == 3
    [kid] = raw.describe_jobs(jobs=[child(path, 1)])["jobs"]
    assert kid["container"]["command"] == task_command(EXIT_0)
    st = provider.status([path])[path]  # moto's children succeed at once
    assert st.state is JobStatus.COMPLETED and st.tasks is not None
    assert [(t.index, t.status, t.attempt) for t in st.tasks] == [
        (i, TaskStatus.SUCCEEDED, 0) for i in range(3)]


def test_moto_unknown_and_cancel_of_a_finished_job(
    moto_batch: tuple[AwsBatchProvider, Any]
) -> None:
    provider, _raw = moto_batch
    path = provider.submit(make_task(EXIT_0))
    unknown = f"arn:aws:batch:{REGION}:{ACCOUNT}:job/{uuid.uuid4()}"
    provider.cancel(path)
    provider.cancel(unknown)
    result = provider.status([path, unknown])
    assert result[path].state is JobStatus.COMPLETED and result[unknown].state is None


def test_moto_takes_the_most_labels_and_a_share_on_a_fair_share_queue(
    moto_batch: tuple[AwsBatchProvider, Any], moto_endpoint: str
) -> None:
    provider, raw = moto_batch
    most = provider.capabilities.max_labels or 0
    path = provider.submit(make_task(EXIT_0, labels={f"k{i}": "v" for i in range(most)}))
    [job] = raw.describe_jobs(jobs=[path])["jobs"]
    assert len(job["tags"]) == 50
    [ce] = raw.describe_compute_environments()["computeEnvironments"]
    policy = raw.create_scheduling_policy(name="jennah-fair", fairsharePolicy={
        "shareDecaySeconds": 0, "computeReservation": 0,
        "shareDistribution": [{"shareIdentifier": "teamA", "weightFactor": 1.0}]})
    raw.create_job_queue(jobQueueName="jennah-fair", state="ENABLED", priority=1,
                         schedulingPolicyArn=policy["arn"],
                         computeEnvironmentOrder=[{"order": 1, "computeEnvironment":
                                                   ce["computeEnvironmentArn"]}])
    fair = AwsBatchProvider(make_client(REGION, moto_endpoint, **MOTO_CREDENTIALS),
                            job_queue="jennah-fair", job_definition=DEFINITION,
                            share_identifiers={"tenant-a": "teamA"})
    try:
        shared = fair.submit(make_task(EXIT_0))
    finally:
        fair.close()
    # moto does not echo shareIdentifier back; it takes the request, and reports the
    # queue's policy, from which the provider decided to send one.
    [job] = raw.describe_jobs(jobs=[shared])["jobs"]
    assert job["jobQueue"].endswith("job-queue/jennah-fair")
    [queue] = raw.describe_job_queues(jobQueues=["jennah-fair"])["jobQueues"]
    assert queue["schedulingPolicyArn"] == policy["arn"]


# --- settings ----------------------------------------------------------------------------------


def test_aws_settings_are_parsed_and_checked_at_start_up(tmp_path: Path) -> None:
    env = {"JENNAH_HOME": str(tmp_path), "JENNAH_DEV_MODE": "1", "BATCH_PROVIDER": "aws",
           "AWS_JOB_QUEUE": QUEUE, "AWS_JOB_DEFINITION": DEFINITION, "AWS_REGION": REGION,
           "AWS_SPOT_JOB_QUEUE": SPOT_QUEUE, "AWS_SHARE_IDENTIFIER": "acme=teamA; *=others",
           "AWS_SCHEDULING_PRIORITY": "acme=50;*=10",
           "AWS_JOB_DEFINITION_CACHE_SECONDS": "30"}
    settings = load_worker_settings(env, providers=PROVIDERS).provider
    p = settings.read(AwsSettings.from_env)
    assert (p.spot_job_queue, p.definition_cache_seconds) == (SPOT_QUEUE, 30.0)
    assert p.share_identifiers == {"acme": "teamA", "*": "others"}
    assert p.scheduling_priorities == {"acme": 50, "*": 10}
    provider = AwsBatchProvider.from_settings(settings)
    try:
        assert provider.capabilities.spot and provider.capabilities.supports_output
    finally:
        provider.close()
    bad = {**env, "AWS_SHARE_IDENTIFIER": "acme=team-a", "AWS_SCHEDULING_PRIORITY": "*=10000"}
    with pytest.raises(SettingsError, match=r"AWS_SHARE_IDENTIFIER entry 'acme=team-a'.*"
                                             r"AWS_SCHEDULING_PRIORITY entry"):
        load_worker_settings(bad, providers=PROVIDERS)
    with pytest.raises(SettingsError, match=r"invalid batch provider settings: .*"
                                             r"AWS_SHARE_IDENTIFIER entry 'acme=team-a'"):
        AwsBatchProvider.from_settings(ProviderSettings(kind="aws", env=bad))

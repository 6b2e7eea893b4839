"""AWS Batch provider: the provider contract and intermediate states against the stateful
REST fake (``tests/fakes/aws_batch.py``); request shapes and idempotency also against a
real moto server process (``use_docker: false``, docs/design.md §9)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from botocore.exceptions import ClientError

from jennah.errors import (
    ProviderQuotaExceeded,
    ProviderRejected,
    ProviderUnavailable,
)
from jennah.models import FailureClass, JobSpec, JobStatus, ResourceOverride
from providers.aws import (
    AWS_FAILED_RULES,
    AWS_STATES,
    CANCEL_REASON,
    AwsBatchProvider,
    image_definition_name,
    make_client,
    translate,
)
from providers.base import ProviderTask
from providers.base import provider_job_id as make_pid
from providers.retry import RetryPolicy
from tests.fakes import serve_http
from tests.fakes.aws_batch import (
    ACCOUNT,
    DEFINITION,
    QUEUE,
    REGION,
    FakeAwsBatch,
    base_definition,
)
from tests.fixtures.moto import MOTO_CREDENTIALS, moto_post
from tests.helpers import free_port
from tests.provider_contract import EXIT_0, EXIT_3, SLEEP_60, ProviderContract, make_task


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
        return AwsBatchProvider(make_client(REGION, self.url, **MOTO_CREDENTIALS),
                                job_queue=QUEUE, job_definition=DEFINITION, **kwargs)


@pytest.fixture
def aws() -> Iterator[AwsHarness]:
    fake = FakeAwsBatch()
    with serve_http(fake.handle) as url:
        sleeps = Sleeps()
        provider = AwsBatchProvider(make_client(REGION, url, **MOTO_CREDENTIALS),
                                    job_queue=QUEUE, job_definition=DEFINITION,
                                    retry=RetryPolicy(attempts=4, sleep=sleeps))
        yield AwsHarness(provider, fake, sleeps, url)
        provider.close()


class TestAwsContract(ProviderContract):
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


def full_task(max_run: int = 3600) -> ProviderTask:
    job_id = str(uuid.uuid4())
    spec = JobSpec(
        image_uri="123.dkr.ecr.us-east-1.amazonaws.com/app:1", commands=("python", "app.py"),
        env_vars={"MODE": "fast"}, labels={"team": "data"}, resource_profile="medium",
        resource_override=ResourceOverride(cpu_millis=1500, max_run_duration_seconds=max_run),
        use_spot_vms=True)
    return ProviderTask(make_pid(job_id, 2), job_id, "tenant-a", 2, spec)


def test_submit_request_carries_every_promised_field(aws: AwsHarness) -> None:
    task = full_task()
    path = aws.provider.submit(task)
    [body] = aws.fake.submits
    assert path.startswith(f"arn:aws:batch:{REGION}:{ACCOUNT}:job/")
    [definition] = aws.fake.registered  # AWS cannot override the image: a copy per image
    assert definition["jobDefinitionName"] == image_definition_name(DEFINITION, task.spec.image_uri)
    assert definition["containerProperties"] == {**base_definition()["containerProperties"],
                                                 "image": task.spec.image_uri}
    assert definition["platformCapabilities"] == ["EC2"]
    assert (body["jobName"], body["jobQueue"], body["jobDefinition"]) == (
        task.provider_job_id, QUEUE,
        f"arn:aws:batch:{REGION}:{ACCOUNT}:job-definition/{definition['jobDefinitionName']}:1")
    overrides = body["containerOverrides"]
    assert overrides["command"] == ["python", "app.py"]
    assert {e["name"]: e["value"] for e in overrides["environment"]} == {
        "MODE": "fast", "JENNAH_JOB_ID": task.job_id, "JENNAH_ATTEMPT": "2",
        "JENNAH_TENANT_ID": "tenant-a", "JENNAH_PROVIDER_JOB_ID": task.provider_job_id}
    # medium is 2000m/4096MiB; the override's 1500m wins.
    assert overrides["resourceRequirements"] == [{"type": "VCPU", "value": "1.5"},
                                                 {"type": "MEMORY", "value": "4096"}]
    assert body["tags"] == {"team": "data", "jennah-job-id": task.job_id,
                            "jennah-tenant-id": "tenant-a", "jennah-attempt": "2"}
    assert body["timeout"] == {"attemptDurationSeconds": 3600}
    assert body["retryStrategy"] == {"attempts": 1}


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


def test_the_fake_refuses_what_aws_refuses(aws: AwsHarness) -> None:
    bad = make_task(EXIT_0, labels={"aws:owner": "me"})
    with pytest.raises(ProviderRejected, match="ClientException"):
        aws.provider.submit(bad)
    assert aws.fake.submits == []


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

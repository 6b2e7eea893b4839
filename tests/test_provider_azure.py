"""Azure Batch provider against the HTTP fake of the Batch REST API
(``tests/fakes/azure_batch.py``), authenticated with a named key: the provider contract,
every row of the state mapping, every request field we promise, adoption, throttling and
cancel through the terminate operation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import isodate  # type: ignore[import-untyped]
import pytest
from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError, ServiceRequestError
from azure.core.rest import HttpRequest

from jennah.errors import ProviderQuotaExceeded, ProviderRejected, ProviderUnavailable
from jennah.models import FailureClass, JobSpec, JobStatus, ResourceOverride
from jennah.settings import ProviderSettings
from providers.azure import (
    AZURE_TASK_STATES,
    CANCEL_REASON,
    AzureBatchProvider,
    endpoint_region,
    task_id_for,
    translate,
)
from providers.base import ProviderTask
from providers.base import provider_job_id as make_pid
from providers.retry import RetryPolicy
from tests.fakes import serve_http
from tests.fakes.azure_batch import ACCOUNT, POOL, FakeAzureBatch
from tests.helpers import free_port
from tests.provider_contract import EXIT_0, SLEEP_60, ProviderContract, make_task

KEY = "c2VjcmV0LWtleQ=="


@dataclass
class Sleeps:
    seen: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.seen.append(seconds)


def make_provider(url: str, account: str = ACCOUNT, **kwargs: Any) -> AzureBatchProvider:
    client = BatchClient(url, AzureNamedKeyCredential(account, KEY), retry_total=0)
    return AzureBatchProvider(client, endpoint=url, pool_id=POOL, lro_poll_seconds=0, **kwargs)


@dataclass
class AzureHarness:
    provider: AzureBatchProvider
    fake: FakeAzureBatch
    sleeps: Sleeps
    url: str
    supports_long_running: bool = True

    def advance(self) -> None:
        self.fake.advance()

    def executions(self, provider_job_id: str) -> int:
        return self.fake.executions(provider_job_id)

    def unknown_path(self) -> str:
        return f"{self.url}/jobs/j-never-0/tasks/{task_id_for('j-never-0')}"


@pytest.fixture
def az() -> Iterator[AzureHarness]:
    fake = FakeAzureBatch()
    with serve_http(fake.handle) as url:
        sleeps = Sleeps()
        provider = make_provider(url, retry=RetryPolicy(attempts=4, sleep=sleeps))
        yield AzureHarness(provider, fake, sleeps, url)
        provider.close()


class TestAzureContract(ProviderContract):
    state_timeout = 5.0

    @pytest.fixture
    def harness(self, az: AzureHarness) -> AzureHarness:
        return az


# --- the mapping, row by row ----------------------------------------------------------------


def test_task_state_table_is_design_section_3() -> None:
    assert dict(AZURE_TASK_STATES) == {"active": JobStatus.SCHEDULED,
                                       "preparing": JobStatus.SCHEDULED,
                                       "running": JobStatus.RUNNING}


ROWS: list[tuple[str, str, int | None, dict[str, Any] | None, float, bool,
                 JobStatus | None, FailureClass | None]] = [
    # row name, task state, exit code, failure info, ran for (s), terminated by us,
    # expected state, expected failure class
    ("active", "active", None, None, 0, False, JobStatus.SCHEDULED, None),
    ("preparing", "preparing", None, None, 0, False, JobStatus.SCHEDULED, None),
    ("running", "running", None, None, 1, False, JobStatus.RUNNING, None),
    ("completed exit 0", "completed", 0, None, 1, False, JobStatus.COMPLETED, None),
    ("completed exit 5", "completed", 5, {"category": "usererror", "code": "FailureExitCode"},
     1, False, JobStatus.FAILED, FailureClass.USER_ERROR),
    ("server error", "completed", None, {"category": "servererror", "code": "NodeFailed"},
     1, False, JobStatus.FAILED, FailureClass.INFRASTRUCTURE),
    ("image pull failed", "completed", None, {"category": "usererror",
                                              "code": "ContainerPullImageFailed"},
     0, False, JobStatus.FAILED, FailureClass.USER_ERROR),
    ("ran into its wall clock limit", "completed", 137, None, 3600, False, JobStatus.FAILED,
     FailureClass.TIMEOUT),
    ("no exit code, no reason", "completed", None, None, 1, False, JobStatus.FAILED,
     FailureClass.INFRASTRUCTURE),
    ("queued, job cancelled", "active", None, None, 0, True, JobStatus.CANCELLED, None),
    ("ended by cancel", "completed", 137, None, 1, True, JobStatus.CANCELLED, None),
    ("finished before the cancel", "completed", 0, None, 1, True, JobStatus.COMPLETED, None),
    ("a state we do not know", "reticulating", None, None, 0, False, None, None),
]


@pytest.mark.parametrize(("row", "state", "exit_code", "failure", "ran_for", "cancelled",
                          "expected", "expected_class"), ROWS, ids=[r[0] for r in ROWS])
def test_every_mapping_row_over_the_wire(
    az: AzureHarness, row: str, state: str, exit_code: int | None,
    failure: dict[str, Any] | None, ran_for: float, cancelled: bool,
    expected: JobStatus | None, expected_class: FailureClass | None,
) -> None:
    spec_task = make_task(SLEEP_60)
    limited = ProviderTask(spec_task.provider_job_id, spec_task.job_id, "tenant-a", 0,
                           JobSpec(image_uri="busybox", commands=SLEEP_60,
                                   resource_override=ResourceOverride(
                                       max_run_duration_seconds=3600)))
    path = az.provider.submit(limited)
    az.fake.set_task(limited.provider_job_id, state, exit_code=exit_code, failure=failure,
                     ran_for=ran_for)
    if cancelled:
        az.fake.jobs[limited.provider_job_id].complete(CANCEL_REASON)
    st = az.provider.status([path])[path]
    assert (st.state, st.failure_class) == (expected, expected_class), row
    if expected in (JobStatus.COMPLETED, JobStatus.FAILED):
        assert st.exit_code == exit_code and st.completed_at is not None
    if expected is JobStatus.CANCELLED:
        assert st.completed_at is not None


def test_status_reads_the_job_only_when_the_task_could_be_cancelled(az: AzureHarness) -> None:
    path = az.provider.submit(make_task(SLEEP_60))
    az.fake.advance(2)  # running: the task alone decides
    az.provider.status([path])
    assert az.fake.calls["GET /jobs/{id}"] == 0
    az.fake.set_task(path.split("/")[-3], "active")
    az.provider.status([path])
    assert az.fake.calls["GET /jobs/{id}"] == 1


# --- the requests ----------------------------------------------------------------------------


def test_requests_carry_every_promised_field(az: AzureHarness) -> None:
    job_id = str(uuid.uuid4())
    spec = JobSpec(image_uri="myacr.azurecr.io/app:2", commands=("sh", "-c", "echo 'a b'"),
                   env_vars={"MODE": "fast"}, labels={"team": "data"}, resource_profile="xlarge",
                   resource_override=ResourceOverride(memory_mib=20000,
                                                      max_run_duration_seconds=5400))
    task = ProviderTask(make_pid(job_id, 0), job_id, "tenant-a", 0, spec)
    path = az.provider.submit(task)
    [job], [body] = az.fake.job_requests, az.fake.task_requests
    assert job["id"] == task.provider_job_id and job["poolInfo"] == {"poolId": POOL}
    assert job["onAllTasksComplete"] == "terminatejob"
    assert {m["name"]: m["value"] for m in job["metadata"]} == {
        "team": "data", "jennah-job-id": job_id, "jennah-tenant-id": "tenant-a",
        "jennah-attempt": "0"}
    assert body["id"] == task_id_for(task.provider_job_id)
    assert path == f"{az.url}/jobs/{job['id']}/tasks/{body['id']}"
    assert body["commandLine"] == "sh -c 'echo '\"'\"'a b'\"'\"''"
    assert body["containerSettings"] == {"imageName": "myacr.azurecr.io/app:2",
                                         "containerRunOptions": "--cpus=8 --memory=20000m"}
    assert {e["name"]: e["value"] for e in body["environmentSettings"]} == {
        "MODE": "fast", "JENNAH_JOB_ID": job_id, "JENNAH_ATTEMPT": "0",
        "JENNAH_TENANT_ID": "tenant-a", "JENNAH_PROVIDER_JOB_ID": task.provider_job_id}
    limits = body["constraints"]
    assert isodate.parse_duration(limits.pop("maxWallClockTime")) == timedelta(minutes=90)
    assert limits == {"maxTaskRetryCount": 0}


def test_requests_are_signed_with_the_named_key(az: AzureHarness) -> None:
    stranger = make_provider(az.url, account="otheraccount",
                             retry=RetryPolicy(attempts=1))
    try:
        with pytest.raises(ProviderRejected, match="AuthenticationFailed"):
            stranger.submit(make_task(EXIT_0))
    finally:
        stranger.close()
    assert az.fake.jobs == {}


def test_a_second_worker_adopts_the_job_and_task(az: AzureHarness) -> None:
    task = make_task(EXIT_0)
    first = az.provider.submit(task)
    other = make_provider(az.url)
    try:
        assert other.submit(task) == first
    finally:
        other.close()
    assert az.fake.executions(task.provider_job_id) == 1
    assert len(az.fake.job_requests) == len(az.fake.task_requests) == 1


def test_a_job_left_without_its_task_gets_it_on_resubmit(az: AzureHarness) -> None:
    task = make_task(EXIT_0)
    az.provider.client.send_request(HttpRequest(
        "POST", f"{az.url}/jobs", params={"api-version": "2025-06-01"},
        json={"id": task.provider_job_id, "poolInfo": {"poolId": POOL}}))
    assert az.fake.executions(task.provider_job_id) == 0  # a crash between the two creates
    az.provider.submit(task)
    assert az.fake.executions(task.provider_job_id) == 1


# --- throttling, errors, cancel --------------------------------------------------------------


def test_throttled_calls_are_retried_then_succeed(az: AzureHarness) -> None:
    az.fake.throttle(2, methods={"POST /jobs/{id}/tasks"})
    path = az.provider.submit(make_task(EXIT_0))
    assert az.fake.calls["POST /jobs/{id}/tasks"] == 3 and len(az.sleeps.seen) == 2
    az.fake.throttle(3, methods={"GET /jobs/{id}/tasks/{id}"})
    assert az.provider.status([path])[path].state is JobStatus.SCHEDULED
    assert len(az.sleeps.seen) == 5


def test_throttling_beyond_the_budget_surfaces_as_unavailable(az: AzureHarness) -> None:
    az.fake.throttle(4)
    with pytest.raises(ProviderUnavailable, match="TooManyRequests") as info:
        az.provider.submit(make_task(EXIT_0))
    assert info.value.retryable and az.fake.jobs == {}


def test_cancel_waits_for_the_terminate_operation(az: AzureHarness) -> None:
    path = az.provider.submit(make_task(SLEEP_60))
    job_id = path.split("/")[-3]
    az.fake.advance(3)
    az.provider.cancel(path)
    # No advance: the SDK's poller read the job until it left "terminating".
    job = az.fake.jobs[job_id]
    assert (job.state, job.terminate_reason) == ("completed", CANCEL_REASON)
    assert az.fake.calls["GET /jobs/{id}"] >= 1
    az.provider.cancel(az.provider.endpoint + "/jobs/j-unknown-0/tasks/j-unknown-0-task")
    az.provider.cancel("https://elsewhere.example/jobs/x/tasks/y")


def test_an_unreachable_account_is_unavailable_not_an_azure_error() -> None:
    provider = make_provider(f"http://127.0.0.1:{free_port()}",
                             retry=RetryPolicy(attempts=2, sleep=lambda _s: None))
    try:
        with pytest.raises(ProviderUnavailable, match="ServiceRequestError"):
            provider.submit(make_task(EXIT_0))
    finally:
        provider.close()


def test_error_translation() -> None:
    assert isinstance(translate(ServiceRequestError("refused"), "x"), ProviderUnavailable)

    def http_error(status: int, code: str) -> HttpResponseError:
        exc = HttpResponseError(message=f"{code} happened")
        exc.status_code = status
        exc.error = type("E", (), {"code": code})()
        return exc

    assert isinstance(translate(http_error(409, "ActiveJobAndScheduleQuotaReached"), "x"),
                      ProviderQuotaExceeded)
    assert isinstance(translate(http_error(503, "ServerBusy"), "x"), ProviderUnavailable)
    assert isinstance(translate(http_error(403, "Forbidden"), "x"), ProviderRejected)


def test_settings_with_a_named_key_and_the_region_from_the_endpoint(az: AzureHarness) -> None:
    settings = ProviderSettings(kind="azure", azure_batch_endpoint=az.url,
                                azure_batch_pool_id=POOL, azure_batch_account_name=ACCOUNT,
                                azure_batch_account_key=KEY)
    provider = AzureBatchProvider.from_settings(settings)
    try:
        path = provider.submit(make_task(EXIT_0))
        assert provider.status([path])[path].state is JobStatus.SCHEDULED
    finally:
        provider.close()
    assert endpoint_region("https://jennahacct.westeurope.batch.azure.com") == "westeurope"
    assert endpoint_region(az.url) == ""

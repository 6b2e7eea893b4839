"""Azure Batch provider against the HTTP fake of the Batch REST API
(``tests/fakes/azure_batch.py``), authenticated with a named key: the provider contract,
every row of the state mapping, every request field we promise, adoption, throttling,
cancel through the terminate operation, and jobs of several tasks (collections of at most
100, resubmits that add only what is missing, ``maxParallelTasks``, a variable set per
task, the paged task list)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import isodate  # type: ignore[import-untyped]
import pytest
from azure.batch import BatchClient
from azure.batch import models as am
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError, ServiceRequestError
from azure.core.rest import HttpRequest

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
from jennah.settings import ProviderSettings
from jennah.tasks import count
from providers import azure as azure_module
from providers.azure import (
    AZURE_TASK_STATES,
    CANCEL_REASON,
    AzureBatchProvider,
    AzureSettings,
    build_job,
    build_task,
    endpoint_region,
    task_id_for,
    task_state,
    translate,
)
from providers.base import OutputChunk, ProviderTask, submit_calls
from providers.base import provider_job_id as make_pid
from providers.retry import RetryPolicy
from tests.fakes import serve_http
from tests.fakes.azure_batch import ACCOUNT, POOL, FakeAzureBatch
from tests.helpers import free_port, owner
from tests.providers.provider_contract import (
    ECHO_TASK,
    EXIT_0,
    IMAGE,
    SLEEP_60,
    ProviderContract,
    make_task,
)
from worker.jobs import JobService

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
    kind = "azure"
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
    # noaction at creation, terminatejob once the task is in (docs: an empty job is complete)
    assert job["onAllTasksComplete"] == "noaction"
    assert az.fake.job_updates == [(job["id"], {"onAllTasksComplete": "terminatejob"})]
    assert {m["name"]: m["value"] for m in job["metadata"]} == {
        "team": "data", "jennah-job-id": job_id, "jennah-tenant-id": "tenant-a",
        "jennah-attempt": "0"}
    assert body["id"] == task_id_for(task.provider_job_id)
    assert path == f"{az.url}/jobs/{job['id']}/tasks/{body['id']}"
    assert body["commandLine"] == "sh -c 'echo '\"'\"'a b'\"'\"''"
    assert body["containerSettings"] == {"imageName": "myacr.azurecr.io/app:2",
                                         "workingDirectory": "containerImageDefault",
                                         "containerRunOptions": "--cpus=8 --memory=20000m"}
    assert {e["name"]: e["value"] for e in body["environmentSettings"]} == {
        "MODE": "fast", "JENNAH_JOB_ID": job_id, "JENNAH_ATTEMPT": "0",
        "JENNAH_TENANT_ID": "tenant-a", "JENNAH_PROVIDER_JOB_ID": task.provider_job_id,
        "JENNAH_TASK_INDEX": "0", "JENNAH_TASK_COUNT": "1"}  # a plain job is task 0 of 1
    assert "commonEnvironmentSettings" not in job and "maxParallelTasks" not in job
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
    settings = ProviderSettings(kind="azure", env={
        "AZURE_BATCH_ENDPOINT": az.url, "AZURE_BATCH_POOL_ID": POOL,
        "AZURE_BATCH_ACCOUNT_NAME": ACCOUNT, "AZURE_BATCH_ACCOUNT_KEY": KEY})
    provider = AzureBatchProvider.from_settings(settings)
    try:
        path = provider.submit(make_task(EXIT_0))
        assert provider.status([path])[path].state is JobStatus.SCHEDULED
    finally:
        provider.close()
    assert endpoint_region("https://jennahacct.westeurope.batch.azure.com") == "westeurope"
    assert endpoint_region(az.url) == ""


# --- submit: noaction, task, then terminatejob -----------------------------------------------


def _job_state(az: AzureHarness, job_id: str) -> tuple[str, str | None, str | None]:
    job = az.fake.jobs[job_id]
    return job.state, job.body.get("onAllTasksComplete"), job.terminate_reason


def test_an_empty_job_created_with_terminatejob_ends_at_once_in_the_fake(
        az: AzureHarness) -> None:
    """What Batch documents, and what made every submit fail: an empty terminatejob job
    is complete, and a task can no longer be added to it."""
    az.provider.client.send_request(HttpRequest(
        "POST", f"{az.url}/jobs", params={"api-version": "2025-06-01"},
        json={"id": "j-empty-0", "poolInfo": {"poolId": POOL},
              "onAllTasksComplete": "terminatejob"}))
    assert _job_state(az, "j-empty-0") == ("completed", "terminatejob", "AllTasksComplete")
    with pytest.raises(HttpResponseError, match="JobCompleted") as info:
        az.provider.client.send_request(HttpRequest(
            "POST", f"{az.url}/jobs/j-empty-0/tasks", params={"api-version": "2025-06-01"},
            json={"id": "t", "commandLine": "true", "containerSettings": {"imageName": "x"}}))
    assert info.value.status_code == 409


def test_the_job_ends_with_its_task_not_before(az: AzureHarness) -> None:
    task = make_task(EXIT_0)
    path = az.provider.submit(task)
    assert _job_state(az, task.provider_job_id) == ("active", "terminatejob", None)
    az.fake.advance(3)
    assert az.provider.status([path])[path].state is JobStatus.COMPLETED
    assert _job_state(az, task.provider_job_id) == ("completed", "terminatejob",
                                                     "AllTasksComplete")


def _stop_at(az: AzureHarness, route: str, task: ProviderTask) -> None:
    """The submit dies at ``route`` (its whole retry budget throttled), as a worker that
    crashed there would leave it."""
    az.fake.throttle(4, methods={route})
    with pytest.raises(ProviderUnavailable):
        az.provider.submit(task)


@pytest.mark.parametrize(("left", "then_task", "expected_job"), [
    ("POST /jobs/{id}/tasks", None, ("active", "terminatejob", None)),
    ("PATCH /jobs/{id}", None, ("active", "terminatejob", None)),
    # The task finished while its job was still noaction: the patch ends the job.
    ("PATCH /jobs/{id}", "completed", ("completed", "terminatejob", "AllTasksComplete")),
    # Cancelled in between: the job is over, nothing left to engage.
    ("PATCH /jobs/{id}", "cancelled", ("completed", "noaction", CANCEL_REASON)),
], ids=["job without its task", "task in, job still noaction",
        "task done, job still noaction", "job terminated before the patch"])
def test_a_resubmit_finishes_what_a_crashed_submit_left(
        az: AzureHarness, left: str, then_task: str | None,
        expected_job: tuple[str, str, str | None]) -> None:
    task = make_task(EXIT_0)
    _stop_at(az, left, task)
    job_id = task.provider_job_id
    assert _job_state(az, job_id)[:2] == ("active", "noaction")
    if then_task == "completed":
        az.fake.set_task(job_id, "completed", exit_code=0)
    elif then_task == "cancelled":
        az.fake.jobs[job_id].complete(CANCEL_REASON)
    path = az.provider.submit(task)
    assert path == f"{az.url}/jobs/{job_id}/tasks/{task_id_for(job_id)}"
    assert az.fake.executions(job_id) == 1 and len(az.fake.task_requests) == 1
    assert _job_state(az, job_id) == expected_job
    if then_task == "completed":
        assert az.provider.status([path])[path].state is JobStatus.COMPLETED


def test_a_second_submit_of_a_finished_job_changes_nothing(az: AzureHarness) -> None:
    task = make_task(EXIT_0)
    path = az.provider.submit(task)
    az.fake.advance(3)
    assert az.provider.submit(task) == path
    assert az.fake.executions(task.provider_job_id) == 1
    assert _job_state(az, task.provider_job_id)[0] == "completed"


def test_terminatejob_cannot_be_turned_off_in_the_fake(az: AzureHarness) -> None:
    task = make_task(SLEEP_60)
    az.provider.submit(task)
    with pytest.raises(HttpResponseError, match="InvalidPropertyValue"):
        az.provider.client.send_request(HttpRequest(
            "PATCH", f"{az.url}/jobs/{task.provider_job_id}",
            params={"api-version": "2025-06-01"}, json={"onAllTasksComplete": "noaction"}))


# --- what Azure cannot honour is refused at SubmitJob ----------------------------------------


@pytest.mark.parametrize("change", [
    {"machine_type": "Standard_D4s_v3"}, {"use_spot_vms": True},
    {"accelerator_type": "nvidia-tesla-t4", "accelerator_count": 1}, {"accelerator_count": 1},
    {"labels": {"jennah-job-id": "mine"}}, {"labels": {"jennah-attempt": "7"}},
], ids=["machine type", "spot", "gpu", "gpu count", "jennah-job-id", "jennah-attempt"])
def test_what_the_pool_decides_is_refused_before_anything_is_stored(
        az: AzureHarness, change: dict[str, Any]) -> None:
    store = MemoryStore()
    jobs = JobService(store, az.provider, worker_id="w1", lease_ttl=30)
    spec = dataclasses.replace(JobSpec(image_uri=IMAGE, commands=EXIT_0), **change)
    with pytest.raises(InvalidArgument, match="azure provider"):
        asyncio.run(jobs.submit("acme", spec, "r"))
    assert store.list_jobs("acme", JobFilter(), 10, "").jobs == []
    assert az.fake.jobs == {} and sum(az.fake.calls.values()) == 0


def test_labels_are_not_limited_in_number(az: AzureHarness) -> None:
    """Batch documents no limit on job metadata items (docs/providers.md)."""
    labels = {f"k{i}": "v" for i in range(100)}
    az.provider.submit(make_task(EXIT_0, labels=labels))
    [job] = az.fake.job_requests
    assert len(job["metadata"]) == 103


# --- private registry ------------------------------------------------------------------------

PASSWORD = "s3cr3t-Registry-Pa55"


def _registry_settings(az: AzureHarness, **registry: str) -> ProviderSettings:
    """Azure settings with ``registry``'s ``AZURE_REGISTRY_*`` variables (lowercase suffix:
    ``server`` is ``AZURE_REGISTRY_SERVER``, ``identity`` the identity's resource id)."""
    names = {"identity": "AZURE_REGISTRY_IDENTITY_RESOURCE_ID"}
    return ProviderSettings(kind="azure", env={
        "AZURE_BATCH_ENDPOINT": az.url, "AZURE_BATCH_POOL_ID": POOL,
        "AZURE_BATCH_ACCOUNT_NAME": ACCOUNT, "AZURE_BATCH_ACCOUNT_KEY": KEY,
        **{names.get(k, f"AZURE_REGISTRY_{k.upper()}"): v for k, v in registry.items()}})


def test_registry_credentials_go_only_to_their_own_registry(az: AzureHarness) -> None:
    settings = _registry_settings(az, server="MyACR.azurecr.io", username="puller",
                                  password=PASSWORD)
    provider = AzureBatchProvider.from_settings(settings)
    try:
        for image in ("myacr.azurecr.io/app:2", "docker.io/library/busybox:1.36", "busybox",
                      "myacr.azurecr.io.evil.example/app"):
            task = make_task(EXIT_0)
            provider.submit(dataclasses.replace(
                task, spec=dataclasses.replace(task.spec, image_uri=image)))
    finally:
        provider.close()
    registries = [b["containerSettings"].get("registry") for b in az.fake.task_requests]
    assert registries == [{"registryServer": "myacr.azurecr.io", "username": "puller",
                           "password": PASSWORD}, None, None, None]


def test_a_managed_identity_instead_of_a_password(az: AzureHarness) -> None:
    identity = ("/subscriptions/s/resourceGroups/g/providers/"
                "Microsoft.ManagedIdentity/userAssignedIdentities/puller")
    settings = _registry_settings(az, server="myacr.azurecr.io", identity=identity)
    provider = AzureBatchProvider.from_settings(settings)
    try:
        task = make_task(EXIT_0)
        provider.submit(dataclasses.replace(task, spec=dataclasses.replace(
            task.spec, image_uri="myacr.azurecr.io/app:2")))
    finally:
        provider.close()
    [body] = az.fake.task_requests
    assert body["containerSettings"]["registry"] == {
        "registryServer": "myacr.azurecr.io", "identityReference": {"resourceId": identity}}


@pytest.mark.parametrize("registry", [
    {"username": "u", "password": PASSWORD},
    {"server": "r.io", "password": PASSWORD},
    {"server": "r.io", "username": "u", "password": PASSWORD, "identity": "/subscriptions/x"},
    {"server": "r.io"},
], ids=["no server", "no user name", "password and identity", "no credentials"])
def test_incomplete_registry_settings_stop_the_start(az: AzureHarness,
                                                     registry: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="AZURE_REGISTRY_") as info:
        AzureBatchProvider.from_settings(_registry_settings(az, **registry))
    assert PASSWORD not in str(info.value)


def test_the_registry_password_is_never_logged_nor_in_errors(
        az: AzureHarness, caplog: pytest.LogCaptureFixture) -> None:
    settings = _registry_settings(az, server="myacr.azurecr.io", username="puller",
                                  password=PASSWORD)
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in repr(settings.read(AzureSettings.from_env))
    provider = AzureBatchProvider.from_settings(settings)
    assert PASSWORD not in repr(provider.registry)
    task = make_task(EXIT_0)
    task = dataclasses.replace(task, spec=dataclasses.replace(
        task.spec, image_uri="myacr.azurecr.io/app:2"))
    caplog.set_level(logging.DEBUG)
    az.fake.echo_errors(1)  # Batch's error details carry the offending value
    try:
        with pytest.raises(ProviderRejected, match="InvalidPropertyValue") as info:
            provider.submit(task)
        provider.submit(task)
    finally:
        provider.close()
    assert "[redacted]" in str(info.value) and PASSWORD not in str(info.value)
    assert "puller" in str(info.value)  # the rest of the message is kept
    assert PASSWORD not in caplog.text
    assert az.fake.task_requests[0]["containerSettings"]["registry"]["password"] == PASSWORD


# --- output: stdout.txt and stderr.txt, by byte offsets ---------------------------------------


def _running(az: AzureHarness) -> tuple[str, str]:
    path = az.provider.submit(make_task(SLEEP_60))
    az.fake.advance(2)
    return path, path.split("/")[-3]


def test_output_is_read_by_byte_offsets_in_whole_lines(az: AzureHarness) -> None:
    queued = az.provider.submit(make_task(SLEEP_60))
    assert az.provider.read_output(queued, (0, 0)) == OutputChunk(offsets=(0, 0))  # no node yet
    path, job_id = _running(az)
    az.fake.write(job_id, "stdout.txt", "héllo\npart".encode())
    az.fake.write(job_id, "stderr.txt", b"warn\n")
    first = az.provider.read_output(path, (0, 0))
    assert (first.stdout, first.stderr, first.offsets) == ("héllo\n", "warn\n", (7, 5))
    assert az.fake.calls["GET /jobs/{id}/tasks/{id}"] == 1  # a partial line: is it the end?
    again = az.provider.read_output(path, first.offsets)
    assert (again.stdout, again.stderr, again.offsets) == ("", "", (7, 5))
    az.fake.write(job_id, "stdout.txt", b"ial\nnext")
    second = az.provider.read_output(path, again.offsets)
    assert (second.stdout, second.offsets) == ("partial\n", (15, 5))
    az.fake.set_task(job_id, "completed", exit_code=0)
    last = az.provider.read_output(path, second.offsets)
    assert (last.stdout, last.offsets) == ("next", (19, 5))  # the end: the last line too
    after = az.provider.read_output(path, last.offsets)
    assert after == OutputChunk(offsets=(19, 5))
    # Each read starts where the returned text stopped: only a withheld partial line is
    # read again (at 7 while it grew; at 15 once more after the task was seen completed),
    # and nothing past the end of a file is asked for.
    starts = [first for _j, name, first, _l in az.fake.range_reads if name == "stdout.txt"]
    assert starts == [0, 7, 7, 15, 15]


def test_reads_are_capped_and_never_split_a_character(
        az: AzureHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(azure_module, "OUTPUT_CAP", 8)
    path, job_id = _running(az)
    az.fake.write(job_id, "stdout.txt", "aaaaaaa€b\ncccccc\n".encode())  # € is 3 bytes
    texts, offsets = [], (0, 0)
    for _ in range(5):
        chunk = az.provider.read_output(path, offsets)
        texts.append(chunk.stdout)
        offsets = chunk.offsets
    assert texts == ["aaaaaaa", "€b\n", "cccccc\n", "", ""]
    assert all(last - first < 8 for _j, _n, first, last in az.fake.range_reads)


def test_output_of_a_task_of_another_account_is_empty(az: AzureHarness) -> None:
    assert az.provider.read_output("https://elsewhere.example/jobs/x/tasks/y", (3, 4)) == (
        OutputChunk(offsets=(3, 4)))


def _output_events(store: MemoryStore, job_id: str) -> list[tuple[str, str]]:
    return [(e.message, e.output) for e in store.list_events("acme", job_id, 0, 1000)
            if e.kind is EventKind.OUTPUT]


def test_the_poller_streams_output_once_in_order_across_workers(az: AzureHarness) -> None:
    """The worker's own loop against the fake: several polls, a new owner starting from
    the stored offsets, and nothing after the end."""
    store = MemoryStore()
    w1 = owner(store, az.provider, "w1")
    w2 = owner(store, az.provider, "w2")

    async def go() -> None:
        job = await w1.jobs.submit("acme", JobSpec(image_uri=IMAGE, commands=SLEEP_60), "r")
        job_id = job.provider_job_id
        p1 = w1.poller
        az.fake.advance(2)
        az.fake.write(job_id, "stdout.txt", b"one\ntw")
        await p1.cycle()
        az.fake.write(job_id, "stdout.txt", b"o\n")
        az.fake.write(job_id, "stderr.txt", b"err 1\n")
        await p1.cycle()
        await p1.cycle()  # nothing new
        assert _output_events(store, job.job_id) == [
            ("stdout", "one\n"), ("stdout", "two\n"), ("stderr", "err 1\n")]
        # w1 goes away; w2 takes the job over and reads on from the store's offsets.
        store.release_leases([(job.job_id, store.get_job("acme", job.job_id).lease)])
        assert [j.job_id for j in store.claim_expired("w2", 30, 10)] == [job.job_id]
        az.fake.write(job_id, "stdout.txt", b"three\nno newline")
        az.fake.set_task(job_id, "completed", exit_code=0)
        p2 = w2.poller
        await p2.cycle()
        assert store.get_job("acme", job.job_id).status is JobStatus.COMPLETED
        az.fake.write(job_id, "stdout.txt", b"\nlate\n")  # after the end: never read
        await p2.cycle()

        events = store.list_events("acme", job.job_id, 0, 1000)
        assert _output_events(store, job.job_id) == [
            ("stdout", "one\n"), ("stdout", "two\n"), ("stderr", "err 1\n"),
            ("stdout", "three\nno newline")]
        assert events[-1].kind is EventKind.COMPLETED and events[-1].worker_id == "w2"
        assert [e.offset for e in events if e.kind is EventKind.OUTPUT] == [0, 4, 0, 8]

    asyncio.run(go())


# --- jobs of several tasks -------------------------------------------------------------------


def _array(n: int, commands: tuple[str, ...] = EXIT_0, parallelism: int = 0,
           **spec: Any) -> ProviderTask:
    task = make_task(commands)
    return dataclasses.replace(task, spec=dataclasses.replace(
        task.spec, task_count=n, parallelism=parallelism, **spec))


def _ids(indexes: Iterable[int]) -> list[str]:
    return [f"task-{i}" for i in indexes]


def _env(body: dict[str, Any], key: str = "environmentSettings") -> dict[str, str]:
    return {e["name"]: e["value"] for e in body.get(key) or ()}


def test_a_job_of_several_tasks_is_one_job_whose_tasks_go_in_by_the_hundred(
        az: AzureHarness) -> None:
    task = _array(250, parallelism=40, env_vars={"MODE": "fast"})
    path = az.provider.submit(task)
    pid = task.provider_job_id
    assert path == f"{az.url}/jobs/{pid}/tasks?taskCount=250"
    [job] = az.fake.job_requests
    assert (job["onAllTasksComplete"], job["maxParallelTasks"]) == ("noaction", 40)
    # What every task shares is the job's, once; each task carries its index and the count.
    assert _env(job, "commonEnvironmentSettings") == {
        "MODE": "fast", "JENNAH_JOB_ID": task.job_id, "JENNAH_ATTEMPT": "0",
        "JENNAH_TENANT_ID": "tenant-a", "JENNAH_PROVIDER_JOB_ID": pid}
    assert az.fake.collections == [_ids(range(100)), _ids(range(100, 200)),
                                   _ids(range(200, 250))]
    assert len(az.fake.collections) == submit_calls(az.provider.capabilities, 250) - 1
    plain = build_task(task, None).as_dict()
    for i, body in enumerate(az.fake.task_requests):
        assert body["id"] == f"task-{i}"
        assert _env(body) == {"JENNAH_TASK_INDEX": str(i), "JENNAH_TASK_COUNT": "250"}
        assert {k: body[k] for k in ("commandLine", "containerSettings", "constraints")} == {
            k: plain[k] for k in ("commandLine", "containerSettings", "constraints")}
    assert az.fake.jobs[pid].task(7).env["MODE"] == "fast"  # the job's variables reach it
    assert az.fake.job_updates == [(pid, {"onAllTasksComplete": "terminatejob"})]
    # A fresh job is not listed, and no task is added on its own.
    assert az.fake.calls["GET /jobs/{id}/tasks"] == az.fake.calls["POST /jobs/{id}/tasks"] == 0
    assert az.fake.executions(pid) == 1


@pytest.mark.parametrize(("n", "parallelism", "expected"), [
    (4, 0, None), (4, 4, None), (4, 1, 1), (10_000, 500, 500)])
def test_parallelism_is_max_parallel_tasks_when_it_limits(
        n: int, parallelism: int, expected: int | None) -> None:
    job = build_job(_array(n, parallelism=parallelism), POOL)
    assert job.max_parallel_tasks == expected


def test_large_tasks_go_in_smaller_collections_under_the_1_mb_limit(az: AzureHarness) -> None:
    big = ("sh", "-c", "echo " + "x" * 30_000)  # 30 KB a task: 100 would be 3 MB
    task = _array(70, big)
    az.provider.submit(task)
    sizes = [len(c) for c in az.fake.collections]
    assert sum(sizes) == 70 and len(sizes) >= 3 and max(sizes) < 34
    assert az.fake.executions(task.provider_job_id) == 1


def test_the_fake_refuses_what_batch_refuses_in_a_collection(az: AzureHarness) -> None:
    task = _array(101)
    az.provider.client.create_job(build_job(task, POOL))

    def add(indexes: Iterable[int], cmd: tuple[str, ...] = EXIT_0) -> None:
        t = dataclasses.replace(task, spec=dataclasses.replace(task.spec, commands=cmd))
        az.provider.client.create_task_collection(task.provider_job_id, am.BatchTaskGroup(
            task_values=[build_task(t, None, i) for i in indexes]))

    with pytest.raises(HttpResponseError) as over_100:
        add(range(101))
    with pytest.raises(HttpResponseError, match="RequestBodyTooLarge") as over_1_mb:
        add(range(40), ("sh", "-c", "x" * 30_000))
    assert (over_100.value.status_code, over_1_mb.value.status_code) == (400, 413)
    assert az.fake.jobs[task.provider_job_id].tasks == {}


def _seed(az: AzureHarness, task: ProviderTask, indexes: Sequence[int]) -> None:
    """What a submit that died after adding ``indexes`` left: the job, still noaction,
    and those tasks (added with the SDK's own models)."""
    client = az.provider.client
    client.create_job(build_job(task, POOL))
    for start in range(0, len(indexes), 100):
        client.create_task_collection(task.provider_job_id, am.BatchTaskGroup(
            task_values=[build_task(task, None, i) for i in indexes[start:start + 100]]))


N = 230
CRASHES: list[tuple[str, list[int], str | None, list[list[int]], tuple[str, str, str | None]]] = [
    # name, tasks in, then, the collections the resubmit must make, the job after it
    ("nothing added", [], None, [list(range(100)), list(range(100, 200)), list(range(200, N))],
     ("active", "terminatejob", None)),
    ("two collections in", list(range(200)), None, [list(range(200, N))],
     ("active", "terminatejob", None)),
    ("part of a collection", [*range(150), 170], None,
     [[*range(150, 170), *range(171, N)]], ("active", "terminatejob", None)),
    ("all in, job still noaction", list(range(N)), None, [],
     ("active", "terminatejob", None)),
    ("all in and done, job still noaction", list(range(N)), "done", [],
     ("completed", "terminatejob", "AllTasksComplete")),
    ("cancelled during the submit", list(range(100)), "cancelled", [],
     ("completed", "noaction", CANCEL_REASON)),
]


@pytest.mark.parametrize(("seeded", "then", "adds", "expected_job"),
                         [c[1:] for c in CRASHES], ids=[c[0] for c in CRASHES])
def test_a_resubmit_adds_only_the_tasks_a_crashed_submit_left_out(
        az: AzureHarness, seeded: list[int], then: str | None, adds: list[list[int]],
        expected_job: tuple[str, str, str | None]) -> None:
    task = _array(N)
    pid = task.provider_job_id
    _seed(az, task, seeded)
    if then == "done":
        az.fake.advance(3)
        assert {t.state for t in az.fake.jobs[pid].tasks.values()} == {"completed"}
    elif then == "cancelled":
        az.fake.jobs[pid].complete(CANCEL_REASON)
    before = len(az.fake.collections)
    path = az.provider.submit(task)
    assert path == f"{az.url}/jobs/{pid}/tasks?taskCount={N}"
    assert az.fake.collections[before:] == [_ids(c) for c in adds]
    expected_tasks = seeded if then == "cancelled" else range(N)
    assert sorted(t.index for t in az.fake.jobs[pid].tasks.values()) == list(expected_tasks)
    assert az.fake.executions(pid) == 1
    assert _job_state(az, pid) == expected_job
    st = az.provider.status([path])[path]
    if then == "cancelled":  # the tasks never added are cancelled with the job
        assert st.state is JobStatus.CANCELLED and st.tasks is not None
        assert count(N, st.tasks).cancelled == N
    elif then == "done":
        assert st.state is JobStatus.COMPLETED


def test_concurrent_submits_of_a_job_of_several_tasks_add_each_task_once(
        az: AzureHarness) -> None:
    task = _array(250)
    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: az.provider.submit(task), range(4)))
    assert len(paths) == 1
    assert sorted(t.index for t in az.fake.jobs[task.provider_job_id].tasks.values()) == list(
        range(250))
    assert az.fake.executions(task.provider_job_id) == 1


def test_a_collection_retries_only_its_tasks_that_failed_to_go_in(az: AzureHarness) -> None:
    az.fake.fail_task_adds(3)  # the first three tasks of the first collection: serverError
    task = _array(150)
    az.provider.submit(task)
    assert az.fake.collections == [_ids(range(100)), _ids(range(3)), _ids(range(100, 150))]
    assert len(az.sleeps.seen) == 1 and az.fake.executions(task.provider_job_id) == 1
    assert len(az.fake.jobs[task.provider_job_id].tasks) == 150


def test_a_collection_whose_answer_was_lost_is_sent_again_and_adopted(
        az: AzureHarness) -> None:
    az.fake.lose_responses(1)  # the tasks went in, the answer is a 500
    task = _array(120)
    az.provider.submit(task)
    assert az.fake.collections == [_ids(range(100)), _ids(range(100)),
                                   _ids(range(100, 120))]
    assert az.fake.executions(task.provider_job_id) == 1
    assert len(az.fake.jobs[task.provider_job_id].tasks) == 120


def test_a_task_refused_in_a_collection_rejects_the_submit_without_the_password(
        az: AzureHarness) -> None:
    provider = AzureBatchProvider.from_settings(_registry_settings(
        az, server="myacr.azurecr.io", username="puller", password=PASSWORD))
    task = _array(5, image_uri="myacr.azurecr.io/app:2")
    az.fake.echo_errors(1)
    try:
        with pytest.raises(ProviderRejected, match="task-0: InvalidPropertyValue") as info:
            provider.submit(task)
    finally:
        provider.close()
    assert "[redacted]" in str(info.value) and PASSWORD not in str(info.value)


def test_status_lists_the_tasks_in_pages_of_the_fields_it_reads(
        az: AzureHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(azure_module, "LIST_PAGE", 2)
    task = _array(5, SLEEP_60)
    pid = task.provider_job_id
    path = az.provider.submit(task)
    az.fake.advance(2)
    st = az.provider.status([path])[path]
    assert st.state is JobStatus.RUNNING and st.tasks is not None
    assert [(t.index, t.status) for t in st.tasks] == [(i, TaskStatus.RUNNING) for i in range(5)]
    first, *more = az.fake.list_requests
    assert (first["$select"], first["maxresults"]) == ("id,state,executionInfo,constraints", "2")
    assert len(more) == 2 and all("$skiptoken" in q for q in more)
    assert az.fake.calls["GET /jobs/{id}"] == 0  # running tasks: the job is not read
    # Two tasks fail: one with exit code 2, one with a server error after two re-runs.
    az.fake.set_task(pid, "completed", index=3, exit_code=2,
                     failure={"category": "userError", "code": "FailureExitCode",
                              "message": "exit code 2"})
    az.fake.set_task(pid, "completed", index=4, retries=1, requeues=1,
                     failure={"category": "serverError", "code": "NodeFailed",
                              "message": "the node failed"})
    st = az.provider.status([path])[path]
    by_index = {t.index: t for t in st.tasks or ()}
    assert st.state is JobStatus.RUNNING and az.fake.calls["GET /jobs/{id}"] == 1
    assert (by_index[3].status, by_index[3].exit_code, by_index[3].failure_class) == (
        TaskStatus.FAILED, 2, FailureClass.USER_ERROR)
    assert (by_index[4].status, by_index[4].failure_class, by_index[4].attempt,
            by_index[4].error_message) == (TaskStatus.FAILED, FailureClass.INFRASTRUCTURE, 2,
                                           "the node failed")
    assert by_index[0].attempt == 0
    for i in range(3):
        az.fake.set_task(pid, "completed", index=i, exit_code=0)
    st = az.provider.status([path])[path]
    assert (st.state, st.exit_code, st.failure_class) == (
        JobStatus.FAILED, 2, FailureClass.USER_ERROR)
    assert st.message == "task 3 failed: exit code 2"


def test_tasks_map_from_the_service_s_own_spelling() -> None:
    """Timestamps with 7 fractional digits, camel-case categories, ISO 8601 durations,
    as in the REST reference's examples (the fake writes Python's own forms)."""
    task: dict[str, Any] = {
        "id": "task-3", "state": "completed",
        "constraints": {"maxWallClockTime": "PT1H", "maxTaskRetryCount": 0},
        "executionInfo": {"startTime": "2016-11-19T00:05:25.3309105Z",
                          "endTime": "2016-11-19T01:05:25.3309105Z", "exitCode": 137,
                          "retryCount": 0, "requeueCount": 1, "result": "failure",
                          "failureInfo": {"category": "userError", "code": "FailureExitCode",
                                          "message": "The task exited with exit code 137"}}}
    state = task_state(3, task, None)
    assert state is not None
    assert (state.status, state.failure_class, state.exit_code, state.attempt) == (
        TaskStatus.FAILED, FailureClass.TIMEOUT, 137, 1)
    assert state.started_at == datetime(2016, 11, 19, 0, 5, 25, 330910, tzinfo=UTC)
    task["executionInfo"]["failureInfo"]["category"] = "serverError"
    server = task_state(3, task, None)
    assert server is not None and server.failure_class is FailureClass.INFRASTRUCTURE


def test_a_task_in_a_state_we_do_not_know_makes_the_job_unknown(az: AzureHarness) -> None:
    task = _array(3, SLEEP_60)
    path = az.provider.submit(task)
    az.fake.set_task(task.provider_job_id, "reticulating", index=1)
    st = az.provider.status([path])[path]
    assert st.state is None and "reticulating" in st.message


def test_cancel_leaves_queued_tasks_active_on_azure_and_cancelled_in_jennah(
        az: AzureHarness) -> None:
    task = _array(4, SLEEP_60, parallelism=2)
    path = az.provider.submit(task)
    az.fake.advance(3)
    az.provider.cancel(path)
    job = az.fake.jobs[task.provider_job_id]
    assert [t.state for t in job.tasks.values()] == ["completed", "completed", "active", "active"]
    st = az.provider.status([path])[path]
    assert st.state is JobStatus.CANCELLED and st.tasks is not None
    assert [t.status for t in st.tasks] == [TaskStatus.CANCELLED] * 4
    assert all(t.completed_at is not None for t in st.tasks)


def test_paths_of_jobs_of_several_tasks(az: AzureHarness) -> None:
    base = f"{az.url}/jobs/j-never-0/tasks"
    for path in (f"{base}?taskCount=0", f"{base}?taskCount=x", f"{base}?count=3",
                 f"{base}/task-0?taskCount=3"):
        assert az.provider.status([path])[path].message == "not a task of this Batch account"
    unknown = f"{base}?taskCount=3"
    st = az.provider.status([unknown])[unknown]
    assert (st.state, st.message) == (None, "no such job or task")
    az.provider.cancel(unknown)
    task = _array(2, ECHO_TASK)
    path = az.provider.submit(task)
    az.fake.advance(3)
    assert az.provider.read_output(path, (0, 0), task_index=1).stdout == "task 1 of 2\n"
    for index in (2, -1):
        assert az.provider.read_output(path, (0, 0), task_index=index) == OutputChunk()
    plain = az.provider.submit(make_task(ECHO_TASK))
    az.fake.advance(3)
    assert az.provider.read_output(plain, (0, 0)).stdout == "task 0 of 1\n"
    assert az.provider.read_output(plain, (0, 0), task_index=1) == OutputChunk()


def test_a_job_of_10000_tasks_costs_100_adds_and_10_pages_a_poll(az: AzureHarness) -> None:
    task = _array(10_000, SLEEP_60)
    path = az.provider.submit(task)
    assert [len(c) for c in az.fake.collections] == [100] * 100
    az.fake.advance(2)
    az.fake.calls.clear()
    st = az.provider.status([path])[path]
    assert st.state is JobStatus.RUNNING and st.tasks is not None
    assert count(10_000, st.tasks).running == 10_000
    assert dict(az.fake.calls) == {"GET /jobs/{id}/tasks": 10}

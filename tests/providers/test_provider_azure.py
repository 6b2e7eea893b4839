"""Azure Batch provider against the HTTP fake of the Batch REST API
(``tests/fakes/azure_batch.py``), authenticated with a named key: the provider contract,
every row of the state mapping, every request field we promise, adoption, throttling and
cancel through the terminate operation."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
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
)
from jennah.settings import ProviderSettings
from providers import azure as azure_module
from providers.azure import (
    AZURE_TASK_STATES,
    CANCEL_REASON,
    AzureBatchProvider,
    AzureSettings,
    endpoint_region,
    task_id_for,
    translate,
)
from providers.base import OutputChunk, ProviderTask
from providers.base import provider_job_id as make_pid
from providers.retry import RetryPolicy
from tests.fakes import serve_http
from tests.fakes.azure_batch import ACCOUNT, POOL, FakeAzureBatch
from tests.helpers import free_port, owner
from tests.providers.provider_contract import EXIT_0, IMAGE, SLEEP_60, ProviderContract, make_task
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

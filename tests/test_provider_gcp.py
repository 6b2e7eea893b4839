"""GCP Batch provider against the wire-level gRPC fake (``tests/fakes/gcp_batch.py``):
the provider contract, every row of the state table and of the exit-code table, every
request field we promise, adoption, throttling, cancel through the long-running operation,
and list-based polling."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from google.cloud import batch_v1

from jennah.errors import ProviderRejected, ProviderUnavailable
from jennah.models import FailureClass, JobSpec, JobStatus, ResourceOverride
from providers.base import ProviderTask
from providers.base import provider_job_id as make_pid
from providers.gcp import GCP_EXIT_CODES, GCP_STATES, GcpBatchProvider, request_uuid
from providers.retry import RetryPolicy
from tests.fakes.gcp_batch import FakeGcpBatch, client_for, serve
from tests.provider_contract import EXIT_0, EXIT_3, SLEEP_60, ProviderContract, make_task

State = batch_v1.JobStatus.State


@dataclass
class Sleeps:
    """An injected sleep that records instead of waiting."""

    seen: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.seen.append(seconds)


@dataclass
class GcpHarness:
    provider: GcpBatchProvider
    fake: FakeGcpBatch
    sleeps: Sleeps
    address: str
    supports_long_running: bool = True

    @contextmanager
    def another_provider(self, **kwargs: Any) -> Iterator[GcpBatchProvider]:
        """A second provider on the same fake (another worker, or other settings)."""
        client, channel = client_for(self.address)
        provider = GcpBatchProvider(client, project=self.fake.project, region=self.fake.region,
                                    **kwargs)
        try:
            yield provider
        finally:
            provider.close()
            channel.close()

    def advance(self) -> None:
        self.fake.advance()

    def executions(self, provider_job_id: str) -> int:
        return self.fake.created[provider_job_id]

    def unknown_path(self) -> str:
        return f"{self.fake.parent}/jobs/j-never-submitted-0"


@pytest.fixture
def gcp() -> Iterator[GcpHarness]:
    fake = FakeGcpBatch()
    with serve(fake) as address:
        client, channel = client_for(address)
        sleeps = Sleeps()
        provider = GcpBatchProvider(
            client, project=fake.project, region=fake.region,
            retry=RetryPolicy(attempts=4, sleep=sleeps), lro_poll_seconds=0.001,
            call_timeout=5.0, cancel_timeout=5.0)
        yield GcpHarness(provider, fake, sleeps, address)
        provider.close()
        channel.close()


class TestGcpContract(ProviderContract):
    state_timeout = 5.0

    @pytest.fixture
    def harness(self, gcp: GcpHarness) -> GcpHarness:
        return gcp


# --- the mapping tables, row by row ------------------------------------------------------


def test_state_table_is_design_section_3() -> None:
    assert dict(GCP_STATES) == {
        "QUEUED": JobStatus.SCHEDULED,
        "SCHEDULED": JobStatus.SCHEDULED,
        "RUNNING": JobStatus.RUNNING,
        "SUCCEEDED": JobStatus.COMPLETED,
        "FAILED": JobStatus.FAILED,
        "CANCELLATION_IN_PROGRESS": JobStatus.CANCELLED,
        "CANCELLED": JobStatus.CANCELLED,
        "DELETION_IN_PROGRESS": JobStatus.CANCELLED,
    }


@pytest.mark.parametrize("raw", [*GCP_STATES, "STATE_UNSPECIFIED"])
def test_every_state_row_over_the_wire(gcp: GcpHarness, raw: str) -> None:
    path = gcp.provider.submit(make_task(SLEEP_60))
    exit_code = {"SUCCEEDED": 0, "FAILED": 7}.get(raw)
    gcp.fake.set_state(path, getattr(State, raw), exit_code=exit_code)
    st = gcp.provider.status([path])[path]
    assert st.raw_state == raw
    assert st.state is GCP_STATES.get(raw)
    if st.state is not None and st.state.terminal:
        assert st.completed_at is not None
    if raw == "FAILED":
        assert (st.exit_code, st.failure_class) == (7, FailureClass.USER_ERROR)


def test_exit_code_table_rows() -> None:
    assert dict(GCP_EXIT_CODES) == {
        50001: FailureClass.PREEMPTED, 50002: FailureClass.INFRASTRUCTURE,
        50003: FailureClass.INFRASTRUCTURE, 50004: FailureClass.INFRASTRUCTURE,
        50005: FailureClass.TIMEOUT, 50006: FailureClass.INFRASTRUCTURE,
    }


@pytest.mark.parametrize(("exit_code", "description", "expected"), [
    *[(code, "", fc) for code, fc in GCP_EXIT_CODES.items()],
    (50042, "", FailureClass.INFRASTRUCTURE),   # any other reserved 500xx
    (3, "", FailureClass.USER_ERROR),
    (137, "", FailureClass.USER_ERROR),
    (None, "Job failed: quota 'CPUS' exceeded in region", FailureClass.QUOTA),
    (None, "Job failed: VM could not be created", FailureClass.INFRASTRUCTURE),
])
def test_failure_classes_over_the_wire(
    gcp: GcpHarness, exit_code: int | None, description: str, expected: FailureClass
) -> None:
    path = gcp.provider.submit(make_task(SLEEP_60))
    gcp.fake.advance(2)
    gcp.fake.set_state(path, State.FAILED, exit_code=exit_code, description=description)
    st = gcp.provider.status([path])[path]
    assert (st.state, st.exit_code, st.failure_class) == (JobStatus.FAILED, exit_code, expected)
    assert expected.retryable is (expected in (FailureClass.PREEMPTED,
                                               FailureClass.INFRASTRUCTURE))


def test_exit_code_is_also_read_from_the_event_text(gcp: GcpHarness) -> None:
    path = gcp.provider.submit(make_task(SLEEP_60))
    gcp.fake.set_state(path, State.FAILED, description="Task state is updated from RUNNING "
                       "to FAILED on zones/x/instances/y with exit code 50001.")
    st = gcp.provider.status([path])[path]
    assert (st.exit_code, st.failure_class) == (50001, FailureClass.PREEMPTED)


# --- the create request ----------------------------------------------------------------------


def full_task() -> ProviderTask:
    job_id = str(uuid.uuid4())
    spec = JobSpec(
        image_uri="us-docker.pkg.dev/p/r/app:1.2", commands=("python", "-m", "app", "--x=1"),
        env_vars={"MODE": "fast", "TOKEN": "s3cret"}, name="nightly",
        labels={"team": "data", "env": "prod"}, resource_profile="large",
        resource_override=ResourceOverride(cpu_millis=6000, max_run_duration_seconds=3600),
        machine_type="n2-standard-8", boot_disk_size_gb=100, use_spot_vms=True,
        service_account="runner@p.iam.gserviceaccount.com", max_retries=2)
    return ProviderTask(make_pid(job_id, 1), job_id, "tenant-a", 1, spec)


def test_create_request_carries_every_promised_field(gcp: GcpHarness) -> None:
    task = full_task()
    path = gcp.provider.submit(task)
    [req] = gcp.fake.create_requests
    assert req.parent == "projects/proj-test/locations/us-central1"
    assert req.job_id == task.provider_job_id and path == f"{req.parent}/jobs/{req.job_id}"
    assert req.request_id == request_uuid(task.job_id, 1) == str(uuid.UUID(req.request_id))
    assert uuid.UUID(req.request_id).version == 5
    spec = req.job.task_groups[0].task_spec
    container = spec.runnables[0].container
    assert container.image_uri == "us-docker.pkg.dev/p/r/app:1.2"
    assert list(container.commands) == ["python", "-m", "app", "--x=1"]
    assert dict(spec.environment.variables) == {
        "MODE": "fast", "TOKEN": "s3cret", "JENNAH_JOB_ID": task.job_id, "JENNAH_ATTEMPT": "1",
        "JENNAH_TENANT_ID": "tenant-a", "JENNAH_PROVIDER_JOB_ID": task.provider_job_id}
    # large is 4000m/8192MiB; the override's CPU wins, the profile's memory stays.
    assert (spec.compute_resource.cpu_milli, spec.compute_resource.memory_mib) == (6000, 8192)
    assert spec.max_run_duration == timedelta(hours=1)
    assert spec.max_retry_count == 0
    policy = req.job.allocation_policy.instances[0].policy
    assert policy.machine_type == "n2-standard-8"
    assert policy.boot_disk.size_gb == 100
    assert policy.provisioning_model == batch_v1.AllocationPolicy.ProvisioningModel.SPOT
    assert req.job.allocation_policy.service_account.email == "runner@p.iam.gserviceaccount.com"
    assert dict(req.job.labels) == {"team": "data", "env": "prod",
                                    "jennah-job-id": task.job_id, "jennah-tenant-id": "tenant-a",
                                    "jennah-attempt": "1"}


def test_defaults_are_standard_vms_without_extras(gcp: GcpHarness) -> None:
    gcp.provider.submit(make_task(EXIT_0))
    [req] = gcp.fake.create_requests
    spec = req.job.task_groups[0].task_spec
    assert (spec.compute_resource.cpu_milli, spec.compute_resource.memory_mib) == (1000, 2048)
    assert "max_run_duration" not in spec
    policy = req.job.allocation_policy.instances[0].policy
    assert policy.provisioning_model == batch_v1.AllocationPolicy.ProvisioningModel.STANDARD
    assert (policy.machine_type, "boot_disk" in policy) == ("", False)
    assert "service_account" not in req.job.allocation_policy


def test_request_id_is_ours_per_attempt_never_the_tenants() -> None:
    job_id = str(uuid.uuid4())
    assert request_uuid(job_id, 0) == request_uuid(job_id, 0)
    assert request_uuid(job_id, 0) != request_uuid(job_id, 1)
    assert request_uuid(job_id, 0) != request_uuid(str(uuid.uuid4()), 0)


def test_the_fake_refuses_what_gcp_refuses_and_nothing_leaks(gcp: GcpHarness) -> None:
    bad = make_task(EXIT_0, labels={"Team": "Data"})  # GCP labels are lowercase
    with pytest.raises(ProviderRejected, match="label Team=Data"):
        gcp.provider.submit(bad)
    assert gcp.fake.created == {}
    upper = ProviderTask("J-UPPER-0", "x", "tenant-a", 0, bad.spec)
    with pytest.raises(ProviderRejected, match="not a valid GCP Batch job id"):
        gcp.provider.submit(upper)
    assert len(gcp.fake.create_requests) == 1  # refused before any call


def test_already_exists_is_adopted(gcp: GcpHarness) -> None:
    task = make_task(SLEEP_60)
    first = gcp.provider.submit(task)
    gcp.fake.advance(2)
    gcp.fake.forget_request_ids()
    gets = gcp.fake.calls["GetJob"]
    assert gcp.provider.submit(task) == first
    assert gcp.fake.calls["GetJob"] == gets + 1  # ALREADY_EXISTS, then the job was read
    assert gcp.fake.created[task.provider_job_id] == 1
    assert gcp.provider.status([first])[first].state is JobStatus.RUNNING


@pytest.mark.parametrize(("spec", "complaint"), [
    (JobSpec(image_uri="busybox", boot_disk_size_gb=5), "boot disk must be at least 10 GB"),
    (JobSpec(image_uri="busybox", service_account="nobody"), "is not an email"),
    (JobSpec(image_uri="busybox", labels={"ok": "Not OK"}), "breaks the label rules"),
])
def test_every_refusal_is_a_rejection(gcp: GcpHarness, spec: JobSpec, complaint: str) -> None:
    job_id = str(uuid.uuid4())
    with pytest.raises(ProviderRejected, match=complaint) as info:
        gcp.provider.submit(ProviderTask(make_pid(job_id, 0), job_id, "tenant-a", 0, spec))
    assert "InvalidArgument" in str(info.value) and not info.value.retryable
    assert gcp.sleeps.seen == []  # a rejection is never retried


def test_a_second_worker_adopts_the_existing_job(gcp: GcpHarness) -> None:
    task = make_task(EXIT_0)
    first = gcp.provider.submit(task)
    with gcp.another_provider() as other:
        assert other.submit(task) == first
    assert gcp.fake.created[task.provider_job_id] == 1
    assert [r.request_id for r in gcp.fake.create_requests] == [request_uuid(task.job_id, 0)] * 2


# --- throttling ------------------------------------------------------------------------------


def test_throttled_submit_and_status_are_retried_then_succeed(gcp: GcpHarness) -> None:
    gcp.fake.throttle(2, methods={"CreateJob"})
    path = gcp.provider.submit(make_task(EXIT_0))
    assert gcp.fake.calls["CreateJob"] == 3 and len(gcp.sleeps.seen) == 2
    gcp.fake.throttle(3, methods={"GetJob"})
    assert gcp.provider.status([path])[path].state is JobStatus.SCHEDULED
    assert gcp.fake.calls["GetJob"] == 4 and len(gcp.sleeps.seen) == 5
    # full jitter under the cap: every wait is within [0, base * 2**n)
    assert all(0 <= s < 0.2 * 2**n for n, s in enumerate([*gcp.sleeps.seen[:2]]))


def test_throttling_beyond_the_budget_surfaces_as_unavailable(gcp: GcpHarness) -> None:
    gcp.fake.throttle(4, methods={"CreateJob"})
    with pytest.raises(ProviderUnavailable) as info:
        gcp.provider.submit(make_task(EXIT_0))
    assert info.value.retryable and "ResourceExhausted" in str(info.value)
    assert gcp.fake.calls["CreateJob"] == 4 and gcp.fake.created == {}


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_waits_for_the_long_running_operation(gcp: GcpHarness) -> None:
    path = gcp.provider.submit(make_task(SLEEP_60))
    gcp.fake.advance(3)
    gcp.provider.cancel(path)
    # No advance: the provider itself polled the operation until it was done.
    assert gcp.fake.calls["GetOperation"] >= 1
    assert State(gcp.fake.jobs[path].status.state).name == "CANCELLED"


# --- status at scale -------------------------------------------------------------------------


def test_many_paths_are_polled_with_one_list_per_active_state(gcp: GcpHarness) -> None:
    p = gcp.provider
    running = [p.submit(make_task(SLEEP_60)) for _ in range(50)]
    gcp.fake.advance(2)
    queued = [p.submit(make_task(SLEEP_60)) for _ in range(10)]
    done = p.submit(make_task(EXIT_3))
    gcp.fake.advance(3)  # `done` fails; the rest: running (50) and scheduled/running (10)
    gets_before = gcp.fake.calls["GetJob"]
    result = p.status([*running, *queued, done, f"{gcp.fake.parent}/jobs/j-gone-0"])
    assert [r.filter for r in gcp.fake.list_requests] == [
        'status.state="RUNNING"', 'status.state="SCHEDULED"', 'status.state="QUEUED"']
    assert gcp.fake.calls["GetJob"] - gets_before == 2  # only the finished and the unknown
    assert all(result[x].state is JobStatus.RUNNING for x in running)
    assert (result[done].state, result[done].exit_code) == (JobStatus.FAILED, 3)
    assert result[f"{gcp.fake.parent}/jobs/j-gone-0"].state is None


def test_a_refused_filter_falls_back_to_one_get_per_job(gcp: GcpHarness) -> None:
    gcp.fake.accept_filters = False
    paths = [gcp.provider.submit(make_task(EXIT_0)) for _ in range(60)]
    for _ in range(2):
        result = gcp.provider.status(paths)
        assert {r.state for r in result.values()} == {JobStatus.SCHEDULED}
    assert gcp.fake.calls["ListJobs"] == 1  # tried once, then never again
    assert gcp.fake.calls["GetJob"] == 120


def test_malformed_paths_are_unknown_without_a_call(gcp: GcpHarness) -> None:
    result = gcp.provider.status(["arn:aws:batch:x", "projects/p/jobs/x"])
    assert {r.state for r in result.values()} == {None}
    assert gcp.fake.calls["GetJob"] == 0


def test_one_failing_path_is_unknown_and_all_failing_raises(gcp: GcpHarness) -> None:
    ok = gcp.provider.submit(make_task(EXIT_0))
    other = gcp.provider.submit(make_task(EXIT_0))
    with gcp.another_provider(retry=RetryPolicy(attempts=2, sleep=gcp.sleeps),
                              status_concurrency=1) as serial:
        gcp.fake.throttle(2, methods={"GetJob"})  # the first path exhausts its 2 attempts
        result = serial.status([ok, other])
        assert result[ok].state is None and "ResourceExhausted" in result[ok].message
        assert result[other].state is JobStatus.SCHEDULED
        gcp.fake.throttle(4, methods={"GetJob"})
        with pytest.raises(ProviderUnavailable):
            serial.status([ok, other])

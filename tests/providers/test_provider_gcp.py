"""GCP Batch provider against the wire-level gRPC fake (``tests/fakes/gcp_batch.py``) and
the REST fake of Cloud Logging (``tests/fakes/gcp_logging.py``): the provider contract,
every row of the state table and of the exit-code table, every request field we promise,
the documented limits (labels, accelerators, networks) refused at SubmitJob, adoption,
throttling, cancel through the long-running operation (in progress, failed), list-based
polling, the jobs' output read back from Cloud Logging, and jobs of several tasks (the
task group and its environments, per-task retries by exit code, the task listing's cost,
each task's output, through the worker's own poller too)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud import batch_v1

from database.memory import MemoryStore
from jennah.errors import InvalidArgument, ProviderRejected, ProviderUnavailable, SettingsError
from jennah.models import (
    EventKind,
    FailureClass,
    JobFilter,
    JobSpec,
    JobStatus,
    ResourceOverride,
    TaskState,
    TaskStatus,
)
from jennah.settings import ProviderSettings
from jennah.tasks import count
from providers import gcp as gcp_module
from providers.base import OutputChunk, ProviderStatus, ProviderTask, check_spec
from providers.base import provider_job_id as make_pid
from providers.gcp import (
    GCP_EXIT_CODES,
    GCP_MAX_TASK_ENVIRONMENTS,
    GCP_STATES,
    GCP_TASK_STATES,
    IN_PROGRESS_STATES,
    GcpBatchProvider,
    Network,
    build_job,
    request_uuid,
    task_container,
    task_state,
)
from providers.gcp_output import RestLogReader
from providers.retry import RetryPolicy
from tests.fakes import serve_http
from tests.fakes.gcp_batch import FakeGcpBatch, client_for, serve
from tests.fakes.gcp_logging import FakeCloudLogging
from tests.helpers import owner
from tests.providers.provider_contract import (
    ECHO_TASK,
    EXIT_0,
    EXIT_3,
    SLEEP_60,
    TASK_1_FAILS,
    ProviderContract,
    make_task,
)
from worker.jobs import JobService

State = batch_v1.JobStatus.State


@dataclass
class Sleeps:
    """An injected sleep that records instead of waiting."""

    seen: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.seen.append(seconds)


class Clock:
    """The one clock of a test: the provider's, both fakes', and a sleep that moves it."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def log_session() -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = "Bearer test-token"  # what AuthorizedSession adds
    return session


@dataclass
class GcpHarness:
    provider: GcpBatchProvider
    fake: FakeGcpBatch
    sleeps: Sleeps
    address: str
    logs: FakeCloudLogging
    logs_url: str
    clock: Clock
    supports_long_running: bool = True

    @contextmanager
    def another_provider(self, **kwargs: Any) -> Iterator[GcpBatchProvider]:
        """A second provider on the same fakes (another worker, or other settings)."""
        client, channel = client_for(self.address)
        kwargs.setdefault("logs", RestLogReader(log_session(), project=self.logs.project,
                                                endpoint=self.logs_url))
        kwargs.setdefault("clock", self.clock)
        kwargs.setdefault("sleep", self.clock.tick)
        provider = GcpBatchProvider(client, project=self.fake.project, region=self.fake.region,
                                    **kwargs)
        try:
            yield provider
        finally:
            provider.close()
            channel.close()

    def advance(self) -> None:
        self.fake.advance()
        self.clock.tick(1)

    def executions(self, provider_job_id: str) -> int:
        return self.fake.created[provider_job_id]

    def unknown_path(self) -> str:
        return f"{self.fake.parent}/jobs/j-never-submitted-0"


SETTLE = 30.0  # seconds: the tests' Cloud Logging safety margin


@pytest.fixture
def gcp() -> Iterator[GcpHarness]:
    clock = Clock()
    logs = FakeCloudLogging(clock=clock)
    fake = FakeGcpBatch(project=logs.project, clock=clock, logs=logs)
    with serve(fake) as address, serve_http(logs.handle) as logs_url:
        client, channel = client_for(address)
        sleeps = Sleeps()
        provider = GcpBatchProvider(
            client, project=fake.project, region=fake.region,
            retry=RetryPolicy(attempts=4, sleep=sleeps), lro_poll_seconds=0.001,
            call_timeout=5.0, cancel_timeout=5.0, clock=clock, sleep=clock.tick,
            logs=RestLogReader(log_session(), project=fake.project, endpoint=logs_url),
            log_settle_seconds=0)  # the output tests make their own, with a margin
        yield GcpHarness(provider, fake, sleeps, address, logs, logs_url, clock)
        provider.close()
        channel.close()


class TestGcpContract(ProviderContract):
    kind = "gcp"
    state_timeout = 5.0

    @pytest.fixture
    def harness(self, gcp: GcpHarness) -> GcpHarness:
        return gcp


class TestGcpContractOverTaskEnvironments(ProviderContract):
    """The contract again, its jobs of several tasks in the form of those over
    ``GCP_MAX_TASK_ENVIRONMENTS`` tasks (``task_count`` and the ``/bin/sh`` wrapper): the
    limit lowered to 1, the contract's small jobs stand in for them, cheaply."""

    kind = "gcp"
    state_timeout = 5.0

    @pytest.fixture
    def harness(self, gcp: GcpHarness, monkeypatch: pytest.MonkeyPatch) -> GcpHarness:
        monkeypatch.setattr(gcp_module, "GCP_MAX_TASK_ENVIRONMENTS", 1)
        return gcp

    def test_its_jobs_of_several_tasks_are_wrapped(self, harness: GcpHarness) -> None:
        harness.provider.submit(self.array_task(ECHO_TASK, 2))
        [group] = harness.fake.create_requests[0].job.task_groups
        container = group.task_spec.runnables[0].container
        assert (group.task_count, len(group.task_environments)) == (2, 0)
        assert (container.entrypoint, list(container.commands)) == (
            "/bin/sh", [*WRAPPER, *ECHO_TASK])


# --- the mapping tables, row by row ------------------------------------------------------


def test_state_table_is_design_section_3() -> None:
    assert dict(GCP_STATES) == {
        "QUEUED": JobStatus.SCHEDULED,
        "SCHEDULED": JobStatus.SCHEDULED,
        "RUNNING": JobStatus.RUNNING,
        "SUCCEEDED": JobStatus.COMPLETED,
        "FAILED": JobStatus.FAILED,
        "CANCELLED": JobStatus.CANCELLED,
    }
    # Every state of the installed SDK's enum is either mapped, in progress, or UNKNOWN.
    assert set(State.__members__) == {*GCP_STATES, *IN_PROGRESS_STATES, "STATE_UNSPECIFIED"}


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
        "JENNAH_TENANT_ID": "tenant-a", "JENNAH_PROVIDER_JOB_ID": task.provider_job_id,
        "JENNAH_TASK_INDEX": "0", "JENNAH_TASK_COUNT": "1"}
    group = req.job.task_groups[0]
    assert (group.task_count, len(group.task_environments), group.parallelism) == (1, 0, 0)
    # large is 4000m/8192MiB; the override's CPU wins, the profile's memory stays.
    assert (spec.compute_resource.cpu_milli, spec.compute_resource.memory_mib) == (6000, 8192)
    assert spec.max_run_duration == timedelta(hours=1)
    assert (spec.max_retry_count, len(spec.lifecycle_policies)) == (0, 0)  # Jennah retries
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


# --- documented limits, refused at SubmitJob (docs/providers.md, GCP Batch) ----------------

SPEC = JobSpec(image_uri="busybox", commands=("true",))


def test_declared_limits_are_batchs_minus_our_own_labels(gcp: GcpHarness) -> None:
    caps = gcp.provider.capabilities
    assert caps.max_labels == 60  # 63 custom labels per job, 3 of them jennah-*
    assert caps.reserved_label_prefixes == ("goog-", "google-")
    assert {"batch-job-id", "batch-job-uid", "batch-node", "jennah-job-id"} <= (
        caps.reserved_label_keys)
    assert (caps.machine_type, caps.spot, caps.accelerator_type, caps.accelerator_count) == (
        True, True, True, True)
    assert caps.supports_output


@pytest.mark.parametrize(("labels", "complaint"), [
    ({f"k{i}": "v" for i in range(61)}, "61 given; the gcp provider takes at most 60"),
    ({"goog-x": "1"}, "key 'goog-x' is reserved by the gcp provider"),
    ({"google-x": "1"}, "key 'google-x' is reserved by the gcp provider"),
    ({"batch-node": ""}, "key 'batch-node' is reserved by the gcp provider"),
    ({"jennah-job-id": "x"}, "key 'jennah-job-id' is reserved by the gcp provider"),
])
def test_what_batch_refuses_is_refused_at_submitjob_and_nothing_is_stored(
        gcp: GcpHarness, labels: dict[str, str], complaint: str) -> None:
    spec = dataclasses.replace(SPEC, labels=labels)
    store = MemoryStore()
    jobs = JobService(store, gcp.provider, worker_id="w1", lease_ttl=30)
    with pytest.raises(InvalidArgument, match=complaint):
        asyncio.run(jobs.submit("acme", spec, "r1"))
    assert store.list_jobs("acme", JobFilter(), 10, "").jobs == []
    assert gcp.fake.create_requests == []


@pytest.mark.parametrize("labels", [
    {f"k{i}": "v" for i in range(64)},  # 64 + our 3: over Batch's 63
    {"goog-x": "1"}, {"google-x": "1"}, {"batch-job-id": "mine"},
])
def test_the_fake_refuses_what_batch_documents(gcp: GcpHarness, labels: dict[str, str]
                                               ) -> None:
    # Straight to the service, past check_spec: the fake is the documentation's referee.
    with pytest.raises(ProviderRejected, match=r"reserved|custom labels"):
        gcp.provider.submit(make_task(EXIT_0, labels=labels))
    assert gcp.fake.created == {}


def test_sixty_labels_are_accepted_end_to_end(gcp: GcpHarness) -> None:
    spec = dataclasses.replace(SPEC, labels={f"k{i}": "v" for i in range(60)})
    check_spec("gcp", gcp.provider.capabilities, spec)
    gcp.provider.submit(make_task(EXIT_0, labels=spec.labels))
    assert len(gcp.fake.create_requests[0].job.labels) == 63


def test_gpus_are_asked_for_with_their_drivers(gcp: GcpHarness) -> None:
    task = make_task(EXIT_0)
    spec = dataclasses.replace(task.spec, accelerator_type="nvidia-tesla-t4",
                               accelerator_count=2, machine_type="n1-standard-8")
    check_spec("gcp", gcp.provider.capabilities, spec)
    gcp.provider.submit(dataclasses.replace(task, spec=spec))
    [req] = gcp.fake.create_requests
    instances = req.job.allocation_policy.instances[0]
    [acc] = instances.policy.accelerators
    assert (acc.type_, acc.count, instances.install_gpu_drivers) == ("nvidia-tesla-t4", 2, True)
    assert instances.policy.machine_type == "n1-standard-8"


def test_a_gpu_count_without_a_type_is_refused(gcp: GcpHarness) -> None:
    spec = dataclasses.replace(SPEC, accelerator_count=1)
    with pytest.raises(InvalidArgument, match=r"accelerator\.type"):
        check_spec("gcp", gcp.provider.capabilities, spec)
    task = make_task(EXIT_0)
    with pytest.raises(ProviderRejected, match=r"accelerator\.type"):
        gcp.provider.submit(dataclasses.replace(task, spec=spec))
    assert gcp.fake.create_requests == []  # refused before any call
    # and the service itself refuses an accelerator without a type
    req = batch_v1.CreateJobRequest(parent=gcp.fake.parent, job_id="j-x-0",
                                    request_id=str(uuid.uuid4()))
    req.job = build_job(make_task(EXIT_0))
    req.job.allocation_policy.instances[0].policy.accelerators = [
        batch_v1.AllocationPolicy.Accelerator(count=1)]
    with pytest.raises(gexc.InvalidArgument, match="accelerator needs a type"):
        gcp.provider.client.create_job(request=req, retry=None)


def test_network_settings_reach_the_allocation_policy(gcp: GcpHarness) -> None:
    net = Network(network="projects/p/global/networks/vpc",
                  subnetwork="projects/p/regions/us-central1/subnetworks/jobs",
                  no_external_ip=True)
    with gcp.another_provider(network=net) as p:
        p.submit(make_task(EXIT_0))
    [nic] = gcp.fake.create_requests[0].job.allocation_policy.network.network_interfaces
    assert (nic.network, nic.subnetwork, nic.no_external_ip_address) == (
        net.network, net.subnetwork, True)
    gcp.provider.submit(make_task(EXIT_0))  # no settings: the default network, untouched
    assert "network" not in gcp.fake.create_requests[1].job.allocation_policy
    with gcp.another_provider(network=Network(subnetwork="jobs")) as bad, pytest.raises(
            ProviderRejected, match="not a subnetwork URL"):
        bad.submit(make_task(EXIT_0))


def test_no_external_ip_needs_a_network_setting() -> None:
    settings = ProviderSettings(kind="gcp", env={
        "BATCH_REGION": "us-central1", "BATCH_PROJECT_ID": "p", "GCP_NO_EXTERNAL_IP": "1"})
    with pytest.raises(SettingsError, match="GCP_NO_EXTERNAL_IP needs GCP_SUBNETWORK"):
        GcpBatchProvider.from_settings(settings)


# --- cancel: not over until GCP says so --------------------------------------------------------


@pytest.mark.parametrize(("started", "expected"), [(True, JobStatus.RUNNING),
                                                   (False, JobStatus.SCHEDULED)])
@pytest.mark.parametrize("raw", list(IN_PROGRESS_STATES))
def test_in_progress_states_are_not_terminal(gcp: GcpHarness, raw: str, started: bool,
                                             expected: JobStatus) -> None:
    path = gcp.provider.submit(make_task(SLEEP_60))
    if started:
        gcp.fake.advance(2)
    gcp.fake.set_state(path, getattr(State, raw))
    st = gcp.provider.status([path])[path]
    assert (st.state, st.raw_state, st.completed_at) == (expected, raw, None)
    assert "not yet confirmed by GCP" in st.message


def test_cancel_goes_through_cancellation_in_progress(gcp: GcpHarness) -> None:
    gcp.fake.cancel_polls = 10**6  # GCP takes its time
    path = gcp.provider.submit(make_task(SLEEP_60))
    gcp.fake.advance(2)
    with gcp.another_provider(cancel_timeout=0.05, lro_poll_seconds=0.001,
                              retry=RetryPolicy(attempts=1)) as impatient, pytest.raises(
            ProviderUnavailable):
        impatient.cancel(path)
    st = gcp.provider.status([path])[path]
    assert (st.state, st.raw_state) == (JobStatus.RUNNING, "CANCELLATION_IN_PROGRESS")
    # asked again while GCP is still at it: refused, and not taken for done
    with pytest.raises(ProviderUnavailable, match="cancellation in progress"):
        gcp.provider.cancel(path)
    gcp.fake.cancel_polls = 1
    gcp.fake.advance()  # GCP finishes
    gcp.provider.cancel(path)  # asked again: now confirmed
    assert gcp.provider.status([path])[path].state is JobStatus.CANCELLED


@pytest.mark.parametrize("code", ["INTERNAL", "FAILED_PRECONDITION"])
def test_a_cancel_gcp_fails_is_not_taken_for_done(gcp: GcpHarness, code: str) -> None:
    path = gcp.provider.submit(make_task(SLEEP_60))
    gcp.fake.advance(2)
    gcp.fake.fail_cancels(10, code=getattr(grpc.StatusCode, code))
    with pytest.raises(ProviderUnavailable, match="cancel"):
        gcp.provider.cancel(path)
    assert gcp.provider.status([path])[path].state is JobStatus.RUNNING
    gcp.fake.fail_cancels(-10 + 1, code=getattr(grpc.StatusCode, code))  # one more failure
    gcp.provider.cancel(path)  # retried within the call, then confirmed
    assert State(gcp.fake.jobs[path].status.state).name == "CANCELLED"


# --- output, from Cloud Logging -------------------------------------------------------------


@contextmanager
def output_provider(gcp: GcpHarness, **kwargs: Any) -> Iterator[GcpBatchProvider]:
    kwargs.setdefault("log_settle_seconds", SETTLE)
    kwargs.setdefault("retry", RetryPolicy(attempts=1))
    with gcp.another_provider(**kwargs) as p:
        yield p


def running_job(gcp: GcpHarness) -> tuple[str, str]:
    path = gcp.provider.submit(make_task(SLEEP_60))
    gcp.fake.advance(2)
    return path, str(gcp.fake.jobs[path].uid)


def drain(p: GcpBatchProvider, path: str, offsets: tuple[int, int]
          ) -> tuple[list[OutputChunk], tuple[int, int]]:
    chunks = []
    while True:
        chunk = p.read_output(path, offsets)
        if chunk.offsets == offsets:
            return chunks, offsets
        chunks.append(chunk)
        offsets = chunk.offsets


def test_output_in_order_exactly_once_across_polls_and_a_new_worker(gcp: GcpHarness) -> None:
    path, uid = running_job(gcp)
    for i in range(3):
        gcp.logs.write(uid, f"out {i}")
    gcp.logs.write(uid, "err 0", stream="stderr")
    with output_provider(gcp) as p:
        assert p.read_output(path, (0, 0)).offsets == (0, 0)  # younger than the margin
        gcp.clock.tick(SETTLE + 1)
        first = p.read_output(path, (0, 0))
        assert (first.stdout, first.stderr, first.offsets) == ("out 0\nout 1\nout 2\n",
                                                               "err 0\n", (3, 1))
        for i in range(3, 5):
            gcp.logs.write(uid, f"out {i}")
        gcp.clock.tick(SETTLE + 1)
        second = p.read_output(path, first.offsets)
        assert (second.stdout, second.stderr, second.offsets) == ("out 3\nout 4\n", "", (5, 1))
        assert p.read_output(path, second.offsets).offsets == (5, 1)  # nothing new
    gcp.logs.write(uid, "out 5")
    gcp.logs.write(uid, "err 1", stream="stderr")
    gcp.clock.tick(SETTLE + 1)
    with output_provider(gcp) as newcomer:  # a new worker, from the stored offsets
        chunk = newcomer.read_output(path, (5, 1))
        assert (chunk.stdout, chunk.stderr, chunk.offsets) == ("out 5\n", "err 1\n", (6, 2))
        # the same offsets give the same text, on any worker (the WAL dedups on them)
        gcp.clock.tick(2)  # the job's next turn to read
        assert newcomer.read_output(path, (5, 1)) == chunk


def test_a_late_entry_within_the_margin_keeps_its_place(gcp: GcpHarness) -> None:
    path, uid = running_job(gcp)
    t0 = gcp.clock()
    gcp.logs.write(uid, "early", at=t0, delay=20)  # ingested 20 s late
    gcp.logs.write(uid, "later", at=t0 + timedelta(seconds=1))
    gcp.clock.tick(5)
    with output_provider(gcp) as p:
        assert p.read_output(path, (0, 0)).stdout == ""  # "later" is within the margin
        gcp.clock.tick(SETTLE)
        assert p.read_output(path, (0, 0)).stdout == "early\nlater\n"


def test_a_finished_job_ends_only_after_its_last_output(gcp: GcpHarness) -> None:
    path, uid = running_job(gcp)
    with output_provider(gcp) as p:
        assert p.status([path])[path].state is JobStatus.RUNNING
        gcp.logs.write(uid, "last words", delay=10)
        gcp.fake.set_state(path, State.SUCCEEDED, exit_code=0)
        st = p.status([path])[path]
        assert (st.state, st.raw_state) == (JobStatus.RUNNING, "SUCCEEDED")  # held back
        assert "Cloud Logging" in st.message
        gcp.clock.tick(SETTLE)
        st = p.status([path])[path]
        assert (st.state, st.exit_code) == (JobStatus.COMPLETED, 0)
        chunks, end = drain(p, path, (0, 0))  # the poller's final read
        assert "".join(c.stdout for c in chunks) == "last words\n" and end == (1, 0)
        calls = gcp.logs.calls["POST /v2/entries:list"]
        gcp.logs.write(uid, "after the end?")  # the end was read: never listed again
        assert p.read_output(path, end).offsets == end
        assert gcp.logs.calls["POST /v2/entries:list"] == calls


def test_reads_are_capped_per_call_and_resume(gcp: GcpHarness) -> None:
    path, uid = running_job(gcp)
    for i in range(25):
        gcp.logs.write(uid, f"line {i:02d}")
        gcp.clock.tick(0.1)
    gcp.fake.set_state(path, State.SUCCEEDED, exit_code=0)
    gcp.clock.tick(SETTLE + 1)
    with output_provider(gcp) as p:
        p._output.page_size = 10  # type: ignore[union-attr]
        before = gcp.logs.calls["POST /v2/entries:list"]
        chunks, end = drain(p, path, (0, 0))
        # a page of 10 each; from the second on, its first entry is the last one returned
        # (``timestamp >=`` the position), skipped
        assert [len(c.stdout.splitlines()) for c in chunks] == [10, 9, 6]
        assert "".join(c.stdout for c in chunks) == "".join(f"line {i:02d}\n" for i in range(25))
        assert end == (25, 0)
        # one page per call, each from where the last stopped (timestamp >= …); the third
        # reached the end of the listing, so the last read costs no call
        assert gcp.logs.calls["POST /v2/entries:list"] - before == 3
        assert 'timestamp>="' in gcp.logs.requests[-1]["filter"]


def test_reads_stay_within_the_logging_read_quota(gcp: GcpHarness) -> None:
    jobs = [running_job(gcp) for _ in range(80)]
    for _, uid in jobs:
        gcp.logs.write(uid, "hello")
    gcp.clock.tick(SETTLE + 1)
    with output_provider(gcp, log_reads_per_minute=50) as p:
        got: dict[str, str] = {}
        offsets = {path: (0, 0) for path, _ in jobs}
        for _cycle in range(36):  # 6 minutes of 10-second poll cycles
            for path, _ in jobs:
                chunk = p.read_output(path, offsets[path])  # a 429 would raise here
                got[path] = got.get(path, "") + chunk.stdout
                offsets[path] = chunk.offsets
            gcp.clock.tick(10)
        assert sorted(got.values()) == ["hello\n"] * len(jobs)  # every job had turns
        assert gcp.logs.throttled == 0  # and Cloud Logging never said 429


# --- jobs of several tasks (docs/design.md §16) -----------------------------------------


def array_task(commands: Sequence[str], task_count: int, **spec: Any) -> ProviderTask:
    task = make_task(commands)
    return dataclasses.replace(task, spec=dataclasses.replace(task.spec, task_count=task_count,
                                                              **spec))


def statuses(st: ProviderStatus) -> dict[int, TaskStatus]:
    assert st.tasks is not None
    return {t.index: t.status for t in st.tasks}


def test_task_state_table_covers_every_batch_task_state() -> None:
    assert dict(GCP_TASK_STATES) == {
        "STATE_UNSPECIFIED": TaskStatus.PENDING, "PENDING": TaskStatus.PENDING,
        "ASSIGNED": TaskStatus.PENDING, "RUNNING": TaskStatus.RUNNING,
        "SUCCEEDED": TaskStatus.SUCCEEDED, "FAILED": TaskStatus.FAILED,
        "UNEXECUTED": TaskStatus.CANCELLED,
    }
    assert set(batch_v1.TaskStatus.State.__members__) == set(GCP_TASK_STATES)


def test_a_task_is_read_from_its_status_events() -> None:
    t = [datetime(2026, 11, 23, 12, i, tzinfo=UTC) for i in range(6)]
    S = batch_v1.TaskStatus.State

    def event(at: datetime, state: int | None, text: str = "", code: int = 0
              ) -> batch_v1.StatusEvent:
        ev = batch_v1.StatusEvent(event_time=at, description=text)
        if state is not None:
            ev.task_state = state
        if code:
            ev.task_execution = batch_v1.TaskExecution(exit_code=code)
        return ev

    last = "Task state is updated from RUNNING to FAILED on zones/z/instances/1 with exit code 137."
    task = batch_v1.Task(name="projects/p/locations/r/jobs/j/taskGroups/group0/tasks/7",
                         status=batch_v1.TaskStatus(state=S.FAILED, status_events=[
                             event(t[0], S.ASSIGNED), event(t[1], S.RUNNING),
                             event(t[2], S.FAILED, "preempted", 50001), event(t[2], S.PENDING),
                             event(t[3], S.RUNNING), event(t[5], None, last)]))
    # retried once after the preemption, then failed for good: the event text says how
    assert task_state(task) == TaskState(7, TaskStatus.FAILED, 137, 1, t[1], t[5], last,
                                         FailureClass.USER_ERROR)
    task.status.status_events = task.status.status_events[:5]
    task.status.state = S.RUNNING
    assert task_state(task) == TaskState(7, TaskStatus.RUNNING, None, 1, t[1])


def test_an_array_is_one_task_group_with_an_environment_per_task(gcp: GcpHarness) -> None:
    task = array_task(ECHO_TASK, 4, parallelism=2, max_retries=3, env_vars={"MODE": "x"})
    path = gcp.provider.submit(task)
    [req] = gcp.fake.create_requests
    [group] = req.job.task_groups
    assert group.task_count == 0  # unset: Batch counts the task environments
    assert [dict(e.variables) for e in group.task_environments] == [
        {"JENNAH_TASK_INDEX": str(i)} for i in range(4)]
    env = dict(group.task_spec.environment.variables)
    assert (env["JENNAH_TASK_COUNT"], env["MODE"], "JENNAH_TASK_INDEX" in env) == ("4", "x", False)
    assert group.parallelism == 2
    assert group.task_spec.max_retry_count == 3
    [policy] = group.task_spec.lifecycle_policies
    assert policy.action == batch_v1.LifecyclePolicy.Action.RETRY_TASK
    # preempted and infrastructure codes; not 50005 (a timeout), nor the task's own codes
    assert list(policy.action_condition.exit_codes) == [50000, 50001, 50002, 50003, 50004, 50006]
    # what each task's container sees, in the service
    assert [(t.env["JENNAH_TASK_INDEX"], t.env["JENNAH_TASK_COUNT"], t.env["BATCH_TASK_INDEX"])
            for t in gcp.fake.tasks[path]] == [(str(i), "4", str(i)) for i in range(4)]


def test_a_10000_task_job_is_one_request_within_batchs_limits(gcp: GcpHarness) -> None:
    task = array_task(EXIT_0, 10_000, parallelism=8_000, max_retries=15)
    check_spec("gcp", gcp.provider.capabilities, task.spec)
    started = time.perf_counter()
    build_job(task)
    assert time.perf_counter() - started < 0.5
    gcp.provider.submit(task)  # the fake refuses a definition over 1 MB, or 5,001 in parallel
    [req] = gcp.fake.create_requests
    group = req.job.task_groups[0]
    assert (group.task_count, len(group.task_environments)) == (10_000, 0)
    assert group.parallelism == 5_000  # Batch's most; "at most 8,000 at a time" still holds
    assert group.task_spec.max_retry_count == 10  # Batch's most
    assert gcp.fake.created[task.provider_job_id] == 1


# Written out, not imported: the script is a promise to the tenant (docs/providers.md).
WRAPPER = ["-c", 'export JENNAH_TASK_INDEX="${BATCH_TASK_INDEX:-0}"; exec "$@"', "jennah-task"]


@pytest.mark.parametrize("n", [2, 200])
@pytest.mark.parametrize("commands", [ECHO_TASK, ()])
def test_up_to_200_tasks_get_their_index_from_task_environments_unwrapped(
        gcp: GcpHarness, n: int, commands: Sequence[str]) -> None:
    assert GCP_MAX_TASK_ENVIRONMENTS == 200
    task = array_task(commands, n)
    check_spec("gcp", gcp.provider.capabilities, task.spec)  # no commands is fine up to 200
    path = gcp.provider.submit(task)
    [group] = gcp.fake.create_requests[0].job.task_groups
    assert group.task_count == 0
    assert [dict(e.variables) for e in group.task_environments] == [
        {"JENNAH_TASK_INDEX": str(i)} for i in range(n)]
    container = group.task_spec.runnables[0].container
    assert (container.entrypoint, list(container.commands)) == ("", list(commands))
    env = dict(group.task_spec.environment.variables)
    assert (env["JENNAH_TASK_COUNT"], "JENNAH_TASK_INDEX" in env) == (str(n), False)
    assert [t.env["JENNAH_TASK_INDEX"] for t in gcp.fake.tasks[path]] == [
        str(i) for i in range(n)]


@pytest.mark.parametrize("n", [201, 10_000])
def test_over_200_tasks_are_counted_and_run_through_the_index_wrapper(gcp: GcpHarness, n: int
                                                                      ) -> None:
    task = array_task(ECHO_TASK, n, env_vars={"MODE": "x"})
    path = gcp.provider.submit(task)
    [group] = gcp.fake.create_requests[0].job.task_groups
    assert (group.task_count, len(group.task_environments)) == (n, 0)
    container = group.task_spec.runnables[0].container
    assert container.entrypoint == "/bin/sh"
    assert list(container.commands) == [*WRAPPER, *ECHO_TASK]
    env = dict(group.task_spec.environment.variables)
    assert (env["JENNAH_TASK_COUNT"], env["MODE"], "JENNAH_TASK_INDEX" in env) == (
        str(n), "x", False)
    # the containers see only Batch's own index: the wrapper makes it JENNAH_TASK_INDEX
    last = gcp.fake.tasks[path][-1]
    assert (last.env["BATCH_TASK_INDEX"], "JENNAH_TASK_INDEX" in last.env) == (str(n - 1), False)


def test_over_200_tasks_each_task_runs_as_its_index(gcp: GcpHarness) -> None:
    path = gcp.provider.submit(array_task(TASK_1_FAILS, 201))
    for _ in range(6):
        gcp.fake.advance()
        gcp.clock.tick(60)
    st = gcp.provider.status([path])[path]
    assert st.state is JobStatus.FAILED, st
    assert st.message.startswith("task 1 failed: exit code 4"), st.message
    n = count(201, st.tasks or ())
    assert (n.failed, n.succeeded) == (1, 200)


# Arguments that a shell would change if it split, expanded or re-quoted them.
AWKWARD = ("two words", 'a "quoted" one', "it's", "$HOME ${BATCH_TASK_INDEX} `id`", "*", "",
           "back\\slash", "new\nline", "-c", "--", "exec")
# Prints its pid, the index it sees and its arguments, and exits with $EXIT.
SHOW = (sys.executable, "-c",
        "import json, os, sys; print(json.dumps([os.getpid(), os.environ.get("
        "'JENNAH_TASK_INDEX'), sys.argv[1:]])); sys.exit(int(os.environ.get('EXIT', 0)))")


@pytest.mark.parametrize(("env", "index"), [
    ({"BATCH_TASK_INDEX": "7"}, "7"), ({"BATCH_TASK_INDEX": "200"}, "200"),
    ({"BATCH_TASK_INDEX": "7", "JENNAH_TASK_INDEX": "3"}, "7"),
    ({}, "0"), ({"BATCH_TASK_INDEX": ""}, "0"), ({"BATCH_TASK_INDEX": "4", "EXIT": "5"}, "4"),
])
def test_the_wrapper_works_in_a_real_shell(env: dict[str, str], index: str) -> None:
    container = task_container(dataclasses.replace(SPEC, commands=(*SHOW, *AWKWARD),
                                                   task_count=201))
    argv = [container.entrypoint, *container.commands]
    proc = subprocess.Popen(argv, env={"PATH": os.environ["PATH"], **env},
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    pid, seen, args = json.loads(out)
    assert (seen, args) == (index, list(AWKWARD))
    assert pid == proc.pid  # exec: the command took the shell's place (signals reach it)
    assert proc.returncode == int(env.get("EXIT", 0))  # and its exit code is the job's


def test_over_200_tasks_without_commands_are_refused_at_submitjob(gcp: GcpHarness) -> None:
    spec = JobSpec(image_uri="busybox", task_count=201)
    store = MemoryStore()
    jobs = JobService(store, gcp.provider, worker_id="w1", lease_ttl=30)
    with pytest.raises(InvalidArgument, match=r"^commands: the gcp provider needs them for a "
                       r"job of more than 200 tasks .*JENNAH_TASK_INDEX.*CMD"):
        asyncio.run(jobs.submit("acme", spec, "r1"))
    assert store.list_jobs("acme", JobFilter(), 10, "").jobs == []
    check_spec("gcp", gcp.provider.capabilities, dataclasses.replace(spec, commands=("true",)))
    # a job stored before (or submitted past SubmitJob) is refused before any call
    task = array_task((), 201)
    with pytest.raises(ProviderRejected, match="more than 200 tasks needs them"):
        gcp.provider.submit(task)
    assert gcp.fake.create_requests == []


def test_the_fake_takes_200_task_environments_and_no_more(gcp: GcpHarness) -> None:
    def create(job: batch_v1.Job) -> None:
        req = batch_v1.CreateJobRequest(parent=gcp.fake.parent, job_id=f"j-{uuid.uuid4()}-0",
                                        request_id=str(uuid.uuid4()), job=job)
        gcp.provider.client.create_job(request=req, retry=None)

    job = build_job(array_task(EXIT_0, 200))
    create(job)
    job.task_groups[0].task_environments.append(
        batch_v1.Environment(variables={"JENNAH_TASK_INDEX": "200"}))
    with pytest.raises(gexc.InvalidArgument, match="task_environments: 201 entries, at most 200"):
        create(job)


def test_the_fake_runs_an_unwrapped_task_without_its_index(gcp: GcpHarness) -> None:
    # A provider that set task_count but forgot the wrapper: no task learns its index, so
    # task 1 does not fail, and the job completes where it should have failed.
    job = build_job(array_task(TASK_1_FAILS, 201))
    container = job.task_groups[0].task_spec.runnables[0].container
    container.entrypoint, container.commands = "", list(TASK_1_FAILS)
    req = batch_v1.CreateJobRequest(parent=gcp.fake.parent, job_id="j-unwrapped-0",
                                    request_id=str(uuid.uuid4()), job=job)
    path = gcp.provider.client.create_job(request=req, retry=None).name
    gcp.fake.advance(6)
    assert gcp.fake.jobs[path].status.state == State.SUCCEEDED


def test_more_tasks_than_declared_are_refused_at_submitjob(gcp: GcpHarness) -> None:
    caps = gcp.provider.capabilities
    assert (caps.max_task_count, caps.parallelism, caps.tasks_per_call) == (10_000, True, None)
    check_spec("gcp", caps, dataclasses.replace(SPEC, task_count=10_000, parallelism=9_000))
    with pytest.raises(InvalidArgument, match="10001 given; the gcp provider takes at most 10000"):
        check_spec("gcp", caps, dataclasses.replace(SPEC, task_count=10_001))


@pytest.mark.parametrize(("field_", "value", "complaint"), [
    ("task_count", 100_001, "at most 100000 tasks per task group"),
    ("parallelism", 5_001, "parallelism 5001: at most 5000"),
    ("max_retry_count", 11, r"max_retry_count 11 is not in \[0, 10\]"),
])
def test_the_fake_refuses_what_batch_limits(gcp: GcpHarness, field_: str, value: int,
                                            complaint: str) -> None:
    req = batch_v1.CreateJobRequest(parent=gcp.fake.parent, job_id="j-x-0",
                                    request_id=str(uuid.uuid4()), job=build_job(make_task(EXIT_0)))
    group = req.job.task_groups[0]
    setattr(group.task_spec if field_ == "max_retry_count" else group, field_, value)
    with pytest.raises(gexc.InvalidArgument, match=complaint):
        gcp.provider.client.create_job(request=req, retry=None)


def test_tasks_are_retried_on_infrastructure_codes_only(gcp: GcpHarness) -> None:
    path = gcp.provider.submit(array_task(SLEEP_60, 3, max_retries=2))
    gcp.fake.advance(2)  # the job runs, its three tasks started
    gcp.fake.end_task(path, 0, 50001)  # preempted: retried, and running again
    gcp.fake.end_task(path, 1, 3)  # the task's own failure: not retried
    gcp.fake.end_task(path, 2, 50005)  # its max run duration: a timeout, not retried
    gcp.clock.tick(60)
    st = gcp.provider.status([path])[path]
    assert st.tasks is not None
    by = {t.index: t for t in st.tasks}
    assert (by[0].status, by[0].attempt, by[0].exit_code) == (TaskStatus.RUNNING, 1, None)
    assert (by[1].status, by[1].exit_code, by[1].attempt, by[1].failure_class) == (
        TaskStatus.FAILED, 3, 0, FailureClass.USER_ERROR)
    assert (by[2].status, by[2].exit_code, by[2].failure_class) == (
        TaskStatus.FAILED, 50005, FailureClass.TIMEOUT)
    assert st.state is JobStatus.RUNNING  # a task still runs
    gcp.fake.end_task(path, 0, 50002)  # retried a second time
    gcp.fake.end_task(path, 0, 50001)  # no retry left: failed for good
    gcp.clock.tick(60)
    st = gcp.provider.status([path])[path]
    assert st.tasks is not None
    zero = st.tasks[0]
    assert (zero.status, zero.exit_code, zero.attempt, zero.failure_class) == (
        TaskStatus.FAILED, 50001, 2, FailureClass.PREEMPTED)
    assert (st.state, st.exit_code, st.failure_class) == (
        JobStatus.FAILED, 3, FailureClass.USER_ERROR)
    assert st.message.startswith("task 1 failed: exit code 3"), st.message


def test_a_cancelled_array_is_cancelled_even_with_a_failed_task(gcp: GcpHarness) -> None:
    path = gcp.provider.submit(array_task(SLEEP_60, 3))
    gcp.fake.advance(2)
    gcp.fake.end_task(path, 1, 3)
    gcp.provider.cancel(path)
    st = gcp.provider.status([path])[path]
    assert (st.state, st.exit_code, st.failure_class) == (JobStatus.CANCELLED, None, None)
    assert statuses(st) == {0: TaskStatus.CANCELLED, 1: TaskStatus.FAILED,
                            2: TaskStatus.CANCELLED}


def test_an_array_that_fails_before_any_task_has_the_jobs_reason(gcp: GcpHarness) -> None:
    path = gcp.provider.submit(array_task(EXIT_0, 3))
    gcp.fake.advance()  # scheduled: no task started
    gcp.fake.set_state(path, State.FAILED, description="Job failed: quota 'CPUS' exceeded")
    st = gcp.provider.status([path])[path]
    assert (st.state, st.failure_class, st.exit_code) == (JobStatus.FAILED, FailureClass.QUOTA,
                                                          None)
    assert "quota" in st.message
    assert statuses(st) == dict.fromkeys(range(3), TaskStatus.CANCELLED)


def test_tasks_are_listed_only_when_counts_change_and_at_a_bounded_pace(gcp: GcpHarness
                                                                        ) -> None:
    with gcp.another_provider(task_page_size=100, task_page_seconds=2.0,
                              log_settle_seconds=0) as p:
        path = p.submit(array_task(EXIT_0, 300, parallelism=100))
        gcp.fake.advance(2)  # running: tasks 0-99 started

        def poll() -> tuple[ProviderStatus, list[str]]:
            before = len(gcp.fake.list_task_requests)
            st = p.status([path])[path]
            assert st.tasks is not None
            return st, [r.filter for r in gcp.fake.list_task_requests[before:]]

        st, listed = poll()
        assert listed == ["State=RUNNING"] and count(300, st.tasks or ()).running == 100
        assert poll()[1] == []  # nothing changed: nothing listed
        gcp.fake.advance()  # 0-99 succeed, 100-199 start
        gcp.clock.tick(10)
        st, listed = poll()
        assert listed == ["State=RUNNING", "State=SUCCEEDED"]
        n = count(300, st.tasks or ())
        assert (n.succeeded, n.running, n.pending) == (100, 100, 100)
        gcp.fake.advance()  # 100-199 succeed, 200-299 start
        assert poll()[1] == []  # changed, but the last refresh took 2 pages: not for 4 s
        gcp.clock.tick(5)
        assert poll()[1] == ["State=RUNNING", "State=SUCCEEDED", "State=SUCCEEDED"]
        gcp.fake.advance()  # every task done: the job ended, listed at once whatever the pace
        st, listed = poll()
        assert listed == ["State=RUNNING"] + ["State=SUCCEEDED"] * 3
        assert (st.state, count(300, st.tasks or ()).succeeded) == (JobStatus.COMPLETED, 300)
        assert poll()[1] == []


def test_a_refused_task_filter_falls_back_to_listing_every_task(gcp: GcpHarness) -> None:
    gcp.fake.accept_task_filters = False
    path = gcp.provider.submit(array_task(TASK_1_FAILS, 3))
    for _ in range(4):
        gcp.fake.advance()
        gcp.clock.tick(60)
        st = gcp.provider.status([path])[path]
    assert st.state is JobStatus.FAILED
    assert statuses(st) == {0: TaskStatus.SUCCEEDED, 1: TaskStatus.FAILED,
                            2: TaskStatus.SUCCEEDED}
    filters = [r.filter for r in gcp.fake.list_task_requests]
    assert filters[0] == "State=RUNNING" and set(filters[1:]) == {""}


def test_a_failed_task_listing_costs_that_job_only(gcp: GcpHarness) -> None:
    array = gcp.provider.submit(array_task(SLEEP_60, 2))
    plain = gcp.provider.submit(make_task(SLEEP_60))
    gcp.fake.advance(2)
    with gcp.another_provider(retry=RetryPolicy(attempts=1)) as p:
        gcp.fake.throttle(1, methods={"ListTasks"})
        result = p.status([array, plain])
        assert result[array].state is None and "ResourceExhausted" in result[array].message
        assert result[plain].state is JobStatus.RUNNING
        assert p.status([array])[array].state is JobStatus.RUNNING  # listed next time
    with gcp.another_provider(retry=RetryPolicy(attempts=1), list_threshold=1) as p:
        gcp.fake.throttle(1, methods={"ListTasks"})
        gets = gcp.fake.calls["GetJob"]
        result = p.status([array, plain])  # from the job listing: the array fetched again
        assert {result[array].state, result[plain].state} == {JobStatus.RUNNING}
        assert gcp.fake.calls["GetJob"] - gets == 1


def drain_task(p: GcpBatchProvider, path: str, index: int, offsets: tuple[int, int] = (0, 0)
               ) -> tuple[str, tuple[int, int]]:
    text = ""
    while (chunk := p.read_output(path, offsets, task_index=index)).offsets != offsets:
        text, offsets = text + chunk.stdout, chunk.offsets
    return text, offsets


def test_a_task_that_ended_is_held_back_then_read_to_its_end(gcp: GcpHarness) -> None:
    with output_provider(gcp) as p:
        path = p.submit(array_task(SLEEP_60, 3))
        gcp.fake.advance(2)
        uid = gcp.fake.jobs[path].uid
        for i in range(3):
            gcp.logs.write(uid, f"hello from {i}", task_id=f"{uid}-group0-{i}", delay=10)
        gcp.fake.end_task(path, 1, 0)
        # task 1 ended, but its last lines may not be in Cloud Logging yet
        assert statuses(p.status([path])[path]) == dict.fromkeys(range(3), TaskStatus.RUNNING)
        gcp.clock.tick(SETTLE + 1)
        st = p.status([path])[path]
        assert statuses(st) == {0: TaskStatus.RUNNING, 1: TaskStatus.SUCCEEDED,
                                2: TaskStatus.RUNNING}
        assert st.state is JobStatus.RUNNING
        calls = gcp.logs.calls["POST /v2/entries:list"]
        # its final read lists the job up to the task's end, whatever the job's turn …
        assert drain_task(p, path, 1) == ("hello from 1\n", (1, 0))
        # … and that listing met the other tasks' lines: they are read from memory
        assert p.read_output(path, (0, 0), task_index=0).stdout == "hello from 0\n"
        assert p.read_output(path, (0, 0), task_index=2).stdout == "hello from 2\n"
        assert gcp.logs.calls["POST /v2/entries:list"] - calls == 1
        filter_ = gcp.logs.requests[-1]["filter"]
        assert f'labels.job_uid="{uid}"' in filter_ and "task_id" not in filter_


def test_an_ended_tasks_last_lines_wait_for_quota_not_for_the_jobs_turn(gcp: GcpHarness
                                                                        ) -> None:
    with output_provider(gcp, log_reads_per_minute=1) as p:  # one listing a minute
        path = p.submit(array_task(SLEEP_60, 2))
        gcp.fake.advance(2)
        uid = gcp.fake.jobs[path].uid
        gcp.logs.write(uid, "early", task_id=f"{uid}-group0-0")
        gcp.clock.tick(SETTLE + 1)
        assert p.read_output(path, (0, 0), task_index=0).stdout == "early\n"  # the turn, spent
        gcp.logs.write(uid, "last words", task_id=f"{uid}-group0-1")
        gcp.fake.end_task(path, 1, 0)
        gcp.clock.tick(SETTLE + 1)
        assert statuses(p.status([path])[path])[1] is TaskStatus.SUCCEEDED
        before = gcp.clock()
        # the worker reads an ended task once: this read must not miss its last lines
        assert p.read_output(path, (0, 0), task_index=1).stdout == "last words\n"
        assert gcp.clock() > before  # it waited for the quota (the injected sleep)


def test_each_task_reads_exactly_once_when_memory_drops_lines(gcp: GcpHarness) -> None:
    path = gcp.provider.submit(array_task(SLEEP_60, 2))
    gcp.fake.advance(2)
    uid = gcp.fake.jobs[path].uid
    for i in range(6):
        for task in (0, 1):
            gcp.logs.write(uid, f"task {task} line {i}", task_id=f"{uid}-group0-{task}")
            gcp.clock.tick(0.1)
    gcp.fake.set_state(path, State.SUCCEEDED, exit_code=0)
    gcp.clock.tick(SETTLE + 1)
    with output_provider(gcp) as p:
        p._output.page_size, p._output.max_buffered = 4, 1  # type: ignore[union-attr]
        first, at = drain_task(p, path, 0, (0, 0))
        assert first == "".join(f"task 0 line {i}\n" for i in range(6)) and at == (6, 0)
        # task 1's lines were dropped to stay within memory: listed again, once each
        calls = gcp.logs.calls["POST /v2/entries:list"]
        assert drain_task(p, path, 1) == ("".join(f"task 1 line {i}\n" for i in range(6)),
                                          (6, 0))
        assert gcp.logs.calls["POST /v2/entries:list"] > calls
        # a worker asking again from earlier offsets gets the same lines
        assert drain_task(p, path, 0, (4, 0)) == ("task 0 line 4\ntask 0 line 5\n", (6, 0))


def test_the_poller_records_each_tasks_output_once(gcp: GcpHarness) -> None:
    """The worker's own loop: tasks ending at different times, each one's lines read after
    the margin, once, with its ``task_index``; the job ends after the last of them."""
    store = MemoryStore()
    with output_provider(gcp) as p:
        worker = owner(store, p, "w1", clock=gcp.clock)

        async def go() -> None:
            spec = JobSpec(image_uri="busybox", commands=SLEEP_60, task_count=3)
            job = await worker.jobs.submit("acme", spec, "r")
            path = job.cloud_resource_path
            gcp.fake.advance(2)
            uid = gcp.fake.jobs[path].uid
            for i in range(3):
                gcp.logs.write(uid, f"hello from {i}", task_id=f"{uid}-group0-{i}")
            gcp.fake.end_task(path, 2, 0)
            for _ in range(3):
                gcp.clock.tick(20)
                await worker.poller.cycle()
            gcp.fake.end_task(path, 0, 0)
            gcp.fake.end_task(path, 1, 0)
            for _ in range(4):
                gcp.clock.tick(20)
                await worker.poller.cycle()
            done = store.get_job("acme", job.job_id)
            assert done.status is JobStatus.COMPLETED
            output = [(e.task_index, e.output) for e in store.list_events("acme", job.job_id, 0,
                                                                          1000)
                      if e.kind is EventKind.OUTPUT]
            assert sorted(output) == [(i, f"hello from {i}\n") for i in range(3)]

        asyncio.run(go())

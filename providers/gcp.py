"""Google Cloud Batch (``google-cloud-batch``): one Batch job per Jennah execution.

**Resource path**: the job's full name, ``projects/P/locations/R/jobs/<provider job id>``.

**Exactly once** (docs/design.md §4, §11): the Batch job id is the deterministic provider job id
(lowercase, starts with a letter, at most 63 characters), and ``request_id`` is a UUID5
of the Jennah job id and attempt, never the tenant's own ``request_id``. A create that
finds the job already there (ALREADY_EXISTS) adopts it.

**Status**: for a few paths, one ``get_job`` each (in a small thread pool). For many,
one paged ``list_jobs`` per active state (``status.state="RUNNING"`` …) covers every
active job of the region; only the paths not seen there (just finished, or unknown) are
fetched one by one. If the service refuses the filter, the provider falls back to
``get_job`` for good. **Cancel**: ``cancel_job`` and wait for its long-running operation.

Vendor errors never leave this module: ``google.api_core`` exceptions become
``ProviderUnavailable`` (429, RESOURCE_EXHAUSTED, 5xx: retried here first, see
``providers/retry.py``) or ``ProviderRejected``.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TypeVar

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.api_core.future import polling
from google.cloud import batch_v1
from google.protobuf import duration_pb2

from jennah.errors import (
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    SettingsError,
)
from jennah.models import FailureClass, JobStatus
from jennah.settings import ProviderSettings
from providers.base import Capabilities, ProviderStatus, ProviderTask
from providers.resources import job_environment, job_labels, resolve
from providers.retry import RetryPolicy

T = TypeVar("T")
log = logging.getLogger(__name__)
State = batch_v1.JobStatus.State

# docs/design.md §3: GCP job state → Jennah status (checked row by row by the tests).
GCP_STATES: Mapping[str, JobStatus] = {
    "QUEUED": JobStatus.SCHEDULED,
    "SCHEDULED": JobStatus.SCHEDULED,
    "RUNNING": JobStatus.RUNNING,
    "SUCCEEDED": JobStatus.COMPLETED,
    "FAILED": JobStatus.FAILED,
    "CANCELLATION_IN_PROGRESS": JobStatus.CANCELLED,
    "CANCELLED": JobStatus.CANCELLED,
    "DELETION_IN_PROGRESS": JobStatus.CANCELLED,
}
# Google's reserved exit codes (https://cloud.google.com/batch/docs/troubleshooting);
# any other 500xx is treated as infrastructure too.
GCP_EXIT_CODES: Mapping[int, FailureClass] = {
    50001: FailureClass.PREEMPTED,       # the Spot VM was preempted
    50002: FailureClass.INFRASTRUCTURE,  # the VM stopped reporting (timeout)
    50003: FailureClass.INFRASTRUCTURE,  # the VM rebooted during execution
    50004: FailureClass.INFRASTRUCTURE,  # the VM and task are unresponsive
    50005: FailureClass.TIMEOUT,         # the task exceeded max_run_duration
    50006: FailureClass.INFRASTRUCTURE,  # the VM was recreated during execution
}
# States listed in one call each when polling many jobs; a job absent from all of them is
# finished (or unknown) and is fetched on its own. Latest first, so that a job moving
# while we list is seen at most late, never early.
ACTIVE_STATES = ("RUNNING", "SCHEDULED", "QUEUED")
JOB_ID_RULE = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
JOB_NAME_RULE = re.compile(r"^projects/[^/]+/locations/[^/]+/jobs/[a-z][a-z0-9-]*$")
_EXIT_IN_TEXT = re.compile(r"exit code (-?\d+)")
_REQUEST_NS = uuid.UUID("6f1d5d3e-4c1b-5b0e-9a57-3d1c1e0a6a11")


def request_uuid(job_id: str, attempt: int) -> str:
    """The create ``request_id``: stable across retries and workers for one execution."""
    return str(uuid.uuid5(_REQUEST_NS, f"{job_id}/{attempt}"))


def failure_class(exit_code: int | None, detail: str) -> FailureClass:
    """Why a FAILED job failed (docs/design.md §3, §11)."""
    if exit_code is None or exit_code == 0:
        return FailureClass.QUOTA if "quota" in detail.lower() else FailureClass.INFRASTRUCTURE
    if exit_code in GCP_EXIT_CODES:
        return GCP_EXIT_CODES[exit_code]
    if 50000 <= exit_code <= 50999:
        return FailureClass.INFRASTRUCTURE
    return FailureClass.USER_ERROR


def translate(exc: Exception, what: str) -> ProviderError:
    """A ``google.api_core`` error as one of ours."""
    text = f"GCP Batch {what}: {type(exc).__name__}: {getattr(exc, 'message', exc)}"
    if isinstance(exc, gexc.TooManyRequests | gexc.RetryError | FutureTimeout):
        return ProviderUnavailable(text)  # 429 and RESOURCE_EXHAUSTED (a subclass)
    if isinstance(exc, gexc.ServerError) and not isinstance(exc, gexc.MethodNotImplemented):
        return ProviderUnavailable(text)
    return ProviderRejected(text)


def build_job(task: ProviderTask) -> batch_v1.Job:
    """The Batch job for one execution: every field Jennah promises (issue 5)."""
    spec, res = task.spec, resolve(task.spec)
    container = batch_v1.Runnable.Container(image_uri=spec.image_uri,
                                            commands=list(spec.commands))
    task_spec = batch_v1.TaskSpec(
        runnables=[batch_v1.Runnable(container=container)],
        compute_resource=batch_v1.ComputeResource(cpu_milli=res.cpu_millis,
                                                  memory_mib=res.memory_mib),
        environment=batch_v1.Environment(variables=job_environment(task)),
        max_retry_count=0,  # Jennah retries, with a new execution id
    )
    if res.max_run_duration_seconds:
        task_spec.max_run_duration = duration_pb2.Duration(seconds=res.max_run_duration_seconds)
    model = batch_v1.AllocationPolicy.ProvisioningModel
    policy = batch_v1.AllocationPolicy.InstancePolicy(
        provisioning_model=model.SPOT if spec.use_spot_vms else model.STANDARD,
        machine_type=spec.machine_type,
    )
    if spec.boot_disk_size_gb:
        policy.boot_disk = batch_v1.AllocationPolicy.Disk(size_gb=spec.boot_disk_size_gb)
    allocation = batch_v1.AllocationPolicy(
        instances=[batch_v1.AllocationPolicy.InstancePolicyOrTemplate(policy=policy)])
    if spec.service_account:
        allocation.service_account = batch_v1.ServiceAccount(email=spec.service_account)
    return batch_v1.Job(
        task_groups=[batch_v1.TaskGroup(task_spec=task_spec, task_count=1)],
        allocation_policy=allocation,
        labels=job_labels(task),
        logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
    )


def job_status(job: batch_v1.Job) -> ProviderStatus:
    """Map one Batch job (its state and status events) to a ``ProviderStatus``."""
    raw = State(job.status.state).name
    state = GCP_STATES.get(raw)
    events = list(job.status.status_events)
    exit_code: int | None = None
    for event in events:
        if "task_execution" in event:
            exit_code = event.task_execution.exit_code
        elif (m := _EXIT_IN_TEXT.search(event.description)) is not None:
            exit_code = int(m.group(1))
    if state is JobStatus.COMPLETED and exit_code is None:
        exit_code = 0
    started = _first_event(events, ("RUNNING",))
    completed = None
    if state is not None and state.terminal:
        completed = _first_event(events, ("SUCCEEDED", "FAILED", "CANCELLED",
                                          "CANCELLATION_IN_PROGRESS", "DELETION_IN_PROGRESS"))
        if completed is None and "update_time" in job:
            completed = job.update_time
        if started is None and completed is not None and raw in ("SUCCEEDED", "FAILED"):
            run = job.status.run_duration
            started = completed - (run if isinstance(run, timedelta) else timedelta())
    message = events[-1].description if events else raw.lower()
    fc = failure_class(exit_code, message) if state is JobStatus.FAILED else None
    return ProviderStatus(state=state, raw_state=raw, exit_code=exit_code, failure_class=fc,
                          message=message, started_at=started, completed_at=completed)


def _first_event(events: Sequence[batch_v1.StatusEvent], states: Sequence[str]
                 ) -> datetime | None:
    for event in events:
        if any(f"to {s}" in event.description for s in states) and "event_time" in event:
            when: datetime = event.event_time
            return when
    return None


class GcpBatchProvider:
    """Google Cloud Batch, through an injected ``BatchServiceClient``."""

    name = "gcp"
    capabilities = Capabilities(supports_cancel=True, max_status_batch=10_000,
                                poll_interval_seconds=10.0)

    def __init__(
        self,
        client: batch_v1.BatchServiceClient,
        *,
        project: str,
        region: str,
        retry: RetryPolicy | None = None,
        list_threshold: int = 50,
        page_size: int = 500,
        status_concurrency: int = 8,
        call_timeout: float = 30.0,
        cancel_timeout: float = 60.0,
        lro_poll_seconds: float = 0.5,
    ) -> None:
        self.client = client
        self.parent = f"projects/{project}/locations/{region}"
        self.retry = retry or RetryPolicy()
        self.list_threshold = list_threshold
        self.page_size = page_size
        self.call_timeout = call_timeout
        self.cancel_timeout = cancel_timeout
        self._polling = gretry.Retry(predicate=polling.POLLING_PREDICATE, initial=lro_poll_seconds,
                                     maximum=max(lro_poll_seconds, 5.0), multiplier=1.5,
                                     timeout=cancel_timeout)
        self._list_works = True
        self._pool = ThreadPoolExecutor(max_workers=status_concurrency,
                                        thread_name_prefix="gcp-status")
        self._closed = threading.Event()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> GcpBatchProvider:
        import google.auth.exceptions

        try:
            client = batch_v1.BatchServiceClient()  # credentials: ADC
        except google.auth.exceptions.GoogleAuthError as exc:
            raise SettingsError(f"BATCH_PROVIDER=gcp: no Google credentials ({exc})") from exc
        return cls(client, project=settings.gcp_project_id, region=settings.region)

    @contextmanager
    def _vendor(self, what: str) -> Iterator[None]:
        try:
            yield
        except (gexc.GoogleAPIError, FutureTimeout) as exc:
            raise translate(exc, what) from exc

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            with self._vendor(what):
                return fn()
        return self.retry.call(f"gcp {what}", once)

    # --- submit -----------------------------------------------------------------------

    def submit(self, task: ProviderTask) -> str:
        if not JOB_ID_RULE.match(task.provider_job_id):
            raise ProviderRejected(f"{task.provider_job_id!r} is not a valid GCP Batch job id")
        request = batch_v1.CreateJobRequest(
            parent=self.parent, job_id=task.provider_job_id, job=build_job(task),
            request_id=request_uuid(task.job_id, task.attempt))
        name = f"{self.parent}/jobs/{task.provider_job_id}"

        def create() -> str:
            try:
                with self._vendor("create_job"):
                    created = self.client.create_job(request=request, retry=None,
                                                     timeout=self.call_timeout)
                    return str(created.name)
            except ProviderRejected as exc:
                if not isinstance(exc.__cause__, gexc.AlreadyExists):
                    raise
            with self._vendor("get_job"):  # adopt the job that is already there
                return str(self.client.get_job(name=name, retry=None,
                                               timeout=self.call_timeout).name)

        return self.retry.call("gcp submit", create)

    # --- status -----------------------------------------------------------------------

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        paths = list(dict.fromkeys(resource_paths))
        result: dict[str, ProviderStatus] = {}
        wanted = [p for p in paths if JOB_NAME_RULE.match(p)]
        for p in paths:
            if p not in wanted:
                result[p] = ProviderStatus(None, "UNKNOWN", message="not a GCP Batch job name")
        if len(wanted) >= self.list_threshold and self._list_works:
            result.update(self._listed(wanted))
        missing = [p for p in wanted if p not in result]
        result.update(self._get_each(missing))
        return result

    def _listed(self, paths: Sequence[str]) -> dict[str, ProviderStatus]:
        wanted, found = set(paths), {}
        try:
            for state in ACTIVE_STATES:
                request = batch_v1.ListJobsRequest(parent=self.parent, page_size=self.page_size,
                                                   filter=f'status.state="{state}"')
                for job in self._pages(request):
                    if job.name in wanted and job.name not in found:
                        found[job.name] = job_status(job)
        except ProviderRejected as exc:
            log.warning("GCP Batch refused the list filter, polling job by job: %s", exc)
            self._list_works = False
            return {}
        return found

    def _pages(self, request: batch_v1.ListJobsRequest) -> Iterator[batch_v1.Job]:
        while True:
            page = self._call("list_jobs", lambda: self.client.list_jobs(
                request=request, retry=None, timeout=self.call_timeout))
            yield from page.jobs
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def _get_each(self, paths: Sequence[str]) -> dict[str, ProviderStatus]:
        def one(path: str) -> ProviderStatus | ProviderError:
            try:
                job = self._call("get_job", lambda: self.client.get_job(
                    name=path, retry=None, timeout=self.call_timeout))
            except ProviderRejected as exc:
                if isinstance(exc.__cause__, gexc.NotFound):
                    return ProviderStatus(None, "UNKNOWN", message="no such job")
                return exc
            except ProviderError as exc:
                return exc
            return job_status(job)

        outcomes = dict(zip(paths, self._pool.map(one, paths), strict=True))
        errors = [o for o in outcomes.values() if isinstance(o, ProviderError)]
        if errors and len(errors) == len(outcomes):
            raise errors[0]
        return {p: o if isinstance(o, ProviderStatus)
                else ProviderStatus(None, "UNKNOWN", message=f"status unavailable: {o}")
                for p, o in outcomes.items()}

    # --- cancel -----------------------------------------------------------------------

    def cancel(self, resource_path: str) -> None:
        if not JOB_NAME_RULE.match(resource_path):
            return

        def once() -> None:
            try:
                with self._vendor("cancel_job"):
                    op = self.client.cancel_job(name=resource_path, retry=None,
                                                timeout=self.call_timeout)
                    op.result(timeout=self.cancel_timeout,  # type: ignore[no-untyped-call]
                              polling=self._polling)
            except ProviderRejected as exc:
                # Unknown or already finished: nothing to stop (cancel is idempotent).
                if not isinstance(exc.__cause__, gexc.NotFound | gexc.FailedPrecondition):
                    raise

        self.retry.call("gcp cancel", once)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._pool.shutdown(wait=True)
        self.client.transport.close()  # type: ignore[no-untyped-call]

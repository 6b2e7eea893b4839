"""Azure Batch (``azure-batch`` 15): one Azure job per Jennah execution, on
``AZURE_BATCH_POOL_ID``, holding one task that runs the container.

**Ids and resource path**: the job id is the deterministic provider job id and the task
id is derived from it (``<job id>-task``); the resource path is the task's URL,
``<endpoint>/jobs/<job id>/tasks/<task id>``. Creating a job or task that already exists
(409 ``JobExists``/``TaskExists``) adopts it, so a resubmit never runs the job twice.
Jobs are created with ``onAllTasksComplete=terminatejob`` so that finished jobs stop
counting against the account's active-job quota.

**Status**: ``get_task`` per path (in a small thread pool). A task that is still queued
or that failed may belong to a job we terminated, so for those the job is read too: a
job terminated with Jennah's reason is CANCELLED. **Cancel**: ``begin_terminate_job``
with that reason, waiting for the operation (``BatchJobTerminateOptions`` is required,
docs/design.md §9).

Resources: CPU and memory go to the container as ``--cpus``/``--memory`` run options, the
run limit to the task's ``maxWallClockTime``. Machine type, spot and boot disk belong to
the pool on Azure and are not per job (docs/providers.md).

Vendor errors never leave this module: ``HttpResponseError`` and connection errors become
``ProviderUnavailable`` (429, 5xx, connection: retried here first, the SDK's own retries
are off), ``ProviderQuotaExceeded`` or ``ProviderRejected``.
"""

from __future__ import annotations

import re
import shlex
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

from azure.batch import BatchClient
from azure.batch import models as am
from azure.batch.models._models import BatchJobTerminateOptions
from azure.core.exceptions import AzureError, HttpResponseError

from jennah.errors import (
    ProviderError,
    ProviderQuotaExceeded,
    ProviderRejected,
    ProviderUnavailable,
)
from jennah.models import FailureClass, JobStatus
from jennah.settings import ProviderSettings
from providers.base import Capabilities, ProviderStatus, ProviderTask
from providers.resources import job_environment, job_labels, resolve
from providers.retry import RetryPolicy

T = TypeVar("T")
CANCEL_REASON = "JennahCancel"

# docs/design.md §3: Azure task state → Jennah status (checked row by row by the tests). A
# completed task is COMPLETED with exit code 0 and FAILED otherwise; any task of a job
# terminated with CANCEL_REASON (except one that completed with 0) is CANCELLED.
AZURE_TASK_STATES: Mapping[str, JobStatus] = {
    "active": JobStatus.SCHEDULED,
    "preparing": JobStatus.SCHEDULED,
    "running": JobStatus.RUNNING,
}
QUOTA_CODES = frozenset({"ActiveJobAndScheduleQuotaReached", "AccountQuotaExceeded",
                         "TaskQuotaExceeded"})
_ENDPOINT_HOST = re.compile(r"^(?P<account>[a-z0-9]+)\.(?P<region>[a-z0-9-]+)\.batch\.azure\.com$")


def endpoint_region(endpoint: str) -> str:
    """``https://acct.westeurope.batch.azure.com`` → ``westeurope`` (docs/design.md §11)."""
    match = _ENDPOINT_HOST.match(urlsplit(endpoint).hostname or "")
    return match.group("region") if match else ""


def task_id_for(job_id: str) -> str:
    return f"{job_id}-task"


def _text(value: Any) -> str:
    """An SDK enum (``BatchTaskState.ACTIVE``) or plain string as its wire value."""
    return str(getattr(value, "value", value) or "").lower()


def error_code(exc: HttpResponseError) -> str:
    return str(getattr(exc.error, "code", "") or "")


def translate(exc: Exception, what: str) -> ProviderError:
    """An azure-core error as one of ours."""
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        code, status = error_code(exc), int(exc.status_code)
        text = f"Azure Batch {what}: {code or type(exc).__name__} ({status}): {exc.message}"
        if code in QUOTA_CODES:
            return ProviderQuotaExceeded(text)
        if status == 429 or status >= 500:
            return ProviderUnavailable(text)
        return ProviderRejected(text)
    # ServiceRequestError/ServiceResponseError (connection), or a credential not yet there.
    return ProviderUnavailable(f"Azure Batch {what}: {type(exc).__name__}: {exc}")


def build_job(task: ProviderTask, pool_id: str) -> am.BatchJobCreateOptions:
    return am.BatchJobCreateOptions(
        id=task.provider_job_id, pool_info=am.BatchPoolInfo(pool_id=pool_id),
        all_tasks_complete_mode="terminatejob",
        metadata=[am.BatchMetadataItem(name=k, value=v) for k, v in job_labels(task).items()])


def build_task(task: ProviderTask) -> am.BatchTaskCreateOptions:
    """The task for one execution: every field Jennah promises (issue 5)."""
    spec, res = task.spec, resolve(task.spec)
    constraints = am.BatchTaskConstraints(max_task_retry_count=0)  # Jennah retries
    if res.max_run_duration_seconds:
        constraints.max_wall_clock_time = timedelta(seconds=res.max_run_duration_seconds)
    return am.BatchTaskCreateOptions(
        id=task_id_for(task.provider_job_id),
        command_line=shlex.join(spec.commands),
        container_settings=am.BatchTaskContainerSettings(
            image_name=spec.image_uri,
            container_run_options=f"--cpus={res.vcpus} --memory={res.memory_mib}m"),
        environment_settings=[am.EnvironmentSetting(name=k, value=v)
                              for k, v in job_environment(task).items()],
        constraints=constraints,
    )


def task_status(task: am.BatchTask, job: am.BatchJob | None) -> ProviderStatus:
    """Map a task (and, when it was read, its job) to a ``ProviderStatus``."""
    raw = _text(task.state)
    info = task.execution_info
    exit_code = info.exit_code if info is not None else None
    failure = info.failure_info if info is not None else None
    started = info.start_time if info is not None else None
    ended = info.end_time if info is not None else None
    job_info = job.execution_info if job is not None else None
    cancelled = job_info is not None and job_info.termination_reason == CANCEL_REASON
    message = failure.message if failure is not None and failure.message else raw
    if raw == "completed" and exit_code == 0:
        return ProviderStatus(JobStatus.COMPLETED, raw, 0, None, message, started, ended)
    if cancelled:
        end = ended or (job_info.end_time if job_info is not None else None)
        return ProviderStatus(JobStatus.CANCELLED, f"{raw}/terminated", exit_code, None,
                              "cancelled", started, end)
    if raw == "completed":
        return ProviderStatus(JobStatus.FAILED, raw, exit_code,
                              failure_class(task, exit_code, failure), message, started, ended)
    return ProviderStatus(AZURE_TASK_STATES.get(raw), raw, None, None, message, started, None)


def failure_class(task: am.BatchTask, exit_code: int | None,
                  failure: am.BatchTaskFailureInfo | None) -> FailureClass:
    """Why a completed task failed: server error, run limit, exit code, in that order."""
    category = _text(failure.category) if failure is not None else ""
    if category == "servererror":
        return FailureClass.INFRASTRUCTURE
    info, limit = task.execution_info, task.constraints and task.constraints.max_wall_clock_time
    if limit and info is not None and info.start_time and info.end_time and (
            info.end_time - info.start_time >= limit - timedelta(seconds=1)):
        return FailureClass.TIMEOUT
    if exit_code or category == "usererror":
        return FailureClass.USER_ERROR
    return FailureClass.INFRASTRUCTURE


class AzureBatchProvider:
    """Azure Batch, through an injected ``azure.batch.BatchClient``."""

    name = "azure"
    capabilities = Capabilities(supports_cancel=True, max_status_batch=100,
                                poll_interval_seconds=10.0)

    def __init__(self, client: BatchClient, *, endpoint: str, pool_id: str,
                 retry: RetryPolicy | None = None, status_concurrency: int = 8,
                 cancel_timeout: float = 60.0, lro_poll_seconds: int = 1) -> None:
        self.client = client
        self.endpoint = endpoint.rstrip("/")
        self.region = endpoint_region(endpoint)
        self.pool_id = pool_id
        self.retry = retry or RetryPolicy()
        self.cancel_timeout = cancel_timeout
        self.lro_poll_seconds = lro_poll_seconds
        self._pool = ThreadPoolExecutor(max_workers=status_concurrency,
                                        thread_name_prefix="azure-status")
        self._closed = threading.Event()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> AzureBatchProvider:
        endpoint = settings.azure_batch_endpoint
        if settings.azure_batch_account_key:
            from azure.core.credentials import AzureNamedKeyCredential

            account = settings.azure_batch_account_name or urlsplit(endpoint).hostname or ""
            credential: Any = AzureNamedKeyCredential(account.split(".")[0],
                                                      settings.azure_batch_account_key)
        else:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        client = BatchClient(endpoint, credential, retry_total=0)
        return cls(client, endpoint=endpoint, pool_id=settings.azure_batch_pool_id)

    @contextmanager
    def _vendor(self, what: str) -> Iterator[None]:
        try:
            yield
        except AzureError as exc:
            raise translate(exc, what) from exc

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            with self._vendor(what):
                return fn()
        return self.retry.call(f"azure {what}", once)

    def _ids(self, path: str) -> tuple[str, str] | None:
        prefix = f"{self.endpoint}/jobs/"
        if not path.startswith(prefix):
            return None
        parts = path[len(prefix):].split("/")
        if len(parts) != 3 or parts[1] != "tasks" or not all(parts):
            return None
        return parts[0], parts[2]

    # --- submit -----------------------------------------------------------------------

    def submit(self, task: ProviderTask) -> str:
        job_id = task.provider_job_id
        job, body = build_job(task, self.pool_id), build_task(task)

        def once() -> str:
            with self._vendor("submit"):
                try:
                    self.client.create_job(job)
                except HttpResponseError as exc:
                    if error_code(exc) != "JobExists":
                        raise
                try:
                    self.client.create_task(job_id, body)
                except HttpResponseError as exc:
                    if error_code(exc) != "TaskExists":
                        raise
            return f"{self.endpoint}/jobs/{job_id}/tasks/{body.id}"

        return self.retry.call("azure submit", once)

    # --- status -----------------------------------------------------------------------

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        paths = list(dict.fromkeys(resource_paths))
        outcomes = dict(zip(paths, self._pool.map(self._one, paths), strict=True))
        errors = [o for o in outcomes.values() if isinstance(o, ProviderError)]
        if errors and len(errors) == len(outcomes):
            raise errors[0]
        return {p: o if isinstance(o, ProviderStatus)
                else ProviderStatus(None, "UNKNOWN", message=f"status unavailable: {o}")
                for p, o in outcomes.items()}

    def _one(self, path: str) -> ProviderStatus | ProviderError:
        ids = self._ids(path)
        if ids is None:
            return ProviderStatus(None, "UNKNOWN", message="not a task of this Batch account")
        job_id, task_id = ids
        try:
            task = self._call("get_task", lambda: self.client.get_task(job_id, task_id))
            job = None
            state = _text(task.state)
            if state != "running" and not (state == "completed"
                                                and task.execution_info is not None
                                                and task.execution_info.exit_code == 0):
                job = self._call("get_job", lambda: self.client.get_job(job_id))
        except ProviderRejected as exc:
            if getattr(exc.__cause__, "status_code", None) == 404:
                return ProviderStatus(None, "UNKNOWN", message="no such job or task")
            return exc
        except ProviderError as exc:
            return exc
        return task_status(task, job)

    # --- cancel -----------------------------------------------------------------------

    def cancel(self, resource_path: str) -> None:
        ids = self._ids(resource_path)
        if ids is None:
            return
        options = BatchJobTerminateOptions(termination_reason=CANCEL_REASON)

        def once() -> None:
            try:
                with self._vendor("terminate_job"):
                    poller = self.client.begin_terminate_job(
                        ids[0], options, polling_interval=self.lro_poll_seconds)
                    poller.result(timeout=self.cancel_timeout)  # type: ignore[no-untyped-call]
            except ProviderRejected as exc:
                # Unknown (404) or already completed/terminating (409): nothing to stop.
                if getattr(exc.__cause__, "status_code", None) not in (404, 409):
                    raise
                return
            if not poller.done() or poller.status() == "Failed":
                raise ProviderUnavailable(f"Azure Batch terminate of {ids[0]} did not finish")

        self.retry.call("azure cancel", once)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._pool.shutdown(wait=True)
        self.client.close()

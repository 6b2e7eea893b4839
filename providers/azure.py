"""Azure Batch (``azure-batch`` 15): one Azure job per Jennah execution, on
``AZURE_BATCH_POOL_ID``, holding one task that runs the container.

**Ids and resource path**: the job id is the deterministic provider job id and the task
id is derived from it (``<job id>-task``); the resource path is the task's URL,
``<endpoint>/jobs/<job id>/tasks/<task id>``.

**Submit** is three idempotent steps, each of which a resubmit (same job id) repeats:
create the job with ``onAllTasksComplete=noaction``, add the task, then patch the job to
``terminatejob`` so that it ends with its task and stops counting against the account's
active-job quota. The order is Batch's own advice: a job with no task counts as complete,
so a job *created* with ``terminatejob`` may be ended before its task is added, and the
add then fails with 409 for good. An existing job or task (409 ``JobExists`` /
``TaskExists``) is adopted, so a resubmit never runs the job twice, and finishes
whatever the previous attempt left: a job without its task, or a task whose job is still
``noaction``. Patching a job that is already over (409 ``JobCompleted``,
``JobBeingTerminated``: cancelled) is fine: there is nothing left to end.

**Status**: ``get_task`` per path (in a small thread pool). A task that is still queued
or that failed may belong to a job we terminated, so for those the job is read too: a
job terminated with Jennah's reason is CANCELLED. **Cancel**: ``begin_terminate_job``
with that reason, waiting for the operation (``BatchJobTerminateOptions`` is required,
docs/design.md §9).

**Output**: the task's ``stdout.txt`` and ``stderr.txt`` on its node, read with
``list_task_files`` (their lengths) and ranged ``download_task_file`` (``ocp-range``);
offsets are byte offsets into each file (``read_output``).

Resources: CPU and memory go to the container as ``--cpus``/``--memory`` run options, the
run limit to the task's ``maxWallClockTime``. The container starts in the image's own
``WORKDIR`` (``workingDirectory=containerImageDefault``; Batch's default would be the
task directory). Machine type, spot (low-priority) nodes and GPUs are properties of the
*pool* on Azure, chosen by its VM size and node counts, not of a job: Jennah does not pick
pools per job, so ``capabilities`` refuses ``machine_type``, ``use_spot_vms`` and
``accelerator`` at SubmitJob rather than ignoring them (docs/providers.md).

**Submit rate** (``Capabilities.submit_rate``, spent by ``worker/admission.py`` and shared
by the live workers): 20 a second. Azure Batch publishes no fixed per-second request
quota (it throttles with HTTP 429 and ``Retry-After``), and one submit is three calls
(above); 20 submits a second (60 calls) stays clear of the throttling observed on a
single account. Accounts also cap *active* jobs (a quota in the hundreds), which the
per-tenant active-jobs cap helps to respect. ``PROVIDER_SUBMIT_RATE`` raises it.

**Private registry** (``AZURE_REGISTRY_*``): a user name and password, or the resource id
of a user-assigned managed identity of the pool, sent as ``containerSettings.registry``
only for images whose registry host is ``AZURE_REGISTRY_SERVER``, so the credentials are
never offered to another registry. The password is kept out of every ``repr``, and any
error text that would carry it is redacted.

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
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
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
from jennah.settings import Env, ProviderSettings
from providers.base import Capabilities, OutputChunk, ProviderStatus, ProviderTask
from providers.local import _utf8_boundary
from providers.resources import JOB_ID_LABEL, job_environment, job_labels, resolve
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
# The job is over (completed, or being terminated by a cancel): nothing left to patch.
JOB_OVER_CODES = frozenset({"JobCompleted", "JobBeingTerminated"})
# The metadata names Jennah sets on every job (providers.resources.job_labels): a tenant's
# label with one of these names would be silently replaced, so it is refused instead.
JENNAH_METADATA = frozenset({JOB_ID_LABEL, "jennah-tenant-id", "jennah-attempt"})
# The task's output files in its directory on the node, in OutputChunk order.
OUTPUT_FILES = ("stdout.txt", "stderr.txt")
# Bytes read per file per read_output call, at most.
OUTPUT_CAP = 1 << 20
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


def translate(exc: Exception, what: str, secrets: Sequence[str] = ()) -> ProviderError:
    """An azure-core error as one of ours, with every one of ``secrets`` redacted from its
    text (Batch's error details may echo a property's value)."""
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        code, status = error_code(exc), int(exc.status_code)
        text = redact(f"Azure Batch {what}: {code or type(exc).__name__} ({status}): "
                      f"{exc.message}", secrets)
        if code in QUOTA_CODES:
            return ProviderQuotaExceeded(text)
        if status == 429 or status >= 500:
            return ProviderUnavailable(text)
        return ProviderRejected(text)
    # ServiceRequestError/ServiceResponseError (connection), or a credential not yet there.
    return ProviderUnavailable(redact(f"Azure Batch {what}: {type(exc).__name__}: {exc}",
                                      secrets))


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


@dataclass(frozen=True)
class Registry:
    """Credentials for the private registry ``server`` (``AZURE_REGISTRY_*``): a user name
    and password, or the ARM resource id of a user-assigned managed identity of the pool
    (Batch accepts one or the other)."""

    server: str
    username: str = ""
    password: str = field(default="", repr=False)
    identity_resource_id: str = ""

    @classmethod
    def from_env(cls, e: Env) -> Registry | None:
        """None when no registry is configured; an incomplete combination is a problem
        naming the variables (never their values)."""
        server, user = e.text("AZURE_REGISTRY_SERVER"), e.text("AZURE_REGISTRY_USERNAME")
        password = e.text("AZURE_REGISTRY_PASSWORD")
        identity = e.text("AZURE_REGISTRY_IDENTITY_RESOURCE_ID")
        if not (server or user or password or identity):
            return None
        problems = []
        if not server:
            problems.append("AZURE_REGISTRY_SERVER (required with the other "
                            "AZURE_REGISTRY_* variables)")
        if bool(user) != bool(password):
            problems.append("AZURE_REGISTRY_USERNAME and AZURE_REGISTRY_PASSWORD (they go "
                            "together)")
        if bool(password) == bool(identity):
            problems.append("AZURE_REGISTRY_PASSWORD (with AZURE_REGISTRY_USERNAME) or "
                            "AZURE_REGISTRY_IDENTITY_RESOURCE_ID (set one of them)")
        e.problems.extend(problems)
        return None if problems else cls(server.lower(), user, password, identity)

    def serves(self, image: str) -> bool:
        """Whether ``image`` is pulled from this registry: its first path component is
        the server (``myacr.azurecr.io/app:2``)."""
        host, slash, _ = image.partition("/")
        return bool(slash) and host.lower() == self.server

    def reference(self) -> am.ContainerRegistryReference:
        if self.identity_resource_id:
            return am.ContainerRegistryReference(
                registry_server=self.server, identity_reference=am.BatchNodeIdentityReference(
                    resource_id=self.identity_resource_id))
        return am.ContainerRegistryReference(registry_server=self.server,
                                             username=self.username, password=self.password)


def build_job(task: ProviderTask, pool_id: str) -> am.BatchJobCreateOptions:
    """The job, created with ``noaction``: ``terminatejob`` comes after the task is added
    (module docstring)."""
    return am.BatchJobCreateOptions(
        id=task.provider_job_id, pool_info=am.BatchPoolInfo(pool_id=pool_id),
        all_tasks_complete_mode="noaction",
        metadata=[am.BatchMetadataItem(name=k, value=v) for k, v in job_labels(task).items()])


def build_task(task: ProviderTask, registry: Registry | None = None) -> am.BatchTaskCreateOptions:
    """The task for one execution: every field Jennah promises (docs/providers.md)."""
    spec, res = task.spec, resolve(task.spec)
    constraints = am.BatchTaskConstraints(max_task_retry_count=0)  # Jennah retries
    if res.max_run_duration_seconds:
        constraints.max_wall_clock_time = timedelta(seconds=res.max_run_duration_seconds)
    container = am.BatchTaskContainerSettings(
        image_name=spec.image_uri, working_directory="containerImageDefault",
        container_run_options=f"--cpus={res.vcpus} --memory={res.memory_mib}m")
    if registry is not None and registry.serves(spec.image_uri):
        container.registry = registry.reference()
    return am.BatchTaskCreateOptions(
        id=task_id_for(task.provider_job_id),
        command_line=shlex.join(spec.commands),
        container_settings=container,
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


def whole_lines(data: bytes, final: bool) -> bytes:
    """The part of ``data`` (at most ``OUTPUT_CAP`` bytes read from a file) to return now:
    whole lines only, unless the file is final and ``data`` reaches its end; a line
    longer than the cap goes out in pieces, never splitting a character."""
    if final and len(data) < OUTPUT_CAP:
        return data
    end = data.rfind(b"\n") + 1
    if end:
        return data[:end]
    return data[:_utf8_boundary(data)] if len(data) >= OUTPUT_CAP else b""


# Account-wide submits per second. Azure publishes no fixed rate: a conservative
# pick (the module docstring says why).
SUBMIT_RATE = 20.0


@dataclass(frozen=True)
class AzureSettings:
    """``BATCH_PROVIDER=azure``'s variables (docs/providers.md, Azure Batch); the region
    comes from the endpoint."""

    endpoint: str
    pool_id: str
    # A shared key (the account name defaults to the endpoint's first label); without
    # one, DefaultAzureCredential.
    account_name: str = ""
    account_key: str = field(default="", repr=False)
    registry: Registry | None = None

    @classmethod
    def from_env(cls, e: Env) -> AzureSettings:
        e.require(("AZURE_BATCH_ENDPOINT", "AZURE_BATCH_POOL_ID"), "BATCH_PROVIDER=azure")
        return cls(
            endpoint=e.text("AZURE_BATCH_ENDPOINT"), pool_id=e.text("AZURE_BATCH_POOL_ID"),
            account_name=e.text("AZURE_BATCH_ACCOUNT_NAME"),
            account_key=e.text("AZURE_BATCH_ACCOUNT_KEY"), registry=Registry.from_env(e),
        )


class AzureBatchProvider:
    """Azure Batch, through an injected ``azure.batch.BatchClient``."""

    name = "azure"
    settings_class = AzureSettings
    # No label limit: Batch documents none for job metadata (docs/providers.md); Jennah's
    # own metadata names are reserved. Machine type, spot and GPUs belong to the pool.
    capabilities = Capabilities(max_status_batch=100,
                                poll_interval_seconds=10.0, supports_output=True,
                                submit_rate=SUBMIT_RATE,
                                reserved_label_keys=JENNAH_METADATA, machine_type=False,
                                boot_disk=False, service_account=False,
                                spot=False, accelerator_type=False, accelerator_count=False)

    def __init__(self, client: BatchClient, *, endpoint: str, pool_id: str,
                 registry: Registry | None = None,
                 retry: RetryPolicy | None = None, status_concurrency: int = 8,
                 cancel_timeout: float = 60.0, lro_poll_seconds: int = 1) -> None:
        self.client = client
        self.endpoint = endpoint.rstrip("/")
        self.region = endpoint_region(endpoint)
        self.pool_id = pool_id
        self.registry = registry
        self._secrets = (registry.password,) if registry is not None else ()
        self.retry = retry or RetryPolicy()
        self.cancel_timeout = cancel_timeout
        self.lro_poll_seconds = lro_poll_seconds
        self._pool = ThreadPoolExecutor(max_workers=status_concurrency,
                                        thread_name_prefix="azure-status")
        self._closed = threading.Event()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> AzureBatchProvider:
        s = settings.read(AzureSettings.from_env)  # first: a bad setting stops the start
        if s.account_key:
            from azure.core.credentials import AzureNamedKeyCredential

            account = s.account_name or urlsplit(s.endpoint).hostname or ""
            credential: Any = AzureNamedKeyCredential(account.split(".")[0], s.account_key)
        else:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        client = BatchClient(s.endpoint, credential, retry_total=0)
        return cls(client, endpoint=s.endpoint, pool_id=s.pool_id, registry=s.registry)

    @contextmanager
    def _vendor(self, what: str) -> Iterator[None]:
        try:
            yield
        except AzureError as exc:
            raise translate(exc, what, self._secrets) from exc

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
        """Create the job (``noaction``), add its task, then engage ``terminatejob``; each
        step adopts what a previous attempt did (module docstring)."""
        job_id = task.provider_job_id
        job, body = build_job(task, self.pool_id), build_task(task, self.registry)
        engage = am.BatchJobUpdateOptions(all_tasks_complete_mode="terminatejob")

        def once() -> str:
            with self._vendor("submit"):
                _unless(frozenset({"JobExists"}), lambda: self.client.create_job(job))
                _unless(frozenset({"TaskExists"}),
                        lambda: self.client.create_task(job_id, body))
                _unless(JOB_OVER_CODES, lambda: self.client.update_job(job_id, engage))
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

    # --- output -----------------------------------------------------------------------

    def read_output(self, resource_path: str, offsets: tuple[int, int]) -> OutputChunk:
        """New stdout/stderr text after the byte ``offsets`` into the task's
        ``stdout.txt``/``stderr.txt``: whole lines only until the task has completed,
        invalid UTF-8 replaced.

        Cost per call, bounded: one ``list_task_files`` (both lengths), then one ranged
        read of at most ``OUTPUT_CAP`` bytes per file that grew. Only when a file ends in
        a partial line is the task read (``get_task``): if it has completed, its files no
        longer grow, and they are read once more so that the last line goes out whole.
        A task not started yet, or whose files are gone with its node, has no output."""
        ids = self._ids(resource_path)
        if ids is None:
            return OutputChunk(offsets=offsets)
        data = self._read_files(ids, offsets)
        final = False
        if any(d and len(d) < OUTPUT_CAP and not d.endswith(b"\n") for d in data):
            final = self._task_completed(ids)
            if final:
                data = self._read_files(ids, offsets)  # read after the end was seen
        kept = [whole_lines(d, final) for d in data]
        return OutputChunk(stdout=kept[0].decode("utf-8", errors="replace"),
                           stderr=kept[1].decode("utf-8", errors="replace"),
                           offsets=(offsets[0] + len(kept[0]), offsets[1] + len(kept[1])))

    def _read_files(self, ids: tuple[str, str], offsets: tuple[int, int]) -> list[bytes]:
        """Up to ``OUTPUT_CAP`` bytes of each output file from its offset."""
        job_id, task_id = ids

        def lengths() -> dict[str, int]:
            files = _unless_absent(lambda: list(self.client.list_task_files(job_id, task_id)))
            return {f.name: int(f.properties.content_length) for f in files or ()
                    if f.name in OUTPUT_FILES and f.properties is not None}

        def download(name: str, start: int, end: int) -> bytes:
            return _unless_absent(lambda: b"".join(self.client.download_task_file(
                job_id, task_id, name, ocp_range=f"bytes={start}-{end - 1}"))) or b""

        sizes = self._call("list_task_files", lengths)
        out = []
        for name, start in zip(OUTPUT_FILES, offsets, strict=True):
            end = min(sizes.get(name, 0), start + OUTPUT_CAP)
            out.append(self._call("download_task_file", partial(download, name, start, end))
                       if end > start else b"")
        return out

    def _task_completed(self, ids: tuple[str, str]) -> bool:
        try:
            task = self._call("get_task", lambda: self.client.get_task(*ids))
        except ProviderRejected as exc:
            if getattr(exc.__cause__, "status_code", None) == 404:
                return True  # gone: nothing will be written any more
            raise
        return _text(task.state) == "completed"

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._pool.shutdown(wait=True)
        self.client.close()


def _unless(codes: frozenset[str], fn: Callable[[], object]) -> None:
    """Call ``fn``; an ``HttpResponseError`` with one of ``codes`` counts as done."""
    try:
        fn()
    except HttpResponseError as exc:
        if error_code(exc) not in codes:
            raise


def _unless_absent(fn: Callable[[], T]) -> T | None:
    """``fn()``, or None when there is nothing to read: the task has not started on a
    node yet (409), or it, its files or its node are gone (404)."""
    try:
        return fn()
    except HttpResponseError as exc:
        if exc.status_code in (404, 409):
            return None
        raise

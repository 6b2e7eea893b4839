"""Azure Batch (``azure-batch`` 15): one Azure job per Jennah execution, on
``AZURE_BATCH_POOL_ID``, holding one task that runs the container (a job of N tasks:
N tasks, below).

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
per-tenant active-jobs cap helps to respect. ``PROVIDER_SUBMIT_RATE`` raises it. A job
of N tasks spends 1 + ⌈N/100⌉ submits of it (``tasks_per_call``) for its 2 + ⌈N/100⌉
calls: conservative, as each submit is budgeted three calls.

**Private registry** (``AZURE_REGISTRY_*``): a user name and password, or the resource id
of a user-assigned managed identity of the pool, sent as ``containerSettings.registry``
only for images whose registry host is ``AZURE_REGISTRY_SERVER``, so the credentials are
never offered to another registry. The password is kept out of every ``repr``, and any
error text that would carry it is redacted.

**Jobs of several tasks** (``spec.task_count`` N > 1, docs/design.md §16): one Azure job
with N tasks, ``task-0`` … ``task-<N-1>``, each carrying ``JENNAH_TASK_INDEX`` and
``JENNAH_TASK_COUNT`` (a plain job's task gets 0 and 1); the variables every task shares
go once into the job's ``commonEnvironmentSettings``, which keeps the task bodies small.
``spec.parallelism`` becomes the job's ``maxParallelTasks`` (REST API 2021-06-01.14.0 and
later; the SDK's documentation says accounts may need Azure support to enable it: an
account that refuses it rejects the submit). The resource path is the job's task list
with the count, ``<endpoint>/jobs/<job id>/tasks?taskCount=N``.

* *Submit* is the plain job's three steps with the single add replaced by
  add-task-collection calls of at most 100 tasks (``MAX_TASKS_PER_ADD``, fewer when
  100 bodies would pass Batch's 1 MB request limit). Task ids depend only on the index,
  so nothing can run twice, and a resubmit adds only what is missing: when the job
  already exists (a crash, a retry, a concurrent submit), the ids it holds are listed
  first (one paged call, ``$select=id``), and only the others are added. Every state a
  crash can leave is covered: no job; the job with none, some, or part of one
  collection of its tasks (a collection is not atomic: each task has its own result);
  all tasks in but the job still ``noaction`` (the patch then ends it if they have all
  completed); the job cancelled in between (an add answered ``JobCompleted`` stops the
  adds: the cancel stands). A task's ``TaskExists`` result is success; a ``servererror``
  result, or a task missing from the results, retries the collection; any other client
  error rejects the submit. The bodies are JSON copies of one ``build_task`` model, sent
  with ``BatchClient.send_request``: 10,000 tasks take 0.3 s of client CPU instead of
  2 s with one SDK model each.
* *Retries*: Batch re-runs a task itself, with no limit and without reporting a failure,
  when its node is preempted (spot), rebooted, reimaged or removed, or after an
  internal scheduling error or a node in a bad state: that is Azure's handling of
  Jennah's retryable classes. ``maxTaskRetryCount`` retries *only* a non-zero exit of
  the command (pre-processing and upload errors are never retried by it), that is,
  exactly Jennah's ``user_error``, which Jennah never retries; so it stays 0 for every
  task. A task that still fails with a server error (``infrastructure``) is final on
  Azure: it fails the job, whose retry is then the worker's. ``TaskState.attempt`` is
  what Batch reports of its re-runs, ``retryCount + requeueCount``.
* *Status*: one paged task list per job (1,000 tasks a page, the service's most,
  ``$select`` of the four fields read), plus ``get_job`` when a task is queued or
  failed (as for a plain job: was it cancelled?); mapped task by task as a plain job's
  task is, then added up by ``providers.tasks.status_from_tasks``. The pages are read as
  JSON (``Wire``), not as SDK models, which cost fifteen times the CPU. A job of 10,000
  tasks costs 10 or 11 calls, 2 to 4 MB and about 0.2 s of client CPU per poll,
  whatever their states (docs/providers.md).
* *Cancel* terminates the job, which ends its running tasks; its queued ones stay
  ``active`` on Azure and are CANCELLED by the job's terminate reason.
* *Output*: ``read_output(..., task_index=i)`` reads ``task-i``'s files.

Vendor errors never leave this module: ``HttpResponseError`` and connection errors become
``ProviderUnavailable`` (429, 5xx, connection: retried here first, the SDK's own retries
are off), ``ProviderQuotaExceeded`` or ``ProviderRejected``.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import isodate  # type: ignore[import-untyped]
from azure.batch import BatchClient
from azure.batch import models as am
from azure.batch.models._models import BatchJobTerminateOptions
from azure.core.exceptions import AzureError, HttpResponseError
from azure.core.rest import HttpRequest

from jennah.errors import (
    ProviderError,
    ProviderQuotaExceeded,
    ProviderRejected,
    ProviderUnavailable,
)
from jennah.models import MAX_TASK_COUNT, FailureClass, JobStatus, TaskState, TaskStatus
from jennah.settings import Env, ProviderSettings
from jennah.tasks import task_status_of_job
from providers.base import Capabilities, OutputChunk, ProviderStatus, ProviderTask
from providers.local import _utf8_boundary
from providers.resources import JOB_ID_LABEL, job_environment, job_labels, resolve
from providers.retry import RetryPolicy
from providers.tasks import status_from_tasks

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
# Add-task-collection takes at most 100 tasks, whose request body must stay under 1 MB
# ("Tasks - Create Task Collection",
# https://learn.microsoft.com/rest/api/batchservice/tasks/create-task-collection); the
# budget leaves room for the envelope and for our estimate of the SDK's serialisation.
MAX_TASKS_PER_ADD = 100
ADD_BODY_BUDGET = 900_000
# The Batch REST API version of every call (the SDK's, passed to it in from_settings).
API_VERSION = "2025-06-01"
# Tasks per page of list_tasks: the service's maximum ("maxresults", same reference).
LIST_PAGE = 1000
# What status reads of each task of a job of several tasks (``task_status``).
TASK_FIELDS = ["id", "state", "executionInfo", "constraints"]
# The resource path of a job of several tasks: the job's task list, with the count.
_ARRAY_PATH = re.compile(r"^(?P<job>[^/?]+)/tasks\?taskCount=(?P<count>[1-9][0-9]*)$")
_ARRAY_TASK_ID = re.compile(r"^task-(?P<index>0|[1-9][0-9]*)$")
_ENDPOINT_HOST = re.compile(r"^(?P<account>[a-z0-9]+)\.(?P<region>[a-z0-9-]+)\.batch\.azure\.com$")


def endpoint_region(endpoint: str) -> str:
    """``https://acct.westeurope.batch.azure.com`` → ``westeurope`` (docs/design.md §11)."""
    match = _ENDPOINT_HOST.match(urlsplit(endpoint).hostname or "")
    return match.group("region") if match else ""


def task_id_for(job_id: str) -> str:
    return f"{job_id}-task"


def array_task_id(index: int) -> str:
    """The id of task ``index`` of a job of several tasks: the same on every submit."""
    return f"task-{index}"


def array_task_index(task_id: str) -> int | None:
    match = _ARRAY_TASK_ID.match(task_id)
    return int(match.group("index")) if match else None


@dataclass(frozen=True)
class Target:
    """What a resource path names: a job, with its one task (a plain job) or its number
    of tasks (``task_id`` None)."""

    job_id: str
    task_id: str | None
    task_count: int = 1

    def task(self, index: int) -> str | None:
        """The id of task ``index``; None if the job has no such task."""
        if self.task_id is not None:
            return self.task_id if index == 0 else None
        return array_task_id(index) if 0 <= index < self.task_count else None


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


def _env(variables: Mapping[str, str]) -> list[am.EnvironmentSetting]:
    return [am.EnvironmentSetting(name=k, value=v) for k, v in variables.items()]


def task_environment(index: int, count: int) -> dict[str, str]:
    return {"JENNAH_TASK_INDEX": str(index), "JENNAH_TASK_COUNT": str(count)}


def build_job(task: ProviderTask, pool_id: str) -> am.BatchJobCreateOptions:
    """The job, created with ``noaction``: ``terminatejob`` comes after the tasks are
    added (module docstring). A job of several tasks carries the variables they share,
    and its parallelism."""
    job = am.BatchJobCreateOptions(
        id=task.provider_job_id, pool_info=am.BatchPoolInfo(pool_id=pool_id),
        all_tasks_complete_mode="noaction",
        metadata=[am.BatchMetadataItem(name=k, value=v) for k, v in job_labels(task).items()])
    spec = task.spec
    if spec.is_array:
        job.common_environment_settings = _env(job_environment(task))
        if 0 < spec.parallelism < spec.task_count:
            job.max_parallel_tasks = spec.parallelism
    return job


def build_task(task: ProviderTask, registry: Registry | None = None,
               index: int | None = None) -> am.BatchTaskCreateOptions:
    """The task for one execution (``index`` None), or task ``index`` of a job of several
    tasks, whose other variables are the job's (``array_tasks``): every field Jennah
    promises (docs/providers.md)."""
    spec, res = task.spec, resolve(task.spec)
    # Batch would retry only non-zero exits, which Jennah never retries (module docstring).
    constraints = am.BatchTaskConstraints(max_task_retry_count=0)
    if res.max_run_duration_seconds:
        constraints.max_wall_clock_time = timedelta(seconds=res.max_run_duration_seconds)
    container = am.BatchTaskContainerSettings(
        image_name=spec.image_uri, working_directory="containerImageDefault",
        container_run_options=f"--cpus={res.vcpus} --memory={res.memory_mib}m")
    if registry is not None and registry.serves(spec.image_uri):
        container.registry = registry.reference()
    if index is None:
        task_id = task_id_for(task.provider_job_id)
        env = {**job_environment(task), **task_environment(0, 1)}
    else:
        task_id, env = array_task_id(index), task_environment(index, spec.task_count)
    return am.BatchTaskCreateOptions(
        id=task_id, command_line=shlex.join(spec.commands), container_settings=container,
        environment_settings=_env(env), constraints=constraints,
    )


def array_tasks(task: ProviderTask, registry: Registry | None,
                indexes: Sequence[int]) -> list[dict[str, Any]]:
    """Tasks ``indexes`` of a job of several tasks, as JSON: one task built by
    ``build_task``, copied with each one's id and variables (building an SDK model per
    task costs fifteen times as much, for 10,000 tasks most of a second)."""
    template = build_task(task, registry, 0).as_dict()
    count = task.spec.task_count
    return [{**template, "id": array_task_id(i), "environmentSettings": [
        {"name": k, "value": v} for k, v in task_environment(i, count).items()]}
        for i in indexes]


def tasks_per_add(body: Mapping[str, Any]) -> int:
    """How many tasks like ``body`` one add-task-collection call takes (1 to 100)."""
    size = len(json.dumps(body)) + 2
    return max(1, min(MAX_TASKS_PER_ADD, ADD_BODY_BUDGET // size))


# A task or job as the service sends it (JSON field names): the raw pages of a task list,
# or an SDK model read as the mapping it also is. Mapping raw fields costs a fifteenth of
# the SDK's model attributes, which matters for a job of 10,000 tasks (module docstring).
Wire = Mapping[str, Any]


def _at(value: Any) -> datetime | None:
    """A wire timestamp (ISO 8601; Batch sends up to 7 fractional digits)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _duration(value: Any) -> timedelta | None:
    """A wire duration (ISO 8601, ``PT1H30M``)."""
    if value is None or isinstance(value, timedelta):
        return value
    parsed = isodate.parse_duration(str(value))
    return parsed if isinstance(parsed, timedelta) else None


def _info(item: Wire | None) -> Wire:
    return (item.get("executionInfo") if item is not None else None) or {}


def task_status(task: Wire, job: Wire | None) -> ProviderStatus:
    """Map a task (and, when it was read, its job) to a ``ProviderStatus``."""
    raw = _text(task.get("state"))
    info = _info(task)
    exit_code = info.get("exitCode")
    failure = info.get("failureInfo") or {}
    started, ended = _at(info.get("startTime")), _at(info.get("endTime"))
    message = str(failure.get("message") or "") or raw
    if raw == "completed" and exit_code == 0:
        return ProviderStatus(JobStatus.COMPLETED, raw, 0, None, message, started, ended)
    if was_cancelled(job):
        end = ended or _at(_info(job).get("endTime"))
        return ProviderStatus(JobStatus.CANCELLED, f"{raw}/terminated", exit_code, None,
                              "cancelled", started, end)
    if raw == "completed":
        return ProviderStatus(JobStatus.FAILED, raw, exit_code,
                              failure_class(task, exit_code, failure), message, started, ended)
    return ProviderStatus(AZURE_TASK_STATES.get(raw), raw, None, None, message, started, None)


def may_be_cancelled(task: Wire) -> bool:
    """Whether only the task's job can tell if the task was cancelled: a queued task
    stays queued in a terminated job, and a cancel ends a running one with an error. A
    running or succeeded task is what it says."""
    state = _text(task.get("state"))
    return state != "running" and not (state == "completed"
                                       and _info(task).get("exitCode") == 0)


def was_cancelled(job: Wire | None) -> bool:
    return _info(job).get("terminateReason") == CANCEL_REASON


def task_state(index: int, task: Wire, job: Wire | None) -> TaskState | None:
    """Task ``index`` of a job of several tasks, mapped as a plain job's task is
    (``task_status``); None for a state we do not know."""
    st = task_status(task, job)
    if st.state is None:
        return None
    status = task_status_of_job(st.state)
    info = _info(task)
    return TaskState(index=index, status=status, exit_code=st.exit_code,
                     attempt=(info.get("retryCount") or 0) + (info.get("requeueCount") or 0),
                     started_at=st.started_at,
                     completed_at=st.completed_at if status.terminal else None,
                     error_message=st.message if status is TaskStatus.FAILED else "",
                     failure_class=st.failure_class)


def failure_class(task: Wire, exit_code: int | None, failure: Wire) -> FailureClass:
    """Why a completed task failed: server error, run limit, exit code, in that order."""
    category = _text(failure.get("category"))
    if category == "servererror":
        return FailureClass.INFRASTRUCTURE
    info = _info(task)
    limit = _duration((task.get("constraints") or {}).get("maxWallClockTime"))
    start, end = _at(info.get("startTime")), _at(info.get("endTime"))
    if limit and start and end and end - start >= limit - timedelta(seconds=1):
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
    # Tasks: Batch documents no limit on the tasks of a job ("Batch service quotas and
    # limits", https://learn.microsoft.com/azure/batch/batch-quota-limit, limits only
    # active jobs, pools and cores), so Jennah's own 10,000 is the limit; one
    # add-task-collection call takes at most 100 of them (MAX_TASKS_PER_ADD).
    capabilities = Capabilities(max_status_batch=100,
                                poll_interval_seconds=10.0, supports_output=True,
                                submit_rate=SUBMIT_RATE,
                                reserved_label_keys=JENNAH_METADATA, machine_type=False,
                                boot_disk=False, service_account=False,
                                spot=False, accelerator_type=False, accelerator_count=False,
                                max_task_count=MAX_TASK_COUNT, parallelism=True,
                                tasks_per_call=MAX_TASKS_PER_ADD)

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
        client = BatchClient(s.endpoint, credential, retry_total=0, api_version=API_VERSION)
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

    def _target(self, path: str) -> Target | None:
        """What ``path`` (one of ours, or None) names: ``<endpoint>/jobs/<job>/tasks/<task>``
        or ``<endpoint>/jobs/<job>/tasks?taskCount=N``."""
        prefix = f"{self.endpoint}/jobs/"
        if not path.startswith(prefix):
            return None
        rest = path[len(prefix):]
        array = _ARRAY_PATH.match(rest)
        if array is not None:
            return Target(array.group("job"), None, int(array.group("count")))
        parts = rest.split("/")
        if len(parts) != 3 or parts[1] != "tasks" or not all(parts) or "?" in rest:
            return None
        return Target(parts[0], parts[2])

    # --- submit -----------------------------------------------------------------------

    def submit(self, task: ProviderTask) -> str:
        """Create the job (``noaction``), add its task(s), then engage ``terminatejob``;
        each step adopts what a previous attempt did (module docstring)."""
        if task.spec.is_array:
            return self._submit_array(task)
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

    def _submit_array(self, task: ProviderTask) -> str:
        """The job, its N tasks in collections, then ``terminatejob``. Each call is
        retried on its own: a repeated collection finds its earlier tasks ``TaskExists``.
        Only a job that existed already is listed, to add just the tasks it lacks."""
        job_id, count = task.provider_job_id, task.spec.task_count
        job = build_job(task, self.pool_id)
        created = self._call("create_job", partial(_created, lambda: self.client.create_job(job)))
        have = set() if created else self._task_ids(job_id)
        missing = [i for i in range(count) if array_task_id(i) not in have]
        bodies = array_tasks(task, self.registry, missing)
        per_call = tasks_per_add(bodies[-1]) if bodies else 1
        for start in range(0, len(bodies), per_call):
            chunk = bodies[start:start + per_call]
            if not self._call("add_task_collection", partial(self._add_tasks, job_id, chunk)):
                break  # the job is over (cancelled): nothing more to add
        engage = am.BatchJobUpdateOptions(all_tasks_complete_mode="terminatejob")
        self._call("update_job", lambda: _unless(
            JOB_OVER_CODES, lambda: self.client.update_job(job_id, engage)))
        return f"{self.endpoint}/jobs/{job_id}/tasks?taskCount={count}"

    def _task_ids(self, job_id: str) -> set[str]:
        return {str(t.get("id")) for t in self._list_tasks(job_id, ["id"])}

    def _list_tasks(self, job_id: str, select: Sequence[str]) -> list[Wire]:
        """Every task of the job, ``select`` fields only, as JSON: ``GET /jobs/{job}/tasks``
        page by page through ``BatchClient.send_request``, because the SDK's ``list_tasks``
        turns each task into models, 15 times the CPU of the rest of ``status`` (the
        client's pipeline still signs the requests and raises ``HttpResponseError`` for
        an error status, as for its own calls). The listing is retried from its start."""
        version = {"api-version": API_VERSION}
        first = HttpRequest("GET", f"{self.endpoint}/jobs/{quote(job_id, safe='')}/tasks",
                            params={**version, "maxresults": LIST_PAGE,
                                    "$select": ",".join(select)})

        def pages() -> list[Wire]:
            out: list[Wire] = []
            request: HttpRequest | None = first
            while request is not None:
                body = self.client.send_request(request).json()
                out.extend(body.get("value") or ())
                link = body.get("odata.nextLink")
                request = HttpRequest("GET", link, params=version) if link else None
            return out

        return self._call("list_tasks", pages)

    def _add_tasks(self, job_id: str, chunk: list[dict[str, Any]]) -> bool:
        """Add ``chunk`` (add-task-collection, as JSON like the listing): True when every
        task is in (added now or before), False when the job is over;
        ``ProviderUnavailable`` when a task may be missing, with ``chunk`` cut down to
        those tasks, so that the retry sends only them."""
        try:
            response = self.client.send_request(HttpRequest(
                "POST", f"{self.endpoint}/jobs/{quote(job_id, safe='')}/addtaskcollection",
                params={"api-version": API_VERSION}, content=json.dumps({"value": chunk}),
                headers={"content-type": "application/json; odata=minimalmetadata"}))
        except HttpResponseError as exc:
            if error_code(exc) in JOB_OVER_CODES:
                return False
            raise
        results = {r.get("taskId"): r for r in response.json().get("value") or ()}
        retry: list[str] = []
        for body in chunk:
            result = results.get(body["id"]) or {}
            error = result.get("error") or {}
            code = str(error.get("code") or "")
            status = _text(result.get("status"))
            if status == "success" or code == "TaskExists":
                continue
            if status == "clienterror":
                text = (error.get("message") or {}).get("value") or code
                raise ProviderRejected(redact(
                    f"Azure Batch add_task_collection: task {body['id']}: {code}: {text}",
                    self._secrets))
            retry.append(body["id"])  # servererror, or no result at all: try again
        if retry:
            message = (f"Azure Batch add_task_collection: {len(retry)} of {len(chunk)} "
                       f"tasks not added (first {retry[0]})")
            chunk[:] = [body for body in chunk if body["id"] in retry]
            raise ProviderUnavailable(message)
        return True

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
        target = self._target(path)
        if target is None:
            return ProviderStatus(None, "UNKNOWN", message="not a task of this Batch account")
        try:
            if target.task_id is None:
                return self._array_status(target)
            task_id = target.task_id
            task = self._call("get_task", lambda: self.client.get_task(target.job_id, task_id))
            job = self._get_job(target.job_id) if may_be_cancelled(task) else None
        except ProviderRejected as exc:
            if getattr(exc.__cause__, "status_code", None) == 404:
                return ProviderStatus(None, "UNKNOWN", message="no such job or task")
            return exc
        except ProviderError as exc:
            return exc
        return task_status(task, job)

    def _get_job(self, job_id: str) -> am.BatchJob:
        return self._call("get_job", lambda: self.client.get_job(job_id))

    def _array_status(self, target: Target) -> ProviderStatus:
        """The job's tasks, listed in one paged call, and the job when a task may have
        been cancelled (or is not there); a task we cannot map makes the job UNKNOWN."""
        listed = self._list_tasks(target.job_id, TASK_FIELDS)
        by_index = {i: t for t in listed if (i := array_task_index(str(t.get("id")))) is not None
                    and i < target.task_count}
        job = None
        if len(by_index) < target.task_count or any(map(may_be_cancelled, by_index.values())):
            job = self._get_job(target.job_id)
        tasks = []
        for index, task in sorted(by_index.items()):
            state = task_state(index, task, job)
            if state is None:
                return ProviderStatus(None, "UNKNOWN", message=f"task {index} is in state "
                                      f"{_text(task.get('state'))!r}, which Jennah does not know")
            tasks.append(state)
        if not was_cancelled(job):
            return status_from_tasks(target.task_count, tasks)
        # Never added (the cancel came during the submit): cancelled with the job.
        ended = _at(_info(job).get("endTime"))
        tasks += [TaskState(i, TaskStatus.CANCELLED, completed_at=ended)
                  for i in range(target.task_count) if i not in by_index]
        return status_from_tasks(target.task_count, tasks, raw_state="terminated")

    # --- cancel -----------------------------------------------------------------------

    def cancel(self, resource_path: str) -> None:
        """Terminate the job: its running tasks end, its queued ones never start."""
        target = self._target(resource_path)
        if target is None:
            return
        options = BatchJobTerminateOptions(termination_reason=CANCEL_REASON)

        def once() -> None:
            try:
                with self._vendor("terminate_job"):
                    poller = self.client.begin_terminate_job(
                        target.job_id, options, polling_interval=self.lro_poll_seconds)
                    poller.result(timeout=self.cancel_timeout)  # type: ignore[no-untyped-call]
            except ProviderRejected as exc:
                # Unknown (404) or already completed/terminating (409): nothing to stop.
                if getattr(exc.__cause__, "status_code", None) not in (404, 409):
                    raise
                return
            if not poller.done() or poller.status() == "Failed":
                raise ProviderUnavailable(
                    f"Azure Batch terminate of {target.job_id} did not finish")

        self.retry.call("azure cancel", once)

    # --- output -----------------------------------------------------------------------

    def read_output(self, resource_path: str, offsets: tuple[int, int],
                    task_index: int = 0) -> OutputChunk:
        """New stdout/stderr text after the byte ``offsets`` into the ``stdout.txt``/
        ``stderr.txt`` of the task (task ``task_index`` of a job of several tasks): whole
        lines only until the task has completed, invalid UTF-8 replaced.

        Cost per call, bounded: one ``list_task_files`` (both lengths), then one ranged
        read of at most ``OUTPUT_CAP`` bytes per file that grew. Only when a file ends in
        a partial line is the task read (``get_task``): if it has completed, its files no
        longer grow, and they are read once more so that the last line goes out whole.
        A task not started yet, or whose files are gone with its node, has no output."""
        target = self._target(resource_path)
        task_id = target.task(task_index) if target is not None else None
        if target is None or task_id is None:
            return OutputChunk(offsets=offsets)
        ids = (target.job_id, task_id)
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


def _created(fn: Callable[[], object]) -> bool:
    """Call ``fn``, a create: False when it already existed (409 ``JobExists``)."""
    try:
        fn()
    except HttpResponseError as exc:
        if error_code(exc) != "JobExists":
            raise
        return False
    return True


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

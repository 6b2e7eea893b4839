"""AWS Batch (boto3): one Batch job per Jennah execution, on ``AWS_JOB_QUEUE`` (or
``AWS_SPOT_JOB_QUEUE`` for a spot job) with ``AWS_JOB_DEFINITION``; the image comes from
the job definition, everything else from container overrides.

**Resource path**: the job ARN (``arn:aws:batch:R:A:job/<job id>``).

**Exactly once** (docs/design.md §4): AWS Batch does not dedupe job names, so before submitting
the provider looks the name (the deterministic provider job id) up in the queue
(``ListJobs`` with a ``JOB_NAME`` filter), and adopts a job that carries our
``jennah-job-id`` tag. Within one process a striped lock serialises look-up and submit per
name, so concurrent submits of one execution start it once. Across workers the job lease
already makes submits of one execution sequential. (``ListJobs`` can lag a just-submitted
job by a moment; docs/providers.md discusses the window.)

**What SubmitJob may ask** (``capabilities``, checked by ``check_spec`` before anything is
stored; docs/providers.md cites the AWS pages):

* Tags: AWS allows 50 per resource and ours (``job_labels``' three ``jennah-*`` keys)
  count, so a job carries at most 47 labels. ``aws:`` in any case is AWS's own prefix,
  and our own keys are reserved (a label would silently lose to them).
* ``machine_type``: refused. A Batch job cannot choose an instance type; the compute
  environments of its queue do.
* ``use_spot_vms``: honoured by submitting to ``AWS_SPOT_JOB_QUEUE`` (a queue whose compute
  environments are SPOT); refused when that setting is empty.
* GPUs: ``accelerator_count`` becomes a ``GPU`` resource requirement; the GPU type cannot be
  chosen per job (the compute environment's instance types decide), so it is refused.

**Fair share**: a queue with a scheduling policy requires ``shareIdentifier`` on every
SubmitJob, and a queue without one refuses it (and ``schedulingPriorityOverride``). The
provider asks ``DescribeJobQueues`` whether the queue has a policy (cached like the job
definitions) and, if so, sends the tenant's share identifier (``share_identifier``) and
its ``schedulingPriorityOverride`` when ``AWS_SCHEDULING_PRIORITY`` names one.

**Image**: SubmitJob cannot override a job definition's image, so for a job whose image
differs from ``AWS_JOB_DEFINITION``'s, the provider registers a copy of that definition
with the job's image, named ``<definition>-img-<sha256 of the image>`` and tagged with the
base revision it copies and when it was registered; it reuses an existing copy of the
same base revision. Definitions and queue facts are cached for
``AWS_JOB_DEFINITION_CACHE_SECONDS`` (so a new base revision is picked up without a
restart); a submit refused because a cached revision was deregistered meanwhile resolves
again and retries once. ``cleanup_definitions`` deregisters old copies.

**Submit rate** (``Capabilities.submit_rate``, spent by ``worker/admission.py`` and shared
by the live workers): 50 a second, AWS Batch's ``SubmitJob`` quota per account and
region.

**Output**: read from CloudWatch Logs (``read_output``, whose docstring gives the offset
encoding and the cost per call).

**Status**: ``DescribeJobs`` in batches of 100. **Cancel**: ``TerminateJob`` with a reason
of our own; a job that AWS reports FAILED with that reason is CANCELLED to us.

**Jobs of several tasks** (docs/design.md §16; docs/providers.md, "Jobs of several tasks
on AWS"): a job of N > 1 tasks is one array job, ``arrayProperties.size`` N (AWS takes 2
to 10,000), whose child ``<job id>:<i>`` is task i. AWS sets ``AWS_BATCH_JOB_ARRAY_INDEX``
in each child; the command is wrapped (``task_command``) so that a POSIX shell exports it
as ``JENNAH_TASK_INDEX`` before running the job's own command; ``JENNAH_TASK_COUNT`` is in
the environment (a plain job gets ``JENNAH_TASK_INDEX=0`` and ``JENNAH_TASK_COUNT=1``
there, unwrapped). AWS runs an array's children as capacity allows, with no limit of
their own, so ``spec.parallelism`` below the task count is refused (``capabilities``).
Each child is retried by AWS (``task_retry_strategy``) for the retryable failure classes.
``status`` of an array job reads its children (``_array_status``: only when the parent's
``statusSummary`` changed, listing by status and describing only the children that
changed); ``cancel`` terminates the parent, which terminates every child; ``read_output``
reads the child's own log streams.

Vendor errors never leave this module: botocore ``ClientError`` and connection errors
become ``ProviderUnavailable`` (429, ``Throttling*``, 5xx, connection: retried here first,
see ``providers/retry.py``; botocore's own retries are off), ``ProviderQuotaExceeded`` or
``ProviderRejected``.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import boto3
import botocore.config
import botocore.exceptions as bexc

from jennah.errors import (
    InvalidArgument,
    ProviderError,
    ProviderQuotaExceeded,
    ProviderRejected,
    ProviderUnavailable,
)
from jennah.models import FailureClass, JobSpec, JobStatus, TaskState, TaskStatus
from jennah.settings import Env, ProviderSettings
from providers.base import (
    Capabilities,
    OutputChunk,
    ProviderStatus,
    ProviderTask,
    check_spec,
)
from providers.resources import (
    JOB_ID_LABEL,
    job_environment,
    job_labels,
    resolve,
    task_index_command,
    task_index_script,
)
from providers.retry import RetryPolicy
from providers.tasks import status_from_tasks

T = TypeVar("T")
K = TypeVar("K")

# docs/design.md §3: AWS Batch job status → Jennah status (checked row by row by the tests).
AWS_STATES: Mapping[str, JobStatus] = {
    "SUBMITTED": JobStatus.SCHEDULED,
    "PENDING": JobStatus.SCHEDULED,
    "RUNNABLE": JobStatus.SCHEDULED,
    "STARTING": JobStatus.RUNNING,
    "RUNNING": JobStatus.RUNNING,
    "SUCCEEDED": JobStatus.COMPLETED,
    "FAILED": JobStatus.FAILED,
}
CANCEL_REASON = "jennah: cancelled by request"
# How a FAILED job is read, first match wins: (statusReason pattern, state, failure class).
# After these rules: a non-zero exit code is user_error, anything else infrastructure.
AWS_FAILED_RULES: Sequence[tuple[re.Pattern[str], JobStatus, FailureClass | None]] = (
    (re.compile("^" + re.escape(CANCEL_REASON)), JobStatus.CANCELLED, None),
    (re.compile(r"^Host EC2 \(instance [^)]*\) terminated"), JobStatus.FAILED,
     FailureClass.PREEMPTED),  # spot reclaim
    (re.compile(r"Job attempt duration exceeded timeout"), JobStatus.FAILED,
     FailureClass.TIMEOUT),
    (re.compile(r"^CannotPullContainerError"), JobStatus.FAILED, FailureClass.USER_ERROR),
)
RETRYABLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "TooManyRequestsException",
    "RequestLimitExceeded", "RequestThrottled", "ServerException", "ServiceUnavailable",
    "InternalFailure", "RequestTimeout", "RequestTimeoutException",
    "ServiceUnavailableException",  # CloudWatch Logs
})
QUOTA_CODES = frozenset({"LimitExceededException", "ServiceQuotaExceededException"})
ARN_RULE = re.compile(r"^arn:aws[a-z-]*:batch:[a-z0-9-]+:\d{12}:job/([A-Za-z0-9:_-]+)$")
DESCRIBE_BATCH = 100
MIN_TIMEOUT_SECONDS = 60  # AWS refuses shorter attemptDurationSeconds
# What a per-image job definition copies from the base definition.
DEFINITION_FIELDS = ("type", "parameters", "containerProperties", "retryStrategy", "timeout",
                     "platformCapabilities", "propagateTags", "schedulingPriority")
# Tags on a per-image copy: the base revision it copies, and when (unix seconds) it was
# registered (DescribeJobDefinitions gives no creation time; cleanup_definitions reads it).
BASE_TAG = "jennah-base-definition"
REGISTERED_TAG = "jennah-registered-at"
DEFINITION_TTL_SECONDS = 300.0

# Tag limits ("Tag restrictions", AWS Batch User Guide): 50 per resource, ours included;
# "aws:" in any upper/lower-case combination is AWS's.
AWS_MAX_TAGS = 50
OWN_TAG_KEYS = frozenset(job_labels(ProviderTask("x", "x", "x", 0, JobSpec(image_uri="x"))))
RESERVED_TAG_PREFIXES = tuple(f"{a}{w}{s}:" for a, w, s in itertools.product("aA", "wW", "sS"))

# CloudWatch Logs: where Batch's awslogs driver writes unless the definition says otherwise.
DEFAULT_LOG_GROUP = "/aws/batch/job"
# read_output cost cap: GetLogEvents calls per read_output call (empty pages included: the
# service may answer an empty page before later events), events per call (AWS's own
# maximum; a response is also capped at 1 MB by AWS).
LOG_PAGES_PER_READ = 3
LOG_EVENTS_PER_PAGE = 10_000
_NON_ALNUM = re.compile(r"[^A-Za-z0-9]")
# (log group, log stream)
LogStream = tuple[str, str]

# --- jobs of several tasks (array jobs) ---
# "Array jobs", AWS Batch User Guide: an array size is 2 to 10,000.
MAX_ARRAY_SIZE = 10_000
# The child's index, as JENNAH_TASK_INDEX, for the job's own command ("$@"). A POSIX shell
# (/bin/sh) in the image is required, and an image ENTRYPOINT gets this as its arguments.
TASK_INDEX_SCRIPT = task_index_script("AWS_BATCH_JOB_ARRAY_INDEX")
# "RetryStrategy", AWS Batch API Reference: attempts is 1 to 10.
MAX_ATTEMPTS = 10
# evaluateOnExit for an array's children, first match wins; no match retries (AWS's
# rule). The same split as AWS_FAILED_RULES and job_status: a reclaimed host is retried
# (preempted); a container that exited (user_error, or timeout's kill), the timeout, an
# image that cannot be pulled and our cancel are not; anything else, a failure without an
# exit code (infrastructure), is. Patterns may hold letters, digits, ".", ":", spaces and
# a final "*" ("EvaluateOnExit", AWS Batch API Reference); at most 5 entries.
TASK_RETRY_RULES: Sequence[Mapping[str, str]] = (
    {"onStatusReason": "Host EC2*", "action": "RETRY"},
    {"onExitCode": "*", "action": "EXIT"},
    {"onStatusReason": "Job attempt duration exceeded timeout*", "action": "EXIT"},
    {"onStatusReason": "CannotPullContainerError*", "action": "EXIT"},
    {"onStatusReason": f"{CANCEL_REASON}*", "action": "EXIT"},
)
# ListJobs page size for an array's children (AWS's maximum for maxResults).
LIST_PAGE = 1_000
# Children's AWS states listed by status(): those that are tasks running, then finished.
ACTIVE_CHILD_STATES = ("STARTING", "RUNNING")
FINAL_CHILD_STATES = ("SUCCEEDED", "FAILED")
# An array whose statusSummary has not changed is still looked at this often (seconds),
# in case children swapped states without changing the counts.
ARRAY_REFRESH_SECONDS = 60.0
# Array jobs whose children a worker keeps in memory (least recently polled forgotten).
ARRAY_VIEWS = 1_000
# A task's state from its child's Jennah state (None: unmapped, pending to us).
_TASK_STATUS: Mapping[JobStatus | None, TaskStatus] = {
    JobStatus.SCHEDULED: TaskStatus.PENDING, JobStatus.RUNNING: TaskStatus.RUNNING,
    JobStatus.COMPLETED: TaskStatus.SUCCEEDED, JobStatus.FAILED: TaskStatus.FAILED,
    JobStatus.CANCELLED: TaskStatus.CANCELLED, None: TaskStatus.PENDING,
}


def translate(exc: Exception, what: str) -> ProviderError:
    """A botocore error as one of ours."""
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        text = f"AWS {what}: {code} ({status}): {err.get('Message', '')}"
        if code in QUOTA_CODES:
            return ProviderQuotaExceeded(text)
        if status == 429 or status >= 500 or code in RETRYABLE_CODES or code.startswith("Throttl"):
            return ProviderUnavailable(text)
        return ProviderRejected(text)
    text = f"AWS {what}: {type(exc).__name__}: {exc}"
    if isinstance(exc, bexc.ParamValidationError | bexc.NoRegionError):
        return ProviderRejected(text)
    return ProviderUnavailable(text)  # connection errors, timeouts, credentials not yet there


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (or of the one behind ours)."""
    cause = exc if isinstance(exc, bexc.ClientError) else exc.__cause__
    if isinstance(cause, bexc.ClientError):
        return str(cause.response.get("Error", {}).get("Code", ""))
    return ""


def make_client(region: str, endpoint_url: str = "", service: str = "batch",
                **kwargs: Any) -> Any:
    """A Batch (or CloudWatch ``logs``) client with botocore's retries off
    (``providers/retry.py`` retries)."""
    config = botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                    connect_timeout=5, read_timeout=30)
    return boto3.session.Session().client(service, region_name=region,
                                          endpoint_url=endpoint_url or None, config=config,
                                          **kwargs)


def share_identifier(tenant_id: str, configured: Mapping[str, str]) -> str:
    """The fair-share identifier of a tenant's jobs: ``AWS_SHARE_IDENTIFIER``'s entry for
    the tenant, else its ``*`` entry, else the tenant id without its hyphens (AWS takes
    only letters and digits; two tenants that differ only by hyphens then share, which an
    explicit entry avoids)."""
    return configured.get(tenant_id) or configured.get("*") or _NON_ALNUM.sub("", tenant_id)


def submit_request(task: ProviderTask, queue: str, definition: str,
                   fair_share: Mapping[str, Any] | None = None,
                   definition_command: Sequence[str] = ()) -> dict[str, Any]:
    """The SubmitJob parameters for one execution: every field Jennah promises.
    ``definition_command``: the job definition's own command, which a job of several
    tasks without commands runs (wrapped, ``task_command``)."""
    spec, res = task.spec, resolve(task.spec)
    requirements = [{"type": "VCPU", "value": res.vcpus},
                    {"type": "MEMORY", "value": str(res.memory_mib)}]
    if spec.accelerator_count:
        requirements.append({"type": "GPU", "value": str(spec.accelerator_count)})
    environment = {**job_environment(task), "JENNAH_TASK_COUNT": str(spec.task_count)}
    if not spec.is_array:
        environment["JENNAH_TASK_INDEX"] = "0"
    overrides: dict[str, Any] = {
        "environment": [{"name": k, "value": v} for k, v in environment.items()],
        "resourceRequirements": requirements,
    }
    if spec.is_array:
        overrides["command"] = task_command(spec.commands or definition_command)
    elif spec.commands:
        overrides["command"] = list(spec.commands)
    request: dict[str, Any] = {
        "jobName": task.provider_job_id, "jobQueue": queue, "jobDefinition": definition,
        "containerOverrides": overrides, "tags": job_labels(task), "propagateTags": True,
        "retryStrategy": task_retry_strategy(spec), **(fair_share or {}),
    }
    if spec.is_array:
        request["arrayProperties"] = {"size": spec.task_count}
    if res.max_run_duration_seconds:  # for an array, each child's (AWS's rule)
        request["timeout"] = {
            "attemptDurationSeconds": max(MIN_TIMEOUT_SECONDS, res.max_run_duration_seconds)}
    return request


def task_command(commands: Sequence[str]) -> list[str]:
    """The command of an array's children: ``commands`` run by a shell that has exported
    ``JENNAH_TASK_INDEX`` from AWS's ``AWS_BATCH_JOB_ARRAY_INDEX`` (``exec``, so the exit
    code and signals are the command's own)."""
    if not commands:
        raise ProviderRejected(
            "commands: a job of several tasks on AWS needs a command (or one in the job "
            "definition), which is run so that each task sees JENNAH_TASK_INDEX")
    return task_index_command(TASK_INDEX_SCRIPT, commands)


def task_retry_strategy(spec: JobSpec) -> dict[str, Any]:
    """``retryStrategy`` of a job. A plain job gets one attempt: Jennah retries it as a new
    execution. An array's children are retried by AWS, each on its own, for the
    retryable failure classes, up to ``max_retries`` (AWS allows 10 attempts, so at most
    9 retries a task)."""
    if not spec.is_array or not spec.max_retries:
        return {"attempts": 1}
    return {"attempts": min(MAX_ATTEMPTS, 1 + spec.max_retries),
            "evaluateOnExit": [dict(rule) for rule in TASK_RETRY_RULES]}


def image_definition_name(base_name: str, image: str) -> str:
    return f"{base_name[:100]}-img-{hashlib.sha256(image.encode()).hexdigest()[:16]}"


class TtlCache(Generic[K, T]):
    """Values loaded on demand and kept for ``ttl`` seconds (of ``clock``). Loads run under
    one lock, so concurrent misses of a key load it once."""

    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.clock = clock
        self._items: dict[K, tuple[float, T]] = {}
        self._lock = threading.Lock()

    def get(self, key: K, load: Callable[[], T]) -> T:
        with self._lock:
            now = self.clock()
            hit = self._items.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                return hit[1]
            value = load()
            self._items[key] = (now, value)
            return value

    def forget(self, key: K | None = None) -> None:
        """Drop ``key`` (``None``: everything)."""
        with self._lock:
            if key is None:
                self._items.clear()
            else:
                self._items.pop(key, None)


class JobDefinitions:
    """The job definition for each image: the base one, or a registered copy of it."""

    def __init__(self, client: Any, base: str, ttl: float = DEFINITION_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], float] = time.time) -> None:
        self.client = client
        self.base = base
        self.now = now
        self._base: TtlCache[str, dict[str, Any]] = TtlCache(ttl, clock)
        self._by_image: TtlCache[str, str] = TtlCache(ttl, clock)

    def for_image(self, image: str) -> str:
        return self._by_image.get(image, lambda: self._resolve(image))

    def refresh(self, image: str, used: str) -> bool:
        """Forget what is cached for ``image``; True if it now resolves to another
        definition than ``used`` (for instance, ``used`` was deregistered)."""
        self._base.forget()
        self._by_image.forget(image)
        return self.for_image(image) != used

    def _resolve(self, image: str) -> str:
        base = self.base_definition()
        if not image or base.get("containerProperties", {}).get("image") == image:
            return self.base
        base_arn = str(base["jobDefinitionArn"])
        name = image_definition_name(str(base["jobDefinitionName"]), image)
        found = [d for d in self._describe(jobDefinitionName=name, status="ACTIVE")
                 if d.get("containerProperties", {}).get("image") == image
                 and (d.get("tags") or {}).get(BASE_TAG) == base_arn]
        if found:
            return str(max(found, key=lambda d: d["revision"])["jobDefinitionArn"])
        copy = {k: base[k] for k in DEFINITION_FIELDS if k in base}
        copy["containerProperties"] = {**copy.get("containerProperties", {}), "image": image}
        copy["tags"] = {BASE_TAG: base_arn, REGISTERED_TAG: str(int(self.now()))}
        made = self.client.register_job_definition(jobDefinitionName=name, **copy)
        return str(made["jobDefinitionArn"])

    def base_definition(self) -> dict[str, Any]:
        def load() -> dict[str, Any]:
            by_name = ":" not in self.base  # a bare name means its latest active revision
            found = (self._describe(jobDefinitionName=self.base, status="ACTIVE") if by_name
                     else self._describe(jobDefinitions=[self.base]))
            if not found:
                raise ProviderRejected(f"AWS Batch job definition {self.base!r} not found")
            return max(found, key=lambda d: d["revision"])
        return self._base.get("", load)

    def cleanup(self, older_than_seconds: float) -> list[str]:
        """Deregister the ACTIVE per-image copies of the base definition registered more
        than ``older_than_seconds`` ago (copies without our registration tag predate it
        and count as old); return their ARNs. Jobs already submitted keep running; the
        next job for such an image registers a fresh copy."""
        prefix = re.compile(
            re.escape(str(self.base_definition()["jobDefinitionName"])[:100])
            + r"-img-[0-9a-f]{16}")
        cutoff = self.now() - older_than_seconds
        gone = []
        for d in self._describe(status="ACTIVE"):
            if not prefix.fullmatch(str(d.get("jobDefinitionName", ""))):
                continue
            try:
                registered = float((d.get("tags") or {}).get(REGISTERED_TAG, "0"))
            except ValueError:
                registered = 0.0
            if registered < cutoff:
                self.client.deregister_job_definition(jobDefinition=d["jobDefinitionArn"])
                gone.append(str(d["jobDefinitionArn"]))
        self._by_image.forget()
        return gone

    def _describe(self, **query: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = self.client.describe_job_definitions(**query)
            out += page.get("jobDefinitions", [])
            if not page.get("nextToken"):
                return out
            query["nextToken"] = page["nextToken"]


def job_status(job: Mapping[str, Any]) -> ProviderStatus:
    """Map one ``DescribeJobs`` entry to a ``ProviderStatus``."""
    raw = str(job.get("status", ""))
    reason = str(job.get("statusReason", ""))
    container = job.get("container") or {}
    attempts = job.get("attempts") or [{}]
    exit_code = container.get("exitCode", (attempts[-1].get("container") or {}).get("exitCode"))
    state, fc = AWS_STATES.get(raw), None
    if raw == "SUCCEEDED" and exit_code is None:
        exit_code = 0
    if raw == "FAILED":
        for pattern, rule_state, rule_class in AWS_FAILED_RULES:
            if pattern.search(reason):
                state, fc = rule_state, rule_class
                break
        else:
            fc = FailureClass.USER_ERROR if exit_code else FailureClass.INFRASTRUCTURE
    return ProviderStatus(state=state, raw_state=raw, exit_code=exit_code, failure_class=fc,
                          message=reason or raw.lower(), started_at=_ms(job.get("startedAt")),
                          completed_at=_ms(job.get("stoppedAt")))


def log_streams(job: Mapping[str, Any]) -> tuple[LogStream, ...]:
    """(log group, log stream) of each attempt of a ``DescribeJobs`` entry, oldest first,
    then the current attempt's ("each container attempt receives a log stream name when
    they reach the RUNNING status", ContainerDetail); empty while it has none (before
    RUNNING) or when its container does not log to CloudWatch (another driver)."""
    container = job.get("container") or {}
    config = container.get("logConfiguration") or {}
    if config.get("logDriver", "awslogs") != "awslogs":
        return ()
    group = str((config.get("options") or {}).get("awslogs-group") or DEFAULT_LOG_GROUP)
    names = [(a.get("container") or {}).get("logStreamName") for a in job.get("attempts") or []]
    names.append(container.get("logStreamName"))
    return tuple((group, str(name)) for name in dict.fromkeys(names) if name)


def task_state(index: int, child: Mapping[str, Any]) -> TaskState:
    """Task ``index`` from its child job's ``DescribeJobs`` entry, read as a plain job is
    (``job_status``). ``attempts`` lists the attempts that ended, so a finished task's
    attempt is one less than their number, and a running or waiting one's is their
    number."""
    st = job_status(child)
    status = _TASK_STATUS[st.state]
    ended = len(child.get("attempts") or [])
    failed = status in (TaskStatus.FAILED, TaskStatus.CANCELLED)
    return TaskState(
        index=index, status=status,
        exit_code=st.exit_code if status.terminal else None,
        attempt=max(0, ended - 1) if status.terminal else ended,
        started_at=st.started_at if status is not TaskStatus.PENDING else None,
        completed_at=st.completed_at if status.terminal else None,
        error_message=st.message if failed else "",
        failure_class=st.failure_class if status is TaskStatus.FAILED else None,
    )


def _child_index(job: Mapping[str, Any]) -> int | None:
    """The array index of a child job (``<parent id>:<index>``; None for another job)."""
    index = (job.get("arrayProperties") or {}).get("index")
    job_id = str(job.get("jobId", ""))
    if index is None and ":" in job_id:  # moto's listings carry no arrayProperties
        index = job_id.rsplit(":", 1)[1]
    try:
        return None if index is None else int(index)
    except ValueError:
        return None


@dataclass
class ArrayView:
    """What a worker knows of an array job's children (``AwsBatchProvider.status``)."""

    summary: dict[str, int]  # the parent's statusSummary when this was read
    parent_status: str
    raw: dict[int, str]  # child index → its AWS state when last seen
    tasks: dict[int, TaskState]  # child index → its task, for those seen started
    at: float  # when it was read (the provider's clock)

    def running(self) -> bool:
        return any(s in ACTIVE_CHILD_STATES for s in self.raw.values())


def _ms(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value / 1000, UTC) if isinstance(value, int | float) else None


# Account-wide submits per second: AWS Batch SubmitJob takes 50 transactions a
# second per account and region (service quotas).
SUBMIT_RATE = 50.0


# Fair-share identifiers and scheduling priorities, as AWS Batch takes them.
SHARE_ID = re.compile(r"[A-Za-z0-9]{1,255}")
PRIORITY = re.compile(r"[0-9]{1,4}")


@dataclass(frozen=True)
class AwsSettings:
    """``BATCH_PROVIDER=aws``'s variables (docs/providers.md, AWS Batch)."""

    job_queue: str
    job_definition: str
    region: str
    endpoint_url: str = ""
    # AWS_SPOT_JOB_QUEUE: the queue (SPOT compute environments) for jobs with
    # use_spot_vms; empty: such jobs are refused.
    spot_job_queue: str = ""
    # AWS_SHARE_IDENTIFIER: fair-share identifier per tenant, ``tenant=share;*=default``
    # (used only on queues with a scheduling policy; share_identifier below).
    share_identifiers: Mapping[str, str] = field(default_factory=dict)
    # AWS_SCHEDULING_PRIORITY: schedulingPriorityOverride per tenant, ``tenant=N;*=N``.
    scheduling_priorities: Mapping[str, int] = field(default_factory=dict)
    # AWS_JOB_DEFINITION_CACHE_SECONDS: how long job definitions and queue facts are cached.
    definition_cache_seconds: float = DEFINITION_TTL_SECONDS

    @classmethod
    def from_env(cls, e: Env) -> AwsSettings:
        e.require(("AWS_JOB_QUEUE", "AWS_JOB_DEFINITION", "BATCH_REGION|AWS_REGION"),
                  "BATCH_PROVIDER=aws")
        shares = e.tenant_map("AWS_SHARE_IDENTIFIER", SHARE_ID, "letters/digits")
        priorities = e.tenant_map("AWS_SCHEDULING_PRIORITY", PRIORITY, "0-9999")
        return cls(
            job_queue=e.text("AWS_JOB_QUEUE"), job_definition=e.text("AWS_JOB_DEFINITION"),
            region=e.region(), endpoint_url=e.text("AWS_ENDPOINT_URL"),
            spot_job_queue=e.text("AWS_SPOT_JOB_QUEUE"), share_identifiers=shares,
            scheduling_priorities={k: int(v) for k, v in priorities.items()},
            definition_cache_seconds=e.number("AWS_JOB_DEFINITION_CACHE_SECONDS",
                                              DEFINITION_TTL_SECONDS, float),
        )


class AwsBatchProvider:
    """AWS Batch, through an injected boto3 ``batch`` client (and a ``logs`` client for
    output; without one, ``supports_output`` is False)."""

    name = "aws"
    settings_class = AwsSettings

    def __init__(self, client: Any, *, job_queue: str, job_definition: str,
                 retry: RetryPolicy | None = None, remember: int = 10_000,
                 logs_client: Any = None, spot_job_queue: str = "",
                 share_identifiers: Mapping[str, str] | None = None,
                 scheduling_priorities: Mapping[str, int] | None = None,
                 definition_ttl: float = DEFINITION_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], float] = time.time) -> None:
        self.client = client
        self.logs = logs_client
        self.job_queue = job_queue
        self.spot_job_queue = spot_job_queue
        self.job_definition = job_definition
        self.share_identifiers = dict(share_identifiers or {})
        self.scheduling_priorities = dict(scheduling_priorities or {})
        self.capabilities = Capabilities(
            max_status_batch=DESCRIBE_BATCH, poll_interval_seconds=10.0,
            submit_rate=SUBMIT_RATE,
            supports_output=logs_client is not None,
            max_labels=AWS_MAX_TAGS - len(OWN_TAG_KEYS),
            reserved_label_prefixes=RESERVED_TAG_PREFIXES, reserved_label_keys=OWN_TAG_KEYS,
            # The job definition's role and the compute environment's launch template
            # decide these; a job cannot choose them.
            machine_type=False, spot=bool(spot_job_queue), accelerator_type=False,
            accelerator_count=True, boot_disk=False, service_account=False,
            # One array job of up to 10,000 children, made by one SubmitJob; AWS has no
            # limit on how many of them run at a time.
            max_task_count=MAX_ARRAY_SIZE, parallelism=False, tasks_per_call=None)
        self.definitions = JobDefinitions(client, job_definition, definition_ttl, clock, now)
        self._fair_share_queues: TtlCache[str, bool] = TtlCache(definition_ttl, clock)
        self.retry = retry or RetryPolicy()
        self._stripes = [threading.Lock() for _ in range(64)]
        # Executions this process submitted: name → ARN (bounded; a miss falls back to
        # the ListJobs look-up, so forgetting is safe).
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._remember = remember
        self._recent_lock = threading.Lock()
        # Output, by (job id, task index): the log streams of its attempts, once known;
        # and where the last read ended: (offset, stream, forward token) (a miss re-seeks
        # from the head, see read_output). The event counts of finished attempts' streams.
        # All bounded.
        self._log_streams: OrderedDict[tuple[str, int], tuple[LogStream, ...]] = OrderedDict()
        self._log_tokens: OrderedDict[tuple[str, int], tuple[int, int, str]] = OrderedDict()
        self._log_lengths: OrderedDict[LogStream, int] = OrderedDict()
        self._log_lock = threading.Lock()
        # Array jobs: what this worker knows of their children (status), by job id.
        self._clock = clock
        self._arrays: OrderedDict[str, ArrayView] = OrderedDict()
        self._arrays_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> AwsBatchProvider:
        s = settings.read(AwsSettings.from_env)
        client = make_client(s.region, s.endpoint_url)
        logs = make_client(s.region, s.endpoint_url, service="logs")
        return cls(client, job_queue=s.job_queue, job_definition=s.job_definition,
                   logs_client=logs, spot_job_queue=s.spot_job_queue,
                   share_identifiers=s.share_identifiers,
                   scheduling_priorities=s.scheduling_priorities,
                   definition_ttl=s.definition_cache_seconds)

    @contextmanager
    def _vendor(self, what: str) -> Iterator[None]:
        try:
            yield
        except (bexc.ClientError, bexc.BotoCoreError) as exc:
            raise translate(exc, what) from exc

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            with self._vendor(what):
                return fn()
        return self.retry.call(f"aws {what}", once)

    # --- submit -----------------------------------------------------------------------

    def queue_for(self, spec: JobSpec) -> str:
        return self.spot_job_queue if spec.use_spot_vms else self.job_queue

    def submit(self, task: ProviderTask) -> str:
        try:  # SubmitJob checked it; a job stored before a settings change may not pass
            check_spec(self.name, self.capabilities, task.spec)
        except InvalidArgument as exc:
            raise ProviderRejected(str(exc)) from exc
        name = task.provider_job_id
        queue = self.queue_for(task.spec)
        with self._stripes[hash(name) % len(self._stripes)]:
            def once() -> str:
                with self._vendor("Batch submit"):
                    arn = self._find(name, task.job_id.lower(), queue)
                    if arn is None:
                        arn = self._submit_new(task, queue)
                self._remember_arn(name, arn)
                return arn
            return self.retry.call("aws submit", once)

    def _submit_new(self, task: ProviderTask, queue: str) -> str:
        image = task.spec.image_uri
        definition = self.definitions.for_image(image)
        command: Sequence[str] = ()
        if task.spec.is_array and not task.spec.commands:  # the copies share its command
            command = self.definitions.base_definition().get(
                "containerProperties", {}).get("command") or ()
        request = submit_request(task, queue, definition, self._fair_share(queue, task), command)
        try:
            return str(self.client.submit_job(**request)["jobArn"])
        except bexc.ClientError as exc:
            # A cached definition may have been deregistered since (cleanup_definitions):
            # resolve again and, if that gives another one, try once more.
            if error_code(exc) != "ClientException" or not self.definitions.refresh(
                    image, definition):
                raise
        request["jobDefinition"] = self.definitions.for_image(image)
        return str(self.client.submit_job(**request)["jobArn"])

    def _fair_share(self, queue: str, task: ProviderTask) -> dict[str, Any]:
        """``shareIdentifier`` (and ``schedulingPriorityOverride``) if ``queue`` has a
        fair-share scheduling policy; nothing otherwise, as AWS requires either way."""
        def load() -> bool:
            found = self.client.describe_job_queues(jobQueues=[queue]).get("jobQueues", [])
            if not found:
                raise ProviderRejected(f"AWS Batch job queue {queue!r} not found")
            return bool(found[0].get("schedulingPolicyArn"))
        if not self._fair_share_queues.get(queue, load):
            return {}
        out: dict[str, Any] = {
            "shareIdentifier": share_identifier(task.tenant_id, self.share_identifiers)}
        priority = self.scheduling_priorities.get(
            task.tenant_id, self.scheduling_priorities.get("*"))
        if priority is not None:
            out["schedulingPriorityOverride"] = priority
        return out

    def _find(self, name: str, job_id: str, queue: str) -> str | None:
        with self._recent_lock:
            if name in self._recent:
                return self._recent[name]
        candidates, token = [], ""
        while True:
            page = self.client.list_jobs(
                jobQueue=queue, filters=[{"name": "JOB_NAME", "values": [name]}],
                **({"nextToken": token} if token else {}))
            candidates += [j["jobId"] for j in page.get("jobSummaryList", [])
                           if j.get("jobName") == name]
            token = page.get("nextToken", "")
            if not token:
                break
        if not candidates:
            return None
        described = self.client.describe_jobs(jobs=candidates[:DESCRIBE_BATCH]).get("jobs", [])
        ours = sorted((j for j in described if (j.get("tags") or {}).get(JOB_ID_LABEL) == job_id),
                      key=lambda j: j.get("createdAt", 0))
        return str(ours[0]["jobArn"]) if ours else None

    def _remember_arn(self, name: str, arn: str) -> None:
        with self._recent_lock:
            _remember(self._recent, name, arn, self._remember)

    def cleanup_definitions(self, older_than_days: float) -> list[str]:
        """Deregister the per-image job definition copies registered more than
        ``older_than_days`` ago (``JobDefinitions.cleanup``); return their ARNs."""
        return self._call("Batch cleanup", lambda: self.definitions.cleanup(
            older_than_days * 86400))

    # --- status and cancel ---------------------------------------------------------------

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        paths = list(dict.fromkeys(resource_paths))
        ids: dict[str, str] = {}
        result: dict[str, ProviderStatus] = {}
        for path in paths:
            match = ARN_RULE.match(path)
            if match is None:
                result[path] = ProviderStatus(None, "UNKNOWN", message="not an AWS Batch job ARN")
            else:
                ids[match.group(1)] = path
        id_list = list(ids)
        for i in range(0, len(id_list), DESCRIBE_BATCH):
            for job in self._describe(id_list[i:i + DESCRIBE_BATCH]):
                if job.get("jobId") in ids:
                    result[ids[job["jobId"]]] = self._job_status(job)
        for path in paths:
            result.setdefault(path, ProviderStatus(None, "UNKNOWN", message="no such job"))
        return result

    def _describe(self, job_ids: list[str]) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self._call(
            "Batch describe_jobs", lambda: self.client.describe_jobs(jobs=job_ids)["jobs"])
        return jobs

    def _job_status(self, job: Mapping[str, Any]) -> ProviderStatus:
        """A plain job's status as AWS gives it; an array job's from its children. An
        array whose children cannot be read now is UNKNOWN (the others still report)."""
        size = (job.get("arrayProperties") or {}).get("size")
        if not size:
            return job_status(job)
        try:
            return self._array_status(job, int(size))
        except ProviderError as exc:
            return ProviderStatus(None, str(job.get("status", "")), message=str(exc))

    # --- array jobs ------------------------------------------------------------------------

    def _array_status(self, parent: Mapping[str, Any], size: int) -> ProviderStatus:
        """The status of an array job from its children (``providers.tasks``).

        **Cost**: the parent comes with ``status``'s ``DescribeJobs``. Its children are
        read only when its ``statusSummary`` or status changed since this worker last
        looked (or ``ARRAY_REFRESH_SECONDS`` passed while children run), by
        ``_refresh_array``; otherwise the tasks known are reported again, at no cost."""
        job_id = str(parent["jobId"])
        raw = str(parent.get("status", ""))
        summary = {str(k): int(v) for k, v in
                   ((parent.get("arrayProperties") or {}).get("statusSummary") or {}).items()}
        with self._arrays_lock:
            view = self._arrays.get(job_id)
        if view is None or view.summary != summary or view.parent_status != raw or (
                view.running() and self._clock() - view.at >= ARRAY_REFRESH_SECONDS):
            view = self._refresh_array(job_id, summary, raw, view)
            with self._arrays_lock:
                _remember(self._arrays, job_id, view, ARRAY_VIEWS)
        return status_from_tasks(size, list(view.tasks.values()), raw_state=raw)

    def _refresh_array(self, job_id: str, summary: Mapping[str, int], parent_status: str,
                       old: ArrayView | None) -> ArrayView:
        """Read the children that changed since ``old`` (None: all that have started).

        1. List the children that are STARTING or RUNNING (``ListJobs`` by ``arrayJobId``
           and status, 1,000 a page); those that were not before, and those no longer
           there, changed.
        2. For SUCCEEDED and FAILED (final), list only when the summary counts more
           children there than are known to be (finished without being seen running).
        3. ``DescribeJobs`` the children that changed, 100 a call, for their attempts,
           exit code, reason and times (a listing has no attempts).

        So a refresh costs about ceil(running / 1,000) lists, plus ceil(n / 1,000) for a
        final state only when children finished unseen, plus ceil(changed / 100)
        describes; over a job's life each child is described about once per state it is
        seen in (STARTING, RUNNING, finished; again for a retry). A worker that has not
        seen the job before (a new owner) lists and describes every child that has started:
        for 10,000 finished children, 10 lists and 100 describes, once."""
        view = ArrayView(dict(summary), parent_status, dict(old.raw) if old else {},
                         dict(old.tasks) if old else {}, self._clock())
        active: dict[int, str] = {}
        for state in ACTIVE_CHILD_STATES:
            if summary.get(state):
                active.update(self._list_children(job_id, state))
        changed = {i for i, s in active.items() if view.raw.get(i) != s}
        changed |= {i for i, s in view.raw.items() if s in ACTIVE_CHILD_STATES and i not in active}
        self._describe_children(job_id, changed, view)
        for state in FINAL_CHILD_STATES:
            if sum(1 for s in view.raw.values() if s == state) < summary.get(state, 0):
                listed = self._list_children(job_id, state)
                self._describe_children(
                    job_id, {i for i, s in listed.items() if view.raw.get(i) != s}, view)
        return view

    def _list_children(self, job_id: str, state: str) -> dict[int, str]:
        """The children of array job ``job_id`` in AWS state ``state``: index → state."""
        found: dict[int, str] = {}
        query: dict[str, Any] = {"arrayJobId": job_id, "jobStatus": state,
                                 "maxResults": LIST_PAGE}
        while True:
            page = self._call("Batch list_jobs", lambda: self.client.list_jobs(**query))
            for child in page.get("jobSummaryList", []):
                index = _child_index(child)
                if index is not None:
                    found[index] = str(child.get("status", state))
            if not page.get("nextToken"):
                return found
            query["nextToken"] = page["nextToken"]

    def _describe_children(self, job_id: str, indexes: set[int], view: ArrayView) -> None:
        """Describe the children ``indexes`` of ``job_id`` into ``view`` (and note their
        log streams for ``read_output``)."""
        wanted = sorted(indexes)
        for i in range(0, len(wanted), DESCRIBE_BATCH):
            for child in self._describe([f"{job_id}:{n}" for n in wanted[i:i + DESCRIBE_BATCH]]):
                index = _child_index(child)
                if index is None:
                    continue
                view.raw[index] = str(child.get("status", ""))
                view.tasks[index] = task_state(index, child)
                if streams := log_streams(child):
                    with self._log_lock:
                        _remember(self._log_streams, (job_id, index), streams, self._remember)

    def cancel(self, resource_path: str) -> None:
        match = ARN_RULE.match(resource_path)
        if match is None:
            return
        try:
            self._call("Batch terminate_job", lambda: self.client.terminate_job(
                jobId=match.group(1), reason=CANCEL_REASON))
        except ProviderRejected as exc:
            if error_code(exc) != "ClientException":
                raise  # an unknown job id is a ClientException: nothing to stop

    # --- output ------------------------------------------------------------------------

    def read_output(self, resource_path: str, offsets: tuple[int, int],
                    task_index: int = 0) -> OutputChunk:
        """New output of the job's (or of task ``task_index``'s child job's) CloudWatch
        Logs streams after ``offsets``.

        **Offsets**: the stdout offset is the number of log events already returned; the
        same streams give the same offsets on every worker. The awslogs driver sends
        stdout and stderr to one stream, so everything is stdout and the stderr offset
        stays where it is (0). Each event is one line (the driver splits on newlines and
        strips them); the text is the events' messages, each with a newline.

        **Where**: each attempt of a container logs to its own stream (``log_streams``:
        the attempts' ``logStreamName``, oldest first, then the current one), in the
        awslogs group of its log configuration, ``/aws/batch/job`` by default. A plain
        job has one attempt (Jennah submits one attempt per execution); a task AWS
        retried has one stream per attempt, read one after the other as one output (an
        earlier attempt's stream is over, so its events are counted once, when a worker
        seeks past it, and the count kept). No stream yet (before RUNNING, or not created
        yet), or a container logging elsewhere: nothing, offsets unchanged.

        **Cost per call**: one ``DescribeJobs`` until the streams are known (then cached;
        ``status`` renews a child's when it describes it), then at most
        ``LOG_PAGES_PER_READ`` ``GetLogEvents`` calls per stream (more than one stream
        only when an earlier attempt's is over), returning after the first page with
        events (at most ``LOG_EVENTS_PER_PAGE`` events and 1 MB). Where a read ended
        is kept in memory; a worker without it (a new owner, a restart) seeks once from
        the head of the streams, skipping ``offset`` events at up to 10,000 per call.

        Order relies on a stream's events keeping their order once ingested, which holds
        for the awslogs driver (one writer, timestamps in order).
        """
        start = offsets[0]
        match = ARN_RULE.match(resource_path)
        if match is None:
            return OutputChunk(offsets=offsets)
        key = (match.group(1), task_index)
        streams = self._log_location(key)
        if not streams:
            return OutputChunk(offsets=offsets)
        with self._log_lock:
            cached = self._log_tokens.get(key)
        try:
            if cached and cached[0] == start and cached[1] < len(streams):
                at: tuple[int, str] | None = (cached[1], cached[2])
            else:
                at = self._seek_streams(streams, start)
            if at is None:
                return OutputChunk(offsets=offsets)
            pos, token = at
            events, token = self._next_events(streams[pos], token)
            while not events and pos + 1 < len(streams):  # that attempt is over: the next
                pos, token = pos + 1, ""
                events, token = self._next_events(streams[pos], token)
        except ProviderRejected as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return OutputChunk(offsets=offsets)  # the stream is not created yet
            raise
        end = start + len(events)
        with self._log_lock:
            _remember(self._log_tokens, key, (end, pos, token), self._remember)
        text = "".join(f"{e.get('message', '')}\n" for e in events)
        return OutputChunk(stdout=text, offsets=(end, offsets[1]))

    def _log_location(self, key: tuple[str, int]) -> tuple[LogStream, ...]:
        """The log streams of job ``key[0]`` (task ``key[1]``: its child ``<id>:<i>`` if
        it is an array job), from the cache or one ``DescribeJobs`` of both ids."""
        with self._log_lock:
            if key in self._log_streams:
                return self._log_streams[key]
        job_id, index = key
        found = {str(j.get("jobId")): j for j in self._describe([job_id, f"{job_id}:{index}"])}
        job = found.get(f"{job_id}:{index}")
        parent = found.get(job_id)
        if job is None and index == 0 and parent is not None and not (
                parent.get("arrayProperties") or {}).get("size"):
            job = parent  # a plain job is its own task 0
        streams = log_streams(job) if job is not None else ()
        if streams:  # a stream never changes; a retried child gains one (status renews it)
            with self._log_lock:
                _remember(self._log_streams, key, streams, self._remember)
        return streams

    def _page(self, where: LogStream, token: str, limit: int) -> tuple[list[Any], str]:
        """One GetLogEvents page from ``token`` ("" is the head): (events, next token)."""
        group, stream = where
        page = self._call("CloudWatch Logs get_log_events", lambda: self.logs.get_log_events(
            logGroupName=group, logStreamName=stream, startFromHead=True, limit=limit,
            **({"nextToken": token} if token else {})))
        return list(page.get("events", [])), str(page.get("nextForwardToken") or token)

    def _seek_streams(self, streams: Sequence[LogStream], offset: int) -> tuple[int, str] | None:
        """(which stream, forward token) after the first ``offset`` events of ``streams``
        read one after the other (None: they have fewer events than that, for now)."""
        for pos, where in enumerate(streams[:-1]):
            length = self._stream_length(where)
            if offset < length:
                token = self._seek(where, offset)
                return None if token is None else (pos, token)
            offset -= length
        token = self._seek(streams[-1], offset)
        return None if token is None else (len(streams) - 1, token)

    def _stream_length(self, where: LogStream) -> int:
        """How many events a finished attempt's stream has (counted once, then kept)."""
        with self._log_lock:
            if where in self._log_lengths:
                return self._log_lengths[where]
        token, length = "", 0
        try:
            while True:
                events, after = self._page(where, token, LOG_EVENTS_PER_PAGE)
                length += len(events)
                if not events and after == token:
                    break
                token = after
        except ProviderRejected as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise  # an attempt that never logged has no stream: no events
        with self._log_lock:
            _remember(self._log_lengths, where, length, self._remember)
        return length

    def _seek(self, where: LogStream, offset: int) -> str | None:
        """The forward token after the first ``offset`` events (None: the stream has
        fewer events than that, for now)."""
        token, left = "", offset
        while left > 0:
            events, after = self._page(where, token, min(left, LOG_EVENTS_PER_PAGE))
            if not events and after == token:
                return None
            token, left = after, left - len(events)
        return token

    def _next_events(self, where: LogStream, token: str) -> tuple[list[Any], str]:
        """The events after ``token``: the first non-empty page within the call cap."""
        for _ in range(LOG_PAGES_PER_READ):
            events, after = self._page(where, token, LOG_EVENTS_PER_PAGE)
            if events or after == token:
                return events, after
            token = after  # an empty page that moved on: later events may follow
        return [], token

    def close(self) -> None:
        self.client.close()
        if self.logs is not None:
            self.logs.close()


def _remember(items: OrderedDict[Any, Any], key: Hashable, value: Any, limit: int) -> None:
    """Put ``key`` last in a bounded least-recently-set map."""
    items[key] = value
    items.move_to_end(key)
    while len(items) > limit:
        items.popitem(last=False)

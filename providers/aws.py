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
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from jennah.models import FailureClass, JobSpec, JobStatus
from jennah.settings import Env, ProviderSettings
from providers.base import (
    Capabilities,
    OutputChunk,
    ProviderStatus,
    ProviderTask,
    check_spec,
)
from providers.resources import JOB_ID_LABEL, job_environment, job_labels, resolve
from providers.retry import RetryPolicy

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
                   fair_share: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The SubmitJob parameters for one execution: every field Jennah promises."""
    spec, res = task.spec, resolve(task.spec)
    requirements = [{"type": "VCPU", "value": res.vcpus},
                    {"type": "MEMORY", "value": str(res.memory_mib)}]
    if spec.accelerator_count:
        requirements.append({"type": "GPU", "value": str(spec.accelerator_count)})
    overrides: dict[str, Any] = {
        "environment": [{"name": k, "value": v} for k, v in job_environment(task).items()],
        "resourceRequirements": requirements,
    }
    if spec.commands:
        overrides["command"] = list(spec.commands)
    request: dict[str, Any] = {
        "jobName": task.provider_job_id, "jobQueue": queue, "jobDefinition": definition,
        "containerOverrides": overrides, "tags": job_labels(task), "propagateTags": True,
        "retryStrategy": {"attempts": 1},  # Jennah retries, with a new execution id
        **(fair_share or {}),
    }
    if res.max_run_duration_seconds:
        request["timeout"] = {
            "attemptDurationSeconds": max(MIN_TIMEOUT_SECONDS, res.max_run_duration_seconds)}
    return request


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


def log_location(job: Mapping[str, Any]) -> tuple[str, str] | None:
    """(log group, log stream) of a ``DescribeJobs`` entry; None while it has no stream
    (before RUNNING) or when its container does not log to CloudWatch (another driver)."""
    container = job.get("container") or {}
    attempts = job.get("attempts") or []
    stream = container.get("logStreamName") or (
        (attempts[-1].get("container") or {}).get("logStreamName") if attempts else None)
    config = container.get("logConfiguration") or {}
    if not stream or config.get("logDriver", "awslogs") != "awslogs":
        return None
    return str((config.get("options") or {}).get("awslogs-group") or DEFAULT_LOG_GROUP), stream


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
            accelerator_count=True, boot_disk=False, service_account=False)
        self.definitions = JobDefinitions(client, job_definition, definition_ttl, clock, now)
        self._fair_share_queues: TtlCache[str, bool] = TtlCache(definition_ttl, clock)
        self.retry = retry or RetryPolicy()
        self._stripes = [threading.Lock() for _ in range(64)]
        # Executions this process submitted: name → ARN (bounded; a miss falls back to
        # the ListJobs look-up, so forgetting is safe).
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._remember = remember
        self._recent_lock = threading.Lock()
        # Output: where each job logs, once known; and the forward token at the offset
        # the last read ended (a miss re-seeks from the head, see read_output). Bounded.
        self._log_streams: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._log_tokens: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._log_lock = threading.Lock()

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
        request = submit_request(task, queue, definition, self._fair_share(queue, task))
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
                    result[ids[job["jobId"]]] = job_status(job)
        for path in paths:
            result.setdefault(path, ProviderStatus(None, "UNKNOWN", message="no such job"))
        return result

    def _describe(self, job_ids: list[str]) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self._call(
            "Batch describe_jobs", lambda: self.client.describe_jobs(jobs=job_ids)["jobs"])
        return jobs

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

    def read_output(self, resource_path: str, offsets: tuple[int, int]) -> OutputChunk:
        """New output of the job's CloudWatch Logs stream after ``offsets``.

        **Offsets**: the stdout offset is the number of log events of the stream already
        returned; the same stream gives the same offsets on every worker. The awslogs
        driver sends stdout and stderr to one stream, so everything is stdout and the
        stderr offset stays where it is (0). Each event is one line (the driver splits on
        newlines and strips them); the text is the events' messages, each with a newline.

        **Where**: the stream is ``logStreamName`` of the job's container (or of its last
        attempt: Jennah submits one attempt per execution), in the awslogs group of its
        log configuration, ``/aws/batch/job`` by default. No stream yet (before RUNNING,
        or not created yet), or a container logging elsewhere: nothing, offsets unchanged.

        **Cost per call**: one ``DescribeJobs`` until the stream is known (then cached),
        then at most ``LOG_PAGES_PER_READ`` ``GetLogEvents`` calls, returning after the
        first page with events (at most ``LOG_EVENTS_PER_PAGE`` events and 1 MB). The
        forward token where a read ended is kept in memory; a worker without it (a new
        owner, a restart) seeks once from the head of the stream, skipping ``offset``
        events at up to 10,000 per call.

        Order relies on the stream's events keeping their order once ingested, which
        holds for the awslogs driver (one writer, timestamps in order).
        """
        start = offsets[0]
        where = self._log_location(resource_path)
        if where is None:
            return OutputChunk(offsets=offsets)
        with self._log_lock:
            cached = self._log_tokens.get(resource_path)
        token: str | None = cached[1] if cached and cached[0] == start else None
        try:
            if token is None:
                token = self._seek(where, start)
                if token is None:
                    return OutputChunk(offsets=offsets)
            events, token = self._next_events(where, token)
        except ProviderRejected as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return OutputChunk(offsets=offsets)  # the stream is not created yet
            raise
        end = start + len(events)
        with self._log_lock:
            _remember(self._log_tokens, resource_path, (end, token), self._remember)
        text = "".join(f"{e.get('message', '')}\n" for e in events)
        return OutputChunk(stdout=text, offsets=(end, offsets[1]))

    def _log_location(self, resource_path: str) -> tuple[str, str] | None:
        with self._log_lock:
            if resource_path in self._log_streams:
                return self._log_streams[resource_path]
        match = ARN_RULE.match(resource_path)
        if match is None:
            return None
        jobs = self._describe([match.group(1)])
        where = log_location(jobs[0]) if jobs else None
        if where is not None:  # a job's stream never changes once it has one
            with self._log_lock:
                _remember(self._log_streams, resource_path, where, self._remember)
        return where

    def _page(self, where: tuple[str, str], token: str, limit: int) -> tuple[list[Any], str]:
        """One GetLogEvents page from ``token`` ("" is the head): (events, next token)."""
        group, stream = where
        page = self._call("CloudWatch Logs get_log_events", lambda: self.logs.get_log_events(
            logGroupName=group, logStreamName=stream, startFromHead=True, limit=limit,
            **({"nextToken": token} if token else {})))
        return list(page.get("events", [])), str(page.get("nextForwardToken") or token)

    def _seek(self, where: tuple[str, str], offset: int) -> str | None:
        """The forward token after the first ``offset`` events (None: the stream has
        fewer events than that, for now)."""
        token, left = "", offset
        while left > 0:
            events, after = self._page(where, token, min(left, LOG_EVENTS_PER_PAGE))
            if not events and after == token:
                return None
            token, left = after, left - len(events)
        return token

    def _next_events(self, where: tuple[str, str], token: str) -> tuple[list[Any], str]:
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


def _remember(items: OrderedDict[str, Any], key: str, value: Any, limit: int) -> None:
    """Put ``key`` last in a bounded least-recently-set map."""
    items[key] = value
    items.move_to_end(key)
    while len(items) > limit:
        items.popitem(last=False)

"""AWS Batch (boto3): one Batch job per Jennah execution, on ``AWS_JOB_QUEUE`` with
``AWS_JOB_DEFINITION``; the image comes from the job definition, everything else from
container overrides.

**Resource path**: the job ARN (``arn:aws:batch:R:A:job/<job id>``).

**Exactly once** (docs/design.md §4): AWS Batch does not dedupe job names, so before submitting
the provider looks the name (the deterministic provider job id) up in the queue
(``ListJobs`` with a ``JOB_NAME`` filter), and adopts a job that carries our
``jennah-job-id`` tag. Within one process a striped lock serialises look-up and submit per
name, so concurrent submits of one execution start it once. Across workers the job lease
already makes submits of one execution sequential. (``ListJobs`` can lag a just-submitted
job by a moment; docs/providers.md discusses the window.)

**Image**: SubmitJob cannot override a job definition's image, so for a job whose image
differs from ``AWS_JOB_DEFINITION``'s, the provider registers (once per image, then
cached) a copy of that definition with the job's image, named
``<definition>-img-<sha256 of the image>``, and reuses an existing one when it finds it.

**Status**: ``DescribeJobs`` in batches of 100. **Cancel**: ``TerminateJob`` with a reason
of our own; a job that AWS reports FAILED with that reason is CANCELLED to us.

Vendor errors never leave this module: botocore ``ClientError`` and connection errors
become ``ProviderUnavailable`` (429, ``Throttling*``, 5xx, connection: retried here first,
see ``providers/retry.py``; botocore's own retries are off), ``ProviderQuotaExceeded`` or
``ProviderRejected``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions as bexc

from jennah.errors import (
    ProviderError,
    ProviderQuotaExceeded,
    ProviderRejected,
    ProviderUnavailable,
)
from jennah.models import FailureClass, JobStatus
from jennah.settings import ProviderSettings
from providers.base import Capabilities, ProviderStatus, ProviderTask
from providers.resources import JOB_ID_LABEL, job_environment, job_labels, resolve
from providers.retry import RetryPolicy

T = TypeVar("T")

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
})
QUOTA_CODES = frozenset({"LimitExceededException", "ServiceQuotaExceededException"})
ARN_RULE = re.compile(r"^arn:aws[a-z-]*:batch:[a-z0-9-]+:\d{12}:job/([A-Za-z0-9:_-]+)$")
DESCRIBE_BATCH = 100
MIN_TIMEOUT_SECONDS = 60  # AWS refuses shorter attemptDurationSeconds
# What a per-image job definition copies from the base definition.
DEFINITION_FIELDS = ("type", "parameters", "containerProperties", "retryStrategy", "timeout",
                     "platformCapabilities", "propagateTags", "schedulingPriority")


def translate(exc: Exception, what: str) -> ProviderError:
    """A botocore error as one of ours."""
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        text = f"AWS Batch {what}: {code} ({status}): {err.get('Message', '')}"
        if code in QUOTA_CODES:
            return ProviderQuotaExceeded(text)
        if status == 429 or status >= 500 or code in RETRYABLE_CODES or code.startswith("Throttl"):
            return ProviderUnavailable(text)
        return ProviderRejected(text)
    text = f"AWS Batch {what}: {type(exc).__name__}: {exc}"
    if isinstance(exc, bexc.ParamValidationError | bexc.NoRegionError):
        return ProviderRejected(text)
    return ProviderUnavailable(text)  # connection errors, timeouts, credentials not yet there


def make_client(region: str, endpoint_url: str = "", **kwargs: Any) -> Any:
    """A Batch client with botocore's retries off (``providers/retry.py`` retries)."""
    config = botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                    connect_timeout=5, read_timeout=30)
    return boto3.session.Session().client("batch", region_name=region,
                                          endpoint_url=endpoint_url or None, config=config,
                                          **kwargs)


def submit_request(task: ProviderTask, queue: str, definition: str) -> dict[str, Any]:
    """The SubmitJob parameters for one execution: every field Jennah promises."""
    spec, res = task.spec, resolve(task.spec)
    overrides: dict[str, Any] = {
        "environment": [{"name": k, "value": v} for k, v in job_environment(task).items()],
        "resourceRequirements": [{"type": "VCPU", "value": res.vcpus},
                                 {"type": "MEMORY", "value": str(res.memory_mib)}],
    }
    if spec.commands:
        overrides["command"] = list(spec.commands)
    request: dict[str, Any] = {
        "jobName": task.provider_job_id, "jobQueue": queue, "jobDefinition": definition,
        "containerOverrides": overrides, "tags": job_labels(task), "propagateTags": True,
        "retryStrategy": {"attempts": 1},  # Jennah retries, with a new execution id
    }
    if res.max_run_duration_seconds:
        request["timeout"] = {
            "attemptDurationSeconds": max(MIN_TIMEOUT_SECONDS, res.max_run_duration_seconds)}
    return request


def image_definition_name(base_name: str, image: str) -> str:
    return f"{base_name[:100]}-img-{hashlib.sha256(image.encode()).hexdigest()[:16]}"


class JobDefinitions:
    """The job definition for each image: the base one, or a registered copy of it."""

    def __init__(self, client: Any, base: str) -> None:
        self.client = client
        self.base = base
        self._base: dict[str, Any] | None = None
        self._by_image: dict[str, str] = {}
        self._lock = threading.Lock()

    def for_image(self, image: str) -> str:
        with self._lock:
            if image not in self._by_image:
                self._by_image[image] = self._resolve(image)
            return self._by_image[image]

    def _resolve(self, image: str) -> str:
        base = self._base_definition()
        if not image or base.get("containerProperties", {}).get("image") == image:
            return self.base
        name = image_definition_name(str(base["jobDefinitionName"]), image)
        found = [d for d in self._describe(jobDefinitionName=name, status="ACTIVE")
                 if d.get("containerProperties", {}).get("image") == image]
        if found:
            return str(max(found, key=lambda d: d["revision"])["jobDefinitionArn"])
        copy = {k: base[k] for k in DEFINITION_FIELDS if k in base}
        copy["containerProperties"] = {**copy.get("containerProperties", {}), "image": image}
        made = self.client.register_job_definition(jobDefinitionName=name, **copy)
        return str(made["jobDefinitionArn"])

    def _base_definition(self) -> dict[str, Any]:
        if self._base is None:
            by_name = ":" not in self.base  # a bare name means its latest active revision
            found = (self._describe(jobDefinitionName=self.base, status="ACTIVE") if by_name
                     else self._describe(jobDefinitions=[self.base]))
            if not found:
                raise ProviderRejected(f"AWS Batch job definition {self.base!r} not found")
            self._base = max(found, key=lambda d: d["revision"])
        return self._base

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


def _ms(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value / 1000, UTC) if isinstance(value, int | float) else None


class AwsBatchProvider:
    """AWS Batch, through an injected boto3 ``batch`` client."""

    name = "aws"
    capabilities = Capabilities(supports_cancel=True, max_status_batch=DESCRIBE_BATCH,
                                poll_interval_seconds=10.0)

    def __init__(self, client: Any, *, job_queue: str, job_definition: str,
                 retry: RetryPolicy | None = None, remember: int = 10_000) -> None:
        self.client = client
        self.job_queue = job_queue
        self.job_definition = job_definition
        self.definitions = JobDefinitions(client, job_definition)
        self.retry = retry or RetryPolicy()
        self._stripes = [threading.Lock() for _ in range(64)]
        # Executions this process submitted: name → ARN (bounded; a miss falls back to
        # the ListJobs look-up, so forgetting is safe).
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._remember = remember
        self._recent_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> AwsBatchProvider:
        client = make_client(settings.region, settings.aws_endpoint_url)
        return cls(client, job_queue=settings.aws_job_queue,
                   job_definition=settings.aws_job_definition)

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

    def submit(self, task: ProviderTask) -> str:
        name = task.provider_job_id
        with self._stripes[hash(name) % len(self._stripes)]:
            def once() -> str:
                with self._vendor("submit"):
                    arn = self._find(name, task.job_id.lower())
                    if arn is None:
                        definition = self.definitions.for_image(task.spec.image_uri)
                        request = submit_request(task, self.job_queue, definition)
                        arn = str(self.client.submit_job(**request)["jobArn"])
                self._remember_arn(name, arn)
                return arn
            return self.retry.call("aws submit", once)

    def _find(self, name: str, job_id: str) -> str | None:
        with self._recent_lock:
            if name in self._recent:
                return self._recent[name]
        candidates, token = [], ""
        while True:
            page = self.client.list_jobs(
                jobQueue=self.job_queue, filters=[{"name": "JOB_NAME", "values": [name]}],
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
            self._recent[name] = arn
            self._recent.move_to_end(name)
            while len(self._recent) > self._remember:
                self._recent.popitem(last=False)

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
            "describe_jobs", lambda: self.client.describe_jobs(jobs=job_ids)["jobs"])
        return jobs

    def cancel(self, resource_path: str) -> None:
        match = ARN_RULE.match(resource_path)
        if match is None:
            return
        try:
            self._call("terminate_job", lambda: self.client.terminate_job(
                jobId=match.group(1), reason=CANCEL_REASON))
        except ProviderRejected as exc:
            cause = exc.__cause__
            if not (isinstance(cause, bexc.ClientError)
                    and cause.response.get("Error", {}).get("Code") == "ClientException"):
                raise  # an unknown job id is a ClientException: nothing to stop

    def close(self) -> None:
        self.client.close()

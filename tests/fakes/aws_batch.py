"""A stateful fake of the AWS Batch REST-JSON API: the four calls Jennah makes.

moto's Batch (docs/design.md §9) checks request shapes and idempotency well, but its jobs jump
straight to SUCCEEDED. This fake walks them through every state instead, one step per
``advance()``: SUBMITTED → PENDING → RUNNABLE → STARTING → RUNNING → SUCCEEDED/FAILED,
the outcome read from the commands (``providers.memory.planned_exit``).

* ``POST /v1/submitjob`` refuses (400 ``ClientException``) what AWS would: a bad job
  name, an unknown queue or definition, malformed overrides, ``aws:`` tags, a timeout
  under 60 s. Every accepted request is kept in ``submits`` for the tests to inspect.
  Like the real service it does **not** dedupe names: that is the provider's job.
* ``POST /v1/describejobs`` takes at most 100 ids (more is a 400, as on AWS).
* ``POST /v1/describejobdefinitions`` and ``/v1/registerjobdefinition``: the base
  definition ``jennah-def:1`` (image ``busybox``) and any registered since, by name and
  status or by ``name:revision``/ARN; registering a name again adds a revision.
* ``POST /v1/listjobs`` pages, and understands the ``JOB_NAME`` filter.
* ``POST /v1/terminatejob`` fails a queued job at once; a starting or running one fails
  at the next step with exit code 137. Either way ``statusReason`` is the given reason.
* Requests without a SigV4 ``Authorization`` header get 403; ``throttle(n)`` answers the
  next ``n`` calls 429 ``TooManyRequestsException``.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from providers.memory import planned_exit
from tests.fakes import Request, Response

ACCOUNT = "123456789012"
REGION = "us-east-1"
QUEUE = "jennah-queue"
DEFINITION = "jennah-def"
QUEUE_ARN = f"arn:aws:batch:{REGION}:{ACCOUNT}:job-queue/{QUEUE}"
DEFINITION_ARN = f"arn:aws:batch:{REGION}:{ACCOUNT}:job-definition/{DEFINITION}:1"
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_NEXT = {"SUBMITTED": "PENDING", "PENDING": "RUNNABLE", "RUNNABLE": "STARTING",
         "STARTING": "RUNNING"}
TERMINAL = {"SUCCEEDED", "FAILED"}


class _ClientError(Exception):
    pass


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class FakeJob:
    request: dict[str, Any]
    job_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: str = "SUBMITTED"
    status_reason: str = ""
    exit_code: int | None = None
    created_at: int = field(default_factory=now_ms)
    started_at: int | None = None
    stopped_at: int | None = None
    terminating: bool = False

    @property
    def arn(self) -> str:
        return f"arn:aws:batch:{REGION}:{ACCOUNT}:job/{self.job_id}"

    @property
    def name(self) -> str:
        return str(self.request["jobName"])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"jobArn": self.arn, "jobId": self.job_id, "jobName": self.name,
                               "createdAt": self.created_at, "status": self.status,
                               "jobDefinition": DEFINITION_ARN}
        if self.status_reason:
            out["statusReason"] = self.status_reason
        for key, value in (("startedAt", self.started_at), ("stoppedAt", self.stopped_at)):
            if value is not None:
                out[key] = value
        if self.exit_code is not None:
            out["container"] = {"exitCode": self.exit_code}
        return out

    def detail(self) -> dict[str, Any]:
        overrides = self.request.get("containerOverrides") or {}
        container = {"image": "busybox", "command": overrides.get("command", []),
                     "environment": overrides.get("environment", []),
                     "resourceRequirements": overrides.get("resourceRequirements", [])}
        if self.exit_code is not None:
            container["exitCode"] = self.exit_code
        return {**self.summary(), "jobQueue": QUEUE_ARN, "container": container,
                "tags": self.request.get("tags", {}), "timeout": self.request.get("timeout"),
                "attempts": [], "dependsOn": [], "parameters": {}}


def base_definition() -> dict[str, Any]:
    return {"jobDefinitionName": DEFINITION, "jobDefinitionArn": DEFINITION_ARN, "revision": 1,
            "status": "ACTIVE", "type": "container", "parameters": {},
            "containerProperties": {"image": "busybox", "resourceRequirements": [
                {"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"}]},
            "platformCapabilities": ["EC2"]}


def problems_with(body: dict[str, Any]) -> list[str]:
    """Every rule a SubmitJob body breaks (empty when AWS would take it)."""
    out = []
    if not JOB_NAME.match(str(body.get("jobName", ""))):
        out.append("jobName does not match the job name pattern")
    if body.get("jobQueue") not in (QUEUE, QUEUE_ARN):
        out.append(f"job queue {body.get('jobQueue')} does not exist")
    overrides = body.get("containerOverrides") or {}
    if not all(isinstance(c, str) for c in overrides.get("command", [])):
        out.append("command must be a list of strings")
    for env in overrides.get("environment", []):
        if set(env) != {"name", "value"} or env["name"].startswith("AWS_BATCH"):
            out.append(f"bad environment entry {env}")
    for req in overrides.get("resourceRequirements", []):
        if req.get("type") not in ("VCPU", "MEMORY", "GPU"):
            out.append(f"bad resource requirement {req}")
        try:
            float(req.get("value", ""))
        except ValueError:
            out.append(f"resource value {req.get('value')!r} is not a number")
    tags = body.get("tags") or {}
    if len(tags) > 50 or any(k.lower().startswith("aws:") for k in tags):
        out.append("tags: at most 50, none starting with aws:")
    timeout = (body.get("timeout") or {}).get("attemptDurationSeconds")
    if timeout is not None and timeout < 60:
        out.append("timeout.attemptDurationSeconds must be at least 60")
    return out


@dataclass
class FakeAwsBatch:
    """The service's state and test controls (thread-safe)."""

    jobs: dict[str, FakeJob] = field(default_factory=dict)
    submits: list[dict[str, Any]] = field(default_factory=list)
    definitions: list[dict[str, Any]] = field(default_factory=lambda: [base_definition()])
    registered: list[dict[str, Any]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    describe_sizes: list[int] = field(default_factory=list)
    _throttle: list[Collection[str] | None] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # --- test controls ------------------------------------------------------------------

    def throttle(self, n: int, methods: Collection[str] | None = None) -> None:
        with self._lock:
            self._throttle.extend([methods] * n)

    def executions(self, job_name: str) -> int:
        with self._lock:
            return sum(1 for j in self.jobs.values() if j.name == job_name)

    def advance(self, steps: int = 1) -> None:
        with self._lock:
            for _ in range(steps):
                for job in self.jobs.values():
                    self._step(job)

    def set_state(self, arn: str, status: str, *, reason: str = "",
                  exit_code: int | None = None) -> None:
        with self._lock:
            job = self.jobs[arn.rsplit("/", 1)[1]]
            job.status, job.status_reason, job.exit_code = status, reason, exit_code
            if status in ("STARTING", "RUNNING", *TERMINAL) and job.started_at is None:
                job.started_at = now_ms()
            if status in TERMINAL:
                job.stopped_at = now_ms()

    def add_job(self, name: str, status: str) -> str:
        """Put a job straight into the store (for benchmarks of large fleets)."""
        with self._lock:
            job = FakeJob({"jobName": name, "tags": {}}, status=status)
            self.jobs[job.job_id] = job
            return job.arn

    def _step(self, job: FakeJob) -> None:
        if job.status in _NEXT:
            job.status = _NEXT[job.status]
            if job.status == "STARTING":
                job.started_at = now_ms()
        elif job.status == "RUNNING":
            code = 137 if job.terminating else planned_exit(
                (job.request.get("containerOverrides") or {}).get("command", []))
            if code is not None:
                job.status = "SUCCEEDED" if code == 0 else "FAILED"
                job.exit_code, job.stopped_at = code, now_ms()
                if code and not job.terminating:
                    job.status_reason = "Essential container in task exited"

    # --- the API ------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        action = req.path.rsplit("/", 1)[-1]
        with self._lock:
            self.calls[action] += 1
            if not req.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256"):
                return _error(403, "UnrecognizedClientException", "missing SigV4 signature")
            for i, methods in enumerate(self._throttle):
                if methods is None or action in methods:
                    del self._throttle[i]
                    return _error(429, "TooManyRequestsException", "Too Many Requests")
            operation = getattr(self, f"_{action}", None)
            if operation is None:
                return _error(404, "UnknownOperationException", action)
            try:
                return Response(200, operation(req.body or {}))
            except _ClientError as exc:
                return _error(400, "ClientException", str(exc))

    def _submitjob(self, body: dict[str, Any]) -> dict[str, Any]:
        problems = problems_with(body)
        if self._definition(str(body.get("jobDefinition"))) is None:
            problems.append(f"job definition {body.get('jobDefinition')} does not exist")
        if problems:
            raise _ClientError("; ".join(problems))
        self.submits.append(body)
        job = FakeJob(body)
        self.jobs[job.job_id] = job
        return {"jobArn": job.arn, "jobName": job.name, "jobId": job.job_id}

    def _definition(self, ref: str) -> dict[str, Any] | None:
        named = [d for d in self.definitions
                 if ref in (d["jobDefinitionArn"], d["jobDefinitionName"],
                            f"{d['jobDefinitionName']}:{d['revision']}")]
        return max(named, key=lambda d: d["revision"]) if named else None

    def _describejobdefinitions(self, body: dict[str, Any]) -> dict[str, Any]:
        refs = body.get("jobDefinitions")
        if refs is not None:
            if any(":" not in r for r in refs):
                raise _ClientError("jobDefinitions entries must be name:revision or an ARN")
            found = [d for r in refs if (d := self._definition(r)) is not None]
        else:
            name, status = body.get("jobDefinitionName"), body.get("status")
            found = [d for d in self.definitions
                     if name in (None, d["jobDefinitionName"]) and status in (None, d["status"])]
        return {"jobDefinitions": found}

    def _registerjobdefinition(self, body: dict[str, Any]) -> dict[str, Any]:
        name = str(body.get("jobDefinitionName", ""))
        if not JOB_NAME.match(name) or not (body.get("containerProperties") or {}).get("image"):
            raise _ClientError("a job definition needs a valid name and an image")
        revision = 1 + sum(1 for d in self.definitions if d["jobDefinitionName"] == name)
        made = {**body, "jobDefinitionArn": f"arn:aws:batch:{REGION}:{ACCOUNT}:job-definition/"
                                            f"{name}:{revision}", "revision": revision,
                "status": "ACTIVE"}
        self.definitions.append(made)
        self.registered.append(body)
        return {k: made[k] for k in ("jobDefinitionName", "jobDefinitionArn", "revision")}

    def _describejobs(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = body.get("jobs") or []
        if len(ids) > 100:
            raise _ClientError("describe at most 100 jobs per call")
        self.describe_sizes.append(len(ids))
        found = [self.jobs.get(i.rsplit("/", 1)[-1]) for i in ids]
        return {"jobs": [j.detail() for j in found if j is not None]}

    def _listjobs(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("jobQueue") not in (QUEUE, QUEUE_ARN):
            raise _ClientError(f"job queue {body.get('jobQueue')} does not exist")
        names = {v.lower() for f in body.get("filters") or [] if f.get("name") == "JOB_NAME"
                 for v in f.get("values", [])}
        status = None if body.get("filters") else body.get("jobStatus", "RUNNING")
        matched = [j for j in sorted(self.jobs.values(), key=lambda j: -j.created_at)
                   if (not names or j.name.lower() in names)
                   and (status is None or j.status == status)]
        start = int(body.get("nextToken") or 0)
        size = int(body.get("maxResults") or 100)
        out: dict[str, Any] = {"jobSummaryList": [j.summary() for j in matched[start:start + size]]}
        if start + size < len(matched):
            out["nextToken"] = str(start + size)
        return out

    def _terminatejob(self, body: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs.get(str(body.get("jobId")))
        if job is None:
            raise _ClientError(f"Job {body.get('jobId')} not found")
        if not body.get("reason"):
            raise _ClientError("'reason' is a required field")
        if job.status in TERMINAL:
            return {}
        job.status_reason = str(body["reason"])
        if job.status in ("STARTING", "RUNNING"):
            job.terminating = True
        else:
            job.status, job.stopped_at = "FAILED", now_ms()
        return {}


def _error(status: int, code: str, message: str) -> Response:
    return Response(status, {"__type": code, "message": message},
                    {"x-amzn-ErrorType": code})

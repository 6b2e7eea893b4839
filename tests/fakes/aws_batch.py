"""A stateful fake of the AWS Batch REST-JSON API and of the CloudWatch Logs call that
Jennah makes, enforcing what their documentation says (docs/providers.md cites it).

moto's Batch (docs/design.md §9) checks request shapes and idempotency well, but its jobs jump
straight to SUCCEEDED. This fake walks them through every state instead, one step per
``advance()``: SUBMITTED → PENDING → RUNNABLE → STARTING → RUNNING → SUCCEEDED/FAILED,
the outcome read from the commands (``providers.memory.planned_exit``).

* ``POST /v1/submitjob`` refuses (400 ``ClientException``) what AWS would: a bad job
  name, an unknown queue, an unknown or INACTIVE definition, malformed overrides (a GPU
  count must be a whole number), more than 50 tags, a key over 128 or a value over 256
  characters, ``aws:`` (any case) starting a key or a value, a timeout under 60 s; on a
  queue with a fair-share scheduling policy (``FAIR_QUEUE``) a missing
  ``shareIdentifier``, and on a queue without one (``QUEUE``, ``SPOT_QUEUE``) a
  ``shareIdentifier`` or ``schedulingPriorityOverride``; a share identifier that is not
  1-255 letters and digits, a priority outside 0-9999. Every accepted request is kept in
  ``submits``. Like the real service it does **not** dedupe names: that is the provider's
  job.
* ``POST /v1/describejobs`` takes at most 100 ids (more is a 400, as on AWS). A job gets
  its ``logStreamName`` (``<definition>/default/<id>``) when it reaches RUNNING, and its
  container carries the definition's ``logConfiguration``.
* ``POST /v1/describejobqueues``: the three queues, with ``schedulingPolicyArn`` on the
  fair-share one.
* ``POST /v1/describejobdefinitions``, ``/v1/registerjobdefinition`` and
  ``/v1/deregisterjobdefinition``: the base definition ``jennah-def:1`` (image
  ``busybox``) and any registered since, by name and status, by ``name:revision``/ARN, or
  all; a bare name means its latest ACTIVE revision; registering a name again adds a
  revision; tags are checked as on a job.
* ``POST /v1/listjobs`` pages, and understands the ``JOB_NAME`` filter.
* ``POST /v1/terminatejob`` fails a queued job at once; a starting or running one fails
  at the next step with exit code 137. Either way ``statusReason`` is the given reason.
* CloudWatch Logs ``GetLogEvents`` (JSON 1.1, ``X-Amz-Target``): events of a stream in
  order; without ``nextToken`` and ``startFromHead`` it starts at the tail, as AWS does;
  at most ``limit`` (1-10,000) events and 1 MB (message bytes + 26 per event) per page;
  at the end it hands back the token it was given; ``empty_pages`` makes it answer that
  many empty pages (with new tokens) before each page of events, which AWS may do. An
  unknown group or stream is ``ResourceNotFoundException``. ``log(arn, *lines)`` writes.
* Requests without a SigV4 ``Authorization`` header get 403; ``throttle(n)`` answers the
  next ``n`` calls 429 ``TooManyRequestsException``.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from providers.memory import planned_exit
from tests.fakes import Request, Response

ACCOUNT = "123456789012"
REGION = "us-east-1"
QUEUE = "jennah-queue"
FAIR_QUEUE = "jennah-fair"  # has a fair-share scheduling policy
SPOT_QUEUE = "jennah-spot"
DEFINITION = "jennah-def"
DEFAULT_LOG_GROUP = "/aws/batch/job"
DEFINITION_ARN = f"arn:aws:batch:{REGION}:{ACCOUNT}:job-definition/{DEFINITION}:1"
POLICY_ARN = f"arn:aws:batch:{REGION}:{ACCOUNT}:scheduling-policy/jennah-fair-share"
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
SHARE_ID = re.compile(r"^[A-Za-z0-9]{1,255}\*?$")
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 50, 128, 256
MAX_LOG_PAGE_BYTES, LOG_EVENT_OVERHEAD = 1_048_576, 26
_NEXT = {"SUBMITTED": "PENDING", "PENDING": "RUNNABLE", "RUNNABLE": "STARTING",
         "STARTING": "RUNNING"}
TERMINAL = {"SUCCEEDED", "FAILED"}


def queue_arn(name: str) -> str:
    return f"arn:aws:batch:{REGION}:{ACCOUNT}:job-queue/{name}"


class _ClientError(Exception):
    def __init__(self, message: str, code: str = "ClientException") -> None:
        super().__init__(message)
        self.code = code


def now_ms() -> int:
    return int(time.time() * 1000)


def base_definition() -> dict[str, Any]:
    return {"jobDefinitionName": DEFINITION, "jobDefinitionArn": DEFINITION_ARN, "revision": 1,
            "status": "ACTIVE", "type": "container", "parameters": {},
            "containerProperties": {"image": "busybox", "resourceRequirements": [
                {"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"}]},
            "platformCapabilities": ["EC2"]}


@dataclass
class FakeJob:
    request: dict[str, Any]
    definition: dict[str, Any] = field(default_factory=base_definition)
    job_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: str = "SUBMITTED"
    status_reason: str = ""
    exit_code: int | None = None
    created_at: int = field(default_factory=now_ms)
    started_at: int | None = None
    stopped_at: int | None = None
    terminating: bool = False
    log_stream: str = ""

    @property
    def arn(self) -> str:
        return f"arn:aws:batch:{REGION}:{ACCOUNT}:job/{self.job_id}"

    @property
    def name(self) -> str:
        return str(self.request["jobName"])

    @property
    def log_config(self) -> dict[str, Any]:
        return dict((self.definition.get("containerProperties") or {}).get(
            "logConfiguration") or {})

    @property
    def log_group(self) -> str:
        return str((self.log_config.get("options") or {}).get("awslogs-group")
                   or DEFAULT_LOG_GROUP)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"jobArn": self.arn, "jobId": self.job_id, "jobName": self.name,
                               "createdAt": self.created_at, "status": self.status,
                               "jobDefinition": self.definition["jobDefinitionArn"]}
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
        container: dict[str, Any] = {
            "image": (self.definition.get("containerProperties") or {}).get("image"),
            "command": overrides.get("command", []),
            "environment": overrides.get("environment", []),
            "resourceRequirements": overrides.get("resourceRequirements", [])}
        if self.log_config:
            container["logConfiguration"] = self.log_config
        if self.log_stream:
            container["logStreamName"] = self.log_stream
        if self.exit_code is not None:
            container["exitCode"] = self.exit_code
        out = {**self.summary(), "jobQueue": queue_arn(str(self.request.get("jobQueue", ""))
                                                        .rsplit("/", 1)[-1]),
               "container": container, "tags": self.request.get("tags", {}),
               "timeout": self.request.get("timeout"), "attempts": [], "dependsOn": [],
               "parameters": {}}
        for key in ("shareIdentifier", "schedulingPriorityOverride"):
            if key in self.request:
                out[key if key == "shareIdentifier" else "schedulingPriority"] = self.request[key]
        return out


def tag_problems(tags: Mapping[str, Any]) -> list[str]:
    """What AWS's tag restrictions refuse in ``tags``."""
    out = []
    if len(tags) > MAX_TAGS:
        out.append(f"tags: Member must have length less than or equal to {MAX_TAGS}")
    for key, value in tags.items():
        if not 1 <= len(key) <= MAX_TAG_KEY or len(str(value)) > MAX_TAG_VALUE:
            out.append(f"tag {key[:40]!r}: key 1-{MAX_TAG_KEY}, value <= {MAX_TAG_VALUE}")
        if key.lower().startswith("aws:") or str(value).lower().startswith("aws:"):
            out.append(f"tag {key[:40]!r}: the aws: prefix is reserved for AWS use")
    return out


def problems_with(body: dict[str, Any], fair_share: bool | None) -> list[str]:
    """Every rule a SubmitJob body breaks (empty when AWS would take it); ``fair_share``
    says whether the queue has a scheduling policy (None: no such queue)."""
    out = []
    if not JOB_NAME.match(str(body.get("jobName", ""))):
        out.append("jobName does not match the job name pattern")
    if fair_share is None:
        out.append(f"job queue {body.get('jobQueue')} does not exist")
    elif fair_share and "shareIdentifier" not in body:
        out.append("shareIdentifier is required for a job queue with a scheduling policy")
    elif not fair_share and ({"shareIdentifier", "schedulingPriorityOverride"} & set(body)):
        out.append("Job with shareIdentifier or schedulingPriority can only be submitted to "
                   "job queue with fair share scheduling policy")
    if "shareIdentifier" in body and not SHARE_ID.match(str(body["shareIdentifier"])):
        out.append("shareIdentifier: at most 255 alphanumeric characters")
    priority = body.get("schedulingPriorityOverride")
    if priority is not None and not (isinstance(priority, int) and 0 <= priority <= 9999):
        out.append("schedulingPriorityOverride must be 0-9999")
    overrides = body.get("containerOverrides") or {}
    if not all(isinstance(c, str) for c in overrides.get("command", [])):
        out.append("command must be a list of strings")
    for env in overrides.get("environment", []):
        if set(env) != {"name", "value"} or env["name"].startswith("AWS_BATCH"):
            out.append(f"bad environment entry {env}")
    for req in overrides.get("resourceRequirements", []):
        kind, value = req.get("type"), str(req.get("value", ""))
        if kind not in ("VCPU", "MEMORY", "GPU"):
            out.append(f"bad resource requirement {req}")
        if not re.fullmatch(r"[0-9]+" if kind == "GPU" else r"[0-9]+(\.[0-9]+)?", value):
            out.append(f"resource value {value!r} is not valid for {kind}")
    out += tag_problems(body.get("tags") or {})
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
    deregistered: list[str] = field(default_factory=list)
    # queue name → its scheduling policy ARN ("" for none)
    queues: dict[str, str] = field(default_factory=lambda: {
        QUEUE: "", FAIR_QUEUE: POLICY_ARN, SPOT_QUEUE: ""})
    # (log group, log stream) → its events
    streams: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    empty_pages: int = 0
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
            if status in ("RUNNING", *TERMINAL):
                self._open_stream(job)
            if status in TERMINAL:
                job.stopped_at = now_ms()

    def add_job(self, name: str, status: str, lines: Collection[str] = ()) -> str:
        """Put a job straight into the store (for benchmarks of large fleets), with
        ``lines`` in its log stream if it has reached RUNNING."""
        with self._lock:
            job = FakeJob({"jobName": name, "jobQueue": QUEUE, "tags": {}}, status=status)
            self.jobs[job.job_id] = job
            if status in ("RUNNING", *TERMINAL):
                self._open_stream(job)
                self.log(job.arn, *lines)
            return job.arn

    def log(self, arn: str, *lines: str) -> None:
        """The job's container prints ``lines`` (one event each, as the awslogs driver
        sends them); its stream must exist (the job has reached RUNNING)."""
        with self._lock:
            job = self.jobs[arn.rsplit("/", 1)[1]]
            events = self.streams[(job.log_group, job.log_stream)]
            for line in lines:
                t = now_ms()
                events.append({"timestamp": t, "message": line, "ingestionTime": t})

    def log_events(self, arn: str) -> list[str]:
        with self._lock:
            job = self.jobs[arn.rsplit("/", 1)[1]]
            return [e["message"] for e in self.streams.get((job.log_group, job.log_stream), [])]

    def _open_stream(self, job: FakeJob) -> None:
        if not job.log_stream:
            job.log_stream = f"{job.definition['jobDefinitionName']}/default/{job.job_id}"
            self.streams[(job.log_group, job.log_stream)] = []

    def _step(self, job: FakeJob) -> None:
        if job.status in _NEXT:
            job.status = _NEXT[job.status]
            if job.status == "STARTING":
                job.started_at = now_ms()
            if job.status == "RUNNING":
                self._open_stream(job)
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
        target = req.headers.get("x-amz-target", "")
        action = target.rsplit(".", 1)[-1] if target else req.path.rsplit("/", 1)[-1]
        with self._lock:
            self.calls[action] += 1
            if not req.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256"):
                return _error(403, "UnrecognizedClientException", "missing SigV4 signature")
            for i, methods in enumerate(self._throttle):
                if methods is None or action in methods:
                    del self._throttle[i]
                    return _error(429 if not target else 400,
                                  "TooManyRequestsException" if not target
                                  else "ThrottlingException", "Rate exceeded")
            operation = getattr(self, f"_{action.lower()}", None)
            if operation is None:
                return _error(404, "UnknownOperationException", action)
            try:
                return Response(200, operation(req.body or {}))
            except _ClientError as exc:
                return _error(400, exc.code, str(exc))

    def _queue_policy(self, ref: Any) -> bool | None:
        name = str(ref or "").rsplit("/", 1)[-1]
        if ref not in (name, queue_arn(name)) or name not in self.queues:
            return None
        return bool(self.queues[name])

    def _submitjob(self, body: dict[str, Any]) -> dict[str, Any]:
        problems = problems_with(body, self._queue_policy(body.get("jobQueue")))
        definition = self._definition(str(body.get("jobDefinition")))
        if definition is None:
            problems.append(f"job definition {body.get('jobDefinition')} does not exist")
        elif definition["status"] != "ACTIVE":
            problems.append(f"job definition {definition['jobDefinitionArn']} is INACTIVE")
        if problems:
            raise _ClientError("; ".join(problems))
        assert definition is not None
        self.submits.append(body)
        job = FakeJob(body, definition)
        self.jobs[job.job_id] = job
        return {"jobArn": job.arn, "jobName": job.name, "jobId": job.job_id}

    def _definition(self, ref: str) -> dict[str, Any] | None:
        """A definition by ARN or ``name:revision``, or a bare name's latest ACTIVE one."""
        exact = [d for d in self.definitions
                 if ref in (d["jobDefinitionArn"], f"{d['jobDefinitionName']}:{d['revision']}")]
        named = [d for d in self.definitions
                 if ref == d["jobDefinitionName"] and d["status"] == "ACTIVE"]
        found = exact or named
        return max(found, key=lambda d: d["revision"]) if found else None

    def _describejobqueues(self, body: dict[str, Any]) -> dict[str, Any]:
        refs = body.get("jobQueues") or list(self.queues)
        out = []
        for ref in refs:
            if self._queue_policy(ref) is None:
                continue
            name = str(ref).rsplit("/", 1)[-1]
            queue: dict[str, Any] = {"jobQueueName": name, "jobQueueArn": queue_arn(name),
                                     "state": "ENABLED", "status": "VALID", "priority": 1,
                                     "computeEnvironmentOrder": []}
            if self.queues[name]:
                queue["schedulingPolicyArn"] = self.queues[name]
            out.append(queue)
        return {"jobQueues": out}

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
        if problems := tag_problems(body.get("tags") or {}):
            raise _ClientError("; ".join(problems))
        revision = 1 + sum(1 for d in self.definitions if d["jobDefinitionName"] == name)
        made = {**body, "jobDefinitionArn": f"arn:aws:batch:{REGION}:{ACCOUNT}:job-definition/"
                                            f"{name}:{revision}", "revision": revision,
                "status": "ACTIVE"}
        self.definitions.append(made)
        self.registered.append(body)
        return {k: made[k] for k in ("jobDefinitionName", "jobDefinitionArn", "revision")}

    def _deregisterjobdefinition(self, body: dict[str, Any]) -> dict[str, Any]:
        ref = str(body.get("jobDefinition", ""))
        found = [d for d in self.definitions
                 if ref in (d["jobDefinitionArn"], f"{d['jobDefinitionName']}:{d['revision']}")]
        if not found:
            raise _ClientError(f"job definition {ref} does not exist")
        found[0]["status"] = "INACTIVE"
        self.deregistered.append(found[0]["jobDefinitionArn"])
        return {}

    def _describejobs(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = body.get("jobs") or []
        if len(ids) > 100:
            raise _ClientError("describe at most 100 jobs per call")
        self.describe_sizes.append(len(ids))
        found = [self.jobs.get(i.rsplit("/", 1)[-1]) for i in ids]
        return {"jobs": [j.detail() for j in found if j is not None]}

    def _listjobs(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._queue_policy(body.get("jobQueue")) is None:
            raise _ClientError(f"job queue {body.get('jobQueue')} does not exist")
        queue = str(body["jobQueue"]).rsplit("/", 1)[-1]
        names = {v.lower() for f in body.get("filters") or [] if f.get("name") == "JOB_NAME"
                 for v in f.get("values", [])}
        status = None if body.get("filters") else body.get("jobStatus", "RUNNING")
        matched = [j for j in sorted(self.jobs.values(), key=lambda j: -j.created_at)
                   if str(j.request.get("jobQueue", "")).rsplit("/", 1)[-1] == queue
                   and (not names or j.name.lower() in names)
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

    # --- CloudWatch Logs ----------------------------------------------------------------

    def _getlogevents(self, body: dict[str, Any]) -> dict[str, Any]:
        key = (str(body.get("logGroupName", "")), str(body.get("logStreamName", "")))
        if key not in self.streams:
            raise _ClientError("The specified log stream does not exist.",
                               "ResourceNotFoundException")
        events = self.streams[key]
        limit = int(body.get("limit") or 10_000)
        if not 1 <= limit <= 10_000:
            raise _ClientError("limit must be 1-10000", "InvalidParameterException")
        token = body.get("nextToken")
        if token:
            match = re.fullmatch(r"f/(\d+)/(\d+)", str(token))
            if match is None:
                raise _ClientError("The specified nextToken is invalid.",
                                   "InvalidParameterException")
            start, gap = int(match.group(1)), int(match.group(2))
        else:
            start = 0 if body.get("startFromHead") else max(0, len(events) - limit)
            gap = 0
        if gap < self.empty_pages:
            return {"events": [], "nextForwardToken": f"f/{start:020d}/{gap + 1}",
                    "nextBackwardToken": f"b/{start:020d}/0"}
        page, size = [], 0
        for event in events[start:start + limit]:
            size += len(event["message"].encode()) + LOG_EVENT_OVERHEAD
            if size > MAX_LOG_PAGE_BYTES:
                break
            page.append(event)
        end = start + len(page)
        forward = f"f/{end:020d}/0" if page or not token else str(token)
        return {"events": page, "nextForwardToken": forward,
                "nextBackwardToken": f"b/{start:020d}/0"}


def _error(status: int, code: str, message: str) -> Response:
    return Response(status, {"__type": code, "message": message},
                    {"x-amzn-ErrorType": code})

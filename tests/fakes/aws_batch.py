"""A stateful fake of the AWS Batch REST-JSON API and of the CloudWatch Logs call that
Jennah makes, enforcing what their documentation says (docs/providers.md cites it).

moto's Batch (docs/design.md §9) checks request shapes and idempotency well, but its jobs jump
straight to SUCCEEDED. This fake walks them through every state instead, one step per
``advance()``: SUBMITTED → PENDING → RUNNABLE → STARTING → RUNNING → SUCCEEDED/FAILED,
the outcome read from the commands (``providers.memory.planned_exit``, below).

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
* ``POST /v1/describejobs`` takes at most 100 ids (more is a 400, as on AWS). Each
  attempt of a job gets its own ``logStreamName`` (``<definition>/default/<task id>``)
  when it reaches RUNNING, and its container carries the definition's
  ``logConfiguration``.
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
  Terminating an array job terminates each of its children the same way.
* **Array jobs** ("Array jobs", AWS Batch User Guide): ``arrayProperties.size`` must be 2
  to 10,000. The parent ``<id>`` gets children ``<id>:0`` … ``<id>:N-1`` (in ``jobs``,
  described and terminated by those ids, not in a queue's listing, not counted by
  ``executions``), which step like plain jobs; the parent has no container of its own: it
  is SUBMITTED, PENDING once a child is RUNNABLE or further, then SUCCEEDED when every
  child succeeded, else FAILED once every child has ended. ``DescribeJobs`` gives the
  parent ``arrayProperties {size, statusSummary}`` (a count for each of the seven
  states) and a child ``arrayProperties {index}``; ``ListJobs`` takes exactly one of
  ``jobQueue`` and ``arrayJobId``, lists only RUNNING jobs without a ``jobStatus``, and
  pages by ``maxResults`` (1-1,000, 100 by default).
* **Containers**: a job's container sees the request's environment plus what AWS adds
  (``AWS_BATCH_JOB_ID``, ``AWS_BATCH_JOB_ATTEMPT``, and ``AWS_BATCH_JOB_ARRAY_INDEX`` in
  a child). No process runs: ``container_view`` works out the program and environment a
  command gives (a ``sh -c`` script that only exports ``NAME="${OTHER:-default}"``
  values and then ``exec "$@"`` passes them on, as a POSIX shell would), the outcome is
  ``planned_exit`` of that program as task ``$JENNAH_TASK_INDEX`` (no such task when it
  is not set), and an ``echo "…"`` in it prints its text, ``$NAME``/``${NAME}``
  expanded, to the attempt's log stream when the attempt starts RUNNING.
* **Attempts and retries** ("Automated job retries", "RetryStrategy", "EvaluateOnExit"):
  ``retryStrategy`` must have 1-10 ``attempts`` and at most 5 ``evaluateOnExit`` entries,
  each an ``action`` RETRY or EXIT (any case) and patterns of the allowed characters (an
  exit code: digits; a reason: letters, digits, ``.``, ``:``, white space), each
  optionally ending in ``*``. Every attempt that ends is added to ``attempts`` (its
  exit code, log stream, reason and times); a failed one is retried (back to RUNNABLE,
  a new log stream when it runs again) while attempts are left and the first entry
  whose patterns all match says RETRY, or none matches. ``preempt(arn)`` ends a running
  attempt as a reclaimed Spot host does (``Host EC2 (instance …) terminated.``, no exit
  code).
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
from collections.abc import Collection, Mapping, Sequence
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
STATES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED")
MIN_ARRAY, MAX_ARRAY = 2, 10_000
MAX_ATTEMPTS, MAX_RULES, MAX_PATTERN = 10, 5, 512
EXIT_CODE_PATTERN = re.compile(r"[0-9]*\*?")
REASON_PATTERN = re.compile(r"[A-Za-z0-9.: \t]*\*?")
SPOT_RECLAIM = "Host EC2 (instance i-0fa4e1d2c3b4a5968) terminated."
CONTAINER_EXITED = "Essential container in task exited"
# `sh -c SCRIPT NAME ARGS…` whose SCRIPT exports `NAME="${OTHER:-default}"` values, then
# runs its arguments (`exec "$@"`).
_EXPORT = re.compile(r'export (\w+)="\$\{(\w+)(?::-([^}"]*))?\}"')
_PASS_ON = re.compile(r'(?:export \w+="\$\{\w+(?::-[^}"]*)?\}"; )*exec "\$@"')
_ECHO = re.compile(r'\becho "([^"]*)"')
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


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


def container_view(command: Sequence[str], env: Mapping[str, str]) -> tuple[
        list[str], dict[str, str]]:
    """The program a container's ``command`` runs and the environment that program sees:
    a ``sh -c SCRIPT NAME ARGS…`` whose script only exports ``NAME="${OTHER:-default}"``
    values and then runs ``exec "$@"`` runs ARGS with those values (POSIX sh: the default
    when OTHER is unset or empty); any other command is the program itself."""
    env = dict(env)
    if (len(command) >= 4 and command[0] in ("sh", "/bin/sh") and command[1] == "-c"
            and _PASS_ON.fullmatch(command[2])):
        for name, other, default in _EXPORT.findall(command[2]):
            env[name] = env.get(other) or default
        return list(command[4:]), env
    return list(command), env


def printed(program: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The lines the ``echo "…"`` commands of ``program`` print in ``env``."""
    return [_VARIABLE.sub(lambda m: env.get(m.group(1), ""), text)
            for text in _ECHO.findall(" ".join(program))]


def task_index_of(env: Mapping[str, str]) -> int:
    """The task a program is, for ``planned_exit``: ``$JENNAH_TASK_INDEX`` (-1, no task,
    when it is unset or not a number)."""
    value = env.get("JENNAH_TASK_INDEX", "")
    return int(value) if value.isdigit() else -1


def _matches(pattern: str, value: str | None) -> bool:
    """AWS's evaluateOnExit glob: exact, or a prefix with a final ``*``."""
    if value is None:
        return False
    return value.startswith(pattern[:-1]) if pattern.endswith("*") else value == pattern


def retry_action(strategy: Mapping[str, Any], exit_code: int | None, reason: str) -> str:
    """RETRY or EXIT for a failed attempt: the first ``evaluateOnExit`` entry whose
    patterns all match decides, and RETRY when none does ("Automated job retries")."""
    values = {"onExitCode": None if exit_code is None else str(exit_code),
              "onStatusReason": reason, "onReason": ""}
    for rule in strategy.get("evaluateOnExit") or []:
        if all(_matches(str(rule[k]), v) for k, v in values.items() if k in rule):
            return str(rule["action"]).upper()
    return "RETRY"


def retry_problems(strategy: Any) -> list[str]:
    """What AWS refuses in a ``retryStrategy``."""
    if not isinstance(strategy, dict):
        return ["retryStrategy must be an object"]
    out = []
    attempts, rules = strategy.get("attempts"), strategy.get("evaluateOnExit")
    if attempts is not None and not (isinstance(attempts, int)
                                     and 1 <= attempts <= MAX_ATTEMPTS):
        out.append("retryStrategy.attempts must be 1-10")
    if rules is None:
        return out
    if attempts is None:
        out.append("retryStrategy.evaluateOnExit needs attempts")
    if not isinstance(rules, list) or len(rules) > MAX_RULES:
        return [*out, "retryStrategy.evaluateOnExit: at most 5 entries"]
    for rule in rules:
        keys = set(rule) - {"action"}
        if str(rule.get("action", "")).upper() not in ("RETRY", "EXIT") or not keys <= {
                "onExitCode", "onReason", "onStatusReason"}:
            out.append(f"evaluateOnExit entry {rule}: action RETRY or EXIT, on* patterns")
        for key in keys & {"onExitCode", "onReason", "onStatusReason"}:
            rule_of = EXIT_CODE_PATTERN if key == "onExitCode" else REASON_PATTERN
            value = str(rule[key])
            if len(value) > MAX_PATTERN or not rule_of.fullmatch(value):
                out.append(f"evaluateOnExit {key} {value!r} is not a valid pattern")
    return out


def array_problems(properties: Any) -> list[str]:
    """What AWS refuses in ``arrayProperties``."""
    size = properties.get("size") if isinstance(properties, dict) else None
    if set(properties or {}) - {"size"} or not (
            isinstance(size, int) and MIN_ARRAY <= size <= MAX_ARRAY):
        return [f"arrayProperties.size must be between {MIN_ARRAY} and {MAX_ARRAY}"]
    return []


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
    # attempts that ended, as DescribeJobs reports them
    attempts: list[dict[str, Any]] = field(default_factory=list)
    # an array job's children; a child's index
    children: list[FakeJob] = field(default_factory=list)
    index: int | None = None

    @property
    def is_child(self) -> bool:
        return self.index is not None

    @property
    def retry_strategy(self) -> dict[str, Any]:
        return dict(self.request.get("retryStrategy")
                    or self.definition.get("retryStrategy") or {"attempts": 1})

    def container(self) -> tuple[list[str], dict[str, str]]:
        """The program this job's container runs, and its environment."""
        overrides = self.request.get("containerOverrides") or {}
        env = {e["name"]: e["value"] for e in overrides.get("environment", [])}
        env.update({"AWS_BATCH_JOB_ID": self.job_id,
                    "AWS_BATCH_JOB_ATTEMPT": str(len(self.attempts) + 1)})
        if self.index is not None:
            env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(self.index)
        command = overrides.get("command") or (
            self.definition.get("containerProperties") or {}).get("command") or []
        return container_view(command, env)

    def planned(self) -> int | None:
        program, env = self.container()
        return planned_exit(program, task_index_of(env))

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
        if self.children:
            out["arrayProperties"] = {"size": len(self.children)}
        elif self.index is not None:
            out["arrayProperties"] = {"index": self.index}
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
               "timeout": self.request.get("timeout"), "attempts": list(self.attempts),
               "dependsOn": [], "parameters": {}, "retryStrategy": self.retry_strategy}
        if self.children:
            counts = Counter(c.status for c in self.children)
            out["arrayProperties"] = {"size": len(self.children),
                                      "statusSummary": {k: counts[k] for k in STATES}}
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
    if "retryStrategy" in body:
        out += retry_problems(body["retryStrategy"])
    if "arrayProperties" in body:
        out += array_problems(body["arrayProperties"])
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
        """Jobs submitted with that name (an array job once, not its children)."""
        with self._lock:
            return sum(1 for j in self.jobs.values() if j.name == job_name and not j.is_child)

    def advance(self, steps: int = 1) -> None:
        with self._lock:
            for _ in range(steps):
                for job in self.jobs.values():
                    self._step(job)
                for job in self.jobs.values():
                    if job.children:
                        self._settle_parent(job)

    def job(self, ref: str) -> FakeJob:
        """A job by ARN or id (a child: ``<parent id>:<index>``)."""
        with self._lock:
            return self.jobs[ref.rsplit("/", 1)[-1]]

    def preempt(self, ref: str) -> None:
        """The Spot host under a running job (or child) is reclaimed: its attempt ends
        without an exit code, and the retry strategy decides what follows."""
        with self._lock:
            job = self.job(ref)
            assert job.status == "RUNNING", job.status
            self._end_attempt(job, None, SPOT_RECLAIM)

    def set_state(self, arn: str, status: str, *, reason: str = "",
                  exit_code: int | None = None) -> None:
        with self._lock:
            job = self.job(arn)
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
            job = self.job(arn)
            events = self.streams[(job.log_group, job.log_stream)]
            for line in lines:
                t = now_ms()
                events.append({"timestamp": t, "message": line, "ingestionTime": t})

    def log_events(self, arn: str) -> list[str]:
        """What the job's current attempt has printed."""
        with self._lock:
            job = self.job(arn)
            return [e["message"] for e in self.streams.get((job.log_group, job.log_stream), [])]

    def _open_stream(self, job: FakeJob) -> None:
        """The attempt's stream, named like the ECS task's (``:`` is not allowed in one)."""
        if not job.log_stream:
            job.log_stream = f"{job.definition['jobDefinitionName']}/default/{uuid.uuid4().hex}"
            self.streams[(job.log_group, job.log_stream)] = []

    def _step(self, job: FakeJob) -> None:
        if job.children:
            return  # the parent runs nothing; _settle_parent follows its children
        if job.status in _NEXT:
            job.status = _NEXT[job.status]
            if job.status == "STARTING":
                job.started_at = now_ms()
            if job.status == "RUNNING":
                self._open_stream(job)
                program, env = job.container()
                self.log(job.arn, *printed(program, env))
        elif job.status == "RUNNING":
            code = 137 if job.terminating else job.planned()
            if code is not None:
                self._end_attempt(job, code, job.status_reason if job.terminating
                                  else CONTAINER_EXITED if code else "")

    def _end_attempt(self, job: FakeJob, code: int | None, reason: str) -> None:
        """The running attempt ended: kept in ``attempts``; the job succeeds, fails, or
        (a failure its retry strategy retries, while attempts are left) waits again."""
        stopped = now_ms()
        job.attempts.append({"container": {"exitCode": code, "logStreamName": job.log_stream},
                             "startedAt": job.started_at, "stoppedAt": stopped,
                             "statusReason": reason})
        strategy = job.retry_strategy
        if code != 0 and len(job.attempts) < int(strategy.get("attempts", 1)) and (
                retry_action(strategy, code, reason) == "RETRY"):
            job.status, job.started_at, job.log_stream = "RUNNABLE", None, ""
            job.terminating = False
            return
        job.status = "SUCCEEDED" if code == 0 else "FAILED"
        job.exit_code, job.stopped_at, job.status_reason = code, stopped, reason

    def _settle_parent(self, parent: FakeJob) -> None:
        """An array job's state from its children's."""
        states = Counter(c.status for c in parent.children)
        if states["SUCCEEDED"] + states["FAILED"] == len(parent.children):
            if parent.status not in TERMINAL:
                parent.status = "SUCCEEDED" if not states["FAILED"] else "FAILED"
                parent.stopped_at = max(c.stopped_at or 0 for c in parent.children)
        elif states["SUBMITTED"] + states["PENDING"] < len(parent.children):
            parent.status = "PENDING"

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
        for index in range((body.get("arrayProperties") or {}).get("size", 0)):
            child = FakeJob(body, definition, f"{job.job_id}:{index}", index=index,
                            created_at=job.created_at)
            job.children.append(child)
            self.jobs[child.job_id] = child
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
        if ("jobQueue" in body) == ("arrayJobId" in body):
            raise _ClientError("specify exactly one of jobQueue and arrayJobId")
        size = int(body.get("maxResults") or 100)
        if not 1 <= size <= 1000:
            raise _ClientError("maxResults must be 1-1000")
        status = None if body.get("filters") else body.get("jobStatus", "RUNNING")
        if status is not None and status not in STATES:
            raise _ClientError(f"jobStatus {status} is not one of {', '.join(STATES)}")
        if "arrayJobId" in body:
            parent = self.jobs.get(str(body["arrayJobId"]))
            if parent is None or not parent.children:
                raise _ClientError(f"{body['arrayJobId']} is not an array job")
            matched = [c for c in parent.children if status is None or c.status == status]
        else:
            matched = self._queue_jobs(body, status)
        start = int(body.get("nextToken") or 0)
        out: dict[str, Any] = {"jobSummaryList": [j.summary() for j in matched[start:start + size]]}
        if start + size < len(matched):
            out["nextToken"] = str(start + size)
        return out

    def _queue_jobs(self, body: dict[str, Any], status: str | None) -> list[FakeJob]:
        """A queue's jobs (not array children), newest first, by name and status."""
        if self._queue_policy(body.get("jobQueue")) is None:
            raise _ClientError(f"job queue {body.get('jobQueue')} does not exist")
        queue = str(body["jobQueue"]).rsplit("/", 1)[-1]
        names = {v.lower() for f in body.get("filters") or [] if f.get("name") == "JOB_NAME"
                 for v in f.get("values", [])}
        return [j for j in sorted(self.jobs.values(), key=lambda j: -j.created_at)
                if not j.is_child
                and str(j.request.get("jobQueue", "")).rsplit("/", 1)[-1] == queue
                and (not names or j.name.lower() in names)
                and (status is None or j.status == status)]

    def _terminatejob(self, body: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs.get(str(body.get("jobId")))
        if job is None:
            raise _ClientError(f"Job {body.get('jobId')} not found")
        if not body.get("reason"):
            raise _ClientError("'reason' is a required field")
        for each in job.children or [job]:
            self._terminate(each, str(body["reason"]))
        if job.children:
            if job.status not in TERMINAL:
                job.status_reason = str(body["reason"])
            self._settle_parent(job)
        return {}

    def _terminate(self, job: FakeJob, reason: str) -> None:
        if job.status in TERMINAL:
            return
        job.status_reason = reason
        if job.status in ("STARTING", "RUNNING"):
            job.terminating = True
        else:
            job.status, job.stopped_at = "FAILED", now_ms()

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

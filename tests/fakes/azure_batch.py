"""A small stateful fake of the Azure Batch data-plane REST API: the calls Jennah makes.

``azure.batch.BatchClient`` (15.x) with an ``AzureNamedKeyCredential`` talks to it over
plain HTTP (docs/design.md §9). Endpoints:

* ``POST /jobs``: creates a job on the known pool (201); an existing id is 409
  ``JobExists``. ``POST /jobs/{job}/tasks``: adds the task (201); 409 ``TaskExists``.
  Both refuse (400 ``InvalidPropertyValue``) what Batch would: bad ids, an unknown pool,
  a task without container image or with malformed environment settings or durations.
  Accepted bodies are kept in ``job_requests``/``task_requests`` for the tests to inspect.
* ``GET /jobs/{job}`` and ``GET /jobs/{job}/tasks/{task}`` (404 ``JobNotFound`` /
  ``TaskNotFound``).
* ``POST /jobs/{job}/terminate`` (202): the job goes ``terminating`` and is ``completed``
  at the next read of the job (the SDK's terminate poller reads it), with the given
  ``terminateReason``. A running task is ended (exit 137); an active task stays active,
  as the real service documents. Terminating a completed job is 409 ``JobCompleted``.

Tasks move active → preparing → running → completed, one step per ``advance()``, their
exit code read from the command line (``providers.memory.planned_exit``); a job with
``onAllTasksComplete=terminatejob`` then completes (reason ``AllTasksComplete``).
Every request must carry ``Authorization: SharedKey <account>:<signature>`` (else 401);
``throttle(n)`` answers the next ``n`` calls 429.
"""

from __future__ import annotations

import re
import shlex
import threading
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from providers.memory import planned_exit
from tests.fakes import Request, Response

ACCOUNT = "jennahacct"
POOL = "jennah-pool"
ID_RULE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DURATION = re.compile(r"^P(T(\d+H)?(\d+M)?(\d+(\.\d+)?S)?|\d+D(T.*)?)$")
SHARED_KEY = re.compile(rf"^SharedKey {ACCOUNT}:[A-Za-z0-9+/]+=*$")
_NEXT = {"active": "preparing", "preparing": "running"}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class FakeTask:
    body: dict[str, Any]
    state: str = "active"
    created: str = field(default_factory=_now)
    start: str | None = None
    end: str | None = None
    exit_code: int | None = None
    failure: dict[str, Any] | None = None

    def view(self, job_id: str) -> dict[str, Any]:
        info: dict[str, Any] = {"retryCount": 0, "requeueCount": 0}
        if self.start:
            info["startTime"] = self.start
        if self.state == "completed":
            info.update(endTime=self.end, result="success" if self.exit_code == 0 else "failure")
            if self.exit_code is not None:
                info["exitCode"] = self.exit_code
            if self.failure:
                info["failureInfo"] = self.failure
        return {**self.body, "url": f"https://x/jobs/{job_id}/tasks/{self.body['id']}",
                "eTag": "0x1", "lastModified": self.created, "creationTime": self.created,
                "state": self.state, "stateTransitionTime": self.created,
                "executionInfo": info}


@dataclass
class FakeJob:
    body: dict[str, Any]
    state: str = "active"
    created: str = field(default_factory=_now)
    terminate_reason: str | None = None
    end: str | None = None
    tasks: dict[str, FakeTask] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        info: dict[str, Any] = {"startTime": self.created, "poolId": POOL}
        if self.terminate_reason:
            info.update(terminateReason=self.terminate_reason, endTime=self.end)
        return {**self.body, "url": f"https://x/jobs/{self.body['id']}", "eTag": "0x1",
                "lastModified": self.created, "creationTime": self.created,
                "state": self.state, "stateTransitionTime": self.created, "executionInfo": info}

    def complete(self, reason: str) -> None:
        self.state, self.terminate_reason, self.end = "completed", reason, _now()


def task_problems(body: dict[str, Any]) -> list[str]:
    out = []
    if not ID_RULE.match(str(body.get("id", ""))):
        out.append("task id breaks the id rules")
    if not isinstance(body.get("commandLine"), str):
        out.append("commandLine is required")
    if not (body.get("containerSettings") or {}).get("imageName"):
        out.append("containerSettings.imageName is required")
    for env in body.get("environmentSettings") or []:
        if not ENV_NAME.match(str(env.get("name", ""))) or not isinstance(env.get("value"), str):
            out.append(f"bad environment setting {env}")
    wall = (body.get("constraints") or {}).get("maxWallClockTime")
    if wall is not None and not DURATION.match(wall):
        out.append(f"maxWallClockTime {wall!r} is not an ISO 8601 duration")
    return out


@dataclass
class FakeAzureBatch:
    """The account's state and test controls (thread-safe)."""

    jobs: dict[str, FakeJob] = field(default_factory=dict)
    job_requests: list[dict[str, Any]] = field(default_factory=list)
    task_requests: list[dict[str, Any]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    _throttle: list[Collection[str] | None] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # --- test controls ------------------------------------------------------------------

    def throttle(self, n: int, methods: Collection[str] | None = None) -> None:
        with self._lock:
            self._throttle.extend([methods] * n)

    def executions(self, job_id: str) -> int:
        with self._lock:
            job = self.jobs.get(job_id)
            return 0 if job is None else len(job.tasks)

    def advance(self, steps: int = 1) -> None:
        with self._lock:
            for _ in range(steps):
                for job in self.jobs.values():
                    for task in job.tasks.values():
                        self._step(job, task)

    def set_task(self, job_id: str, state: str, *, exit_code: int | None = None,
                 failure: dict[str, Any] | None = None, ran_for: float = 1.0) -> None:
        with self._lock:
            task = next(iter(self.jobs[job_id].tasks.values()))
            task.state, task.exit_code, task.failure = state, exit_code, failure
            if state in ("running", "completed"):
                start = datetime.now(UTC) - timedelta(seconds=ran_for)
                task.start = start.isoformat().replace("+00:00", "Z")
            if state == "completed":
                task.end = _now()

    def add_job(self, job_id: str, task_id: str, state: str) -> None:
        """Put a job and its task straight into the store (for benchmarks)."""
        with self._lock:
            job = FakeJob({"id": job_id, "poolInfo": {"poolId": POOL}})
            job.tasks[task_id] = FakeTask({"id": task_id, "commandLine": "sleep 60"}, state)
            self.jobs[job_id] = job

    def _step(self, job: FakeJob, task: FakeTask) -> None:
        if job.state != "active":
            return
        if task.state in _NEXT:
            task.state = _NEXT[task.state]
            if task.state == "running":
                task.start = _now()
        elif task.state == "running":
            code = planned_exit(shlex.split(task.body.get("commandLine", "")))
            if code is not None:
                self._finish(job, task, code)

    def _finish(self, job: FakeJob, task: FakeTask, code: int) -> None:
        task.state, task.exit_code, task.end = "completed", code, _now()
        if code:
            task.failure = {"category": "usererror", "code": "FailureExitCode",
                            "message": f"The task exited with exit code {code}"}
        if job.body.get("onAllTasksComplete") == "terminatejob":
            job.complete("AllTasksComplete")

    # --- the API ------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        parts = [p for p in req.path.split("/") if p]
        route = f"{req.method} /" + "/".join(
            "{id}" if i % 2 else p for i, p in enumerate(parts))
        with self._lock:
            self.calls[route] += 1
            if not SHARED_KEY.match(req.headers.get("authorization", "")):
                return _error(401, "AuthenticationFailed", "SharedKey authorization required")
            if "api-version" not in req.query:
                return _error(400, "MissingRequiredQueryParameter", "api-version")
            for i, methods in enumerate(self._throttle):
                if methods is None or route in methods:
                    del self._throttle[i]
                    return _error(429, "TooManyRequests", "The server is busy", retry_after=True)
            return self._route(route, parts, req.body or {})

    def _route(self, route: str, parts: list[str], body: dict[str, Any]) -> Response:
        if route == "POST /jobs":
            return self._create_job(body)
        job = self.jobs.get(parts[1]) if len(parts) > 1 else None
        if job is None:
            return _error(404, "JobNotFound", "The specified job does not exist.")
        if route == "GET /jobs/{id}":
            if job.state == "terminating":  # the terminate "finishes" by the next read
                job.complete(job.terminate_reason or "UserTerminate")
            return Response(200, job.view())
        if route == "POST /jobs/{id}/terminate":
            return self._terminate(job, body)
        if route == "POST /jobs/{id}/tasks":
            return self._create_task(job, body)
        if route == "GET /jobs/{id}/tasks/{id}":
            task = job.tasks.get(parts[3])
            if task is None:
                return _error(404, "TaskNotFound", "The specified task does not exist.")
            return Response(200, task.view(parts[1]))
        return _error(404, "UnsupportedOperation", route)

    def _create_job(self, body: dict[str, Any]) -> Response:
        if not ID_RULE.match(str(body.get("id", ""))):
            return _error(400, "InvalidPropertyValue", "job id breaks the id rules")
        if (body.get("poolInfo") or {}).get("poolId") != POOL:
            return _error(400, "InvalidPropertyValue", "poolInfo.poolId is not a known pool")
        if body["id"] in self.jobs:
            return _error(409, "JobExists", "The specified job already exists.")
        self.job_requests.append(body)
        self.jobs[body["id"]] = FakeJob(body)
        return Response(201)

    def _create_task(self, job: FakeJob, body: dict[str, Any]) -> Response:
        problems = task_problems(body)
        if problems:
            return _error(400, "InvalidPropertyValue", "; ".join(problems))
        if body["id"] in job.tasks:
            return _error(409, "TaskExists", "The specified task already exists.")
        if job.state != "active":
            return _error(409, "JobCompleted", "The specified job is already completed.")
        self.task_requests.append(body)
        job.tasks[body["id"]] = FakeTask(body)
        return Response(201)

    def _terminate(self, job: FakeJob, body: dict[str, Any]) -> Response:
        if job.state == "completed":
            return _error(409, "JobCompleted", "The specified job is already completed.")
        job.state = "terminating"
        job.terminate_reason = body.get("terminateReason") or "UserTerminate"
        for task in job.tasks.values():
            if task.state == "running":
                task.state, task.exit_code, task.end = "completed", 137, _now()
        return Response(202)


def _error(status: int, code: str, message: str, retry_after: bool = False) -> Response:
    body = {"odata.metadata": "https://x/$metadata#Microsoft.Azure.Batch.Protocol.Entities"
                              ".Container.errors/@Element",
            "code": code, "message": {"lang": "en-US", "value": message}}
    return Response(status, body, {"Retry-After": "1"} if retry_after else {})

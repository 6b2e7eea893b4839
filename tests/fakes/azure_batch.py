"""A small stateful fake of the Azure Batch data-plane REST API: the calls Jennah makes.

``azure.batch.BatchClient`` (15.x) with an ``AzureNamedKeyCredential`` talks to it over
plain HTTP (docs/design.md §9). Endpoints:

* ``POST /jobs``: creates a job on the known pool (201); an existing id is 409
  ``JobExists``. ``POST /jobs/{job}/tasks``: adds the task (201); 409 ``TaskExists``, or
  409 ``JobCompleted`` on a job that is no longer active. Both refuse (400
  ``InvalidPropertyValue``) what Batch would: bad ids, an unknown pool, an
  ``onAllTasksComplete`` other than ``noaction``/``terminatejob``, metadata items without
  a name or value, a task without container image, with an unknown
  ``containerSettings.workingDirectory``, a registry with a password but no user name or
  with both a password and an identity, malformed environment settings or durations.
  Accepted bodies are kept in ``job_requests``/``task_requests``/``job_updates`` for the
  tests to inspect.
* **A job with no tasks counts as complete** (Batch's documentation of
  ``onAllTasksComplete``): a job created with ``terminatejob`` and no task yet completes
  at once (reason ``AllTasksComplete``), so a task added after it is refused, as the
  service does. The documented way is ``noaction`` first, then ``PATCH /jobs/{job}`` with
  ``terminatejob`` once the tasks are added: the patch ends the job at once if all its
  tasks have already completed; ``terminatejob`` → ``noaction`` is 400
  ``InvalidPropertyValue`` ("once you have engaged automatic Job termination, you cannot
  turn it off again"); patching a job that is completed or terminating is 409.
* ``GET /jobs/{job}`` and ``GET /jobs/{job}/tasks/{task}`` (404 ``JobNotFound`` /
  ``TaskNotFound``).
* Task files: ``GET /jobs/{job}/tasks/{task}/files`` lists the task directory
  (``stdout.txt``, ``stderr.txt`` with ``properties.contentLength``, and the ``wd``
  directory); ``GET .../files/{name}`` returns the content, or the ``ocp-range:
  bytes=a-b`` slice of it, with 200 as the service does (a range starting at or beyond
  the end is 416 ``InvalidRange``). Files exist once the task has started on a node;
  before that both are 409 ``OperationInvalidForCurrentState``. ``write()`` appends to a
  running task's file; every ranged read is kept in ``range_reads``.
* ``POST /jobs/{job}/terminate`` (202): the job goes ``terminating`` and is ``completed``
  at the next read of the job (the SDK's terminate poller reads it), with the given
  ``terminateReason``. A running task is ended (exit 137); an active task stays active,
  as the real service documents. Terminating a completed job is 409 ``JobCompleted``.

Tasks move active → preparing → running → completed, one step per ``advance()``, their
exit code read from the command line (``providers.memory.planned_exit``); a job with
``onAllTasksComplete=terminatejob`` then completes (reason ``AllTasksComplete``).
Every request must carry ``Authorization: SharedKey <account>:<signature>`` (else 401);
``throttle(n)`` answers the next ``n`` calls 429; ``echo_errors(n)`` refuses the next
``n`` task adds with the request body in the error message, as Batch's error details
carry an offending property's value (to check that secrets never reach our errors).
"""

from __future__ import annotations

import re
import shlex
import threading
from collections import Counter
from collections.abc import Collection, Mapping
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
TASK_COMPLETE_MODES = ("noaction", "terminatejob")
WORKING_DIRECTORIES = ("taskWorkingDirectory", "containerImageDefault")
STD_FILES = ("stdout.txt", "stderr.txt")
RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


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
    # The task directory's stdout.txt and stderr.txt, once the task has started.
    files: dict[str, bytearray] = field(default_factory=dict)

    def begin(self, at: str) -> None:
        self.start = at
        for name in STD_FILES:
            self.files.setdefault(name, bytearray())

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

    def end_if_all_tasks_complete(self) -> None:
        """``terminatejob``: Batch ends the job once every task has completed, which a
        job with no task at all already has."""
        if (self.state == "active" and self.body.get("onAllTasksComplete") == "terminatejob"
                and all(t.state == "completed" for t in self.tasks.values())):
            self.complete("AllTasksComplete")


def job_problems(body: dict[str, Any]) -> list[str]:
    out = []
    if not ID_RULE.match(str(body.get("id", ""))):
        out.append("job id breaks the id rules")
    if (body.get("poolInfo") or {}).get("poolId") != POOL:
        out.append("poolInfo.poolId is not a known pool")
    mode = body.get("onAllTasksComplete")
    if mode is not None and mode not in TASK_COMPLETE_MODES:
        out.append(f"onAllTasksComplete {mode!r} is not one of {TASK_COMPLETE_MODES}")
    for item in body.get("metadata") or []:
        if not isinstance(item.get("name"), str) or not isinstance(item.get("value"), str):
            out.append(f"metadata items need a name and a value: {item}")
    return out


def registry_problems(registry: dict[str, Any]) -> list[str]:
    """``ContainerRegistryReference``: a user name and password, or an identity."""
    has_password, has_identity = bool(registry.get("password")), bool(
        (registry.get("identityReference") or {}).get("resourceId"))
    if has_password and not registry.get("username"):
        return ["registry: a password needs a username"]
    if has_password and has_identity:  # the identity is "instead of username and password"
        return ["registry: give a password or an identityReference, not both"]
    return []


def task_problems(body: dict[str, Any]) -> list[str]:
    out = []
    if not ID_RULE.match(str(body.get("id", ""))):
        out.append("task id breaks the id rules")
    if not isinstance(body.get("commandLine"), str):
        out.append("commandLine is required")
    container = body.get("containerSettings") or {}
    if not container.get("imageName"):
        out.append("containerSettings.imageName is required")
    workdir = container.get("workingDirectory")
    if workdir is not None and workdir not in WORKING_DIRECTORIES:
        out.append(f"containerSettings.workingDirectory {workdir!r} is unknown")
    if "registry" in container:
        out.extend(registry_problems(container["registry"] or {}))
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
    job_updates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # (job id, file name, first byte, last byte) of every ranged file read.
    range_reads: list[tuple[str, str, int, int]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    _throttle: list[Collection[str] | None] = field(default_factory=list)
    _echo_errors: int = 0
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # --- test controls ------------------------------------------------------------------

    def throttle(self, n: int, methods: Collection[str] | None = None) -> None:
        with self._lock:
            self._throttle.extend([methods] * n)

    def echo_errors(self, n: int) -> None:
        with self._lock:
            self._echo_errors += n

    def write(self, job_id: str, name: str, data: bytes) -> None:
        """The job's task prints ``data`` to ``name`` (``stdout.txt``/``stderr.txt``)."""
        with self._lock:
            task = next(iter(self.jobs[job_id].tasks.values()))
            assert name in task.files, "a task has files once it has started"
            task.files[name] += data

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
                task.begin(start.isoformat().replace("+00:00", "Z"))
            if state == "completed":
                task.end = _now()

    def add_job(self, job_id: str, task_id: str, state: str) -> None:
        """Put a job and its task straight into the store (for benchmarks)."""
        with self._lock:
            job = FakeJob({"id": job_id, "poolInfo": {"poolId": POOL}})
            task = job.tasks[task_id] = FakeTask({"id": task_id, "commandLine": "sleep 60"}, state)
            if state in ("running", "completed"):
                task.begin(_now())
            self.jobs[job_id] = job

    def _step(self, job: FakeJob, task: FakeTask) -> None:
        if job.state != "active":
            return
        if task.state in _NEXT:
            task.state = _NEXT[task.state]
            if task.state == "running":
                task.begin(_now())
        elif task.state == "running":
            code = planned_exit(shlex.split(task.body.get("commandLine", "")))
            if code is not None:
                self._finish(job, task, code)

    def _finish(self, job: FakeJob, task: FakeTask, code: int) -> None:
        task.state, task.exit_code, task.end = "completed", code, _now()
        if code:
            task.failure = {"category": "usererror", "code": "FailureExitCode",
                            "message": f"The task exited with exit code {code}"}
        job.end_if_all_tasks_complete()

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
            return self._route(route, parts, req.body or {}, req.headers)

    def _route(self, route: str, parts: list[str], body: dict[str, Any],
               headers: Mapping[str, str]) -> Response:
        if route == "POST /jobs":
            return self._create_job(body)
        job = self.jobs.get(parts[1]) if len(parts) > 1 else None
        if job is None:
            return _error(404, "JobNotFound", "The specified job does not exist.")
        if route == "GET /jobs/{id}":
            if job.state == "terminating":  # the terminate "finishes" by the next read
                job.complete(job.terminate_reason or "UserTerminate")
            return Response(200, job.view())
        if route == "PATCH /jobs/{id}":
            return self._update_job(job, body)
        if route == "POST /jobs/{id}/terminate":
            return self._terminate(job, body)
        if route == "POST /jobs/{id}/tasks":
            return self._create_task(job, body)
        task = job.tasks.get(parts[3]) if len(parts) > 3 else None
        if task is None:
            return _error(404, "TaskNotFound", "The specified task does not exist.")
        if route == "GET /jobs/{id}/tasks/{id}":
            return Response(200, task.view(parts[1]))
        if route == "GET /jobs/{id}/tasks/{id}/files":
            return self._list_files(task)
        if route == "GET /jobs/{id}/tasks/{id}/files/{id}":
            return self._read_file(parts[1], task, parts[5], headers.get("ocp-range"))
        return _error(404, "UnsupportedOperation", route)

    def _create_job(self, body: dict[str, Any]) -> Response:
        problems = job_problems(body)
        if problems:
            return _error(400, "InvalidPropertyValue", "; ".join(problems))
        if body["id"] in self.jobs:
            return _error(409, "JobExists", "The specified job already exists.")
        self.job_requests.append(body)
        job = self.jobs[body["id"]] = FakeJob(dict(body))  # the request stays as sent
        job.end_if_all_tasks_complete()  # terminatejob with no task: over at once
        return Response(201)

    def _update_job(self, job: FakeJob, body: dict[str, Any]) -> Response:
        mode = body.get("onAllTasksComplete")
        if mode is not None and mode not in TASK_COMPLETE_MODES:
            return _error(400, "InvalidPropertyValue", f"onAllTasksComplete {mode!r}")
        if job.state == "completed":
            return _error(409, "JobCompleted", "The specified job is already completed.")
        if job.state == "terminating":
            return _error(409, "JobBeingTerminated", "The specified job is being terminated.")
        if mode == "noaction" and job.body.get("onAllTasksComplete") == "terminatejob":
            return _error(400, "InvalidPropertyValue",
                          "onAllTasksComplete cannot go from terminatejob back to noaction")
        self.job_updates.append((job.body["id"], body))
        if mode is not None:
            job.body["onAllTasksComplete"] = mode
        job.end_if_all_tasks_complete()
        return Response(200)

    def _create_task(self, job: FakeJob, body: dict[str, Any]) -> Response:
        problems = task_problems(body)
        if self._echo_errors:
            self._echo_errors -= 1
            problems = [f"the request was refused: {body}"]
        if problems:
            return _error(400, "InvalidPropertyValue", "; ".join(problems))
        if body["id"] in job.tasks:
            return _error(409, "TaskExists", "The specified task already exists.")
        if job.state != "active":
            return _error(409, "JobCompleted", "The specified job is already completed.")
        self.task_requests.append(body)
        job.tasks[body["id"]] = FakeTask(body)
        return Response(201)

    def _list_files(self, task: FakeTask) -> Response:
        if not task.files:
            return _error(409, "OperationInvalidForCurrentState",
                          "The task has not started on a node yet.")
        entries: list[dict[str, Any]] = [
            {"name": name, "url": f"https://x/files/{name}", "isDirectory": False,
             "properties": {"contentLength": len(data), "lastModified": _now(),
                            "creationTime": task.start}}
            for name, data in task.files.items()]
        entries.append({"name": "wd", "url": "https://x/files/wd", "isDirectory": True})
        return Response(200, {"value": entries})

    def _read_file(self, job_id: str, task: FakeTask, name: str,
                   ocp_range: str | None) -> Response:
        if not task.files:
            return _error(409, "OperationInvalidForCurrentState",
                          "The task has not started on a node yet.")
        if name not in task.files:
            return _error(404, "FileNotFound", "The specified file does not exist.")
        data = bytes(task.files[name])
        if ocp_range is not None:
            match = RANGE.match(ocp_range)
            if match is None or int(match[1]) > int(match[2]):
                return _error(400, "InvalidHeaderValue", f"ocp-range {ocp_range!r}")
            first, last = int(match[1]), int(match[2])
            if first >= len(data):
                return _error(416, "InvalidRange", "The range starts beyond the end.")
            self.range_reads.append((job_id, name, first, last))
            data = data[first:last + 1]
        return Response(200, data)

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

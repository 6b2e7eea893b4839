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
* ``POST /jobs/{job}/addtaskcollection`` (add-task-collection): at most 100 tasks
  (else 400) in a body under 1 MB (else 413 ``RequestBodyTooLarge``), with distinct ids
  (else 400); 409 ``JobCompleted`` for the whole call on a job no longer active. Then
  each task has its own result, in ``value``: ``success``, ``clientError`` with
  ``TaskExists`` or ``InvalidPropertyValue`` (the checks of a single add), or
  ``serverError`` (``fail_task_adds(n)``: the next ``n`` tasks). The ids of each call
  are kept in ``collections``. ``lose_responses(n)``: the next ``n`` calls add their
  tasks but answer 500, as a call whose connection broke after the service acted.
* Jobs of several tasks: ``maxParallelTasks`` (-1 or more than 0, else 400) is honoured
  (no more tasks preparing or running at once), and ``commonEnvironmentSettings`` are
  every task's variables unless the task sets the same name. A task's index is its
  ``JENNAH_TASK_INDEX``; its exit code comes from ``planned_exit(command, index)``, and
  an ``echo "…"`` in its command prints the text, variables expanded, to its
  ``stdout.txt``.
* ``GET /jobs/{job}/tasks``: pages of ``maxresults`` tasks (at most 1000, the default)
  with ``odata.nextLink``, in the order they were added, only the ``$select`` fields
  when given; each page's query is kept in ``list_requests``.
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
``n`` task adds (single, or in a collection) with the request body in the error message,
as Batch's error details carry an offending property's value (to check that secrets
never reach our errors).
"""

from __future__ import annotations

import itertools
import json
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
MAX_COLLECTION = 100
MAX_BODY_BYTES = 1_000_000
MAX_PAGE = 1000
_ECHO = re.compile(r'\becho "([^"]*)"')
_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _settings(items: list[dict[str, Any]] | None) -> dict[str, str]:
    return {e["name"]: e["value"] for e in items or ()}


def printed(command_line: str, env: Mapping[str, str]) -> bytes:
    """What the command prints by the ``echo "…"`` convention, variables expanded."""
    text = " ".join(shlex.split(command_line))
    return b"".join(
        _VARIABLE.sub(lambda v: env.get(v.group(1), ""), m.group(1)).encode() + b"\n"
        for m in _ECHO.finditer(text))


@dataclass
class FakeTask:
    body: dict[str, Any]
    state: str = "active"
    created: str = field(default_factory=_now)
    start: str | None = None
    end: str | None = None
    exit_code: int | None = None
    failure: dict[str, Any] | None = None
    # What the task's process sees: the job's common variables, then its own.
    env: dict[str, str] = field(default_factory=dict)
    retry_count: int = 0
    requeue_count: int = 0
    # The task directory's stdout.txt and stderr.txt, once the task has started.
    files: dict[str, bytearray] = field(default_factory=dict)

    def begin(self, at: str) -> None:
        self.start = at
        for name in STD_FILES:
            self.files.setdefault(name, bytearray())

    @property
    def index(self) -> int:
        return int(self.env.get("JENNAH_TASK_INDEX", "0"))

    def view(self, job_id: str) -> dict[str, Any]:
        info: dict[str, Any] = {"retryCount": self.retry_count,
                                "requeueCount": self.requeue_count}
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

    def new_task(self, body: dict[str, Any]) -> None:
        self.tasks[body["id"]] = FakeTask(body, env={
            **_settings(self.body.get("commonEnvironmentSettings")),
            **_settings(body.get("environmentSettings"))})

    def task(self, index: int) -> FakeTask:
        return next(t for t in self.tasks.values() if t.index == index)

    def room(self) -> int | None:
        """``maxParallelTasks``: how many more tasks may start preparing (None: any)."""
        limit = self.body.get("maxParallelTasks", -1)
        busy = sum(t.state in ("preparing", "running") for t in self.tasks.values())
        return None if limit == -1 else limit - busy

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
    parallel = body.get("maxParallelTasks", -1)
    if not isinstance(parallel, int) or not (parallel == -1 or parallel > 0):
        out.append(f"maxParallelTasks {parallel!r} must be -1 or greater than 0")
    out.extend(env_problems(body.get("commonEnvironmentSettings")))
    return out


def env_problems(settings: list[dict[str, Any]] | None) -> list[str]:
    return [f"bad environment setting {env}" for env in settings or []
            if not ENV_NAME.match(str(env.get("name", "")))
            or not isinstance(env.get("value"), str)]


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
    out.extend(env_problems(body.get("environmentSettings")))
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
    # The task ids of every add-task-collection call that reached the tasks.
    collections: list[list[str]] = field(default_factory=list)
    list_requests: list[dict[str, str]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    _throttle: list[Collection[str] | None] = field(default_factory=list)
    _echo_errors: int = 0
    _fail_task_adds: int = 0
    _lose_responses: int = 0
    # Listing continuations: token → (job id, next offset, page size, selected fields).
    _pages: dict[str, tuple[str, int, int, list[str] | None]] = field(default_factory=dict)
    _tokens: itertools.count[int] = field(default_factory=itertools.count)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # --- test controls ------------------------------------------------------------------

    def throttle(self, n: int, methods: Collection[str] | None = None) -> None:
        with self._lock:
            self._throttle.extend([methods] * n)

    def echo_errors(self, n: int) -> None:
        with self._lock:
            self._echo_errors += n

    def fail_task_adds(self, n: int) -> None:
        with self._lock:
            self._fail_task_adds += n

    def lose_responses(self, n: int) -> None:
        with self._lock:
            self._lose_responses += n

    def write(self, job_id: str, name: str, data: bytes, index: int = 0) -> None:
        """Task ``index`` prints ``data`` to ``name`` (``stdout.txt``/``stderr.txt``)."""
        with self._lock:
            task = self.jobs[job_id].task(index)
            assert name in task.files, "a task has files once it has started"
            task.files[name] += data

    def executions(self, job_id: str) -> int:
        """How many times the job's most often added index was added (0: no task)."""
        with self._lock:
            job = self.jobs.get(job_id)
            counts = Counter(t.index for t in job.tasks.values()) if job else Counter()
            return max(counts.values(), default=0)

    def advance(self, steps: int = 1) -> None:
        with self._lock:
            for _ in range(steps):
                for job in self.jobs.values():
                    self._step_job(job)

    def set_task(self, job_id: str, state: str, *, exit_code: int | None = None,
                 failure: dict[str, Any] | None = None, ran_for: float = 1.0,
                 index: int = 0, retries: int = 0, requeues: int = 0) -> None:
        with self._lock:
            task = self.jobs[job_id].task(index)
            task.state, task.exit_code, task.failure = state, exit_code, failure
            task.retry_count, task.requeue_count = retries, requeues
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

    def _step_job(self, job: FakeJob) -> None:
        """One step of each task, starting no more than the job's ``maxParallelTasks``
        allows (a slot freed in this step is used in the next)."""
        if job.state != "active":
            return
        room = job.room()
        for task in job.tasks.values():
            if task.state == "active" and room is not None:
                if room <= 0:
                    continue
                room -= 1
            self._step(job, task)
        job.end_if_all_tasks_complete()

    def _step(self, job: FakeJob, task: FakeTask) -> None:
        if task.state in _NEXT:
            task.state = _NEXT[task.state]
            if task.state == "running":
                task.begin(_now())
        elif task.state == "running":
            command = task.body.get("commandLine", "")
            code = planned_exit(shlex.split(command), task.index)
            if code is not None:
                task.files["stdout.txt"] += printed(command, task.env)
                self._finish(job, task, code)

    def _finish(self, job: FakeJob, task: FakeTask, code: int) -> None:
        task.state, task.exit_code, task.end = "completed", code, _now()
        if code:
            task.failure = {"category": "usererror", "code": "FailureExitCode",
                            "message": f"The task exited with exit code {code}"}

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
            return self._route(route, parts, req.body or {}, req.headers, req.query)

    def _route(self, route: str, parts: list[str], body: dict[str, Any],
               headers: Mapping[str, str], query: Mapping[str, str]) -> Response:
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
        if route == "POST /jobs/{id}/addtaskcollection":
            return self._add_collection(job, body)
        if route == "GET /jobs/{id}/tasks":
            return self._list_tasks(job, query, headers.get("host", "127.0.0.1"))
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
            return _job_over(job)
        self.task_requests.append(body)
        job.new_task(body)
        return Response(201)

    def _add_collection(self, job: FakeJob, body: dict[str, Any]) -> Response:
        tasks = body.get("value") or []
        ids = [t.get("id") for t in tasks]
        if not tasks or len(tasks) > MAX_COLLECTION:
            return _error(400, "InvalidPropertyValue",
                          f"a collection holds 1 to {MAX_COLLECTION} tasks, not {len(tasks)}")
        if len(json.dumps(body)) >= MAX_BODY_BYTES:
            return _error(413, "RequestBodyTooLarge", "The request body is too large.")
        if len(set(ids)) != len(ids):
            return _error(400, "InvalidPropertyValue", "task ids in a collection must differ")
        if job.state != "active":
            return _job_over(job)
        self.collections.append([str(i) for i in ids])
        results = [self._add_one(job, t) for t in tasks]
        if self._lose_responses:
            self._lose_responses -= 1
            return _error(500, "InternalError", "The server encountered an internal error.")
        return Response(200, {"value": results})

    def _add_one(self, job: FakeJob, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {"taskId": body.get("id")}
        problems = task_problems(body)
        if self._echo_errors:
            self._echo_errors -= 1
            problems = [f"the request was refused: {body}"]
        if self._fail_task_adds:
            self._fail_task_adds -= 1
            return {**result, "status": "serverError",
                    "error": {"code": "ServerBusy", "message": {"value": "try again"}}}
        if problems or body["id"] in job.tasks:
            code = "InvalidPropertyValue" if problems else "TaskExists"
            message = "; ".join(problems) or "The specified task already exists."
            return {**result, "status": "clientError",
                    "error": {"code": code, "message": {"lang": "en-US", "value": message}}}
        self.task_requests.append(body)
        job.new_task(body)
        return {**result, "status": "success", "eTag": "0x1", "lastModified": _now(),
                "location": f"https://x/jobs/{job.body['id']}/tasks/{body['id']}"}

    def _list_tasks(self, job: FakeJob, query: Mapping[str, str], host: str) -> Response:
        self.list_requests.append(dict(query))
        job_id = job.body["id"]
        if "$skiptoken" in query:
            page = self._pages.pop(query["$skiptoken"], None)
            if page is None or page[0] != job_id:
                return _error(400, "InvalidQueryParameterValue", "$skiptoken")
            _, start, size, select = page
        else:
            size = int(query.get("maxresults", MAX_PAGE))
            if not 1 <= size <= MAX_PAGE:
                return _error(400, "InvalidQueryParameterValue", "maxresults")
            start, select = 0, query["$select"].split(",") if "$select" in query else None
        tasks = list(job.tasks.values())
        views = [t.view(job_id) for t in tasks[start:start + size]]
        if select is not None:
            views = [{k: v for k, v in view.items() if k in select} for view in views]
        out: dict[str, Any] = {"value": views}
        if start + size < len(tasks):
            token = str(next(self._tokens))
            self._pages[token] = (job_id, start + size, size, select)
            out["odata.nextLink"] = f"http://{host}/jobs/{job_id}/tasks?$skiptoken={token}"
        return Response(200, out)

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


def _job_over(job: FakeJob) -> Response:
    """What adding a task to a job that is no longer active gets (409)."""
    if job.state == "terminating":
        return _error(409, "JobBeingTerminated", "The specified job is being terminated.")
    return _error(409, "JobCompleted", "The specified job is already completed.")


def _error(status: int, code: str, message: str, retry_after: bool = False) -> Response:
    body = {"odata.metadata": "https://x/$metadata#Microsoft.Azure.Batch.Protocol.Entities"
                              ".Container.errors/@Element",
            "code": code, "message": {"lang": "en-US", "value": message}}
    return Response(status, body, {"Retry-After": "1"} if retry_after else {})

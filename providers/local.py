"""The local provider: a real one-machine batch service (docs/design.md §3b, §11).

Each execution is a directory ``<base_dir>/<provider_job_id>/`` and a detached runner
(``providers/local_runner.py``, whose docstring lists the files). All state is on disk,
so any worker on the host can poll or cancel any job, and a worker's death leaves its
jobs running and observable.

**Resource path**: ``local:<provider_job_id>``, e.g. ``local:j-0f3c...-0``, an id that
names the job without reference to the worker that submitted it or to any host path
(tenants see resource paths and messages: docs/design.md §3b). Each provider resolves
it to ``<base_dir>/<provider_job_id>`` (:meth:`LocalProvider.directory_of`); every worker
of a host shares ``LOCAL_BATCH_DIR``. Resource paths come from the store and are treated
as untrusted: anything that is not an entry of ``base_dir`` once normalized (``..``,
another root), or is a symlink, names no job. Jobs submitted before ids were used are
stored with the directory's absolute path; that form is still accepted, under the same
rule, so a worker upgraded while they run still polls, cancels and reads them. A
directory without ``spec.json`` is an unknown job.

**Messages** (status messages, errors) carry ids and reasons, never a path: the
``OSError`` text of a failure, which names its file, stays out of them.

**Jobs of several tasks** (``spec.task_count`` > 1): the same directory and runner run
every task (``providers/local_runner.py``: ``tasks.log``, ``tasks/``), at most
``spec.parallelism`` at a time (``DEFAULT_TASK_PARALLELISM`` for 0); :class:`TaskLog` folds
the log into task states, and docs/providers.md ("Local and dry providers") gives the
rules: the job-level rows before ``providers.tasks.status_from_tasks``, how a task's end
is classified, retries, cancel.

**Runtimes**: ``spec.commands`` run directly on the host as argv. A container engine
(docker or podman, usable only when ``<engine> info`` succeeds) is used when the job has
the label ``local-runtime: container``, or has no commands (run the image's default).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from jennah.errors import ProviderRejected, ProviderUnavailable, SettingsError
from jennah.models import RESOURCE_PROFILES, FailureClass, JobStatus, TaskState, TaskStatus
from jennah.settings import Env, ProviderSettings
from jennah.tasks import cancel_remaining
from providers import local_runner as r
from providers.base import Capabilities, OutputChunk, ProviderStatus, ProviderTask
from providers.tasks import status_from_tasks

AUTO = "auto"
RUNTIME_LABEL = "local-runtime"
OUTPUT_CAP = 64 * 1024
CANCEL_GRACE_SECONDS = r.STOP_GRACE_SECONDS
# A launched runner that has not claimed its job after this long is presumed dead, and
# an adopting submit launches another (a duplicate runner is harmless: see the lock).
LAUNCH_GRACE_SECONDS = 10.0
LAUNCHED = "launched_at"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
PREFIX = "local:"


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# How many tasks of a job run at a time when the job sets no parallelism (0): this
# machine's share, four per CPU it may use and at least 8. "No limit" taken literally
# would start 10,000 processes at once on a laptop, exhausting its memory or process
# limit; tasks are usually I/O-bound enough for a few per core to pay. A parallelism the
# job does set is honoured exactly, above this number too.
DEFAULT_TASK_PARALLELISM = max(8, 4 * _cpus())
# Jobs whose folded ``tasks.log`` a provider keeps (the active ones a worker polls).
TASK_LOG_CACHE = 1024
# Task counts of job directories a provider has read (immutable once written).
TASK_COUNT_CACHE = 100_000
log = logging.getLogger("jennah.providers.local")


@dataclass(frozen=True)
class Observation:
    """What the job directory says, read in an order that cannot invent a lost runner."""

    known: bool
    started: bool = False
    exit_code: int | None = None
    cancelled: bool = False
    timed_out: bool = False
    runner_alive: bool = False


def map_state(obs: Observation) -> tuple[JobStatus | None, str, FailureClass | None]:
    """The local state mapping (docs/design.md §3), one rule per row, first match wins:

    ============================================  ==========  ===========  ==============
    observed in the job directory                 state       raw state    failure class
    ============================================  ==========  ===========  ==============
    no directory, or no ``spec.json``             (UNKNOWN)   UNKNOWN
    ``cancelled``, exit code written              CANCELLED   CANCELLED
    ``cancelled``, no exit code yet               CANCELLED   CANCELLING
    exit code, ``timed_out``                      FAILED      TIMED_OUT    timeout
    exit code 0                                   COMPLETED   SUCCEEDED
    exit code not 0                               FAILED      FAILED       user_error
    not started                                   SCHEDULED   QUEUED
    started, runner alive                         RUNNING     RUNNING
    started, runner gone, no exit code            FAILED      LOST         infrastructure
    ============================================  ==========  ===========  ==============

    A cancel racing with the job's natural end may report CANCELLED for a job that had
    just finished; cancelling an already finished job writes no marker and changes nothing.
    """
    if not obs.known:
        return None, "UNKNOWN", None
    if obs.cancelled:
        return JobStatus.CANCELLED, "CANCELLED" if obs.exit_code is not None else "CANCELLING", None
    if obs.exit_code is not None:
        if obs.timed_out:
            return JobStatus.FAILED, "TIMED_OUT", FailureClass.TIMEOUT
        if obs.exit_code == 0:
            return JobStatus.COMPLETED, "SUCCEEDED", None
        return JobStatus.FAILED, "FAILED", FailureClass.USER_ERROR
    if not obs.started:
        return JobStatus.SCHEDULED, "QUEUED", None
    if obs.runner_alive:
        return JobStatus.RUNNING, "RUNNING", None
    return JobStatus.FAILED, "LOST", FailureClass.INFRASTRUCTURE


def observe(job_dir: Path) -> Observation:
    if not (job_dir / r.SPEC).exists():
        return Observation(known=False)
    cancelled = (job_dir / r.CANCELLED).exists()
    exit_code = r.read_int(job_dir / r.EXIT_CODE)
    started = (job_dir / r.STARTED).exists()
    alive = False
    if exit_code is None and started:
        alive = r.runner_alive(job_dir)
        if not alive:  # the runner writes the exit code before it lets the lock go
            exit_code = r.read_int(job_dir / r.EXIT_CODE)
    timed_out = exit_code is not None and (job_dir / r.TIMED_OUT).exists()
    return Observation(True, started, exit_code, cancelled, timed_out, alive)


def container_argv(engine: str, task: ProviderTask) -> list[str]:
    """``<engine> run`` for a job. Variables are passed by name only (``-e NAME``): the
    engine reads their values from its own environment, which the runner sets, so secrets
    never appear in a process's command line."""
    spec = task.spec
    cpu_millis, memory_mib = RESOURCE_PROFILES.get(spec.resource_profile, (0, 0))
    cpu_millis = spec.resource_override.cpu_millis or cpu_millis
    memory_mib = spec.resource_override.memory_mib or memory_mib
    argv = [engine, "run", "--rm", "--init", "--name", f"jennah-{task.provider_job_id}"]
    if cpu_millis:
        argv.append(f"--cpus={cpu_millis / 1000:g}")
    if memory_mib:
        argv.append(f"--memory={memory_mib}m")
    for name in sorted({*spec.env_vars, *_jennah_env(task)}):
        argv += ["-e", name]
    return [*argv, spec.image_uri, *spec.commands]


def detect_container_engine(
    candidates: Sequence[str] = ("docker", "podman"), path: str | None = None
) -> str | None:
    """The first engine whose ``info`` succeeds (the CLI alone is not enough: the docker
    CLI without a daemon is common)."""
    for name in candidates:
        exe = shutil.which(name, path=path)
        if exe is None:
            continue
        try:
            done = subprocess.run(
                [exe, "info"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, timeout=10, check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return exe
    return None


def _jennah_env(task: ProviderTask) -> dict[str, str]:
    """Jennah's variables; the runner sets ``JENNAH_TASK_INDEX`` of each task of a job of
    several tasks over the 0 of a plain job."""
    return {"JENNAH_JOB_ID": task.job_id, "JENNAH_ATTEMPT": str(task.attempt),
            "JENNAH_TENANT_ID": task.tenant_id, "JENNAH_PROVIDER_JOB_ID": task.provider_job_id,
            "JENNAH_TASK_INDEX": "0", "JENNAH_TASK_COUNT": str(max(task.spec.task_count, 1))}


def _time(path: Path) -> datetime | None:
    text = r.read_text(path)
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


_OUTCOMES = {r.TASK_SUCCEEDED: TaskStatus.SUCCEEDED, r.TASK_FAILED: TaskStatus.FAILED,
             r.TASK_CANCELLED: TaskStatus.CANCELLED}


@dataclass
class TaskLog:
    """A job's ``tasks.log`` (``providers/local_runner.py``) folded into task states, and
    read on from ``offset`` as the runner appends to it, so a poll costs the new lines
    only. ``groups``: the process group (leader pid, leader start time) of each task the
    log says is running."""

    offset: int = 0
    tasks: dict[int, TaskState] = field(default_factory=dict)
    groups: dict[int, tuple[int, int]] = field(default_factory=dict)
    # The last status made from it, and what it was made from.
    status: tuple[object, ProviderStatus] | None = None

    def read(self, path: Path) -> TaskLog:
        """This log with the complete lines added since the last read. The runner only
        appends; a file shorter than what was read is another one, read from its start."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                folded = self if size >= self.offset else TaskLog()
                if size > folded.offset:
                    f.seek(folded.offset)
                    data = f.read(size - folded.offset)
                    end = data.rfind(b"\n") + 1  # a line being written: the next read
                    folded.fold(data[:end].decode(errors="replace"))
                    folded.offset += end
        except FileNotFoundError:
            return self  # not started yet
        return folded

    def fold(self, text: str) -> None:
        for line in text.splitlines():
            try:
                self._line(line.split(" ", 7))
            except (IndexError, ValueError):
                log.warning("local: ignored a malformed tasks.log line %r", line[:200])

    def _line(self, f: list[str]) -> None:
        index, attempt, at = int(f[1]), int(f[2]), _from_ms(int(f[3]))
        if f[0] == "S":
            self.tasks[index] = TaskState(index, TaskStatus.RUNNING, attempt=attempt,
                                          started_at=at)
            self.groups[index] = (int(f[4]), int(f[5]))
            return
        code, outcome, failure = int(f[4]), f[5], f[6]
        why = f[7] if len(f) > 7 else ""
        self.groups.pop(index, None)
        before = self.tasks.get(index)
        started = (before.started_at if before is not None and before.attempt == attempt
                   and before.status is TaskStatus.RUNNING else at)  # no S: could not start
        failure_class = None if failure == "-" else FailureClass(failure)
        if outcome == r.TASK_RETRIED:
            self.tasks[index] = TaskState(index, TaskStatus.PENDING, exit_code=code,
                                          attempt=attempt + 1, error_message=f"retried: {why}")
            return
        self.tasks[index] = TaskState(
            index, _OUTCOMES[outcome], exit_code=code, attempt=attempt, started_at=started,
            completed_at=at, error_message=why, failure_class=failure_class)

    def snapshot(self) -> tuple[TaskState, ...]:
        return tuple(self.tasks[i] for i in sorted(self.tasks))


class _Reaper:
    """Reaps the runners this process started, in one daemon thread, so that they never
    linger as zombies (and no ``Popen`` is dropped while running). Shared by all providers
    of the process: runners outlive a closed provider."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._running = False

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.append(proc)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="local-runner-reaper", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._procs = [p for p in self._procs if p.poll() is None]
                if not self._procs:
                    self._running = False
                    return
            time.sleep(0.1)


_REAPER = _Reaper()


@dataclass(frozen=True)
class LocalSettings:
    """The local provider's variable: ``LOCAL_BATCH_DIR`` (default ``$JENNAH_HOME/local``),
    the job directories, shared by every worker of the host."""

    batch_dir: Path

    @classmethod
    def from_env(cls, e: Env) -> LocalSettings:
        return cls(e.path("LOCAL_BATCH_DIR", e.home / "local"))


class LocalProvider:
    """Jobs as detached processes on this machine, state in ``base_dir``."""

    name = "local"
    settings_class = LocalSettings
    # It runs on this machine as it is: a machine type, spot VMs or GPUs cannot be had,
    # so a job asking for them is refused rather than run without them. No submit rate
    # (worker/admission.py): its real cost is processes on one machine, which the
    # per-tenant active-jobs cap bounds.
    capabilities = Capabilities(
        max_status_batch=10_000, supports_output=True,
        poll_interval_seconds=0.5, machine_type=False, spot=False, boot_disk=False,
        service_account=False,
    )

    def __init__(
        self, base_dir: Path, python: str = sys.executable, container_engine: str | None = AUTO
    ) -> None:
        self.base_dir = Path(base_dir).expanduser().resolve()
        try:
            self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            why = f"LOCAL_BATCH_DIR={self.base_dir}: cannot create it ({exc})"
            raise SettingsError(why) from exc
        self.python = python
        self._engine = container_engine
        self._engine_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._task_logs: OrderedDict[Path, TaskLog] = OrderedDict()
        self._task_counts: OrderedDict[Path, int] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> LocalProvider:
        return cls(settings.read(LocalSettings.from_env).batch_dir)

    @property
    def container_engine(self) -> str | None:
        """The usable engine, detected once on first need (``info`` may take a while)."""
        with self._engine_lock:
            if self._engine == AUTO:
                self._engine = detect_container_engine()
            return self._engine

    # --- submit --------------------------------------------------------------------------

    def job_dir(self, provider_job_id: str) -> Path:
        if not _ID.fullmatch(provider_job_id):
            raise ProviderRejected(f"invalid provider job id {provider_job_id!r}")
        return self.base_dir / provider_job_id

    def _spec(self, task: ProviderTask) -> dict[str, object]:
        spec = task.spec
        wants_container = spec.labels.get(RUNTIME_LABEL) == "container"
        if wants_container or not spec.commands:
            engine = self.container_engine
            if engine is None:
                why = "runtime container requested" if wants_container else "no commands"
                raise ProviderRejected(f"{why} and no container engine is usable on this host")
            argv, runtime = container_argv(engine, task), "container"
        else:
            argv, runtime = list(spec.commands), "native"
        fields: dict[str, object] = {
            "provider_job_id": task.provider_job_id, "job_id": task.job_id,
            "tenant_id": task.tenant_id, "attempt": task.attempt, "image_uri": spec.image_uri,
            "runtime": runtime, "argv": argv, "env": dict(spec.env_vars),
            "jennah_env": _jennah_env(task),
            "max_run_seconds": spec.resource_override.max_run_duration_seconds,
        }
        if spec.is_array:
            fields.update(task_count=spec.task_count, max_retries=spec.max_retries,
                          parallelism=spec.parallelism or DEFAULT_TASK_PARALLELISM)
            if runtime == "container":  # one container per task, each named for its task
                fields["task_name_at"] = argv.index("--name") + 1
        return fields

    def submit(self, task: ProviderTask) -> str:
        """Create the job directory (``mkdir`` is the atomic "create if absent") and
        launch its runner; adopt the directory if it exists. A rejected job leaves nothing."""
        job_dir = self.job_dir(task.provider_job_id)
        spec = self._spec(task)
        try:
            try:
                os.mkdir(job_dir, 0o700)
                created = True
            except FileExistsError:
                created = False
            if created or not (job_dir / r.SPEC).exists():
                # Identical content from every submitter, so a concurrent write is harmless.
                text = json.dumps(spec, sort_keys=True)
                r.write_atomic(job_dir / r.SPEC, text, mode=0o600, fsync=True)
            if created or self._needs_launch(job_dir):
                self._launch(job_dir)
        except OSError as exc:
            raise ProviderUnavailable(
                f"local provider cannot start {task.provider_job_id}: {_reason(exc)}") from exc
        return PREFIX + task.provider_job_id

    def _needs_launch(self, job_dir: Path) -> bool:
        if any((job_dir / n).exists() for n in (r.STARTED, r.EXIT_CODE, r.CANCELLED)):
            return False
        launched = _time(job_dir / LAUNCHED)
        if launched is not None and time.time() - launched.timestamp() < LAUNCH_GRACE_SECONDS:
            return False
        return not r.runner_alive(job_dir)

    def _launch(self, job_dir: Path) -> None:
        """Start the runner in its own session: it survives this process (even kill -9)."""
        r.write_atomic(job_dir / LAUNCHED, r.now_iso())  # before: concurrent adopters wait
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "providers.local_runner", str(job_dir)],
                cwd=job_dir, start_new_session=True, close_fds=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        except OSError:
            (job_dir / LAUNCHED).unlink(missing_ok=True)  # let the next submit try again
            raise
        _REAPER.add(proc)

    # --- status --------------------------------------------------------------------------

    def directory_of(self, resource_path: str) -> Path | None:
        """The job directory ``resource_path`` names, or None when it names none: it must
        be, once normalized, an entry of ``base_dir`` named by a provider job id, and not
        a symlink (job directories never are). ``..`` is normalized away before the check
        and the normalized path is the one used, so nothing leads outside ``base_dir``.
        See the module docstring for the two forms. One ``lstat``, no other I/O."""
        if resource_path.startswith(PREFIX):
            candidate = self.base_dir / resource_path[len(PREFIX) :]
        elif resource_path.startswith("/"):  # the form from before ids (see above)
            candidate = Path(os.path.normpath(resource_path))
        else:
            return None
        if candidate.parent != self.base_dir or not _ID.fullmatch(candidate.name):
            return None
        return None if candidate.is_symlink() else candidate

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        try:
            return {p: self._status(p) for p in resource_paths}
        except OSError as exc:
            why = f"local provider cannot read job state: {_reason(exc)}"
            raise ProviderUnavailable(why) from exc

    def _status(self, resource_path: str) -> ProviderStatus:
        job_dir = self.directory_of(resource_path)
        if job_dir is None:
            return ProviderStatus(None, "UNKNOWN", message="unknown job")
        obs = observe(job_dir)
        state, raw, failure = map_state(obs)
        if state is None:
            return ProviderStatus(None, raw, message="unknown job")
        task_count = self._task_count(job_dir)
        if raw == "LOST":  # never leave a lost execution running (if its pids are ours:
            # a runner of another container took its job down with it as it died)
            if task_count > 1:
                self._signal_tasks(job_dir, signal.SIGKILL)
            else:
                self._signal_group(job_dir, signal.SIGKILL)
        elif raw == "QUEUED" and self._needs_launch(job_dir):
            # Launched, yet no runner claimed the job within the grace and none is alive
            # (the worker that launched it died with it, e.g. its container was killed):
            # the owner's poll launches it again, or it would wait for ever. The job never
            # started, so this is not a second run; two runners cannot both run it (lock).
            self._launch(job_dir)
            log.info("local: relaunched the runner of %s (the first never started it)",
                     job_dir.name)
        if task_count > 1:
            return self._tasks_status(job_dir, task_count, obs, raw)
        completed_at = _time(job_dir / r.COMPLETED)
        if state is JobStatus.CANCELLED and completed_at is None:
            completed_at = _time(job_dir / r.CANCELLED)
        return ProviderStatus(
            state=state, raw_state=raw, exit_code=obs.exit_code, failure_class=failure,
            message=_message(raw, obs.exit_code), started_at=_time(job_dir / r.STARTED),
            completed_at=completed_at,
        )

    # --- jobs of several tasks --------------------------------------------------------------

    def _task_count(self, job_dir: Path) -> int:
        """The job's task count, from its ``spec.json`` (read once: it never changes)."""
        with self._cache_lock:
            known = self._task_counts.get(job_dir)
        if known is not None:
            return known
        try:
            count = int(json.loads((job_dir / r.SPEC).read_text()).get("task_count") or 1)
        except (FileNotFoundError, ValueError, AttributeError):
            return 1  # no spec yet, or not ours: read again next time
        with self._cache_lock:
            self._task_counts[job_dir] = count
            if len(self._task_counts) > TASK_COUNT_CACHE:
                self._task_counts.popitem(last=False)
        return count

    def _task_log(self, job_dir: Path) -> TaskLog:
        """The job's ``tasks.log``, folded up to its end. Call with ``_cache_lock`` held."""
        folded = self._task_logs.pop(job_dir, None) or TaskLog()
        folded = folded.read(job_dir / r.TASKS_LOG)
        self._task_logs[job_dir] = folded  # the most recently used last
        if len(self._task_logs) > TASK_LOG_CACHE:
            self._task_logs.popitem(last=False)
        return folded

    def _tasks_status(
        self, job_dir: Path, task_count: int, obs: Observation, raw: str
    ) -> ProviderStatus:
        """The status of a job of several tasks, from its tasks
        (:func:`providers.tasks.status_from_tasks`), with the job-level rows of
        :func:`map_state` first: a cancelled job is CANCELLED, every task not finished
        counted as cancelled; a lost runner fails the job as ``infrastructure``, its
        running tasks with it. A job whose tasks have all ended stays RUNNING (raw
        ``ENDING``) until the runner has recorded the job's end, which it does once no
        process of the job is left. The status is kept until the log or the job changes:
        10,000 tasks are not folded and counted again at every poll."""
        with self._cache_lock:
            folded = self._task_log(job_dir)
            key = (folded.offset, raw, obs.exit_code)
            if folded.status is not None and folded.status[0] == key:
                return folded.status[1]
            tasks = folded.snapshot()
            st = self._tasks_state(job_dir, task_count, tasks, raw, obs.exit_code is not None)
            folded.status = (key, st)
            return st

    def _tasks_state(
        self, job_dir: Path, task_count: int, tasks: tuple[TaskState, ...], raw: str,
        finished: bool,
    ) -> ProviderStatus:
        if raw in ("CANCELLED", "CANCELLING"):
            at = (_time(job_dir / r.COMPLETED) or _time(job_dir / r.CANCELLED)
                  or datetime.now(UTC))
            st = status_from_tasks(task_count, cancel_remaining(task_count, tasks, at),
                                   raw_state=raw)
            return replace(st, state=JobStatus.CANCELLED, exit_code=None, failure_class=None,
                           message=_message(raw, None), completed_at=at)
        if raw == "LOST":
            why = _message(raw, None)
            lost = [replace(t, status=TaskStatus.FAILED, error_message=why,
                            failure_class=FailureClass.INFRASTRUCTURE)
                    if t.status is TaskStatus.RUNNING else t for t in tasks]
            st = status_from_tasks(task_count, lost, raw_state=raw)
            return replace(st, state=JobStatus.FAILED, exit_code=None, message=why,
                           failure_class=FailureClass.INFRASTRUCTURE, completed_at=None)
        if finished:  # a task that never started never will (the job was stopped)
            at = _time(job_dir / r.COMPLETED) or datetime.now(UTC)
            return status_from_tasks(task_count, cancel_remaining(task_count, tasks, at))
        st = status_from_tasks(task_count, tasks, raw_state="QUEUED" if raw == "QUEUED" else "")
        if st.state is not None and st.state.terminal:
            return replace(st, state=JobStatus.RUNNING, raw_state="ENDING", exit_code=None,
                           failure_class=None, message="", completed_at=None)
        return st

    def _signal_tasks(self, job_dir: Path, sig: int) -> bool:
        """Signal the process group of every task the log says is running, each only while
        its leader is provably the task's (same pid and start time, in the pid namespace
        that recorded them); True if any was."""
        if (job_dir / r.EXIT_CODE).exists() or not r.pids_visible(job_dir):
            return False
        with self._cache_lock:
            groups = list(self._task_log(job_dir).groups.values())
        sent = False
        for pgid, start in groups:
            stat = r.proc_stat(pgid)
            if stat is None or stat.start != start:
                continue
            try:
                os.killpg(pgid, sig)
                sent = True
            except ProcessLookupError:
                pass
        return sent

    def _tasks_running(self, job_dir: Path) -> bool:
        if (job_dir / r.EXIT_CODE).exists():
            return False
        with self._cache_lock:
            groups = list(self._task_log(job_dir).groups.values())
        return any((stat := r.proc_stat(pgid)) is not None and stat.start == start
                   and stat.state != "Z" for pgid, start in groups)

    # --- cancel --------------------------------------------------------------------------

    def _signal_group(self, job_dir: Path, sig: int) -> bool:
        """Signal the job's process group, only while it is provably the job's: its runner
        is alive (it kills the group before it exits), or its leader is the very process
        recorded at start (same pid *and* start time); never from another pid namespace
        (another container or host sharing the directory), where that pid is another
        process: there the ``cancelled`` marker stops the job."""
        text = r.read_text(job_dir / r.PID)
        if not text or (job_dir / r.EXIT_CODE).exists() or not r.pids_visible(job_dir):
            return False
        pgid, start = (int(x) for x in text.split())
        stat = r.proc_stat(pgid)
        if not (r.runner_alive(job_dir) or (stat is not None and stat.start == start)):
            return False
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return False
        return True

    def _group_running(self, job_dir: Path) -> bool:
        if (job_dir / r.EXIT_CODE).exists():
            return False
        if r.runner_alive(job_dir):
            return True
        text = r.read_text(job_dir / r.PID)
        stat = r.proc_stat(int(text.split()[0])) if text else None
        return stat is not None and stat.state != "Z"

    def cancel(self, resource_path: str) -> None:
        """Mark the job cancelled, SIGTERM its process group, SIGKILL it after a grace of
        at most a second. No-op for an unknown or finished job.

        The marker is what stops *all* of the job: its runner sees it within a fraction
        of a second and ends every descendant, those that left the process group too,
        before it records the exit code (``providers/local_runner.py``). So the cancel
        completes even if this process dies right after writing the marker. Signalling
        the group here as well makes the leader's end prompt, and still stops a job whose
        runner predates that (or is gone)."""
        job_dir = self.directory_of(resource_path)
        if job_dir is None or not (job_dir / r.SPEC).exists():
            return
        if (job_dir / r.EXIT_CODE).exists():
            return
        try:
            if not (job_dir / r.CANCELLED).exists():
                r.write_atomic(job_dir / r.CANCELLED, r.now_iso())
            # The runner looks for the marker after writing the pid (or a task's start),
            # so a job starting right now is stopped by one side or the other.
            if self._task_count(job_dir) > 1:
                signal_, running = self._signal_tasks, self._tasks_running
            else:
                signal_, running = self._signal_group, self._group_running
            if not signal_(job_dir, signal.SIGTERM):
                return
            deadline = time.monotonic() + CANCEL_GRACE_SECONDS
            while time.monotonic() < deadline:
                if not running(job_dir):
                    return
                time.sleep(0.02)
            signal_(job_dir, signal.SIGKILL)
        except OSError as exc:
            why = f"local provider cannot cancel {job_dir.name}: {_reason(exc)}"
            raise ProviderUnavailable(why) from exc

    # --- output --------------------------------------------------------------------------

    def read_output(
        self, resource_path: str, offsets: tuple[int, int], task_index: int = 0
    ) -> OutputChunk:
        """New stdout/stderr text of task ``task_index`` (a plain job's one task is 0)
        after the byte ``offsets``: whole lines only until the task has finished, at most
        ``OUTPUT_CAP`` bytes per stream, invalid UTF-8 replaced. A task the job does not
        have has no output."""
        job_dir = self.directory_of(resource_path)
        if job_dir is None:
            return OutputChunk(offsets=offsets)
        try:
            obs = observe(job_dir)  # before reading: once final, the files no longer grow
            task_count = self._task_count(job_dir) if obs.known else 1
            if not 0 <= task_index < task_count:
                return OutputChunk(offsets=offsets)
            state, _, _ = map_state(obs)
            final = obs.exit_code is not None or (state is not None and state.terminal
                                                  and not obs.runner_alive)
            stdout, stderr = job_dir / r.STDOUT, job_dir / r.STDERR
            if task_count > 1:
                stdout, stderr = r.task_output(job_dir, task_index)
                if not final:
                    with self._cache_lock:
                        task = self._task_log(job_dir).tasks.get(task_index)
                    final = task is not None and task.status.terminal
            out, out_end = read_lines(stdout, offsets[0], final)
            err, err_end = read_lines(stderr, offsets[1], final)
        except OSError as exc:
            why = f"local provider cannot read the output of {job_dir.name}: {_reason(exc)}"
            raise ProviderUnavailable(why) from exc
        return OutputChunk(stdout=out, stderr=err, offsets=(out_end, err_end))

    def close(self) -> None:
        """Nothing to release: jobs and their runners deliberately outlive the provider."""


def _reason(exc: OSError) -> str:
    """What went wrong, without the file name that ``str(exc)`` would add."""
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


def _message(raw: str, exit_code: int | None) -> str:
    return {
        "SUCCEEDED": "exited with code 0",
        "FAILED": f"exited with code {exit_code}",
        "TIMED_OUT": "killed after its maximum run duration",
        "CANCELLED": "cancelled",
        "CANCELLING": "cancelled",
        "LOST": "the local runner ended without recording an exit code "
        "(runner killed or host restarted)",
    }.get(raw, raw.lower())


def read_lines(path: Path, offset: int, final: bool, cap: int = OUTPUT_CAP) -> tuple[str, int]:
    """Decode the bytes after ``offset``; return the text and the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(cap)
    except FileNotFoundError:
        return "", offset
    if not (final and len(data) < cap):
        end = data.rfind(b"\n") + 1
        if end == 0:
            if len(data) < cap:
                return "", offset  # a partial line: wait for the rest
            end = _utf8_boundary(data)  # a line longer than the cap goes out in pieces
        data = data[:end]
    return data.decode("utf-8", errors="replace"), offset + len(data)


def _utf8_boundary(data: bytes) -> int:
    """Length of ``data`` without a trailing incomplete UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # ASCII or a lead byte
            need = next((n for n, lead in _UTF8_LEADS if b & lead[0] == lead[1]), 1)
            return len(data) if back >= need else len(data) - back
    return len(data)


# (sequence length, (mask, value)) of UTF-8 lead bytes.
_UTF8_LEADS = ((2, (0xE0, 0xC0)), (3, (0xF0, 0xE0)), (4, (0xF8, 0xF0)))

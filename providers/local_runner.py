"""The detached runner of one local job: ``python -m providers.local_runner <job_dir>``.

:class:`providers.local.LocalProvider` starts it in its own session (setsid). From then on
it depends on nothing but the job directory, so the worker that started it may die at
any moment (even ``kill -9``) and the job neither notices nor loses its exit code.
Only the standard library is imported, to keep the runner's start cheap.

The files of a job directory (the protocol between the runner and the provider; every
file a reader could see half-written is written to a temp file and renamed):

* ``spec.json``: written by the provider. ``argv``, ``env``, ids, ``max_run_seconds``.
* ``lock``: the runner holds an exclusive ``flock`` on it for its whole life. Whoever can
  take a shared lock knows that no runner is alive. Unlike ``kill(pid, 0)`` this cannot be
  fooled by pid reuse or zombies, and the kernel releases it however the runner dies.
  The descriptor is close-on-exec: the job never holds it.
* ``started_at``: the claim. Written once, before the job starts. A runner that finds it
  never starts the job again, so a directory is executed at most once.
* ``executions``: one line appended per real start (audits and tests count them).
* ``pidns``: ``"<boot id> <pid namespace>"`` of the runner (:func:`pid_namespace`),
  written before ``started_at``. The pids in ``pid`` and ``tasks.log`` name processes
  only there: the workers of several containers (or hosts) that share a directory each
  see other processes under the same numbers, so a provider signals or inspects a
  recorded pid only from the namespace that recorded it, and otherwise leaves the job
  to the ``cancelled`` marker and the runner's lock.
* ``pid``: ``"<pgid> <starttime>"``. The job runs in its own session and process group
  (setsid, docs/design.md §11: its leader's pid is the group id), so a provider can signal
  the group without the runner; the leader's ``/proc`` start time guards signals against
  pid reuse.
* ``completed_at`` then ``exit_code``: written when the job ends, *before* the runner
  exits and releases the lock. So "no runner alive and no exit code" means the runner
  was lost (runner killed, host rebooted), never "about to write".
* ``cancelled`` (written by the provider) and ``timed_out`` (by the runner): markers.
* ``stdout``, ``stderr``: the job's raw output; ``work/``: its working directory.

Exit codes follow the shell: a job killed by signal N is recorded as ``128 + N``
(SIGTERM 143, SIGKILL 137); a command that cannot be found is 127, one that cannot be
executed 126.

**The job is every descendant of the runner**, not its process group: a process that
leaves the group or the session (``setsid``, a double-forked daemon) is still the job's.
The runner is a child subreaper (Linux), so the job's orphans are re-parented to it
(and reaped here rather than piling up as zombies under a PID 1 that may not reap, the
case in many containers and on this project's CI machine). A process whose parent is
still alive is not the runner's child, wherever it lives, so the descendants are found
by walking the parent links of all of ``/proc`` (:func:`descendants`), not by listing
the runner's children.

* **The job is stopped** (:func:`_supervise`) when it is cancelled (the ``cancelled``
  marker, which the runner looks for at least every ``POLL_SECONDS``: whoever wrote it
  may have died right after, a worker killed mid-cancel included), when it reaches its
  maximum run duration (``timed_out`` is written first), or when the runner itself gets
  SIGTERM (an operator, a host shutdown). Stopping is SIGTERM to every descendant, then
  SIGKILL to every one still alive after ``STOP_GRACE_SECONDS``.
* **When the job's leader exits**, for whatever reason, every descendant left is killed
  with SIGKILL, as when a container's main process exits, again and again until none is
  left (a process may fork while the others are killed) and all are reaped, for at most
  ``KILL_ALL_SECONDS`` (a process in uninterruptible sleep cannot be hurried). Only then
  is the exit code written, so a job that reports an end has no process left.

The runner blocks SIGCHLD and SIGTERM and takes them with ``sigtimedwait``; the job starts
with an empty signal mask.

**Jobs of several tasks** (``task_count`` > 1 in ``spec.json``): the same runner (one per
job, under the same lock and claim) starts every task itself with ``posix_spawn``, so a
task costs one process start, not an interpreter. At most ``parallelism`` tasks run at a
time (the provider writes the effective number); each is the leader of its own session,
sees ``JENNAH_TASK_INDEX`` and ``JENNAH_TASK_COUNT``, and writes
``tasks/<index>.stdout`` and ``tasks/<index>.stderr`` (all its attempts, appended); the
tasks share ``work/``. There is no ``pid`` file: the starts and ends are lines of
``tasks.log``, appended whole, which the provider folds into task states:

* ``S <index> <attempt> <epoch ms> <pid> <starttime>``: an attempt started (its leader,
  whose pid is the task's process group id, and the leader's ``/proc`` start time, 0 if
  it had already ended when the line was written, at the runner's next wake);
* ``E <index> <attempt> <epoch ms> <exit code> <outcome> <failure class|-> <message>``:
  it ended; the outcome is ``S`` succeeded, ``F`` failed, ``C`` cancelled, or ``R``
  failed and will be run again as attempt + 1 (an ``E`` line without its ``S``: the
  attempt could not start).

How an attempt's end is classified, first match: the job is cancelled: ``C``; the runner
was told to stop (SIGTERM): ``infrastructure``; the task ran for its maximum run
duration (counted per task): ``timeout``; exit 0: ``S``; ended by SIGKILL or SIGTERM
that the runner did not send (the OOM killer, an operator): ``infrastructure``, which is
retried, like a preempted VM; any other exit or signal: ``user_error``. A command that
cannot be found or run is ``user_error`` (127, 126); a host out of processes or memory
at the start is ``infrastructure``. A failure of a retryable class is run again, at once,
while the attempt is below ``max_retries``; other tasks go on whatever one task does.

When a task's leader exits, the rest of its process group is killed with it (SIGKILL,
before the leader is reaped, so the group id cannot have been reused). A process that
left its task's group is still the job's: it is killed when the job is stopped, and at
the job's end, when the runner kills every descendant left as for a single task. A task
that reaches its maximum run duration gets SIGTERM to its group, SIGKILL after
``STOP_GRACE_SECONDS``. Stopping the job (cancelled, SIGTERM) starts no more tasks and
signals every descendant, as above. The ``exit_code`` the runner writes at the end is 0
when every task succeeded, else 1: the tasks' own codes are in ``tasks.log``.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import functools
import heapq
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Container, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

SPEC = "spec.json"
LOCK = "lock"
STARTED = "started_at"
EXECUTIONS = "executions"
PID = "pid"
PIDNS = "pidns"
RUNNER_PID = "runner_pid"
COMPLETED = "completed_at"
EXIT_CODE = "exit_code"
CANCELLED = "cancelled"
TIMED_OUT = "timed_out"
STDOUT = "stdout"
STDERR = "stderr"
WORKDIR = "work"
RUNNER_LOG = "runner.log"

# How long a second runner of the same job waits for the lock before leaving the job to
# the first (status probes hold a shared lock for microseconds, so a short wait suffices).
LOCK_WAIT_SECONDS = 2.0
# Variables of the runner's own environment that a job inherits; everything else it gets
# comes from its spec, so the worker's settings and secrets never leak into jobs.
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8"}
CONTAINER_ENV = ("DOCKER_HOST", "DOCKER_CONFIG", "CONTAINER_HOST", "XDG_RUNTIME_DIR")
_PR_SET_CHILD_SUBREAPER = 36
# Stopping a job: SIGTERM to all of it, SIGKILL to what is left after the grace.
STOP_GRACE_SECONDS = 1.0
# The longest wait before the runner looks for the ``cancelled`` marker.
POLL_SECONDS = 0.25
# The bound on killing and reaping what a job leaves behind when its leader exits.
KILL_ALL_SECONDS = 5.0
# What wakes the runner: a child changed state, or it is told to stop the job.
_WAKE = frozenset({signal.SIGCHLD, signal.SIGTERM})
# --- jobs of several tasks (module docstring) ---
TASKS_LOG = "tasks.log"
TASKS_DIR = "tasks"
# How an attempt ended, in ``tasks.log``.
TASK_SUCCEEDED, TASK_FAILED, TASK_CANCELLED, TASK_RETRIED = "S", "F", "C", "R"
# Failure classes, spelled as ``jennah.models.FailureClass`` (the runner imports only the
# standard library), and those retried (``FailureClass.retryable``).
USER_ERROR, INFRASTRUCTURE, TIMEOUT = "user_error", "infrastructure", "timeout"
RETRYABLE = frozenset({INFRASTRUCTURE})
# Signals that, when the runner did not send them, end a task from outside (the kernel's
# OOM killer, an operator, a host shutdown): the local counterpart of a preempted VM.
OUTSIDE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM})
# While stopping every task: the pause between two SIGKILL rounds after the grace.
KILL_ROUND_SECONDS = 0.1


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def write_atomic(path: Path, text: str, *, mode: int = 0o644, fsync: bool = False) -> None:
    """Write ``text`` to a unique temp file beside ``path`` and rename it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, text.encode())
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def read_int(path: Path) -> int | None:
    text = read_text(path)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


class Proc(NamedTuple):
    """One process, as ``/proc/<pid>/stat`` shows it."""

    pid: int
    ppid: int
    state: str  # "R", "S", "D", "T", ...; "Z" for a zombie
    start: int  # clock ticks after boot: with the pid, it names one process for good


def proc_stat(pid: int) -> Proc | None:
    """The process ``pid``, live or zombie, or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # the command name may contain spaces
    return Proc(pid, int(fields[1]), fields[0], int(fields[19]))


def descendants(root: int) -> list[Proc]:
    """Every process below ``root`` (children, theirs, and so on; zombies included), from
    the parent links of all of ``/proc``: session and process group play no part."""
    children: dict[int, list[Proc]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (proc := proc_stat(int(entry))) is not None:
            children.setdefault(proc.ppid, []).append(proc)
    found: list[Proc] = []
    seen, todo = {root}, [root]
    while todo:  # ``seen``: a snapshot taken while pids are reused cannot make us loop
        for proc in children.get(todo.pop(), ()):
            if proc.pid not in seen:
                seen.add(proc.pid)
                found.append(proc)
                todo.append(proc.pid)
    return found


def signal_process(proc: Proc, sig: int) -> None:
    """Send ``sig`` to ``proc`` if it is still that process (same pid and start time). The
    check and the signal go through one pidfd, so a pid reused in between is never hit
    (a kernel without pidfds gets a plain ``kill`` right after the check)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return
    except OSError:
        fd = -1
    try:
        now = proc_stat(proc.pid)
        if now is None or now.start != proc.start:
            return
        if fd < 0:
            os.kill(proc.pid, sig)
        else:
            signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass
    finally:
        if fd >= 0:
            os.close(fd)


@functools.cache
def pid_namespace() -> str:
    """Where this process's pids mean something: ``"<boot id> <pid namespace>"``. A pid
    and its ``/proc`` start time name one process only within one boot of one host and
    one pid namespace (every container has its own, numbered from 1, so two containers'
    jobs often share pids and even start ticks). Fixed for a process's whole life."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def pids_visible(job_dir: Path) -> bool:
    """True when the pids that ``job_dir`` records are this process's to signal: its
    runner ran in our pid namespace (module docstring, ``pidns``). A directory from a
    runner that predates the record is taken to be ours, as it always was."""
    recorded = read_text(job_dir / PIDNS)
    return recorded is None or recorded == pid_namespace()


def runner_alive(job_dir: Path) -> bool:
    """True while a runner holds the job's lock (see the module docstring)."""
    try:
        fd = os.open(job_dir / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops our shared lock at once
    return False


def job_env(spec: Mapping[str, Any], host_env: Mapping[str, str]) -> dict[str, str]:
    """A minimal base (PATH, HOME, LANG from the host), the job's own variables over it,
    then Jennah's, which a job cannot override."""
    env = {name: host_env.get(name) or default for name, default in BASE_ENV.items()}
    if spec.get("runtime") == "container":
        env.update({n: host_env[n] for n in CONTAINER_ENV if host_env.get(n)})
    env.update(spec.get("env") or {})
    env.update(spec.get("jennah_env") or {})
    return env


def _acquire_lock(job_dir: Path) -> int | None:
    fd = os.open(job_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.01)


def _become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _executable(argv0: str, env: Mapping[str, str]) -> str:
    """The file ``argv0`` names, looked up in the job's ``PATH`` as a shell would."""
    exe: str | None = argv0
    if "/" not in argv0:
        exe = shutil.which(argv0, path=env.get("PATH", os.defpath))
    if exe is None:
        raise FileNotFoundError(errno.ENOENT, "command not found", argv0)
    return exe


def _spawn(
    argv: list[str], env: Mapping[str, str], stdout: Path | str, stderr: Path | str,
    exe: str | None = None,
) -> int:
    """Start ``argv`` as the leader of a new session, output appended to ``stdout`` and
    ``stderr``."""
    exe = exe or _executable(argv[0], env)
    append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(stdout), append, 0o600),
        (os.POSIX_SPAWN_OPEN, 2, str(stderr), append, 0o600),
    ]
    # Python ignores SIGPIPE and SIGXFSZ, and the runner blocks _WAKE; a job must see the
    # defaults and an empty signal mask, as from a shell.
    return os.posix_spawn(
        exe, argv, dict(env), file_actions=actions, setsid=True,
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), setsigmask=(),
    )


def _exit_code(info: os.waitid_result) -> int:
    """The shell-style exit code of a child's exit: its status, or 128 + the signal."""
    return info.si_status if info.si_code == os.CLD_EXITED else 128 + info.si_status


def _reap_orphans(leader: int) -> int | None:
    """Reap every exited child but the leader. Once the leader has exited, its exit code;
    its zombie stays (reaped after the exit code is written), so its pid, the job's process
    group id, cannot be reused while a provider may still signal that group."""
    while True:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None:
            return None
        if info.si_pid == leader:
            return _exit_code(info)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)


def _signal_all(sig: int, keep: Container[int]) -> list[Proc]:
    """Send ``sig`` to every live descendant of the runner, and reap the zombie children but
    those in ``keep`` (leaders whose end is still to be recorded, see
    :func:`_reap_orphans`). Returns the descendants found, zombies too, but those kept."""
    me = os.getpid()
    found = []
    for proc in descendants(me):
        if proc.state != "Z":
            signal_process(proc, sig)
        elif proc.pid in keep:
            continue
        elif proc.ppid == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)
        found.append(proc)
    return found


def _supervise(job_dir: Path, leader: int, max_run_seconds: float) -> int:
    """Wait for the leader's exit (returning its exit code), reaping orphans and stopping
    the job when told to (module docstring). Wakes on SIGCHLD, on SIGTERM, when the
    maximum run duration or the grace ends, and every ``POLL_SECONDS``."""
    deadline = time.monotonic() + max_run_seconds if max_run_seconds > 0 else math.inf
    stop_since: float | None = None
    told_to_stop = False
    while (code := _reap_orphans(leader)) is None:
        now = time.monotonic()
        if stop_since is None:
            if now >= deadline:
                write_atomic(job_dir / TIMED_OUT, now_iso())
            if now >= deadline or told_to_stop or (job_dir / CANCELLED).exists():
                stop_since = now
                _signal_all(signal.SIGTERM, (leader,))
        elif now >= stop_since + STOP_GRACE_SECONDS:
            _signal_all(signal.SIGKILL, (leader,))
        if stop_since is None:
            until = deadline
        elif now < stop_since + STOP_GRACE_SECONDS:
            until = stop_since + STOP_GRACE_SECONDS
        else:
            until = math.inf  # SIGKILL sent: the leader's end (SIGCHLD) wakes us
        wait = min(POLL_SECONDS, max(until - now, 0.01))
        woken = signal.sigtimedwait(_WAKE, wait)
        told_to_stop |= woken is not None and woken.si_signo == signal.SIGTERM
    return code


def _kill_all(keep: Container[int], timeout: float = KILL_ALL_SECONDS) -> bool:
    """SIGKILL every descendant but the zombies in ``keep`` and reap them, until none is
    left (True) or ``timeout`` has passed (False). Repeated because a process may fork, or
    an orphan be re-parented to us, while the others are being killed."""
    deadline = time.monotonic() + timeout
    while _signal_all(signal.SIGKILL, keep):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _reap_rest(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def _finish(job_dir: Path, code: int) -> None:
    write_atomic(job_dir / COMPLETED, now_iso())
    write_atomic(job_dir / EXIT_CODE, str(code), fsync=True)


def _cannot_start(stderr: Path | str, argv0: str, exc: OSError) -> int:
    """Tell the job why ``argv0`` could not start; return the shell's exit code for it."""
    # The job's stderr reaches its tenant: the reason only, never a host path.
    with open(stderr, "a") as f:
        why = os.strerror(exc.errno) if exc.errno else "error"
        f.write(f"jennah local runner: cannot start {argv0!r}: {why}\n")
    return 127 if isinstance(exc, FileNotFoundError) else 126


# --- jobs of several tasks ----------------------------------------------------------------


def task_output(job_dir: Path, index: int) -> tuple[Path, Path]:
    """The stdout and stderr files of task ``index``."""
    return job_dir / TASKS_DIR / f"{index}.stdout", job_dir / TASKS_DIR / f"{index}.stderr"


def _signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


@dataclass(eq=False)
class _Task:
    """One running attempt of a task; its leader's pid is its key in ``_TaskSet.running``."""

    index: int
    attempt: int
    pid: int
    started_ms: int
    timed_out: bool = False


class _TaskSet:
    """Runs the tasks of one job (module docstring, "Jobs of several tasks"): starts them
    up to the parallelism, records each start and end in ``tasks.log``, retries a task
    that failed for a retryable reason, and stops them all when told to."""

    def __init__(self, job_dir: Path, spec: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.job_dir = job_dir
        self.count = int(spec["task_count"])
        self.limit = int(spec.get("parallelism") or 0) or self.count
        self.max_retries = int(spec.get("max_retries") or 0)
        self.max_run = float(spec.get("max_run_seconds") or 0)
        self.argv = [str(a) for a in spec["argv"]]
        name_at = spec.get("task_name_at")
        self.name_at = int(name_at) if name_at is not None else None
        self.env = {**env, "JENNAH_TASK_COUNT": str(self.count)}
        self.pending = collections.deque((i, 0) for i in range(self.count))
        self.running: dict[int, _Task] = {}
        self.unrecorded: list[_Task] = []  # started, no ``S`` line yet
        # Per-task signals due: (when, sequence, pid, task, signal).
        self.due: list[tuple[float, int, int, _Task, int]] = []
        self.sequence = 0
        # Why every task is being stopped ("cancelled" or "stopped"), since when, and the
        # last SIGKILL round.
        self.stop: str | None = None
        self.stop_since = self.last_kill = 0.0
        self.failed = False
        self.lines: list[str] = []
        self.exe: str | OSError
        try:
            self.exe = _executable(self.argv[0], self.env)
        except OSError as exc:
            self.exe = exc
        (job_dir / TASKS_DIR).mkdir(mode=0o700, exist_ok=True)
        self.outputs = f"{job_dir / TASKS_DIR}/"  # strings: no Path work per task
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self.log = os.open(job_dir / TASKS_LOG, flags, 0o600)

    def run(self) -> int:
        """Run every task to its end; 0 when all succeeded, else 1 (the outcomes are in
        ``tasks.log``)."""
        told_to_stop = False
        try:
            while True:
                ended = self._reap()
                self._record_starts()
                now = time.monotonic()
                if self.stop is None and (told_to_stop or (self.job_dir / CANCELLED).exists()):
                    self._stop_all(now)
                for task, code, signo in ended:
                    self._ended(task, code, signo)
                if self.stop is None:
                    self._start_more()
                self._signal_due(now)
                self._flush()
                if not (self.pending or self.running):
                    return 1 if self.failed else 0
                woken = signal.sigtimedwait(_WAKE, self._wait(now))
                told_to_stop |= woken is not None and woken.si_signo == signal.SIGTERM
        finally:
            self._flush()
            os.close(self.log)

    def _start_more(self) -> None:
        while self.pending and len(self.running) < self.limit:
            index, attempt = self.pending.popleft()
            if not self._start(index, attempt):
                return  # out of processes or memory: try again after a wake

    def _start(self, index: int, attempt: int) -> bool:
        """Start one attempt of task ``index``; False if the host is out of processes or
        memory (the attempt is then recorded as a retryable failure)."""
        stdout, stderr = f"{self.outputs}{index}.stdout", f"{self.outputs}{index}.stderr"
        argv = self.argv
        if self.name_at is not None:  # a container per task: distinct names
            argv = [*argv]
            argv[self.name_at] = f"{argv[self.name_at]}-{index}"
        env = {**self.env, "JENNAH_TASK_INDEX": str(index)}
        at = time.time_ns() // 1_000_000
        try:
            if isinstance(self.exe, OSError):
                raise self.exe
            pid = _spawn(argv, env, stdout, stderr, self.exe)
        except OSError as exc:
            code = _cannot_start(stderr, argv[0], exc)
            host = exc.errno in (errno.EAGAIN, errno.ENOMEM)
            why = f"cannot start: {os.strerror(exc.errno) if exc.errno else 'error'}"
            self._record(index, attempt, code, INFRASTRUCTURE if host else USER_ERROR, why)
            return not host
        task = _Task(index, attempt, pid, at)
        self.running[pid] = task
        self.unrecorded.append(task)
        if self.max_run > 0:
            self._due(time.monotonic() + self.max_run, pid, task, signal.SIGTERM)
        return True

    def _record_starts(self) -> None:
        """The ``S`` lines of the tasks started since the last call. Written one wake
        after the start, not at once: the leader's ``/proc`` start time is read once it
        runs, rather than while it is still being exec'd, when reading it stalls (a fifth
        of a trivial task's cost). One that has already ended is recorded without it."""
        for task in self.unrecorded:
            stat = proc_stat(task.pid) if self.running.get(task.pid) is task else None
            self.lines.append(f"S {task.index} {task.attempt} {task.started_ms} {task.pid} "
                              f"{stat.start if stat else 0}\n")
        self.unrecorded.clear()

    def _reap(self) -> list[tuple[_Task, int, int]]:
        """Reap every exited child; return the tasks whose leader exited, with the exit
        code and the signal that ended it (0 if none)."""
        ended = []
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None:
                break
            task = self.running.pop(info.si_pid, None)
            if task is not None:
                # While the leader is unreaped its pid, the task's group id, cannot be
                # reused: what is left of the group goes with it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(info.si_pid, signal.SIGKILL)
                killed = 0 if info.si_code == os.CLD_EXITED else info.si_status
                ended.append((task, _exit_code(info), killed))
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)
        return ended

    def _ended(self, task: _Task, code: int, signo: int) -> None:
        """Record how an attempt ended (module docstring: its failure class)."""
        if self.stop == "cancelled":
            self._record(task.index, task.attempt, code, "", "cancelled", TASK_CANCELLED)
        elif self.stop is not None:
            self._record(task.index, task.attempt, code, INFRASTRUCTURE,
                         "stopped with the local runner")
        elif task.timed_out:
            self._record(task.index, task.attempt, code, TIMEOUT,
                         "killed after its maximum run duration")
        elif code == 0:
            self._record(task.index, task.attempt, 0, "", "", TASK_SUCCEEDED)
        elif signo in OUTSIDE_SIGNALS:
            self._record(task.index, task.attempt, code, INFRASTRUCTURE,
                         f"killed by {_signal_name(signo)} from outside the task")
        elif signo:
            self._record(task.index, task.attempt, code, USER_ERROR,
                         f"killed by {_signal_name(signo)}")
        else:
            self._record(task.index, task.attempt, code, USER_ERROR, f"exited with code {code}")

    def _record(
        self, index: int, attempt: int, code: int, failure: str, why: str,
        outcome: str = TASK_FAILED,
    ) -> None:
        if outcome == TASK_FAILED:
            if failure in RETRYABLE and self.stop is None and attempt < self.max_retries:
                outcome = TASK_RETRIED
                self.pending.appendleft((index, attempt + 1))
            else:
                self.failed = True
        at = time.time_ns() // 1_000_000
        why = " ".join(why.split())
        self.lines.append(f"E {index} {attempt} {at} {code} {outcome} {failure or '-'} {why}\n")

    def _stop_all(self, now: float) -> None:
        """Stop every task: none starts any more, all get SIGTERM (SIGKILL after the grace,
        in :meth:`_signal_due`)."""
        self.stop = "cancelled" if (self.job_dir / CANCELLED).exists() else "stopped"
        self.stop_since = now
        self.pending.clear()
        _signal_all(signal.SIGTERM, self.running)

    def _due(self, when: float, pid: int, task: _Task, sig: int) -> None:
        self.sequence += 1
        heapq.heappush(self.due, (when, self.sequence, pid, task, sig))

    def _signal_due(self, now: float) -> None:
        """Send the signals that are due: a task's maximum run duration (SIGTERM to its
        group, SIGKILL after the grace), and the SIGKILL rounds of a stop."""
        while self.due and self.due[0][0] <= now:
            _, _, pid, task, sig = heapq.heappop(self.due)
            if self.running.get(pid) is not task:
                continue  # ended (and its pid perhaps reused) in between
            task.timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
            if sig == signal.SIGTERM:
                self._due(now + STOP_GRACE_SECONDS, pid, task, signal.SIGKILL)
        if self.stop is not None and now >= max(self.stop_since + STOP_GRACE_SECONDS,
                                                self.last_kill + KILL_ROUND_SECONDS):
            self.last_kill = now
            _signal_all(signal.SIGKILL, self.running)

    def _wait(self, now: float) -> float:
        until = self.due[0][0] if self.due else math.inf
        if self.stop is not None:
            until = min(until, max(self.stop_since + STOP_GRACE_SECONDS,
                                   self.last_kill + KILL_ROUND_SECONDS))
        return min(POLL_SECONDS, max(until - now, 0.005))

    def _flush(self) -> None:
        """Append the lines gathered since the last flush, in one write where it can."""
        if not self.lines:
            return
        data = memoryview("".join(self.lines).encode())
        self.lines.clear()
        while data:
            data = data[os.write(self.log, data) :]


def run(job_dir: Path) -> int:
    """Run the job of ``job_dir`` once; 0 when the runner did its part (whatever the
    job's own exit code), which includes leaving a job to another runner."""
    # Blocked before anything can send them: a pending signal waits for sigtimedwait
    # (SIGCHLD, ignored by default, would otherwise be lost; SIGTERM would kill us).
    signal.pthread_sigmask(signal.SIG_BLOCK, _WAKE)
    if _acquire_lock(job_dir) is None:
        return 0  # another runner owns this job; our fd stays open until we exit
    spec = json.loads((job_dir / SPEC).read_text())
    if any((job_dir / name).exists() for name in (STARTED, EXIT_CODE, CANCELLED)):
        return 0  # already ran (or was lost), or cancelled before it started
    _become_subreaper()
    write_atomic(job_dir / RUNNER_PID, str(os.getpid()))
    write_atomic(job_dir / PIDNS, pid_namespace())
    write_atomic(job_dir / STARTED, now_iso(), fsync=True)
    with open(job_dir / EXECUTIONS, "a") as f:
        f.write(f"{os.getpid()} {now_iso()}\n")
    workdir = job_dir / WORKDIR
    workdir.mkdir(mode=0o700, exist_ok=True)
    os.chdir(workdir)
    if int(spec.get("task_count") or 1) > 1:
        code = _TaskSet(job_dir, spec, job_env(spec, os.environ)).run()
        _kill_all(())  # what left its task's group ends with the job
        _finish(job_dir, code)
        _reap_rest(1.0)
        return 0
    try:
        pid = _spawn(list(spec["argv"]), job_env(spec, os.environ), job_dir / STDOUT,
                     job_dir / STDERR)
    except OSError as exc:
        _finish(job_dir, _cannot_start(job_dir / STDERR, spec["argv"][0], exc))
        return 0
    stat = proc_stat(pid)
    # Written before the first look for ``cancelled``: a cancel that finds no pid yet
    # (and so signals nothing) is seen by the runner's loop instead.
    write_atomic(job_dir / PID, f"{pid} {stat.start if stat else 0}")
    code = _supervise(job_dir, pid, float(spec.get("max_run_seconds") or 0))
    _kill_all((pid,))  # the job ends with all of its processes
    _finish(job_dir, code)
    os.waitpid(pid, 0)
    _reap_rest(1.0)  # anything _kill_all could not end in time
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m providers.local_runner JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(args[0]).resolve()
    try:
        return run(job_dir)
    except Exception:
        with open(job_dir / RUNNER_LOG, "a") as f:
            traceback.print_exc(file=f)
        return 1


if __name__ == "__main__":
    sys.exit(main())

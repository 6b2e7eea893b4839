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
* ``pid``: ``"<pgid> <starttime>"``. The job runs in its own session and process group
  (setsid, docs/design.md §11: its leader's pid is the group id), so cancel can kill all of it
  and nothing else; the leader's ``/proc`` start time guards signals against pid reuse.
* ``completed_at`` then ``exit_code``: written when the job ends, *before* the runner
  exits and releases the lock. So "no runner alive and no exit code" means the runner
  was lost (runner killed, host rebooted), never "about to write".
* ``cancelled`` (written by the provider) and ``timed_out`` (by the runner): markers.
* ``stdout``, ``stderr``: the job's raw output; ``work/``: its working directory.

Exit codes follow the shell: a job killed by signal N is recorded as ``128 + N``
(SIGTERM 143, SIGKILL 137); a command that cannot be found is 127, one that cannot be
executed 126.

When the job's leader exits, whatever it left behind in its process group is killed, as
when a container's main process exits. The runner is a child subreaper (Linux), so the
job's orphans are reaped here instead of piling up as zombies under a PID 1 that may not
reap (the case in many containers, and on this project's CI machine).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

SPEC = "spec.json"
LOCK = "lock"
STARTED = "started_at"
EXECUTIONS = "executions"
PID = "pid"
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


def proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state letter, start time in clock ticks)`` of a live or zombie pid, else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # the command name may contain spaces
    return fields[0], int(fields[19])


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


def _spawn(argv: list[str], env: Mapping[str, str], job_dir: Path) -> int:
    """Start the job as the leader of a new session, output to the job's files."""
    exe: str | None = argv[0]
    if "/" not in argv[0]:
        exe = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if exe is None:
        raise FileNotFoundError(errno.ENOENT, "command not found", argv[0])
    append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(job_dir / STDOUT), append, 0o600),
        (os.POSIX_SPAWN_OPEN, 2, str(job_dir / STDERR), append, 0o600),
    ]
    # Python ignores SIGPIPE and SIGXFSZ; a job must see the defaults, as from a shell.
    return os.posix_spawn(
        exe, argv, dict(env), file_actions=actions, setsid=True,
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )


def _wait_leader(pid: int) -> int:
    """Wait for the job's leader without reaping it (its zombie keeps the group id ours),
    reaping any adopted orphan meanwhile. Returns the shell-style exit code."""
    while True:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        if info is None:
            continue
        if info.si_pid != pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)
            continue
        if info.si_code == os.CLD_EXITED:
            return info.si_status
        return 128 + info.si_status


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


def _start_timeout(job_dir: Path, pgid: int, seconds: float) -> None:
    """SIGTERM the job after ``seconds`` (marking it timed out), SIGKILL one second later."""
    fired: list[bool] = []

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            if not fired:
                fired.append(True)
                write_atomic(job_dir / TIMED_OUT, now_iso())
                os.killpg(pgid, signal.SIGTERM)
                signal.setitimer(signal.ITIMER_REAL, 1.0)
            else:
                os.killpg(pgid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def run(job_dir: Path) -> int:
    """Run the job of ``job_dir`` once; 0 when the runner did its part (whatever the
    job's own exit code), which includes leaving a job to another runner."""
    if _acquire_lock(job_dir) is None:
        return 0  # another runner owns this job; our fd stays open until we exit
    spec = json.loads((job_dir / SPEC).read_text())
    if any((job_dir / name).exists() for name in (STARTED, EXIT_CODE, CANCELLED)):
        return 0  # already ran (or was lost), or cancelled before it started
    _become_subreaper()
    write_atomic(job_dir / RUNNER_PID, str(os.getpid()))
    write_atomic(job_dir / STARTED, now_iso(), fsync=True)
    with open(job_dir / EXECUTIONS, "a") as f:
        f.write(f"{os.getpid()} {now_iso()}\n")
    workdir = job_dir / WORKDIR
    workdir.mkdir(mode=0o700, exist_ok=True)
    os.chdir(workdir)
    try:
        pid = _spawn(list(spec["argv"]), job_env(spec, os.environ), job_dir)
    except OSError as exc:
        with open(job_dir / STDERR, "a") as f:
            f.write(f"jennah local runner: cannot start {spec['argv'][0]!r}: {exc}\n")
        _finish(job_dir, 127 if isinstance(exc, FileNotFoundError) else 126)
        return 0
    stat = proc_stat(pid)
    write_atomic(job_dir / PID, f"{pid} {stat[1] if stat else 0}")
    if (job_dir / CANCELLED).exists():  # cancelled while starting: cancel saw no pid yet
        os.killpg(pid, signal.SIGKILL)
    if float(spec.get("max_run_seconds") or 0) > 0:
        _start_timeout(job_dir, pid, float(spec["max_run_seconds"]))
    code = _wait_leader(pid)
    signal.setitimer(signal.ITIMER_REAL, 0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # leftovers of the group, as when a container ends
    _finish(job_dir, code)
    os.waitpid(pid, 0)
    _reap_rest(1.0)
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

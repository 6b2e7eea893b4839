"""The local provider stops *all* of a job (docs/design.md §3b): every descendant of its
runner, also one that left the job's session and process group (``setsid``, a
double-forked daemon), when the job is cancelled, times out, or its leader exits, and
also when the worker that cancelled it died right after writing the marker.

Real processes, started through :class:`LocalProvider` exactly as a worker does. Each
test's sleeps carry a unique argument, by which they are found in ``/proc``; whatever a
failing test leaves behind is killed, by pid, at its end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jennah.models import FailureClass, JobStatus, ResourceOverride, TaskStatus
from providers import local_runner as r
from providers.base import ProviderStatus
from providers.local import PREFIX, LocalProvider
from tests.helpers import wait_until
from tests.providers.provider_contract import make_task, wait_for_state
from tests.providers.test_provider_local import LocalHarness

# How long after a stop every process of the job must be gone.
GONE_WITHIN = 3.0


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[LocalProvider]:
    p = LocalProvider(tmp_path / "local", container_engine=None)
    yield p
    for job_dir in p.base_dir.iterdir():
        p.cancel(PREFIX + job_dir.name)


def sleeping(mark: str) -> list[int]:
    """The live processes ``sleep <mark>``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if len(argv) == 2 and os.path.basename(argv[0]) == b"sleep" and argv[1] == mark.encode():
            found.append(int(entry))
    return found


@pytest.fixture
def marks() -> Iterator[Callable[[], str]]:
    """A maker of unique ``sleep`` arguments (a number of seconds: weeks)."""
    made: list[str] = []
    stem = f"32{secrets.randbelow(10**5):05d}"

    def new() -> str:
        made.append(f"{stem}{len(made)}")
        return made[-1]

    yield new
    for mark in made:
        for pid in sleeping(mark):  # only a failed test leaves any
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def job_dir(p: LocalProvider, path: str) -> Path:
    found = p.directory_of(path)
    assert found is not None
    return found


def start(p: LocalProvider, script: str, *marks: str, **override: int) -> tuple[str, int]:
    """Submit ``sh -c script``; return its resource path and the job's process group once
    every ``sleep <mark>`` runs."""
    task = make_task(["sh", "-c", script])
    if override:
        spec = dataclasses.replace(task.spec, resource_override=ResourceOverride(**override))
        task = dataclasses.replace(task, spec=spec)
    path = p.submit(task)
    for mark in marks:
        wait_until(lambda m=mark: sleeping(m), 10)  # type: ignore[misc]
    pid_text = wait_until(lambda: r.read_text(job_dir(p, path) / r.PID), 5)
    return path, int(pid_text.split()[0])


def assert_all_gone(*marks: str) -> None:
    try:
        wait_until(lambda: not any(sleeping(m) for m in marks), GONE_WITHIN)
    except TimeoutError:
        left = {m: sleeping(m) for m in marks}
        raise AssertionError(f"still running {GONE_WITHIN}s after the stop: {left}") from None


def ended(p: LocalProvider, path: str) -> ProviderStatus:
    """The job's status once its runner has recorded its end (a cancelled job is CANCELLED
    from the marker on, before that)."""
    st: ProviderStatus = wait_until(
        lambda: (got := p.status([path])[path]).exit_code is not None and got, 3)
    return st


JOBS = {
    "setsid": "setsid sleep {a} & sleep {b}",
    "double-fork daemon": '(setsid sh -c "sleep {a} &" &); sleep {b}',
    "left the session, parent alive": 'setsid sh -c "sleep {a}; true" & sleep {b}',
}


@pytest.mark.parametrize("script", JOBS.values(), ids=list(JOBS))
def test_cancel_stops_a_descendant_that_left_the_process_group(
    provider: LocalProvider, marks: Callable[[], str], script: str
) -> None:
    a, b = marks(), marks()
    path, pgid = start(provider, script.format(a=a, b=b), a, b)
    (escaped,) = sleeping(a)
    assert os.getpgid(escaped) != pgid and os.getsid(escaped) != pgid  # really left
    provider.cancel(path)
    assert_all_gone(a, b)
    st = ended(provider, path)
    assert (st.state, st.raw_state, st.exit_code) == (
        JobStatus.CANCELLED, "CANCELLED", 128 + signal.SIGTERM)


def test_the_leaders_end_stops_every_descendant_before_the_end_is_reported(
    provider: LocalProvider, marks: Callable[[], str], tmp_path: Path
) -> None:
    a, gate = marks(), tmp_path / "gate"
    script = f"setsid sleep {a} & while [ ! -e {gate} ]; do sleep 0.05; done; exit 0"
    path, _ = start(provider, script, a)
    gate.touch()
    st = wait_for_state(LocalHarness(provider), path, {JobStatus.COMPLETED, JobStatus.FAILED}, 5)
    assert (st.state, st.exit_code) == (JobStatus.COMPLETED, 0)
    assert sleeping(a) == []  # at once: the exit code is written after the kill


def test_a_cancel_completes_when_the_worker_dies_right_after_the_marker(
    provider: LocalProvider, marks: Callable[[], str]
) -> None:
    a, b = marks(), marks()
    path, _ = start(provider, f"setsid sleep {a} & sleep {b}", a, b)
    # What ``cancel`` writes first; the worker is killed before it signals anything.
    r.write_atomic(job_dir(provider, path) / r.CANCELLED, r.now_iso())
    assert_all_gone(a, b)
    st = ended(provider, path)
    assert (st.state, st.raw_state, st.exit_code) == (
        JobStatus.CANCELLED, "CANCELLED", 128 + signal.SIGTERM)


def test_sigterm_to_the_runner_stops_the_job_and_records_its_end(
    provider: LocalProvider, marks: Callable[[], str]
) -> None:
    a, b = marks(), marks()
    path, _ = start(provider, f"setsid sleep {a} & sleep {b}", a, b)
    os.kill(int(r.read_text(job_dir(provider, path) / r.RUNNER_PID) or 0), signal.SIGTERM)
    assert_all_gone(a, b)
    st = ended(provider, path)
    assert (st.raw_state, st.exit_code) == ("FAILED", 128 + signal.SIGTERM)  # not LOST


def test_the_maximum_run_duration_stops_every_descendant(
    provider: LocalProvider, marks: Callable[[], str]
) -> None:
    a, b = marks(), marks()
    path, _ = start(provider, f"setsid sleep {a} & sleep {b}", a, b, max_run_duration_seconds=1)
    st = wait_for_state(LocalHarness(provider), path, {JobStatus.FAILED, JobStatus.COMPLETED}, 5)
    assert (st.raw_state, st.exit_code) == ("TIMED_OUT", 128 + signal.SIGTERM)
    assert sleeping(a) == sleeping(b) == []


def test_a_job_that_ignores_sigterm_and_forks_while_it_is_killed(
    provider: LocalProvider, marks: Callable[[], str]
) -> None:
    a = marks()
    # SIG_IGN is inherited: none of these processes dies of SIGTERM.
    script = f"trap '' TERM; while :; do setsid sleep {a} & sleep 0.01; done"
    path, _ = start(provider, script, a)
    wait_until(lambda: len(sleeping(a)) >= 5, 5)
    started = time.monotonic()
    provider.cancel(path)
    assert time.monotonic() - started < 1.5  # the caller is held for the grace at most
    assert_all_gone(a)
    st = ended(provider, path)
    assert (st.state, st.exit_code) == (JobStatus.CANCELLED, 128 + signal.SIGKILL)


def test_the_job_starts_with_no_blocked_signal(provider: LocalProvider) -> None:
    # The runner blocks SIGCHLD and SIGTERM for itself; a job must not inherit that.
    path = provider.submit(make_task(["grep", "^SigBlk", "/proc/self/status"]))
    wait_for_state(LocalHarness(provider), path, {JobStatus.COMPLETED}, 5)
    assert provider.read_output(path, (0, 0)).stdout.split() == ["SigBlk:", "0" * 16]


# --- jobs of several tasks ----------------------------------------------------------------

# Task i runs ``sleep $Bi`` as its leader's child and ``sleep $Ai`` out of its group and
# session; a task whose marks are unset (task 3) would only sleep briefly.
TASK_SCRIPT = ('eval "a=\\$A$JENNAH_TASK_INDEX; b=\\$B$JENNAH_TASK_INDEX"; '
               'setsid sleep "${a:-1}" & sleep "${b:-1}"')


def submit_array(
    p: LocalProvider, script: str, task_count: int, parallelism: int, env: dict[str, str]
) -> str:
    task = make_task(["sh", "-c", script], env=env)
    spec = dataclasses.replace(task.spec, task_count=task_count, parallelism=parallelism)
    return p.submit(dataclasses.replace(task, spec=spec))


def runner_ended(p: LocalProvider, path: str) -> ProviderStatus:
    """The status of a job of several tasks once its runner has recorded its end."""
    wait_until(lambda: (job_dir(p, path) / r.EXIT_CODE).exists(), 3)
    return p.status([path])[path]


def test_cancel_stops_every_task_and_every_descendant_of_each(
    provider: LocalProvider, marks: Callable[[], str]
) -> None:
    a, b = [marks() for _ in range(3)], [marks() for _ in range(3)]
    env = {**{f"A{i}": m for i, m in enumerate(a)}, **{f"B{i}": m for i, m in enumerate(b)}}
    path = submit_array(provider, TASK_SCRIPT, 4, 3, env)  # task 3 waits for a place
    for mark in (*a, *b):
        wait_until(lambda m=mark: sleeping(m), 10)  # type: ignore[misc]
    escaped = [pid for m in a for pid in sleeping(m)]
    assert all(os.getsid(pid) == pid for pid in escaped)  # really out of their task's session
    provider.cancel(path)
    assert_all_gone(*a, *b)
    st = runner_ended(provider, path)
    assert (st.state, st.raw_state) == (JobStatus.CANCELLED, "CANCELLED")
    tasks = {t.index: t for t in st.tasks or ()}
    assert [(tasks[i].status, tasks[i].exit_code) for i in range(3)] == [
        (TaskStatus.CANCELLED, 128 + signal.SIGTERM)] * 3
    assert (tasks[3].status, tasks[3].started_at) == (TaskStatus.CANCELLED, None)  # never ran
    assert "S 3 " not in (job_dir(provider, path) / r.TASKS_LOG).read_text()


def test_a_tasks_group_ends_with_it_and_what_left_the_group_with_the_job(
    provider: LocalProvider, marks: Callable[[], str], tmp_path: Path
) -> None:
    a, c = marks(), marks()
    # Task 0 starts both sleeps, and ends at its gate; task 1 waits for its own.
    script = (f'[ "$JENNAH_TASK_INDEX" = 0 ] && {{ sleep {a} & setsid sleep {c} & }}; '
              f'while [ ! -e {tmp_path}/gate$JENNAH_TASK_INDEX ]; do sleep 0.02; done')
    path = submit_array(provider, script, 2, 0, {})
    wait_until(lambda: sleeping(a) and sleeping(c), 10)
    (tmp_path / "gate0").touch()

    def task_0() -> TaskStatus:
        known = {t.index: t.status for t in provider.status([path])[path].tasks or ()}
        return known.get(0, TaskStatus.PENDING)

    wait_until(lambda: task_0() is TaskStatus.SUCCEEDED, 5)
    wait_until(lambda: not sleeping(a), 1)  # killed with its task's group, at its end
    time.sleep(0.3)
    assert sleeping(c)  # it left the group: the job's until the job ends
    assert provider.status([path])[path].state is JobStatus.RUNNING
    (tmp_path / "gate1").touch()
    st = wait_for_state(LocalHarness(provider), path, {JobStatus.COMPLETED}, 5)
    assert st.state is JobStatus.COMPLETED
    assert sleeping(c) == []  # at once: the end is written after the kill


def test_sigterm_to_the_runner_stops_every_task_as_an_infrastructure_failure(
    provider: LocalProvider, marks: Callable[[], str]
) -> None:
    a, b = [marks() for _ in range(2)], [marks() for _ in range(2)]
    env = {**{f"A{i}": m for i, m in enumerate(a)}, **{f"B{i}": m for i, m in enumerate(b)}}
    path = submit_array(provider, TASK_SCRIPT, 2, 0, env)
    for mark in (*a, *b):
        wait_until(lambda m=mark: sleeping(m), 10)  # type: ignore[misc]
    os.kill(int(r.read_text(job_dir(provider, path) / r.RUNNER_PID) or 0), signal.SIGTERM)
    assert_all_gone(*a, *b)
    st = runner_ended(provider, path)
    assert (st.state, st.failure_class) == (JobStatus.FAILED, FailureClass.INFRASTRUCTURE)
    assert {(t.status, t.failure_class, t.exit_code, t.attempt) for t in st.tasks or ()} == {
        (TaskStatus.FAILED, FailureClass.INFRASTRUCTURE, 128 + signal.SIGTERM, 0)}

"""The provider contract on the local provider (real detached processes), plus what only
a local batch service has: surviving the submitter's death, process groups, output files,
the runner's own failure, every row of the state mapping, and the container argv."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from database.memory import MemoryStore
from jennah.errors import ProviderRejected, ProviderUnavailable, SettingsError
from jennah.models import (
    EventKind,
    FailureClass,
    JobSpec,
    JobStatus,
    ResourceOverride,
    TaskState,
    TaskStatus,
)
from jennah.settings import ProviderSettings
from jennah.tasks import count
from providers import create_provider
from providers import local_runner as r
from providers.base import OutputChunk, ProviderStatus, ProviderTask
from providers.local import (
    DEFAULT_TASK_PARALLELISM,
    LAUNCHED,
    PREFIX,
    LocalProvider,
    Observation,
    TaskLog,
    container_argv,
    detect_container_engine,
    map_state,
    read_lines,
)
from tests.helpers import REPO, owner, wait_until
from tests.providers.provider_contract import (
    EXIT_0,
    EXIT_3,
    IMAGE,
    SLEEP_60,
    ProviderContract,
    make_task,
    wait_for_state,
)
from worker.convert import event_to_pb, job_to_pb


@dataclass
class LocalHarness:
    provider: LocalProvider
    supports_long_running: bool = True

    def advance(self) -> None:
        time.sleep(0.05)

    def executions(self, provider_job_id: str) -> int:
        text = r.read_text(self.provider.base_dir / provider_job_id / r.EXECUTIONS)
        return len(text.splitlines()) if text else 0

    def unknown_path(self) -> str:
        return "local:j-never-submitted-0"


def _stop_all(provider: LocalProvider) -> None:
    for job_dir in provider.base_dir.iterdir():
        provider.cancel(PREFIX + job_dir.name)


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[LocalProvider]:
    p = LocalProvider(tmp_path / "local", container_engine=None)
    yield p
    _stop_all(p)
    p.close()


@pytest.fixture
def harness(provider: LocalProvider) -> LocalHarness:
    return LocalHarness(provider)


class TestLocalProviderContract(ProviderContract):
    kind = "local"

    @pytest.fixture
    def harness(self, provider: LocalProvider) -> LocalHarness:
        return LocalHarness(provider)


def with_spec(task: ProviderTask, **changes: object) -> ProviderTask:
    return dataclasses.replace(task, spec=dataclasses.replace(task.spec, **changes))  # type: ignore[arg-type]


def group_members(pgid: int, *, live_only: bool = False) -> list[int]:
    """Every process (zombies too, unless ``live_only``) whose process group is ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and not (live_only and fields[0] == "Z"):
            found.append(int(entry))
    return found


def jdir(p: LocalProvider, path: str) -> Path:
    """The job directory of ``path``, which must name one."""
    job_dir = p.directory_of(path)
    assert job_dir is not None, path
    return job_dir


def job_pgid(p: LocalProvider, path: str) -> int:
    text = wait_until(lambda: r.read_text(jdir(p, path) / r.PID), 5)
    return int(text.split()[0])


# --- process groups and cancel ------------------------------------------------------------


def test_cancel_kills_the_whole_process_group_within_two_seconds(harness: LocalHarness) -> None:
    p = harness.provider
    path = p.submit(make_task(["sh", "-c", "sleep 60 & sleep 60 & wait"]))
    wait_for_state(harness, path, {JobStatus.RUNNING}, 5)
    pgid = job_pgid(p, path)
    wait_until(lambda: len(group_members(pgid)) >= 3, 5)  # sh and both sleeps
    assert os.getsid(pgid) == pgid  # the job has a session of its own (setsid)
    started = time.monotonic()
    p.cancel(path)
    assert time.monotonic() - started < 1.2
    st = wait_for_state(harness, path, {JobStatus.CANCELLED}, 2)
    wait_until(lambda: not group_members(pgid), 2)  # reaped too: not even zombies remain
    assert time.monotonic() - started < 2.0
    assert st.raw_state in {"CANCELLED", "CANCELLING"}
    assert p.status([path])[path].exit_code == 128 + signal.SIGTERM


def test_cancel_kills_a_job_that_ignores_sigterm(harness: LocalHarness) -> None:
    p = harness.provider
    path = p.submit(make_task(["sh", "-c", "trap '' TERM; sleep 60"]))
    wait_for_state(harness, path, {JobStatus.RUNNING}, 5)
    pgid = job_pgid(p, path)
    wait_until(lambda: len(group_members(pgid)) >= 2, 5)
    started = time.monotonic()
    p.cancel(path)
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 1.3  # the grace, then SIGKILL; the caller is never held longer
    wait_until(lambda: not group_members(pgid), 1)
    st = wait_for_state(harness, path, {JobStatus.CANCELLED}, 1)
    assert st.exit_code == 128 + signal.SIGKILL


def test_cancel_before_the_job_starts_means_it_never_starts(tmp_path: Path) -> None:
    # A "python" that does nothing: the runner is never started by submit.
    idle = LocalProvider(tmp_path / "local", python="/bin/true", container_engine=None)
    task = make_task(EXIT_0)
    path = idle.submit(task)
    assert idle.status([path])[path].raw_state == "QUEUED"
    idle.cancel(path)
    assert idle.status([path])[path].state is JobStatus.CANCELLED
    runner = subprocess.run([sys.executable, "-m", "providers.local_runner", str(jdir(idle, path))],
                            cwd="/", timeout=30, check=False)
    assert runner.returncode == 0
    st = idle.status([path])[path]
    assert st.state is JobStatus.CANCELLED and st.completed_at is not None
    assert not (jdir(idle, path) / r.EXECUTIONS).exists()


def test_leftovers_are_killed_when_the_job_leader_exits(harness: LocalHarness) -> None:
    path = harness.provider.submit(make_task(["sh", "-c", "sleep 60 & echo $! ; exit 0"]))
    st = wait_for_state(harness, path, {JobStatus.COMPLETED, JobStatus.FAILED}, 5)
    assert (st.state, st.exit_code) == (JobStatus.COMPLETED, 0)
    pgid = job_pgid(harness.provider, path)
    wait_until(lambda: not group_members(pgid), 2)


def test_exit_by_signal_is_128_plus_the_signal(harness: LocalHarness) -> None:
    path = harness.provider.submit(make_task(["sh", "-c", "kill -KILL $$"]))
    st = wait_for_state(harness, path, {JobStatus.COMPLETED, JobStatus.FAILED}, 5)
    assert (st.state, st.exit_code, st.failure_class) == (
        JobStatus.FAILED, 137, FailureClass.USER_ERROR)


def test_max_run_duration_ends_the_job_as_timeout(harness: LocalHarness) -> None:
    task = with_spec(make_task(SLEEP_60),
                     resource_override=ResourceOverride(max_run_duration_seconds=1))
    path = harness.provider.submit(task)
    st = wait_for_state(harness, path, {JobStatus.FAILED, JobStatus.COMPLETED}, 4)
    assert (st.state, st.raw_state, st.failure_class) == (
        JobStatus.FAILED, "TIMED_OUT", FailureClass.TIMEOUT)
    assert st.exit_code == 143


# --- independence from the worker -----------------------------------------------------------


def test_job_survives_kill_9_of_the_submitting_process(tmp_path: Path) -> None:
    base = tmp_path / "local"
    marker = tmp_path / "survived"
    child_code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from jennah.models import JobSpec
        from providers.base import ProviderTask
        from providers.local import LocalProvider
        spec = JobSpec({IMAGE!r}, ("sh", "-c", "sleep 1; echo survived > {marker}; exit 0"))
        task = ProviderTask("j-survivor-0", "survivor", "tenant-a", 0, spec)
        print(LocalProvider(Path({str(base)!r}), container_engine=None).submit(task), flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.PIPE,
                             cwd="/", text=True)
    assert child.stdout is not None
    path = child.stdout.readline().strip()
    watcher = LocalProvider(base, container_engine=None)
    harness = LocalHarness(watcher)
    wait_for_state(harness, path, {JobStatus.RUNNING}, 5)
    child.kill()  # SIGKILL: no cleanup of any kind in the submitter
    child.wait(timeout=10)
    child.stdout.close()
    runner_pid = int(r.read_text(jdir(watcher, path) / r.RUNNER_PID) or 0)
    assert os.getpgid(runner_pid) == runner_pid  # its own group and session (setsid)
    assert os.getsid(runner_pid) == runner_pid
    st = wait_for_state(harness, path, {JobStatus.COMPLETED, JobStatus.FAILED}, 10)
    assert (st.state, st.exit_code) == (JobStatus.COMPLETED, 0)
    assert marker.read_text() == "survived\n"
    assert harness.executions("j-survivor-0") == 1


def test_runner_death_is_an_infrastructure_failure_and_stops_the_job(
    harness: LocalHarness,
) -> None:
    p = harness.provider
    path = p.submit(make_task(SLEEP_60))
    wait_for_state(harness, path, {JobStatus.RUNNING}, 5)
    pgid = job_pgid(p, path)
    os.kill(int(r.read_text(jdir(p, path) / r.RUNNER_PID) or 0), signal.SIGKILL)
    st = wait_for_state(harness, path, {JobStatus.FAILED}, 5)
    assert (st.raw_state, st.failure_class, st.exit_code) == (
        "LOST", FailureClass.INFRASTRUCTURE, None)
    assert "runner" in st.message
    # The lost execution is not left running (a retry would otherwise run it twice).
    # Its reaped-by-nobody zombies may remain under a non-reaping PID 1.
    wait_until(lambda: not group_members(pgid, live_only=True), 2)
    assert p.status([path])[path].state is JobStatus.FAILED


FOREIGN_PIDNS = "00000000-0000-0000-0000-000000000000 pid:[1]"  # another container's


def test_a_lost_job_of_another_pid_namespace_signals_nothing_here(
    harness: LocalHarness,
) -> None:
    """Workers of two containers share a directory: the pids a dead container's runner
    recorded are, in the survivor's namespace, other processes (its own jobs, often with
    the same pid and start tick). Finding that job lost must not signal them."""
    p = harness.provider
    path = p.submit(make_task(SLEEP_60))
    wait_for_state(harness, path, {JobStatus.RUNNING}, 5)
    pgid = job_pgid(p, path)
    assert (jdir(p, path) / r.PIDNS).read_text() == r.pid_namespace() != ""
    r.write_atomic(jdir(p, path) / r.PIDNS, FOREIGN_PIDNS)
    os.kill(int(r.read_text(jdir(p, path) / r.RUNNER_PID) or 0), signal.SIGKILL)
    try:
        st = wait_for_state(harness, path, {JobStatus.FAILED}, 5)
        assert (st.raw_state, st.failure_class) == ("LOST", FailureClass.INFRASTRUCTURE)
        time.sleep(0.2)
        assert group_members(pgid, live_only=True), "a process of this namespace was killed"
    finally:
        os.killpg(pgid, signal.SIGKILL)


@pytest.mark.parametrize("task_count", [1, 2])
def test_no_signal_crosses_pid_namespaces_and_cancel_still_works(
    harness: LocalHarness, task_count: int
) -> None:
    p = harness.provider
    path = p.submit(with_spec(make_task(SLEEP_60), task_count=task_count))
    signal_ = p._signal_tasks if task_count > 1 else p._signal_group
    wait_until(lambda: signal_(jdir(p, path), 0), 5)  # signal 0: "could", sends nothing
    r.write_atomic(jdir(p, path) / r.PIDNS, FOREIGN_PIDNS)
    assert not signal_(jdir(p, path), 0)
    started = time.monotonic()
    p.cancel(path)  # only the marker: the runner, whose lock we can see, stops the job
    assert time.monotonic() - started < 0.5
    st = wait_for_state(harness, path, ENDED, 3)
    assert st.state is JobStatus.CANCELLED


def test_any_provider_instance_on_the_host_can_poll_and_cancel(harness: LocalHarness) -> None:
    path = harness.provider.submit(make_task(SLEEP_60))
    # Another worker: its own provider object, the host's shared LOCAL_BATCH_DIR.
    other = LocalProvider(harness.provider.base_dir, container_engine=None)
    wait_for_state(LocalHarness(other), path, {JobStatus.RUNNING}, 5)
    other.cancel(path)
    assert harness.provider.status([path])[path].state is JobStatus.CANCELLED


def test_adopting_a_directory_whose_runner_never_launched(provider: LocalProvider) -> None:
    task = make_task(EXIT_0)
    job_dir = provider.base_dir / task.provider_job_id
    job_dir.mkdir()  # a worker died right after mkdir
    path = provider.submit(task)
    assert path == f"local:{task.provider_job_id}" and jdir(provider, path) == job_dir
    st = wait_for_state(LocalHarness(provider), path, {JobStatus.COMPLETED}, 5)
    assert st.exit_code == 0
    assert LocalHarness(provider).executions(task.provider_job_id) == 1


def test_a_fresh_launch_is_awaited_and_a_stale_one_retried(tmp_path: Path) -> None:
    idle = LocalProvider(tmp_path / "local", python="/bin/true", container_engine=None)
    task = make_task(EXIT_0)
    path = idle.submit(task)  # "launched", but the runner never came up
    real = LocalProvider(tmp_path / "local", container_engine=None)
    real.submit(task)
    time.sleep(0.3)
    assert real.status([path])[path].raw_state == "QUEUED"  # within the launch grace
    r.write_atomic(jdir(real, path) / LAUNCHED, "2020-01-01T00:00:00+00:00")
    assert real.submit(task) == path
    wait_for_state(LocalHarness(real), path, {JobStatus.COMPLETED}, 5)


@pytest.mark.parametrize("task_count", [1, 3])
def test_a_poll_relaunches_a_runner_that_died_before_starting_the_job(
    tmp_path: Path, task_count: int
) -> None:
    """The worker that launched the runner died with it (a killed container): the new
    owner only polls, so its poll must launch the job again, once, and it runs once."""
    idle = LocalProvider(tmp_path / "local", python="/bin/true", container_engine=None)
    task = with_spec(make_task(EXIT_0), task_count=task_count)
    path = idle.submit(task)  # "launched", but the runner exited without starting it
    owner = LocalProvider(tmp_path / "local", container_engine=None)
    time.sleep(0.3)
    assert owner.status([path])[path].raw_state == "QUEUED"  # within the grace: no relaunch
    assert not (jdir(owner, path) / r.STARTED).exists()
    r.write_atomic(jdir(owner, path) / LAUNCHED, "2020-01-01T00:00:00+00:00")
    st = wait_for_state(LocalHarness(owner), path, {JobStatus.COMPLETED}, 5)
    assert st.exit_code == 0
    assert LocalHarness(owner).executions(task.provider_job_id) == 1
    if task_count > 1:
        assert st.tasks is not None and count(task_count, st.tasks).succeeded == task_count


# --- environment and output ---------------------------------------------------------------


def test_env_vars_reach_the_job_over_a_minimal_environment(harness: LocalHarness) -> None:
    script = ('echo "A=$A"; echo "ID=$JENNAH_JOB_ID"; echo "AT=$JENNAH_ATTEMPT"; '
              'echo "T=$JENNAH_TENANT_ID"; echo "LEAK=${PYTEST_CURRENT_TEST:-none}"; '
              'echo "HOME=${HOME:+set}"; pwd')
    task = make_task(["sh", "-c", script], env={"A": "x y", "JENNAH_JOB_ID": "forged"},
                     attempt=2)
    path = harness.provider.submit(task)
    wait_for_state(harness, path, {JobStatus.COMPLETED}, 5)
    out = harness.provider.read_output(path, (0, 0)).stdout.splitlines()
    assert out == ["A=x y", f"ID={task.job_id}", "AT=2", "T=tenant-a", "LEAK=none",
                   "HOME=set", str(jdir(harness.provider, path) / r.WORKDIR)]
    spec_file = jdir(harness.provider, path) / r.SPEC
    assert stat.S_IMODE(spec_file.stat().st_mode) == 0o600  # it holds env values


def test_read_output_is_incremental_line_based_and_utf8_safe(
    harness: LocalHarness, tmp_path: Path
) -> None:
    g1, g2 = tmp_path / "g1", tmp_path / "g2"
    script = (f"printf 'one\\n'; printf 'caf\\303'; while [ ! -e {g1} ]; do sleep 0.01; done; "
              "printf '\\251\\n'; printf 'bad \\377 byte\\n'; printf 'tail-no-newline'; "
              f"printf 'err line\\n' >&2; while [ ! -e {g2} ]; do sleep 0.01; done")
    p = harness.provider
    path = p.submit(make_task(["sh", "-c", script]))
    out_file, err_file = jdir(p, path) / r.STDOUT, jdir(p, path) / r.STDERR
    wait_until(lambda: out_file.exists() and out_file.stat().st_size >= 8, 5)
    first = p.read_output(path, (0, 0))
    assert (first.stdout, first.stderr, first.offsets) == ("one\n", "", (4, 0))
    assert p.read_output(path, first.offsets).stdout == ""  # "caf" + half a char: held back
    g1.touch()
    wait_until(lambda: b"tail" in out_file.read_bytes() and err_file.stat().st_size > 0, 5)
    second = p.read_output(path, first.offsets)
    assert second.stdout == "café\nbad \ufffd byte\n"
    assert second.stderr == "err line\n"
    assert p.read_output(path, second.offsets).stdout == ""  # partial last line held back
    g2.touch()
    wait_for_state(harness, path, {JobStatus.COMPLETED}, 5)
    last = p.read_output(path, second.offsets)
    assert (last.stdout, last.stderr) == ("tail-no-newline", "")  # finished: all of it
    end = p.read_output(path, last.offsets)
    assert (end.stdout, end.stderr, end.offsets) == ("", "", last.offsets)


def test_read_output_is_capped_and_never_splits_a_character(harness: LocalHarness) -> None:
    code = "import sys; sys.stdout.buffer.write('€'.encode() * 70000)"  # 210,000 bytes, 1 line
    path = harness.provider.submit(make_task([sys.executable, "-c", code]))
    wait_for_state(harness, path, {JobStatus.COMPLETED}, 10)
    chunks, offsets = [], (0, 0)
    while True:
        chunk = harness.provider.read_output(path, offsets)
        if not chunk.stdout:
            break
        assert len(chunk.stdout.encode()) <= 64 * 1024
        chunks.append(chunk.stdout)
        offsets = chunk.offsets
    assert len(chunks) == 4
    assert "".join(chunks) == "€" * 70000


def test_read_lines_rules(tmp_path: Path) -> None:
    f = tmp_path / "out"
    f.write_bytes(b"ab\ncd")
    assert read_lines(f, 0, final=False) == ("ab\n", 3)
    assert read_lines(f, 3, final=False) == ("", 3)
    assert read_lines(f, 3, final=True) == ("cd", 5)
    assert read_lines(tmp_path / "missing", 0, final=True) == ("", 0)
    f.write_bytes("xé".encode() * 3)  # no newline, longer than the cap: cut between chars
    assert read_lines(f, 0, final=False, cap=5) == ("xéx", 4)
    assert read_lines(f, 4, final=False, cap=5) == ("éxé", 9)


def test_unstartable_command_fails_with_127(harness: LocalHarness) -> None:
    path = harness.provider.submit(make_task(["no-such-command-jennah"]))
    st = wait_for_state(harness, path, {JobStatus.FAILED, JobStatus.COMPLETED}, 5)
    assert (st.state, st.exit_code, st.failure_class) == (
        JobStatus.FAILED, 127, FailureClass.USER_ERROR)
    assert "no-such-command-jennah" in harness.provider.read_output(path, (0, 0)).stderr


# --- the state mapping, row by row ---------------------------------------------------------

MAPPING_ROWS = [
    # observation, expected (state, raw state, failure class)
    (Observation(known=False), (None, "UNKNOWN", None)),
    (Observation(True, cancelled=True, exit_code=143, started=True),
     (JobStatus.CANCELLED, "CANCELLED", None)),
    (Observation(True, cancelled=True, exit_code=0, started=True),
     (JobStatus.CANCELLED, "CANCELLED", None)),
    (Observation(True, cancelled=True), (JobStatus.CANCELLED, "CANCELLING", None)),
    (Observation(True, cancelled=True, started=True, runner_alive=True),
     (JobStatus.CANCELLED, "CANCELLING", None)),
    (Observation(True, started=True, exit_code=143, timed_out=True),
     (JobStatus.FAILED, "TIMED_OUT", FailureClass.TIMEOUT)),
    (Observation(True, started=True, exit_code=0), (JobStatus.COMPLETED, "SUCCEEDED", None)),
    (Observation(True, started=True, exit_code=5),
     (JobStatus.FAILED, "FAILED", FailureClass.USER_ERROR)),
    (Observation(True), (JobStatus.SCHEDULED, "QUEUED", None)),
    (Observation(True, runner_alive=True), (JobStatus.SCHEDULED, "QUEUED", None)),
    (Observation(True, started=True, runner_alive=True), (JobStatus.RUNNING, "RUNNING", None)),
    (Observation(True, started=True),
     (JobStatus.FAILED, "LOST", FailureClass.INFRASTRUCTURE)),
]


@pytest.mark.parametrize(("obs", "expected"), MAPPING_ROWS)
def test_every_row_of_the_state_mapping(obs: Observation, expected: tuple[object, ...]) -> None:
    assert map_state(obs) == expected


@pytest.mark.parametrize(
    ("files", "hold_lock", "expected"),
    [
        ({}, False, (JobStatus.SCHEDULED, "QUEUED", None)),
        ({r.STARTED: "T"}, True, (JobStatus.RUNNING, "RUNNING", None)),
        ({r.STARTED: "T"}, False, (JobStatus.FAILED, "LOST", FailureClass.INFRASTRUCTURE)),
        ({r.STARTED: "T", r.COMPLETED: "T", r.EXIT_CODE: "0"}, False,
         (JobStatus.COMPLETED, "SUCCEEDED", None)),
        ({r.STARTED: "T", r.COMPLETED: "T", r.EXIT_CODE: "5"}, False,
         (JobStatus.FAILED, "FAILED", FailureClass.USER_ERROR)),
        ({r.STARTED: "T", r.COMPLETED: "T", r.EXIT_CODE: "143", r.TIMED_OUT: "T"}, False,
         (JobStatus.FAILED, "TIMED_OUT", FailureClass.TIMEOUT)),
        ({r.CANCELLED: "T"}, False, (JobStatus.CANCELLED, "CANCELLING", None)),
        ({r.STARTED: "T", r.CANCELLED: "T", r.EXIT_CODE: "143"}, False,
         (JobStatus.CANCELLED, "CANCELLED", None)),
    ],
)
def test_state_mapping_read_from_disk(
    provider: LocalProvider, files: dict[str, str], hold_lock: bool,
    expected: tuple[object, ...],
) -> None:
    when = "2026-11-23T12:00:00+00:00"
    job_dir = provider.base_dir / "j-handmade-0"
    job_dir.mkdir()
    (job_dir / r.SPEC).write_text(json.dumps({"argv": ["true"]}))
    for name, text in files.items():
        (job_dir / name).write_text(when if text == "T" else text)
    lock = os.open(job_dir / r.LOCK, os.O_RDWR | os.O_CREAT)
    try:
        if hold_lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
        st = provider.status([str(job_dir)])[str(job_dir)]
    finally:
        os.close(lock)
    assert (st.state, st.raw_state, st.failure_class) == expected
    if r.STARTED in files:
        assert st.started_at is not None and st.started_at.isoformat() == when
    if st.state is not None and st.state.terminal and st.raw_state != "LOST":
        assert st.completed_at is not None  # a lost runner's end time is not known


def test_unknown_and_foreign_paths(provider: LocalProvider, tmp_path: Path) -> None:
    plain_dir = tmp_path / "not-a-job"
    plain_dir.mkdir()
    paths = ["relative/j-x-0", "/", str(plain_dir), str(provider.base_dir / "j-none-0")]
    assert {p: s.state for p, s in provider.status(paths).items()} == dict.fromkeys(paths)
    for p in paths:
        provider.cancel(p)
    assert list(plain_dir.iterdir()) == []



# --- resource paths and messages: no host path reaches a tenant (docs/design.md §3b) ------


def test_the_resource_path_is_an_id(provider: LocalProvider) -> None:
    task = make_task(["sh", "-c", "echo hi"])
    path = provider.submit(task)
    assert re.fullmatch(r"local:j-[0-9a-f-]+-0", path) and path == f"local:{task.provider_job_id}"
    assert jdir(provider, path) == provider.base_dir / task.provider_job_id
    wait_for_state(LocalHarness(provider), path, {JobStatus.COMPLETED}, 5)
    assert provider.read_output(path, (0, 0)).stdout == "hi\n"


def test_an_absolute_path_stored_before_ids_still_works_inside_the_root(
    provider: LocalProvider,
) -> None:
    """A job submitted by a worker before the upgrade, still running after it, is stored
    with its directory's absolute path: it is polled, read and cancelled as before."""
    path = provider.submit(make_task(["sh", "-c", "echo hi; sleep 60"]))
    old = str(jdir(provider, path))
    harness = LocalHarness(provider)
    wait_for_state(harness, old, {JobStatus.RUNNING}, 5)
    wait_until(lambda: provider.read_output(old, (0, 0)).stdout == "hi\n", 5)
    provider.cancel(old)
    st = wait_until(lambda: (got := provider.status([old])[old]).exit_code is not None and got, 3)
    assert (st.state, st.exit_code) == (JobStatus.CANCELLED, 143)
    assert provider.status([path])[path].state is JobStatus.CANCELLED


def test_a_resource_path_outside_the_root_names_no_job(
    provider: LocalProvider, tmp_path: Path
) -> None:
    """Resource paths come from the store: neither ``..``, nor a symlink, nor an absolute
    path leads a provider to a directory outside its root, even to a real job's."""
    other = LocalProvider(tmp_path / "other", container_engine=None)  # another root
    outside = other.submit(make_task(SLEEP_60))
    wait_for_state(LocalHarness(other), outside, {JobStatus.RUNNING}, 5)
    name = jdir(other, outside).name
    (provider.base_dir / "j-link-0").symlink_to(jdir(other, outside))
    base = provider.base_dir
    paths = [
        "/etc", "/", "local:../../x", "local:..", "local:", "local:/etc", "local:j-x-0/../..",
        f"local:../other/{name}", "relative/j-x-0", "j-x-0", "local:j-x\0-0", "/etc\0",
        str(jdir(other, outside)), f"{base}/../other/{name}", f"{base}/{name}/..",
        "local:j-link-0", str(base / "j-link-0"), str(base),
    ]
    statuses = provider.status(paths)
    assert {p: (s.state, s.message) for p, s in statuses.items()} == dict.fromkeys(
        paths, (None, "unknown job"))
    for p in paths:
        provider.cancel(p)
        assert provider.read_output(p, (0, 0)).offsets == (0, 0)
    assert other.status([outside])[outside].state is JobStatus.RUNNING
    assert not (jdir(other, outside) / r.CANCELLED).exists()
    assert not Path("/etc", r.CANCELLED).exists()
    other.cancel(outside)


def test_no_status_message_or_provider_error_carries_a_host_path(
    provider: LocalProvider,
) -> None:
    p, root = provider, str(provider.base_dir)
    harness = LocalHarness(p)
    timed = with_spec(make_task(SLEEP_60),
                      resource_override=ResourceOverride(max_run_duration_seconds=1))
    ends = [p.submit(t) for t in (make_task(EXIT_0), make_task(EXIT_3), timed,
                                  make_task(["no-such-command-jennah"]))]
    cancelled, lost = p.submit(make_task(SLEEP_60)), p.submit(make_task(SLEEP_60))
    seen = [p.status([path])[path] for path in (*ends, cancelled, lost)]  # queued or running
    wait_for_state(harness, cancelled, {JobStatus.RUNNING}, 5)
    p.cancel(cancelled)
    wait_for_state(harness, lost, {JobStatus.RUNNING}, 5)
    os.kill(int(r.read_text(jdir(p, lost) / r.RUNNER_PID) or 0), signal.SIGKILL)
    for path in (*ends, cancelled, lost):
        seen.append(wait_for_state(harness, path, {JobStatus.COMPLETED, JobStatus.FAILED,
                                                   JobStatus.CANCELLED}, 5))
    seen.append(p.status([harness.unknown_path()])[harness.unknown_path()])
    assert {s.raw_state for s in seen} >= {"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED",
                                           "LOST", "UNKNOWN"}
    for st in seen:
        assert root not in f"{st.message} {st.raw_state}", st
    assert root not in p.read_output(ends[3], (0, 0)).stderr  # the runner's own words

    # Failures: the errno's reason and the job's id, never the file's path.
    task = make_task(EXIT_0)
    (p.base_dir / task.provider_job_id).write_text("")  # a file where its directory goes
    with pytest.raises(ProviderUnavailable) as submit_err:
        p.submit(task)
    broken = p.base_dir / "j-broken-0"
    for name in (r.PID, r.STDOUT):  # cancel reads the pid, read_output the stdout
        (broken / name).mkdir(parents=True)
    (broken / r.SPEC).write_text("{}")
    with pytest.raises(ProviderUnavailable) as cancel_err:
        p.cancel("local:j-broken-0")
    with pytest.raises(ProviderUnavailable) as output_err:
        p.read_output("local:j-broken-0", (0, 0))
    (broken / r.EXIT_CODE).mkdir()
    with pytest.raises(ProviderUnavailable) as status_err:
        p.status(["local:j-broken-0"])
    errors = [submit_err.value, cancel_err.value, output_err.value, status_err.value]
    for err, reason in zip(errors, ["Not a directory", "Is a directory", "Is a directory",
                                    "Is a directory"], strict=True):
        assert reason in str(err) and root not in str(err), err
    assert task.provider_job_id in str(submit_err.value)
    assert "j-broken-0" in str(cancel_err.value)
    shutil.rmtree(broken)
    (p.base_dir / task.provider_job_id).unlink()


def test_what_a_tenant_sees_of_local_jobs_names_no_host_path(provider: LocalProvider) -> None:
    """Through a worker's JobService and Poller: the job, its resource path, the SCHEDULED
    message and every other event, of a failed, a cancelled and a rejected job."""
    store = MemoryStore()
    w1 = owner(store, provider)
    jobs, poller = w1.jobs, w1.poller

    async def cycle_until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not done():
            assert time.monotonic() < deadline
            await poller.cycle()
            await asyncio.sleep(0.05)

    def status(job_id: str) -> JobStatus:
        return store.get_job("acme", job_id).status

    async def go() -> list[str]:
        failed = await jobs.submit("acme", JobSpec(IMAGE, ("sh", "-c", "echo out; exit 3")), "")
        running = await jobs.submit("acme", JobSpec(IMAGE, SLEEP_60), "")
        rejected = await jobs.submit(
            "acme", JobSpec(IMAGE, ("true",), labels={"local-runtime": "container"}), "")
        await cycle_until(lambda: status(running.job_id) is JobStatus.RUNNING)
        await jobs.cancel("acme", running.job_id)
        ids = [failed.job_id, running.job_id, rejected.job_id]
        await cycle_until(lambda: all(status(i).terminal for i in ids))
        return ids

    ids = asyncio.run(go())
    root = str(provider.base_dir)
    finals = [store.get_job("acme", i) for i in ids]
    assert [j.status for j in finals] == [JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.FAILED]
    for job in finals[:2]:
        assert job.cloud_resource_path == f"local:{job.provider_job_id}"
        scheduled = [e for e in store.list_events("acme", job.job_id, 0, 100)
                     if e.kind is EventKind.SCHEDULED]
        assert [e.message for e in scheduled] == [f"submitted to local as {job.provider_job_id}"]
    assert finals[0].error_message == "exited with code 3"
    for job in finals:
        events = store.list_events("acme", job.job_id, 0, 100)
        texts = [str(job_to_pb(job)), *(str(event_to_pb(e)) for e in events)]
        assert not [t for t in texts if root in t]

# --- submit rules, settings, containers ---------------------------------------------------


def test_rejected_submits_leave_nothing_behind(provider: LocalProvider) -> None:
    with pytest.raises(ProviderRejected, match="no commands"):
        provider.submit(make_task([]))
    with pytest.raises(ProviderRejected, match="container"):
        provider.submit(make_task(EXIT_0, labels={"local-runtime": "container"}))
    with pytest.raises(ProviderRejected, match="invalid provider job id"):
        provider.submit(dataclasses.replace(make_task(EXIT_0), provider_job_id="../escape"))
    assert list(provider.base_dir.iterdir()) == []


def test_from_settings_through_the_registry(tmp_path: Path) -> None:
    p = create_provider(ProviderSettings(kind="local",
                                         env={"LOCAL_BATCH_DIR": str(tmp_path / "lb")}))
    assert isinstance(p, LocalProvider)
    assert p.base_dir == (tmp_path / "lb").resolve() and p.base_dir.is_dir()
    assert p.capabilities.supports_output and p.capabilities.max_status_batch >= 1000


def test_container_argv() -> None:
    task = with_spec(make_task(EXIT_0, env={"B": "2", "A": "1"}), resource_profile="medium")
    assert container_argv("docker", task) == [
        "docker", "run", "--rm", "--init", "--name", f"jennah-{task.provider_job_id}",
        "--cpus=2", "--memory=4096m",
        "-e", "A", "-e", "B", "-e", "JENNAH_ATTEMPT", "-e", "JENNAH_JOB_ID",
        "-e", "JENNAH_PROVIDER_JOB_ID", "-e", "JENNAH_TASK_COUNT", "-e", "JENNAH_TASK_INDEX",
        "-e", "JENNAH_TENANT_ID",
        IMAGE, "sh", "-c", "exit 0",
    ]
    small = with_spec(make_task([]), resource_override=ResourceOverride(cpu_millis=500,
                                                                        memory_mib=256))
    argv = container_argv("podman", small)
    assert argv[0] == "podman" and "--cpus=0.5" in argv and "--memory=256m" in argv
    assert argv[-1] == IMAGE  # no commands: the image's default command


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_container_runtime_runs_the_engine_with_values_only_in_its_env(
    tmp_path: Path,
) -> None:
    engine = _script(tmp_path / "fake-engine", 'printf "%s\\n" "$@"; echo "A=$A"\n')
    p = LocalProvider(tmp_path / "local", container_engine=str(engine))
    task = make_task(["echo", "hi"], env={"A": "s3cret"}, labels={"local-runtime": "container"})
    path = p.submit(task)
    wait_for_state(LocalHarness(p), path, {JobStatus.COMPLETED}, 5)
    lines = p.read_output(path, (0, 0)).stdout.splitlines()
    assert lines[:2] == ["run", "--rm"]
    assert lines[-4:] == [IMAGE, "echo", "hi", "A=s3cret"]
    assert "s3cret" not in json.dumps(json.loads((jdir(p, path) / r.SPEC).read_text())["argv"])
    default = p.submit(make_task([]))  # no commands, an engine: the image's default
    wait_for_state(LocalHarness(p), default, {JobStatus.COMPLETED}, 5)
    assert p.read_output(default, (0, 0)).stdout.splitlines()[-2] == IMAGE


def test_detect_container_engine_needs_a_working_info(tmp_path: Path) -> None:
    _script(tmp_path / "docker", "exit 1\n")  # a CLI without a daemon
    assert detect_container_engine(path=str(tmp_path)) is None
    podman = _script(tmp_path / "podman", '[ "$1" = info ] && exit 0; exit 1\n')
    assert detect_container_engine(path=str(tmp_path)) == str(podman)


def test_runner_module_runs_from_any_directory(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "providers.local_runner"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and "usage" in done.stderr
    assert REPO not in tmp_path.parents


def test_an_unusable_batch_dir_is_a_settings_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SettingsError, match="LOCAL_BATCH_DIR"):
        LocalProvider(blocker / "local")


# --- jobs of several tasks ----------------------------------------------------------------

ENDED = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}


def array(
    commands: Sequence[str], task_count: int, parallelism: int = 0, *,
    env: dict[str, str] | None = None, **changes: object,
) -> ProviderTask:
    """A job of ``task_count`` tasks running ``commands``."""
    return with_spec(make_task(commands, env=env), task_count=task_count,
                     parallelism=parallelism, **changes)


def by_index(st: ProviderStatus) -> dict[int, TaskState]:
    assert st.tasks is not None, st
    return {t.index: t for t in st.tasks}


def most_at_once(log: Path) -> int:
    """The most tasks that were between their ``+`` and ``-`` lines of ``log`` at once."""
    now = most = 0
    for line in log.read_text().splitlines():
        now += 1 if line.startswith("+") else -1
        most = max(most, now)
    return most


# Each task writes "+ i", waits for the gate, writes "- i".
GATED = ["sh", "-c", 'echo "+ $JENNAH_TASK_INDEX" >> "$LOG"; '
                     'while [ ! -e "$GATE" ]; do sleep 0.02; done; '
                     'echo "- $JENNAH_TASK_INDEX" >> "$LOG"']


@pytest.mark.parametrize(
    ("task_count", "parallelism", "at_once"),
    [(7, 3, 3), (DEFAULT_TASK_PARALLELISM + 3, 0, DEFAULT_TASK_PARALLELISM),
     (DEFAULT_TASK_PARALLELISM + 2, DEFAULT_TASK_PARALLELISM + 2, DEFAULT_TASK_PARALLELISM + 2)],
    ids=["parallelism 3", "no parallelism: the machine's default", "above the default"],
)
def test_tasks_run_at_most_parallelism_at_a_time(
    harness: LocalHarness, tmp_path: Path, task_count: int, parallelism: int, at_once: int
) -> None:
    log, gate = tmp_path / "log", tmp_path / "gate"
    p = harness.provider
    path = p.submit(array(GATED, task_count, parallelism,
                          env={"LOG": str(log), "GATE": str(gate)}))
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= at_once, 10)
    time.sleep(0.3)  # room for a task too many to start
    assert len(log.read_text().splitlines()) == at_once
    n = count(task_count, by_index(p.status([path])[path]).values())
    assert (n.running, n.pending) == (at_once, task_count - at_once)
    gate.touch()
    st = wait_for_state(harness, path, ENDED, 10)
    assert st.state is JobStatus.COMPLETED
    assert most_at_once(log) == at_once
    assert sorted(int(line.split()[1]) for line in log.read_text().splitlines()
                  if line.startswith("+")) == list(range(task_count))


def test_each_task_sees_its_index_and_count_and_has_its_own_output(
    harness: LocalHarness,
) -> None:
    p = harness.provider
    script = ('echo "$JENNAH_TASK_INDEX/$JENNAH_TASK_COUNT $JENNAH_JOB_ID"; '
              'echo "e$JENNAH_TASK_INDEX" >&2')
    # A job's own variables never override Jennah's.
    forged = {"JENNAH_TASK_INDEX": "9", "JENNAH_TASK_COUNT": "9"}
    task = array(["sh", "-c", script], 3, env=forged)
    path = p.submit(task)
    wait_for_state(harness, path, {JobStatus.COMPLETED}, 10)
    for i in range(3):
        chunk = p.read_output(path, (0, 0), task_index=i)
        assert (chunk.stdout, chunk.stderr) == (f"{i}/3 {task.job_id}\n", f"e{i}\n")
        assert chunk.offsets == (len(chunk.stdout), len(chunk.stderr))
        assert p.read_output(path, chunk.offsets, task_index=i).stdout == ""
    for missing in (3, -1):  # a task the job does not have
        assert p.read_output(path, (0, 0), task_index=missing) == OutputChunk(offsets=(0, 0))
    plain = p.submit(make_task(["sh", "-c", script]))  # a plain job is task 0 of 1
    wait_for_state(harness, plain, {JobStatus.COMPLETED}, 5)
    assert p.read_output(plain, (0, 0)).stdout.split()[0] == "0/1"
    assert p.read_output(plain, (0, 0), task_index=1) == OutputChunk(offsets=(0, 0))
    assert (jdir(p, path) / r.STDOUT).exists() is False  # each task writes its own files


def test_a_finished_task_gives_all_of_its_output_while_others_run(
    harness: LocalHarness, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    script = (f'printf "line\\npartial$JENNAH_TASK_INDEX"; [ "$JENNAH_TASK_INDEX" = 0 ] && exit 0; '
              f'while [ ! -e {gate} ]; do sleep 0.02; done')
    p = harness.provider
    path = p.submit(array(["sh", "-c", script], 2))
    wait_until(lambda: by_index(p.status([path])[path]).get(0, TaskState(0, TaskStatus.PENDING))
               .status is TaskStatus.SUCCEEDED, 10)
    assert p.read_output(path, (0, 0), task_index=0).stdout == "line\npartial0"  # it ended
    running = p.read_output(path, (0, 0), task_index=1)
    assert running.stdout == "line\n"  # still running: the partial line is held back
    gate.touch()
    wait_for_state(harness, path, {JobStatus.COMPLETED}, 10)
    assert p.read_output(path, running.offsets, task_index=1).stdout == "partial1"


def test_a_task_killed_from_outside_is_retried_and_a_user_error_is_not(
    harness: LocalHarness, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    # Task 1 is killed by SIGKILL on its first run (as the OOM killer would); task 2 exits 3.
    script = ('echo "$JENNAH_TASK_INDEX" >> "$RUNS"; case "$JENNAH_TASK_INDEX" in '
              '1) [ -e "$RUNS.1" ] || { touch "$RUNS.1"; kill -KILL $$; } ;; 2) exit 3 ;; esac')
    task = array(["sh", "-c", script], 3, env={"RUNS": str(runs)}, max_retries=2)
    path = harness.provider.submit(task)
    st = wait_for_state(harness, path, ENDED, 10)
    tasks = by_index(st)
    assert [(t.status, t.attempt, t.exit_code, t.failure_class) for t in tasks.values()] == [
        (TaskStatus.SUCCEEDED, 0, 0, None),
        (TaskStatus.SUCCEEDED, 1, 0, None),  # run again, as attempt 1
        (TaskStatus.FAILED, 0, 3, FailureClass.USER_ERROR),  # not run again
    ]
    assert sorted(runs.read_text().split()) == ["0", "1", "1", "2"]
    assert (st.state, st.exit_code, st.failure_class) == (
        JobStatus.FAILED, 3, FailureClass.USER_ERROR)
    assert st.message == "task 2 failed: exit code 3"
    assert harness.executions(task.provider_job_id) == 1  # retries are inside the one run


def test_a_task_keeps_failing_from_outside_until_its_retries_run_out(
    harness: LocalHarness, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    task = array(["sh", "-c", 'echo "$JENNAH_TASK_INDEX" >> "$RUNS"; kill -KILL $$'], 2,
                 env={"RUNS": str(runs)}, max_retries=1)
    st = wait_for_state(harness, harness.provider.submit(task), ENDED, 10)
    assert [(t.status, t.attempt, t.exit_code, t.failure_class) for t in by_index(st).values()] \
        == [(TaskStatus.FAILED, 1, 137, FailureClass.INFRASTRUCTURE)] * 2
    assert "killed by SIGKILL" in by_index(st)[0].error_message
    assert sorted(runs.read_text().split()) == ["0", "0", "1", "1"]  # 1 + max_retries runs each
    assert (st.state, st.failure_class) == (JobStatus.FAILED, FailureClass.INFRASTRUCTURE)


def test_the_maximum_run_duration_is_per_task(harness: LocalHarness) -> None:
    script = '[ "$JENNAH_TASK_INDEX" = 0 ] && sleep 60; exit 0'
    task = array(["sh", "-c", script], 2, max_retries=3,
                 resource_override=ResourceOverride(max_run_duration_seconds=1))
    st = wait_for_state(harness, harness.provider.submit(task), ENDED, 6)
    tasks = by_index(st)
    assert (tasks[0].status, tasks[0].exit_code, tasks[0].failure_class, tasks[0].attempt) == (
        TaskStatus.FAILED, 143, FailureClass.TIMEOUT, 0)  # a timeout is not retried
    assert tasks[1].status is TaskStatus.SUCCEEDED
    assert (st.state, st.failure_class) == (JobStatus.FAILED, FailureClass.TIMEOUT)
    assert st.message == "task 0 failed: exit code 143"


def test_a_command_that_cannot_start_fails_every_task_with_127(harness: LocalHarness) -> None:
    path = harness.provider.submit(array(["no-such-command-jennah"], 3, max_retries=2))
    st = wait_for_state(harness, path, ENDED, 10)
    assert {(t.status, t.exit_code, t.failure_class, t.attempt)
            for t in by_index(st).values()} == {
        (TaskStatus.FAILED, 127, FailureClass.USER_ERROR, 0)}
    assert all(t.started_at is not None and t.completed_at is not None
               for t in by_index(st).values())
    assert "no-such-command-jennah" in harness.provider.read_output(path, (0, 0), 2).stderr


def test_a_thousand_trivial_tasks_complete_quickly(harness: LocalHarness) -> None:
    task = array(["true"], 1000)
    started = time.monotonic()
    st = wait_for_state(harness, harness.provider.submit(task), ENDED, 60)
    elapsed = time.monotonic() - started
    assert st.state is JobStatus.COMPLETED, st
    assert count(1000, by_index(st).values()).succeeded == 1000
    assert harness.executions(task.provider_job_id) == 1
    assert elapsed < 30, elapsed  # about 2 to 4 s on 2 busy cores: one process per task


def test_runner_death_fails_the_job_and_stops_every_task(harness: LocalHarness) -> None:
    p = harness.provider
    path = p.submit(array(SLEEP_60, 3))
    wait_until(lambda: count(3, by_index(p.status([path])[path]).values()).running == 3, 10)
    groups = [int(line.split()[4]) for line in
              (jdir(p, path) / r.TASKS_LOG).read_text().splitlines() if line.startswith("S")]
    os.kill(int(r.read_text(jdir(p, path) / r.RUNNER_PID) or 0), signal.SIGKILL)
    st = wait_for_state(harness, path, ENDED, 5)
    assert (st.state, st.raw_state, st.failure_class) == (
        JobStatus.FAILED, "LOST", FailureClass.INFRASTRUCTURE)
    assert {(t.status, t.failure_class) for t in by_index(st).values()} == {
        (TaskStatus.FAILED, FailureClass.INFRASTRUCTURE)}
    assert len(groups) == 3
    wait_until(lambda: not any(group_members(g, live_only=True) for g in groups), 2)


def test_container_tasks_each_get_their_own_container(tmp_path: Path) -> None:
    engine = _script(tmp_path / "fake-engine", 'printf "%s\\n" "$@"; echo "I=$JENNAH_TASK_INDEX"\n')
    p = LocalProvider(tmp_path / "local", container_engine=str(engine))
    task = with_spec(make_task(["echo", "hi"], labels={"local-runtime": "container"}),
                     task_count=2)
    path = p.submit(task)
    wait_for_state(LocalHarness(p), path, {JobStatus.COMPLETED}, 10)
    for i in range(2):
        lines = p.read_output(path, (0, 0), task_index=i).stdout.splitlines()
        assert lines[lines.index("--name") + 1] == f"jennah-{task.provider_job_id}-{i}"
        assert "JENNAH_TASK_INDEX" in lines and lines[-1] == f"I={i}"


DONE = "S 0 0 1000 0 0\nE 0 0 2000 0 S -\nE 1 0 2000 0 S -\n"


@pytest.mark.parametrize(
    ("files", "log", "hold_lock", "expected"),
    [
        # Every task has ended, the runner is still ending the job: not over yet.
        ({r.STARTED: "T"}, DONE, True,
         (JobStatus.RUNNING, "ENDING", [TaskStatus.SUCCEEDED] * 2)),
        ({r.STARTED: "T", r.COMPLETED: "T", r.EXIT_CODE: "0"}, DONE, False,
         (JobStatus.COMPLETED, "COMPLETED", [TaskStatus.SUCCEEDED] * 2)),
        # A task failed for good, the other never started (the job was stopped).
        ({r.STARTED: "T", r.COMPLETED: "T", r.EXIT_CODE: "1"},
         "E 0 0 2000 143 F infrastructure stopped with the local runner\n", False,
         (JobStatus.FAILED, "FAILED", [TaskStatus.FAILED, TaskStatus.CANCELLED])),
        # A retried task waits for its next attempt; a line being written is not read.
        ({r.STARTED: "T"},
         "S 0 0 1000 0 0\nE 0 0 2000 137 R infrastructure killed\nS 1 0 1000 0 0\nE 1 0 20",
         True, (JobStatus.RUNNING, "RUNNING", [TaskStatus.PENDING, TaskStatus.RUNNING])),
        ({r.STARTED: "T", r.CANCELLED: "T"}, "S 0 0 1000 0 0\nE 1 0 2000 0 S -\n", True,
         (JobStatus.CANCELLED, "CANCELLING", [TaskStatus.CANCELLED, TaskStatus.SUCCEEDED])),
        # Cancelled, as asked, even though a task had failed for good before.
        ({r.STARTED: "T", r.CANCELLED: "T", r.COMPLETED: "T", r.EXIT_CODE: "1"},
         "E 0 0 2000 3 F user_error exited with code 3\n", False,
         (JobStatus.CANCELLED, "CANCELLED", [TaskStatus.FAILED, TaskStatus.CANCELLED])),
        ({r.STARTED: "T"}, "S 0 0 1000 0 0\nE 1 0 2000 0 S -\n", False,
         (JobStatus.FAILED, "LOST", [TaskStatus.FAILED, TaskStatus.SUCCEEDED])),
        ({}, "", False, (JobStatus.SCHEDULED, "QUEUED", [])),
    ],
    ids=["ending", "completed", "stopped", "retrying", "cancelling", "cancelled after a failure",
         "lost", "queued"],
)
def test_task_states_read_from_disk(
    provider: LocalProvider, files: dict[str, str], log: str, hold_lock: bool,
    expected: tuple[object, str, list[TaskStatus]],
) -> None:
    when = "2026-11-23T12:00:00+00:00"
    job_dir = provider.base_dir / "j-handmade-0"
    job_dir.mkdir()
    (job_dir / r.SPEC).write_text(json.dumps({"argv": ["true"], "task_count": 2}))
    r.write_atomic(job_dir / LAUNCHED, r.now_iso())  # no relaunch of the queued one
    for name, text in files.items():
        (job_dir / name).write_text(when if text == "T" else text)
    if log:
        (job_dir / r.TASKS_LOG).write_text(log)
    lock = os.open(job_dir / r.LOCK, os.O_RDWR | os.O_CREAT)
    try:
        if hold_lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
        st = provider.status(["local:j-handmade-0"])["local:j-handmade-0"]
    finally:
        os.close(lock)
    state, raw, statuses = expected
    assert (st.state, st.raw_state) == (state, raw)
    assert [t.status for t in st.tasks or ()] == statuses
    if st.state is not None and st.state.terminal and raw != "LOST":
        assert st.completed_at is not None


def test_the_task_log_is_read_on_from_where_it_was(tmp_path: Path) -> None:
    f = tmp_path / r.TASKS_LOG
    f.write_text("S 0 0 1000 11 5\nS 1 0 1000 12 6\nE 0 0 2500 0 S")  # the last line unfinished
    log = TaskLog().read(f)
    assert [t.status for t in log.snapshot()] == [TaskStatus.RUNNING] * 2
    assert log.groups == {0: (11, 5), 1: (12, 6)}
    with f.open("a") as out:
        out.write(" -\ngarbage line\nE 1 0 3000 2 F user_error exited with code 2\n")
    again = log.read(f)
    assert again is log and again.groups == {}
    first, second = again.snapshot()
    assert (first.status, first.completed_at) == (
        TaskStatus.SUCCEEDED, datetime.fromtimestamp(2.5, UTC))
    assert (second.status, second.exit_code, second.error_message, second.failure_class) == (
        TaskStatus.FAILED, 2, "exited with code 2", FailureClass.USER_ERROR)
    assert first.started_at == datetime.fromtimestamp(1, UTC)
    f.write_text("S 0 1 4000 13 7\n")  # shorter: another file, read from its start
    assert [(t.attempt, t.status) for t in log.read(f).snapshot()] == [(1, TaskStatus.RUNNING)]

"""The provider contract on the in-memory FakeProvider, plus its test controls (stepping,
``set_state``, fault injection) and the DryProvider used by benchmarks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from jennah.errors import ProviderRejected, ProviderUnavailable
from jennah.models import FailureClass, JobStatus, TaskStatus
from jennah.settings import ProviderSettings
from jennah.tasks import count
from providers import create_provider
from providers.base import ProviderTask
from providers.memory import FAKE_STATES, DryProvider, FakeProvider, planned_exit
from providers.tasks import status_from_tasks
from tests.providers.provider_contract import (
    EXIT_0,
    EXIT_3,
    SLEEP_60,
    TASK_1_FAILS,
    ProviderContract,
    make_task,
    wait_for_state,
)

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


class StepClock:
    """A clock that moves one second per reading, so timestamps are distinct and known."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@dataclass
class FakeHarness:
    provider: FakeProvider
    supports_long_running: bool = True

    def advance(self) -> None:
        self.provider.advance()

    def executions(self, provider_job_id: str) -> int:
        return self.provider.submissions.get(provider_job_id, 0)

    def unknown_path(self) -> str:
        return FakeProvider.path_for("j-never-submitted-0")


class TestFakeProviderContract(ProviderContract):
    kind = "fake"
    state_timeout = 2.0

    @pytest.fixture
    def harness(self) -> Iterator[FakeHarness]:
        provider = FakeProvider(StepClock())
        yield FakeHarness(provider)
        provider.close()


# --- the fake's own behaviour -----------------------------------------------------------


def test_every_row_of_the_fake_state_table() -> None:
    assert FAKE_STATES == {
        "QUEUED": JobStatus.SCHEDULED,
        "SCHEDULED": JobStatus.SCHEDULED,
        "RUNNING": JobStatus.RUNNING,
        "SUCCEEDED": JobStatus.COMPLETED,
        "FAILED": JobStatus.FAILED,
        "CANCELLED": JobStatus.CANCELLED,
    }
    fake = FakeProvider(StepClock())
    seen: dict[str, list[str]] = {}
    for commands in (EXIT_0, EXIT_3, SLEEP_60):
        path = fake.submit(make_task(commands))
        seen[commands[-1]] = [fake.status([path])[path].raw_state]
        for _ in range(4):
            fake.advance()
            seen[commands[-1]].append(fake.status([path])[path].raw_state)
    assert seen == {
        "exit 0": ["QUEUED", "SCHEDULED", "RUNNING", "SUCCEEDED", "SUCCEEDED"],
        "exit 3": ["QUEUED", "SCHEDULED", "RUNNING", "FAILED", "FAILED"],
        "sleep 60": ["QUEUED", "SCHEDULED", "RUNNING", "RUNNING", "RUNNING"],
    }
    path = fake.submit(make_task(SLEEP_60))
    fake.cancel(path)
    assert fake.status([path])[path].raw_state == "CANCELLED"


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (["sh", "-c", "exit 0"], 0),
        (["sh", "-c", "exit 42"], 42),
        (["sh", "-c", "echo hi"], 0),
        (["true"], 0),
        (["sh", "-c", "sleep 60; exit 3"], None),
        (["sleep", "5"], None),
        (["sh", "-c", "echo sleepy"], 0),
    ],
)
def test_planned_exit_reads_the_shell_conventions(
    commands: list[str], expected: int | None
) -> None:
    assert planned_exit(commands) == expected


def test_timestamps_come_from_the_injected_clock() -> None:
    fake = FakeProvider(StepClock())
    path = fake.submit(make_task(EXIT_0))
    fake.advance(3)
    st = fake.status([path])[path]
    assert st.started_at is not None and st.completed_at is not None
    assert T0 < st.started_at < st.completed_at < T0 + timedelta(seconds=10)


def test_set_state_forces_a_preemption() -> None:
    fake = FakeProvider(StepClock())
    path = fake.submit(make_task(SLEEP_60))
    fake.set_state(path, JobStatus.FAILED, exit_code=50001,
                   failure_class=FailureClass.PREEMPTED, message="spot VM reclaimed")
    st = fake.status([path])[path]
    assert (st.state, st.exit_code, st.failure_class) == (
        JobStatus.FAILED, 50001, FailureClass.PREEMPTED)
    assert st.message == "spot VM reclaimed"
    assert st.started_at is not None and st.completed_at is not None
    fake.advance(3)  # terminal: nothing moves it
    assert fake.status([path])[path].state is JobStatus.FAILED


def test_fail_next_raises_the_given_error_n_times() -> None:
    fake = FakeProvider(StepClock())
    task = make_task(EXIT_0)
    fake.fail_next(2, ProviderUnavailable("throttled"))
    for _ in range(2):
        with pytest.raises(ProviderUnavailable) as info:
            fake.submit(task)
        assert info.value.retryable
    assert task.provider_job_id not in fake.submissions  # a failed call changes nothing
    path = fake.submit(task)
    assert fake.submissions[task.provider_job_id] == 1
    assert fake.calls["submit"] == 3
    assert fake.status([path])[path].state is JobStatus.SCHEDULED


def test_fail_next_can_target_one_method() -> None:
    fake = FakeProvider(StepClock())
    fake.fail_next(1, ProviderRejected("bad image"), methods={"submit"})
    fake.status([])  # not targeted: passes
    fake.cancel("fake://jobs/none")
    with pytest.raises(ProviderRejected) as info:
        fake.submit(make_task(EXIT_0))
    assert not info.value.retryable
    fake.submit(make_task(EXIT_0))


def test_status_failure_reaches_the_caller_and_then_recovers() -> None:
    fake = FakeProvider(StepClock())
    path = fake.submit(make_task(EXIT_0))
    fake.fail_next(1, ProviderUnavailable("down"), methods=("status",))
    with pytest.raises(ProviderUnavailable):
        fake.status([path])
    assert fake.status([path])[path].state is JobStatus.SCHEDULED


def test_from_settings_steps_on_each_status_call() -> None:
    fake = create_provider(ProviderSettings(kind="fake"))
    assert isinstance(fake, FakeProvider)
    path = fake.submit(make_task(EXIT_3))
    states = [fake.status([path])[path].raw_state for _ in range(4)]
    assert states == ["SCHEDULED", "RUNNING", "FAILED", "FAILED"]


def test_fake_is_thread_safe_under_concurrent_submits_and_polls() -> None:
    import threading

    fake = FakeProvider()
    tasks = [make_task(EXIT_0) for _ in range(50)]
    paths: list[str] = []

    def submitter() -> None:
        for t in tasks:
            paths.append(fake.submit(t))

    def poller() -> None:
        for _ in range(200):
            fake.status(list(paths))
            fake.advance()

    threads = [threading.Thread(target=f) for f in (submitter, submitter, poller, poller)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(fake.submissions[t.provider_job_id] == 1 for t in tasks)
    fake.advance(3)
    assert {s.state for s in fake.status(list(set(paths))).values()} == {JobStatus.COMPLETED}


# --- DryProvider -------------------------------------------------------------------------


def test_dry_completes_at_once_and_is_idempotent() -> None:
    clock = StepClock()
    dry = DryProvider(clock)
    task = make_task(SLEEP_60)  # nothing runs, whatever the command
    path = dry.submit(task)
    st = dry.status([path])[path]
    assert (st.state, st.exit_code, st.failure_class) == (JobStatus.COMPLETED, 0, None)
    assert st.started_at == st.completed_at == T0 + timedelta(seconds=1)
    assert dry.submit(task) == path
    again = dry.status([path])[path]
    assert again.completed_at == st.completed_at  # the submit time, remembered
    dry.cancel(path)
    assert dry.status([path])[path].state is JobStatus.COMPLETED


def test_dry_reports_unknown_only_for_paths_it_cannot_have_made() -> None:
    dry = DryProvider(StepClock(), remember=2)
    paths = [dry.submit(make_task(EXIT_0)) for _ in range(3)]  # the first is forgotten
    other = DryProvider(StepClock())
    result = other.status([*paths, "fake://jobs/x", "dry://"])
    assert [result[p].state for p in paths] == [JobStatus.COMPLETED] * 3
    assert result["fake://jobs/x"].state is None and result["dry://"].state is None
    assert all(result[p].completed_at is not None for p in paths)


def test_dry_from_settings_through_the_registry() -> None:
    dry = create_provider(ProviderSettings(kind="dry"))
    assert isinstance(dry, DryProvider)
    assert dry.capabilities.max_status_batch >= 1000
    path = dry.submit(make_task(EXIT_3))
    assert wait_for_state(DryHarness(dry), path, {JobStatus.COMPLETED}, 1).exit_code == 0


@dataclass
class DryHarness:
    provider: DryProvider

    def advance(self) -> None:
        return None

    def executions(self, provider_job_id: str) -> int:
        return 0  # nothing ever runs

    def unknown_path(self) -> str:
        return "not-a-dry-path"


# --- jobs of several tasks ----------------------------------------------------------------


def array_task(commands: Sequence[str], task_count: int, parallelism: int = 0) -> ProviderTask:
    task = make_task(commands)
    return replace(task, spec=replace(task.spec, task_count=task_count, parallelism=parallelism))


def test_fake_tasks_move_with_advance_within_the_parallelism() -> None:
    fake = FakeProvider(StepClock())
    path = fake.submit(array_task(EXIT_0, 5, parallelism=2))
    seen = []
    for _ in range(6):
        st = fake.status([path])[path]
        n = count(5, st.tasks or ())
        seen.append((st.state, n.pending, n.running, n.succeeded))
        fake.advance()
    assert seen == [
        (JobStatus.SCHEDULED, 5, 0, 0),  # QUEUED
        (JobStatus.SCHEDULED, 5, 0, 0),
        (JobStatus.RUNNING, 3, 2, 0),  # the job runs: the first two tasks start
        (JobStatus.RUNNING, 1, 2, 2),  # they end, the next two take their places
        (JobStatus.RUNNING, 0, 1, 4),
        (JobStatus.COMPLETED, 0, 0, 5),
    ]
    st = fake.status([path])[path]
    assert st == status_from_tasks(5, st.tasks or ())  # the common rule, nothing else
    assert st.started_at is not None and st.completed_at is not None
    assert [t.started_at for t in st.tasks or ()] == sorted(t.started_at  # type: ignore[type-var]
                                                            for t in st.tasks or ())


def test_fake_cancel_and_set_state_end_every_unfinished_task() -> None:
    fake = FakeProvider(StepClock())
    cancelled = fake.submit(array_task(TASK_1_FAILS, 4, parallelism=2))
    fake.advance(3)  # tasks 0 and 1 ended (1 failed), 2 and 3 running
    fake.cancel(cancelled)
    st = fake.status([cancelled])[cancelled]
    assert (st.state, st.raw_state) == (JobStatus.CANCELLED, "CANCELLED")
    assert [t.status for t in st.tasks or ()] == [
        TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.CANCELLED]
    fake.advance(3)
    assert fake.status([cancelled])[cancelled] == st  # nothing moves a cancelled job
    preempted = fake.submit(array_task(SLEEP_60, 3, parallelism=1))
    fake.advance(2)
    fake.set_state(preempted, JobStatus.FAILED, exit_code=50001,
                   failure_class=FailureClass.PREEMPTED, message="spot VM reclaimed")
    st = fake.status([preempted])[preempted]
    assert (st.state, st.failure_class) == (JobStatus.FAILED, FailureClass.PREEMPTED)
    assert {(t.status, t.failure_class) for t in st.tasks or ()} == {
        (TaskStatus.FAILED, FailureClass.PREEMPTED)}
    finished = fake.submit(array_task(EXIT_0, 2))
    fake.advance(4)
    before = fake.status([finished])[finished]
    fake.cancel(finished)
    assert fake.status([finished])[finished] == before
    assert before.state is JobStatus.COMPLETED


def test_dry_completes_a_job_of_tasks_at_once_from_its_path_alone() -> None:
    dry = DryProvider(lambda: T0 + timedelta(microseconds=123_456))  # stored to the ms
    task = array_task(SLEEP_60, 10_000)
    path = dry.submit(task)
    assert path == f"dry://{task.provider_job_id}?tasks=10000"
    st = dry.status([path])[path]
    # The common rule, tasks in their stored form; dry's own words for the job.
    common = status_from_tasks(10_000, st.tasks or ())
    assert st == replace(common, raw_state="SUCCEEDED", message="completed (dry run)")
    assert (st.state, st.exit_code) == (JobStatus.COMPLETED, 0)
    assert st.tasks is not None and len(st.tasks) == 10_000
    assert {(t.status, t.exit_code) for t in st.tasks} == {(TaskStatus.SUCCEEDED, 0)}
    assert dry.status([path])[path].tasks is st.tasks  # kept, not made again per poll
    other = DryProvider(StepClock())  # another worker's: knows the tasks from the path
    assert count(10_000, other.status([path])[path].tasks or ()).succeeded == 10_000
    assert dry.status([dry.submit(make_task(EXIT_0))]).popitem()[1].tasks is None
    bad = [f"dry://{task.provider_job_id}?tasks={n}" for n in ("1", "10001", "x", "")]
    assert {s.state for s in dry.status(bad).values()} == {None}

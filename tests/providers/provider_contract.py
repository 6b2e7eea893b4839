"""The batch provider contract (``providers/base.py``), written once, run against every
provider: local (real processes), the in-memory fake, and wire-level fakes of GCP, AWS
and Azure.

A backend's test module (``tests/providers/test_provider_<name>.py``) subclasses
:class:`ProviderContract` as a ``Test…`` class, sets ``kind`` to the provider's name in
``providers.PROVIDERS`` and overrides one fixture, ``harness``, returning an object that
satisfies :class:`ProviderHarness` (and cleaning up after itself). Every registered
provider must have such a run: :func:`contract_runs` finds them, and
``tests/providers/test_provider_settings.py`` fails for a registered name without one (only the
names in :data:`NOT_UNDER_CONTRACT` are exempt, each with its reason). Nothing here knows
about files, processes or clouds: only the ``BatchProvider`` methods and the harness are
used.

The contract's jobs are three shell commands, which every backend must give their
ordinary meaning (an in-memory fake interprets them, see ``providers/memory.py``):

* ``["sh", "-c", "exit 0"]``: ends COMPLETED with exit code 0;
* ``["sh", "-c", "exit 3"]``: ends FAILED, exit code 3, failure class ``user_error``;
* ``["sh", "-c", "sleep 60"]``: stays RUNNING until cancelled.

Jobs of several tasks (``spec.task_count`` > 1) use two more:

* ``["sh", "-c", '[ "$JENNAH_TASK_INDEX" != 1 ] || exit 4']``: task 1 fails with exit
  code 4 (``user_error``), the other tasks succeed;
* ``["sh", "-c", 'echo "task $JENNAH_TASK_INDEX of $JENNAH_TASK_COUNT"']``: each task
  prints its index and the count (read back when the provider supports output).

Class attributes a subclass may tune: ``state_timeout`` (seconds to reach a state) and
``cancel_timeout`` (seconds from ``cancel`` to CANCELLED; the acceptance in docs/design.md is 2 s).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import ClassVar, Protocol

import pytest

from jennah.models import FailureClass, JobSpec, JobStatus, TaskStatus
from jennah.registry import load
from jennah.tasks import count
from providers import PROVIDERS
from providers.base import BatchProvider, Capabilities, ProviderStatus, ProviderTask
from providers.base import provider_job_id as make_provider_job_id
from tests.helpers import RegisteredContract

EXIT_0 = ("sh", "-c", "exit 0")
EXIT_3 = ("sh", "-c", "exit 3")
SLEEP_60 = ("sh", "-c", "sleep 60")
# Jobs of several tasks (docs/design.md §16): task 1 fails with exit 4, the others succeed;
# each task prints its index and the count.
TASK_1_FAILS = ("sh", "-c", '[ "$JENNAH_TASK_INDEX" != 1 ] || exit 4')
ECHO_TASK = ("sh", "-c", 'echo "task $JENNAH_TASK_INDEX of $JENNAH_TASK_COUNT"')
IMAGE = "docker.io/library/busybox:1.36"


class ProviderHarness(Protocol):
    """What the contract needs from a backend's test set-up.

    * ``provider``: the provider under test, talking to a fresh backend (empty of jobs).
    * ``advance()``: let a little time pass. A real backend sleeps briefly (the local
      harness sleeps 0.05 s); a stateful fake steps its state machine. The contract calls
      it between every two status polls, and never relies on how far one call goes.
    * ``executions(provider_job_id)``: how many times the *backend* actually started that
      execution, counted on the backend's side (the fake's own record, the local runner's
      ``executions`` file, the cloud fake's create calls that made a job). Idempotency
      tests assert it is exactly 1 after several submits.
    * ``unknown_path()``: a well-formed resource path of a job the backend never had.

    Optional attribute: ``supports_long_running: bool`` (default True). A backend whose
    jobs cannot stay RUNNING (moto's Batch jumps to SUCCEEDED) sets it False, and the
    tests that need a running job are skipped for it.
    """

    @property
    def provider(self) -> BatchProvider: ...

    def advance(self) -> None: ...

    def executions(self, provider_job_id: str) -> int: ...

    def unknown_path(self) -> str: ...


def make_task(
    commands: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    attempt: int = 0,
) -> ProviderTask:
    """A task with a fresh job id and its deterministic provider job id."""
    job_id = str(uuid.uuid4())
    spec = JobSpec(image_uri=IMAGE, commands=tuple(commands), env_vars=dict(env or {}),
                   labels=dict(labels or {}))
    return ProviderTask(make_provider_job_id(job_id, attempt), job_id, "tenant-a", attempt, spec)


def wait_for_state(
    harness: ProviderHarness, path: str, states: Collection[JobStatus], timeout: float = 10.0
) -> ProviderStatus:
    """Advance and poll ``path`` until its state is one of ``states``; fail with the
    states seen otherwise."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        st = harness.provider.status([path])[path]
        if not seen or seen[-1] != st.raw_state:
            seen.append(st.raw_state)
        if st.state in states:
            return st
        if time.monotonic() > deadline:
            wanted = sorted(s.value for s in states)
            raise AssertionError(f"{path}: not in {wanted} after {timeout}s; saw {seen}")
        harness.advance()


# Registered providers that cannot pass the contract, and why (nothing else may skip it).
NOT_UNDER_CONTRACT: Mapping[str, str] = {
    "dry": "completes every job at once whatever it runs (benchmarks); tested in "
           "tests/providers/test_provider_memory.py",
}


class ProviderContract(RegisteredContract):
    """The tests every provider must pass. Subclasses set ``kind`` (the provider's name in
    ``providers.PROVIDERS``) and override the ``harness`` fixture."""

    registry = PROVIDERS
    registry_name = "providers.PROVIDERS"
    state_timeout: ClassVar[float] = 10.0
    cancel_timeout: ClassVar[float] = 2.0

    @pytest.fixture
    def harness(self) -> ProviderHarness:
        raise NotImplementedError("a provider test module must override the harness fixture")

    def task(self, commands: Sequence[str]) -> ProviderTask:
        """The task the tests submit; a backend may override it to add what it needs."""
        return make_task(commands)

    def array_task(
        self, commands: Sequence[str], task_count: int, parallelism: int = 0
    ) -> ProviderTask:
        """A job of ``task_count`` tasks, at most ``parallelism`` at a time."""
        task = self.task(commands)
        spec = replace(task.spec, task_count=task_count, parallelism=parallelism)
        return replace(task, spec=spec)

    def wait(self, h: ProviderHarness, path: str, *states: JobStatus) -> ProviderStatus:
        return wait_for_state(h, path, states, self.state_timeout)

    def running_path(self, h: ProviderHarness) -> str:
        if not getattr(h, "supports_long_running", True):
            pytest.skip("this backend cannot keep a job running")
        path = h.provider.submit(self.task(SLEEP_60))
        self.wait(h, path, JobStatus.RUNNING)
        return path

    # --- registration -------------------------------------------------------------------

    def test_it_is_the_registered_provider(self, harness: ProviderHarness) -> None:
        registered = load(PROVIDERS, self.kind, "BATCH_PROVIDER")
        assert isinstance(harness.provider, registered)
        assert harness.provider.name == self.kind

    # --- declared capabilities ----------------------------------------------------------

    def test_capabilities_are_declared(self, harness: ProviderHarness) -> None:
        p = harness.provider
        assert isinstance(p.name, str) and p.name
        caps = p.capabilities
        assert isinstance(caps, Capabilities)
        assert caps.max_status_batch >= 1
        assert caps.poll_interval_seconds > 0
        if caps.supports_output:
            assert callable(getattr(p, "read_output", None))

    # --- outcomes -----------------------------------------------------------------------

    def test_exit_zero_completes_with_timestamps(self, harness: ProviderHarness) -> None:
        task = self.task(EXIT_0)
        path = harness.provider.submit(task)
        assert isinstance(path, str) and path
        st = self.wait(harness, path, JobStatus.COMPLETED, JobStatus.FAILED)
        assert st.state is JobStatus.COMPLETED, st
        assert st.exit_code == 0
        assert st.failure_class is None
        assert st.started_at is not None and st.completed_at is not None
        assert st.started_at.tzinfo is not None
        assert st.started_at <= st.completed_at
        assert harness.executions(task.provider_job_id) == 1

    def test_nonzero_exit_fails_as_user_error(self, harness: ProviderHarness) -> None:
        path = harness.provider.submit(self.task(EXIT_3))
        st = self.wait(harness, path, JobStatus.COMPLETED, JobStatus.FAILED)
        assert st.state is JobStatus.FAILED, st
        assert st.exit_code == 3
        assert st.failure_class is FailureClass.USER_ERROR
        assert st.completed_at is not None

    # --- idempotent submit --------------------------------------------------------------

    def test_submit_twice_adopts_the_same_execution(self, harness: ProviderHarness) -> None:
        task = self.task(EXIT_0)
        first = harness.provider.submit(task)
        second = harness.provider.submit(task)
        assert first == second
        self.wait(harness, first, JobStatus.COMPLETED)
        assert harness.provider.submit(task) == first  # also after it finished
        harness.advance()
        assert harness.executions(task.provider_job_id) == 1

    def test_concurrent_submits_start_one_execution(self, harness: ProviderHarness) -> None:
        task = self.task(EXIT_0)
        n = 4
        barrier = threading.Barrier(n)
        paths: list[str] = []
        errors: list[BaseException] = []

        def body() -> None:
            try:
                barrier.wait(timeout=10)
                paths.append(harness.provider.submit(task))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=body) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        assert len(paths) == n and len(set(paths)) == 1
        self.wait(harness, paths[0], JobStatus.COMPLETED)
        assert harness.executions(task.provider_job_id) == 1

    # --- status -------------------------------------------------------------------------

    def test_status_of_many_paths_including_an_unknown_one(
        self, harness: ProviderHarness
    ) -> None:
        p = harness.provider
        ok, bad, ok2 = (p.submit(self.task(c)) for c in (EXIT_0, EXIT_3, EXIT_0))
        unknown = harness.unknown_path()
        asked = [ok, bad, unknown, ok2]
        first = p.status(asked)
        assert set(first) == set(asked)
        assert first[unknown].state is None
        for path in (ok, bad, ok2):
            self.wait(harness, path, JobStatus.COMPLETED, JobStatus.FAILED)
        final = p.status(asked)
        assert set(final) == set(asked)
        assert final[ok].state is final[ok2].state is JobStatus.COMPLETED
        assert (final[bad].state, final[bad].exit_code) == (JobStatus.FAILED, 3)
        assert final[unknown].state is None

    def test_status_of_no_paths_is_empty(self, harness: ProviderHarness) -> None:
        assert harness.provider.status([]) == {}

    def test_state_never_goes_backwards(self, harness: ProviderHarness) -> None:
        path = harness.provider.submit(self.task(EXIT_3))
        seen: list[ProviderStatus] = []
        deadline = time.monotonic() + self.state_timeout
        while not (seen and seen[-1].state is not None and seen[-1].state.terminal):
            assert time.monotonic() < deadline, [s.raw_state for s in seen]
            seen.append(harness.provider.status([path])[path])
            harness.advance()
        for _ in range(5):
            seen.append(harness.provider.status([path])[path])
            harness.advance()
        ranks = [s.state.rank for s in seen if s.state is not None]
        assert ranks == sorted(ranks), [s.raw_state for s in seen]
        terminal = [(s.state, s.exit_code, s.failure_class) for s in seen if s.state
                    and s.state.terminal]
        assert set(terminal) == {(JobStatus.FAILED, 3, FailureClass.USER_ERROR)}

    # --- cancel -------------------------------------------------------------------------

    def test_cancel_running_job(self, harness: ProviderHarness) -> None:
        path = self.running_path(harness)
        started = time.monotonic()
        harness.provider.cancel(path)
        st = wait_for_state(harness, path, {JobStatus.CANCELLED}, self.cancel_timeout)
        assert time.monotonic() - started < self.cancel_timeout
        assert st.completed_at is not None

    def test_cancel_twice_is_not_an_error(self, harness: ProviderHarness) -> None:
        path = self.running_path(harness)
        harness.provider.cancel(path)
        harness.provider.cancel(path)
        self.wait(harness, path, JobStatus.CANCELLED)
        harness.provider.cancel(path)
        harness.advance()
        assert harness.provider.status([path])[path].state is JobStatus.CANCELLED

    def test_cancel_of_unknown_job_is_not_an_error(self, harness: ProviderHarness) -> None:
        unknown = harness.unknown_path()
        harness.provider.cancel(unknown)
        assert harness.provider.status([unknown])[unknown].state is None

    def test_cancel_of_finished_job_changes_nothing(self, harness: ProviderHarness) -> None:
        p = harness.provider
        ok, bad = p.submit(self.task(EXIT_0)), p.submit(self.task(EXIT_3))
        before = {path: self.wait(harness, path, JobStatus.COMPLETED, JobStatus.FAILED)
                  for path in (ok, bad)}
        for path in (ok, bad):
            p.cancel(path)
        harness.advance()
        after = p.status([ok, bad])
        for path in (ok, bad):
            assert (after[path].state, after[path].exit_code) == (
                before[path].state, before[path].exit_code)
        assert after[ok].state is JobStatus.COMPLETED
        assert after[bad].state is JobStatus.FAILED


    # --- jobs of several tasks (docs/design.md §16) --------------------------------------

    def test_a_plain_job_reports_no_tasks(self, harness: ProviderHarness) -> None:
        path = harness.provider.submit(self.task(EXIT_0))
        st = self.wait(harness, path, JobStatus.COMPLETED)
        assert st.tasks is None

    def test_capabilities_declare_tasks(self, harness: ProviderHarness) -> None:
        caps = harness.provider.capabilities
        assert 1 <= caps.max_task_count <= 10_000
        assert caps.tasks_per_call is None or caps.tasks_per_call >= 1

    def test_every_task_succeeds_and_the_job_completes(self, harness: ProviderHarness) -> None:
        task = self.array_task(EXIT_0, 3)
        path = harness.provider.submit(task)
        st = self.wait(harness, path, JobStatus.COMPLETED, JobStatus.FAILED)
        assert st.state is JobStatus.COMPLETED, st
        assert st.exit_code == 0
        assert st.tasks is not None
        assert [(t.index, t.status, t.exit_code) for t in st.tasks] == [
            (i, TaskStatus.SUCCEEDED, 0) for i in range(3)]
        assert all(t.completed_at is not None for t in st.tasks)
        assert st.started_at is not None and st.completed_at is not None
        assert harness.executions(task.provider_job_id) == 1

    def test_one_failed_task_fails_the_job_once_all_ended(
        self, harness: ProviderHarness
    ) -> None:
        path = harness.provider.submit(self.array_task(TASK_1_FAILS, 3))
        st = self.wait(harness, path, JobStatus.COMPLETED, JobStatus.FAILED)
        assert st.state is JobStatus.FAILED, st
        assert st.tasks is not None
        by_index = {t.index: t for t in st.tasks}
        assert by_index[1].status is TaskStatus.FAILED
        assert by_index[1].exit_code == 4
        assert by_index[1].failure_class is FailureClass.USER_ERROR
        assert {by_index[i].status for i in (0, 2)} == {TaskStatus.SUCCEEDED}
        assert st.exit_code == 4
        assert st.failure_class is FailureClass.USER_ERROR
        assert st.message.startswith("task 1 failed: exit code 4"), st.message
        assert count(3, st.tasks).failed == 1

    def test_submit_of_several_tasks_is_idempotent(self, harness: ProviderHarness) -> None:
        task = self.array_task(EXIT_0, 2)
        first = harness.provider.submit(task)
        assert harness.provider.submit(task) == first
        self.wait(harness, first, JobStatus.COMPLETED)
        assert harness.provider.submit(task) == first
        assert harness.executions(task.provider_job_id) == 1

    def test_cancel_stops_every_task(self, harness: ProviderHarness) -> None:
        if not getattr(harness, "supports_long_running", True):
            pytest.skip("this backend cannot keep a job running")
        path = harness.provider.submit(self.array_task(SLEEP_60, 3))
        self.wait(harness, path, JobStatus.RUNNING)
        harness.provider.cancel(path)
        st = wait_for_state(harness, path, {JobStatus.CANCELLED}, self.cancel_timeout + 5)
        assert st.tasks is not None
        assert not [t for t in st.tasks if not t.status.terminal]

    def test_parallelism_bounds_the_running_tasks(self, harness: ProviderHarness) -> None:
        if not harness.provider.capabilities.parallelism:
            pytest.skip("this provider cannot limit parallelism (check_spec refuses it)")
        if not getattr(harness, "supports_long_running", True):
            pytest.skip("this backend cannot keep a job running")
        path = harness.provider.submit(self.array_task(SLEEP_60, 4, parallelism=2))
        self.wait(harness, path, JobStatus.RUNNING)
        most = 0
        for _ in range(10):
            st = harness.provider.status([path])[path]
            assert st.tasks is not None
            running = count(4, st.tasks).running
            most = max(most, running)
            assert running <= 2, st.tasks
            harness.advance()
        assert most >= 1
        harness.provider.cancel(path)
        self.wait(harness, path, JobStatus.CANCELLED)

    def test_each_task_sees_its_index_and_has_its_own_output(
        self, harness: ProviderHarness
    ) -> None:
        p = harness.provider
        if not p.capabilities.supports_output:
            pytest.skip("this provider does not return output")
        path = p.submit(self.array_task(ECHO_TASK, 3))
        self.wait(harness, path, JobStatus.COMPLETED)
        read = p.read_output  # type: ignore[attr-defined]
        deadline = time.monotonic() + self.state_timeout
        for i in range(3):
            text = ""
            while f"task {i} of 3" not in text:
                assert time.monotonic() < deadline, (i, text)
                text += read(path, (0, 0), task_index=i).stdout
                if f"task {i} of 3" not in text:
                    text = ""
                    harness.advance()
            assert text.strip() == f"task {i} of 3"


def contract_runs() -> dict[str, list[type[RegisteredContract]]]:
    """The contract's ``Test…`` subclasses beside this module (``test_provider_*.py``), by
    ``kind``."""
    return ProviderContract.runs(__package__ or "", "test_provider_*.py")

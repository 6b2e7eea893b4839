"""Jobs of several tasks in the worker (docs/design.md §16): validation, the job's status and
events from its tasks, no whole-job retry, cancel of every task, output per task and
ListTasks paging. In-memory store, and a scripted provider that reports task states."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import timedelta

import pytest

from jennah.errors import InvalidArgument, NotFound
from jennah.models import (
    EventKind,
    FailureClass,
    JobEvent,
    JobFilter,
    JobSpec,
    JobStatus,
    ResourceOverride,
    TaskState,
    TaskStatus,
)
from jennah.tasks import job_task_counts
from providers.base import Capabilities, OutputChunk, check_spec
from providers.tasks import status_from_tasks
from tests.worker.test_worker_jobs import T0, Env, ScriptedProvider, run
from worker.commit import GroupCommitter
from worker.jobs import decode_task_token, encode_task_token
from worker.store_events import StoreExecutionLog
from worker.validation import validate_spec

ARRAY = JobSpec(image_uri="busybox", commands=("true",), task_count=3)


@pytest.fixture
def env() -> Env:
    return Env()


def running(i: int) -> TaskState:
    return TaskState(i, TaskStatus.RUNNING, started_at=T0)


def ok(i: int) -> TaskState:
    return TaskState(i, TaskStatus.SUCCEEDED, exit_code=0, started_at=T0,
                     completed_at=T0 + timedelta(seconds=1))


def failed(i: int, code: int = 4, attempt: int = 0,
           fc: FailureClass = FailureClass.USER_ERROR) -> TaskState:
    return TaskState(i, TaskStatus.FAILED, exit_code=code, attempt=attempt, started_at=T0,
                     completed_at=T0 + timedelta(seconds=2), failure_class=fc)


def report(env: Env, path: str, count: int, *tasks: TaskState) -> None:
    env.provider.states[path] = status_from_tasks(count, tasks, raw_state="RUNNING")


# --- validation ---------------------------------------------------------------------------


def _spec(**kw: object) -> JobSpec:
    base: dict[str, object] = dict(
        image_uri="busybox", commands=["true"], env_vars={}, name="", labels={},
        resource_profile="", override=ResourceOverride(), machine_type="",
        boot_disk_size_gb=0, use_spot_vms=False, service_account="", max_retries=0)
    return validate_spec(**{**base, **kw})  # type: ignore[arg-type]


def test_task_count_and_parallelism_are_checked_before_anything_is_stored() -> None:
    assert (_spec().task_count, _spec(task_count=0).task_count) == (1, 1)
    assert _spec(task_count=10_000, parallelism=10_000).task_count == 10_000
    for kw, text in (({"task_count": 10_001}, "task_count=10001 is out of range 0..10000"),
                     ({"task_count": -1}, "task_count=-1"),
                     ({"task_count": 5, "parallelism": 6}, "at most task_count"),
                     ({"parallelism": -1}, "parallelism=-1"),
                     ({"env_vars": {"JENNAH_TASK_INDEX": "3"}}, "set by Jennah")):
        with pytest.raises(InvalidArgument, match=text):
            _spec(**kw)


def test_a_provider_refuses_what_it_cannot_honour() -> None:
    plain = Capabilities(max_task_count=1)
    no_parallelism = Capabilities(parallelism=False)
    with pytest.raises(InvalidArgument, match="takes at most 1"):
        check_spec("p", plain, dataclasses.replace(ARRAY, task_count=2))
    with pytest.raises(InvalidArgument, match="cannot limit how many tasks"):
        check_spec("p", no_parallelism, dataclasses.replace(ARRAY, parallelism=2))
    check_spec("p", no_parallelism, dataclasses.replace(ARRAY, parallelism=3))  # no limit


def test_a_refused_submit_stores_nothing(env: Env) -> None:
    env.provider.capabilities = Capabilities(max_task_count=2)  # type: ignore[misc]
    with pytest.raises(InvalidArgument):
        run(env.jobs.submit("acme", ARRAY, "r1"))
    assert env.store.list_jobs("acme", JobFilter(), 10, "").jobs == []


# --- status and events from the tasks ----------------------------------------------------


def test_the_job_follows_its_tasks_and_names_the_first_that_failed(env: Env) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", ARRAY, "")
        assert job_task_counts(job).pending == 3
        path = job.cloud_resource_path
        report(env, path, 3, running(0))
        await env.poller.cycle()
        job = env.store.get_job("acme", job.job_id)
        assert job.status is JobStatus.RUNNING
        assert job_task_counts(job) == dataclasses.replace(job_task_counts(job), running=1,
                                                           pending=2)
        # Task 1 fails while the others still run: the job keeps running, the failure is
        # a STATUS_DETAIL of task 1, and the task states are stored.
        report(env, path, 3, running(0), failed(1), running(2))
        await env.poller.cycle()
        await env.poller.cycle()  # the same report again: nothing new
        job = env.store.get_job("acme", job.job_id)
        assert job.status is JobStatus.RUNNING
        assert job_task_counts(job).failed == 1
        details = [e for e in env.store.list_events("acme", job.job_id, 0, 100)
                   if e.kind is EventKind.STATUS_DETAIL]
        assert [(e.task_index, e.message) for e in details] == [
            (1, "task 1 failed: exit code 4 (user_error)")]
        report(env, path, 3, ok(0), failed(1), ok(2))
        await env.poller.cycle()
        job = env.store.get_job("acme", job.job_id)
        assert job.status is JobStatus.FAILED
        assert (job.exit_code, job.failure_class) == (4, FailureClass.USER_ERROR)
        assert job.error_message == "task 1 failed: exit code 4"
        counts = job_task_counts(job)
        assert (counts.succeeded, counts.failed, counts.pending) == (2, 1, 0)
        events = env.store.list_events("acme", job.job_id, 0, 100)
        assert [e.kind for e in events] == [
            EventKind.SUBMITTED, EventKind.SCHEDULED, EventKind.RUNNING,
            EventKind.STATUS_DETAIL, EventKind.FAILED]
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]

    run(go())


def test_a_job_of_several_tasks_is_never_resubmitted_whole(env: Env) -> None:
    spec = dataclasses.replace(ARRAY, max_retries=3)

    async def go() -> None:
        job = await env.jobs.submit("acme", spec, "")
        report(env, job.cloud_resource_path, 3, ok(0),
               failed(1, 50001, attempt=3, fc=FailureClass.PREEMPTED), ok(2))
        await env.poller.cycle()
        job = env.store.get_job("acme", job.job_id)
        assert job.status is JobStatus.FAILED and job.attempt == 0
        assert job.failure_class is FailureClass.PREEMPTED
        assert EventKind.RETRY not in env.kinds(job)
        assert sum(env.provider.executions.values()) == 1

    run(go())


def test_a_task_retried_by_the_provider_is_reported_once(env: Env) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", ARRAY, "")
        path = job.cloud_resource_path
        report(env, path, 3, running(0), dataclasses.replace(running(1), attempt=1))
        for _ in range(3):
            await env.poller.cycle()
        report(env, path, 3, ok(0), dataclasses.replace(ok(1), attempt=1), ok(2))
        await env.poller.cycle()
        job = env.store.get_job("acme", job.job_id)
        assert job.status is JobStatus.COMPLETED and job.exit_code == 0
        details = [(e.task_index, e.message) for e in
                   env.store.list_events("acme", job.job_id, 0, 100)
                   if e.kind is EventKind.STATUS_DETAIL]
        assert details == [(1, "task 1 retried by the provider: attempt 1")]
        task1 = next(t for t in job.tasks if t.index == 1)
        assert task1.attempt == 1

    run(go())


def test_cancel_records_every_unfinished_task_cancelled(env: Env) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", dataclasses.replace(ARRAY, task_count=4), "")
        report(env, job.cloud_resource_path, 4, ok(0), running(1))
        await env.poller.cycle()
        job = await env.jobs.cancel("acme", job.job_id)
        assert job.status is JobStatus.CANCELLED
        assert env.provider.cancelled == [job.cloud_resource_path]
        assert [t.status for t in job.tasks] == [TaskStatus.SUCCEEDED] + [
            TaskStatus.CANCELLED] * 3
        counts = job_task_counts(job)
        assert (counts.succeeded, counts.cancelled, counts.pending, counts.running) == (
            1, 3, 0, 0)

    run(go())


# --- output, task by task -----------------------------------------------------------------


class TaskOutputProvider(ScriptedProvider):
    """Each task printed ``task <i>`` lines; counts reads per task."""

    capabilities = Capabilities(max_status_batch=10, poll_interval_seconds=0.01,
                                supports_output=True)

    def __init__(self) -> None:
        super().__init__()
        self.out: dict[int, bytes] = {}
        self.reads: dict[int, int] = {}

    def read_output(self, resource_path: str, offsets: tuple[int, int],
                    task_index: int = 0) -> OutputChunk:
        self.reads[task_index] = self.reads.get(task_index, 0) + 1
        data = self.out.get(task_index, b"")[offsets[0]:]
        return OutputChunk(stdout=data.decode(), offsets=(offsets[0] + len(data), offsets[1]))


def test_each_task_has_its_own_output_read_to_its_end_once(env: Env) -> None:
    provider = TaskOutputProvider()
    w1 = env.owner("w1", provider=provider)

    async def go() -> None:
        job = await w1.jobs.submit("acme", ARRAY, "")
        path = job.cloud_resource_path
        provider.out = {0: b"zero\n", 1: b"one\n"}
        provider.states[path] = status_from_tasks(3, (ok(0), running(1)))
        await w1.poller.cycle()
        reads_of_0 = provider.reads[0]
        provider.out[1] += b"one again\n"
        provider.out[2] = b"two\n"
        provider.states[path] = status_from_tasks(3, (ok(0), ok(1), ok(2)))
        await w1.poller.cycle()
        events = env.store.list_events("acme", job.job_id, 0, 100)
        out = [(e.task_index, e.output) for e in events if e.kind is EventKind.OUTPUT]
        assert sorted(out, key=lambda x: (x[0] or 0)) == [
            (0, "zero\n"), (1, "one\n"), (1, "one again\n"), (2, "two\n")]
        assert events[-1].kind is EventKind.COMPLETED
        assert provider.reads[0] == reads_of_0  # read to its end in the first cycle: done

    run(go())


class CountingLog(StoreExecutionLog):
    """The store-backed execution log, counting its appends (each one a durable write)."""

    def __init__(self, committer: GroupCommitter) -> None:
        super().__init__(committer)
        self.appends: list[int] = []

    async def append(self, events: Sequence[JobEvent]) -> None:
        self.appends.append(len(events))
        await super().append(events)


def test_the_output_of_many_short_tasks_is_made_durable_in_few_appends(env: Env) -> None:
    provider = TaskOutputProvider()
    w1 = env.owner("w1", provider=provider, log=CountingLog)
    n = 1_200

    async def go() -> None:
        job = await w1.jobs.submit("acme", dataclasses.replace(ARRAY, task_count=n), "")
        provider.out = {i: f"out {i}\n".encode() for i in range(n)}
        provider.states[job.cloud_resource_path] = status_from_tasks(
            n, [ok(i) for i in range(n)])
        await w1.poller.cycle()
        events = env.store.list_events("acme", job.job_id, 0, 2 * n)
        assert sorted(e.task_index or 0 for e in events if e.kind is EventKind.OUTPUT) == \
            list(range(n))
        assert events[-1].kind is EventKind.COMPLETED

    run(go())
    log = w1.events
    assert isinstance(log, CountingLog)
    output_appends = [k for k in log.appends if k > 1]
    assert sum(output_appends) == n and len(output_appends) <= 3, log.appends


# --- ListTasks ------------------------------------------------------------------------------


def test_list_tasks_pages_by_index_filters_and_hides_other_tenants(env: Env) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", dataclasses.replace(ARRAY, task_count=5), "")
        report(env, job.cloud_resource_path, 5, ok(0), failed(2), running(3))
        await env.poller.cycle()
        page, token = await env.jobs.list_tasks("acme", job.job_id, None, 2, "")
        assert [(t.index, t.status) for t in page] == [(0, TaskStatus.SUCCEEDED),
                                                      (1, TaskStatus.PENDING)]
        page, token = await env.jobs.list_tasks("acme", job.job_id, None, 2, token)
        assert [t.index for t in page] == [2, 3] and token
        page, token = await env.jobs.list_tasks("acme", job.job_id, None, 2, token)
        assert [t.index for t in page] == [4] and token == ""
        failed_only, _ = await env.jobs.list_tasks("acme", job.job_id, TaskStatus.FAILED, 10,
                                                   "")
        assert [(t.index, t.exit_code) for t in failed_only] == [(2, 4)]
        with pytest.raises(NotFound):
            await env.jobs.list_tasks("beta", job.job_id, None, 10, "")
        # A plain job has one task: itself.
        plain = await env.jobs.submit("acme", dataclasses.replace(ARRAY, task_count=1), "")
        one, _ = await env.jobs.list_tasks("acme", plain.job_id, None, 10, "")
        assert [(t.index, t.status) for t in one] == [(0, TaskStatus.PENDING)]

    run(go())


@pytest.mark.parametrize("token", ["x", "dGFzazp4", "am9iOjM", "dGFzazotMQ", "\x00"])
def test_a_bad_page_token_is_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        decode_task_token(token)


def test_page_tokens_round_trip() -> None:
    assert [decode_task_token(encode_task_token(i)) for i in (0, 1, 9_999)] == [0, 1, 9_999]

"""JobService and Poller rules (DESIGN §3, §4), on the in-memory store and a scripted
provider whose answers each test sets explicitly."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from database.memory import MemoryStore
from jennah.errors import (
    FailedPrecondition,
    LeaseLost,
    NotFound,
    ProviderRejected,
    ProviderUnavailable,
)
from jennah.models import EventKind, FailureClass, Job, JobSpec, JobStatus
from providers.base import Capabilities, ProviderStatus, ProviderTask, provider_job_id
from worker.jobs import JobService
from worker.poller import Poller
from worker.store_events import StoreEventLog

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += timedelta(seconds=seconds)


class ScriptedProvider:
    """A provider whose every answer is set by the test. Counts real executions."""

    name = "scripted"
    capabilities = Capabilities(max_status_batch=2, poll_interval_seconds=0.01)

    def __init__(self) -> None:
        self.executions: dict[str, int] = {}
        self.states: dict[str, ProviderStatus] = {}
        self.cancelled: list[str] = []
        self.submit_errors: list[Exception] = []
        self.status_calls = 0

    def submit(self, task: ProviderTask) -> str:
        if self.submit_errors:
            raise self.submit_errors.pop(0)
        path = f"scripted/{task.provider_job_id}"
        if path not in self.states:  # "already exists" is adopted, not run again
            self.executions[task.provider_job_id] = self.executions.get(task.provider_job_id, 0) + 1
            self.states[path] = ProviderStatus(JobStatus.SCHEDULED, "QUEUED")
        return path

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        self.status_calls += 1
        assert len(resource_paths) <= self.capabilities.max_status_batch
        return {p: self.states.get(p, ProviderStatus(None, "UNKNOWN")) for p in resource_paths}

    def cancel(self, resource_path: str) -> None:
        self.cancelled.append(resource_path)
        self.states[resource_path] = ProviderStatus(JobStatus.CANCELLED, "CANCELLED")

    def close(self) -> None:
        pass


class Env:
    def __init__(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(clock=self.clock)
        self.provider = ScriptedProvider()
        ids = (f"00000000-0000-4000-8000-{n:012d}" for n in itertools.count(1))
        self.jobs = self.service("w1", lambda: next(ids))
        self.poller = Poller(self.jobs, 0.01)

    def service(self, worker_id: str, new_id: object = None) -> JobService:
        kwargs = {"new_id": new_id} if new_id else {}
        return JobService(
            self.store, self.provider, StoreEventLog(self.store, worker_id, self.clock),
            worker_id=worker_id, lease_ttl=30, clock=self.clock, **kwargs,  # type: ignore[arg-type]
        )

    def kinds(self, job: Job) -> list[EventKind]:
        return [e.kind for e in self.store.list_events(job.tenant_id, job.job_id, 0, 100)]

    def set(self, job: Job, status: ProviderStatus) -> None:
        self.provider.states[job.cloud_resource_path] = status


SPEC = JobSpec(image_uri="busybox", commands=("true",))


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture
def env() -> Env:
    return Env()


def test_submit_records_then_schedules_under_a_deterministic_id(env: Env) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", SPEC, "")
        assert job.status is JobStatus.SCHEDULED
        assert job.provider_job_id == provider_job_id(job.job_id, 0)
        assert job.cloud_resource_path == f"scripted/{job.provider_job_id}"
        assert job.scheduled_at == T0 and job.owner_worker_id == "w1" and job.lease_version == 1
        assert env.kinds(job) == [EventKind.SUBMITTED, EventKind.SCHEDULED]
        events = env.store.list_events("acme", job.job_id, 0, 10)
        assert [e.seq for e in events] == [1, 2]
        transitions = env.store.list_transitions("acme", job.job_id)
        assert [(t.from_status, t.to_status) for t in transitions] == [
            (None, JobStatus.PENDING), (JobStatus.PENDING, JobStatus.SCHEDULED)]

    run(go())


def test_request_id_returns_the_same_job_and_submits_once(env: Env) -> None:
    async def go() -> None:
        a = await env.jobs.submit("acme", SPEC, "r-1")
        b = await env.jobs.submit("acme", SPEC, "r-1")
        c = await env.jobs.submit("other", SPEC, "r-1")
        assert a.job_id == b.job_id != c.job_id
        assert env.provider.executions == {a.provider_job_id: 1, c.provider_job_id: 1}

    run(go())


def test_poller_moves_forward_only_and_sets_timestamps(env: Env) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", SPEC, "")
        started, ended = T0 + timedelta(seconds=3), T0 + timedelta(seconds=9)
        env.set(job, ProviderStatus(JobStatus.RUNNING, "RUNNING", started_at=started))
        await env.poller.cycle()
        job = env.store.get_job("acme", job.job_id)
        assert job.status is JobStatus.RUNNING and job.started_at == started
        for stale in (ProviderStatus(JobStatus.SCHEDULED, "QUEUED"), ProviderStatus(None, "?")):
            env.set(job, stale)
            await env.poller.cycle()
            assert env.store.get_job("acme", job.job_id).status is JobStatus.RUNNING
        env.set(job, ProviderStatus(JobStatus.COMPLETED, "SUCCEEDED", exit_code=0,
                                    started_at=started, completed_at=ended))
        await env.poller.cycle()
        job = env.store.get_job("acme", job.job_id)
        assert (job.status, job.exit_code, job.completed_at) == (JobStatus.COMPLETED, 0, ended)
        env.set(job, ProviderStatus(JobStatus.FAILED, "FAILED", exit_code=1))
        await env.poller.cycle()  # terminal never changes, and is no longer polled
        assert env.store.get_job("acme", job.job_id).status is JobStatus.COMPLETED
        assert env.kinds(job)[-4:] == [EventKind.RUNNING, EventKind.STATUS_DETAIL,
                                       EventKind.STATUS_DETAIL, EventKind.COMPLETED]

    run(go())


def test_completion_seen_without_running_still_sets_started_at(env: Env) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", SPEC, "")
        s, e = T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)
        env.set(job, ProviderStatus(JobStatus.FAILED, "FAILED", exit_code=3,
                                    failure_class=FailureClass.USER_ERROR,
                                    started_at=s, completed_at=e))
        await env.poller.cycle()
        job = env.store.get_job("acme", job.job_id)
        assert (job.status, job.exit_code, job.failure_class) == (
            JobStatus.FAILED, 3, FailureClass.USER_ERROR)
        assert (job.started_at, job.completed_at) == (s, e)

    run(go())


@pytest.mark.parametrize(
    ("failure", "retried"),
    [(FailureClass.PREEMPTED, True), (FailureClass.INFRASTRUCTURE, True),
     (FailureClass.USER_ERROR, False), (FailureClass.QUOTA, False), (FailureClass.TIMEOUT, False)],
)
def test_retries_only_preempted_and_infrastructure(
    env: Env, failure: FailureClass, retried: bool
) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", JobSpec(image_uri="busybox", max_retries=1), "")
        env.set(job, ProviderStatus(JobStatus.FAILED, "FAILED", failure_class=failure))
        await env.poller.cycle()
        after = env.store.get_job("acme", job.job_id)
        if retried:
            assert after.attempt == 1 and after.status is JobStatus.SCHEDULED
            assert after.provider_job_id == provider_job_id(job.job_id, 1)
            assert EventKind.RETRY in env.kinds(job)
            # The retry budget is spent: a second preemption fails the job.
            env.set(after, ProviderStatus(JobStatus.FAILED, "FAILED", failure_class=failure))
            await env.poller.cycle()
            assert env.store.get_job("acme", job.job_id).status is JobStatus.FAILED
        else:
            assert after.attempt == 0 and after.status is JobStatus.FAILED
            assert after.failure_class is failure

    run(go())


def test_a_job_never_submitted_is_submitted_by_the_poller_exactly_once(env: Env) -> None:
    async def go() -> None:
        env.provider.submit_errors.append(ProviderUnavailable("throttled"))
        job = await env.jobs.submit("acme", SPEC, "")
        assert job.status is JobStatus.PENDING and not job.cloud_resource_path
        await env.poller.cycle()
        job = env.store.get_job("acme", job.job_id)
        assert job.status is JobStatus.SCHEDULED
        # A crash after the provider accepted but before we recorded it: resubmitting
        # under the same id adopts the execution instead of running it twice.
        await env.jobs.start_execution(job)
        assert env.provider.executions == {job.provider_job_id: 1}

    run(go())


def test_a_rejected_job_fails_as_user_error(env: Env) -> None:
    async def go() -> None:
        env.provider.submit_errors.append(ProviderRejected("image not allowed"))
        job = await env.jobs.submit("acme", SPEC, "")
        assert job.status is JobStatus.FAILED
        assert job.failure_class is FailureClass.USER_ERROR
        assert "image not allowed" in job.error_message

    run(go())


def test_cancel_by_owner_and_by_peer(env: Env) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", SPEC, "")
        done = await env.jobs.cancel("acme", job.job_id)
        assert done.status is JobStatus.CANCELLED and done.completed_at is not None
        assert env.provider.cancelled == [job.cloud_resource_path]
        with pytest.raises(FailedPrecondition):
            await env.jobs.cancel("acme", job.job_id)
        with pytest.raises(NotFound):
            await env.jobs.cancel("other", job.job_id)
        # A peer receiving CancelJob flags the job; the owner records it at its next poll.
        job2 = await env.jobs.submit("acme", SPEC, "")
        peer = env.service("w2")
        flagged = await peer.cancel("acme", job2.job_id)
        assert flagged.cancel_requested and flagged.status is JobStatus.SCHEDULED
        await env.poller.cycle()
        assert env.store.get_job("acme", job2.job_id).status is JobStatus.CANCELLED

    run(go())


def test_a_stale_owner_stops_touching_a_claimed_job(env: Env) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", SPEC, "")
        env.store.release_leases([(job.job_id, job.lease)])
        claimed = env.store.claim_expired("w2", 30, 10)
        assert [j.job_id for j in claimed] == [job.job_id]
        assert claimed[0].lease_version == 2
        env.set(job, ProviderStatus(JobStatus.COMPLETED, "SUCCEEDED", exit_code=0))
        with pytest.raises(LeaseLost):
            await env.jobs.apply_status(job, env.provider.states[job.cloud_resource_path])
        await env.poller.cycle()  # w1 owns nothing now
        assert env.store.get_job("acme", job.job_id).status is JobStatus.SCHEDULED
        peer = Poller(env.service("w2"), 0.01)
        await peer.cycle()
        done = env.store.get_job("acme", job.job_id)
        assert done.status is JobStatus.COMPLETED and done.owner_worker_id == "w2"
        seqs = [e.seq for e in env.store.list_events("acme", job.job_id, 0, 100)]
        assert seqs == sorted(seqs) and seqs[-1] > 1 << 32  # w2 numbers in its own block

    run(go())


def test_status_is_polled_in_provider_sized_batches(env: Env) -> None:
    async def go() -> None:
        for _ in range(5):
            await env.jobs.submit("acme", SPEC, "")
        await env.poller.cycle()
        assert env.provider.status_calls == 3  # 5 jobs, batches of 2

    run(go())


def test_provider_detail_without_a_status_change_is_a_status_detail_event(env: Env) -> None:
    async def go() -> None:
        job = await env.jobs.submit("acme", SPEC, "")
        await env.poller.cycle()  # QUEUED: first sight, nothing to report
        env.set(job, ProviderStatus(JobStatus.SCHEDULED, "SCHEDULED", message="vm booting"))
        await env.poller.cycle()
        env.set(job, ProviderStatus(JobStatus.RUNNING, "RUNNING"))
        await env.poller.cycle()
        events = env.store.list_events("acme", job.job_id, 0, 100)
        details = [e.message for e in events if e.kind is EventKind.STATUS_DETAIL]
        assert details == ["provider state QUEUED -> SCHEDULED: vm booting"]
        assert events[-1].kind is EventKind.RUNNING

    run(go())

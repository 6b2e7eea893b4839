"""JobService and Poller rules (docs/design.md §3, §4), on the in-memory store and a scripted
provider whose answers each test sets explicitly."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from database.base import UpdateJob, WriteOp, WriteResult
from database.memory import MemoryStore
from jennah.errors import (
    FailedPrecondition,
    InvalidArgument,
    LeaseLost,
    NotFound,
    ProviderRejected,
    ProviderUnavailable,
    StoreUnavailable,
)
from jennah.models import EventKind, FailureClass, Job, JobEvent, JobFilter, JobSpec, JobStatus
from providers.base import (
    Capabilities,
    OutputChunk,
    ProviderStatus,
    ProviderTask,
    provider_job_id,
)
from tests.helpers import Owner, owner
from worker import output as output_module
from worker.jobs import JobService
from worker.store_events import StoreExecutionLog
from worker.wal.format import WalError

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
        w1 = self.owner("w1", new_id=lambda: next(ids))
        self.jobs, self.poller = w1.jobs, w1.poller

    def owner(self, worker_id: str, store: MemoryStore | None = None, **kwargs: Any) -> Owner:
        """A worker's JobService and Poller on this env's store, provider and clock."""
        return owner(store or self.store, kwargs.pop("provider", self.provider), worker_id,
                     clock=self.clock, **kwargs)

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
        peer = env.owner("w2").jobs
        flagged = await peer.cancel("acme", job2.job_id)
        assert flagged.cancel_requested and flagged.status is JobStatus.SCHEDULED
        await env.poller.cycle()
        assert env.store.get_job("acme", job2.job_id).status is JobStatus.CANCELLED

    run(go())


def test_a_cancel_racing_the_poller_ends_the_job_once(env: Env) -> None:
    """CancelJob and the poller both end a job from the same copy (RUNNING): the first end
    stands, with its message and time, one CANCELLED event is stored, and it is counted
    once (``jennah_worker_job_events_total`` once counted two)."""
    counted: list[tuple[EventKind, int]] = []
    jobs = env.owner("w1", on_events=lambda kind, n: counted.append((kind, n))).jobs

    async def go() -> None:
        job = await jobs.submit("acme", SPEC, "")
        env.set(job, ProviderStatus(JobStatus.RUNNING, "RUNNING", started_at=T0))
        running = await jobs.mark_running(await jobs.get("acme", job.job_id),
                                          env.provider.states[job.cloud_resource_path])
        first = await jobs.finish_cancel(running)
        env.clock.tick()
        env.set(job, ProviderStatus(JobStatus.CANCELLED, "CANCELLED"))
        second = await jobs.apply_status(running, env.provider.states[job.cloud_resource_path])
        assert first.status is second.status is JobStatus.CANCELLED
        assert (second.error_message, second.completed_at) == (first.error_message,
                                                               first.completed_at)
        assert env.kinds(job).count(EventKind.CANCELLED) == 1
        assert counted.count((EventKind.CANCELLED, 1)) == 1, counted

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
        peer = env.owner("w2").poller
        await peer.cycle()
        done = env.store.get_job("acme", job.job_id)
        assert done.status is JobStatus.COMPLETED and done.owner_worker_id == "w2"
        events = env.store.list_events("acme", job.job_id, 0, 100)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))  # one numbering
        assert [(e.kind, e.worker_id) for e in events] == [
            (EventKind.SUBMITTED, "w1"), (EventKind.SCHEDULED, "w1"),
            (EventKind.LEASE_CLAIMED, "w2"), (EventKind.RUNNING, "w2"),
            (EventKind.COMPLETED, "w2")]  # the end came without a poll seeing it run

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


# --- v2: a submit always finishes; order of a job's events --------------------------------


class FlakyStore(MemoryStore):
    """A memory store whose next ``fail`` fenced updates fail as if the store were down."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.fail = 0

    def write_batch(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        if self.fail and any(isinstance(op, UpdateJob) for op in ops):
            self.fail -= 1
            raise StoreUnavailable("store down (test)")
        return super().write_batch(ops)


def test_a_stored_job_is_the_answer_even_if_scheduling_fails(env: Env) -> None:
    store = FlakyStore(env.clock)
    w1 = env.owner("w1", store)
    jobs = w1.jobs

    async def go() -> None:
        store.fail = 1
        job = await jobs.submit("acme", SPEC, "r-flaky")
        assert job.status is JobStatus.PENDING  # recorded; SCHEDULED could not be stored
        assert store.get_job("acme", job.job_id).status is JobStatus.PENDING
        await w1.poller.cycle()  # submits again under the same provider id
        after = store.get_job("acme", job.job_id)
        assert after.status is JobStatus.SCHEDULED
        assert env.provider.executions == {after.provider_job_id: 1}
        assert [e.kind for e in store.list_events("acme", job.job_id, 0, 10)] == [
            EventKind.SUBMITTED, EventKind.SCHEDULED]

    run(go())


def test_a_cancelled_submit_call_still_finishes_its_server_side_steps(env: Env) -> None:
    async def go() -> None:
        call = asyncio.ensure_future(env.jobs.submit("acme", SPEC, "r-cancel"))
        await asyncio.sleep(0)  # the call is under way (admitted, its write queued)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await env.jobs.drain(5)
        (job,) = env.store.list_jobs("acme", JobFilter(), 10, "").jobs
        assert job.status is JobStatus.SCHEDULED and job.request_id == "r-cancel"
        retried = await env.jobs.submit("acme", SPEC, "r-cancel")  # the client's retry
        assert retried.job_id == job.job_id
        assert env.provider.executions == {job.provider_job_id: 1}

    run(go())


class OutputProvider(ScriptedProvider):
    """A scripted provider whose jobs print what the test writes into ``out``."""

    capabilities = Capabilities(max_status_batch=2, poll_interval_seconds=0.01,
                                supports_output=True)

    def __init__(self) -> None:
        super().__init__()
        self.out: dict[str, dict[str, bytes]] = {}

    def read_output(self, resource_path: str, offsets: tuple[int, int]) -> OutputChunk:
        streams = self.out.get(resource_path, {})
        got = [streams.get(name, b"")[start:] for name, start in zip(("stdout", "stderr"),
                                                                      offsets, strict=True)]
        return OutputChunk(stdout=got[0].decode(), stderr=got[1].decode(),
                           offsets=(offsets[0] + len(got[0]), offsets[1] + len(got[1])))


class FailingLog(StoreExecutionLog):
    """Appends fail while ``down`` (a full disk): nothing is acknowledged."""

    down = False

    async def append(self, events: Sequence[JobEvent]) -> None:
        if self.down:
            raise WalError("no space left on device (test)")
        await super().append(events)


def test_running_comes_before_output_and_the_end_comes_last(env: Env) -> None:
    provider = OutputProvider()
    w1 = env.owner("w1", provider=provider, log=FailingLog)
    jobs, poller, log = w1.jobs, w1.poller, w1.events
    assert isinstance(log, FailingLog)

    async def go() -> None:
        job = await jobs.submit("acme", SPEC, "")
        path = job.cloud_resource_path
        # The job already printed and finished before any poll saw it running.
        provider.out[path] = {"stdout": b"a\nb\n", "stderr": b"oops\n"}
        provider.states[path] = ProviderStatus(JobStatus.COMPLETED, "SUCCEEDED", exit_code=0,
                                               started_at=T0, completed_at=T0)
        log.down = True
        await poller.cycle()  # the output cannot be made durable: the job must not end
        assert env.store.get_job("acme", job.job_id).status is JobStatus.RUNNING
        log.down = False
        await poller.cycle()
        events = env.store.list_events("acme", job.job_id, 0, 100)
        assert [e.kind for e in events] == [
            EventKind.SUBMITTED, EventKind.SCHEDULED, EventKind.RUNNING,
            EventKind.OUTPUT, EventKind.OUTPUT, EventKind.COMPLETED]
        assert sorted((e.message, e.output) for e in events if e.kind is EventKind.OUTPUT) == [
            ("stderr", "oops\n"), ("stdout", "a\nb\n")]
        assert [e.seq for e in events] == list(range(1, 7))

    run(go())


def test_a_new_owner_reads_output_on_from_the_store(env: Env) -> None:
    provider = OutputProvider()
    w1 = env.owner("w1", provider=provider)
    w2 = env.owner("w2", provider=provider)

    async def go() -> None:
        job = await w1.jobs.submit("acme", SPEC, "")
        path = job.cloud_resource_path
        provider.states[path] = ProviderStatus(JobStatus.RUNNING, "RUNNING", started_at=T0)
        provider.out[path] = {"stdout": b"one\n"}
        await w1.poller.cycle()
        env.store.release_leases([(job.job_id, env.store.get_job("acme", job.job_id).lease)])
        env.store.claim_expired("w2", 30, 10)
        provider.out[path] = {"stdout": b"one\ntwo\n"}
        provider.states[path] = ProviderStatus(JobStatus.COMPLETED, "SUCCEEDED", exit_code=0,
                                               started_at=T0, completed_at=T0)
        await w2.poller.cycle()
        events = env.store.list_events("acme", job.job_id, 0, 100)
        assert [(e.kind, e.output) for e in events if e.kind is EventKind.OUTPUT] == [
            (EventKind.OUTPUT, "one\n"), (EventKind.OUTPUT, "two\n")]  # no line twice
        assert events[-1].kind is EventKind.COMPLETED and events[-1].worker_id == "w2"

    run(go())


class _OneLinePerRead(OutputProvider):
    def read_output(self, resource_path: str, offsets: tuple[int, int]) -> OutputChunk:
        chunk = super().read_output(resource_path, offsets)
        first = chunk.stdout.split("\n", 1)[0] + "\n" if chunk.stdout else ""
        return OutputChunk(stdout=first, offsets=(offsets[0] + len(first.encode()), offsets[1]))


def test_the_end_waits_for_output_beyond_one_cycles_budget(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that printed more than a cycle reads ends only after all of it is stored
    (found by bench.events: a 64 MiB job ended with 32 MiB of its output)."""
    monkeypatch.setattr(output_module, "OUTPUT_BUDGET_BYTES", 10)
    provider = _OneLinePerRead()
    w1 = env.owner("w1", provider=provider)
    jobs, poller = w1.jobs, w1.poller
    lines = [f"line {i}\n" for i in range(12)]

    async def go() -> int:
        job = await jobs.submit("acme", SPEC, "")
        provider.out[job.cloud_resource_path] = {"stdout": "".join(lines).encode()}
        provider.states[job.cloud_resource_path] = ProviderStatus(
            JobStatus.COMPLETED, "SUCCEEDED", exit_code=0, started_at=T0, completed_at=T0)
        cycles = 0
        while env.store.get_job("acme", job.job_id).status is not JobStatus.COMPLETED:
            await poller.cycle()
            cycles += 1
            assert cycles < 50
        events = env.store.list_events("acme", job.job_id, 0, 100)
        assert "".join(e.output for e in events) == "".join(lines)
        assert events[-1].kind is EventKind.COMPLETED
        return cycles

    assert run(go()) > 1  # it did take several cycles


def test_a_cancel_ends_the_stream_after_the_output_printed_before_it(env: Env) -> None:
    provider = OutputProvider()
    w1 = env.owner("w1", provider=provider)
    jobs, poller = w1.jobs, w1.poller

    async def go() -> None:
        job = await jobs.submit("acme", SPEC, "")
        path = job.cloud_resource_path
        provider.states[path] = ProviderStatus(JobStatus.RUNNING, "RUNNING", started_at=T0)
        provider.out[path] = {"stdout": b"a\n"}
        await poller.cycle()
        provider.out[path] = {"stdout": b"a\nb\n"}  # printed more, then the cancel came
        done = await jobs.cancel("acme", job.job_id)
        assert done.status is JobStatus.CANCELLED
        events = env.store.list_events("acme", job.job_id, 0, 100)
        assert [(e.kind, e.output) for e in events][-3:] == [
            (EventKind.OUTPUT, "a\n"), (EventKind.OUTPUT, "b\n"), (EventKind.CANCELLED, "")]

    run(go())


def test_a_service_account_needs_the_tenants_allow_list(env: Env) -> None:
    """Any tenant could otherwise run as any account the worker may act as: a job naming
    a service account is refused, before anything is stored, unless the account is on
    that tenant's list (TENANT_SERVICE_ACCOUNTS)."""
    runner = "runner@p.iam.gserviceaccount.com"
    jobs = JobService(env.store, env.provider, worker_id="w1", lease_ttl=30, clock=env.clock,
                      service_accounts={"acme": frozenset({runner})})
    spec = dataclasses.replace(SPEC, service_account=runner)
    for tenant, account in (("beta", runner), ("acme", "admin@p.iam.gserviceaccount.com")):
        with pytest.raises(InvalidArgument, match="not allowed for this tenant"):
            run(jobs.submit(tenant, dataclasses.replace(spec, service_account=account), "r"))
        assert env.store.list_jobs(tenant, JobFilter(), 10, "").jobs == []
    job = run(jobs.submit("acme", spec, "r-ok"))
    assert isinstance(job, Job) and job.spec.service_account == runner
    # Without an allow-list no tenant may name one; jobs without one are unaffected.
    with pytest.raises(InvalidArgument):
        run(env.jobs.submit("acme", spec, "r-2"))
    assert isinstance(run(env.jobs.submit("acme", SPEC, "r-3")), Job)

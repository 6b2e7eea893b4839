"""WatchJobEvents on a worker (docs/design.md §6 "Watching"): one job by seq, a tenant by
position; woken at once by the worker's own commits, finding other writers' events by
polling the cursor."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from database.memory import MemoryStore
from jennah.errors import InvalidArgument, NotFound
from jennah.models import EventKind, Job, JobEvent, JobPatch, JobSpec, JobStatus
from jennah.v1 import deployment_pb2 as pb
from providers.memory import FakeProvider
from worker import watch as watch_module
from worker.auth import CallerAuth
from worker.commit import GroupCommitter
from worker.jobs import JobService
from worker.notify import Notifier
from worker.service import WorkerService
from worker.watch import EventWatch

T = datetime(2026, 12, 1, tzinfo=UTC)
CTX: Any = SimpleNamespace(request_headers={"x-tenant-id": "acme"})


class World:
    def __init__(self) -> None:
        self.store = MemoryStore()
        self.notifier = Notifier()
        self.committer = GroupCommitter(self.store, notify=self.notifier.notify)
        self.jobs = JobService(self.store, FakeProvider(), worker_id="w1", lease_ttl=30,
                               committer=self.committer)  # fmt: skip
        self.svc = WorkerService(self.jobs, CallerAuth(dev_mode=True, worker_token=""),
                                 EventWatch(self.jobs, self.notifier))  # fmt: skip

    def job(self, job_id: str = "j1") -> Job:
        job, _ = self.store.create_job(Job(job_id=job_id, tenant_id="acme", owner_worker_id="w1",
                                           spec=JobSpec(image_uri="busybox")), 30)  # fmt: skip
        return job

    def move(self, job: Job, status: JobStatus) -> Job:
        """A write by another worker: straight to the store, no wake-up here."""
        return self.store.update_job(job.job_id, job.lease, JobPatch(status=status), "x")

    async def collect(self, req: pb.WatchJobEventsRequest, n: int | None = None,
                      ) -> list[pb.JobEvent]:  # fmt: skip
        out = []
        async for ev in self.svc.watch_job_events(req, CTX):
            out.append(ev)
            if n is not None and len(out) == n:
                break
        return out


def kinds(events: list[pb.JobEvent]) -> list[str]:
    return [pb.EventKind.Name(e.kind).removeprefix("EVENT_KIND_") for e in events]


def test_a_job_stream_ends_with_its_terminal_event_and_resumes_after_a_seq() -> None:
    w = World()
    job = w.job()
    w.move(job, JobStatus.SCHEDULED)
    w.move(job, JobStatus.COMPLETED)
    got = asyncio.run(asyncio.wait_for(w.collect(pb.WatchJobEventsRequest(job_id="j1")), 2))
    assert kinds(got) == ["SUBMITTED", "SCHEDULED", "COMPLETED"]
    assert [e.seq for e in got] == [1, 2, 3] and all(e.position > 0 for e in got)
    resumed = asyncio.run(w.collect(pb.WatchJobEventsRequest(job_id="j1", after_seq=1)))
    assert [e.seq for e in resumed] == [2, 3]
    # A stream that starts after the terminal event ends at once.
    assert asyncio.run(asyncio.wait_for(
        w.collect(pb.WatchJobEventsRequest(job_id="j1", after_seq=3)), 1)) == []


def test_own_commits_wake_a_watcher_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "WATCH_POLL_SECONDS", 30.0)  # only the wake-up helps
    w = World()
    job = w.job()

    async def go() -> float:
        stream = asyncio.ensure_future(w.collect(pb.WatchJobEventsRequest(job_id="j1"), 2))
        await asyncio.sleep(0.05)  # the watcher has read SUBMITTED and waits
        t0 = time.monotonic()
        await w.committer.update(job, job.lease, JobPatch(status=JobStatus.SCHEDULED), "x")
        got = await asyncio.wait_for(stream, 5)
        assert kinds(got) == ["SUBMITTED", "SCHEDULED"]
        return time.monotonic() - t0

    assert asyncio.run(go()) < 0.5


def test_other_writers_events_are_found_within_the_poll_interval() -> None:
    w = World()
    job = w.job()

    async def go() -> float:
        stream = asyncio.ensure_future(w.collect(pb.WatchJobEventsRequest(job_id="j1"), 2))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        w.move(job, JobStatus.RUNNING)  # no notification: found by the cursor query
        await asyncio.wait_for(stream, 5)
        return time.monotonic() - t0

    assert asyncio.run(go()) <= watch_module.WATCH_POLL_SECONDS + 0.15


def test_a_tenant_stream_follows_positions_and_ends_when_nothing_is_active() -> None:
    w = World()
    a, b = w.job("a"), w.job("b")
    w.move(a, JobStatus.COMPLETED)
    first = asyncio.run(w.collect(pb.WatchJobEventsRequest(), 2))
    assert [(e.job_id, e.position) for e in first] == [("a", 1), ("b", 2)]

    async def go() -> list[pb.JobEvent]:
        stream = asyncio.ensure_future(
            w.collect(pb.WatchJobEventsRequest(after_position=2)))
        await asyncio.sleep(0.05)
        assert not stream.done()  # b is still active
        w.move(b, JobStatus.CANCELLED)
        return await asyncio.wait_for(stream, 5)

    rest = asyncio.run(go())
    assert [(e.job_id, kinds([e])[0], e.position) for e in rest] == [
        ("a", "COMPLETED", 3), ("b", "CANCELLED", 4)]


def test_a_following_tenant_stream_keeps_going() -> None:
    w = World()
    job = w.job()
    w.move(job, JobStatus.COMPLETED)

    async def go() -> list[pb.JobEvent]:
        stream = asyncio.ensure_future(
            w.collect(pb.WatchJobEventsRequest(follow=True, after_position=2), 1))
        await asyncio.sleep(0.3)
        assert not stream.done()  # nothing active, but it follows
        w.job("later")
        return await asyncio.wait_for(stream, 5)

    assert [(e.job_id, e.position) for e in asyncio.run(go())] == [("later", 3)]


def test_bad_watch_requests_are_refused() -> None:
    w = World()
    w.job()
    for req in (pb.WatchJobEventsRequest(job_id="j1", after_position=3),
                pb.WatchJobEventsRequest(after_seq=3),
                pb.WatchJobEventsRequest(job_id="j1", after_seq=-1)):  # fmt: skip
        with pytest.raises(InvalidArgument):
            asyncio.run(w.collect(req))
    with pytest.raises(NotFound):
        asyncio.run(w.collect(pb.WatchJobEventsRequest(job_id="nope")))


def test_an_idle_tenant_watch_reads_only_past_its_cursor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cost of an idle watcher does not grow with history: each wake is one range
    read after the cursor (which returns nothing)."""
    monkeypatch.setattr(watch_module, "WATCH_POLL_SECONDS", 0.01)
    w = World()
    for i in range(300):
        w.job(f"old-{i}")
    for i in range(300):
        w.move(w.store.get_job("acme", f"old-{i}"), JobStatus.COMPLETED)
    w.job("active")
    reads: list[tuple[int, int]] = []
    real = w.store.list_tenant_events

    def spy(tenant: str, after: int, limit: int) -> list[JobEvent]:
        got = real(tenant, after, limit)
        reads.append((after, len(got)))
        return got

    monkeypatch.setattr(w.store, "list_tenant_events", spy)

    async def go() -> None:
        req = pb.WatchJobEventsRequest(after_position=601, follow=True)
        stream = asyncio.ensure_future(w.collect(req, 1))
        await asyncio.sleep(0.3)
        stream.cancel()

    asyncio.run(go())
    assert len(reads) >= 5
    assert all(after == 601 and n == 0 for after, n in reads)


def test_the_store_numbers_what_the_watch_sends() -> None:
    w = World()
    job = w.job()
    w.store.append_execution_events([JobEvent(
        job_id=job.job_id, tenant_id="acme", seq=0, kind=EventKind.STATUS_DETAIL,
        status=job.status, message="detail", created_at=T, worker_id="w1", dedup_key="d")])
    w.move(job, JobStatus.FAILED)
    got = asyncio.run(w.collect(pb.WatchJobEventsRequest(job_id="j1")))
    assert [(e.seq, kinds([e])[0]) for e in got] == [
        (1, "SUBMITTED"), (2, "STATUS_DETAIL"), (3, "FAILED")]

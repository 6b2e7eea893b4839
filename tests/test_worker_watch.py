"""WatchJobEvents for one job ends only after the job's final event (issue found with the
pyvoy tests): the job row turns terminal before the owner's event log delivers the final
event to the store, and a stream that ended on the row alone would miss it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from database.memory import MemoryStore
from jennah.models import EventKind, Job, JobEvent, JobPatch, JobSpec, JobStatus
from jennah.v1 import deployment_pb2 as pb
from providers.memory import FakeProvider
from worker import service as service_module
from worker.auth import CallerAuth
from worker.jobs import JobService
from worker.service import WorkerService
from worker.store_events import StoreEventLog

T = datetime(2026, 12, 1, tzinfo=UTC)


def event(job: Job, seq: int, kind: EventKind, status: JobStatus) -> JobEvent:
    return JobEvent(job_id=job.job_id, tenant_id=job.tenant_id, seq=seq, kind=kind,
                    status=status, message=kind.value, created_at=T, worker_id="w1")  # fmt: skip


def setup() -> tuple[MemoryStore, WorkerService, Job]:
    store = MemoryStore()
    jobs = JobService(store, FakeProvider(), StoreEventLog(store, "w1", lambda: T), worker_id="w1",
                      lease_ttl=30)  # fmt: skip
    svc = WorkerService(jobs, CallerAuth(dev_mode=True, worker_token=""))
    job, _ = store.create_job(Job(job_id="j1", tenant_id="acme",
                                  spec=JobSpec(image_uri="busybox"), owner_worker_id="w1"), 30)
    store.append_events([event(job, 1, EventKind.SUBMITTED, JobStatus.PENDING)])
    # The owner records COMPLETED; its final event is still on the way to the store.
    store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.SCHEDULED))
    store.update_job(job.job_id, job.lease, JobPatch(status=JobStatus.COMPLETED))
    return store, svc, job


CTX: Any = SimpleNamespace(request_headers={"x-tenant-id": "acme"})


async def collect(svc: WorkerService, after: int) -> list[int]:
    req = pb.WatchJobEventsRequest(job_id="j1", after_seq=after)
    return [ev.seq async for ev in svc.watch_job_events(req, CTX)]


def test_the_stream_waits_for_the_final_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "WATCH_POLL_SECONDS", 0.01)
    store, svc, job = setup()

    async def go() -> list[int]:
        async def deliver_late() -> None:
            await asyncio.sleep(0.3)
            store.append_events([event(job, 2, EventKind.COMPLETED, JobStatus.COMPLETED)])

        late = asyncio.create_task(deliver_late())
        seqs = await asyncio.wait_for(collect(svc, 0), 5)
        await late
        return seqs

    assert asyncio.run(go()) == [1, 2]


def test_a_stream_after_the_final_event_ends_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "WATCH_POLL_SECONDS", 0.01)
    store, svc, job = setup()
    store.append_events([event(job, 2, EventKind.COMPLETED, JobStatus.COMPLETED)])
    assert asyncio.run(asyncio.wait_for(collect(svc, 2), 1)) == []


def test_a_final_event_that_never_comes_ends_the_stream_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_module, "WATCH_POLL_SECONDS", 0.01)
    monkeypatch.setattr(service_module, "FINAL_EVENT_GRACE_SECONDS", 0.2)
    _, svc, _ = setup()
    assert asyncio.run(asyncio.wait_for(collect(svc, 0), 3)) == [1]

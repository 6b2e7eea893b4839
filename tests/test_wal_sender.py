"""Delivery: at least once, no loss and no duplicates across a sink outage, a persisted
watermark across restarts, batching caps, backoff, flush barrier, adoption."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from database.memory import MemoryStore
from jennah.models import EventKind, Job, JobEvent, JobSpec, JobStatus
from worker.events import SEQ_BLOCK
from worker.wal import SenderConfig, StoreSink, WalEventLog
from worker.wal.codec import event_payload
from worker.wal.sender import backoff_delay

FAST = SenderConfig(backoff_base=0.01, backoff_cap=0.05)


class SinkDown(Exception):
    pass


class RecordingSink:
    """Counts every (job_id, seq) it accepted; fails while ``down``; forwards to ``inner``."""

    def __init__(self, inner: StoreSink | None = None) -> None:
        self.inner = inner
        self.down = False
        self.down_until = 0.0
        self.delivered: Counter[tuple[str, int]] = Counter()
        self.batches: list[list[JobEvent]] = []
        self.gate: asyncio.Event | None = None

    async def deliver(self, events: Sequence[JobEvent]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.down or time.monotonic() < self.down_until:
            raise SinkDown("sink is down")
        if self.inner is not None:
            await self.inner.deliver(events)
        self.batches.append(list(events))
        self.delivered.update((e.job_id, e.seq) for e in events)


def _job(job_id: str = "job-1", lease_version: int = 1, attempt: int = 0) -> Job:
    return Job(job_id=job_id, tenant_id="acme", spec=JobSpec(image_uri="busybox"),
               lease_version=lease_version, attempt=attempt, owner_worker_id="w1")


def _log(tmp: Path, sink: RecordingSink, worker: str = "w1", **kw: object) -> WalEventLog:
    kw.setdefault("sender_config", FAST)
    kw.setdefault("registry", CollectorRegistry())
    return WalEventLog(tmp / "wal", tmp / "archive", worker, sink, **kw)  # type: ignore[arg-type]


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    assert [backoff_delay(n, 0.1, 1.0, lambda: 0.5) for n in range(6)] == [
        0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff_delay(500, 0.1, 1.0, lambda: 1.0) == 1.0
    assert backoff_delay(3, 0.1, 1.0, lambda: 0.0) == 0.0


def test_retries_use_injected_sleep_and_random(tmp_path: Path) -> None:
    sink = RecordingSink()
    sink.down = True
    slept: list[float] = []
    registry = CollectorRegistry()

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 6:
            sink.down = False
        await asyncio.sleep(0)

    async def main() -> None:
        log = _log(tmp_path, sink, sleep=fake_sleep, random=lambda: 0.5, registry=registry,
                   sender_config=SenderConfig(backoff_base=0.1, backoff_cap=1.0))
        await log.emit(_job(), EventKind.SUBMITTED, JobStatus.PENDING)
        assert await log.flush(5)
        await log.close()

    asyncio.run(main())
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    assert registry.get_sample_value("wal_retries_total") == 6
    assert registry.get_sample_value("wal_failures_total", {"op": "deliver"}) == 6
    assert sink.delivered == Counter({("job-1", 1): 1})


def test_sink_down_for_two_seconds_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    store = MemoryStore()
    jobs = [store.create_job(_job(f"job-{i}"), 30)[0] for i in range(3)]
    sink = RecordingSink(StoreSink(store))
    registry = CollectorRegistry()
    started = time.monotonic()
    sink.down_until = started + 2.0

    async def main() -> None:
        log = _log(tmp_path, sink, registry=registry)
        await log.start()

        async def producer(job: Job) -> None:
            for n in range(100):
                await log.emit(job, EventKind.OUTPUT, None, output=f"{job.job_id} line {n}\n")
                await asyncio.sleep(0.01)  # spread the 100 events over most of the outage

        await asyncio.gather(*(producer(j) for j in jobs))
        assert time.monotonic() < sink.down_until, "emits must not wait for the sink"
        assert registry.get_sample_value("wal_pending_events") == 300
        assert not await log.flush(0.2)
        assert await log.flush(10)
        await log.close()

    asyncio.run(main())
    assert time.monotonic() - started < 8
    for job in jobs:
        stored = store.list_events("acme", job.job_id, 0, 1000)
        assert [e.seq for e in stored] == list(range(1, 101))
        assert [e.output for e in stored] == [f"{job.job_id} line {n}\n" for n in range(100)]
    assert set(sink.delivered) == {(j.job_id, s) for j in jobs for s in range(1, 101)}
    assert max(sink.delivered.values()) == 1, "an event was delivered twice"
    assert registry.get_sample_value("wal_retries_total") > 0  # type: ignore[operator]
    assert registry.get_sample_value("wal_pending_events") == 0


def test_restart_resends_only_unacknowledged(tmp_path: Path) -> None:
    job = _job()
    first = RecordingSink()

    async def before_restart() -> None:
        log = _log(tmp_path, first, close_timeout=0.2)
        for n in range(40):
            await log.emit(job, EventKind.OUTPUT, None, output=f"a{n}")
        assert await log.flush(5)
        first.down = True
        for n in range(15):
            await log.emit(job, EventKind.OUTPUT, None, output=f"b{n}")
        await log.close()  # the sink is down: these 15 stay in the WAL, not failed

    second = RecordingSink()

    async def after_restart() -> int:
        log = _log(tmp_path, second)
        await log.start()
        assert await log.flush(5)
        ev = await log.emit(job, EventKind.COMPLETED, JobStatus.COMPLETED)
        assert await log.flush(5)
        await log.close()
        return ev.seq

    asyncio.run(before_restart())
    assert set(first.delivered) == {("job-1", s) for s in range(1, 41)}
    next_seq = asyncio.run(after_restart())
    assert sorted(s for _, s in second.delivered) == list(range(41, 57))
    assert next_seq == 56
    outputs = [e.output for b in second.batches for e in b]
    assert outputs[:15] == [f"b{n}" for n in range(15)]


def test_batches_respect_count_and_byte_caps(tmp_path: Path) -> None:
    sink = RecordingSink()
    cfg = SenderConfig(max_batch_events=7, max_batch_bytes=2000, backoff_base=0.01)

    async def main() -> None:
        sink.gate = asyncio.Event()
        log = _log(tmp_path, sink, sender_config=cfg)
        for n in range(60):
            await log.emit(_job(f"job-{n % 3}"), EventKind.OUTPUT, None, output="x" * (n * 7))
        sink.gate.set()
        assert await log.flush(5)
        await log.close()

    asyncio.run(main())
    assert sum(len(b) for b in sink.batches) == 60
    for batch in sink.batches:
        assert len(batch) <= 7
        size = sum(32 + len(event_payload(e)) for e in batch)
        assert len(batch) == 1 or size <= 2000
    for j in range(3):
        seqs = [e.seq for b in sink.batches for e in b if e.job_id == f"job-{j}"]
        assert seqs == list(range(1, 21))


def test_seq_uses_the_lease_block_and_continues_after_restart(tmp_path: Path) -> None:
    sink = RecordingSink()

    async def emit(job: Job) -> int:
        log = _log(tmp_path, sink)
        ev = await log.emit(job, EventKind.LEASE_CLAIMED, None)
        await log.close()
        return ev.seq

    assert asyncio.run(emit(_job(lease_version=2))) == SEQ_BLOCK + 1
    assert asyncio.run(emit(_job(lease_version=2))) == SEQ_BLOCK + 2
    assert asyncio.run(emit(_job(lease_version=4))) == 3 * SEQ_BLOCK + 1
    assert asyncio.run(emit(_job(lease_version=4, attempt=1))) == 3 * SEQ_BLOCK + 1


def test_adopt_sends_another_workers_unsent_events_then_archives(tmp_path: Path) -> None:
    dead = RecordingSink()
    dead.down = True
    taker = RecordingSink()

    async def main() -> None:
        a = _log(tmp_path, dead, "w-a", close_timeout=0.1)
        for n in range(10):
            await a.emit(_job("job-x"), EventKind.OUTPUT, None, output=str(n))
        await a.emit(_job("job-y"), EventKind.OUTPUT, None, output="other")
        await a.close()
        b = _log(tmp_path, taker, "w-b")
        assert await b.adopt(["job-x"], "w-other") == []
        assert await b.adopt(["job-x"]) == ["job-x.0"]  # any previous owner
        assert await b.adopt(["job-x"], "w-a") == []  # already adopted
        assert await b.flush(5)
        for _ in range(1000):  # up to 10 s: the archive follows the ack asynchronously
            if (tmp_path / "archive" / "w-a" / "job-x.0.wal.zst").exists():
                break
            await asyncio.sleep(0.01)
        await b.close()

    asyncio.run(main())
    assert sorted(taker.delivered) == [("job-x", s) for s in range(1, 11)]
    assert all(e.worker_id == "w-a" for batch in taker.batches for e in batch)
    assert (tmp_path / "archive" / "w-a" / "job-x.0.wal.zst").exists()
    assert not (tmp_path / "wal" / "w-a" / "job-x.0.wal").exists()
    assert (tmp_path / "wal" / "w-a" / "job-y.0.wal").exists()  # not claimed: untouched


def test_job_finished_while_sink_down_archives_once_delivered(tmp_path: Path) -> None:
    sink = RecordingSink()
    sink.down = True
    archived = tmp_path / "archive" / "w1" / "job-1.0.wal.zst"

    async def main() -> None:
        log = _log(tmp_path, sink, finish_timeout=0.2)
        job = _job()
        await log.emit(job, EventKind.RUNNING, JobStatus.RUNNING)
        await log.emit(job, EventKind.COMPLETED, JobStatus.COMPLETED)
        await log.job_finished(job)
        assert not archived.exists()
        assert (tmp_path / "wal" / "w1" / "job-1.0.wal").exists()
        sink.down = False
        assert await log.flush(5)
        for _ in range(1000):
            if archived.exists():
                break
            await asyncio.sleep(0.01)
        await log.close()

    asyncio.run(main())
    assert archived.exists()
    assert not (tmp_path / "wal" / "w1" / "job-1.0.wal").exists()
    assert sorted(sink.delivered) == [("job-1", 1), ("job-1", 2)]


def test_store_sink_keeps_tenant_and_fields(tmp_path: Path) -> None:
    store = MemoryStore()
    job = store.create_job(_job(), 30)[0]
    clock_time = datetime(2025, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)

    async def main() -> JobEvent:
        log = WalEventLog(tmp_path / "wal", tmp_path / "archive", "w1", StoreSink(store),
                          clock=lambda: clock_time, registry=CollectorRegistry())
        ev = await log.emit(job, EventKind.STATUS_DETAIL, JobStatus.RUNNING, "msg", "out")
        assert await log.flush(5)
        await log.close()
        return ev

    ev = asyncio.run(main())
    assert store.list_events("acme", "job-1", 0, 10) == [ev]
    assert ev == JobEvent("job-1", "acme", 1, EventKind.STATUS_DETAIL, JobStatus.RUNNING, "msg",
                          clock_time, "w1", "out")


@pytest.mark.parametrize("stop_during", ["deliver", "backoff"])
def test_stopping_never_marks_events_failed(tmp_path: Path, stop_during: str) -> None:
    sink = RecordingSink()
    sink.down = stop_during == "backoff"

    async def stop() -> None:
        if stop_during == "deliver":
            sink.gate = asyncio.Event()  # the delivery hangs until cancelled
        log = _log(tmp_path, sink, close_timeout=0.1)
        for n in range(5):
            await log.emit(_job(), EventKind.OUTPUT, None, output=str(n))
        await asyncio.sleep(0.05)
        await log.close()

    asyncio.run(stop())
    assert not sink.delivered
    fresh = RecordingSink()

    async def restart() -> None:
        log = _log(tmp_path, fresh)
        await log.start()
        assert await log.flush(5)
        await log.close()

    asyncio.run(restart())
    assert sorted(fresh.delivered) == [("job-1", s) for s in range(1, 6)]

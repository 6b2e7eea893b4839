"""One WAL file: durable appends, group commit (threads and asyncio), recovery, refusal."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from jennah.models import EventKind, Job, JobSpec
from worker.wal.format import HEADER_SIZE, WalError, WalFormatError, encode_record, scan
from worker.wal.joblog import JobLog
from worker.wal.log import AsyncCommit, WalFile, WalLocked
from worker.wal.metrics import wal_metrics

T0 = datetime(2025, 5, 1, tzinfo=UTC)


class CountingFsync:
    """A real fdatasync that also records, at each call's return, how much is durable."""

    def __init__(self) -> None:
        self.calls = 0
        self.durable = 0
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        os.fdatasync(fd)
        with self._lock:
            self.calls += 1
            self.durable = max(self.durable, size)


def _job(job_id: str = "job-1", lease_version: int = 1) -> Job:
    return Job(job_id=job_id, tenant_id="acme", spec=JobSpec(image_uri="busybox"),
               lease_version=lease_version)


def test_append_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    wal = WalFile.create(path)
    ends = [wal.append(encode_record(i, 11, i, f"p{i}".encode())) for i in range(1, 6)]
    assert wal.synced == ends[-1] == path.stat().st_size
    wal.close()
    wal2, result = WalFile.open(path)
    wal2.close()
    assert [r.seq for r in result.records] == [1, 2, 3, 4, 5]
    assert not result.error


def test_no_append_returns_before_its_bytes_are_durable(tmp_path: Path) -> None:
    fsync = CountingFsync()
    wal = WalFile.create(tmp_path / "d.wal", fsync=fsync)
    violations: list[int] = []

    def appender(i: int) -> None:
        for j in range(40):
            end = wal.append(encode_record(i * 1000 + j, 11, 0, b"z" * 100))
            if end > fsync.durable:
                violations.append(end)

    threads = [threading.Thread(target=appender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wal.close()
    assert violations == []


def test_group_commit_32_threads_shares_fsyncs(tmp_path: Path) -> None:
    fsync = CountingFsync()
    path = tmp_path / "g.wal"
    wal = WalFile.create(path, fsync=fsync)
    per_thread = 25
    barrier = threading.Barrier(32)

    def appender(i: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            wal.append(encode_record(i * 1000 + j, 11, 0, b"r" * 200))

    threads = [threading.Thread(target=appender, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wal.close()
    records = scan(path.read_bytes()).records
    assert sorted(r.seq for r in records) == sorted(
        i * 1000 + j for i in range(32) for j in range(per_thread))
    # Each thread's records are in its own order.
    for i in range(32):
        mine = [r.seq for r in records if r.seq // 1000 == i]
        assert mine == sorted(mine)
    assert fsync.calls < 32 * per_thread
    assert wal.fsyncs == fsync.calls


def test_group_commit_32_asyncio_tasks_shares_fsyncs(tmp_path: Path) -> None:
    fsync = CountingFsync()
    path = tmp_path / "t.0.wal"
    jl = JobLog.create(path, _job(), "w1", wal_metrics(CollectorRegistry()), fsync=fsync)

    async def appender(i: int) -> list[int]:
        seqs = []
        for j in range(20):
            ev = await jl.append_async(1, EventKind.OUTPUT, None, "", f"{i}:{j}\n", T0, "w1")
            seqs.append(ev.seq)
            # durable_pending lists only events whose bytes an fsync already covered.
            assert ev.seq in {p.seq for p in jl.durable_pending(10_000, 1 << 30)}
        return seqs

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(appender(i) for i in range(32)))

    per_task = asyncio.run(main())
    jl.close()
    reopened = JobLog.open(path, wal_metrics(CollectorRegistry()))
    got = [p.seq for p in reopened.durable_pending(10_000, 1 << 30)]
    reopened.close()
    assert got == list(range(1, 32 * 20 + 1))
    assert sorted(s for seqs in per_task for s in seqs) == got
    assert fsync.calls < 32 * 20 / 4


def test_async_commit_waits_for_durability(tmp_path: Path) -> None:
    fsync = CountingFsync()
    wal = WalFile.create(tmp_path / "c.wal", fsync=fsync)
    commit = AsyncCommit(wal)

    async def one(i: int) -> None:
        end = wal.write(encode_record(i, 11, 0, b"q" * 64))
        await commit.wait(end)
        assert fsync.durable >= end

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(50)))

    asyncio.run(main())
    wal.close()


def test_torn_tail_is_truncated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "torn.wal"
    wal = WalFile.create(path)
    for i in range(1, 4):
        wal.append(encode_record(i, 11, 0, b"abc"))
    good = wal.size
    wal.close()
    with open(path, "ab") as f:
        f.write(encode_record(4, 11, 0, b"abcdef")[:20])
    wal2, result = WalFile.open(path)
    assert [r.seq for r in result.records] == [1, 2, 3]
    assert "short" in result.error
    assert path.stat().st_size == good
    wal2.append(encode_record(4, 11, 0, b"new"))
    wal2.close()
    assert [r.seq for r in scan(path.read_bytes()).records] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"JNWAL00",
        b"hello world, this is a text file\n" * 3,
        b"JNWAL001" + struct.pack("<I", 9) + bytes(4) + b"more",
    ],
    ids=["empty", "short", "text", "version"],
)
def test_foreign_file_is_refused_and_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "job.0.wal"
    path.write_bytes(content)
    with pytest.raises(WalFormatError, match=str(path)):
        WalFile.open(path)
    with pytest.raises(WalFormatError):
        JobLog.open(path, wal_metrics(CollectorRegistry()))
    assert path.read_bytes() == content


def test_a_log_is_open_once(tmp_path: Path) -> None:
    path = tmp_path / "x.wal"
    wal = WalFile.create(path)
    with pytest.raises(WalLocked):
        WalFile.open(path)
    wal.close()
    WalFile.open(path)[0].close()


def test_create_never_clobbers(tmp_path: Path) -> None:
    path = tmp_path / "x.wal"
    path.write_bytes(b"precious")
    with pytest.raises(WalError):
        WalFile.create(path)
    assert path.read_bytes() == b"precious"


def test_failed_fsync_stops_the_file(tmp_path: Path) -> None:
    calls = 0

    def flaky(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)

    path = tmp_path / "f.wal"
    wal = WalFile.create(path, fsync=flaky)
    wal.append(encode_record(1, 11, 0, b"ok"))
    with pytest.raises(WalError, match="Input/output"):
        wal.append(encode_record(2, 11, 0, b"lost"))
    with pytest.raises(WalError):
        wal.append(encode_record(3, 11, 0, b"refused"))
    wal.close()
    wal2, result = WalFile.open(path)
    wal2.close()
    assert [r.seq for r in result.records][:1] == [1]


def test_joblog_numbers_events_and_persists_the_watermark(tmp_path: Path) -> None:
    path = tmp_path / "job-1.0.wal"
    reg = CollectorRegistry()
    jl = JobLog.create(path, _job(lease_version=3), "w1", wal_metrics(reg))
    min_seq = (3 - 1) * (1 << 32) + 1
    evs = [jl.append(min_seq, EventKind.OUTPUT, None, "", f"l{i}", T0, "w1") for i in range(5)]
    assert [e.seq for e in evs] == [min_seq + i for i in range(5)]
    assert all(e.tenant_id == "acme" for e in evs)
    jl.checkpoint(evs[2].seq)
    assert jl.unacked == 2
    assert reg.get_sample_value("wal_pending_events") == 2
    assert reg.get_sample_value("wal_appends_total") == 5
    assert reg.get_sample_value("wal_append_duration_seconds_count") == 5
    jl.close()
    again = JobLog.open(path, wal_metrics(CollectorRegistry()))
    assert again.watermark == evs[2].seq
    assert [p.event for p in again.durable_pending(100, 1 << 20)] == evs[3:]
    assert again.last_seq == evs[-1].seq
    assert again.meta.tenant_id == "acme"
    again.close()


def test_header_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "job-9.0.wal"
    jl = JobLog.create(path, _job("job-9"), "w1", wal_metrics(CollectorRegistry()))
    jl.close()
    data = path.read_bytes()
    assert data[:8] == b"JNWAL001"
    assert len(scan(data).records) == 1  # the META record
    assert not (tmp_path / "job-9.0.wal.tmp").exists()
    assert scan(data).records[0].offset == HEADER_SIZE


def test_emit_reopens_the_log_after_a_failed_fsync(tmp_path: Path) -> None:
    from worker.wal import WalEventLog

    failures = {"left": 0}

    def fsync(fd: int) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)

    class Sink:
        async def deliver(self, events: object) -> None:
            pass

    async def main() -> list[int]:
        log = WalEventLog(tmp_path / "wal", tmp_path / "archive", "w1", Sink(),
                          registry=CollectorRegistry(), fsync=fsync)
        seqs = [(await log.emit(_job(), EventKind.OUTPUT, None, output="a")).seq]
        failures["left"] = 1
        with pytest.raises(WalError, match="Input/output"):
            await log.emit(_job(), EventKind.OUTPUT, None, output="b")
        seqs.append((await log.emit(_job(), EventKind.OUTPUT, None, output="c")).seq)
        assert await log.flush(5)
        await log.close()
        return seqs

    seqs = asyncio.run(main())
    # The unacknowledged "b" may or may not have reached the disk; "c" follows it either way.
    assert seqs[0] == 1 and seqs[1] in (2, 3)
    records = scan((tmp_path / "wal" / "w1" / "job-1.0.wal").read_bytes()).records
    events = [r.seq for r in records if r.kind < 0x80]
    assert events == sorted(events) and seqs[1] == events[-1]


def test_metric_names_are_the_contract(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from worker.events import EventLog
    from worker.wal import WalEventLog

    assert wal_metrics() is wal_metrics()  # the process registry is registered once
    registry = CollectorRegistry()

    class Sink:
        async def deliver(self, events: object) -> None:
            pass

    async def main() -> None:
        log: EventLog = WalEventLog(tmp_path / "wal", tmp_path / "archive", "w1", Sink(),
                                    registry=registry)
        await log.emit(_job(), EventKind.SUBMITTED, None)
        assert await log.flush(5)
        await log.job_finished(_job())
        await log.close()

    asyncio.run(main())
    text = generate_latest(registry).decode()
    for name in ("wal_appends_total 1.0", "wal_append_duration_seconds_bucket",
                 "wal_append_duration_seconds_count 1.0", "wal_pending_events 0.0",
                 "wal_retries_total 0.0", "wal_archive_size_bytes"):
        assert name in text, name
    assert "# TYPE wal_failures_total counter" in text
    assert registry.get_sample_value("wal_archive_size_bytes") > 0  # type: ignore[operator]

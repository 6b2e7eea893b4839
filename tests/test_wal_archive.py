"""Archive (zstd, durable order), retention cleanup and the startup sweep (DESIGN §6, §11)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from jennah.models import EventKind, Job, JobEvent, JobSpec, JobStatus
from tests.fixtures.deps import missing_dependency
from worker.wal import WalEventLog
from worker.wal.archive import (
    archive_file,
    archive_finished,
    cleanup,
    last_archived_seq,
    read_archive,
)
from worker.wal.format import scan
from worker.wal.joblog import JobLog
from worker.wal.metrics import wal_metrics

T0 = datetime(2025, 5, 1, tzinfo=UTC)


class ListSink:
    def __init__(self) -> None:
        self.events: list[JobEvent] = []

    async def deliver(self, events: Sequence[JobEvent]) -> None:
        self.events.extend(events)


def _job(job_id: str = "job-1") -> Job:
    return Job(job_id=job_id, tenant_id="acme", spec=JobSpec(image_uri="busybox"),
               lease_version=1)


def _write_log(path: Path, job_id: str, n: int, terminal: bool, acked: bool) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    jl = JobLog.create(path, _job(job_id), path.parent.name, wal_metrics(CollectorRegistry()))
    for i in range(n):
        jl.append(1, EventKind.OUTPUT, None, "", f"epoch {i} loss=0.{i:04d}\n" * 5, T0, "w1")
    if terminal:
        jl.append(1, EventKind.COMPLETED, JobStatus.COMPLETED, "exit 0", "", T0, "w1")
    if acked:
        jl.checkpoint(jl.last_seq)
    jl.close()
    return path.read_bytes()


def _zstd() -> str:
    path = shutil.which("zstd") or "/usr/bin/zstd"
    if not os.access(path, os.X_OK):
        missing_dependency("the zstd command-line tool", "not on PATH")
    return path


def test_archive_decompresses_with_the_zstd_tool_to_the_exact_bytes(tmp_path: Path) -> None:
    wal = tmp_path / "wal" / "w1" / "job-1.0.wal"
    original = _write_log(wal, "job-1", 300, terminal=True, acked=True)
    out = archive_file(wal, tmp_path / "archive" / "w1")
    assert out == tmp_path / "archive" / "w1" / "job-1.0.wal.zst"
    assert not wal.exists()
    assert not list(out.parent.glob("*.tmp"))
    plain = subprocess.run([_zstd(), "-d", "-c", str(out)], capture_output=True, check=True,
                           timeout=30).stdout
    assert plain == original
    assert read_archive(out) == original
    assert out.stat().st_size < len(original) / 4


def test_a_failed_archive_keeps_the_log(tmp_path: Path) -> None:
    wal = tmp_path / "wal" / "w1" / "job-1.0.wal"
    original = _write_log(wal, "job-1", 5, terminal=True, acked=True)
    blocker = tmp_path / "archive"
    blocker.write_text("a file where the archive directory should be")
    with pytest.raises(OSError):
        archive_file(wal, blocker / "w1")
    assert wal.read_bytes() == original


def test_archiving_the_same_name_twice_never_overwrites(tmp_path: Path) -> None:
    a = tmp_path / "archive"
    first = _write_log(tmp_path / "w1" / "job-1.0.wal", "job-1", 3, True, True)
    out1 = archive_file(tmp_path / "w1" / "job-1.0.wal", a)
    second = _write_log(tmp_path / "w1" / "job-1.0.wal", "job-1", 4, True, True)
    out2 = archive_file(tmp_path / "w1" / "job-1.0.wal", a)
    assert out1 != out2 and out2.name == "job-1.0~2.wal.zst"
    assert read_archive(out1) == first and read_archive(out2) == second
    assert last_archived_seq(a, "job-1.0") == 5


def test_cleanup_deletes_only_archives_past_retention(tmp_path: Path) -> None:
    a = tmp_path / "archive" / "w1"
    a.mkdir(parents=True)
    now = time.time()
    old, new = a / "old.0.wal.zst", a / "new.0.wal.zst"
    other = a / "notes.txt"
    for p in (old, new, other):
        p.write_bytes(b"x")
    os.utime(old, (now - 31 * 86400, now - 31 * 86400))
    os.utime(other, (now - 99 * 86400, now - 99 * 86400))
    os.utime(new, (now - 29 * 86400, now - 29 * 86400))
    assert cleanup(tmp_path / "archive", 30 * 86400, now) == [old]
    assert not old.exists() and new.exists() and other.exists()


def test_job_finished_archives_after_flush_and_cleanup_uses_the_clock(tmp_path: Path) -> None:
    sink = ListSink()
    now = [datetime.now(UTC)]
    registry = CollectorRegistry()

    async def main() -> None:
        log = WalEventLog(tmp_path / "wal", tmp_path / "archive", "w1", sink,
                          clock=lambda: now[0], retention_days=7, registry=registry)
        job = _job()
        for i in range(50):
            await log.emit(job, EventKind.OUTPUT, None, output=f"line {i}\n")
        await log.emit(job, EventKind.COMPLETED, JobStatus.COMPLETED, "exit 0")
        await log.job_finished(job)
        out = tmp_path / "archive" / "w1" / "job-1.0.wal.zst"
        assert out.exists()
        assert not (tmp_path / "wal" / "w1" / "job-1.0.wal").exists()
        assert registry.get_sample_value("wal_archive_size_bytes") == out.stat().st_size
        records = scan(read_archive(out)).records
        assert [r.seq for r in records if r.kind < 0x80] == list(range(1, 52))
        assert max(r.seq for r in records if r.kind == 0x81) == 51  # fully acknowledged
        # Events for this execution after the archive continue the sequence.
        ev = await log.emit(job, EventKind.STATUS_DETAIL, None, "late")
        assert ev.seq == 52
        await log.close()
        now[0] += timedelta(days=8)
        os.utime(out, (time.time() - 8 * 86400,) * 2)
        log2 = WalEventLog(tmp_path / "wal", tmp_path / "archive", "w1", sink,
                           clock=lambda: now[0], retention_days=7, registry=registry)
        assert await log2.cleanup() == [out]
        await log2.close()

    asyncio.run(main())
    assert [e.seq for e in sink.events] == list(range(1, 53))


def test_seq_continues_from_the_archive_after_a_restart(tmp_path: Path) -> None:
    sink = ListSink()

    async def run(emit_kind: EventKind, finish: bool) -> int:
        log = WalEventLog(tmp_path / "wal", tmp_path / "archive", "w1", sink,
                          registry=CollectorRegistry())
        ev = await log.emit(_job(), emit_kind, None)
        if finish:
            await log.job_finished(_job())
        await log.close()
        return ev.seq

    assert asyncio.run(run(EventKind.OUTPUT, finish=True)) == 1
    assert (tmp_path / "archive" / "w1" / "job-1.0.wal.zst").exists()
    assert asyncio.run(run(EventKind.STATUS_DETAIL, finish=False)) == 2


def test_startup_sweep_resumes_archives_and_skips_foreign_files(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal" / "w1"
    _write_log(wal_dir / "done.0.wal", "done", 3, terminal=True, acked=False)
    _write_log(wal_dir / "busy.0.wal", "busy", 4, terminal=False, acked=False)
    (wal_dir / "crashed.0.wal.tmp").write_bytes(b"JNWAL001")
    foreign = wal_dir / "foreign.0.wal"
    foreign.write_bytes(b"definitely not a WAL")
    _write_log(tmp_path / "wal" / "w2" / "theirs.0.wal", "theirs", 2, True, False)
    sink = ListSink()
    registry = CollectorRegistry()

    async def main() -> list[str]:
        log = WalEventLog(tmp_path / "wal", tmp_path / "archive", "w1", sink, registry=registry)
        opened = await log.sweep()
        assert await log.flush(5)
        for _ in range(200):
            if (tmp_path / "archive" / "w1" / "done.0.wal.zst").exists():
                break
            await asyncio.sleep(0.01)
        await log.close()
        return opened

    opened = asyncio.run(main())
    assert sorted(opened) == ["busy.0", "done.0"]
    assert sorted((e.job_id, e.seq) for e in sink.events) == sorted(
        [("done", s) for s in range(1, 5)] + [("busy", s) for s in range(1, 5)])
    assert (tmp_path / "archive" / "w1" / "done.0.wal.zst").exists()
    assert (wal_dir / "busy.0.wal").exists()  # not terminal: stays until job_finished
    assert foreign.read_bytes() == b"definitely not a WAL"
    assert not (wal_dir / "crashed.0.wal.tmp").exists()
    assert (tmp_path / "wal" / "w2" / "theirs.0.wal").exists()  # another worker's log
    assert registry.get_sample_value("wal_failures_total", {"op": "recover"}) == 1


def test_archive_finished_rule(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    _write_log(wal / "w1" / "a.0.wal", "a", 2, terminal=True, acked=True)
    _write_log(wal / "w1" / "b.0.wal", "b", 2, terminal=True, acked=False)
    _write_log(wal / "w2" / "c.0.wal", "c", 2, terminal=False, acked=True)
    held = JobLog.open(wal / "w2" / "c.0.wal", wal_metrics(CollectorRegistry()))
    _write_log(wal / "w2" / "d.0.wal", "d", 1, terminal=True, acked=True)
    try:
        report = archive_finished(wal, tmp_path / "archive", wal_metrics(CollectorRegistry()))
    finally:
        held.close()
    assert report.archived == [tmp_path / "archive" / "w1" / "a.0.wal.zst",
                               tmp_path / "archive" / "w2" / "d.0.wal.zst"]
    reasons = {p.name: why for p, why in report.kept}
    assert "not yet sent" in reasons["b.0.wal"]
    assert "running worker" in reasons["c.0.wal"]

"""The upgrade from v1 per-execution logs (``worker/wal/legacy.py``): what a v1 log still
holds above its checkpoint goes to the store once (legacy placement, by the v1 dedup key
``v1:<seq>``), then the log is archived; a second import finds nothing; a log a running
process holds is left alone; the upgrade never holds the worker up for good.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

from database.memory import MemoryStore
from jennah.models import EventKind, Job, JobEvent, JobSpec, JobStatus
from tests.worker.wal.test_wal_support import RecordingSink, new_log
from worker.wal.archive import read_archive
from worker.wal.codec import Meta, event_payload, kind_byte, meta_payload, unix_ms
from worker.wal.format import KIND_CHECKPOINT, KIND_META, encode_header, encode_record
from worker.wal.legacy import find_v1_logs, import_v1_logs, read_v1_log

REPO = Path(__file__).resolve().parents[3]
V1_FIXTURE = REPO / "tests" / "fixtures" / "upgrade_v1" / "data" / "wal"
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def v1_event(job_id: str, seq: int, kind: EventKind, output: str = "") -> JobEvent:
    return JobEvent(job_id=job_id, tenant_id="", seq=seq, kind=kind,
                    status=JobStatus.RUNNING if kind is not EventKind.SUBMITTED else None,
                    message="stdout" if kind is EventKind.OUTPUT else kind.value.lower(),
                    output=output, created_at=T0 + timedelta(seconds=seq),
                    worker_id="w1")  # fmt: skip


def write_v1_log(path: Path, job_id: str, evs: list[JobEvent], checkpoint: int,
                 tenant: str = "acme", attempt: int = 0) -> bytes:  # fmt: skip
    """A v1 log as the v1 worker wrote it: header, META, events (bare JobEvent payloads,
    the record's number is the event's seq), CHECKPOINT records."""
    recs = [encode_record(0, KIND_META, unix_ms(T0),
                          meta_payload(Meta(job_id, tenant, attempt, "w1", 1)))]
    for ev in evs:
        recs.append(encode_record(ev.seq, kind_byte(ev.kind), unix_ms(ev.created_at),
                                  event_payload(ev)))
        if ev.seq == checkpoint:
            recs.append(encode_record(checkpoint, KIND_CHECKPOINT, unix_ms(T0), b""))
    data = encode_header() + b"".join(recs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def life(job_id: str) -> list[JobEvent]:
    return [v1_event(job_id, 1, EventKind.SUBMITTED), v1_event(job_id, 2, EventKind.RUNNING),
            v1_event(job_id, 3, EventKind.OUTPUT, "a\n"),
            v1_event(job_id, 4, EventKind.OUTPUT, "b\n"),
            v1_event(job_id, 5, EventKind.COMPLETED)]  # fmt: skip


def store_with(*job_ids: str) -> MemoryStore:
    store = MemoryStore()
    for j in job_ids:
        store.create_job(Job(job_id=j, tenant_id="acme", spec=JobSpec(image_uri="busybox"),
                             owner_worker_id="w1"), 30)  # fmt: skip
    return store


def v1_keys(store: MemoryStore, job_id: str) -> list[str]:
    return [e.dedup_key for e in store.list_events("acme", job_id, 0, 1000)
            if e.dedup_key.startswith("v1:")]  # fmt: skip


def test_undelivered_v1_events_reach_the_store_once_then_the_log_is_archived(
    tmp_path: Path,
) -> None:
    store = store_with("j1")
    path = tmp_path / "wal" / "w1" / "j1.0.wal"
    original = write_v1_log(path, "j1", life("j1"), checkpoint=2)
    pending = read_v1_log(path).pending
    assert [(e.dedup_key, e.tenant_id, e.attempt, e.seq) for e in pending] == [
        ("v1:3", "acme", 0, 0), ("v1:4", "acme", 0, 0), ("v1:5", "acme", 0, 0)]
    # v1:3 went in before the crash, but the checkpoint saying so did not reach the disk.
    store.append_execution_events(pending[:1], legacy=True)
    sink = RecordingSink(store)

    async def first() -> None:
        sink.gate = asyncio.Event()
        log = new_log(tmp_path, sink)
        await log.start()
        assert not log.ready  # the poller waits: v1 events go in before any new ones
        sink.gate.set()
        assert await log.wait_ready(5)
        await log.close()

    asyncio.run(first())
    assert v1_keys(store, "j1") == ["v1:3", "v1:4", "v1:5"]
    assert [e.output for e in store.list_events("acme", "j1", 0, 100)
            if e.kind is EventKind.OUTPUT] == ["a\n", "b\n"]  # fmt: skip
    [batch] = sink.legacy_batches
    assert [e.dedup_key for e in batch] == ["v1:3", "v1:4", "v1:5"]
    assert not path.exists()
    archived = tmp_path / "archive" / "w1" / "j1.0.wal.zst"
    assert read_archive(archived) == original

    async def again() -> None:
        log = new_log(tmp_path, sink)
        await log.start()
        assert log.ready  # nothing left to import
        await log.close()

    asyncio.run(again())
    assert len(sink.legacy_batches) == 1
    assert v1_keys(store, "j1") == ["v1:3", "v1:4", "v1:5"]


def test_import_v1_logs_reports_stored_and_duplicates(tmp_path: Path) -> None:
    store = store_with("j1", "j2")
    p1 = tmp_path / "wal" / "w1" / "j1.0.wal"
    p2 = tmp_path / "wal" / "w1" / "j2.1.wal"
    write_v1_log(p1, "j1", life("j1"), checkpoint=3)
    write_v1_log(p2, "j2", life("j2"), checkpoint=0, attempt=1)
    store.append_execution_events(read_v1_log(p2).pending[:2], legacy=True)
    sink = RecordingSink(store)
    paths = find_v1_logs(tmp_path / "wal", "w1")
    assert paths == [p1, p2]
    report = asyncio.run(import_v1_logs(paths, tmp_path / "archive", sink.deliver))
    assert (report.logs, report.stored, report.duplicates) == (2, 2 + 3, 2)
    assert report.archived == [tmp_path / "archive" / "w1" / "j1.0.wal.zst",
                               tmp_path / "archive" / "w1" / "j2.1.wal.zst"]
    assert report.skipped == []
    assert v1_keys(store, "j2") == ["v1:1", "v1:2", "v1:3", "v1:4", "v1:5"]
    assert {e.attempt for e in store.list_events("acme", "j2", 0, 100)
            if e.dedup_key.startswith("v1:")} == {1}  # fmt: skip
    assert find_v1_logs(tmp_path / "wal", "w1") == []


def test_a_log_held_by_a_running_process_is_skipped(tmp_path: Path) -> None:
    store = store_with("j1")
    path = tmp_path / "wal" / "w1" / "j1.0.wal"
    original = write_v1_log(path, "j1", life("j1"), checkpoint=2)
    sink = RecordingSink(store)
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a v1 worker still running
    try:
        report = asyncio.run(import_v1_logs([path], tmp_path / "archive", sink.deliver))
        assert report.logs == 0 and report.archived == []
        assert len(report.skipped) == 1 and "in use" in report.skipped[0]

        async def start() -> None:
            log = new_log(tmp_path, sink)
            await log.start()
            assert await log.wait_ready(5)  # skipped, not waited for forever
            await log.close()

        asyncio.run(start())
    finally:
        os.close(fd)
    assert sink.legacy_batches == []
    assert path.read_bytes() == original
    assert v1_keys(store, "j1") == []


def test_a_failed_archive_does_not_hold_the_worker_up(tmp_path: Path) -> None:
    """The events went in but the archive failed (a full archive disk): the worker becomes
    ready all the same, the log stays, and the next import (archive fixed) delivers it
    again harmlessly and archives it."""
    store = store_with("j1")
    path = tmp_path / "wal" / "w1" / "j1.0.wal"
    write_v1_log(path, "j1", life("j1"), checkpoint=2)
    (tmp_path / "archive").write_text("a file where the archive directory should be")
    sink = RecordingSink(store)

    async def start() -> None:
        log = new_log(tmp_path, sink)
        await log.start()
        assert await log.wait_ready(5)
        await log.close()

    asyncio.run(start())
    assert path.exists() and v1_keys(store, "j1") == ["v1:3", "v1:4", "v1:5"]
    (tmp_path / "archive").unlink()
    asyncio.run(start())
    assert not path.exists() and (tmp_path / "archive" / "w1" / "j1.0.wal.zst").exists()
    assert v1_keys(store, "j1") == ["v1:3", "v1:4", "v1:5"]
    assert len(sink.legacy_batches) == 2


def test_the_import_waits_for_the_store_and_a_torn_log_gives_its_prefix(
    tmp_path: Path,
) -> None:
    store = store_with("j1")
    path = tmp_path / "wal" / "w1" / "j1.0.wal"
    data = write_v1_log(path, "j1", life("j1"), checkpoint=2)
    path.write_bytes(data[:-7])  # the COMPLETED record is torn
    sink = RecordingSink(store)
    sink.fail_next = 3
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0)

    async def start() -> None:
        log = new_log(tmp_path, sink, sleep=fake_sleep, random=lambda: 1.0)
        await log.start()
        assert await log.wait_ready(5)
        await log.close()

    asyncio.run(start())
    assert slept == [0.1, 0.2, 0.4]  # the import's backoff (random() = 1: its ceilings)
    assert v1_keys(store, "j1") == ["v1:3", "v1:4"]
    assert read_archive(tmp_path / "archive" / "w1" / "j1.0.wal.zst") == data[:-7]


def test_real_v1_logs_are_read(tmp_path: Path) -> None:
    """Logs written by the v1 code itself (``tests/fixtures/upgrade_v1``, read-only: a
    copy is read here)."""
    copy = tmp_path / "wal"
    shutil.copytree(V1_FIXTURE, copy)
    v1 = read_v1_log(copy / "w1" / "00000000-0000-4000-8000-000000000002.0.wal")
    assert v1.damage == ""
    assert (v1.job_id, v1.tenant_id, v1.attempt) == (
        "00000000-0000-4000-8000-000000000002", "acme", 0)
    assert [(e.kind, e.message, e.output, e.dedup_key) for e in v1.pending] == [
        (EventKind.OUTPUT, "stdout", "two a\n", "v1:4"),
        (EventKind.OUTPUT, "stderr", "two b\n", "v1:5"),
        (EventKind.COMPLETED, "exited with code 0", "", "v1:6"),
    ]
    w2 = read_v1_log(copy / "w2" / "00000000-0000-4000-8000-000000000003.0.wal")
    assert w2.tenant_id == "beta"
    assert [e.output for e in w2.pending] == ["three b\n"]
    assert w2.pending[0].dedup_key.startswith("v1:")
    assert sorted(p.parent.name for p in find_v1_logs(copy)) == ["w1", "w1", "w1", "w2"]


def test_a_big_v1_log_goes_in_bounded_batches_in_order(tmp_path: Path) -> None:
    store = store_with("j1")
    evs = [v1_event("j1", n, EventKind.OUTPUT, f"{n}\n") for n in range(1, 1201)]
    write_v1_log(tmp_path / "wal" / "w1" / "j1.0.wal", "j1", evs, checkpoint=0)
    sink = RecordingSink(store)
    report = asyncio.run(import_v1_logs(find_v1_logs(tmp_path / "wal"), tmp_path / "archive",
                                        sink.deliver))  # fmt: skip
    assert report.stored == 1200
    assert [len(b) for b in sink.legacy_batches] == [500, 500, 200]
    assert [e.dedup_key for b in sink.legacy_batches for e in b] == [
        f"v1:{n}" for n in range(1, 1201)]

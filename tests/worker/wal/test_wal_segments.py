"""One WAL per worker (``WorkerWal``, docs/design.md §6): LSNs, segments and their roll, the
checkpoint each segment starts with, recovery rules, failures of the disk, back pressure.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import threading
from pathlib import Path

import pytest

from jennah.models import JobEvent
from tests.worker.wal.test_wal_support import FailingFsync, detail
from worker.wal.format import (
    HEADER_SIZE,
    KIND_CHECKPOINT,
    WalError,
    WalFull,
    encode_header,
    encode_record,
    scan,
)
from worker.wal.log import WalLocked
from worker.wal.segments import WorkerWal, list_segments, segment_name


def nosync(fd: int) -> None:
    return None


def events(n: int, job: str = "j", start: int = 0) -> list[JobEvent]:
    return [detail(job, f"{job}-{i}") for i in range(start, start + n)]


def records(path: Path) -> list[tuple[int, int]]:
    """(kind, lsn) of every record of a segment file; it must scan clean."""
    result = scan(path.read_bytes())
    assert result.error == "", result.error
    return [(r.kind, r.lsn) for r in result.records]


def test_lsns_increase_and_recovery_resends_what_is_above_the_checkpoint(
    tmp_path: Path,
) -> None:
    d = tmp_path / "w1"

    async def first() -> None:
        wal = WorkerWal(d)
        wal.open()
        assert await wal.append(events(3)) == [1, 2, 3]
        assert await wal.append(events(2, start=3)) == [4, 5]
        assert [p.lsn for p in wal.durable(100, 1 << 20)] == [1, 2, 3, 4, 5]
        assert wal.ack(3) == []
        assert wal.pending == 2 and wal.acked == 3
        wal.close()

    asyncio.run(first())
    wal = WorkerWal(d)
    report = wal.open()
    assert (report.segments, report.pending, report.checkpoint) == (1, 2, 3)
    assert [(p.lsn, p.event.dedup_key) for p in wal.pending_events()] == [
        (4, "detail:j-3"), (5, "detail:j-4")]
    assert report.truncated == [] and report.damaged == []
    wal.close()


def test_segments_roll_at_segment_bytes_and_each_starts_with_the_checkpoint(
    tmp_path: Path,
) -> None:
    d = tmp_path / "w1"

    async def main() -> None:
        wal = WorkerWal(d, segment_bytes=1024, fsync=nosync)
        wal.open()
        acked = 0
        for i in range(40):
            await wal.append(events(1, start=i))
            if i % 3 == 2:  # the sender acknowledges now and then
                acked = wal.durable(100, 1 << 20)[-1].lsn
                wal.ack(acked)
        segs = list_segments(d)
        assert len(segs) > 3
        for (first, path), (nxt, _) in itertools.pairwise(segs):
            assert path.stat().st_size >= 1024  # rolled only once full
            kinds = records(path)
            assert kinds[0][0] == KIND_CHECKPOINT  # starts with the checkpoint
            event_lsns = [lsn for kind, lsn in kinds if kind != KIND_CHECKPOINT]
            assert event_lsns[0] == first and event_lsns[-1] == nxt - 1
        # The head checkpoint of each segment is the watermark when it was started.
        heads = [records(p)[0][1] for _, p in segs]
        assert heads == sorted(heads) and heads[0] == 0 and heads[-1] > 0
        assert all(seg.file is None for seg in wal.segments()[:-1])
        done = wal.done_segments()
        assert done and all(s.last_lsn <= wal.acked for s in done)
        assert wal.segments()[-1] not in done  # the open segment is never done
        wal.close()

    asyncio.run(main())


def test_reopening_never_duplicates_pending_events(tmp_path: Path) -> None:
    async def main() -> None:
        wal = WorkerWal(tmp_path / "w1", fsync=nosync)
        wal.open()
        await wal.append(events(4))
        wal.close()
        wal.open()
        assert [p.lsn for p in wal.pending_events()] == [1, 2, 3, 4]
        wal.open()  # open again without close: still once each
        assert [p.lsn for p in wal.pending_events()] == [1, 2, 3, 4]
        assert len(wal.segments()) == 1
        assert await wal.append(events(1, start=4)) == [5]
        wal.close()

    asyncio.run(main())


def _three_segments(d: Path) -> list[Path]:
    async def main() -> None:
        wal = WorkerWal(d, segment_bytes=400, fsync=nosync)
        wal.open()
        for i in range(12):
            await wal.append(events(1, start=i))
        wal.close()

    asyncio.run(main())
    paths = [p for _, p in list_segments(d)]
    assert len(paths) >= 3
    return paths


def test_torn_tail_of_the_last_segment_is_cut_and_appends_continue(tmp_path: Path) -> None:
    d = tmp_path / "w1"
    paths = _three_segments(d)
    last = paths[-1]
    good = last.stat().st_size
    before = {p: p.read_bytes() for p in paths[:-1]}
    with open(last, "ab") as f:
        f.write(encode_record(99, 13, 0, b"half a record")[:20])
    wal = WorkerWal(d, segment_bytes=400, fsync=nosync)
    report = wal.open()
    assert len(report.truncated) == 1 and str(last) in report.truncated[0]
    assert report.damaged == []
    assert last.stat().st_size == good
    assert {p: p.read_bytes() for p in paths[:-1]} == before  # older ones untouched
    assert [p.lsn for p in wal.pending_events()] == list(range(1, 13))

    async def more() -> list[int]:
        return await wal.append(events(1, start=12))

    assert asyncio.run(more()) == [13]
    wal.close()


def test_a_bad_record_in_an_older_segment_is_reported_and_the_rest_is_read(
    tmp_path: Path,
) -> None:
    d = tmp_path / "w1"
    paths = _three_segments(d)
    older = paths[0]
    data = bytearray(older.read_bytes())
    recs = scan(bytes(data)).records
    bad = recs[2]
    data[bad.offset + 30] ^= 0x04
    older.write_bytes(bytes(data))
    wal = WorkerWal(d, segment_bytes=400, fsync=nosync)
    report = wal.open()
    assert report.damaged == [f"{older}: corrupt at offset {bad.offset} "
                              f"(CRC mismatch at offset {bad.offset})"]
    assert report.truncated == []
    assert older.read_bytes() == bytes(data)  # damage in an older segment is never cut
    lost = {r.lsn for r in recs[2:]}
    got = [p.lsn for p in wal.pending_events()]
    assert got == [lsn for lsn in range(1, 13) if lsn not in lost]
    assert got[-1] == 12  # the later segments are still read
    wal.close()


def test_an_unreadable_segment_is_never_overwritten_and_lsns_go_past_it(
    tmp_path: Path,
) -> None:
    d = tmp_path / "w1"
    paths = _three_segments(d)
    newest = paths[-1]
    first_of_newest = list_segments(d)[-1][0]
    newest.write_bytes(b"NOTAWAL!" + bytes(40))  # its header is gone
    wal = WorkerWal(d, segment_bytes=400, fsync=nosync)
    report = wal.open()
    assert any(str(newest) in line and "not a Jennah WAL" in line for line in report.damaged)
    assert newest.read_bytes() == b"NOTAWAL!" + bytes(40)
    current = wal.segments()[-1]
    assert current.first_lsn > first_of_newest and current.path != newest

    async def more() -> list[int]:
        return await wal.append(events(1, start=50))

    [lsn] = asyncio.run(more())
    assert lsn > first_of_newest
    wal.close()
    assert newest.read_bytes() == b"NOTAWAL!" + bytes(40)
    assert list_segments(d)[-1][1] == current.path


def test_new_segments_sort_after_an_unreadable_one(tmp_path: Path) -> None:
    """The segment appended to must be the newest by name, or the next start would take
    the unreadable one for the newest (and not lock or recover the real one)."""
    d = tmp_path / "w1"
    _three_segments(d)
    stray = d / segment_name(500)
    stray.write_bytes(b"garbage, not a header")
    wal = WorkerWal(d, fsync=nosync)
    wal.open()
    assert wal.segments()[-1].first_lsn > 500
    assert list_segments(d)[-1][1] == wal.segments()[-1].path
    wal.close()
    assert stray.read_bytes() == b"garbage, not a header"


def test_a_leftover_segment_name_is_skipped_not_deleted(tmp_path: Path) -> None:
    """A roll whose rename made it to disk but whose directory fsync failed leaves a
    file with the next name: the next roll must not destroy a file it does not know."""
    d = tmp_path / "w1"
    wal = WorkerWal(d, fsync=nosync)
    wal.open()
    leftover = d / segment_name(wal._next_lsn)
    leftover.write_bytes(encode_header() + encode_record(0, KIND_CHECKPOINT, 0, b""))
    wal._roll()
    assert leftover.exists()
    assert wal.segments()[-1].path != leftover
    wal.close()


def test_a_running_workers_wal_is_refused_and_left_alone(tmp_path: Path) -> None:
    d = tmp_path / "w1"
    running = WorkerWal(d, fsync=nosync)
    running.open()
    half_rolled = d / (segment_name(7) + ".tmp")
    half_rolled.write_bytes(b"a roll in progress")
    with pytest.raises(WalLocked):
        WorkerWal(d).open()
    assert half_rolled.exists(), "a tool must not touch a running worker's files"
    running.close()
    WorkerWal(d).open()  # now it is stopped: recovery removes the leftover
    assert not half_rolled.exists()


def test_a_running_worker_holds_its_newest_segment_even_while_rolling(tmp_path: Path) -> None:
    """The new segment is created (locked) before the old one is closed: a tool looking
    at the directory mid-roll never finds an unlocked newest segment."""
    d = tmp_path / "w1"
    entered, release = threading.Event(), threading.Event()

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".wal.tmp") and not release.is_set():
            entered.set()  # a roll is creating the next segment
            assert release.wait(10)

    async def main() -> None:
        wal = WorkerWal(d, segment_bytes=300, fsync=fsync)
        release.set()
        wal.open()
        while wal.segments()[-1].file.size < 300:  # type: ignore[union-attr]
            await wal.append(events(1, start=wal.pending))
        release.clear()
        rolling = asyncio.create_task(wal.append(events(1, start=99)))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, entered.wait, 10)
        try:
            with pytest.raises(WalLocked):
                await loop.run_in_executor(None, WorkerWal(d).open)
        finally:
            release.set()
        await rolling
        assert len(wal.segments()) == 2
        wal.close()

    asyncio.run(main())


def test_failing_fsync_fails_the_append_drops_its_events_and_rolls(tmp_path: Path) -> None:
    d = tmp_path / "w1"
    fsync = FailingFsync(errno.ENOSPC)
    failing = fsync.failing

    async def main() -> None:
        wal = WorkerWal(d, fsync=fsync)
        wal.open()
        assert await wal.append(events(2)) == [1, 2]
        broken = wal.segments()[-1]
        synced = broken.file.synced if broken.file else 0
        failing.set()
        with pytest.raises(WalError, match="No space"):
            await wal.append(events(3, start=2))
        assert "No space" in wal.error
        assert [p.lsn for p in wal.pending_events()] == [1, 2]  # nothing of it
        assert [p.lsn for p in wal.durable(100, 1 << 20)] == [1, 2]
        # While the disk fails, every append fails (the new segment cannot be synced).
        with pytest.raises(WalError, match="cannot start a WAL segment"):
            await wal.append(events(1, start=5))
        assert not await wal.probe()
        # The broken segment was cut back to what was durable.
        assert broken.path.stat().st_size == synced
        assert len(list_segments(d)) == 1
        failing.clear()
        assert await wal.probe()
        assert wal.error == ""
        lsns = await wal.append(events(1, start=6))
        assert lsns[0] > 5  # failed appends used their LSNs up; never reused
        wal.close()
        assert [lsn for _, lsn in records(broken.path)] == [0, 1, 2]

    asyncio.run(main())
    wal = WorkerWal(d)
    wal.open()
    assert [p.event.dedup_key for p in wal.pending_events()] == [
        "detail:j-0", "detail:j-1", "detail:j-6"]
    wal.close()


def test_a_failed_append_leaves_no_valid_record_behind_for_the_next_start(
    tmp_path: Path,
) -> None:
    """pwrite succeeded, fsync failed: whole records sit past what is durable. Closing
    (shutdown) must cut them, or the next start would deliver events whose append
    failed (their producer reads them again, so they would go in twice)."""
    d = tmp_path / "w1"
    fsync = FailingFsync(errno.EIO)
    failing = fsync.failing

    async def main() -> None:
        wal = WorkerWal(d, fsync=fsync)
        wal.open()
        await wal.append(events(1))
        failing.set()
        with pytest.raises(WalError):
            await wal.append(events(2, start=1))
        wal.close()

    asyncio.run(main())
    wal = WorkerWal(d)
    report = wal.open()
    assert report.truncated == []
    assert [p.event.dedup_key for p in wal.pending_events()] == ["detail:j-0"]
    wal.close()


def test_wal_full_refuses_before_writing(tmp_path: Path) -> None:
    async def main() -> None:
        wal = WorkerWal(tmp_path / "w1", max_pending_bytes=2000, fsync=nosync)
        wal.open()
        await wal.append(events(1))  # one event always fits
        while True:
            try:
                await wal.append(events(1, start=wal.pending))
            except WalFull:
                break
        size = wal.segments()[-1].file.size  # type: ignore[union-attr]
        with pytest.raises(WalFull):
            await wal.append(events(1, start=99))
        assert wal.segments()[-1].file.size == size  # type: ignore[union-attr]
        assert wal.error == ""  # back pressure, not a write error
        wal.ack(wal.durable(1000, 1 << 30)[-1].lsn)
        await wal.append(events(1, start=100))
        wal.close()

    asyncio.run(main())


def test_concurrent_appends_rolls_and_acks_lose_and_double_nothing(tmp_path: Path) -> None:
    """16 tasks append one event at a time while a sender acknowledges, with segments of
    a few records: rolls happen under load. Every append that returned is delivered
    exactly once, and no append fails (a roll must never strand an appender)."""

    async def main() -> None:
        wal = WorkerWal(tmp_path / "w1", segment_bytes=600, fsync=nosync)
        wal.open()
        stop = False
        delivered: list[int] = []

        async def sender() -> None:
            while not stop or wal.pending:
                batch = wal.durable(5, 1 << 20)
                if batch:
                    delivered.extend(p.lsn for p in batch)
                    wal.ack(batch[-1].lsn)
                    for seg in wal.done_segments():
                        wal.forget(seg)
                await asyncio.sleep(0)

        async def appender(k: int) -> list[int]:
            got: list[int] = []
            for i in range(150):
                got += await wal.append(events(1, job=f"j{k}", start=i))
            return got

        task = asyncio.create_task(sender())
        appended = await asyncio.gather(*(appender(k) for k in range(16)))
        stop = True
        await asyncio.wait_for(task, 10)
        lsns = sorted(x for got in appended for x in got)
        assert len(lsns) == 16 * 150
        assert sorted(delivered) == lsns, "lost or doubled"
        assert delivered == sorted(delivered), "not in LSN order"
        assert len(wal.segments()) <= 2
        wal.close()

    asyncio.run(main())


def test_seal_closes_a_delivered_last_segment_for_the_tools(tmp_path: Path) -> None:
    d = tmp_path / "w1"

    async def main() -> None:
        wal = WorkerWal(d, fsync=nosync)
        wal.open()
        await wal.append(events(3))
        wal.ack(3)
        wal.close()

    asyncio.run(main())
    wal = WorkerWal(d)
    wal.open()
    [only] = wal.segments()
    wal.seal()
    assert [s.path for s in wal.done_segments()] == [only.path]
    fresh = wal.segments()[-1]
    assert fresh.first_lsn == 4
    wal.close()
    assert records(fresh.path) == [(KIND_CHECKPOINT, 3)]
    assert fresh.path.stat().st_size == HEADER_SIZE + 32


def test_recovery_completes_when_no_segment_can_be_started(tmp_path: Path) -> None:
    """A full disk at start: the pending events are still recovered (they can be
    delivered), and appends fail with the reason until writing works again."""
    d = tmp_path / "w1"

    async def before() -> None:
        wal = WorkerWal(d, segment_bytes=300, fsync=nosync)
        wal.open()
        while wal.segments()[-1].file.size < 300:  # type: ignore[union-attr]
            await wal.append(events(1, start=wal.pending))
        wal.close()

    asyncio.run(before())
    fsync = FailingFsync(errno.ENOSPC)
    failing = fsync.failing
    failing.set()

    wal = WorkerWal(d, segment_bytes=300, fsync=fsync)
    report = wal.open()  # the last segment is full: a new one is needed, and fails
    assert report.pending == wal.pending > 0
    assert "cannot start a WAL segment" in wal.error

    async def after() -> None:
        with pytest.raises(WalError, match="No space"):
            await wal.append(events(1, start=100))
        failing.clear()
        assert await wal.probe()
        assert await wal.append(events(1, start=101))
        wal.close()

    asyncio.run(after())

"""One WAL file (``WalFile``, the unit a segment is made of): durable appends, group commit
(threads and asyncio), recovery of a torn tail, refusal of foreign files, and what a
failed write or fsync does to the file."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from pathlib import Path

import pytest

from worker.wal.format import HEADER_SIZE, WalError, WalFormatError, encode_record, scan
from worker.wal.log import AsyncCommit, WalFile, WalLocked


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


def test_append_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "a.wal"
    wal = WalFile.create(path)
    ends = [wal.append(encode_record(i, 11, i, f"p{i}".encode())) for i in range(1, 6)]
    assert wal.synced == ends[-1] == path.stat().st_size
    wal.close()
    wal2, result = WalFile.open(path)
    wal2.close()
    assert [r.lsn for r in result.records] == [1, 2, 3, 4, 5]
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
    assert sorted(r.lsn for r in records) == sorted(
        i * 1000 + j for i in range(32) for j in range(per_thread))
    # Each thread's records are in its own order.
    for i in range(32):
        mine = [r.lsn for r in records if r.lsn // 1000 == i]
        assert mine == sorted(mine)
    assert fsync.calls < 32 * per_thread
    assert wal.fsyncs == fsync.calls - 1  # one more: the creation of the file


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
    assert [r.lsn for r in result.records] == [1, 2, 3]
    assert "short" in result.error
    assert path.stat().st_size == good
    wal2.append(encode_record(4, 11, 0, b"new"))
    wal2.close()
    assert [r.lsn for r in scan(path.read_bytes()).records] == [1, 2, 3, 4]


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
        if calls == 3:  # the creation, the first append, then this
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
    assert [r.lsn for r in result.records][:1] == [1]




def test_group_commit_32_asyncio_tasks_shares_fsyncs(tmp_path: Path) -> None:
    fsync = CountingFsync()
    path = tmp_path / "t.wal"
    wal = WalFile.create(path, fsync=fsync)
    commit = AsyncCommit(wal)
    violations: list[int] = []

    async def appender(i: int) -> None:
        for j in range(20):
            end = wal.write(encode_record(i * 1000 + j, 11, 0, b"a" * 100))
            await commit.wait(end)
            if end > fsync.durable:
                violations.append(end)

    async def main() -> None:
        await asyncio.gather(*(appender(i) for i in range(32)))

    asyncio.run(main())
    wal.close()
    assert violations == []
    records = scan(path.read_bytes()).records
    assert sorted(r.lsn for r in records) == sorted(
        i * 1000 + j for i in range(32) for j in range(20))
    assert wal.fsyncs < 32 * 20 / 4, "32 tasks must share fsyncs"


def test_create_syncs_with_the_injected_fsync_and_leaves_nothing_when_it_fails(
    tmp_path: Path,
) -> None:
    fsync = CountingFsync()
    WalFile.create(tmp_path / "ok.wal", encode_record(1, 0x81, 0, b""), fsync=fsync).close()
    assert fsync.calls == 1 and fsync.durable == HEADER_SIZE + 32

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        WalFile.create(tmp_path / "full.wal", fsync=full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.wal"]


def test_any_error_in_a_batch_breaks_the_file(tmp_path: Path) -> None:
    """Not only OSError: whatever interrupts a batch leaves it not durable, so the file
    must refuse everything after it, or later appends would be acknowledged at offsets
    the lost batch was meant to fill."""
    calls = 0

    def odd(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # creation, first append, then this one
            raise RuntimeError("not an OSError")
        os.fdatasync(fd)

    path = tmp_path / "r.wal"
    wal = WalFile.create(path, fsync=odd)
    wal.append(encode_record(1, 11, 0, b"one"))
    with pytest.raises(WalError, match="not an OSError"):
        wal.append(encode_record(2, 11, 0, b"two"))
    assert wal.broken
    with pytest.raises(WalError):
        wal.append(encode_record(3, 11, 0, b"three"))
    wal.cut_to_synced()
    wal.close()
    result = scan(path.read_bytes())
    assert [r.lsn for r in result.records] == [1] and not result.error


def test_close_refuses_writes_it_will_not_write(tmp_path: Path) -> None:
    """A record queued while close() makes the last batch durable would never be
    written: write() must refuse it instead of returning an offset."""
    entered, release = threading.Event(), threading.Event()
    hold = threading.Event()

    def slow(fd: int) -> None:
        if hold.is_set():
            entered.set()
            assert release.wait(10)
        os.fdatasync(fd)

    path = tmp_path / "c.wal"
    wal = WalFile.create(path, fsync=slow)
    wal.write(encode_record(1, 11, 0, b"queued before close"))
    hold.set()
    closer = threading.Thread(target=wal.close)
    closer.start()
    assert entered.wait(10)  # close() is syncing the last batch
    try:
        with pytest.raises(WalError, match="closed"):
            wal.write(encode_record(2, 11, 0, b"too late"))
    finally:
        release.set()
        closer.join()
    assert [r.lsn for r in scan(path.read_bytes()).records] == [1]


def test_cut_to_synced_drops_what_was_written_but_never_synced(tmp_path: Path) -> None:
    calls = 0

    def fail_second(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)

    path = tmp_path / "t.wal"
    wal = WalFile.create(path, fsync=fail_second)
    good = wal.append(encode_record(1, 11, 0, b"durable"))
    with pytest.raises(WalError):
        wal.append(encode_record(2, 11, 0, b"written, fsync failed"))
    assert path.stat().st_size > good  # pwrite got there, the fsync did not
    wal.cut_to_synced()
    assert path.stat().st_size == good == wal.synced
    wal.close()
